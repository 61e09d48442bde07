#!/bin/sh
# Daemon entrypoint: set the GPU pool limit (pools are instance state, not dagster.yaml settings),
# then run the daemon (queue, schedules, sensors, declarative automation, run monitoring).
set -e
dagster instance concurrency set gpu "${AGSSP_GPU_POOL_LIMIT:-1}"
exec dagster-daemon run -w /opt/dagster/app/workspace.yaml
