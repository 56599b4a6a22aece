//! Polling a connection's reader only when it can have news.
//!
//! A connection task wakes for many reasons besides its socket (a packet for it from another
//! connection, a kill, a timer), and `tokio::select!` polls every branch on every wake. A reader
//! with nothing to read answers `Pending` cheaply in clear text, but over TLS each such poll is a
//! pass through tokio-rustls and rustls's record layer, several times per job (callgrind, 2,500
//! foreground round trips over TLS: 4 fewer polls per round trip with the gate, 1,561 fewer
//! instructions). [`ReadGate`] polls the reader with a waker of its own and remembers
//! whether that waker fired since the reader last said `Pending`; when it did not, the poll is
//! skipped, as the `Future`/`Stream` contract allows (a pending poll need not be repeated until
//! its waker is called). This is what `FuturesUnordered` does for each of its futures, for one
//! reader.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures::task::AtomicWaker;

/// Every poll of the reader must go through [`ReadGate::poll`], or the reader registers a waker
/// the gate never sees and the gate stays shut.
pub(super) struct ReadGate {
    shared: Arc<Shared>,
    /// `shared` as a waker, made once.
    waker: Waker,
}

struct Shared {
    /// The reader may have news: its last poll was `Ready`, or its waker fired since.
    open: AtomicBool,
    /// The connection task, woken when the reader's waker fires.
    task: AtomicWaker,
}

impl Wake for Shared {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.open.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl ReadGate {
    pub(super) fn new() -> ReadGate {
        let shared = Arc::new(Shared {
            open: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        ReadGate {
            waker: Waker::from(shared.clone()),
            shared,
        }
    }

    /// Runs `poll` (one poll of the reader) if the reader may have news, with the gate's waker in
    /// its context; `Pending` without running it otherwise.
    pub(super) fn poll<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: impl FnOnce(&mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        // Register first: a wake landing after the check in `now` then wakes this task.
        self.shared.task.register(cx.waker());
        match self.now(poll) {
            Some(answer) => Poll::Ready(answer),
            None => Poll::Pending,
        }
    }

    /// [`ReadGate::poll`] for a task that reads on without waiting (the frames after the first
    /// in one turn): the reader's answer if it may have news and has one now. The task is not
    /// registered: it is running, and polls through [`ReadGate::poll`] before it waits.
    pub(super) fn now<T>(&mut self, poll: impl FnOnce(&mut Context<'_>) -> Poll<T>) -> Option<T> {
        if !self.shared.open.swap(false, Ordering::AcqRel) {
            return None;
        }
        match poll(&mut Context::from_waker(&self.waker)) {
            Poll::Ready(answer) => {
                // A reader that answered may have more (a buffered frame, unread bytes); only a
                // `Pending` promises a wake.
                self.shared.open.store(true, Ordering::Release);
                Some(answer)
            }
            Poll::Pending => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A reader that counts its polls and answers from a script.
    #[derive(Default)]
    struct Scripted {
        polls: usize,
        waker: Option<Waker>,
    }

    impl Scripted {
        fn poll(&mut self, cx: &mut Context<'_>, answer: Option<u32>) -> Poll<u32> {
            self.polls += 1;
            match answer {
                Some(v) => Poll::Ready(v),
                None => {
                    self.waker = Some(cx.waker().clone());
                    Poll::Pending
                }
            }
        }
    }

    #[test]
    fn a_pending_reader_is_not_polled_again_until_its_waker_fires() {
        let mut gate = ReadGate::new();
        let mut r = Scripted::default();
        let task = futures::task::noop_waker();
        let mut cx = Context::from_waker(&task);

        assert_eq!(gate.poll(&mut cx, |c| r.poll(c, Some(1))), Poll::Ready(1));
        // Ready leaves the gate open: the next poll reaches the reader.
        assert_eq!(gate.poll(&mut cx, |c| r.poll(c, None)), Poll::Pending);
        assert_eq!(r.polls, 2);
        // No wake since: skipped, however often the task is polled.
        for _ in 0..5 {
            assert_eq!(gate.poll(&mut cx, |c| r.poll(c, Some(9))), Poll::Pending);
        }
        assert_eq!(r.polls, 2);
        // The reader's waker fires: the next poll reaches it.
        r.waker.take().expect("the reader got a waker").wake();
        assert_eq!(gate.poll(&mut cx, |c| r.poll(c, Some(3))), Poll::Ready(3));
        assert_eq!(r.polls, 3);
    }

    #[test]
    fn the_readers_wake_wakes_the_task_that_polled_last() {
        struct Count(AtomicUsize);
        impl Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let task = Waker::from(count.clone());
        let mut gate = ReadGate::new();
        let mut r = Scripted::default();
        let mut cx = Context::from_waker(&task);
        assert_eq!(gate.poll(&mut cx, |c| r.poll(c, None)), Poll::Pending);
        r.waker.take().expect("the reader got a waker").wake();
        assert_eq!(count.0.load(Ordering::Relaxed), 1);
    }
}
