//! The API listener: `/metrics` (Prometheus text), `/healthz`, and the JSON
//! admin API the CLI uses (`/api/v1/...`).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use cairn_chunkstore::Store;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// What the API handlers share.
#[derive(Debug, Clone)]
pub struct ApiState {
    /// The node's metrics.
    pub registry: prometheus::Registry,
    /// The node's store.
    pub store: Arc<Store>,
    /// Static facts about the node.
    pub info: Arc<NodeInfo>,
}

/// Static facts about a node, served by `/api/v1/status`.
#[derive(Debug, Clone, Serialize)]
pub struct NodeInfo {
    /// Node name (from its certificate).
    pub node: String,
    /// Site name.
    pub site: String,
    /// Cairn version.
    pub version: String,
    /// QUIC address.
    pub quic: Option<SocketAddr>,
    /// Registry address.
    pub registry: Option<SocketAddr>,
    /// API address.
    pub api: Option<SocketAddr>,
    /// Parent peers.
    pub parents: Vec<String>,
    /// Other peers.
    pub peers: Vec<String>,
}

/// The API routes.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/api/v1/status", get(status))
        .with_state(state)
}

async fn healthz() -> impl IntoResponse {
    Json(serde_json::json!({"status": "ok"}))
}

async fn metrics(State(s): State<ApiState>) -> Response {
    let enc = prometheus::TextEncoder::new();
    match enc.encode_to_string(&s.registry.gather()) {
        Ok(body) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], body).into_response(),
        Err(e) => {
            warn!(error = %e, "cannot encode metrics");
            (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
        }
    }
}

#[derive(Serialize)]
struct Status {
    #[serde(flatten)]
    info: NodeInfo,
    store: cairn_chunkstore::StoreSummary,
}

async fn status(State(s): State<ApiState>) -> Response {
    let store = s.store.clone();
    match tokio::task::spawn_blocking(move || store.summary()).await {
        Ok(summary) => Json(Status {
            info: (*s.info).clone(),
            store: summary,
        })
        .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// Serve `router` on `listener` until `cancel`, then finish in-flight
/// requests (graceful shutdown). Logs and returns when done.
pub async fn serve(
    what: &'static str,
    listener: tokio::net::TcpListener,
    router: Router,
    cancel: CancellationToken,
) {
    let addr = listener.local_addr().ok();
    info!(what, ?addr, "listening");
    let res = axum::serve(listener, router)
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await;
    if let Err(e) = res {
        warn!(what, error = %e, "HTTP server failed");
    }
    info!(what, "stopped");
}
