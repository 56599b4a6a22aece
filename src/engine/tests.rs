//! The engine as the synchronous state machine it is: fake connections (an outbound channel
//! each, read back from its receiver), requests as method calls, and tokio's paused clock for
//! epochs and CAN_DO_TIMEOUT. The durable mirror is a recording double here; the real memcached
//! path is covered by `tests/persistence/`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::job::{Job, QueueRef};
use super::{ConnId, Engine, EngineConfig, JobRecord, Mirror, MirrorRefused, SubmitOutcome};
use crate::codec::{split_args, PacketType, HEADER_LEN};
use crate::metrics::Metrics;
use crate::protocol::{ErrorCode, GrabKind, Priority, Submit, WorkKind};

/// The per-job footprint is what makes 1,000,000 queued jobs fit in well under 250 MB.
#[test]
fn job_struct_stays_small() {
    assert!(
        std::mem::size_of::<Job>() <= 80,
        "Job is {} bytes",
        std::mem::size_of::<Job>()
    );
    assert_eq!(std::mem::size_of::<QueueRef>(), 8);
}

// ---- harness ----

/// A response packet: its type and its arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Pkt {
    pub(super) kind: PacketType,
    args: Vec<Bytes>,
}

impl Pkt {
    pub(super) fn arg(&self, i: usize) -> &[u8] {
        &self.args[i]
    }
}

/// How many NUL-separated arguments each response type the engine sends carries.
fn arity(kind: PacketType) -> usize {
    use PacketType::*;
    match kind {
        NOOP | NO_JOB => 0,
        JOB_CREATED | WORK_FAIL => 1,
        ERROR | WORK_COMPLETE | WORK_DATA | WORK_WARNING | WORK_EXCEPTION => 2,
        JOB_ASSIGN => 3,
        JOB_ASSIGN_UNIQ => 4,
        STATUS_RES | JOB_ASSIGN_ALL => 5,
        STATUS_RES_UNIQUE => 6,
        other => panic!("unexpected response {other:?}"),
    }
}

/// Splits a buffer of whole response packets.
fn parse(buf: &[u8]) -> Vec<Pkt> {
    let mut out = Vec::new();
    let mut rest = Bytes::copy_from_slice(buf);
    while !rest.is_empty() {
        assert_eq!(&rest[..4], b"\0RES", "bad magic in {rest:?}");
        let kind = u32::from_be_bytes(rest[4..8].try_into().unwrap());
        let len = u32::from_be_bytes(rest[8..12].try_into().unwrap()) as usize;
        let kind = PacketType::try_from(kind).expect("known type");
        let body = rest.slice(HEADER_LEN..HEADER_LEN + len);
        let args = match arity(kind) {
            0 => Vec::new(),
            n => split_args(&body, n).expect("arguments"),
        };
        out.push(Pkt { kind, args });
        rest = rest.slice(HEADER_LEN + len..);
    }
    out
}

/// One fake connection: what the engine answers in `out`, and what it sends through `rx`.
pub(super) struct Peer {
    pub(super) id: ConnId,
    rx: mpsc::Receiver<Bytes>,
    kill: CancellationToken,
}

impl Peer {
    /// Server-initiated packets received so far.
    pub(super) fn received(&mut self) -> Vec<Pkt> {
        let mut v = Vec::new();
        while let Ok(b) = self.rx.try_recv() {
            v.extend(parse(&b));
        }
        v
    }
}

pub(super) fn engine_with(cfg: EngineConfig, mirror: Option<Arc<dyn Mirror>>) -> Engine {
    Engine::new(cfg, Arc::new(Metrics::new(100)), mirror, None)
}

fn engine() -> Engine {
    engine_with(EngineConfig::default(), None)
}

fn connect_with_queue(e: &Engine, queue: usize) -> Peer {
    let (tx, rx) = mpsc::channel(queue);
    let kill = CancellationToken::new();
    let id = e.connect("127.0.0.1:4730".parse().unwrap(), tx, kill.clone());
    Peer { id, rx, kill }
}

pub(super) fn connect(e: &Engine) -> Peer {
    connect_with_queue(e, 64)
}

pub(super) fn job(
    func: &str,
    unique: &str,
    data: &str,
    priority: Priority,
    background: bool,
) -> Submit {
    Submit {
        function: Bytes::copy_from_slice(func.as_bytes()),
        unique: Bytes::copy_from_slice(unique.as_bytes()),
        data: Bytes::copy_from_slice(data.as_bytes()),
        priority,
        background,
        epoch: None,
        reducer: None,
    }
}

/// Submits and returns the outcome with the packets written back to the submitter.
fn submit(e: &Engine, c: &Peer, s: Submit) -> (SubmitOutcome, Vec<Pkt>) {
    let mut out = BytesMut::new();
    let outcome = e.submit(c.id, s, &mut out);
    (outcome, parse(&out))
}

/// Submits a job that must be created at once; returns its handle.
pub(super) fn created(e: &Engine, c: &Peer, s: Submit) -> Bytes {
    let (outcome, pkts) = submit(e, c, s);
    assert_eq!(outcome, SubmitOutcome::Created, "{pkts:?}");
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].kind, PacketType::JOB_CREATED);
    pkts[0].args[0].clone()
}

pub(super) fn can_do(e: &Engine, w: &Peer, func: &str, timeout_ms: Option<u32>) {
    e.can_do(w.id, &Bytes::copy_from_slice(func.as_bytes()), timeout_ms)
        .unwrap();
}

/// GRAB_JOB_UNIQ: the assignment (handle, function, unique, data), or None for NO_JOB.
pub(super) fn grab(e: &Engine, w: &Peer) -> Option<Pkt> {
    let mut out = BytesMut::new();
    e.grab(w.id, GrabKind::Uniq, &mut out);
    let mut pkts = parse(&out);
    assert_eq!(pkts.len(), 1);
    let p = pkts.remove(0);
    match p.kind {
        PacketType::NO_JOB => None,
        PacketType::JOB_ASSIGN_UNIQ => Some(p),
        other => panic!("grab answered {other:?}"),
    }
}

/// Sends WORK_* for `handle` with `data`; returns what the worker got back.
pub(super) fn work(e: &Engine, w: &Peer, kind: WorkKind, handle: &[u8], data: &[u8]) -> Vec<Pkt> {
    let mut body = handle.to_vec();
    if kind != WorkKind::Fail {
        body.push(0);
        body.extend_from_slice(data);
    }
    let mut out = BytesMut::new();
    e.work(
        w.id,
        kind,
        &Bytes::copy_from_slice(handle),
        &Bytes::from(body),
        &mut out,
    );
    parse(&out)
}

fn stat(e: &Engine, func: &str) -> super::FunctionStat {
    e.function_stats()
        .into_iter()
        .find(|f| f.name == func)
        .unwrap_or_else(|| panic!("no function {func}"))
}

// ---- the job path ----

#[test]
fn a_foreground_job_goes_from_client_to_worker_and_its_result_back() {
    let e = engine();
    let mut client = connect(&e);
    let worker = connect(&e);
    can_do(&e, &worker, "resize", None);
    let handle = created(
        &e,
        &client,
        job("resize", "u1", "img", Priority::Normal, false),
    );
    assert_eq!(stat(&e, "resize").queued, [0, 1, 0]);

    let a = grab(&e, &worker).expect("a job");
    assert_eq!(
        a.args,
        [handle.clone(), "resize".into(), "u1".into(), "img".into()]
    );
    assert_eq!(
        (stat(&e, "resize").queued, stat(&e, "resize").running),
        ([0, 0, 0], 1)
    );
    assert_eq!(grab(&e, &worker), None);

    assert!(work(&e, &worker, WorkKind::Data, &handle, b"half").is_empty());
    assert!(work(&e, &worker, WorkKind::Complete, &handle, b"done").is_empty());
    let got = client.received();
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(
        (got[0].kind, got[0].arg(1)),
        (PacketType::WORK_DATA, &b"half"[..])
    );
    assert_eq!(
        (got[1].kind, got[1].arg(1)),
        (PacketType::WORK_COMPLETE, &b"done"[..])
    );
    assert!(e.jobs().is_empty());
    assert_eq!(stat(&e, "resize").running, 0);

    // The job is gone: a second result is refused with a typed code.
    let again = work(&e, &worker, WorkKind::Complete, &handle, b"again");
    assert_eq!(again[0].kind, PacketType::ERROR);
    assert_eq!(again[0].arg(0), ErrorCode::JobNotFound.as_str().as_bytes());
}

#[test]
fn priorities_are_served_high_normal_low_and_fifo_within_each() {
    let e = engine();
    let client = connect(&e);
    let worker = connect(&e);
    can_do(&e, &worker, "f", None);
    for (data, p) in [
        ("low-1", Priority::Low),
        ("normal-1", Priority::Normal),
        ("high-1", Priority::High),
        ("low-2", Priority::Low),
        ("high-2", Priority::High),
        ("normal-2", Priority::Normal),
    ] {
        created(&e, &client, job("f", "", data, p, true));
    }
    assert_eq!(stat(&e, "f").queued, [2, 2, 2]);
    let order: Vec<Bytes> = std::iter::from_fn(|| grab(&e, &worker))
        .map(|a| a.args[3].clone())
        .collect();
    assert_eq!(
        order,
        ["high-1", "high-2", "normal-1", "normal-2", "low-1", "low-2"]
    );
}

#[test]
fn submits_with_one_unique_id_coalesce_and_every_waiting_client_gets_the_result() {
    let e = engine();
    let mut a = connect(&e);
    let mut b = connect(&e);
    let worker = connect(&e);
    can_do(&e, &worker, "f", None);
    let h1 = created(&e, &a, job("f", "same", "x", Priority::Normal, false));
    let h2 = created(&e, &b, job("f", "same", "y", Priority::High, false));
    let h3 = created(&e, &b, job("f", "same", "z", Priority::Low, true));
    assert_eq!((&h1, &h1), (&h2, &h3));
    // The same unique in another function, and empty uniques, never coalesce.
    let other = created(&e, &a, job("g", "same", "x", Priority::Normal, true));
    let e1 = created(&e, &a, job("f", "", "x", Priority::Normal, true));
    let e2 = created(&e, &a, job("f", "", "x", Priority::Normal, true));
    assert!(other != h1 && e1 != e2 && e1 != h1);
    assert_eq!(stat(&e, "f").queued, [0, 3, 0]);
    assert_eq!(e.uniques(), [Bytes::from("same"), Bytes::from("same")]);

    let assigned = grab(&e, &worker).unwrap();
    assert_eq!((assigned.arg(0), assigned.arg(3)), (&h1[..], &b"x"[..]));
    work(&e, &worker, WorkKind::Complete, &h1, b"r");
    for c in [&mut a, &mut b] {
        let got = c.received();
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(
            (got[0].kind, got[0].arg(1)),
            (PacketType::WORK_COMPLETE, &b"r"[..])
        );
    }
}

#[test]
fn a_job_goes_back_to_the_queue_when_its_worker_leaves_and_is_dropped_after_job_retries() {
    let cfg = EngineConfig {
        job_retries: 2,
        ..Default::default()
    };
    let e = engine_with(cfg, None);
    let mut client = connect(&e);
    let handle = created(&e, &client, job("f", "", "d", Priority::Normal, false));

    let w1 = connect(&e);
    can_do(&e, &w1, "f", None);
    assert_eq!(grab(&e, &w1).unwrap().arg(0), &handle[..]);
    e.disconnect(w1.id);
    let jobs = e.jobs();
    assert_eq!((jobs.len(), jobs[0].queued, jobs[0].attempts), (1, true, 1));
    assert_eq!(stat(&e, "f").workers, 0);

    let w2 = connect(&e);
    can_do(&e, &w2, "f", None);
    assert_eq!(grab(&e, &w2).unwrap().arg(0), &handle[..]);
    assert!(client.received().is_empty());
    // The second attempt is the last one engine.job_retries allows.
    e.reset_abilities(w2.id);
    assert!(e.jobs().is_empty());
    let got = client.received();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(
        (got[0].kind, got[0].arg(0)),
        (PacketType::WORK_FAIL, &handle[..])
    );
}

#[test]
fn a_foreground_job_whose_client_left_is_cancelled_not_run() {
    let e = engine();
    let client = connect(&e);
    let worker = connect(&e);
    created(&e, &client, job("f", "", "d", Priority::Normal, false));
    e.disconnect(client.id);
    can_do(&e, &worker, "f", None);
    assert_eq!(grab(&e, &worker), None);
    assert!(e.jobs().is_empty());
}

/// The abandoned-foreground loop: clients that leave before any worker exists cancel their
/// jobs, and the queue entries those jobs leave behind are compacted, with live jobs kept in
/// FIFO order through the compactions.
#[test]
fn abandoned_foreground_jobs_leave_no_queue_entries_behind() {
    let e = engine();
    let keeper = connect(&e);
    let mut kept = Vec::new();
    for round in 0..50 {
        let client = connect(&e);
        for i in 0..1_000 {
            created(
                &e,
                &client,
                job("f", "", &format!("{round}.{i}"), Priority::Normal, false),
            );
        }
        // One live background job per round, behind the abandoned ones.
        kept.push(created(
            &e,
            &keeper,
            job("f", "", &format!("kept {round}"), Priority::Normal, true),
        ));
        e.disconnect(client.id);
    }
    let t = e.totals();
    assert_eq!(t.jobs, 50, "only the background jobs are left");
    assert!(
        t.queue_entries <= 2 * 50 + 64 + 1,
        "50,000 abandoned jobs left {} queue entries for 50 live ones",
        t.queue_entries
    );
    let worker = connect(&e);
    can_do(&e, &worker, "f", None);
    let order: Vec<Bytes> = (0..50)
        .map(|_| grab(&e, &worker).expect("a kept job").args[0].clone())
        .collect();
    assert_eq!(order, kept, "FIFO order survives compaction");
    assert_eq!(grab(&e, &worker), None);
}

#[test]
fn a_full_queue_refuses_submits_at_that_priority_only() {
    let e = engine();
    let client = connect(&e);
    e.set_max_queue(&Bytes::from("f"), [1, 1, 0]).unwrap();
    created(&e, &client, job("f", "", "1", Priority::Normal, true));
    let (outcome, pkts) = submit(&e, &client, job("f", "", "2", Priority::Normal, true));
    assert_eq!(outcome, SubmitOutcome::Refused);
    assert_eq!(pkts[0].kind, PacketType::ERROR);
    assert_eq!(pkts[0].arg(0), b"QUEUE_ERROR");
    assert!(std::str::from_utf8(pkts[0].arg(1))
        .unwrap()
        .contains("is full (1 jobs)"));
    created(&e, &client, job("f", "", "3", Priority::High, true));
    // 0 = no limit.
    for _ in 0..5 {
        created(&e, &client, job("f", "", "l", Priority::Low, true));
    }
    assert_eq!(stat(&e, "f").queued, [1, 1, 5]);
    let refused =
        e.metrics()
            .jobs_refused
            .with_label_values(&["f", "queue_full", "normal", "background"]);
    assert_eq!(refused.get(), 1);
}

#[test]
fn a_new_function_past_max_functions_is_refused() {
    let cfg = EngineConfig {
        max_functions: 1,
        ..Default::default()
    };
    let e = engine_with(cfg, None);
    let client = connect(&e);
    created(&e, &client, job("a", "", "", Priority::Normal, true));
    let (outcome, pkts) = submit(&e, &client, job("b", "", "", Priority::Normal, true));
    assert_eq!(outcome, SubmitOutcome::Refused);
    assert!(std::str::from_utf8(pkts[0].arg(1))
        .unwrap()
        .contains("engine.max_functions"));
    let err = e
        .can_do(connect(&e).id, &Bytes::from("c"), None)
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::QueueError);
}

#[test]
fn admin_mutations_answer_with_typed_codes() {
    let e = engine();
    let client = connect(&e);
    let worker = connect(&e);
    let missing = e.cancel_job(&Bytes::from("H:gearhouse:99")).unwrap_err();
    assert_eq!(missing.code, ErrorCode::JobNotFound);
    let queued = created(&e, &client, job("f", "", "a", Priority::Normal, true));
    let running = created(&e, &client, job("f", "", "b", Priority::High, true));
    can_do(&e, &worker, "f", None);
    assert_eq!(grab(&e, &worker).unwrap().arg(0), &running[..]);
    assert_eq!(
        e.cancel_job(&running).unwrap_err().code,
        ErrorCode::JobRunning
    );
    assert_eq!(
        e.drop_function(&Bytes::from("f")).unwrap_err().code,
        ErrorCode::FunctionInUse
    );
    e.cancel_job(&queued).unwrap();
    assert_eq!(e.jobs().len(), 1);
    assert_eq!(
        e.drop_function(&Bytes::from("nope")).unwrap_err().code,
        ErrorCode::UnknownFunction
    );
}

// ---- timers, on tokio's paused clock ----

fn epoch_job(func: &str, epoch: u64) -> Submit {
    Submit {
        epoch: Some(epoch),
        ..job(func, "", "later", Priority::Normal, true)
    }
}

#[tokio::test(start_paused = true)]
async fn an_epoch_job_becomes_due_when_the_clock_reaches_its_second() {
    let e = engine();
    let client = connect(&e);
    let worker = connect(&e);
    can_do(&e, &worker, "f", None);
    let now = e.shared.clock.unix_secs();
    created(&e, &client, epoch_job("f", now + 60));
    created(&e, &client, epoch_job("f", now.saturating_sub(5)));
    // A past epoch runs at once; the future one waits.
    assert_eq!(grab(&e, &worker).unwrap().arg(3), b"later");
    work(&e, &worker, WorkKind::Complete, &e.handle_of(2), b"");
    assert_eq!(stat(&e, "f").scheduled, 1);
    assert_eq!(e.totals().epoch_waiting, 1);

    tokio::time::advance(Duration::from_secs(59)).await;
    e.fire_timers();
    assert_eq!(grab(&e, &worker), None);
    assert_eq!(stat(&e, "f").scheduled, 1);

    tokio::time::advance(Duration::from_secs(1)).await;
    e.fire_timers();
    assert_eq!(stat(&e, "f").scheduled, 0);
    assert_eq!(grab(&e, &worker).unwrap().arg(0), &e.handle_of(1)[..]);
}

#[tokio::test(start_paused = true)]
async fn the_timer_task_wakes_a_sleeping_worker_when_an_epoch_job_is_due() {
    let e = engine();
    let client = connect(&e);
    let mut worker = connect(&e);
    can_do(&e, &worker, "f", None);
    let mut out = BytesMut::new();
    e.pre_sleep(worker.id, &mut out);
    assert!(out.is_empty(), "no work yet: the worker sleeps");
    let shutdown = CancellationToken::new();
    let timers = tokio::spawn(e.clone().run_timers(shutdown.clone()));
    let due = e.shared.clock.unix_secs() + 30;
    created(&e, &client, epoch_job("f", due));

    tokio::time::advance(Duration::from_secs(29)).await;
    tokio::task::yield_now().await;
    assert!(worker.received().is_empty(), "woken before the epoch");
    // The paused runtime moves the clock to the timer's deadline once everything is idle.
    let noop = worker.rx.recv().await.expect("a wake-up");
    assert_eq!(parse(&noop)[0].kind, PacketType::NOOP);
    assert!(e.shared.clock.unix_secs() >= due);
    assert!(grab(&e, &worker).is_some());
    shutdown.cancel();
    timers.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_worker_past_its_can_do_timeout_fails_the_job() {
    let e = engine();
    let mut client = connect(&e);
    let slow = connect(&e);
    // Under 1000 ms counts as 1000 ms, as in gearmand.
    can_do(&e, &slow, "f", Some(200));
    let handle = created(&e, &client, job("f", "", "d", Priority::Normal, false));
    tokio::time::advance(Duration::from_millis(250)).await;
    assert!(grab(&e, &slow).is_some());

    tokio::time::advance(Duration::from_millis(999)).await;
    e.fire_timers();
    assert_eq!(e.jobs().len(), 1, "failed before the timeout");
    assert!(client.received().is_empty());

    // At the timeout the job fails (not requeued: a worker slower than its own timeout would
    // take it again and again): the client gets WORK_FAIL, the late result JOB_NOT_FOUND.
    tokio::time::advance(Duration::from_millis(1)).await;
    e.fire_timers();
    assert!(e.jobs().is_empty());
    let got = client.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].kind, PacketType::WORK_FAIL);
    assert_eq!(got[0].arg(0), &handle[..]);
    let late = work(&e, &slow, WorkKind::Complete, &handle, b"late");
    assert_eq!(late[0].arg(0), b"JOB_NOT_FOUND");
    let label = stat(&e, "f").label;
    let m = e.metrics();
    assert_eq!(m.jobs_timed_out.with_label_values(&[&label]).get(), 1);
    assert_eq!(
        m.jobs_failed
            .with_label_values(&[&label, "normal", "foreground"])
            .get(),
        1
    );
    // Queue wait and run time on the same paused clock.
    let waited = m.job_queued_seconds.with_label_values(&[&label]);
    assert!((waited.get_sample_sum() - 0.25).abs() < 1e-6);
    let ran = m.job_running_seconds.with_label_values(&[&label]);
    assert!(
        (ran.get_sample_sum() - 1.0).abs() < 1e-6,
        "{}",
        ran.get_sample_sum()
    );
}

// ---- the durable mirror's acknowledgements ----

/// Records what the engine asks of the mirror; refuses writes while `refuse` is set.
#[derive(Default)]
struct RecordingMirror {
    writes: Mutex<Vec<JobRecord>>,
    deletes: Mutex<Vec<u64>>,
    refuse: Mutex<Option<String>>,
}

impl Mirror for RecordingMirror {
    fn write(&self, record: JobRecord) -> Result<(), MirrorRefused> {
        if let Some(why) = self.refuse.lock().unwrap().clone() {
            return Err(MirrorRefused(why));
        }
        self.writes.lock().unwrap().push(record);
        Ok(())
    }
    fn delete(&self, seq: u64) {
        self.deletes.lock().unwrap().push(seq);
    }
}

fn durable_engine() -> (Engine, Arc<RecordingMirror>) {
    let m = Arc::new(RecordingMirror::default());
    let e = engine_with(EngineConfig::default(), Some(m.clone() as Arc<dyn Mirror>));
    (e, m)
}

#[test]
fn a_background_job_is_acknowledged_and_queued_only_once_its_write_is_durable() {
    let (e, m) = durable_engine();
    let mut client = connect(&e);
    let mut joiner = connect(&e);
    let worker = connect(&e);
    can_do(&e, &worker, "f", None);
    let (outcome, pkts) = submit(&e, &client, job("f", "u", "d", Priority::Low, true));
    assert_eq!((outcome, pkts.len()), (SubmitOutcome::Pending, 0));
    // A second submit with the same unique waits for the same write.
    let (outcome, _) = submit(&e, &joiner, job("f", "u", "d", Priority::Low, true));
    assert_eq!(outcome, SubmitOutcome::Pending);
    let written = m.writes.lock().unwrap().clone();
    assert_eq!(written.len(), 1);
    assert_eq!(
        (
            &written[0].function[..],
            &written[0].data[..],
            written[0].priority
        ),
        (&b"f"[..], &b"d"[..], Priority::Low)
    );
    assert_eq!(grab(&e, &worker), None, "not visible before the write");

    e.persisted(written[0].seq, Ok(()));
    let handle = e.handle_of(written[0].seq);
    for c in [&mut client, &mut joiner] {
        let got = c.received();
        assert_eq!(
            (got[0].kind, got[0].arg(0)),
            (PacketType::JOB_CREATED, &handle[..])
        );
    }
    assert_eq!(grab(&e, &worker).unwrap().arg(0), &handle[..]);
    work(&e, &worker, WorkKind::Complete, &handle, b"");
    assert_eq!(*m.deletes.lock().unwrap(), [written[0].seq]);
}

#[test]
fn a_failed_or_refused_write_answers_queue_error_and_leaves_no_job() {
    let (e, m) = durable_engine();
    let mut client = connect(&e);
    submit(&e, &client, job("f", "", "d", Priority::Normal, true));
    let seq = m.writes.lock().unwrap()[0].seq;
    e.persisted(seq, Err(MirrorRefused("memcached is out of memory".into())));
    let got = client.received();
    assert_eq!(
        (got[0].kind, got[0].arg(0)),
        (PacketType::ERROR, &b"QUEUE_ERROR"[..])
    );
    assert_eq!(got[0].arg(1), b"memcached is out of memory");
    assert!(e.jobs().is_empty());
    // A copy that reached some node before the failure must not come back at recovery.
    assert_eq!(*m.deletes.lock().unwrap(), [seq]);

    // A write that answers after its job was cancelled is deleted, not resurrected.
    submit(&e, &client, job("f", "", "d", Priority::Normal, true));
    let seq = m.writes.lock().unwrap()[1].seq;
    e.cancel_job(&e.handle_of(seq)).unwrap();
    e.persisted(seq, Ok(()));
    assert!(m.deletes.lock().unwrap().contains(&seq));

    *m.refuse.lock().unwrap() = Some("every node is down (persistence.nodes)".into());
    let (outcome, pkts) = submit(&e, &client, job("f", "", "d", Priority::Normal, true));
    assert_eq!(outcome, SubmitOutcome::Refused);
    assert_eq!(pkts[0].arg(1), b"every node is down (persistence.nodes)");
    let not_durable =
        e.metrics()
            .jobs_refused
            .with_label_values(&["f", "not_durable", "normal", "background"]);
    assert_eq!(not_durable.get(), 2);
}

#[test]
fn restored_jobs_keep_their_handles_and_later_ones_continue_after_them() {
    let (e, m) = durable_engine();
    let record = |seq, unique: &str| JobRecord {
        seq,
        function: Bytes::from("f"),
        unique: Bytes::copy_from_slice(unique.as_bytes()),
        data: Bytes::from("d"),
        priority: Priority::High,
        epoch: None,
        reducer: None,
        attempts: 1,
        handle: None,
    };
    let n = e.restore(vec![record(7, "a"), record(3, ""), record(9, "a")], 5);
    assert_eq!(n, 2, "the duplicate unique is dropped");
    assert_eq!(*m.deletes.lock().unwrap(), [9]);
    assert_eq!(e.next_seq(), 8);
    let worker = connect(&e);
    can_do(&e, &worker, "f", None);
    assert_eq!(grab(&e, &worker).unwrap().arg(0), &e.handle_of(3)[..]);
    assert_eq!(e.persisted_records(&[3, 7, 9]).len(), 2);
}

// ---- connections that do not read, and logging outside the lock ----

/// Records, for each event, whether the engine lock was free when it was written.
struct LockProbe {
    engine: Engine,
    lock_free: Arc<Mutex<Vec<bool>>>,
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for LockProbe {
    fn on_event(&self, _: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let free = self.engine.shared.state.try_lock().is_ok();
        self.lock_free.lock().unwrap().push(free);
    }
}

#[test]
fn a_client_that_does_not_read_is_closed_and_logged_after_the_lock_is_released() {
    use tracing_subscriber::layer::SubscriberExt;
    let cfg = EngineConfig {
        job_retries: 1,
        ..Default::default()
    };
    let e = engine_with(cfg, None);
    let lock_free = Arc::new(Mutex::new(Vec::new()));
    let probe = LockProbe {
        engine: e.clone(),
        lock_free: lock_free.clone(),
    };
    let subscriber = tracing_subscriber::registry().with(probe);
    tracing::subscriber::with_default(subscriber, || {
        let client = connect_with_queue(&e, 1);
        let worker = connect(&e);
        can_do(&e, &worker, "f", None);
        let handle = created(&e, &client, job("f", "", "d", Priority::Normal, false));
        grab(&e, &worker).unwrap();
        work(&e, &worker, WorkKind::Data, &handle, b"1");
        assert!(!client.kill.is_cancelled());
        work(&e, &worker, WorkKind::Data, &handle, b"2");
        assert!(client.kill.is_cancelled(), "outbound queue full: closed");
        // Dropped after engine.job_retries attempts: another warning.
        e.disconnect(worker.id);
    });
    // The WORK_FAIL of the dropped job found the client's queue still full: a second overflow.
    assert_eq!(e.metrics().connections_overflowed.get(), 2);
    let seen = lock_free.lock().unwrap().clone();
    assert!(seen.len() >= 3, "expected three warnings, saw {seen:?}");
    assert!(
        seen.iter().all(|&free| free),
        "logged under the lock: {seen:?}"
    );
}

#[test]
fn work_exception_reaches_only_clients_that_asked_unless_the_server_forwards_it_to_all() {
    for forward_all in [false, true] {
        let cfg = EngineConfig {
            exceptions: forward_all,
            ..Default::default()
        };
        let e = engine_with(cfg, None);
        let mut client = connect(&e);
        let handle = created(&e, &client, job("f", "", "d", Priority::Normal, false));
        let w = connect(&e);
        can_do(&e, &w, "f", None);
        assert!(grab(&e, &w).is_some());
        work(&e, &w, WorkKind::Exception, &handle, b"boom");
        let got: Vec<PacketType> = client.received().iter().map(|p| p.kind).collect();
        // Without OPTION_REQ exceptions the client sees only the failure, unless the server
        // forwards exceptions to everyone (gearmand's --exceptions, engine.exceptions).
        let want = if forward_all {
            vec![PacketType::WORK_EXCEPTION]
        } else {
            vec![PacketType::WORK_FAIL]
        };
        assert_eq!(got, want, "engine.exceptions = {forward_all}");
    }
}
