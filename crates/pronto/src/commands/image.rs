//! `pronto image inspect`: what a registry holds for an image.

use std::sync::Arc;

use anyhow::{Result, anyhow};
use pronto_registry::{
    ClientConfig, CredentialChain, CredentialSource, DockerConfigCredentials, Hosts, ManifestKind,
    Platform, RegistryClient, ResolvedImage, parse_reference,
};
use serde_json::{Value, json};

use crate::cli::ImageCommand;
use crate::config::Config;
use crate::text::human_size;

pub fn run(cmd: ImageCommand, config: &Config) -> Result<()> {
    match cmd {
        ImageCommand::Inspect {
            reference,
            platform,
            json,
        } => {
            let platform: Platform = platform.parse().map_err(|e: String| anyhow!(e))?;
            let runtime = super::runtime()?;
            let client = registry_client(config)?;
            let report = runtime.block_on(inspect(&client, &reference, &platform))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", render(&report));
            }
            Ok(())
        }
    }
}

/// A registry client set up from the configuration: hosts.toml settings,
/// docker's credentials (`registry.docker_config`), the concurrency limit.
pub fn registry_client(config: &Config) -> Result<RegistryClient> {
    registry_client_with(config, None)
}

/// Like [`registry_client`], asking `first` for credentials before
/// docker's configuration.
pub fn registry_client_with(
    config: &Config,
    first: Option<Arc<dyn CredentialSource>>,
) -> Result<RegistryClient> {
    let hosts = Hosts::load_dir(&config.registry.hosts_dir)?;
    let docker: Arc<dyn CredentialSource> = Arc::new(DockerConfigCredentials::at(
        config.registry.docker_config.clone(),
    ));
    let credentials = match first {
        Some(first) => Arc::new(CredentialChain(vec![first, docker])),
        None => docker,
    };
    Ok(RegistryClient::new(ClientConfig {
        hosts,
        credentials,
        max_concurrent_per_registry: config.registry.max_concurrent_per_registry,
        ..Default::default()
    })?)
}

async fn inspect(client: &RegistryClient, reference: &str, platform: &Platform) -> Result<Value> {
    let reference = parse_reference(reference)?;
    let resolved = client.resolve(&reference, platform).await?;
    let referrers = client
        .referrers(&resolved.repository, &resolved.manifest.digest, None)
        .await?;
    let mut report = describe(&reference.to_string(), platform, &resolved);
    report["referrers"] = referrers
        .iter()
        .map(|d| {
            json!({
                "digest": d.digest().to_string(),
                "artifact_type": d.artifact_type().as_ref().map(|t| t.to_string()),
                "media_type": d.media_type().to_string(),
                "size": d.size(),
            })
        })
        .collect();
    Ok(report)
}

fn describe(reference: &str, platform: &Platform, resolved: &ResolvedImage) -> Value {
    let platforms: Vec<String> = match resolved.index.as_ref().map(|i| &i.kind) {
        Some(ManifestKind::Index(index)) => index
            .manifests()
            .iter()
            .filter_map(|m| m.platform().as_ref())
            .map(|p| {
                let mut s = format!("{}/{}", p.os(), p.architecture());
                if let Some(v) = p.variant() {
                    s.push('/');
                    s.push_str(v);
                }
                s
            })
            .collect(),
        _ => Vec::new(),
    };
    let config = resolved.config.config().as_ref();
    json!({
        "reference": reference,
        "index": resolved.index.as_ref().map(|i| json!({
            "digest": i.digest,
            "media_type": i.media_type,
            "platforms": platforms,
        })),
        "platform": platform.to_string(),
        "manifest": {
            "digest": resolved.manifest.digest,
            "media_type": resolved.manifest.media_type,
        },
        "config": {
            "digest": resolved.image.config().digest().to_string(),
            "os": resolved.config.os().to_string(),
            "architecture": resolved.config.architecture().to_string(),
            "created": resolved.config.created(),
            "entrypoint": config.and_then(|c| c.entrypoint().clone()),
            "cmd": config.and_then(|c| c.cmd().clone()),
            "env": config.and_then(|c| c.env().clone()).unwrap_or_default(),
            "working_dir": config.and_then(|c| c.working_dir().clone()),
        },
        "layers": resolved.image.layers().iter().map(|l| json!({
            "digest": l.digest().to_string(),
            "media_type": l.media_type().to_string(),
            "size": l.size(),
        })).collect::<Vec<_>>(),
    })
}

fn render(report: &Value) -> String {
    let mut out = String::new();
    let mut line = |label: &str, text: String| out.push_str(&format!("{label:<11}{text}\n"));
    line("reference", text(&report["reference"]));
    if let Some(index) = report["index"].as_object() {
        let platforms: Vec<String> = index["platforms"]
            .as_array()
            .map(|a| a.iter().map(text).collect())
            .unwrap_or_default();
        line(
            "index",
            format!(
                "{} ({})",
                text(&index["digest"]),
                text(&index["media_type"])
            ),
        );
        line("platforms", platforms.join(", "));
    }
    line("platform", text(&report["platform"]));
    let manifest = &report["manifest"];
    line(
        "manifest",
        format!(
            "{} ({})",
            text(&manifest["digest"]),
            text(&manifest["media_type"])
        ),
    );
    let config = &report["config"];
    line("config", text(&config["digest"]));
    line("created", text(&config["created"]));
    line("entrypoint", text(&config["entrypoint"]));
    line("cmd", text(&config["cmd"]));
    line(
        "env",
        format!("{} variables", config["env"].as_array().map_or(0, Vec::len)),
    );
    let layers = report["layers"].as_array().cloned().unwrap_or_default();
    let total: u64 = layers.iter().filter_map(|l| l["size"].as_u64()).sum();
    out.push_str(&format!(
        "layers     {} layers, {} compressed\n",
        layers.len(),
        human_size(total)
    ));
    for layer in &layers {
        out.push_str(&format!(
            "  {}  {:>10}  {}\n",
            text(&layer["digest"]),
            human_size(layer["size"].as_u64().unwrap_or(0)),
            text(&layer["media_type"])
        ));
    }
    let referrers = report["referrers"].as_array().cloned().unwrap_or_default();
    out.push_str(&format!("referrers  {}\n", referrers.len()));
    for r in &referrers {
        out.push_str(&format!(
            "  {}  {:>10}  {}\n",
            text(&r["digest"]),
            human_size(r["size"].as_u64().unwrap_or(0)),
            text(&r["artifact_type"])
        ));
    }
    out
}

/// A JSON value as plain text: strings unquoted, null as "-".
fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_of_json_values() {
        assert_eq!(text(&Value::Null), "-");
        assert_eq!(text(&json!("a")), "a");
        assert_eq!(text(&json!(["x"])), "[\"x\"]");
    }
}
