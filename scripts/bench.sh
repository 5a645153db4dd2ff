#!/usr/bin/env bash
# Load benchmarks: every scenario against chatserver and the two yardsticks
# in one run, then a Markdown table of the figures with their ratios.
#
#   floor     benches/floor.rs: a bare mio relay (no JSON, no store); what
#             this machine can do at all
#   baseline  benches/baseline_tokio.rs: the same chat written the usual way
#             (tokio, tokio-tungstenite, a broadcast channel per room)
#
# Each scenario gets a fresh server process (ulimit -n 20000) on 127.0.0.1
# and port 0; benches/loadgen/ drives it from several client processes.
#
# Usage: scripts/bench.sh [--quick] [--only SCENARIO[,SCENARIO..]]
#                         [--targets chatserver,floor,baseline] [--out DIR]
#                         [-- EXTRA LOADGEN FLAGS]
#   scenarios: idle fanout many login rest groupcommit (default: all)
#              groupcommit runs benches/group_commit.rs on SQLite and on a
#              FerretDB started by scripts/ferretdb.sh (built on first use)
#   --quick    small sizes (about 2 minutes after the build)
#   --out      where the JSON results, server logs and report go
#              (default target/bench/DATE)
# The full run takes about 10 minutes after the build on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

quick=()
only="idle,fanout,many,login,rest,groupcommit"
targets="chatserver,floor,baseline"
out=""
extra=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) quick=(--quick) ;;
        --only) only="$2"; shift ;;
        --only=*) only="${1#*=}" ;;
        --targets) targets="$2"; shift ;;
        --targets=*) targets="${1#*=}" ;;
        --out) out="$2"; shift ;;
        --out=*) out="${1#*=}" ;;
        --) shift; extra=("$@"); break ;;
        -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
for s in ${only//,/ }; do
    case "$s" in idle|fanout|many|login|rest|groupcommit) ;; *) echo "bench.sh: unknown scenario $s" >&2; exit 2 ;; esac
done
for t in ${targets//,/ }; do
    case "$t" in chatserver|floor|baseline) ;; *) echo "bench.sh: unknown target $t" >&2; exit 2 ;; esac
done
out=${out:-target/bench/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"
out=$(cd "$out" && pwd)

# One server process holds up to 19,000 sockets: it needs 20,000 descriptors.
hard=$(ulimit -Hn)
if [[ $hard == unlimited || $hard -ge 20000 ]]; then
    ulimit -n 20000
else
    echo "bench.sh: the descriptor limit is $hard (20000 needed for the idle scenario)" >&2
    ulimit -n "$hard"
fi

started=$(date +%s)
echo "== build (release)"
cargo build --release --bin chatserver
json=$(cargo bench --no-run --message-format=json \
    --bench loadgen --bench floor --bench baseline_tokio --bench group_commit)
exe() {
    printf '%s\n' "$json" | grep '"reason":"compiler-artifact"' | grep "\"name\":\"$1\"" \
        | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1
}
loadgen=$(exe loadgen)
floor=$(exe floor)
baseline=$(exe baseline_tokio)
group_commit=$(exe group_commit)
chatserver=${CARGO_TARGET_DIR:-$root/target}/release/chatserver
for f in "$loadgen" "$floor" "$baseline" "$group_commit" "$chatserver"; do
    if [[ -z $f || ! -x $f ]]; then
        echo "bench.sh: a benchmark binary is missing after the build ($f)" >&2
        exit 1
    fi
done
if ! command -v wrk >/dev/null 2>&1; then
    echo "note: wrk not found (apt-get install -y wrk); REST uses loadgen's built-in client"
fi

commands=$out/commands.txt
: >"$commands"
pid=""
data=""
addr=""

stop_target() {
    if [[ -n $pid ]]; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        pid=""
    fi
    if [[ -n $data ]]; then
        rm -rf "$data"
        data=""
    fi
}
trap stop_target EXIT

# start_target TARGET SCENARIO: sets pid and addr.
start_target() {
    local log=$out/$2-$1.server.log cmd
    data=$(mktemp -d "${TMPDIR:-/tmp}/chatconnect-bench.XXXXXX")
    case $1 in
        chatserver)
            cmd=(env -u MONGO_URI PORT=0 HOST=127.0.0.1 DATA_DIR="$data" BCRYPT_COST=10
                 WS_RATE_LIMIT=0 "$chatserver") ;;
        floor) cmd=(env PORT=0 HOST=127.0.0.1 "$floor") ;;
        baseline) cmd=(env PORT=0 HOST=127.0.0.1 BCRYPT_COST=10 "$baseline") ;;
    esac
    echo "ulimit -n 20000; ${cmd[*]}" >>"$commands"
    "${cmd[@]}" 2>"$log" &
    pid=$!
    for _ in $(seq 1 300); do
        addr=$(grep -o 'listening on [0-9.]*:[0-9]*' "$log" | head -n 1 | sed 's/listening on //' || true)
        [[ -n $addr ]] && return 0
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "bench.sh: $1 exited at start:" >&2
            cat "$log" >&2
            pid=""
            return 1
        fi
        sleep 0.1
    done
    echo "bench.sh: $1 printed no 'listening on' line within 30 s" >&2
    return 1
}

ferret=""
stop_ferret() {
    if [[ -n $ferret ]]; then
        scripts/ferretdb.sh stop "$ferret" >/dev/null 2>&1 || true
        rm -rf "$ferret"
        ferret=""
    fi
}
trap 'stop_target; stop_ferret' EXIT

# Group commit: store writes of one message against batched writes, on both
# backends (the store alone, no server in between).
group_commit_run() {
    local secs=3 uri
    [[ ${#quick[@]} -gt 0 ]] && secs=1
    echo "== groupcommit: sqlite"
    echo "cargo bench --bench group_commit -- $secs" >>"$commands"
    "$group_commit" "$secs" | tee "$out/groupcommit-sqlite.txt"
    echo "== groupcommit: mongodb (FerretDB)"
    ferret=$(mktemp -d "${TMPDIR:-/tmp}/chatconnect-ferret.XXXXXX")
    uri=$(scripts/ferretdb.sh start "$ferret")
    echo "scripts/ferretdb.sh start DIR; cargo bench --bench group_commit -- $secs --mongo $uri" >>"$commands"
    "$group_commit" "$secs" --mongo "$uri" | tee "$out/groupcommit-mongodb.txt"
    stop_ferret
}

failed=0
for scn in ${only//,/ }; do
    if [[ $scn == groupcommit ]]; then
        group_commit_run || { echo "   (groupcommit reported a failure)"; failed=$((failed + 1)); }
        continue
    fi
    for t in ${targets//,/ }; do
        echo "== $scn: $t"
        case $t in chatserver) kind=server ;; *) kind=$t ;; esac
        start_target "$t" "$scn"
        args=("$scn" --addr "$addr" --server-pid "$pid" --kind "$kind" --label "$t"
              --json-out "$out/$scn-$t.json" "${quick[@]}" "${extra[@]}")
        echo "cargo bench --bench loadgen -- ${args[*]}" >>"$commands"
        if ! timeout 600 "$loadgen" "${args[@]}" >/dev/null; then
            echo "   ($scn against $t reported a failure; see above and $out)"
            failed=$((failed + 1))
        fi
        stop_target
    done
done

report=$out/report.md
{
    echo "# ChatConnect load benchmarks"
    echo
    echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) on $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB;" \
        "git $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo '+changes');" \
        "${quick[*]:-full size}"
    echo
    "$loadgen" report "$out"
    echo
    for b in sqlite mongodb; do
        if [[ -f $out/groupcommit-$b.txt ]]; then
            echo "Group commit, $b:"
            echo
            echo '```'
            cat "$out/groupcommit-$b.txt"
            echo '```'
            echo
        fi
    done
    echo "Servers and load generator, in the order run:"
    echo
    echo '```'
    cat "$commands"
    echo '```'
} >"$report"
echo
cat "$report"
echo
echo "results: $out ($(($(date +%s) - started)) s)"
if [[ $failed -gt 0 ]]; then
    echo "$failed scenario runs reported a failure" >&2
    exit 1
fi
