#!/usr/bin/env bash
# Builds components with the `[component.NAME.build] command` lines of
# spin.toml, the same commands `spin build` runs, for machines without Spin.
#
#   deploy/build-components.sh            # every component
#   deploy/build-components.sh message    # only the named ones
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

# Prints "NAME<TAB>COMMAND" for each component of the manifest.
commands=$(python3 - "$root/spin.toml" <<'PY'
import sys, tomllib
with open(sys.argv[1], "rb") as manifest:
    components = tomllib.load(manifest).get("component", {})
for name, component in components.items():
    command = component.get("build", {}).get("command")
    if command:
        print(f"{name}\t{command}")
PY
)

wanted=("$@")
built=0
while IFS=$'\t' read -r name command; do
    if ((${#wanted[@]} > 0)) && [[ ! " ${wanted[*]} " == *" $name "* ]]; then
        continue
    fi
    echo "building component $name: $command" >&2
    bash -c "$command"
    built=$((built + 1))
done <<<"$commands"

if ((built == 0)); then
    echo "no component matched: ${wanted[*]}; the manifest has: $(cut -f1 <<<"$commands" | tr '\n' ' ')" >&2
    exit 1
fi
