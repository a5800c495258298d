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
    /// The fetcher, for asking other sites what they hold.
    pub fetcher: Option<cairn_transport::Fetcher>,
    /// Parents and peers, asked by `/api/v1/image-status`.
    pub sites: Vec<cairn_transport::PeerAddr>,
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
        .route("/api/v1/image-status", get(image_status_handler))
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
pub async fn serve<L>(what: &'static str, listener: L, router: Router, cancel: CancellationToken)
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
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

/// Where an image's bytes are: here and at each known site.
#[derive(Debug, Clone, Serialize)]
pub struct ImageStatus {
    /// `repo:tag` or `repo@digest`.
    pub reference: String,
    /// Manifest digest.
    pub digest: String,
    /// Distinct chunks of the manifest and every blob it lists.
    pub chunks: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Per site: this node first, then parents and peers.
    pub sites: Vec<SiteStatus>,
}

/// One site's share of an image.
#[derive(Debug, Clone, Serialize)]
pub struct SiteStatus {
    /// `local`, or the peer's address.
    pub site: String,
    /// `complete`, `partial`, `absent` or `unreachable`.
    pub state: String,
    /// Chunks held.
    pub chunks: u64,
    /// Bytes held.
    pub bytes: u64,
    /// Why it is unreachable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn state_of(have: u64, total: u64) -> &'static str {
    if have == total {
        "complete"
    } else if have == 0 {
        "absent"
    } else {
        "partial"
    }
}

/// The image's chunks (id and length), from the local registry's names.
pub fn image_chunks(
    store: &Store,
    reference: &str,
) -> Result<(String, Vec<(cairn_chunkstore::ChunkId, u32)>), String> {
    use sha2::Digest as _;
    let (repo, name) = match reference.split_once('@') {
        Some((repo, d)) => (repo, format!("manifest/{repo}@{d}")),
        None => match reference.rsplit_once(':') {
            Some((repo, tag)) if !tag.contains('/') => (repo, format!("tag/{repo}:{tag}")),
            _ => return Err(format!("{reference:?}: want REPO:TAG or REPO@DIGEST")),
        },
    };
    let id = store
        .resolve(&name)
        .map_err(|_| format!("{reference} is not known at this node"))?;
    let h = store.open_object(&id).map_err(|e| e.to_string())?;
    if h.len() > 4 << 20 {
        return Err("manifest over 4 MiB".into());
    }
    let mut bytes = vec![0u8; h.len() as usize];
    h.read_at(0, &mut bytes).map_err(|e| e.to_string())?;
    let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&bytes)));
    let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
    let mut objects = vec![id];
    for d in crate::pullthrough::blob_digests(&v).iter().take(4096) {
        let obj = store
            .resolve(&format!("blob/{repo}@{d}"))
            .or_else(|_| store.resolve(d))
            .map_err(|_| format!("blob {d} of {reference} has no recipe here"))?;
        objects.push(obj);
    }
    let mut seen = std::collections::HashSet::new();
    let mut chunks = Vec::new();
    for o in objects {
        let r = store.recipe(&o).map_err(|e| e.to_string())?;
        for c in r.chunks() {
            if seen.insert(c.id) {
                chunks.push((c.id, c.len));
            }
        }
    }
    Ok((digest, chunks))
}

/// Compute an image's status here and at `sites`.
pub async fn image_status(
    store: Arc<Store>,
    fetcher: cairn_transport::Fetcher,
    sites: Vec<cairn_transport::PeerAddr>,
    reference: String,
) -> Result<ImageStatus, String> {
    let s2 = store.clone();
    let r2 = reference.clone();
    let (digest, chunks) = tokio::task::spawn_blocking(move || image_chunks(&s2, &r2))
        .await
        .map_err(|e| e.to_string())??;
    let total = chunks.len() as u64;
    let bytes: u64 = chunks.iter().map(|(_, l)| u64::from(*l)).sum();
    let ids: Vec<_> = chunks.iter().map(|(id, _)| *id).collect();
    let tally = |have: &[bool]| {
        let n = have.iter().filter(|h| **h).count() as u64;
        let b: u64 = chunks
            .iter()
            .zip(have)
            .filter(|(_, h)| **h)
            .map(|((_, l), _)| u64::from(*l))
            .sum();
        (n, b)
    };
    let s3 = store.clone();
    let ids2 = ids.clone();
    let local: Vec<bool> = tokio::task::spawn_blocking(move || {
        ids2.iter()
            .map(|id| s3.has_chunk(id).unwrap_or(false))
            .collect()
    })
    .await
    .map_err(|e| e.to_string())?;
    let (n, b) = tally(&local);
    let mut out = vec![SiteStatus {
        site: "local".into(),
        state: state_of(n, total).into(),
        chunks: n,
        bytes: b,
        error: None,
    }];
    for p in sites {
        let site = match &p.name {
            Some(name) => format!("{name}@{}", p.addr),
            None => p.addr.to_string(),
        };
        match tokio::time::timeout(std::time::Duration::from_secs(15), fetcher.have(&p, &ids)).await
        {
            Ok(Ok(have)) => {
                let (n, b) = tally(&have);
                out.push(SiteStatus {
                    site,
                    state: state_of(n, total).into(),
                    chunks: n,
                    bytes: b,
                    error: None,
                });
            }
            Ok(Err(e)) => out.push(SiteStatus {
                site,
                state: "unreachable".into(),
                chunks: 0,
                bytes: 0,
                error: Some(e),
            }),
            Err(_) => out.push(SiteStatus {
                site,
                state: "unreachable".into(),
                chunks: 0,
                bytes: 0,
                error: Some("timed out".into()),
            }),
        }
    }
    Ok(ImageStatus {
        reference,
        digest,
        chunks: total,
        bytes,
        sites: out,
    })
}

#[derive(serde::Deserialize)]
struct ImageQuery {
    #[serde(rename = "ref")]
    reference: String,
}

async fn image_status_handler(
    State(s): State<ApiState>,
    axum::extract::Query(q): axum::extract::Query<ImageQuery>,
) -> Response {
    if q.reference.len() > 1024 {
        return (StatusCode::BAD_REQUEST, "ref too long").into_response();
    }
    let Some(fetcher) = s.fetcher.clone() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "no transport").into_response();
    };
    match image_status(s.store.clone(), fetcher, s.sites.clone(), q.reference).await {
        Ok(st) => Json(st).into_response(),
        Err(e) => (StatusCode::NOT_FOUND, Json(serde_json::json!({"error": e}))).into_response(),
    }
}
