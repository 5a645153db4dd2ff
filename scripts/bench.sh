#!/usr/bin/env bash
# Load benchmarks: every scenario against chatserver and the two yardsticks
# in one run, chatserver on each store, then a Markdown table of the figures
# with their ratios.
#
#   floor     benches/floor.rs: a bare mio relay (no JSON, no store); what
#             this machine can do at all
#   baseline  benches/baseline_tokio.rs: the same chat written the usual way
#             (tokio, tokio-tungstenite, a broadcast channel per room)
#
# Each scenario gets a fresh server process (ulimit -n 20000) on 127.0.0.1
# and port 0; benches/loadgen/ drives it from several client processes.
# chatserver runs each scenario once per store: SQLite (a fresh DATA_DIR),
# and FerretDB (one instance started by scripts/ferretdb.sh, built on first
# use, stopped at the end; a fresh MONGO_DB per scenario). The report puts
# the stores side by side with their ratio; the yardsticks have no store and
# run once. chatserver gets WS_RATE_LIMIT=0 for fanout, many, cluster and
# login (their clients send faster than the per-socket limit); the others
# keep the default.
#
# cluster (not in the default list: about 4 minutes per store at full size,
# 1 at --quick, on top of fanout and many) runs fanout and many again with
# their members and senders split evenly over two chatserver processes that
# share the store (one DATA_DIR, or one MONGO_DB) and one redis-server
# (Debian's; BROKER_URL, BROKER_PREFIX), against the single instance's
# result of the same run (fanout and many run first when they are not in
# the list): deliveries/s and their ratio, the latency a cross-instance hop
# adds at the single instance's sustained rate, and the broker path's CPU
# and bytes per batch and message. Only chatserver (the yardsticks have no
# broker).
#
# Usage: scripts/bench.sh [--quick] [--only SCENARIO[,SCENARIO..]]
#                         [--targets chatserver,floor,baseline]
#                         [--store sqlite|ferretdb|both] [--out DIR]
#                         [-- EXTRA LOADGEN FLAGS]
#   scenarios: idle fanout many joinstorm login rest groupcommit cluster
#              (default: all but cluster; cluster always runs last)
#              joinstorm: 5,000 sockets over 50 rooms of 20 messages, 200
#              connects in flight (--quick: 1,000 over 20 rooms)
#              groupcommit runs benches/group_commit.rs on each store
#   --store    the stores chatserver and groupcommit run on (default both)
#   --quick    small sizes (a few minutes after the build)
#   --out      where the JSON results, server logs and report go
#              (default target/bench/DATE)
#   EXTRA      flags for every loadgen run, e.g. the 19,000-socket storm:
#              --only joinstorm -- --conns 19000 --rooms 100 --in-flight 0
# CHATSERVER_BIN=PATH runs that chatserver binary instead of this tree's
# release build (the yardsticks and loadgen still come from this tree): a
# before/after comparison builds the other commit elsewhere and points here.
# For perf, CHATSERVER_BIN=target/profiling/chatserver after
# `cargo build --profile profiling --bin chatserver`: the release binary has
# no debug info.
# The full run takes about 10 minutes per store after the build on 2 cores
# (longer on FerretDB, whose joins are slower).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
# shellcheck disable=SC2034  # read by scripts/lib/common.sh (its log lines)
prog=bench.sh
# shellcheck source=scripts/lib/common.sh
source "$root/scripts/lib/common.sh"

quick=()
only="idle,fanout,many,joinstorm,login,rest,groupcommit"
targets="chatserver,floor,baseline"
store=both
out=""
extra=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) quick=(--quick) ;;
        --only) only="$2"; shift ;;
        --only=*) only="${1#*=}" ;;
        --targets) targets="$2"; shift ;;
        --targets=*) targets="${1#*=}" ;;
        --store) store="$2"; shift ;;
        --store=*) store="${1#*=}" ;;
        --out) out="$2"; shift ;;
        --out=*) out="${1#*=}" ;;
        --) shift; extra=("$@"); break ;;
        -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
        *) echo "bench.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
for s in ${only//,/ }; do
    case "$s" in idle|fanout|many|joinstorm|login|rest|groupcommit|cluster) ;; *) echo "bench.sh: unknown scenario $s" >&2; exit 2 ;; esac
done
# cluster compares with fanout and many of the same run: it goes last.
if [[ ,$only, == *,cluster,* ]]; then
    only=$(tr , '\n' <<<"$only" | { grep -vx cluster || true; } | paste -sd, -)
    only=${only:+$only,}cluster
fi
if [[ ,$only, == *,cluster,* ]] && ! command -v redis-server >/dev/null 2>&1; then
    echo "bench.sh: the cluster scenario needs redis-server (apt-get install -y redis-server)" >&2
    exit 2
fi
case "$store" in
    sqlite) stores=(sqlite) ;;
    ferretdb) stores=(ferretdb) ;;
    both) stores=(sqlite ferretdb) ;;
    *) echo "bench.sh: --store must be sqlite, ferretdb or both" >&2; exit 2 ;;
esac
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
chatserver=${CHATSERVER_BIN:-${CARGO_TARGET_DIR:-$root/target}/release/chatserver}
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

# reap PID [TENTHS]: wait up to TENTHS tenths of a second (default 100) for
# a process already sent SIGTERM to exit, then kill it.
reap() {
    local p=$1 tenths=${2:-100}
    for _ in $(seq 1 "$tenths"); do
        kill -0 "$p" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
}

stop_target() {
    if [[ -n $pid ]]; then
        kill -TERM "$pid" 2>/dev/null || true
        reap "$pid"
        pid=""
    fi
    if [[ -n $data ]]; then
        rm -rf "$data"
        data=""
    fi
}

# One FerretDB for the whole run, started on first use (ferret_uri), stopped
# at the end.
ferret=""
ferret_uri=""
ensure_ferret() {
    [[ -n $ferret_uri ]] && return 0
    ferret=$(mktemp -d "${TMPDIR:-/tmp}/chatconnect-ferret.XXXXXX")
    echo "== FerretDB: scripts/ferretdb.sh start $ferret"
    if ! ferret_uri=$(scripts/ferretdb.sh start "$ferret") || [[ -z $ferret_uri ]]; then
        echo "bench.sh: FerretDB did not start (see above)" >&2
        ferret_uri=""
        return 1
    fi
    echo "scripts/ferretdb.sh start DIR   # $ferret_uri" >>"$commands"
}
stop_ferret() {
    if [[ -n $ferret ]]; then
        scripts/ferretdb.sh stop "$ferret" >/dev/null 2>&1 || true
        rm -rf "$ferret"
        ferret=""
        ferret_uri=""
    fi
}
trap 'stop_target; stop_cluster; stop_ferret' EXIT

# scrape_metrics FILE [ADDR]: chatserver's /metrics page at ADDR (default
# $addr) into FILE (bash's /dev/tcp, so nothing else is needed).
scrape_metrics() {
    local a=${2:-$addr}
    local host=${a%:*} port=${a##*:}
    {
        exec 3<>"/dev/tcp/$host/$port" &&
            printf 'GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n' >&3 &&
            timeout 10 cat <&3
        exec 3<&-
    } >"$1" 2>/dev/null || true
}

# start_target TARGET SCENARIO NAME [STORE]: sets pid and addr; NAME names
# the log.
start_target() {
    local log=$out/$3.server.log cmd store_env rate=()
    data=$(mktemp -d "${TMPDIR:-/tmp}/chatconnect-bench.XXXXXX")
    case $2 in fanout|many|login) rate=(WS_RATE_LIMIT=0) ;; esac
    case ${4:-} in
        ferretdb)
            ensure_ferret || return 1
            # A database of its own per scenario: runs never see each
            # other's rooms.
            store_env=(MONGO_URI="$ferret_uri" MONGO_DB="bench_$2_$(date +%s)") ;;
        *) store_env=(-u MONGO_URI -u MONGO_DB) ;;
    esac
    case $1 in
        chatserver)
            cmd=(env "${store_env[@]}" PORT=0 HOST=127.0.0.1 DATA_DIR="$data" BCRYPT_COST=10
                 "${rate[@]}" "$chatserver") ;;
        floor) cmd=(env PORT=0 HOST=127.0.0.1 "$floor") ;;
        baseline) cmd=(env PORT=0 HOST=127.0.0.1 BCRYPT_COST=10 "$baseline") ;;
    esac
    echo "ulimit -n 20000; ${cmd[*]}" >>"$commands"
    "${cmd[@]}" 2>"$log" &
    pid=$!
    await_listening "$1" "$pid" "$log" || { pid=""; return 1; }
}

# await_listening NAME PID LOG: sets addr from the server's 'listening on'
# line (30 s at most).
await_listening() {
    for _ in $(seq 1 300); do
        addr=$(grep -o 'listening on [0-9.]*:[0-9]*' "$3" | head -n 1 | sed 's/listening on //' || true)
        [[ -n $addr ]] && return 0
        if ! kill -0 "$2" 2>/dev/null; then
            echo "bench.sh: $1 exited at start:" >&2
            cat "$3" >&2
            return 1
        fi
        sleep 0.1
    done
    echo "bench.sh: $1 printed no 'listening on' line within 30 s" >&2
    return 1
}

# run_one TARGET SCENARIO [STORE]: one scenario against a fresh server;
# fails if the server did not start or the scenario reported a failure.
run_one() {
    local t=$1 scn=$2 st=${3:-} kind name rc=0
    case $t in chatserver) kind=server ;; *) kind=$t ;; esac
    name=$scn-$t${st:+-$st}
    echo "== $scn: $t${st:+ on $st}"
    if ! start_target "$t" "$scn" "$name" "$st"; then
        stop_target
        return 1
    fi
    local args=("$scn" --addr "$addr" --server-pid "$pid" --kind "$kind" --label "$t"
                ${st:+--store "$st"} --json-out "$out/$name.json" "${quick[@]}" "${extra[@]}")
    echo "cargo bench --bench loadgen -- ${args[*]}" >>"$commands"
    if ! timeout 900 "$loadgen" "${args[@]}" >/dev/null; then
        echo "   ($scn against $t${st:+ on $st} reported a failure; see above and $out)"
        rc=1
    fi
    if [[ $t == chatserver ]]; then scrape_metrics "$out/$name.metrics.txt"; fi
    stop_target
    return $rc
}

# --- cluster: two chatservers sharing a store, one Redis -----------------

cpids=()
caddrs=()
cdir=""
redis_pid=""
redis_port=""

# start_redis LOG: a redis-server on a free port of 127.0.0.1 (no
# persistence); sets redis_pid and redis_port.
start_redis() {
    local log=$1
    for _ in 1 2 3 4 5; do
        redis_port=$(random_port)
        port_open "$redis_port" && continue
        redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
            --dir "$cdir" --daemonize no </dev/null >>"$log" 2>&1 &
        redis_pid=$!
        for _ in $(seq 1 100); do
            redis_pong "$redis_port" && return 0
            pid_alive "$redis_pid" || break
            sleep 0.1
        done
        kill -KILL "$redis_pid" 2>/dev/null || true
        wait "$redis_pid" 2>/dev/null || true
        redis_pid=""
    done
    echo "bench.sh: redis-server did not start (log: $log)" >&2
    return 1
}

# start_cluster SCENARIO STORE NAME: Redis, then two chatservers (one after
# the other, each waiting for its 'listening on') on one store with
# BROKER_URL; sets cpids, caddrs, redis_port.
start_cluster() {
    local scn=$1 st=$2 name=$3 store_env i log cmd
    cdir=$(mktemp -d "${TMPDIR:-/tmp}/chatconnect-bench-cluster.XXXXXX")
    start_redis "$out/$name.redis.log" || return 1
    echo "redis-server --port $redis_port --bind 127.0.0.1 --save '' --appendonly no" >>"$commands"
    case $st in
        ferretdb)
            ensure_ferret || return 1
            store_env=(MONGO_URI="$ferret_uri" MONGO_DB="bench_cluster_${scn}_$(date +%s)") ;;
        *) store_env=(-u MONGO_URI -u MONGO_DB) ;;
    esac
    for i in 1 2; do
        log=$out/$name-$i.server.log
        cmd=(env "${store_env[@]}" PORT=0 HOST=127.0.0.1 DATA_DIR="$cdir" BCRYPT_COST=10
             WS_RATE_LIMIT=0 BROKER_URL="redis://127.0.0.1:$redis_port"
             BROKER_PREFIX="bench-$scn" "$chatserver")
        echo "ulimit -n 20000; ${cmd[*]}" >>"$commands"
        "${cmd[@]}" 2>"$log" &
        cpids+=("$!")
        await_listening "chatserver $i" "$!" "$log" || return 1
        caddrs+=("$addr")
    done
}

stop_cluster() {
    local p
    for p in "${cpids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${cpids[@]}"; do reap "$p"; done
    cpids=()
    caddrs=()
    if [[ -n $redis_pid ]]; then
        kill -TERM "$redis_pid" 2>/dev/null || true
        reap "$redis_pid" 50
        redis_pid=""
    fi
    if [[ -n $cdir ]]; then
        rm -rf "$cdir"
        cdir=""
    fi
}

# The cluster scenario on each store: fanout and many on one instance
# (unless they ran already in this run), then on two; the number of runs
# that failed.
cluster_run() {
    local st scn ref name fails=0
    for st in "${stores[@]}"; do
        for scn in fanout many; do
            ref=$out/$scn-chatserver-$st.json
            if [[ ! -f $ref ]] && ! run_one chatserver "$scn" "$st"; then
                fails=$((fails + 1))
                continue
            fi
            name=cluster-$scn-chatserver-$st
            echo "== cluster $scn: 2 chatservers on $st, one Redis"
            if ! start_cluster "$scn" "$st" "$name"; then
                fails=$((fails + 1))
                stop_cluster
                continue
            fi
            local args=("$scn" --addr "${caddrs[0]},${caddrs[1]}"
                        --server-pid "${cpids[0]},${cpids[1]}" --redis "127.0.0.1:$redis_port"
                        --kind server --label chatserver --store "$st" --single "$ref"
                        --json-out "$out/$name.json" "${quick[@]}" "${extra[@]}")
            echo "cargo bench --bench loadgen -- ${args[*]}" >>"$commands"
            if ! timeout 900 "$loadgen" "${args[@]}" >/dev/null; then
                echo "   (cluster $scn on $st reported a failure; see above and $out)"
                fails=$((fails + 1))
            fi
            scrape_metrics "$out/$name-1.metrics.txt" "${caddrs[0]}"
            scrape_metrics "$out/$name-2.metrics.txt" "${caddrs[1]}"
            stop_cluster
        done
    done
    return "$fails"
}

# Group commit: store writes of one message against batched writes, on each
# store (the store alone, no server in between).
group_commit_run() {
    local secs=3 st
    [[ ${#quick[@]} -gt 0 ]] && secs=1
    for st in "${stores[@]}"; do
        if [[ $st == sqlite ]]; then
            echo "== groupcommit: sqlite"
            echo "cargo bench --bench group_commit -- $secs" >>"$commands"
            "$group_commit" "$secs" | tee "$out/groupcommit-sqlite.txt" || return 1
        else
            echo "== groupcommit: mongodb (FerretDB)"
            ensure_ferret || return 1
            echo "cargo bench --bench group_commit -- $secs --mongo $ferret_uri" >>"$commands"
            "$group_commit" "$secs" --mongo "$ferret_uri" | tee "$out/groupcommit-mongodb.txt" || return 1
        fi
    done
}

failed=0
for scn in ${only//,/ }; do
    if [[ $scn == groupcommit ]]; then
        group_commit_run || { echo "   (groupcommit reported a failure)"; failed=$((failed + 1)); }
        continue
    fi
    if [[ $scn == cluster ]]; then
        if [[ ,$targets, != *,chatserver,* ]]; then
            echo "== cluster: skipped (it runs chatserver only, and --targets leaves it out)"
            continue
        fi
        cluster_run || failed=$((failed + $?))
        continue
    fi
    for t in ${targets//,/ }; do
        case $t in chatserver) on=("${stores[@]}") ;; *) on=("") ;; esac
        for st in "${on[@]}"; do
            run_one "$t" "$scn" "$st" || failed=$((failed + 1))
        done
    done
done
stop_ferret

report=$out/report.md
{
    echo "# ChatConnect load benchmarks"
    echo
    echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) on $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB;" \
        "git $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo '+changes');" \
        "${quick[*]:-full size}; stores: ${stores[*]}"
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
    if compgen -G "$out/*.metrics.txt" >/dev/null; then
        echo "Client memory of chatserver at the end of each run (\`/metrics\`; the budget"
        echo "is \`MAX_CLIENT_MEMORY\`, and members that read must never be closed for it):"
        echo
        echo "| run | peak bytes | budget bytes | closed for the budget | slow-consumer closes |"
        echo "|---|---|---|---|---|"
        for f in "$out"/*.metrics.txt; do
            m() { awk -v n="$1" '$1 == n { print $2 }' "$f"; }
            echo "| $(basename "$f" .metrics.txt) | $(m chatconnect_client_memory_peak_bytes) |" \
                "$(m chatconnect_client_memory_budget_bytes) | $(m chatconnect_client_memory_closes_total) |" \
                "$(m chatconnect_slow_consumer_closes_total) |"
        done
        echo
    fi
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
