#!/usr/bin/env bash
# Local Jaeger v2 (all-in-one, in-memory storage) for development and tests.
# Installs nothing system-wide: the binary is built once from the released Go module
# into the cache dir; its config is deploy/local/jaeger/config.yaml, its state and log
# live under the var dir. See README.md.
set -euo pipefail

usage() {
    cat <<EOF
usage: $(basename "$0") start|stop|status|wait|build|clean

  start   build Jaeger (first run only: a few minutes), then start it and wait until
          its query API answers on 127.0.0.1:\$UI_PORT
  stop    stop it (SIGTERM, SIGKILL after ${STOP_TIMEOUT}s)
  status  exit 0 if it is running and its query API answers, else 1
  wait    wait (up to ${START_TIMEOUT}s) until the query API answers
  build   only build the binary into the cache (idempotent)
  clean   stop it and delete its var dir (log); the built binary stays cached

environment:
  AUTOGLM_JAEGER_PORT_BASE  when set: UI/query on base, OTLP gRPC base+1, OTLP HTTP base+2,
                            query gRPC base+3, health check base+4 (for test sessions side by side)
                            unset: the usual 16686, 4317, 4318, 16685 and 13133
  AUTOGLM_VAR_DIR           state dir (default <repo>/var; Jaeger uses var/jaeger)
  AUTOGLM_CACHE_DIR         cache dir (default <repo>/.cache; binary in cache/jaeger/<version>/)
  AUTOGLM_JAEGER_UI_DIR     web UI Jaeger serves on the UI port: a directory with index.html and
                            static/, e.g. a built Jaeger UI (default: the small trace view in
                            deploy/local/jaeger/ui, as no registry we reach ships the Jaeger UI)
  GO                        the Go toolchain (default: go on PATH, else /usr/local/go/bin/go)
EOF
}

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=deploy/local/lib.sh
source "$SCRIPT_DIR/lib.sh"
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)
VAR_DIR=${AUTOGLM_VAR_DIR:-$REPO_ROOT/var}
CACHE_DIR=${AUTOGLM_CACHE_DIR:-$REPO_ROOT/.cache}

# Jaeger v2 releases are tagged twice; the Go module path has no /v2, so the Go module proxy
# knows them by their v1 twin: v2.13.0 is module version v1.76.0 (same commit, same CHANGELOG entry).
JAEGER_VERSION=v2.13.0
JAEGER_MODULE=github.com/jaegertracing/jaeger
JAEGER_MODULE_VERSION=v1.76.0

HOST=127.0.0.1
if [[ -n ${AUTOGLM_JAEGER_PORT_BASE:-} ]]; then
    [[ $AUTOGLM_JAEGER_PORT_BASE =~ ^[0-9]+$ ]] || { echo "error: AUTOGLM_JAEGER_PORT_BASE must be a port number" >&2; exit 2; }
    UI_PORT=$AUTOGLM_JAEGER_PORT_BASE
    OTLP_GRPC_PORT=$((UI_PORT + 1))
    OTLP_HTTP_PORT=$((UI_PORT + 2))
    QUERY_GRPC_PORT=$((UI_PORT + 3))
    HEALTH_PORT=$((UI_PORT + 4))
else
    UI_PORT=16686 OTLP_GRPC_PORT=4317 OTLP_HTTP_PORT=4318 QUERY_GRPC_PORT=16685 HEALTH_PORT=13133
fi

START_TIMEOUT=60
STOP_TIMEOUT=15

BIN_DIR="$CACHE_DIR/jaeger/$JAEGER_VERSION"
BIN="$BIN_DIR/jaeger"
CONFIG="$SCRIPT_DIR/jaeger/config.yaml"
UI_DIR=${AUTOGLM_JAEGER_UI_DIR:-$SCRIPT_DIR/jaeger/ui}
JAEGER_VAR="$VAR_DIR/jaeger"
PID_FILE="$JAEGER_VAR/jaeger.pid"
LOG_FILE="$JAEGER_VAR/jaeger.log"


# ---------------------------------------------------------------- build

find_go() {
    GO=${GO:-$(command -v go || true)}
    [[ -n $GO ]] || GO=/usr/local/go/bin/go
    [[ -x $GO ]] || die "Go is required to build Jaeger (looked on PATH and at /usr/local/go/bin/go): install Go 1.24+ or set GO"
}

# Prints a line every 30 s while the build (pid $1) runs, so a long first build is not mistaken for a hang.
report_progress() {
    local pid=$1 start=$SECONDS next=30
    while kill -0 "$pid" 2>/dev/null; do
        sleep 2
        if ((SECONDS - start >= next)) && kill -0 "$pid" 2>/dev/null; then
            echo "  still building Jaeger ($((SECONDS - start))s)..."
            next=$((next + 30))
        fi
    done
}

# The module carries a `replace` directive, which `go install pkg@version` refuses, so the module
# source is downloaded into Go's module cache and built there as the main module.
cmd_build() {
    [[ -x $BIN ]] && return 0
    find_go
    mkdir -p "$BIN_DIR"
    exec 8>"$BIN_DIR/.build.lock"
    flock 8
    [[ -x $BIN ]] && return 0  # built by a concurrent start while we waited
    echo "building Jaeger $JAEGER_VERSION from its Go module with $("$GO" env GOVERSION) (first run only: about 8 min of CPU time)..."
    local start=$SECONDS src build_log tmp="$BIN.tmp.$$"
    build_log=$(mktemp)
    export GOFLAGS=-modcacherw  # keep the module cache deletable without root
    src=$("$GO" mod download -json "$JAEGER_MODULE@$JAEGER_MODULE_VERSION" 2>"$build_log" |
        sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p') || true
    [[ -n $src && -d $src ]] || { cat "$build_log" >&2; rm -f "$build_log"; die "could not download the Jaeger module"; }
    (cd "$src" && CGO_ENABLED=0 "$GO" build -trimpath -o "$tmp" \
        -ldflags "-s -w -X $JAEGER_MODULE/internal/version.latestVersion=$JAEGER_VERSION" ./cmd/jaeger) \
        >>"$build_log" 2>&1 &
    local pid=$!
    report_progress "$pid" &
    local reporter=$!
    if ! wait "$pid"; then
        kill "$reporter" 2>/dev/null || true
        tail -n 30 "$build_log" >&2
        rm -f "$build_log" "$tmp"
        die "building Jaeger failed (see above)"
    fi
    kill "$reporter" 2>/dev/null || true
    rm -f "$build_log"
    mv -f "$tmp" "$BIN"
    echo "Jaeger $JAEGER_VERSION built in $((SECONDS - start))s: $BIN"
}

# ------------------------------------------------------------------ process state

# Prints the pid if our Jaeger is running.
running_pid() {
    running_pid_of 'jaeger'
}

# The query API answers only once storage, receivers and the query server are all up.
query_api_ready() {
    curl -fsS -m 3 -o /dev/null "http://$HOST:$UI_PORT/api/services" 2>/dev/null
}


wait_ready() {
    local pid=${1:-} start=$SECONDS
    until query_api_ready; do
        if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
            echo "error: Jaeger exited during startup" >&2
            show_log_tail
            return 1
        fi
        if ((SECONDS - start >= START_TIMEOUT)); then
            echo "error: Jaeger's query API did not answer on $HOST:$UI_PORT within ${START_TIMEOUT}s" >&2
            show_log_tail
            return 1
        fi
        sleep 0.5
    done
}

# ------------------------------------------------------------------ subcommands

cmd_start() {
    command -v curl >/dev/null 2>&1 || die "curl is required (apt-get install curl)"
    mkdir -p "$JAEGER_VAR"
    exec 9>"$JAEGER_VAR/.lock"
    flock 9
    local pid
    if pid=$(running_pid); then
        wait_ready "$pid"
        echo "Jaeger already running (pid $pid): UI http://$HOST:$UI_PORT, OTLP http://$HOST:$OTLP_HTTP_PORT"
        return 0
    fi
    local p
    for p in "$UI_PORT" "$OTLP_GRPC_PORT" "$OTLP_HTTP_PORT" "$QUERY_GRPC_PORT" "$HEALTH_PORT"; do
        port_open "$HOST" "$p" &&
            die "port $p on $HOST is already in use by another process: set AUTOGLM_JAEGER_PORT_BASE"
    done
    [[ -f $UI_DIR/index.html ]] || die "AUTOGLM_JAEGER_UI_DIR=$UI_DIR has no index.html"
    cmd_build
    if [[ -f $LOG_FILE ]]; then mv -f "$LOG_FILE" "$LOG_FILE.1"; fi
    echo "starting Jaeger $JAEGER_VERSION (in-memory) on $HOST:$UI_PORT, log: $LOG_FILE"
    # setsid: Ctrl-C in the calling terminal does not reach it; 8>&- 9>&-: it must not hold our locks.
    JAEGER_UI_PORT=$UI_PORT JAEGER_OTLP_GRPC_PORT=$OTLP_GRPC_PORT JAEGER_OTLP_HTTP_PORT=$OTLP_HTTP_PORT \
        JAEGER_QUERY_GRPC_PORT=$QUERY_GRPC_PORT JAEGER_HEALTH_PORT=$HEALTH_PORT JAEGER_UI_ASSETS=$UI_DIR \
        setsid nohup "$BIN" --config "file:$CONFIG" >>"$LOG_FILE" 2>&1 </dev/null 8>&- 9>&- &
    pid=$!
    echo "$pid" >"$PID_FILE"
    if ! wait_ready "$pid"; then
        kill -9 "$pid" 2>/dev/null || true
        rm -f "$PID_FILE"
        exit 1
    fi
    echo "Jaeger ready: UI and query API http://$HOST:$UI_PORT, OTLP gRPC $HOST:$OTLP_GRPC_PORT, OTLP HTTP http://$HOST:$OTLP_HTTP_PORT"
}

cmd_stop() {
    local pid
    if ! pid=$(running_pid); then
        echo "Jaeger is not running"
        rm -f "$PID_FILE"
        return 0
    fi
    echo "stopping Jaeger (pid $pid)..."
    kill -TERM "$pid" 2>/dev/null || true
    local start=$SECONDS
    while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS - start >= STOP_TIMEOUT)); then
            echo "Jaeger did not stop within ${STOP_TIMEOUT}s: killing it"
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.2
    done
    rm -f "$PID_FILE"
    echo "Jaeger stopped"
}

cmd_status() {
    local pid
    if pid=$(running_pid) && query_api_ready; then
        echo "Jaeger running (pid $pid): UI http://$HOST:$UI_PORT"
        return 0
    fi
    echo "Jaeger is not running${pid:+ (pid $pid does not answer on $HOST:$UI_PORT)}"
    return 1
}

cmd_wait() {
    local pid
    pid=$(running_pid) || die "Jaeger is not running (start it with: $0 start)"
    wait_ready "$pid"
    echo "Jaeger ready on $HOST:$UI_PORT"
}

cmd_clean() {
    cmd_stop
    rm -rf "$JAEGER_VAR"
    echo "deleted $JAEGER_VAR"
}

main() {
    case "${1:-}" in
    start | stop | status | wait | build | clean)
        [[ $# -eq 1 ]] || { usage >&2; exit 2; }
        "cmd_$1"
        ;;
    -h | --help | help)
        usage
        ;;
    *)
        usage >&2
        exit 2
        ;;
    esac
}

main "$@"
