#!/usr/bin/env bash
# Run several chatserver processes on one port of this machine, sharing one
# chat: a local redis-server as their broker (BROKER_URL), then N release
# builds of chatserver with REUSE_PORT=true on the same PORT, so that the
# kernel spreads connections over them and all the cores are used. They share
# one store: the SQLite database in DATA_DIR, or MongoDB when MONGO_URI is
# set. The broker is what makes members connected to different processes see
# each other's messages; the shared store alone gives them the same rooms,
# accounts and history.
#
#   scripts/cluster.sh N        N >= 1 processes; Ctrl-C (or SIGTERM) stops
#                               them all, then Redis
#
# Environment:
#   PORT        the port they all listen on (8000)
#   HOST        the address they listen on (the server's default, 0.0.0.0)
#   DATA_DIR    the shared data directory: the SQLite database (without
#               MONGO_URI) and the generated token secret (./data-cluster)
#   MONGO_URI   use this MongoDB instead of SQLite (and MONGO_DB etc. as usual)
#   REDIS_PORT  the port of the local redis-server (a free one)
#   Any other server setting (AUTH_MODE, WORKERS, ...) is passed through.
#
# Needs redis-server on PATH (Debian: apt-get install redis-server; the test
# command scripts/test.sh installs it too) and cargo. The logs (one per
# process, and Redis's) are kept in a new directory under ${TMPDIR:-/tmp};
# the script prints where.

set -euo pipefail
shopt -s inherit_errexit
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$here/.."

prog=${0##*/}

# shellcheck source=scripts/lib/common.sh
source "$here/lib/common.sh"

usage() {
    cat >&2 <<EOF
usage: $prog N      start N chatserver processes on one port (PORT, default 8000)
                    with a local Redis as their broker; Ctrl-C stops them all
EOF
}

# True if $1 is a TCP port number.
valid_port() {
    [[ $1 =~ ^[0-9]{1,5}$ ]] && ((10#$1 >= 1 && 10#$1 <= 65535))
}

# Sends signal $1 to process $2 if it is still alive.
signal_alive() {
    if pid_alive "$2"; then
        kill "-$1" "$2" 2>/dev/null || true
    fi
}

[[ $# -eq 1 ]] || { usage; exit 2; }
case $1 in -h | --help | help) usage; exit 0 ;; esac
[[ $1 =~ ^[1-9][0-9]*$ ]] || { usage; exit 2; }
readonly count=$1
readonly port=${PORT:-8000}
valid_port "$port" || die "PORT must be a port number (1-65535), not '$port'"
if [[ -n ${REDIS_PORT:-} ]]; then
    valid_port "$REDIS_PORT" || die "REDIS_PORT must be a port number (1-65535), not '$REDIS_PORT'"
fi

command -v redis-server >/dev/null 2>&1 ||
    die "redis-server is not installed: apt-get install redis-server (scripts/test.sh installs it too)"
command -v cargo >/dev/null 2>&1 || die "cargo not found: install Rust (https://rustup.rs) first"

# Processes of an earlier run still on the port would take part in this
# one's connections (with REUSE_PORT they would share it silently).
! port_open "$port" || die "something already listens on port $port: stop it, or set PORT"

log "building the release binary (cargo build --release)"
cargo build --release --bin chatserver >&2
bin=$PWD/target/release/chatserver
[[ -x $bin ]] || die "no binary at $bin after the build"

run=$(mktemp -d "${TMPDIR:-/tmp}/chatconnect-cluster.XXXXXX") || die "cannot create a run directory"
mkdir -p -- "$run/redis"
: >"$run/redis.log"

# Children run in sessions of their own (setsid), so that a Ctrl-C in the
# terminal reaches only this script, which then stops each of them once
# with SIGTERM: a chatserver takes a second signal as "exit now" and would
# skip its graceful shutdown.
detach=()
if command -v setsid >/dev/null 2>&1; then
    detach=(setsid)
fi

server_pids=()
redis_pid=

# Stops what is running: the servers first (SIGTERM, a graceful shutdown
# within their SHUTDOWN_TIMEOUT, SIGKILL after 20 s), then Redis.
stop_all() {
    local pid deadline
    trap - INT TERM
    for pid in "${server_pids[@]}"; do
        signal_alive TERM "$pid"
    done
    deadline=$((SECONDS + 20))
    for pid in "${server_pids[@]}"; do
        while pid_alive "$pid" && ((SECONDS < deadline)); do sleep 0.1; done
        if pid_alive "$pid"; then
            log "chatserver (pid $pid) did not stop within 20s of SIGTERM; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
    done
    if [[ -n $redis_pid ]]; then
        signal_alive TERM "$redis_pid"
        deadline=$((SECONDS + 10))
        while pid_alive "$redis_pid" && ((SECONDS < deadline)); do sleep 0.1; done
        signal_alive KILL "$redis_pid"
        wait "$redis_pid" 2>/dev/null || true
    fi
    if ((${#server_pids[@]} > 0)) || [[ -n $redis_pid ]]; then
        log "stopped; logs kept in $run"
    fi
}
trap stop_all EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- Redis ----------------------------------------------------------------

start_redis() {
    local rport=$1 deadline
    printf '\n=== %s: starting redis-server on 127.0.0.1:%s\n' \
        "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$rport" >>"$run/redis.log"
    "${detach[@]}" redis-server --port "$rport" --bind 127.0.0.1 --save "" \
        --appendonly no --dir "$run/redis" --daemonize no \
        </dev/null >>"$run/redis.log" 2>&1 &
    redis_pid=$!
    deadline=$((SECONDS + 10))
    while pid_alive "$redis_pid"; do
        redis_pong "$rport" && return 0
        ((SECONDS < deadline)) || die "redis-server did not answer PING on port $rport within 10s (log: $run/redis.log)"
        sleep 0.1
    done
    wait "$redis_pid" 2>/dev/null || true
    redis_pid=
    return 1
}

if [[ -n ${REDIS_PORT:-} ]]; then
    redis_port=$REDIS_PORT
    ! port_open "$redis_port" || die "REDIS_PORT $redis_port is already taken"
    start_redis "$redis_port" || {
        tail -n 20 -- "$run/redis.log" >&2 || true
        die "redis-server did not start on port $redis_port (log: $run/redis.log)"
    }
else
    started=
    for _ in 1 2 3 4 5; do
        redis_port=$(random_port)
        port_open "$redis_port" && continue
        offset=$(wc -c <"$run/redis.log")
        if start_redis "$redis_port"; then
            started=1
            break
        fi
        # Only this attempt's part of the log counts.
        tail -c "+$((offset + 1))" -- "$run/redis.log" | grep -q 'Address already in use' || {
            tail -n 20 -- "$run/redis.log" >&2 || true
            die "redis-server did not start (log: $run/redis.log)"
        }
    done
    [[ -n $started ]] || die "found no free port for redis-server in 5 attempts (log: $run/redis.log)"
fi
broker_url=redis://127.0.0.1:$redis_port
log "redis-server (pid $redis_pid) on $broker_url; log: $run/redis.log"

# --- chatservers ----------------------------------------------------------

data_dir=${DATA_DIR:-./data-cluster}
mkdir -p -- "$data_dir" || die "cannot create DATA_DIR '$data_dir'"
data_dir=$(cd -- "$data_dir" && pwd -P)

# One at a time, each waiting for its `listening on` line: a failure is
# then that process's, with its log.
for ((i = 1; i <= count; i++)); do
    logfile=$run/chatserver-$i.log
    : >"$logfile"
    REUSE_PORT=true PORT=$port DATA_DIR=$data_dir BROKER_URL=$broker_url \
        "${detach[@]}" "$bin" </dev/null >"$logfile" 2>&1 &
    pid=$!
    server_pids+=("$pid")
    deadline=$((SECONDS + 30))
    until grep -q 'listening on' -- "$logfile"; do
        if ! pid_alive "$pid"; then
            tail -n 20 -- "$logfile" >&2 || true
            die "chatserver $i exited at start (log: $logfile)"
        fi
        ((SECONDS < deadline)) || die "chatserver $i did not listen within 30s (log: $logfile)"
        sleep 0.1
    done
    log "chatserver $i (pid $pid) listening; log: $logfile"
done

if [[ -n ${MONGO_URI:-} ]]; then
    store="MongoDB (MONGO_URI); token secret in $data_dir"
else
    store="SQLite in $data_dir"
fi
listening=$(grep -m1 -o 'listening on .*' -- "$run/chatserver-1.log" || true)
cat <<EOF
$count chatserver processes (pids ${server_pids[*]}) with REUSE_PORT=true, all $listening
  store:   $store
  broker:  $broker_url (redis-server pid $redis_pid)
  logs:    $run/chatserver-N.log (N = 1..$count), $run/redis.log
  try:     curl localhost:$port/healthz
Ctrl-C stops them all.
EOF

# Until a signal, or until a process dies (which stops the rest).
while :; do
    for ((i = 0; i < count; i++)); do
        if ! pid_alive "${server_pids[i]}"; then
            tail -n 20 -- "$run/chatserver-$((i + 1)).log" >&2 || true
            die "chatserver $((i + 1)) (pid ${server_pids[i]}) exited; stopping the others"
        fi
    done
    pid_alive "$redis_pid" || die "redis-server (pid $redis_pid) exited; stopping the servers (log: $run/redis.log)"
    sleep 1
done
