//! The NBD server against real clients: libnbd's nbdinfo and nbdcopy,
//! qemu-img and qemu-io, fio's nbd engine; plus hostile input over a raw
//! socket.
//!
//! The exports here are test scaffolding: a `Vec<u8>` RAM disk (writable)
//! and a read-only export over a file of random bytes.
//!
//! A test whose client binary is missing is skipped with a printed reason,
//! or fails when `CAIRN_REQUIRE_CLIENTS=1`. Install the clients with
//! `apt-get install -y libnbd-bin nbdkit fio qemu-utils`.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::process::Output;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use cairn_nbd::consts::*;
use cairn_nbd::proto::{encode_option, encode_request, RequestHeader, ALLOCATION_CONTEXT_ID};
use cairn_nbd::server::{serve_with_stats, ServerLimits, ServerStats, StatsSnapshot};
use cairn_nbd::{BoxFuture, Export, ExportError, ExportProvider, Extent, OpenError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const RAM_SIZE: usize = 64 << 20;
const RO_SIZE: usize = 8 << 20;
/// Granularity of the RAM disk's block status.
const MAP_BLOCK: usize = 64 << 10;
const IO_TIMEOUT: Duration = Duration::from_secs(20);

// ----- exports -----

/// A writable RAM disk.
struct MemExport {
    data: RwLock<Vec<u8>>,
}

impl MemExport {
    fn new(size: usize) -> Self {
        Self {
            data: RwLock::new(vec![0; size]),
        }
    }

    fn snapshot(&self, offset: usize, len: usize) -> Vec<u8> {
        self.data.read().unwrap()[offset..offset + len].to_vec()
    }

    fn fill(&self, offset: usize, len: usize, byte: u8) {
        self.data.write().unwrap()[offset..offset + len].fill(byte);
    }
}

impl Export for MemExport {
    fn size(&self) -> u64 {
        self.data.read().unwrap().len() as u64
    }

    fn read_only(&self) -> bool {
        false
    }

    fn can_multi_conn(&self) -> bool {
        true
    }

    fn description(&self) -> Option<String> {
        Some("test RAM disk".into())
    }

    fn read<'a>(
        &'a self,
        offset: u64,
        buf: &'a mut [u8],
    ) -> BoxFuture<'a, Result<(), ExportError>> {
        Box::pin(async move {
            let d = self.data.read().unwrap();
            let o = offset as usize;
            buf.copy_from_slice(&d[o..o + buf.len()]);
            Ok(())
        })
    }

    fn write(
        &self,
        offset: u64,
        data: Bytes,
        _fua: bool,
    ) -> BoxFuture<'_, Result<(), ExportError>> {
        Box::pin(async move {
            let o = offset as usize;
            self.data.write().unwrap()[o..o + data.len()].copy_from_slice(&data);
            Ok(())
        })
    }

    fn trim(&self, offset: u64, len: u32, _fua: bool) -> BoxFuture<'_, Result<(), ExportError>> {
        self.fill(offset as usize, len as usize, 0);
        Box::pin(async { Ok(()) })
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        _fua: bool,
        _no_hole: bool,
    ) -> BoxFuture<'_, Result<(), ExportError>> {
        self.fill(offset as usize, len as usize, 0);
        Box::pin(async { Ok(()) })
    }

    /// All-zero 64 KiB blocks are reported as holes.
    fn block_status(
        &self,
        offset: u64,
        len: u32,
    ) -> BoxFuture<'_, Result<Vec<Extent>, ExportError>> {
        Box::pin(async move {
            let d = self.data.read().unwrap();
            let (start, end) = (offset as usize, offset as usize + len as usize);
            let mut extents = Vec::new();
            let mut pos = start;
            while pos < end {
                let block_end = ((pos / MAP_BLOCK + 1) * MAP_BLOCK).min(end);
                let block = &d
                    [pos / MAP_BLOCK * MAP_BLOCK..((pos / MAP_BLOCK + 1) * MAP_BLOCK).min(d.len())];
                let n = (block_end - pos) as u32;
                extents.push(if block.iter().all(|&b| b == 0) {
                    Extent::hole(n)
                } else {
                    Extent::data(n)
                });
                pos = block_end;
            }
            Ok(extents)
        })
    }
}

/// A read-only export over a file.
struct FileExport {
    file: std::fs::File,
    size: u64,
}

impl Export for FileExport {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        true
    }

    fn read<'a>(
        &'a self,
        offset: u64,
        buf: &'a mut [u8],
    ) -> BoxFuture<'a, Result<(), ExportError>> {
        Box::pin(async move { Ok(self.file.read_exact_at(buf, offset)?) })
    }
}

struct Provider(HashMap<String, Arc<dyn Export>>);

impl ExportProvider for Provider {
    fn list(&self) -> Vec<String> {
        let mut names: Vec<String> = self.0.keys().cloned().collect();
        names.sort();
        names
    }

    fn open<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Arc<dyn Export>, OpenError>> {
        Box::pin(async move { self.0.get(name).cloned().ok_or(OpenError::Unknown) })
    }
}

// ----- harness -----

struct TestServer {
    port: u16,
    cancel: CancellationToken,
    task: JoinHandle<()>,
    stats: Arc<ServerStats>,
    ram: Arc<MemExport>,
    src: PathBuf,
    dir: tempfile::TempDir,
}

/// Deterministic pseudo-random bytes (xorshift).
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

impl TestServer {
    async fn start() -> Self {
        Self::start_with(ServerLimits::default()).await
    }

    async fn start_with(limits: ServerLimits) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("source.raw");
        std::fs::write(&src, random_bytes(RO_SIZE, 0x5eed)).unwrap();
        let ram = Arc::new(MemExport::new(RAM_SIZE));
        let ro = Arc::new(FileExport {
            file: std::fs::File::open(&src).unwrap(),
            size: RO_SIZE as u64,
        });
        let mut exports: HashMap<String, Arc<dyn Export>> = HashMap::new();
        exports.insert("ram".into(), ram.clone());
        exports.insert("ro".into(), ro);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cancel = CancellationToken::new();
        let stats = Arc::new(ServerStats::default());
        let task = tokio::spawn(serve_with_stats(
            listener,
            Arc::new(Provider(exports)),
            cancel.clone(),
            limits,
            stats.clone(),
        ));
        Self {
            port,
            cancel,
            task,
            stats,
            ram,
            src,
            dir,
        }
    }

    fn uri(&self, name: &str) -> String {
        format!("nbd://127.0.0.1:{}/{name}", self.port)
    }

    fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .expect("server stops within its grace period")
            .expect("server task");
    }
}

/// Whether `bin` is on PATH; when it is not, fail under
/// `CAIRN_REQUIRE_CLIENTS=1`, else print why the test is skipped.
fn have(bin: &str) -> bool {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
        .unwrap_or(false);
    if !found {
        if std::env::var("CAIRN_REQUIRE_CLIENTS").as_deref() == Ok("1") {
            panic!("{bin} is not on PATH and CAIRN_REQUIRE_CLIENTS=1 (apt-get install -y libnbd-bin fio qemu-utils)");
        }
        eprintln!("SKIP: {bin} is not on PATH (apt-get install -y libnbd-bin fio qemu-utils)");
    }
    found
}

async fn run(bin: &str, args: &[&str]) -> Output {
    let child = tokio::process::Command::new(bin)
        .args(args)
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(180), child)
        .await
        .unwrap_or_else(|_| panic!("{bin} {args:?} timed out"))
        .unwrap_or_else(|e| panic!("{bin} failed to start: {e}"))
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

async fn run_ok(bin: &str, args: &[&str]) -> String {
    let o = run(bin, args).await;
    assert!(o.status.success(), "{bin} {args:?} failed:\n{}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

// ----- raw protocol client -----

/// The reading half of a raw client connection.
struct Reader(OwnedReadHalf);

impl Reader {
    async fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0; n];
        tokio::time::timeout(IO_TIMEOUT, self.0.read_exact(&mut v))
            .await
            .expect("read timed out")
            .expect("read");
        v
    }

    /// (option, reply type, data)
    async fn opt_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let h = self.read_n(OPTION_REPLY_HEADER_LEN).await;
        let mut b = &h[..];
        assert_eq!(b.get_u64(), OPTION_REPLY_MAGIC);
        let (option, ty, len) = (b.get_u32(), b.get_u32(), b.get_u32());
        (option, ty, self.read_n(len as usize).await)
    }

    /// (error, cookie)
    async fn simple_reply(&mut self) -> (u32, u64) {
        let h = self.read_n(SIMPLE_REPLY_HEADER_LEN).await;
        let mut b = &h[..];
        assert_eq!(b.get_u32(), SIMPLE_REPLY_MAGIC);
        (b.get_u32(), b.get_u64())
    }

    /// Any reply: (flags, type, cookie, error, payload). A simple reply has
    /// type 0 and carries `read_len(cookie)` data bytes on success;
    /// structured payloads are returned whole.
    async fn any_reply(
        &mut self,
        read_len: impl Fn(u64) -> Option<usize>,
    ) -> (u16, u16, u64, u32, Vec<u8>) {
        let m = self.read_n(4).await;
        let magic = u32::from_be_bytes(m.try_into().unwrap());
        if magic == SIMPLE_REPLY_MAGIC {
            let h = self.read_n(12).await;
            let mut b = &h[..];
            let (error, cookie) = (b.get_u32(), b.get_u64());
            let data = match (error, read_len(cookie)) {
                (0, Some(n)) => self.read_n(n).await,
                _ => Vec::new(),
            };
            (0, 0, cookie, error, data)
        } else {
            assert_eq!(magic, STRUCTURED_REPLY_MAGIC, "reply magic");
            let h = self.read_n(16).await;
            let mut b = &h[..];
            let (flags, ty, cookie, len) = (b.get_u16(), b.get_u16(), b.get_u64(), b.get_u32());
            let payload = self.read_n(len as usize).await;
            let error = if ty & 0x8000 != 0 {
                u32::from_be_bytes(payload[..4].try_into().unwrap())
            } else {
                0
            };
            (flags, ty, cookie, error, payload)
        }
    }

    /// The server closes the connection (EOF or reset) soon.
    async fn expect_closed(&mut self) {
        let mut buf = [0u8; 4096];
        loop {
            match tokio::time::timeout(IO_TIMEOUT, self.0.read(&mut buf)).await {
                Err(_) => panic!("connection was not closed"),
                Ok(Ok(0)) | Ok(Err(_)) => return,
                Ok(Ok(_)) => {}
            }
        }
    }
}

/// A hand-driven NBD client.
struct Raw {
    r: Reader,
    w: OwnedWriteHalf,
}

impl Raw {
    /// Connect, check the greeting; with `flags`, send client flags.
    async fn open(port: u16, flags: Option<u32>) -> Self {
        let (r, w) = TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap()
            .into_split();
        let mut raw = Self { r: Reader(r), w };
        let g = raw.r.read_n(GREETING_LEN).await;
        let mut b = &g[..];
        assert_eq!(b.get_u64(), NBDMAGIC);
        assert_eq!(b.get_u64(), IHAVEOPT);
        assert_eq!(b.get_u16(), FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        if let Some(f) = flags {
            raw.send(&f.to_be_bytes()).await;
        }
        raw
    }

    async fn connect(port: u16) -> Self {
        Self::open(port, Some(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)).await
    }

    async fn send(&mut self, b: &[u8]) {
        self.w.write_all(b).await.unwrap();
    }

    async fn send_opt(&mut self, option: u32, data: &[u8]) {
        let mut b = BytesMut::new();
        encode_option(&mut b, option, data);
        self.send(&b).await;
    }

    /// Negotiate (structured replies and `base:allocation` when asked) and
    /// enter transmission; returns (size, transmission flags).
    async fn go(&mut self, name: &str, structured: bool) -> (u64, u16) {
        if structured {
            self.send_opt(OPT_STRUCTURED_REPLY, &[]).await;
            assert_eq!(self.r.opt_reply().await.1, REP_ACK);
            let mut d = BytesMut::new();
            d.put_u32(name.len() as u32);
            d.put_slice(name.as_bytes());
            d.put_u32(1);
            d.put_u32(META_BASE_ALLOCATION.len() as u32);
            d.put_slice(META_BASE_ALLOCATION.as_bytes());
            self.send_opt(OPT_SET_META_CONTEXT, &d).await;
            assert_eq!(self.r.opt_reply().await.1, REP_META_CONTEXT);
            assert_eq!(self.r.opt_reply().await.1, REP_ACK);
        }
        self.send_opt(OPT_GO, &go_data(name)).await;
        let mut export = None;
        loop {
            let (_, ty, data) = self.r.opt_reply().await;
            match ty {
                REP_INFO => {
                    let mut b = &data[..];
                    if b.get_u16() == INFO_EXPORT {
                        export = Some((b.get_u64(), b.get_u16()));
                    }
                }
                REP_ACK => return export.expect("NBD_INFO_EXPORT before ACK"),
                other => panic!(
                    "GO failed with reply type {other:#x}: {}",
                    String::from_utf8_lossy(&data)
                ),
            }
        }
    }

    async fn request(
        &mut self,
        command: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) {
        let mut b = BytesMut::new();
        encode_request(
            &mut b,
            &header(command, flags, cookie, offset, length),
            payload,
        );
        self.send(&b).await;
    }
}

fn go_data(name: &str) -> Vec<u8> {
    let mut d = BytesMut::new();
    d.put_u32(name.len() as u32);
    d.put_slice(name.as_bytes());
    d.put_u16(0);
    d.to_vec()
}

fn header(command: u16, flags: u16, cookie: u64, offset: u64, length: u32) -> RequestHeader {
    RequestHeader {
        flags,
        command,
        cookie,
        offset,
        length,
    }
}

// ----- tests with real clients -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_reports_size_list_and_map() {
    if !have("nbdinfo") {
        return;
    }
    let srv = TestServer::start().await;
    // Data at [1 MiB, 1 MiB + 64 KiB) and in the last block; the rest is a hole.
    srv.ram.fill(1 << 20, 64 << 10, 0x11);
    srv.ram.fill(RAM_SIZE - 4096, 4096, 0x22);

    let size = run_ok("nbdinfo", &["--size", &srv.uri("ram")]).await;
    assert_eq!(size.trim(), RAM_SIZE.to_string());
    let size = run_ok("nbdinfo", &["--size", &srv.uri("ro")]).await;
    assert_eq!(size.trim(), RO_SIZE.to_string());

    let info = run_ok("nbdinfo", &[&srv.uri("ro")]).await;
    assert!(info.contains("is_read_only: true"), "{info}");
    let info = run_ok("nbdinfo", &[&srv.uri("ram")]).await;
    assert!(info.contains("is_read_only: false"), "{info}");
    assert!(info.contains("can_multi_conn: true"), "{info}");
    assert!(info.contains("test RAM disk"), "{info}");
    assert!(info.contains("base:allocation"), "{info}");
    assert!(info.contains("maximum: 33554432"), "{info}");

    let list = run_ok(
        "nbdinfo",
        &["--list", &format!("nbd://127.0.0.1:{}", srv.port)],
    )
    .await;
    assert!(
        list.contains("export=\"ram\"") || list.contains("export: ram") || list.contains("ram"),
        "{list}"
    );
    assert!(list.contains("ro"), "{list}");

    let map = run_ok("nbdinfo", &["--map", &srv.uri("ram")]).await;
    let extents: Vec<(u64, u64, u32)> = map
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((
                f.next()?.parse().ok()?,
                f.next()?.parse().ok()?,
                f.next()?.parse().ok()?,
            ))
        })
        .collect();
    let m = 1u64 << 20;
    let size = RAM_SIZE as u64;
    assert_eq!(
        extents,
        vec![
            (0, m, 3),
            (m, 64 << 10, 0),
            (m + (64 << 10), size - m - (64 << 10) - (64 << 10), 3),
            (size - (64 << 10), 64 << 10, 0),
        ],
        "{map}"
    );
    // The unknown export is refused cleanly.
    let o = run("nbdinfo", &["--size", &srv.uri("nope")]).await;
    assert!(!o.status.success(), "{}", text(&o));
    let s = srv.stats();
    assert!(s.block_status > 0 && s.handshakes_completed >= 5, "{s:?}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_and_qemu_img_read_and_write_exact_bytes() {
    if !have("nbdcopy") || !have("qemu-img") {
        return;
    }
    let srv = TestServer::start().await;
    let src = std::fs::read(&srv.src).unwrap();
    let src_path = srv.src.to_str().unwrap().to_owned();

    // Read path: nbdcopy the read-only export to a file.
    let out = srv.dir.path().join("out.raw");
    run_ok("nbdcopy", &[&srv.uri("ro"), out.to_str().unwrap()]).await;
    assert!(
        std::fs::read(&out).unwrap() == src,
        "nbdcopy output differs from the source"
    );
    run_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            &src_path,
            &srv.uri("ro"),
        ],
    )
    .await;

    // Write path: qemu-img convert the source into the RAM disk (several
    // connections, pipelined writes), then check it both ways.
    let before = srv.stats().bytes_written;
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            "-W",
            &src_path,
            &srv.uri("ram"),
        ],
    )
    .await;
    assert!(
        srv.ram.snapshot(0, RO_SIZE) == src,
        "RAM disk differs after qemu-img convert"
    );
    assert!(srv.stats().bytes_written > before);
    let back = srv.dir.path().join("back.raw");
    run_ok("nbdcopy", &[&srv.uri("ram"), back.to_str().unwrap()]).await;
    let back = std::fs::read(&back).unwrap();
    assert_eq!(back.len(), RAM_SIZE);
    assert!(back[..RO_SIZE] == src[..] && back[RO_SIZE..].iter().all(|&b| b == 0));

    // nbdcopy into the RAM disk too (its own request sizes and zeroing).
    srv.ram.fill(0, RAM_SIZE, 0x77);
    let small = srv.dir.path().join("small.raw");
    std::fs::write(&small, &src[..]).unwrap();
    let o = run("nbdcopy", &[small.to_str().unwrap(), &srv.uri("ram")]).await;
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        srv.ram.snapshot(0, RO_SIZE) == src,
        "RAM disk differs after nbdcopy"
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_write_flush_read_discard_zero() {
    if !have("qemu-io") {
        return;
    }
    let srv = TestServer::start().await;
    let uri = srv.uri("ram");
    let o = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "flush",
            "-c",
            "read -P 0xab 0 1M",
            "-c",
            "discard 0 64k",
            "-c",
            "write -z 1M 64k",
            "-c",
            "read -P 0 1M 64k",
            &uri,
        ],
    )
    .await;
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(!out.contains("Pattern verification failed"), "{out}");
    // What the export holds: the discarded head reads as zeroes here.
    assert!(srv.ram.snapshot(0, 64 << 10).iter().all(|&b| b == 0));
    assert!(srv
        .ram
        .snapshot(64 << 10, (1 << 20) - (64 << 10))
        .iter()
        .all(|&b| b == 0xab));
    assert!(srv.ram.snapshot(1 << 20, 64 << 10).iter().all(|&b| b == 0));
    let s = srv.stats();
    assert!(
        s.writes > 0 && s.flushes > 0 && s.trims > 0 && s.write_zeroes > 0 && s.reads > 0,
        "{s:?}"
    );
    assert_eq!(s.request_errors, 0);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fio_random_read_write_verifies() {
    if !have("fio") {
        return;
    }
    let srv = TestServer::start().await;
    let uri = srv.uri("ram");
    let uri_arg = format!("--uri={uri}");
    let o = run(
        "fio",
        &[
            "--ioengine=nbd",
            &uri_arg,
            "--rw=randrw",
            "--bs=4k",
            "--iodepth=16",
            "--size=64M",
            "--verify=crc32c",
            "--name=t",
        ],
    )
    .await;
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(
        !out.contains("verify: bad") && !out.contains("bad magic"),
        "{out}"
    );
    let s = srv.stats();
    assert!(s.writes > 1000 && s.reads > 1000, "{s:?}");
    assert_eq!(s.request_errors, 0);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_to_the_read_only_export_fail_with_eperm() {
    let srv = TestServer::start().await;
    let src = std::fs::read(&srv.src).unwrap();
    for structured in [false, true] {
        let mut c = Raw::connect(srv.port).await;
        let (size, flags) = c.go("ro", structured).await;
        assert_eq!(size, RO_SIZE as u64);
        assert_ne!(flags & FLAG_READ_ONLY, 0);
        assert_eq!(flags & (FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES), 0);
        c.request(CMD_WRITE, 0, 1, 0, 4, b"evil").await;
        c.request(CMD_TRIM, 0, 2, 0, 4096, &[]).await;
        c.request(CMD_WRITE_ZEROES, 0, 3, 0, 4096, &[]).await;
        for cookie in 1..=3 {
            let (_, _, got, error, _) = c.r.any_reply(|_| None).await;
            assert_eq!((got, error), (cookie, 1), "EPERM for cookie {cookie}");
        }
        // A read after the refused write still works and sees the file.
        c.request(CMD_READ, 0, 4, 0, 4, &[]).await;
        let (_, _, cookie, error, data) = c.r.any_reply(|_| Some(4)).await;
        assert_eq!((cookie, error), (4, 0));
        let data = if structured { data[8..].to_vec() } else { data };
        assert_eq!(data, src[..4]);
    }
    // Real clients honour NBD_FLAG_READ_ONLY and refuse to open it for
    // writing ("Permission denied"), so nothing reaches the server.
    if have("qemu-io") {
        let o = run(
            "qemu-io",
            &["-f", "raw", "-c", "write -P 0xcd 0 4k", &srv.uri("ro")],
        )
        .await;
        assert!(
            !o.status.success() && text(&o).contains("Permission denied"),
            "{}",
            text(&o)
        );
        assert_eq!(std::fs::read(&srv.src).unwrap(), src);
    }
    srv.stop().await;
}

// ----- hostile input and server behaviour -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_gets_protocol_errors_and_the_server_keeps_serving() {
    let srv = TestServer::start().await;

    // Bad option magic: the connection is closed.
    let mut c = Raw::connect(srv.port).await;
    c.send(b"NOTMAGIC\0\0\0\x03\0\0\0\0").await;
    c.r.expect_closed().await;

    // Unknown client flags: closed.
    let mut c = Raw::open(srv.port, Some(0xffff_ffff)).await;
    c.r.expect_closed().await;

    // Option errors during negotiation; the connection goes on.
    let mut c = Raw::connect(srv.port).await;
    c.send_opt(0x4242, b"whatever").await;
    let (option, ty, msg) = c.r.opt_reply().await;
    assert_eq!((option, ty), (0x4242, REP_ERR_UNSUP));
    assert!(!msg.is_empty());
    c.send_opt(OPT_GO, &vec![0; 100 << 10]).await;
    assert_eq!(c.r.opt_reply().await.1, REP_ERR_TOO_BIG);
    c.send_opt(OPT_GO, &[0, 0, 0, 50, 1]).await;
    assert_eq!(c.r.opt_reply().await.1, REP_ERR_INVALID);
    c.send_opt(OPT_GO, &go_data("nope")).await;
    assert_eq!(c.r.opt_reply().await.1, REP_ERR_UNKNOWN);
    c.send_opt(OPT_STARTTLS, &[]).await;
    assert_eq!(c.r.opt_reply().await.1, REP_ERR_POLICY);
    c.send_opt(OPT_LIST, &[]).await;
    let mut names = Vec::new();
    loop {
        let (_, ty, data) = c.r.opt_reply().await;
        if ty == REP_ACK {
            break;
        }
        assert_eq!(ty, REP_SERVER);
        names.push(String::from_utf8(data[4..].to_vec()).unwrap());
    }
    assert_eq!(names, ["ram", "ro"]);

    // Request errors during transmission; the connection goes on.
    let (size, _) = c.go("ram", false).await;
    c.request(CMD_READ, 0, 1, size, 512, &[]).await;
    assert_eq!(
        c.r.simple_reply().await,
        (22, 1),
        "read past the end: EINVAL"
    );
    c.request(CMD_READ, 0, 2, 0, 64 << 20, &[]).await;
    assert_eq!(c.r.simple_reply().await, (22, 2), "oversize read: EINVAL");
    c.request(CMD_WRITE, 0, 3, 0, 40 << 20, &vec![0x33; 40 << 20])
        .await;
    assert_eq!(
        c.r.simple_reply().await,
        (22, 3),
        "oversize write: EINVAL, payload skipped"
    );
    c.request(CMD_WRITE, 0, 4, size - 10, 20, &[0x44; 20]).await;
    assert_eq!(
        c.r.simple_reply().await,
        (28, 4),
        "write past the end: ENOSPC"
    );
    c.request(77, 0, 5, 0, 0, &[]).await;
    assert_eq!(c.r.simple_reply().await, (22, 5), "unknown command: EINVAL");
    c.request(CMD_BLOCK_STATUS, 0, 6, 0, 4096, &[]).await;
    assert_eq!(
        c.r.simple_reply().await,
        (22, 6),
        "block status without a context: EINVAL"
    );
    c.request(CMD_READ, 0, 7, 0, 512, &[]).await;
    assert_eq!(c.r.simple_reply().await, (0, 7));
    assert_eq!(c.r.read_n(512).await, vec![0; 512]);
    assert!(
        srv.ram.snapshot(0, 1 << 20).iter().all(|&b| b == 0),
        "rejected writes wrote nothing"
    );
    assert!(srv.ram.snapshot(RAM_SIZE - 10, 10).iter().all(|&b| b == 0));
    // Bad request magic: closed.
    c.send(&[0u8; REQUEST_HEADER_LEN]).await;
    c.r.expect_closed().await;

    // Option data too long even to skip: TOO_BIG, then closed.
    let mut c = Raw::connect(srv.port).await;
    let mut h = BytesMut::new();
    h.put_u64(IHAVEOPT);
    h.put_u32(OPT_GO);
    h.put_u32(u32::MAX);
    c.send(&h).await;
    assert_eq!(c.r.opt_reply().await.1, REP_ERR_TOO_BIG);
    c.r.expect_closed().await;

    // A write payload too long even to skip: EINVAL, then closed.
    let mut c = Raw::connect(srv.port).await;
    c.go("ram", true).await;
    c.request(CMD_WRITE, 0, 9, 0, 3 << 30, &[]).await;
    let (flags, ty, cookie, error, _) = c.r.any_reply(|_| None).await;
    assert_eq!(
        (flags, ty, cookie, error),
        (REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 9, 22)
    );
    c.r.expect_closed().await;

    // Export name too long for NBD_OPT_EXPORT_NAME: closed.
    let mut c = Raw::connect(srv.port).await;
    c.send_opt(OPT_EXPORT_NAME, &vec![b'x'; 5000]).await;
    c.r.expect_closed().await;

    // Clients vanishing mid-handshake and mid-payload.
    let mut c = Raw::connect(srv.port).await;
    c.send(&IHAVEOPT.to_be_bytes()).await;
    drop(c);
    let mut c = Raw::connect(srv.port).await;
    c.go("ram", false).await;
    c.request(CMD_WRITE, 0, 1, 0, 1 << 20, &[1; 1000]).await;
    drop(c);

    let s = srv.stats();
    assert!(s.protocol_errors >= 6, "{s:?}");
    assert!(s.requests_invalid >= 6, "{s:?}");

    // A fresh, well-behaved client is still served.
    if have("nbdinfo") {
        let size = run_ok("nbdinfo", &["--size", &srv.uri("ram")]).await;
        assert_eq!(size.trim(), RAM_SIZE.to_string());
    }
    let mut c = Raw::connect(srv.port).await;
    c.go("ro", true).await;
    c.request(CMD_READ, 0, 1, 0, 16, &[]).await;
    let (_, ty, _, error, payload) = c.r.any_reply(|_| None).await;
    assert_eq!((ty, error), (REPLY_TYPE_OFFSET_DATA, 0));
    assert_eq!(payload[8..], std::fs::read(&srv.src).unwrap()[..16]);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_by_cookie() {
    let srv = TestServer::start().await;
    let image = random_bytes(2 << 20, 7);
    srv.ram.data.write().unwrap()[..2 << 20].copy_from_slice(&image);
    let mut c = Raw::connect(srv.port).await;
    c.go("ram", true).await;

    // Reads of the first 2 MiB, writes into the next 2 MiB, block status,
    // then a flush: all sent before any reply is read.
    let mut batch = BytesMut::new();
    let mut reads = HashMap::new();
    let mut writes = HashMap::new();
    let noise = random_bytes(4 << 20, 99);
    for cookie in 0..400u64 {
        let n = noise[cookie as usize * 4..][..4].to_vec();
        let x = u32::from_le_bytes(n.try_into().unwrap());
        match cookie % 4 {
            0 | 1 => {
                let len = 1 + x % (256 << 10);
                let offset = u64::from(x) % ((2 << 20) - u64::from(len));
                encode_request(&mut batch, &header(CMD_READ, 0, cookie, offset, len), &[]);
                reads.insert(cookie, (offset as usize, len as usize));
            }
            2 => {
                let offset = (2 << 20) + (cookie as usize / 4) * 4096;
                let data = &noise[offset..offset + 4096];
                encode_request(
                    &mut batch,
                    &header(CMD_WRITE, CMD_FLAG_FUA, cookie, offset as u64, 4096),
                    data,
                );
                writes.insert(cookie, (offset, data.to_vec()));
            }
            _ => encode_request(
                &mut batch,
                &header(CMD_BLOCK_STATUS, 0, cookie, 0, 8 << 20),
                &[],
            ),
        }
    }
    encode_request(&mut batch, &header(CMD_FLUSH, 0, 1000, 0, 0), &[]);

    let Raw { r, w } = &mut c;
    let send = async { w.write_all(&batch).await.unwrap() };
    let receive = async {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..401 {
            let (flags, ty, cookie, error, payload) = r.any_reply(|_| None).await;
            assert_eq!(error, 0, "cookie {cookie}");
            assert!(seen.insert(cookie), "cookie {cookie} answered twice");
            if let Some(&(offset, len)) = reads.get(&cookie) {
                assert_eq!((flags, ty), (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA));
                assert_eq!(
                    u64::from_be_bytes(payload[..8].try_into().unwrap()),
                    offset as u64
                );
                assert!(payload[8..] == image[offset..offset + len], "read {cookie}");
            } else if cookie % 4 == 3 && cookie < 1000 {
                assert_eq!((flags, ty), (REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS));
                let mut p = &payload[..];
                assert_eq!(p.get_u32(), ALLOCATION_CONTEXT_ID);
                let (l0, f0) = (p.get_u32(), p.get_u32());
                assert_eq!(f0, 0, "the first 2 MiB is data");
                assert!(l0 >= 2 << 20);
            } else {
                assert_eq!(ty, 0, "writes and flush get simple replies");
            }
        }
        seen
    };
    let ((), seen) = tokio::join!(send, receive);
    assert_eq!(seen.len(), 401);
    for (offset, data) in writes.values() {
        assert!(srv.ram.snapshot(*offset, 4096) == *data);
    }
    // NBD_CMD_DISC: the server closes after answering everything.
    c.request(CMD_DISC, 0, 2000, 0, 0, &[]).await;
    c.r.expect_closed().await;
    let s = srv.stats();
    assert_eq!(
        (s.reads, s.writes, s.block_status, s.flushes, s.disconnects),
        (200, 100, 100, 1, 1)
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limit_and_handshake_timeout() {
    let srv = TestServer::start_with(ServerLimits {
        max_connections: 2,
        handshake_timeout: Duration::from_millis(500),
        ..ServerLimits::default()
    })
    .await;
    let mut a = Raw::connect(srv.port).await;
    let mut b = Raw::open(srv.port, None).await;
    // A third connection is closed without a greeting.
    let mut third = TcpStream::connect(("127.0.0.1", srv.port)).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(IO_TIMEOUT, third.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "over-limit connection gets no greeting");
    // Idle handshakes time out.
    a.r.expect_closed().await;
    b.r.expect_closed().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Slots are free again, and transmission has no handshake deadline.
    let mut c = Raw::connect(srv.port).await;
    c.go("ram", false).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    c.request(CMD_READ, 0, 1, 0, 8, &[]).await;
    assert_eq!(c.r.simple_reply().await, (0, 1));
    let s = srv.stats();
    assert!(
        s.connections_rejected >= 1 && s.handshake_failures >= 2,
        "{s:?}"
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_every_connection() {
    let srv = TestServer::start().await;
    let (port, stats) = (srv.port, srv.stats.clone());
    let mut negotiating = Raw::connect(port).await;
    let mut transmitting = Raw::connect(port).await;
    transmitting.go("ram", true).await;
    transmitting.request(CMD_READ, 0, 1, 0, 4096, &[]).await;
    assert_eq!(transmitting.r.any_reply(|_| None).await.3, 0);
    let started = std::time::Instant::now();
    srv.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "shutdown took {:?}",
        started.elapsed()
    );
    negotiating.r.expect_closed().await;
    transmitting.r.expect_closed().await;
    assert!(
        TcpStream::connect(("127.0.0.1", port)).await.is_err(),
        "listener is closed"
    );
    assert_eq!(stats.snapshot().connections_active, 0);
}
