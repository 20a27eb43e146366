//! Debian's `docker-registry` (distribution 2.8) on a free loopback port
//! with temporary storage, optionally behind htpasswd basic auth, and image
//! pushes into it with `skopeo`.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tempfile::TempDir;

use crate::image::OciLayout;
use crate::net::{free_loopback_port, http_status, wait_until};
use crate::process::Daemon;

/// A user name and password for basic auth.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl Credentials {
    pub fn new(username: &str, password: &str) -> Self {
        Self {
            username: username.to_owned(),
            password: password.to_owned(),
        }
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// Require these credentials (htpasswd, bcrypt) for every request.
    pub basic_auth: Option<Credentials>,
    /// Require bearer tokens from this token server (`auth.token`).
    pub token_auth: Option<crate::token::TokenAuth>,
    /// Credentials skopeo pushes with when the registry needs them and
    /// `basic_auth` does not say (token auth).
    pub push_credentials: Option<Credentials>,
    /// Send the registry's event notifications to this endpoint.
    pub notifications: Option<Notifications>,
}

/// A `notifications` endpoint of the registry.
#[derive(Debug, Clone)]
pub struct Notifications {
    /// Where events are POSTed.
    pub url: String,
    /// Sent as `Authorization: Bearer TOKEN` when set.
    pub token: Option<String>,
}

/// Manifest format a push writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManifestFormat {
    /// OCI image manifest and index, as built.
    Oci,
    /// Docker image manifest v2 schema 2 (and manifest list), converted by
    /// skopeo from the OCI image; layer blobs are unchanged.
    Docker,
}

/// A running registry. Dropping it stops the process and deletes storage.
#[derive(Debug)]
pub struct Registry {
    daemon: Daemon,
    addr: SocketAddr,
    options: RegistryOptions,
    dir: TempDir,
}

impl Registry {
    /// Starts an anonymous registry.
    pub fn start() -> Result<Self> {
        Self::start_with(RegistryOptions::default())
    }

    pub fn start_with(options: RegistryOptions) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("pronto-registry-")
            .tempdir()?;
        if let Some(token) = &options.token_auth {
            std::fs::write(dir.path().join("token.crt"), &token.cert_pem)?;
        }
        if let Some(creds) = &options.basic_auth {
            let hash = bcrypt::hash(&creds.password, 5).context("hash htpasswd password")?;
            std::fs::write(
                dir.path().join("htpasswd"),
                format!("{}:{hash}\n", creds.username),
            )?;
        }
        // A port that was free may be taken before the registry binds it;
        // then the registry exits and we try another.
        let mut last_error = None;
        for attempt in 0..5 {
            let port = free_loopback_port()?;
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            let config = dir.path().join("config.yml");
            std::fs::write(&config, config_yaml(&dir, addr, &options))?;
            let mut command = Command::new("docker-registry");
            command.arg("serve").arg(&config);
            let log = dir.path().join(format!("registry-{attempt}.log"));
            let mut daemon = Daemon::spawn("docker-registry", command, &log)?;
            let ready = wait_until("docker-registry", Duration::from_secs(20), || {
                if !daemon.is_running() {
                    bail!("docker-registry exited:\n{}", daemon.log_tail(20));
                }
                // 200 when anonymous, 401 with auth: either way it serves.
                Ok(matches!(http_status(addr, "/v2/"), Some(200 | 401)))
            });
            match ready {
                Ok(()) => {
                    return Ok(Self {
                        daemon,
                        addr,
                        options,
                        dir,
                    });
                }
                Err(err) => last_error = Some(err),
            }
        }
        Err(last_error.expect("at least one attempt"))
    }

    /// PID of the registry process, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.daemon.pid()
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The host part of references to this registry: `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Where the registry keeps its blobs and repositories.
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// The credentials that let a client in, if the registry wants any.
    pub fn credentials(&self) -> Option<&Credentials> {
        self.options
            .basic_auth
            .as_ref()
            .or(self.options.push_credentials.as_ref())
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.daemon.log_tail(lines)
    }

    /// Every request the registry has answered so far, from its access log.
    pub fn access_log(&self) -> Result<Vec<AccessLogEntry>> {
        let text = std::fs::read_to_string(self.daemon.log_path())
            .with_context(|| format!("read {}", self.daemon.log_path().display()))?;
        Ok(text.lines().filter_map(AccessLogEntry::parse).collect())
    }

    /// Pushes image `name` of `layout` as `repo:tag` with OCI manifests and
    /// returns the full reference (`127.0.0.1:PORT/repo:tag`).
    pub fn push(&self, layout: &OciLayout, name: &str, repo_tag: &str) -> Result<String> {
        self.push_as(layout, name, repo_tag, ManifestFormat::Oci)
    }

    /// Like [`Registry::push`], in the given manifest format. A
    /// multi-platform name pushes the index and every platform's image.
    pub fn push_as(
        &self,
        layout: &OciLayout,
        name: &str,
        repo_tag: &str,
        format: ManifestFormat,
    ) -> Result<String> {
        let reference = format!("{}/{repo_tag}", self.host());
        let mut skopeo = Command::new("skopeo");
        skopeo.args([
            "--insecure-policy",
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
        ]);
        match format {
            ManifestFormat::Oci => skopeo.arg("--preserve-digests"),
            ManifestFormat::Docker => skopeo.args(["--format", "v2s2"]),
        };
        if layout.is_multi_platform(name)? {
            skopeo.arg("--all");
        }
        if let Some(creds) = self.credentials() {
            skopeo.arg(format!(
                "--dest-creds={}:{}",
                creds.username, creds.password
            ));
        }
        skopeo
            .arg(format!("oci:{}:{name}", layout.dir().display()))
            .arg(format!("docker://{reference}"));
        let out = skopeo.output().context("run skopeo")?;
        if !out.status.success() {
            // skopeo's message does not include the credentials argument.
            bail!(
                "skopeo could not push {name} to {reference}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(reference)
    }
}

/// One line of the registry's access log (Apache combined format):
/// `127.0.0.1 - - [date] "GET /v2/... HTTP/1.1" 206 1024 "" "pronto/0.1.0"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLogEntry {
    pub method: String,
    pub path: String,
    pub status: u16,
    /// Bytes of the response body the registry wrote.
    pub bytes: u64,
    pub user_agent: String,
}

impl AccessLogEntry {
    fn parse(line: &str) -> Option<Self> {
        let (_, rest) = line.split_once("] \"")?;
        let (request, rest) = rest.split_once("\" ")?;
        let mut request = request.split(' ');
        let (method, path) = (request.next()?, request.next()?);
        let mut fields = rest.splitn(3, ' ');
        let status = fields.next()?.parse().ok()?;
        let bytes = match fields.next()? {
            "-" => 0,
            n => n.parse().ok()?,
        };
        let user_agent = fields.next()?.rsplit_once(" \"")?.1.strip_suffix('"')?;
        Some(Self {
            method: method.to_owned(),
            path: path.to_owned(),
            status,
            bytes,
            user_agent: user_agent.to_owned(),
        })
    }
}

fn config_yaml(dir: &TempDir, addr: SocketAddr, options: &RegistryOptions) -> String {
    let storage = dir.path().join("storage");
    let mut yaml = format!(
        "version: 0.1
log:
  level: info
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: {storage}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: {addr}
  secret: pronto-test-{port}
health:
  storagedriver:
    enabled: false
",
        storage = storage.display(),
        port = addr.port(),
    );
    if let Some(notifications) = &options.notifications {
        // Failed deliveries are retried every second, in order.
        yaml.push_str(&format!(
            "notifications:\n  endpoints:\n    - name: pronto\n      url: {}\n      timeout: 2s\n      threshold: 3\n      backoff: 1s\n",
            notifications.url
        ));
        if let Some(token) = &notifications.token {
            yaml.push_str(&format!(
                "      headers:\n        Authorization: [\"Bearer {token}\"]\n"
            ));
        }
    }
    if options.basic_auth.is_some() {
        yaml.push_str(&format!(
            "auth:\n  htpasswd:\n    realm: pronto-test\n    path: {}\n",
            dir.path().join("htpasswd").display()
        ));
    } else if let Some(token) = &options.token_auth {
        yaml.push_str(&format!(
            "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
            token.realm,
            token.service,
            token.issuer,
            dir.path().join("token.crt").display()
        ));
    }
    yaml
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_log_lines_parse() {
        let line = r#"127.0.0.1 - - [26/Nov/2026:02:28:34 +0000] "GET /v2/x/blobs/sha256:00 HTTP/1.1" 206 157 "" "pronto/0.1.0""#;
        assert_eq!(
            AccessLogEntry::parse(line),
            Some(AccessLogEntry {
                method: "GET".into(),
                path: "/v2/x/blobs/sha256:00".into(),
                status: 206,
                bytes: 157,
                user_agent: "pronto/0.1.0".into(),
            })
        );
        let app_line = r#"time="2026-11-26T02:28:34Z" level=info msg="response completed" http.request.uri=/v2/"#;
        assert_eq!(AccessLogEntry::parse(app_line), None);
    }
}
