//! Which way a layer snapshot containerd prepares is made: mounted lazily,
//! fetched whole and unpacked by Pronto (the parallel pull), or left to
//! containerd. The policy lives here, over two small traits, so that it is
//! tested with fakes; the gRPC service only maps the outcome.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::local::LocalSnapshots;
use crate::remote::{Fallback, LazyServed, Remote};
use crate::whole::{WholeError, WholeLayers};

/// What is said in the log when containerd takes a layer over.
const CONTAINERD_PULLS: &str = "containerd fetches and unpacks this layer";
const PRONTO_PULLS: &str = "Pronto fetches it whole, in parallel";

/// How a layer snapshot was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Pronto made the committed snapshot (lazily or whole): containerd
    /// skips the layer.
    Made,
    /// containerd fetches and unpacks the layer itself.
    Containerd,
    /// The layer must not be pulled (hostile, or does not fit): the pull
    /// fails with this message.
    Refused(String),
}

/// Layers served lazily (the [`Remote`] half of the snapshotter).
pub(crate) trait LazyLayers: Send + Sync {
    /// Mounts the layer `target` lazily and commits its snapshot, or says
    /// why not.
    fn mount(
        &self,
        local: &LocalSnapshots,
        target: &str,
        parent: &str,
        labels: &BTreeMap<String, String>,
    ) -> impl Future<Output = Result<(), (Fallback, String)>> + Send;

    /// Which layers of the image of `labels` are served lazily.
    fn lazy_served(
        &self,
        labels: &BTreeMap<String, String>,
    ) -> impl Future<Output = LazyServed> + Send;

    /// Records and logs that `target` is not lazy, and what happens
    /// instead.
    fn fall_back(
        &self,
        reason: Fallback,
        target: &str,
        labels: &BTreeMap<String, String>,
        detail: &str,
        action: &str,
    );
}

/// Layers fetched whole and unpacked by Pronto (the parallel pull).
pub(crate) trait WholeLayerPull: Send + Sync {
    fn prepare(
        &self,
        local: &Arc<LocalSnapshots>,
        target: &str,
        parent: &str,
        labels: &BTreeMap<String, String>,
        lazy: &LazyServed,
    ) -> impl Future<Output = Result<(), WholeError>> + Send;
}

/// Makes the layer snapshot `target` over `parent`: lazily when it can be,
/// else whole by Pronto when the parallel pull is on and the image is
/// known, else by containerd. Every fallback is recorded with its reason.
pub(crate) async fn make_layer(
    lazy: &impl LazyLayers,
    whole: Option<&impl WholeLayerPull>,
    local: &Arc<LocalSnapshots>,
    target: &str,
    parent: &str,
    labels: &BTreeMap<String, String>,
) -> Outcome {
    let (reason, detail) = match lazy.mount(local, target, parent, labels).await {
        Ok(()) => return Outcome::Made,
        Err(fallback) => fallback,
    };
    // Without the image's labels, Pronto does not know what to fetch.
    let Some(whole) = whole.filter(|_| reason != Fallback::NoImageLabels) else {
        lazy.fall_back(reason, target, labels, &detail, CONTAINERD_PULLS);
        return Outcome::Containerd;
    };
    lazy.fall_back(reason, target, labels, &detail, PRONTO_PULLS);
    let served = lazy.lazy_served(labels).await;
    match whole.prepare(local, target, parent, labels, &served).await {
        Ok(()) => Outcome::Made,
        Err(WholeError::Rejected(message)) => Outcome::Refused(message),
        Err(WholeError::Failed(message)) => {
            lazy.fall_back(
                Fallback::ParallelPullFailed,
                target,
                labels,
                &message,
                CONTAINERD_PULLS,
            );
            Outcome::Containerd
        }
    }
}

impl LazyLayers for Remote {
    async fn mount(
        &self,
        local: &LocalSnapshots,
        target: &str,
        parent: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), (Fallback, String)> {
        self.mount_layer(local, target, parent, labels).await
    }

    async fn lazy_served(&self, labels: &BTreeMap<String, String>) -> LazyServed {
        self.lazy_served_for(labels).await
    }

    fn fall_back(
        &self,
        reason: Fallback,
        target: &str,
        labels: &BTreeMap<String, String>,
        detail: &str,
        action: &str,
    ) {
        Remote::fall_back(self, reason, target, labels, detail, action);
    }
}

impl WholeLayerPull for Arc<WholeLayers> {
    async fn prepare(
        &self,
        local: &Arc<LocalSnapshots>,
        target: &str,
        parent: &str,
        labels: &BTreeMap<String, String>,
        lazy: &LazyServed,
    ) -> Result<(), WholeError> {
        WholeLayers::prepare(self, local, target, parent, labels, lazy).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// A lazy half that fails with `fails` (or mounts) and records the
    /// fallbacks it is told about.
    struct FakeLazy {
        fails: Option<Fallback>,
        fallbacks: Mutex<Vec<(Fallback, String)>>,
    }

    impl FakeLazy {
        fn new(fails: Option<Fallback>) -> Self {
            Self {
                fails,
                fallbacks: Mutex::new(Vec::new()),
            }
        }

        fn fallbacks(&self) -> Vec<(Fallback, String)> {
            self.fallbacks.lock().unwrap().clone()
        }
    }

    impl LazyLayers for FakeLazy {
        async fn mount(
            &self,
            _: &LocalSnapshots,
            _: &str,
            _: &str,
            _: &BTreeMap<String, String>,
        ) -> Result<(), (Fallback, String)> {
            match self.fails {
                Some(reason) => Err((reason, "because".into())),
                None => Ok(()),
            }
        }

        async fn lazy_served(&self, _: &BTreeMap<String, String>) -> LazyServed {
            LazyServed::default()
        }

        fn fall_back(
            &self,
            reason: Fallback,
            _: &str,
            _: &BTreeMap<String, String>,
            _: &str,
            action: &str,
        ) {
            self.fallbacks
                .lock()
                .unwrap()
                .push((reason, action.to_owned()));
        }
    }

    /// A parallel pull that answers `result` and counts its calls.
    struct FakeWhole {
        result: Result<(), WholeError>,
        calls: Mutex<usize>,
    }

    impl FakeWhole {
        fn new(result: Result<(), WholeError>) -> Self {
            Self {
                result,
                calls: Mutex::new(0),
            }
        }
    }

    impl WholeLayerPull for FakeWhole {
        async fn prepare(
            &self,
            _: &Arc<LocalSnapshots>,
            _: &str,
            _: &str,
            _: &BTreeMap<String, String>,
            _: &LazyServed,
        ) -> Result<(), WholeError> {
            *self.calls.lock().unwrap() += 1;
            self.result.clone()
        }
    }

    async fn run(lazy: &FakeLazy, whole: Option<&FakeWhole>) -> Outcome {
        let dir = tempfile::tempdir().unwrap();
        let local = Arc::new(LocalSnapshots::open(dir.path()).unwrap());
        make_layer(lazy, whole, &local, "sha256:chain", "", &BTreeMap::new()).await
    }

    #[tokio::test]
    async fn a_lazy_layer_is_made_without_a_fallback() {
        let lazy = FakeLazy::new(None);
        let whole = FakeWhole::new(Ok(()));
        assert_eq!(run(&lazy, Some(&whole)).await, Outcome::Made);
        assert!(lazy.fallbacks().is_empty());
        assert_eq!(*whole.calls.lock().unwrap(), 0);
    }

    #[tokio::test]
    async fn without_an_index_pronto_pulls_the_layer_whole() {
        let lazy = FakeLazy::new(Some(Fallback::NoIndex));
        let whole = FakeWhole::new(Ok(()));
        assert_eq!(run(&lazy, Some(&whole)).await, Outcome::Made);
        assert_eq!(
            lazy.fallbacks(),
            [(Fallback::NoIndex, PRONTO_PULLS.to_owned())]
        );
    }

    #[tokio::test]
    async fn without_labels_or_a_parallel_pull_containerd_pulls() {
        let lazy = FakeLazy::new(Some(Fallback::NoImageLabels));
        let whole = FakeWhole::new(Ok(()));
        assert_eq!(run(&lazy, Some(&whole)).await, Outcome::Containerd);
        assert_eq!(
            *whole.calls.lock().unwrap(),
            0,
            "no labels: nothing to fetch"
        );
        let lazy = FakeLazy::new(Some(Fallback::IndexRefused));
        assert_eq!(run(&lazy, None::<&FakeWhole>).await, Outcome::Containerd);
        assert_eq!(
            lazy.fallbacks(),
            [(Fallback::IndexRefused, CONTAINERD_PULLS.to_owned())]
        );
    }

    #[tokio::test]
    async fn a_failed_parallel_pull_hands_over_and_a_hostile_layer_fails() {
        let lazy = FakeLazy::new(Some(Fallback::NoIndex));
        let failed = FakeWhole::new(Err(WholeError::Failed("network".into())));
        assert_eq!(run(&lazy, Some(&failed)).await, Outcome::Containerd);
        assert_eq!(
            lazy.fallbacks().last().unwrap(),
            &(Fallback::ParallelPullFailed, CONTAINERD_PULLS.to_owned())
        );
        let lazy = FakeLazy::new(Some(Fallback::NoIndex));
        let hostile = FakeWhole::new(Err(WholeError::Rejected("../etc".into())));
        assert_eq!(
            run(&lazy, Some(&hostile)).await,
            Outcome::Refused("../etc".into())
        );
    }
}
