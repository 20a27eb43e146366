//! [`Scheduler`]: who may use the link. Reads a container waits for, and
//! the read-ahead in front of them, are foreground work; the background
//! fetch of the rest of every layer runs only while the whole node has no
//! foreground work, and checks again before each of its requests, so it
//! yields within one request when a container starts reading.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{Notify, Semaphore, SemaphorePermit};

/// Read-ahead requests in flight on the node at once, unless told
/// otherwise: enough to fill a link whose connections are capped, few
/// enough that a read waiting for the container keeps a registry slot.
pub const DEFAULT_READ_AHEAD_REQUESTS: usize = 8;

/// Foreground and background work of one node (every mount shares one).
#[derive(Debug)]
pub struct Scheduler {
    foreground: AtomicUsize,
    idle: Notify,
    read_ahead: Semaphore,
}

impl Default for Scheduler {
    fn default() -> Self {
        Self::new(DEFAULT_READ_AHEAD_REQUESTS)
    }
}

/// Foreground work in progress; dropping it ends it.
#[derive(Debug)]
pub struct Foreground<'a> {
    scheduler: &'a Scheduler,
}

impl Drop for Foreground<'_> {
    fn drop(&mut self) {
        if self.scheduler.foreground.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.scheduler.idle.notify_waiters();
        }
    }
}

impl Scheduler {
    /// A scheduler letting `read_ahead_requests` read-ahead requests run
    /// at once.
    pub fn new(read_ahead_requests: usize) -> Self {
        Self {
            foreground: AtomicUsize::new(0),
            idle: Notify::new(),
            read_ahead: Semaphore::new(read_ahead_requests.max(1)),
        }
    }

    /// Waits for a read-ahead request to be allowed; it runs while the
    /// permit lives.
    pub async fn read_ahead_slot(&self) -> SemaphorePermit<'_> {
        self.read_ahead
            .acquire()
            .await
            .expect("the read-ahead semaphore is never closed")
    }

    /// Marks foreground work as started until the guard drops.
    pub fn foreground(&self) -> Foreground<'_> {
        self.foreground.fetch_add(1, Ordering::SeqCst);
        Foreground { scheduler: self }
    }

    /// Foreground work in progress now.
    pub fn busy(&self) -> usize {
        self.foreground.load(Ordering::SeqCst)
    }

    /// Returns once no foreground work is in progress (at once when there
    /// is none). Woken by the end of the last foreground work, not polled.
    pub async fn background_turn(&self) {
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            // Registered before the check: an end of work between the
            // check and the wait is not missed.
            idle.as_mut().enable();
            if self.busy() == 0 {
                return;
            }
            idle.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn background_waits_for_the_last_foreground_work_to_end() {
        let scheduler = Arc::new(Scheduler::default());
        scheduler.background_turn().await;

        let first = scheduler.foreground();
        let second = scheduler.foreground();
        let waiting = {
            let scheduler = scheduler.clone();
            tokio::spawn(async move { scheduler.background_turn().await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished());
        drop(first);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "one foreground read still runs");
        drop(second);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the background gets its turn once the node is idle")
            .unwrap();
        assert_eq!(scheduler.busy(), 0);
    }
}
