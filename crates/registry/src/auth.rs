//! Registry authentication: where credentials come from, the
//! `WWW-Authenticate` challenge, and bearer tokens cached per scope.
//! Credentials and tokens never reach logs or error messages.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use docker_credential::{CredentialRetrievalError, DockerCredential};
use serde::Deserialize;

/// A user name and password (or identity token) for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Where credentials for a registry host come from.
pub trait CredentialSource: Send + Sync + std::fmt::Debug {
    /// Credentials for `host` (`host[:port]` as in references), if any.
    fn credentials(&self, host: &str) -> Option<Credentials>;

    /// Credentials for `repository` on `host`: those of the host unless
    /// the source knows them per repository (kubelet's pull secrets do).
    fn credentials_for(&self, host: &str, repository: &str) -> Option<Credentials> {
        let _ = repository;
        self.credentials(host)
    }
}

/// The first source that has credentials, in order.
#[derive(Debug, Clone)]
pub struct CredentialChain(pub Vec<std::sync::Arc<dyn CredentialSource>>);

impl CredentialSource for CredentialChain {
    fn credentials(&self, host: &str) -> Option<Credentials> {
        self.0.iter().find_map(|source| source.credentials(host))
    }

    fn credentials_for(&self, host: &str, repository: &str) -> Option<Credentials> {
        self.0
            .iter()
            .find_map(|source| source.credentials_for(host, repository))
    }
}

/// Credentials given in code or configuration, by host.
#[derive(Debug, Default, Clone)]
pub struct StaticCredentials(pub HashMap<String, Credentials>);

impl StaticCredentials {
    pub fn none() -> Self {
        Self::default()
    }

    pub fn with(mut self, host: &str, username: &str, password: &str) -> Self {
        self.0.insert(
            host.to_owned(),
            Credentials {
                username: username.to_owned(),
                password: password.to_owned(),
            },
        );
        self
    }
}

impl CredentialSource for StaticCredentials {
    fn credentials(&self, host: &str) -> Option<Credentials> {
        self.0.get(host).cloned()
    }
}

/// Docker's `config.json`: `auths`, `credsStore` and `credHelpers`. The
/// file is `path` when set, else `$DOCKER_CONFIG/config.json`, else
/// `~/.docker/config.json`. It is read at every authentication, so a
/// `docker login` takes effect without a restart.
#[derive(Debug, Default, Clone)]
pub struct DockerConfigCredentials {
    pub path: Option<PathBuf>,
}

impl DockerConfigCredentials {
    /// Credentials from the config file at `path` (or the default place).
    pub fn at(path: Option<PathBuf>) -> Self {
        Self { path }
    }

    fn lookup(&self, key: &str) -> Result<DockerCredential, CredentialRetrievalError> {
        match &self.path {
            Some(path) => {
                let file = std::fs::File::open(path)
                    .map_err(|_| CredentialRetrievalError::ConfigReadError)?;
                docker_credential::get_credential_from_reader(std::io::BufReader::new(file), key)
            }
            None => docker_credential::get_credential(key),
        }
    }
}

impl DockerConfigCredentials {
    /// The credentials for `host`: `Ok(None)` when the file has none for
    /// it, an error (naming no secret) when the file or its helper cannot
    /// be used.
    fn find(&self, host: &str) -> Result<Option<Credentials>, String> {
        // Docker Hub credentials are stored under its legacy index URL.
        let key = if host == "docker.io" {
            "https://index.docker.io/v1/"
        } else {
            host
        };
        let file = || {
            self.path.as_ref().map_or_else(
                || "docker's config.json".to_owned(),
                |p| p.display().to_string(),
            )
        };
        match self.lookup(key) {
            Ok(DockerCredential::UsernamePassword(username, password)) => {
                Ok(Some(Credentials { username, password }))
            }
            Ok(DockerCredential::IdentityToken(token)) => Ok(Some(Credentials {
                username: "<token>".to_owned(),
                password: token,
            })),
            Err(
                CredentialRetrievalError::NoCredentialConfigured
                | CredentialRetrievalError::ConfigNotFound,
            ) => Ok(None),
            Err(CredentialRetrievalError::HelperFailure { helper, .. }) => Err(format!(
                "the credential helper docker-credential-{helper} named in {} failed",
                file()
            )),
            Err(
                CredentialRetrievalError::HelperCommunicationError
                | CredentialRetrievalError::MalformedHelperResponse,
            ) => Err(format!(
                "the credential helper named in {} cannot be used",
                file()
            )),
            Err(CredentialRetrievalError::CredentialDecodingError) => Err(format!(
                "{} is unreadable: its `auth` entry for {host} is not valid base64 of user:password",
                file()
            )),
            // ConfigReadError, and whatever later versions add.
            Err(_) => Err(format!(
                "{} is unreadable (missing, not JSON, or not a docker config)",
                file()
            )),
        }
    }
}

impl CredentialSource for DockerConfigCredentials {
    fn credentials(&self, host: &str) -> Option<Credentials> {
        match self.find(host) {
            Ok(found) => found,
            Err(problem) => {
                tracing::warn!(registry = host, "{problem}; going on without credentials");
                None
            }
        }
    }
}

/// A parsed `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

impl Challenge {
    /// Parses `Basic realm="x"` or `Bearer realm="…",service="…",scope="…"`.
    pub fn parse(header: &str) -> Option<Self> {
        let header = header.trim();
        let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
        if scheme.eq_ignore_ascii_case("basic") {
            return Some(Challenge::Basic);
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        let params = parse_params(rest);
        Some(Challenge::Bearer {
            realm: params.get("realm")?.clone(),
            service: params.get("service").cloned(),
            scope: params.get("scope").cloned(),
        })
    }
}

/// `key="quoted, value",key2=token` → map with lower-case keys.
fn parse_params(text: &str) -> HashMap<String, String> {
    let mut params = HashMap::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| *c == ',' || c.is_whitespace()).is_some() {}
        let key: String = std::iter::from_fn(|| chars.next_if(|c| *c != '=')).collect();
        if key.is_empty() || chars.next() != Some('=') {
            return params;
        }
        let mut value = String::new();
        if chars.next_if_eq(&'"').is_some() {
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            value.extend(std::iter::from_fn(|| chars.next_if(|c| *c != ',')));
        }
        params.insert(key.trim().to_ascii_lowercase(), value.trim().to_owned());
    }
}

/// The token endpoint's answer (both spellings are in use).
#[derive(Debug, Deserialize)]
pub struct TokenResponse {
    pub token: Option<String>,
    pub access_token: Option<String>,
    pub expires_in: Option<u64>,
}

/// A bearer token and when to stop using it.
#[derive(Clone)]
pub struct Token {
    pub value: String,
    pub expires: Instant,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("value", &"<redacted>")
            .field("expires", &self.expires)
            .finish()
    }
}

impl TokenResponse {
    /// The token, expiring a little early so it is never used stale.
    /// Registries that give no lifetime get the spec's default of 60 s.
    pub fn into_token(self, now: Instant) -> Option<Token> {
        let value = self.token.or(self.access_token).filter(|t| !t.is_empty())?;
        let lifetime = Duration::from_secs(self.expires_in.unwrap_or(60).max(10));
        Some(Token {
            value,
            expires: now + lifetime - Duration::from_secs(5),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_challenge_with_quoted_commas() {
        let c = Challenge::parse(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#,
        )
        .unwrap();
        assert_eq!(
            c,
            Challenge::Bearer {
                realm: "https://auth.example/token".into(),
                service: Some("registry.example".into()),
                scope: Some("repository:a/b:pull,push".into()),
            }
        );
    }

    #[test]
    fn basic_and_unknown_challenges() {
        assert_eq!(
            Challenge::parse(r#"Basic realm="x""#),
            Some(Challenge::Basic)
        );
        assert_eq!(Challenge::parse("Negotiate abc"), None);
        assert_eq!(Challenge::parse("Bearer service=x"), None);
    }

    #[test]
    fn token_response_spellings() {
        let now = Instant::now();
        let t: TokenResponse =
            serde_json::from_str(r#"{"access_token":"a","expires_in":300}"#).unwrap();
        let t = t.into_token(now).unwrap();
        assert_eq!(t.value, "a");
        assert!(t.expires > now + Duration::from_secs(290));
        let t: TokenResponse = serde_json::from_str(r#"{"token":"b"}"#).unwrap();
        assert_eq!(t.into_token(now).unwrap().value, "b");
        let t: TokenResponse = serde_json::from_str(r#"{"token":""}"#).unwrap();
        assert!(t.into_token(now).is_none());
    }

    #[test]
    fn an_unreadable_docker_config_is_said_to_be_unreadable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let source = DockerConfigCredentials::at(Some(path.clone()));
        std::fs::write(&path, "this is not JSON").unwrap();
        let err = source.find("registry.example").unwrap_err();
        assert!(err.contains("is unreadable"), "{err}");
        std::fs::write(
            &path,
            r#"{"auths": {"registry.example": {"auth": "%%%not base64"}}}"#,
        )
        .unwrap();
        let err = source.find("registry.example").unwrap_err();
        assert!(err.contains("not valid base64"), "{err}");
        assert_eq!(source.find("other.example"), Ok(None));
        std::fs::write(
            &path,
            r#"{"auths": {"registry.example": {"auth": "dXNlcjpzM2NyZXQ="}}}"#,
        )
        .unwrap();
        let found = source.find("registry.example").unwrap().unwrap();
        assert_eq!(found.username, "user");
    }

    #[test]
    fn credentials_are_not_printed() {
        let c = Credentials {
            username: "u".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
