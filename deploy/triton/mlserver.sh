#!/usr/bin/env bash
# A CPU stand-in for Triton: MLServer speaking the KServe v2 / Open Inference Protocol (the protocol
# Triton speaks, so tritonclient talks to it unchanged), serving one HF checkpoint through our runtime
# deploy/triton/mlserver_runtime.py with Triton's LLM input/output names. Used by the e2e tests of the
# triton backend and for trying the backend without a GPU. See README.md ("triton backend").
#
# MLServer lives in a virtualenv of its own: its pins (fastapi, starlette) clash with the project's.
set -euo pipefail

usage() {
    cat <<EOF
usage: $(basename "$0") setup|start|stop|status

  setup   create the MLServer virtualenv if missing (MLServer + torch + transformers)
  start   setup, write the model repository, start MLServer and wait until the model is ready
  stop    stop the server started by "start" (SIGTERM, then SIGKILL after 20 s)
  status  exit 0 if the server answers ready on its HTTP port, else 1

environment:
  AUTOGLM_MLSERVER_VENV        virtualenv (default <repo>/.cache/mlserver-venv)
  AUTOGLM_MLSERVER_DIR         state dir: settings, model repository, log, pid (default \$AUTOGLM_VAR_DIR/mlserver)
  AUTOGLM_MLSERVER_HTTP_PORT   HTTP port (default 18080)
  AUTOGLM_MLSERVER_GRPC_PORT   gRPC port, the one the triton backend uses (default 18081)
  AUTOGLM_MLSERVER_MODEL       model name served (default tiny-light)
  AUTOGLM_MLSERVER_CHECKPOINT  HF checkpoint dir (default \$AUTOGLM_VAR_DIR/models/<model>)
  AUTOGLM_MLSERVER_MAX_BATCH   largest batch the model takes, reported as max_batch_size (default 8)
  AUTOGLM_VAR_DIR              project state dir (default <repo>/var)
EOF
}

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)
VAR_DIR=${AUTOGLM_VAR_DIR:-$REPO_ROOT/var}

VENV=${AUTOGLM_MLSERVER_VENV:-$REPO_ROOT/.cache/mlserver-venv}
STATE_DIR=${AUTOGLM_MLSERVER_DIR:-$VAR_DIR/mlserver}
HOST=127.0.0.1
HTTP_PORT=${AUTOGLM_MLSERVER_HTTP_PORT:-18080}
GRPC_PORT=${AUTOGLM_MLSERVER_GRPC_PORT:-18081}
MODEL=${AUTOGLM_MLSERVER_MODEL:-tiny-light}
CHECKPOINT=${AUTOGLM_MLSERVER_CHECKPOINT:-$VAR_DIR/models/$MODEL}
MAX_BATCH=${AUTOGLM_MLSERVER_MAX_BATCH:-8}

PYTHON=${PYTHON:-python3.11}
MLSERVER_SPEC="mlserver>=1.6,<2"
START_TIMEOUT=180
PID_FILE="$STATE_DIR/mlserver.pid"
LOG_FILE="$STATE_DIR/mlserver.log"
# Written last by setup: a venv without it is half-built and is built again.
VENV_STAMP="$VENV/.autoglm-installed"

die() {
    echo "error: $*" >&2
    exit 1
}

# The project's own torch / transformers versions (from constraints.txt), so the two venvs load
# checkpoints the same way and pip installs torch from its cache instead of downloading it again.
pinned() {
    local name=$1
    grep -iE "^${name}==" "$REPO_ROOT/constraints.txt" 2>/dev/null | head -n 1 || true
}

setup() {
    [[ -f $VENV_STAMP ]] && return 0
    command -v "$PYTHON" >/dev/null || die "$PYTHON is required to create $VENV"
    if [[ ! -x $VENV/bin/python ]]; then
        echo "creating the MLServer virtualenv $VENV ..."
        mkdir -p "$(dirname "$VENV")"
        "$PYTHON" -m venv "$VENV"
    fi
    local specs=("$MLSERVER_SPEC")
    local name spec
    for name in torch transformers tokenizers safetensors; do
        spec=$(pinned "$name")
        specs+=("${spec:-$name}")
    done
    echo "installing ${specs[*]} into $VENV (first run: several minutes) ..."
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q "${specs[@]}"
    touch "$VENV_STAMP"
    echo "MLServer virtualenv ready: $("$VENV/bin/mlserver" --version 2>/dev/null || echo mlserver)"
}

pid_alive() {
    [[ -f $PID_FILE ]] && kill -0 "$(cat "$PID_FILE")" 2>/dev/null
}

is_ready() {
    "$VENV/bin/python" - "$HOST" "$HTTP_PORT" "$MODEL" <<'EOF' >/dev/null 2>&1
import sys, urllib.request
host, port, model = sys.argv[1:4]
for path in ("/v2/health/ready", f"/v2/models/{model}/ready"):
    with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=2) as response:
        assert response.status == 200
EOF
}

# MLServer's settings.json (server) and model-settings.json (one model), written fresh on every start.
write_repository() {
    [[ -f $CHECKPOINT/config.json ]] ||
        die "no checkpoint at $CHECKPOINT (build the tiny ones with: autoglm models build-tiny)"
    local model_dir="$STATE_DIR/models/$MODEL"
    mkdir -p "$model_dir"
    cat >"$STATE_DIR/settings.json" <<EOF
{
  "host": "$HOST",
  "http_port": $HTTP_PORT,
  "grpc_port": $GRPC_PORT,
  "metrics_port": 0,
  "metrics_endpoint": null,
  "parallel_workers": 0,
  "load_models_at_startup": true,
  "debug": false
}
EOF
    cat >"$model_dir/model-settings.json" <<EOF
{
  "name": "$MODEL",
  "implementation": "mlserver_runtime.HFTextGenerationRuntime",
  "max_batch_size": 0,
  "parameters": {
    "uri": "$CHECKPOINT",
    "version": "1",
    "extra": {"max_batch_size": $MAX_BATCH}
  }
}
EOF
}

start() {
    setup
    if pid_alive && is_ready; then
        echo "MLServer already running (pid $(cat "$PID_FILE")) on $HOST:$GRPC_PORT"
        return 0
    fi
    mkdir -p "$STATE_DIR"
    write_repository
    echo "starting MLServer: model $MODEL from $CHECKPOINT, gRPC $HOST:$GRPC_PORT, HTTP $HOST:$HTTP_PORT ..."
    # The runtime module is found through PYTHONPATH; the server reads the repository in STATE_DIR.
    (
        cd "$STATE_DIR"
        PYTHONPATH="$SCRIPT_DIR${PYTHONPATH:+:$PYTHONPATH}" setsid "$VENV/bin/mlserver" start "$STATE_DIR" \
            >"$LOG_FILE" 2>&1 &
        echo $! >"$PID_FILE"
    )
    local waited=0
    until is_ready; do
        if ! pid_alive; then
            tail -n 30 "$LOG_FILE" >&2 || true
            die "MLServer exited during start (log: $LOG_FILE)"
        fi
        if ((waited >= START_TIMEOUT)); then
            tail -n 30 "$LOG_FILE" >&2 || true
            die "MLServer not ready after ${START_TIMEOUT}s (log: $LOG_FILE)"
        fi
        sleep 1
        waited=$((waited + 1))
    done
    echo "MLServer ready (pid $(cat "$PID_FILE")) after ${waited}s: gRPC $HOST:$GRPC_PORT, model $MODEL"
}

stop() {
    if ! pid_alive; then
        rm -f "$PID_FILE"
        echo "MLServer not running"
        return 0
    fi
    local pid
    pid=$(cat "$PID_FILE")
    echo "stopping MLServer (pid $pid) ..."
    # setsid made it a process group leader: the group holds any worker processes it started.
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    local waited=0
    while kill -0 "$pid" 2>/dev/null && ((waited < 20)); do
        sleep 1
        waited=$((waited + 1))
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "MLServer did not stop in 20 s: killing it"
        kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$PID_FILE"
    echo "MLServer stopped"
}

case ${1:-} in
setup) setup ;;
start) start ;;
stop) stop ;;
status) pid_alive && is_ready ;;
-h | --help | help) usage ;;
*)
    usage >&2
    exit 2
    ;;
esac
