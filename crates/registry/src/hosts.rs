//! Where requests for a registry go: plain HTTP or TLS, certificate
//! checks, and mirrors tried before the upstream host, configured like
//! containerd's `hosts.toml` (`<dir>/<registry>/hosts.toml`). Loopback
//! registries (`localhost`, 127.0.0.0/8, ::1) use plain HTTP by default, as
//! Docker and containerd treat them.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostSettings {
    /// Talk HTTP instead of HTTPS.
    pub plain_http: bool,
    /// Accept any TLS certificate (self-signed test registries).
    pub skip_verify: bool,
}

/// One place a request can be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `scheme://authority[/prefix]`; API paths are appended as `/v2/…`.
    pub base_url: String,
    /// The name credentials are looked up under: the registry's own name
    /// for the upstream host, the mirror's authority for a mirror.
    pub credentials_host: String,
    pub skip_verify: bool,
    pub is_mirror: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum HostsError {
    #[error("cannot read registry host settings {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("registry host settings {path} are invalid: {message}")]
    Parse { path: PathBuf, message: String },
}

/// Settings for registries by name (`host[:port]` as in references).
#[derive(Debug, Clone, Default)]
pub struct Hosts {
    overrides: HashMap<String, HostSettings>,
    /// Upstream URL overrides (`server = …` in hosts.toml).
    servers: HashMap<String, String>,
    mirrors: HashMap<String, Vec<Endpoint>>,
}

/// The parts of containerd's hosts.toml Pronto uses; other keys (`ca`,
/// `client`, `header`, …) are accepted and left to containerd.
#[derive(Debug, Deserialize)]
struct HostsFile {
    server: Option<String>,
    #[serde(default)]
    host: toml::Table,
    skip_verify: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct HostEntry {
    capabilities: Option<Vec<String>>,
    skip_verify: Option<bool>,
}

impl Hosts {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets how `registry` is reached, overriding the defaults.
    pub fn set(&mut self, registry: &str, settings: HostSettings) {
        self.overrides.insert(registry.to_owned(), settings);
    }

    /// Adds a pull mirror for `registry`, tried before the upstream host
    /// in the order added. `url` is `scheme://host[:port][/prefix]`.
    pub fn add_mirror(&mut self, registry: &str, url: &str, skip_verify: bool) {
        let base = url.trim_end_matches('/').trim_end_matches("/v2").to_owned();
        let authority = authority_of(&base).to_owned();
        self.mirrors
            .entry(registry.to_owned())
            .or_default()
            .push(Endpoint {
                base_url: base,
                credentials_host: authority,
                skip_verify,
                is_mirror: true,
            });
    }

    /// Reads containerd-style `<dir>/<registry>/hosts.toml` files: `server`
    /// replaces the upstream URL; each `[host."URL"]` with the `pull`
    /// capability becomes a mirror. A missing directory means no settings.
    pub fn load_dir(dir: &Path) -> Result<Self, HostsError> {
        let mut hosts = Hosts::new();
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(hosts),
            Err(source) => {
                return Err(HostsError::Read {
                    path: dir.to_path_buf(),
                    source,
                });
            }
        };
        for entry in entries.flatten() {
            let path = entry.path().join("hosts.toml");
            let Some(registry) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if !path.is_file() {
                continue;
            }
            hosts.load_file(&registry, &path)?;
        }
        Ok(hosts)
    }

    fn load_file(&mut self, registry: &str, path: &Path) -> Result<(), HostsError> {
        let text = std::fs::read_to_string(path).map_err(|source| HostsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let parse_error = |message: String| HostsError::Parse {
            path: path.to_path_buf(),
            message,
        };
        let file: HostsFile =
            toml::from_str(&text).map_err(|e| parse_error(e.message().to_owned()))?;
        if let Some(server) = &file.server {
            let server = server.trim_end_matches('/').trim_end_matches("/v2");
            self.servers.insert(registry.to_owned(), server.to_owned());
            self.overrides.insert(
                registry.to_owned(),
                HostSettings {
                    plain_http: server.starts_with("http://"),
                    skip_verify: file.skip_verify.unwrap_or(false),
                },
            );
        }
        for (url, value) in file.host {
            let entry: HostEntry = value.try_into().map_err(|e: toml::de::Error| {
                parse_error(format!("[host.{url:?}]: {}", e.message()))
            })?;
            let pulls = entry
                .capabilities
                .as_ref()
                .is_none_or(|caps| caps.iter().any(|c| c == "pull"));
            if !url.starts_with("http://") && !url.starts_with("https://") {
                return Err(parse_error(format!(
                    "[host.{url:?}] must be an http:// or https:// URL"
                )));
            }
            if pulls {
                self.add_mirror(registry, &url, entry.skip_verify.unwrap_or(false));
            }
        }
        Ok(())
    }

    pub fn settings(&self, registry: &str) -> HostSettings {
        self.overrides
            .get(registry)
            .cloned()
            .unwrap_or(HostSettings {
                plain_http: is_loopback(registry),
                skip_verify: false,
            })
    }

    /// The registry's own endpoint. Docker Hub's name `docker.io` is served
    /// by `registry-1.docker.io`.
    pub fn upstream(&self, registry: &str) -> Endpoint {
        let settings = self.settings(registry);
        let base_url = self.servers.get(registry).cloned().unwrap_or_else(|| {
            let scheme = if settings.plain_http { "http" } else { "https" };
            let endpoint = if registry == "docker.io" || registry == "index.docker.io" {
                "registry-1.docker.io"
            } else {
                registry
            };
            format!("{scheme}://{endpoint}")
        });
        Endpoint {
            base_url,
            credentials_host: registry.to_owned(),
            skip_verify: settings.skip_verify,
            is_mirror: false,
        }
    }

    /// Where to send a request: for pulls the mirrors in order, then the
    /// upstream host; pushes go to the upstream host only. A URL listed
    /// twice (a `[host]` that is also the `server`, as many hosts.toml
    /// files have) is asked once: a 404 from it is its answer.
    pub fn endpoints(&self, registry: &str, push: bool) -> Vec<Endpoint> {
        let mut endpoints = if push {
            Vec::new()
        } else {
            self.mirrors.get(registry).cloned().unwrap_or_default()
        };
        let mut upstream = self.upstream(registry);
        upstream.skip_verify |= endpoints
            .iter()
            .any(|e| e.base_url == upstream.base_url && e.skip_verify);
        endpoints.retain(|e| e.base_url != upstream.base_url);
        endpoints.push(upstream);
        endpoints
    }
}

/// `host[:port]` of `scheme://host[:port]/path`.
fn authority_of(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    rest.split('/').next().unwrap_or(rest)
}

/// True for `localhost`, 127.0.0.0/8 and ::1, with or without a port.
pub fn is_loopback(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else {
        host.rsplit_once(':')
            .filter(|(_, port)| port.parse::<u16>().is_ok())
            .map_or(host, |(name, _)| name)
    };
    name == "localhost" || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts_default_to_plain_http() {
        let hosts = Hosts::new();
        for host in ["localhost:5000", "127.0.0.1", "127.8.9.1:443", "[::1]:5000"] {
            assert!(hosts.settings(host).plain_http, "{host}");
        }
        for host in ["docker.io", "10.0.0.1:5000", "ghcr.io"] {
            assert!(!hosts.settings(host).plain_http, "{host}");
        }
        assert_eq!(
            hosts.upstream("docker.io").base_url,
            "https://registry-1.docker.io"
        );
        assert_eq!(
            hosts.upstream("127.0.0.1:5000").base_url,
            "http://127.0.0.1:5000"
        );
    }

    #[test]
    fn overrides_win() {
        let mut hosts = Hosts::new();
        hosts.set(
            "127.0.0.1:5000",
            HostSettings {
                plain_http: false,
                skip_verify: true,
            },
        );
        let upstream = hosts.upstream("127.0.0.1:5000");
        assert_eq!(upstream.base_url, "https://127.0.0.1:5000");
        assert!(upstream.skip_verify);
    }

    #[test]
    fn hosts_toml_gives_mirrors_then_upstream() {
        let dir = tempfile::tempdir().unwrap();
        let reg = dir.path().join("docker.io");
        std::fs::create_dir_all(&reg).unwrap();
        std::fs::write(
            reg.join("hosts.toml"),
            r#"server = "https://registry-1.docker.io"

[host."http://127.0.0.1:5001"]
  capabilities = ["pull", "resolve"]

[host."https://push-only.example"]
  capabilities = ["push"]
"#,
        )
        .unwrap();
        let hosts = Hosts::load_dir(dir.path()).unwrap();
        let pull: Vec<String> = hosts
            .endpoints("docker.io", false)
            .into_iter()
            .map(|e| e.base_url)
            .collect();
        assert_eq!(
            pull,
            ["http://127.0.0.1:5001", "https://registry-1.docker.io"]
        );
        assert_eq!(hosts.endpoints("docker.io", true).len(), 1);
        assert_eq!(
            hosts.endpoints("docker.io", false)[0].credentials_host,
            "127.0.0.1:5001"
        );
    }

    #[test]
    fn a_host_that_is_also_the_server_is_asked_once() {
        let dir = tempfile::tempdir().unwrap();
        let reg = dir.path().join("127.0.0.1:5000");
        std::fs::create_dir_all(&reg).unwrap();
        std::fs::write(
            reg.join("hosts.toml"),
            "server = \"https://127.0.0.1:5000\"\n\n[host.\"https://127.0.0.1:5000\"]\n  capabilities = [\"pull\", \"resolve\", \"push\"]\n  skip_verify = true\n",
        )
        .unwrap();
        let hosts = Hosts::load_dir(dir.path()).unwrap();
        let pull = hosts.endpoints("127.0.0.1:5000", false);
        assert_eq!(pull.len(), 1, "{pull:?}");
        assert_eq!(pull[0].base_url, "https://127.0.0.1:5000");
        assert!(pull[0].skip_verify, "the host's settings stay");
        assert!(!pull[0].is_mirror);
    }

    #[test]
    fn bad_hosts_toml_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let reg = dir.path().join("example.com");
        std::fs::create_dir_all(&reg).unwrap();
        std::fs::write(reg.join("hosts.toml"), "server = 5\n").unwrap();
        let err = Hosts::load_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("example.com/hosts.toml"), "{err}");
        assert!(Hosts::load_dir(&dir.path().join("missing")).is_ok());
    }
}
