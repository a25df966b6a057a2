# shellcheck shell=bash
# Functions that make Redis and Postgres reachable for Nexus Chat. Source
# this file: it defines functions and variables and changes no shell option.
#
#   nexus_ensure_redis           Redis at REDIS_URL, or REDIS_HOST:REDIS_PORT
#                                (default 127.0.0.1:6379)
#   nexus_ensure_postgres [URL]  Postgres at URL (default DATABASE_URL, then
#                                postgres://postgres@127.0.0.1:5432/nexus_chat),
#                                with its database created if missing
#   nexus_ensure_redis_binary    only install redis-server
#   nexus_ensure_postgres_client only install psql
#
# A service that is not reachable is started here only when its address is
# on this machine (127.0.0.1, localhost or ::1). Missing programs come from
# Debian's packages redis-server, postgresql and postgresql-client. Servers
# started here keep their data and logs under NEXUS_STATE_DIR (default
# target/local-services in the repository) and keep running after the
# calling script ends.
#
# NOTE: user names and passwords in URLs are used as written; percent-encoded
# characters are not decoded.

NEXUS_REPO_ROOT="${NEXUS_REPO_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
NEXUS_STATE_DIR="${NEXUS_STATE_DIR:-$NEXUS_REPO_ROOT/target/local-services}"

nexus_log() {
    printf 'nexus: %s\n' "$*" >&2
}

# Prints an error message; the caller returns 1 after it.
nexus_error() {
    printf 'nexus: error: %s\n' "$*" >&2
}

nexus_is_loopback() {
    case "$1" in
        127.* | localhost | ::1 | '[::1]') return 0 ;;
        *) return 1 ;;
    esac
}

# Strips the brackets of an IPv6 literal such as [::1].
nexus_bare_host() {
    local host=${1#[}
    printf '%s\n' "${host%]}"
}

# Runs a command as root: directly when already root, else through sudo.
nexus_as_root() {
    if [[ $(id -u) -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        nexus_error "root is needed to run: $*"
        return 1
    fi
}

# Installs Debian packages. `apt-get update` runs once per process tree:
# NEXUS_APT_UPDATED=1 records that it ran.
nexus_apt_install() {
    if ! command -v apt-get >/dev/null 2>&1; then
        nexus_error "apt-get not found; install these packages by hand: $*"
        return 1
    fi
    if [[ "${NEXUS_APT_UPDATED:-0}" != 1 ]]; then
        nexus_log "running apt-get update"
        nexus_as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q || return 1
        export NEXUS_APT_UPDATED=1
    fi
    nexus_log "installing Debian packages: $*"
    nexus_as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "$@"
}

# Returns 0 when a TCP connection to HOST PORT opens within 2 seconds.
nexus_tcp_open() {
    # shellcheck disable=SC2016 # $1 and $2 expand in the inner shell.
    timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$(nexus_bare_host "$1")" "$2" 2>/dev/null
}

# ---------------------------------------------------------------- Redis

# Sets NEXUS_REDIS_HOST, NEXUS_REDIS_PORT and NEXUS_REDIS_PASSWORD from
# REDIS_URL (redis://[user[:password]@]host[:port][/db]) when it is set,
# else from REDIS_HOST, REDIS_PORT and REDIS_PASSWORD.
nexus_redis_address() {
    NEXUS_REDIS_HOST=${REDIS_HOST:-127.0.0.1}
    NEXUS_REDIS_PORT=${REDIS_PORT:-6379}
    NEXUS_REDIS_PASSWORD=${REDIS_PASSWORD:-}
    [[ -n "${REDIS_URL:-}" ]] || return 0

    local rest=${REDIS_URL#*://} userinfo='' hostport
    rest=${rest%%/*}
    if [[ $rest == *@* ]]; then
        userinfo=${rest%@*}
        rest=${rest##*@}
    fi
    hostport=$rest
    if [[ $hostport == \[*\]* ]]; then
        NEXUS_REDIS_HOST=${hostport%%]*}]
        hostport=${hostport#*]}
        NEXUS_REDIS_PORT=${hostport#:}
    elif [[ $hostport == *:* ]]; then
        NEXUS_REDIS_HOST=${hostport%%:*}
        NEXUS_REDIS_PORT=${hostport#*:}
    else
        NEXUS_REDIS_HOST=$hostport
        NEXUS_REDIS_PORT=''
    fi
    NEXUS_REDIS_HOST=${NEXUS_REDIS_HOST:-127.0.0.1}
    NEXUS_REDIS_PORT=${NEXUS_REDIS_PORT:-6379}
    if [[ $userinfo == *:* ]]; then
        NEXUS_REDIS_PASSWORD=${userinfo#*:}
    else
        NEXUS_REDIS_PASSWORD=''
    fi
}

# Returns 0 when a Redis server replies to PING at HOST PORT within 2 seconds.
# A server that requires a password (NOAUTH) counts as reachable.
nexus_redis_reachable() {
    # shellcheck disable=SC2016 # $1 and $2 expand in the inner shell.
    timeout 2 bash -c '
        exec 3<>"/dev/tcp/$1/$2" || exit 1
        printf "PING\r\n" >&3
        IFS= read -r reply <&3 || exit 1
        [[ $reply == +PONG* || $reply == -NOAUTH* ]]
    ' _ "$(nexus_bare_host "$1")" "$2" 2>/dev/null
}

nexus_ensure_redis_binary() {
    command -v redis-server >/dev/null 2>&1 && return 0
    nexus_apt_install redis-server || return 1
    if ! command -v redis-server >/dev/null 2>&1; then
        nexus_error "redis-server is still not found after installing the package"
        return 1
    fi
}

nexus_ensure_redis() {
    nexus_redis_address
    local host=$NEXUS_REDIS_HOST port=$NEXUS_REDIS_PORT
    if nexus_redis_reachable "$host" "$port"; then
        nexus_log "Redis is reachable at $host:$port"
        return 0
    fi
    if ! nexus_is_loopback "$host"; then
        nexus_error "Redis at $host:$port is not reachable, and it is not on this machine"
        return 1
    fi

    nexus_ensure_redis_binary || return 1
    # Installing the package may have started Debian's own server.
    if nexus_redis_reachable "$host" "$port"; then
        nexus_log "Redis is reachable at $host:$port"
        return 0
    fi

    local dir="$NEXUS_STATE_DIR/redis-$port" bind
    bind=$(nexus_bare_host "$host")
    [[ $bind == localhost ]] && bind=127.0.0.1
    mkdir -p "$dir"
    local args=(--daemonize yes --bind "$bind" --port "$port"
        --save '' --appendonly no --dir "$dir"
        --logfile "$dir/redis.log" --pidfile "$dir/redis.pid")
    [[ -n $NEXUS_REDIS_PASSWORD ]] && args+=(--requirepass "$NEXUS_REDIS_PASSWORD")
    nexus_log "starting redis-server on $bind:$port (log: $dir/redis.log)"
    if ! redis-server "${args[@]}"; then
        nexus_error "redis-server failed to start; see $dir/redis.log"
        return 1
    fi

    local tries=0
    until nexus_redis_reachable "$host" "$port"; do
        if ((tries >= 100)); then
            nexus_error "redis-server on $host:$port did not reply to PING within 10 s; see $dir/redis.log"
            return 1
        fi
        sleep 0.1
        tries=$((tries + 1))
    done
    nexus_log "Redis is reachable at $host:$port"
}

# ---------------------------------------------------------------- Postgres

# Sets NEXUS_PG_USER, NEXUS_PG_PASSWORD, NEXUS_PG_HOST, NEXUS_PG_PORT and
# NEXUS_PG_DB from postgres://[user[:password]@]host[:port][/db][?params].
# As in libpq, the database defaults to the user name.
nexus_postgres_address() {
    local url=$1
    local rest=${url#*://} userinfo='' hostport path=''

    rest=${rest%%\?*}
    if [[ $rest == */* ]]; then
        path=${rest#*/}
        rest=${rest%%/*}
    fi
    if [[ $rest == *@* ]]; then
        userinfo=${rest%@*}
        hostport=${rest##*@}
    else
        hostport=$rest
    fi

    NEXUS_PG_USER=${userinfo%%:*}
    NEXUS_PG_USER=${NEXUS_PG_USER:-postgres}
    if [[ $userinfo == *:* ]]; then
        NEXUS_PG_PASSWORD=${userinfo#*:}
    else
        NEXUS_PG_PASSWORD=''
    fi

    if [[ $hostport == \[*\]* ]]; then
        NEXUS_PG_HOST=${hostport%%]*}]
        hostport=${hostport#*]}
        NEXUS_PG_PORT=${hostport#:}
    elif [[ $hostport == *:* ]]; then
        NEXUS_PG_HOST=${hostport%%:*}
        NEXUS_PG_PORT=${hostport#*:}
    else
        NEXUS_PG_HOST=$hostport
        NEXUS_PG_PORT=''
    fi
    NEXUS_PG_HOST=${NEXUS_PG_HOST:-127.0.0.1}
    NEXUS_PG_PORT=${NEXUS_PG_PORT:-5432}
    NEXUS_PG_DB=${path:-$NEXUS_PG_USER}
}

nexus_ensure_postgres_client() {
    command -v psql >/dev/null 2>&1 && return 0
    nexus_apt_install postgresql-client || return 1
    if ! command -v psql >/dev/null 2>&1; then
        nexus_error "psql is still not found after installing postgresql-client"
        return 1
    fi
}

# Runs psql over TCP against the parsed address with the URL's credentials.
nexus_psql() {
    PGPASSWORD=$NEXUS_PG_PASSWORD PGCONNECT_TIMEOUT=5 psql -X -q -v ON_ERROR_STOP=1 \
        -h "$(nexus_bare_host "$NEXUS_PG_HOST")" -p "$NEXUS_PG_PORT" -U "$NEXUS_PG_USER" "$@"
}

# Prints the folder of the Postgres server programs (initdb, pg_ctl), or
# nothing when they are not installed.
nexus_postgres_bindir() {
    local dir
    if command -v pg_config >/dev/null 2>&1; then
        dir=$(pg_config --bindir 2>/dev/null || true)
        if [[ -n $dir && -x $dir/pg_ctl && -x $dir/initdb ]]; then
            printf '%s\n' "$dir"
            return 0
        fi
    fi
    local candidates=(/usr/lib/postgresql/*/bin)
    while IFS= read -r dir; do
        if [[ -x $dir/pg_ctl && -x $dir/initdb ]]; then
            printf '%s\n' "$dir"
            return 0
        fi
    done < <(printf '%s\n' "${candidates[@]}" | sort -V -r)
}

# Runs a command as the owner of a cluster that this file creates: the
# `postgres` user when running as root (initdb refuses to run as root),
# else the current user.
nexus_as_postgres_owner() {
    if [[ $(id -u) -eq 0 ]]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

# Starts Postgres on the parsed loopback port: Debian's cluster on that port
# if there is one (pg_ctlcluster), else a cluster of our own under
# NEXUS_STATE_DIR (initdb and pg_ctl) that trusts loopback connections.
nexus_start_postgres() {
    local port=$NEXUS_PG_PORT version cluster cluster_port
    if command -v pg_lsclusters >/dev/null 2>&1 && command -v pg_ctlcluster >/dev/null 2>&1; then
        while read -r version cluster cluster_port _; do
            [[ $cluster_port == "$port" ]] || continue
            nexus_log "starting Debian's Postgres cluster $version/$cluster on port $port"
            nexus_as_root pg_ctlcluster --skip-systemctl-redirect "$version" "$cluster" start || return 1
            NEXUS_PG_SOCKET_DIR=/var/run/postgresql
            return 0
        done < <(pg_lsclusters --no-header 2>/dev/null)
    fi

    local bindir
    bindir=$(nexus_postgres_bindir)
    if [[ -z $bindir ]]; then
        nexus_error "the Postgres server programs (initdb, pg_ctl) are not installed"
        return 1
    fi
    local dir="$NEXUS_STATE_DIR/postgres-$port" listen
    listen=$(nexus_bare_host "$NEXUS_PG_HOST")
    [[ $listen == localhost ]] && listen=127.0.0.1
    if [[ $(id -u) -eq 0 ]] && ! id postgres >/dev/null 2>&1; then
        useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres || return 1
    fi
    mkdir -p "$dir"
    if [[ $(id -u) -eq 0 ]]; then
        chown postgres: "$dir"
    fi
    chmod 700 "$dir"
    if [[ ! -f $dir/PG_VERSION ]]; then
        nexus_log "creating a Postgres cluster in $dir that trusts loopback connections"
        if ! nexus_as_postgres_owner "$bindir/initdb" -D "$dir" -U postgres \
            --auth-local=trust --auth-host=trust >"$NEXUS_STATE_DIR/initdb-$port.log" 2>&1; then
            nexus_error "initdb failed; see $NEXUS_STATE_DIR/initdb-$port.log"
            return 1
        fi
    fi
    nexus_log "starting Postgres on $listen:$port (log: $dir/server.log)"
    if ! nexus_as_postgres_owner "$bindir/pg_ctl" -D "$dir" -l "$dir/server.log" -w -t 30 \
        -o "-p $port -k $dir -c listen_addresses=$listen" start >/dev/null; then
        nexus_error "pg_ctl start failed; see $dir/server.log"
        return 1
    fi
    NEXUS_PG_SOCKET_DIR=$dir
}

# Makes a cluster that this file installed or started accept the URL's
# user: creates the role if missing and sets its password, and for a URL
# without a password trusts that user on loopback. Connects as the cluster
# owner over the local socket, which Debian's clusters and ours allow.
nexus_grant_postgres_access() {
    local socket_dir=${NEXUS_PG_SOCKET_DIR:-/var/run/postgresql}
    local admin=(nexus_as_postgres_owner psql -X -q -v ON_ERROR_STOP=1
        -h "$socket_dir" -p "$NEXUS_PG_PORT" -U postgres -d postgres)
    local role=${NEXUS_PG_USER//\"/\"\"} literal=${NEXUS_PG_USER//\'/\'\'} exists
    exists=$("${admin[@]}" -tAc "SELECT 1 FROM pg_roles WHERE rolname = '$literal'") || return 1
    if [[ $exists != 1 ]]; then
        nexus_log "creating Postgres role $NEXUS_PG_USER"
        "${admin[@]}" -c "CREATE ROLE \"$role\" LOGIN CREATEDB" || return 1
    fi
    if [[ -n $NEXUS_PG_PASSWORD ]]; then
        "${admin[@]}" -c "ALTER ROLE \"$role\" LOGIN PASSWORD '${NEXUS_PG_PASSWORD//\'/\'\'}'" >/dev/null || return 1
        return 0
    fi
    nexus_psql -d postgres -tAc 'SELECT 1' >/dev/null 2>&1 && return 0

    local hba tmp
    hba=$("${admin[@]}" -tAc 'SHOW hba_file') || return 1
    nexus_log "trusting loopback connections of Postgres role $NEXUS_PG_USER in $hba"
    tmp=$(mktemp)
    {
        printf 'host all %s 127.0.0.1/32 trust\n' "$NEXUS_PG_USER"
        printf 'host all %s ::1/128 trust\n' "$NEXUS_PG_USER"
        nexus_as_root cat "$hba"
    } >"$tmp" || return 1
    nexus_as_root cp "$tmp" "$hba" || return 1
    rm -f "$tmp"
    "${admin[@]}" -c 'SELECT pg_reload_conf()' >/dev/null
}

nexus_ensure_postgres() {
    nexus_postgres_address "${1:-${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/nexus_chat}}"
    local host=$NEXUS_PG_HOST port=$NEXUS_PG_PORT managed=0
    nexus_ensure_postgres_client || return 1

    if ! nexus_tcp_open "$host" "$port"; then
        if ! nexus_is_loopback "$host"; then
            nexus_error "Postgres at $host:$port is not reachable, and it is not on this machine"
            return 1
        fi
        if [[ -z $(nexus_postgres_bindir) ]]; then
            nexus_apt_install postgresql || return 1
        fi
        managed=1
        # Installing the package may have started Debian's cluster already.
        if ! nexus_tcp_open "$host" "$port"; then
            nexus_start_postgres || return 1
        fi
        local tries=0
        until nexus_tcp_open "$host" "$port"; do
            if ((tries >= 300)); then
                nexus_error "Postgres on $host:$port did not accept connections within 30 s"
                return 1
            fi
            sleep 0.1
            tries=$((tries + 1))
        done
    fi

    if ! nexus_psql -d postgres -tAc 'SELECT 1' >/dev/null 2>&1 && [[ $managed == 1 ]]; then
        nexus_grant_postgres_access || return 1
    fi
    local error
    if ! error=$(nexus_psql -d postgres -tAc 'SELECT 1' 2>&1 >/dev/null); then
        nexus_error "Postgres at $host:$port rejects role $NEXUS_PG_USER: $error"
        return 1
    fi

    local exists
    exists=$(nexus_psql -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '${NEXUS_PG_DB//\'/\'\'}'") || return 1
    if [[ $exists != 1 ]]; then
        nexus_log "creating database $NEXUS_PG_DB"
        nexus_psql -d postgres -c "CREATE DATABASE \"${NEXUS_PG_DB//\"/\"\"}\"" || return 1
    fi
    nexus_log "Postgres is reachable at $host:$port, database $NEXUS_PG_DB"
}
