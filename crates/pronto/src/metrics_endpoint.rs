//! The daemon's Prometheus endpoint: `GET /metrics` on `metrics_address`,
//! in the OpenMetrics text format that Prometheus scrapes. The only HTTP
//! server code in Pronto; what is exported is defined in `pronto-metrics`.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use axum::Router;
use axum::http::header::CONTENT_TYPE;
use axum::routing::get;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Binds `address` now (so a taken port fails the daemon's start, not a
/// later scrape) and returns the task that serves it until `shutdown`.
pub async fn bind(
    address: SocketAddr,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen for metrics on {address} (metrics_address)"))?;
    let bound = listener.local_addr()?;
    let app = Router::new().route(
        "/metrics",
        get(|| async {
            (
                [(CONTENT_TYPE, OPENMETRICS)],
                pronto_metrics::metrics().encode(),
            )
        }),
    );
    tracing::info!(address = %bound, "serving Prometheus metrics on /metrics");
    Ok(tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!("the metrics endpoint stopped: {err}");
        }
    }))
}
