#!/usr/bin/env bash
# Runs the Nexus Chat integration tests. It makes sure the toolchain,
# wasm-tools, redis-server and Postgres are there and builds the components
# and the host once in release. Then it runs `cargo test --release` for the
# integration tests (nexus-tests), the host's unit tests (nexus-host), the
# load generator's small runs (nexus-load), which all reuse that build, and
# the unit tests of the components' shared library (nexus-guest), built
# natively.
#
# Arguments are passed to the test binaries, for example a name filter:
#   tests/run.sh typing
#
# Environment:
#   NEXUS_TEST_DATABASE_URL  admin connection that may create databases
#                            (default postgres://postgres@127.0.0.1:5432/postgres)
#   NEXUS_TEST_THREADS       tests run at once (default 2). A test starts up
#                            to three hosts, and more threads starve them on
#                            2 cores.
#   NEXUS_TEST_TIMEOUT_S     bound on the whole cargo test run (default 2700)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source=deploy/lib/services.sh
source "$root/deploy/lib/services.sh"
# shellcheck source=deploy/lib/toolchain.sh
source "$root/deploy/lib/toolchain.sh"

nexus_ensure_cargo
nexus_ensure_wasm_target
nexus_ensure_wasm_tools
# Tests start private redis-server processes; they need the program only.
nexus_ensure_redis_binary
export NEXUS_TEST_DATABASE_URL=${NEXUS_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
nexus_ensure_postgres "$NEXUS_TEST_DATABASE_URL"

# One build at a time: the machine has 2 cores.
nexus_build_components
nexus_build_host
export NEXUS_HOST_BIN=${NEXUS_HOST_BIN:-$root/target/release/nexus-host}

threads=${NEXUS_TEST_THREADS:-2}
# Test failures explain themselves in their panic messages and host logs;
# backtraces of the harness would bury those.
export RUST_BACKTRACE=${NEXUS_TEST_BACKTRACE:-0}
nexus_log "running the integration tests with $threads test threads"
# timeout(1) signals its whole process group when the bound passes, so the
# hosts and Redis servers of the running tests stop too.
timeout --kill-after=30 "${NEXUS_TEST_TIMEOUT_S:-2700}" \
    cargo test --release --no-fail-fast -p nexus-tests -p nexus-host -p nexus-load -p nexus-guest -- --test-threads="$threads" "$@"
