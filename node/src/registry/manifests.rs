//! Manifests (GET/HEAD/PUT/DELETE by tag or digest) and the referrers API.
//!
//! A manifest is a store object linked as `manifest/<repo>@<digest>`. Its
//! media type is kept as a tiny object `mtype/<repo>@<digest>` whose bytes
//! are the media type string (tiny objects are inline index entries, and
//! all manifests of one type share one object). A manifest with a `subject`
//! is also linked as `ref/<repo>@<subject>/<digest>`, which is what the
//! referrers API lists.

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderName, StatusCode};
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use cairn_chunkstore::{ObjectId, PutOptions, Store, StoreError};
use futures_util::StreamExt;
use serde_json::Value;

use super::blobs::DOCKER_CONTENT_DIGEST;
use super::errors::{ApiError, Code};
use super::names::{self, Algo, Digest, Reference};
use super::{
    blocking, content_length, header_str, lookup, response, unlink, Pushed, Query, Registry,
    Upstream,
};

/// OCI image manifest.
pub(crate) const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub(crate) const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker image manifest, schema 2.
pub(crate) const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub(crate) const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// The OCI artifact manifest of the 1.1 release candidates.
pub(crate) const OCI_ARTIFACT: &str = "application/vnd.oci.artifact.manifest.v1+json";

/// Most descriptors one manifest may reference.
const MAX_DESCRIPTORS: usize = 10_000;
/// Most referrers listed in one response.
const MAX_REFERRERS: usize = 10_000;
/// Largest stored manifest the registry reads back (whatever the current
/// push limit is).
const MAX_MANIFEST_READ: u64 = 64 << 20;
/// Longest media type kept.
const MAX_MEDIA_TYPE_LEN: usize = 255;

const OCI_SUBJECT: HeaderName = HeaderName::from_static("oci-subject");
const OCI_FILTERS_APPLIED: HeaderName = HeaderName::from_static("oci-filters-applied");

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Image,
    Index,
    Artifact,
}

fn kind_of(media_type: &str) -> Option<Kind> {
    match media_type {
        OCI_MANIFEST | DOCKER_MANIFEST => Some(Kind::Image),
        OCI_INDEX | DOCKER_LIST => Some(Kind::Index),
        OCI_ARTIFACT => Some(Kind::Artifact),
        _ => None,
    }
}

/// What a pushed manifest references.
#[derive(Debug)]
struct Parsed {
    media_type: String,
    /// Blobs that must be linked in the repository.
    blobs: Vec<Digest>,
    /// Manifests that must be in the repository (index entries).
    children: Vec<Digest>,
    subject: Option<Digest>,
}

fn invalid(msg: impl Into<String>) -> ApiError {
    ApiError::new(Code::ManifestInvalid, msg)
}

fn manifest_unknown(r: &dyn std::fmt::Display) -> ApiError {
    ApiError::new(Code::ManifestUnknown, "manifest unknown to registry")
        .detail(serde_json::json!({ "reference": r.to_string() }))
}

/// A descriptor's digest and media type.
fn descriptor(v: &Value, what: &str) -> Result<(Digest, Option<String>), ApiError> {
    let Some(o) = v.as_object() else {
        return Err(invalid(format!("{what} is not a descriptor object")));
    };
    let Some(d) = o.get("digest").and_then(Value::as_str) else {
        return Err(invalid(format!("{what} has no digest")));
    };
    let d = Digest::parse(d).map_err(|e| invalid(format!("{what}: {}", e.message)))?;
    if o.get("size").and_then(Value::as_u64).is_none() {
        return Err(invalid(format!("{what} has no valid size")));
    }
    let mt = match o.get("mediaType") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => {
            return Err(invalid(format!(
                "{what} has a mediaType that is not a string"
            )))
        }
    };
    Ok((d, mt))
}

fn descriptors<'a>(
    obj: &'a serde_json::Map<String, Value>,
    field: &str,
    required: bool,
) -> Result<&'a [Value], ApiError> {
    match obj.get(field) {
        None if !required => Ok(&[]),
        None => Err(invalid(format!("manifest has no {field}"))),
        Some(Value::Array(a)) if a.len() <= MAX_DESCRIPTORS => Ok(a),
        Some(Value::Array(_)) => Err(invalid(format!(
            "{field} has more than {MAX_DESCRIPTORS} entries"
        ))),
        Some(_) => Err(invalid(format!("{field} is not an array"))),
    }
}

/// Layers that may legitimately live elsewhere (`urls`).
fn non_distributable(media_type: Option<&str>) -> bool {
    media_type.is_some_and(|m| m.contains(".nondistributable.") || m.contains(".foreign."))
}

/// Parse and check a pushed manifest. `content_type` is the request's
/// `Content-Type` without parameters.
fn parse_manifest(bytes: &[u8], content_type: Option<&str>) -> Result<Parsed, ApiError> {
    let v: Value =
        serde_json::from_slice(bytes).map_err(|e| invalid(format!("manifest is not JSON: {e}")))?;
    let Some(obj) = v.as_object() else {
        return Err(invalid("manifest is not a JSON object"));
    };
    match obj.get("schemaVersion") {
        None => {}
        Some(s) if s.as_u64() == Some(2) => {}
        Some(s) if s.as_u64() == Some(1) => {
            return Err(invalid("schema 1 manifests are not supported"))
        }
        Some(_) => return Err(invalid("schemaVersion must be 2")),
    }
    let json_mt = match obj.get("mediaType") {
        None => None,
        Some(Value::String(s)) => Some(s.as_str()),
        Some(_) => return Err(invalid("mediaType is not a string")),
    };
    let header_mt = content_type.filter(|c| kind_of(c).is_some());
    if let (Some(j), Some(h)) = (json_mt, header_mt) {
        if j != h {
            return Err(invalid(format!(
                "Content-Type {h} does not match the manifest's mediaType {j}"
            )));
        }
    }
    let inferred = if obj.contains_key("manifests") {
        OCI_INDEX
    } else if obj.contains_key("config") {
        OCI_MANIFEST
    } else {
        OCI_ARTIFACT
    };
    let media_type = json_mt.or(header_mt).unwrap_or(inferred);
    let Some(kind) = kind_of(media_type) else {
        return Err(invalid(format!(
            "unsupported manifest media type {:?}",
            names_truncate(media_type)
        )));
    };
    let mut blobs = Vec::new();
    let mut children = Vec::new();
    match kind {
        Kind::Image => {
            let Some(config) = obj.get("config") else {
                return Err(invalid("image manifest has no config"));
            };
            blobs.push(descriptor(config, "config")?.0);
            for (i, l) in descriptors(obj, "layers", true)?.iter().enumerate() {
                let (d, mt) = descriptor(l, &format!("layers[{i}]"))?;
                if !non_distributable(mt.as_deref()) {
                    blobs.push(d);
                }
            }
        }
        Kind::Artifact => {
            for (i, b) in descriptors(obj, "blobs", false)?.iter().enumerate() {
                blobs.push(descriptor(b, &format!("blobs[{i}]"))?.0);
            }
        }
        Kind::Index => {
            for (i, m) in descriptors(obj, "manifests", true)?.iter().enumerate() {
                children.push(descriptor(m, &format!("manifests[{i}]"))?.0);
            }
        }
    }
    let subject = match obj.get("subject") {
        None | Some(Value::Null) => None,
        Some(s) => Some(descriptor(s, "subject")?.0),
    };
    Ok(Parsed {
        media_type: media_type.to_owned(),
        blobs,
        children,
        subject,
    })
}

fn names_truncate(s: &str) -> String {
    s.chars().take(MAX_MEDIA_TYPE_LEN).collect()
}

/// Read a small object whole; `None` if it is gone.
fn read_small(store: &Store, id: &ObjectId, max: u64) -> Result<Option<Vec<u8>>, ApiError> {
    let h = match store.open_object(id) {
        Ok(h) => h,
        Err(StoreError::NoSuchObject(_)) => return Ok(None),
        Err(e) => return Err(ApiError::internal(e)),
    };
    if h.len() > max {
        return Err(ApiError::internal(format!(
            "object {id} has {} bytes, more than the {max} expected",
            h.len()
        )));
    }
    let mut buf = vec![0u8; h.len() as usize];
    h.read_at(0, &mut buf).map_err(ApiError::internal)?;
    Ok(Some(buf))
}

/// The media type of a stored manifest: its `mtype/` object, else its
/// `mediaType` field, else what its shape says.
fn media_type_of(store: &Store, repo: &str, d: &Digest, bytes: &[u8]) -> Result<String, ApiError> {
    let link = names::mtype_link(repo, d)?;
    if let Some(id) = lookup(store, &link)? {
        if let Some(mt) = read_small(store, &id, MAX_MEDIA_TYPE_LEN as u64)? {
            if let Ok(s) = String::from_utf8(mt) {
                if !s.is_empty() {
                    return Ok(s);
                }
            }
        }
    }
    let v: Value = serde_json::from_slice(bytes).unwrap_or(Value::Null);
    if let Some(mt) = v.get("mediaType").and_then(Value::as_str) {
        return Ok(names_truncate(mt));
    }
    Ok(if v.get("manifests").is_some() {
        OCI_INDEX
    } else {
        OCI_MANIFEST
    }
    .to_owned())
}

/// Store a verified manifest and link it: `manifest/`, `mtype/`, the tag
/// and the referrers entry. Blocking.
fn store_manifest(
    store: &Store,
    repo: &str,
    bytes: &[u8],
    media_type: &str,
    digest: &Digest,
    tag: Option<(&str, u64)>,
    subject: Option<&Digest>,
) -> Result<ObjectId, ApiError> {
    let link = names::manifest_link(repo, digest)?;
    let mlink = names::mtype_link(repo, digest)?;
    let tlink = tag
        .map(|(t, v)| names::tag_link(repo, t).map(|l| (l, v)))
        .transpose()?;
    let rlink = subject
        .map(|s| names::ref_link(repo, s, digest))
        .transpose()?;
    // The bytes were hashed in memory already, so naming the object in the
    // same commit as its ingest is safe (and GC-safe).
    let put = store
        .put_bytes(
            bytes,
            &PutOptions {
                name: Some(link.clone()),
                pin: false,
                sha512: digest.algo() == Algo::Sha512,
                progress: None,
                chunker: None,
            },
        )
        .map_err(ApiError::internal)?;
    if !digest.matches(&put.sha256, put.sha512.as_deref()) {
        unlink(store, &link)?;
        return Err(ApiError::internal(format!(
            "the store hashed manifest {digest} differently"
        )));
    }
    store
        .put_bytes(
            media_type.as_bytes(),
            &PutOptions {
                name: Some(mlink),
                pin: false,
                ..PutOptions::default()
            },
        )
        .map_err(ApiError::internal)?;
    if let Some((t, version)) = tlink {
        store
            .set_name_versioned(&t, &put.object, version)
            .map_err(ApiError::internal)?;
    }
    if let Some(r) = rlink {
        store
            .set_name(&r, &put.object)
            .map_err(ApiError::internal)?;
    }
    Ok(put.object)
}

/// Read a request body of at most `limit` bytes (413 beyond).
async fn read_limited(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let too_big = || {
        ApiError::new(
            Code::ManifestInvalid,
            format!("manifest larger than the registry's limit of {limit} bytes"),
        )
        .status(StatusCode::PAYLOAD_TOO_LARGE)
    };
    let mut buf = BytesMut::new();
    let mut s = body.into_data_stream();
    while let Some(frame) = s.next().await {
        let b = frame.map_err(|e| invalid(format!("reading the request body failed: {e}")))?;
        if buf.len() + b.len() > limit {
            return Err(too_big());
        }
        buf.extend_from_slice(&b);
    }
    Ok(buf.freeze())
}

/// PUT `/v2/<repo>/manifests/<reference>`.
pub(crate) async fn put(
    reg: &Registry,
    repo: &str,
    reference: &str,
    req: Request,
) -> Result<Response, ApiError> {
    let r = Reference::parse(reference)?;
    let ct = header_str(req.headers(), &header::CONTENT_TYPE)?
        .map(|c| c.split(';').next().unwrap_or("").trim().to_owned())
        .filter(|c| !c.is_empty());
    let limit = reg.cfg().max_manifest_bytes;
    if content_length(req.headers())?.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::new(
            Code::ManifestInvalid,
            format!("manifest larger than the registry's limit of {limit} bytes"),
        )
        .status(StatusCode::PAYLOAD_TOO_LARGE));
    }
    let bytes = read_limited(req.into_body(), limit).await?;
    let parsed = parse_manifest(&bytes, ct.as_deref())?;
    let digest = match &r {
        Reference::Digest(d) => {
            let got = Digest::of(d.algo(), &bytes);
            if got != *d {
                reg.metrics().digest_mismatches.inc();
                return Err(ApiError::new(
                    Code::DigestInvalid,
                    "manifest digest does not match the reference",
                )
                .detail(
                    serde_json::json!({ "digest": d.to_string(), "computed": got.to_string() }),
                ));
            }
            got
        }
        Reference::Tag(_) => Digest::of(Algo::Sha256, &bytes),
    };
    let store = reg.store().clone();
    let repo_s = repo.to_owned();
    let d = digest.clone();
    let len = bytes.len() as u64;
    let subject = parsed.subject.clone();
    let version = match &r {
        Reference::Tag(_) => reg.hlc().now(),
        Reference::Digest(_) => 0,
    };
    let pushed_tag = match &r {
        Reference::Tag(t) => Some(t.as_str().to_owned()),
        Reference::Digest(_) => None,
    };
    blocking(move || {
        for b in &parsed.blobs {
            if lookup(&store, &names::blob_link(&repo_s, b)?)?.is_none() {
                return Err(ApiError::new(
                    Code::ManifestBlobUnknown,
                    format!("blob {b} is not in repository {repo_s}"),
                )
                .detail(serde_json::json!({ "digest": b.to_string() })));
            }
        }
        for c in &parsed.children {
            if lookup(&store, &names::manifest_link(&repo_s, c)?)?.is_none() {
                return Err(ApiError::new(
                    Code::ManifestBlobUnknown,
                    format!("manifest {c} is not in repository {repo_s}"),
                )
                .detail(serde_json::json!({ "digest": c.to_string() })));
            }
        }
        let tag = match &r {
            Reference::Tag(t) => Some((t.as_str(), version)),
            Reference::Digest(_) => None,
        };
        store_manifest(
            &store,
            &repo_s,
            &bytes,
            &parsed.media_type,
            &d,
            tag,
            parsed.subject.as_ref(),
        )
    })
    .await?;
    reg.metrics().pushed_bytes.inc_by(len);
    reg.pushed(Pushed {
        repo: repo.to_owned(),
        tag: pushed_tag,
        digest: digest.to_string(),
        version,
    })
    .await?;
    let mut hdrs = vec![
        (header::LOCATION, format!("/v2/{repo}/manifests/{digest}")),
        (DOCKER_CONTENT_DIGEST, digest.to_string()),
        (header::CONTENT_LENGTH, "0".to_owned()),
    ];
    if let Some(s) = subject {
        hdrs.push((OCI_SUBJECT, s.to_string()));
    }
    response(StatusCode::CREATED, &hdrs, Body::empty())
}

/// The manifest object and digest `r` names in `repo`: local, else from the
/// upstream (verified, stored and linked). `MANIFEST_UNKNOWN` otherwise.
async fn resolve(
    reg: &Registry,
    repo: &str,
    r: &Reference,
) -> Result<(ObjectId, Digest), ApiError> {
    resolve_via(reg, reg.upstream().map(|u| &**u), repo, r).await
}

/// [`resolve`] with misses going to `up`.
async fn resolve_via(
    reg: &Registry,
    up: Option<&dyn Upstream>,
    repo: &str,
    r: &Reference,
) -> Result<(ObjectId, Digest), ApiError> {
    let store = reg.store().clone();
    let repo_s = repo.to_owned();
    let rr = r.clone();
    let local = blocking(move || match &rr {
        Reference::Tag(t) => {
            let Some(id) = lookup(&store, &names::tag_link(&repo_s, t)?)? else {
                return Ok(None);
            };
            let info = store.object_info(&id).map_err(ApiError::internal)?;
            Ok(Some((id, Digest::sha256_hex(&info.sha256)?)))
        }
        Reference::Digest(d) => {
            Ok(lookup(&store, &names::manifest_link(&repo_s, d)?)?.map(|id| (id, d.clone())))
        }
    })
    .await?;
    if let Some(found) = local {
        return Ok(found);
    }
    let Some(up) = up else {
        return Err(manifest_unknown(r));
    };
    let bad_gateway = |m: String| ApiError::internal(m).status(StatusCode::BAD_GATEWAY);
    let m = up
        .resolve_manifest(repo, &r.to_string())
        .await
        .map_err(|e| bad_gateway(format!("upstream: {e}")))?;
    let Some(m) = m else {
        return Err(manifest_unknown(r));
    };
    let md = Digest::parse(&m.digest)
        .map_err(|e| bad_gateway(format!("upstream digest: {}", e.message)))?;
    if let Reference::Digest(d) = r {
        if *d != md {
            return Err(bad_gateway(format!("upstream answered {md} for {d}")));
        }
    }
    if m.bytes.len() > reg.cfg().max_manifest_bytes {
        return Err(bad_gateway(format!("upstream manifest {md} is too large")));
    }
    if Digest::of(md.algo(), &m.bytes) != md {
        reg.metrics().digest_mismatches.inc();
        return Err(bad_gateway(format!(
            "upstream manifest does not match {md}"
        )));
    }
    let mt = if m.media_type.is_empty() || m.media_type.len() > MAX_MEDIA_TYPE_LEN {
        None
    } else {
        Some(m.media_type.clone())
    };
    let parsed = parse_manifest(&m.bytes, mt.as_deref()).ok();
    let media_type = parsed
        .as_ref()
        .map(|p| p.media_type.clone())
        .or(mt)
        .unwrap_or_else(|| OCI_MANIFEST.to_owned());
    let subject = parsed.and_then(|p| p.subject);
    let store = reg.store().clone();
    let repo_s = repo.to_owned();
    let rr = r.clone();
    let d = md.clone();
    let id = blocking(move || {
        // A tag learnt from an upstream has no version here (0): any
        // versioned write, local or replicated, wins over it.
        let tag = match &rr {
            Reference::Tag(t) => Some((t.as_str(), 0)),
            Reference::Digest(_) => None,
        };
        store_manifest(
            &store,
            &repo_s,
            &m.bytes,
            &media_type,
            &d,
            tag,
            subject.as_ref(),
        )
    })
    .await?;
    Ok((id, md))
}

/// GET or HEAD `/v2/<repo>/manifests/<reference>`.
pub(crate) async fn get(
    reg: &Registry,
    repo: &str,
    reference: &str,
    head: bool,
) -> Result<Response, ApiError> {
    let r = Reference::parse(reference)?;
    let (obj, digest) = resolve(reg, repo, &r).await?;
    let store = reg.store().clone();
    let repo_s = repo.to_owned();
    let d = digest.clone();
    let (bytes, mt) = blocking(move || {
        let Some(bytes) = read_small(&store, &obj, MAX_MANIFEST_READ)? else {
            return Err(manifest_unknown(&d));
        };
        let mt = media_type_of(&store, &repo_s, &d, &bytes)?;
        Ok((bytes, mt))
    })
    .await?;
    let hdrs = [
        (header::CONTENT_TYPE, mt),
        (DOCKER_CONTENT_DIGEST, digest.to_string()),
        (header::CONTENT_LENGTH, bytes.len().to_string()),
        (header::ETAG, format!("\"{digest}\"")),
    ];
    let body = if head {
        Body::empty()
    } else {
        reg.metrics().pulled_bytes.inc_by(bytes.len() as u64);
        Body::from(bytes)
    };
    response(StatusCode::OK, &hdrs, body)
}

/// DELETE `/v2/<repo>/manifests/<reference>`: by digest, the manifest, its
/// media type, its referrers entry and the repository's tags that point at
/// it; by tag, just the tag.
pub(crate) async fn delete(
    reg: &Registry,
    repo: &str,
    reference: &str,
) -> Result<Response, ApiError> {
    let r = Reference::parse(reference)?;
    let store = reg.store().clone();
    let repo_s = repo.to_owned();
    blocking(move || match &r {
        Reference::Tag(t) => {
            if unlink(&store, &names::tag_link(&repo_s, t)?)? {
                Ok(())
            } else {
                Err(manifest_unknown(&r))
            }
        }
        Reference::Digest(d) => {
            let link = names::manifest_link(&repo_s, d)?;
            let Some(id) = lookup(&store, &link)? else {
                return Err(manifest_unknown(&r));
            };
            if let Some(bytes) = read_small(&store, &id, MAX_MANIFEST_READ)? {
                let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let subject = v
                    .get("subject")
                    .and_then(|s| s.get("digest"))
                    .and_then(Value::as_str)
                    .and_then(|s| Digest::parse(s).ok());
                if let Some(s) = subject {
                    unlink(&store, &names::ref_link(&repo_s, &s, d)?)?;
                }
            }
            let prefix = names::tag_prefix(&repo_s);
            for (name, e) in store.names().map_err(ApiError::internal)? {
                if e.object == id && name.starts_with(&prefix) {
                    unlink(&store, &name)?;
                }
            }
            unlink(&store, &names::mtype_link(&repo_s, d)?)?;
            unlink(&store, &link)?;
            Ok(())
        }
    })
    .await?;
    response(
        StatusCode::ACCEPTED,
        &[(header::CONTENT_LENGTH, "0".to_owned())],
        Body::empty(),
    )
}

/// GET `/v2/<repo>/referrers/<digest>[?artifactType=]`: an OCI index of the
/// manifests in `repo` whose subject is `digest`.
pub(crate) async fn referrers(
    reg: &Registry,
    repo: &str,
    digest: &str,
    query: &Query,
) -> Result<Response, ApiError> {
    let d = Digest::parse(digest)?;
    let filter = query
        .get("artifactType")
        .filter(|s| !s.is_empty())
        .map(str::to_owned);
    let prefix = names::ref_prefix(repo, &d);
    let store = reg.store().clone();
    let repo_s = repo.to_owned();
    let f = filter.clone();
    let descs = blocking(move || {
        let mut out = Vec::new();
        for (name, e) in store.names().map_err(ApiError::internal)? {
            let Some(md) = name.strip_prefix(&prefix) else {
                continue;
            };
            let Ok(md) = Digest::parse(md) else {
                continue;
            };
            let Some(bytes) = read_small(&store, &e.object, MAX_MANIFEST_READ)? else {
                continue;
            };
            let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let mt = media_type_of(&store, &repo_s, &md, &bytes)?;
            let artifact_type = v
                .get("artifactType")
                .and_then(Value::as_str)
                .or_else(|| {
                    (kind_of(&mt) == Some(Kind::Image))
                        .then(|| v.get("config")?.get("mediaType")?.as_str())
                        .flatten()
                })
                .map(str::to_owned);
            if f.as_ref()
                .is_some_and(|f| artifact_type.as_ref() != Some(f))
            {
                continue;
            }
            let mut desc = serde_json::json!({
                "mediaType": mt,
                "digest": md.to_string(),
                "size": bytes.len(),
            });
            if let Some(at) = artifact_type {
                desc["artifactType"] = Value::String(at);
            }
            if let Some(a) = v.get("annotations").filter(|a| a.is_object()) {
                desc["annotations"] = a.clone();
            }
            out.push(desc);
            if out.len() >= MAX_REFERRERS {
                break;
            }
        }
        Ok(out)
    })
    .await?;
    let body = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": descs,
    })
    .to_string();
    let mut hdrs = vec![(header::CONTENT_TYPE, OCI_INDEX.to_owned())];
    if filter.is_some() {
        hdrs.push((OCI_FILTERS_APPLIED, "artifactType".to_owned()));
    }
    response(StatusCode::OK, &hdrs, Body::from(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(d: &str) -> Value {
        serde_json::json!({"mediaType": "x", "digest": d, "size": 1})
    }

    #[test]
    fn parses_manifests() {
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        let m = serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": desc(&a), "layers": [desc(&b)], "subject": desc(&a),
        });
        let p = parse_manifest(m.to_string().as_bytes(), None).ok();
        assert_eq!(p.as_ref().map(|p| p.blobs.len()), Some(2));
        assert!(p.as_ref().is_some_and(|p| p.subject.is_some()));
        // Header and body disagree.
        assert!(parse_manifest(m.to_string().as_bytes(), Some(DOCKER_MANIFEST)).is_err());
        let idx = serde_json::json!({"schemaVersion": 2, "manifests": [desc(&a)]});
        let p = parse_manifest(idx.to_string().as_bytes(), Some(OCI_INDEX)).ok();
        assert_eq!(p.map(|p| p.children.len()), Some(1));
        for bad in [
            "not json".to_owned(),
            "[]".to_owned(),
            serde_json::json!({"schemaVersion": 1}).to_string(),
            serde_json::json!({"schemaVersion": 2, "mediaType": "text/plain"}).to_string(),
            serde_json::json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []})
                .to_string(),
            serde_json::json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"digest": "sha256:zz", "size": 1}, "layers": []})
            .to_string(),
        ] {
            assert!(parse_manifest(bad.as_bytes(), None).is_err(), "{bad}");
        }
    }
}

/// What [`import`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Imported {
    /// The manifest the tag names here afterwards (the imported digest when
    /// no tag was given).
    pub digest: String,
    /// The tag's version here afterwards (0 when no tag was given).
    pub version: u64,
    /// Whether the import changed anything here (a new manifest, or the tag).
    pub changed: bool,
}

/// How deep an index may nest when imported (index → manifest → blobs).
const MAX_IMPORT_DEPTH: usize = 2;

/// Replication in (see [`Registry::import`]).
pub(crate) async fn import(
    reg: &Registry,
    up: &dyn Upstream,
    repo: &str,
    tag: Option<&str>,
    digest: &str,
    version: u64,
) -> Result<Imported, ApiError> {
    names::validate_repo(repo)?;
    let d = Digest::parse(digest)?;
    if let Some(t) = tag {
        names::tag_link(repo, t)?;
    }
    reg.hlc().observe(version);
    let mut changed = import_tree(reg, up, repo, &d, 0).await?;
    let Some(t) = tag else {
        return Ok(Imported {
            digest: d.to_string(),
            version: 0,
            changed,
        });
    };
    let store = reg.store().clone();
    let link = names::tag_link(repo, t)?;
    let mlink = names::manifest_link(repo, &d)?;
    let (entry, set) = blocking(move || {
        let id = lookup(&store, &mlink)?
            .ok_or_else(|| ApiError::internal(format!("{mlink} vanished during import")))?;
        let (entry, set) = store
            .set_name_versioned(&link, &id, version)
            .map_err(ApiError::internal)?;
        let info = store
            .object_info(&entry.object)
            .map_err(ApiError::internal)?;
        Ok(((Digest::sha256_hex(&info.sha256)?, entry.version), set))
    })
    .await?;
    changed |= set;
    Ok(Imported {
        digest: entry.0.to_string(),
        version: entry.1,
        changed,
    })
}

/// Make manifest `d` and what it references local. Returns whether
/// anything was new.
fn import_tree<'a>(
    reg: &'a Registry,
    up: &'a dyn Upstream,
    repo: &'a str,
    d: &'a Digest,
    depth: usize,
) -> super::BoxFuture<'a, Result<bool, ApiError>> {
    Box::pin(async move {
        let store = reg.store().clone();
        let mlink = names::manifest_link(repo, d)?;
        let had = blocking(move || lookup(&store, &mlink)).await?.is_some();
        let (id, _) = resolve_via(reg, Some(up), repo, &Reference::Digest(d.clone())).await?;
        let store = reg.store().clone();
        let repo_s = repo.to_owned();
        let dd = d.clone();
        let parsed = blocking(move || {
            let bytes = read_small(&store, &id, MAX_MANIFEST_READ)?
                .ok_or_else(|| ApiError::internal(format!("manifest {dd} vanished")))?;
            let mt = media_type_of(&store, &repo_s, &dd, &bytes)?;
            parse_manifest(&bytes, Some(&mt))
        })
        .await?;
        let mut changed = !had;
        for c in &parsed.children {
            if depth >= MAX_IMPORT_DEPTH {
                return Err(invalid(format!(
                    "manifest {d} nests indexes deeper than {MAX_IMPORT_DEPTH}"
                )));
            }
            changed |= import_tree(reg, up, repo, c, depth + 1).await?;
        }
        for b in &parsed.blobs {
            let store = reg.store().clone();
            let link = names::blob_link(repo, b)?;
            if blocking(move || lookup(&store, &link)).await?.is_none() {
                super::blobs::find_blob_via(reg, Some(up), repo, b).await?;
                changed = true;
            }
        }
        Ok(changed)
    })
}

/// The digest and version of `repo:tag` here.
pub(crate) async fn tag_state(
    reg: &Registry,
    repo: &str,
    tag: &str,
) -> Result<Option<(String, u64)>, ApiError> {
    let link = names::tag_link(repo, tag)?;
    let store = reg.store().clone();
    blocking(move || {
        let Some(e) = store.name_entry(&link).map_err(ApiError::internal)? else {
            return Ok(None);
        };
        let info = store.object_info(&e.object).map_err(ApiError::internal)?;
        Ok(Some((
            Digest::sha256_hex(&info.sha256)?.to_string(),
            e.version,
        )))
    })
    .await
}
