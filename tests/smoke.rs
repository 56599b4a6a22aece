//! The shortest end-to-end paths, spoken with the crate's own client: a background job
//! submitted before any worker exists is handed to the worker that arrives later (the PHP
//! tutorial's flow), and a foreground client receives its worker's WORK_* packets in order.

mod common;

use common::{client, TestServer};
use gearhouse::client::{Job, WorkEvent};
use gearhouse::protocol::{GrabKind, Priority};

#[tokio::test]
async fn background_job_waits_for_a_worker_then_runs() {
    let server = TestServer::start(&[]).await;
    let mut client = client(server.addr).await;
    let handle = client
        .submit_background(&Job::new("testFunction", br#"{"a":1}"#))
        .await
        .unwrap();
    assert!(handle.starts_with(b"H:test:"), "{handle:?}");

    let mut worker = common::client(server.addr).await;
    worker.can_do(b"testFunction").await.unwrap();
    let job = worker.grab(GrabKind::All).await.unwrap().expect("a job");
    assert_eq!(job.handle, handle);
    assert_eq!(&job.function[..], b"testFunction");
    assert_eq!(&job.data[..], br#"{"a":1}"#);
    assert_eq!(job.reducer, None);
    worker.complete(&job.handle, b"done").await.unwrap();
    assert_eq!(worker.grab(GrabKind::Plain).await.unwrap(), None);
    assert_eq!(
        client.admin("status").await.unwrap(),
        "testFunction\t0\t0\t1\n.\n"
    );
    server.stop().await;
}

#[tokio::test]
async fn foreground_client_gets_the_workers_packets_in_order() {
    let server = TestServer::start(&[]).await;
    let mut worker = client(server.addr).await;
    worker.can_do(b"rev").await.unwrap();
    worker.echo(b"registered").await.unwrap();
    let mut c = client(server.addr).await;
    let submit = tokio::spawn(async move {
        let job = Job::new("rev", "abc")
            .unique("u-1")
            .priority(Priority::High);
        c.submit(&job).await
    });
    let job = loop {
        if let Some(job) = worker.grab(GrabKind::Uniq).await.unwrap() {
            break job;
        }
        worker.pre_sleep().await.unwrap();
        worker.wait_noop().await.unwrap();
    };
    assert_eq!(&job.unique[..], b"u-1");
    worker.status(&job.handle, 1, 2).await.unwrap();
    worker
        .work(
            gearhouse::protocol::WorkKind::Data,
            &job.handle,
            &[b"partial"],
        )
        .await
        .unwrap();
    let reversed: Vec<u8> = job.data.iter().rev().copied().collect();
    worker.complete(&job.handle, &reversed).await.unwrap();
    let outcome = submit.await.unwrap().unwrap();
    assert_eq!(outcome.handle, job.handle);
    assert_eq!(
        outcome.events,
        [
            WorkEvent::Status {
                numerator: 1,
                denominator: 2
            },
            WorkEvent::Data("partial".into()),
            WorkEvent::Complete("cba".into()),
        ]
    );
    let status = worker.get_status(&job.handle).await.unwrap();
    assert!(!status.known, "{status:?}");
    server.stop().await;
}
