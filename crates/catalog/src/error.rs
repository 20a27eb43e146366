//! Errors of index catalog operations.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error(transparent)]
    Registry(Box<pronto_registry::RegistryError>),

    #[error(transparent)]
    Index(#[from] pronto_index::IndexError),

    #[error("index manifest {digest} is invalid: {problem}")]
    Artifact { digest: String, problem: String },

    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("no index {digest} in the local store")]
    NotFound { digest: String },
}

impl From<pronto_registry::RegistryError> for CatalogError {
    fn from(err: pronto_registry::RegistryError) -> Self {
        CatalogError::Registry(Box::new(err))
    }
}

impl CatalogError {
    pub(crate) fn io(
        what: &'static str,
        path: &std::path::Path,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_path_buf();
        move |source| CatalogError::Io { what, path, source }
    }
}
