#!/usr/bin/env bash
# Local single-node Apache Kafka (KRaft) for development and tests.
# Installs nothing system-wide: the broker's jars are fetched once with Maven
# into the cache dir, and all state lives under the var dir. See README.md.
set -euo pipefail

usage() {
    cat <<EOF
usage: $(basename "$0") start|stop|status|wait|clean

  start   fetch the Kafka jars (first run only), then start a single-node KRaft
          broker on 127.0.0.1:\$AUTOGLM_KAFKA_PORT and wait until it is ready
  stop    stop the broker (SIGTERM, SIGKILL after ${STOP_TIMEOUT}s)
  status  exit 0 if the broker is running and accepting connections, else 1
  wait    wait (up to ${START_TIMEOUT}s) until the broker accepts connections
  clean   stop the broker and delete its data, config and logs

environment:
  AUTOGLM_KAFKA_BOOTSTRAP  use this external Kafka (host:port,...): start nothing
  AUTOGLM_KAFKA_PORT       broker port (default 19092; controller uses port+1)
  AUTOGLM_VAR_DIR          state dir (default <repo>/var; Kafka uses var/kafka)
  AUTOGLM_CACHE_DIR        cache dir (default <repo>/.cache; jars in cache/kafka/libs)
EOF
}

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=deploy/local/lib.sh
source "$SCRIPT_DIR/lib.sh"
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)
VAR_DIR=${AUTOGLM_VAR_DIR:-$REPO_ROOT/var}
CACHE_DIR=${AUTOGLM_CACHE_DIR:-$REPO_ROOT/.cache}

HOST=127.0.0.1
PORT=${AUTOGLM_KAFKA_PORT:-19092}
CONTROLLER_PORT=$((PORT + 1))
EXTERNAL_BOOTSTRAP=${AUTOGLM_KAFKA_BOOTSTRAP:-}

START_TIMEOUT=90
STOP_TIMEOUT=30
NODE_ID=1

POM="$SCRIPT_DIR/kafka/pom.xml"
# The pom is the single place where the Kafka version is pinned.
KAFKA_VERSION=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$POM")
LIBS_DIR="$CACHE_DIR/kafka/libs"
STAMP="$LIBS_DIR/.fetched-kafka-$KAFKA_VERSION"

KAFKA_VAR="$VAR_DIR/kafka"
DATA_DIR="$KAFKA_VAR/data"
CONFIG="$KAFKA_VAR/server.properties"
LOG4J_CONFIG="$KAFKA_VAR/log4j2.properties"
CLUSTER_ID_FILE="$KAFKA_VAR/cluster.id"
PID_FILE="$KAFKA_VAR/kafka.pid"
LOG_FILE="$KAFKA_VAR/kafka.log"


# ---------------------------------------------------------------- prerequisites

require_java() {
    command -v java >/dev/null 2>&1 ||
        die "Java 17+ is required to run Kafka: install it (e.g. apt-get install openjdk-17-jre-headless)"
    local version major
    version=$(java -version 2>&1 | sed -n 's/.* version "\([^"]*\)".*/\1/p' | head -n 1)
    major=${version%%.*}
    # Java 8 and older report themselves as "1.x".
    [[ $major == 1 ]] && major=$(echo "$version" | cut -d. -f2)
    [[ $major =~ ^[0-9]+$ && $major -ge 17 ]] ||
        die "Java 17+ is required to run Kafka (found ${version:-unknown}): install it (e.g. apt-get install openjdk-17-jre-headless)"
}

require_maven() {
    command -v mvn >/dev/null 2>&1 ||
        die "Maven is required to fetch the Kafka jars: install it (e.g. apt-get install maven)"
}

# Fetch the broker jars into the cache, once per Kafka version. They are copied
# into a temporary dir first so that an interrupted fetch never looks complete.
fetch_jars() {
    [[ -f $STAMP ]] && return 0
    require_maven
    echo "fetching Kafka $KAFKA_VERSION jars with Maven (first run only)..."
    local tmp="$LIBS_DIR.tmp.$$" mvn_log
    mkdir -p "$(dirname "$LIBS_DIR")"
    rm -rf "$tmp"
    mvn_log=$(mktemp)
    if ! mvn -q -B -f "$POM" dependency:copy-dependencies \
        -DincludeScope=runtime -DoutputDirectory="$tmp" >"$mvn_log" 2>&1; then
        tail -n 30 "$mvn_log" >&2
        rm -rf "$tmp" "$mvn_log"
        die "could not fetch the Kafka jars with Maven (see above)"
    fi
    rm -f "$mvn_log"
    touch "$tmp/.fetched-kafka-$KAFKA_VERSION"
    rm -rf "$LIBS_DIR"
    mv "$tmp" "$LIBS_DIR"
    echo "Kafka jars cached in $LIBS_DIR ($(find "$LIBS_DIR" -name '*.jar' | wc -l) jars)"
}

# ------------------------------------------------------------------ process state

# Prints the broker's pid if it is running.
running_pid() {
    running_pid_of 'kafka\.Kafka'
}

# True if something accepts TCP connections on $1:$2.

# Sets EXT_HOST and EXT_PORT from the first server of AUTOGLM_KAFKA_BOOTSTRAP
# ("PLAINTEXT://h1:9092,h2:9092" -> h1, 9092).
parse_external_bootstrap() {
    local first=${EXTERNAL_BOOTSTRAP%%,*}
    first=${first#*://}
    EXT_HOST=${first%:*}
    EXT_PORT=${first##*:}
    EXT_HOST=${EXT_HOST#[}
    EXT_HOST=${EXT_HOST%]}
    [[ $EXT_PORT =~ ^[0-9]+$ && -n $EXT_HOST ]] ||
        die "AUTOGLM_KAFKA_BOOTSTRAP must be host:port[,host:port...], got '$EXTERNAL_BOOTSTRAP'"
}


# The broker's port can accept TCP connections (kernel backlog) a moment before
# it serves requests; the log line below comes after request processing is on.
broker_started() {
    grep -q 'Kafka Server started' "$LOG_FILE" 2>/dev/null
}

# Waits until $1:$2 accepts connections. With a pid ($3, our own broker), also
# waits for the broker to report itself started, and gives up as soon as that
# process dies instead of waiting for the timeout.
wait_for_port() {
    local host=$1 port=$2 pid=${3:-} start=$SECONDS
    until port_open "$host" "$port" && { [[ -z $pid ]] || broker_started; }; do
        if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
            echo "error: Kafka exited during startup" >&2
            show_log_tail
            return 1
        fi
        local waited=$((SECONDS - start))
        if ((waited >= START_TIMEOUT)); then
            echo "error: Kafka did not accept connections on $host:$port within ${START_TIMEOUT}s" >&2
            [[ -n $pid ]] && show_log_tail
            return 1
        fi
        if ((waited > 0 && waited % 5 == 0)); then
            echo "  waiting for Kafka on $host:$port (${waited}s)..."
        fi
        sleep 1
    done
}

# ------------------------------------------------------------------ configuration

# Regenerated on every start so that a changed AUTOGLM_KAFKA_PORT takes effect.
write_server_properties() {
    cat >"$CONFIG" <<EOF
# Generated by deploy/local/kafka.sh on every start: edit the script, not this file.
# Single node acting as both KRaft controller and broker, loopback only.
process.roles=broker,controller
node.id=$NODE_ID
# A static quorum (rather than "format --standalone") keeps the controller
# address in this file only, so changing the port needs no re-format.
controller.quorum.voters=$NODE_ID@$HOST:$CONTROLLER_PORT
listeners=PLAINTEXT://$HOST:$PORT,CONTROLLER://$HOST:$CONTROLLER_PORT
advertised.listeners=PLAINTEXT://$HOST:$PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT

log.dirs=$DATA_DIR

# One broker: internal topics cannot have more than one replica.
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# Fewer internal-topic partitions: the first consumer group is ready sooner on
# a small dev box (the defaults are 50 partitions each).
offsets.topic.num.partitions=4
transaction.state.log.num.partitions=4

# Topics are created by the platform from its own config, never implicitly.
auto.create.topics.enable=false
num.partitions=1
# Tests start consumer groups constantly: do not delay their first rebalance.
group.initial.rebalance.delay.ms=0

# Dev data is disposable: keep a day of it in small segments.
log.retention.hours=24
log.segment.bytes=67108864
log.retention.check.interval.ms=300000
EOF
}

# All broker logging goes to kafka.log (none to the terminal). Log4j2 reads
# .properties configs natively; Kafka's own default is a YAML file.
write_log4j_config() {
    cat >"$LOG4J_CONFIG" <<EOF
# Generated by deploy/local/kafka.sh.
status = warn
# Kafka logs its own shutdown from a JVM shutdown hook; without this, log4j2
# can shut itself down first and the last lines of a clean stop are lost.
shutdownHook = disable
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = $LOG_FILE
appender.file.append = true
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
# Per-request logging is only useful when debugging the protocol.
logger.request.name = kafka.request.logger
logger.request.level = WARN
EOF
}

# Format the storage once. The cluster id is kept in the var dir so that a
# re-format (after "clean" of data only) reuses it.
format_storage_once() {
    [[ -f $DATA_DIR/meta.properties ]] && return 0
    local cp="$LIBS_DIR/*" cluster_id out
    if [[ ! -s $CLUSTER_ID_FILE ]]; then
        java -Dlog4j2.configurationFile="$LOG4J_CONFIG" -cp "$cp" \
            kafka.tools.StorageTool random-uuid >"$CLUSTER_ID_FILE"
    fi
    cluster_id=$(<"$CLUSTER_ID_FILE")
    echo "formatting Kafka storage in $DATA_DIR (cluster id $cluster_id)..."
    if ! out=$(java -Dlog4j2.configurationFile="$LOG4J_CONFIG" -cp "$cp" \
        kafka.tools.StorageTool format --cluster-id "$cluster_id" --config "$CONFIG" 2>&1); then
        echo "$out" >&2
        die "formatting the Kafka storage failed"
    fi
}

# ------------------------------------------------------------------ subcommands

cmd_start() {
    if [[ -n $EXTERNAL_BOOTSTRAP ]]; then
        echo "using external Kafka at $EXTERNAL_BOOTSTRAP (AUTOGLM_KAFKA_BOOTSTRAP): not starting a local one"
        return 0
    fi
    require_java
    mkdir -p "$KAFKA_VAR"
    # Serialise concurrent starts (e.g. parallel test runs) on this var dir.
    exec 9>"$KAFKA_VAR/.lock"
    flock 9

    local pid
    if pid=$(running_pid); then
        echo "Kafka already running (pid $pid)"
        wait_for_port "$HOST" "$PORT" "$pid"
        echo "Kafka ready on $HOST:$PORT"
        return 0
    fi
    local p
    for p in "$PORT" "$CONTROLLER_PORT"; do
        if port_open "$HOST" "$p"; then
            die "port $p on $HOST is already in use by another process: set AUTOGLM_KAFKA_PORT (uses it and the next port) or AUTOGLM_KAFKA_BOOTSTRAP"
        fi
    done

    fetch_jars
    mkdir -p "$DATA_DIR"
    # Keep the previous run's log for post-mortems; each start gets a fresh one
    # (which also lets broker_started trust what it finds in it).
    if [[ -f $LOG_FILE ]]; then mv -f "$LOG_FILE" "$LOG_FILE.1"; fi
    write_server_properties
    write_log4j_config
    format_storage_once

    echo "starting Kafka $KAFKA_VERSION (KRaft, single node) on $HOST:$PORT, log: $LOG_FILE"
    # setsid: own session, so Ctrl-C in the calling terminal does not reach it.
    # JVM output (e.g. crashes before log4j is up) goes to the same log file.
    # 9>&-: the broker must not inherit (and hold) the start lock.
    setsid nohup java \
        -Xms256m -Xmx512m -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
        -Djava.awt.headless=true \
        -Dlog4j2.configurationFile="$LOG4J_CONFIG" \
        -Dkafka.logs.dir="$KAFKA_VAR" \
        -cp "$LIBS_DIR/*" kafka.Kafka "$CONFIG" \
        >>"$LOG_FILE" 2>&1 </dev/null 9>&- &
    pid=$!
    echo "$pid" >"$PID_FILE"

    if ! wait_for_port "$HOST" "$PORT" "$pid"; then
        kill -9 "$pid" 2>/dev/null || true
        rm -f "$PID_FILE"
        exit 1
    fi
    echo "Kafka ready on $HOST:$PORT"
}

cmd_stop() {
    if [[ -n $EXTERNAL_BOOTSTRAP ]]; then
        echo "using external Kafka at $EXTERNAL_BOOTSTRAP: nothing to stop"
        return 0
    fi
    local pid
    if ! pid=$(running_pid); then
        echo "Kafka is not running"
        rm -f "$PID_FILE"
        return 0
    fi
    echo "stopping Kafka (pid $pid)..."
    kill -TERM "$pid" 2>/dev/null || true
    local start=$SECONDS
    while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS - start >= STOP_TIMEOUT)); then
            echo "Kafka did not stop within ${STOP_TIMEOUT}s: killing it"
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.5
    done
    rm -f "$PID_FILE"
    echo "Kafka stopped"
}

cmd_status() {
    if [[ -n $EXTERNAL_BOOTSTRAP ]]; then
        parse_external_bootstrap
        if port_open "$EXT_HOST" "$EXT_PORT"; then
            echo "external Kafka at $EXTERNAL_BOOTSTRAP is accepting connections"
            return 0
        fi
        echo "external Kafka at $EXTERNAL_BOOTSTRAP is not reachable"
        return 1
    fi
    local pid
    if pid=$(running_pid) && port_open "$HOST" "$PORT"; then
        echo "Kafka running (pid $pid) on $HOST:$PORT"
        return 0
    fi
    if [[ -n ${pid:-} ]]; then
        echo "Kafka running (pid $pid) but not accepting connections on $HOST:$PORT"
    else
        echo "Kafka is not running"
    fi
    return 1
}

cmd_wait() {
    if [[ -n $EXTERNAL_BOOTSTRAP ]]; then
        parse_external_bootstrap
        wait_for_port "$EXT_HOST" "$EXT_PORT"
        echo "Kafka ready at $EXTERNAL_BOOTSTRAP"
        return 0
    fi
    local pid
    pid=$(running_pid) || die "Kafka is not running (start it with: $0 start)"
    wait_for_port "$HOST" "$PORT" "$pid"
    echo "Kafka ready on $HOST:$PORT"
}

cmd_clean() {
    cmd_stop
    if [[ -z $EXTERNAL_BOOTSTRAP ]]; then
        rm -rf "$KAFKA_VAR"
        echo "deleted $KAFKA_VAR"
    fi
}

main() {
    case "${1:-}" in
    start | stop | status | wait | clean)
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
