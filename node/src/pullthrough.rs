//! Pull-through across sites: the registry's [`Upstream`] backed by the
//! transport. On a local miss an edge asks its parents (then its peers) for
//! the manifest or blob by name or digest, fetches the recipe and only the
//! chunks it lacks, checks the digest, and hands the object to the registry,
//! which links it. When a manifest is resolved this way, every blob it
//! references is fetched at background priority right away, before the
//! client asks for it.

use std::sync::Arc;

use bytes::Bytes;
use cairn_chunkstore::{ObjectId, Store};
use cairn_transport::wire::{ObjectKey, Priority};
use cairn_transport::{FetchError, Fetcher, PeerAddr};
use sha2::Digest as _;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::registry::{BoxFuture, StreamedBlob, Upstream, UpstreamError, UpstreamManifest};

/// Pull-through over the transport.
#[derive(Debug, Clone)]
pub struct PullThrough {
    fetcher: Fetcher,
    store: Arc<Store>,
    /// Parents first, then peers: where misses are asked.
    sources: Arc<Vec<PeerAddr>>,
    cancel: CancellationToken,
}

impl PullThrough {
    /// Ask `parents`, then `peers`.
    pub fn new(
        fetcher: Fetcher,
        parents: &[PeerAddr],
        peers: &[PeerAddr],
        cancel: CancellationToken,
    ) -> Self {
        let mut sources = parents.to_vec();
        sources.extend(peers.iter().cloned());
        Self {
            store: fetcher.store().clone(),
            fetcher,
            sources: Arc::new(sources),
            cancel,
        }
    }

    /// Fetch an object by key, returning `None` when no source has it.
    async fn fetch(
        &self,
        key: ObjectKey,
        priority: Priority,
    ) -> Result<Option<ObjectId>, UpstreamError> {
        match self
            .fetcher
            .fetch_object(&key, &self.sources, priority)
            .await
        {
            Ok((id, report)) => {
                debug!(
                    ?key,
                    fetched = report.fetched,
                    local = report.local,
                    "pulled through"
                );
                Ok(Some(id))
            }
            Err(FetchError::NotFound(_)) => Ok(None),
            Err(e) => Err(Box::new(e)),
        }
    }

    async fn read_small(&self, id: ObjectId, max: u64) -> Result<Bytes, UpstreamError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || -> Result<Bytes, UpstreamError> {
            let h = store.open_object(&id)?;
            if h.len() > max {
                return Err(format!("object {id} is {} bytes, limit {max}", h.len()).into());
            }
            let mut buf = vec![0u8; h.len() as usize];
            h.read_at(0, &mut buf)?;
            Ok(Bytes::from(buf))
        })
        .await?
    }

    /// Hash a fetched blob and record its digest, so the registry (and other
    /// sites asking us) find it by digest. Returns the hex sha256.
    async fn record_sha256(&self, id: ObjectId) -> Result<String, UpstreamError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || -> Result<String, UpstreamError> {
            let h = store.open_object(&id)?;
            let mut s = sha2::Sha256::new();
            for c in h.chunks() {
                s.update(&c?);
            }
            let hex = hex::encode(s.finalize());
            store.record_digests(&id, &hex, None)?;
            Ok(hex)
        })
        .await?
    }

    /// Start background fetches of every blob a manifest references.
    fn prefetch_blobs(&self, repo: &str, manifest: &[u8]) {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(manifest) else {
            return;
        };
        let mut digests = blob_digests(&v);
        digests.truncate(1024);
        for d in digests {
            let me = self.clone();
            let repo = repo.to_owned();
            tokio::spawn(async move {
                tokio::select! {
                    _ = me.cancel.cancelled() => {}
                    r = me.blob(&repo, &d, Priority::Background) => match r {
                        Ok(Some(id)) => {
                            // Verified by `blob`: link it, so the client's GET is local.
                            let store = me.store.clone();
                            let link = format!("blob/{repo}@{d}");
                            let _ = tokio::task::spawn_blocking(move || store.set_name(&link, &id)).await;
                            debug!(%repo, digest = %d, "blob staged ahead of the client");
                        }
                        Ok(None) => debug!(%repo, digest = %d, "no source has the blob"),
                        Err(e) => warn!(%repo, digest = %d, error = %e, "staging a blob failed"),
                    }
                }
            });
        }
    }

    async fn blob(
        &self,
        repo: &str,
        digest: &str,
        priority: Priority,
    ) -> Result<Option<ObjectId>, UpstreamError> {
        let Some(hex) = digest.strip_prefix("sha256:") else {
            return Err(format!("pull-through supports sha256 blobs only, not {digest}").into());
        };
        if let Ok(id) = self.store.resolve(digest) {
            if self
                .store
                .missing_chunks(&*self.store.recipe(&id)?)?
                .is_empty()
            {
                return Ok(Some(id));
            }
        }
        // The repository's link first (what the parent's registry holds),
        // then the digest anywhere at the source.
        let mut found = self
            .fetch(ObjectKey::Name(format!("blob/{repo}@{digest}")), priority)
            .await?;
        if found.is_none() {
            found = self
                .fetch(ObjectKey::Digest(digest.to_owned()), priority)
                .await?;
        }
        let Some(id) = found else { return Ok(None) };
        // A streaming GET of the same blob may have hashed and recorded it
        // while this fetch ran: do not read and hash it all again.
        if self.store.resolve(digest).ok() == Some(id) {
            return Ok(Some(id));
        }
        let got = self.record_sha256(id).await?;
        if got != hex {
            return Err(format!(
                "source sent object {id} for {digest}, which hashes to sha256:{got}"
            )
            .into());
        }
        Ok(Some(id))
    }
}

impl PullThrough {
    /// Get the blob's recipe, then stream its chunks in order as they land
    /// (see [`Upstream::stream_blob`]).
    async fn open_stream(
        &self,
        repo: &str,
        digest: &str,
    ) -> Result<Option<StreamedBlob>, UpstreamError> {
        let Some(hex) = digest.strip_prefix("sha256:").map(str::to_owned) else {
            return Ok(None);
        };
        // Already here and verified (staged in the background, or linked in
        // another repository): link it and let the registry serve it locally.
        if let Ok(id) = self.store.resolve(digest) {
            let store = self.store.clone();
            let link = format!("blob/{repo}@{digest}");
            let linked = tokio::task::spawn_blocking(move || -> Result<bool, UpstreamError> {
                if !store.missing_chunks(&*store.recipe(&id)?)?.is_empty() {
                    return Ok(false);
                }
                store.set_name(&link, &id)?;
                Ok(true)
            })
            .await??;
            if linked {
                return Ok(None);
            }
        }
        let mut found = None;
        for key in [
            ObjectKey::Name(format!("blob/{repo}@{digest}")),
            ObjectKey::Digest(digest.to_owned()),
        ] {
            match self
                .fetcher
                .fetch_recipe(&key, &self.sources, Priority::Demand)
                .await
            {
                Ok(r) => {
                    found = Some(r);
                    break;
                }
                Err(FetchError::NotFound(_)) => continue,
                Err(e) => return Err(Box::new(e)),
            }
        }
        let Some((id, recipe)) = found else {
            return Ok(None);
        };
        let want: Vec<_> = recipe.chunks().iter().map(|c| (c.id, c.len)).collect();
        // Everything, in the background; the stream below asks for the chunk
        // it needs next at demand priority, which coalesces with this.
        let bg = {
            let f = self.fetcher.clone();
            let sources = self.sources.clone();
            let want = want.clone();
            let cancel = self.cancel.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    r = f.fetch_chunks(&want, &sources, Priority::Background) => {
                        if let Err(e) = r {
                            warn!(error = %e, "background blob fetch failed");
                        }
                    }
                }
            })
        };
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let me = self.clone();
        let link = format!("blob/{repo}@{digest}");
        tokio::spawn(async move {
            let mut sha = sha2::Sha256::new();
            for &(cid, len) in &want {
                let store = me.store.clone();
                let mut data = tokio::task::spawn_blocking(move || store.read_chunk(&cid)).await;
                if !matches!(data, Ok(Ok(_))) {
                    let one = [(cid, len)];
                    let got = tokio::select! {
                        _ = me.cancel.cancelled() => break,
                        r = me.fetcher.fetch_chunks(&one, &me.sources, Priority::Demand) => r,
                    };
                    if let Err(e) = got {
                        let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
                        return;
                    }
                    let store = me.store.clone();
                    data = tokio::task::spawn_blocking(move || store.read_chunk(&cid)).await;
                }
                let bytes = match data {
                    Ok(Ok(b)) => b,
                    Ok(Err(e)) => {
                        let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
                        return;
                    }
                };
                sha.update(&bytes);
                if tx.send(Ok(bytes)).await.is_err() {
                    // The client went away; the background fetch carries on.
                    return;
                }
            }
            let got = hex::encode(sha.finalize());
            if got != hex {
                warn!(%link, %got, "pulled-through blob does not match its digest; not linking it");
                return;
            }
            let store = me.store.clone();
            let res = tokio::task::spawn_blocking(move || {
                store.record_digests(&id, &got, None)?;
                store.set_name(&link, &id)
            })
            .await;
            if !matches!(res, Ok(Ok(()))) {
                warn!(?res, "cannot link a pulled-through blob");
            }
            let _ = bg.await;
        });
        Ok(Some(StreamedBlob {
            len: recipe.total_len(),
            body: rx,
        }))
    }
}

/// The blobs an image manifest lists: its config, then its layers.
pub(crate) fn blob_digests(manifest: &serde_json::Value) -> Vec<String> {
    let config = manifest["config"]["digest"].as_str();
    let layers = manifest["layers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["digest"].as_str());
    config
        .into_iter()
        .chain(layers)
        .map(str::to_owned)
        .collect()
}

/// Largest manifest pulled through (as the registry's own limit).
const MAX_MANIFEST: u64 = 4 << 20;

impl Upstream for PullThrough {
    fn resolve_manifest<'a>(
        &'a self,
        repo: &'a str,
        reference: &'a str,
    ) -> BoxFuture<'a, Result<Option<UpstreamManifest>, UpstreamError>> {
        Box::pin(async move {
            let name = if reference.contains(':') {
                format!("manifest/{repo}@{reference}")
            } else {
                format!("tag/{repo}:{reference}")
            };
            let Some(id) = self.fetch(ObjectKey::Name(name), Priority::Demand).await? else {
                return Ok(None);
            };
            let bytes = self.read_small(id, MAX_MANIFEST).await?;
            let hex = hex::encode(sha2::Sha256::digest(&bytes));
            let digest = format!("sha256:{hex}");
            // Hashed just now: record it, so the cached copy serves by
            // digest like a pushed one.
            let store = self.store.clone();
            tokio::task::spawn_blocking(move || store.record_digests(&id, &hex, None)).await??;
            // The media type the manifest was pushed with, when the source
            // has it; else the registry falls back to the JSON's mediaType.
            let media_type = match self
                .fetch(
                    ObjectKey::Name(format!("mtype/{repo}@{digest}")),
                    Priority::Demand,
                )
                .await
            {
                Ok(Some(m)) => self
                    .read_small(m, 256)
                    .await
                    .ok()
                    .and_then(|b| String::from_utf8(b.to_vec()).ok())
                    .unwrap_or_default(),
                _ => String::new(),
            };
            let media_type = if media_type.is_empty() {
                serde_json::from_slice::<serde_json::Value>(&bytes)
                    .ok()
                    .and_then(|v| v["mediaType"].as_str().map(str::to_owned))
                    .unwrap_or_default()
            } else {
                media_type
            };
            info!(%repo, %reference, %digest, "manifest pulled through; staging its blobs");
            self.prefetch_blobs(repo, &bytes);
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
        Box::pin(self.blob(repo, digest, Priority::Demand))
    }

    fn stream_blob<'a>(
        &'a self,
        repo: &'a str,
        digest: &'a str,
    ) -> BoxFuture<'a, Result<Option<StreamedBlob>, UpstreamError>> {
        Box::pin(self.open_stream(repo, digest))
    }
}
