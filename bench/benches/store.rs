//! Chunk store benchmark: ingest, random 4 KiB reads and dedup, each as a
//! ratio against a peer measured in the same run on the same machine
//! (DESIGN.md, "Performance").
//!
//! ```text
//! cargo bench -p cairn-bench --bench store -- [--quick] [--input-mib N]
//!     [--reads N] [--dedup-mib N] [--reps N] [--chunk-cache-mib N] [--tmp DIR]
//! ```
//!
//! A. Ingest of 1 GiB of seeded random bytes and of the first 1 GiB of
//!    `tar cf - /usr/lib`, against BLAKE3 and SHA-256 over the same bytes in
//!    memory and a plain sequential write + `sync_data` of the same bytes.
//!    Target: ingest / min(sha256, write) >= 0.5.
//! B. Random 4 KiB-aligned reads of a stored 1 GiB random object (io_uring
//!    and psync engines, verification on, the verified chunk cache sized to
//!    hold the object; as context: the cache off, at its default size, and
//!    verification off) against `pread` on a plain file of the same bytes,
//!    1 and 2 threads, three passes: device-cold (plain file and store files
//!    evicted from the page cache, fresh open), cache-cold, page-cache-warm
//!    (fresh open, files in the page cache) and warm. Target:
//!    Cairn / pread IOPS >= 0.5 with verification on.
//! C. Dedup: a tar of ~300 MiB of /usr/lib files (v1), 5% of the files
//!    modified in place (v2); the new bytes of v2's put against the bytes
//!    actually changed.
//!
//! Results go to stdout and to `bench/results/store-YYYY-MM-DD.{md,json}`
//! (`store-YYYY-MM-DD-quick.*` with `--quick`). All scratch files live in
//! one temp dir under the workspace's `target/` (not tmpfs) and are removed
//! at the end.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::os::unix::fs::{FileExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, ensure, Context as _, Result};
use cairn_bench::{
    aligned_offsets, command_prefix_to_file, gbps, human_bytes, median, pass_fail, plain_write,
    read_fully, read_geometry, regular_files, run_reads, time, today, write_random_file,
    write_results, LatencySummary, MachineFacts, MdTable, ReadGeometry, GIB, KIB, MIB,
};
use cairn_chunkstore::chunker::chunk_boundaries;
use cairn_chunkstore::{ChunkerConfig, EngineKind, PutOptions, PutResult, Store, StoreConfig};
use rand::rngs::StdRng;
use rand::{Rng as _, RngCore as _, SeedableRng as _};
use serde::Serialize;
use serde_json::json;
use sha2::Digest as _;

const INGEST_TARGET: f64 = 0.5;
const READ_TARGET: f64 = 0.5;
const READ_LEN: usize = 4096;
const SEED_RANDOM_INPUT: u64 = 0x00C0_FFEE;
const SEED_COLD: u64 = 0xC01D;
const SEED_WARM: u64 = 0x3A23;
const SEED_DEVICE_COLD: u64 = 0xD15C;
/// Pass labels. Device-cold: the files a pass reads (the plain file; the
/// store's segment and index files) were just evicted from the page cache,
/// and Cairn's store was just opened (chunk cache empty). Cache-cold: Cairn's
/// store was just opened, but the files are in the page cache (as the plain
/// file is for its pread pass). Warm: a second batch on the same open store.
const PASS_DEVICE_COLD: &str = "device-cold";
const PASS_CACHE_COLD: &str = "cache-cold, page-cache-warm";
const PASS_WARM: &str = "warm";
const SEED_DEDUP: u64 = 0xDED0;
/// Reads per config compared byte for byte against the plain file, untimed.
const CHECK_READS: usize = 512;

#[derive(Debug, Clone)]
struct Opts {
    quick: bool,
    input_bytes: u64,
    reads: usize,
    dedup_bytes: u64,
    dedup_file_max: u64,
    reps: usize,
    /// Chunk cache of the judged read rows: enough to hold the object.
    chunk_cache_bytes: u64,
    tmp_root: PathBuf,
    user_args: Vec<String>,
}

fn usage() -> &'static str {
    "usage: cargo bench -p cairn-bench --bench store -- [--quick] [--input-mib N] [--reads N] \
     [--dedup-mib N] [--reps N] [--chunk-cache-mib N] [--tmp DIR]"
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
        input_bytes: if quick { 128 * MIB } else { GIB },
        reads: if quick { 20_000 } else { 200_000 },
        dedup_bytes: if quick { 60 * MIB } else { 300 * MIB },
        dedup_file_max: 16 * MIB,
        reps: 3,
        chunk_cache_bytes: 0,
        tmp_root: tmp_default,
        user_args: Vec::new(),
    };
    let mut chunk_cache_mib = None;
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .with_context(|| format!("{name} needs a value\n{}", usage()))
        };
        match a.as_str() {
            // cargo passes --bench to harness = false targets.
            "--bench" => continue,
            "--quick" => {}
            "--input-mib" => o.input_bytes = value(&a)?.parse::<u64>()? * MIB,
            "--reads" => o.reads = value(&a)?.parse()?,
            "--dedup-mib" => o.dedup_bytes = value(&a)?.parse::<u64>()? * MIB,
            "--reps" => o.reps = value(&a)?.parse::<usize>()?.max(1),
            "--chunk-cache-mib" => chunk_cache_mib = Some(value(&a)?.parse::<u64>()?),
            "--tmp" => o.tmp_root = PathBuf::from(value(&a)?),
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
    ensure!(o.input_bytes >= 8 * MIB, "--input-mib must be at least 8");
    ensure!(o.reads > 0, "--reads must be positive");
    // The object plus a quarter: the cache's shards each get about an
    // eighth of the chunks, give or take, and each entry carries overhead.
    o.chunk_cache_bytes = match chunk_cache_mib {
        Some(m) => m * MIB,
        None => (o.input_bytes + o.input_bytes / 4).div_ceil(MIB) * MIB,
    };
    ensure!(
        o.chunk_cache_bytes > 0,
        "--chunk-cache-mib must be positive"
    );
    Ok(o)
}

fn progress(msg: impl AsRef<str>) {
    eprintln!("[store-bench] {}", msg.as_ref());
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

fn store_cfg(engine: EngineKind, verify: bool, chunk_cache_bytes: u64) -> StoreConfig {
    StoreConfig {
        engine,
        verify_reads: verify,
        chunk_cache_bytes,
        ..StoreConfig::default()
    }
}

// ---------------------------------------------------------------------------
// A. Ingest
// ---------------------------------------------------------------------------

/// Repeated measurements of one operation over `bytes` bytes.
#[derive(Debug, Clone, Serialize)]
struct Series {
    secs: Vec<f64>,
    gbps: Vec<f64>,
    median_gbps: f64,
}

impl Series {
    fn new() -> Self {
        Self {
            secs: Vec::new(),
            gbps: Vec::new(),
            median_gbps: f64::NAN,
        }
    }
    fn push(&mut self, bytes: u64, d: std::time::Duration) {
        self.secs.push(d.as_secs_f64());
        self.gbps.push(gbps(bytes, d));
        self.median_gbps = median(&self.gbps);
    }
}

#[derive(Debug, Clone, Serialize)]
struct IngestInput {
    name: &'static str,
    source: String,
    bytes: u64,
    blake3: Series,
    sha256: Series,
    write: Series,
    ingest: Series,
    /// Context: FastCDC boundaries only, in memory.
    chunker: Series,
    /// Context: BLAKE3 of every chunk, in memory (boundaries precomputed).
    chunk_hash: Series,
    engine: String,
    put: PutResult,
    ratio_vs_sha256: f64,
    ratio_vs_write: f64,
    ratio: f64,
    pass: bool,
}

fn ingest_input(
    opts: &Opts,
    work: &Path,
    name: &'static str,
    source: String,
    input: &Path,
) -> Result<IngestInput> {
    let data = fs::read(input).with_context(|| format!("read {}", input.display()))?;
    let bytes = data.len() as u64;
    let want_sha = hex(&sha2::Sha256::digest(&data));
    let (mut b3, mut s256, mut write, mut ingest, mut chunker, mut chunk_hash) = (
        Series::new(),
        Series::new(),
        Series::new(),
        Series::new(),
        Series::new(),
        Series::new(),
    );
    let mut engine = String::new();
    let mut last_put = None;
    for rep in 0..opts.reps {
        progress(format!("ingest {name}: rep {}/{}", rep + 1, opts.reps));
        let (d, h) = time(|| blake3::hash(&data));
        std::hint::black_box(h);
        b3.push(bytes, d);

        let (d, h) = time(|| sha2::Sha256::digest(&data));
        std::hint::black_box(h);
        s256.push(bytes, d);

        let plain = work.join(format!("plain-write-{rep}.bin"));
        let d = plain_write(&plain, &data).with_context(|| format!("write {}", plain.display()))?;
        fs::remove_file(&plain)?;
        write.push(bytes, d);

        let dir = work.join(format!("ingest-store-{rep}"));
        let store = Store::open(&dir, StoreConfig::default()).context("open ingest store")?;
        engine = store.engine_name().to_string();
        let t = Instant::now();
        let put = store
            .put_reader(File::open(input)?, &PutOptions::default())
            .context("put_reader")?;
        let d = t.elapsed();
        ensure!(
            put.len == bytes,
            "ingest stored {} bytes, expected {bytes}",
            put.len
        );
        ensure!(
            put.sha256 == want_sha,
            "ingest sha256 {} != {want_sha}",
            put.sha256
        );
        drop(store);
        fs::remove_dir_all(&dir)?;
        ingest.push(bytes, d);
        last_put = Some(put);

        let (d, bounds) = time(|| chunk_boundaries(ChunkerConfig::default(), &data));
        let bounds = bounds.context("chunk_boundaries")?;
        chunker.push(bytes, d);
        let (d, ()) = time(|| {
            for &(off, len) in &bounds {
                std::hint::black_box(blake3::hash(&data[off..off + len]));
            }
        });
        chunk_hash.push(bytes, d);
    }
    let put = last_put.context("no repetitions ran")?;
    let ratio_vs_sha256 = ingest.median_gbps / s256.median_gbps;
    let ratio_vs_write = ingest.median_gbps / write.median_gbps;
    let ratio = ingest.median_gbps / s256.median_gbps.min(write.median_gbps);
    Ok(IngestInput {
        name,
        source,
        bytes,
        blake3: b3,
        sha256: s256,
        write,
        ingest,
        chunker,
        chunk_hash,
        engine,
        put,
        ratio_vs_sha256,
        ratio_vs_write,
        ratio,
        pass: ratio >= INGEST_TARGET,
    })
}

/// Returns the results and the path of the random input, kept for section B.
fn section_ingest(opts: &Opts, work: &Path) -> Result<(Vec<IngestInput>, PathBuf)> {
    let random = work.join("input-random.bin");
    progress(format!(
        "writing {} of seeded random bytes",
        human_bytes(opts.input_bytes)
    ));
    write_random_file(&random, opts.input_bytes, SEED_RANDOM_INPUT)?;
    let mut out = vec![ingest_input(
        opts,
        work,
        "random",
        format!(
            "StdRng::seed_from_u64({SEED_RANDOM_INPUT:#x}), {} bytes",
            opts.input_bytes
        ),
        &random,
    )?];

    let tar = work.join("input-usr-lib.tar");
    progress(format!(
        "capturing the first {} of `tar cf - --sort=name /usr/lib`",
        human_bytes(opts.input_bytes)
    ));
    let n = command_prefix_to_file(
        Command::new("tar").args(["cf", "-", "--sort=name", "/usr/lib"]),
        opts.input_bytes,
        &tar,
    )?;
    ensure!(n == opts.input_bytes, "tar of /usr/lib gave only {n} bytes");
    out.push(ingest_input(
        opts,
        work,
        "usr-lib-tar",
        format!(
            "first {} bytes of `tar cf - --sort=name /usr/lib`",
            opts.input_bytes
        ),
        &tar,
    )?);
    fs::remove_file(&tar)?;
    Ok((out, random))
}

// ---------------------------------------------------------------------------
// B. Random reads
// ---------------------------------------------------------------------------

// Page-cache eviction, for the device-cold passes.

extern "C" {
    // From the C library std already links.
    fn posix_fadvise(fd: i32, offset: i64, len: i64, advice: i32) -> i32;
}

/// `POSIX_FADV_DONTNEED` on Linux.
const POSIX_FADV_DONTNEED: i32 = 4;

/// Every regular file under each of `roots` (a file or a directory, walked).
fn files_under(roots: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut todo: Vec<PathBuf> = roots.to_vec();
    while let Some(p) = todo.pop() {
        let md = fs::symlink_metadata(&p).with_context(|| format!("stat {}", p.display()))?;
        if md.is_dir() {
            for e in fs::read_dir(&p).with_context(|| format!("list {}", p.display()))? {
                todo.push(e?.path());
            }
        } else if md.is_file() {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

/// Bytes of `files` resident in the page cache, from util-linux `fincore`
/// (mincore(2) underneath). `None` if `fincore` is missing or fails.
fn resident_bytes(files: &[PathBuf]) -> Option<u64> {
    if files.is_empty() {
        return Some(0);
    }
    let out = Command::new("fincore")
        .args(["--bytes", "--noheadings", "--output", "RES"])
        .args(files)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().parse::<u64>().ok())
        .sum()
}

/// How one eviction went.
#[derive(Debug, Clone, Serialize)]
struct Eviction {
    /// Which pass it prepared.
    config: String,
    threads: usize,
    files: usize,
    bytes: u64,
    /// Page-cache-resident bytes of those files before and after (`fincore`).
    resident_before: Option<u64>,
    resident_after: Option<u64>,
    /// `fadvise` (fsync + POSIX_FADV_DONTNEED per file) or
    /// `fadvise + drop_caches` (when pages stayed behind and
    /// /proc/sys/vm/drop_caches was writable).
    method: String,
}

/// Push `files` out of the page cache: fsync each (so no page is dirty),
/// then `posix_fadvise(POSIX_FADV_DONTNEED)` on it. If more than 1% of the
/// bytes stay resident, fall back to `echo 1 > /proc/sys/vm/drop_caches`
/// (root only). Fails if the pages cannot be made to leave.
fn evict(config: &str, threads: usize, files: &[PathBuf]) -> Result<Eviction> {
    use std::os::fd::AsRawFd as _;
    let bytes: u64 = files
        .iter()
        .map(|f| fs::metadata(f).map(|m| m.len()))
        .sum::<std::io::Result<u64>>()?;
    let resident_before = resident_bytes(files);
    for f in files {
        let file = File::open(f).with_context(|| format!("open {}", f.display()))?;
        file.sync_all()
            .with_context(|| format!("fsync {}", f.display()))?;
        // SAFETY: a plain syscall on a descriptor `file` keeps open.
        let rc = unsafe { posix_fadvise(file.as_raw_fd(), 0, 0, POSIX_FADV_DONTNEED) };
        ensure!(rc == 0, "posix_fadvise({}) failed: error {rc}", f.display());
    }
    let mut method = "fadvise".to_string();
    let mut resident_after = resident_bytes(files);
    if resident_after.is_some_and(|r| r > bytes / 100) {
        let _ = Command::new("sync").status();
        if fs::write("/proc/sys/vm/drop_caches", "1").is_ok() {
            method = "fadvise + drop_caches".into();
            resident_after = resident_bytes(files);
        }
    }
    if let Some(r) = resident_after {
        ensure!(
            r <= bytes / 100,
            "{config}: {r} of {bytes} bytes still in the page cache after eviction"
        );
    }
    Ok(Eviction {
        config: config.to_string(),
        threads,
        files: files.len(),
        bytes,
        resident_before,
        resident_after,
        method,
    })
}

/// Read every file under `roots` once, so it is in the page cache.
fn warm_page_cache(roots: &[PathBuf]) -> Result<u64> {
    let mut n = 0;
    for f in files_under(roots)? {
        n += read_fully(&f)?;
    }
    Ok(n)
}

#[derive(Debug, Clone, Serialize)]
struct ReadRow {
    config: String,
    engine: String,
    verify_reads: Option<bool>,
    /// `StoreConfig::chunk_cache_bytes` (None for pread; 0 = off).
    chunk_cache_bytes: Option<u64>,
    threads: usize,
    pass: &'static str,
    summary: LatencySummary,
    /// Chunk lookups in this pass that hit / missed the chunk cache.
    cache_hits: Option<u64>,
    cache_misses: Option<u64>,
    /// `Store::open_object` on the freshly opened store before the pass, ms
    /// (untimed by the pass; device-cold: after the eviction).
    open_ms: Option<f64>,
    ratio_vs_pread: Option<f64>,
    meets_target: Option<bool>,
}

#[derive(Debug, Clone, Serialize)]
struct ReadsResult {
    object_bytes: u64,
    reads_per_pass: usize,
    read_len: usize,
    object: String,
    chunks: u64,
    /// How the warm offsets fall on the CDC object's chunks and 4 KiB groups.
    geometry: ReadGeometry,
    /// Chunks of the same bytes stored with fixed-size chunks (context rows).
    fixed_chunk_len: u32,
    fixed_geometry: ReadGeometry,
    /// BLAKE3 of one 4 KiB buffer in memory, ns (median of 5 batches).
    blake3_4k_ns: f64,
    /// Average chunk length of the CDC object, bytes.
    avg_chunk_bytes: u64,
    /// BLAKE3 of one average-sized chunk in memory, ns (median of 5 batches).
    chunk_hash_ns: f64,
    /// pread of one average-sized chunk from the page-cached plain file into
    /// a reused buffer, ns (median of 5 batches).
    chunk_read_ns: f64,
    /// Allocating and filling one average-sized chunk buffer that is kept
    /// (fresh pages faulted in), ns.
    chunk_fresh_mem_ns: f64,
    /// Chunk cache of the judged rows.
    chunk_cache_bytes: u64,
    /// `StoreConfig::default().chunk_cache_bytes`.
    default_chunk_cache_bytes: u64,
    rows: Vec<ReadRow>,
    /// Page-cache evictions before the device-cold passes.
    evictions: Vec<Eviction>,
    notes: Vec<String>,
}

struct CairnConfig {
    label: String,
    engine: EngineKind,
    verify: bool,
    chunk_cache_bytes: u64,
    /// Counts against the ≥ 0.5 target.
    judged: bool,
    /// Read the fixed-size-chunk copy instead of the CDC object.
    fixed: bool,
}

/// Fixed chunk size of the context object (the volume-overlay layout).
const FIXED_CHUNK: u32 = 64 << 10;

fn spans(chunks: &[cairn_chunkstore::recipe::ChunkRef]) -> Vec<(u64, u64)> {
    chunks
        .iter()
        .map(|c| (c.offset, u64::from(c.len)))
        .collect()
}

fn section_reads(opts: &Opts, work: &Path, plain_path: &Path) -> Result<ReadsResult> {
    let len = fs::metadata(plain_path)?.len();
    let store_dir = work.join("reads-store");
    progress("reads: storing the random object");
    let (object, chunks, fixed_object, geometry, fixed_geometry) = {
        let store = Store::open(&store_dir, StoreConfig::default()).context("open reads store")?;
        let put = store.put_reader(File::open(plain_path)?, &PutOptions::default())?;
        // Context: the same bytes with fixed-size chunks, as volume overlays
        // store them. Shares no chunks with the CDC copy.
        let fixed_opts = PutOptions {
            chunker: Some(ChunkerConfig::Fixed { size: FIXED_CHUNK }),
            ..PutOptions::default()
        };
        let fixed = store.put_reader(File::open(plain_path)?, &fixed_opts)?;
        let warm = aligned_offsets(len, READ_LEN as u64, opts.reads, SEED_WARM);
        let geo = read_geometry(
            &spans(store.open_object(&put.object)?.recipe().chunks()),
            &warm,
            READ_LEN as u64,
        );
        let fgeo = read_geometry(
            &spans(store.open_object(&fixed.object)?.recipe().chunks()),
            &warm,
            READ_LEN as u64,
        );
        (put.object, put.chunks, fixed.object, geo, fgeo)
    };
    // The plain file gets the same page-cache treatment as the segments,
    // which were just written.
    read_fully(plain_path)?;
    let cold = aligned_offsets(len, READ_LEN as u64, opts.reads, SEED_COLD);
    let warm = aligned_offsets(len, READ_LEN as u64, opts.reads, SEED_WARM);
    let dev_cold = aligned_offsets(len, READ_LEN as u64, opts.reads, SEED_DEVICE_COLD);
    let store_files = [store_dir.join("segments"), store_dir.join("index")];
    let mut evictions = Vec::new();
    let plain = File::open(plain_path)?;
    // The per-group verification cost floor, in memory.
    let group = cairn_bench::random_bytes(READ_LEN, 4);
    let per_batch: Vec<f64> = (0..5)
        .map(|_| {
            let (d, ()) = time(|| {
                for _ in 0..50_000 {
                    std::hint::black_box(blake3::hash(std::hint::black_box(&group)));
                }
            });
            d.as_nanos() as f64 / 50_000.0
        })
        .collect();
    let blake3_4k_ns = median(&per_batch);
    // The first-touch floor: a chunk's first read must read it whole and
    // hash it whole. Both measured on an average-sized chunk: BLAKE3 in
    // memory, and a pread of that many bytes from the page-cached plain file
    // into a reused buffer.
    let avg_chunk = (len / chunks.max(1)).max(1) as usize;
    let chunk_buf = cairn_bench::random_bytes(avg_chunk, 5);
    let chunk_hash_ns = median(
        &(0..5)
            .map(|_| {
                let (d, ()) = time(|| {
                    for _ in 0..2_000 {
                        std::hint::black_box(blake3::hash(std::hint::black_box(&chunk_buf)));
                    }
                });
                d.as_nanos() as f64 / 2_000.0
            })
            .collect::<Vec<_>>(),
    );
    let mut read_buf = vec![0u8; avg_chunk];
    let chunk_offs = aligned_offsets(len - avg_chunk as u64, 4096, 2_000, 7);
    let mut chunk_read = Vec::new();
    for _ in 0..5 {
        let (d, r) = time(|| -> Result<()> {
            for &o in &chunk_offs {
                plain.read_exact_at(&mut read_buf, o)?;
            }
            Ok(())
        });
        r?;
        chunk_read.push(d.as_nanos() as f64 / chunk_offs.len() as f64);
    }
    let chunk_read_ns = median(&chunk_read);
    // What the chunk cache's copy of a first-touched chunk costs in fresh
    // memory: allocate and fill 2000 chunk-sized buffers, all kept (as the
    // cache keeps them), so each one's pages are faulted in and zeroed by
    // the kernel. Context for the bound; on a VM it varies with how much of
    // the guest's free memory the host has backed.
    let (d, kept) = time(|| {
        (0..2_000)
            .map(|i| vec![i as u8 | 1; avg_chunk])
            .collect::<Vec<_>>()
    });
    std::hint::black_box(&kept);
    drop(kept);
    let chunk_fresh_mem_ns = d.as_nanos() as f64 / 2_000.0;

    let mut notes = Vec::new();
    let uring_ok = match Store::open(&store_dir, store_cfg(EngineKind::Uring, true, 0)) {
        Ok(_) => true,
        Err(e) => {
            notes.push(format!(
                "io_uring engine unavailable ({e}); uring rows skipped"
            ));
            false
        }
    };
    let either = if uring_ok {
        EngineKind::Uring
    } else {
        EngineKind::Psync
    };
    let holds = opts.chunk_cache_bytes;
    let default_cache = StoreConfig::default().chunk_cache_bytes;
    let cfg = |label: String, engine, verify, chunk_cache_bytes, judged, fixed| CairnConfig {
        label,
        engine,
        verify,
        chunk_cache_bytes,
        judged,
        fixed,
    };
    let configs = [
        cfg(
            format!("cairn uring verify, chunk cache {}", human_bytes(holds)),
            EngineKind::Uring,
            true,
            holds,
            true,
            false,
        ),
        cfg(
            format!("cairn psync verify, chunk cache {}", human_bytes(holds)),
            EngineKind::Psync,
            true,
            holds,
            true,
            false,
        ),
        cfg(
            format!(
                "cairn uring verify, chunk cache {} (default)",
                human_bytes(default_cache)
            ),
            either,
            true,
            default_cache,
            false,
            false,
        ),
        cfg(
            "cairn uring verify, chunk cache off".into(),
            EngineKind::Uring,
            true,
            0,
            false,
            false,
        ),
        cfg(
            "cairn psync verify, chunk cache off".into(),
            EngineKind::Psync,
            true,
            0,
            false,
            false,
        ),
        cfg(
            "cairn uring no-verify".into(),
            either,
            false,
            0,
            false,
            false,
        ),
        cfg(
            "cairn uring verify, fixed 64 KiB chunks, chunk cache off".into(),
            either,
            true,
            0,
            false,
            true,
        ),
    ];

    let mut rows = Vec::new();
    for threads in [1usize, 2] {
        progress(format!("reads: pread, {threads} thread(s)"));
        let pread = |o: u64, b: &mut [u8]| plain.read_exact_at(b, o).map_err(anyhow::Error::from);
        evictions.push(evict(
            "pread (plain file)",
            threads,
            &[plain_path.to_path_buf()],
        )?);
        let base_dev = run_reads(&dev_cold, READ_LEN, threads, pread)?;
        read_fully(plain_path)?;
        let base_cold = run_reads(&cold, READ_LEN, threads, pread)?;
        let base_warm = run_reads(&warm, READ_LEN, threads, pread)?;
        for (pass, s) in [
            (PASS_DEVICE_COLD, base_dev),
            (PASS_CACHE_COLD, base_cold),
            (PASS_WARM, base_warm),
        ] {
            rows.push(ReadRow {
                config: "pread (plain file)".into(),
                engine: "pread".into(),
                verify_reads: None,
                chunk_cache_bytes: None,
                threads,
                pass,
                summary: s,
                cache_hits: None,
                cache_misses: None,
                open_ms: None,
                ratio_vs_pread: None,
                meets_target: None,
            });
        }
        for c in &configs {
            if c.engine == EngineKind::Uring && !uring_ok {
                continue;
            }
            progress(format!("reads: {}, {threads} thread(s)", c.label));
            let cfg = store_cfg(c.engine, c.verify, c.chunk_cache_bytes);
            let obj = if c.fixed { &fixed_object } else { &object };
            // Device-cold (judged configs only, to bound the run time): a
            // fresh open, then the store's files leave the page cache.
            let dev = if c.judged {
                let store =
                    Store::open(&store_dir, cfg.clone()).with_context(|| c.label.clone())?;
                evictions.push(evict(&c.label, threads, &files_under(&store_files)?)?);
                let t = Instant::now();
                let h = store.open_object(obj)?;
                let open_ms = t.elapsed().as_secs_f64() * 1e3;
                let read = |o: u64, b: &mut [u8]| h.read_at(o, b).map_err(anyhow::Error::from);
                let m = store.metrics();
                let l0 = (m.chunk_cache_hits.get(), m.chunk_cache_misses.get());
                let s = run_reads(&dev_cold, READ_LEN, threads, read)?;
                let l1 = (m.chunk_cache_hits.get(), m.chunk_cache_misses.get());
                Some((s, l0, l1, open_ms))
            } else {
                None
            };
            // The cache-cold pass reads segments from the page cache, as
            // pread reads the plain file.
            warm_page_cache(&store_files)?;
            // Fresh open: empty chunk, outboard and metadata caches.
            let store = Store::open(&store_dir, cfg).with_context(|| c.label.clone())?;
            let engine = store.engine_name().to_string();
            let t = Instant::now();
            let h = store.open_object(obj)?;
            let open_ms = t.elapsed().as_secs_f64() * 1e3;
            ensure!(
                h.len() == len,
                "stored object is {} bytes, expected {len}",
                h.len()
            );
            let read = |o: u64, b: &mut [u8]| h.read_at(o, b).map_err(anyhow::Error::from);
            let m = store.metrics();
            let lookups = || (m.chunk_cache_hits.get(), m.chunk_cache_misses.get());
            let l0 = lookups();
            let s_cold = run_reads(&cold, READ_LEN, threads, read)?;
            let l1 = lookups();
            let s_warm = run_reads(&warm, READ_LEN, threads, read)?;
            let l2 = lookups();
            // Untimed: the store returns the same bytes as the plain file.
            let (mut a, mut b) = (vec![0u8; READ_LEN], vec![0u8; READ_LEN]);
            for &o in aligned_offsets(len, READ_LEN as u64, CHECK_READS, SEED_WARM ^ 1).iter() {
                h.read_at(o, &mut a)?;
                plain.read_exact_at(&mut b, o)?;
                ensure!(
                    a == b,
                    "{}: bytes at offset {o} differ from the plain file",
                    c.label
                );
            }
            let cached = c.verify && c.chunk_cache_bytes > 0;
            let mut passes = Vec::new();
            if let Some((s, a, b, ms)) = dev {
                passes.push((PASS_DEVICE_COLD, s, base_dev, (a, b), Some(ms)));
            }
            passes.push((PASS_CACHE_COLD, s_cold, base_cold, (l0, l1), Some(open_ms)));
            passes.push((PASS_WARM, s_warm, base_warm, (l1, l2), None));
            for (pass, s, base, (a, b), open_ms) in passes {
                let ratio = s.iops / base.iops;
                rows.push(ReadRow {
                    config: c.label.clone(),
                    engine: engine.clone(),
                    verify_reads: Some(c.verify),
                    chunk_cache_bytes: Some(c.chunk_cache_bytes),
                    threads,
                    pass,
                    summary: s,
                    cache_hits: cached.then_some(b.0 - a.0),
                    cache_misses: cached.then_some(b.1 - a.1),
                    open_ms,
                    ratio_vs_pread: Some(ratio),
                    meets_target: c.judged.then_some(ratio >= READ_TARGET),
                });
            }
        }
    }
    fs::remove_dir_all(&store_dir)?;
    Ok(ReadsResult {
        object_bytes: len,
        reads_per_pass: opts.reads,
        read_len: READ_LEN,
        object: object.to_string(),
        chunks,
        geometry,
        fixed_chunk_len: FIXED_CHUNK,
        fixed_geometry,
        blake3_4k_ns,
        avg_chunk_bytes: avg_chunk as u64,
        chunk_hash_ns,
        chunk_read_ns,
        chunk_fresh_mem_ns,
        chunk_cache_bytes: holds,
        default_chunk_cache_bytes: default_cache,
        rows,
        evictions,
        notes,
    })
}

// ---------------------------------------------------------------------------
// C. Dedup
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Serialize)]
struct DedupResult {
    source: String,
    files: usize,
    tree_bytes: u64,
    skipped_unreadable: usize,
    modified_files: usize,
    bytes_changed: u64,
    changed_file_bytes: u64,
    v1_bytes: u64,
    v2_bytes: u64,
    v1_put: PutResult,
    v2_put: PutResult,
    v1_put_secs: f64,
    v2_put_secs: f64,
    new_over_changed: f64,
    new_over_changed_files: f64,
    new_over_v2: f64,
    stored_over_v2: f64,
}

fn tar_tree(parent: &Path, name: &str, out: &Path) -> Result<()> {
    let status = Command::new("tar")
        .arg("cf")
        .arg(out)
        .args([
            "--sort=name",
            "--mtime=@0",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "-C",
        ])
        .arg(parent)
        .arg(name)
        .status()
        .context("run tar")?;
    ensure!(
        status.success(),
        "tar of {} failed: {status}",
        parent.join(name).display()
    );
    Ok(())
}

fn section_dedup(opts: &Opts, work: &Path) -> Result<DedupResult> {
    let src = Path::new("/usr/lib");
    let base = work.join("dedup");
    let tree = base.join("tree");
    fs::create_dir_all(&tree)?;
    progress(format!(
        "dedup: copying ~{} of files from {}",
        human_bytes(opts.dedup_bytes),
        src.display()
    ));
    let mut files: Vec<(PathBuf, u64)> = Vec::new();
    let mut total = 0u64;
    let mut skipped = 0;
    for (rel, size) in regular_files(src) {
        if total >= opts.dedup_bytes {
            break;
        }
        if size > opts.dedup_file_max {
            continue;
        }
        let dst = tree.join(&rel);
        if let Some(p) = dst.parent() {
            fs::create_dir_all(p)?;
        }
        match fs::copy(src.join(&rel), &dst) {
            Ok(n) => {
                fs::set_permissions(&dst, fs::Permissions::from_mode(0o644))?;
                total += n;
                files.push((dst, n));
            }
            Err(_) => {
                let _ = fs::remove_file(&dst);
                skipped += 1;
            }
        }
    }
    let v1 = base.join("v1.tar");
    let v2 = base.join("v2.tar");
    tar_tree(&base, "tree", &v1)?;

    let mut rng = StdRng::seed_from_u64(SEED_DEDUP);
    let candidates: Vec<usize> = (0..files.len()).filter(|&i| files[i].1 > 0).collect();
    ensure!(
        !candidates.is_empty(),
        "no non-empty files copied from {}",
        src.display()
    );
    let k = ((files.len() as f64 * 0.05).round() as usize).clamp(1, candidates.len().max(1));
    let mut chosen: Vec<usize> = rand::seq::index::sample(&mut rng, candidates.len(), k)
        .into_iter()
        .collect();
    chosen.sort_unstable();
    let (mut bytes_changed, mut changed_file_bytes) = (0u64, 0u64);
    for &ci in &chosen {
        let (path, len) = &files[candidates[ci]];
        let region = rng.gen_range(4 * KIB..=64 * KIB).min(*len);
        let off = rng.gen_range(0..=len - region);
        let mut buf = vec![0u8; region as usize];
        rng.fill_bytes(&mut buf);
        File::options()
            .write(true)
            .open(path)?
            .write_all_at(&buf, off)?;
        bytes_changed += region;
        changed_file_bytes += len;
    }
    tar_tree(&base, "tree", &v2)?;
    fs::remove_dir_all(&tree)?;

    progress("dedup: putting v1 then v2");
    let store = Store::open(base.join("store"), StoreConfig::default())?;
    let (f1, f2) = (File::open(&v1)?, File::open(&v2)?);
    let (d1, p1) = time(|| store.put_reader(f1, &PutOptions::default()));
    let p1 = p1.context("put v1")?;
    let (d2, p2) = time(|| store.put_reader(f2, &PutOptions::default()));
    let p2 = p2.context("put v2")?;
    drop(store);
    let (v1_bytes, v2_bytes) = (fs::metadata(&v1)?.len(), fs::metadata(&v2)?.len());
    fs::remove_dir_all(&base)?;
    Ok(DedupResult {
        source: format!(
            "regular files of {} in byte-sorted path order, files > {} skipped, until >= {}",
            src.display(),
            human_bytes(opts.dedup_file_max),
            human_bytes(opts.dedup_bytes)
        ),
        files: files.len(),
        tree_bytes: total,
        skipped_unreadable: skipped,
        modified_files: chosen.len(),
        bytes_changed,
        changed_file_bytes,
        v1_bytes,
        v2_bytes,
        new_over_changed: p2.new_bytes as f64 / bytes_changed as f64,
        new_over_changed_files: p2.new_bytes as f64 / changed_file_bytes as f64,
        new_over_v2: p2.new_bytes as f64 / v2_bytes as f64,
        stored_over_v2: p2.stored_bytes as f64 / v2_bytes as f64,
        v1_put: p1,
        v2_put: p2,
        v1_put_secs: d1.as_secs_f64(),
        v2_put_secs: d2.as_secs_f64(),
    })
}

// ---------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------

fn us(ns: u64) -> String {
    format!("{:.1}", ns as f64 / 1e3)
}

fn series_cell(s: &Series) -> String {
    let reps: Vec<String> = s.gbps.iter().map(|g| format!("{g:.2}")).collect();
    format!("**{:.2}** ({})", s.median_gbps, reps.join(", "))
}

struct Report<'a> {
    opts: &'a Opts,
    command: String,
    argv: Vec<String>,
    date: String,
    machine: MachineFacts,
    engines: Vec<String>,
    ingest: Vec<IngestInput>,
    reads: ReadsResult,
    dedup: DedupResult,
    total_secs: f64,
    loadavg_end: String,
}

/// The best ratio a cache-cold pass can reach on this machine when every
/// chunk's first read must read and hash the whole chunk: the pass's hits at
/// the warm pass's per-read cost, plus its misses at (read one chunk + hash
/// one chunk), both measured on this machine; against the pread pass's time.
fn render_first_touch_bound(s: &mut String, rd: &ReadsResult) {
    let floor_ns = rd.chunk_read_ns + rd.chunk_hash_ns;
    let _ = writeln!(
        s,
        "\n**The {PASS_CACHE_COLD} bound.** Verification needs a chunk's whole bytes the first time it is read (its id is the BLAKE3 of all of it; \
         outboards are built from verified bytes and live in memory only). So a first touch costs at least one read of the chunk from the page cache \
         plus one BLAKE3 pass over it. Measured here on an average chunk of {} B: BLAKE3 {:.1} µs ({:.2} GB/s), pread into a reused buffer {:.1} µs, \
         so ≥ {:.1} µs per first touch, against pread's ≈ 1 µs per 4 KiB read. Best achievable ratio = pread pass time / (hits × warm per-read time + misses × {:.1} µs) \
         (2 threads: divided by 2, assuming perfect scaling). Not in that floor: the chunk cache keeps each first-touched chunk in memory the process has not touched before, \
         and faulting in fresh memory measured {:.1} µs per chunk-sized buffer here (kernel page zeroing; on this VM it varies a lot from run to run); \
         the last but one column adds that per miss.\n",
        rd.avg_chunk_bytes,
        rd.chunk_hash_ns / 1e3,
        rd.avg_chunk_bytes as f64 / rd.chunk_hash_ns,
        rd.chunk_read_ns / 1e3,
        floor_ns / 1e3,
        floor_ns / 1e3,
        rd.chunk_fresh_mem_ns / 1e3,
    );
    let mut t = MdTable::new(&[
        "config",
        "threads",
        "hits / misses",
        "warm per-read µs",
        "floor time s",
        "pread time s",
        "best ratio",
        "best ratio incl. fresh memory",
        "measured ratio",
    ]);
    for row in rd
        .rows
        .iter()
        .filter(|r| r.pass == PASS_CACHE_COLD && r.meets_target.is_some())
    {
        let (Some(h), Some(m)) = (row.cache_hits, row.cache_misses) else {
            continue;
        };
        let warm = rd
            .rows
            .iter()
            .find(|w| w.pass == PASS_WARM && w.config == row.config && w.threads == row.threads);
        let base = rd
            .rows
            .iter()
            .find(|b| b.pass == PASS_CACHE_COLD && b.engine == "pread" && b.threads == row.threads);
        let (Some(warm), Some(base)) = (warm, base) else {
            continue;
        };
        let hit_ns = warm.summary.mean_ns;
        let threads = row.threads.max(1) as f64;
        let floor_s = (h as f64 * hit_ns + m as f64 * floor_ns) / 1e9 / threads;
        let with_mem_s = floor_s + m as f64 * rd.chunk_fresh_mem_ns / 1e9 / threads;
        let pread_s = base.summary.wall_secs;
        t.row(&[
            row.config.clone(),
            row.threads.to_string(),
            format!("{h} / {m}"),
            format!("{:.2}", hit_ns / 1e3),
            format!("{floor_s:.3}"),
            format!("{pread_s:.3}"),
            format!("{:.2}", pread_s / floor_s),
            format!("{:.2}", pread_s / with_mem_s),
            row.ratio_vs_pread.map_or("—".into(), |v| format!("{v:.2}")),
        ]);
    }
    s.push_str(&t.render());
}

fn render(r: &Report<'_>) -> String {
    let mut s = String::new();
    let o = r.opts;
    let _ = writeln!(
        s,
        "# Cairn chunk store benchmark — {}{}\n",
        r.date,
        if o.quick { " (quick)" } else { "" }
    );
    let _ = writeln!(s, "Command: `{}`  ", r.command);
    let _ = writeln!(s, "Binary argv: `{}`  ", r.argv.join(" "));
    let _ = writeln!(s, "Total run time: {:.0} s\n", r.total_secs);

    let m = &r.machine;
    let _ = writeln!(s, "## Machine\n");
    let mut t = MdTable::new(&["fact", "value"]);
    t.row(&["nproc", &m.nproc.to_string()])
        .row(&["CPU", &m.cpu_model])
        .row(&["CPU flags", &m.cpu_flags.join(", ")])
        .row(&["kernel", &m.kernel])
        .row(&["memory", &human_bytes(m.mem_bytes)])
        .row(&[
            "work dir filesystem",
            &format!("{} (under {})", m.work_fs, o.tmp_root.display()),
        ])
        .row(&["store engines used", &r.engines.join(", ")])
        .row(&[
            "load average at start / end",
            &format!("{} / {}", m.loadavg, r.loadavg_end),
        ]);
    s.push_str(&t.render());
    let _ = writeln!(
        s,
        "\nIngest inputs are read from the page cache; writes are timed up to \
         their fsync. Only the {PASS_DEVICE_COLD} read passes push files out of the page cache first. Each measurement is the median of {} repetitions (fresh file / fresh store each).\n",
        o.reps
    );

    let _ = writeln!(s, "## Summary\n");
    let mut t = MdTable::new(&["target", "figure", "value", "result"]);
    for i in &r.ingest {
        t.row(&[
            format!("ingest / min(sha256, write) ≥ {INGEST_TARGET}"),
            format!("ingest {}", i.name),
            format!("{:.2}", i.ratio),
            pass_fail(i.pass).to_string(),
        ]);
    }
    for row in r.reads.rows.iter().filter(|x| x.meets_target.is_some()) {
        t.row(&[
            format!("Cairn IOPS / pread IOPS ≥ {READ_TARGET} (verify on)"),
            format!("{}, {} thr, {}", row.config, row.threads, row.pass),
            format!("{:.2}", row.ratio_vs_pread.unwrap_or(f64::NAN)),
            pass_fail(row.meets_target.unwrap_or(false)).to_string(),
        ]);
    }
    s.push_str(&t.render());

    let _ = writeln!(
        s,
        "\n## A. Ingest (GB/s = 10^9 B/s; median **bold**, then each repetition)\n"
    );
    let mut t = MdTable::new(&[
        "input",
        "bytes",
        "BLAKE3 1 thread",
        "SHA-256",
        "plain write + sync_data",
        "Cairn ingest",
        "ingest / sha256",
        "ingest / write",
        "ingest / min",
        "target ≥ 0.5",
    ]);
    for i in &r.ingest {
        t.row(&[
            i.name.to_string(),
            human_bytes(i.bytes),
            series_cell(&i.blake3),
            series_cell(&i.sha256),
            series_cell(&i.write),
            series_cell(&i.ingest),
            format!("{:.2}", i.ratio_vs_sha256),
            format!("{:.2}", i.ratio_vs_write),
            format!("{:.2}", i.ratio),
            pass_fail(i.pass).to_string(),
        ]);
    }
    s.push_str(&t.render());
    let _ = writeln!(s, "\nInputs:");
    for i in &r.ingest {
        let _ = writeln!(s, "- `{}`: {}", i.name, i.source);
    }
    let _ = writeln!(s, "\nCairn ingest = `Store::put_reader(File::open(input))` into a fresh store (engine `{}`), timed through its commit (segment fdatasync + synced RocksDB batch). Plain write = 4 MiB `write_all` calls into a new file + `sync_data`, timed from create to end of sync.\n", r.ingest.first().map_or("?", |i| i.engine.as_str()));
    let _ = writeln!(s, "Context (not targets): the ingest pipeline's stages measured alone, in memory, same inputs.\n");
    let mut t = MdTable::new(&[
        "input",
        "FastCDC boundaries only",
        "BLAKE3 per chunk",
        "chunk + hash (1 thread, derived)",
        "sha256 + BLAKE3 (digest thread, derived)",
        "chunks",
        "new bytes",
        "stored bytes",
    ]);
    for i in &r.ingest {
        let serial = |a: f64, b: f64| 1.0 / (1.0 / a + 1.0 / b);
        t.row(&[
            i.name.to_string(),
            series_cell(&i.chunker),
            series_cell(&i.chunk_hash),
            format!(
                "{:.2}",
                serial(i.chunker.median_gbps, i.chunk_hash.median_gbps)
            ),
            format!("{:.2}", serial(i.sha256.median_gbps, i.blake3.median_gbps)),
            i.put.chunks.to_string(),
            i.put.new_bytes.to_string(),
            i.put.stored_bytes.to_string(),
        ]);
    }
    s.push_str(&t.render());

    let rd = &r.reads;
    let _ = writeln!(
        s,
        "\n## B. Random {} KiB reads ({} object, {} chunks; {} reads per pass, 4 KiB-aligned offsets)\n",
        rd.read_len / 1024,
        human_bytes(rd.object_bytes),
        rd.chunks,
        rd.reads_per_pass
    );
    let _ = writeln!(
        s,
        "**Chunk cache.** The judged rows run with Cairn's verified chunk cache (`StoreConfig::chunk_cache_bytes`) set to {}, \
         which holds the whole object; the store's default is {}. The cache keeps whole chunks, uncompressed, whose BLAKE3 \
         matched their id when they were read from disk; a read that hits it is a copy from memory, with no I/O and no hashing. \
         It starts empty at `Store::open` and is filled by random reads only: a chunk's first read reads and hashes it whole. \
         Rows with the cache off (every read goes to the segment file and verifies the 4 KiB groups it covers) or at the \
         default size are context. `cache hits` = the pass's chunk lookups that hit the cache.\n",
        human_bytes(rd.chunk_cache_bytes),
        human_bytes(rd.default_chunk_cache_bytes),
    );
    let _ = writeln!(
        s,
        "Passes, in run order for each config: **{PASS_DEVICE_COLD}** (judged configs and pread only) = the files the pass reads were just pushed out of the page cache \
         (pread: the plain file; Cairn: every file under the store's `segments/` and `index/`, after a fresh `Store::open`; each file fsynced, then `posix_fadvise(POSIX_FADV_DONTNEED)`, \
         checked with `fincore`; see the eviction table), so both sides read from the device and Cairn's chunk cache is empty; offsets seed {SEED_DEVICE_COLD:#x}. \
         **{PASS_CACHE_COLD}** = first reads after a fresh `Store::open` (chunk cache, outboards and index entry cache empty: each chunk's first read reads and hashes it whole) \
         while the segment files are in the page cache (read fully just before), as the plain file is for pread (read fully once beforehand); offsets seed {SEED_COLD:#x}. \
         **{PASS_WARM}** = the next batch on the same open store (seed {SEED_WARM:#x}). \
         pread = `FileExt::read_exact_at` on a plain file holding the same bytes. `open ms` = `Store::open_object` just before the pass (not in the pass's time). \
         With 2 threads the offsets are split in halves and both threads share one `ObjectHandle`. \
         Latency per call via `Instant`; IOPS = reads / wall time.\n"
    );
    let mut t = MdTable::new(&[
        "config",
        "engine",
        "chunk cache",
        "threads",
        "pass",
        "cache hits",
        "open ms",
        "IOPS",
        "p50 µs",
        "p99 µs",
        "mean µs",
        "max µs",
        "vs pread",
        "target ≥ 0.5",
    ]);
    for row in &rd.rows {
        let x = &row.summary;
        let cache = match (row.verify_reads, row.chunk_cache_bytes) {
            (None, _) => "—".to_string(),
            (Some(false), _) => "off (verify off)".to_string(),
            (Some(true), Some(b)) if b > 0 => human_bytes(b),
            (Some(true), _) => "off".to_string(),
        };
        let hits = match (row.cache_hits, row.cache_misses) {
            (Some(h), Some(m)) if h + m > 0 => {
                format!("{:.1}%", h as f64 * 100.0 / (h + m) as f64)
            }
            _ => "—".to_string(),
        };
        t.row(&[
            row.config.clone(),
            row.engine.clone(),
            cache,
            row.threads.to_string(),
            row.pass.to_string(),
            hits,
            row.open_ms.map_or("—".into(), |v| format!("{v:.1}")),
            format!("{:.0}", x.iops),
            us(x.p50_ns),
            us(x.p99_ns),
            format!("{:.1}", x.mean_ns / 1e3),
            us(x.max_ns),
            row.ratio_vs_pread.map_or("—".into(), |v| format!("{v:.2}")),
            row.meets_target
                .map_or("(context)".into(), |ok| pass_fail(ok).to_string()),
        ]);
    }
    s.push_str(&t.render());
    if !rd.evictions.is_empty() {
        let _ = writeln!(s, "\nPage-cache evictions before the {PASS_DEVICE_COLD} passes (resident bytes by `fincore`):\n");
        let mut t = MdTable::new(&[
            "pass of",
            "threads",
            "files",
            "bytes",
            "resident before",
            "resident after",
            "method",
        ]);
        let opt = |v: Option<u64>| v.map_or("? (no fincore)".into(), |b| b.to_string());
        for e in &rd.evictions {
            t.row(&[
                e.config.clone(),
                e.threads.to_string(),
                e.files.to_string(),
                e.bytes.to_string(),
                opt(e.resident_before),
                opt(e.resident_after),
                e.method.clone(),
            ]);
        }
        s.push_str(&t.render());
    }
    render_first_touch_bound(&mut s, rd);
    let _ = writeln!(
        s,
        "\nWhere the warm-pass reads land, for reads that miss the chunk cache (verification works on 4 KiB groups counted from each chunk's start; \
         the fixed-chunk rows read a second copy of the same bytes stored with `ChunkerConfig::Fixed {{ size: {} }}`, context only):\n",
        rd.fixed_chunk_len
    );
    let mut t = MdTable::new(&[
        "object",
        "chunks starting 4 KiB-aligned",
        "reads group-aligned in one chunk",
        "reads crossing a chunk boundary",
        "groups read + hashed per 4 KiB read",
    ]);
    for (name, g) in [
        ("CDC (default chunker)", &rd.geometry),
        ("fixed 64 KiB", &rd.fixed_geometry),
    ] {
        t.row(&[
            name.to_string(),
            format!("{:.2}%", g.chunks_aligned * 100.0),
            format!("{:.2}%", g.group_aligned * 100.0),
            format!("{:.2}%", g.cross_chunk * 100.0),
            format!("{:.2}", g.mean_groups),
        ]);
    }
    s.push_str(&t.render());
    let _ = writeln!(
        s,
        "\nBLAKE3 of one 4 KiB group in memory: {:.0} ns (so {:.2} groups per read cost ≈ {:.1} µs of hashing alone, vs a pread p50 of {} µs; a chunk cache hit hashes nothing).",
        rd.blake3_4k_ns,
        rd.geometry.mean_groups,
        rd.blake3_4k_ns * rd.geometry.mean_groups / 1e3,
        rd.rows.iter().find(|r| r.engine == "pread" && r.threads == 1 && r.pass == "warm").map_or("?".into(), |r| us(r.summary.p50_ns)),
    );
    for n in &rd.notes {
        let _ = writeln!(s, "\nNote: {n}");
    }

    let d = &r.dedup;
    let _ = writeln!(
        s,
        "\n## C. Dedup (v1 tar, then v2 = 5% of files modified)\n"
    );
    let _ = writeln!(
        s,
        "Tree: {} files, {} ({}); {} unreadable files skipped. Tarred with `tar cf --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner`. \
         Modified {} files (seed {SEED_DEDUP:#x}): each got one random region of min(len, U[4 KiB, 64 KiB]) overwritten with random bytes, size kept.\n",
        d.files,
        human_bytes(d.tree_bytes),
        d.source,
        d.skipped_unreadable,
        d.modified_files
    );
    let mut t = MdTable::new(&["figure", "bytes", "human"]);
    let b = |v: u64| [v.to_string(), human_bytes(v)];
    for (name, v) in [
        ("v1 tar size", d.v1_bytes),
        ("v2 tar size", d.v2_bytes),
        (
            "bytes actually changed (sum of modified regions)",
            d.bytes_changed,
        ),
        ("sizes of the changed files", d.changed_file_bytes),
        ("v1 put: new_bytes", d.v1_put.new_bytes),
        ("v2 put: new_bytes", d.v2_put.new_bytes),
        ("v2 put: stored_bytes", d.v2_put.stored_bytes),
    ] {
        let [x, y] = b(v);
        t.row(&[name.to_string(), x, y]);
    }
    s.push_str(&t.render());
    let mut t = MdTable::new(&["ratio", "value"]);
    t.row(&[
        "v2 new_bytes / bytes actually changed",
        &format!("{:.2}", d.new_over_changed),
    ])
    .row(&[
        "v2 new_bytes / changed-file bytes",
        &format!("{:.3}", d.new_over_changed_files),
    ])
    .row(&["v2 new_bytes / v2 size", &format!("{:.4}", d.new_over_v2)])
    .row(&[
        "v2 stored_bytes / v2 size",
        &format!("{:.4}", d.stored_over_v2),
    ])
    .row(&[
        "v2 chunks (new / total)",
        &format!("{} / {}", d.v2_put.new_chunks, d.v2_put.chunks),
    ])
    .row(&[
        "put time v1 / v2 (s, fresh store then same store)",
        &format!("{:.2} / {:.2}", d.v1_put_secs, d.v2_put_secs),
    ]);
    let _ = writeln!(s);
    s.push_str(&t.render());
    let _ = writeln!(s, "\nNo target is set for dedup; the ideal is new_bytes ≈ bytes actually changed (ratio 1), bounded below by chunk granularity (64 KiB average chunks).");
    s
}

fn main() -> Result<()> {
    let opts = parse_args()?;
    let started = Instant::now();
    let command = format!(
        "cargo bench -p cairn-bench --bench store{}",
        if opts.user_args.is_empty() {
            String::new()
        } else {
            format!(" -- {}", opts.user_args.join(" "))
        }
    );
    fs::create_dir_all(&opts.tmp_root)?;
    let work = tempfile::Builder::new()
        .prefix("cairn-bench-store-")
        .tempdir_in(&opts.tmp_root)
        .with_context(|| format!("create a temp dir in {}", opts.tmp_root.display()))?;
    progress(format!("work dir {}", work.path().display()));
    let machine = MachineFacts::collect(work.path());
    if machine.work_fs == "tmpfs" {
        progress("warning: the work dir is on tmpfs; use --tmp DIR on a real filesystem");
    }

    let (ingest, random_input) = section_ingest(&opts, work.path())?;
    let reads = section_reads(&opts, work.path(), &random_input)?;
    fs::remove_file(&random_input)?;
    let dedup = section_dedup(&opts, work.path())?;

    let mut engines: Vec<String> = ingest
        .iter()
        .map(|i| format!("ingest: {}", i.engine))
        .collect();
    engines.dedup();
    let mut read_engines: Vec<String> = reads
        .rows
        .iter()
        .filter(|r| r.verify_reads.is_some())
        .map(|r| r.engine.clone())
        .collect();
    read_engines.dedup();
    read_engines.sort();
    read_engines.dedup();
    engines.push(format!("reads: {}", read_engines.join(", ")));

    let report = Report {
        opts: &opts,
        command,
        argv: std::env::args().collect(),
        date: today(),
        machine,
        engines,
        ingest,
        reads,
        dedup,
        total_secs: started.elapsed().as_secs_f64(),
        loadavg_end: cairn_bench::loadavg(),
    };
    let md = render(&report);
    let json = json!({
        "date": report.date,
        "command": report.command,
        "argv": report.argv,
        "quick": opts.quick,
        "params": {
            "input_bytes": opts.input_bytes,
            "reads_per_pass": opts.reads,
            "dedup_bytes": opts.dedup_bytes,
            "dedup_file_max": opts.dedup_file_max,
            "reps": opts.reps,
            "chunk_cache_bytes": opts.chunk_cache_bytes,
            "work_root": opts.tmp_root,
        },
        "machine": report.machine,
        "engines": report.engines,
        "targets": { "ingest_ratio": INGEST_TARGET, "read_ratio": READ_TARGET },
        "ingest": report.ingest,
        "reads": report.reads,
        "dedup": report.dedup,
        "total_secs": report.total_secs,
        "loadavg_end": report.loadavg_end,
    });
    work.close().context("remove the work dir")?;

    print!("{md}");
    let stem = format!(
        "store-{}{}",
        report.date,
        if opts.quick { "-quick" } else { "" }
    );
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("results");
    let (m, j) = write_results(&dir, &stem, &md, &json)?;
    progress(format!("wrote {} and {}", m.display(), j.display()));
    Ok(())
}
