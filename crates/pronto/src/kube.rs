//! The little of the Kubernetes API Pronto uses: a label on its own Node
//! and whether its DaemonSet still exists. Plain HTTPS with the pod's
//! service-account token; no client library, on purpose (two calls).

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::json;

/// The label saying a node serves images lazily through Pronto.
pub const LAZY_PULL_LABEL: &str = "pronto.dev/lazy-pull";

/// Where a pod finds its service account.
const SERVICE_ACCOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// An API server and the token to call it with.
pub struct ApiServer {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl ApiServer {
    /// `base` (e.g. `https://10.0.0.1:443`) with the token in
    /// `token_file` and, for HTTPS, the CA certificate in `ca_file`.
    pub fn new(base: &str, token_file: &Path, ca_file: Option<&Path>) -> Result<Self> {
        let token = std::fs::read_to_string(token_file)
            .with_context(|| format!("read the API token {}", token_file.display()))?
            .trim()
            .to_owned();
        let mut http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(30));
        if let Some(ca) = ca_file {
            let pem = std::fs::read(ca).with_context(|| format!("read {}", ca.display()))?;
            http = http
                .tls_built_in_root_certs(false)
                .add_root_certificate(reqwest::Certificate::from_pem(&pem)?);
        }
        Ok(Self {
            base: base.trim_end_matches('/').to_owned(),
            token,
            http: http.build()?,
        })
    }

    /// The API server of the cluster this pod runs in.
    pub fn in_cluster() -> Result<Self> {
        let host = std::env::var("KUBERNETES_SERVICE_HOST")
            .context("KUBERNETES_SERVICE_HOST is not set: not running in a pod")?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        let dir = Path::new(SERVICE_ACCOUNT);
        Self::new(
            &format!("https://{host}:{port}"),
            &dir.join("token"),
            Some(&dir.join("ca.crt")),
        )
    }

    /// Sets `key` on node `node` to `value`, or removes it with `None`
    /// (a JSON merge patch, which needs only `patch` on nodes).
    pub async fn set_node_label(&self, node: &str, key: &str, value: Option<&str>) -> Result<()> {
        let body = json!({"metadata": {"labels": {key: value}}});
        let response = self
            .http
            .patch(format!("{}/api/v1/nodes/{node}", self.base))
            .bearer_auth(&self.token)
            .header("Content-Type", "application/merge-patch+json")
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("PATCH node {node}: {}", e.without_url()))?;
        let status = response.status();
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            bail!(
                "PATCH node {node}: HTTP {}: {}",
                status.as_u16(),
                api_message(&text)
            );
        }
        Ok(())
    }

    /// Whether DaemonSet `namespace/name` is gone or being deleted (an
    /// uninstall, as opposed to a rolling update).
    pub async fn daemonset_gone(&self, namespace: &str, name: &str) -> Result<bool> {
        let response = self
            .http
            .get(format!(
                "{}/apis/apps/v1/namespaces/{namespace}/daemonsets/{name}",
                self.base
            ))
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("GET daemonset {name}: {}", e.without_url()))?;
        match response.status().as_u16() {
            404 => Ok(true),
            200 => {
                let object: serde_json::Value = response.json().await?;
                Ok(object["metadata"]["deletionTimestamp"].is_string())
            }
            code => {
                let text = response.text().await.unwrap_or_default();
                bail!("GET daemonset {name}: HTTP {code}: {}", api_message(&text))
            }
        }
    }
}

/// The `message` of a Kubernetes `Status` body, else the body itself.
fn api_message(text: &str) -> String {
    serde_json::from_str::<serde_json::Value>(text)
        .ok()
        .and_then(|v| v["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| text.chars().take(200).collect())
}
