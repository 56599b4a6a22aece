//! The shortest end-to-end path: a background job submitted before any worker exists is
//! handed to the worker that arrives later (the PHP tutorial's flow, in raw bytes).

mod common;

use common::TestServer;
use gearhouse::codec::PacketType::*;

#[tokio::test]
async fn background_job_waits_for_a_worker_then_runs() {
    let server = TestServer::start(&[]).await;
    let mut client = server.connect().await;
    let handle = client
        .submit(SUBMIT_JOB_BG, "testFunction", "", br#"{"a":1}"#)
        .await;
    assert!(handle.starts_with("H:test:"), "{handle}");

    let mut worker = server.connect().await;
    worker.send(CAN_DO, &[b"testFunction"]).await;
    worker.send(GRAB_JOB_ALL, &[]).await;
    let assign = worker.expect(JOB_ASSIGN_UNIQ).await;
    assert_eq!(assign.arg(0), handle);
    assert_eq!(assign.arg(1), "testFunction");
    assert_eq!(assign.arg(3), r#"{"a":1}"#);
    worker
        .send(WORK_COMPLETE, &[handle.as_bytes(), b"done"])
        .await;
    worker.send(GRAB_JOB, &[]).await;
    worker.expect(NO_JOB).await;
    assert_eq!(client.admin("status").await, "testFunction\t0\t0\t1\n.\n");
    server.stop().await;
}
