"""Start and stop real servers for integration tests: dagster-webserver, PostgreSQL, a headless browser.

Every server runs in its own process group (``start_new_session=True``) and is stopped by signalling
the whole group: dagster-webserver spawns a code server child, and a plain terminate of the parent
would leave it (and its port) behind. Nothing here downloads anything; missing system tools turn into
``pytest.skip`` with the command that installs them.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
INSTALL_HINT = "run `bash scripts/system_deps.sh` (Debian: chromium chromium-driver postgresql docker-compose)"


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ServerProcess:
    """A child process group with its log file; ``stop`` ends the group, never anything else."""

    process: subprocess.Popen
    log_path: Path

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, grace_s: float = 10.0) -> None:
        if self.process.poll() is not None:
            return
        pgid = os.getpgid(self.process.pid)
        for sig, wait_s in ((signal.SIGINT, grace_s), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, sig)
            try:
                self.process.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        # children that outlived the leader (code servers) still carry the group id
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)


def start_process(command: list[str], log_path: Path, env: dict[str, str], cwd: Path = REPO_ROOT) -> ServerProcess:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "wb")  # noqa: SIM115  (owned by the child for its lifetime)
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True,
    )
    log.close()
    return ServerProcess(process, log_path)


def wait_for_http(url: str, server: ServerProcess, timeout_s: float) -> bytes:
    """Poll ``url`` until it answers 200; fail with the server's log if it dies or times out."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return response.read()
        except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
            last_error = error
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s ({last_error}):\n{server.log_tail()}")


# --------------------------------------------------------------------------------------------------
# Dagster webserver


@contextlib.contextmanager
def dagster_webserver(dagster_home: Path, config_path: Path, log_dir: Path, timeout_s: float = 120) -> Iterator[str]:
    """Run ``dagster-webserver`` for the project's definitions on a free loopback port; yields its URL."""
    port = free_port()
    env = {
        **os.environ,
        "DAGSTER_HOME": str(dagster_home),
        "AGSSP_CONFIG": str(config_path),
        "DAGSTER_DISABLE_TELEMETRY": "1",
        "PYTHONUNBUFFERED": "1",
    }
    command = [
        str(VENV_BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port),
        "-m", "agssp_pipeline.definitions", "-a", "defs",
    ]
    server = start_process(command, log_dir / "dagster-webserver.log", env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/server_info", server, timeout_s)
        yield url
    finally:
        server.stop()


def graphql(url: str, query: str, variables: dict | None = None, timeout_s: float = 60) -> dict:
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    request = urllib.request.Request(f"{url}/graphql", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        payload = json.loads(response.read())
    if payload.get("errors"):
        raise AssertionError(f"GraphQL errors: {payload['errors']}")
    return payload["data"]


# --------------------------------------------------------------------------------------------------
# Headless Chromium (Debian packages; selenium never downloads a browser or driver here)

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
CHROMEDRIVER_CANDIDATES = ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")


def _first_existing(paths: tuple[str, ...], name: str) -> str | None:
    for path in paths:
        if os.access(path, os.X_OK):
            return path
    return shutil.which(name)


@contextlib.contextmanager
def headless_chromium(profile_dir: Path, window: tuple[int, int] = (1600, 1000)):
    """A selenium Chrome driver on the system Chromium, isolated profile, no network side traffic."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (dev extra)")
    from selenium.webdriver.chrome.service import Service

    browser = _first_existing(CHROMIUM_CANDIDATES, "chromium")
    driver_path = _first_existing(CHROMEDRIVER_CANDIDATES, "chromedriver")
    if browser is None or driver_path is None:
        pytest.skip(f"headless Chromium or chromedriver missing; {INSTALL_HINT}")
    os.environ.setdefault("SE_OFFLINE", "true")  # selenium manager must never reach the network
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--disable-extensions", "--no-default-browser-check",
        f"--user-data-dir={profile_dir}", f"--window-size={window[0]},{window[1]}",
    ):
        options.add_argument(flag)
    service = Service(executable_path=driver_path, log_output=str(profile_dir.parent / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()


# --------------------------------------------------------------------------------------------------
# PostgreSQL


def postgres_bin_dir() -> Path | None:
    """Newest Debian PostgreSQL server binaries, or the ones on PATH."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name.split(".")[0])
    )
    for directory in reversed(candidates):
        if (Path(directory) / "initdb").exists() and (Path(directory) / "pg_ctl").exists():
            return Path(directory)
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb and shutil.which("pg_ctl") else None


@dataclass
class PostgresServer:
    host: str
    port: int
    user: str
    password: str
    database: str

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}:{self.password}@{self.host}:{self.port}/{self.database}"


def _as_user(command: list[str], user: str | None) -> list[str]:
    """PostgreSQL refuses to run as root: drop to ``user`` with runuser/su when we are root."""
    if user is None:
        return command
    if shutil.which("runuser"):
        return ["runuser", "-u", user, "--", *command]
    return ["su", user, "-s", "/bin/sh", "-c", " ".join(map(str, command))]


def _server_user() -> str | None:
    if os.geteuid() != 0:
        return None
    for candidate in ("postgres", "nobody"):
        try:
            pwd.getpwnam(candidate)
            return candidate
        except KeyError:
            continue
    pytest.skip("running as root and no unprivileged user (postgres/nobody) to run PostgreSQL as")


@contextlib.contextmanager
def postgres_server(base_dir: Path, timeout_s: float = 60) -> Iterator[PostgresServer]:
    """A throw-away PostgreSQL cluster on 127.0.0.1 (free port, password auth, socket dir beside the data).

    As root the cluster lives in a fresh folder under the system temp dir owned by the server user
    (pytest's tmp dirs are private to root); it is removed afterwards.
    """
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        pytest.skip(f"PostgreSQL server binaries (initdb, pg_ctl) not found; {INSTALL_HINT}")
    user = _server_user()
    if user is not None:
        base_dir = Path(tempfile.mkdtemp(prefix="agssp-pg-"))
        info = pwd.getpwnam(user)
        os.chown(base_dir, info.pw_uid, info.pw_gid)
    base_dir.mkdir(parents=True, exist_ok=True)
    data_dir, socket_dir, log_file = base_dir / "data", base_dir / "sock", base_dir / "postgres.log"
    password = "agssp-test-password"
    pwfile = base_dir / "pwfile"
    pwfile.write_text(password + "\n")
    socket_dir.mkdir(exist_ok=True)
    if user is not None:
        for path in (socket_dir, pwfile):
            os.chown(path, info.pw_uid, info.pw_gid)
    db_user = "agssp"
    try:
        run = subprocess.run(
            _as_user([str(bin_dir / "initdb"), "-D", str(data_dir), "-U", db_user, f"--pwfile={pwfile}",
                      "--auth=scram-sha-256", "--encoding=UTF8", "--no-sync"], user),
            capture_output=True, text=True, timeout=timeout_s,
        )
        if run.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{run.stdout}\n{run.stderr}")
        port = free_port()
        options = f"-p {port} -k {socket_dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        start = subprocess.run(
            _as_user([str(bin_dir / "pg_ctl"), "-D", str(data_dir), "-l", str(log_file), "-o", options,
                      "-w", "-t", str(int(timeout_s)), "start"], user),
            capture_output=True, text=True, timeout=timeout_s + 10,
        )
        if start.returncode != 0:
            log = log_file.read_text(errors="replace") if log_file.exists() else ""
            raise RuntimeError(f"pg_ctl start failed:\n{start.stdout}\n{start.stderr}\n{log}")
        try:
            yield PostgresServer("127.0.0.1", port, db_user, password, "postgres")
        finally:
            subprocess.run(
                _as_user([str(bin_dir / "pg_ctl"), "-D", str(data_dir), "-m", "immediate", "-w", "stop"], user),
                capture_output=True, timeout=60,
            )
    finally:
        if user is not None:
            shutil.rmtree(base_dir, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Demo config with private storage


def private_demo_config(demo_corpus, target_dir: Path) -> Path:
    """The demo corpus config with ``storage_root`` moved to ``target_dir``: the session's demo corpus
    is shared read-only, so tests that materialise write their artifacts elsewhere."""
    from agssp_pipeline.config import dump_config, load_config

    config = load_config(demo_corpus.config_path)  # source roots come back absolute
    config.storage_root = str(target_dir / "storage")
    target_dir.mkdir(parents=True, exist_ok=True)
    path = target_dir / "agssp.yaml"
    dump_config(config, path)
    return path
