//! The OCI Distribution Spec v1.1 registry, an axum [`Router`] over the
//! chunk store.
//!
//! Every blob and every manifest is a chunk-store object, ingested with
//! [`Store::put_async`]/[`Store::put_reader`] (which compute sha256, and
//! sha512 on request, while chunking). The client's digest is checked
//! against what the store computed *before* anything is linked; a mismatch
//! is `DIGEST_INVALID` and leaves an unlinked object for GC.
//!
//! Repositories exist only as store names (GC roots):
//! - `blob/<repo>@<digest>`: a blob linked into a repository (a blob is
//!   served only from repositories it is linked into; a cross-repository
//!   mount adds a link, never a copy);
//! - `manifest/<repo>@<digest>`: a manifest;
//! - `mtype/<repo>@<digest>`: a tiny object whose bytes are the manifest's
//!   media type (names point at objects only, and all manifests of one type
//!   share this object);
//! - `tag/<repo>:<tag>`: a tag, pointing at the manifest object;
//! - `ref/<repo>@<subject>/<digest>`: the referrers index;
//! - `upload/<id>`: a temporary root that keeps a just-ingested upload
//!   alive until its digest is checked (removed at start if a crash left
//!   one).
//!
//! Nothing a client sends ever becomes a file path: upload files are named
//! by the server's own random session ids.
//!
//! Limits: paths 2 KiB, queries 4 KiB, the headers the registry reads
//! 256 bytes (`Authorization` 4 KiB), pages 10 000 entries, manifests
//! `max_manifest_bytes`, blobs `max_upload_bytes`, 1024 open upload
//! sessions, 8 concurrent blob ingests (more wait).
//!
//! Routes (all under `/v2/`): the base check, `_catalog`, manifests
//! (GET/HEAD/PUT/DELETE by tag or digest), blobs (GET/HEAD with `Range`,
//! DELETE), uploads (POST monolithic, chunked or mount; PATCH; PUT; GET;
//! DELETE), tags list and referrers. The `ns` query parameter that
//! containerd adds in mirror mode is ignored.

mod blobs;
mod errors;
mod manifests;
mod metrics;
mod names;
mod tags;
mod uploads;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use bytes::Bytes;
use cairn_chunkstore::{ObjectId, Store, StoreError};
use sha2::Digest as _;
use tokio_util::sync::CancellationToken;

pub use errors::RegistryError;
use errors::{ApiError, Code};
pub use manifests::Imported;
use metrics::Metrics;

use crate::hlc::Hlc;

/// Longest request path accepted.
const MAX_PATH_LEN: usize = 2048;
/// Longest query string accepted.
const MAX_QUERY_LEN: usize = 4096;
/// Most query parameters looked at.
const MAX_QUERY_PARAMS: usize = 64;
/// Longest `Authorization` header looked at.
const MAX_AUTH_LEN: usize = 4096;
/// Most blob ingests running at once; further ones wait their turn.
const MAX_INGESTS: usize = 8;
/// Longest value of the other request headers the registry reads
/// (`Content-Type`, `Range`, `Content-Range`, `Content-Length`).
pub(crate) const MAX_HEADER_LEN: usize = 256;

/// Registry settings.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// Directory for the temporary files of upload sessions (created if
    /// missing). Files left by an earlier run are removed at start.
    pub uploads_dir: PathBuf,
    /// Bearer token required for pushes (POST, PATCH, PUT, DELETE);
    /// `None` leaves pushing open.
    pub push_token: Option<String>,
    /// Require the same token for pulls too (only with a `push_token`).
    pub pull_token_required: bool,
    /// Largest manifest accepted (default 4 MiB).
    pub max_manifest_bytes: usize,
    /// Largest blob accepted (default 64 GiB).
    pub max_upload_bytes: u64,
    /// Upload sessions idle this long are removed (default 1 h).
    pub upload_ttl: Duration,
}

impl RegistryConfig {
    /// Defaults with uploads under `uploads_dir`.
    pub fn new(uploads_dir: impl Into<PathBuf>) -> Self {
        Self {
            uploads_dir: uploads_dir.into(),
            push_token: None,
            pull_token_required: false,
            max_manifest_bytes: 4 << 20,
            max_upload_bytes: 64 << 30,
            upload_ttl: Duration::from_secs(3600),
        }
    }
}

/// A boxed, sendable future (the return type of [`Upstream`] methods).
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// Errors an [`Upstream`] reports.
pub type UpstreamError = Box<dyn std::error::Error + Send + Sync>;

/// A manifest an [`Upstream`] resolved.
#[derive(Debug, Clone)]
pub struct UpstreamManifest {
    /// The manifest bytes, exactly as the upstream serves them.
    pub bytes: Bytes,
    /// Its media type (the upstream's `Content-Type`).
    pub media_type: String,
    /// Its digest (the upstream's `Docker-Content-Digest`). The registry
    /// checks it against the bytes before storing or serving them.
    pub digest: String,
}

/// Where the registry looks when a manifest or blob is not local (a parent
/// site, for pull-through). The registry verifies everything an upstream
/// returns, stores it, links it into the repository, then serves it.
pub trait Upstream: Send + Sync + 'static {
    /// Resolve `reference` (a tag or a digest) in `repo`. `Ok(None)` when
    /// the upstream does not have it either.
    fn resolve_manifest<'a>(
        &'a self,
        repo: &'a str,
        reference: &'a str,
    ) -> BoxFuture<'a, Result<Option<UpstreamManifest>, UpstreamError>>;

    /// Put the blob `digest` of `repo` into the local store and return its
    /// object. The object must be kept alive (named or pinned) by the
    /// upstream until the call returns; the registry then links it.
    /// `Ok(None)` when the upstream does not have it.
    fn fetch_blob<'a>(
        &'a self,
        repo: &'a str,
        digest: &'a str,
    ) -> BoxFuture<'a, Result<Option<ObjectId>, UpstreamError>>;

    /// Stream the blob to a client as its chunks arrive, so the first byte
    /// does not wait for the last. The upstream keeps fetching in the
    /// background, and links the blob (`blob/<repo>@<digest>`) only after
    /// the whole blob hashes to `digest`; the client checks the digest
    /// itself. `Ok(None)` (the default) means "not supported here": the
    /// registry then uses [`Upstream::fetch_blob`].
    fn stream_blob<'a>(
        &'a self,
        repo: &'a str,
        digest: &'a str,
    ) -> BoxFuture<'a, Result<Option<StreamedBlob>, UpstreamError>> {
        let _ = (repo, digest);
        Box::pin(async { Ok(None) })
    }
}

/// A blob on its way from an upstream (see [`Upstream::stream_blob`]).
#[derive(Debug)]
pub struct StreamedBlob {
    /// Its length in bytes.
    pub len: u64,
    /// Its bytes, in order.
    pub body: tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>,
}

/// The OCI registry: cheap to clone, all clones share state.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
    upstream: Option<Arc<dyn Upstream>>,
}

struct Inner {
    store: Arc<Store>,
    cfg: RegistryConfig,
    metrics: Metrics,
    uploads: Arc<uploads::Uploads>,
    /// sha256 of the push token, compared in constant time.
    token_hash: Option<[u8; 32]>,
    /// Bounds concurrent blob ingests (each runs three threads).
    ingests: tokio::sync::Semaphore,
    /// Versions for tags.
    hlc: Arc<Hlc>,
    /// Told about every manifest pushed here (for replication).
    on_push: parking_lot::RwLock<Option<PushHook>>,
}

/// A manifest that was pushed to this registry (or arrived by replication
/// and changed a tag here).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pushed {
    /// Repository.
    pub repo: String,
    /// Tag, if the manifest was pushed by tag.
    pub tag: Option<String>,
    /// Manifest digest.
    pub digest: String,
    /// The tag's version (0 when untagged).
    pub version: u64,
}

/// Called (on a blocking thread) after a push commits and before the
/// client is answered; an error fails the push with a 500, so the client
/// retries rather than believing a push that will not replicate.
pub type PushHook = Arc<dyn Fn(&Pushed) -> Result<(), String> + Send + Sync>;

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("uploads_dir", &self.inner.cfg.uploads_dir)
            .field("push_token", &self.inner.cfg.push_token.is_some())
            .field("pull_token_required", &self.inner.cfg.pull_token_required)
            .field("upstream", &self.upstream.is_some())
            .finish()
    }
}

impl Registry {
    /// Set up a registry over `store`: create the uploads directory, remove
    /// what an earlier run left there and in the store's `upload/` roots,
    /// register the metrics in `registry`, and (inside a tokio runtime)
    /// start the task that sweeps abandoned uploads until `cancel` fires.
    pub fn new(
        store: Arc<Store>,
        cfg: RegistryConfig,
        registry: &prometheus::Registry,
        cancel: CancellationToken,
    ) -> Result<Self, RegistryError> {
        if cfg.max_manifest_bytes == 0 || cfg.max_upload_bytes == 0 {
            return Err(RegistryError::Config(
                "max_manifest_bytes and max_upload_bytes must be positive".into(),
            ));
        }
        if cfg.upload_ttl.is_zero() {
            return Err(RegistryError::Config("upload_ttl must be positive".into()));
        }
        if cfg.push_token.as_deref().is_some_and(str::is_empty) {
            return Err(RegistryError::Config("push_token is empty".into()));
        }
        std::fs::create_dir_all(&cfg.uploads_dir).map_err(|source| RegistryError::Io {
            what: "create uploads directory",
            path: cfg.uploads_dir.clone(),
            source,
        })?;
        uploads::clean_dir(&cfg.uploads_dir)?;
        for (name, _) in store.names()? {
            if name.starts_with(names::UPLOAD_PREFIX) {
                match store.remove(&name) {
                    Ok(_) | Err(StoreError::NoSuchObject(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        let metrics = Metrics::new(registry)?;
        let uploads = Arc::new(uploads::Uploads::new(cfg.uploads_dir.clone()));
        let token_hash = cfg
            .push_token
            .as_ref()
            .map(|t| sha2::Sha256::digest(t.as_bytes()).into());
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(uploads::sweep(
                uploads.clone(),
                cfg.upload_ttl,
                metrics.clone(),
                cancel,
            ));
        } else {
            tracing::warn!(
                "registry created outside a tokio runtime: abandoned uploads are not swept"
            );
        }
        Ok(Self {
            inner: Arc::new(Inner {
                store,
                cfg,
                metrics,
                uploads,
                token_hash,
                ingests: tokio::sync::Semaphore::new(MAX_INGESTS),
                hlc: Arc::new(Hlc::new()),
                on_push: parking_lot::RwLock::new(None),
            }),
            upstream: None,
        })
    }

    /// Consult `upstream` when a manifest or blob is not local.
    pub fn with_upstream(mut self, upstream: Arc<dyn Upstream>) -> Self {
        self.upstream = Some(upstream);
        self
    }

    /// Call `hook` after every manifest push commits (all clones share it).
    pub fn set_push_hook(&self, hook: PushHook) {
        *self.inner.on_push.write() = Some(hook);
    }

    /// The clock that versions this registry's tags.
    pub fn hlc(&self) -> &Arc<Hlc> {
        &self.inner.hlc
    }

    /// Run the push hook, if any, on a blocking thread.
    pub(crate) async fn pushed(&self, p: Pushed) -> Result<(), ApiError> {
        let hook = self.inner.on_push.read().clone();
        let Some(h) = hook else {
            return Ok(());
        };
        blocking(move || {
            h(&p).map_err(|e| ApiError::internal(format!("queueing replication: {e}")))
        })
        .await
    }

    /// Replication in: make manifest `digest` of `repo`, and everything it
    /// references, local (pulling what is missing through `up`), then set
    /// `tag` to it at `version` unless the tag holds a winning entry.
    pub async fn import(
        &self,
        up: &dyn Upstream,
        repo: &str,
        tag: Option<&str>,
        digest: &str,
        version: u64,
    ) -> Result<Imported, RegistryError> {
        manifests::import(self, up, repo, tag, digest, version)
            .await
            .map_err(|e| RegistryError::Replication(e.to_string()))
    }

    /// The manifest digest and version `repo:tag` holds here, if set.
    pub async fn tag_state(
        &self,
        repo: &str,
        tag: &str,
    ) -> Result<Option<(String, u64)>, RegistryError> {
        manifests::tag_state(self, repo, tag)
            .await
            .map_err(|e| RegistryError::Replication(e.to_string()))
    }

    /// The routes, all under `/v2/`.
    pub fn router(&self) -> Router {
        let reg = self.clone();
        let handler = move |req: Request| {
            let reg = reg.clone();
            async move { reg.dispatch(req).await }
        };
        Router::new()
            .route("/v2", any(handler.clone()))
            .route("/v2/", any(handler.clone()))
            .route("/v2/{*rest}", any(handler))
    }

    pub(crate) fn store(&self) -> &Arc<Store> {
        &self.inner.store
    }

    pub(crate) fn cfg(&self) -> &RegistryConfig {
        &self.inner.cfg
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    pub(crate) fn uploads(&self) -> &Arc<uploads::Uploads> {
        &self.inner.uploads
    }

    /// Wait for a turn to ingest a blob.
    pub(crate) async fn ingest_permit(&self) -> Result<tokio::sync::SemaphorePermit<'_>, ApiError> {
        self.inner
            .ingests
            .acquire()
            .await
            .map_err(ApiError::internal)
    }

    pub(crate) fn upstream(&self) -> Option<&Arc<dyn Upstream>> {
        self.upstream.as_ref()
    }

    async fn dispatch(self, req: Request) -> Response {
        let method = method_label(req.method());
        let (kind, result) = self.handle(req).await;
        let mut resp = match result {
            Ok(r) => r,
            Err(e) => {
                if e.status.is_server_error() {
                    tracing::warn!(route = kind, error = %e, "registry request failed");
                } else {
                    tracing::debug!(route = kind, error = %e, "registry request refused");
                }
                e.into_response()
            }
        };
        resp.headers_mut().insert(
            HeaderName::from_static("docker-distribution-api-version"),
            HeaderValue::from_static("registry/2.0"),
        );
        let class = match resp.status().as_u16() {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        self.inner
            .metrics
            .requests
            .with_label_values(&[method, kind, class])
            .inc();
        resp
    }

    async fn handle(&self, req: Request) -> (&'static str, Result<Response, ApiError>) {
        if req.uri().path().len() > MAX_PATH_LEN {
            return (
                "unknown",
                Err(ApiError::new(Code::NameInvalid, "request path too long")
                    .status(StatusCode::URI_TOO_LONG)),
            );
        }
        let route = match parse_route(req.uri().path()) {
            Ok(Some(r)) => r,
            Ok(None) => {
                return (
                    "unknown",
                    Err(ApiError::new(Code::Unsupported, "no such endpoint")
                        .status(StatusCode::NOT_FOUND)),
                )
            }
            Err(e) => return ("unknown", Err(e)),
        };
        let kind = route.kind();
        (kind, self.route(route, req).await)
    }

    async fn route(&self, route: Route, req: Request) -> Result<Response, ApiError> {
        let method = req.method().clone();
        let push = matches!(
            method,
            Method::POST | Method::PUT | Method::PATCH | Method::DELETE
        );
        // The version check (`GET /v2/`) answers a client that sent no
        // credentials with the push challenge when push needs a token:
        // Docker-style clients (skopeo, podman) only send the credentials
        // they were given after this ping asked for them. Pulls stay
        // anonymous unless configured otherwise.
        let ping_challenge = matches!(route, Route::Base)
            && self.inner.token_hash.is_some()
            && !req.headers().contains_key(header::AUTHORIZATION);
        self.check_auth(req.headers(), push || ping_challenge)?;
        let query = Query::parse(req.uri().query())?;
        let head = method == Method::HEAD;
        match (route, method) {
            (Route::Base, Method::GET | Method::HEAD) => json_response(StatusCode::OK, "{}".into()),
            (Route::Catalog, Method::GET) => tags::catalog(self, &query).await,
            (Route::Tags(repo), Method::GET) => tags::list(self, &repo, &query).await,
            (Route::Manifest(repo, r), Method::GET | Method::HEAD) => {
                manifests::get(self, &repo, &r, head).await
            }
            (Route::Manifest(repo, r), Method::PUT) => manifests::put(self, &repo, &r, req).await,
            (Route::Manifest(repo, r), Method::DELETE) => manifests::delete(self, &repo, &r).await,
            (Route::Referrers(repo, d), Method::GET) => {
                manifests::referrers(self, &repo, &d, &query).await
            }
            (Route::Blob(repo, d), Method::GET | Method::HEAD) => {
                blobs::get(self, &repo, &d, req.headers(), head).await
            }
            (Route::Blob(repo, d), Method::DELETE) => blobs::delete(self, &repo, &d).await,
            (Route::UploadStart(repo), Method::POST) => {
                uploads::start(self, &repo, &query, req).await
            }
            (Route::Upload(repo, id), Method::PATCH) => uploads::patch(self, &repo, &id, req).await,
            (Route::Upload(repo, id), Method::PUT) => {
                uploads::finish(self, &repo, &id, &query, req).await
            }
            (Route::Upload(repo, id), Method::GET) => uploads::status(self, &repo, &id).await,
            (Route::Upload(repo, id), Method::DELETE) => uploads::cancel(self, &repo, &id).await,
            (_, m) => Err(ApiError::new(
                Code::Unsupported,
                format!("method {m} is not supported here"),
            )),
        }
    }

    /// Check the bearer token when this request needs one.
    fn check_auth(&self, headers: &HeaderMap, push: bool) -> Result<(), ApiError> {
        let Some(want) = &self.inner.token_hash else {
            return Ok(());
        };
        if !push && !self.inner.cfg.pull_token_required {
            return Ok(());
        }
        let given = headers
            .get(header::AUTHORIZATION)
            .filter(|v| v.len() <= MAX_AUTH_LEN)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, rest) = v.trim().split_once(' ')?;
                if scheme.eq_ignore_ascii_case("bearer") {
                    return Some(rest.trim().to_owned());
                }
                // Basic auth with the token as the password (any user name):
                // what `skopeo --dest-creds`, podman and oras send.
                if scheme.eq_ignore_ascii_case("basic") {
                    use base64::Engine as _;
                    let raw = base64::engine::general_purpose::STANDARD
                        .decode(rest.trim())
                        .ok()?;
                    let text = String::from_utf8(raw).ok()?;
                    return text.split_once(':').map(|(_, pw)| pw.to_owned());
                }
                None
            });
        let ok = given.as_deref().is_some_and(|t| {
            let got: [u8; 32] = sha2::Sha256::digest(t.as_bytes()).into();
            // Constant time: compare hashes with no early exit.
            got.iter()
                .zip(want.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
        });
        if ok {
            return Ok(());
        }
        let scope = if push { "push" } else { "pull" };
        Err(ApiError::new(
            Code::Unauthorized,
            format!(
                "authentication required to {scope} (send the push token as \
                 `Authorization: Bearer <token>` or as the Basic auth password)"
            ),
        )
        .header(header::WWW_AUTHENTICATE, "Basic realm=\"cairn\""))
    }
}

fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::PUT => "PUT",
        Method::POST => "POST",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        _ => "other",
    }
}

/// What a request path addresses. Repository names are validated.
#[derive(Debug)]
enum Route {
    Base,
    Catalog,
    Tags(String),
    Manifest(String, String),
    Blob(String, String),
    UploadStart(String),
    Upload(String, String),
    Referrers(String, String),
}

impl Route {
    fn kind(&self) -> &'static str {
        match self {
            Route::Base => "base",
            Route::Catalog => "catalog",
            Route::Tags(_) => "tags",
            Route::Manifest(..) => "manifest",
            Route::Blob(..) => "blob",
            Route::UploadStart(_) | Route::Upload(..) => "upload",
            Route::Referrers(..) => "referrers",
        }
    }
}

/// Split a `/v2/...` path. Repository names may hold `/`, so the route is
/// found from the end: `<name>/tags/list`, `<name>/blobs/uploads/[<id>]`,
/// `<name>/manifests/<ref>`, `<name>/blobs/<digest>`,
/// `<name>/referrers/<digest>`. `Ok(None)` for anything else.
fn parse_route(path: &str) -> Result<Option<Route>, ApiError> {
    let Some(rest) = path.strip_prefix("/v2") else {
        return Ok(None);
    };
    if rest.is_empty() || rest == "/" {
        return Ok(Some(Route::Base));
    }
    let Some(rest) = rest.strip_prefix('/') else {
        return Ok(None);
    };
    if rest == "_catalog" {
        return Ok(Some(Route::Catalog));
    }
    let segs = rest
        .split('/')
        .map(|s| {
            names::percent_decode(s).ok_or_else(|| {
                ApiError::new(Code::NameInvalid, "invalid percent-encoding in the path")
            })
        })
        .collect::<Result<Vec<String>, ApiError>>()?;
    let n = segs.len();
    let at = |i: usize| segs[n - i].as_str();
    let repo = |len: usize| -> Result<String, ApiError> {
        let r = segs[..len].join("/");
        names::validate_repo(&r)?;
        Ok(r)
    };
    if n < 3 {
        return Ok(None);
    }
    let route = if at(2) == "tags" && at(1) == "list" {
        Route::Tags(repo(n - 2)?)
    } else if n >= 4 && at(3) == "blobs" && at(2) == "uploads" {
        if at(1).is_empty() {
            Route::UploadStart(repo(n - 3)?)
        } else {
            Route::Upload(repo(n - 3)?, at(1).to_owned())
        }
    } else if at(2) == "blobs" && at(1) == "uploads" {
        Route::UploadStart(repo(n - 2)?)
    } else if at(2) == "manifests" {
        Route::Manifest(repo(n - 2)?, at(1).to_owned())
    } else if at(2) == "blobs" {
        Route::Blob(repo(n - 2)?, at(1).to_owned())
    } else if at(2) == "referrers" {
        Route::Referrers(repo(n - 2)?, at(1).to_owned())
    } else {
        return Ok(None);
    };
    Ok(Some(route))
}

/// Decoded query parameters (unknown ones such as `ns` are ignored).
#[derive(Debug, Default)]
pub(crate) struct Query(Vec<(String, String)>);

impl Query {
    fn parse(q: Option<&str>) -> Result<Self, ApiError> {
        let Some(q) = q else {
            return Ok(Self::default());
        };
        if q.len() > MAX_QUERY_LEN {
            return Err(ApiError::new(Code::Unsupported, "query string too long")
                .status(StatusCode::BAD_REQUEST));
        }
        let mut out = Vec::new();
        for pair in q
            .split('&')
            .filter(|p| !p.is_empty())
            .take(MAX_QUERY_PARAMS)
        {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let (Some(k), Some(v)) = (names::percent_decode(k), names::percent_decode(v)) else {
                return Err(ApiError::new(
                    Code::Unsupported,
                    "invalid percent-encoding in the query",
                )
                .status(StatusCode::BAD_REQUEST));
            };
            out.push((k, v));
        }
        Ok(Self(out))
    }

    /// The first value of `key`.
    pub(crate) fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Run blocking store work on the blocking pool.
pub(crate) async fn blocking<T, F>(f: F) -> Result<T, ApiError>
where
    F: FnOnce() -> Result<T, ApiError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(ApiError::internal(format!("blocking task failed: {e}"))))
}

/// The object a store name points at, `None` if the name does not exist.
pub(crate) fn lookup(store: &Store, name: &str) -> Result<Option<ObjectId>, ApiError> {
    match store.resolve(name) {
        Ok(id) => Ok(Some(id)),
        Err(StoreError::NoSuchObject(_)) => Ok(None),
        Err(e) => Err(ApiError::internal(e)),
    }
}

/// Remove a store name; `false` if it did not exist.
pub(crate) fn unlink(store: &Store, name: &str) -> Result<bool, ApiError> {
    match store.remove(name) {
        Ok(_) => Ok(true),
        Err(StoreError::NoSuchObject(_)) => Ok(false),
        Err(e) => Err(ApiError::internal(e)),
    }
}

/// Build a response; header values come from validated input only.
pub(crate) fn response(
    status: StatusCode,
    headers: &[(HeaderName, String)],
    body: Body,
) -> Result<Response, ApiError> {
    let mut b = Response::builder().status(status);
    for (k, v) in headers {
        b = b.header(k, v);
    }
    b.body(body).map_err(ApiError::internal)
}

/// A JSON response.
pub(crate) fn json_response(status: StatusCode, body: String) -> Result<Response, ApiError> {
    response(
        status,
        &[(header::CONTENT_TYPE, "application/json".into())],
        Body::from(body),
    )
}

/// A request header as a string, bounded by [`MAX_HEADER_LEN`]; a header
/// that is too long or not text is an error.
pub(crate) fn header_str<'a>(
    headers: &'a HeaderMap,
    name: &HeaderName,
) -> Result<Option<&'a str>, ApiError> {
    let Some(v) = headers.get(name) else {
        return Ok(None);
    };
    if v.len() > MAX_HEADER_LEN {
        return Err(ApiError::new(
            Code::Unsupported,
            format!("header {name} is longer than {MAX_HEADER_LEN} bytes"),
        )
        .status(StatusCode::BAD_REQUEST));
    }
    v.to_str().map(|s| Some(s.trim())).map_err(|_| {
        ApiError::new(Code::Unsupported, format!("header {name} is not text"))
            .status(StatusCode::BAD_REQUEST)
    })
}

/// The request's `Content-Length`, if given.
pub(crate) fn content_length(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    match header_str(headers, &header::CONTENT_LENGTH)? {
        None => Ok(None),
        Some(s) => s
            .parse::<u64>()
            .map(Some)
            .map_err(|_| ApiError::new(Code::SizeInvalid, "Content-Length is not a number")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(p: &str) -> Option<Route> {
        parse_route(p).ok().flatten()
    }

    #[test]
    fn routes() {
        assert!(matches!(route("/v2/"), Some(Route::Base)));
        assert!(matches!(route("/v2"), Some(Route::Base)));
        assert!(matches!(route("/v2/_catalog"), Some(Route::Catalog)));
        assert!(matches!(route("/v2/a/b/tags/list"), Some(Route::Tags(r)) if r == "a/b"));
        assert!(
            matches!(route("/v2/a/manifests/blobs/uploads/"), Some(Route::UploadStart(r)) if r == "a/manifests")
        );
        assert!(
            matches!(route("/v2/blobs/uploads/manifests/v1"), Some(Route::Manifest(r, t)) if r == "blobs/uploads" && t == "v1")
        );
        assert!(matches!(route("/v2/a/blobs/uploads"), Some(Route::UploadStart(r)) if r == "a"));
        assert!(
            matches!(route("/v2/a/blobs/uploads/abc"), Some(Route::Upload(r, i)) if r == "a" && i == "abc")
        );
        assert!(
            matches!(route("/v2/a/blobs/sha256%3Aab"), Some(Route::Blob(r, d)) if r == "a" && d == "sha256:ab")
        );
        assert!(matches!(
            route("/v2/a/referrers/x"),
            Some(Route::Referrers(..))
        ));
        assert!(route("/v2/manifests/x").is_none());
        assert!(route("/v3/a/manifests/x").is_none());
        assert!(parse_route("/v2/../x/manifests/a").is_err());
        assert!(parse_route("/v2/a/../../b/manifests/a").is_err());
        assert!(parse_route("/v2/a%2F..%2Fb/manifests/a").is_err());
    }

    #[test]
    fn queries() {
        let q = Query::parse(Some("n=10&last=a%2Fb&ns=docker.io&flag")).ok();
        let q = q.as_ref();
        assert_eq!(q.and_then(|q| q.get("n")), Some("10"));
        assert_eq!(q.and_then(|q| q.get("last")), Some("a/b"));
        assert_eq!(q.and_then(|q| q.get("flag")), Some(""));
        assert!(Query::parse(Some("a=%")).is_err());
    }
}
