//! Pull-through from an upstream OCI registry over HTTP(S), for the top site
//! (config `registry.upstream = "http://…"`). On a miss the manifest is
//! fetched with every manifest media type accepted, and a blob is streamed
//! straight into the chunk store; the registry then checks the digest
//! before linking either.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use cairn_chunkstore::{ObjectId, PutOptions, Store};
use futures_util::TryStreamExt;
use tracing::{debug, info};

use crate::registry::{BoxFuture, Upstream, UpstreamError, UpstreamManifest};

/// Manifest media types asked for, in the `Accept` header.
const ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.v2+json, \
application/vnd.docker.distribution.manifest.list.v2+json";

/// Largest manifest taken from upstream.
const MAX_MANIFEST: usize = 4 << 20;

/// An upstream OCI registry.
#[derive(Debug, Clone)]
pub struct HttpUpstream {
    base: String,
    client: reqwest::Client,
    store: Arc<Store>,
}

/// The upstream setting is unusable.
#[derive(Debug, thiserror::Error)]
#[error("registry.upstream {url:?}: {why}")]
pub struct UpstreamConfigError {
    url: String,
    why: String,
}

impl HttpUpstream {
    /// An upstream at `url` (`http://host:port` or `https://…`; a path prefix
    /// is not supported).
    pub fn new(url: &str, store: Arc<Store>) -> Result<Self, UpstreamConfigError> {
        let bad = |why: &str| UpstreamConfigError {
            url: url.to_owned(),
            why: why.to_owned(),
        };
        let base = url.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(bad("must start with http:// or https://"));
        }
        if base.len() > 2048 {
            return Err(bad("too long"));
        }
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(60))
            .user_agent(concat!("cairn/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| bad(&e.to_string()))?;
        Ok(Self {
            base,
            client,
            store,
        })
    }
}

fn status_err(what: &str, r: &reqwest::Response) -> UpstreamError {
    format!("upstream {what}: HTTP {}", r.status()).into()
}

impl Upstream for HttpUpstream {
    fn resolve_manifest<'a>(
        &'a self,
        repo: &'a str,
        reference: &'a str,
    ) -> BoxFuture<'a, Result<Option<UpstreamManifest>, UpstreamError>> {
        Box::pin(async move {
            let url = format!("{}/v2/{repo}/manifests/{reference}", self.base);
            let r = self
                .client
                .get(&url)
                .header(reqwest::header::ACCEPT, ACCEPT)
                .send()
                .await?;
            if r.status() == reqwest::StatusCode::NOT_FOUND {
                return Ok(None);
            }
            if !r.status().is_success() {
                return Err(status_err("manifest", &r));
            }
            let header = |name: &str| {
                r.headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            let media_type = header("content-type").unwrap_or_default();
            let digest = header("docker-content-digest");
            if r.content_length().is_some_and(|n| n > MAX_MANIFEST as u64) {
                return Err("upstream manifest is over 4 MiB".into());
            }
            let mut body = BytesMut::new();
            let mut stream = r.bytes_stream();
            while let Some(piece) = stream.try_next().await? {
                if body.len() + piece.len() > MAX_MANIFEST {
                    return Err("upstream manifest is over 4 MiB".into());
                }
                body.extend_from_slice(&piece);
            }
            let bytes: Bytes = body.freeze();
            let digest = match digest {
                Some(d) => d,
                None => {
                    use sha2::Digest as _;
                    format!("sha256:{}", hex::encode(sha2::Sha256::digest(&bytes)))
                }
            };
            info!(%repo, %reference, %digest, "manifest pulled from upstream registry");
            Ok(Some(UpstreamManifest {
                bytes,
                media_type,
                digest,
            }))
        })
    }

    fn fetch_blob<'a>(
        &'a self,
        repo: &'a str,
        digest: &'a str,
    ) -> BoxFuture<'a, Result<Option<ObjectId>, UpstreamError>> {
        Box::pin(async move {
            let url = format!("{}/v2/{repo}/blobs/{digest}", self.base);
            let r = self.client.get(&url).send().await?;
            if r.status() == reqwest::StatusCode::NOT_FOUND {
                return Ok(None);
            }
            if !r.status().is_success() {
                return Err(status_err("blob", &r));
            }
            let reader =
                tokio_util::io::StreamReader::new(r.bytes_stream().map_err(std::io::Error::other));
            // Pinned (obj:<id>) so it stays until the registry links it;
            // the registry checks the digest the store computed.
            let opts = PutOptions {
                sha512: digest.starts_with("sha512:"),
                ..PutOptions::default()
            };
            let put = self.store.put_async(reader, opts).await?;
            debug!(%repo, %digest, bytes = put.len, new = put.new_bytes, "blob pulled from upstream registry");
            Ok(Some(put.object))
        })
    }
}
