//! Transport benchmark: Cairn's verified chunk fetch over QUIC against the
//! limits of the same loopback link, all measured in one run on the same
//! machine (DESIGN.md, "Performance").
//!
//! ```text
//! cargo bench -p cairn-bench --bench transport -- [--quick] [--reps N]
//!     [--object-mib N] [--many-count N] [--many-mib N] [--tmp DIR] [--shm DIR]
//!     [--window N] [--batch-mib N] [--batch-chunks N] [--no-zstd]
//!     [--congestion cubic|bbr] [--engine auto|uring|psync]
//!     [--quinn-streams N] [--quinn-write-kib N]
//!     [--stream-window-mib N] [--conn-window-mib N]
//!     [--only tcp,quinn,shm,disk,hash,many] [--label NAME] [--no-write]
//! ```
//!
//! Everything runs on loopback (127.0.0.1, ports bound at 0); every figure is
//! the median of `--reps` repetitions (default 3).
//!
//! 1. **TCP limit**: a plain TCP copy of N bytes (1 GiB; quick: 256 MiB)
//!    between two processes. The bench re-executes itself with the hidden
//!    argument `--tcp-sink ADDR BYTES`; that child connects, reads and
//!    discards N bytes and acks with one byte. The parent writes N bytes from
//!    a 1 MiB buffer, timed from accepting the connection to the ack.
//! 2. **Bare quinn limit**: two quinn endpoints in this process with the
//!    cluster's mutual TLS (the project's own identities) and Cairn's
//!    transport parameters (`endpoint::bind`, i.e. `transport_config`); the
//!    server pushes N bytes on one bidirectional stream in 1 MiB `Bytes`
//!    (`write_chunk`), the client discards them via `read_chunk`. Timed from
//!    connect to the end of the stream.
//! 3. **Cairn fetch, one connection**: node A holds an N-byte random object
//!    (ingested untimed); a fresh node C runs `Fetcher::fetch_object` from A
//!    alone (verifies every chunk, stores it with fdatasync). C's store is on
//!    tmpfs (the transport figure, judged) and on the work disk (context).
//!    Context: BLAKE3 on one thread over the same bytes, and a plain write +
//!    `sync_data` of them on the work disk.
//! 4. **Many objects at once**: three holders each holding 8 objects of
//!    64 MiB (quick: 16 MiB); C fetches all 24 concurrently, each from its own
//!    holder, then again with every holder listed for every object (the
//!    holders hold all 24 objects; only the peer lists differ). Context: bare
//!    quinn with three connections at once, one per holder.
//!
//! Target: Cairn one-connection fetch (tmpfs) ≥ 0.8 × bare quinn.
//!
//! All nodes and both quinn endpoints live in this one process on one tokio
//! multi-thread runtime with 2 workers. Results go to stdout and to
//! `bench/results/transport-YYYY-MM-DD{,-quick}.{md,json}`. Scratch dirs (a
//! temp dir under `target/`, one under `/dev/shm`) are removed at the end.

use std::fmt::Write as _;
use std::fs;
use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use bytes::Bytes;
use cairn_bench::{
    command_line_output, git_facts, human_bytes, median, pass_fail, plain_write, random_bytes,
    ratio_cell, today, write_results, MachineFacts, MdTable, GIB, MIB,
};
use cairn_chunkstore::{EngineKind, ObjectId, PutOptions, Store};
use cairn_node::{Node, NodeConfig};
use cairn_transport::identity::{ClusterCa, DenyList, Identity};
use cairn_transport::tls::Refusals;
use cairn_transport::wire::{ObjectKey, Priority};
use cairn_transport::{
    endpoint, Congestion, EndpointConfig, FetchConfig, FetchReport, Fetcher, PeerAddr,
};
use serde::Serialize;
use serde_json::json;

/// Cairn one-connection fetch (tmpfs) / bare quinn must reach this.
const TARGET: f64 = 0.8;
/// Buffer size of the TCP writer/reader and of the quinn push.
const IO_BUF: usize = 1 << 20;
const SEED_OBJECT: u64 = 0x7EA5_0001;
const SEED_MANY: u64 = 0x7EA5_1000;
const SEED_PUSH: u64 = 0x7EA5_2000;
/// Holders in section 4.
const HOLDERS: usize = 3;
/// Hidden argument of the TCP sink child process.
const TCP_SINK_ARG: &str = "--tcp-sink";

#[derive(Debug, Clone)]
struct Opts {
    quick: bool,
    object_bytes: u64,
    many_count: usize,
    many_bytes: u64,
    reps: usize,
    tmp_root: PathBuf,
    shm_root: PathBuf,
    endpoint: EndpointConfig,
    fetch: FetchConfig,
    wire_zstd: bool,
    engine: EngineKind,
    quinn_shape: QuinnShape,
    only: Vec<String>,
    label: Option<String>,
    write: bool,
    user_args: Vec<String>,
}

impl Opts {
    fn runs(&self, section: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| s == section)
    }
}

fn usage() -> &'static str {
    "usage: cargo bench -p cairn-bench --bench transport -- [--quick] [--reps N] \
     [--object-mib N] [--many-count N] [--many-mib N] [--tmp DIR] [--shm DIR] [--window N] \
     [--batch-mib N] [--batch-chunks N] [--no-zstd] [--congestion cubic|bbr] \
     [--engine auto|uring|psync] [--quinn-streams N] [--quinn-write-kib N] \
     [--stream-window-mib N] [--conn-window-mib N] [--only tcp,quinn,shm,disk,hash,many] \
     [--label NAME] [--no-write]"
}

fn parse_args() -> Result<Opts> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let target = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target");
    let tmp_default = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_dir())
        .or_else(|| target.canonicalize().ok())
        .unwrap_or_else(|| PathBuf::from("/var/tmp"));
    let mut o = Opts {
        quick,
        object_bytes: if quick { 256 * MIB } else { GIB },
        many_count: 8,
        many_bytes: if quick { 16 * MIB } else { 64 * MIB },
        reps: 3,
        tmp_root: tmp_default,
        shm_root: PathBuf::from("/dev/shm"),
        endpoint: EndpointConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            ..EndpointConfig::default()
        },
        fetch: FetchConfig::default(),
        wire_zstd: true,
        engine: EngineKind::Auto,
        quinn_shape: QuinnShape {
            streams: 1,
            write: IO_BUF,
        },
        only: Vec::new(),
        label: None,
        write: true,
        user_args: Vec::new(),
    };
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .with_context(|| format!("{name} needs a value\n{}", usage()))
        };
        match a.as_str() {
            // cargo passes --bench to harness = false targets.
            "--bench" | "--quick" => {}
            "--object-mib" => o.object_bytes = value(&a)?.parse::<u64>()? * MIB,
            "--many-count" => o.many_count = value(&a)?.parse()?,
            "--many-mib" => o.many_bytes = value(&a)?.parse::<u64>()? * MIB,
            "--reps" => o.reps = value(&a)?.parse::<usize>()?.max(1),
            "--tmp" => o.tmp_root = PathBuf::from(value(&a)?),
            "--shm" => o.shm_root = PathBuf::from(value(&a)?),
            "--window" => o.fetch.window = value(&a)?.parse()?,
            "--batch-mib" => o.fetch.batch_bytes = value(&a)?.parse::<u64>()? * MIB,
            "--batch-chunks" => o.fetch.batch_chunks = value(&a)?.parse()?,
            "--no-zstd" => {
                o.fetch.accept_zstd = false;
                o.wire_zstd = false;
            }
            "--congestion" => {
                o.endpoint.congestion = value(&a)?
                    .parse::<Congestion>()
                    .map_err(anyhow::Error::msg)?
            }
            "--engine" => {
                o.engine = value(&a)?
                    .parse::<EngineKind>()
                    .map_err(anyhow::Error::msg)?
            }
            "--quinn-streams" => o.quinn_shape.streams = value(&a)?.parse()?,
            "--quinn-write-kib" => {
                o.quinn_shape.write = value(&a)?.parse::<usize>()? * 1024;
            }
            "--stream-window-mib" => o.endpoint.stream_window = value(&a)?.parse::<u64>()? * MIB,
            "--conn-window-mib" => o.endpoint.conn_window = value(&a)?.parse::<u64>()? * MIB,
            "--only" => {
                o.only = value(&a)?.split(',').map(|s| s.trim().to_owned()).collect();
                for s in &o.only {
                    ensure!(
                        ["tcp", "quinn", "shm", "disk", "hash", "many"].contains(&s.as_str()),
                        "unknown section {s:?} in --only\n{}",
                        usage()
                    );
                }
            }
            "--label" => o.label = Some(value(&a)?),
            "--no-write" => o.write = false,
            "-h" | "--help" => {
                println!("{}", usage());
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{}", usage()),
        }
    }
    o.user_args = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    ensure!(o.object_bytes >= MIB, "--object-mib must be at least 1");
    ensure!(o.many_bytes >= MIB, "--many-mib must be at least 1");
    ensure!(o.many_count >= 1, "--many-count must be at least 1");
    ensure!(o.fetch.window >= 1, "--window must be at least 1");
    ensure!(
        o.quinn_shape.streams >= 1,
        "--quinn-streams must be at least 1"
    );
    ensure!(
        (1024..=IO_BUF).contains(&o.quinn_shape.write),
        "--quinn-write-kib must be 1..=1024"
    );
    ensure!(o.fetch.batch_bytes >= 1, "--batch-mib must be at least 1");
    ensure!(
        o.fetch.batch_chunks >= 1,
        "--batch-chunks must be at least 1"
    );
    Ok(o)
}

fn progress(msg: impl AsRef<str>) {
    eprintln!("[transport-bench] {}", msg.as_ref());
}

/// Throughput in MB/s (10^6 bytes per second).
fn mbps(bytes: u64, d: Duration) -> f64 {
    let s = d.as_secs_f64();
    if s == 0.0 {
        f64::INFINITY
    } else {
        bytes as f64 / s / 1e6
    }
}

/// CPU time (user + system, all threads, live and exited) this process has
/// used so far, from `/proc/self/stat`; 0 when unavailable.
fn process_cpu() -> Duration {
    static TICK: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    let tick = *TICK.get_or_init(|| {
        command_line_output(Command::new("getconf").arg("CLK_TCK"))
            .and_then(|s| s.parse::<f64>().ok())
            .filter(|t| *t > 0.0)
            .unwrap_or(100.0)
    });
    let Ok(stat) = fs::read_to_string("/proc/self/stat") else {
        return Duration::ZERO;
    };
    // Fields after the parenthesised command name: state is field 3, utime
    // field 14 and stime field 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|x| x.parse().ok())
        .collect();
    if f.len() != 2 {
        return Duration::ZERO;
    }
    Duration::from_secs_f64((f[0] + f[1]) as f64 / tick)
}

/// The kernel's count of UDP datagrams dropped because a socket's receive
/// buffer was full (`RcvbufErrors` in /proc/net/snmp, machine-wide); on
/// loopback these are the only losses QUIC sees.
fn udp_rcvbuf_errors() -> u64 {
    let snmp = fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// Wall time, process CPU time and UDP receive-buffer drops of one
/// measurement.
#[derive(Debug, Clone, Copy)]
struct Timing {
    wall: Duration,
    cpu: Duration,
    udp_drops: u64,
}

/// Starts a [`Timing`].
struct Clock {
    wall: Instant,
    cpu: Duration,
    udp_drops: u64,
}

impl Clock {
    fn start() -> Self {
        Self {
            cpu: process_cpu(),
            udp_drops: udp_rcvbuf_errors(),
            wall: Instant::now(),
        }
    }
    fn stop(&self) -> Timing {
        let wall = self.wall.elapsed();
        Timing {
            wall,
            cpu: process_cpu().saturating_sub(self.cpu),
            udp_drops: udp_rcvbuf_errors().saturating_sub(self.udp_drops),
        }
    }
}

/// A bound on how long moving `bytes` on loopback may take before we call
/// the run broken (5 MB/s plus a minute).
fn deadline(bytes: u64) -> Duration {
    Duration::from_secs(60 + bytes / 5_000_000)
}

/// Repeated measurements of one transfer of `bytes` bytes.
#[derive(Debug, Clone, Serialize)]
struct Series {
    bytes: u64,
    secs: Vec<f64>,
    mbps: Vec<f64>,
    median_mbps: f64,
    /// CPU seconds this process used per GB moved (10^9 B), per rep; for
    /// in-process measurements only (the TCP figure has a second process).
    cpu_s_per_gb: Vec<f64>,
    median_cpu_s_per_gb: f64,
    /// UDP datagrams dropped by full receive buffers during each rep.
    udp_drops: Vec<u64>,
}

impl Series {
    fn new(bytes: u64) -> Self {
        Self {
            bytes,
            secs: Vec::new(),
            mbps: Vec::new(),
            median_mbps: f64::NAN,
            cpu_s_per_gb: Vec::new(),
            median_cpu_s_per_gb: f64::NAN,
            udp_drops: Vec::new(),
        }
    }
    fn push(&mut self, d: Duration) {
        self.secs.push(d.as_secs_f64());
        self.mbps.push(mbps(self.bytes, d));
        self.median_mbps = median(&self.mbps);
    }
    fn push_timed(&mut self, t: Timing) {
        self.push(t.wall);
        self.udp_drops.push(t.udp_drops);
        if t.cpu > Duration::ZERO {
            self.cpu_s_per_gb
                .push(t.cpu.as_secs_f64() / (self.bytes as f64 / 1e9));
            self.median_cpu_s_per_gb = median(&self.cpu_s_per_gb);
        }
    }
    fn ran(&self) -> bool {
        !self.mbps.is_empty()
    }
}

/// Median over reps of `a[i] / b[i]` (each rep measured both back to back,
/// so both saw the same load); NaN unless both ran equally often.
fn paired_ratio(a: &Series, b: &Series) -> f64 {
    if !a.ran() || a.mbps.len() != b.mbps.len() {
        return f64::NAN;
    }
    let r: Vec<f64> = a.mbps.iter().zip(&b.mbps).map(|(x, y)| x / y).collect();
    median(&r)
}

/// `a / b`, NaN unless both ran.
fn ratio(a: &Series, b: &Series) -> f64 {
    if a.ran() && b.ran() {
        a.median_mbps / b.median_mbps
    } else {
        f64::NAN
    }
}

// ---------------------------------------------------------------------------
// 1. TCP limit (two processes)
// ---------------------------------------------------------------------------

/// The child side: connect, read and discard `bytes` bytes, ack with one
/// byte, exit.
fn tcp_sink(addr: &str, bytes: &str) -> Result<()> {
    let bytes: u64 = bytes.parse().context("tcp sink byte count")?;
    let addr: SocketAddr = addr.parse().context("tcp sink address")?;
    ensure!(
        addr.ip().is_loopback(),
        "the tcp sink only talks to loopback"
    );
    let mut s = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(deadline(bytes)))?;
    let mut buf = vec![0u8; IO_BUF];
    let mut got = 0u64;
    while got < bytes {
        let want = (bytes - got).min(IO_BUF as u64) as usize;
        match s.read(&mut buf[..want]) {
            Ok(0) => bail!("tcp sink: sender closed after {got} of {bytes} bytes"),
            Ok(n) => got += n as u64,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("tcp sink read"),
        }
    }
    s.write_all(&[1])?;
    s.flush()?;
    Ok(())
}

fn tcp_limit(bytes: u64, payload: &[u8]) -> Result<Duration> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let exe = std::env::current_exe().context("current_exe")?;
    let mut child = Command::new(exe)
        .arg(TCP_SINK_ARG)
        .arg(addr.to_string())
        .arg(bytes.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .context("spawn the tcp sink")?;
    let res = (|| -> Result<Duration> {
        listener.set_nonblocking(true)?;
        let wait_until = Instant::now() + Duration::from_secs(30);
        let mut stream = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if let Some(st) = child.try_wait()? {
                        bail!("tcp sink exited before connecting: {st}");
                    }
                    ensure!(
                        Instant::now() < wait_until,
                        "tcp sink did not connect in 30 s"
                    );
                    std::thread::sleep(Duration::from_micros(200));
                }
                Err(e) => return Err(e).context("accept"),
            }
        };
        let t = Instant::now();
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(deadline(bytes)))?;
        stream.set_write_timeout(Some(deadline(bytes)))?;
        let mut left = bytes;
        while left > 0 {
            let n = left.min(payload.len() as u64) as usize;
            stream.write_all(&payload[..n])?;
            left -= n as u64;
        }
        let mut ack = [0u8; 1];
        stream.read_exact(&mut ack).context("tcp sink ack")?;
        Ok(t.elapsed())
    })();
    if res.is_err() {
        let _ = child.kill();
    }
    let status = child.wait()?;
    let d = res?;
    ensure!(status.success(), "tcp sink failed: {status}");
    Ok(d)
}

// ---------------------------------------------------------------------------
// 2. Bare quinn limit
// ---------------------------------------------------------------------------

/// Path statistics of the sending (server) side of one bare quinn transfer.
#[derive(Debug, Clone, Serialize)]
struct QuinnStats {
    rtt_us: u128,
    cwnd: u64,
    current_mtu: u16,
    sent_packets: u64,
    lost_packets: u64,
    congestion_events: u64,
    udp_tx_datagrams: u64,
    udp_tx_ios: u64,
}

fn quinn_stats(s: &quinn::ConnectionStats) -> QuinnStats {
    QuinnStats {
        rtt_us: s.path.rtt.as_micros(),
        cwnd: s.path.cwnd,
        current_mtu: s.path.current_mtu,
        sent_packets: s.path.sent_packets,
        lost_packets: s.path.lost_packets,
        congestion_events: s.path.congestion_events,
        udp_tx_datagrams: s.udp_tx.datagrams,
        udp_tx_ios: s.udp_tx.ios,
    }
}

/// A shared buffer as the owner of a [`Bytes`].
struct Shared(Arc<Vec<u8>>);

impl AsRef<[u8]> for Shared {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// How the bare quinn limit moves its bytes: over `streams` concurrent
/// streams of one connection, in `write`-byte `write_chunk` calls.
#[derive(Debug, Clone, Copy, Serialize)]
struct QuinnShape {
    streams: usize,
    write: usize,
}

/// Bytes stream `i` of `n` carries out of `total`.
fn share(total: u64, n: usize, i: usize) -> u64 {
    let n = n as u64;
    total / n + u64::from((i as u64) < total % n)
}

/// Server of the bare quinn limit: accept one connection and `shape.streams`
/// streams, read each request, push `bytes` bytes in all (split evenly) in
/// `shape.write`-byte slices walking through `payload` (wrapping around),
/// then hold the connection until the client closes it. Returns the
/// sender's path statistics.
async fn quinn_push(
    ep: quinn::Endpoint,
    bytes: u64,
    payload: Bytes,
    shape: QuinnShape,
) -> Result<QuinnStats> {
    let incoming = ep.accept().await.context("endpoint closed")?;
    let conn = incoming.await.context("accept connection")?;
    let mut streams = tokio::task::JoinSet::new();
    let mut start = 0u64;
    for i in 0..shape.streams {
        let (mut send, mut recv) = conn.accept_bi().await.context("accept stream")?;
        let payload = payload.clone();
        let mut left = share(bytes, shape.streams, i);
        // Streams walk disjoint parts of a large payload.
        let mut off = usize::try_from(start % payload.len() as u64)?;
        start += left;
        streams.spawn(async move {
            recv.read_to_end(64).await.context("read request")?;
            while left > 0 {
                if off == payload.len() {
                    off = 0;
                }
                let n = (left.min(shape.write as u64) as usize).min(payload.len() - off);
                send.write_chunk(payload.slice(off..off + n)).await?;
                off += n;
                left -= n as u64;
            }
            send.finish()?;
            anyhow::Ok(())
        });
    }
    while let Some(r) = streams.join_next().await {
        r.context("push task")??;
    }
    let _ = conn.closed().await;
    Ok(quinn_stats(&conn.stats()))
}

/// Client of the bare quinn limit: connect, open the streams, ask on each
/// and read them all to the end.
async fn quinn_pull(
    ep: quinn::Endpoint,
    addr: SocketAddr,
    name: String,
    bytes: u64,
    shape: QuinnShape,
) -> Result<()> {
    let conn = ep
        .connect(addr, &name)
        .context("connect")?
        .await
        .context("handshake")?;
    let mut streams = tokio::task::JoinSet::new();
    for _ in 0..shape.streams {
        let (mut send, mut recv) = conn.open_bi().await?;
        streams.spawn(async move {
            send.write_all(b"go").await?;
            send.finish()?;
            let mut got = 0u64;
            // The same read size as the fetch client.
            while let Some(c) = recv.read_chunk(1 << 20, true).await? {
                got += c.bytes.len() as u64;
            }
            anyhow::Ok(got)
        });
    }
    let mut got = 0u64;
    while let Some(r) = streams.join_next().await {
        got += r.context("pull task")??;
    }
    conn.close(0u32.into(), b"done");
    ensure!(got == bytes, "quinn pull got {got} of {bytes} bytes");
    Ok(())
}

async fn close_endpoint(ep: &quinn::Endpoint) {
    ep.close(0u32.into(), b"bench over");
    let _ = tokio::time::timeout(Duration::from_secs(2), ep.wait_idle()).await;
}

/// One bare quinn run: one server endpoint per identity in `servers`, each
/// pushing `bytes_each` on one stream to one client endpoint, all at once.
/// Returns the wall time from the first connect to the last byte.
async fn quinn_limit(
    cfg: &EndpointConfig,
    servers: &[Identity],
    client: &Identity,
    bytes_each: u64,
    payload: &Bytes,
    shape: QuinnShape,
) -> Result<(Timing, Vec<QuinnStats>)> {
    let deny = Arc::new(DenyList::default());
    let refusals = Refusals::new();
    let cep = endpoint::bind(client, deny.clone(), refusals.clone(), cfg)?;
    let mut seps = Vec::new();
    let mut pushers = Vec::new();
    let res = async {
        for id in servers {
            let ep = endpoint::bind(id, deny.clone(), refusals.clone(), cfg)?;
            pushers.push(tokio::spawn(quinn_push(
                ep.clone(),
                bytes_each,
                payload.clone(),
                shape,
            )));
            seps.push((ep.local_addr()?, id.name().to_owned(), ep));
        }
        let t = Clock::start();
        let mut pulls = tokio::task::JoinSet::new();
        for (addr, name, _) in &seps {
            pulls.spawn(quinn_pull(
                cep.clone(),
                *addr,
                name.clone(),
                bytes_each,
                shape,
            ));
        }
        let all = async {
            while let Some(r) = pulls.join_next().await {
                r.context("quinn pull task")??;
            }
            anyhow::Ok(())
        };
        tokio::time::timeout(deadline(bytes_each * servers.len() as u64), all)
            .await
            .context("bare quinn transfer timed out")??;
        anyhow::Ok(t.stop())
    }
    .await;
    for (_, _, ep) in &seps {
        close_endpoint(ep).await;
    }
    close_endpoint(&cep).await;
    let mut stats = Vec::new();
    for p in pushers {
        match tokio::time::timeout(Duration::from_secs(5), p).await {
            Ok(Ok(Ok(st))) => stats.push(st),
            Ok(Ok(Err(e))) if res.is_ok() => return Err(e.context("quinn push")),
            _ => {}
        }
    }
    Ok((res?, stats))
}

// ---------------------------------------------------------------------------
// Cairn nodes
// ---------------------------------------------------------------------------

/// A [`cairn_node::Node`] on loopback with only its QUIC side (no HTTP
/// listeners), stopped by [`BenchNode::stop`] (which also removes its data
/// directory).
struct BenchNode {
    node: Node,
    store: Arc<Store>,
    fetcher: Fetcher,
    name: String,
    addr: SocketAddr,
    dir: PathBuf,
}

impl BenchNode {
    /// Start node `id` (its identity directory is `ids.ca_dir/NAME`) with its
    /// store in `dir` (created; must not exist).
    async fn start(ids: &Identities, id: &Identity, dir: PathBuf, opts: &Opts) -> Result<Self> {
        let name = id.name().to_owned();
        let mut cfg = NodeConfig::new(dir.join("store"));
        cfg.identity = Some(ids.ca_dir.join(&name));
        cfg.site = "bench".into();
        cfg.store.engine = opts.engine;
        cfg.endpoint = opts.endpoint.clone();
        cfg.fetch = opts.fetch.clone();
        cfg.wire_zstd = opts.wire_zstd;
        cfg.api_listen = None;
        cfg.nbd_listen = None;
        cfg.registry_listen = None;
        let node = Node::start(cfg)
            .await
            .with_context(|| format!("start node {name} in {}", dir.display()))?;
        let addr = node.local_addr().context("node has no QUIC address")?;
        Ok(Self {
            store: node.store().clone(),
            fetcher: node.fetcher().clone(),
            node,
            name,
            addr,
            dir,
        })
    }

    fn peer(&self) -> PeerAddr {
        PeerAddr::named(self.addr, self.name.clone())
    }

    /// Store `data` as an object (untimed setup).
    async fn put(&self, data: Arc<Vec<u8>>) -> Result<(ObjectId, u64)> {
        let store = self.store.clone();
        let put =
            tokio::task::spawn_blocking(move || store.put_bytes(&data, &PutOptions::default()))
                .await??;
        Ok((put.object, put.chunks))
    }

    async fn stop(self) -> Result<()> {
        let Self {
            node,
            store,
            fetcher,
            dir,
            ..
        } = self;
        node.shutdown().await;
        drop(fetcher);
        // Let the connection and stream tasks see the token and let go of
        // the store before its files go away.
        let until = Instant::now() + Duration::from_secs(5);
        while Arc::strong_count(&store) > 1 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(store);
        fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
        Ok(())
    }
}

/// Fetch one object on `node` from `peers`; returns the time and report.
async fn timed_fetch(
    node: &BenchNode,
    id: ObjectId,
    peers: Vec<PeerAddr>,
    bytes: u64,
) -> Result<(Timing, FetchReport)> {
    let t = Clock::start();
    // A task on the runtime's workers, as a node runs it (not on the thread
    // blocked in `block_on`).
    let f = node.fetcher.clone();
    let task = tokio::spawn(async move {
        f.fetch_object(&ObjectKey::Id(id), &peers, Priority::Background)
            .await
    });
    let (got, report) = tokio::time::timeout(deadline(bytes), task)
        .await
        .context("fetch timed out")?
        .context("fetch task")?
        .context("fetch_object")?;
    let d = t.stop();
    ensure!(got == id, "fetched {got}, asked for {id}");
    ensure!(
        report.bytes == bytes,
        "fetch moved {} bytes, object has {bytes}",
        report.bytes
    );
    Ok((d, report))
}

/// Distinct scratch dir names for fresh fetching nodes.
struct DirSeq {
    root: PathBuf,
    next: usize,
}

impl DirSeq {
    fn next(&mut self, what: &str) -> PathBuf {
        self.next += 1;
        self.root.join(format!("{what}-{}", self.next))
    }
}

// ---------------------------------------------------------------------------
// Sections 1-3: one object
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Serialize)]
struct FetchDetail {
    chunks: u64,
    fetched: u64,
    retries: u64,
    verify_failures: u64,
}

impl From<&FetchReport> for FetchDetail {
    fn from(r: &FetchReport) -> Self {
        Self {
            chunks: r.chunks,
            fetched: r.fetched,
            retries: r.retries,
            verify_failures: r.verify_failures,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
struct SingleResult {
    bytes: u64,
    object_chunks: u64,
    /// I/O engine the stores use.
    engine: String,
    tcp: Series,
    quinn: Series,
    /// Bare quinn pushing the object's own bytes (1 GiB in memory, cold in
    /// cache) instead of one hot 1 MiB buffer (context).
    quinn_cold: Series,
    quinn_stats: Vec<QuinnStats>,
    cairn_shm: Series,
    cairn_disk: Series,
    blake3: Series,
    plain_write_disk: Series,
    fetch_details: Vec<FetchDetail>,
    shm_over_quinn: f64,
    /// Median of the per-rep ratios (context).
    shm_over_quinn_paired: f64,
    /// Bare quinn CPU-s/GB over Cairn (tmpfs) CPU-s/GB: the throughput ratio
    /// when both are CPU-bound on the same cores, insensitive to other load.
    shm_cpu_efficiency: f64,
    shm_over_tcp: f64,
    disk_over_quinn: f64,
    disk_over_tcp: f64,
    quinn_over_tcp: f64,
    pass: Option<bool>,
}

struct Env<'a> {
    opts: &'a Opts,
    /// Holders' stores and the judged fetching stores (tmpfs when usable).
    fast: PathBuf,
    /// The work disk.
    disk: PathBuf,
    ids: &'a Identities,
    payload: Bytes,
}

struct Identities {
    /// Where `cairn cluster add-node` put each node's identity directory.
    ca_dir: PathBuf,
    a: Identity,
    c: Identity,
    holders: Vec<Identity>,
}

async fn section_single(env: &Env<'_>) -> Result<SingleResult> {
    let o = env.opts;
    let bytes = o.object_bytes;
    let mut r = SingleResult {
        bytes,
        object_chunks: 0,
        engine: String::new(),
        tcp: Series::new(bytes),
        quinn: Series::new(bytes),
        quinn_cold: Series::new(bytes),
        quinn_stats: Vec::new(),
        cairn_shm: Series::new(bytes),
        cairn_disk: Series::new(bytes),
        blake3: Series::new(bytes),
        plain_write_disk: Series::new(bytes),
        fetch_details: Vec::new(),
        shm_over_quinn: f64::NAN,
        shm_over_quinn_paired: f64::NAN,
        shm_cpu_efficiency: f64::NAN,
        shm_over_tcp: f64::NAN,
        disk_over_quinn: f64::NAN,
        disk_over_tcp: f64::NAN,
        quinn_over_tcp: f64::NAN,
        pass: None,
    };
    let need_node = o.runs("shm") || o.runs("disk");
    let need_data = need_node || o.runs("hash") || o.runs("quinn");
    let data = if need_data {
        progress(format!("generating a {} random object", human_bytes(bytes)));
        let n = usize::try_from(bytes)?;
        Some(Arc::new(
            tokio::task::spawn_blocking(move || random_bytes(n, SEED_OBJECT)).await?,
        ))
    } else {
        None
    };
    let mut fast_seq = DirSeq {
        root: env.fast.clone(),
        next: 0,
    };
    let mut disk_seq = DirSeq {
        root: env.disk.clone(),
        next: 0,
    };
    let holder = match (&data, need_node) {
        (Some(data), true) => {
            let a = BenchNode::start(env.ids, &env.ids.a, env.fast.join("node-a"), o).await?;
            progress(format!(
                "node A: ingesting the object into {}",
                a.dir.display()
            ));
            let (id, chunks) = a.put(data.clone()).await?;
            r.object_chunks = chunks;
            r.engine = a.store.engine_name().to_owned();
            Some((a, id))
        }
        _ => None,
    };
    let res = async {
        for rep in 0..o.reps {
            progress(format!("one object: rep {}/{}", rep + 1, o.reps));
            if o.runs("tcp") {
                let payload = env.payload.clone();
                let d = tokio::task::spawn_blocking(move || tcp_limit(bytes, &payload)).await??;
                progress(format!("  tcp copy         {:8.1} MB/s", mbps(bytes, d)));
                r.tcp.push(d);
            }
            if o.runs("quinn") {
                let (d, mut st) = quinn_limit(
                    &o.endpoint,
                    std::slice::from_ref(&env.ids.a),
                    &env.ids.c,
                    bytes,
                    &env.payload,
                    o.quinn_shape,
                )
                .await?;
                progress(format!(
                    "  bare quinn       {:8.1} MB/s, {:.2} CPU-s",
                    mbps(bytes, d.wall),
                    d.cpu.as_secs_f64()
                ));
                r.quinn.push_timed(d);
                r.quinn_stats.append(&mut st);
                if let Some(data) = &data {
                    let (d, _) = quinn_limit(
                        &o.endpoint,
                        std::slice::from_ref(&env.ids.a),
                        &env.ids.c,
                        bytes,
                        &Bytes::from_owner(Shared(data.clone())),
                        o.quinn_shape,
                    )
                    .await?;
                    progress(format!(
                        "  bare quinn cold  {:8.1} MB/s, {:.2} CPU-s",
                        mbps(bytes, d.wall),
                        d.cpu.as_secs_f64()
                    ));
                    r.quinn_cold.push_timed(d);
                }
            }
            if let Some((a, id)) = &holder {
                for (label, on_disk) in [("shm", false), ("disk", true)] {
                    if !o.runs(label) {
                        continue;
                    }
                    let dir = if on_disk {
                        disk_seq.next("node-c")
                    } else {
                        fast_seq.next("node-c")
                    };
                    let c = BenchNode::start(env.ids, &env.ids.c, dir, o).await?;
                    let fetched = timed_fetch(&c, *id, vec![a.peer()], bytes).await;
                    c.stop().await?;
                    let (d, report) = fetched?;
                    progress(format!(
                        "  cairn fetch {label:<5}{:8.1} MB/s, {:.2} CPU-s ({} chunks, {} retries)",
                        mbps(bytes, d.wall),
                        d.cpu.as_secs_f64(),
                        report.fetched,
                        report.retries
                    ));
                    r.fetch_details.push(FetchDetail::from(&report));
                    if on_disk {
                        r.cairn_disk.push_timed(d);
                    } else {
                        r.cairn_shm.push_timed(d);
                    }
                }
            }
            if let Some(data) = &data {
                if o.runs("hash") {
                    let data = data.clone();
                    let d = tokio::task::spawn_blocking(move || {
                        let t = Clock::start();
                        std::hint::black_box(blake3::hash(&data));
                        t.stop()
                    })
                    .await?;
                    // In memory: no network, no UDP drops to count.
                    r.blake3.push_timed(d);
                    r.blake3.udp_drops.clear();
                }
                if o.runs("disk") {
                    let path = disk_seq.next("plain-write");
                    let data = data.clone();
                    let d = tokio::task::spawn_blocking(move || {
                        let d = plain_write(&path, &data);
                        let _ = fs::remove_file(&path);
                        d
                    })
                    .await??;
                    r.plain_write_disk.push(d);
                }
            }
        }
        anyhow::Ok(())
    }
    .await;
    if let Some((a, _)) = holder {
        a.stop().await?;
    }
    res?;
    r.shm_over_quinn = ratio(&r.cairn_shm, &r.quinn);
    r.shm_over_tcp = ratio(&r.cairn_shm, &r.tcp);
    r.shm_over_quinn_paired = paired_ratio(&r.cairn_shm, &r.quinn);
    r.shm_cpu_efficiency = r.quinn.median_cpu_s_per_gb / r.cairn_shm.median_cpu_s_per_gb;
    r.disk_over_quinn = ratio(&r.cairn_disk, &r.quinn);
    r.disk_over_tcp = ratio(&r.cairn_disk, &r.tcp);
    r.quinn_over_tcp = ratio(&r.quinn, &r.tcp);
    r.pass = r
        .shm_over_quinn
        .is_finite()
        .then_some(r.shm_over_quinn >= TARGET);
    Ok(r)
}

// ---------------------------------------------------------------------------
// Section 4: many objects at once
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Serialize)]
struct ManyResult {
    holders: usize,
    objects: usize,
    object_bytes: u64,
    total_bytes: u64,
    quinn3: Series,
    own_holder: Series,
    all_holders: Series,
    /// Share of chunks each holder served in the all-holders variant, per rep.
    all_holders_split: Vec<Vec<u64>>,
    retries: Vec<u64>,
}

async fn fetch_many(
    node: &BenchNode,
    jobs: Vec<(ObjectId, Vec<PeerAddr>)>,
    each: u64,
) -> Result<(Timing, FetchReport)> {
    let t = Clock::start();
    let mut set = tokio::task::JoinSet::new();
    for (id, peers) in jobs {
        let f = node.fetcher.clone();
        set.spawn(async move {
            f.fetch_object(&ObjectKey::Id(id), &peers, Priority::Background)
                .await
                .map(|(got, rep)| (got == id, rep))
        });
    }
    let mut total = FetchReport::default();
    let n = set.len() as u64;
    let all = async {
        while let Some(r) = set.join_next().await {
            let (same, rep) = r.context("fetch task")?.context("fetch_object")?;
            ensure!(same, "a fetch returned another object");
            total.chunks += rep.chunks;
            total.fetched += rep.fetched;
            total.bytes += rep.bytes;
            total.retries += rep.retries;
            total.verify_failures += rep.verify_failures;
            for (k, v) in rep.per_peer {
                *total.per_peer.entry(k).or_default() += v;
            }
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(deadline(each * n), all)
        .await
        .context("concurrent fetches timed out")??;
    let d = t.stop();
    ensure!(
        total.bytes == each * n,
        "fetches moved {} bytes, expected {}",
        total.bytes,
        each * n
    );
    Ok((d, total))
}

async fn section_many(env: &Env<'_>) -> Result<ManyResult> {
    let o = env.opts;
    let objects = HOLDERS * o.many_count;
    let total = o.many_bytes * objects as u64;
    let mut r = ManyResult {
        holders: HOLDERS,
        objects,
        object_bytes: o.many_bytes,
        total_bytes: total,
        quinn3: Series::new(total),
        own_holder: Series::new(total),
        all_holders: Series::new(total),
        all_holders_split: Vec::new(),
        retries: Vec::new(),
    };
    let mut holders = Vec::new();
    for (i, id) in env.ids.holders.iter().enumerate() {
        holders.push(BenchNode::start(env.ids, id, env.fast.join(format!("holder-{i}")), o).await?);
    }
    let mut seq = DirSeq {
        root: env.fast.clone(),
        next: 0,
    };
    let res = async {
        progress(format!(
            "many: ingesting {objects} objects of {} into each of {HOLDERS} holders",
            human_bytes(o.many_bytes)
        ));
        let mut ids = Vec::new();
        for j in 0..objects {
            let n = usize::try_from(o.many_bytes)?;
            let seed = SEED_MANY + j as u64;
            let data = Arc::new(tokio::task::spawn_blocking(move || random_bytes(n, seed)).await?);
            let mut id = None;
            for h in &holders {
                let (oid, _) = h.put(data.clone()).await?;
                if let Some(x) = id {
                    ensure!(x == oid, "holders disagree on an object id");
                }
                id = Some(oid);
            }
            ids.push(id.context("no holders")?);
        }
        let peers: Vec<PeerAddr> = holders.iter().map(BenchNode::peer).collect();
        for rep in 0..o.reps {
            progress(format!("many objects: rep {}/{}", rep + 1, o.reps));
            let (d, _) = quinn_limit(
                &o.endpoint,
                &env.ids.holders,
                &env.ids.c,
                total / HOLDERS as u64,
                &env.payload,
                o.quinn_shape,
            )
            .await?;
            progress(format!(
                "  bare quinn x{HOLDERS}    {:8.1} MB/s, {:.2} CPU-s",
                mbps(total, d.wall),
                d.cpu.as_secs_f64()
            ));
            r.quinn3.push_timed(d);
            for all in [false, true] {
                let jobs: Vec<(ObjectId, Vec<PeerAddr>)> = ids
                    .iter()
                    .enumerate()
                    .map(|(j, id)| {
                        let p = if all {
                            peers.clone()
                        } else {
                            vec![peers[j / o.many_count].clone()]
                        };
                        (*id, p)
                    })
                    .collect();
                let c = BenchNode::start(env.ids, &env.ids.c, seq.next("many-c"), o).await?;
                let fetched = fetch_many(&c, jobs, o.many_bytes).await;
                c.stop().await?;
                let (d, report) = fetched?;
                let label = if all { "all holders" } else { "own holder" };
                progress(format!(
                    "  cairn {label:<12}{:8.1} MB/s, {:.2} CPU-s ({} retries)",
                    mbps(total, d.wall),
                    d.cpu.as_secs_f64(),
                    report.retries
                ));
                r.retries.push(report.retries);
                if all {
                    r.all_holders_split.push(
                        peers
                            .iter()
                            .map(|p| report.per_peer.get(&p.addr).copied().unwrap_or(0))
                            .collect(),
                    );
                    r.all_holders.push_timed(d);
                } else {
                    r.own_holder.push_timed(d);
                }
            }
        }
        anyhow::Ok(())
    }
    .await;
    for h in holders {
        h.stop().await?;
    }
    res?;
    Ok(r)
}

// ---------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------

fn cell(s: &Series) -> String {
    if !s.ran() {
        return "—".into();
    }
    let reps: Vec<String> = s.mbps.iter().map(|g| format!("{g:.0}")).collect();
    format!("**{:.0}** ({})", s.median_mbps, reps.join(", "))
}

fn drops_cell(s: &Series) -> String {
    if s.udp_drops.is_empty() {
        return "—".into();
    }
    let v: Vec<String> = s.udp_drops.iter().map(u64::to_string).collect();
    v.join(", ")
}

fn read_trim(path: &str) -> String {
    fs::read_to_string(path).map_or_else(|_| "unknown".into(), |s| s.trim().to_owned())
}

#[derive(Debug, Clone, Serialize)]
struct NetFacts {
    lo_mtu: String,
    rmem_max: String,
    wmem_max: String,
    fast_dir: String,
    fast_fs: String,
    fast_note: Option<String>,
    /// `git rev-parse --short HEAD` and the files changed since under
    /// transport/ and chunkstore/ (the code measured).
    git: String,
}

struct Report<'a> {
    opts: &'a Opts,
    command: String,
    argv: Vec<String>,
    date: String,
    machine: MachineFacts,
    net: NetFacts,
    single: SingleResult,
    many: Option<ManyResult>,
    total_secs: f64,
    loadavg_end: String,
}

fn render(r: &Report<'_>) -> String {
    let mut s = String::new();
    let o = r.opts;
    let _ = writeln!(
        s,
        "# Cairn transport benchmark — {}{}\n",
        r.date,
        if o.quick { " (quick)" } else { "" }
    );
    let _ = writeln!(s, "Command: `{}`  ", r.command);
    let _ = writeln!(s, "Binary argv: `{}`  ", r.argv.join(" "));
    let _ = writeln!(s, "Total run time: {:.0} s\n", r.total_secs);

    let m = &r.machine;
    let n = &r.net;
    let _ = writeln!(s, "## Machine\n");
    let mut t = MdTable::new(&["fact", "value"]);
    t.row(&["nproc", &m.nproc.to_string()])
        .row(&["CPU", &m.cpu_model])
        .row(&["CPU flags", &m.cpu_flags.join(", ")])
        .row(&["kernel", &m.kernel])
        .row(&["memory", &human_bytes(m.mem_bytes)])
        .row(&[
            "work disk (C's disk variant, plain write)",
            &format!("{} (under {})", m.work_fs, o.tmp_root.display()),
        ])
        .row(&[
            "fast dir (holders' stores, C's tmpfs variant)",
            &format!("{} ({})", n.fast_fs, n.fast_dir),
        ])
        .row(&["loopback MTU", &n.lo_mtu])
        .row(&[
            "net.core.rmem_max / wmem_max",
            &format!("{} / {}", n.rmem_max, n.wmem_max),
        ])
        .row(&[
            "load average at start / end",
            &format!("{} / {}", m.loadavg, r.loadavg_end),
        ])
        .row(&["code (git)", &n.git]);
    s.push_str(&t.render());
    if let Some(note) = &n.fast_note {
        let _ = writeln!(s, "\n**Note:** {note}");
    }
    let e = &o.endpoint;
    let f = &o.fetch;
    let _ = writeln!(
        s,
        "\nAll nodes and endpoints run in this one process on one tokio multi-thread runtime \
         with 2 workers (the TCP sink is a second process). Transport parameters \
         (`EndpointConfig` → `endpoint::transport_config`, used by bare quinn and Cairn alike): \
         congestion {:?}, stream window {}, connection window {}, max streams {}. \
         `FetchConfig`: window {}, batch {} chunks / {}, accept zstd {}; server wire zstd {}. \
         Stores: `StoreConfig::default()` with engine {:?} (in use: {}). Each figure is the \
         median of {} repetitions (MB/s = 10^6 B/s; median **bold**, then each repetition). \
         CPU-s/GB = CPU seconds (user + system, all threads) this process used per 10^9 bytes \
         moved, median; the machine has {} cores, so wall time per GB can be no less than \
         CPU-s/GB ÷ {}. UDP drops = datagrams the kernel dropped for a full socket receive \
         buffer during each rep (`RcvbufErrors`, machine-wide): QUIC's only losses on \
         loopback.\n",
        e.congestion,
        human_bytes(e.stream_window),
        human_bytes(e.conn_window),
        e.max_streams,
        f.window,
        f.batch_chunks,
        human_bytes(f.batch_bytes),
        f.accept_zstd,
        o.wire_zstd,
        o.engine,
        if r.single.engine.is_empty() {
            "—"
        } else {
            &r.single.engine
        },
        o.reps,
        m.nproc,
        m.nproc
    );

    let g = &r.single;
    let _ = writeln!(s, "## Summary\n");
    let mut t = MdTable::new(&["target", "figure", "value", "result"]);
    t.row(&[
        format!("Cairn fetch / bare quinn ≥ {TARGET}"),
        "one connection, C's store on tmpfs".to_string(),
        ratio_cell(g.shm_over_quinn),
        g.pass.map_or("n/a".into(), |p| pass_fail(p).to_string()),
    ]);
    t.row(&[
        "(context)".to_string(),
        "the same, median of per-rep ratios (each rep runs both back to back)".to_string(),
        ratio_cell(g.shm_over_quinn_paired),
        String::new(),
    ]);
    t.row(&[
        "(context)".to_string(),
        "CPU-s/GB of bare quinn / of Cairn fetch (tmpfs): the ratio when both are CPU-bound"
            .to_string(),
        ratio_cell(g.shm_cpu_efficiency),
        String::new(),
    ]);
    t.row(&[
        "(context)".to_string(),
        "Cairn fetch (tmpfs) / TCP".to_string(),
        ratio_cell(g.shm_over_tcp),
        String::new(),
    ]);
    t.row(&[
        "(context)".to_string(),
        "Cairn fetch (disk) / bare quinn".to_string(),
        ratio_cell(g.disk_over_quinn),
        String::new(),
    ]);
    if let Some(mn) = &r.many {
        t.row(&[
            "(context)".to_string(),
            format!("{} objects, own holder / bare quinn", mn.objects),
            ratio_cell(ratio(&mn.own_holder, &g.quinn)),
            String::new(),
        ]);
        t.row(&[
            "(context)".to_string(),
            format!("{} objects, all holders / bare quinn", mn.objects),
            ratio_cell(ratio(&mn.all_holders, &g.quinn)),
            String::new(),
        ]);
    }
    s.push_str(&t.render());

    let _ = writeln!(
        s,
        "\n## One object ({}; {} chunks)\n",
        human_bytes(g.bytes),
        g.object_chunks
    );
    let mut t = MdTable::new(&[
        "figure",
        "MB/s",
        "CPU-s/GB",
        "UDP drops",
        "/ bare quinn",
        "/ TCP",
    ]);
    let rows: [(&str, &Series); 7] = [
        ("TCP copy, 2 processes (limit)", &g.tcp),
        ("bare quinn, 1 stream, mutual TLS (limit)", &g.quinn),
        (
            "bare quinn, pushing the object's own bytes (context)",
            &g.quinn_cold,
        ),
        ("**Cairn fetch, C on tmpfs**", &g.cairn_shm),
        ("Cairn fetch, C on work disk (context)", &g.cairn_disk),
        ("BLAKE3, 1 thread, in memory (context)", &g.blake3),
        (
            "plain write + sync_data, work disk (context)",
            &g.plain_write_disk,
        ),
    ];
    for (name, x) in rows {
        t.row(&[
            name.to_string(),
            cell(x),
            ratio_cell(x.median_cpu_s_per_gb),
            drops_cell(x),
            ratio_cell(ratio(x, &g.quinn)),
            ratio_cell(ratio(x, &g.tcp)),
        ]);
    }
    s.push_str(&t.render());
    let _ = writeln!(
        s,
        "\n- TCP: the bench re-executes itself as a sink process (`{TCP_SINK_ARG} ADDR BYTES`) \
         that reads and discards; the parent writes from a {} buffer, timed from accept to the \
         sink's one-byte ack.\n\
         - Bare quinn: server pushes {} `Bytes` with `write_chunk` on {} bidirectional \
         stream(s), client `read_chunk(1 MiB)` and discards; timed from `connect` to end of \
         stream. No Cairn protocol, no hashing, no store. The context row pushes slices of \
         the object's own bytes (one {} buffer in memory, so the sender reads memory that is \
         not in cache, as Cairn's server does) instead of one hot 1 MiB buffer.\n\
         - Cairn fetch: `Fetcher::fetch_object(ObjectKey::Id, [A], Priority::Background)` on a \
         fresh node C (fresh store, no connection yet), timed from the call to its return: \
         connect + Hello + recipe + every chunk verified (BLAKE3) and stored with fdatasync. \
         A's store (source, read with verification) is in the fast dir.",
        human_bytes(IO_BUF as u64),
        human_bytes(o.quinn_shape.write as u64),
        o.quinn_shape.streams,
        human_bytes(g.bytes),
    );
    if let Some(q) = g.quinn_stats.first() {
        let _ = writeln!(
            s,
            "- Bare quinn sender path stats (first rep, at close): rtt {} µs, cwnd {}, MTU {}, \
             {} packets sent, {} lost, {} congestion events; {} datagrams sent in {} \
             send calls (GSO batches).",
            q.rtt_us,
            human_bytes(q.cwnd),
            q.current_mtu,
            q.sent_packets,
            q.lost_packets,
            q.congestion_events,
            q.udp_tx_datagrams,
            q.udp_tx_ios
        );
    }
    if let Some(d) = g.fetch_details.first() {
        let retries: u64 = g.fetch_details.iter().map(|d| d.retries).sum();
        let bad: u64 = g.fetch_details.iter().map(|d| d.verify_failures).sum();
        let _ = writeln!(
            s,
            "- Fetch reports: {} chunks per fetch; {retries} retries and {bad} verification \
             failures over all {} fetches.",
            d.chunks,
            g.fetch_details.len()
        );
    }

    if let Some(mn) = &r.many {
        let _ = writeln!(
            s,
            "\n## Many objects at once ({} holders × {} objects of {} = {})\n",
            mn.holders,
            mn.objects / mn.holders,
            human_bytes(mn.object_bytes),
            human_bytes(mn.total_bytes)
        );
        let mut t = MdTable::new(&[
            "figure",
            "aggregate MB/s",
            "CPU-s/GB",
            "UDP drops",
            "/ bare quinn (1 conn)",
            &format!("/ bare quinn ×{}", mn.holders),
            "/ TCP",
        ]);
        let rows: [(String, &Series); 3] = [
            (
                format!(
                    "bare quinn, {} connections at once (limit, context)",
                    mn.holders
                ),
                &mn.quinn3,
            ),
            (
                format!("Cairn, {} fetches at once, own holder each", mn.objects),
                &mn.own_holder,
            ),
            (
                format!(
                    "Cairn, {} fetches at once, all {} holders each",
                    mn.objects, mn.holders
                ),
                &mn.all_holders,
            ),
        ];
        for (name, x) in rows {
            t.row(&[
                name,
                cell(x),
                ratio_cell(x.median_cpu_s_per_gb),
                drops_cell(x),
                ratio_cell(ratio(x, &g.quinn)),
                ratio_cell(ratio(x, &mn.quinn3)),
                ratio_cell(ratio(x, &g.tcp)),
            ]);
        }
        s.push_str(&t.render());
        let _ = writeln!(
            s,
            "\nEvery holder holds all {} objects; only the peer lists differ. C is a fresh node \
             (store in the fast dir) per measurement; the {} `fetch_object` calls run as \
             concurrent tasks on one `Fetcher`; aggregate = total bytes / wall time to the last \
             one. Bare quinn ×{}: one server endpoint per holder identity, each pushing 1/{} of \
             the bytes to one client endpoint at once. Retries per measurement: {:?}.",
            mn.objects, mn.objects, mn.holders, mn.holders, mn.retries
        );
        if !mn.all_holders_split.is_empty() {
            let _ = writeln!(
                s,
                "\nChunks served per holder in the all-holders variant, per rep: {:?}.",
                mn.all_holders_split
            );
        }
    }
    s
}

fn fs_type(dir: &Path) -> String {
    command_line_output(Command::new("stat").args(["-f", "-c", "%T"]).arg(dir))
        .unwrap_or_else(|| "unknown".into())
}

fn fs_avail(dir: &Path) -> Option<u64> {
    let out = command_line_output(Command::new("stat").args(["-f", "-c", "%a %S"]).arg(dir))?;
    let mut it = out.split_whitespace();
    let blocks: u64 = it.next()?.parse().ok()?;
    let bsize: u64 = it.next()?.parse().ok()?;
    Some(blocks * bsize)
}

fn main() -> Result<()> {
    let raw: Vec<String> = std::env::args().collect();
    if raw.get(1).map(String::as_str) == Some(TCP_SINK_ARG) {
        ensure!(raw.len() == 4, "{TCP_SINK_ARG} ADDR BYTES");
        return tcp_sink(&raw[2], &raw[3]);
    }
    let opts = parse_args()?;
    let started = Instant::now();
    let command = format!(
        "cargo bench -p cairn-bench --bench transport{}",
        if opts.user_args.is_empty() {
            String::new()
        } else {
            format!(" -- {}", opts.user_args.join(" "))
        }
    );
    fs::create_dir_all(&opts.tmp_root)?;
    let work = tempfile::Builder::new()
        .prefix("cairn-bench-transport-")
        .tempdir_in(&opts.tmp_root)
        .with_context(|| format!("create a temp dir in {}", opts.tmp_root.display()))?;
    progress(format!("work dir {}", work.path().display()));
    let machine = MachineFacts::collect(work.path());
    if machine.work_fs == "tmpfs" {
        progress("warning: the work dir is on tmpfs; use --tmp DIR on a real filesystem");
    }

    // The fast dir: tmpfs for the holders and the judged fetching node.
    let objects = (HOLDERS * opts.many_count) as u64;
    let need = (2 * opts.object_bytes).max((HOLDERS as u64 + 1) * objects * opts.many_bytes)
        + opts.object_bytes / 4
        + 256 * MIB;
    let mut fast_note = None;
    let shm = if !opts.shm_root.is_dir() {
        fast_note = Some(format!(
            "{} does not exist: the holders' stores and the 'tmpfs' variant of C use the work \
             disk instead, so that row measures the disk too",
            opts.shm_root.display()
        ));
        None
    } else if fs_avail(&opts.shm_root).is_some_and(|a| a < need) {
        fast_note = Some(format!(
            "{} has less than the {} needed free: the holders' stores and the 'tmpfs' variant \
             of C use the work disk instead, so that row measures the disk too",
            opts.shm_root.display(),
            human_bytes(need)
        ));
        None
    } else {
        match tempfile::Builder::new()
            .prefix("cairn-bench-transport-")
            .tempdir_in(&opts.shm_root)
        {
            Ok(d) => Some(d),
            Err(e) => {
                fast_note = Some(format!(
                    "cannot use {} ({e}): the holders' stores and the 'tmpfs' variant of C \
                     use the work disk instead",
                    opts.shm_root.display()
                ));
                None
            }
        }
    };
    if let Some(n) = &fast_note {
        progress(format!("warning: {n}"));
    }
    let fast = match &shm {
        Some(d) => d.path().to_path_buf(),
        None => work.path().join("fast"),
    };
    let disk = work.path().join("disk");
    fs::create_dir_all(&fast)?;
    fs::create_dir_all(&disk)?;
    let fast_fs = fs_type(&fast);
    if shm.is_some() && fast_fs != "tmpfs" {
        fast_note = Some(format!(
            "{} is {fast_fs}, not tmpfs",
            opts.shm_root.display()
        ));
    }
    let net = NetFacts {
        lo_mtu: read_trim("/sys/class/net/lo/mtu"),
        rmem_max: read_trim("/proc/sys/net/core/rmem_max"),
        wmem_max: read_trim("/proc/sys/net/core/wmem_max"),
        fast_dir: fast.display().to_string(),
        fast_fs,
        fast_note,
        git: git_facts(&["transport", "chunkstore"]),
    };

    let ca_dir = work.path().join("ca");
    let ca = ClusterCa::init(&ca_dir)?;
    let identity =
        |name: &str| -> Result<Identity> { Ok(Identity::load(&ca.add_node(&ca_dir, name)?)?) };
    let ids = Identities {
        ca_dir: ca_dir.clone(),
        a: identity("node-a")?,
        c: identity("node-c")?,
        holders: (1..=HOLDERS)
            .map(|i| identity(&format!("holder-{i}")))
            .collect::<Result<_>>()?,
    };
    let env = Env {
        opts: &opts,
        fast,
        disk,
        ids: &ids,
        payload: Bytes::from(random_bytes(IO_BUF, SEED_PUSH)),
    };

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (single, many) = rt.block_on(async {
        let single = section_single(&env).await?;
        let many = if opts.runs("many") {
            Some(section_many(&env).await?)
        } else {
            None
        };
        anyhow::Ok((single, many))
    })?;
    rt.shutdown_timeout(Duration::from_secs(5));

    let report = Report {
        opts: &opts,
        command,
        argv: std::env::args().collect(),
        date: today(),
        machine,
        net,
        single,
        many,
        total_secs: started.elapsed().as_secs_f64(),
        loadavg_end: cairn_bench::loadavg(),
    };
    let md = render(&report);
    let e = &opts.endpoint;
    let f = &opts.fetch;
    let json = json!({
        "date": report.date,
        "command": report.command,
        "argv": report.argv,
        "quick": opts.quick,
        "params": {
            "object_bytes": opts.object_bytes,
            "many_count_per_holder": opts.many_count,
            "many_object_bytes": opts.many_bytes,
            "holders": HOLDERS,
            "reps": opts.reps,
            "work_root": opts.tmp_root,
            "only": opts.only,
            "runtime": "tokio multi-thread, 2 workers, one process",
            "endpoint": {
                "congestion": format!("{:?}", e.congestion),
                "stream_window": e.stream_window,
                "conn_window": e.conn_window,
                "max_streams": e.max_streams,
            },
            "fetch": {
                "window": f.window,
                "batch_chunks": f.batch_chunks,
                "batch_bytes": f.batch_bytes,
                "accept_zstd": f.accept_zstd,
            },
            "wire_zstd": opts.wire_zstd,
            "store_engine": format!("{:?}", opts.engine),
            "quinn_shape": opts.quinn_shape,
        },
        "machine": report.machine,
        "net": report.net,
        "target": { "cairn_over_quinn": TARGET },
        "single": report.single,
        "many": report.many,
        "total_secs": report.total_secs,
        "loadavg_end": report.loadavg_end,
    });
    if let Some(d) = shm {
        d.close().context("remove the tmpfs dir")?;
    }
    work.close().context("remove the work dir")?;

    print!("{md}");
    if opts.write {
        let mut stem = format!(
            "transport-{}{}",
            report.date,
            if opts.quick { "-quick" } else { "" }
        );
        if let Some(l) = &opts.label {
            stem.push('-');
            stem.push_str(l);
        }
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("results");
        let (m, j) = write_results(&dir, &stem, &md, &json)?;
        progress(format!("wrote {} and {}", m.display(), j.display()));
    }
    Ok(())
}
