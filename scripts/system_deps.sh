#!/usr/bin/env bash
# System packages the integration tests use: headless Chromium + chromedriver (web UI test),
# PostgreSQL server binaries (Dagster on a real database) and docker-compose v1 (offline
# `docker-compose config` validation of docker/docker-compose.yml; it needs no Docker engine).
#
# Installs only what is missing, runs `apt-get update` at most once, never fails the build:
# without root or apt it prints why and the tests that need these tools skip with a reason.
# Set AGSSP_SKIP_SYSTEM_DEPS=1 to skip entirely.
set -u

log() { echo "[system-deps] $*"; }

if [ "${AGSSP_SKIP_SYSTEM_DEPS:-0}" = "1" ]; then
    log "AGSSP_SKIP_SYSTEM_DEPS=1: not installing anything"
    exit 0
fi

# package -> a file that proves it is installed (cheaper and clearer than parsing dpkg output)
declare -A PROBES=(
    [chromium]="/usr/bin/chromium"
    [chromium-driver]="/usr/bin/chromedriver"
    [postgresql]="/usr/lib/postgresql"
    [docker-compose]="/usr/bin/docker-compose"
)

missing=()
for package in chromium chromium-driver postgresql docker-compose; do
    [ -e "${PROBES[$package]}" ] || missing+=("$package")
done

if [ ${#missing[@]} -eq 0 ]; then
    log "all present (chromium, chromium-driver, postgresql, docker-compose)"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    log "apt-get not found: cannot install ${missing[*]}; the web UI / Postgres / compose tests will skip"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        log "not root and no passwordless sudo: cannot install ${missing[*]}; those tests will skip"
        exit 0
    fi
fi

start=$(date +%s)
log "installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get update -qq >/dev/null 2>&1; then
    log "apt-get update failed (no package mirror reachable?); trying the cached package lists"
fi
# no recommends: chromium's recommended fonts/extensions and postgresql's extras are not needed
if $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/tmp/agssp-system-deps.log 2>&1; then
    log "installed ${missing[*]} in $(( $(date +%s) - start )) s"
else
    log "apt-get install failed (see /tmp/agssp-system-deps.log); the tests needing ${missing[*]} will skip"
    tail -n 5 /tmp/agssp-system-deps.log | sed 's/^/[system-deps]   /'
fi
exit 0
