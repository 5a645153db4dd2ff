#!/usr/bin/env bash
# Build, start and stop a local FerretDB (MongoDB wire protocol, SQLite
# backend) for the test suite.
#
#   scripts/ferretdb.sh build       build (or reuse) the cached binary; prints its path
#   scripts/ferretdb.sh start DIR   start an instance with its data/log/pid in DIR;
#                                   prints mongodb://127.0.0.1:PORT/
#   scripts/ferretdb.sh stop DIR    stop the instance started in DIR
#
# Only the requested value goes to stdout; progress and errors go to stderr.
#
# The binary is cached in
#   ${CHATCONNECT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/chatconnect}/ferretdb-v1.24.2/ferretdb
# The first build needs the Go toolchain (>= 1.24, for `go get -tool`) and the
# Go module proxy, and takes a few minutes; later calls reuse the cache.
#
# Tunables (environment):
#   FERRETDB_START_TIMEOUT  seconds to wait for the port to accept connections (30)
#   FERRETDB_STOP_TIMEOUT   seconds to wait for exit after SIGTERM before SIGKILL (15)

set -euo pipefail
shopt -s inherit_errexit

readonly FERRETDB_VERSION=v1.24.2
readonly FERRETDB_MOD=github.com/FerretDB/FerretDB
readonly FERRETDB_PKG=$FERRETDB_MOD/cmd/ferretdb

prog=${0##*/}

# shellcheck source=scripts/lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

usage() {
    cat >&2 <<EOF
usage: $prog build
       $prog start DIR
       $prog stop DIR
EOF
}

# Absolute path of a directory, creating it if needed.
abs_dir() {
    mkdir -p -- "$1" || die "cannot create directory '$1'"
    (cd -- "$1" && pwd -P)
}

cache_root() {
    local root
    if [[ -n ${CHATCONNECT_CACHE:-} ]]; then
        root=$CHATCONNECT_CACHE
    elif [[ -n ${XDG_CACHE_HOME:-} ]]; then
        root=$XDG_CACHE_HOME/chatconnect
    elif [[ -n ${HOME:-} ]]; then
        root=$HOME/.cache/chatconnect
    else
        die "cannot locate a cache directory: set CHATCONNECT_CACHE, XDG_CACHE_HOME or HOME"
    fi
    abs_dir "$root"
}

# True if the file is an executable FerretDB that starts.
binary_ok() {
    [[ -f $1 && -x $1 ]] && "$1" --version </dev/null >/dev/null 2>&1
}

find_go() {
    if command -v go >/dev/null 2>&1; then
        command -v go
    elif [[ -x /usr/local/go/bin/go ]]; then
        printf '%s\n' /usr/local/go/bin/go
    else
        return 1
    fi
}

# Builds FerretDB into $2/ferretdb with the go binary $1, working in $2.
# Runs in a subshell with errexit on; output goes to stderr.
go_build_ferretdb() {
    local go=$1 tmp=$2 src
    set -euo pipefail
    cd -- "$tmp"
    # A workspace file above the scratch dir must not take part.
    export GOWORK=off GO111MODULE=on
    "$go" mod init x
    "$go" get -tool "$FERRETDB_PKG@$FERRETDB_VERSION"
    # FerretDB's build/version package panics at start ("Invalid
    # build/version/version.txt file content") when the binary's build info
    # names FerretDB as the main module and build/version/version.txt (written
    # by FerretDB's release tooling, absent from the module zip) is missing.
    # Recent Go toolchains (seen with 1.26) record FerretDB as the main module
    # even for this tool build, so build from a writable copy of the module
    # with that file added, through a replace directive. With toolchains that
    # record "x" instead, the file is simply not read.
    src=$("$go" list -m -f '{{.Dir}}' "$FERRETDB_MOD")
    [[ -n $src && -d $src ]]
    cp -R -- "$src" ferretdb-src
    chmod -R u+w ferretdb-src
    printf '%s\n' "$FERRETDB_VERSION" >ferretdb-src/build/version/version.txt
    "$go" mod edit -replace="$FERRETDB_MOD=./ferretdb-src"
    "$go" build -o "$tmp/ferretdb" "$FERRETDB_PKG"
}

# Prints the absolute path of a working FerretDB binary, building it if needed.
ensure_binary() {
    local root dir bin
    root=$(cache_root)
    dir=$root/ferretdb-$FERRETDB_VERSION
    bin=$dir/ferretdb

    if binary_ok "$bin"; then
        printf '%s\n' "$bin"
        return 0
    fi

    mkdir -p -- "$dir" || die "cannot create cache directory '$dir'"

    # Serialise concurrent builds (e.g. several test processes starting at once).
    # The lock is released when this (sub)shell exits.
    if command -v flock >/dev/null 2>&1; then
        exec 9>"$dir/.lock" || die "cannot open lock file '$dir/.lock'"
        if ! flock -n 9; then
            log "another build of FerretDB $FERRETDB_VERSION is running; waiting for it"
            flock 9 || die "cannot lock '$dir/.lock'"
        fi
        if binary_ok "$bin"; then
            printf '%s\n' "$bin"
            return 0
        fi
    fi

    local go
    go=$(find_go) || die "the Go toolchain ('go') is not installed or not on PATH; it is needed to build FerretDB $FERRETDB_VERSION (Go >= 1.24)"

    # Build in a scratch directory on the same filesystem as the cache, so the
    # final mv is an atomic rename: the cache never holds a half-written binary.
    local tmp
    tmp=$(mktemp -d "$root/.ferretdb-build.XXXXXX") || die "cannot create a temporary build directory under '$root'"
    # shellcheck disable=SC2064  # expand $tmp now
    trap "rm -rf -- '$tmp'" EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM

    log "building FerretDB $FERRETDB_VERSION with $("$go" version 2>/dev/null || echo "$go") (first time only; takes a few minutes)"
    local start=$SECONDS
    local rc=0
    # Not `if ! (...)`: errexit would be ignored inside the subshell there.
    set +e
    (go_build_ferretdb "$go" "$tmp") </dev/null >&2
    rc=$?
    set -e
    ((rc == 0)) || die "building FerretDB $FERRETDB_VERSION failed (see the go output above; needs Go >= 1.24 and the Go module proxy)"

    local version_out
    if ! version_out=$("$tmp/ferretdb" --version </dev/null 2>&1); then
        printf '%s\n' "$version_out" >&2
        die "the freshly built FerretDB does not start ('ferretdb --version' failed); not caching it"
    fi
    if [[ $version_out != *"$FERRETDB_VERSION"* ]]; then
        printf '%s\n' "$version_out" >&2
        die "the freshly built FerretDB does not report version $FERRETDB_VERSION; not caching it"
    fi

    chmod 0755 "$tmp/ferretdb"
    mv -f -- "$tmp/ferretdb" "$bin" || die "cannot move the built binary to '$bin'"
    log "built FerretDB $FERRETDB_VERSION in $((SECONDS - start))s: $bin"

    rm -rf -- "$tmp"
    trap - EXIT INT TERM
    printf '%s\n' "$bin"
}

# True if $1 is a live process that looks like FerretDB (guards against a reused pid).
pid_is_ferretdb() {
    pid_alive "$1" || return 1
    if [[ -r /proc/$1/cmdline ]]; then
        tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | grep -q ferretdb || return 1
    fi
    return 0
}

cmd_build() {
    [[ $# -eq 0 ]] || { usage; exit 2; }
    ensure_binary
}

cmd_start() {
    [[ $# -eq 1 && -n $1 ]] || { usage; exit 2; }
    local dir bin
    dir=$(abs_dir "$1")
    [[ $dir != *[?#%]* ]] || die "DIR must not contain '?', '#' or '%' (it goes into a file: URI): $dir"
    local pidfile=$dir/ferretdb.pid logfile=$dir/ferretdb.log portfile=$dir/ferretdb.port

    if [[ -f $pidfile ]]; then
        local oldpid
        oldpid=$(<"$pidfile")
        if [[ $oldpid =~ ^[0-9]+$ ]] && pid_is_ferretdb "$oldpid"; then
            die "FerretDB is already running in '$dir' (pid $oldpid); run '$prog stop $dir' first"
        fi
        rm -f -- "$pidfile" "$portfile"
    fi

    bin=$(ensure_binary)

    mkdir -p -- "$dir/db" "$dir/state"

    local timeout_s=${FERRETDB_START_TIMEOUT:-30}
    [[ $timeout_s =~ ^[0-9]+$ ]] || die "FERRETDB_START_TIMEOUT must be a whole number of seconds"

    local attempt port pid deadline log_offset
    for attempt in 1 2 3 4 5; do
        port=$(random_port)
        if port_open "$port"; then
            continue
        fi

        log_offset=0
        [[ -f $logfile ]] && log_offset=$(wc -c <"$logfile")
        {
            printf '\n=== %s: starting FerretDB %s on 127.0.0.1:%s (attempt %s)\n' \
                "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$FERRETDB_VERSION" "$port" "$attempt"
        } >>"$logfile"

        # Everything else that could listen or phone home is off: no debug
        # HTTP server, no telemetry, no OpenTelemetry exporter, and no
        # TLS/Unix/proxy listeners (their defaults are empty; FERRETDB_*
        # variables from the caller's environment, which would set any flag,
        # are dropped). The state file (instance UUID) lives in DIR/state.
        (
            while IFS= read -r var; do
                unset "$var"
            done < <(compgen -e | grep '^FERRETDB_' || true)
            export DO_NOT_TRACK=1
            exec "$bin" \
                --handler=sqlite \
                --sqlite-url="file:$dir/db/" \
                --listen-addr="127.0.0.1:$port" \
                --state-dir="$dir/state" \
                --debug-addr=- \
                --telemetry=disable \
                --otel-traces-url=- \
                --log-level=INFO
        ) </dev/null >>"$logfile" 2>&1 &
        pid=$!
        printf '%s\n' "$pid" >"$pidfile"

        deadline=$((SECONDS + timeout_s))
        while :; do
            if ! pid_alive "$pid"; then
                wait "$pid" 2>/dev/null || true
                break
            fi
            if port_open "$port"; then
                # The port is open and our process is still alive: make sure
                # it is ours, not someone who took the port in between.
                sleep 0.2
                if pid_alive "$pid"; then
                    printf '%s\n' "$port" >"$portfile"
                    log "FerretDB $FERRETDB_VERSION running (pid $pid) on 127.0.0.1:$port; log: $logfile"
                    printf 'mongodb://127.0.0.1:%s/\n' "$port"
                    return 0
                fi
                break
            fi
            if ((SECONDS >= deadline)); then
                kill -KILL "$pid" 2>/dev/null || true
                rm -f -- "$pidfile"
                tail -n 40 -- "$logfile" >&2 || true
                die "FerretDB did not accept connections on 127.0.0.1:$port within ${timeout_s}s (log: $logfile)"
            fi
            sleep 0.1
        done

        rm -f -- "$pidfile"
        # Only this attempt's part of the log counts.
        if tail -c "+$((log_offset + 1))" -- "$logfile" | grep -q 'address already in use'; then
            log "port $port was taken; retrying with another port"
            continue
        fi
        tail -n 40 -- "$logfile" >&2 || true
        die "FerretDB exited during startup (log: $logfile)"
    done
    die "could not find a free port for FerretDB after 5 attempts (log: $logfile)"
}

cmd_stop() {
    [[ $# -eq 1 && -n $1 ]] || { usage; exit 2; }
    local dir=$1
    [[ -d $dir ]] || { log "no directory '$dir'; nothing to stop"; return 0; }
    local pidfile=$dir/ferretdb.pid portfile=$dir/ferretdb.port

    if [[ ! -f $pidfile ]]; then
        log "no pid file in '$dir'; FerretDB is not running there"
        return 0
    fi
    local pid
    pid=$(<"$pidfile")
    [[ $pid =~ ^[0-9]+$ ]] || die "pid file '$pidfile' does not hold a pid"

    if ! pid_is_ferretdb "$pid"; then
        log "FerretDB (pid $pid) is not running"
        rm -f -- "$pidfile" "$portfile"
        return 0
    fi

    local timeout_s=${FERRETDB_STOP_TIMEOUT:-15}
    [[ $timeout_s =~ ^[0-9]+$ ]] || die "FERRETDB_STOP_TIMEOUT must be a whole number of seconds"

    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + timeout_s))
    while pid_alive "$pid"; do
        if ((SECONDS >= deadline)); then
            log "FerretDB (pid $pid) did not exit within ${timeout_s}s of SIGTERM; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            local kill_deadline=$((SECONDS + 5))
            while pid_alive "$pid"; do
                ((SECONDS < kill_deadline)) || die "FerretDB (pid $pid) survived SIGKILL"
                sleep 0.1
            done
            break
        fi
        sleep 0.1
    done
    rm -f -- "$pidfile" "$portfile"
    log "FerretDB (pid $pid) stopped"
}

main() {
    local cmd=${1:-}
    [[ $# -gt 0 ]] && shift
    case $cmd in
        build) cmd_build "$@" ;;
        start) cmd_start "$@" ;;
        stop) cmd_stop "$@" ;;
        -h | --help | help) usage ;;
        *) usage; exit 2 ;;
    esac
}

main "$@"
