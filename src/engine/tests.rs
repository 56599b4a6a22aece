//! The engine as the synchronous state machine it is: fake connections (an outbound channel
//! each, read back from its receiver), requests as method calls, and tokio's paused clock for
//! epochs and CAN_DO_TIMEOUT.

use super::job::{Job, QueueRef};

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
