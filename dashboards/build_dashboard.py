#!/usr/bin/env python3
"""Writes dashboards/gearhouse.json, the Grafana dashboard for gearhouse.

The JSON is what operators import; this script is how it is maintained (one place per panel,
consistent ids and layout). Run it after editing: `python3 dashboards/build_dashboard.py`.
tests/observability/scrape.rs runs every query of the JSON against a real Prometheus.
"""

import json
import os

DS = {"type": "prometheus", "uid": "${datasource}"}
F = 'function=~"$function"'
R = "$__rate_interval"
# Process metrics are kept to gearhouse targets by joining on a gearhouse-only series.
GH = "and on (instance, job) gearman_up"

panels = []
_next_id = [1]
_cursor = {"x": 0, "y": 0, "h": 0}


def _id():
    i = _next_id[0]
    _next_id[0] += 1
    return i


def row(title):
    if _cursor["x"] != 0:
        _cursor["y"] += _cursor["h"]
        _cursor["x"] = 0
        _cursor["h"] = 0
    panels.append(
        {
            "type": "row",
            "title": title,
            "collapsed": False,
            "gridPos": {"h": 1, "w": 24, "x": 0, "y": _cursor["y"]},
            "id": _id(),
            "panels": [],
        }
    )
    _cursor["y"] += 1


def _place(w, h):
    if _cursor["x"] + w > 24:
        _cursor["y"] += _cursor["h"]
        _cursor["x"] = 0
        _cursor["h"] = 0
    pos = {"h": h, "w": w, "x": _cursor["x"], "y": _cursor["y"]}
    _cursor["x"] += w
    _cursor["h"] = max(_cursor["h"], h)
    return pos


def _targets(queries):
    out = []
    for i, (expr, legend) in enumerate(queries):
        out.append(
            {
                "datasource": DS,
                "editorMode": "code",
                "expr": expr,
                "legendFormat": legend,
                "range": True,
                "instant": False,
                "refId": chr(ord("A") + i),
            }
        )
    return out


def timeseries(title, desc, queries, unit="short", w=12, h=8, stack=False, min0=True):
    custom = {
        "drawStyle": "line",
        "lineWidth": 1,
        "fillOpacity": 20 if stack else 10,
        "showPoints": "never",
        "spanNulls": False,
        "stacking": {"mode": "normal" if stack else "none", "group": "A"},
    }
    defaults = {"unit": unit, "color": {"mode": "palette-classic"}, "custom": custom}
    if min0:
        defaults["min"] = 0
    panels.append(
        {
            "type": "timeseries",
            "title": title,
            "description": desc,
            "datasource": DS,
            "gridPos": _place(w, h),
            "id": _id(),
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": {
                "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                "tooltip": {"mode": "multi", "sort": "desc"},
            },
            "targets": _targets(queries),
        }
    )


def stat(title, desc, queries, unit="short", w=4, h=4, red_at=None, text_mode="auto", decimals=None):
    steps = [{"color": "green", "value": None}]
    if red_at is not None:
        steps.append({"color": "red", "value": red_at})
    defaults = {
        "unit": unit,
        "color": {"mode": "thresholds"},
        "thresholds": {"mode": "absolute", "steps": steps},
    }
    if decimals is not None:
        defaults["decimals"] = decimals
    panels.append(
        {
            "type": "stat",
            "title": title,
            "description": desc,
            "datasource": DS,
            "gridPos": _place(w, h),
            "id": _id(),
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": {
                "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                "colorMode": "value",
                "graphMode": "area",
                "justifyMode": "auto",
                "orientation": "auto",
                "textMode": text_mode,
                "wideLayout": True,
                "showPercentChange": False,
            },
            "targets": _targets(queries),
        }
    )


def quantiles(metric, by=""):
    grp = f"{by}, le" if by else "le"
    return [
        (
            f"histogram_quantile({q}, sum by ({grp}) (rate({metric}_bucket{{{F}}}[{R}])))",
            f"p{int(q * 100)}" + (f" {{{{{by}}}}}" if by else ""),
        )
        for q in ((0.5, 0.9, 0.99) if not by else (0.99,))
    ]


# ---- Overview
row("Overview")
stat("Up", "gearman_up: 1 while the server answers scrapes (no data = down)", [("min(gearman_up)", "up")], red_at=None, w=3)
stat("Jobs waiting", "Jobs queued for a worker (selected functions)", [(f"sum(gearman_jobs_waiting{{{F}}})", "waiting")], w=3)
stat("Jobs running", "Jobs a worker holds (selected functions)", [(f"sum(gearman_jobs_running{{{F}}})", "running")], w=3)
stat("Workers", "Connections that registered at least one function", [("sum(gearhouse_workers_connected)", "workers")], w=3)
stat("Clients", "Connections that submitted jobs or asked for status", [("sum(gearhouse_clients_connected)", "clients")], w=3)
stat("Submitted / s", "Jobs accepted per second (selected functions)", [(f"sum(rate(gearhouse_jobs_submitted_total{{{F}}}[{R}]))", "submitted")], unit="reqps", w=3)
stat("Failure ratio", "Failed and exception results over all results (selected functions)",
     [(f"(sum(rate(gearhouse_jobs_failed_total{{{F}}}[{R}])) + sum(rate(gearhouse_jobs_exceptions_total{{{F}}}[{R}]))) / (sum(rate(gearhouse_jobs_completed_total{{{F}}}[{R}])) + sum(rate(gearhouse_jobs_failed_total{{{F}}}[{R}])) + sum(rate(gearhouse_jobs_exceptions_total{{{F}}}[{R}])))", "failure ratio")],
     unit="percentunit", w=3, red_at=0.05)
stat("Version", "gearhouse version (gearhouse_build_info)", [("max by (version) (gearhouse_build_info)", "{{version}}")], text_mode="name", w=3)

# ---- Throughput
row("Throughput")
timeseries("Jobs submitted by function", "Accepted submits per second; coalesced submits are counted separately",
           [(f"sum by (function) (rate(gearhouse_jobs_submitted_total{{{F}}}[{R}]))", "{{function}}")], unit="reqps", w=8)
timeseries("Submitted by priority and mode", "Foreground (client waits) and background submits per priority",
           [(f"sum by (priority, mode) (rate(gearhouse_jobs_submitted_total{{{F}}}[{R}]))", "{{priority}} {{mode}}")], unit="reqps", w=8)
timeseries("Results", "Final results per second",
           [(f"sum(rate(gearhouse_jobs_completed_total{{{F}}}[{R}]))", "complete"),
            (f"sum(rate(gearhouse_jobs_failed_total{{{F}}}[{R}]))", "fail"),
            (f"sum(rate(gearhouse_jobs_exceptions_total{{{F}}}[{R}]))", "exception")], unit="reqps", w=8)

# ---- Queue
row("Queue")
timeseries("Queue depth by priority", "Jobs waiting for a worker, per priority (gearhouse_queue_depth)",
           [(f"sum by (priority) (gearhouse_queue_depth{{{F}}})", "{{priority}}")], stack=True, w=8)
timeseries("Waiting by function", "gearman_jobs_waiting (gearmand exporter name)",
           [(f"sum by (function) (gearman_jobs_waiting{{{F}}})", "{{function}}")], w=8)
timeseries("Running by function", "gearman_jobs_running (gearmand exporter name)",
           [(f"sum by (function) (gearman_jobs_running{{{F}}})", "{{function}}")], w=8)
timeseries("Epoch jobs waiting for their time", "SUBMIT_JOB_EPOCH jobs not due yet",
           [("sum(gearhouse_epoch_jobs_waiting)", "scheduled")], w=8)
timeseries("Queued and running (total)", "gearman_jobs: queued plus running, per function",
           [(f"sum by (function) (gearman_jobs{{{F}}})", "{{function}}")], w=8)
timeseries("Mean wait and run time", "Average time queued and running over the interval",
           [(f"sum(rate(gearhouse_job_queued_seconds_sum{{{F}}}[{R}])) / sum(rate(gearhouse_job_queued_seconds_count{{{F}}}[{R}]))", "queued"),
            (f"sum(rate(gearhouse_job_running_seconds_sum{{{F}}}[{R}])) / sum(rate(gearhouse_job_running_seconds_count{{{F}}}[{R}]))", "running")],
           unit="s", w=8)

# ---- Latency
row("Wait and run time")
timeseries("Queue wait quantiles", "Submit (or requeue) to assignment to a worker", quantiles("gearhouse_job_queued_seconds"), unit="s", w=12)
timeseries("Queue wait p99 by function", "Submit (or requeue) to assignment, 99th percentile", quantiles("gearhouse_job_queued_seconds", by="function"), unit="s", w=12)
timeseries("Run time quantiles", "Assignment to the worker's final result", quantiles("gearhouse_job_running_seconds"), unit="s", w=12)
timeseries("Run time p99 by function", "Assignment to final result, 99th percentile", quantiles("gearhouse_job_running_seconds", by="function"), unit="s", w=12)

# ---- Per-function limits (rate, max_running)
row("Per-function limits")
timeseries("Held by limits (mean wait)", "Mean time a job of a limited function spent at the head of its queue held by its rate or max_running (gearhouse_job_limit_wait_seconds)",
           [(f"sum by (function) (rate(gearhouse_job_limit_wait_seconds_sum{{{F}}}[{R}])) / sum by (function) (rate(gearhouse_job_limit_wait_seconds_count{{{F}}}[{R}]))", "{{function}}")], unit="s", w=8)
timeseries("Grabs refused by limits", "Worker grabs that found a function's next job held back, by limit (gearhouse_job_limit_refusals_total)",
           [(f"sum by (function, limit) (rate(gearhouse_job_limit_refusals_total{{{F}}}[{R}]))", "{{function}} {{limit}}")], unit="reqps", w=8)
timeseries("Configured rate and max_running", "Per-function settings in force (gearhouse_function_setting; 0 = unlimited)",
           [(f"max by (function, setting) (gearhouse_function_setting{{{F}, setting=~\"rate|max_running\"}})", "{{function}} {{setting}}")], w=8)

# ---- Workers and connections
row("Workers and connections")
timeseries("Workers per function", "Workers that registered the function (gearman_workers)",
           [(f"sum by (function) (gearman_workers{{{F}}})", "{{function}}")], w=8)
timeseries("Connections", "Open connections, clients and workers",
           [("sum(gearhouse_connections)", "open"),
            ("sum(gearhouse_clients_connected)", "clients"),
            ("sum(gearhouse_workers_connected)", "workers")], w=8)
timeseries("Connections accepted, refused, overflowed", "Per second; refused = server.max_connections reached; overflowed = closed for not reading (server.outbound_queue)",
           [(f"sum(rate(gearhouse_connections_accepted_total[{R}]))", "accepted"),
            (f"sum(rate(gearhouse_connections_refused_total[{R}]))", "refused"),
            (f"sum(rate(gearhouse_connections_overflowed_total[{R}]))", "overflowed")], unit="cps", w=8)

# ---- Failures and retries
row("Failures and retries")
timeseries("Failures by function", "WORK_FAIL (and jobs dropped after engine.job_retries) and WORK_EXCEPTION per second",
           [(f"sum by (function) (rate(gearhouse_jobs_failed_total{{{F}}}[{R}]))", "fail {{function}}"),
            (f"sum by (function) (rate(gearhouse_jobs_exceptions_total{{{F}}}[{R}]))", "exception {{function}}")], unit="reqps", w=8)
timeseries("Retries and CAN_DO_TIMEOUT failures", "Jobs put back in the queue because their worker disconnected or gave up the function; jobs failed because their worker passed its CAN_DO_TIMEOUT",
           [(f"sum by (function) (rate(gearhouse_jobs_retried_total{{{F}}}[{R}]))", "retried {{function}}"),
            (f"sum by (function) (rate(gearhouse_jobs_timed_out_total{{{F}}}[{R}]))", "timed out {{function}}")], unit="reqps", w=8)
timeseries("Refused and coalesced submits", "Refused with ERROR (by reason) and submits that joined a job with the same unique id",
           [(f"sum by (reason) (rate(gearhouse_jobs_refused_total{{{F}}}[{R}]))", "refused {{reason}}"),
            (f"sum(rate(gearhouse_jobs_coalesced_total{{{F}}}[{R}]))", "coalesced")], unit="reqps", w=8)

# ---- Protocol
row("Protocol")
timeseries("Packets received by type", "Binary requests per second, by packet type",
           [(f"sum by (type) (rate(gearhouse_packets_received_total[{R}])) > 0", "{{type}}")], unit="pps", w=8)
timeseries("Packets and bytes out / in", "Packets sent per second; bytes per second each way",
           [(f"sum(rate(gearhouse_packets_sent_total[{R}]))", "packets sent"),
            (f"sum(rate(gearhouse_bytes_received_total[{R}]))", "bytes in"),
            (f"sum(rate(gearhouse_bytes_sent_total[{R}]))", "bytes out")], unit="short", w=8)
timeseries("Protocol errors and admin commands", "Requests refused or connections closed for bad input, by kind; admin text commands by outcome",
           [(f"sum by (kind) (rate(gearhouse_protocol_errors_total[{R}]))", "error {{kind}}"),
            (f"sum by (command, outcome) (rate(gearhouse_admin_commands_total[{R}]))", "admin {{command}} {{outcome}}")], unit="reqps", w=8)

timeseries("Engine lock hold time", "How long each critical section held the engine lock: it stays short whatever the queue size (big listings take it a page at a time)",
           [(f"histogram_quantile(0.99, sum by (le) (rate(gearhouse_engine_lock_hold_seconds_bucket[{R}])))", "p99"),
            (f"histogram_quantile(0.5, sum by (le) (rate(gearhouse_engine_lock_hold_seconds_bucket[{R}])))", "p50")], unit="s", w=8)
timeseries("Connection turns cut", "Times a connection used server.turn_budget_us on its pipelined requests and yielded its thread to the other connections: a steady rate means some peer sends costly requests (SUBMIT_JOB_SCHED cron searches) faster than one turn handles them",
           [(f"sum(rate(gearhouse_connection_turns_cut_total[{R}]))", "turns cut")], unit="short", w=8)
timeseries("Queue entries, live and stale", "Entries in the priority queues (gearhouse_engine_queue_entries) next to the jobs queued: entries left by jobs that ended while queued are compacted once they outnumber the live ones",
           [("sum(gearhouse_engine_queue_entries)", "queue entries"),
            (f"sum(gearhouse_queue_depth{{{F}}})", "queued jobs")], w=8)
timeseries("TLS and access rules", "TLS handshakes on the Gearman port by result, and requests refused by the access rules (access.rules) or admin_read_networks, by action",
           [(f"sum by (result) (rate(gearhouse_tls_handshakes_total[{R}])) or vector(0)", "handshake {{result}}"),
            (f"sum by (action) (rate(gearhouse_access_denied_total[{R}])) or vector(0)", "denied {{action}}")], unit="reqps", w=8)

# ---- memcached mirror
row("Durable queue (memcached mirror)")
timeseries("memcached nodes up", "1 when the node answers (gearhouse_memcached_node_up)",
           [("gearhouse_memcached_node_up", "{{node}}")], w=8)
timeseries("Copies and pending writes", "Live jobs with fewer copies than persistence.replicas; writes waiting for memcached; deletes dropped past persistence.max_pending_deletes (those jobs may run again after a recovery)",
           [("sum(gearhouse_memcached_replicas_below_target)", "replicas below target"),
            ("sum(gearhouse_persistence_pending_writes)", "pending writes"),
            (f"sum(increase(gearhouse_memcached_deletes_dropped_total[{R}]))", "deletes dropped")], w=8)
timeseries("Jobs not durable", "Background jobs accepted in memory only (persistence.on_failure = accept_in_memory), per second",
           [(f"sum(rate(gearhouse_jobs_not_durable_total[{R}]))", "not durable")], unit="reqps", w=8)
timeseries("Write latency by node", "Queued write to memcached's acknowledgement",
           [(f"histogram_quantile(0.5, sum by (node, le) (rate(gearhouse_memcached_write_seconds_bucket[{R}])))", "p50 {{node}}"),
            (f"histogram_quantile(0.99, sum by (node, le) (rate(gearhouse_memcached_write_seconds_bucket[{R}])))", "p99 {{node}}")], unit="s", w=8)
timeseries("Delete latency by node", "Queued delete to memcached's answer",
           [(f"histogram_quantile(0.5, sum by (node, le) (rate(gearhouse_memcached_delete_seconds_bucket[{R}])))", "p50 {{node}}"),
            (f"histogram_quantile(0.99, sum by (node, le) (rate(gearhouse_memcached_delete_seconds_bucket[{R}])))", "p99 {{node}}")], unit="s", w=8)
timeseries("memcached errors", "Failed memcached operations per second, by node and operation",
           [(f"sum by (node, op) (rate(gearhouse_memcached_errors_total[{R}]))", "{{node}} {{op}}")], unit="reqps", w=8)
timeseries("memcached write failures by reason", "Job copies a node failed to store, per second: out_of_memory (more -m, keep -M), too_large (raise -I), timeout, connection, ...",
           [(f"sum by (node, reason) (rate(gearhouse_memcached_write_failures_total[{R}]))", "{{node}} {{reason}}")], unit="reqps", w=12)
timeseries("Evictions", "Items memcached evicted (any eviction can lose a job); nodes that can evict (started without -M)",
           [("gearhouse_memcached_evictions", "evictions {{node}}"),
            ("gearhouse_memcached_eviction_enabled", "eviction enabled {{node}}")], w=12)

# ---- Result cache and dead letters
# `or vector(0)`: these series exist only once a cached function or a dead letter was seen; the
# panels show 0 rather than "No data" on a server that has none.
row("Result cache and dead letters")
timeseries("Cache hit ratio", "Share of foreground submits of cached functions answered from the cache (0 when there were none)",
           [(f"(sum(rate(gearhouse_cache_hits_total{{{F}}}[{R}])) or vector(0)) / clamp_min((sum(rate(gearhouse_cache_hits_total{{{F}}}[{R}])) or vector(0)) + (sum(rate(gearhouse_cache_misses_total{{{F}}}[{R}])) or vector(0)), 1e-9)", "hit ratio")], unit="percentunit", w=8)
timeseries("Cache hits, misses, stores, skips", "Per second; skips are results not stored (too_large: raise memcached -I; queue_full: cache.store_queue; unreachable)",
           [(f"sum(rate(gearhouse_cache_hits_total{{{F}}}[{R}])) or vector(0)", "hits"),
            (f"sum(rate(gearhouse_cache_misses_total{{{F}}}[{R}])) or vector(0)", "misses"),
            (f"sum(rate(gearhouse_cache_stores_total{{{F}}}[{R}])) or vector(0)", "stores"),
            (f"sum by (reason) (rate(gearhouse_cache_skips_total{{{F}}}[{R}])) or vector(0)", "skipped {{reason}}")], unit="reqps", w=8)
timeseries("Dead letters", "Letters kept (GET /api/v1/dead-letters, admin show dead); new letters and the oldest evicted past dead_letters.max_count / max_bytes, per second",
           [("sum(gearhouse_dead_letters)", "kept"),
            (f"sum(rate(gearhouse_dead_letters_total{{{F}}}[{R}])) or vector(0)", "new / s"),
            (f"sum(rate(gearhouse_dead_letters_evicted_total[{R}]))", "evicted / s")], w=8)

# ---- Recovery
row("Recovery")
stat("Jobs recovered", "Jobs restored from memcached at start-up (own queue and taken-over queues)",
     [("sum(gearhouse_jobs_recovered_total)", "recovered")], w=6)
stat("Recovery duration", "How long the last start-up recovery took",
     [("max(gearhouse_recovery_duration_seconds)", "duration")], unit="s", w=6)
stat("Recovery failed", "1 while start-up recovery cannot complete (memcached unreachable)",
     [("max(gearhouse_recovery_failed)", "failed")], red_at=1, w=6)
# Automatic takeover (persist::lease): fencing, takeovers, lease renewals.
stat("Fenced", "Servers holding their durable jobs back: no lease renewal reached memcached, or a peer took their queue over (restart them)",
     [("sum(gearhouse_fenced)", "fenced")], red_at=1, w=6)
timeseries("Takeovers", "Automatic takeovers of a dead node's queue by result (moved, lost_claim: another server won the lock, failed), jobs moved, and lease renewals that failed",
           [(f"sum by (result) (increase(gearhouse_takeovers_total[{R}]))", "takeovers {{result}}"),
            (f"sum(increase(gearhouse_takeover_jobs_total[{R}]))", "jobs moved"),
            (f"sum by (instance) (increase(gearhouse_lease_renew_failures_total[{R}]))", "renew failures {{instance}}")], w=18)

# ---- Schedules
row("Schedules")
stat("Schedules", "Recurring schedules in each server's table (gearhouse_schedules)",
     [("max(gearhouse_schedules)", "schedules")], w=4)
timeseries("Schedule runs", "Due times fired per second (each fires on one server: the one that claims it), runs missed while no server was up and fired once after recovery, and due times another server claimed first",
           [(f"sum(rate(gearhouse_schedule_lateness_seconds_count[{R}]))", "fired"),
            (f"sum(rate(gearhouse_schedule_missed_fired_total[{R}]))", "missed, fired after recovery"),
            (f"sum(rate(gearhouse_schedule_claims_lost_total[{R}]))", "claimed by another server")], unit="short", w=8)
timeseries("Schedule lateness", "From a due time to its job's JOB_CREATED (after the durable write); the target is p99 under 50 ms",
           [(f"histogram_quantile({q}, sum by (le) (rate(gearhouse_schedule_lateness_seconds_bucket[{R}])))", f"p{int(q * 100)}") for q in (0.5, 0.99)], unit="s", w=6)
timeseries("Schedule errors", "Due times not fired: the claim in memcached failed, or the engine refused the job",
           [(f"sum by (reason) (rate(gearhouse_schedule_errors_total[{R}]))", "{{reason}}")], unit="short", w=6)

# ---- Tracing
row("Job traces (OTLP)")
timeseries("Spans exported and dropped", "Spans the collector accepted, and spans dropped (queue full, export failed, shutdown), per second",
           [(f"sum(rate(gearhouse_trace_spans_exported_total[{R}]))", "exported"),
            (f"sum by (reason) (rate(gearhouse_trace_spans_dropped_total[{R}]))", "dropped {{reason}}")], unit="short", w=8)
timeseries("Jobs followed for traces", "Traced jobs queued or running; sampled jobs not traced because the export queue was full (tracing.max_queue) or too many were followed (tracing.max_jobs_in_flight)",
           [("sum(gearhouse_trace_jobs_in_flight)", "in flight"),
            (f"sum by (reason) (rate(gearhouse_trace_jobs_untraced_total[{R}]))", "untraced / s {{reason}}")], w=8)
timeseries("Export time", "Time to send one batch of spans, 99th percentile",
           [(f"histogram_quantile(0.99, sum by (le) (rate(gearhouse_trace_export_seconds_bucket[{R}])))", "p99")], unit="s", w=8)
timeseries("Tail sampling decisions", "Finished jobs per second by decision and reason: failed, exception, requeued, dropped, refused and slow (tracing.slow_ms) jobs are always kept; ordinary jobs are kept at tracing.sample_ratio (reason ratio)",
           [(f"sum by (decision, reason) (rate(gearhouse_trace_jobs_sampled_total[{R}]))", "{{decision}} {{reason}}")], unit="short", w=24)

# ---- HTTP job submission
row("HTTP job submission")
timeseries("HTTP job requests by answer", "POST /jobs/{function} (submit), GET /jobs/{handle} (status) and gearmand's /FUNCTION paths, per second by status: 401 no token, 413 too large, 429 queue full, 502 failed job, 503 busy or not ready, 504 timeout, 507 not durable, 499 client hung up",
           [(f"sum by (route, status) (rate(gearhouse_http_job_requests_total[{R}]))", "{{route}} {{status}}")], unit="reqps", w=8)
timeseries("HTTP job requests in progress", "Requests being answered (a foreground request waits for its job); past http.max_concurrent_jobs new ones get 503. Kept: kept-alive HTTP connections holding their engine connection between requests (at most http.max_kept_connections; past it requests register per request). Open connections on the listener (at most http.max_connections) and those closed at once past it",
           [("sum by (route) (gearhouse_http_job_requests_in_flight)", "{{route}}"),
            ("sum(gearhouse_http_kept_connections)", "kept connections"),
            ("sum(gearhouse_http_connections)", "open connections"),
            (f"sum(rate(gearhouse_http_connections_refused_total[{R}]))", "connections refused/s")], w=8)
timeseries("HTTP job request time", "Arrival to answer (a foreground job's whole run), 50th and 99th percentile",
           [(f"histogram_quantile({q}, sum by (route, le) (rate(gearhouse_http_job_request_duration_seconds_bucket[{R}])))", f"p{int(q * 100)} {{{{route}}}}") for q in (0.5, 0.99)],
           unit="s", w=8)

# ---- Process
row("Process")
timeseries("Resident memory", "process_resident_memory_bytes",
           [(f"process_resident_memory_bytes {GH}", "{{instance}}")], unit="bytes", w=6)
timeseries("CPU", "CPU seconds per second (1 = one core)",
           [(f"rate(process_cpu_seconds_total[{R}]) {GH}", "{{instance}}")], unit="percentunit", w=6)
timeseries("Open file descriptors", "Open descriptors and the limit",
           [(f"process_open_fds {GH}", "open {{instance}}"),
            (f"process_max_fds {GH}", "limit {{instance}}")], w=6)
timeseries("Threads", "OS threads",
           [(f"process_threads {GH}", "{{instance}}")], w=6)

dashboard = {
    "annotations": {
        "list": [
            {
                "builtIn": 1,
                "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                "enable": True,
                "hide": True,
                "iconColor": "rgba(0, 211, 255, 1)",
                "name": "Annotations & Alerts",
                "type": "dashboard",
            }
        ]
    },
    "description": "gearhouse Gearman job server: throughput, queues, wait and run time, workers, failures, memcached mirror, recovery, traces, process",
    "editable": True,
    "fiscalYearStartMonth": 0,
    "graphTooltip": 1,
    "id": None,
    "links": [],
    "panels": panels,
    "refresh": "30s",
    "schemaVersion": 39,
    "tags": ["gearman", "gearhouse"],
    "templating": {
        "list": [
            {
                "current": {},
                "hide": 0,
                "includeAll": False,
                "label": "Data source",
                "multi": False,
                "name": "datasource",
                "options": [],
                "query": "prometheus",
                "refresh": 1,
                "regex": "",
                "skipUrlSync": False,
                "type": "datasource",
            },
            {
                "allValue": ".*",
                "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
                "datasource": DS,
                "definition": "label_values(gearman_jobs, function)",
                "hide": 0,
                "includeAll": True,
                "label": "Function",
                "multi": True,
                "name": "function",
                "options": [],
                "query": {
                    "qryType": 1,
                    "query": "label_values(gearman_jobs, function)",
                    "refId": "PrometheusVariableQueryEditor-VariableQuery",
                },
                "refresh": 2,
                "regex": "",
                "skipUrlSync": False,
                "sort": 1,
                "type": "query",
            },
        ]
    },
    "time": {"from": "now-1h", "to": "now"},
    "timepicker": {},
    "timezone": "",
    "title": "gearhouse",
    "uid": "gearhouse",
    "version": 1,
    "weekStart": "",
}

out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gearhouse.json")
with open(out, "w") as f:
    json.dump(dashboard, f, indent=2)
    f.write("\n")
print(f"wrote {out}: {sum(1 for p in panels if p['type'] != 'row')} panels")
