//! Errors of registry operations. Every error names what was asked of which
//! registry and repository; none carries credentials.

use std::time::Duration;

/// What a request was about: `manifest v1 of 127.0.0.1:5000/app`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub registry: String,
    pub repository: String,
    /// `manifest latest`, `blob sha256:…`, `referrers of sha256:…`.
    pub object: String,
}

impl Target {
    pub fn new(repo: &crate::Repository, object: impl Into<String>) -> Self {
        Self {
            registry: repo.registry.clone(),
            repository: repo.name.clone(),
            object: object.into(),
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} of {}/{}",
            self.object, self.registry, self.repository
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("image reference {reference:?} is invalid: {problem}")]
    Reference { reference: String, problem: String },

    #[error("{target}: the registry answered HTTP {status}{detail}")]
    Status {
        target: Target,
        status: u16,
        /// The registry's own error message, prefixed with ": ", or empty.
        detail: String,
    },

    #[error("{target}: the registry answered HTTP {status} (overloaded or failing)")]
    Busy {
        target: Target,
        status: u16,
        retry_after: Option<Duration>,
    },

    #[error("{target}: not found (HTTP 404)")]
    NotFound { target: Target },

    #[error("{target}: request failed after {attempts} attempt(s)")]
    Transport {
        target: Target,
        attempts: u32,
        #[source]
        source: reqwest::Error,
    },

    #[error(
        "{target}: no answer within {after:?} while waiting for {phase}, after {attempts} attempt(s)"
    )]
    Timeout {
        target: Target,
        phase: &'static str,
        after: Duration,
        attempts: u32,
    },

    #[error("{target}: content has digest {actual}, expected {expected}")]
    DigestMismatch {
        target: Target,
        expected: String,
        actual: String,
    },

    #[error("{target}: {problem}")]
    Invalid { target: Target, problem: String },

    /// A range answer that does not match the request.
    #[error("{target}: the answer does not match the range asked for: {problem}")]
    RangeMismatch { target: Target, problem: String },

    #[error("{target}: authentication failed: {problem}")]
    Auth { target: Target, problem: String },

    #[error("{target}: no manifest for platform {wanted} (the image has: {available})")]
    Platform {
        target: Target,
        wanted: String,
        available: String,
    },

    #[error("{target}: cannot write the content")]
    Write {
        target: Target,
        #[source]
        source: std::io::Error,
    },
}

impl RegistryError {
    /// The HTTP status the registry answered, if the error is one.
    pub fn status(&self) -> Option<u16> {
        match self {
            RegistryError::Status { status, .. } | RegistryError::Busy { status, .. } => {
                Some(*status)
            }
            RegistryError::NotFound { .. } => Some(404),
            _ => None,
        }
    }
}
