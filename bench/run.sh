#!/usr/bin/env bash
# Benchmarks Nexus Chat against the reference Socket.IO gateway on this
# machine, side by side in one run, and writes the results page
# (docs/BENCHMARKS.md). Every server, Redis and database it uses is its own,
# on loopback; everything it starts is stopped when it exits.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: bench/run.sh GATEWAY_FOLDER [--quick] [--skip-build] [--out FILE]

Builds nexus-host, the components and nexus-load in release, copies the
reference gateway in GATEWAY_FOLDER to a temporary folder and runs npm ci
there, starts private redis-server processes on free ports and creates
fresh Postgres databases, runs each scenario against both servers and
writes the page from the medians.

  GATEWAY_FOLDER  the reference gateway (server.js, package.json, package-lock.json)
  --quick         tiny runs that only check the script (a few minutes in all);
                  the page goes to target/bench/quick/BENCHMARKS.md
  --skip-build    use the binaries already built under target/
  --out FILE      where to write the page (default docs/BENCHMARKS.md, or
                  the quick path above with --quick)

Environment:
  NEXUS_BENCH_DATABASE_URL  admin connection that may create databases, with
                            no query string
                            (default postgres://postgres@127.0.0.1:5432/postgres)
  NEXUS_BENCH_TIMEOUT_S     bound on the whole run in seconds (default 4800)
  NEXUS_BENCH_REPS          runs of each scenario per server (default 3, quick 1)
  NEXUS_BENCH_QUIET_WAIT_S  seconds to wait before each scenario for other cargo
                            processes to finish (default 300, quick 0)

Results, logs and every nexus-load command line stay in target/bench/full
(or target/bench/quick) after the run.
EOF
}

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source=deploy/lib/services.sh
source "$root/deploy/lib/services.sh"
# shellcheck source=deploy/lib/toolchain.sh
source "$root/deploy/lib/toolchain.sh"

gateway_source=''
quick=0
build=1
page=''
while (($# > 0)); do
    case "$1" in
        --quick) quick=1 ;;
        --skip-build) build=0 ;;
        --out)
            [[ $# -ge 2 ]] || { usage >&2; exit 2; }
            page=$2
            shift
            ;;
        -h | --help) usage; exit 0 ;;
        -*)
            nexus_error "unknown option $1"
            usage >&2
            exit 2
            ;;
        *)
            if [[ -n $gateway_source ]]; then
                nexus_error "only one GATEWAY_FOLDER may be given; got $gateway_source and $1"
                exit 2
            fi
            gateway_source=$1
            ;;
    esac
    shift
done
if [[ -z $gateway_source ]]; then
    usage >&2
    exit 2
fi
if [[ ! -f $gateway_source/server.js || ! -f $gateway_source/package-lock.json ]]; then
    nexus_error "$gateway_source has no server.js and package-lock.json; pass the reference gateway's folder"
    exit 2
fi
gateway_source=$(cd "$gateway_source" && pwd)

# ------------------------------------------------------------- settings

if ((quick)); then
    mode=quick
    reps=${NEXUS_BENCH_REPS:-1}
    chat_pairs=10 chat_rotate=2 chat_probe_s=2 chat_step_s=2 chat_steps=1 chat_drain_s=1
    latency_rate=100 latency_s=2
    connect_goal_n=300 connect_compare_n=100
    idle_nexus_n=300 idle_gateway_n=100 idle_hold_s=2
    cluster_hosts=6 cluster_n=600
    profile_rate=100 profile_s=4 profile_delay_s=1 profile_record_s=2
    commit_rates="50" commit_s=2
else
    mode=full
    reps=${NEXUS_BENCH_REPS:-3}
    # 200 users in each direction: at the gateway's fixed limit of 100
    # messages per user per minute, a run of 10 s stays under it up to
    # 4,000 messages/s.
    chat_pairs=100 chat_rotate=2 chat_probe_s=8 chat_step_s=10 chat_steps=4 chat_drain_s=3
    latency_rate=2000 latency_s=15
    connect_goal_n=10000 connect_compare_n=1000
    # The gateway broadcasts each connect to every connected socket, so
    # opening N connections costs it N^2/2 frames: 2,000 take it 30 to 40 s.
    idle_nexus_n=19000 idle_gateway_n=2000 idle_hold_s=30
    cluster_hosts=6 cluster_n=100000
    profile_rate=1000 profile_s=16 profile_delay_s=6 profile_record_s=8
    commit_rates="150 1000" commit_s=10
fi
chat_max_p99_ms=50
connect_concurrency=200
handshake_timeout_s=30

results="$root/target/bench/$mode"
page=${page:-$([[ $mode == quick ]] && echo "$results/BENCHMARKS.md" || echo "$root/docs/BENCHMARKS.md")}
admin_url=${NEXUS_BENCH_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
timeout_s=${NEXUS_BENCH_TIMEOUT_S:-4800}
quiet_wait_s=${NEXUS_BENCH_QUIET_WAIT_S:-$([[ $mode == quick ]] && echo 0 || echo 300)}
bench_py=("python3" "$root/bench/bench.py")

log() {
    printf 'bench: %s\n' "$*" >&2
}

# ------------------------------------------------------------- cleanup

work=''
started_pids=()
databases=()
watchdog=''

process_running() {
    local state
    state=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
    [[ $state != Z* ]]
}

# Sends SIGTERM, waits up to 10 s, then sends SIGKILL.
stop_pid() {
    local pid=$1 tries
    kill -TERM "$pid" 2>/dev/null || true
    for ((tries = 0; tries < 100; tries++)); do
        process_running "$pid" || break
        sleep 0.1
    done
    if process_running "$pid"; then
        log "process $pid did not stop within 10 s of SIGTERM; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

drop_database() {
    PGCONNECT_TIMEOUT=5 psql -X -q "$admin_url" -c "DROP DATABASE IF EXISTS $1 WITH (FORCE)" \
        >/dev/null 2>&1 || log "dropping database $1 failed"
}

cleanup() {
    local status=$? pid name
    trap - EXIT INT TERM
    # Every step runs even when one fails.
    set +e
    for ((index = ${#started_pids[@]} - 1; index >= 0; index--)); do
        pid=${started_pids[index]}
        process_running "$pid" && stop_pid "$pid"
    done
    for name in "${databases[@]}"; do
        drop_database "$name"
    done
    if [[ -n $watchdog ]]; then
        kill -TERM "$watchdog" 2>/dev/null
    fi
    if [[ -n $work && -d $work ]]; then
        rm -rf "$work"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Stops the whole run after timeout_s seconds. The trap ends its sleep when
# cleanup stops the watchdog first.
(
    trap 'kill "$sleeper" 2>/dev/null; exit 0' TERM
    sleep "$timeout_s" &
    sleeper=$!
    wait "$sleeper"
    echo "bench: the run passed its limit of $timeout_s s; stopping" >&2
    kill -TERM $$
) &
watchdog=$!

# ------------------------------------------------------------- tools

for tool in python3 node npm psql curl redis-server; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        case "$tool" in
            redis-server) nexus_ensure_redis_binary ;;
            psql) nexus_ensure_postgres_client ;;
            *) nexus_error "$tool not found; install it first"; exit 1 ;;
        esac
    fi
done
nexus_ensure_postgres "$admin_url"
nexus_ensure_cargo

# Waits, at most 30 minutes, until no other cargo process runs: the machine
# has 2 cores, and a build beside another one slows both.
wait_for_other_builds() {
    local waited=0
    while pgrep -x cargo >/dev/null; do
        if ((waited >= 1800)); then
            nexus_error "another cargo process was still running after 30 minutes"
            exit 1
        fi
        ((waited == 0)) && log "waiting for the running cargo process to finish"
        sleep 10
        waited=$((waited + 10))
    done
}

if ((build)); then
    nexus_ensure_wasm_target
    wait_for_other_builds
    nexus_build_components
    wait_for_other_builds
    nexus_build_host
    wait_for_other_builds
    log "building nexus-load (release)"
    cargo build --release -p nexus-load
    log "building the invoke benchmark"
    cargo bench -p nexus-host --bench invoke --no-run
fi
for binary in target/release/nexus-host target/release/nexus-load; do
    if [[ ! -x $binary ]]; then
        nexus_error "$binary not found; run without --skip-build"
        exit 1
    fi
done

rm -rf "$results"
mkdir -p "$results"
work=$(mktemp -d /tmp/nexus-bench.XXXXXX)
log "results in $results, temporary files in $work"

# The servers run copies of the binaries and components, so a rebuild in
# the work tree during the run does not change what is measured.
app="$work/app"
mkdir -p "$app/target/wasm32-wasip2/component"
cp target/release/nexus-host target/release/nexus-load "$app/"
cp target/wasm32-wasip2/component/nexus_{auth,message,presence}.wasm "$app/target/wasm32-wasip2/component/"
cp spin.toml "$app/"
load_bin="$app/nexus-load"

gateway="$work/gateway"
cp -R "$gateway_source" "$gateway"
chmod -R u+w "$gateway"
rm -rf "$gateway/node_modules"
log "running npm ci for the reference gateway"
(cd "$gateway" && timeout 600 npm ci --no-audit --no-fund --loglevel=error) >"$results/npm-ci.log" 2>&1 || {
    nexus_error "npm ci failed; see $results/npm-ci.log"
    exit 1
}

JWT_SECRET=$(head -c 48 /dev/urandom | base64 | tr -d '/+=\n')
export JWT_SECRET

perf_state=missing
if command -v perf >/dev/null 2>&1; then
    if perf record -q -e cpu-clock -o "$work/perf-check.data" -- true >/dev/null 2>&1; then
        perf_state=works
    else
        perf_state="perf record -e cpu-clock failed"
    fi
fi

"${bench_py[@]}" meta --out "$results/meta.json" --root "$root" --gateway "$gateway" \
    --admin-url "$admin_url" --perf "$perf_state" --work "$work" \
    --setting "mode=$mode" --setting "reps=$reps" \
    --setting "chat_pairs=$chat_pairs" --setting "chat_rotate=$chat_rotate" \
    --setting "chat_probe_s=$chat_probe_s" --setting "chat_step_s=$chat_step_s" \
    --setting "chat_steps=$chat_steps" --setting "chat_drain_s=$chat_drain_s" \
    --setting "chat_max_p99_ms=$chat_max_p99_ms" \
    --setting "latency_rate=$latency_rate" --setting "latency_s=$latency_s" \
    --setting "connect_goal_n=$connect_goal_n" --setting "connect_compare_n=$connect_compare_n" \
    --setting "connect_concurrency=$connect_concurrency" \
    --setting "idle_nexus_n=$idle_nexus_n" --setting "idle_gateway_n=$idle_gateway_n" \
    --setting "idle_hold_s=$idle_hold_s" --setting "cluster_hosts=$cluster_hosts" \
    --setting "cluster_n=$cluster_n" --setting "profile_rate=$profile_rate" \
    --setting "profile_s=$profile_s" --setting "handshake_timeout_s=$handshake_timeout_s" \
    --setting "commit_rates=$commit_rates" --setting "commit_s=$commit_s"

# ------------------------------------------------------------- services

free_port() {
    "${bench_py[@]}" free-port
}

# Waits up to 60 s for GET URL to return 200 from process PID.
wait_healthy() {
    local url=$1 pid=$2 log_file=$3 tries
    for ((tries = 0; tries < 300; tries++)); do
        if ! process_running "$pid"; then
            nexus_error "the server behind $url exited; last lines of $log_file:"
            tail -n 20 "$log_file" >&2
            exit 1
        fi
        curl -fsS -m 2 -o /dev/null "$url" 2>/dev/null && return 0
        sleep 0.2
    done
    nexus_error "$url did not return 200 within 60 s; last lines of $log_file:"
    tail -n 20 "$log_file" >&2
    exit 1
}

# Starts a private redis-server on a free port; sets redis_port and redis_pid.
start_redis() {
    local name=$1 dir="$work/redis-$1" tries
    mkdir -p "$dir"
    redis_port=$(free_port)
    redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
        --dir "$dir" >"$results/redis-$name.log" 2>&1 &
    redis_pid=$!
    started_pids+=("$redis_pid")
    for ((tries = 0; tries < 100; tries++)); do
        # shellcheck disable=SC2016 # $1 expands in the inner shell.
        if timeout 1 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1" && printf "PING\r\n" >&3 &&
            IFS= read -r reply <&3 && [[ $reply == +PONG* ]]' _ "$redis_port" 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    nexus_error "redis-server on port $redis_port did not answer PING within 10 s"
    exit 1
}

create_database() {
    local name=$1
    databases+=("$name")
    PGOPTIONS="-c client_min_messages=warning" PGCONNECT_TIMEOUT=5 psql -X -q -v ON_ERROR_STOP=1 "$admin_url" \
        -c "DROP DATABASE IF EXISTS $name" -c "CREATE DATABASE $name" >/dev/null
}

database_url() {
    printf '%s/%s\n' "${admin_url%/*}" "$1"
}

# Settings of every nexus-host: message and frame limits far above the
# load, as many connections per address as the load opens, loopback only.
nexus_settings=(
    NODE_ENV=production
    BIND_ADDRESS=127.0.0.1
    "NEXUS_MANIFEST=$app/spin.toml"
    SPIN_VARIABLE_MESSAGE_RATE_LIMIT=1000000
    MAX_EVENTS_PER_SECOND=100000
    MAX_CONNECTIONS_PER_IP=200000
)

# start_nexus NAME REDIS_PORT DATABASE [SETTING=VALUE...]; sets server_port
# and server_pid.
start_nexus() {
    local name=$1 redis=$2 database=$3
    shift 3
    server_port=$(free_port)
    local log_file="$results/server-nexus-$name.log"
    env "${nexus_settings[@]}" "PORT=$server_port" "NEXUS_INSTANCE_ID=bench-$name" \
        "REDIS_URL=redis://127.0.0.1:$redis" "DATABASE_URL=$(database_url "$database")" "$@" \
        "$app/nexus-host" serve >"$log_file" 2>&1 &
    server_pid=$!
    started_pids+=("$server_pid")
    printf 'nexus-host %s: env %s PORT=%s REDIS_URL=redis://127.0.0.1:%s DATABASE_URL=%s %s\n' \
        "$name" "${nexus_settings[*]}" "$server_port" "$redis" "$(database_url "$database")" \
        "$* nexus-host serve" >>"$results/servers.txt"
    wait_healthy "http://127.0.0.1:$server_port/health" "$server_pid" "$log_file"
}

# start_gateway NAME REDIS_PORT DATABASE; sets server_port and server_pid.
start_gateway() {
    local name=$1 redis=$2 database=$3
    server_port=$(free_port)
    local log_file="$results/server-gateway-$name.log"
    (cd "$gateway" && exec env NODE_ENV=production REDIS_HOST=127.0.0.1 "REDIS_PORT=$redis" \
        "DATABASE_URL=$(database_url "$database")" node server.js --port "$server_port") \
        >"$log_file" 2>&1 &
    server_pid=$!
    started_pids+=("$server_pid")
    printf 'gateway %s: env NODE_ENV=production REDIS_HOST=127.0.0.1 REDIS_PORT=%s DATABASE_URL=%s node server.js --port %s\n' \
        "$name" "$redis" "$(database_url "$database")" "$server_port" >>"$results/servers.txt"
    wait_healthy "http://127.0.0.1:$server_port/health" "$server_pid" "$log_file"
}

# Stops the servers and Redis processes given by pid.
stop_all() {
    local pid
    for pid in "$@"; do
        stop_pid "$pid"
    done
}

# ------------------------------------------------------------- load runs

# Per server name: nexus-load target options, pids, Redis pid, database.
declare -A target_of pids_of redis_of database_of

# register NAME PROTOCOL REDIS_PID DATABASE PORT:PID...
register() {
    local name=$1 protocol=$2 redis=$3 database=$4 scheme=ws options=()
    shift 4
    [[ $protocol == socketio ]] && scheme=http && options+=(--protocol socketio)
    local pids=() pair
    for pair in "$@"; do
        options+=(--url "$scheme://127.0.0.1:${pair%%:*}")
        pids+=("${pair#*:}")
    done
    target_of[$name]="${options[*]}"
    pids_of[$name]="${pids[*]}"
    redis_of[$name]=$redis
    database_of[$name]=$database
}

# load_run NAME TIMEOUT SERVER [bench.py load options...] -- NEXUS_LOAD_ARGS...
# Runs nexus-load against SERVER's URLs, with the servers' CPU, Redis CPU,
# Postgres backends and memory sampled.
load_run() {
    local name=$1 limit=$2 server=$3 pid options=()
    shift 3
    while (($# > 0)) && [[ $1 != -- ]]; do
        options+=("$1")
        shift
    done
    shift
    local -a target server_pids
    read -r -a target <<<"${target_of[$server]}"
    read -r -a server_pids <<<"${pids_of[$server]}"
    for pid in "${server_pids[@]}"; do
        options+=(--watch "server=$pid" --status-pid "$pid")
        target+=(--server-pid "$pid")
    done
    options+=(--watch "redis=${redis_of[$server]}" --postgres-db "${database_of[$server]}")
    "${bench_py[@]}" load --runs "$results/runs.jsonl" --out "$results/$name.json" \
        --timeout "$limit" --tag "server=$server" "${options[@]}" \
        -- "$load_bin" "${target[@]}" --handshake-timeout "$handshake_timeout_s" "$@" ||
        log "run $name failed with exit code $?; see $results/$name.err"
}

# Waits until SERVER's processes are quiet (at most 60 s), then 1 s more.
settle() {
    local -a server_pids
    read -r -a server_pids <<<"${pids_of[$1]}"
    local options=()
    for pid in "${server_pids[@]}"; do
        options+=(--pid "$pid")
    done
    "${bench_py[@]}" wait-idle "${options[@]}" --max-seconds 60
    sleep 1
}

# Waits, at most quiet_wait_s seconds, until no cargo process runs, so that
# a build or test run of someone else's does not share the cores with a
# scenario. A run that starts meanwhile is still measured; the page shows
# the CPU that other processes used during each run.
wait_for_quiet() {
    local waited=0
    while pgrep -x cargo >/dev/null && ((waited < quiet_wait_s)); do
        ((waited == 0)) && log "waiting up to $quiet_wait_s s for the running cargo process to finish"
        sleep 5
        waited=$((waited + 5))
    done
    ((waited > 0)) && log "waited $waited s for other cargo processes"
    return 0
}

# Records the load average, other busy processes and the latency of
# fdatasync on the temporary folder's file system.
machine_load() {
    "${bench_py[@]}" machine-load --out "$results/machine-load.jsonl" --label "$1" --ours $$ \
        --exclude "nexus_bench_$$"
    "${bench_py[@]}" fsync-latency --dir "$work" --count 500 --label "$1" --out "$results/fsync.jsonl"
}

# warm_up SERVER SCENARIO [NAME_SUFFIX]: a short chat run that is not
# measured, so that first-use costs (pool connections, first instances)
# fall outside the measured runs.
warm_up() {
    local server=$1 scenario=$2 suffix=${3:-}
    load_run "$scenario-warmup-$server$suffix" 120 "$server" --tag "scenario=$scenario" --tag role=warmup \
        -- chat --pairs 5 --rate 50 --duration 2 --drain 1
    settle "$server"
}

# ------------------------------------------------------------- chat

# Finds the highest rate whose delivery p99 stays within chat_max_p99_ms:
# a run at --rate 0 gives the saturated throughput T, then a bisection over
# (0, T) of chat_steps runs.
chat_search() {
    local server=$1 rep=$2 base="chat-$1-$2"
    local chat=(chat --pairs "$chat_pairs" --rotate "$chat_rotate" --drain "$chat_drain_s")
    local tags=(--tag scenario=chat --tag "rep=$rep")
    load_run "$base-probe" $((chat_probe_s + 240)) "$server" "${tags[@]}" --tag role=probe --tag rate=0 \
        -- "${chat[@]}" --rate 0 --in-flight 4 --duration "$chat_probe_s"
    settle "$server"
    local top
    top=$("${bench_py[@]}" value "$results/$base-probe.json" throughput.delivered_per_s)
    top=${top%%.*}
    if [[ -z $top || $top -lt 2 ]]; then
        log "chat $server run $rep: the saturation run delivered nothing; skipping the search"
        return 0
    fi
    local low=0 high=$top rate=$((top / 2)) step verdict
    for ((step = 1; step <= chat_steps; step++)); do
        ((rate < 1)) && rate=1
        load_run "$base-step$step" $((chat_step_s + 240)) "$server" "${tags[@]}" --tag role=step \
            --tag "rate=$rate" -- "${chat[@]}" --rate "$rate" --duration "$chat_step_s"
        verdict=$("${bench_py[@]}" judge "$results/$base-step$step.json" --rate "$rate" \
            --max-p99-ms "$chat_max_p99_ms")
        log "chat $server run $rep step $step: $rate messages/s: $verdict"
        if [[ $verdict == pass ]]; then
            low=$rate
        else
            high=$rate
        fi
        rate=$(((low + high) / 2))
        settle "$server"
    done
    log "chat $server run $rep: saturated at $top messages/s; highest rate within p99 $chat_max_p99_ms ms: $low"
}

scenario_chat() {
    log "scenario chat: throughput at p99 <= $chat_max_p99_ms ms, one instance each"
    wait_for_quiet
    machine_load "chat start"
    local nexus_db="nexus_bench_$$_chat_nexus" gateway_db="nexus_bench_$$_chat_gateway"
    create_database "$nexus_db"
    create_database "$gateway_db"
    start_redis chat-nexus
    local nexus_redis=$redis_pid
    start_nexus chat "$redis_port" "$nexus_db"
    local nexus_pid=$server_pid nexus_port=$server_port
    start_redis chat-gateway
    local gateway_redis=$redis_pid
    start_gateway chat "$redis_port" "$gateway_db"
    local gateway_pid=$server_pid gateway_port=$server_port
    register nexus native "$nexus_redis" "$nexus_db" "$nexus_port:$nexus_pid"
    register gateway socketio "$gateway_redis" "$gateway_db" "$gateway_port:$gateway_pid"

    warm_up nexus chat
    warm_up gateway chat
    local rep server
    for ((rep = 1; rep <= reps; rep++)); do
        for server in nexus gateway; do
            chat_search "$server" "$rep"
        done
    done

    # One more run per server at a fixed rate, with perf on the server.
    if [[ $perf_state == works ]]; then
        for server in nexus gateway; do
            load_run "chat-profile-$server" $((profile_s + 240)) "$server" --tag scenario=chat \
                --tag role=profile --tag "rate=$profile_rate" \
                --perf-pid "${pids_of[$server]%% *}" --perf-delay "$profile_delay_s" \
                --perf-seconds "$profile_record_s" \
                -- chat --pairs "$chat_pairs" --rotate "$chat_rotate" --drain "$chat_drain_s" \
                --rate "$profile_rate" --duration "$profile_s"
            settle "$server"
        done
    fi
    machine_load "chat end"
    stop_all "$nexus_pid" "$gateway_pid" "$nexus_redis" "$gateway_redis"
}

# ------------------------------------------------------------- commit

# Diagnostic: the same fixed rates on databases with synchronous_commit on
# (as everywhere else) and off, which shows what the commit's fsync adds to
# the latency of both servers. One run each.
scenario_commit() {
    log "scenario commit: rates $commit_rates with synchronous_commit on and off"
    wait_for_quiet
    machine_load "commit start"
    local mode rate server database
    for mode in on off; do
        local nexus_db="nexus_bench_$$_commit_${mode}_nexus" gateway_db="nexus_bench_$$_commit_${mode}_gateway"
        create_database "$nexus_db"
        create_database "$gateway_db"
        for database in "$nexus_db" "$gateway_db"; do
            PGOPTIONS="-c client_min_messages=warning" psql -X -q -v ON_ERROR_STOP=1 "$admin_url" \
                -c "ALTER DATABASE $database SET synchronous_commit = $mode" >/dev/null
        done
        start_redis "commit-$mode-nexus"
        local nexus_redis=$redis_pid
        start_nexus "commit-$mode" "$redis_port" "$nexus_db"
        local nexus_pid=$server_pid nexus_port=$server_port
        start_redis "commit-$mode-gateway"
        local gateway_redis=$redis_pid
        start_gateway "commit-$mode" "$redis_port" "$gateway_db"
        local gateway_pid=$server_pid gateway_port=$server_port
        register nexus native "$nexus_redis" "$nexus_db" "$nexus_port:$nexus_pid"
        register gateway socketio "$gateway_redis" "$gateway_db" "$gateway_port:$gateway_pid"
        warm_up nexus commit "-$mode"
        warm_up gateway commit "-$mode"
        for rate in $commit_rates; do
            for server in nexus gateway; do
                load_run "commit-$mode-$server-$rate" $((commit_s + 240)) "$server" --tag scenario=commit \
                    --tag role=measure --tag "commit=$mode" --tag "rate=$rate" \
                    -- chat --pairs "$chat_pairs" --rotate "$chat_rotate" --drain "$chat_drain_s" \
                    --rate "$rate" --duration "$commit_s"
                settle "$server"
            done
        done
        stop_all "$nexus_pid" "$gateway_pid" "$nexus_redis" "$gateway_redis"
    done
    machine_load "commit end"
}

# ------------------------------------------------------------- latency

scenario_latency() {
    log "scenario latency: $latency_rate messages/s across two instances of each server"
    wait_for_quiet
    machine_load "latency start"
    local nexus_db="nexus_bench_$$_latency_nexus" gateway_db="nexus_bench_$$_latency_gateway"
    create_database "$nexus_db"
    create_database "$gateway_db"
    local stop=() nexus_targets=() gateway_targets=() index
    start_redis latency-nexus
    local nexus_redis=$redis_pid nexus_redis_port=$redis_port
    start_redis latency-gateway
    local gateway_redis=$redis_pid gateway_redis_port=$redis_port
    stop+=("$nexus_redis" "$gateway_redis")
    for index in 1 2; do
        start_nexus "latency-$index" "$nexus_redis_port" "$nexus_db"
        nexus_targets+=("$server_port:$server_pid")
        stop=("$server_pid" "${stop[@]}")
        start_gateway "latency-$index" "$gateway_redis_port" "$gateway_db"
        gateway_targets+=("$server_port:$server_pid")
        stop=("$server_pid" "${stop[@]}")
    done
    register nexus native "$nexus_redis" "$nexus_db" "${nexus_targets[@]}"
    register gateway socketio "$gateway_redis" "$gateway_db" "${gateway_targets[@]}"

    warm_up nexus latency
    warm_up gateway latency
    local rep server
    for ((rep = 1; rep <= reps; rep++)); do
        for server in nexus gateway; do
            load_run "latency-$server-$rep" $((latency_s + 240)) "$server" --tag scenario=latency \
                --tag "rep=$rep" --tag role=measure --tag "rate=$latency_rate" \
                -- chat --pairs "$chat_pairs" --rotate "$chat_rotate" --drain "$chat_drain_s" \
                --rate "$latency_rate" --duration "$latency_s" --cross-instance
            settle "$server"
        done
    done
    machine_load "latency end"
    stop_all "${stop[@]}"
}

# ------------------------------------------------------------- connect

connect_run() {
    local name=$1 server=$2 count=$3
    shift 3
    load_run "$name" 400 "$server" --tag scenario=connect "$@" \
        -- connect --connections "$count" --concurrency "$connect_concurrency" --duration 120
    settle "$server"
}

scenario_connect() {
    log "scenario connect: storms of authenticated connects"
    wait_for_quiet
    machine_load "connect start"
    local stop=() name
    for name in nexus nexus-broadcast gateway; do
        create_database "nexus_bench_$$_connect_${name//-/_}"
        start_redis "connect-$name"
        local redis=$redis_pid
        stop+=("$redis")
        case "$name" in
            nexus) start_nexus connect "$redis_port" "nexus_bench_$$_connect_nexus" ;;
            nexus-broadcast)
                start_nexus connect-broadcast "$redis_port" "nexus_bench_$$_connect_nexus_broadcast" \
                    SPIN_VARIABLE_PRESENCE_REACH=broadcast
                ;;
            gateway) start_gateway connect "$redis_port" "nexus_bench_$$_connect_gateway" ;;
        esac
        stop=("$server_pid" "${stop[@]}")
        local protocol=native
        [[ $name == gateway ]] && protocol=socketio
        register "$name" "$protocol" "$redis" "nexus_bench_$$_connect_${name//-/_}" "$server_port:$server_pid"
    done

    for name in nexus nexus-broadcast gateway; do
        load_run "connect-warmup-$name" 400 "$name" --tag scenario=connect --tag role=warmup \
            -- connect --connections 200 --concurrency "$connect_concurrency" --duration 60
        settle "$name"
    done

    local rep server
    for ((rep = 1; rep <= reps; rep++)); do
        connect_run "connect-goal-nexus-$rep" nexus "$connect_goal_n" --tag "rep=$rep" --tag role=goal
        for server in nexus nexus-broadcast gateway; do
            connect_run "connect-compare-$server-$rep" "$server" "$connect_compare_n" \
                --tag "rep=$rep" --tag role=compare
        done
    done
    if [[ $perf_state == works ]]; then
        load_run connect-profile-nexus 400 nexus --tag scenario=connect --tag role=profile \
            --perf-pid "${pids_of[nexus]}" --perf-delay 0.5 --perf-seconds "$profile_record_s" \
            -- connect --connections "$connect_goal_n" --concurrency "$connect_concurrency" --duration 120
    fi
    machine_load "connect end"
    stop_all "${stop[@]}"
}

# ------------------------------------------------------------- idle

# idle_run NAME SERVER COUNT REP: opens COUNT connections and keeps them open.
idle_run() {
    local name=$1 server=$2 count=$3 rep=$4
    load_run "$name" $((idle_hold_s + 600)) "$server" --tag scenario=idle --tag role=measure --tag "rep=$rep" \
        --tag "connections=$count" --after-close 5 \
        -- idle --connections "$count" --duration "$idle_hold_s" --setup-timeout 300
}

scenario_idle() {
    log "scenario idle: $idle_nexus_n connections on one nexus-host, $idle_gateway_n on one gateway"
    wait_for_quiet
    machine_load "idle start"
    local nexus_db="nexus_bench_$$_idle_nexus" gateway_db="nexus_bench_$$_idle_gateway"
    create_database "$nexus_db"
    create_database "$gateway_db"
    start_redis idle-nexus
    local nexus_redis=$redis_pid nexus_redis_port=$redis_port
    start_redis idle-gateway
    local gateway_redis=$redis_pid gateway_redis_port=$redis_port
    local rep
    for ((rep = 1; rep <= reps; rep++)); do
        start_nexus "idle-$rep" "$nexus_redis_port" "$nexus_db"
        register nexus native "$nexus_redis" "$nexus_db" "$server_port:$server_pid"
        warm_up nexus idle "-$rep"
        idle_run "idle-nexus-$rep" nexus "$idle_nexus_n" "$rep"
        stop_pid "$server_pid"

        start_gateway "idle-$rep" "$gateway_redis_port" "$gateway_db"
        register gateway socketio "$gateway_redis" "$gateway_db" "$server_port:$server_pid"
        warm_up gateway idle "-$rep"
        idle_run "idle-gateway-$rep" gateway "$idle_gateway_n" "$rep"
        stop_pid "$server_pid"
    done
    machine_load "idle end"
    stop_all "$nexus_redis" "$gateway_redis"
}

# ------------------------------------------------------------- cluster

scenario_cluster() {
    log "scenario cluster: $cluster_n idle connections over $cluster_hosts nexus-host processes"
    wait_for_quiet
    machine_load "cluster start"
    local database="nexus_bench_$$_cluster"
    create_database "$database"
    start_redis cluster
    local redis=$redis_pid redis_port_cluster=$redis_port rep index
    for ((rep = 1; rep <= reps; rep++)); do
        local targets=() host_pids=()
        for ((index = 1; index <= cluster_hosts; index++)); do
            # Six pools of 4 stay well inside Postgres's max_connections of 100.
            start_nexus "cluster-$rep-$index" "$redis_port_cluster" "$database" POSTGRES_POOL_SIZE=4
            targets+=("$server_port:$server_pid")
            host_pids+=("$server_pid")
        done
        register cluster native "$redis" "$database" "${targets[@]}"
        warm_up cluster cluster "-$rep"
        load_run "cluster-$rep" 1200 cluster --tag scenario=cluster --tag role=measure --tag "rep=$rep" \
            --tag "connections=$cluster_n" --tag "hosts=$cluster_hosts" \
            -- idle --connections "$cluster_n" --duration "$idle_hold_s" --setup-timeout 600
        stop_all "${host_pids[@]}"
    done
    machine_load "cluster end"
    stop_pid "$redis"
}

# ------------------------------------------------------------- invoke

# Runs the host's micro-benchmark of one event on a fresh instance, without
# I/O, once per rep. RUST_BACKTRACE is cleared, as on a production host.
scenario_invoke() {
    log "scenario invoke: cargo bench -p nexus-host --bench invoke, $reps run(s)"
    local rep
    for ((rep = 1; rep <= reps; rep++)); do
        env -u RUST_BACKTRACE cargo bench -p nexus-host --bench invoke 2>"$results/invoke-$rep.log" \
            | tee "$results/invoke-$rep.txt" >&2
    done
}

# ------------------------------------------------------------- main

started=$(date +%s)
scenario_chat
scenario_commit
scenario_latency
scenario_connect
scenario_idle
scenario_cluster
scenario_invoke
log "all scenarios done in $(($(date +%s) - started)) s; writing $page"
mkdir -p "$(dirname "$page")"
python3 "$root/bench/report.py" --results "$results" --out "$page" \
    --elapsed "$(($(date +%s) - started))"
log "wrote $page"
