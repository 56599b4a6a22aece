#!/usr/bin/env bash
# Runs the same loadgen scenarios against gearhouse and (when installed) gearmand 1.1.20, side by
# side, and prints one table: scenario, gearhouse, gearmand, ratio, target.
#
#   benches/compare.sh                  # issue 2 scenarios, main ones repeated RUNS times
#   QUICK=1 benches/compare.sh          # scaled-down job counts, one run
#   benches/compare.sh --persistence    # + gearhouse/memcached (3 nodes, replicas=2) vs gearmand -q libmemcached
#   benches/compare.sh --tracing        # + gearhouse untraced vs default traces vs every job traced
#   benches/compare.sh --http           # + HTTP job submission vs the Gearman protocol, same server
#   benches/compare.sh --tls            # + TLS vs plain Gearman listener, same server
#   benches/compare.sh --all            # everything
#
# Environment: QUICK=1, RUNS (default 3), BG_JOBS, FG_JOBS, SUBMIT_JOBS, SEGMENT, LG_THREADS
# (load generator runtime threads, 0 = single-threaded, the default), HTTP_SUBMIT_JOBS (--http's
# background submits per protocol), HTTP_FG_JOBS (--http's foreground round trips per protocol), GH_ENV (extra VAR=value settings for every gearhouse
# started, e.g. "TOKIO_WORKER_THREADS=1"), OUT (results directory). `--only-extra` skips the
# main scenarios. Every server is started fresh for every scenario run (--http, --tls: for every run
# of their side-by-side), on free loopback ports, and stopped after.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

PERSIST=${PERSIST:-0}
TRACING=${TRACING:-0}
HTTP=${HTTP:-0}
TLS=${TLS:-0}
MAIN=1
for a in "$@"; do
    case "$a" in
        --quick) QUICK=1 ;;
        --persistence) PERSIST=1 ;;
        --tracing) TRACING=1 ;;
        --http) HTTP=1 ;;
        --tls) TLS=1 ;;
        --all) PERSIST=1 TRACING=1 HTTP=1 TLS=1 ;;
        --only-extra) MAIN=0 ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "unknown argument: $a" >&2; exit 2 ;;
    esac
done
QUICK=${QUICK:-0}
if [ "$QUICK" = 1 ]; then
    RUNS=${RUNS:-1}; BG_JOBS=${BG_JOBS:-20000}; FG_JOBS=${FG_JOBS:-5000}
    SUBMIT_JOBS=${SUBMIT_JOBS:-200000}; SEGMENT=${SEGMENT:-20000}; HTTP_SUBMIT_JOBS=${HTTP_SUBMIT_JOBS:-20000}
    HTTP_FG_JOBS=${HTTP_FG_JOBS:-5000}
else
    RUNS=${RUNS:-3}; BG_JOBS=${BG_JOBS:-100000}; FG_JOBS=${FG_JOBS:-20000}
    SUBMIT_JOBS=${SUBMIT_JOBS:-1000000}; SEGMENT=${SEGMENT:-100000}; HTTP_SUBMIT_JOBS=${HTTP_SUBMIT_JOBS:-50000}
    # 60,000: a side of 20,000 round trips lasts about a second here, short enough for the
    # machine's own swings to decide the ratio (benches/README.md, HTTP).
    HTTP_FG_JOBS=${HTTP_FG_JOBS:-60000}
fi
LG_THREADS=${LG_THREADS:-0}
GH_ENV=${GH_ENV:-}
OUT=${OUT:-$ROOT/target/bench-results/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT" "$ROOT/target/bench-results"
# Two comparisons at once would measure each other: take turns.
exec 9>"$ROOT/target/bench-results/.lock"
if ! flock -n 9; then
    echo "== another benches/compare.sh is running; waiting for it to finish" >&2
    flock 9
fi
# gearmand and memcached refuse to run as root without a user to switch to.
AS_USER=()
MC_USER=()
if [ "$(id -u)" = 0 ]; then AS_USER=(-u root); MC_USER=(-u nobody); fi
GEARMAND=${GEARMAND:-/usr/sbin/gearmand}
[ -x "$GEARMAND" ] || GEARMAND=$(command -v gearmand || true)

log() { echo "== $*" >&2; }

log "building (release)"
if ! cargo build --release --bin gearhouse >"$OUT/build.log" 2>&1 ||
    ! cargo bench --bench loadgen --no-run >>"$OUT/build.log" 2>&1; then
    echo "build failed:" >&2; tail -30 "$OUT/build.log" >&2; exit 1
fi
LOADGEN=$(sed -n 's/.*Executable .*(\(.*\)).*/\1/p' "$OUT/build.log" | tail -1)
[ -x "$LOADGEN" ] || LOADGEN=$ROOT/$LOADGEN
[ -x "$LOADGEN" ] || { echo "cannot find the loadgen executable" >&2; exit 1; }
# Copies, so a rebuild by someone else during the run cannot swap binaries under us.
cp "${CARGO_TARGET_DIR:-target}/release/gearhouse" "$OUT/gearhouse"
cp "$LOADGEN" "$OUT/loadgen"
GH_BIN=$OUT/gearhouse
LG=$OUT/loadgen

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

wait_port() { # port deadline_s
    local end=$((SECONDS + ${2:-30}))
    while ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; do
        [ $SECONDS -lt $end ] || return 1
        sleep 0.05
    done
}

PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

stop_pid() {
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

SRV_PID= SRV_PORT=
# start_gearhouse NAME [flags...]; env from GH_ENV and START_ENV
start_gearhouse() {
    local name=$1; shift
    SRV_PORT=$(free_port); local http; http=$(free_port)
    env $GH_ENV ${START_ENV:-} "$GH_BIN" serve --config "$ROOT/config/default.toml" \
        --listen "127.0.0.1:$SRV_PORT" --http "127.0.0.1:$http" --node-id bench --log-level warn "$@" \
        >"$OUT/$name.server.log" 2>&1 9>&- &
    SRV_PID=$!; PIDS+=("$SRV_PID")
    local end=$((SECONDS + 60))
    until curl -fs "http://127.0.0.1:$http/readyz" >/dev/null 2>&1; do
        if ! kill -0 "$SRV_PID" 2>/dev/null || [ $SECONDS -ge $end ]; then
            echo "gearhouse did not become ready; log:" >&2; tail -20 "$OUT/$name.server.log" >&2
            return 1
        fi
        sleep 0.05
    done
    SRV_HTTP=$http
}

start_gearmand() {
    local name=$1; shift
    SRV_PORT=$(free_port)
    "$GEARMAND" -p "$SRV_PORT" -L 127.0.0.1 --threads 2 ${AS_USER[@]+"${AS_USER[@]}"} -l "$OUT/$name.gearmand.log" \
        -P "$OUT/$name.gearmand.pid" "$@" >"$OUT/$name.server.log" 2>&1 9>&- &
    SRV_PID=$!; PIDS+=("$SRV_PID")
    wait_port "$SRV_PORT" 30 || { echo "gearmand did not start:" >&2; cat "$OUT/$name.server.log" >&2; return 1; }
}

# run_lg NAME loadgen-args... -> RESULT line saved to $OUT/NAME.txt
run_lg() {
    local name=$1; shift
    "$LG" --port "$SRV_PORT" --server-pid "$SRV_PID" --threads "$LG_THREADS" --label "$name" "$@" \
        >"$OUT/$name.txt" 2>&1 || true
    cat "$OUT/$name.txt" | grep -v '^RESULT' | sed "s/^/   [$name] /" >&2
}

field() { # file key
    grep '^RESULT' "$1" 2>/dev/null | tr ' ' '\n' | sed -n "s/^$2=//p" | head -1
}

# One scenario on one server: start it fresh (with the extra server flags in SERVER_ARGS and
# the extra environment in START_ENV), run the load generator, stop it.
SERVER_ARGS=()
scenario() { # server(gh|gm) name loadgen-args...
    local srv=$1 name=$2; shift 2
    if [ "$srv" = gh ]; then
        start_gearhouse "$name" ${SERVER_ARGS[@]+"${SERVER_ARGS[@]}"}
    else
        start_gearmand "$name" ${SERVER_ARGS[@]+"${SERVER_ARGS[@]}"}
    fi
    run_lg "$name" "$@"
    stop_pid "$SRV_PID"
}

ROWS=() NOTES=()
row() { ROWS+=("$(printf '%s\t%s\t%s\t%s\t%s' "$1" "$2" "$3" "$4" "$5")"); }
ratio() { # a b -> a/b
    python3 -c "import sys
a,b=sys.argv[1],sys.argv[2]
try: print('%.2fx' % (float(a)/float(b)))
except Exception: print('-')" "${1:-}" "${2:-}"
}
median() { python3 -c "import sys,statistics as s; v=[float(x) for x in sys.argv[1:] if x not in ('','NA')]; print(('%.3f' % s.median(v)).rstrip('0').rstrip('.') if v else '')" "$@"; }
mib() { python3 -c "import sys; print('%.1f' % (int(sys.argv[1])/1024) if sys.argv[1].isdigit() else 'NA')" "${1:-NA}"; }

HAVE_GM=0
[ -n "$GEARMAND" ] && [ -x "$GEARMAND" ] && HAVE_GM=1
[ $HAVE_GM = 1 ] || log "gearmand not installed: gearhouse figures only"

echo "# $(date -u '+%Y-%m-%d %H:%M UTC') $(uname -r), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)" >"$OUT/env.txt"
echo "# gearhouse $("$GH_BIN" --version 2>&1), $([ $HAVE_GM = 1 ] && "$GEARMAND" --version 2>&1 | grep -m1 gearmand)" >>"$OUT/env.txt"
echo "# QUICK=$QUICK RUNS=$RUNS BG_JOBS=$BG_JOBS FG_JOBS=$FG_JOBS SUBMIT_JOBS=$SUBMIT_JOBS HTTP_SUBMIT_JOBS=$HTTP_SUBMIT_JOBS HTTP_FG_JOBS=$HTTP_FG_JOBS LG_THREADS=$LG_THREADS GH_ENV=$GH_ENV" >>"$OUT/env.txt"

BG_ARGS=(--mode background --jobs "$BG_JOBS" --payload 64 --clients 2 --workers 2 --pipeline 100)
FG_ARGS=(--mode foreground --jobs "$FG_JOBS" --payload 64 --clients 4 --workers 2 --pipeline 1)
SUB_ARGS=(--mode submit-only --jobs "$SUBMIT_JOBS" --payload 64 --clients 2 --pipeline 100 --segment "$SEGMENT")

if [ $MAIN = 1 ]; then
    declare -a GH_BG=() GM_BG=() GH_FG=() GM_FG=() GH_P99=() GM_P99=() R_BG=() R_FG=()
    for r in $(seq "$RUNS"); do
        # Back to back, so both see about the same machine load; who goes first alternates.
        if [ $((r % 2)) = 1 ]; then ORDER="gh gm"; else ORDER="gm gh"; fi
        for s in $ORDER; do
            [ $s = gm ] && [ $HAVE_GM = 0 ] && continue
            log "run $r: background end-to-end on $s"
            scenario $s "bg.$s.$r" "${BG_ARGS[@]}"
        done
        for s in $ORDER; do
            [ $s = gm ] && [ $HAVE_GM = 0 ] && continue
            log "run $r: foreground round trips on $s"
            scenario $s "fg.$s.$r" "${FG_ARGS[@]}"
        done
        a=$(field "$OUT/bg.gh.$r.txt" jobs_per_s); b=$(field "$OUT/bg.gm.$r.txt" jobs_per_s)
        GH_BG+=("$a"); GM_BG+=("$b"); R_BG+=("$(ratio "$a" "$b" | tr -d x)")
        row "background e2e jobs/s, run $r" "$a" "$b" "$(ratio "$a" "$b")" ">= 2x"
        a=$(field "$OUT/fg.gh.$r.txt" rt_per_s); b=$(field "$OUT/fg.gm.$r.txt" rt_per_s)
        GH_FG+=("$a"); GM_FG+=("$b"); R_FG+=("$(ratio "$a" "$b" | tr -d x)")
        row "foreground round trips/s, run $r" "$a" "$b" "$(ratio "$a" "$b")" ">= 1.5x"
        a=$(field "$OUT/fg.gh.$r.txt" p99_ms); b=$(field "$OUT/fg.gm.$r.txt" p99_ms)
        GH_P99+=("$a"); GM_P99+=("$b")
        row "foreground p99 ms, run $r" "$a" "$b" "$(ratio "$a" "$b")" "< 1x (lower)"
        a=$(field "$OUT/fg.gh.$r.txt" p50_ms); b=$(field "$OUT/fg.gm.$r.txt" p50_ms)
        row "foreground p50 ms, run $r" "$a" "$b" "$(ratio "$a" "$b")" ""
        a=$(field "$OUT/bg.gh.$r.txt" server_cpu_s); b=$(field "$OUT/bg.gm.$r.txt" server_cpu_s)
        row "background server CPU s, run $r" "$a" "$b" "$(ratio "$a" "$b")" "(info)"
    done
    if [ "$RUNS" -gt 1 ]; then
        a=$(median "${GH_BG[@]}"); b=$(median "${GM_BG[@]}")
        row "background e2e jobs/s, median" "$a" "$b" "$(ratio "$a" "$b")" ">= 2x"
        [ $HAVE_GM = 1 ] && row "background e2e, median of the per-run ratios" "" "" "$(median "${R_BG[@]}")x" ">= 2x"
        a=$(median "${GH_FG[@]}"); b=$(median "${GM_FG[@]}")
        row "foreground round trips/s, median" "$a" "$b" "$(ratio "$a" "$b")" ">= 1.5x"
        [ $HAVE_GM = 1 ] && row "foreground, median of the per-run ratios" "" "" "$(median "${R_FG[@]}")x" ">= 1.5x"
        a=$(median "${GH_P99[@]}"); b=$(median "${GM_P99[@]}")
        row "foreground p99 ms, median" "$a" "$b" "$(ratio "$a" "$b")" "< 1x (lower)"
    fi

    for s in gh gm; do
        [ $s = gm ] && [ $HAVE_GM = 0 ] && continue
        log "submit-only $SUBMIT_JOBS jobs on $s (no worker)"
        scenario $s "submit.$s" "${SUB_ARGS[@]}"
    done
    f="$OUT/submit.gh.txt"; g="$OUT/submit.gm.txt"
    a=$(field "$f" submit_per_s); b=$(field "$g" submit_per_s)
    row "submit-only $SUBMIT_JOBS: submits/s overall" "$a" "$b" "$(ratio "$a" "$b")" ""
    a=$(field "$f" first_segment); b=$(field "$g" first_segment)
    row "submit-only: first $SEGMENT submits/s" "$a" "$b" "$(ratio "$a" "$b")" ""
    a=$(field "$f" last_segment); b=$(field "$g" last_segment)
    row "submit-only: last $SEGMENT submits/s" "$a" "$b" "$(ratio "$a" "$b")" ""
    a=$(ratio "$(field "$f" last_segment)" "$(field "$f" first_segment)")
    b=$(ratio "$(field "$g" last_segment)" "$(field "$g" first_segment)")
    row "submit-only: last/first segment rate" "$a" "$b" "" "flat (~1x)"
    a=$(mib "$(field "$f" rss_kb)"); b=$(mib "$(field "$g" rss_kb)")
    row "RSS MiB with $SUBMIT_JOBS queued" "$a" "$b" "$(ratio "$a" "$b")" "< 250 MB"
    NOTES+=("submit-only submits/s per $SEGMENT-job segment, gearhouse: $(field "$f" segments | tr ',' ' ')")
    NOTES+=("submit-only submits/s per $SEGMENT-job segment, gearmand:  $(field "$g" segments | tr ',' ' ')")
fi

# ---- persistence: gearhouse + 3 memcached, replicas=2, vs gearmand -q libmemcached ----------
MC_PIDS=() MC_ADDRS=
start_memcached_cluster() {
    MC_PIDS=(); local addrs=() p i
    for i in 1 2 3; do
        p=$(free_port)
        memcached ${MC_USER[@]+"${MC_USER[@]}"} -M -m 1024 -l 127.0.0.1 -p "$p" -U 0 >"$OUT/memcached.$i.log" 2>&1 9>&- &
        MC_PIDS+=($!); PIDS+=($!); addrs+=("127.0.0.1:$p")
        wait_port "$p" 10
    done
    MC_ADDRS=$(IFS=,; echo "${addrs[*]}")
}
stop_memcached_cluster() { local p; for p in "${MC_PIDS[@]}"; do stop_pid "$p"; done; MC_PIDS=(); }

if [ "$PERSIST" = 1 ]; then
    P_ROW="background e2e jobs/s, gearhouse memcached x3 replicas=2 vs gearmand -q libmemcached"
    if ! command -v memcached >/dev/null; then
        row "$P_ROW" "skipped: memcached not installed" "" "" ""
    elif ! "$GH_BIN" serve --help 2>&1 | grep -q -- '--memcached'; then
        row "$P_ROW" "skipped: not supported by this build" "" "" ""
    else
        declare -a P_GH=() P_GM=()
        for r in $(seq "$RUNS"); do
            start_memcached_cluster
            log "run $r: background end-to-end, gearhouse --memcached $MC_ADDRS (replicas=2)"
            SERVER_ARGS=(--memcached "$MC_ADDRS")
            START_ENV="GEARHOUSE_PERSISTENCE__REPLICAS=2" scenario gh "persist.gh.$r" "${BG_ARGS[@]}"
            SERVER_ARGS=()
            stop_memcached_cluster
            if grep -qi "in memory only" "$OUT/persist.gh.$r.server.log"; then
                row "$P_ROW" "skipped: not supported by this build (server said: in memory only)" "" "" ""
                P_GH=(); break
            fi
            a=$(field "$OUT/persist.gh.$r.txt" jobs_per_s); b=
            if [ $HAVE_GM = 1 ]; then
                start_memcached_cluster
                log "run $r: background end-to-end, gearmand -q libmemcached --libmemcached-servers=$MC_ADDRS"
                SERVER_ARGS=(-q libmemcached "--libmemcached-servers=$MC_ADDRS")
                scenario gm "persist.gm.$r" "${BG_ARGS[@]}"
                SERVER_ARGS=()
                stop_memcached_cluster
                b=$(field "$OUT/persist.gm.$r.txt" jobs_per_s)
            fi
            P_GH+=("$a"); P_GM+=("$b")
            row "bg e2e jobs/s, memcached x3 (gh replicas=2, gm -q libmemcached), run $r" \
                "$a" "$b" "$(ratio "$a" "$b")" ">= 3x"
        done
        if [ ${#P_GH[@]} -gt 0 ]; then
            a=$(median "${P_GH[@]}"); b=$(median "${P_GM[@]}")
            [ "$RUNS" -gt 1 ] && row "bg e2e jobs/s, memcached x3, median" "$a" "$b" "$(ratio "$a" "$b")" ">= 3x"
            if [ $MAIN = 1 ] && [ $HAVE_GM = 1 ]; then
                c=$(median "${GM_BG[@]}")
                row "bg e2e jobs/s: gh memcached x3 vs gm in memory (medians)" "$a" "$c" "$(ratio "$a" "$c")" ">= 1x"
            fi
        fi
    fi
    SERVER_ARGS=()
fi

# ---- tracing: gearhouse untraced vs the default (only an endpoint: tail sampling) vs 100% ----
# The three servers run back to back in each run (order rotated per run), so the machine's
# noise hits them alike. Server CPU per job = server_cpu_s / jobs.
if [ "$TRACING" = 1 ]; then
    SINK_PORT=$(free_port)
    "$LG" --mode otlp-sink --port "$SINK_PORT" >"$OUT/otlp-sink.txt" 2>&1 9>&- &
    SINK_PID=$!; PIDS+=("$SINK_PID")
    wait_port "$SINK_PORT" 10
    sink_requests() { curl -fs "http://127.0.0.1:$SINK_PORT/stats" | sed -n 's/^requests=\([0-9]*\).*/\1/p'; }
    declare -a T_DEF=() T_ALL=() T_OFF=() C_DEF=() C_ALL=() C_OFF=()
    # OTLP/HTTP (the sink speaks it); the default sampling is whatever config/default.toml says.
    ENV_DEFAULT="OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:$SINK_PORT"
    ENV_ALL="$ENV_DEFAULT OTEL_TRACES_SAMPLER=always_on"
    us_per_job() { python3 -c "import sys
try: print('%.2f' % (float(sys.argv[1])*1e6/float(sys.argv[2])))
except Exception: print('NA')" "${1:-}" "$BG_JOBS"; }
    for r in $(seq "$RUNS"); do
        case $((r % 3)) in
            1) order="off default all" ;; 2) order="default all off" ;; *) order="all off default" ;;
        esac
        for v in $order; do
            before=$(sink_requests)
            case $v in
                off) START_ENV="" ;; default) START_ENV="$ENV_DEFAULT" ;; all) START_ENV="$ENV_ALL" ;;
            esac
            log "run $r: background end-to-end, traces $v"
            START_ENV="$START_ENV" scenario gh "trace.$v.$r" "${BG_ARGS[@]}"
            after=$(sink_requests)
            [ "$v" = off ] || NOTES+=("tracing run $r, $v: $((${after:-0} - ${before:-0})) OTLP export requests reached the sink")
        done
        a=$(field "$OUT/trace.default.$r.txt" jobs_per_s); c=$(field "$OUT/trace.all.$r.txt" jobs_per_s)
        b=$(field "$OUT/trace.off.$r.txt" jobs_per_s)
        T_DEF+=("$a"); T_ALL+=("$c"); T_OFF+=("$b")
        row "gh bg e2e jobs/s: default traces (endpoint only) vs off, run $r" "$a" "$b" "$(ratio "$a" "$b")" ">= 0.97x"
        row "gh bg e2e jobs/s: every job traced vs off, run $r" "$c" "$b" "$(ratio "$c" "$b")" ">= 0.9x"
        x=$(us_per_job "$(field "$OUT/trace.default.$r.txt" server_cpu_s)")
        y=$(us_per_job "$(field "$OUT/trace.all.$r.txt" server_cpu_s)")
        z=$(us_per_job "$(field "$OUT/trace.off.$r.txt" server_cpu_s)")
        C_DEF+=("$x"); C_ALL+=("$y"); C_OFF+=("$z")
        row "gh server CPU us/job: default / every job (col 2) vs off (col 3), run $r" "$x / $y" "$z" "$(ratio "$x" "$z") / $(ratio "$y" "$z")" "(info)"
    done
    if [ ${#T_DEF[@]} -gt 1 ]; then
        a=$(median "${T_DEF[@]}"); c=$(median "${T_ALL[@]}"); b=$(median "${T_OFF[@]}")
        row "gh bg e2e jobs/s: default traces vs off, median" "$a" "$b" "$(ratio "$a" "$b")" ">= 0.97x"
        row "gh bg e2e jobs/s: every job traced vs off, median" "$c" "$b" "$(ratio "$c" "$b")" ">= 0.9x"
        x=$(median "${C_DEF[@]}"); y=$(median "${C_ALL[@]}"); z=$(median "${C_OFF[@]}")
        row "gh server CPU us/job: default / every job vs off, median" "$x / $y" "$z" "$(ratio "$x" "$z") / $(ratio "$y" "$z")" "(info)"
    fi
    stop_pid "$SINK_PID"
fi

# ---- HTTP job submission vs the Gearman protocol, on the same server ------------------------
# One gearhouse per run serves all four measurements back to back (which protocol goes first
# alternates per run): foreground round trips (4 clients, one request at a time on a kept-alive
# connection, 2 Gearman workers) and background submits (4 clients, one at a time, no worker),
# each over Gearman and over HTTP (POST /jobs/FUNCTION). Then, for information, the same submits
# with 100 in flight per connection (Gearman pipelining vs HTTP/1.1 pipelining).
if [ "$HTTP" = 1 ]; then
    H_FG=(--jobs "$HTTP_FG_JOBS" --payload 64 --clients 4 --workers 2 --pipeline 1)
    H_SUB=(--jobs "$HTTP_SUBMIT_JOBS" --payload 64 --clients 4 --segment "$HTTP_SUBMIT_JOBS")
    declare -a HF=() GF=() HS=() GS=() HFR=() HSR=()
    for r in $(seq "$RUNS"); do
        if [ $((r % 2)) = 1 ]; then ORDER="gear http"; else ORDER="http gear"; fi
        start_gearhouse "http.$r"
        for p in $ORDER; do
            log "run $r: foreground round trips over $p (same server)"
            if [ $p = gear ]; then run_lg "http.fg.gear.$r" --mode foreground "${H_FG[@]}"
            else run_lg "http.fg.http.$r" --mode http-foreground --http-port "$SRV_HTTP" "${H_FG[@]}"; fi
        done
        for p in $ORDER; do
            log "run $r: background submits over $p, 1 in flight per client (same server)"
            if [ $p = gear ]; then run_lg "http.sub.gear.$r" --mode submit-only --function sub_gear --pipeline 1 "${H_SUB[@]}"
            else run_lg "http.sub.http.$r" --mode http-submit-only --function sub_http --pipeline 1 --http-port "$SRV_HTTP" "${H_SUB[@]}"; fi
        done
        for p in $ORDER; do
            log "run $r: background submits over $p, 100 in flight per client (same server)"
            if [ $p = gear ]; then run_lg "http.pipe.gear.$r" --mode submit-only --function pipe_gear --pipeline 100 "${H_SUB[@]}"
            else run_lg "http.pipe.http.$r" --mode http-submit-only --function pipe_http --pipeline 100 --http-port "$SRV_HTTP" "${H_SUB[@]}"; fi
        done
        stop_pid "$SRV_PID"
        a=$(field "$OUT/http.fg.http.$r.txt" rt_per_s); b=$(field "$OUT/http.fg.gear.$r.txt" rt_per_s)
        HF+=("$a"); GF+=("$b"); HFR+=("$(ratio "$a" "$b" | tr -d x)")
        row "gh foreground round trips/s: HTTP (col 2) vs Gearman (col 3), run $r" "$a" "$b" "$(ratio "$a" "$b")" ">= 0.8x"
        a=$(field "$OUT/http.fg.http.$r.txt" p99_ms); b=$(field "$OUT/http.fg.gear.$r.txt" p99_ms)
        row "gh foreground p99 ms: HTTP vs Gearman, run $r" "$a" "$b" "$(ratio "$a" "$b")" "(info)"
        a=$(field "$OUT/http.sub.http.$r.txt" submit_per_s); b=$(field "$OUT/http.sub.gear.$r.txt" submit_per_s)
        HS+=("$a"); GS+=("$b"); HSR+=("$(ratio "$a" "$b" | tr -d x)")
        row "gh background submits/s, 1 in flight: HTTP vs Gearman, run $r" "$a" "$b" "$(ratio "$a" "$b")" ">= 0.5x"
        a=$(field "$OUT/http.pipe.http.$r.txt" submit_per_s); b=$(field "$OUT/http.pipe.gear.$r.txt" submit_per_s)
        row "gh background submits/s, 100 in flight (pipelined): HTTP vs Gearman, run $r" "$a" "$b" "$(ratio "$a" "$b")" "(info)"
    done
    if [ "$RUNS" -gt 1 ]; then
        a=$(median "${HF[@]}"); b=$(median "${GF[@]}")
        row "gh foreground round trips/s: HTTP vs Gearman, median" "$a" "$b" "$(ratio "$a" "$b")" ">= 0.8x"
        a=$(median "${HS[@]}"); b=$(median "${GS[@]}")
        row "gh background submits/s, 1 in flight: HTTP vs Gearman, median" "$a" "$b" "$(ratio "$a" "$b")" ">= 0.5x"
        # Each run's ratio pairs two measurements taken seconds apart; their median is less
        # moved by the machine's drift between runs than the ratio of the column medians.
        row "gh foreground round trips: HTTP/Gearman, median of the runs' ratios" "" "" "$(median "${HFR[@]}")x" ">= 0.8x"
        row "gh background submits, 1 in flight: HTTP/Gearman, median of the runs' ratios" "" "" "$(median "${HSR[@]}")x" ">= 0.5x"
    fi
fi

# ---- TLS vs plain on the same server (issue 9 section 3) ------------------------------------
# One gearhouse per run listens with TLS (server.listen, --tls-cert/--tls-key) and in clear text
# beside it (server.plain_listen); the background and the foreground scenarios run over each,
# back to back on that server, and which transport goes first alternates per run. The same
# loadgen drives both (--tls-ca makes its connections TLS), and it opens its connections before
# the clock starts, so handshakes are not measured. The certificates are a throwaway CA and a
# server certificate for 127.0.0.1, made by openssl in $OUT/tls. Server CPU per job =
# server_cpu_s / jobs.
if [ "$TLS" = 1 ]; then
    if ! command -v openssl >/dev/null; then
        row "gh TLS vs plain" "skipped: openssl not installed" "" "" ""
    else
        PKI=$OUT/tls; mkdir -p "$PKI"
        (
            cd "$PKI"
            ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
            openssl req -x509 "${ec[@]}" -keyout ca.key -out ca.pem -days 2 -subj /CN=gearhouse-bench-ca
            openssl req "${ec[@]}" -keyout server.key -out server.csr -subj /CN=localhost
            printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n' >server.ext
            openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem \
                -days 2 -extfile server.ext
        ) >"$PKI/openssl.log" 2>&1 || { echo "openssl failed:" >&2; cat "$PKI/openssl.log" >&2; exit 1; }
        # tls_lg tls|plain NAME loadgen-args...: the load generator on that listener.
        tls_lg() {
            local t=$1 name=$2; shift 2
            if [ "$t" = tls ]; then run_lg "$name" --tls-ca "$PKI/ca.pem" "$@"
            else SRV_PORT=$PLAIN_PORT run_lg "$name" "$@"; fi
        }
        us_per() { # cpu_s jobs
            python3 -c "import sys
try: print('%.2f' % (float(sys.argv[1])*1e6/float(sys.argv[2])))
except Exception: print('NA')" "${1:-}" "${2:-}"
        }
        declare -a TLS_BG=() PL_BG=() TLS_FG=() PL_FG=() TLS_BGC=() PL_BGC=() TLS_FGC=() PL_FGC=() TLS_BGR=() TLS_FGR=()
        for r in $(seq "$RUNS"); do
            if [ $((r % 2)) = 1 ]; then ORDER="tls plain"; else ORDER="plain tls"; fi
            PLAIN_PORT=$(free_port)
            start_gearhouse "tls.$r" --tls-cert "$PKI/server.pem" --tls-key "$PKI/server.key" \
                --plain-listen "127.0.0.1:$PLAIN_PORT"
            for t in $ORDER; do
                log "run $r: background end-to-end over $t (same server)"
                tls_lg $t "tls.bg.$t.$r" "${BG_ARGS[@]}"
            done
            for t in $ORDER; do
                log "run $r: foreground round trips over $t (same server)"
                tls_lg $t "tls.fg.$t.$r" "${FG_ARGS[@]}"
            done
            stop_pid "$SRV_PID"
            for k in bg fg; do
                if [ $k = bg ]; then f=jobs_per_s; what="background e2e jobs/s"; else f=rt_per_s; what="foreground round trips/s"; fi
                a=$(field "$OUT/tls.$k.tls.$r.txt" $f); b=$(field "$OUT/tls.$k.plain.$r.txt" $f)
                row "gh $what: TLS (col 2) vs plain (col 3), run $r" "$a" "$b" "$(ratio "$a" "$b")" ">= 0.8x"
                x=$(us_per "$(field "$OUT/tls.$k.tls.$r.txt" server_cpu_s)" "$(field "$OUT/tls.$k.tls.$r.txt" jobs)")
                y=$(us_per "$(field "$OUT/tls.$k.plain.$r.txt" server_cpu_s)" "$(field "$OUT/tls.$k.plain.$r.txt" jobs)")
                row "gh server CPU us/job, $k: TLS vs plain, run $r" "$x" "$y" "$(ratio "$x" "$y")" "(info)"
                if [ $k = bg ]; then TLS_BG+=("$a"); PL_BG+=("$b"); TLS_BGC+=("$x"); PL_BGC+=("$y"); TLS_BGR+=("$(ratio "$a" "$b" | tr -d x)")
                else TLS_FG+=("$a"); PL_FG+=("$b"); TLS_FGC+=("$x"); PL_FGC+=("$y"); TLS_FGR+=("$(ratio "$a" "$b" | tr -d x)"); fi
            done
            a=$(field "$OUT/tls.fg.tls.$r.txt" p99_ms); b=$(field "$OUT/tls.fg.plain.$r.txt" p99_ms)
            row "gh foreground p99 ms: TLS vs plain, run $r" "$a" "$b" "$(ratio "$a" "$b")" "(info)"
        done
        if [ "$RUNS" -gt 1 ]; then
            a=$(median "${TLS_BG[@]}"); b=$(median "${PL_BG[@]}")
            row "gh background e2e jobs/s: TLS vs plain, median" "$a" "$b" "$(ratio "$a" "$b")" ">= 0.8x"
            a=$(median "${TLS_FG[@]}"); b=$(median "${PL_FG[@]}")
            row "gh foreground round trips/s: TLS vs plain, median" "$a" "$b" "$(ratio "$a" "$b")" ">= 0.8x"
            a=$(median "${TLS_BGC[@]}"); b=$(median "${PL_BGC[@]}")
            row "gh server CPU us/job, bg: TLS vs plain, median" "$a" "$b" "$(ratio "$a" "$b")" "(info)"
            a=$(median "${TLS_FGC[@]}"); b=$(median "${PL_FGC[@]}")
            row "gh server CPU us/job, fg: TLS vs plain, median" "$a" "$b" "$(ratio "$a" "$b")" "(info)"
            row "gh background e2e jobs: TLS/plain, median of the runs' ratios" "" "" "$(median "${TLS_BGR[@]}")x" ">= 0.8x"
            row "gh foreground round trips: TLS/plain, median of the runs' ratios" "" "" "$(median "${TLS_FGR[@]}")x" ">= 0.8x"
        fi
    fi
fi

# ---- the table ------------------------------------------------------------------------------
cat "$OUT/env.txt" | tee "$OUT/table.txt"
{
    printf 'scenario\tgearhouse\tgearmand\tratio\ttarget\n'
    for r in "${ROWS[@]}"; do printf '%s\n' "$r"; done
} | column -t -s $'\t' -o ' | ' | tee -a "$OUT/table.txt"
[ ${#NOTES[@]} -eq 0 ] || printf '%s\n' "${NOTES[@]}" | tee -a "$OUT/table.txt"
echo "(raw loadgen output and server logs: $OUT)"
