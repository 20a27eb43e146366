//! `pronto status`: asks the running daemon what it has mounted lazily,
//! per image, and how much of each layer is on this node.

use anyhow::Result;
use pronto_snapshotter::status::{StatusResponse, query};
use serde_json::{Value, json};

use crate::config::Config;
use crate::text::human_size;

pub fn run(config: &Config, as_json: bool) -> Result<()> {
    let status = super::runtime()?
        .block_on(query(&config.address))
        .map_err(|problem| {
            anyhow::anyhow!("{problem}; is `pronto serve` running with this configuration?")
        })?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&to_json(&status))?);
    } else {
        print!("{}", render(&status));
    }
    Ok(())
}

fn to_json(status: &StatusResponse) -> Value {
    json!({
        "cache": {"bytes": status.cache_bytes, "budget": status.cache_budget},
        "registry": {
            "requests": status.registry_requests,
            "round_trips": status.registry_round_trips,
        },
        "fallbacks": status.fallbacks.iter()
            .map(|f| (f.reason.clone(), json!(f.count)))
            .collect::<serde_json::Map<_, _>>(),
        "warm": status.warm.iter().map(|w| json!({
            "reference": w.reference,
            "mode": w.mode,
            "state": w.state,
            "digest": w.digest,
            "reason": w.reason,
            "lag_seconds": w.lag_seconds,
            "bytes": w.bytes,
            "warmed_at": w.warmed_at,
            "source": w.source,
        })).collect::<Vec<_>>(),
        "images": status.images.iter().map(|image| json!({
            "reference": image.reference,
            "layers": image.layers.iter().map(|layer| json!({
                "digest": layer.digest,
                "size": layer.size,
                "local_bytes": layer.local_bytes,
                "fetched_on_demand": layer.fetched_on_demand,
                "fetched_in_background": layer.fetched_in_background,
                "fetched_ahead": layer.fetched_ahead,
                "background": layer.background,
                "snapshot_id": layer.snapshot_id,
                "mountpoint": layer.mountpoint,
                "served_since": layer.served_since,
                "handovers": layer.handovers,
                "profile": layer.profile,
                "fetched_by_profile": layer.fetched_by_profile,
                "on_demand_requests": layer.on_demand_requests,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

fn render(status: &StatusResponse) -> String {
    let mut out = format!(
        "cache: {} of {}\n",
        human_size(status.cache_bytes),
        human_size(status.cache_budget)
    );
    out.push_str(&format!(
        "registry: {} requests since start, {} of them round trips of their own\n",
        status.registry_requests, status.registry_round_trips
    ));
    if !status.fallbacks.is_empty() {
        let counts: Vec<String> = status
            .fallbacks
            .iter()
            .map(|f| format!("{}={}", f.reason, f.count))
            .collect();
        out.push_str(&format!(
            "not lazy since start: {} (the log names each layer)\n",
            counts.join(" ")
        ));
    }
    for w in &status.warm {
        let mut line = format!("warm set: {} ({}): {}", w.reference, w.mode, w.state);
        if !w.digest.is_empty() {
            line.push_str(&format!(" at {}", w.digest));
        }
        if w.state == "warm" {
            line.push_str(&format!(
                ", {} fetched ahead ({})",
                human_size(w.bytes),
                w.source
            ));
            if w.lag_seconds > 0.0 {
                line.push_str(&format!(", {:.1} s after the push", w.lag_seconds));
            }
        }
        if !w.reason.is_empty() && w.state == "failed" {
            line.push_str(&format!(": {}", w.reason));
        }
        out.push_str(&line);
        out.push('\n');
    }
    if status.images.is_empty() {
        out.push_str("no layers are mounted lazily\n");
        return out;
    }
    for image in &status.images {
        let size: u64 = image.layers.iter().map(|l| l.size).sum();
        let local: u64 = image.layers.iter().map(|l| l.local_bytes).sum();
        let count = match image.layers.len() {
            1 => "1 lazy layer".to_owned(),
            n => format!("{n} lazy layers"),
        };
        out.push_str(&format!(
            "\n{}\n  {count}, {} of {} local ({})\n",
            image.reference,
            human_size(local),
            human_size(size),
            percent(local, size)
        ));
        let profiled: u64 = image.layers.iter().map(|l| l.fetched_by_profile).sum();
        let misses: u64 = image.layers.iter().map(|l| l.on_demand_requests).sum();
        let uses: Vec<&str> = image
            .layers
            .iter()
            .map(|l| l.profile.as_str())
            .filter(|p| !p.is_empty())
            .collect();
        if uses.iter().any(|p| p.contains("prefetched")) {
            out.push_str(&format!(
                "  startup profile: {} fetched ahead, {misses} reads fetched on demand\n",
                human_size(profiled)
            ));
        } else if !uses.is_empty() {
            out.push_str("  startup profile: recording this start\n");
        }
        out.push_str(
            "  LAYER                    LOCAL                          BACKGROUND            SERVED\n",
        );
        for layer in &image.layers {
            let short = layer.digest.get(..19).unwrap_or(&layer.digest);
            let local = format!(
                "{} / {} ({})",
                human_size(layer.local_bytes),
                human_size(layer.size),
                percent(layer.local_bytes, layer.size)
            );
            let background = match layer.background.as_str() {
                "running" => format!(
                    "running, {} read",
                    percent(layer.fetched_in_background, layer.size)
                ),
                other => other.to_owned(),
            };
            let served = match layer.handovers {
                0 => format!("since {}", timestamp(layer.served_since)),
                1 => format!("since {}, handed over once", timestamp(layer.served_since)),
                n => format!("since {}, handed over {n}x", timestamp(layer.served_since)),
            };
            out.push_str(&format!(
                "  {short:<24} {local:<30} {background:<21} {served}\n"
            ));
        }
    }
    out
}

/// Seconds since the epoch as UTC date and time.
fn timestamp(secs: u64) -> String {
    let format =
        time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second] UTC");
    time::OffsetDateTime::from_unix_timestamp(secs as i64)
        .ok()
        .and_then(|t| t.format(&format).ok())
        .unwrap_or_else(|| secs.to_string())
}

fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        return "100%".to_owned();
    }
    format!("{:.0}%", part as f64 * 100.0 / whole as f64)
}

#[cfg(test)]
mod tests {
    use pronto_snapshotter::status::{FallbackCount, ImageStatus, LayerStatus, WarmStatus};

    use super::*;

    fn sample() -> StatusResponse {
        StatusResponse {
            images: vec![ImageStatus {
                reference: "registry.example/ml/model:v1".into(),
                layers: vec![LayerStatus {
                    digest: format!("sha256:{}", "ab".repeat(32)),
                    size: 100 << 20,
                    local_bytes: 25 << 20,
                    fetched_on_demand: 5 << 20,
                    fetched_in_background: 20 << 20,
                    fetched_ahead: 0,
                    background: "running".into(),
                    snapshot_id: 7,
                    mountpoint: "/var/lib/pronto/snapshotter/snapshots/7/fs".into(),
                    served_since: 1_796_256_000,
                    handovers: 2,
                    fetched_by_profile: 3 << 20,
                    on_demand_requests: 4,
                    profile: "prefetched".into(),
                }],
            }],
            cache_bytes: 30 << 20,
            cache_budget: 20 << 30,
            fallbacks: vec![FallbackCount {
                reason: "no-index".into(),
                count: 2,
            }],
            warm: vec![
                WarmStatus {
                    reference: "registry.example/ml/model:v1".into(),
                    mode: "lazy".into(),
                    state: "warm".into(),
                    digest: format!("sha256:{}", "cd".repeat(32)),
                    lag_seconds: 2.5,
                    bytes: 12 << 20,
                    source: "push".into(),
                    ..Default::default()
                },
                WarmStatus {
                    reference: "registry.example/ml/gone:v1".into(),
                    mode: "full".into(),
                    state: "failed".into(),
                    reason: "manifest unknown".into(),
                    ..Default::default()
                },
            ],
            registry_requests: 40,
            registry_round_trips: 9,
        }
    }

    #[test]
    fn the_table_shows_local_bytes_and_background_progress() {
        let text = render(&sample());
        assert!(text.starts_with("cache: 30.0 MiB of 20.0 GiB\n"), "{text}");
        assert!(text.contains("not lazy since start: no-index=2"), "{text}");
        assert!(
            text.contains("registry: 40 requests since start, 9 of them round trips"),
            "{text}"
        );
        assert!(
            text.contains(
                "registry.example/ml/model:v1\n  1 lazy layer, 25.0 MiB of 100.0 MiB local (25%)"
            ),
            "{text}"
        );
        assert!(text.contains("sha256:abababababab"), "{text}");
        assert!(text.contains("running, 20% read"), "{text}");
        assert!(
            text.contains("since 2026-12-03 00:00:00 UTC, handed over 2x"),
            "{text}"
        );
        assert!(
            text.contains("warm set: registry.example/ml/model:v1 (lazy): warm at sha256:cdcd"),
            "{text}"
        );
        assert!(
            text.contains("12.0 MiB fetched ahead (push), 2.5 s after the push"),
            "{text}"
        );
        assert!(
            text.contains("registry.example/ml/gone:v1 (full): failed: manifest unknown"),
            "{text}"
        );
    }

    #[test]
    fn json_carries_every_field() {
        let value = to_json(&sample());
        assert_eq!(value["fallbacks"]["no-index"], 2);
        let layer = &value["images"][0]["layers"][0];
        assert_eq!(layer["local_bytes"], 25 << 20);
        assert_eq!(layer["background"], "running");
        assert_eq!(layer["handovers"], 2);
        assert_eq!(layer["served_since"], 1_796_256_000u64);
        assert_eq!(value["cache"]["budget"], 20u64 << 30);
        assert_eq!(value["registry"]["round_trips"], 9);
        assert_eq!(value["warm"][0]["state"], "warm");
        assert_eq!(value["warm"][0]["lag_seconds"], 2.5);
        assert_eq!(value["warm"][1]["reason"], "manifest unknown");
    }

    #[test]
    fn nothing_mounted_says_so() {
        let text = render(&StatusResponse::default());
        assert!(text.ends_with("no layers are mounted lazily\n"), "{text}");
    }
}
