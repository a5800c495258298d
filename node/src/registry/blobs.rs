//! Blob GET/HEAD (with `Range`) and DELETE, streamed from the chunk store.

use std::io;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderName, StatusCode};
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use cairn_chunkstore::{ObjectHandle, ObjectId, StoreError};
use futures_util::TryStreamExt;
use prometheus::IntCounter;

use super::errors::{ApiError, Code};
use super::names::{self, Digest};
use super::{blocking, header_str, lookup, response, unlink, Registry};

/// Chunks read ahead of the client.
const READAHEAD: usize = 4;
/// Read size for ranged responses.
const PIECE: u64 = 256 << 10;

pub(crate) const DOCKER_CONTENT_DIGEST: HeaderName =
    HeaderName::from_static("docker-content-digest");

pub(crate) fn blob_unknown(d: &Digest) -> ApiError {
    ApiError::new(Code::BlobUnknown, "blob unknown to registry")
        .detail(serde_json::json!({ "digest": d.to_string() }))
}

/// The object of blob `d` in `repo`: a local link, else the upstream's copy
/// (verified, then linked). `BLOB_UNKNOWN` otherwise.
pub(crate) async fn find_blob(
    reg: &Registry,
    repo: &str,
    d: &Digest,
) -> Result<ObjectId, ApiError> {
    find_blob_via(reg, reg.upstream().map(|u| &**u), repo, d).await
}

/// [`find_blob`] with misses going to `up`.
pub(crate) async fn find_blob_via(
    reg: &Registry,
    up: Option<&dyn super::Upstream>,
    repo: &str,
    d: &Digest,
) -> Result<ObjectId, ApiError> {
    let link = names::blob_link(repo, d)?;
    let store = reg.store().clone();
    let l = link.clone();
    if let Some(id) = blocking(move || lookup(&store, &l)).await? {
        return Ok(id);
    }
    let Some(up) = up else {
        return Err(blob_unknown(d));
    };
    let fetched = up.fetch_blob(repo, &d.to_string()).await.map_err(|e| {
        ApiError::internal(format!("upstream: {e}")).status(StatusCode::BAD_GATEWAY)
    })?;
    let Some(id) = fetched else {
        return Err(blob_unknown(d));
    };
    let store = reg.store().clone();
    let metrics = reg.metrics().clone();
    let d = d.clone();
    blocking(move || {
        let info = store.object_info(&id).map_err(ApiError::internal)?;
        if !d.matches(&info.sha256, info.sha512.as_deref()) {
            metrics.digest_mismatches.inc();
            return Err(ApiError::internal(format!(
                "upstream returned object {id}, which is not {d}"
            ))
            .status(StatusCode::BAD_GATEWAY));
        }
        store.set_name(&link, &id).map_err(ApiError::internal)?;
        Ok(id)
    })
    .await
}

/// A whole-blob GET of a blob that is not linked here, answered by
/// streaming it from the upstream as it arrives. `None`: the blob is local,
/// or the upstream does not stream; the caller goes the usual way.
async fn stream_from_upstream(
    reg: &Registry,
    repo: &str,
    d: &Digest,
) -> Result<Option<Response>, ApiError> {
    let Some(up) = reg.upstream() else {
        return Ok(None);
    };
    let link = names::blob_link(repo, d)?;
    let store = reg.store().clone();
    if blocking(move || lookup(&store, &link)).await?.is_some() {
        return Ok(None);
    }
    let streamed = up.stream_blob(repo, &d.to_string()).await.map_err(|e| {
        ApiError::internal(format!("upstream: {e}")).status(StatusCode::BAD_GATEWAY)
    })?;
    let Some(blob) = streamed else {
        return Ok(None);
    };
    let hdrs = [
        (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
        (DOCKER_CONTENT_DIGEST, d.to_string()),
        (header::CONTENT_LENGTH, blob.len.to_string()),
    ];
    let pulled = reg.metrics().pulled_bytes.clone();
    let s = futures_util::stream::unfold(blob.body, |mut rx| async move {
        let item = rx.recv().await?;
        Some((item, rx))
    })
    .inspect_ok(move |b: &Bytes| pulled.inc_by(b.len() as u64))
    .inspect_err(log_stream_error);
    response(StatusCode::OK, &hdrs, Body::from_stream(s)).map(Some)
}

/// GET or HEAD `/v2/<repo>/blobs/<digest>`.
pub(crate) async fn get(
    reg: &Registry,
    repo: &str,
    digest: &str,
    headers: &HeaderMap,
    head: bool,
) -> Result<Response, ApiError> {
    let d = Digest::parse(digest)?;
    let range = header_str(headers, &header::RANGE)?.map(str::to_owned);
    if !head && range.is_none() {
        if let Some(resp) = stream_from_upstream(reg, repo, &d).await? {
            return Ok(resp);
        }
    }
    let obj = find_blob(reg, repo, &d).await?;
    let store = reg.store().clone();
    let dd = d.clone();
    let handle = blocking(move || match store.open_object(&obj) {
        Ok(h) => Ok(h),
        Err(StoreError::NoSuchObject(_)) => Err(blob_unknown(&dd)),
        Err(e) => Err(ApiError::internal(e)),
    })
    .await?;
    let len = handle.len();
    let mut hdrs = vec![
        (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
        (DOCKER_CONTENT_DIGEST, d.to_string()),
        (header::ACCEPT_RANGES, "bytes".to_owned()),
        (header::ETAG, format!("\"{d}\"")),
    ];
    let pulled = reg.metrics().pulled_bytes.clone();
    match parse_range(range.as_deref(), len)? {
        None => {
            hdrs.push((header::CONTENT_LENGTH, len.to_string()));
            let body = if head {
                Body::empty()
            } else {
                stream_full(handle, pulled)
            };
            response(StatusCode::OK, &hdrs, body)
        }
        Some((start, end)) => {
            hdrs.push((header::CONTENT_LENGTH, (end - start + 1).to_string()));
            hdrs.push((header::CONTENT_RANGE, format!("bytes {start}-{end}/{len}")));
            let body = if head {
                Body::empty()
            } else {
                stream_range(handle, start, end + 1, pulled)
            };
            response(StatusCode::PARTIAL_CONTENT, &hdrs, body)
        }
    }
}

/// DELETE `/v2/<repo>/blobs/<digest>`: unlink the blob from the repository.
pub(crate) async fn delete(reg: &Registry, repo: &str, digest: &str) -> Result<Response, ApiError> {
    let d = Digest::parse(digest)?;
    let link = names::blob_link(repo, &d)?;
    let store = reg.store().clone();
    if !blocking(move || unlink(&store, &link)).await? {
        return Err(blob_unknown(&d));
    }
    response(
        StatusCode::ACCEPTED,
        &[(header::CONTENT_LENGTH, "0".into())],
        Body::empty(),
    )
}

/// Parse a single `bytes=` range against an object of `len` bytes:
/// `Ok(None)` serves the whole object (no header, another unit, several
/// ranges or a syntactically invalid one, as RFC 9110 allows), `Ok(Some((first,
/// last)))` an inclusive range, and an unsatisfiable range is 416 with
/// `Content-Range: bytes */len`.
pub(crate) fn parse_range(v: Option<&str>, len: u64) -> Result<Option<(u64, u64)>, ApiError> {
    let Some(spec) = v.and_then(|v| v.strip_prefix("bytes=")) else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((a, b)) = spec.split_once('-') else {
        return Ok(None);
    };
    let (a, b) = (a.trim(), b.trim());
    let unsatisfiable = || {
        ApiError::new(
            Code::RangeInvalid,
            format!("range {spec} not satisfiable ({len} bytes)"),
        )
        .header(header::CONTENT_RANGE, &format!("bytes */{len}"))
    };
    if a.is_empty() {
        let Ok(n) = b.parse::<u64>() else {
            return Ok(None);
        };
        if n == 0 || len == 0 {
            return Err(unsatisfiable());
        }
        return Ok(Some((len.saturating_sub(n), len - 1)));
    }
    let Ok(start) = a.parse::<u64>() else {
        return Ok(None);
    };
    let end = if b.is_empty() {
        u64::MAX
    } else {
        match b.parse::<u64>() {
            Ok(e) if e >= start => e,
            _ => return Ok(None),
        }
    };
    if start >= len {
        return Err(unsatisfiable());
    }
    Ok(Some((start, end.min(len - 1))))
}

fn log_stream_error(e: &io::Error) {
    tracing::warn!(error = %e, "blob stream failed; closing the response");
}

/// The whole object, chunk by chunk as it is read (verified) from the store.
fn stream_full(handle: ObjectHandle, pulled: IntCounter) -> Body {
    let rx = handle.stream(READAHEAD);
    let s = futures_util::stream::unfold(rx, |mut rx| async move {
        let item = rx.recv().await?;
        Some((item.map_err(io::Error::other), rx))
    })
    .inspect_ok(move |b: &Bytes| pulled.inc_by(b.len() as u64))
    .inspect_err(log_stream_error);
    Body::from_stream(s)
}

/// Bytes `start..end` of the object, in pieces read on a blocking thread.
fn stream_range(handle: ObjectHandle, start: u64, end: u64, pulled: IntCounter) -> Body {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, StoreError>>(READAHEAD);
    tokio::task::spawn_blocking(move || {
        let mut pos = start;
        while pos < end {
            let n = (end - pos).min(PIECE) as usize;
            let mut buf = BytesMut::zeroed(n);
            let r = handle.read_at(pos, &mut buf).map(|()| buf.freeze());
            let stop = r.is_err();
            if tx.blocking_send(r).is_err() || stop {
                break;
            }
            pos += n as u64;
        }
    });
    let s = futures_util::stream::unfold(rx, |mut rx| async move {
        let item = rx.recv().await?;
        Some((item.map_err(io::Error::other), rx))
    })
    .inspect_ok(move |b: &Bytes| pulled.inc_by(b.len() as u64))
    .inspect_err(log_stream_error);
    Body::from_stream(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        let r = |v: &str, len| parse_range(Some(v), len).ok().flatten();
        assert_eq!(r("bytes=0-9", 100), Some((0, 9)));
        assert_eq!(r("bytes=10-", 100), Some((10, 99)));
        assert_eq!(r("bytes=90-200", 100), Some((90, 99)));
        assert_eq!(r("bytes=-10", 100), Some((90, 99)));
        assert_eq!(r("bytes=-1000", 100), Some((0, 99)));
        assert_eq!(r("bytes=5-1", 100), None);
        assert_eq!(r("bytes=0-1,5-6", 100), None);
        assert_eq!(r("items=0-1", 100), None);
        assert!(parse_range(Some("bytes=100-"), 100).is_err());
        assert!(parse_range(Some("bytes=-0"), 100).is_err());
        assert!(parse_range(Some("bytes=0-"), 0).is_err());
        assert_eq!(parse_range(None, 10).ok().flatten(), None);
    }
}
