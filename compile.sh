#!/usr/bin/env bash
# Builds the single-file pg-tide executables into dist/: bun build --compile for every target,
# SHA-256 sums next to them, and a deno compile build when DENORT_BIN points at a denort binary.
# The schema SQL is embedded (imported as text); embedded-postgres (pg-tide dev) is not.
#   ./compile.sh                 all targets
#   ./compile.sh linux-x64       only the targets named
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

bun="./node_modules/.bin/bun"
deno="./node_modules/.bin/deno"
all_targets=(linux-x64 linux-arm64 darwin-x64 darwin-arm64 windows-x64)
targets=("${@:-${all_targets[@]}}")
version="$(node -p 'require("./package.json").version')"
mkdir -p dist

for target in "${targets[@]}"; do
  case " ${all_targets[*]} " in *" $target "*) ;; *) echo "unknown target: $target (known: ${all_targets[*]})" >&2; exit 2 ;; esac
  out="dist/pg-tide-$target"
  [ "$target" = windows-x64 ] && out="$out.exe"
  echo "building $out"
  # embedded-postgres is only for `pg-tide dev` from a checkout; the binary says so if asked.
  "$bun" build main.ts --compile --minify --sourcemap=none --target="bun-$target" \
    --external embedded-postgres --outfile "$out" >/dev/null
done

if [ -n "${DENORT_BIN:-}" ]; then
  echo "building dist/pg-tide-deno-linux-x64 with deno compile"
  DENORT_BIN="$DENORT_BIN" "$deno" compile -A --no-check --include sql --output dist/pg-tide-deno-linux-x64 main.ts
else
  echo "skipping deno compile: set DENORT_BIN to a denort binary to build it (it cannot be downloaded here)"
fi

(cd dist && sha256sum pg-tide-* | grep -v '\.sha256$' > SHA256SUMS)
echo "pg-tide $version: $(wc -l < dist/SHA256SUMS) binaries, sums in dist/SHA256SUMS"
