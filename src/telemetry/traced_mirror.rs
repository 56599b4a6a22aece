//! [`TracedMirror`]: wraps the durable mirror so each job's trace gets a `persist` span for the
//! write it waited for (from the hand-over to the mirror until the engine made the job
//! available). A wrapper rather than a hook in persistence, so persistence knows nothing of
//! tracing.

use std::sync::Arc;

use crate::engine::{JobRecord, Mirror, MirrorRefused};

use super::JobTracer;

/// The mirror with a `persist` span per durable write.
pub struct TracedMirror {
    inner: Arc<dyn Mirror>,
    tracer: Arc<JobTracer>,
}

impl TracedMirror {
    /// Wraps `inner`; writes it accepts are reported to `tracer`.
    pub fn wrap(inner: Arc<dyn Mirror>, tracer: Arc<JobTracer>) -> Arc<dyn Mirror> {
        Arc::new(TracedMirror { inner, tracer })
    }
}

/// The mirror the engine should use: wrapped for `persist` spans when tracing is on.
pub fn traced_mirror(
    mirror: Option<Arc<dyn Mirror>>,
    tracer: &Option<Arc<JobTracer>>,
) -> Option<Arc<dyn Mirror>> {
    match (mirror, tracer) {
        (Some(m), Some(t)) => Some(TracedMirror::wrap(m, t.clone())),
        (m, _) => m,
    }
}

impl Mirror for TracedMirror {
    fn write(&self, record: JobRecord) -> Result<(), MirrorRefused> {
        let seq = record.seq;
        let r = self.inner.write(record);
        if r.is_ok() {
            self.tracer.persist_started(seq);
        }
        r
    }

    fn delete(&self, seq: u64) {
        self.inner.delete(seq)
    }
}
