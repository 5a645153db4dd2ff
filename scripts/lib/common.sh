# shellcheck shell=bash disable=SC2154  # `prog` is set by the caller
# Helpers shared by scripts/ferretdb.sh, scripts/cluster.sh and
# scripts/bench.sh; sourced after the caller sets `prog` (its name, for
# messages).

log() { printf '%s: %s\n' "$prog" "$*" >&2; }
die() { printf '%s: error: %s\n' "$prog" "$*" >&2; exit 1; }

# True if something accepts TCP connections on 127.0.0.1:$1.
port_open() {
    # shellcheck disable=SC2016  # $1 is expanded by the inner bash
    timeout 2 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"' _ "$1" </dev/null >/dev/null 2>&1
}

# True if the Redis on 127.0.0.1:$1 answers PING with +PONG.
redis_pong() {
    # shellcheck disable=SC2016  # $1 is expanded by the inner bash
    timeout 2 bash -c '
        exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
        printf "PING\r\n" >&3
        IFS= read -r -t 1 line <&3 && [[ $line == "+PONG"* ]]
    ' _ "$1" </dev/null >/dev/null 2>&1
}

# True if $1 is a live (non-zombie) process.
pid_alive() {
    local state
    kill -0 "$1" 2>/dev/null || return 1
    if [[ -r /proc/$1/stat ]]; then
        state=$(sed -E 's/^.*\) ([A-Za-z]).*$/\1/' "/proc/$1/stat" 2>/dev/null) || return 1
        [[ $state != Z && $state != X ]] || return 1
    fi
    return 0
}

# A random port in 20000..32767: below Linux's default ephemeral range, so
# it does not collide with outgoing connections.
random_port() {
    echo $((20000 + (RANDOM % 12768)))
}
