//! The OCI registry over plain HTTP: a server on 127.0.0.1:0 and reqwest
//! (raw TCP where reqwest would clean the request up).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use cairn_node::chunkstore::{ObjectId, PutOptions, Store, StoreConfig};
use cairn_node::registry::{
    BoxFuture, Registry, RegistryConfig, Upstream, UpstreamError, UpstreamManifest,
};
use cairn_node::CancellationToken;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sha2::Digest as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const CONFIG: &str = "application/vnd.oci.image.config.v1+json";

struct Server {
    base: String,
    addr: SocketAddr,
    store: Arc<Store>,
    prom: prometheus::Registry,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Server {
    async fn start(tune: impl FnOnce(&mut RegistryConfig)) -> Result<Self> {
        Self::start_with(tune, None).await
    }

    async fn start_with(
        tune: impl FnOnce(&mut RegistryConfig),
        upstream: Option<Arc<dyn Upstream>>,
    ) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let store = Arc::new(Store::open(
            dir.path().join("store"),
            StoreConfig::default(),
        )?);
        let mut cfg = RegistryConfig::new(dir.path().join("uploads"));
        tune(&mut cfg);
        let prom = prometheus::Registry::new();
        let cancel = CancellationToken::new();
        let mut reg = Registry::new(store.clone(), cfg, &prom, cancel.clone())?;
        if let Some(up) = upstream {
            reg = reg.with_upstream(up);
        }
        Self::launch(reg, store, prom, cancel, dir).await
    }

    async fn stop(self) -> Result<()> {
        self.cancel.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .context("server did not stop")??;
        Ok(())
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn req(&self, m: Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(m, self.url(path))
    }

    /// Monolithic push; returns the digest.
    async fn push_blob(&self, repo: &str, data: &[u8]) -> Result<String> {
        let d = sha256(data);
        let r = self
            .req(
                Method::POST,
                &format!("/v2/{repo}/blobs/uploads/?digest={d}"),
            )
            .body(data.to_vec())
            .send()
            .await?;
        ensure!(
            r.status() == StatusCode::CREATED,
            "push blob: {}",
            r.status()
        );
        Ok(d)
    }

    async fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        body: &[u8],
    ) -> Result<reqwest::Response> {
        Ok(self
            .req(Method::PUT, &format!("/v2/{repo}/manifests/{reference}"))
            .header("content-type", media_type)
            .body(body.to_vec())
            .send()
            .await?)
    }

    /// Push a config and one layer, then an image manifest under `tag`.
    /// Returns (manifest bytes, manifest digest).
    async fn push_image(&self, repo: &str, tag: &str, layer: &[u8]) -> Result<(Vec<u8>, String)> {
        let config = format!("{{\"architecture\":\"amd64\",\"os\":\"linux\",\"tag\":\"{tag}\"}}");
        let cd = self.push_blob(repo, config.as_bytes()).await?;
        let ld = self.push_blob(repo, layer).await?;
        let m = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": CONFIG, "digest": cd, "size": config.len()},
            "layers": [{"mediaType": LAYER, "digest": ld, "size": layer.len()}],
        })
        .to_string()
        .into_bytes();
        let r = self.put_manifest(repo, tag, OCI_MANIFEST, &m).await?;
        ensure!(
            r.status() == StatusCode::CREATED,
            "put manifest: {}",
            r.status()
        );
        let d = sha256(&m);
        ensure!(header(&r, "docker-content-digest") == d);
        Ok((m, d))
    }

    fn metric(&self, name: &str) -> f64 {
        let mut total = 0.0;
        for f in self.prom.gather() {
            if f.name() == name {
                for m in f.get_metric() {
                    total += m.get_counter().get_value() + m.get_gauge().get_value();
                }
            }
        }
        total
    }
}

fn sha256(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(b)))
}

fn sha512(b: &[u8]) -> String {
    format!("sha512:{}", hex::encode(sha2::Sha512::digest(b)))
}

/// Deterministic pseudo-random bytes (xorshift), so chunks do not dedup.
fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn header(r: &reqwest::Response, name: &str) -> String {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

/// The first error code of an error response.
async fn code(r: reqwest::Response) -> Result<String> {
    let v: Value = r.json().await?;
    Ok(v["errors"][0]["code"].as_str().unwrap_or("").to_owned())
}

async fn expect_error(r: reqwest::Response, status: StatusCode, want: &str) -> Result<()> {
    let got = r.status();
    let c = code(r).await?;
    ensure!(
        got == status && c == want,
        "want {status} {want}, got {got} {c}"
    );
    Ok(())
}

/// Send raw bytes and read the answer until the server closes.
async fn raw(addr: SocketAddr, request: &[u8], half_close: bool) -> Result<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(request).await?;
    if half_close {
        s.shutdown().await?;
    }
    let mut out = Vec::new();
    match tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await {
        Ok(Ok(_)) | Ok(Err(_)) => {}
        Err(_) => bail!("no answer within 10 s"),
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base_and_uploads() -> Result<()> {
    let s = Server::start(|_| {}).await?;
    let r = s.req(Method::GET, "/v2/").send().await?;
    ensure!(r.status() == StatusCode::OK);
    ensure!(header(&r, "docker-distribution-api-version") == "registry/2.0");
    ensure!(r.text().await? == "{}");

    // Monolithic.
    let blob = data(3 << 20, 1);
    let d = s.push_blob("demo/app", &blob).await?;
    let r = s
        .req(Method::HEAD, &format!("/v2/demo/app/blobs/{d}"))
        .send()
        .await?;
    ensure!(r.status() == StatusCode::OK);
    ensure!(header(&r, "content-length") == blob.len().to_string());
    ensure!(header(&r, "docker-content-digest") == d);
    let got = s
        .req(Method::GET, &format!("/v2/demo/app/blobs/{d}"))
        .send()
        .await?;
    ensure!(got.status() == StatusCode::OK);
    ensure!(got.bytes().await?.as_ref() == blob.as_slice());

    // Chunked: POST, PATCH with Content-Range, status, out-of-order PATCH,
    // PATCH without Content-Range, PUT with the last chunk.
    let blob = data(1 << 20, 2);
    let d = sha256(&blob);
    let r = s
        .req(Method::POST, "/v2/demo/app/blobs/uploads/")
        .send()
        .await?;
    ensure!(r.status() == StatusCode::ACCEPTED);
    let loc = header(&r, "location");
    ensure!(loc.starts_with("/v2/demo/app/blobs/uploads/"), "{loc}");
    ensure!(header(&r, "range") == "0-0");
    ensure!(!header(&r, "docker-upload-uuid").is_empty());
    let (a, rest) = blob.split_at(300_000);
    let (b, c) = rest.split_at(400_000);
    let r = s
        .req(Method::PATCH, &loc)
        .header("content-range", format!("0-{}", a.len() - 1))
        .header("content-type", "application/octet-stream")
        .body(a.to_vec())
        .send()
        .await?;
    ensure!(r.status() == StatusCode::ACCEPTED, "{}", r.status());
    ensure!(header(&r, "range") == format!("0-{}", a.len() - 1));
    let loc = header(&r, "location");
    let r = s.req(Method::GET, &loc).send().await?;
    ensure!(r.status() == StatusCode::NO_CONTENT);
    ensure!(header(&r, "range") == format!("0-{}", a.len() - 1));
    // Out of order: starts at 0 again.
    let r = s
        .req(Method::PATCH, &loc)
        .header("content-range", format!("0-{}", b.len() - 1))
        .body(b.to_vec())
        .send()
        .await?;
    ensure!(
        r.status() == StatusCode::RANGE_NOT_SATISFIABLE,
        "{}",
        r.status()
    );
    ensure!(header(&r, "range") == format!("0-{}", a.len() - 1));
    ensure!(header(&r, "location") == loc);
    // A streamed chunk (no Content-Range).
    let r = s.req(Method::PATCH, &loc).body(b.to_vec()).send().await?;
    ensure!(r.status() == StatusCode::ACCEPTED);
    ensure!(header(&r, "range") == format!("0-{}", a.len() + b.len() - 1));
    let r = s
        .req(Method::PUT, &format!("{loc}?digest={d}"))
        .body(c.to_vec())
        .send()
        .await?;
    ensure!(r.status() == StatusCode::CREATED, "{}", r.status());
    ensure!(header(&r, "location") == format!("/v2/demo/app/blobs/{d}"));
    ensure!(header(&r, "docker-content-digest") == d);
    let got = s
        .req(Method::GET, &format!("/v2/demo/app/blobs/{d}"))
        .send()
        .await?;
    ensure!(got.bytes().await?.as_ref() == blob.as_slice());
    // The session is gone.
    let r = s.req(Method::PATCH, &loc).body("x").send().await?;
    expect_error(r, StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN").await?;

    // Cancel.
    let r = s
        .req(Method::POST, "/v2/demo/app/blobs/uploads/")
        .send()
        .await?;
    let loc = header(&r, "location");
    ensure!(s.metric("cairn_registry_uploads_in_progress") == 1.0);
    let r = s.req(Method::DELETE, &loc).send().await?;
    ensure!(r.status() == StatusCode::NO_CONTENT);
    let r = s.req(Method::GET, &loc).send().await?;
    expect_error(r, StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN").await?;
    ensure!(s.metric("cairn_registry_uploads_in_progress") == 0.0);

    // An empty blob.
    let d = s.push_blob("demo/app", b"").await?;
    let got = s
        .req(Method::GET, &format!("/v2/demo/app/blobs/{d}"))
        .send()
        .await?;
    ensure!(got.status() == StatusCode::OK && got.bytes().await?.is_empty());

    ensure!(s.metric("cairn_registry_pushed_bytes_total") >= (4 << 20) as f64);
    ensure!(s.metric("cairn_registry_pulled_bytes_total") >= (4 << 20) as f64);
    ensure!(s.metric("cairn_registry_requests_total") > 10.0);
    s.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_digests_link_nothing() -> Result<()> {
    let s = Server::start(|_| {}).await?;
    let blob = data(100_000, 3);
    let real = sha256(&blob);
    let claimed = sha256(b"something else");
    let r = s
        .req(
            Method::POST,
            &format!("/v2/demo/app/blobs/uploads/?digest={claimed}"),
        )
        .body(blob.clone())
        .send()
        .await?;
    expect_error(r, StatusCode::BAD_REQUEST, "DIGEST_INVALID").await?;
    for d in [&real, &claimed] {
        let r = s
            .req(Method::HEAD, &format!("/v2/demo/app/blobs/{d}"))
            .send()
            .await?;
        ensure!(r.status() == StatusCode::NOT_FOUND, "{d} is linked");
    }
    // Chunked, wrong digest at PUT.
    let r = s
        .req(Method::POST, "/v2/demo/app/blobs/uploads/")
        .send()
        .await?;
    let loc = header(&r, "location");
    s.req(Method::PATCH, &loc).body(blob.clone()).send().await?;
    let r = s
        .req(Method::PUT, &format!("{loc}?digest={claimed}"))
        .send()
        .await?;
    expect_error(r, StatusCode::BAD_REQUEST, "DIGEST_INVALID").await?;
    let r = s
        .req(Method::HEAD, &format!("/v2/demo/app/blobs/{real}"))
        .send()
        .await?;
    ensure!(r.status() == StatusCode::NOT_FOUND);
    ensure!(s.metric("cairn_registry_digest_mismatches_total") == 2.0);
    // No name in the store points at the content.
    let id = s.store.resolve(&real)?;
    ensure!(s.store.names()?.iter().all(|(_, e)| e.object != id));
    // Malformed and unsupported digests.
    for bad in [
        "sha256:xyz",
        "md5:d41d8cd98f00b204e9800998ecf8427e",
        "sha256",
        "SHA256:00",
    ] {
        let r = s
            .req(
                Method::POST,
                &format!("/v2/demo/app/blobs/uploads/?digest={bad}"),
            )
            .body("x")
            .send()
            .await?;
        expect_error(r, StatusCode::BAD_REQUEST, "DIGEST_INVALID").await?;
        let r = s
            .req(Method::GET, &format!("/v2/demo/app/blobs/{bad}"))
            .send()
            .await?;
        expect_error(r, StatusCode::BAD_REQUEST, "DIGEST_INVALID").await?;
    }
    // PUT without a digest.
    let r = s
        .req(Method::POST, "/v2/demo/app/blobs/uploads/")
        .send()
        .await?;
    let loc = header(&r, "location");
    let r = s.req(Method::PUT, &loc).send().await?;
    expect_error(r, StatusCode::BAD_REQUEST, "DIGEST_INVALID").await?;
    s.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sha512_digests() -> Result<()> {
    let s = Server::start(|_| {}).await?;
    let blob = data(700_000, 4);
    let d = sha512(&blob);
    let r = s
        .req(
            Method::POST,
            &format!("/v2/demo/app/blobs/uploads/?digest={d}"),
        )
        .body(blob.clone())
        .send()
        .await?;
    ensure!(r.status() == StatusCode::CREATED, "{}", r.status());
    ensure!(header(&r, "docker-content-digest") == d);
    let got = s
        .req(Method::GET, &format!("/v2/demo/app/blobs/{d}"))
        .send()
        .await?;
    ensure!(got.bytes().await?.as_ref() == blob.as_slice());
    // Chunked with sha512.
    let blob2 = data(300_000, 5);
    let d2 = sha512(&blob2);
    let r = s
        .req(Method::POST, "/v2/demo/app/blobs/uploads/")
        .send()
        .await?;
    let loc = header(&r, "location");
    s.req(Method::PATCH, &loc)
        .body(blob2.clone())
        .send()
        .await?;
    let r = s
        .req(Method::PUT, &format!("{loc}?digest={d2}"))
        .send()
        .await?;
    ensure!(r.status() == StatusCode::CREATED);
    // Wrong sha512.
    let r = s
        .req(
            Method::POST,
            &format!("/v2/demo/app/blobs/uploads/?digest={}", sha512(b"no")),
        )
        .body(blob.clone())
        .send()
        .await?;
    expect_error(r, StatusCode::BAD_REQUEST, "DIGEST_INVALID").await?;
    // A manifest by sha512 digest.
    let m = json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": CONFIG, "digest": d2, "size": blob2.len()},
        "layers": [{"mediaType": LAYER, "digest": d, "size": blob.len()}],
    })
    .to_string();
    let md = sha512(m.as_bytes());
    let r = s
        .put_manifest("demo/app", &md, OCI_MANIFEST, m.as_bytes())
        .await?;
    ensure!(r.status() == StatusCode::CREATED, "{}", r.status());
    let r = s
        .req(Method::GET, &format!("/v2/demo/app/manifests/{md}"))
        .send()
        .await?;
    ensure!(header(&r, "docker-content-digest") == md);
    ensure!(r.bytes().await?.as_ref() == m.as_bytes());
    s.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_must_match() -> Result<()> {
    let s = Server::start(|cfg| cfg.max_upload_bytes = 1 << 20).await?;
    // Content-Range says 10 bytes, the body has 5.
    let r = s
        .req(Method::POST, "/v2/demo/app/blobs/uploads/")
        .send()
        .await?;
    let loc = header(&r, "location");
    let r = s
        .req(Method::PATCH, &loc)
        .header("content-range", "0-9")
        .body("12345")
        .send()
        .await?;
    expect_error(r, StatusCode::BAD_REQUEST, "SIZE_INVALID").await?;
    // Nothing was kept.
    let r = s.req(Method::GET, &loc).send().await?;
    ensure!(header(&r, "range") == "0-0");
    // A body shorter than its Content-Length (the client then closes).
    let d = sha256(b"0123456789");
    let req = format!(
        "POST /v2/demo/app/blobs/uploads/?digest={d} HTTP/1.1\r\nHost: x\r\n\
         Content-Length: 100\r\nConnection: close\r\n\r\n0123456789"
    );
    let answer = raw(s.addr, req.as_bytes(), true).await?;
    ensure!(
        answer.starts_with("HTTP/1.1 400") && answer.contains("SIZE_INVALID"),
        "short body: {answer}"
    );
    let r = s
        .req(Method::HEAD, &format!("/v2/demo/app/blobs/{d}"))
        .send()
        .await?;
    ensure!(r.status() == StatusCode::NOT_FOUND);
    // Over the size limit: monolithic and chunked.
    let big = data((1 << 20) + 1, 6);
    let r = s
        .req(
            Method::POST,
            &format!("/v2/demo/app/blobs/uploads/?digest={}", sha256(&big)),
        )
        .body(big.clone())
        .send()
        .await;
    match r {
        Ok(r) => expect_error(r, StatusCode::PAYLOAD_TOO_LARGE, "SIZE_INVALID").await?,
        Err(e) => ensure!(e.is_request(), "unexpected error {e}"),
    }
    // The server may answer 413 and close before the client has sent the
    // whole body; the client then sees a broken pipe instead of the answer.
    match s.req(Method::PATCH, &loc).body(big.clone()).send().await {
        Ok(r) => expect_error(r, StatusCode::PAYLOAD_TOO_LARGE, "SIZE_INVALID").await?,
        Err(e) => ensure!(e.is_request(), "unexpected error {e}"),
    }
    s.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_gets() -> Result<()> {
    let s = Server::start(|_| {}).await?;
    let blob = data(1_000_000, 7);
    let len = blob.len();
    let d = s.push_blob("demo/app", &blob).await?;
    let path = format!("/v2/demo/app/blobs/{d}");
    for (range, first, last) in [
        ("bytes=0-99", 0, 99),
        ("bytes=1000-", 1000, len - 1),
        ("bytes=-10", len - 10, len - 1),
        ("bytes=262000-530000", 262_000, 530_000),
        ("bytes=999990-2000000", 999_990, len - 1),
    ] {
        let r = s
            .req(Method::GET, &path)
            .header("range", range)
            .send()
            .await?;
        ensure!(
            r.status() == StatusCode::PARTIAL_CONTENT,
            "{range}: {}",
            r.status()
        );
        ensure!(header(&r, "content-range") == format!("bytes {first}-{last}/{len}"));
        ensure!(header(&r, "content-length") == (last - first + 1).to_string());
        let body = r.bytes().await?;
        ensure!(body.as_ref() == &blob[first..=last], "{range}: wrong bytes");
    }
    let r = s
        .req(Method::GET, &path)
        .header("range", format!("bytes={len}-"))
        .send()
        .await?;
    ensure!(r.status() == StatusCode::RANGE_NOT_SATISFIABLE);
    ensure!(header(&r, "content-range") == format!("bytes */{len}"));
    // HEAD with a range.
    let r = s
        .req(Method::HEAD, &path)
        .header("range", "bytes=10-19")
        .send()
        .await?;
    ensure!(r.status() == StatusCode::PARTIAL_CONTENT);
    ensure!(header(&r, "content-length") == "10");
    s.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests() -> Result<()> {
    let s = Server::start(|cfg| cfg.max_manifest_bytes = 4096).await?;
    let (m, md) = s.push_image("demo/app", "v1", b"layer one").await?;
    for (method, path) in [
        (Method::GET, "/v2/demo/app/manifests/v1".to_owned()),
        (Method::GET, format!("/v2/demo/app/manifests/{md}")),
        (Method::HEAD, "/v2/demo/app/manifests/v1".to_owned()),
    ] {
        let r = s
            .req(method.clone(), &path)
            .header("accept", "application/vnd.oci.image.manifest.v1+json")
            .send()
            .await?;
        ensure!(r.status() == StatusCode::OK, "{path}");
        ensure!(header(&r, "content-type") == OCI_MANIFEST);
        ensure!(header(&r, "docker-content-digest") == md);
        ensure!(header(&r, "content-length") == m.len().to_string());
        if method == Method::GET {
            ensure!(r.bytes().await?.as_ref() == m.as_slice());
        }
    }
    let r = s
        .req(Method::GET, "/v2/demo/app/manifests/nope")
        .send()
        .await?;
    expect_error(r, StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN").await?;

    // A layer the repository does not have.
    let cd = s.push_blob("demo/app", b"{}").await?;
    let missing = sha256(b"not pushed");
    let bad = json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": CONFIG, "digest": cd, "size": 2},
        "layers": [{"mediaType": LAYER, "digest": missing, "size": 10}],
    })
    .to_string();
    let r = s
        .put_manifest("demo/app", "bad", OCI_MANIFEST, bad.as_bytes())
        .await?;
    expect_error(r, StatusCode::BAD_REQUEST, "MANIFEST_BLOB_UNKNOWN").await?;
    // A blob of another repository does not count.
    let other = s.push_blob("other/repo", b"elsewhere").await?;
    let bad = bad.replace(&missing, &other);
    let r = s
        .put_manifest("demo/app", "bad", OCI_MANIFEST, bad.as_bytes())
        .await?;
    expect_error(r, StatusCode::BAD_REQUEST, "MANIFEST_BLOB_UNKNOWN").await?;
    // Too large.
    let huge = format!("{{\"schemaVersion\":2,\"pad\":\"{}\"}}", "x".repeat(5000));
    let r = s
        .put_manifest("demo/app", "big", OCI_MANIFEST, huge.as_bytes())
        .await?;
    ensure!(
        r.status() == StatusCode::PAYLOAD_TOO_LARGE,
        "{}",
        r.status()
    );
    // Garbage.
    for g in [
        "{not json",
        "[1,2]",
        "{\"schemaVersion\":1,\"name\":\"x\"}",
        "",
    ] {
        let r = s
            .put_manifest("demo/app", "junk", OCI_MANIFEST, g.as_bytes())
            .await?;
        expect_error(r, StatusCode::BAD_REQUEST, "MANIFEST_INVALID").await?;
    }
    let r = s
        .put_manifest(
            "demo/app",
            "junk",
            "text/plain",
            b"{\"mediaType\":\"text/plain\"}",
        )
        .await?;
    expect_error(r, StatusCode::BAD_REQUEST, "MANIFEST_INVALID").await?;
    // Content-Type and mediaType disagree.
    let r = s.put_manifest("demo/app", "x", DOCKER_MANIFEST, &m).await?;
    expect_error(r, StatusCode::BAD_REQUEST, "MANIFEST_INVALID").await?;
    // PUT by a digest that does not match.
    let r = s
        .put_manifest("demo/app", &sha256(b"other"), OCI_MANIFEST, &m)
        .await?;
    expect_error(r, StatusCode::BAD_REQUEST, "DIGEST_INVALID").await?;
    // Bad tag.
    let r = s.put_manifest("demo/app", "-bad", OCI_MANIFEST, &m).await?;
    expect_error(r, StatusCode::BAD_REQUEST, "TAG_INVALID").await?;

    // Docker schema 2 (no mediaType header games): served with its type.
    let dm = String::from_utf8(m.clone())?.replace(OCI_MANIFEST, DOCKER_MANIFEST);
    let r = s
        .put_manifest("demo/app", "docker", DOCKER_MANIFEST, dm.as_bytes())
        .await?;
    ensure!(r.status() == StatusCode::CREATED);
    let r = s
        .req(Method::GET, "/v2/demo/app/manifests/docker")
        .send()
        .await?;
    ensure!(header(&r, "content-type") == DOCKER_MANIFEST);

    // An index: children must be manifests of the repository.
    let idx = |child: &str| {
        json!({
            "schemaVersion": 2, "mediaType": OCI_INDEX,
            "manifests": [{"mediaType": OCI_MANIFEST, "digest": child, "size": 10,
                           "platform": {"architecture": "amd64", "os": "linux"}}],
        })
        .to_string()
    };
    let r = s
        .put_manifest("demo/app", "multi", OCI_INDEX, idx(&missing).as_bytes())
        .await?;
    expect_error(r, StatusCode::BAD_REQUEST, "MANIFEST_BLOB_UNKNOWN").await?;
    let r = s
        .put_manifest("demo/app", "multi", OCI_INDEX, idx(&md).as_bytes())
        .await?;
    ensure!(r.status() == StatusCode::CREATED);
    let r = s
        .req(Method::GET, "/v2/demo/app/manifests/multi")
        .send()
        .await?;
    ensure!(header(&r, "content-type") == OCI_INDEX);
    // A manifest without mediaType is served with its Content-Type.
    let plain =
        String::from_utf8(m.clone())?.replace(&format!("\"mediaType\":\"{OCI_MANIFEST}\","), "");
    ensure!(!plain.contains(OCI_MANIFEST));
    let r = s
        .put_manifest("demo/app", "plain", OCI_MANIFEST, plain.as_bytes())
        .await?;
    ensure!(r.status() == StatusCode::CREATED);
    let r = s
        .req(Method::GET, "/v2/demo/app/manifests/plain")
        .send()
        .await?;
    ensure!(header(&r, "content-type") == OCI_MANIFEST);
    s.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_names_never_reach_the_filesystem() -> Result<()> {
    let s = Server::start(|_| {}).await?;
    let before = list_dir(s._dir.path());
    for path in [
        "/v2/../x/manifests/a",
        "/v2/a/../../b/manifests/a",
        "/v2/%2e%2e/x/manifests/a",
        "/v2/a%2F..%2F..%2Fb/manifests/a",
        "/v2/A/manifests/a",
        "/v2/a//b/manifests/a",
        "/v2/a/b_/blobs/uploads/",
    ] {
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let answer = raw(s.addr, req.as_bytes(), false).await?;
        ensure!(
            answer.starts_with("HTTP/1.1 400") || answer.starts_with("HTTP/1.1 404"),
            "{path}: {answer}"
        );
        if answer.starts_with("HTTP/1.1 400") {
            ensure!(answer.contains("NAME_INVALID"), "{path}: {answer}");
        }
        let req = format!(
            "POST {}/blobs/uploads/ HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            path.trim_end_matches("/manifests/a")
        );
        let answer = raw(s.addr, req.as_bytes(), false).await?;
        ensure!(
            !answer.starts_with("HTTP/1.1 2"),
            "{path}: upload accepted: {answer}"
        );
    }
    // Upload ids that are not ours.
    for id in [
        "..%2F..%2Fetc%2Fpasswd",
        "0123",
        "zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz",
    ] {
        let r = s
            .req(Method::PATCH, &format!("/v2/demo/app/blobs/uploads/{id}"))
            .body("x")
            .send()
            .await?;
        expect_error(r, StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN").await?;
    }
    // Long paths and names.
    let long = "a".repeat(300);
    let r = s
        .req(Method::GET, &format!("/v2/{long}/tags/list"))
        .send()
        .await?;
    expect_error(r, StatusCode::BAD_REQUEST, "NAME_INVALID").await?;
    let r = s
        .req(Method::GET, &format!("/v2/{}/tags/list", "a/".repeat(2000)))
        .send()
        .await?;
    ensure!(r.status().is_client_error());
    // A strange method.
    let r = s
        .req(Method::OPTIONS, "/v2/demo/app/tags/list")
        .send()
        .await?;
    expect_error(r, StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED").await?;
    let r = s
        .req(Method::GET, "/v2/demo/app/nothing/here")
        .send()
        .await?;
    ensure!(r.status() == StatusCode::NOT_FOUND);
    ensure!(list_dir(s._dir.path()) == before, "files appeared");
    s.stop().await
}

fn list_dir(p: &std::path::Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(p)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_and_catalog_paging() -> Result<()> {
    let s = Server::start(|_| {}).await?;
    let (m, _) = s.push_image("demo/tags", "v1", b"l").await?;
    let mut want = vec!["v1".to_owned()];
    for t in ["b", "a", "v10", "v2", "Z", "_x", "latest"] {
        let r = s.put_manifest("demo/tags", t, OCI_MANIFEST, &m).await?;
        ensure!(r.status() == StatusCode::CREATED);
        want.push(t.to_owned());
    }
    want.sort();
    let r = s.req(Method::GET, "/v2/demo/tags/tags/list").send().await?;
    ensure!(header(&r, "link").is_empty());
    let v: Value = r.json().await?;
    ensure!(v["name"] == "demo/tags");
    ensure!(v["tags"] == json!(want), "{v}");
    // Page by 3 following Link.
    let mut got = Vec::new();
    let mut next = Some("/v2/demo/tags/tags/list?n=3".to_owned());
    let mut pages = 0;
    while let Some(p) = next.take() {
        pages += 1;
        ensure!(pages < 10, "too many pages");
        let r = s.req(Method::GET, &p).send().await?;
        ensure!(r.status() == StatusCode::OK);
        let link = header(&r, "link");
        let v: Value = r.json().await?;
        let page: Vec<String> = serde_json::from_value(v["tags"].clone())?;
        ensure!(page.len() <= 3);
        if !link.is_empty() {
            let l = link
                .strip_prefix('<')
                .and_then(|l| l.split_once(">; rel=\"next\""))
                .map(|(u, _)| u.to_owned())
                .context("bad Link")?;
            ensure!(
                l == format!("/v2/demo/tags/tags/list?n=3&last={}", page[2]),
                "{l}"
            );
            next = Some(l);
        }
        got.extend(page);
    }
    ensure!(got == want, "{got:?}");
    ensure!(pages == 3);
    // last alone, n=0, bad n.
    let v: Value = s
        .req(Method::GET, "/v2/demo/tags/tags/list?last=b")
        .send()
        .await?
        .json()
        .await?;
    let after: Vec<&String> = want.iter().filter(|t| t.as_str() > "b").collect();
    ensure!(v["tags"] == json!(after));
    let v: Value = s
        .req(Method::GET, "/v2/demo/tags/tags/list?n=0")
        .send()
        .await?
        .json()
        .await?;
    ensure!(v["tags"] == json!([]));
    let r = s
        .req(Method::GET, "/v2/demo/tags/tags/list?n=abc")
        .send()
        .await?;
    expect_error(r, StatusCode::BAD_REQUEST, "PAGINATION_NUMBER_INVALID").await?;
    let r = s.req(Method::GET, "/v2/no/such/tags/list").send().await?;
    expect_error(r, StatusCode::NOT_FOUND, "NAME_UNKNOWN").await?;

    // Catalog.
    for r in ["r/e", "r/a", "r/d", "r/c", "r/b"] {
        s.push_blob(r, r.as_bytes()).await?;
    }
    let all = ["demo/tags", "r/a", "r/b", "r/c", "r/d", "r/e"];
    let v: Value = s
        .req(Method::GET, "/v2/_catalog")
        .send()
        .await?
        .json()
        .await?;
    ensure!(v["repositories"] == json!(all), "{v}");
    let r = s
        .req(Method::GET, "/v2/_catalog?n=2&last=r/a")
        .send()
        .await?;
    ensure!(header(&r, "link") == "</v2/_catalog?n=2&last=r/c>; rel=\"next\"");
    let v: Value = r.json().await?;
    ensure!(v["repositories"] == json!(["r/b", "r/c"]));
    let r = s
        .req(Method::GET, "/v2/_catalog?n=2&last=r/c")
        .send()
        .await?;
    ensure!(header(&r, "link").is_empty());
    let v: Value = r.json().await?;
    ensure!(v["repositories"] == json!(["r/d", "r/e"]));
    s.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn referrers() -> Result<()> {
    let s = Server::start(|_| {}).await?;
    let (_, subject) = s.push_image("demo/app", "v1", b"layer").await?;
    let empty = s.push_blob("demo/app", b"{}").await?;
    let sig = s.push_blob("demo/app", b"signature").await?;
    let mut digests = Vec::new();
    for (at, ann) in [
        ("application/vnd.example.sig", "s"),
        ("application/vnd.example.sbom", "b"),
    ] {
        let m = json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": at,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2},
            "layers": [{"mediaType": "application/octet-stream", "digest": sig, "size": 9}],
            "subject": {"mediaType": OCI_MANIFEST, "digest": subject, "size": 1},
            "annotations": {"kind": ann},
        })
        .to_string();
        let d = sha256(m.as_bytes());
        let r = s
            .put_manifest("demo/app", &d, OCI_MANIFEST, m.as_bytes())
            .await?;
        ensure!(r.status() == StatusCode::CREATED);
        ensure!(header(&r, "oci-subject") == subject);
        digests.push((d, m.len()));
    }
    // An image manifest whose artifactType comes from its config.
    let cfg = s.push_blob("demo/app", b"{\"x\":1}").await?;
    let m = json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.example.config", "digest": cfg, "size": 7},
        "layers": [],
        "subject": {"mediaType": OCI_MANIFEST, "digest": subject, "size": 1},
    })
    .to_string();
    let r = s
        .put_manifest("demo/app", "cfgref", OCI_MANIFEST, m.as_bytes())
        .await?;
    ensure!(r.status() == StatusCode::CREATED);

    let r = s
        .req(Method::GET, &format!("/v2/demo/app/referrers/{subject}"))
        .send()
        .await?;
    ensure!(r.status() == StatusCode::OK);
    ensure!(header(&r, "content-type") == OCI_INDEX);
    ensure!(header(&r, "oci-filters-applied").is_empty());
    let v: Value = r.json().await?;
    ensure!(v["mediaType"] == OCI_INDEX && v["schemaVersion"] == 2);
    let list = v["manifests"].as_array().context("manifests")?;
    ensure!(list.len() == 3, "{v}");
    let types: Vec<&str> = list
        .iter()
        .filter_map(|d| d["artifactType"].as_str())
        .collect();
    for t in [
        "application/vnd.example.sig",
        "application/vnd.example.sbom",
        "application/vnd.example.config",
    ] {
        ensure!(types.contains(&t), "{t} missing: {v}");
    }
    let r = s
        .req(
            Method::GET,
            &format!("/v2/demo/app/referrers/{subject}?artifactType=application/vnd.example.sig"),
        )
        .send()
        .await?;
    ensure!(header(&r, "oci-filters-applied") == "artifactType");
    let v: Value = r.json().await?;
    let list = v["manifests"].as_array().context("manifests")?;
    ensure!(list.len() == 1, "{v}");
    ensure!(list[0]["digest"] == digests[0].0.as_str());
    ensure!(list[0]["size"] == digests[0].1);
    ensure!(list[0]["mediaType"] == OCI_MANIFEST);
    ensure!(list[0]["annotations"]["kind"] == "s");
    // Deleting a referrer removes it from the list.
    let r = s
        .req(
            Method::DELETE,
            &format!("/v2/demo/app/manifests/{}", digests[0].0),
        )
        .send()
        .await?;
    ensure!(r.status() == StatusCode::ACCEPTED);
    let v: Value = s
        .req(Method::GET, &format!("/v2/demo/app/referrers/{subject}"))
        .send()
        .await?
        .json()
        .await?;
    ensure!(v["manifests"].as_array().map(Vec::len) == Some(2));
    // Unknown subject: an empty index; a bad digest: DIGEST_INVALID.
    let v: Value = s
        .req(
            Method::GET,
            &format!("/v2/demo/app/referrers/{}", sha256(b"none")),
        )
        .send()
        .await?
        .json()
        .await?;
    ensure!(v["manifests"] == json!([]));
    let r = s
        .req(Method::GET, "/v2/demo/app/referrers/sha256:zz")
        .send()
        .await?;
    expect_error(r, StatusCode::BAD_REQUEST, "DIGEST_INVALID").await?;
    s.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletes() -> Result<()> {
    let s = Server::start(|_| {}).await?;
    let (m, md) = s.push_image("demo/app", "v1", b"layer").await?;
    let r = s.put_manifest("demo/app", "v2", OCI_MANIFEST, &m).await?;
    ensure!(r.status() == StatusCode::CREATED);
    // Blob.
    let b = s.push_blob("demo/app", b"loose").await?;
    let r = s
        .req(Method::DELETE, &format!("/v2/demo/app/blobs/{b}"))
        .send()
        .await?;
    ensure!(r.status() == StatusCode::ACCEPTED);
    let r = s
        .req(Method::HEAD, &format!("/v2/demo/app/blobs/{b}"))
        .send()
        .await?;
    ensure!(r.status() == StatusCode::NOT_FOUND);
    let r = s
        .req(Method::DELETE, &format!("/v2/demo/app/blobs/{b}"))
        .send()
        .await?;
    expect_error(r, StatusCode::NOT_FOUND, "BLOB_UNKNOWN").await?;
    // Tag.
    let r = s
        .req(Method::DELETE, "/v2/demo/app/manifests/v2")
        .send()
        .await?;
    ensure!(r.status() == StatusCode::ACCEPTED);
    let r = s
        .req(Method::GET, "/v2/demo/app/manifests/v2")
        .send()
        .await?;
    expect_error(r, StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN").await?;
    let r = s
        .req(Method::GET, &format!("/v2/demo/app/manifests/{md}"))
        .send()
        .await?;
    ensure!(r.status() == StatusCode::OK);
    let r = s
        .req(Method::DELETE, "/v2/demo/app/manifests/v2")
        .send()
        .await?;
    expect_error(r, StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN").await?;
    // Digest: the manifest and the tags pointing at it go.
    let r = s
        .req(Method::DELETE, &format!("/v2/demo/app/manifests/{md}"))
        .send()
        .await?;
    ensure!(r.status() == StatusCode::ACCEPTED);
    for p in [
        format!("/v2/demo/app/manifests/{md}"),
        "/v2/demo/app/manifests/v1".into(),
    ] {
        let r = s.req(Method::GET, &p).send().await?;
        expect_error(r, StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN").await?;
    }
    let v: Value = s
        .req(Method::GET, "/v2/demo/app/tags/list")
        .send()
        .await?
        .json()
        .await?;
    ensure!(v["tags"] == json!([]), "{v}");
    s.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_repo_mount() -> Result<()> {
    let s = Server::start(|_| {}).await?;
    let blob = data(200_000, 8);
    let d = s.push_blob("src/app", &blob).await?;
    let r = s
        .req(
            Method::POST,
            &format!("/v2/dst/app/blobs/uploads/?mount={d}&from=src/app"),
        )
        .send()
        .await?;
    ensure!(r.status() == StatusCode::CREATED, "{}", r.status());
    ensure!(header(&r, "location") == format!("/v2/dst/app/blobs/{d}"));
    ensure!(header(&r, "docker-content-digest") == d);
    let got = s
        .req(Method::GET, &format!("/v2/dst/app/blobs/{d}"))
        .send()
        .await?;
    ensure!(got.bytes().await?.as_ref() == blob.as_slice());
    // Not in `from`: a session instead.
    let r = s
        .req(
            Method::POST,
            &format!("/v2/dst/app/blobs/uploads/?mount={d}&from=no/where"),
        )
        .send()
        .await?;
    ensure!(r.status() == StatusCode::ACCEPTED);
    ensure!(header(&r, "location").starts_with("/v2/dst/app/blobs/uploads/"));
    // A repository that never got the blob cannot read it.
    let r = s
        .req(Method::HEAD, &format!("/v2/third/app/blobs/{d}"))
        .send()
        .await?;
    ensure!(r.status() == StatusCode::NOT_FOUND);
    s.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_ns_parameter_is_ignored() -> Result<()> {
    let s = Server::start(|_| {}).await?;
    let (m, md) = s
        .push_image("library/busybox", "latest", b"busybox layer")
        .await?;
    let r = s
        .req(
            Method::GET,
            "/v2/library/busybox/manifests/latest?ns=docker.io",
        )
        .send()
        .await?;
    ensure!(r.status() == StatusCode::OK);
    ensure!(header(&r, "docker-content-digest") == md);
    ensure!(r.bytes().await?.as_ref() == m.as_slice());
    let ld = sha256(b"busybox layer");
    let r = s
        .req(
            Method::GET,
            &format!("/v2/library/busybox/blobs/{ld}?ns=docker.io"),
        )
        .send()
        .await?;
    ensure!(r.bytes().await?.as_ref() == b"busybox layer");
    let r = s.req(Method::GET, "/v2/?ns=docker.io").send().await?;
    ensure!(r.status() == StatusCode::OK);
    let r = s
        .req(Method::GET, "/v2/library/busybox/tags/list?ns=docker.io")
        .send()
        .await?;
    let v: Value = r.json().await?;
    ensure!(v["tags"] == json!(["latest"]));
    s.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth() -> Result<()> {
    let s = Server::start(|cfg| cfg.push_token = Some("s3cret".into())).await?;
    // The version check challenges a client without credentials (so
    // Docker-style clients send theirs), but pulls stay anonymous.
    let r = s.req(Method::GET, "/v2/").send().await?;
    ensure!(r.status() == StatusCode::UNAUTHORIZED);
    ensure!(header(&r, "www-authenticate").starts_with("Basic realm="));
    let r = s
        .req(Method::GET, "/v2/")
        .header("authorization", "Bearer s3cret")
        .send()
        .await?;
    ensure!(r.status() == StatusCode::OK);
    let r = s.req(Method::GET, "/v2/demo/app/tags/list").send().await?;
    ensure!(r.status() != StatusCode::UNAUTHORIZED, "pull is open");
    for tok in [
        None,
        Some("Bearer wrong"),
        Some("Basic czNjcmV0"),
        Some("Bearer s3cret2"),
    ] {
        let mut rb = s.req(Method::POST, "/v2/demo/app/blobs/uploads/");
        if let Some(t) = tok {
            rb = rb.header("authorization", t);
        }
        let r = rb.send().await?;
        ensure!(header(&r, "www-authenticate").starts_with("Basic realm="));
        expect_error(r, StatusCode::UNAUTHORIZED, "UNAUTHORIZED").await?;
    }
    let r = s
        .req(Method::POST, "/v2/demo/app/blobs/uploads/")
        .header("authorization", "Bearer s3cret")
        .send()
        .await?;
    ensure!(r.status() == StatusCode::ACCEPTED);
    // Basic auth with the token as the password, as skopeo --dest-creds sends.
    let r = s
        .req(Method::POST, "/v2/demo/app/blobs/uploads/")
        .header("authorization", "Basic Y2Fpcm46czNjcmV0")
        .send()
        .await?;
    ensure!(r.status() == StatusCode::ACCEPTED);
    let r = s
        .req(Method::PUT, "/v2/demo/app/manifests/v1")
        .body("{}")
        .send()
        .await?;
    ensure!(r.status() == StatusCode::UNAUTHORIZED);
    let r = s
        .req(Method::DELETE, "/v2/demo/app/manifests/v1")
        .send()
        .await?;
    ensure!(r.status() == StatusCode::UNAUTHORIZED);
    s.stop().await?;

    let s = Server::start(|cfg| {
        cfg.push_token = Some("s3cret".into());
        cfg.pull_token_required = true;
    })
    .await?;
    let r = s.req(Method::GET, "/v2/").send().await?;
    ensure!(r.status() == StatusCode::UNAUTHORIZED);
    ensure!(header(&r, "www-authenticate").starts_with("Basic realm="));
    let r = s.req(Method::GET, "/v2/x/tags/list").send().await?;
    ensure!(r.status() == StatusCode::UNAUTHORIZED);
    let r = s
        .req(Method::GET, "/v2/")
        .header("authorization", "Bearer s3cret")
        .send()
        .await?;
    ensure!(r.status() == StatusCode::OK);
    s.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_layer_in_two_repos_is_stored_once() -> Result<()> {
    let s = Server::start(|_| {}).await?;
    let layer = data(2 << 20, 9);
    s.push_image("one/app", "v1", &layer).await?;
    let physical = s.store.summary().physical_bytes;
    ensure!(physical >= layer.len() as u64);
    s.push_image("two/app", "v1", &layer).await?;
    let after = s.store.summary().physical_bytes;
    // Only the second config (a few dozen bytes, inline) may be new.
    ensure!(after - physical < 4096, "{physical} -> {after}");
    let d = sha256(&layer);
    for repo in ["one/app", "two/app"] {
        let got = s
            .req(Method::GET, &format!("/v2/{repo}/blobs/{d}"))
            .send()
            .await?;
        ensure!(got.bytes().await?.as_ref() == layer.as_slice());
    }
    s.stop().await
}

/// A fake parent: it holds one manifest and its blobs, and puts a blob into
/// the local store when asked.
struct FakeUpstream {
    store: Arc<Store>,
    manifest: Vec<u8>,
    blobs: Vec<Vec<u8>>,
    lie: bool,
    calls: AtomicUsize,
}

impl Upstream for FakeUpstream {
    fn resolve_manifest<'a>(
        &'a self,
        repo: &'a str,
        reference: &'a str,
    ) -> BoxFuture<'a, Result<Option<UpstreamManifest>, UpstreamError>> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let d = sha256(&self.manifest);
            if repo != "mirror/app" || (reference != "v1" && reference != d) {
                return Ok(None);
            }
            let mut bytes = self.manifest.clone();
            if self.lie {
                bytes.push(b' ');
            }
            Ok(Some(UpstreamManifest {
                bytes: Bytes::from(bytes),
                media_type: OCI_MANIFEST.into(),
                digest: d,
            }))
        })
    }

    fn fetch_blob<'a>(
        &'a self,
        _repo: &'a str,
        digest: &'a str,
    ) -> BoxFuture<'a, Result<Option<ObjectId>, UpstreamError>> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let Some(b) = self.blobs.iter().find(|b| sha256(b) == digest) else {
                return Ok(None);
            };
            let mut b = b.clone();
            if self.lie {
                b.push(0);
            }
            let put = self.store.put_bytes(
                &b,
                &PutOptions {
                    name: Some(format!("upstream/{}", &digest[7..])),
                    ..PutOptions::default()
                },
            )?;
            Ok(Some(put.object))
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_through_upstream() -> Result<()> {
    for lie in [false, true] {
        // The upstream writes into the registry's own store.
        let dir = tempfile::tempdir()?;
        let store = Arc::new(Store::open(dir.path(), StoreConfig::default())?);
        let config = b"{\"os\":\"linux\"}".to_vec();
        let layer = data(300_000, 10);
        let manifest = json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": CONFIG, "digest": sha256(&config), "size": config.len()},
            "layers": [{"mediaType": LAYER, "digest": sha256(&layer), "size": layer.len()}],
        })
        .to_string()
        .into_bytes();
        let up = Arc::new(FakeUpstream {
            store: store.clone(),
            manifest: manifest.clone(),
            blobs: vec![config, layer.clone()],
            lie,
            calls: AtomicUsize::new(0),
        });
        let s = Server::start_shared(store, up.clone()).await?;
        let r = s
            .req(Method::GET, "/v2/mirror/app/manifests/v1")
            .send()
            .await?;
        if lie {
            ensure!(r.status() == StatusCode::BAD_GATEWAY, "{}", r.status());
            let r = s
                .req(
                    Method::GET,
                    &format!("/v2/mirror/app/blobs/{}", sha256(&layer)),
                )
                .send()
                .await?;
            ensure!(r.status() == StatusCode::BAD_GATEWAY, "{}", r.status());
            ensure!(s.metric("cairn_registry_digest_mismatches_total") == 2.0);
            s.stop().await?;
            continue;
        }
        ensure!(r.status() == StatusCode::OK, "{}", r.status());
        ensure!(header(&r, "content-type") == OCI_MANIFEST);
        ensure!(r.bytes().await?.as_ref() == manifest.as_slice());
        let calls = up.calls.load(Ordering::SeqCst);
        // Cached now: no further upstream call.
        let r = s
            .req(Method::GET, "/v2/mirror/app/manifests/v1")
            .send()
            .await?;
        ensure!(r.status() == StatusCode::OK);
        ensure!(up.calls.load(Ordering::SeqCst) == calls);
        let r = s
            .req(
                Method::GET,
                &format!("/v2/mirror/app/blobs/{}", sha256(&layer)),
            )
            .send()
            .await?;
        ensure!(r.bytes().await?.as_ref() == layer.as_slice());
        let r = s
            .req(Method::GET, "/v2/mirror/app/manifests/v2")
            .send()
            .await?;
        expect_error(r, StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN").await?;
        let r = s
            .req(
                Method::GET,
                &format!("/v2/mirror/app/blobs/{}", sha256(b"none")),
            )
            .send()
            .await?;
        expect_error(r, StatusCode::NOT_FOUND, "BLOB_UNKNOWN").await?;
        s.stop().await?;
    }
    Ok(())
}

impl Server {
    /// A server over an existing store, with an upstream.
    async fn launch(
        reg: Registry,
        store: Arc<Store>,
        prom: prometheus::Registry,
        cancel: CancellationToken,
        dir: tempfile::TempDir,
    ) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let stop = cancel.clone();
        let router = reg.router();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
        });
        Ok(Self {
            base: format!("http://{addr}"),
            addr,
            store,
            prom,
            cancel,
            task,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()?,
            _dir: dir,
        })
    }

    async fn start_shared(store: Arc<Store>, up: Arc<dyn Upstream>) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let prom = prometheus::Registry::new();
        let cancel = CancellationToken::new();
        let reg = Registry::new(
            store.clone(),
            RegistryConfig::new(dir.path().join("uploads")),
            &prom,
            cancel.clone(),
        )?
        .with_upstream(up);
        Self::launch(reg, store, prom, cancel, dir).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_uploads_are_swept() -> Result<()> {
    let s = Server::start(|cfg| cfg.upload_ttl = Duration::from_millis(500)).await?;
    let r = s
        .req(Method::POST, "/v2/demo/app/blobs/uploads/")
        .send()
        .await?;
    let loc = header(&r, "location");
    s.req(Method::PATCH, &loc).body("some bytes").send().await?;
    let uploads = s._dir.path().join("uploads");
    ensure!(list_dir(&uploads).len() == 1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = s.req(Method::GET, &loc).send().await?;
        if r.status() == StatusCode::NOT_FOUND {
            break;
        }
        ensure!(tokio::time::Instant::now() < deadline, "upload never swept");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    ensure!(list_dir(&uploads).is_empty());
    ensure!(s.metric("cairn_registry_uploads_in_progress") == 0.0);
    s.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_upload_state_is_cleaned_at_start() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let store = Arc::new(Store::open(
        dir.path().join("store"),
        StoreConfig::default(),
    )?);
    let uploads = dir.path().join("uploads");
    std::fs::create_dir_all(&uploads)?;
    let stale = "0123456789abcdef0123456789abcdef";
    std::fs::write(uploads.join(stale), b"half an upload")?;
    std::fs::write(uploads.join("keep.txt"), b"not ours")?;
    store.put_bytes(
        b"half an upload",
        &PutOptions {
            name: Some(format!("upload/{stale}")),
            pin: false,
            ..PutOptions::default()
        },
    )?;
    let cancel = CancellationToken::new();
    let _reg = Registry::new(
        store.clone(),
        RegistryConfig::new(&uploads),
        &prometheus::Registry::new(),
        cancel.clone(),
    )?;
    ensure!(list_dir(&uploads) == vec!["keep.txt".to_owned()]);
    ensure!(store.names()?.is_empty());
    // Registering the metrics twice in one Prometheus registry is an error,
    // not a panic.
    let prom = prometheus::Registry::new();
    Registry::new(
        store.clone(),
        RegistryConfig::new(&uploads),
        &prom,
        cancel.clone(),
    )?;
    ensure!(Registry::new(store, RegistryConfig::new(&uploads), &prom, cancel.clone()).is_err());
    cancel.cancel();
    Ok(())
}
