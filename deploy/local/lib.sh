# shellcheck shell=bash
# Helpers shared by kafka.sh, postgres.sh and jaeger.sh (sourced, not run).
# The sourcing script sets PID_FILE and LOG_FILE before calling them.

die() {
    echo "error: $*" >&2
    exit 1
}

# True if HOST PORT accepts a TCP connection within 3 seconds.
port_open() {
    # shellcheck disable=SC2016 # $1/$2 are expanded by the inner bash
    timeout 3 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null
}

show_log_tail() {
    if [[ -f $LOG_FILE ]]; then
        echo "---- last 30 lines of $LOG_FILE ----" >&2
        tail -n 30 "$LOG_FILE" >&2
        echo "----" >&2
    fi
}

# Prints the pid in PID_FILE if that process runs and its command line matches PATTERN (grep -E):
# a stale pid file whose pid was reused by another program does not count.
running_pid_of() {
    local pattern=$1 pid
    [[ -f $PID_FILE ]] || return 1
    pid=$(<"$PID_FILE")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -Eq "$pattern" || return 1
    echo "$pid"
}
