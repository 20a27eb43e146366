//! [`Scheduler`]: who may use the link. Reads a container waits for, and
//! the read-ahead in front of them, are foreground work; the background
//! fetch of the rest of every layer runs only once the whole node has had
//! no foreground work for a quiet period (a starting container reads in
//! bursts with short gaps between them), and checks again before each of
//! its requests, so it yields within one request when reading starts.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, Semaphore, SemaphorePermit};

/// Read-ahead requests in flight on the node at once, unless told
/// otherwise: enough to fill a link whose connections are capped, few
/// enough that a read waiting for the container keeps a registry slot.
pub const DEFAULT_READ_AHEAD_REQUESTS: usize = 16;

/// How long the node must have been without foreground work before the
/// background fetch takes its turn, unless told otherwise.
pub const DEFAULT_QUIET: Duration = Duration::from_secs(1);

/// Foreground and background work of one node (every mount shares one).
#[derive(Debug)]
pub struct Scheduler {
    foreground: AtomicUsize,
    idle: Notify,
    read_ahead: Semaphore,
    /// When foreground work last ended (or a mount was made).
    /// Microseconds from `born` (an atomic: every read ends by setting
    /// it, so no lock is taken by every read of every mount).
    last_active: AtomicU64,
    born: Instant,
    quiet: Duration,
}

impl Default for Scheduler {
    fn default() -> Self {
        Self::new(DEFAULT_READ_AHEAD_REQUESTS, DEFAULT_QUIET)
    }
}

/// Foreground work in progress; dropping it ends it.
#[derive(Debug)]
pub struct Foreground<'a> {
    scheduler: &'a Scheduler,
}

impl Drop for Foreground<'_> {
    fn drop(&mut self) {
        self.scheduler.active();
        if self.scheduler.foreground.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.scheduler.idle.notify_waiters();
        }
    }
}

impl Scheduler {
    /// A scheduler letting `read_ahead_requests` read-ahead requests run
    /// at once, and the background fetch after `quiet` without foreground
    /// work.
    pub fn new(read_ahead_requests: usize, quiet: Duration) -> Self {
        Self {
            foreground: AtomicUsize::new(0),
            idle: Notify::new(),
            read_ahead: Semaphore::new(read_ahead_requests.max(1)),
            last_active: AtomicU64::new(0),
            born: Instant::now(),
            quiet,
        }
    }

    /// Records activity now: the quiet period starts again (a mount was
    /// made, a read ended).
    pub fn active(&self) {
        let now = self.born.elapsed().as_micros() as u64;
        self.last_active.fetch_max(now, Ordering::Relaxed);
    }

    /// How long the node has been quiet, if it is.
    fn quiet_for(&self) -> Duration {
        let last = Duration::from_micros(self.last_active.load(Ordering::Relaxed));
        self.born.elapsed().saturating_sub(last)
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

    /// Returns once no foreground work is in progress and none has been
    /// for the quiet period. Woken by the end of the last foreground work,
    /// then sleeps out the rest of the quiet period; never polls.
    pub async fn background_turn(&self) {
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            // Registered before the check: an end of work between the
            // check and the wait is not missed.
            idle.as_mut().enable();
            if self.busy() > 0 {
                idle.await;
                continue;
            }
            let quiet = self.quiet_for();
            if quiet >= self.quiet {
                return;
            }
            tokio::time::sleep(self.quiet - quiet).await;
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
        let scheduler = Arc::new(Scheduler::new(1, Duration::from_millis(30)));
        tokio::time::sleep(Duration::from_millis(40)).await;
        tokio::time::timeout(Duration::from_secs(5), scheduler.background_turn())
            .await
            .expect("an idle node gives the background its turn");

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
