//! Traces at a real OTLP receiver: a requeued job is one trace with two attempts; a hung
//! collector drops spans and never slows jobs.

use super::*;

/// One job, requeued once (its first worker disconnects mid-job) and then completed, arrives at
/// a real OTLP receiver as one trace: a root span, a queue span per wait, an attempt span per
/// worker; with the messaging and gearman attributes; log lines about the job carry its trace id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requeued_job_is_one_trace_with_two_attempts() {
    let rx = otlp_receiver(Behaviour::Accept).await;
    let endpoint = format!("http://{}", rx.addr);
    let server = BinServer::start(
        &["--log-level", "info"],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_SERVICE_NAME", "gearhouse-under-test"),
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
            ("GEARHOUSE_LOG__FORMAT", "json"),
        ],
    );
    let addr = server.addr();

    let mut client = Conn::connect(addr).await;
    client.send(SET_CLIENT_ID, &[b"client-7"]).await;
    let handle = client
        .submit(SUBMIT_JOB_HIGH, "traced", "u-1", b"payload")
        .await;

    let mut first = worker(addr, "worker-a", "traced").await;
    let a = grab(&mut first).await;
    assert_eq!(a.arg(0), handle);
    drop(first); // the worker dies holding the job: it goes back to the queue

    let mut second = worker(addr, "worker-b", "traced").await;
    let a = grab(&mut second).await;
    assert_eq!(a.arg(0), handle);
    second
        .send(WORK_COMPLETE, &[handle.as_bytes(), b"done"])
        .await;
    let done = client.expect(WORK_COMPLETE).await;
    assert_eq!(done.arg(1), "done");

    let spans = trace_of(&rx, &handle, Duration::from_secs(20)).await;
    let roots: Vec<&Span> = spans
        .iter()
        .filter(|s| s.parent_span_id.is_empty())
        .collect();
    assert_eq!(roots.len(), 1, "one root span: {spans:#?}");
    let root = roots[0];
    assert_eq!(root.name, "job traced");
    for s in &spans {
        if !std::ptr::eq(s, root) {
            assert_eq!(
                s.parent_span_id, root.span_id,
                "{} is a child of the root",
                s.name
            );
            assert!(
                s.start_time_unix_nano >= root.start_time_unix_nano,
                "{} starts inside the root",
                s.name
            );
            assert!(
                s.end_time_unix_nano <= root.end_time_unix_nano,
                "{} ends inside the root",
                s.name
            );
        }
    }
    let a = &root.attributes;
    assert_eq!(str_attr(a, "messaging.system").as_deref(), Some("gearman"));
    assert_eq!(
        str_attr(a, "messaging.destination.name").as_deref(),
        Some("traced")
    );
    assert_eq!(
        str_attr(a, "messaging.operation.type").as_deref(),
        Some("send")
    );
    assert_eq!(
        str_attr(a, "gearman.handle").as_deref(),
        Some(handle.as_str())
    );
    assert_eq!(str_attr(a, "gearman.unique").as_deref(), Some("u-1"));
    assert_eq!(str_attr(a, "gearman.priority").as_deref(), Some("high"));
    assert_eq!(bool_attr(a, "gearman.background"), Some(false));
    assert_eq!(
        str_attr(a, "gearman.client_id").as_deref(),
        Some("client-7")
    );
    assert_eq!(
        str_attr(a, "gearman.worker_id").as_deref(),
        Some("worker-b")
    );
    assert_eq!(str_attr(a, "gearman.outcome").as_deref(), Some("complete"));
    assert_eq!(int_attr(a, "gearman.attempts"), Some(2));
    assert_ne!(status_code(root), StatusCode::Error as i32);

    let mut queues: Vec<&Span> = spans.iter().filter(|s| s.name == "queue traced").collect();
    let mut attempts: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name == "attempt traced")
        .collect();
    queues.sort_by_key(|s| s.start_time_unix_nano);
    attempts.sort_by_key(|s| s.start_time_unix_nano);
    assert_eq!(queues.len(), 2, "a wait before each attempt: {spans:#?}");
    assert_eq!(attempts.len(), 2, "two attempts: {spans:#?}");
    assert_eq!(spans.len(), 5, "root + 2 waits + 2 attempts");
    // queue 1 → attempt 1 → queue 2 → attempt 2, in time order.
    assert!(queues[0].end_time_unix_nano <= attempts[0].start_time_unix_nano);
    assert!(attempts[0].end_time_unix_nano <= queues[1].start_time_unix_nano);
    assert!(queues[1].end_time_unix_nano <= attempts[1].start_time_unix_nano);
    let (a1, a2) = (&attempts[0].attributes, &attempts[1].attributes);
    assert_eq!(int_attr(a1, "gearman.attempt"), Some(1));
    assert_eq!(
        str_attr(a1, "gearman.worker_id").as_deref(),
        Some("worker-a")
    );
    assert_eq!(
        str_attr(a1, "gearman.requeue_reason").as_deref(),
        Some("worker disconnected")
    );
    assert_eq!(
        status_code(attempts[0]),
        StatusCode::Error as i32,
        "a lost attempt is an error"
    );
    assert_eq!(int_attr(a2, "gearman.attempt"), Some(2));
    assert_eq!(
        str_attr(a2, "gearman.worker_id").as_deref(),
        Some("worker-b")
    );
    assert_eq!(
        str_attr(a2, "messaging.operation.type").as_deref(),
        Some("process")
    );
    assert_ne!(status_code(attempts[1]), StatusCode::Error as i32);
    for s in queues.iter().chain(&attempts) {
        assert_eq!(
            str_attr(&s.attributes, "messaging.system").as_deref(),
            Some("gearman")
        );
        assert_eq!(
            str_attr(&s.attributes, "gearman.handle").as_deref(),
            Some(handle.as_str())
        );
    }
    let service = rx.got.lock().unwrap().spans[0].0.clone();
    assert_eq!(
        service, "gearhouse-under-test",
        "OTEL_SERVICE_NAME is the resource's service.name"
    );

    // A failing job ends with an error status on its root and on its attempt.
    let failing = client.submit(SUBMIT_JOB_BG, "traced", "", b"x").await;
    let a = grab(&mut second).await;
    assert_eq!(a.arg(0), failing);
    second.send(WORK_FAIL, &[failing.as_bytes()]).await;
    let spans = trace_of(&rx, &failing, Duration::from_secs(20)).await;
    let root = spans.iter().find(|s| s.parent_span_id.is_empty()).unwrap();
    assert_eq!(status_code(root), StatusCode::Error as i32);
    assert_eq!(
        bool_attr(&root.attributes, "gearman.background"),
        Some(true)
    );
    assert_eq!(
        str_attr(&root.attributes, "gearman.priority").as_deref(),
        Some("normal")
    );
    let attempt = spans.iter().find(|s| s.name == "attempt traced").unwrap();
    assert_eq!(status_code(attempt), StatusCode::Error as i32);

    // The log line about the lost attempt carries the job's trace id.
    let trace_id = hex(&roots_trace_id(&rx, &handle));
    let log = server.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("job attempt ended without a result"))
        .unwrap_or_else(|| panic!("no requeue log line in:\n{log}"));
    let v: serde_json::Value = serde_json::from_str(line).expect("json log line");
    assert_eq!(v["trace_id"], trace_id.as_str(), "{line}");
    assert_eq!(v["handle"], handle.as_str(), "{line}");
    assert_eq!(v["reason"], "worker disconnected", "{line}");
    assert_eq!(
        v["span_id"],
        hex(&attempts[0].span_id).as_str(),
        "the span id of the lost attempt: {line}"
    );

    let exported = wait_metric(
        server.http_addr(),
        "gearhouse_trace_spans_exported_total",
        |v| v >= 8.0,
        Duration::from_secs(10),
    )
    .await;
    assert!(exported >= 8.0);
}

fn roots_trace_id(rx: &Receiver, handle: &str) -> Vec<u8> {
    let g = rx.got.lock().unwrap();
    g.spans
        .iter()
        .find(|(_, s)| {
            s.parent_span_id.is_empty()
                && str_attr(&s.attributes, "gearman.handle").as_deref() == Some(handle)
        })
        .map(|(_, s)| s.trace_id.clone())
        .expect("root span")
}

/// A collector that never answers costs traces, not jobs: with a tiny export queue, jobs keep
/// completing at once and the jobs that did not fit are counted as not traced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_collector_drops_spans_and_never_slows_jobs() {
    let rx = otlp_receiver(Behaviour::Hang).await;
    let endpoint = format!("http://{}", rx.addr);
    let server = BinServer::start(
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "10"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "30000"),
            ("GEARHOUSE_TRACING__MAX_QUEUE", "16"),
            // Every job is exported, so the first batch already meets the hung collector.
            ("OTEL_TRACES_SAMPLER", "always_on"),
        ],
    );
    let addr = server.addr();
    let mut client = Conn::connect(addr).await;
    let mut w = worker(addr, "w", "hung").await;
    let started = Instant::now();
    const JOBS: usize = 200;
    for i in 0..JOBS {
        let h = client
            .submit(SUBMIT_JOB_BG, "hung", "", i.to_string().as_bytes())
            .await;
        w.send(GRAB_JOB, &[]).await;
        let a = w.expect(JOB_ASSIGN).await;
        assert_eq!(a.arg(0), h);
        w.send(WORK_COMPLETE, &[h.as_bytes(), b""]).await;
    }
    // The worker's last completion is processed before its next grab is answered.
    w.send(GRAB_JOB, &[]).await;
    w.expect(NO_JOB).await;
    let status = client.admin("status").await;
    assert_eq!(status, "hung\t0\t0\t1\n.\n");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(10), "{JOBS} jobs took {took:?}");
    let untraced = metric(
        server.http_addr(),
        "gearhouse_trace_jobs_untraced_total{reason=\"queue_full\"}",
    )
    .await;
    // Each job is 4 events (submitted, queued, assigned, finished); at most 16 wait for the
    // stuck export thread, and it holds at most a few jobs: the rest are not traced.
    assert!(untraced >= (JOBS - 16) as f64, "untraced {untraced}");
    assert_eq!(rx.got.lock().unwrap().requests, 0);
    assert_eq!(
        metric(server.http_addr(), "gearhouse_trace_spans_exported_total").await,
        0.0
    );
}
