//! Fetches started before the `Prepare` that needs them. containerd
//! prepares an image's layers one after the other, and each lazy layer
//! needs its index prefix (or its TOC) from the registry: fetched in turn,
//! that is one round trip per layer before the container can start. The
//! first `Prepare` of an image (or a pull announced ahead) starts them all
//! at once; each later `Prepare` takes its own, finished or in flight.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::OnceCell;

/// A fetch nobody took is forgotten after this long (the layer was there
/// already, or its pull was given up).
const KEPT: Duration = Duration::from_secs(60);

/// Fetches by key, started ahead and taken once.
pub(crate) struct Ahead<T> {
    fetches: Mutex<HashMap<String, Fetch<T>>>,
}

struct Fetch<T> {
    started: Instant,
    cell: Arc<OnceCell<T>>,
}

impl<T> Default for Ahead<T> {
    fn default() -> Self {
        Self {
            fetches: Mutex::default(),
        }
    }
}

impl<T: Clone + Send + Sync + 'static> Ahead<T> {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Fetch<T>>> {
        self.fetches.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The cell of `key`, made now if there is none; whether it is new.
    fn cell(&self, key: &str) -> (Arc<OnceCell<T>>, bool) {
        let mut fetches = self.lock();
        fetches.retain(|_, f| !(f.cell.initialized() && f.started.elapsed() > KEPT));
        if let Some(fetch) = fetches.get(key) {
            return (fetch.cell.clone(), false);
        }
        let cell = Arc::new(OnceCell::new());
        fetches.insert(
            key.to_owned(),
            Fetch {
                started: Instant::now(),
                cell: cell.clone(),
            },
        );
        (cell, true)
    }

    /// Starts `fetch` for `key` on `runtime`, unless one was started and
    /// not taken yet.
    pub fn start<F>(&self, runtime: &tokio::runtime::Handle, key: &str, fetch: F)
    where
        F: Future<Output = T> + Send + 'static,
    {
        let (cell, new) = self.cell(key);
        if new {
            runtime.spawn(async move {
                cell.get_or_init(|| fetch).await;
            });
        }
    }

    /// What the fetch of `key` gives: the one started ahead (waited for if
    /// still in flight), else `fetch` run now. A fetch ahead that failed
    /// is tried again now (it may have failed long before this call).
    /// Taken: the next caller fetches again.
    pub async fn take<V, E, F, Fut>(&self, key: &str, fetch: F) -> Result<V, E>
    where
        T: Into<Result<V, E>>,
        F: Fn() -> Fut,
        Fut: Future<Output = T>,
    {
        let (cell, _) = self.cell(key);
        let mut ran = false;
        let value = cell
            .get_or_init(|| {
                ran = true;
                fetch()
            })
            .await
            .clone();
        {
            let mut fetches = self.lock();
            if fetches
                .get(key)
                .is_some_and(|f| Arc::ptr_eq(&f.cell, &cell))
            {
                fetches.remove(key);
            }
        }
        match value.into() {
            Err(_) if !ran => fetch().await.into(),
            other => other,
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn a_fetch_started_ahead_is_taken_once_and_never_run_twice() {
        let ahead: Ahead<Result<u32, String>> = Ahead::default();
        let runs = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let counted = runs.clone();
        ahead.start(&tokio::runtime::Handle::current(), "a", async move {
            counted.fetch_add(1, Ordering::SeqCst);
            rx.await.ok();
            Ok(7)
        });
        // The fetch gets going (and waits on `rx`).
        while runs.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        // Started again while in flight: nothing new runs.
        let counted = runs.clone();
        ahead.start(&tokio::runtime::Handle::current(), "a", async move {
            counted.fetch_add(1, Ordering::SeqCst);
            Ok(8)
        });
        tx.send(()).unwrap();
        // The taker waits for the fetch in flight instead of running its own.
        let taken = ahead
            .take("a", || async {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok(9)
            })
            .await;
        assert_eq!(taken, Ok(7));
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(ahead.len(), 0, "taken fetches are let go");
        // Nothing ahead: the taker's own fetch runs.
        assert_eq!(ahead.take("a", || async { Ok(10) }).await, Ok(10));
        assert_eq!(ahead.len(), 0);
    }

    #[tokio::test]
    async fn a_fetch_ahead_that_failed_is_tried_again_by_its_taker() {
        let ahead: Ahead<Result<u32, String>> = Ahead::default();
        ahead.start(&tokio::runtime::Handle::current(), "b", async {
            Err("the registry hiccuped".to_owned())
        });
        while ahead.lock().get("b").is_some_and(|f| !f.cell.initialized()) {
            tokio::task::yield_now().await;
        }
        assert_eq!(ahead.take("b", || async { Ok(3) }).await, Ok(3));
        // The taker's own failure is its answer.
        let failed = ahead.take("c", || async { Err("down".to_owned()) }).await;
        assert_eq!(failed, Err("down".to_owned()));
    }
}
