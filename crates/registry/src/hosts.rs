//! Per-registry connection settings: plain HTTP, TLS verification, and the
//! API endpoint of a registry name. Loopback registries (`localhost`,
//! 127.0.0.0/8, ::1) use plain HTTP by default, as Docker and containerd
//! treat them.

use std::collections::HashMap;
use std::net::IpAddr;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostSettings {
    /// Talk HTTP instead of HTTPS.
    pub plain_http: bool,
    /// Accept any TLS certificate (self-signed test registries).
    pub skip_verify: bool,
}

/// Settings for registries by host (`host[:port]` as in references).
#[derive(Debug, Clone, Default)]
pub struct Hosts {
    overrides: HashMap<String, HostSettings>,
}

impl Hosts {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets how `host` is reached, overriding the defaults.
    pub fn set(&mut self, host: &str, settings: HostSettings) {
        self.overrides.insert(host.to_owned(), settings);
    }

    pub fn settings(&self, host: &str) -> HostSettings {
        self.overrides.get(host).cloned().unwrap_or(HostSettings {
            plain_http: is_loopback(host),
            skip_verify: false,
        })
    }

    /// `scheme://endpoint` of the distribution API for registry `host`.
    /// Docker Hub's name `docker.io` is served by `registry-1.docker.io`.
    pub fn base_url(&self, host: &str) -> String {
        let scheme = if self.settings(host).plain_http {
            "http"
        } else {
            "https"
        };
        let endpoint = if host == "docker.io" || host == "index.docker.io" {
            "registry-1.docker.io"
        } else {
            host
        };
        format!("{scheme}://{endpoint}")
    }
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
        assert_eq!(hosts.base_url("docker.io"), "https://registry-1.docker.io");
        assert_eq!(hosts.base_url("127.0.0.1:5000"), "http://127.0.0.1:5000");
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
        assert_eq!(hosts.base_url("127.0.0.1:5000"), "https://127.0.0.1:5000");
    }
}
