//! Scenario 3 of the WAN benchmark: **a VM image at an edge over NBD**.
//!
//! Two sites, `core` (10.99.0.1) and `edge` (10.99.0.2), joined by one
//! emulated link. A deterministic raw ext4 disk image (built once with
//! `mkfs.ext4 -d` from a sorted set of real files with pinned times, a
//! fixed UUID and hash seed, then cached) is imported into a Cairn core node
//! inside the core namespace (`cairn image import`, loopback: never across
//! the link). Per repetition, in this order, in the edge namespace:
//!
//! 1. **copy-first, full**: `nbdcopy nbd://CORE:10810/img LOCAL.raw` from a
//!    `qemu-nbd` serving the raw file at the core (read-only, persistent,
//!    shared), across the link: the time to get the whole image to the edge
//!    by a plain TCP copy before a VM could start. Verified with `cmp`.
//! 2. **copy-first, trace**: the boot-like trace replayed with `qemu-io`
//!    against the local copy (page cache warm, as right after the copy).
//! 3. **cairn, full**: a fresh Cairn edge node (fresh data dir, `--parent`
//!    the core), then `nbdcopy nbd://127.0.0.1:10809/image/NAME null:`:
//!    the lazy export fetches every chunk over the link. Verified untimed
//!    with `qemu-img compare` against the original. The destination is
//!    nbdcopy's `null:` (discards, with its usual many requests in flight),
//!    not `/dev/null`: nbdcopy writes a `/dev/null` destination
//!    synchronously, one request at a time, which serialised the demand
//!    fetches; the copy-first step writes a regular file, which nbdcopy
//!    drives concurrently, so both full reads are fair.
//! 4. **cairn, warm** (`cairn-warm`): right after that, on the same edge
//!    (the image now complete there), the boot-like trace replayed with
//!    `qemu-io` against its export: every read local (warm local).
//! 5. **cairn, lazy** (`cairn-lazy`): a fresh edge node with `[prefetch]
//!    enabled = false`, the same replay (chunks fetched on demand only).
//! 6. **cairn, profile** (`cairn-profile`): a fresh edge node with the
//!    prefetch defaults (profile prefetch), the same replay.
//! 7. **cairn, successors** (`cairn-successors`): a fresh edge node with
//!    `use_profile = false` (successor model only), the same replay.
//!
//! Edge nodes get their `[prefetch]` section from a `--config` TOML file.
//! Before the reps, the trace is replayed once against the **core's own
//! export** (core namespace, loopback): the core records the access trace
//! and publishes `prefetch/<OBJECT>`, which the edges fetch when their
//! exports open (training: a boot repeats its reads). The scenario waits
//! until the core's traces API lists the trace.
//!
//! Ratios per rep: full = cairn full / copy-first full; trace = cairn lazy
//! / (copy-first full + local replay); and the prefetch targets of issue
//! 6/8: profile / warm ≤ 1.3, lazy / profile ≥ 3, prefetch wasted / fetched
//! bytes ≤ 10%. The bytes crossing the link come from the link model (IP
//! bytes) and from the edge's `/metrics` (demand fetches, transport bytes,
//! image reads by source, `cairn_prefetch_*`), read after each step once
//! `cairn_prefetch_active` is 0 (the export closed, wasted bytes counted).
//!
//! **First useful work** (DADI-style): every replayed read is quiet except
//! the trace's first file-extent read (the first read beyond the image's
//! head, [`Trace::first_extent_read`]); the replay runs under `stdbuf -oL`
//! and the harness timestamps that read's completion line as it arrives.
//!
//! ## The trace
//!
//! Synthetic and deterministic ([`boot_trace`], splitmix64 with a fixed
//! seed) over the image's 4 KiB blocks, using only blocks that hold data
//! (non-zero in the image file: a guest reads what the file system points
//! at, and Cairn serves all-zero chunks without fetching). About `fraction`
//! (default 3%) of all blocks: two thirds in the *head* of the image (its
//! first 1/8, where `mkfs.ext4 -d` puts the superblock, group descriptors,
//! bitmaps, inode tables, the directories and the first small files; block
//! positions biased to its start, runs of 1–8 blocks: the boot's metadata
//! and small-file reads), one third as file extents beyond it (runs of
//! 8–64 blocks, read in pieces of at most 128 KiB, like readahead). A read
//! whose blocks were all read before is dropped (the guest's page cache
//! would absorb it). The first reads are the superblock and group
//! descriptors and a burst of head reads (mount), then
//! each file extent is preceded by 1–3 head reads (path lookups). Think
//! time between reads: 0, 1 or 2 ms, uniformly. The replay is one
//! `qemu-io -r -f raw -c 'read -q OFF LEN' -c 'sleep MS' …` process (one
//! request at a time, in order), timed as its wall time.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::check::short_spec;
use crate::model::LinkSpec;
use crate::scenario::{
    first_line, in_path, run_checked, select_files, spawn_logged, tail, wait_listening, Stats,
};
use crate::wan::{ChildGuard, Wan};

const MIB: u64 = 1 << 20;
/// Block size of the file system and of the trace.
pub const BLOCK: u64 = 4096;
/// Image name in Cairn.
pub const IMAGE_NAME: &str = "bench-disk";
/// Bumped when the way the image is built changes (part of the cache key).
const IMAGE_RECIPE: u32 = 2;
/// Fixed file-system UUID and directory hash seed (reproducible image).
const FS_UUID: &str = "c0ffee00-ca1e-4d00-8000-000000000003";
/// Every file, directory and the file system get this time (2023-11-14).
const FIXED_TIME: u64 = 1_700_000_000;
const CAIRN_QUIC_PORT: u16 = 7443;
const CAIRN_API_PORT: u16 = 7480;
const CAIRN_NBD_PORT: u16 = 10809;
const QEMU_NBD_PORT: u16 = 10810;
/// Largest single read of the trace.
const MAX_READ_BLOCKS: u64 = 32;

/// What to run.
#[derive(Debug, Clone, Serialize)]
pub struct VmNbdConfig {
    /// The link core↔edge (both directions).
    pub spec: LinkSpec,
    /// Repetitions.
    pub reps: usize,
    /// Size of the raw disk image.
    pub image_bytes: u64,
    /// Bytes of real files put into it.
    pub file_bytes: u64,
    /// The `cairn` binary.
    pub cairn: PathBuf,
    /// QUIC congestion controller of both Cairn nodes (`cubic` or `bbr`).
    pub congestion: String,
    /// Scratch root (image cache and work dirs).
    pub tmp: PathBuf,
    /// Bound on one timed step.
    pub timeout: Duration,
    /// Seed of the link models.
    pub seed: u64,
    /// Seed of the trace.
    pub trace_seed: u64,
    /// Fraction of the image's blocks the trace reads.
    pub trace_fraction: f64,
}

/// The programs the scenario drives, with their versions.
#[derive(Debug, Clone, Serialize)]
pub struct VmTools {
    /// Versions, by program.
    pub versions: BTreeMap<String, String>,
}

impl VmTools {
    /// Checks that every program is there.
    pub fn find(cairn: &Path) -> Result<Self> {
        let apt = "apt-get install -y --no-install-recommends libnbd-bin qemu-utils e2fsprogs curl";
        for t in [
            "nbdcopy",
            "qemu-io",
            "qemu-nbd",
            "qemu-img",
            "mkfs.ext4",
            "debugfs",
            "dumpe2fs",
            "curl",
            "cmp",
            "ss",
            "find",
            "touch",
        ] {
            ensure!(in_path(t), "{t} not found on the PATH (Debian: {apt})");
        }
        ensure!(
            cairn.is_file(),
            "the cairn binary {} does not exist; build it with \
             `cargo build --release -p cairn-cli` (or pass --cairn PATH)",
            cairn.display()
        );
        let mut versions = BTreeMap::new();
        for (name, arg) in [
            ("nbdcopy", "--version"),
            ("qemu-io", "--version"),
            ("qemu-nbd", "--version"),
            ("mkfs.ext4", "-V"),
        ] {
            versions.insert(name.to_owned(), first_line(Command::new(name).arg(arg)));
        }
        versions.insert(
            "cairn".into(),
            first_line(Command::new(cairn).arg("--version")),
        );
        Ok(Self { versions })
    }
}

// ---------------------------------------------------------------------------
// The image
// ---------------------------------------------------------------------------

/// The disk image's facts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmImageMeta {
    recipe: u32,
    /// Size of the raw image.
    pub bytes: u64,
    /// Files in it.
    pub files: usize,
    /// Their bytes.
    pub file_bytes: u64,
    /// Where they came from.
    pub sources: Vec<String>,
    /// sha256 of the raw image.
    pub sha256: String,
    /// 4 KiB blocks that are not all zero.
    pub data_blocks: u64,
}

/// Indices of the 4 KiB blocks of `path` that are not all zero.
fn nonzero_blocks(path: &Path) -> Result<Vec<u64>> {
    let mut f = fs::File::open(path)?;
    let mut buf = vec![0u8; BLOCK as usize * 256];
    let mut out = Vec::new();
    let mut block = 0u64;
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            let n = f.read(&mut buf[filled..])?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        for c in buf[..filled].chunks(BLOCK as usize) {
            if c.iter().any(|&b| b != 0) {
                out.push(block);
            }
            block += 1;
        }
        if filled < buf.len() {
            break;
        }
    }
    Ok(out)
}

fn load_cached(root: &Path) -> Option<VmImageMeta> {
    let meta: VmImageMeta = serde_json::from_slice(&fs::read(root.join("meta.json")).ok()?).ok()?;
    let len = fs::metadata(root.join("disk.raw")).ok()?.len();
    (meta.recipe == IMAGE_RECIPE && len == meta.bytes).then_some(meta)
}

/// `mkfs.ext4 -d` copies each file's ctime, which no one can set: give
/// every used inode the ctime [`FIXED_TIME`] with `debugfs -w` so the image is the
/// same byte for byte on every build.
fn pin_ctimes(disk: &Path, scratch: &Path) -> Result<()> {
    let out = run_checked(Command::new("dumpe2fs").arg("-h").arg(disk), "dumpe2fs -h")?;
    let field = |name: &str| -> Result<u64> {
        out.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("dumpe2fs -h printed no {name:?}"))
    };
    // mkfs allocates inodes in order: 1..=used are in use (1-10 reserved,
    // 11 lost+found).
    let used = field("Inode count:")?.saturating_sub(field("Free inodes:")?);
    let mut cmds = String::new();
    for ino in std::iter::once(2).chain(11..=used) {
        let _ = writeln!(cmds, "sif <{ino}> ctime @{FIXED_TIME}");
    }
    let file = scratch.join("debugfs.cmds");
    fs::write(&file, cmds)?;
    run_checked(
        Command::new("debugfs")
            .env("E2FSPROGS_FAKE_TIME", FIXED_TIME.to_string())
            .arg("-w")
            .arg("-f")
            .arg(&file)
            .arg(disk),
        "debugfs -w (pin ctimes)",
    )?;
    fs::remove_file(&file)?;
    Ok(())
}

/// The image in `tmp/cairn-wan-vmimage/<N>mib-<F>mib/disk.raw`, built on
/// first use: `mkfs.ext4 -b 4096 -d TREE` of `image_bytes` over a tree of
/// `file_bytes` of real files (the cold-pull scenario's file selection:
/// sorted paths, round robin over its sources), every time pinned (ctimes
/// with debugfs afterwards), fixed UUID and hash seed, then cached.
pub fn vm_image(tmp: &Path, image_bytes: u64, file_bytes: u64) -> Result<(PathBuf, VmImageMeta)> {
    ensure!(
        image_bytes >= 8 * MIB && image_bytes % BLOCK == 0,
        "the image must be a multiple of 4 KiB and at least 8 MiB"
    );
    ensure!(
        file_bytes < image_bytes,
        "the files ({file_bytes} bytes) must be smaller than the image"
    );
    let root = tmp.join("cairn-wan-vmimage").join(format!(
        "{}mib-{}mib",
        image_bytes / MIB,
        file_bytes / MIB
    ));
    if let Some(m) = load_cached(&root) {
        eprintln!("reusing the cached disk image in {}", root.display());
        return Ok((root.join("disk.raw"), m));
    }
    let (files, sources) = select_files(file_bytes);
    ensure!(!files.is_empty(), "no readable files for the image");
    let total: u64 = files.iter().map(|f| f.1).sum();
    eprintln!(
        "building the disk image: {} files, {:.1} MiB from {} into {} MiB of ext4 (cached)",
        files.len(),
        total as f64 / MIB as f64,
        sources.join(", "),
        image_bytes / MIB
    );
    let build = root.with_extension("building");
    let _ = fs::remove_dir_all(&build);
    let tree = build.join("tree");
    fs::create_dir_all(&tree)?;
    for (p, _) in &files {
        let dest = tree.join(p.strip_prefix("/").unwrap_or(p));
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::copy(p, &dest).with_context(|| format!("copy {}", p.display()))?;
    }
    run_checked(
        Command::new("find")
            .arg(&tree)
            .args(["-exec", "touch", "-h", "-d"])
            .arg(format!("@{FIXED_TIME}"))
            .args(["{}", "+"]),
        "touch (pin times)",
    )?;
    let disk = build.join("disk.raw");
    fs::File::create(&disk)?.set_len(image_bytes)?;
    run_checked(
        Command::new("mkfs.ext4")
            .env("E2FSPROGS_FAKE_TIME", FIXED_TIME.to_string())
            .args(["-F", "-q", "-b", "4096", "-U", FS_UUID, "-E"])
            .arg(format!("root_owner=0:0,hash_seed={FS_UUID}"))
            .arg("-d")
            .arg(&tree)
            .arg(&disk),
        "mkfs.ext4",
    )?;
    fs::remove_dir_all(&tree)?;
    pin_ctimes(&disk, &build)?;
    let sum = run_checked(Command::new("sha256sum").arg(&disk), "sha256sum")?;
    let meta = VmImageMeta {
        recipe: IMAGE_RECIPE,
        bytes: image_bytes,
        files: files.len(),
        file_bytes: total,
        sources,
        sha256: sum.split_whitespace().next().unwrap_or("").to_owned(),
        data_blocks: nonzero_blocks(&disk)?.len() as u64,
    };
    fs::write(build.join("meta.json"), serde_json::to_vec_pretty(&meta)?)?;
    let _ = fs::remove_dir_all(&root);
    fs::rename(&build, &root)?;
    Ok((root.join("disk.raw"), meta))
}

// ---------------------------------------------------------------------------
// The trace
// ---------------------------------------------------------------------------

/// One read of the trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TraceRead {
    /// Byte offset.
    pub offset: u64,
    /// Bytes.
    pub len: u64,
    /// Think time after this read, ms.
    pub think_ms: u64,
}

/// A boot-like read trace (see the module docs).
#[derive(Debug, Clone, Serialize)]
pub struct Trace {
    /// Seed it was generated with.
    pub seed: u64,
    /// The reads, in order.
    pub reads: Vec<TraceRead>,
    /// Distinct 4 KiB blocks read.
    pub distinct_blocks: u64,
    /// Of which in the head of the image (the first 1/8: metadata,
    /// directories, first small files).
    pub metadata_blocks: u64,
    /// File extents read.
    pub extents: usize,
    /// Blocks in the image.
    pub image_blocks: u64,
    /// Bytes of the image's head (its first 1/8: metadata, directories,
    /// first small files).
    pub head_bytes: u64,
    /// Index in `reads` of the first file-extent read (the first read
    /// beyond the head): the workload's first useful work (DADI-style
    /// figure). The replay prints this read's completion (the marker).
    pub first_extent_read: Option<usize>,
}

impl Trace {
    /// Total think time, ms.
    pub fn think_ms(&self) -> u64 {
        self.reads.iter().map(|r| r.think_ms).sum()
    }
    /// Bytes read (with repeats).
    pub fn bytes(&self) -> u64 {
        self.reads.iter().map(|r| r.len).sum()
    }
    /// The `qemu-io` arguments replaying it (`-c` pairs). Every read is
    /// quiet (`-q`) except the first file-extent read, whose completion
    /// line (`read N/N bytes at offset X`) is the first-useful-work marker.
    pub fn qemu_io_args(&self) -> Vec<String> {
        let mut v = Vec::with_capacity(self.reads.len() * 4);
        for (i, r) in self.reads.iter().enumerate() {
            v.push("-c".to_owned());
            if Some(i) == self.first_extent_read {
                v.push(format!("read {} {}", r.offset, r.len));
            } else {
                v.push(format!("read -q {} {}", r.offset, r.len));
            }
            if r.think_ms > 0 {
                v.push("-c".to_owned());
                v.push(format!("sleep {}", r.think_ms));
            }
        }
        v
    }
}

/// splitmix64: small, fast, and the same everywhere (no dependency on a
/// `rand` version's stream).
#[derive(Debug, Clone)]
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `[lo, hi]`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Generates the boot-like trace over an image of `image_blocks` 4 KiB
/// blocks whose non-zero blocks are `data` (sorted). Deterministic in its
/// inputs.
pub fn boot_trace(image_blocks: u64, data: &[u64], fraction: f64, seed: u64) -> Trace {
    let mut rng = SplitMix(seed);
    let target = ((image_blocks as f64 * fraction).ceil() as u64).max(8);
    let meta_end = (image_blocks / 8).max(64);
    let split = data.partition_point(|&b| b < meta_end);
    let (meta, file) = data.split_at(split);
    let meta_budget = (target * 2 / 3).min(meta.len() as u64);
    let mut seen = BTreeSet::new();
    let mut reads = Vec::new();
    let mut meta_seen = 0u64;
    let mut extents = 0usize;
    let push = |rng: &mut SplitMix,
                seen: &mut BTreeSet<u64>,
                reads: &mut Vec<TraceRead>,
                start: u64,
                blocks: u64|
     -> u64 {
        let blocks = blocks.min(image_blocks.saturating_sub(start)).max(1);
        let mut new = 0;
        let mut b = start;
        while b < start + blocks {
            let n = (start + blocks - b).min(MAX_READ_BLOCKS);
            let before = new;
            for k in b..b + n {
                if seen.insert(k) {
                    new += 1;
                }
            }
            // A guest's page cache absorbs re-reads: only reads that touch
            // a new block reach the disk.
            if new == before {
                b += n;
                continue;
            }
            reads.push(TraceRead {
                offset: b * BLOCK,
                len: n * BLOCK,
                think_ms: rng.range(0, 2),
            });
            b += n;
        }
        new
    };
    // Mount: superblock and group descriptors.
    meta_seen += push(&mut rng, &mut seen, &mut reads, 0, 2);
    // A metadata read: a data block of the region, biased to its start.
    let meta_read = |rng: &mut SplitMix| -> Option<(u64, u64)> {
        if meta.is_empty() {
            return None;
        }
        let u = rng.unit();
        let i = ((u * u) * meta.len() as f64) as usize;
        let start = meta[i.min(meta.len() - 1)];
        Some((start, rng.range(1, 8)))
    };
    // Early boot: 40% of the metadata budget before any file.
    let mut guard = 0;
    while meta_seen < meta_budget * 2 / 5 && guard < 100_000 {
        guard += 1;
        if let Some((s, n)) = meta_read(&mut rng) {
            meta_seen += push(&mut rng, &mut seen, &mut reads, s, n);
        }
    }
    // Then files, each after 1–3 metadata reads (path lookups), more if
    // the metadata lags its share of the budget.
    let file_budget = target.saturating_sub(meta_budget).max(1);
    let mut file_seen = 0u64;
    while (seen.len() as u64) < target && guard < 200_000 {
        guard += 1;
        let mut k = 0;
        let lookups = rng.range(1, 3);
        while meta_seen < meta_budget
            && (k < lookups || meta_seen * file_budget < (file_seen + 32) * meta_budget)
            && k < 64
        {
            k += 1;
            if let Some((s, n)) = meta_read(&mut rng) {
                meta_seen += push(&mut rng, &mut seen, &mut reads, s, n);
            }
        }
        if file.is_empty() {
            if meta_seen >= meta.len() as u64 {
                break;
            }
            continue;
        }
        let left = target.saturating_sub(seen.len() as u64).max(1);
        let start = file[(rng.next() % file.len() as u64) as usize];
        let len = rng.range(8, 64).min(left.max(8));
        file_seen += push(&mut rng, &mut seen, &mut reads, start, len);
        extents += 1;
    }
    if let Some(last) = reads.last_mut() {
        last.think_ms = 0;
    }
    let metadata_blocks = seen.iter().filter(|&&b| b < meta_end).count() as u64;
    let first_extent_read = reads.iter().position(|r| r.offset >= meta_end * BLOCK);
    Trace {
        head_bytes: meta_end * BLOCK,
        first_extent_read,
        seed,
        distinct_blocks: seen.len() as u64,
        metadata_blocks,
        extents,
        image_blocks,
        reads,
    }
}

// ---------------------------------------------------------------------------
// Servers and steps
// ---------------------------------------------------------------------------

#[derive(Debug)]
struct Node {
    _guard: ChildGuard,
    log: PathBuf,
}

impl Node {
    fn log_problems(&self) -> Vec<String> {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR ") || l.contains("panicked"))
            .take(5)
            .map(|l| l.chars().take(300).collect())
            .collect()
    }

    /// The prefetcher's "prefetch started" line among the log lines after
    /// the first `skip`: (profile chunks it follows, chunks missing when
    /// the export opened), from the last such line.
    fn prefetch_started(&self, skip: usize) -> Option<PrefetchStarted> {
        let text = strip_ansi(&fs::read_to_string(&self.log).ok()?);
        let line = text
            .lines()
            .skip(skip)
            .filter(|l| l.contains("prefetch started"))
            .last()?
            .to_owned();
        let field = |name: &str| -> Option<u64> {
            let i = line.find(&format!("{name}="))? + name.len() + 1;
            let v: String = line[i..].chars().take_while(char::is_ascii_digit).collect();
            v.parse().ok()
        };
        Some(PrefetchStarted {
            profile_chunks: field("profile_chunks")?,
            missing_chunks: field("missing")?,
        })
    }
}

/// What the edge's prefetcher logged when it started for an export.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct PrefetchStarted {
    /// Chunks in the access profile it follows (0: successor model only,
    /// or no profile from anywhere).
    pub profile_chunks: u64,
    /// Chunks of the image missing at the edge when the export opened.
    pub missing_chunks: u64,
}

/// `text` without ANSI colour sequences (`ESC [ … m`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut it = text.chars();
    while let Some(c) = it.next() {
        if c == '\u{1b}' {
            for d in it.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The `[prefetch]` section of an edge step's node config (`None`: the
/// step runs no Cairn node).
fn edge_prefetch_config(what: &str) -> Option<&'static str> {
    match what {
        // The node's defaults (profile prefetch on).
        "cairn-full" | "cairn-profile" => Some("enabled = true\nuse_profile = true\n"),
        "cairn-lazy" => Some("enabled = false\n"),
        "cairn-successors" => Some("enabled = true\nuse_profile = false\n"),
        _ => None,
    }
}

/// The training run at the core (see [`train_core`]).
#[derive(Debug, Clone, Serialize)]
pub struct Training {
    /// Wall seconds of the replay against the core's own export.
    pub secs: f64,
    /// Traces the core's API lists afterwards.
    pub traces: usize,
    /// Entries of the newest one.
    pub trace_entries: usize,
    /// Chunks of the image object.
    pub image_chunks: u64,
    /// Seconds from the replay's end until the trace was listed.
    pub wait_secs: f64,
}

/// Replays the trace once against the core's own export (inside the core
/// namespace, loopback: the image is complete there), so the core records
/// an access trace and publishes `prefetch/<OBJECT>` from it; waits until
/// `GET /api/v1/vm-images/NAME/traces` lists the trace, then 2 s more
/// (the model is published right after the trace is stored, on the same
/// thread).
fn train_core(
    wan: &Wan,
    cfg: &VmNbdConfig,
    export: &str,
    qemu_io_args: &[String],
    work: &Path,
) -> Result<Training> {
    let before = link_bytes(wan)?;
    let mut c = wan.command("core", "qemu-io")?;
    c.args(["-r", "-f", "raw"]).args(qemu_io_args).arg(export);
    let (secs, to) = timed(
        c,
        &work.join("training.log"),
        cfg.timeout,
        "training replay at the core",
    )?;
    ensure!(!to, "the training replay at the core timed out");
    let url = format!("http://127.0.0.1:{CAIRN_API_PORT}/api/v1/vm-images/{IMAGE_NAME}/traces");
    let t = Instant::now();
    let (traces, trace_entries, image_chunks) = loop {
        let out = wan.run_in("core", "curl", ["-sf", "--max-time", "10", url.as_str()])?;
        if out.status.success() {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout)
                .context("the core's traces API answered no JSON")?;
            let list = v["traces"].as_array().cloned().unwrap_or_default();
            if let Some(last) = list.last() {
                break (
                    list.len(),
                    last.as_array().map_or(0, Vec::len),
                    v["chunks"].as_u64().unwrap_or(0),
                );
            }
        }
        ensure!(
            t.elapsed() < Duration::from_secs(30),
            "the core listed no access trace of {IMAGE_NAME} 30 s after the training replay \
             (GET {url})"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let wait_secs = t.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(2));
    ensure!(
        link_bytes(wan)? == before,
        "the training replay crossed the link"
    );
    Ok(Training {
        secs,
        traces,
        trace_entries,
        image_chunks,
        wait_secs,
    })
}

fn cairn_node(
    wan: &Wan,
    cfg: &VmNbdConfig,
    site: &str,
    ca: &Path,
    dir: &Path,
    edge: Option<(&str, &str)>,
) -> Result<Node> {
    fs::create_dir_all(dir)?;
    let ip = wan.addr(site)?;
    let log = dir.join("log");
    let mut cmd = wan.command(site, &cfg.cairn)?;
    for v in [
        "CAIRN_CONFIG",
        "CAIRN_DATA_DIR",
        "CAIRN_IDENTITY",
        "RUST_LOG",
    ] {
        cmd.env_remove(v);
    }
    cmd.arg("node")
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--identity")
        .arg(ca.join(site))
        .args(["--site", site])
        .args(["--congestion", &cfg.congestion])
        .args(["--registry-listen", "127.0.0.1:5000"])
        .args(["--api-listen", &format!("127.0.0.1:{CAIRN_API_PORT}")])
        .args(["--quic-listen", &format!("{ip}:{CAIRN_QUIC_PORT}")])
        .args(["--nbd-listen", &format!("127.0.0.1:{CAIRN_NBD_PORT}")]);
    if let Some((parent, prefetch)) = edge {
        let conf = dir.join("cairn.toml");
        fs::write(&conf, format!("version = 1\n\n[prefetch]\n{prefetch}"))?;
        cmd.arg("--config")
            .arg(&conf)
            .arg("--parent")
            .arg(parent)
            // The prefetcher's start line (profile size) for the report.
            .env("RUST_LOG", "warn,cairn_node::prefetcher=info");
    }
    let guard = spawn_logged(wan, cmd, &log)?;
    crate::scenario::wait_node_started(site, &log)?;
    wait_listening(wan, site, CAIRN_NBD_PORT, &log, "cairn node (NBD)")?;
    wait_listening(wan, site, CAIRN_API_PORT, &log, "cairn node (API)")?;
    Ok(Node { _guard: guard, log })
}

/// Runs `cmd` with output to `log`; seconds and whether it was killed at
/// the timeout. A non-zero exit is an error.
fn timed(cmd: Command, log: &Path, timeout: Duration, what: &str) -> Result<(f64, bool)> {
    timed_marked(cmd, log, timeout, what).map(|t| (t.secs, t.timed_out))
}

/// What [`timed_marked`] measured.
#[derive(Debug, Clone, Copy)]
struct Timed {
    secs: f64,
    timed_out: bool,
    /// Seconds from the spawn until the first stdout line starting with
    /// `read ` (qemu-io's completion line of the one non-quiet read).
    marker_secs: Option<f64>,
}

/// [`timed`], with stdout read line by line as it comes (the command
/// should be line-buffered: `stdbuf -oL`): the arrival of the first line
/// starting with `read ` is timed too. Output goes to `log` as well.
fn timed_marked(mut cmd: Command, log: &Path, timeout: Duration, what: &str) -> Result<Timed> {
    use std::io::{BufRead as _, Write as _};
    let f = fs::File::create(log)?;
    cmd.stdout(Stdio::piped())
        .stderr(f.try_clone()?)
        .stdin(Stdio::null());
    let t = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("start {what}"))?;
    let out = child.stdout.take().context("no stdout pipe")?;
    let reader = std::thread::spawn(move || {
        let mut f = f;
        let mut marker = None;
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if marker.is_none() && line.starts_with("read ") {
                marker = Some(t.elapsed().as_secs_f64());
            }
            let _ = writeln!(f, "{line}");
        }
        marker
    });
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if t.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            eprintln!("{what} took over {timeout:?}; killed");
            let marker_secs = reader.join().ok().flatten();
            return Ok(Timed {
                secs: t.elapsed().as_secs_f64(),
                timed_out: true,
                marker_secs,
            });
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let secs = t.elapsed().as_secs_f64();
    let marker_secs = reader.join().ok().flatten();
    ensure!(
        status.success(),
        "{what} failed ({status}); log:\n{}",
        tail(log, 20)
    );
    Ok(Timed {
        secs,
        timed_out: false,
        marker_secs,
    })
}

/// Sum of every series of `name` in a Prometheus text exposition.
pub fn metric_sum(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for l in text.lines() {
        let Some(rest) = l.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        let v = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
        if let Some(v) = v {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// The edge's fetch counters after a step (from its `/metrics`; `None`
/// when the scrape or the series is missing).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct EdgeMetrics {
    /// `cairn_nbd_fetched_bytes_total` (all exports): chunk bytes fetched
    /// on demand.
    pub nbd_fetched_bytes: Option<u64>,
    /// `cairn_nbd_fetched_chunks_total`.
    pub nbd_fetched_chunks: Option<u64>,
    /// `cairn_transport_peer_bytes_in_total` (all peers): bytes received
    /// over the transport.
    pub transport_bytes_in: Option<u64>,
    /// `cairn_nbd_demand_fetch_seconds_count`: reads that waited for a
    /// demand fetch.
    pub stalled_reads: Option<u64>,
    /// `cairn_nbd_demand_fetch_seconds_sum`: seconds they waited in all.
    pub stall_secs: Option<f64>,
    /// `cairn_nbd_image_reads_total{source="local"}`.
    pub image_reads_local: Option<u64>,
    /// `cairn_nbd_image_reads_total{source="fetched"}`: reads that waited
    /// for a demand fetch.
    pub image_reads_fetched: Option<u64>,
    /// `cairn_prefetch_bytes_total{outcome="fetched"}`.
    pub prefetch_fetched_bytes: Option<u64>,
    /// `cairn_prefetch_bytes_total{outcome="hit"}`: prefetched, then read.
    pub prefetch_hit_bytes: Option<u64>,
    /// `cairn_prefetch_bytes_total{outcome="wasted"}`: prefetched, unread
    /// when the export closed.
    pub prefetch_wasted_bytes: Option<u64>,
    /// `cairn_prefetch_chunks_total{outcome="fetched"}`.
    pub prefetch_fetched_chunks: Option<u64>,
    /// `cairn_prefetch_chunks_total{outcome="failed"}`.
    pub prefetch_failed_chunks: Option<u64>,
    /// `cairn_prefetch_reads_total{kind="avoided"}`.
    pub prefetch_reads_avoided: Option<u64>,
    /// `cairn_prefetch_reads_total{kind="stalled"}`.
    pub prefetch_reads_stalled: Option<u64>,
    /// `cairn_prefetch_active` when read (0: every prefetch task ended).
    pub prefetch_active: Option<u64>,
}

impl EdgeMetrics {
    /// The counters' growth since `before` (same node).
    fn since(&self, before: &Self) -> Self {
        fn d(a: Option<u64>, b: Option<u64>) -> Option<u64> {
            Some(a?.saturating_sub(b.unwrap_or(0)))
        }
        Self {
            nbd_fetched_bytes: d(self.nbd_fetched_bytes, before.nbd_fetched_bytes),
            nbd_fetched_chunks: d(self.nbd_fetched_chunks, before.nbd_fetched_chunks),
            transport_bytes_in: d(self.transport_bytes_in, before.transport_bytes_in),
            stalled_reads: d(self.stalled_reads, before.stalled_reads),
            stall_secs: self
                .stall_secs
                .map(|a| a - before.stall_secs.unwrap_or(0.0)),
            image_reads_local: d(self.image_reads_local, before.image_reads_local),
            image_reads_fetched: d(self.image_reads_fetched, before.image_reads_fetched),
            prefetch_fetched_bytes: d(self.prefetch_fetched_bytes, before.prefetch_fetched_bytes),
            prefetch_hit_bytes: d(self.prefetch_hit_bytes, before.prefetch_hit_bytes),
            prefetch_wasted_bytes: d(self.prefetch_wasted_bytes, before.prefetch_wasted_bytes),
            prefetch_fetched_chunks: d(
                self.prefetch_fetched_chunks,
                before.prefetch_fetched_chunks,
            ),
            prefetch_failed_chunks: d(self.prefetch_failed_chunks, before.prefetch_failed_chunks),
            prefetch_reads_avoided: d(self.prefetch_reads_avoided, before.prefetch_reads_avoided),
            prefetch_reads_stalled: d(self.prefetch_reads_stalled, before.prefetch_reads_stalled),
            prefetch_active: self.prefetch_active,
        }
    }
}

/// Sum of the series of `name` that carry the label `label="value"`.
pub fn metric_labeled(text: &str, name: &str, label: &str, value: &str) -> Option<f64> {
    let want = format!("{label}=\"{value}\"");
    let mut found = None;
    for l in text.lines() {
        let Some(rest) = l.strip_prefix(name) else {
            continue;
        };
        let Some(rest) = rest.strip_prefix('{') else {
            continue;
        };
        let Some((labels, v)) = rest.split_once('}') else {
            continue;
        };
        if !labels.split(',').any(|kv| kv.trim() == want) {
            continue;
        }
        if let Ok(v) = v.trim().parse::<f64>() {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

fn parse_edge_metrics(text: &str) -> EdgeMetrics {
    let get = |n: &str| metric_sum(text, n).map(|v| v as u64);
    // A labelled series appears once first counted: absent is 0 when the
    // metric's family is exported at all.
    let lab = |n: &str, l: &str, v: &str| {
        metric_labeled(text, n, l, v)
            .or_else(|| text.contains(&format!("# TYPE {n} ")).then_some(0.0))
            .map(|v| v as u64)
    };
    EdgeMetrics {
        nbd_fetched_bytes: get("cairn_nbd_fetched_bytes_total"),
        nbd_fetched_chunks: get("cairn_nbd_fetched_chunks_total"),
        transport_bytes_in: get("cairn_transport_peer_bytes_in_total"),
        stalled_reads: get("cairn_nbd_demand_fetch_seconds_count"),
        stall_secs: metric_sum(text, "cairn_nbd_demand_fetch_seconds_sum"),
        image_reads_local: lab("cairn_nbd_image_reads_total", "source", "local"),
        image_reads_fetched: lab("cairn_nbd_image_reads_total", "source", "fetched"),
        prefetch_fetched_bytes: lab("cairn_prefetch_bytes_total", "outcome", "fetched"),
        prefetch_hit_bytes: lab("cairn_prefetch_bytes_total", "outcome", "hit"),
        prefetch_wasted_bytes: lab("cairn_prefetch_bytes_total", "outcome", "wasted"),
        prefetch_fetched_chunks: lab("cairn_prefetch_chunks_total", "outcome", "fetched"),
        prefetch_failed_chunks: lab("cairn_prefetch_chunks_total", "outcome", "failed"),
        prefetch_reads_avoided: lab("cairn_prefetch_reads_total", "kind", "avoided"),
        prefetch_reads_stalled: lab("cairn_prefetch_reads_total", "kind", "stalled"),
        prefetch_active: get("cairn_prefetch_active"),
    }
}

fn edge_metrics_once(wan: &Wan) -> EdgeMetrics {
    let url = format!("http://127.0.0.1:{CAIRN_API_PORT}/metrics");
    let Ok(out) = wan.run_in("edge", "curl", ["-sf", "--max-time", "10", url.as_str()]) else {
        return EdgeMetrics::default();
    };
    parse_edge_metrics(&String::from_utf8_lossy(&out.stdout))
}

/// The edge's `/metrics` after a step: polled (up to 10 s) until no
/// prefetch task runs (`cairn_prefetch_active` 0), so the export has
/// closed and its unread prefetched bytes are counted as wasted.
fn edge_metrics(wan: &Wan) -> EdgeMetrics {
    let t = Instant::now();
    loop {
        let m = edge_metrics_once(wan);
        if m.prefetch_active.unwrap_or(0) == 0 || t.elapsed() > Duration::from_secs(10) {
            return m;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn link_bytes(wan: &Wan) -> Result<(u64, u64, u64)> {
    let ce = wan.stats("core", "edge")?;
    let ec = wan.stats("edge", "core")?;
    Ok((
        ce.delivered_bytes,
        ec.delivered_bytes,
        ce.dropped_loss + ce.dropped_queue,
    ))
}

// ---------------------------------------------------------------------------
// Measurements
// ---------------------------------------------------------------------------

/// The timed steps of one repetition.
pub const STEPS: &[(&str, &str)] = &[
    (
        "copy-full",
        "copy-first: nbdcopy from qemu-nbd at the core to a local file at the edge",
    ),
    (
        "copy-trace",
        "copy-first: trace replay (qemu-io) against the local copy",
    ),
    (
        "cairn-full",
        "cairn: nbdcopy of the edge's lazy export to `null:` (fresh edge, prefetch defaults)",
    ),
    (
        "cairn-warm",
        "warm local: trace replay against the same edge, image complete there (after cairn-full)",
    ),
    (
        "cairn-lazy",
        "cairn: trace replay against a fresh edge, prefetch off (`enabled = false`)",
    ),
    (
        "cairn-profile",
        "cairn: trace replay against a fresh edge, profile prefetch (defaults)",
    ),
    (
        "cairn-successors",
        "cairn: trace replay against a fresh edge, successor model only (`use_profile = false`)",
    ),
];

/// One timed step.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// Which (see [`STEPS`]).
    pub what: String,
    /// Repetition (0-based).
    pub rep: usize,
    /// Wall seconds (the timeout if it timed out: a lower bound).
    pub secs: f64,
    /// Killed at the timeout.
    pub timed_out: bool,
    /// Trace replays: seconds from the start of the qemu-io process until
    /// the first file-extent read completed (DADI-style "time to first
    /// useful work"; the copy-first path adds copy-full to it).
    pub first_work_secs: Option<f64>,
    /// IP bytes the link delivered core→edge during the step.
    pub wan_bytes_core_to_edge: u64,
    /// IP bytes edge→core.
    pub wan_bytes_edge_to_core: u64,
    /// Packets dropped core→edge (loss + queue).
    pub dropped_core_to_edge: u64,
    /// The edge's counters after the step (cairn steps only; for
    /// cairn-warm their growth during the step).
    pub edge: Option<EdgeMetrics>,
    /// The edge prefetcher's start line during the step, if it started.
    pub prefetch_started: Option<PrefetchStarted>,
    /// Warning lines of the Cairn nodes' logs.
    pub log_problems: Vec<String>,
}

/// The whole result.
#[derive(Debug, Clone, Serialize)]
pub struct VmNbdReport {
    /// What ran.
    pub config: VmNbdConfig,
    /// Tool versions.
    pub tools: VmTools,
    /// The image.
    pub image: VmImageMeta,
    /// The trace (summary; the reads are in `trace.reads`).
    pub trace: Trace,
    /// `cairn image import` at the core (loopback), seconds.
    pub import_secs: f64,
    /// The training replay at the core.
    pub training: Training,
    /// Every step, in run order.
    pub steps: Vec<Step>,
}

impl VmNbdReport {
    fn step(&self, what: &str, rep: usize) -> Option<&Step> {
        self.steps.iter().find(|s| s.what == what && s.rep == rep)
    }
    /// Seconds of a step over the reps.
    pub fn secs(&self, what: &str) -> Vec<f64> {
        self.steps
            .iter()
            .filter(|s| s.what == what)
            .map(|s| s.secs)
            .collect()
    }
    /// Per rep: cairn full read / copy-first full copy.
    pub fn ratios_full(&self) -> Vec<f64> {
        (0..self.config.reps)
            .filter_map(|r| {
                Some(self.step("cairn-full", r)?.secs / self.step("copy-full", r)?.secs)
            })
            .collect()
    }
    /// Per rep: cairn lazy trace replay (no prefetch) / (copy-first full
    /// copy + local replay).
    pub fn ratios_trace(&self) -> Vec<f64> {
        self.ratios("cairn-lazy", "copy-first")
    }
    /// Seconds of `what` in rep `r`; `copy-first` is copy-full +
    /// copy-trace.
    pub fn secs_at(&self, what: &str, r: usize) -> Option<f64> {
        if what == "copy-first" {
            return Some(self.step("copy-full", r)?.secs + self.step("copy-trace", r)?.secs);
        }
        Some(self.step(what, r)?.secs)
    }
    /// Per rep: seconds of `num` / seconds of `den` (see [`Self::secs_at`]).
    pub fn ratios(&self, num: &str, den: &str) -> Vec<f64> {
        (0..self.config.reps)
            .filter_map(|r| Some(self.secs_at(num, r)? / self.secs_at(den, r)?))
            .collect()
    }
    /// Per rep: time to first useful work (the first file-extent read
    /// done) of a trace replay step; `copy-first` is copy-full plus the
    /// local replay's.
    pub fn first_work(&self, what: &str) -> Vec<f64> {
        (0..self.config.reps)
            .filter_map(|r| {
                if what == "copy-first" {
                    return Some(
                        self.step("copy-full", r)?.secs
                            + self.step("copy-trace", r)?.first_work_secs?,
                    );
                }
                self.step(what, r)?.first_work_secs
            })
            .collect()
    }
    /// Per rep: wasted / fetched prefetch bytes of a step (reps that
    /// prefetched nothing are left out).
    pub fn wasted_fraction(&self, what: &str) -> Vec<f64> {
        self.steps
            .iter()
            .filter(|s| s.what == what)
            .filter_map(|s| {
                let e = s.edge?;
                let f = e.prefetch_fetched_bytes?;
                (f > 0).then(|| e.prefetch_wasted_bytes.unwrap_or(0) as f64 / f as f64)
            })
            .collect()
    }
    /// Median of an edge counter of a step over the reps.
    fn edge_median(&self, what: &str, f: impl Fn(&EdgeMetrics) -> Option<f64>) -> Option<f64> {
        let v: Vec<f64> = self
            .steps
            .iter()
            .filter(|s| s.what == what)
            .filter_map(|s| f(s.edge.as_ref()?))
            .collect();
        (!v.is_empty()).then(|| Stats::of(&v).median)
    }
    /// The issue-6/8 targets: (what, target, per-rep values, pass when
    /// the median meets the target; `None`: not judged).
    pub fn targets(&self) -> Vec<(String, String, Vec<f64>, Option<bool>)> {
        let le = |v: &[f64], t: f64| (!v.is_empty()).then(|| Stats::of(v).median <= t);
        let ge = |v: &[f64], t: f64| (!v.is_empty()).then(|| Stats::of(v).median >= t);
        let pw = self.ratios("cairn-profile", "cairn-warm");
        let lp = self.ratios("cairn-lazy", "cairn-profile");
        let wp = self.wasted_fraction("cairn-profile");
        vec![
            (
                "profile prefetch / warm local (trace replay seconds)".into(),
                "≤ 1.3".into(),
                pw.clone(),
                le(&pw, 1.3),
            ),
            (
                "lazy without prefetch / profile prefetch".into(),
                "≥ 3".into(),
                lp.clone(),
                ge(&lp, 3.0),
            ),
            (
                "profile prefetch: wasted / fetched prefetch bytes".into(),
                "≤ 10%".into(),
                wp.clone(),
                le(&wp, 0.10),
            ),
            (
                "successor model only / warm local".into(),
                "(≤ 1.3)".into(),
                self.ratios("cairn-successors", "cairn-warm"),
                None,
            ),
            (
                "lazy without prefetch / successor model only".into(),
                "(≥ 3)".into(),
                self.ratios("cairn-lazy", "cairn-successors"),
                None,
            ),
            (
                "successor model only: wasted / fetched prefetch bytes".into(),
                "(≤ 10%)".into(),
                self.wasted_fraction("cairn-successors"),
                None,
            ),
            (
                "copy-first (full copy + local replay) / warm local".into(),
                "—".into(),
                self.ratios("copy-first", "cairn-warm"),
                None,
            ),
            (
                "copy-first (full copy + local replay) / profile prefetch".into(),
                "—".into(),
                self.ratios("copy-first", "cairn-profile"),
                None,
            ),
            (
                "lazy without prefetch / warm local".into(),
                "—".into(),
                self.ratios("cairn-lazy", "cairn-warm"),
                None,
            ),
        ]
    }
    /// Per rep: copy-first full + local replay, seconds.
    pub fn copy_first_trace_secs(&self) -> Vec<f64> {
        (0..self.config.reps)
            .filter_map(|r| {
                Some(self.step("copy-full", r)?.secs + self.step("copy-trace", r)?.secs)
            })
            .collect()
    }
    /// Median WAN bytes core→edge of a step.
    pub fn wan_bytes(&self, what: &str) -> f64 {
        let v: Vec<f64> = self
            .steps
            .iter()
            .filter(|s| s.what == what)
            .map(|s| s.wan_bytes_core_to_edge as f64)
            .collect();
        Stats::of(&v).median
    }

    /// The Markdown section (no header, no link check).
    pub fn to_markdown(&self) -> String {
        let img = &self.image;
        let tr = &self.trace;
        let mut md = String::new();
        let _ = writeln!(
            md,
            "Link core↔edge: {} (both directions). Cairn nodes: `--congestion {}`. \
             Image: raw ext4, **{} MiB** ({} bytes; {} 4 KiB blocks hold data = {:.1} MiB), \
             {} files, {:.1} MiB of real files from {}; sha256 `{}`. \
             Import at the core (loopback): {:.2} s.\n",
            short_spec(&self.config.spec),
            self.config.congestion,
            img.bytes / MIB,
            img.bytes,
            img.data_blocks,
            (img.data_blocks * BLOCK) as f64 / MIB as f64,
            img.files,
            img.file_bytes as f64 / MIB as f64,
            img.sources.join(", "),
            img.sha256,
            self.import_secs,
        );
        let _ = writeln!(
            md,
            "Trace (seed {}): {} reads, {} distinct 4 KiB blocks = {:.2}% of the image's {} \
             ({:.1} MiB; {} in the head of the image (first 1/8: metadata, directories, small files), {} file extents), {:.1} MiB read in all, \
             {} ms of think time.\n",
            tr.seed,
            tr.reads.len(),
            tr.distinct_blocks,
            tr.distinct_blocks as f64 * 100.0 / tr.image_blocks as f64,
            tr.image_blocks,
            (tr.distinct_blocks * BLOCK) as f64 / MIB as f64,
            tr.metadata_blocks,
            tr.extents,
            tr.bytes() as f64 / MIB as f64,
            tr.think_ms(),
        );
        let _ = writeln!(
            md,
            "Tools: {}. Timeout per step {} s (a timed-out step counts as the timeout: a lower bound).\n",
            self.tools
                .versions
                .iter()
                .map(|(k, v)| format!("{k} `{v}`"))
                .collect::<Vec<_>>()
                .join(", "),
            self.config.timeout.as_secs()
        );
        let t = &self.training;
        let _ = writeln!(
            md,
            "Training: before the reps the same trace was replayed once with qemu-io against the **core's own export** \
             (core namespace, loopback, image complete there; {:.2} s). The core stored its access trace \
             (its API listed {} trace(s), the newest with {} entries, for an image of {} chunks, {:.2} s after the replay) \
             and published `prefetch/<OBJECT>` from it; each fresh edge fetches that model when its export opens. \
             So the profile comes from **one earlier run of the same trace at the core** (a boot repeats its reads).\n",
            t.secs, t.traces, t.trace_entries, t.image_chunks, t.wait_secs
        );
        let pct = |v: f64| format!("{:.1}%", v * 100.0);
        md.push_str(
            "### Prefetch targets (issue 6/8)\n\n| comparison (per rep) | target | min | median | max | result (median) |\n|---|---|---|---|---|---|\n",
        );
        for (what, target, v, pass) in self.targets() {
            let st = Stats::of(&v);
            let f = |x: f64| {
                if what.contains("wasted") {
                    pct(x)
                } else {
                    format!("{x:.2}")
                }
            };
            let _ = writeln!(
                md,
                "| {what} | {target} | {} | **{}** | {} | {} |",
                f(st.min),
                f(st.median),
                f(st.max),
                match pass {
                    Some(true) => "**PASS**".to_owned(),
                    Some(false) => "**FAIL**".to_owned(),
                    None if v.is_empty() => "— (no data)".to_owned(),
                    None => "not judged".to_owned(),
                }
            );
        }
        md.push('\n');
        md.push_str(
            "| variant (trace replay) | seconds min / median / max | first useful work, s (median) | WAN MiB core→edge | demand-fetched MiB | reads that waited for a demand fetch | prefetch fetched / hit / wasted MiB | prefetch: profile chunks followed |\n|---|---|---|---|---|---|---|---|\n",
        );
        let med = |v: Option<f64>, scale: f64| {
            v.map_or("—".to_owned(), |x| format!("{:.2}", x / scale))
        };
        for (what, label) in [
            ("cairn-warm", "warm local (image complete at the edge)"),
            ("cairn-lazy", "lazy, prefetch off"),
            ("cairn-profile", "profile prefetch"),
            ("cairn-successors", "successor model only"),
            ("copy-first", "copy-first (full copy + local replay)"),
        ] {
            let secs: Vec<f64> = (0..self.config.reps)
                .filter_map(|r| self.secs_at(what, r))
                .collect();
            let st = Stats::of(&secs);
            let fw = self.first_work(what);
            let wan = if what == "copy-first" {
                self.wan_bytes("copy-full") + self.wan_bytes("copy-trace")
            } else {
                self.wan_bytes(what)
            };
            let profile: Vec<f64> = self
                .steps
                .iter()
                .filter(|s| s.what == what)
                .filter_map(|s| s.prefetch_started.map(|p| p.profile_chunks as f64))
                .collect();
            let _ = writeln!(
                md,
                "| **{label}** (`{what}`) | {:.2} / **{:.2}** / {:.2} | {} | {:.2} | {} | {} | {} / {} / {} | {} |",
                st.min,
                st.median,
                st.max,
                if fw.is_empty() {
                    "—".to_owned()
                } else {
                    format!("**{:.2}**", Stats::of(&fw).median)
                },
                wan / MIB as f64,
                med(self.edge_median(what, |e| e.nbd_fetched_bytes.map(|b| b as f64)), MIB as f64),
                self.edge_median(what, |e| e.image_reads_fetched.map(|b| b as f64))
                    .map_or("—".to_owned(), |n| format!("{n:.0}")),
                med(self.edge_median(what, |e| e.prefetch_fetched_bytes.map(|b| b as f64)), MIB as f64),
                med(self.edge_median(what, |e| e.prefetch_hit_bytes.map(|b| b as f64)), MIB as f64),
                med(self.edge_median(what, |e| e.prefetch_wasted_bytes.map(|b| b as f64)), MIB as f64),
                if profile.is_empty() {
                    "— (no prefetch)".to_owned()
                } else {
                    format!("{:.0}", Stats::of(&profile).median)
                },
            );
        }
        md.push_str(
            "\nFirst useful work (DADI-style): seconds from the start of the replay's qemu-io process until the trace's first \
             file-extent read (the first read beyond the image's head) completed; for copy-first, the full copy's seconds plus that.\n\n",
        );
        // What the link alone allows a cold edge: the step's WAN bytes at
        // the link rate, plus one round trip.
        let rate = self.config.spec.rate_bps as f64;
        if rate > 0.0 {
            let wan = self.wan_bytes("cairn-profile");
            let floor = wan * 8.0 / rate + 2.0 * self.config.spec.delay.as_secs_f64();
            let warm = Stats::of(&self.secs("cairn-warm")).median;
            let _ = writeln!(
                md,
                "Link floor for a cold edge: the profile replay moved {:.2} MiB core→edge (IP bytes; the trace's {:.2} MiB of distinct blocks \
                 lie in {:.2} MiB of chunks, compressed on the wire); at {:.0} Mbit/s plus one round trip that alone is **{:.2} s = {:.2}× warm local** \
                 ({warm:.2} s), whatever the prefetch does.\n",
                wan / MIB as f64,
                (tr.distinct_blocks * BLOCK) as f64 / MIB as f64,
                self.edge_median("cairn-lazy", |e| e.nbd_fetched_bytes.map(|b| b as f64))
                    .unwrap_or(f64::NAN)
                    / MIB as f64,
                rate / 1e6,
                floor,
                floor / warm,
            );
        }
        let rf = Stats::of(&self.ratios_full());
        let rt = Stats::of(&self.ratios_trace());
        let rp = Stats::of(&self.ratios("cairn-profile", "copy-first"));
        let _ = writeln!(
            md,
            "### Cairn against copy-first\n\n| ratio (per rep, lower is better for cairn) | min | median | max |\n|---|---|---|---|\n\
             | (a) full read: cairn lazy nbdcopy / copy-first full copy | {:.2} | **{:.2}** | {:.2} |\n\
             | (b) boot-like trace: cairn lazy replay, prefetch off / (copy-first full copy + local replay) | {:.3} | **{:.3}** | {:.3} |\n\
             | (c) boot-like trace: cairn profile prefetch / (copy-first full copy + local replay) | {:.3} | **{:.3}** | {:.3} |\n",
            rf.min, rf.median, rf.max, rt.min, rt.median, rt.max, rp.min, rp.median, rp.max
        );
        md.push_str(
            "| step | reps | seconds min / median / max | WAN MiB core→edge (median) | edge demand-fetched MiB (median, /metrics) |\n|---|---|---|---|---|\n",
        );
        for &(what, d) in STEPS {
            let s = Stats::of(&self.secs(what));
            let fetched: Vec<f64> = self
                .steps
                .iter()
                .filter(|x| x.what == what)
                .filter_map(|x| x.edge?.nbd_fetched_bytes)
                .map(|b| b as f64)
                .collect();
            let timeouts = self
                .steps
                .iter()
                .filter(|x| x.what == what && x.timed_out)
                .count();
            let _ = writeln!(
                md,
                "| **{what}**: {d} | {}{} | {:.2} / **{:.2}** / {:.2} | {:.2} | {} |",
                self.secs(what).len(),
                if timeouts > 0 {
                    format!(" ({timeouts} TIMED OUT)")
                } else {
                    String::new()
                },
                s.min,
                s.median,
                s.max,
                self.wan_bytes(what) / MIB as f64,
                if fetched.is_empty() {
                    "—".to_owned()
                } else {
                    format!("{:.2}", Stats::of(&fetched).median / MIB as f64)
                }
            );
        }
        let cf = Stats::of(&self.copy_first_trace_secs());
        let _ = writeln!(
            md,
            "| copy-first total for (b), (c): copy-full + copy-trace | {} | {:.2} / **{:.2}** / {:.2} | — | — |\n",
            self.copy_first_trace_secs().len(),
            cf.min,
            cf.median,
            cf.max
        );
        let trace_wan = self.wan_bytes("cairn-lazy");
        let full_wan = self.wan_bytes("copy-full");
        let _ = writeln!(
            md,
            "- **(a) full read: cairn / copy-first = {:.2}×** (median of per-rep ratios).\n\
             - **(b) boot-like trace, prefetch off: cairn / copy-first = {:.3}×**; the lazy replay moved {:.2} MiB core→edge \
             ({:.1}% of the copy-first transfer's {:.1} MiB) for {:.2} MiB of distinct blocks read.\n\
             - **(c) boot-like trace, profile prefetch: cairn / copy-first = {:.3}×**; {:.2} MiB core→edge.\n",
            rf.median,
            rt.median,
            trace_wan / MIB as f64,
            trace_wan * 100.0 / full_wan,
            full_wan / MIB as f64,
            (tr.distinct_blocks * BLOCK) as f64 / MIB as f64,
            rp.median,
            self.wan_bytes("cairn-profile") / MIB as f64,
        );
        for what in [
            "cairn-full",
            "cairn-lazy",
            "cairn-profile",
            "cairn-successors",
        ] {
            let per: Vec<f64> = self
                .steps
                .iter()
                .filter(|x| x.what == what && x.secs > 0.0)
                .filter_map(|x| Some(x.edge?.stall_secs? / x.secs))
                .collect();
            if !per.is_empty() {
                let _ = writeln!(
                    md,
                    "- {what}: the reads' waits for demand fetches sum to **{:.2}×** the step's wall time (median; \
                     ≈ 1 means the fetches did not overlap: one at a time, latency-bound; well above 1, reads waited for fetches concurrently).",
                    Stats::of(&per).median
                );
            }
        }
        md.push('\n');
        md.push_str("Per step (in run order; the edge columns are its `/metrics` after the step, for cairn-warm their growth during it; \
                     prefetch bytes are `cairn_prefetch_bytes_total`, wasted counted when the export closed):\n\n\
                     | rep | step | seconds | first useful work, s | WAN MiB core→edge | edge→core MiB | dropped core→edge, pkts | edge demand-fetched MiB (chunks) | edge transport in MiB | image reads local / waited for a fetch | demand waits: count, mean ms | prefetch fetched / hit / wasted MiB | prefetch reads avoided / stalled | profile chunks / missing at open |\n\
                     |---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
        let mib = |v: Option<u64>| {
            v.map_or("—".to_owned(), |b| {
                format!("{:.2}", b as f64 / MIB as f64)
            })
        };
        let num = |v: Option<u64>| v.map_or("—".to_owned(), |n| n.to_string());
        for s in &self.steps {
            let e = s.edge.unwrap_or_default();
            let stalls = match (e.stalled_reads, e.stall_secs) {
                (Some(n), Some(t)) if n > 0 => format!("{n}, {:.1}", t * 1e3 / n as f64),
                (Some(n), _) => n.to_string(),
                _ => "—".to_owned(),
            };
            let _ = writeln!(
                md,
                "| {} | {} | {}{:.2} | {} | {:.2} | {:.2} | {} | {}{} | {} | {} / {} | {} | {} / {} / {} | {} / {} | {} |",
                s.rep + 1,
                s.what,
                if s.timed_out { "TIMED OUT ≥ " } else { "" },
                s.secs,
                s.first_work_secs.map_or("—".to_owned(), |t| format!("{t:.2}")),
                s.wan_bytes_core_to_edge as f64 / MIB as f64,
                s.wan_bytes_edge_to_core as f64 / MIB as f64,
                s.dropped_core_to_edge,
                mib(e.nbd_fetched_bytes),
                e.nbd_fetched_chunks
                    .map_or(String::new(), |c| format!(" ({c})")),
                mib(e.transport_bytes_in),
                num(e.image_reads_local),
                num(e.image_reads_fetched),
                stalls,
                mib(e.prefetch_fetched_bytes),
                mib(e.prefetch_hit_bytes),
                mib(e.prefetch_wasted_bytes),
                num(e.prefetch_reads_avoided),
                num(e.prefetch_reads_stalled),
                s.prefetch_started.map_or("—".to_owned(), |p| format!(
                    "{} / {}",
                    p.profile_chunks, p.missing_chunks
                )),
            );
        }
        let problems: Vec<String> = self
            .steps
            .iter()
            .flat_map(|s| {
                s.log_problems
                    .iter()
                    .map(move |l| format!("{} rep {}: {l}", s.what, s.rep + 1))
            })
            .take(10)
            .collect();
        if !problems.is_empty() {
            md.push_str("\nCairn log lines at warning level or worse (first 10):\n\n");
            for l in problems {
                let _ = writeln!(md, "- `{}`", l.replace('`', "'"));
            }
        }
        md
    }
}

/// Runs the scenario on a fresh WAN (progress on stderr). A step that
/// outlives the timeout is killed and recorded as timed out; any other
/// failure (a server that does not start, a failed tool, wrong bytes) is an
/// error. Servers, namespaces and the work dir are gone when it returns.
pub fn run_vm_nbd(cfg: &VmNbdConfig) -> Result<VmNbdReport> {
    let tools = VmTools::find(&cfg.cairn)?;
    ensure!(
        cfg.congestion == "cubic" || cfg.congestion == "bbr",
        "--congestion must be cubic or bbr"
    );
    let (disk, img) = vm_image(&cfg.tmp, cfg.image_bytes, cfg.file_bytes)?;
    let data = nonzero_blocks(&disk)?;
    let trace = boot_trace(img.bytes / BLOCK, &data, cfg.trace_fraction, cfg.trace_seed);
    eprintln!(
        "image {} MiB ({:.1} MiB data); trace {} reads, {} distinct blocks ({:.2}%)",
        img.bytes / MIB,
        (img.data_blocks * BLOCK) as f64 / MIB as f64,
        trace.reads.len(),
        trace.distinct_blocks,
        trace.distinct_blocks as f64 * 100.0 / trace.image_blocks as f64
    );
    let work = cfg
        .tmp
        .join(format!("cairn-wan-vmnbd-{}", std::process::id()));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    let result = run_in_work(cfg, &tools, &disk, &img, trace, &work);
    let _ = fs::remove_dir_all(&work);
    result
}

fn run_in_work(
    cfg: &VmNbdConfig,
    tools: &VmTools,
    disk: &Path,
    img: &VmImageMeta,
    trace: Trace,
    work: &Path,
) -> Result<VmNbdReport> {
    let (ca, wan) = crate::scenario::core_edge(&cfg.cairn, work, cfg.seed, cfg.spec)?;
    let core_ip = wan.addr("core")?;
    let core = cairn_node(&wan, cfg, "core", &ca, &work.join("core"), None)?;
    // Import inside the core namespace (loopback; never crosses the link).
    let before = link_bytes(&wan)?;
    let mut imp = wan.command("core", &cfg.cairn)?;
    imp.args(["image", "import", IMAGE_NAME])
        .arg(disk)
        .args(["--api", &format!("http://127.0.0.1:{CAIRN_API_PORT}")]);
    let (import_secs, to) = timed(
        imp,
        &work.join("import.log"),
        cfg.timeout,
        "cairn image import",
    )?;
    ensure!(!to, "the import timed out");
    ensure!(link_bytes(&wan)? == before, "the import crossed the link");
    eprintln!("imported at the core: {import_secs:.2} s");
    // The copy-first source: qemu-nbd serving the raw file at the core.
    let qlog = work.join("qemu-nbd.log");
    let mut q = wan.command("core", "qemu-nbd")?;
    q.args(["-r", "-t", "-f", "raw", "-e", "8", "-x", "img", "-b"])
        .arg(core_ip.to_string())
        .args(["-p", &QEMU_NBD_PORT.to_string()])
        .arg(disk);
    let _qemu_nbd = spawn_logged(&wan, q, &qlog)?;
    wait_listening(&wan, "core", QEMU_NBD_PORT, &qlog, "qemu-nbd")?;
    let parent = format!("core@{core_ip}:{CAIRN_QUIC_PORT}");
    let export = format!("nbd://127.0.0.1:{CAIRN_NBD_PORT}/image/{IMAGE_NAME}");
    let qemu_io_args = trace.qemu_io_args();
    let training = train_core(&wan, cfg, &export, &qemu_io_args, work)?;
    eprintln!(
        "training replay at the core: {:.2} s; {} trace(s) stored there",
        training.secs, training.traces
    );
    let mut steps = Vec::new();
    for rep in 0..cfg.reps {
        let dir = work.join(format!("rep{rep}"));
        fs::create_dir_all(&dir)?;
        let local = dir.join("local.raw");
        // The edge of the current step (kept from cairn-full for
        // cairn-warm) and its directory.
        let mut edge: Option<(Node, PathBuf)> = None;
        for &(what, _) in STEPS {
            if what != "cairn-warm" {
                if let Some((n, d)) = edge.take() {
                    drop(n);
                    let _ = fs::remove_dir_all(d);
                }
                if let Some(prefetch) = edge_prefetch_config(what) {
                    let d = dir.join(format!("edge-{what}"));
                    let n = cairn_node(&wan, cfg, "edge", &ca, &d, Some((&parent, prefetch)))?;
                    edge = Some((n, d));
                }
            }
            ensure!(
                edge.is_some() == what.starts_with("cairn"),
                "{what}: no edge node"
            );
            let qemu_io = |site: &str, target: &dyn AsRef<std::ffi::OsStr>| -> Result<Command> {
                // Line-buffered, so the marker line arrives when printed.
                let mut c = wan.command(site, "stdbuf")?;
                c.args(["-oL", "qemu-io", "-r", "-f", "raw"])
                    .args(&qemu_io_args)
                    .arg(target);
                Ok(c)
            };
            let cmd = match what {
                "copy-full" => {
                    let mut c = wan.command("edge", "nbdcopy")?;
                    c.arg(format!("nbd://{core_ip}:{QEMU_NBD_PORT}/img"))
                        .arg(&local);
                    c
                }
                "copy-trace" => qemu_io("edge", &local)?,
                "cairn-full" => {
                    let mut c = wan.command("edge", "nbdcopy")?;
                    // `null:`, not `/dev/null`: nbdcopy writes a
                    // `/dev/null` destination synchronously, one request
                    // at a time.
                    c.arg(&export).arg("null:");
                    c
                }
                _ => qemu_io("edge", &export)?,
            };
            if what == "copy-full" {
                // nbdcopy writes into an existing file.
                fs::File::create(&local)?;
            }
            // Counters before the step: zero on a fresh edge; for
            // cairn-warm, what cairn-full and its verification left.
            let baseline = if what == "cairn-warm" {
                edge_metrics(&wan)
            } else {
                EdgeMetrics::default()
            };
            let log_lines_before = edge.as_ref().map_or(0, |(n, _)| {
                fs::read_to_string(&n.log)
                    .unwrap_or_default()
                    .lines()
                    .count()
            });
            let before = link_bytes(&wan)?;
            let tm = timed_marked(cmd, &dir.join(format!("{what}.log")), cfg.timeout, what)
                .with_context(|| format!("{what} rep {}", rep + 1))?;
            let (secs, timed_out) = (tm.secs, tm.timed_out);
            let after = link_bytes(&wan)?;
            let metrics = edge.as_ref().map(|_| {
                // Let the server see the disconnect before the first scrape.
                std::thread::sleep(Duration::from_millis(300));
                edge_metrics(&wan).since(&baseline)
            });
            let fetched = metrics.and_then(|m| m.nbd_fetched_bytes);
            let prefetch_started = edge
                .as_ref()
                .and_then(|(n, _)| n.prefetch_started(log_lines_before));
            // Verification, untimed.
            if !timed_out {
                match what {
                    "copy-full" => {
                        run_checked(Command::new("cmp").arg(disk).arg(&local), "cmp")
                            .context("WRONG BYTES: the copy-first copy differs")?;
                    }
                    "cairn-full" => {
                        let mut c = wan.command("edge", "qemu-img")?;
                        c.args(["compare", "-q", "-f", "raw", "-F", "raw"])
                            .arg(disk)
                            .arg(&export);
                        run_checked(&mut c, "qemu-img compare")
                            .context("WRONG BYTES: the edge export differs from the image")?;
                    }
                    _ => {}
                }
            }
            let mut problems = edge
                .as_ref()
                .map(|(n, _)| n.log_problems())
                .unwrap_or_default();
            if edge.is_some() {
                problems.extend(core.log_problems());
            }
            let s = Step {
                what: what.to_owned(),
                rep,
                secs,
                timed_out,
                first_work_secs: tm.marker_secs,
                wan_bytes_core_to_edge: after.0 - before.0,
                wan_bytes_edge_to_core: after.1 - before.1,
                dropped_core_to_edge: after.2 - before.2,
                edge: metrics,
                prefetch_started,
                log_problems: problems,
            };
            let m = s.edge.unwrap_or_default();
            eprintln!(
                "rep {} {what:<16} {secs:>7.2} s  WAN {:.2} MiB{}{}{}{}",
                rep + 1,
                s.wan_bytes_core_to_edge as f64 / MIB as f64,
                fetched.map_or(String::new(), |b| format!(
                    "  demand-fetched {:.2} MiB",
                    b as f64 / MIB as f64
                )),
                m.prefetch_fetched_bytes
                    .filter(|&b| b > 0)
                    .map_or(String::new(), |b| format!(
                        "  prefetched {:.2} MiB (wasted {:.2})",
                        b as f64 / MIB as f64,
                        m.prefetch_wasted_bytes.unwrap_or(0) as f64 / MIB as f64
                    )),
                s.first_work_secs
                    .map_or(String::new(), |t| format!("  first work {t:.2} s")),
                if timed_out { "  TIMED OUT" } else { "" }
            );
            steps.push(s);
        }
        if let Some((n, d)) = edge.take() {
            drop(n);
            let _ = fs::remove_dir_all(d);
        }
        let _ = fs::remove_dir_all(&dir);
    }
    drop(core);
    drop(wan);
    Ok(VmNbdReport {
        config: cfg.clone(),
        tools: tools.clone(),
        image: img.clone(),
        trace,
        import_secs,
        training,
        steps,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_is_deterministic_and_sized() {
        let blocks = 65_536;
        let data: Vec<u64> = (0..blocks).filter(|b| b % 7 != 3).collect();
        let a = boot_trace(blocks, &data, 0.03, 42);
        let b = boot_trace(blocks, &data, 0.03, 42);
        assert_eq!(a.reads, b.reads);
        let pct = a.distinct_blocks as f64 / blocks as f64;
        assert!((0.029..0.036).contains(&pct), "{pct}");
        assert!(a.metadata_blocks * 2 >= a.distinct_blocks, "{a:?}");
        assert_eq!(a.reads[0].offset, 0);
        assert!(a
            .reads
            .iter()
            .all(|r| r.think_ms <= 2 && r.len <= 128 << 10));
        assert!(a.reads.iter().all(|r| r.offset + r.len <= blocks * BLOCK));
        assert_ne!(boot_trace(blocks, &data, 0.03, 43).reads, a.reads);
    }

    #[test]
    fn metric_sum_adds_series() {
        let t = "# HELP x\ncairn_nbd_fetched_bytes_total{export=\"a\"} 10\n\
                 cairn_nbd_fetched_bytes_total{export=\"b\"} 5\ncairn_nbd_fetched_bytes_totalx 7\n";
        assert_eq!(metric_sum(t, "cairn_nbd_fetched_bytes_total"), Some(15.0));
        assert_eq!(metric_sum(t, "nope"), None);
    }

    #[test]
    fn labelled_metrics_and_absent_series() {
        let t = "# TYPE cairn_prefetch_bytes_total counter\n\
                 cairn_prefetch_bytes_total{outcome=\"fetched\"} 100\n\
                 cairn_prefetch_bytes_total{outcome=\"hit\"} 90\n";
        assert_eq!(
            metric_labeled(t, "cairn_prefetch_bytes_total", "outcome", "hit"),
            Some(90.0)
        );
        let m = parse_edge_metrics(t);
        assert_eq!(m.prefetch_fetched_bytes, Some(100));
        // Exported family, series never counted: 0; family absent: None.
        assert_eq!(m.prefetch_wasted_bytes, Some(0));
        assert_eq!(m.prefetch_reads_avoided, None);
        assert_eq!(
            strip_ansi("\u{1b}[3mprofile_chunks\u{1b}[0m=5"),
            "profile_chunks=5"
        );
    }

    #[test]
    fn first_extent_read_is_the_marker() {
        let blocks = 65_536;
        let data: Vec<u64> = (0..blocks).collect();
        let t = boot_trace(blocks, &data, 0.03, 1);
        let i = t.first_extent_read.expect("an extent read");
        assert!(t.reads[i].offset >= t.head_bytes);
        assert!(t.reads[..i].iter().all(|r| r.offset < t.head_bytes));
        let loud: Vec<_> = t
            .qemu_io_args()
            .into_iter()
            .filter(|a| a.starts_with("read ") && !a.starts_with("read -q"))
            .collect();
        assert_eq!(
            loud,
            vec![format!("read {} {}", t.reads[i].offset, t.reads[i].len)]
        );
    }
}
