//! The serving side: answers `cairn/1` requests from peers out of a
//! [`ChunkSource`] (normally the local chunk store).
//!
//! One task per connection, one task per stream. A frame that does not
//! decode resets that stream with its error code; the connection and the
//! node carry on (invariant 5). Every task stops on the cancellation token.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use cairn_chunkstore::{CompressProbe, Recipe, Store, StoreError, StoredChunk};
use quinn::VarInt;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::fetch::PeerAddr;
use crate::metrics::TransportMetrics;
use crate::tls::{self, Refusals};
use crate::wire::{self, ErrorCode, Hello, ObjectKey, Request, Response};
use crate::{ChunkId, ObjectId};

/// Something went wrong reading from a [`ChunkSource`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SourceError(pub String);

/// An object a source can describe.
#[derive(Debug, Clone)]
pub struct SourceObject {
    /// Its id.
    pub id: ObjectId,
    /// Its recipe.
    pub recipe: Arc<Recipe>,
    /// sha256 of its bytes, hex, or empty when not known.
    pub sha256: String,
}

/// Where a server gets what it serves. Implementations must return only
/// bytes that match their id (the chunk store verifies every read).
/// Methods block; the server calls them on blocking threads.
pub trait ChunkSource: Send + Sync + 'static {
    /// The chunk's bytes, or `None` when it is not here (or was found
    /// corrupt and moved aside).
    fn chunk(&self, id: &ChunkId) -> Result<Option<Bytes>, SourceError>;
    /// The chunk's bytes for a peer, which checks them itself (every
    /// receiver verifies BLAKE3 before it stores or uses a chunk), so a
    /// source may skip its own check here. Defaults to [`Self::chunk`].
    fn chunk_for_peer(&self, id: &ChunkId) -> Result<Option<Bytes>, SourceError> {
        self.chunk(id)
    }
    /// The chunk for a peer as the source holds it: a zstd frame may be
    /// passed on as it is when the peer accepts zstd (`accept_zstd`).
    /// Defaults to [`Self::chunk_for_peer`], uncompressed.
    fn chunk_for_peer_stored(
        &self,
        id: &ChunkId,
        accept_zstd: bool,
    ) -> Result<Option<StoredChunk>, SourceError> {
        let _ = accept_zstd;
        Ok(self.chunk_for_peer(id)?.map(|payload| StoredChunk {
            raw_len: payload.len() as u32,
            zstd: false,
            payload,
        }))
    }
    /// Whether the chunk is here.
    fn has(&self, id: &ChunkId) -> Result<bool, SourceError>;
    /// Look an object up by id, digest or name.
    fn object(&self, key: &ObjectKey) -> Result<Option<SourceObject>, SourceError>;
}

impl ChunkSource for Store {
    fn chunk(&self, id: &ChunkId) -> Result<Option<Bytes>, SourceError> {
        match self.read_chunk(id) {
            Ok(b) => Ok(Some(b)),
            // A corrupt chunk has been quarantined: for peers it is missing.
            Err(StoreError::ChunkMissing(_)) | Err(StoreError::Corrupt { .. }) => Ok(None),
            Err(e) => Err(SourceError(e.to_string())),
        }
    }

    /// Without the BLAKE3 check of [`Store::read_chunk`]: the peer verifies
    /// every chunk it receives, so hashing here too would only spend CPU
    /// (a third of Cairn's own per-byte work when serving). A chunk that rotted
    /// on our disk is rejected by the peer, which counts it against us and
    /// fetches it elsewhere; our local readers still verify every read.
    fn chunk_for_peer(&self, id: &ChunkId) -> Result<Option<Bytes>, SourceError> {
        match self.read_chunk_unverified(id) {
            Ok(b) => Ok(Some(b)),
            Err(StoreError::ChunkMissing(_)) | Err(StoreError::Corrupt { .. }) => Ok(None),
            Err(e) => Err(SourceError(e.to_string())),
        }
    }

    /// Chunks stored compressed go out as their stored frame.
    fn chunk_for_peer_stored(
        &self,
        id: &ChunkId,
        accept_zstd: bool,
    ) -> Result<Option<StoredChunk>, SourceError> {
        match self.read_chunk_stored(id, accept_zstd) {
            Ok(c) => Ok(Some(c)),
            Err(StoreError::ChunkMissing(_)) | Err(StoreError::Corrupt { .. }) => Ok(None),
            Err(e) => Err(SourceError(e.to_string())),
        }
    }

    fn has(&self, id: &ChunkId) -> Result<bool, SourceError> {
        self.has_chunk(id).map_err(|e| SourceError(e.to_string()))
    }

    fn object(&self, key: &ObjectKey) -> Result<Option<SourceObject>, SourceError> {
        let what = match key {
            ObjectKey::Id(id) => id.to_string(),
            ObjectKey::Digest(d) | ObjectKey::Name(d) => d.clone(),
        };
        let id = match self.resolve(&what) {
            Ok(id) => id,
            Err(StoreError::NoSuchObject(_)) => return Ok(None),
            Err(e) => return Err(SourceError(e.to_string())),
        };
        let recipe = match self.try_recipe(&id) {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(None),
            Err(e) => return Err(SourceError(e.to_string())),
        };
        let sha256 = self.object_info(&id).map(|i| i.sha256).unwrap_or_default();
        Ok(Some(SourceObject { id, recipe, sha256 }))
    }
}

/// An `Offer` as the server hands it to its [`OfferHandler`].
#[derive(Debug, Clone)]
pub struct Offer {
    /// The offering peer: its address as seen on this connection (where its
    /// node serves, since a node dials from its listening endpoint) and its
    /// verified node name.
    pub from: PeerAddr,
    /// Repository.
    pub repo: String,
    /// Tag, or empty.
    pub tag: String,
    /// Manifest digest.
    pub digest: String,
    /// The tag's version at the sender.
    pub version: u64,
}

/// A boxed future, for the [`OfferHandler`] trait.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// Takes replication offers (normally the node's registry): pull what is
/// offered from the offering peer, link it, and return the tag's state
/// afterwards as `(digest, version)`.
pub trait OfferHandler: std::fmt::Debug + Send + Sync + 'static {
    /// Handle one offer. Runs as long as the pull takes; the server stops
    /// waiting when it shuts down.
    fn offer(&self, offer: Offer) -> BoxFuture<'static, Result<(String, u64), SourceError>>;
}

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// What we say in `Hello`.
    pub hello: Hello,
    /// Offer zstd on the wire to clients that accept it (chunks are sent
    /// compressed only when that saves at least 10%).
    pub wire_zstd: bool,
    /// Who takes `Offer`s; `None` answers them `NotFound`.
    pub offers: Option<Arc<dyn OfferHandler>>,
    /// Who takes `MetaSync` streams; `None` answers them `NotFound`.
    pub meta: Option<Arc<dyn StreamHandler>>,
}

/// A stream whose request hands it to another protocol (`MetaSync`): the
/// handler owns both halves from here on.
#[derive(Debug)]
pub struct HandedStream {
    /// The peer, as for [`Offer::from`].
    pub from: PeerAddr,
    /// The connection's RTT estimate when the stream arrived (QUIC's own).
    pub rtt: std::time::Duration,
    /// Bytes that arrived after the request frame, not yet consumed.
    pub leftover: BytesMut,
    /// Our half.
    pub send: quinn::SendStream,
    /// Theirs.
    pub recv: quinn::RecvStream,
}

/// Takes streams that carry another protocol after their request (the
/// node's site-metadata sync). The server stops waiting when it shuts down.
pub trait StreamHandler: std::fmt::Debug + Send + Sync + 'static {
    /// Serve one stream to its end.
    fn serve(&self, stream: HandedStream) -> BoxFuture<'static, ()>;
}

/// A running server. Stops when its token is cancelled.
#[derive(Debug)]
pub struct Server {
    task: tokio::task::JoinHandle<()>,
    cancel: CancellationToken,
}

struct Ctx {
    source: Arc<dyn ChunkSource>,
    cfg: ServerConfig,
    metrics: TransportMetrics,
    refusals: Refusals,
    cancel: CancellationToken,
}

impl Server {
    /// Serve peers arriving at `endpoint` from `source` until `cancel`.
    pub fn spawn(
        endpoint: quinn::Endpoint,
        source: Arc<dyn ChunkSource>,
        cfg: ServerConfig,
        metrics: TransportMetrics,
        refusals: Refusals,
        cancel: CancellationToken,
    ) -> Self {
        let ctx = Arc::new(Ctx {
            source,
            cfg,
            metrics,
            refusals,
            cancel: cancel.clone(),
        });
        let task = tokio::spawn(accept_loop(endpoint, ctx));
        Self { task, cancel }
    }

    /// Stop accepting and wait for the accept loop to end. Streams in
    /// progress see the token and stop too.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        let _ = self.task.await;
    }
}

async fn accept_loop(endpoint: quinn::Endpoint, ctx: Arc<Ctx>) {
    loop {
        let incoming = tokio::select! {
            _ = ctx.cancel.cancelled() => break,
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => break, // endpoint closed
            },
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let conn = tokio::select! {
                _ = ctx.cancel.cancelled() => return,
                c = incoming => c,
            };
            match conn {
                Ok(conn) => {
                    ctx.metrics.connections.with_label_values(&["in"]).inc();
                    // Series are labelled by the verified node name: bounded
                    // by cluster membership, unlike client ports.
                    let name = tls::peer_name(&conn);
                    let peer = name.clone().unwrap_or_else(|| remote.to_string());
                    debug!(%remote, %peer, "peer connected");
                    let from = PeerAddr { addr: remote, name };
                    serve_connection(conn, remote, peer, from, ctx).await;
                }
                Err(e) => {
                    if let Some(reason) = tls::refusal_reason(&e) {
                        ctx.refusals.count(reason);
                        warn!(%remote, reason, error = %e, "handshake refused");
                    } else {
                        debug!(%remote, error = %e, "incoming connection failed");
                    }
                }
            }
        });
    }
    debug!("accept loop stopped");
}

async fn serve_connection(
    conn: quinn::Connection,
    remote: SocketAddr,
    peer: String,
    from: PeerAddr,
    ctx: Arc<Ctx>,
) {
    let probe = Arc::new(CompressProbe::new());
    loop {
        let (send, recv) = tokio::select! {
            _ = ctx.cancel.cancelled() => {
                conn.close(VarInt::from_u32(0), b"shutting down");
                return;
            }
            s = conn.accept_bi() => match s {
                Ok(s) => s,
                Err(e) => {
                    debug!(%remote, error = %e, "connection ended");
                    return;
                }
            },
        };
        let ctx = ctx.clone();
        let peer = peer.clone();
        let probe = probe.clone();
        let from = from.clone();
        let rtt = conn.rtt();
        tokio::spawn(async move {
            tokio::select! {
                _ = ctx.cancel.cancelled() => {}
                _ = serve_stream(send, recv, &peer, &from, rtt, &ctx, &probe) => {}
            }
        });
    }
}

/// Read one request frame. `Err` carries the wire error to reset with.
pub(crate) async fn read_request(
    recv: &mut quinn::RecvStream,
    buf: &mut BytesMut,
) -> Result<Option<Request>, wire::WireError> {
    loop {
        if let Some(r) = wire::decode_request(buf)? {
            return Ok(Some(r));
        }
        match recv.read_chunk(64 * 1024, true).await {
            Ok(Some(c)) => buf.extend_from_slice(&c.bytes),
            Ok(None) if buf.is_empty() => return Ok(None),
            Ok(None) => return Err(wire::WireError::Truncated(buf.len())),
            Err(_) => return Ok(None),
        }
    }
}

fn code(c: ErrorCode) -> VarInt {
    VarInt::from_u32(u32::from(c.as_u16()))
}

async fn serve_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    peer: &str,
    from: &PeerAddr,
    rtt: std::time::Duration,
    ctx: &Ctx,
    probe: &CompressProbe,
) {
    let mut buf = BytesMut::new();
    let req = match read_request(&mut recv, &mut buf).await {
        Ok(Some(r)) => r,
        Ok(None) => return,
        Err(e) => {
            ctx.metrics.bad_frames.inc();
            warn!(peer, error = %e, "bad request frame; closing the stream");
            let c = code(e.code());
            let _ = recv.stop(c);
            // Say why before resetting: the peer may be a confused client.
            let mut out = BytesMut::new();
            wire::encode_response(
                &Response::Error {
                    code: e.code(),
                    message: e.to_string(),
                },
                &mut out,
            );
            let _ = send.write_all(&out).await;
            let _ = send.finish();
            return;
        }
    };
    let res = match req {
        Request::Hello(h) => {
            ctx.metrics
                .requests_served
                .with_label_values(&["hello"])
                .inc();
            debug!(peer, node = %h.node, site = %h.site, version = h.version, "hello");
            send_frames(&mut send, &[Response::Hello(ctx.cfg.hello.clone())]).await
        }
        Request::Ping { nonce } => {
            ctx.metrics
                .requests_served
                .with_label_values(&["ping"])
                .inc();
            send_frames(&mut send, &[Response::Pong { nonce }]).await
        }
        Request::Have { ids } => {
            ctx.metrics
                .requests_served
                .with_label_values(&["have"])
                .inc();
            serve_have(&mut send, ids, ctx).await
        }
        Request::GetObject { key, priority } => {
            ctx.metrics
                .requests_served
                .with_label_values(&["get_object"])
                .inc();
            send.set_priority(priority.stream_priority()).ok();
            serve_object(&mut send, key, ctx).await
        }
        Request::GetChunks {
            ids,
            priority,
            accept_zstd,
        } => {
            ctx.metrics
                .requests_served
                .with_label_values(&["get_chunks"])
                .inc();
            send.set_priority(priority.stream_priority()).ok();
            let zstd = (accept_zstd && ctx.cfg.wire_zstd).then_some(probe);
            serve_chunks(&mut send, ids, zstd, peer, ctx).await
        }
        Request::Offer {
            repo,
            tag,
            digest,
            version,
        } => {
            ctx.metrics
                .requests_served
                .with_label_values(&["offer"])
                .inc();
            let offer = Offer {
                from: from.clone(),
                repo,
                tag,
                digest,
                version,
            };
            serve_offer(&mut send, offer, ctx).await
        }
        Request::MetaSync => {
            ctx.metrics
                .requests_served
                .with_label_values(&["meta_sync"])
                .inc();
            let Some(h) = &ctx.cfg.meta else {
                let _ = send_frames(
                    &mut send,
                    &[Response::Error {
                        code: ErrorCode::NotFound,
                        message: "this node keeps no site metadata".into(),
                    }],
                )
                .await;
                let _ = send.finish();
                return;
            };
            h.serve(HandedStream {
                from: from.clone(),
                rtt,
                leftover: buf,
                send,
                recv,
            })
            .await;
            return;
        }
    };
    match res {
        Ok(()) => {
            let _ = send.finish();
        }
        Err(e) => debug!(peer, error = %e, "stream ended early"),
    }
}

async fn serve_offer(send: &mut quinn::SendStream, offer: Offer, ctx: &Ctx) -> Result<(), String> {
    let Some(h) = &ctx.cfg.offers else {
        return send_frames(
            send,
            &[Response::Error {
                code: ErrorCode::NotFound,
                message: "this node takes no replication offers (no registry)".into(),
            }],
        )
        .await;
    };
    let what = format!("{}@{}", offer.repo, offer.digest);
    let answer = match h.offer(offer).await {
        Ok((digest, version)) => Response::Offered { digest, version },
        Err(e) => {
            warn!(offer = %what, error = %e, "replication offer failed");
            Response::Error {
                code: ErrorCode::Internal,
                message: e.0,
            }
        }
    };
    send_frames(send, &[answer]).await
}

async fn send_frames(send: &mut quinn::SendStream, frames: &[Response]) -> Result<(), String> {
    let mut out = BytesMut::new();
    for f in frames {
        wire::encode_response(f, &mut out);
    }
    send.write_all(&out).await.map_err(|e| e.to_string())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SourceError> + Send + 'static,
) -> Result<T, SourceError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| SourceError(format!("source task failed: {e}")))?
}

async fn serve_have(
    send: &mut quinn::SendStream,
    ids: Vec<ChunkId>,
    ctx: &Ctx,
) -> Result<(), String> {
    let source = ctx.source.clone();
    let count = ids.len() as u32;
    let res = blocking(move || {
        let mut bits = vec![0u8; ids.len().div_ceil(8)];
        for (i, id) in ids.iter().enumerate() {
            if source.has(id)? {
                bits[i / 8] |= 1 << (i % 8);
            }
        }
        Ok(bits)
    })
    .await;
    match res {
        Ok(bits) => {
            send_frames(
                send,
                &[Response::HaveBitmap {
                    count,
                    bits: Bytes::from(bits),
                }],
            )
            .await
        }
        Err(e) => internal(send, e).await,
    }
}

async fn internal(send: &mut quinn::SendStream, e: SourceError) -> Result<(), String> {
    warn!(error = %e, "serving failed");
    send_frames(
        send,
        &[Response::Error {
            code: ErrorCode::Internal,
            message: truncate(e.0),
        }],
    )
    .await
}

fn truncate(mut s: String) -> String {
    if s.len() > wire::MAX_STRING {
        let mut end = wire::MAX_STRING;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

async fn serve_object(
    send: &mut quinn::SendStream,
    key: ObjectKey,
    ctx: &Ctx,
) -> Result<(), String> {
    let source = ctx.source.clone();
    let k = key.clone();
    match blocking(move || source.object(&k)).await {
        Ok(Some(obj)) => {
            let enc = obj.recipe.encode();
            let mut frames = vec![Response::ObjectHeader {
                id: obj.id,
                len: obj.recipe.total_len(),
                recipe_len: enc.len() as u64,
                sha256: obj.sha256,
            }];
            let enc = Bytes::from(enc);
            let mut off = 0;
            while off < enc.len() {
                let end = (off + wire::MAX_RECIPE_PART).min(enc.len());
                frames.push(Response::RecipePart(enc.slice(off..end)));
                off = end;
            }
            frames.push(Response::End);
            send_frames(send, &frames).await
        }
        Ok(None) => {
            send_frames(
                send,
                &[Response::Error {
                    code: ErrorCode::NotFound,
                    message: truncate(format!("no object {key:?} here")),
                }],
            )
            .await
        }
        Err(e) => internal(send, e).await,
    }
}

/// Reads are handed from the blocking reader to the stream in groups of at
/// most this many bytes (or [`SERVE_GROUP_CHUNKS`] chunks): one wake-up and
/// one stream write per group instead of per chunk.
const SERVE_GROUP_BYTES: usize = 512 * 1024;
const SERVE_GROUP_CHUNKS: usize = 16;

type ReadResult = (ChunkId, Result<Option<StoredChunk>, SourceError>);

async fn serve_chunks(
    send: &mut quinn::SendStream,
    ids: Vec<ChunkId>,
    zstd: Option<&CompressProbe>,
    peer: &str,
    ctx: &Ctx,
) -> Result<(), String> {
    // Reads run on a blocking thread a group or two ahead of the network.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<ReadResult>>(2);
    let source = ctx.source.clone();
    let accept_zstd = zstd.is_some();
    let reader = tokio::task::spawn_blocking(move || {
        let mut group = Vec::with_capacity(SERVE_GROUP_CHUNKS);
        let mut bytes = 0;
        for id in ids {
            let r = source.chunk_for_peer_stored(&id, accept_zstd);
            let stop = r.is_err();
            bytes += r
                .as_ref()
                .ok()
                .and_then(|o| o.as_ref())
                .map_or(0, |c| c.payload.len());
            group.push((id, r));
            if stop || bytes >= SERVE_GROUP_BYTES || group.len() >= SERVE_GROUP_CHUNKS {
                bytes = 0;
                let full = std::mem::replace(&mut group, Vec::with_capacity(SERVE_GROUP_CHUNKS));
                if tx.blocking_send(full).is_err() || stop {
                    return;
                }
            }
        }
        if !group.is_empty() {
            let _ = tx.blocking_send(group);
        }
    });
    let bytes_out = ctx.metrics.bytes_out.with_label_values(&[peer]);
    let mut res = Ok(());
    let mut bufs: Vec<Bytes> = Vec::with_capacity(2 * SERVE_GROUP_CHUNKS);
    'groups: while let Some(group) = rx.recv().await {
        bufs.clear();
        let mut failed = None;
        let (mut n_bytes, mut n_chunks) = (0u64, 0u64);
        for (id, r) in group {
            let chunk = match r {
                Ok(Some(c)) => c,
                Ok(None) => {
                    let mut out = BytesMut::new();
                    wire::encode_response(&Response::Missing { id }, &mut out);
                    bufs.push(out.freeze());
                    continue;
                }
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            };
            let raw_len = chunk.raw_len;
            let (payload, compressed) = if chunk.zstd {
                (chunk.payload, true)
            } else {
                maybe_compress(chunk.payload, zstd)
            };
            let header = wire::chunk_frame_header(&id, raw_len, compressed, payload.len());
            n_bytes += payload.len() as u64;
            n_chunks += 1;
            bufs.push(Bytes::from(header));
            bufs.push(payload);
        }
        if !bufs.is_empty() {
            if let Err(e) = send.write_all_chunks(&mut bufs).await {
                res = Err(e.to_string());
                break 'groups;
            }
            bytes_out.inc_by(n_bytes);
            ctx.metrics.chunks_served.inc_by(n_chunks);
        }
        if let Some(e) = failed {
            res = internal(send, e).await;
            break;
        }
    }
    drop(rx);
    let _ = reader.await;
    res?;
    send_frames(send, &[Response::End]).await
}

/// The chunk's wire payload: zstd when the connection's probe says to try
/// and it saves at least 10%, else the bytes as they are.
fn maybe_compress(data: Bytes, zstd: Option<&CompressProbe>) -> (Bytes, bool) {
    match zstd.and_then(|p| p.compress(&data)) {
        Some(c) => (Bytes::from(c), true),
        None => (data, false),
    }
}

/// Log line for a started server.
pub fn log_listening(endpoint: &quinn::Endpoint, node: &str) {
    if let Ok(addr) = endpoint.local_addr() {
        info!(%addr, node, "serving cairn/1");
    }
}
