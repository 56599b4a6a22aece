#!/usr/bin/env bash
# A/B of HTTP vs Gearman foreground round trips for two gearhouse binaries, alternated on one
# machine, so a change's effect is not confused with the machine's drift between two runs of
# compare.sh. Each round starts a fresh server per binary and runs, side by side on it,
# JOBS (20,000) Gearman then JOBS HTTP foreground round trips (4 clients, 2 workers, 64-byte
# payloads). On a shared machine a round of 20,000 lasts about a second per side, short enough
# for the machine's own swings to decide a round; JOBS=60000 averages over more.
#
#   [JOBS=N] benches/ab-http.sh BEFORE_BINARY AFTER_BINARY [ROUNDS]   (default 6 rounds)
#
# The load generator is built here (`cargo bench --bench loadgen --no-run`). Prints one line
# per server: label, Gearman and HTTP round trips/s, and their ratio.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { sed -n 2,13p "$0"; exit 2; }
before=$(realpath "$1") after=$(realpath "$2") rounds=${3:-6} jobs=${JOBS:-20000}
lg=$(cargo bench --bench loadgen --no-run 2>&1 | sed -n 's/.*Executable .*(\(.*\)).*/\1/p' | tail -1)
[ -x "$lg" ] || { echo "cannot build the load generator" >&2; exit 2; }
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
run() { # binary label
    local p h sp g t
    p=$(port) h=$(port)
    "$1" serve --config config/default.toml --listen "127.0.0.1:$p" --http "127.0.0.1:$h" \
        --node-id ab --log-level warn >/dev/null 2>&1 &
    sp=$!
    until curl -fs "http://127.0.0.1:$h/readyz" >/dev/null 2>&1; do sleep 0.05; done
    args=(--port "$p" --server-pid "$sp" --threads 0 --jobs "$jobs" --payload 64 --clients 4 --workers 2 --pipeline 1)
    g=$("$lg" "${args[@]}" --label g --mode foreground | sed -n 's/.*rt_per_s=\([0-9]*\).*/\1/p')
    t=$("$lg" "${args[@]}" --label h --mode http-foreground --http-port "$h" | sed -n 's/.*rt_per_s=\([0-9]*\).*/\1/p')
    kill "$sp"; wait "$sp" || true
    python3 -c "import sys; g,t=int(sys.argv[2]),int(sys.argv[3]); print('%-10s gearman %6d  http %6d  ratio %.2f' % (sys.argv[1], g, t, t/g))" "$2" "$g" "$t"
}
for i in $(seq "$rounds"); do
    if [ $((i % 2)) = 1 ]; then run "$before" "before.$i"; run "$after" "after.$i"
    else run "$after" "after.$i"; run "$before" "before.$i"; fi
done
