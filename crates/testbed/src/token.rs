//! A token server for the registry's `auth.token` mode (the bearer-token
//! flow of Docker Hub, GHCR, ECR, Harbor): it checks basic credentials and
//! issues ES256-signed JWTs carrying the requested repository access, with a
//! key and certificate generated for each test.

use std::io::BufReader;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use base64::Engine as _;
use serde_json::json;

use crate::http::{Head, accept_each, respond};
use crate::registry::Credentials;

/// What the registry needs to trust the token server.
#[derive(Debug, Clone)]
pub struct TokenAuth {
    pub realm: String,
    pub service: String,
    pub issuer: String,
    /// PEM of the certificate whose key signs the tokens.
    pub cert_pem: String,
}

#[derive(Debug, Clone)]
pub struct TokenServerOptions {
    /// Required for tokens; `None` issues tokens to anyone.
    pub credentials: Option<Credentials>,
    /// How long the registry accepts a token (its `exp` claim).
    pub token_lifetime: Duration,
    /// The `expires_in` the token response announces. Announcing longer
    /// than `token_lifetime` makes clients hit 401 and refresh.
    pub announced_lifetime: Duration,
}

impl Default for TokenServerOptions {
    fn default() -> Self {
        Self {
            credentials: None,
            token_lifetime: Duration::from_secs(300),
            announced_lifetime: Duration::from_secs(300),
        }
    }
}

/// A token request the server answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRequest {
    pub scope: Option<String>,
    pub service: Option<String>,
    pub granted: bool,
}

#[derive(Debug)]
struct Shared {
    options: TokenServerOptions,
    key: jsonwebtoken::EncodingKey,
    /// Base64 DER of the certificate, for the JWT's `x5c` header.
    cert_der_b64: String,
    seen: Mutex<Vec<TokenRequest>>,
    stopping: AtomicBool,
}

#[derive(Debug)]
pub struct TokenServer {
    addr: SocketAddr,
    auth: TokenAuth,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

/// distribution accepts tokens up to 60 s past their `exp` (clock skew), so
/// `exp` is set that much earlier than the lifetime asked for.
const REGISTRY_LEEWAY_SECS: u64 = 60;

const SERVICE: &str = "pronto-test-registry";
const ISSUER: &str = "pronto-test-token-issuer";

impl TokenServer {
    pub fn start(options: TokenServerOptions) -> Result<Self> {
        let key_pair = rcgen::KeyPair::generate().context("generate the token signing key")?;
        let cert = rcgen::CertificateParams::new(vec!["pronto-token-issuer".to_owned()])?
            .self_signed(&key_pair)
            .context("self-sign the token certificate")?;
        let key = jsonwebtoken::EncodingKey::from_ec_pem(key_pair.serialize_pem().as_bytes())
            .context("load the token signing key")?;
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("bind token server")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            options,
            key,
            cert_der_b64: base64::engine::general_purpose::STANDARD.encode(cert.der()),
            seen: Mutex::new(Vec::new()),
            stopping: AtomicBool::new(false),
        });
        let acceptor = {
            let (stop, shared) = (shared.clone(), shared.clone());
            accept_each(
                listener,
                move || stop.stopping.load(Ordering::SeqCst),
                move |stream| {
                    let _ = serve(stream, &shared);
                },
            )
        };
        Ok(Self {
            addr,
            auth: TokenAuth {
                realm: format!("http://{addr}/token"),
                service: SERVICE.to_owned(),
                issuer: ISSUER.to_owned(),
                cert_pem: cert.pem(),
            },
            shared,
            acceptor: Some(acceptor),
        })
    }

    /// The settings for [`crate::RegistryOptions::token_auth`].
    pub fn auth(&self) -> &TokenAuth {
        &self.auth
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every token request so far.
    pub fn requests(&self) -> Vec<TokenRequest> {
        self.shared
            .seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

fn serve(mut stream: TcpStream, shared: &Shared) -> Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let Some(request) = Head::read(&mut reader)? else {
        return Ok(());
    };
    let target = request.first.split(' ').nth(1).unwrap_or("");
    let query = target.split_once('?').map_or("", |(_, q)| q);
    let param = |name: &str| {
        url::form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    };
    let scope = param("scope");
    let service = param("service");
    let authorized = match &shared.options.credentials {
        None => true,
        Some(creds) => request.get("authorization").is_some_and(|value| {
            let expected = base64::engine::general_purpose::STANDARD
                .encode(format!("{}:{}", creds.username, creds.password));
            value == format!("Basic {expected}")
        }),
    };
    shared
        .seen
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(TokenRequest {
            scope: scope.clone(),
            service: service.clone(),
            granted: authorized,
        });
    if !authorized {
        return respond(&mut stream, 401, &[], b"{\"details\":\"bad credentials\"}");
    }
    let token = sign(shared, scope.as_deref())?;
    let body = json!({
        "token": token,
        "expires_in": shared.options.announced_lifetime.as_secs(),
    });
    respond(
        &mut stream,
        200,
        &[("Content-Type", "application/json".into())],
        body.to_string().as_bytes(),
    )
}

/// A JWT granting the actions of `scope` (`repository:NAME:ACTIONS`).
fn sign(shared: &Shared, scope: Option<&str>) -> Result<String> {
    // Far enough from the epoch that `exp` below cannot underflow.
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let access: Vec<serde_json::Value> = scope
        .into_iter()
        .flat_map(|s| s.split(' '))
        .filter_map(|s| {
            let mut parts = s.splitn(3, ':');
            let (kind, name, actions) = (parts.next()?, parts.next()?, parts.next()?);
            Some(json!({"type": kind, "name": name, "actions": actions.split(',').collect::<Vec<_>>()}))
        })
        .collect();
    let claims = json!({
        "iss": ISSUER,
        "sub": shared.options.credentials.as_ref().map_or("anonymous", |c| c.username.as_str()),
        "aud": SERVICE,
        "iat": now,
        "nbf": now - 10,
        "exp": now + shared.options.token_lifetime.as_secs() - REGISTRY_LEEWAY_SECS,
        "jti": format!("{now}-{}", rand::random::<u64>()),
        "access": access,
    });
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.x5c = Some(vec![shared.cert_der_b64.clone()]);
    Ok(jsonwebtoken::encode(&header, &claims, &shared.key)?)
}
