//! A generic async NBD server over tokio.
//!
//! [`serve`] accepts TCP connections until its cancellation token fires, one
//! task per connection, at most [`ServerLimits::max_connections`] at once
//! (connections beyond that are closed at once). Each connection runs the
//! handshake from [`crate::proto::ServerProto`] under
//! [`ServerLimits::handshake_timeout`], opening exports through the
//! [`ExportProvider`]; then, in transmission:
//!
//! - one reader loop decodes requests and spawns one task per request, so
//!   requests run concurrently and replies go out as they finish (out of
//!   order, tied to requests by cookie);
//! - at most [`ServerLimits::max_inflight_requests`] requests and
//!   [`ServerLimits::max_inflight_bytes`] bytes of read and write payload
//!   are in flight; past that the reader stops reading, so a client cannot
//!   make the server buffer more (a request's budget is returned once its
//!   reply has been written to the socket);
//! - one writer task writes replies, coalescing small ones;
//! - `FLUSH` first waits for every write, trim and write-zeroes received
//!   before it to finish, then calls [`Export::flush`] (the protocol only
//!   requires writes already replied to; this is the stronger barrier).
//!
//! On `NBD_CMD_DISC` or end of input the connection finishes its in-flight
//! requests, sends their replies and closes. On cancellation it stops
//! reading, gives in-flight requests [`ServerLimits::shutdown_grace`] to
//! finish, then drops them. A connection's failure is logged and counted;
//! it never stops the server.

use std::collections::BTreeSet;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinError, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::consts::*;
use crate::export::{export_info, Export, ExportError, ExportProvider, OpenError};
use crate::proto::{
    encode_block_status_reply, encode_error_reply, encode_ok_reply, encode_read_reply_header,
    normalize_extents, read_reply_header_len, Answer, Event, Op, ProtoConfig, ProtoError, Refusal,
    Request, ServerProto, DEFAULT_MAX_OPTION_LEN, DEFAULT_MAX_REQUEST_LEN,
};

/// Bytes per permit of the in-flight byte budget.
const BYTE_UNIT: usize = 4096;
/// Smallest read reservation on the receive buffer.
const READ_CHUNK: usize = 64 * 1024;

/// Limits of a server and of each of its connections.
#[derive(Debug, Clone)]
pub struct ServerLimits {
    /// Connections served at once; more are closed on accept.
    pub max_connections: usize,
    /// Time a client has to finish the handshake.
    pub handshake_timeout: Duration,
    /// Requests in flight per connection.
    pub max_inflight_requests: usize,
    /// Read and write payload bytes in flight per connection (raised to at
    /// least one maximum request).
    pub max_inflight_bytes: usize,
    /// Longest `READ`/`WRITE` (advertised as the maximum block size).
    pub max_request_bytes: u32,
    /// Longest option data.
    pub max_option_bytes: u32,
    /// On cancellation, how long in-flight requests and their replies may
    /// take before the connection is dropped.
    pub shutdown_grace: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_connections: 256,
            handshake_timeout: Duration::from_secs(10),
            max_inflight_requests: 64,
            max_inflight_bytes: 256 * 1024 * 1024,
            max_request_bytes: DEFAULT_MAX_REQUEST_LEN,
            max_option_bytes: DEFAULT_MAX_OPTION_LEN,
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

impl ServerLimits {
    fn normalized(mut self) -> Self {
        self.max_connections = self.max_connections.max(1);
        self.max_inflight_requests = self.max_inflight_requests.max(1);
        self.max_request_bytes = self.max_request_bytes.max(4096);
        let one_request = self.max_request_bytes as usize + READ_CHUNK;
        self.max_inflight_bytes = self.max_inflight_bytes.max(one_request);
        self
    }

    /// The state machine limits these imply.
    pub fn proto_config(&self) -> ProtoConfig {
        ProtoConfig {
            max_option_len: self.max_option_bytes,
            max_request_len: self.max_request_bytes,
            // Skip rejected payloads up to twice the limit (as nbdkit
            // does); anything longer closes the connection.
            max_skip_len: 2 * u64::from(self.max_request_bytes),
        }
    }
}

/// Counters for a server, shared with whoever exports them as metrics.
#[derive(Debug, Default)]
pub struct ServerStats {
    connections_accepted: AtomicU64,
    connections_rejected: AtomicU64,
    connections_active: AtomicU64,
    handshakes_completed: AtomicU64,
    handshake_failures: AtomicU64,
    protocol_errors: AtomicU64,
    requests: [AtomicU64; 8],
    requests_invalid: AtomicU64,
    request_errors: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
}

/// A point-in-time copy of [`ServerStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Connections accepted and served.
    pub connections_accepted: u64,
    /// Connections closed on accept because the limit was reached.
    pub connections_rejected: u64,
    /// Connections open now.
    pub connections_active: u64,
    /// Handshakes that reached transmission.
    pub handshakes_completed: u64,
    /// Handshakes that timed out or broke the protocol.
    pub handshake_failures: u64,
    /// Connections closed for a protocol violation.
    pub protocol_errors: u64,
    /// `NBD_CMD_READ` requests run.
    pub reads: u64,
    /// `NBD_CMD_WRITE` requests run.
    pub writes: u64,
    /// `NBD_CMD_FLUSH` requests run.
    pub flushes: u64,
    /// `NBD_CMD_TRIM` requests run.
    pub trims: u64,
    /// `NBD_CMD_CACHE` requests run.
    pub caches: u64,
    /// `NBD_CMD_WRITE_ZEROES` requests run.
    pub write_zeroes: u64,
    /// `NBD_CMD_BLOCK_STATUS` requests run.
    pub block_status: u64,
    /// `NBD_CMD_DISC` received.
    pub disconnects: u64,
    /// Requests refused before running (bad range, flags, command, ...).
    pub requests_invalid: u64,
    /// Requests the export failed.
    pub request_errors: u64,
    /// Bytes returned by successful reads.
    pub bytes_read: u64,
    /// Bytes stored by successful writes.
    pub bytes_written: u64,
}

impl ServerStats {
    /// Read every counter.
    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let req = |cmd: u16| get(&self.requests[usize::from(cmd)]);
        StatsSnapshot {
            connections_accepted: get(&self.connections_accepted),
            connections_rejected: get(&self.connections_rejected),
            connections_active: get(&self.connections_active),
            handshakes_completed: get(&self.handshakes_completed),
            handshake_failures: get(&self.handshake_failures),
            protocol_errors: get(&self.protocol_errors),
            reads: req(CMD_READ),
            writes: req(CMD_WRITE),
            flushes: req(CMD_FLUSH),
            trims: req(CMD_TRIM),
            caches: req(CMD_CACHE),
            write_zeroes: req(CMD_WRITE_ZEROES),
            block_status: req(CMD_BLOCK_STATUS),
            disconnects: req(CMD_DISC),
            requests_invalid: get(&self.requests_invalid),
            request_errors: get(&self.request_errors),
            bytes_read: get(&self.bytes_read),
            bytes_written: get(&self.bytes_written),
        }
    }

    fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn count_request(&self, command: u16) {
        if let Some(c) = self.requests.get(usize::from(command)) {
            Self::inc(c);
        }
    }
}

/// Why a connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// Socket error.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// The client broke the protocol.
    #[error("protocol error: {0}")]
    Proto(#[from] ProtoError),
    /// The handshake took longer than [`ServerLimits::handshake_timeout`].
    #[error("handshake timed out")]
    HandshakeTimeout,
    /// The server is shutting down.
    #[error("server shutting down")]
    Cancelled,
}

/// Serve NBD on `listener` until `cancel` fires, then wait for every
/// connection to finish (each within [`ServerLimits::shutdown_grace`]).
pub async fn serve(
    listener: TcpListener,
    provider: Arc<dyn ExportProvider>,
    cancel: CancellationToken,
    limits: ServerLimits,
) {
    serve_with_stats(
        listener,
        provider,
        cancel,
        limits,
        Arc::new(ServerStats::default()),
    )
    .await;
}

/// [`serve`], counting into `stats`.
pub async fn serve_with_stats(
    listener: TcpListener,
    provider: Arc<dyn ExportProvider>,
    cancel: CancellationToken,
    limits: ServerLimits,
    stats: Arc<ServerStats>,
) {
    let limits = limits.normalized();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut conns = JoinSet::new();
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "NBD server listening");
    }
    loop {
        tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            Some(res) = conns.join_next(), if !conns.is_empty() => log_join(res),
            res = listener.accept() => match res {
                Ok((stream, peer)) => {
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        ServerStats::inc(&stats.connections_rejected);
                        warn!(%peer, limit = limits.max_connections, "NBD connection refused: too many connections");
                        drop(stream);
                        continue;
                    };
                    ServerStats::inc(&stats.connections_accepted);
                    let (provider, cancel, limits, stats) =
                        (provider.clone(), cancel.clone(), limits.clone(), stats.clone());
                    let span = tracing::info_span!("nbd_conn", %peer);
                    conns.spawn(
                        async move {
                            let _slot = slot;
                            let _active = ActiveGuard::new(&stats);
                            debug!("NBD connection accepted");
                            match serve_connection(stream, provider, cancel, limits, stats.clone()).await {
                                Ok(()) => debug!("NBD connection closed"),
                                Err(ConnError::Cancelled) => debug!("NBD connection closed by shutdown"),
                                Err(e) => warn!(error = %e, "NBD connection failed"),
                            }
                        }
                        .instrument(span),
                    );
                }
                Err(e) => {
                    warn!(error = %e, "NBD accept failed");
                    tokio::select! {
                        () = cancel.cancelled() => break,
                        () = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                }
            },
        }
    }
    drop(listener);
    while let Some(res) = conns.join_next().await {
        log_join(res);
    }
    info!("NBD server stopped");
}

fn log_join(res: Result<(), JoinError>) {
    if let Err(e) = res {
        if e.is_panic() {
            warn!(error = %e, "NBD connection task panicked");
        }
    }
}

struct ActiveGuard(Arc<ServerStats>);

impl ActiveGuard {
    fn new(stats: &Arc<ServerStats>) -> Self {
        ServerStats::inc(&stats.connections_active);
        Self(stats.clone())
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.connections_active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serve one accepted TCP connection to its end.
pub async fn serve_connection(
    stream: TcpStream,
    provider: Arc<dyn ExportProvider>,
    cancel: CancellationToken,
    limits: ServerLimits,
    stats: Arc<ServerStats>,
) -> Result<(), ConnError> {
    // NBD asks for TCP_NODELAY on both ends.
    stream.set_nodelay(true)?;
    let (reader, writer) = stream.into_split();
    serve_io(reader, writer, provider, cancel, limits, stats).await
}

/// Serve one connection over any byte stream (split in halves) to its end.
pub async fn serve_io<R, W>(
    mut reader: R,
    mut writer: W,
    provider: Arc<dyn ExportProvider>,
    cancel: CancellationToken,
    limits: ServerLimits,
    stats: Arc<ServerStats>,
) -> Result<(), ConnError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let limits = limits.normalized();
    let mut proto = ServerProto::new(limits.proto_config());
    let handshake = handshake(&mut proto, &mut reader, &mut writer, &*provider, &cancel);
    let export = match tokio::time::timeout(limits.handshake_timeout, handshake).await {
        Err(_) => {
            ServerStats::inc(&stats.handshake_failures);
            return Err(ConnError::HandshakeTimeout);
        }
        Ok(Err(e)) => {
            if matches!(e, ConnError::Proto(_)) {
                ServerStats::inc(&stats.handshake_failures);
                ServerStats::inc(&stats.protocol_errors);
            }
            return Err(e);
        }
        Ok(Ok(None)) => return Ok(()),
        Ok(Ok(Some(export))) => export,
    };
    ServerStats::inc(&stats.handshakes_completed);
    debug!(
        size = export.size(),
        read_only = export.read_only(),
        structured = proto.structured_replies(),
        block_status = proto.allocation_context().is_some(),
        "NBD transmission started"
    );
    let keep = export.clone();
    let res = transmission(proto, reader, writer, export, cancel, limits, stats).await;
    // However the connection ended, persist what it wrote, as a disk does
    // when its last user closes it (a client may disconnect without FLUSH).
    if !keep.read_only() {
        if let Err(e) = keep.flush().await {
            warn!(error = %e, "flush after the NBD connection closed failed");
        }
    }
    res
}

async fn send_output<W: AsyncWrite + Unpin>(
    proto: &mut ServerProto,
    writer: &mut W,
) -> io::Result<()> {
    if !proto.output().is_empty() {
        let out = proto.take_output();
        writer.write_all(&out).await?;
        writer.flush().await?;
    }
    Ok(())
}

/// Read more input; `Ok(false)` at end of input.
async fn read_more<R: AsyncRead + Unpin>(
    proto: &mut ServerProto,
    reader: &mut R,
    cancel: &CancellationToken,
) -> Result<bool, ConnError> {
    let want = proto.read_hint().max(READ_CHUNK);
    let buf = proto.input_mut();
    buf.reserve(want);
    tokio::select! {
        () = cancel.cancelled() => Err(ConnError::Cancelled),
        n = reader.read_buf(buf) => Ok(n? > 0),
    }
}

fn refusal(e: OpenError) -> Refusal {
    match e {
        OpenError::Unknown => Refusal::Unknown("no such export".to_owned()),
        OpenError::Unavailable(m) => Refusal::Unknown(m),
        OpenError::Denied(m) => Refusal::Policy(m),
    }
}

/// Negotiate options until transmission (`Some(export)`) or a clean end.
async fn handshake<R, W>(
    proto: &mut ServerProto,
    reader: &mut R,
    writer: &mut W,
    provider: &dyn ExportProvider,
    cancel: &CancellationToken,
) -> Result<Option<Arc<dyn Export>>, ConnError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        let event = match proto.poll() {
            Ok(event) => event,
            Err(e) => {
                send_output(proto, writer).await?;
                return Err(e.into());
            }
        };
        match event {
            None => {
                send_output(proto, writer).await?;
                if proto.is_closed() || !read_more(proto, reader, cancel).await? {
                    return Ok(None);
                }
            }
            Some(Event::ListExports) => proto.answer_list(&provider.list()),
            Some(Event::ExportQuery { name, kind }) => {
                let opened = tokio::select! {
                    () = cancel.cancelled() => Err(Refusal::Shutdown),
                    r = provider.open(&name) => r.map_err(refusal),
                };
                match opened {
                    Ok(export) => {
                        let answer = proto.answer_export(Ok(export_info(&*export)))?;
                        if answer == Answer::Transmission {
                            send_output(proto, writer).await?;
                            return Ok(Some(export));
                        }
                    }
                    Err(refusal) => {
                        debug!(export = %name, ?kind, ?refusal, "NBD export refused");
                        if let Err(e) = proto.answer_export(Err(refusal)) {
                            send_output(proto, writer).await?;
                            return Err(e.into());
                        }
                    }
                }
            }
            Some(Event::Abort) => {
                send_output(proto, writer).await?;
                return Ok(None);
            }
            Some(other) => {
                // Transmission events cannot happen before transmission.
                warn!(event = ?other, "unexpected NBD event during handshake");
                return Ok(None);
            }
        }
    }
}

/// A reply on its way to the socket, with the in-flight budget it holds.
struct Outgoing {
    data: Bytes,
    _permits: Option<Permits>,
}

struct Permits {
    _count: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
}

/// What every request task of one connection shares.
struct Shared {
    export: Arc<dyn Export>,
    structured: bool,
    context: u32,
    stats: Arc<ServerStats>,
    tracker: Arc<WriteTracker>,
    tx: mpsc::Sender<Outgoing>,
}

async fn transmission<R, W>(
    mut proto: ServerProto,
    mut reader: R,
    writer: W,
    export: Arc<dyn Export>,
    cancel: CancellationToken,
    limits: ServerLimits,
    stats: Arc<ServerStats>,
) -> Result<(), ConnError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    // Stops the reader when the writer fails, and everything on shutdown.
    let conn_cancel = cancel.child_token();
    let (tx, rx) = mpsc::channel(limits.max_inflight_requests + 16);
    let mut writer_task = tokio::spawn(write_loop(writer, rx, conn_cancel.clone()));
    let shared = Arc::new(Shared {
        export,
        structured: proto.structured_replies(),
        context: proto.allocation_context().unwrap_or(0),
        stats: stats.clone(),
        tracker: Arc::new(WriteTracker::default()),
        tx,
    });
    let count_sem = Arc::new(Semaphore::new(limits.max_inflight_requests));
    let byte_units = limits.max_inflight_bytes / BYTE_UNIT;
    let byte_sem = Arc::new(Semaphore::new(byte_units));
    let mut handlers = JoinSet::new();

    let result: Result<(), ConnError> = loop {
        while let Some(res) = handlers.try_join_next() {
            log_join(res);
        }
        let event = proto.poll();
        if !proto.output().is_empty() {
            let data = proto.take_output().freeze();
            let out = Outgoing {
                data,
                _permits: None,
            };
            if shared.tx.send(out).await.is_err() {
                break Ok(());
            }
        }
        match event {
            Err(e) => {
                ServerStats::inc(&stats.protocol_errors);
                break Err(e.into());
            }
            Ok(None) => {
                if proto.is_closed() {
                    break Ok(());
                }
                match read_more(&mut proto, &mut reader, &conn_cancel).await {
                    Ok(true) => {}
                    Ok(false) => break Ok(()),
                    Err(e) => break Err(e),
                }
            }
            Ok(Some(Event::Request(req))) => {
                stats.count_request(req.command());
                let bytes = match req.op {
                    Op::Read => req.length as usize + 32,
                    Op::Write(ref data) => data.len(),
                    _ => 0,
                };
                let units =
                    u32::try_from(bytes.div_ceil(BYTE_UNIT).min(byte_units)).unwrap_or(u32::MAX);
                let acquire = async {
                    let count = count_sem.clone().acquire_owned().await.ok()?;
                    let bytes = if units > 0 {
                        Some(byte_sem.clone().acquire_many_owned(units).await.ok()?)
                    } else {
                        None
                    };
                    Some(Permits {
                        _count: count,
                        _bytes: bytes,
                    })
                };
                let permits = tokio::select! {
                    () = conn_cancel.cancelled() => break Err(ConnError::Cancelled),
                    p = acquire => p,
                };
                let Some(permits) = permits else {
                    break Err(ConnError::Cancelled);
                };
                let (guard, barrier) = match req.op {
                    Op::Write(_) | Op::Trim | Op::WriteZeroes => (Some(shared.tracker.begin()), 0),
                    Op::Flush => (None, shared.tracker.barrier()),
                    _ => (None, 0),
                };
                handlers.spawn(handle_request(shared.clone(), req, permits, guard, barrier));
            }
            Ok(Some(Event::Rejected {
                cookie,
                command,
                errno,
            })) => {
                ServerStats::inc(&stats.requests_invalid);
                debug!(cookie, command, %errno, "NBD request rejected");
            }
            Ok(Some(Event::Disconnect)) => {
                stats.count_request(CMD_DISC);
                break Ok(());
            }
            Ok(Some(other)) => {
                warn!(event = ?other, "unexpected NBD event during transmission");
                break Ok(());
            }
        }
    };

    // Finish in-flight requests (within the grace period on shutdown).
    let drained = within_grace(
        async {
            while let Some(res) = handlers.join_next().await {
                log_join(res);
            }
        },
        &cancel,
        limits.shutdown_grace,
    )
    .await;
    if drained.is_none() {
        warn!("NBD requests still running after the shutdown grace period: dropped");
        handlers.abort_all();
        while handlers.join_next().await.is_some() {}
    }
    // Dropping the last sender lets the writer drain and finish.
    drop(shared);
    let written = within_grace(&mut writer_task, &cancel, limits.shutdown_grace).await;
    let write_result = match written {
        Some(Ok(r)) => r,
        Some(Err(e)) => Err(io::Error::other(e)),
        None => {
            writer_task.abort();
            Ok(())
        }
    };
    match (result, write_result) {
        (Err(ConnError::Cancelled), Err(e)) if !cancel.is_cancelled() => Err(e.into()),
        // A client that hangs up right after its last request may miss
        // replies; that is its choice, not a server failure.
        (Ok(()), Err(e)) if !client_gone(&e) => Err(e.into()),
        (result, _) => result,
    }
}

fn client_gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset | io::ErrorKind::NotConnected
    )
}

/// Run `fut` to completion, or, once `cancel` fires, for at most `grace`
/// more (`None` if it did not finish).
async fn within_grace<F: Future>(
    fut: F,
    cancel: &CancellationToken,
    grace: Duration,
) -> Option<F::Output> {
    tokio::pin!(fut);
    tokio::select! {
        v = &mut fut => Some(v),
        () = cancel.cancelled() => tokio::time::timeout(grace, fut).await.ok(),
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(
    writer: W,
    mut rx: mpsc::Receiver<Outgoing>,
    conn_cancel: CancellationToken,
) -> io::Result<()> {
    let mut w = BufWriter::with_capacity(64 * 1024, writer);
    let result = async {
        while let Some(msg) = rx.recv().await {
            w.write_all(&msg.data).await?;
            drop(msg);
            while let Ok(msg) = rx.try_recv() {
                w.write_all(&msg.data).await?;
            }
            w.flush().await?;
        }
        w.shutdown().await
    }
    .await;
    if result.is_err() {
        conn_cancel.cancel();
    }
    result
}

async fn handle_request(
    sh: Arc<Shared>,
    req: Request,
    permits: Permits,
    guard: Option<WriteGuard>,
    barrier: u64,
) {
    let export = &*sh.export;
    let fua = req.fua();
    let command = req.command();
    let mut ok = BytesMut::new();
    let result: Result<BytesMut, ExportError> = match req.op {
        Op::Read => {
            let hdr = read_reply_header_len(sh.structured, req.length);
            let len = req.length as usize;
            let mut buf = BytesMut::with_capacity(hdr + len);
            encode_read_reply_header(&mut buf, sh.structured, req.cookie, req.offset, req.length);
            buf.resize(hdr + len, 0);
            export.read(req.offset, &mut buf[hdr..]).await.map(|()| {
                sh.stats.bytes_read.fetch_add(len as u64, Ordering::Relaxed);
                buf
            })
        }
        Op::Write(data) => {
            let n = data.len() as u64;
            export.write(req.offset, data, fua).await.map(|()| {
                sh.stats.bytes_written.fetch_add(n, Ordering::Relaxed);
                encode_ok_reply(&mut ok, req.cookie);
                ok
            })
        }
        Op::Flush => {
            sh.tracker.wait(barrier).await;
            export.flush().await.map(|()| {
                encode_ok_reply(&mut ok, req.cookie);
                ok
            })
        }
        Op::Trim => export.trim(req.offset, req.length, fua).await.map(|()| {
            encode_ok_reply(&mut ok, req.cookie);
            ok
        }),
        Op::Cache => export.cache(req.offset, req.length).await.map(|()| {
            encode_ok_reply(&mut ok, req.cookie);
            ok
        }),
        Op::WriteZeroes => export
            .write_zeroes(req.offset, req.length, fua, req.no_hole())
            .await
            .map(|()| {
                encode_ok_reply(&mut ok, req.cookie);
                ok
            }),
        Op::BlockStatus => export
            .block_status(req.offset, req.length)
            .await
            .map(|extents| {
                let extents = normalize_extents(&extents, req.length, req.req_one());
                encode_block_status_reply(&mut ok, req.cookie, sh.context, &extents);
                ok
            }),
    };
    drop(guard);
    let data = match result {
        Ok(buf) => buf,
        Err(e) => {
            ServerStats::inc(&sh.stats.request_errors);
            debug!(
                cookie = req.cookie,
                command,
                offset = req.offset,
                length = req.length,
                error = %e,
                "NBD request failed"
            );
            let mut buf = BytesMut::new();
            encode_error_reply(&mut buf, sh.structured, req.cookie, e.errno, &e.message);
            buf
        }
    };
    let out = Outgoing {
        data: data.freeze(),
        _permits: Some(permits),
    };
    // The writer is gone only when the connection is closing.
    let _ = sh.tx.send(out).await;
}

/// Orders `FLUSH` after the writes received before it.
#[derive(Debug, Default)]
struct WriteTracker {
    state: Mutex<TrackerState>,
    notify: Notify,
}

#[derive(Debug, Default)]
struct TrackerState {
    next: u64,
    inflight: BTreeSet<u64>,
}

impl WriteTracker {
    fn lock(&self) -> MutexGuard<'_, TrackerState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Register a write-type request, in receive order.
    fn begin(self: &Arc<Self>) -> WriteGuard {
        let mut s = self.lock();
        let seq = s.next;
        s.next += 1;
        s.inflight.insert(seq);
        WriteGuard {
            tracker: self.clone(),
            seq,
        }
    }

    /// Every write registered so far has a sequence number below this.
    fn barrier(&self) -> u64 {
        self.lock().next
    }

    /// Wait until no write below `barrier` is in flight.
    async fn wait(&self, barrier: u64) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.lock().inflight.first().map_or(true, |&s| s >= barrier) {
                return;
            }
            notified.await;
        }
    }
}

struct WriteGuard {
    tracker: Arc<WriteTracker>,
    seq: u64,
}

impl Drop for WriteGuard {
    fn drop(&mut self) {
        self.tracker.lock().inflight.remove(&self.seq);
        self.tracker.notify.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn flush_waits_for_earlier_writes_only() {
        let t = Arc::new(WriteTracker::default());
        let w1 = t.begin();
        let barrier = t.barrier();
        let w2 = t.begin();
        let waiter = {
            let t = t.clone();
            tokio::spawn(async move { t.wait(barrier).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        drop(w1);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("flush barrier released")
            .expect("join");
        drop(w2);
    }

    #[test]
    fn limits_are_normalized() {
        let l = ServerLimits {
            max_connections: 0,
            max_inflight_requests: 0,
            max_inflight_bytes: 0,
            ..ServerLimits::default()
        }
        .normalized();
        assert_eq!(l.max_connections, 1);
        assert_eq!(l.max_inflight_requests, 1);
        assert!(l.max_inflight_bytes >= l.max_request_bytes as usize);
        assert_eq!(
            l.proto_config().max_skip_len,
            2 * u64::from(l.max_request_bytes)
        );
    }
}
