//! Helpers shared by Cairn's benchmarks (`bench/benches/*.rs`).
//!
//! Every figure Cairn reports is a ratio against a peer or a limit measured
//! side by side in the same run on the same machine (DESIGN.md,
//! "Performance"). This crate holds the parts that are not specific to one
//! benchmark:
//! - deterministic input data ([`write_random_file`], [`random_bytes`],
//!   [`command_prefix_to_file`], [`regular_files`]);
//! - timing and statistics ([`time`], [`gbps`], [`median`], [`percentile`],
//!   [`LatencySummary`], [`run_reads`]);
//! - baselines ([`plain_write`], [`read_fully`]);
//! - machine facts and report output ([`MachineFacts`], [`MdTable`],
//!   [`today`], [`write_results`]).

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Barrier;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

/// One kibibyte.
pub const KIB: u64 = 1 << 10;
/// One mebibyte.
pub const MIB: u64 = 1 << 20;
/// One gibibyte.
pub const GIB: u64 = 1 << 30;

/// Block size used when generating files and for the plain-write baseline.
pub const WRITE_BLOCK: usize = 4 << 20;

// ---------------------------------------------------------------------------
// Data generation
// ---------------------------------------------------------------------------

/// `len` pseudo-random bytes from a [`StdRng`] seeded with `seed`.
/// The same `(len, seed)` always gives the same bytes.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    rng.fill_bytes(&mut v);
    v
}

/// Write `len` deterministic pseudo-random bytes to a new file at `path`
/// (same bytes as [`random_bytes`] with the same seed), in
/// [`WRITE_BLOCK`]-sized writes. Not synced.
pub fn write_random_file(path: &Path, len: u64, seed: u64) -> io::Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut f = io::BufWriter::with_capacity(WRITE_BLOCK, File::create(path)?);
    let mut block = vec![0u8; WRITE_BLOCK];
    let mut left = len;
    while left > 0 {
        let n = left.min(WRITE_BLOCK as u64) as usize;
        rng.fill_bytes(&mut block[..n]);
        f.write_all(&block[..n])?;
        left -= n as u64;
    }
    f.flush()
}

/// Run `cmd` with its stdout piped and copy the first `limit` bytes of that
/// output into a new file at `path`. The child is killed once the limit is
/// reached (or reaped if it ended earlier); its stderr is discarded.
/// Returns the number of bytes written (less than `limit` if the command
/// produced less).
pub fn command_prefix_to_file(cmd: &mut Command, limit: u64, path: &Path) -> io::Result<u64> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .stdin(Stdio::null())
        .spawn()?;
    let result = (|| {
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| io::Error::other("child has no stdout"))?;
        let mut out = io::BufWriter::with_capacity(WRITE_BLOCK, File::create(path)?);
        let n = io::copy(&mut stdout.take(limit), &mut out)?;
        out.flush()?;
        Ok(n)
    })();
    // Done reading: stop the producer whether or not it finished.
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// Regular files under `root` (symlinks are not followed, unreadable
/// directories are skipped), with their sizes, sorted by their path relative
/// to `root` compared as bytes, so the order is the same on every run.
pub fn regular_files(root: &Path) -> Vec<(PathBuf, u64)> {
    use std::os::unix::ffi::OsStrExt as _;
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(meta) = e.path().symlink_metadata() else {
                continue;
            };
            if meta.is_dir() {
                stack.push(e.path());
            } else if meta.is_file() {
                if let Ok(rel) = e.path().strip_prefix(root) {
                    out.push((rel.to_path_buf(), meta.len()));
                }
            }
        }
    }
    out.sort_by(|a, b| a.0.as_os_str().as_bytes().cmp(b.0.as_os_str().as_bytes()));
    out
}

/// `n` random 4 KiB-aligned offsets at which a read of `read_len` bytes fits
/// inside an object of `len` bytes. Deterministic for a given seed.
pub fn aligned_offsets(len: u64, read_len: u64, n: usize, seed: u64) -> Vec<u64> {
    let align = 4 * KIB;
    let slots = len.saturating_sub(read_len) / align + 1;
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.gen_range(0..slots) * align).collect()
}

/// Where reads land relative to chunk boundaries and to the 4 KiB
/// verification groups inside each chunk. Cairn verifies a chunk in 4 KiB
/// groups counted from the chunk's own start, so a read aligned in the
/// object is group-aligned only when its chunk starts on a 4 KiB boundary.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct ReadGeometry {
    /// Fraction of reads inside one chunk that start and end on its group
    /// boundaries (or the chunk's end).
    pub group_aligned: f64,
    /// Fraction of reads that touch more than one chunk.
    pub cross_chunk: f64,
    /// Mean 4 KiB groups a read has to fetch and hash.
    pub mean_groups: f64,
    /// Fraction of chunks that start at a 4 KiB-aligned object offset.
    pub chunks_aligned: f64,
}

/// Classify reads of `read_len` bytes at `offsets` against `chunks`, given
/// as ascending, contiguous `(offset, len)` spans of the object.
pub fn read_geometry(chunks: &[(u64, u64)], offsets: &[u64], read_len: u64) -> ReadGeometry {
    let g = 4 * KIB;
    let (mut aligned, mut cross, mut groups) = (0u64, 0u64, 0u64);
    for &off in offsets {
        let end = off + read_len;
        let mut i = chunks.partition_point(|&(o, l)| o + l <= off);
        let (mut touched, mut pos) = (0, off);
        while pos < end && i < chunks.len() {
            let (c_off, c_len) = chunks[i];
            let (s, e) = (pos - c_off, (end - c_off).min(c_len));
            groups += e.div_ceil(g) - s / g;
            if touched == 0 && s % g == 0 && (e % g == 0 || e == c_len) && c_off + e == end {
                aligned += 1;
            }
            touched += 1;
            pos = c_off + e;
            i += 1;
        }
        if touched > 1 {
            cross += 1;
        }
    }
    let n = offsets.len().max(1) as f64;
    ReadGeometry {
        group_aligned: aligned as f64 / n,
        cross_chunk: cross as f64 / n,
        mean_groups: groups as f64 / n,
        chunks_aligned: chunks.iter().filter(|c| c.0 % g == 0).count() as f64
            / chunks.len().max(1) as f64,
    }
}

// ---------------------------------------------------------------------------
// Timing and statistics
// ---------------------------------------------------------------------------

/// Run `f` once and return how long it took with its result.
pub fn time<T>(f: impl FnOnce() -> T) -> (Duration, T) {
    let t = Instant::now();
    let r = f();
    (t.elapsed(), r)
}

/// Throughput in GB/s (10^9 bytes per second).
pub fn gbps(bytes: u64, d: Duration) -> f64 {
    let s = d.as_secs_f64();
    if s == 0.0 {
        f64::INFINITY
    } else {
        bytes as f64 / s / 1e9
    }
}

/// Median of `xs` (mean of the two middle values for an even count; NaN for
/// an empty slice). NaNs sort last.
pub fn median(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// Nearest-rank percentile `p` (0..=100) of an ascending `sorted` slice; 0
/// for an empty slice.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (p.clamp(0.0, 100.0) / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Throughput and latency of a batch of operations.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct LatencySummary {
    /// Operations completed.
    pub ops: u64,
    /// Threads that ran them.
    pub threads: usize,
    /// Wall time from the first thread's start to the last thread's end, s.
    pub wall_secs: f64,
    /// Operations per second over the wall time.
    pub iops: f64,
    /// Median latency, ns.
    pub p50_ns: u64,
    /// 99th percentile latency, ns.
    pub p99_ns: u64,
    /// Mean latency, ns.
    pub mean_ns: f64,
    /// Worst latency, ns.
    pub max_ns: u64,
}

impl LatencySummary {
    /// Summarise per-operation latencies (ns, any order; sorted in place)
    /// over `wall` for `threads` threads.
    pub fn from_samples(lat: &mut [u64], wall: Duration, threads: usize) -> Self {
        lat.sort_unstable();
        let ops = lat.len() as u64;
        let wall_secs = wall.as_secs_f64();
        let sum: u128 = lat.iter().map(|&x| u128::from(x)).sum();
        Self {
            ops,
            threads,
            wall_secs,
            iops: if wall_secs > 0.0 {
                ops as f64 / wall_secs
            } else {
                f64::INFINITY
            },
            p50_ns: percentile(lat, 50.0),
            p99_ns: percentile(lat, 99.0),
            mean_ns: if ops == 0 {
                0.0
            } else {
                sum as f64 / ops as f64
            },
            max_ns: lat.last().copied().unwrap_or(0),
        }
    }
}

/// Run `read(offset, buf)` for every offset with `threads` threads (the
/// offsets are split into contiguous shares; each thread has its own
/// `read_len`-byte buffer), timing every call. All threads start together
/// behind a barrier; the wall time runs from the earliest start to the latest
/// end. The first error stops the run.
pub fn run_reads<F>(
    offsets: &[u64],
    read_len: usize,
    threads: usize,
    read: F,
) -> anyhow::Result<LatencySummary>
where
    F: Fn(u64, &mut [u8]) -> anyhow::Result<()> + Sync,
{
    let threads = threads.max(1);
    let share = offsets.len().div_ceil(threads).max(1);
    let barrier = Barrier::new(threads);
    let results: Vec<anyhow::Result<(Instant, Instant, Vec<u64>)>> = std::thread::scope(|s| {
        let handles: Vec<_> = offsets
            .chunks(share)
            .chain(std::iter::repeat(&[][..]))
            .take(threads)
            .map(|mine| {
                let (barrier, read) = (&barrier, &read);
                s.spawn(move || {
                    let mut buf = vec![0u8; read_len];
                    let mut lat = Vec::with_capacity(mine.len());
                    barrier.wait();
                    let start = Instant::now();
                    for &off in mine {
                        let t = Instant::now();
                        read(off, &mut buf)?;
                        lat.push(t.elapsed().as_nanos() as u64);
                    }
                    let end = Instant::now();
                    std::hint::black_box(&buf);
                    Ok((start, end, lat))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("read thread panicked")))
            })
            .collect()
    });
    let mut all = Vec::with_capacity(offsets.len());
    let (mut first, mut last) = (None::<Instant>, None::<Instant>);
    for r in results {
        let (s, e, lat) = r?;
        first = Some(first.map_or(s, |f| f.min(s)));
        last = Some(last.map_or(e, |l| l.max(e)));
        all.extend(lat);
    }
    let wall = match (first, last) {
        (Some(f), Some(l)) => l.duration_since(f),
        _ => Duration::ZERO,
    };
    Ok(LatencySummary::from_samples(&mut all, wall, threads))
}

// ---------------------------------------------------------------------------
// Baselines
// ---------------------------------------------------------------------------

/// The plain sequential-write baseline: create `path`, write `data` in
/// [`WRITE_BLOCK`]-sized `write_all` calls, then `sync_data`. Returns the
/// time from create to the end of the sync.
pub fn plain_write(path: &Path, data: &[u8]) -> io::Result<Duration> {
    let t = Instant::now();
    let mut f = File::create(path)?;
    for block in data.chunks(WRITE_BLOCK) {
        f.write_all(block)?;
    }
    f.sync_data()?;
    Ok(t.elapsed())
}

/// Read a file to the end (to pull it into the page cache); returns its length.
pub fn read_fully(path: &Path) -> io::Result<u64> {
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; WRITE_BLOCK];
    let mut n = 0u64;
    loop {
        match f.read(&mut buf)? {
            0 => return Ok(n),
            k => n += k as u64,
        }
    }
}

// ---------------------------------------------------------------------------
// Machine facts and reports
// ---------------------------------------------------------------------------

/// Facts about the machine a benchmark ran on.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MachineFacts {
    /// Cores available to this process.
    pub nproc: usize,
    /// First `model name` in /proc/cpuinfo.
    pub cpu_model: String,
    /// CPU flags of interest (sha_ni, avx2, avx512f) found in /proc/cpuinfo.
    pub cpu_flags: Vec<String>,
    /// `uname -r`.
    pub kernel: String,
    /// MemTotal from /proc/meminfo, bytes.
    pub mem_bytes: u64,
    /// Filesystem type of the benchmark's work directory (`stat -f`).
    pub work_fs: String,
    /// /proc/loadavg (1, 5, 15 minutes) when the facts were collected: other
    /// work on the machine skews every figure.
    pub loadavg: String,
}

impl MachineFacts {
    /// Collect the facts; `work_dir` is where the benchmark writes its files.
    pub fn collect(work_dir: &Path) -> Self {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map_or_else(|| "unknown".to_string(), |(_, v)| v.trim().to_string());
        let flags_line = cpuinfo
            .lines()
            .find(|l| l.starts_with("flags"))
            .unwrap_or("");
        let cpu_flags = ["sha_ni", "avx2", "avx512f"]
            .iter()
            .filter(|f| flags_line.split_whitespace().any(|x| x == **f))
            .map(|f| f.to_string())
            .collect();
        let mem_bytes = fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024);
        Self {
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model,
            cpu_flags,
            kernel: command_line_output(Command::new("uname").arg("-r"))
                .unwrap_or_else(|| "unknown".into()),
            mem_bytes,
            work_fs: command_line_output(
                Command::new("stat").args(["-f", "-c", "%T"]).arg(work_dir),
            )
            .unwrap_or_else(|| "unknown".into()),
            loadavg: loadavg(),
        }
    }
}

/// The 1, 5 and 15 minute load averages from /proc/loadavg.
pub fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// First line of a command's stdout, trimmed; `None` if it failed.
pub fn command_line_output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .map(|l| l.trim().to_string())
}

/// Today's date as `YYYY-MM-DD`: `date +%F` (local time), or the UTC date
/// computed from the system clock if that fails.
pub fn today() -> String {
    command_line_output(Command::new("date").arg("+%F"))
        .filter(|s| s.len() == 10)
        .unwrap_or_else(|| {
            let secs = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let (y, m, d) = civil_from_days((secs / 86_400) as i64);
            format!("{y:04}-{m:02}-{d:02}")
        })
}

/// Gregorian (year, month, day) of a count of days since 1970-01-01
/// (Howard Hinnant's `civil_from_days`).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// A Markdown table built row by row.
#[derive(Debug, Clone, Default)]
pub struct MdTable {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl MdTable {
    /// A table with these column headers.
    pub fn new<S: ToString>(header: &[S]) -> Self {
        Self {
            header: header.iter().map(ToString::to_string).collect(),
            rows: Vec::new(),
        }
    }

    /// Append a row (missing cells are left empty, extra cells dropped).
    pub fn row<S: ToString>(&mut self, cells: &[S]) -> &mut Self {
        let mut r: Vec<String> = cells.iter().map(ToString::to_string).collect();
        r.resize(self.header.len(), String::new());
        self.rows.push(r);
        self
    }

    /// Render as GitHub-flavoured Markdown (ends with a newline).
    pub fn render(&self) -> String {
        let line = |cells: &[String]| format!("| {} |\n", cells.join(" | "));
        let mut s = line(&self.header);
        s.push_str(&line(&vec!["---".to_string(); self.header.len()]));
        for r in &self.rows {
            s.push_str(&line(r));
        }
        s
    }
}

/// "PASS" or "FAIL".
pub fn pass_fail(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "FAIL"
    }
}

/// Bytes in a human unit (binary prefixes), e.g. `1.00 GiB`.
pub fn human_bytes(b: u64) -> String {
    let b = b as f64;
    if b >= GIB as f64 {
        format!("{:.2} GiB", b / GIB as f64)
    } else if b >= MIB as f64 {
        format!("{:.2} MiB", b / MIB as f64)
    } else if b >= KIB as f64 {
        format!("{:.1} KiB", b / KIB as f64)
    } else {
        format!("{b} B")
    }
}

/// Write `<dir>/<stem>.md` and `<dir>/<stem>.json` (pretty-printed),
/// creating `dir`. Returns both paths.
pub fn write_results(
    dir: &Path,
    stem: &str,
    markdown: &str,
    json: &serde_json::Value,
) -> io::Result<(PathBuf, PathBuf)> {
    fs::create_dir_all(dir)?;
    let md = dir.join(format!("{stem}.md"));
    let js = dir.join(format!("{stem}.json"));
    fs::write(&md, markdown)?;
    let mut text = serde_json::to_string_pretty(json).map_err(io::Error::other)?;
    text.push('\n');
    fs::write(&js, text)?;
    Ok((md, js))
}

/// The repository's HEAD, plus the files under `dirs` (paths relative to the
/// repository root) that differ from it: what code a result was measured on.
pub fn git_facts(dirs: &[&str]) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let head = command_line_output(Command::new("git").arg("-C").arg(&root).args([
        "rev-parse",
        "--short",
        "HEAD",
    ]))
    .unwrap_or_else(|| "unknown".into());
    let dirty = Command::new("git")
        .arg("-C")
        .arg(&root)
        .args(["status", "--porcelain", "--"])
        .args(dirs)
        .stderr(Stdio::null())
        .output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(|l| l.get(3..).unwrap_or(l).to_owned())
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    if dirty.is_empty() {
        head
    } else {
        format!("{head} + uncommitted: {}", dirty.join(", "))
    }
}

/// A ratio for a table cell: two decimals, or a dash when it is not a number.
pub fn ratio_cell(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.2}")
    } else {
        "—".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&v, 100.0), 100);
        assert_eq!(percentile(&v, 0.0), 1);
        assert_eq!(percentile(&[7], 99.0), 7);
        assert_eq!(percentile(&[], 50.0), 0);
        assert_eq!(percentile(&[1, 2, 3], 50.0), 2);
    }

    #[test]
    fn median_odd_even_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn latency_summary() {
        let mut lat = vec![500, 100, 300, 200, 400];
        let s = LatencySummary::from_samples(&mut lat, Duration::from_millis(1), 1);
        assert_eq!(s.ops, 5);
        assert_eq!(s.p50_ns, 300);
        assert_eq!(s.p99_ns, 500);
        assert_eq!(s.max_ns, 500);
        assert!((s.iops - 5000.0).abs() < 1e-6);
        assert!((s.mean_ns - 300.0).abs() < 1e-9);
    }

    #[test]
    fn gbps_is_decimal() {
        assert!((gbps(2_000_000_000, Duration::from_secs(2)) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(today().len(), 10);
    }

    #[test]
    fn random_data_is_deterministic_and_matches_file() -> io::Result<()> {
        let a = random_bytes(10_000, 7);
        assert_eq!(a, random_bytes(10_000, 7));
        assert_ne!(a, random_bytes(10_000, 8));
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("r");
        let len = WRITE_BLOCK + 12_345;
        write_random_file(&p, len as u64, 7)?;
        assert_eq!(fs::read(&p)?, random_bytes(len, 7));
        Ok(())
    }

    #[test]
    fn offsets_are_aligned_and_in_range() {
        let offs = aligned_offsets(1 << 20, 4096, 10_000, 1);
        assert!(offs.iter().all(|&o| o % 4096 == 0 && o + 4096 <= 1 << 20));
        assert!(offs.contains(&0) && offs.contains(&((1 << 20) - 4096)));
    }

    #[test]
    fn run_reads_splits_work() -> anyhow::Result<()> {
        let offs: Vec<u64> = (0..1001).collect();
        let count = std::sync::atomic::AtomicU64::new(0);
        let s = run_reads(&offs, 16, 2, |_, buf| {
            assert_eq!(buf.len(), 16);
            count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(())
        })?;
        assert_eq!(s.ops, 1001);
        assert_eq!(count.into_inner(), 1001);
        Ok(())
    }

    #[test]
    fn command_prefix_is_truncated() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("out");
        let n = command_prefix_to_file(Command::new("yes").arg("abc"), 1000, &p)?;
        assert_eq!(n, 1000);
        assert_eq!(fs::read(&p)?.len(), 1000);
        Ok(())
    }

    #[test]
    fn geometry_of_aligned_and_unaligned_chunks() {
        // Two 64 KiB chunks: every 4 KiB-aligned read is group-aligned.
        let fixed = [(0, 65_536), (65_536, 65_536)];
        let g = read_geometry(&fixed, &[0, 4096, 61_440, 65_536], 4096);
        assert_eq!(
            (
                g.group_aligned,
                g.cross_chunk,
                g.mean_groups,
                g.chunks_aligned
            ),
            (1.0, 0.0, 1.0, 1.0)
        );
        // Second chunk starts at 100: reads inside it span two groups, and
        // a read over the boundary touches both chunks.
        let cdc = [(0, 100), (100, 100_000)];
        let g = read_geometry(&cdc, &[8192, 0], 4096);
        assert_eq!(g.group_aligned, 0.0);
        assert_eq!(g.cross_chunk, 0.5);
        // 8192: groups 1..=2 of chunk 2 (2 groups); 0: chunk 1 whole (1 group) + group 0 of chunk 2.
        assert_eq!(g.mean_groups, 2.0);
        assert_eq!(g.chunks_aligned, 0.5);
    }

    #[test]
    fn table_renders() {
        let mut t = MdTable::new(&["a", "b"]);
        t.row(&["1", "2"]).row(&["3"]);
        assert_eq!(
            t.render(),
            "| a | b |\n| --- | --- |\n| 1 | 2 |\n| 3 |  |\n"
        );
    }
}
