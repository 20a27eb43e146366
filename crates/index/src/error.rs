//! Errors of index creation, parsing and reading.

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("index format version {0} is not supported (this Pronto reads versions 1 and 2)")]
    Version(u16),

    #[error("invalid index: {0}")]
    Malformed(String),

    #[error("cannot encode the index: {0}")]
    Encode(String),

    #[error("layer {digest} cannot be indexed: {problem}")]
    Unsupported { digest: String, problem: String },

    #[error("layer {digest} is corrupt at compressed byte {offset}: {problem}")]
    CorruptLayer {
        digest: String,
        offset: u64,
        problem: String,
    },

    #[error("layer blob has digest {actual}, but the index is for {expected}")]
    LayerDigest { expected: String, actual: String },

    #[error("span {span} of layer {layer}: {problem}")]
    Span {
        layer: String,
        span: usize,
        problem: String,
    },

    #[error("the index of layer {layer} does not match the layer: {problem}")]
    Mismatch { layer: String, problem: String },

    #[error("cannot read or write index data")]
    Io(#[source] std::io::Error),
}

impl From<std::io::Error> for IndexError {
    /// Errors raised inside readers (a corrupt layer found while the tar
    /// parser pulls data) travel as `io::Error`; unwrap them again.
    fn from(err: std::io::Error) -> Self {
        if err.get_ref().is_some_and(|inner| inner.is::<IndexError>()) {
            let inner = err.into_inner().expect("checked above");
            return *inner.downcast::<IndexError>().expect("checked above");
        }
        IndexError::Io(err)
    }
}
