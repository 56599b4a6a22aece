#!/usr/bin/env bash
# The soak benchmark in one command (benches/README.md, "Soak"):
#   benches/soak.sh [--minutes N] [any other flag of benches/soak/main.rs]
# Builds release, copies the soak and the gearhouse binary into target/soak-results/<time>/ (so a
# rebuild during the run cannot swap them), runs the soak there and keeps its output (soak.log),
# the server's log and the build log. The exit status is the soak's: 0 pass, 1 fail (a job lost,
# no drain, the server died or grew), 2 could not start.
set -euo pipefail
cd "$(dirname "$0")/.."

target_dir=${CARGO_TARGET_DIR:-target}
out=${OUT:-$target_dir/soak-results/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$out"

echo "soak: building release (log: $out/build.log)" >&2
cargo bench --bench soak --no-run --message-format=json >"$out/build.json" 2>"$out/build.log" || {
    tail -n 30 "$out/build.log" >&2
    exit 2
}
exe=$(python3 -c '
import json, sys
for line in open(sys.argv[1]):
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "soak" and m.get("executable"):
        print(m["executable"])
' "$out/build.json")
[ -n "$exe" ] || { echo "soak: the build produced no soak executable (see $out/build.json)" >&2; exit 2; }
cp "$exe" "$out/soak"
cp "$target_dir/release/gearhouse" "$out/gearhouse"

{
    echo "soak: $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, $(uname -srm), $("$out/gearhouse" --version 2>/dev/null || echo gearhouse), $(memcached -V)"
    echo "soak: git $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src benches || echo ' (with local changes)')"
} | tee "$out/soak.log"
set +e
"$out/soak" --binary "$out/gearhouse" --log-dir "$out" "$@" 2>&1 | tee -a "$out/soak.log"
status=${PIPESTATUS[0]}
echo "soak: exit status $status; output in $out" >&2
exit "$status"
