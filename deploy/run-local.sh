#!/usr/bin/env bash
# Runs Nexus Chat on this machine: loads .env.local, makes sure the Rust
# target, Redis and Postgres are there, builds the components and the host,
# and runs nexus-host in the foreground.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: deploy/run-local.sh [--port N] [--instances N] [--no-build] [-- HOST_OPTIONS...]

  --port N        port of the first instance (default: PORT, else 3000)
  --instances N   run N instances on ports N, N+1, ... (default 1); they share
                  Redis and Postgres, as instances behind a load balancer do
  --no-build      skip building the components and the host
  HOST_OPTIONS    more nexus-host options, passed as they are, for example
                  -- --bind-address 127.0.0.1 (see target/release/nexus-host --help)

Settings come from the environment and from .env.local in the repository
(see deploy/env.example); the environment wins. JWT_SECRET is required.
Redis and Postgres are started here when their configured address is on
this machine and nothing answers there.
EOF
}

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source=deploy/lib/services.sh
source "$root/deploy/lib/services.sh"
# shellcheck source=deploy/lib/toolchain.sh
source "$root/deploy/lib/toolchain.sh"

port_arg=''
instances=1
build=1
host_args=()
while (($# > 0)); do
    case "$1" in
        --port)
            [[ $# -ge 2 ]] || { usage >&2; exit 2; }
            port_arg=$2
            shift 2
            ;;
        --port=*)
            port_arg=${1#--port=}
            shift
            ;;
        --instances)
            [[ $# -ge 2 ]] || { usage >&2; exit 2; }
            instances=$2
            shift 2
            ;;
        --instances=*)
            instances=${1#--instances=}
            shift
            ;;
        --no-build)
            build=0
            shift
            ;;
        -h | --help)
            usage
            exit 0
            ;;
        --)
            shift
            host_args=("$@")
            break
            ;;
        *)
            nexus_error "unknown option $1"
            usage >&2
            exit 2
            ;;
    esac
done

nexus_load_env_file "$root/.env.local"
port=${port_arg:-${PORT:-3000}}
if [[ ! $port =~ ^[0-9]+$ ]] || ((port < 1 || port > 65535)); then
    nexus_error "invalid port $port: expected a number from 1 to 65535"
    exit 2
fi
if [[ ! $instances =~ ^[0-9]+$ ]] || ((instances < 1 || port + instances - 1 > 65535)); then
    nexus_error "invalid instance count $instances"
    exit 2
fi
jwt_secret=${JWT_SECRET:-}
if ((${#jwt_secret} < 32)); then
    nexus_error "JWT_SECRET is missing or shorter than 32 characters; set it in .env.local, for example:"
    # shellcheck disable=SC2016 # the command is printed for the user to run.
    printf '  echo "JWT_SECRET=$(openssl rand -hex 32)" >> %s/.env.local\n' "$root" >&2
    exit 2
fi
export JWT_SECRET
export NODE_ENV=${NODE_ENV:-development}
export DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/nexus_chat}
export NEXUS_MANIFEST=${NEXUS_MANIFEST:-$root/spin.toml}

nexus_ensure_cargo
nexus_ensure_wasm_target
nexus_ensure_redis
nexus_ensure_postgres "$DATABASE_URL"
if ((build)); then
    nexus_build_components
    nexus_build_host
fi
binary="$root/target/release/nexus-host"
if [[ ! -x $binary ]]; then
    nexus_error "$binary not found; run without --no-build"
    exit 1
fi

if ((instances == 1)); then
    nexus_log "starting nexus-host on port $port"
    exec "$binary" --port "$port" --manifest "$NEXUS_MANIFEST" "${host_args[@]}" serve
fi

# Several instances: each gets its own port and instance id, and its output
# lines are prefixed with its port. Ctrl-C or SIGTERM stops them all, and so
# does the exit of any one.
pids=()
stop_all() {
    trap - INT TERM
    if ((${#pids[@]} > 0)); then
        kill -TERM "${pids[@]}" 2>/dev/null || true
        wait "${pids[@]}" 2>/dev/null || true
    fi
}
trap 'stop_all; exit 130' INT
trap 'stop_all; exit 143' TERM

for ((index = 0; index < instances; index++)); do
    instance_port=$((port + index))
    nexus_log "starting nexus-host on port $instance_port"
    PORT=$instance_port NEXUS_INSTANCE_ID="${NEXUS_INSTANCE_ID:-local}-$instance_port" \
        "$binary" --port "$instance_port" --manifest "$NEXUS_MANIFEST" "${host_args[@]}" serve \
        > >(sed -u "s/^/[$instance_port] /") 2>&1 &
    pids+=("$!")
done

status=0
wait -n "${pids[@]}" || status=$?
nexus_log "an instance exited with status $status; stopping the others"
stop_all
exit "$status"
