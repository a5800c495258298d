//! Blob uploads: monolithic POST, chunked POST/PATCH/PUT sessions,
//! cross-repository mounts, status and cancel, and the sweeper for
//! abandoned sessions.
//!
//! A session is a random 128-bit id and a file `<uploads_dir>/<id>` that
//! PATCH appends to. The final PUT ingests the file into the store under a
//! temporary root `upload/<id>`, checks the digest the store computed, links
//! the blob into the repository and drops the temporary root. Sessions live
//! in memory: after a restart, clients start their uploads again (the files
//! and temporary roots of the earlier run are removed at start).

use std::collections::HashMap;
use std::io::{self, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderName, StatusCode};
use axum::response::Response;
use cairn_chunkstore::{PutOptions, PutResult, Store};
use futures_util::StreamExt;
use tokio::io::{AsyncSeekExt, AsyncWriteExt};
use tokio_util::io::StreamReader;
use tokio_util::sync::CancellationToken;

use super::blobs::DOCKER_CONTENT_DIGEST;
use super::errors::{ApiError, Code, RegistryError};
use super::metrics::Metrics;
use super::names::{self, Algo, Digest};
use super::{blocking, content_length, header_str, lookup, response, unlink, Query, Registry};

/// Most upload sessions open at once.
const MAX_SESSIONS: usize = 1024;

const DOCKER_UPLOAD_UUID: HeaderName = HeaderName::from_static("docker-upload-uuid");

/// The open upload sessions.
#[derive(Debug)]
pub(crate) struct Uploads {
    dir: PathBuf,
    sessions: parking_lot::Mutex<HashMap<String, Arc<Session>>>,
}

#[derive(Debug)]
pub(crate) struct Session {
    repo: String,
    state: tokio::sync::Mutex<State>,
    touched: parking_lot::Mutex<Instant>,
}

#[derive(Debug)]
struct State {
    /// Bytes received so far (the file's length).
    size: u64,
    /// Finished or cancelled: the session is gone.
    closed: bool,
}

impl Session {
    fn touch(&self) {
        *self.touched.lock() = Instant::now();
    }
}

fn is_session_id(s: &str) -> bool {
    s.len() == 32
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn new_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

impl Uploads {
    pub(crate) fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            sessions: parking_lot::Mutex::new(HashMap::new()),
        }
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    /// Open a session (its file is created by the caller).
    fn create(&self, repo: &str, metrics: &Metrics) -> Result<(String, Arc<Session>), ApiError> {
        let mut map = self.sessions.lock();
        if map.len() >= MAX_SESSIONS {
            return Err(ApiError::new(
                Code::TooManyRequests,
                format!("too many uploads in progress (at most {MAX_SESSIONS})"),
            ));
        }
        let id = loop {
            let id = new_id();
            if !map.contains_key(&id) {
                break id;
            }
        };
        let s = Arc::new(Session {
            repo: repo.to_owned(),
            state: tokio::sync::Mutex::new(State {
                size: 0,
                closed: false,
            }),
            touched: parking_lot::Mutex::new(Instant::now()),
        });
        map.insert(id.clone(), s.clone());
        metrics.uploads_in_progress.inc();
        Ok((id, s))
    }

    /// The session `id` of `repo`, or `BLOB_UPLOAD_UNKNOWN`.
    fn get(&self, repo: &str, id: &str) -> Result<Arc<Session>, ApiError> {
        let unknown = || {
            upload_unknown()
                .detail(serde_json::json!({ "session": id.chars().take(64).collect::<String>() }))
        };
        if !is_session_id(id) {
            return Err(unknown());
        }
        match self.sessions.lock().get(id) {
            Some(s) if s.repo == repo => Ok(s.clone()),
            _ => Err(unknown()),
        }
    }

    /// Forget a session and delete its file. Call with its state locked and
    /// marked closed.
    async fn remove(&self, id: &str, metrics: &Metrics) {
        if self.sessions.lock().remove(id).is_some() {
            metrics.uploads_in_progress.dec();
        }
        if let Err(e) = tokio::fs::remove_file(self.path(id)).await {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(error = %e, session = id, "cannot remove upload file");
            }
        }
    }

    /// Remove sessions idle for longer than `ttl` (skipping busy ones).
    async fn expire(&self, ttl: Duration, metrics: &Metrics) {
        let now = Instant::now();
        let idle: Vec<(String, Arc<Session>)> = self
            .sessions
            .lock()
            .iter()
            .filter(|(_, s)| now.duration_since(*s.touched.lock()) > ttl)
            .map(|(id, s)| (id.clone(), s.clone()))
            .collect();
        for (id, s) in idle {
            let Ok(mut st) = s.state.try_lock() else {
                continue;
            };
            if !st.closed {
                st.closed = true;
                tracing::info!(session = %id, repo = %s.repo, "removing abandoned upload");
            }
            self.remove(&id, metrics).await;
        }
    }
}

/// Remove upload files an earlier run left (only names that are session
/// ids, so a misconfigured directory loses nothing else).
pub(crate) fn clean_dir(dir: &Path) -> Result<(), RegistryError> {
    let rd = std::fs::read_dir(dir).map_err(|source| RegistryError::Io {
        what: "read uploads directory",
        path: dir.to_owned(),
        source,
    })?;
    for e in rd.flatten() {
        let name = e.file_name();
        if name.to_str().is_some_and(is_session_id) {
            if let Err(e) = std::fs::remove_file(e.path()) {
                tracing::warn!(error = %e, "cannot remove stale upload file");
            }
        }
    }
    Ok(())
}

/// The sweeper task: every ttl/4 (1 s to 60 s), drop idle sessions; stops
/// on `cancel`.
pub(crate) async fn sweep(
    uploads: Arc<Uploads>,
    ttl: Duration,
    metrics: Metrics,
    cancel: CancellationToken,
) {
    let period = (ttl / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(period) => {}
        }
        uploads.expire(ttl, &metrics).await;
    }
}

fn upload_unknown() -> ApiError {
    ApiError::new(Code::BlobUploadUnknown, "blob upload unknown to registry")
}

fn range_value(size: u64) -> String {
    format!("0-{}", size.saturating_sub(1))
}

fn location(repo: &str, id: &str) -> String {
    format!("/v2/{repo}/blobs/uploads/{id}")
}

fn session_headers(repo: &str, id: &str, size: u64) -> Vec<(HeaderName, String)> {
    vec![
        (header::LOCATION, location(repo, id)),
        (header::RANGE, range_value(size)),
        (DOCKER_UPLOAD_UUID, id.to_owned()),
        (header::CONTENT_LENGTH, "0".to_owned()),
    ]
}

fn too_large(limit: u64) -> ApiError {
    ApiError::new(
        Code::SizeInvalid,
        format!("blob larger than the registry's limit of {limit} bytes"),
    )
    .status(StatusCode::PAYLOAD_TOO_LARGE)
}

/// A request body that failed to arrive: with a declared length, the
/// body was shorter than it (`SIZE_INVALID`).
fn body_error(declared: Option<u64>, e: &dyn std::fmt::Display) -> ApiError {
    match declared {
        Some(n) => ApiError::new(
            Code::SizeInvalid,
            format!("request body ended before its declared {n} bytes: {e}"),
        ),
        None => ApiError::new(
            Code::BlobUploadInvalid,
            format!("reading the request body failed: {e}"),
        ),
    }
}

fn created(repo: &str, d: &Digest) -> Result<Response, ApiError> {
    response(
        StatusCode::CREATED,
        &[
            (header::LOCATION, format!("/v2/{repo}/blobs/{d}")),
            (DOCKER_CONTENT_DIGEST, d.to_string()),
            (header::CONTENT_LENGTH, "0".to_owned()),
        ],
        Body::empty(),
    )
}

/// POST `/v2/<repo>/blobs/uploads/`: mount (`?mount=&from=`), monolithic
/// upload (`?digest=` with the body) or a new session (202).
pub(crate) async fn start(
    reg: &Registry,
    repo: &str,
    query: &Query,
    req: Request,
) -> Result<Response, ApiError> {
    if let Some(m) = query.get("mount") {
        let d = Digest::parse(m)?;
        if let Some(from) = query.get("from") {
            if names::validate_repo(from).is_ok() && mount(reg, repo, from, &d).await? {
                return created(repo, &d);
            }
        }
        // Not mountable: the spec says to open a session instead.
    } else if let Some(ds) = query.get("digest") {
        let d = Digest::parse(ds)?;
        return monolithic(reg, repo, d, req).await;
    }
    let (id, _s) = reg.uploads().create(repo, reg.metrics())?;
    let path = reg.uploads().path(&id);
    if let Err(e) = tokio::fs::File::create(&path).await {
        reg.uploads().remove(&id, reg.metrics()).await;
        return Err(ApiError::internal(format!(
            "create upload file {}: {e}",
            path.display()
        )));
    }
    response(
        StatusCode::ACCEPTED,
        &session_headers(repo, &id, 0),
        Body::empty(),
    )
}

/// Link blob `d` of `from` into `repo`; `false` if `from` does not have it.
async fn mount(reg: &Registry, repo: &str, from: &str, d: &Digest) -> Result<bool, ApiError> {
    let from_link = names::blob_link(from, d)?;
    let to_link = names::blob_link(repo, d)?;
    let store = reg.store().clone();
    blocking(move || {
        let Some(id) = lookup(&store, &from_link)? else {
            return Ok(false);
        };
        match store.set_name(&to_link, &id) {
            Ok(()) => Ok(true),
            // Unlinked from `from` and collected meanwhile.
            Err(cairn_chunkstore::StoreError::NoSuchObject(_)) => Ok(false),
            Err(e) => Err(ApiError::internal(e)),
        }
    })
    .await
}

/// Monolithic upload: the POST body is the blob, streamed into the store.
async fn monolithic(
    reg: &Registry,
    repo: &str,
    d: Digest,
    req: Request,
) -> Result<Response, ApiError> {
    let link = names::blob_link(repo, &d)?;
    let cl = content_length(req.headers())?;
    let limit = reg.cfg().max_upload_bytes;
    if cl.is_some_and(|n| n > limit) {
        return Err(too_large(limit));
    }
    let root = names::upload_root(&new_id());
    let count = Arc::new(AtomicU64::new(0));
    let body_failed = Arc::new(AtomicBool::new(false));
    let (c, f) = (count.clone(), body_failed.clone());
    let stream = req.into_body().into_data_stream().map(move |r| {
        let b = r.map_err(|e| {
            f.store(true, Ordering::Relaxed);
            io::Error::other(e)
        })?;
        let total = c.fetch_add(b.len() as u64, Ordering::Relaxed) + b.len() as u64;
        if total > limit {
            return Err(io::Error::other("blob too large"));
        }
        Ok::<_, io::Error>(b)
    });
    let opts = PutOptions {
        name: Some(root.clone()),
        pin: false,
        sha512: d.algo() == Algo::Sha512,
        progress: None,
        chunker: None,
    };
    let permit = reg.ingest_permit().await?;
    let put = reg.store().put_async(StreamReader::new(stream), opts).await;
    drop(permit);
    let put = match put {
        Ok(p) => p,
        Err(e) => {
            if count.load(Ordering::Relaxed) > limit {
                return Err(too_large(limit));
            }
            if body_failed.load(Ordering::Relaxed) {
                return Err(body_error(cl, &e));
            }
            return Err(ApiError::internal(e));
        }
    };
    if let Some(n) = cl.filter(|&n| n != put.len) {
        let store = reg.store().clone();
        blocking(move || unlink(&store, &root)).await?;
        return Err(ApiError::new(
            Code::SizeInvalid,
            format!(
                "Content-Length {n} does not match the {} bytes received",
                put.len
            ),
        ));
    }
    let store = reg.store().clone();
    let metrics = reg.metrics().clone();
    let dd = d.clone();
    blocking(move || commit(&store, &metrics, &dd, &link, &root, &put)).await?;
    created(repo, &d)
}

/// Check the digest the store computed, link the blob, drop the temporary
/// root. A mismatch links nothing (the object is left to GC). Blocking; runs
/// on a blocking thread, so a client that goes away cannot interrupt it.
fn commit(
    store: &Store,
    metrics: &Metrics,
    d: &Digest,
    link: &str,
    root: &str,
    put: &PutResult,
) -> Result<(), ApiError> {
    let res = if d.matches(&put.sha256, put.sha512.as_deref()) {
        store
            .set_name(link, &put.object)
            .map_err(ApiError::internal)
            .map(|()| metrics.pushed_bytes.inc_by(put.len))
    } else {
        metrics.digest_mismatches.inc();
        tracing::info!(claimed = %d, sha256 = %put.sha256, "blob digest mismatch");
        Err(ApiError::new(
            Code::DigestInvalid,
            "provided digest did not match uploaded content",
        )
        .detail(serde_json::json!({
            "digest": d.to_string(),
            "computed": format!("sha256:{}", put.sha256),
        })))
    };
    unlink(store, root)?;
    res
}

/// Parse `Content-Range` (`<start>-<end>`, also `bytes <start>-<end>/<len>`)
/// of a chunk against the session's size and the `Content-Length`; returns
/// the number of body bytes expected, if known.
fn expected_len(
    content_range: Option<&str>,
    cl: Option<u64>,
    size: u64,
    repo: &str,
    id: &str,
) -> Result<Option<u64>, ApiError> {
    let Some(cr) = content_range else {
        return Ok(cl);
    };
    let spec = cr
        .strip_prefix("bytes")
        .map(|s| s.trim_start_matches([' ', '=']))
        .unwrap_or(cr);
    let spec = spec.split_once('/').map(|(a, _)| a).unwrap_or(spec);
    let parsed = spec
        .split_once('-')
        .and_then(|(a, b)| Some((a.trim().parse::<u64>().ok()?, b.trim().parse::<u64>().ok()?)));
    let Some((start, end)) = parsed else {
        return Err(ApiError::new(
            Code::BlobUploadInvalid,
            format!("malformed Content-Range {cr:?} (expected <start>-<end>)"),
        ));
    };
    if start != size || end < start {
        let mut e = ApiError::new(
            Code::RangeInvalid,
            format!("chunk {start}-{end} is out of order: the upload has {size} bytes"),
        )
        .status(StatusCode::RANGE_NOT_SATISFIABLE);
        for (k, v) in session_headers(repo, id, size) {
            if k != header::CONTENT_LENGTH {
                e = e.header(k, &v);
            }
        }
        return Err(e);
    }
    let Some(len) = (end - start).checked_add(1) else {
        return Err(ApiError::new(
            Code::SizeInvalid,
            "Content-Range is too large",
        ));
    };
    if let Some(n) = cl.filter(|&n| n != len) {
        return Err(ApiError::new(
            Code::SizeInvalid,
            format!("Content-Length {n} does not match Content-Range {start}-{end}"),
        ));
    }
    Ok(Some(len))
}

/// Append the request body to the session file at `size`; returns the bytes
/// appended. On any failure the file is cut back to `size`.
async fn append(
    reg: &Registry,
    id: &str,
    size: u64,
    body: Body,
    expected: Option<u64>,
) -> Result<u64, ApiError> {
    let limit = reg.cfg().max_upload_bytes;
    if expected.is_some_and(|e| size.saturating_add(e) > limit) {
        return Err(too_large(limit));
    }
    let path = reg.uploads().path(id);
    let mut f = tokio::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .await
        .map_err(|e| ApiError::internal(format!("open upload file {}: {e}", path.display())))?;
    let mut n = 0u64;
    let res: Result<(), ApiError> = async {
        f.set_len(size).await.map_err(ApiError::internal)?;
        f.seek(SeekFrom::Start(size))
            .await
            .map_err(ApiError::internal)?;
        let mut stream = body.into_data_stream();
        while let Some(frame) = stream.next().await {
            let b = frame.map_err(|e| body_error(expected, &e))?;
            n += b.len() as u64;
            if size.saturating_add(n) > limit {
                return Err(too_large(limit));
            }
            if expected.is_some_and(|e| n > e) {
                return Err(ApiError::new(
                    Code::SizeInvalid,
                    "request body is longer than Content-Length/Content-Range",
                ));
            }
            f.write_all(&b).await.map_err(ApiError::internal)?;
        }
        if let Some(e) = expected.filter(|&e| e != n) {
            return Err(ApiError::new(
                Code::SizeInvalid,
                format!("request body has {n} bytes, Content-Length/Content-Range said {e}"),
            ));
        }
        f.flush().await.map_err(ApiError::internal)
    }
    .await;
    if let Err(e) = res {
        if let Err(te) = f.set_len(size).await {
            tracing::warn!(error = %te, "cannot truncate upload file");
        }
        return Err(e);
    }
    Ok(n)
}

/// PATCH `/v2/<repo>/blobs/uploads/<id>`: append a chunk.
pub(crate) async fn patch(
    reg: &Registry,
    repo: &str,
    id: &str,
    req: Request,
) -> Result<Response, ApiError> {
    let sess = reg.uploads().get(repo, id)?;
    let mut st = sess.state.lock().await;
    if st.closed {
        return Err(upload_unknown());
    }
    let cr = header_str(req.headers(), &header::CONTENT_RANGE)?.map(str::to_owned);
    let cl = content_length(req.headers())?;
    let expected = expected_len(cr.as_deref(), cl, st.size, repo, id)?;
    sess.touch();
    let n = append(reg, id, st.size, req.into_body(), expected).await?;
    st.size += n;
    sess.touch();
    response(
        StatusCode::ACCEPTED,
        &session_headers(repo, id, st.size),
        Body::empty(),
    )
}

/// PUT `/v2/<repo>/blobs/uploads/<id>?digest=`: append the optional last
/// chunk, ingest, verify and link.
pub(crate) async fn finish(
    reg: &Registry,
    repo: &str,
    id: &str,
    query: &Query,
    req: Request,
) -> Result<Response, ApiError> {
    let sess = reg.uploads().get(repo, id)?;
    let Some(ds) = query.get("digest") else {
        return Err(ApiError::new(
            Code::DigestInvalid,
            "the digest query parameter is required to finish an upload",
        ));
    };
    let d = Digest::parse(ds)?;
    let link = names::blob_link(repo, &d)?;
    let mut st = sess.state.lock().await;
    if st.closed {
        return Err(upload_unknown());
    }
    let cr = header_str(req.headers(), &header::CONTENT_RANGE)?.map(str::to_owned);
    let cl = content_length(req.headers())?;
    let expected = expected_len(cr.as_deref(), cl, st.size, repo, id)?;
    sess.touch();
    let n = append(reg, id, st.size, req.into_body(), expected).await?;
    st.size += n;
    let permit = reg.ingest_permit().await?;
    // From here on the session is consumed, whatever the outcome.
    st.closed = true;
    let root = names::upload_root(id);
    let path = reg.uploads().path(id);
    let store = reg.store().clone();
    let opts = PutOptions {
        name: Some(root.clone()),
        pin: false,
        sha512: d.algo() == Algo::Sha512,
        progress: None,
        chunker: None,
    };
    let metrics = reg.metrics().clone();
    let dd = d.clone();
    // Ingest and commit in one blocking task, which runs to its end even if
    // the client goes away meanwhile.
    let res = blocking(move || {
        let f = std::fs::File::open(&path)
            .map_err(|e| ApiError::internal(format!("open {}: {e}", path.display())))?;
        let put = store.put_reader(f, &opts).map_err(ApiError::internal)?;
        commit(&store, &metrics, &dd, &link, &root, &put)
    })
    .await;
    drop(permit);
    reg.uploads().remove(id, reg.metrics()).await;
    drop(st);
    res?;
    created(repo, &d)
}

/// GET `/v2/<repo>/blobs/uploads/<id>`: 204 with the `Range` received.
pub(crate) async fn status(reg: &Registry, repo: &str, id: &str) -> Result<Response, ApiError> {
    let sess = reg.uploads().get(repo, id)?;
    let st = sess.state.lock().await;
    if st.closed {
        return Err(upload_unknown());
    }
    response(
        StatusCode::NO_CONTENT,
        &session_headers(repo, id, st.size),
        Body::empty(),
    )
}

/// DELETE `/v2/<repo>/blobs/uploads/<id>`: cancel the session (204).
pub(crate) async fn cancel(reg: &Registry, repo: &str, id: &str) -> Result<Response, ApiError> {
    let sess = reg.uploads().get(repo, id)?;
    let mut st = sess.state.lock().await;
    if st.closed {
        return Err(upload_unknown());
    }
    st.closed = true;
    reg.uploads().remove(id, reg.metrics()).await;
    response(
        StatusCode::NO_CONTENT,
        &[(header::CONTENT_LENGTH, "0".to_owned())],
        Body::empty(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ranges() {
        let e = |cr: &str, cl, size| expected_len(Some(cr), cl, size, "r", "i");
        assert_eq!(e("0-9", Some(10), 0).ok().flatten(), Some(10));
        assert_eq!(e("bytes 10-19/*", None, 10).ok().flatten(), Some(10));
        assert!(e("5-9", None, 0).is_err_and(|e| e.status == StatusCode::RANGE_NOT_SATISFIABLE));
        assert!(e("0-9", Some(5), 0).is_err_and(|e| e.code == Code::SizeInvalid));
        assert!(e("x", None, 0).is_err_and(|e| e.code == Code::BlobUploadInvalid));
        assert_eq!(
            expected_len(None, Some(3), 0, "r", "i").ok().flatten(),
            Some(3)
        );
    }
}
