# shellcheck shell=bash
# Functions that set up the Rust toolchain and build Nexus Chat. Source this
# file after services.sh; it defines functions and changes no shell option.
#
#   nexus_ensure_cargo          put ~/.cargo/bin on PATH if cargo is not found
#   nexus_ensure_wasm_target    rustup target add wasm32-wasip2 when missing
#   nexus_ensure_wasm_tools     cargo install wasm-tools --locked when missing
#   nexus_build_components      the three components, profile `component`
#   nexus_build_host            nexus-host in release
#   nexus_load_env_file FILE    KEY=VALUE lines; the environment wins

nexus_ensure_cargo() {
    if ! command -v cargo >/dev/null 2>&1 && [[ -x "$HOME/.cargo/bin/cargo" ]]; then
        PATH="$HOME/.cargo/bin:$PATH"
        export PATH
    fi
    if ! command -v cargo >/dev/null 2>&1; then
        nexus_error "cargo not found; install the Rust toolchain with rustup"
        return 1
    fi
}

nexus_ensure_wasm_target() {
    if ! command -v rustup >/dev/null 2>&1; then
        nexus_error "rustup not found; it is needed to add the wasm32-wasip2 target"
        return 1
    fi
    if rustup target list --installed | grep -qx wasm32-wasip2; then
        return 0
    fi
    nexus_log "adding the Rust target wasm32-wasip2"
    rustup target add wasm32-wasip2
}

nexus_ensure_wasm_tools() {
    command -v wasm-tools >/dev/null 2>&1 && return 0
    nexus_log "installing wasm-tools with cargo (takes a few minutes)"
    cargo install wasm-tools --locked
}

nexus_build_components() {
    nexus_log "building the components (wasm32-wasip2, profile component)"
    (cd "$NEXUS_REPO_ROOT" &&
        cargo build --target wasm32-wasip2 --profile component \
            -p nexus-auth -p nexus-message -p nexus-presence)
}

nexus_build_host() {
    # jemalloc, the host's allocator, is built from C source with make.
    local missing=()
    command -v cc >/dev/null 2>&1 || missing+=(gcc)
    command -v make >/dev/null 2>&1 || missing+=(make)
    if ((${#missing[@]} > 0)); then
        nexus_apt_install "${missing[@]}" || return 1
    fi
    nexus_log "building nexus-host (release)"
    (cd "$NEXUS_REPO_ROOT" && cargo build --release -p nexus-host)
}

# Exports the KEY=VALUE lines of a dotenv file, skipping blank lines and
# comments, removing one pair of surrounding quotes, and keeping variables
# that the environment already sets (as the host's dotenv loader does).
nexus_load_env_file() {
    local file=$1 line key value number=0
    [[ -f $file ]] || return 0
    while IFS= read -r line || [[ -n $line ]]; do
        number=$((number + 1))
        line=${line%$'\r'}
        [[ $line =~ ^[[:space:]]*(#|$) ]] && continue
        if [[ ! $line =~ ^[[:space:]]*(export[[:space:]]+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$ ]]; then
            nexus_log "ignoring line $number of $file: not KEY=VALUE"
            continue
        fi
        key=${BASH_REMATCH[2]}
        value=${BASH_REMATCH[3]}
        if [[ $value =~ ^\"(.*)\"[[:space:]]*$ || $value =~ ^\'(.*)\'[[:space:]]*$ ]]; then
            value=${BASH_REMATCH[1]}
        else
            value=${value%%[[:space:]]#*}
            value=${value%"${value##*[![:space:]]}"}
        fi
        [[ -n ${!key+set} ]] && continue
        export "$key=$value"
    done <"$file"
    nexus_log "loaded settings from $file"
}
