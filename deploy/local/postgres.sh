#!/usr/bin/env bash
# Local PostgreSQL cluster for development and tests: a project-owned cluster
# under the var dir on its own port, independent of any system cluster.
# Installs Debian's postgresql package if the server binaries are missing.
# See README.md.
set -euo pipefail

usage() {
    cat <<EOF
usage: $(basename "$0") start|stop|status|url|clean

  start   install PostgreSQL if needed, create the cluster (first run only),
          start it on 127.0.0.1:\$AUTOGLM_PG_PORT and ensure role/database autoglm
  stop    stop the cluster (fast shutdown)
  status  exit 0 if the cluster is running and accepting connections, else 1
  url     print the database URL (postgresql+asyncpg://...) and nothing else
  clean   stop the cluster and delete its data and logs

environment:
  AUTOGLM_DATABASE_URL  use this external database: start nothing, "url" prints it
  AUTOGLM_PG_PORT       port of the local cluster (default 55432)
  AUTOGLM_VAR_DIR       state dir (default <repo>/var; PostgreSQL uses var/postgres)
EOF
}

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=deploy/local/lib.sh
source "$SCRIPT_DIR/lib.sh"
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)
VAR_DIR=${AUTOGLM_VAR_DIR:-$REPO_ROOT/var}

HOST=127.0.0.1
PORT=${AUTOGLM_PG_PORT:-55432}
EXTERNAL_URL=${AUTOGLM_DATABASE_URL:-}

DB_NAME=autoglm
DB_USER=autoglm
DB_PASSWORD=autoglm
LOCAL_URL="postgresql+asyncpg://$DB_USER:$DB_PASSWORD@$HOST:$PORT/$DB_NAME"

START_TIMEOUT=60
# PostgreSQL refuses to run as root; when we are root we run it as this user.
PG_USER=postgres

PG_VAR="$VAR_DIR/postgres"
DATA_DIR="$PG_VAR/data"
SOCKET_DIR="$PG_VAR/run"
LOG_FILE="$PG_VAR/postgres.log"

PG_BIN=""


# ---------------------------------------------------------------- prerequisites

# Sets PG_BIN to the newest server install: Debian keeps each major version in
# /usr/lib/postgresql/<major>/bin and puts no initdb/pg_ctl on the PATH.
find_pg_bin() {
    local dir
    dir=$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin 2>/dev/null | sort -V | tail -n 1)
    if [[ -n $dir && -x $dir/pg_ctl && -x $dir/initdb ]]; then
        PG_BIN=$dir
        return 0
    fi
    # Other layouts (e.g. a distribution that puts them on the PATH).
    local pg_ctl
    pg_ctl=$(command -v pg_ctl 2>/dev/null) || return 1
    [[ -x $(dirname "$pg_ctl")/initdb ]] || return 1
    PG_BIN=$(dirname "$pg_ctl")
}

install_postgres() {
    [[ $EUID -eq 0 ]] ||
        die "PostgreSQL server binaries not found: install them (e.g. sudo apt-get install postgresql), or set AUTOGLM_DATABASE_URL"
    command -v apt-get >/dev/null 2>&1 ||
        die "PostgreSQL server binaries not found and apt-get is not available: install PostgreSQL, or set AUTOGLM_DATABASE_URL"
    echo "installing PostgreSQL with apt-get (first run only)..."
    # apt's chatter is only worth showing when it fails.
    local apt_log
    apt_log=$(mktemp)
    # The package may create and start a system cluster on port 5432: harmless,
    # this script never uses it.
    if ! { apt-get update -qq &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; } >"$apt_log" 2>&1; then
        tail -n 30 "$apt_log" >&2
        rm -f "$apt_log"
        die "installing PostgreSQL with apt-get failed (see above)"
    fi
    rm -f "$apt_log"
}

require_postgres() {
    find_pg_bin && return 0
    install_postgres
    find_pg_bin || die "PostgreSQL was installed but initdb/pg_ctl were not found under /usr/lib/postgresql"
}

# Runs a command as the cluster owner ($PG_USER when we are root, else as us).
as_pg() {
    if [[ $EUID -eq 0 ]]; then
        runuser -u "$PG_USER" -- "$@"
    else
        "$@"
    fi
}

# As root, the cluster files must belong to $PG_USER, which must also be able
# to reach them (every parent dir traversable).
prepare_var_dir() {
    mkdir -p "$PG_VAR"
    if [[ $EUID -eq 0 ]]; then
        if ! id -u "$PG_USER" >/dev/null 2>&1; then
            # The Debian package creates it; other installs may not.
            useradd --system --home-dir "$PG_VAR" --shell /usr/sbin/nologin "$PG_USER"
        fi
        chown "$PG_USER:" "$PG_VAR"
        as_pg test -w "$PG_VAR" ||
            die "user $PG_USER cannot write to $PG_VAR (is a parent dir not traversable by others?): set AUTOGLM_VAR_DIR to a path it can reach"
    fi
    as_pg mkdir -p "$SOCKET_DIR"
    chmod 0700 "$PG_VAR"
    # Unix socket paths are limited to 107 bytes.
    local socket="$SOCKET_DIR/.s.PGSQL.$PORT"
    ((${#socket} <= 107)) || die "socket path too long ($socket): set AUTOGLM_VAR_DIR to a shorter path"
}

# ------------------------------------------------------------------ cluster

initdb_once() {
    [[ -f $DATA_DIR/PG_VERSION ]] && return 0
    echo "creating PostgreSQL cluster in $DATA_DIR..."
    # UTF-8 character semantics (lower(), ILIKE on non-ASCII) with plain
    # byte-order collation; C.UTF-8 is not on every system.
    local locale=C
    if locale -a 2>/dev/null | grep -qiE '^c\.utf-?8$'; then locale=C.UTF-8; fi
    # Passwords are checked on TCP (as the application connects); the unix
    # socket, reachable only by the cluster owner, is trusted for admin work.
    as_pg "$PG_BIN/initdb" --pgdata="$DATA_DIR" --username=postgres \
        --encoding=UTF8 --locale="$locale" --auth-local=trust --auth-host=scram-sha-256 \
        --no-instructions >/dev/null
    # Our settings live in a file that is rewritten on every start (so that a
    # changed AUTOGLM_PG_PORT takes effect); postgresql.conf just includes it.
    echo "include_if_exists = 'autoglm.conf'" | as_pg tee -a "$DATA_DIR/postgresql.conf" >/dev/null
}

write_config() {
    as_pg tee "$DATA_DIR/autoglm.conf" >/dev/null <<EOF
# Generated by deploy/local/postgres.sh on every start: edit the script instead.
listen_addresses = '$HOST'
port = $PORT
unix_socket_directories = '$SOCKET_DIR'
# A throwaway dev/test cluster: durability is not worth the disk flushes, and
# skipping them makes schema setup and tests noticeably faster. A crash (not a
# clean stop) can corrupt it; "postgres.sh clean" then starts over.
fsync = off
synchronous_commit = off
full_page_writes = off
EOF
}

is_running() {
    [[ -f $DATA_DIR/PG_VERSION ]] && as_pg "$PG_BIN/pg_ctl" status --pgdata="$DATA_DIR" >/dev/null 2>&1
}

# True if something accepts TCP connections on $1:$2.

# Sets EXT_HOST and EXT_PORT from AUTOGLM_DATABASE_URL
# ("postgresql+asyncpg://user:pw@host:5432/db?x=y" -> host, 5432).
parse_external_url() {
    local rest=${EXTERNAL_URL#*://}
    rest=${rest##*@}
    rest=${rest%%/*}
    rest=${rest%%\?*}
    if [[ $rest =~ ^\[(.*)\](:([0-9]+))?$ ]]; then # [ipv6]:port
        EXT_HOST=${BASH_REMATCH[1]}
        EXT_PORT=${BASH_REMATCH[3]:-5432}
    elif [[ $rest == *:* ]]; then
        EXT_HOST=${rest%:*}
        EXT_PORT=${rest##*:}
    else
        EXT_HOST=$rest
        EXT_PORT=5432
    fi
    [[ -n $EXT_HOST && $EXT_PORT =~ ^[0-9]+$ ]] ||
        die "cannot find host:port in AUTOGLM_DATABASE_URL"
}

is_ready() {
    "$PG_BIN/pg_isready" --quiet --host="$HOST" --port="$PORT" --dbname=postgres
}


wait_ready() {
    local start=$SECONDS
    until is_ready; do
        if ! is_running; then
            echo "error: PostgreSQL exited during startup" >&2
            show_log_tail
            return 1
        fi
        if ((SECONDS - start >= START_TIMEOUT)); then
            echo "error: PostgreSQL not ready on $HOST:$PORT within ${START_TIMEOUT}s" >&2
            show_log_tail
            return 1
        fi
        sleep 0.5
    done
}

# Creates (or repairs) the application's role and database; safe to repeat.
ensure_role_and_database() {
    as_pg "$PG_BIN/psql" --no-psqlrc --quiet --host="$SOCKET_DIR" --port="$PORT" \
        --username=postgres --dbname=postgres -v ON_ERROR_STOP=1 >/dev/null <<EOF
SELECT format('CREATE ROLE %I', '$DB_USER')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$DB_USER')\\gexec
ALTER ROLE $DB_USER WITH LOGIN PASSWORD '$DB_PASSWORD';
SELECT format('CREATE DATABASE %I OWNER %I', '$DB_NAME', '$DB_USER')
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$DB_NAME')\\gexec
EOF
}

# ------------------------------------------------------------------ subcommands

cmd_start() {
    if [[ -n $EXTERNAL_URL ]]; then
        echo "using external database from AUTOGLM_DATABASE_URL: not starting a local one"
        return 0
    fi
    require_postgres
    prepare_var_dir
    # Serialise concurrent starts (e.g. parallel test runs) on this var dir.
    exec 9>"$PG_VAR/.lock"
    flock 9

    if is_running; then
        echo "PostgreSQL already running"
    else
        if port_open "$HOST" "$PORT"; then
            die "port $PORT on $HOST is already in use by another process: set AUTOGLM_PG_PORT or AUTOGLM_DATABASE_URL"
        fi
        initdb_once
        write_config
        echo "starting PostgreSQL $("$PG_BIN/pg_ctl" --version | awk '{print $3}') on $HOST:$PORT, log: $LOG_FILE"
        # setsid: own session, so Ctrl-C in the calling terminal does not reach
        # it; 9>&-: the server must not inherit (and hold) the start lock.
        if ! as_pg setsid "$PG_BIN/pg_ctl" start --pgdata="$DATA_DIR" --log="$LOG_FILE" \
            --wait --timeout="$START_TIMEOUT" >/dev/null 9>&-; then
            echo "error: PostgreSQL failed to start" >&2
            show_log_tail
            exit 1
        fi
    fi
    wait_ready || exit 1
    ensure_role_and_database
    echo "PostgreSQL ready: $LOCAL_URL"
}

cmd_stop() {
    if [[ -n $EXTERNAL_URL ]]; then
        echo "using external database from AUTOGLM_DATABASE_URL: nothing to stop"
        return 0
    fi
    if ! find_pg_bin || ! is_running; then
        echo "PostgreSQL is not running"
        return 0
    fi
    echo "stopping PostgreSQL..."
    as_pg "$PG_BIN/pg_ctl" stop --pgdata="$DATA_DIR" --mode=fast --wait >/dev/null
    echo "PostgreSQL stopped"
}

cmd_status() {
    if [[ -n $EXTERNAL_URL ]]; then
        parse_external_url
        if port_open "$EXT_HOST" "$EXT_PORT"; then
            echo "external database at $EXT_HOST:$EXT_PORT (AUTOGLM_DATABASE_URL) is accepting connections"
            return 0
        fi
        echo "external database at $EXT_HOST:$EXT_PORT (AUTOGLM_DATABASE_URL) is not reachable"
        return 1
    fi
    if find_pg_bin && is_running && is_ready; then
        echo "PostgreSQL running on $HOST:$PORT"
        return 0
    fi
    echo "PostgreSQL is not running"
    return 1
}

cmd_url() {
    echo "${EXTERNAL_URL:-$LOCAL_URL}"
}

cmd_clean() {
    cmd_stop
    if [[ -z $EXTERNAL_URL ]]; then
        rm -rf "$PG_VAR"
        echo "deleted $PG_VAR"
    fi
}

main() {
    case "${1:-}" in
    start | stop | status | url | clean)
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
