//! Registry benchmark: push and pull of a real-file image with skopeo,
//! Cairn against docker-registry 2.8, both measured in the same run on
//! loopback (DESIGN.md, "Performance").
//!
//! ```text
//! cargo bench -p cairn-bench --bench registry -- [--quick] [--reps N]
//!     [--image-mib N] [--layers N] [--tmp DIR] [--cairn PATH]
//!     [--only push,warm,cold,proxy,probe] [--rebuild-image] [--node-verbose]
//!     [--label NAME] [--no-write]
//! ```
//!
//! The image: an OCI layout built offline with umoci from real files
//! (`/usr/lib/x86_64-linux-gnu`, `/usr/share`, ... taking one file from each in
//! turn, each in path order; files up to 32 MiB, hard links once) until the
//! rootfs holds 1 GiB (quick: 200 MiB), spread over 4 layers (one
//! `umoci repack --refresh-bundle` per layer, sizes in the ratio 4:3:2:1;
//! umoci gzips each layer). It is cached under
//! `target/cairn-bench-registry-image/` and reused by later runs
//! (`--rebuild-image` builds it again).
//!
//! Every figure is the wall time of one `skopeo copy`, median of `--reps`
//! (default 3):
//! 1. **push** `oci:LAYOUT:img` → `docker://HOST/bench/img:v1`, to a fresh
//!    docker-registry and to a fresh `cairn node` (core) per rep;
//! 2. **pull warm** `docker://…` → `dir:OUT` (fresh OUT per rep) from the
//!    docker-registry and the Cairn core that hold the image (the last push
//!    rep's servers);
//! 3. **pull cold edge**: from a fresh `cairn node` edge (fresh data dir per
//!    rep) whose parent is that core, over QUIC on loopback;
//! 4. context: from a fresh docker-registry pull-through cache
//!    (`proxy.remoteurl` = the docker-registry holding the image).
//!
//! The two registries take turns going first from rep to rep. Every pulled
//! dir is checked: every blob's sha256 equals its name, the blob set and
//! sizes equal the image's, the manifest equals the pushed one; a mismatch
//! fails the run. Then a probe (context, untimed in the figures above) pulls
//! the image once more from each kind of server with a plain HTTP client
//! (manifest, then every blob at once, as skopeo does) and times the manifest
//! and each blob's response headers, first byte and last byte; the edge's
//! and core's `/metrics` are read around each cold pull.
//!
//! Targets (time ratios Cairn / docker-registry, lower is better): pull warm
//! ≤ 1.0; cold edge ≤ 1.3 × docker-registry's warm pull. Push is context.
//!
//! Servers are the real binaries: `docker-registry serve CONFIG` and
//! `target/release/cairn node` (build it with
//! `cargo build --release -p cairn-cli`), each stopped with SIGTERM and
//! waited for (SIGKILL after 10 s, and on any early exit of the bench).
//! Everything listens on 127.0.0.1. Scratch (registry data, node data,
//! pulled dirs, logs) lives in one temp dir under `target/`, removed at the
//! end. Results go to stdout and to
//! `bench/results/registry-YYYY-MM-DD{,-quick}.{md,json}`.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::Read as _;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, ensure, Context as _, Result};
use cairn_bench::{
    command_line_output, git_facts, human_bytes, median, pass_fail, ratio_cell, regular_files,
    today, write_results, MachineFacts, MdTable, MIB,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::Digest as _;

/// Cairn core pull / docker-registry pull (time) must not exceed this.
const WARM_TARGET: f64 = 1.0;
/// Cold edge pull / docker-registry warm pull (time) must not exceed this.
const COLD_TARGET: f64 = 1.3;
const REPO: &str = "bench/img";
const TAG: &str = "v1";
/// The image's tag inside the OCI layout.
const LAYOUT_TAG: &str = "img";
/// Where the image's files come from, in this order (each walked in path
/// order; a file seen under an earlier source is not taken twice).
const SOURCES: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu",
    "/usr/share",
    "/usr/lib/llvm-14",
    "/usr/lib/jvm",
    "/usr/lib/gcc",
    "/usr/lib/python3.11",
    "/usr/bin",
];
/// Larger files are skipped.
const MAX_FILE: u64 = 32 * MIB;
const SECTIONS: &[&str] = &["push", "warm", "cold", "proxy", "probe"];
/// Bumped when the way the image is built changes (part of the cache key).
const IMAGE_RECIPE: u32 = 2;
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Log lines at warning/error level that are normal operation: the
/// 404s docker-registry logs as errors when skopeo checks (HEAD) whether a
/// blob exists before pushing it, and its start-up notes.
const EXPECTED_LOG: &[&str] = &[
    "http.response.status=404",
    "No HTTP secret provided",
    "does not implement RempositoryRemover",
];
/// How long a server may take to come up.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a server may take to stop after SIGTERM before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
struct Opts {
    quick: bool,
    reps: usize,
    image_bytes: u64,
    layers: usize,
    tmp_root: PathBuf,
    cairn: PathBuf,
    only: Vec<String>,
    rebuild_image: bool,
    node_verbose: bool,
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
    "usage: cargo bench -p cairn-bench --bench registry -- [--quick] [--reps N] \
     [--image-mib N] [--layers N] [--tmp DIR] [--cairn PATH] \
     [--only push,warm,cold,proxy,probe] [--rebuild-image] [--node-verbose] \
     [--label NAME] [--no-write]"
}

fn target_dir() -> PathBuf {
    let target = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target");
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_dir())
        .or_else(|| target.canonicalize().ok())
        .unwrap_or(target)
}

fn parse_args() -> Result<Opts> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let target = target_dir();
    let mut o = Opts {
        quick,
        reps: 3,
        image_bytes: if quick { 200 * MIB } else { 1024 * MIB },
        layers: 4,
        tmp_root: if target.is_dir() {
            target.clone()
        } else {
            PathBuf::from("/var/tmp")
        },
        cairn: target.join("release").join("cairn"),
        only: Vec::new(),
        rebuild_image: false,
        node_verbose: false,
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
            "--reps" => o.reps = value(&a)?.parse::<usize>()?.max(1),
            "--image-mib" => o.image_bytes = value(&a)?.parse::<u64>()? * MIB,
            "--layers" => o.layers = value(&a)?.parse()?,
            "--tmp" => o.tmp_root = PathBuf::from(value(&a)?),
            "--cairn" => o.cairn = PathBuf::from(value(&a)?),
            "--only" => {
                o.only = value(&a)?.split(',').map(|s| s.trim().to_owned()).collect();
                for s in &o.only {
                    ensure!(
                        SECTIONS.contains(&s.as_str()),
                        "unknown section {s:?} in --only\n{}",
                        usage()
                    );
                }
            }
            "--rebuild-image" => o.rebuild_image = true,
            "--node-verbose" => o.node_verbose = true,
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
    ensure!(o.image_bytes >= 8 * MIB, "--image-mib must be at least 8");
    ensure!((1..=16).contains(&o.layers), "--layers must be 1..=16");
    Ok(o)
}

fn progress(msg: impl AsRef<str>) {
    eprintln!("[registry-bench] {}", msg.as_ref());
}

/// Throughput in MB/s (10^6 bytes per second).
fn mbps(bytes: u64, secs: f64) -> f64 {
    if secs == 0.0 {
        f64::INFINITY
    } else {
        bytes as f64 / secs / 1e6
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// sha256 (hex) and length of a file.
fn sha256_file(path: &Path) -> Result<(String, u64)> {
    let mut f = File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf)?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((hex(&h.finalize()), n))
}

fn digest_hex(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

// ---------------------------------------------------------------------------
// CPU accounting
// ---------------------------------------------------------------------------

fn clk_tck() -> f64 {
    static TICK: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICK.get_or_init(|| {
        command_line_output(Command::new("getconf").arg("CLK_TCK"))
            .and_then(|s| s.parse::<f64>().ok())
            .filter(|t| *t > 0.0)
            .unwrap_or(100.0)
    })
}

/// Fields 14.. of a `/proc/PID/stat` (after the command name), parsed.
fn stat_fields(path: &str) -> Vec<u64> {
    let Ok(stat) = fs::read_to_string(path) else {
        return Vec::new();
    };
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    // rest starts with field 3 (state); utime is field 14.
    rest.split_whitespace()
        .skip(11)
        .take(4)
        .filter_map(|x| x.parse().ok())
        .collect()
}

/// CPU seconds (user + system, all threads) process `pid` has used so far.
fn pid_cpu(pid: u32) -> f64 {
    let f = stat_fields(&format!("/proc/{pid}/stat"));
    if f.len() < 2 {
        return 0.0;
    }
    (f[0] + f[1]) as f64 / clk_tck()
}

/// CPU seconds of this process's children that have been waited for
/// (cutime + cstime): a skopeo run's CPU once it is reaped.
fn reaped_children_cpu() -> f64 {
    let f = stat_fields("/proc/self/stat");
    if f.len() < 4 {
        return 0.0;
    }
    (f[2] + f[3]) as f64 / clk_tck()
}

// ---------------------------------------------------------------------------
// Tools
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Serialize)]
struct Tools {
    skopeo: PathBuf,
    umoci: PathBuf,
    docker_registry: PathBuf,
    cairn: PathBuf,
    versions: BTreeMap<String, String>,
    /// Set when a source file of the node is newer than the cairn binary.
    cairn_stale: Option<String>,
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The newest `.rs`/`Cargo.toml` under the crates the cairn binary is built
/// from, if newer than `bin`.
fn newer_source(bin: &Path) -> Option<String> {
    let built = fs::metadata(bin).and_then(|m| m.modified()).ok()?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut newest: Option<(SystemTime, PathBuf)> = None;
    for krate in ["cli", "node", "transport", "chunkstore"] {
        let dir = root.join(krate);
        for (rel, _) in regular_files(&dir) {
            let ext_ok = rel.extension().is_some_and(|e| e == "rs")
                || rel.file_name().is_some_and(|n| n == "Cargo.toml");
            if !ext_ok || rel.starts_with("tests") || rel.starts_with("benches") {
                continue;
            }
            let p = dir.join(&rel);
            if let Ok(t) = fs::metadata(&p).and_then(|m| m.modified()) {
                if newest.as_ref().map_or(true, |(n, _)| t > *n) {
                    newest = Some((t, p));
                }
            }
        }
    }
    let (t, p) = newest?;
    (t > built).then(|| {
        format!(
            "{} is newer than {}: rebuild with `cargo build --release -p cairn-cli`",
            p.display(),
            bin.display()
        )
    })
}

impl Tools {
    fn find(opts: &Opts) -> Result<Self> {
        let apt = "apt-get install -y --no-install-recommends docker-registry skopeo umoci";
        let need = |name: &str| {
            find_in_path(name).with_context(|| format!("{name} is not installed; run: {apt}"))
        };
        let skopeo = need("skopeo")?;
        let umoci = need("umoci")?;
        let docker_registry = need("docker-registry")?;
        ensure!(
            opts.cairn.is_file(),
            "{} does not exist; build it with `cargo build --release -p cairn-cli` \
             (or pass --cairn PATH)",
            opts.cairn.display()
        );
        let version = |bin: &Path, arg: &str| {
            command_line_output(Command::new(bin).arg(arg)).unwrap_or_else(|| "unknown".into())
        };
        let mut versions = BTreeMap::new();
        versions.insert("skopeo".into(), version(&skopeo, "--version"));
        versions.insert("umoci".into(), version(&umoci, "--version"));
        versions.insert(
            "docker-registry".into(),
            version(&docker_registry, "--version"),
        );
        versions.insert("cairn".into(), version(&opts.cairn, "--version"));
        let cairn_stale = newer_source(&opts.cairn);
        if let Some(s) = &cairn_stale {
            progress(format!("warning: {s}"));
        }
        Ok(Self {
            skopeo,
            umoci,
            docker_registry,
            cairn: opts.cairn.clone(),
            versions,
            cairn_stale,
        })
    }
}

/// Run a short command to completion; its output on failure.
fn run_checked(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {what}"))?;
    ensure!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

// ---------------------------------------------------------------------------
// The image
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Blob {
    digest: String,
    media_type: String,
    bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Layer {
    blob: Blob,
    files: usize,
    /// Bytes of the files added by this layer (uncompressed).
    file_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ImageMeta {
    recipe: u32,
    manifest: Blob,
    config: Blob,
    layers: Vec<Layer>,
    files: usize,
    file_bytes: u64,
    sources: Vec<String>,
    build_secs: f64,
    built_on: String,
    umoci: String,
}

impl ImageMeta {
    /// Config and layers: the blobs a pull fetches besides the manifest.
    fn blobs(&self) -> impl Iterator<Item = &Blob> {
        std::iter::once(&self.config).chain(self.layers.iter().map(|l| &l.blob))
    }
    /// Manifest + config + layers: the bytes a push or pull moves.
    fn moved_bytes(&self) -> u64 {
        self.manifest.bytes + self.blobs().map(|b| b.bytes).sum::<u64>()
    }
}

fn blob_path(layout: &Path, digest: &str) -> PathBuf {
    layout.join("blobs").join("sha256").join(digest_hex(digest))
}

fn load_cached_image(root: &Path) -> Option<ImageMeta> {
    let meta: ImageMeta = serde_json::from_slice(&fs::read(root.join("meta.json")).ok()?).ok()?;
    if meta.recipe != IMAGE_RECIPE {
        return None;
    }
    let layout = root.join("layout");
    let all = std::iter::once(&meta.manifest).chain(meta.blobs());
    for b in all {
        if fs::metadata(blob_path(&layout, &b.digest))
            .map(|m| m.len())
            .ok()
            != Some(b.bytes)
        {
            return None;
        }
    }
    let index = fs::read_to_string(layout.join("index.json")).ok()?;
    index.contains(&meta.manifest.digest).then_some(meta)
}

/// Real files from [`SOURCES`] until they add up to `target` bytes: one
/// file from each source in turn (each source in path order), so every
/// layer mixes libraries, data and text; a file hard-linked to one already
/// taken is skipped (a tar would store it once).
fn select_files(target: u64) -> (Vec<(PathBuf, u64)>, Vec<String>) {
    use std::os::unix::fs::MetadataExt as _;
    let mut lists: Vec<(&str, std::vec::IntoIter<(PathBuf, u64)>)> = SOURCES
        .iter()
        .filter(|s| Path::new(s).is_dir())
        .map(|s| (*s, regular_files(Path::new(s)).into_iter()))
        .collect();
    let mut inodes = HashSet::new();
    let mut files = Vec::new();
    let mut used = BTreeSet::new();
    let mut total = 0u64;
    while total < target && !lists.is_empty() {
        lists.retain_mut(|(src, it)| {
            if total >= target {
                return true;
            }
            for (rel, len) in it.by_ref() {
                let p = Path::new(src).join(rel);
                let Ok(meta) = fs::metadata(&p) else {
                    continue;
                };
                if len > MAX_FILE
                    || !inodes.insert((meta.dev(), meta.ino()))
                    || File::open(&p).is_err()
                {
                    continue;
                }
                files.push((p, len));
                used.insert((*src).to_owned());
                total += len;
                return true;
            }
            false
        });
    }
    (files, used.into_iter().collect())
}

fn parse_blob(v: &serde_json::Value, fallback_type: &str) -> Result<Blob> {
    Ok(Blob {
        digest: v["digest"]
            .as_str()
            .context("descriptor without digest")?
            .to_owned(),
        media_type: v["mediaType"].as_str().unwrap_or(fallback_type).to_owned(),
        bytes: v["size"].as_u64().context("descriptor without size")?,
    })
}

/// Build the OCI layout in `root/layout` (through a sibling temp dir, so an
/// interrupted build is never taken for a finished one).
fn build_image(opts: &Opts, tools: &Tools, root: &Path) -> Result<ImageMeta> {
    let t = Instant::now();
    let (files, sources) = select_files(opts.image_bytes);
    let file_bytes: u64 = files.iter().map(|f| f.1).sum();
    ensure!(!files.is_empty(), "no readable files under {SOURCES:?}");
    if file_bytes < opts.image_bytes {
        progress(format!(
            "warning: only {} of real files found, less than the {} asked for",
            human_bytes(file_bytes),
            human_bytes(opts.image_bytes)
        ));
    }
    progress(format!(
        "building the image: {} files, {} from {} into {} layers (umoci; cached afterwards)",
        files.len(),
        human_bytes(file_bytes),
        sources.join(", "),
        opts.layers
    ));
    let build = root.with_extension("building");
    if build.exists() {
        fs::remove_dir_all(&build)?;
    }
    fs::create_dir_all(&build)?;
    let layout = build.join("layout");
    let bundle = build.join("bundle");
    let image = format!("{}:{LAYOUT_TAG}", layout.display());
    let umoci = |args: &[&str], what: &str| {
        run_checked(Command::new(&tools.umoci).args(args), what).map(|_| ())
    };
    let layout_s = layout.display().to_string();
    let bundle_s = bundle.display().to_string();
    umoci(&["init", "--layout", &layout_s], "umoci init")?;
    umoci(&["new", "--image", &image], "umoci new")?;
    umoci(&["unpack", "--image", &image, &bundle_s], "umoci unpack")?;
    let rootfs = bundle.join("rootfs");

    // Layer k gets weight (layers - k): sizes 4:3:2:1 for 4 layers.
    let n = opts.layers as u64;
    let weights: u64 = (1..=n).sum();
    let mut groups: Vec<Vec<(PathBuf, u64)>> = vec![Vec::new(); opts.layers];
    let (mut cum, mut k, mut bound) = (0u64, 0usize, file_bytes * n / weights);
    for f in files {
        while cum >= bound && k + 1 < opts.layers {
            k += 1;
            let w: u64 = (0..=k as u64).map(|i| n - i).sum();
            bound = file_bytes * w / weights;
        }
        cum += f.1;
        groups[k].push(f);
    }
    ensure!(
        groups.iter().all(|g| !g.is_empty()),
        "{} files are too few for {} layers",
        groups.iter().map(Vec::len).sum::<usize>(),
        opts.layers
    );
    let mut layer_files = Vec::new();
    for (i, g) in groups.iter().enumerate() {
        for (p, _) in g {
            let rel = p.strip_prefix("/").unwrap_or(p);
            let dest = rootfs.join(rel);
            if let Some(parent) = dest.parent() {
                fs::create_dir_all(parent)?;
            }
            fs::copy(p, &dest)
                .with_context(|| format!("copy {} to {}", p.display(), dest.display()))?;
        }
        let created_by = format!("cairn-bench layer {}", i + 1);
        umoci(
            &[
                "repack",
                "--refresh-bundle",
                "--history.created_by",
                &created_by,
                "--image",
                &image,
                &bundle_s,
            ],
            "umoci repack",
        )?;
        layer_files.push((g.len(), g.iter().map(|f| f.1).sum::<u64>()));
        progress(format!(
            "  layer {}: {} files, {}",
            i + 1,
            g.len(),
            human_bytes(layer_files[i].1)
        ));
    }
    umoci(
        &["config", "--image", &image, "--config.cmd", "sh"],
        "umoci config",
    )?;
    umoci(&["gc", "--layout", &layout_s], "umoci gc")?;
    fs::remove_dir_all(&bundle)?;

    // Read the result back from the layout.
    let index: serde_json::Value = serde_json::from_slice(&fs::read(layout.join("index.json"))?)?;
    let desc = index["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == LAYOUT_TAG)
        .context("index.json has no manifest tagged img")?;
    let manifest = parse_blob(desc, OCI_MANIFEST)?;
    let m: serde_json::Value =
        serde_json::from_slice(&fs::read(blob_path(&layout, &manifest.digest))?)?;
    let config = parse_blob(&m["config"], "application/vnd.oci.image.config.v1+json")?;
    let layer_blobs: Vec<Blob> = m["layers"]
        .as_array()
        .context("manifest without layers")?
        .iter()
        .map(|l| parse_blob(l, "application/vnd.oci.image.layer.v1.tar+gzip"))
        .collect::<Result<_>>()?;
    ensure!(
        layer_blobs.len() == opts.layers,
        "umoci made {} layers, expected {}",
        layer_blobs.len(),
        opts.layers
    );
    let meta = ImageMeta {
        recipe: IMAGE_RECIPE,
        manifest,
        config,
        layers: layer_blobs
            .into_iter()
            .zip(layer_files)
            .map(|(blob, (files, file_bytes))| Layer {
                blob,
                files,
                file_bytes,
            })
            .collect(),
        files: groups.iter().map(Vec::len).sum(),
        file_bytes,
        sources,
        build_secs: t.elapsed().as_secs_f64(),
        built_on: today(),
        umoci: tools.versions.get("umoci").cloned().unwrap_or_default(),
    };
    fs::write(build.join("meta.json"), serde_json::to_vec_pretty(&meta)?)?;
    if root.exists() {
        fs::remove_dir_all(root)?;
    }
    fs::rename(&build, root)?;
    Ok(meta)
}

/// The cached image, or a new one. Returns the layout dir, its facts and
/// whether it was reused.
fn image(opts: &Opts, tools: &Tools) -> Result<(PathBuf, ImageMeta, bool)> {
    let root = opts
        .tmp_root
        .join("cairn-bench-registry-image")
        .join(format!(
            "{}mib-{}layers",
            opts.image_bytes / MIB,
            opts.layers
        ));
    if !opts.rebuild_image {
        if let Some(m) = load_cached_image(&root) {
            progress(format!(
                "reusing the cached image in {} (built {}; --rebuild-image to rebuild)",
                root.display(),
                m.built_on
            ));
            return Ok((root.join("layout"), m, true));
        }
    }
    fs::create_dir_all(root.parent().context("image cache dir")?)?;
    let m = build_image(opts, tools, &root).inspect_err(|_| {
        let _ = fs::remove_dir_all(root.with_extension("building"));
    })?;
    Ok((root.join("layout"), m, false))
}

// ---------------------------------------------------------------------------
// Processes and servers
// ---------------------------------------------------------------------------

/// A child process that is killed (SIGKILL) and reaped if still running when
/// dropped, so nothing outlives the bench.
#[derive(Debug)]
struct Proc {
    child: Option<Child>,
    pid: u32,
}

impl Proc {
    fn spawn(cmd: &mut Command, log: &Path) -> Result<Self> {
        let f = File::create(log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()
            .with_context(|| format!("start {cmd:?}"))?;
        Ok(Self {
            pid: child.id(),
            child: Some(child),
        })
    }

    fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGTERM, wait up to [`STOP_TIMEOUT`], then SIGKILL. Returns the
    /// seconds it took, how it ended, and whether it had to be killed.
    fn stop(&mut self) -> (f64, String, bool) {
        let Some(mut child) = self.child.take() else {
            return (0.0, "not running".into(), false);
        };
        let t = Instant::now();
        if let Ok(Some(st)) = child.try_wait() {
            return (0.0, format!("had already exited: {st}"), false);
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .stderr(Stdio::null())
            .status();
        while t.elapsed() < STOP_TIMEOUT {
            if let Ok(Some(st)) = child.try_wait() {
                return (t.elapsed().as_secs_f64(), st.to_string(), false);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let st = child
            .wait()
            .map_or_else(|e| e.to_string(), |s| s.to_string());
        (t.elapsed().as_secs_f64(), st, true)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if matches!(c.try_wait(), Ok(None)) {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }
}

#[derive(Debug)]
struct Server {
    name: String,
    proc: Proc,
    dir: PathBuf,
    log: PathBuf,
    registry: SocketAddr,
    api: Option<SocketAddr>,
    quic: Option<SocketAddr>,
    token: Option<String>,
}

/// What a server's log and exit looked like.
#[derive(Debug, Clone, Serialize)]
struct ServerEnd {
    name: String,
    stop_secs: f64,
    exit: String,
    killed: bool,
    warn_lines: usize,
    error_lines: usize,
    /// Warning/error lines that are normal (see [`EXPECTED_LOG`]).
    expected_lines: usize,
    /// Up to 5 distinct warning/error lines (not counting expected ones).
    samples: Vec<String>,
}

fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `ADDR` after `word ` in the node's start line.
fn addr_after(line: &str, word: &str) -> Option<SocketAddr> {
    let mut it = line.split_whitespace();
    while let Some(w) = it.next() {
        if w == word {
            return it.next()?.parse().ok();
        }
    }
    None
}

struct Env<'a> {
    opts: &'a Opts,
    tools: &'a Tools,
    image: &'a ImageMeta,
    layout: PathBuf,
    work: PathBuf,
    ca: PathBuf,
    rt: tokio::runtime::Runtime,
    http: reqwest::Client,
    seq: Cell<usize>,
    ends: RefCell<Vec<ServerEnd>>,
}

impl Env<'_> {
    /// A new, empty scratch dir named after `name`.
    fn scratch(&self, name: &str) -> Result<PathBuf> {
        let n = self.seq.get();
        self.seq.set(n + 1);
        let d = self.work.join(format!("{n:03}-{name}"));
        fs::create_dir_all(&d)?;
        Ok(d)
    }

    /// A bound on one transfer of the image (5 MB/s plus two minutes).
    fn deadline(&self) -> Duration {
        Duration::from_secs(120 + self.image.moved_bytes() / 5_000_000)
    }

    /// Wait until `GET /v2/` answers (200 or 401).
    fn wait_http(&self, s: &mut Server) -> Result<()> {
        let t = Instant::now();
        let url = format!("http://{}/v2/", s.registry);
        loop {
            let ok = self.rt.block_on(async {
                match self
                    .http
                    .get(&url)
                    .timeout(Duration::from_secs(2))
                    .send()
                    .await
                {
                    Ok(r) => r.status() == 200 || r.status() == 401,
                    Err(_) => false,
                }
            });
            if ok {
                return Ok(());
            }
            ensure!(
                s.proc.alive(),
                "{} exited while starting; log:\n{}",
                s.name,
                tail(&s.log, 30)
            );
            ensure!(
                t.elapsed() < START_TIMEOUT,
                "{} did not answer GET /v2/ within {START_TIMEOUT:?}; log:\n{}",
                s.name,
                tail(&s.log, 30)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A fresh docker-registry (a pull-through cache of `proxy` if given).
    fn docker_registry(&self, name: &str, proxy: Option<SocketAddr>) -> Result<Server> {
        let dir = self.scratch(name)?;
        let data = dir.join("data");
        fs::create_dir_all(&data)?;
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let mut cfg = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: \"{}\"\nhttp:\n  addr: {addr}\n",
            data.display()
        );
        if let Some(p) = proxy {
            let _ = writeln!(cfg, "proxy:\n  remoteurl: http://{p}");
        }
        let config = dir.join("config.yml");
        fs::write(&config, cfg)?;
        let log = dir.join("log");
        let proc = Proc::spawn(
            Command::new(&self.tools.docker_registry)
                .arg("serve")
                .arg(&config),
            &log,
        )?;
        let mut s = Server {
            name: name.to_owned(),
            proc,
            dir,
            log,
            registry: addr,
            api: None,
            quic: None,
            token: None,
        };
        self.wait_http(&mut s)?;
        Ok(s)
    }

    /// A fresh `cairn node` with identity `CA/identity`, pulling through
    /// `parent` (the core's QUIC address) if given.
    fn cairn(&self, name: &str, identity: &str, parent: Option<SocketAddr>) -> Result<Server> {
        let dir = self.scratch(name)?;
        let data = dir.join("data");
        let log = dir.join("log");
        let mut cmd = Command::new(&self.tools.cairn);
        for v in [
            "CAIRN_CONFIG",
            "CAIRN_DATA_DIR",
            "CAIRN_IDENTITY",
            "RUST_LOG",
        ] {
            cmd.env_remove(v);
        }
        if self.opts.node_verbose {
            cmd.arg("-v");
        }
        cmd.arg("node")
            .arg("--data-dir")
            .arg(&data)
            .arg("--identity")
            .arg(self.ca.join(identity))
            .args(["--site", identity])
            .args(["--registry-listen", "127.0.0.1:0"])
            .args(["--api-listen", "127.0.0.1:0"])
            .args(["--quic-listen", "127.0.0.1:0"])
            .args(["--nbd-listen", "127.0.0.1:0"]);
        if let Some(p) = parent {
            cmd.arg("--parent").arg(format!("core@{p}"));
        }
        let mut proc = Proc::spawn(&mut cmd, &log)?;
        let t = Instant::now();
        let line = loop {
            let text = fs::read_to_string(&log).unwrap_or_default();
            if let Some(l) = text.lines().find(|l| l.starts_with("cairn node ")) {
                break l.to_owned();
            }
            ensure!(
                proc.alive(),
                "{name} exited while starting; log:\n{}",
                tail(&log, 30)
            );
            ensure!(
                t.elapsed() < START_TIMEOUT,
                "{name} printed no start line within {START_TIMEOUT:?}; log:\n{}",
                tail(&log, 30)
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let registry = addr_after(&line, "registry")
            .with_context(|| format!("no registry address in {line:?}"))?;
        let token = fs::read_to_string(data.join("registry-token"))
            .ok()
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty());
        let mut s = Server {
            name: name.to_owned(),
            proc,
            dir,
            log,
            registry,
            api: addr_after(&line, "api"),
            quic: addr_after(&line, "quic"),
            token,
        };
        self.wait_http(&mut s)?;
        Ok(s)
    }

    /// Stop a server, record how it ended and what it logged, and remove its
    /// scratch dir.
    fn stop(&self, mut s: Server) -> Result<()> {
        let (stop_secs, exit, killed) = s.proc.stop();
        let text = fs::read_to_string(&s.log).unwrap_or_default();
        let is_warn = |l: &str| l.contains(" WARN ") || l.contains("level=warning");
        let is_err =
            |l: &str| l.contains(" ERROR ") || l.contains("level=error") || l.contains("panicked");
        let mut samples = BTreeSet::new();
        let (mut warn_lines, mut error_lines, mut expected_lines) = (0, 0, 0);
        for l in text.lines() {
            let (w, e) = (is_warn(l), is_err(l));
            if (w || e) && EXPECTED_LOG.iter().any(|x| l.contains(x)) {
                expected_lines += 1;
                continue;
            }
            warn_lines += usize::from(w);
            error_lines += usize::from(e);
            if (w || e) && samples.len() < 5 {
                samples.insert(l.chars().take(300).collect::<String>());
            }
        }
        if killed || error_lines > 0 {
            progress(format!(
                "warning: {} {}; {error_lines} error lines; log tail:\n{}",
                s.name,
                if killed {
                    "had to be killed"
                } else {
                    "stopped"
                },
                tail(&s.log, 10)
            ));
        }
        self.ends.borrow_mut().push(ServerEnd {
            name: s.name.clone(),
            stop_secs,
            exit,
            killed,
            warn_lines,
            error_lines,
            expected_lines,
            samples: samples.into_iter().collect(),
        });
        fs::remove_dir_all(&s.dir).with_context(|| format!("remove {}", s.dir.display()))
    }

    fn metrics(&self, s: &Server) -> BTreeMap<String, f64> {
        let Some(api) = s.api else {
            return BTreeMap::new();
        };
        let text = self.rt.block_on(async {
            let r = self
                .http
                .get(format!("http://{api}/metrics"))
                .timeout(Duration::from_secs(10))
                .send()
                .await?;
            r.text().await
        });
        let mut m = BTreeMap::new();
        for l in text.unwrap_or_default().lines() {
            if l.starts_with('#') {
                continue;
            }
            let Some((key, value)) = l.rsplit_once(' ') else {
                continue;
            };
            let name = key.split('{').next().unwrap_or(key);
            if let Ok(v) = value.parse::<f64>() {
                *m.entry(name.to_owned()).or_insert(0.0) += v;
            }
        }
        m
    }
}

// ---------------------------------------------------------------------------
// Measurements
// ---------------------------------------------------------------------------

/// Repeated timings of one copy of the image.
#[derive(Debug, Clone, Default, Serialize)]
struct Series {
    secs: Vec<f64>,
    mbps: Vec<f64>,
    /// skopeo's CPU seconds (user + system), per rep.
    client_cpu_s: Vec<f64>,
    /// The servers' CPU seconds during the copy (for a cold edge: edge +
    /// core), per rep.
    server_cpu_s: Vec<f64>,
    /// The same per server (for a cold edge: [edge, core]), per rep.
    server_cpu_each_s: Vec<Vec<f64>>,
    median_secs: f64,
    median_mbps: f64,
}

#[derive(Debug, Clone)]
struct Measured {
    secs: f64,
    client_cpu: f64,
    server_cpu: f64,
    server_cpu_each: Vec<f64>,
}

impl Series {
    fn add(&mut self, bytes: u64, m: Measured) {
        self.secs.push(m.secs);
        self.mbps.push(mbps(bytes, m.secs));
        self.client_cpu_s.push(m.client_cpu);
        self.server_cpu_s.push(m.server_cpu);
        self.server_cpu_each_s.push(m.server_cpu_each);
        self.median_secs = median(&self.secs);
        self.median_mbps = median(&self.mbps);
    }
    fn ran(&self) -> bool {
        !self.secs.is_empty()
    }
}

/// `a / b` of median times; NaN unless both ran.
fn time_ratio(a: &Series, b: &Series) -> f64 {
    if a.ran() && b.ran() {
        a.median_secs / b.median_secs
    } else {
        f64::NAN
    }
}

/// Median over reps of `a.secs[i] / b.secs[i]` (both measured in the same
/// rep, back to back); NaN unless both ran equally often.
fn paired_ratio(a: &Series, b: &Series) -> f64 {
    if !a.ran() || a.secs.len() != b.secs.len() {
        return f64::NAN;
    }
    let r: Vec<f64> = a.secs.iter().zip(&b.secs).map(|(x, y)| x / y).collect();
    median(&r)
}

/// Run one `skopeo copy`, bounded by the env's deadline; its wall time and
/// CPU, and the CPU `servers` used meanwhile.
fn skopeo_copy(
    env: &Env<'_>,
    args: &[String],
    servers: &[&Server],
    log: &Path,
) -> Result<Measured> {
    let server_cpu0: Vec<f64> = servers.iter().map(|s| pid_cpu(s.proc.pid)).collect();
    let child_cpu0 = reaped_children_cpu();
    let f = File::create(log)?;
    let t = Instant::now();
    let mut child = Command::new(&env.tools.skopeo)
        .arg("--insecure-policy")
        .arg("copy")
        .args(args)
        .stdin(Stdio::null())
        .stdout(f.try_clone()?)
        .stderr(f)
        .spawn()
        .context("start skopeo")?;
    let deadline = env.deadline();
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if t.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "skopeo copy {} took over {deadline:?}; log:\n{}",
                args.join(" "),
                tail(log, 20)
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let secs = t.elapsed().as_secs_f64();
    let client_cpu = reaped_children_cpu() - child_cpu0;
    let server_cpu_each: Vec<f64> = servers
        .iter()
        .zip(&server_cpu0)
        .map(|(s, c0)| pid_cpu(s.proc.pid) - c0)
        .collect();
    ensure!(
        status.success(),
        "skopeo copy {} failed ({status}); log:\n{}\nserver logs:\n{}",
        args.join(" "),
        tail(log, 20),
        servers
            .iter()
            .map(|s| format!("--- {}\n{}", s.name, tail(&s.log, 15)))
            .collect::<Vec<_>>()
            .join("\n")
    );
    Ok(Measured {
        secs,
        client_cpu,
        server_cpu: server_cpu_each.iter().sum(),
        server_cpu_each,
    })
}

fn image_ref(s: &Server) -> String {
    format!("docker://{}/{REPO}:{TAG}", s.registry)
}

/// Push the layout to `s`, timed.
fn push(env: &Env<'_>, s: &Server) -> Result<Measured> {
    let mut args = vec!["--dest-tls-verify=false".to_owned()];
    if let Some(t) = &s.token {
        args.push("--dest-creds".into());
        args.push(format!("cairn:{t}"));
    }
    args.push(format!("oci:{}:{LAYOUT_TAG}", env.layout.display()));
    args.push(image_ref(s));
    let log = env
        .scratch(&format!("push-log-{}", s.name))?
        .join("skopeo.log");
    let m = skopeo_copy(env, &args, &[s], &log)?;
    progress(format!(
        "  push to {:<16} {:>7.2} s  {:>6.0} MB/s",
        s.name,
        m.secs,
        mbps(env.image.moved_bytes(), m.secs)
    ));
    Ok(m)
}

/// Check a `dir:` pull: every blob hashes to its name, the blob set and
/// sizes are the image's, the manifest is the pushed one. Returns the bytes
/// checked.
fn verify_pulled(dir: &Path, img: &ImageMeta) -> Result<u64> {
    let mut want: BTreeMap<String, u64> = img
        .blobs()
        .map(|b| (digest_hex(&b.digest).to_owned(), b.bytes))
        .collect();
    let mut manifest = false;
    let mut checked = 0u64;
    for e in fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name == "version" {
            continue;
        }
        let (sum, len) = sha256_file(&e.path())?;
        checked += len;
        if name == "manifest.json" {
            ensure!(
                sum == digest_hex(&img.manifest.digest),
                "WRONG BYTES: the pulled manifest in {} is sha256:{sum}, the pushed one is {}",
                dir.display(),
                img.manifest.digest
            );
            manifest = true;
            continue;
        }
        ensure!(
            sum == name,
            "WRONG BYTES: blob {name} pulled into {} hashes to sha256:{sum}",
            dir.display()
        );
        match want.remove(&name) {
            Some(n) => ensure!(
                n == len,
                "WRONG BYTES: blob {name} is {len} bytes, the image's is {n}"
            ),
            None => bail!("unexpected blob {name} in {}", dir.display()),
        }
    }
    ensure!(manifest, "no manifest.json in {}", dir.display());
    ensure!(
        want.is_empty(),
        "blobs missing from {}: {:?}",
        dir.display(),
        want.keys().collect::<Vec<_>>()
    );
    Ok(checked)
}

/// Pull the image from `s` into a fresh dir, timed, then verify it
/// (untimed). `also` are servers whose CPU counts too (an edge's parent).
fn pull(env: &Env<'_>, s: &Server, also: &[&Server], what: &str) -> Result<Measured> {
    let dir = env.scratch(&format!("pull-{}", s.name))?;
    let out = dir.join("out");
    let args = vec![
        "--src-tls-verify=false".to_owned(),
        image_ref(s),
        format!("dir:{}", out.display()),
    ];
    let mut servers = vec![s];
    servers.extend_from_slice(also);
    let m = skopeo_copy(env, &args, &servers, &dir.join("skopeo.log"))?;
    verify_pulled(&out, env.image)
        .with_context(|| format!("verify the pull from {} ({what})", s.name))?;
    progress(format!(
        "  pull {what:<26} {:>7.2} s  {:>6.0} MB/s  (verified)",
        m.secs,
        mbps(env.image.moved_bytes(), m.secs)
    ));
    fs::remove_dir_all(&dir)?;
    Ok(m)
}

// ---------------------------------------------------------------------------
// Probe: where the time goes
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Serialize)]
struct BlobProbe {
    digest: String,
    bytes: u64,
    /// From the start of the blob phase: response headers, first body
    /// byte, last body byte.
    headers_s: f64,
    first_byte_s: f64,
    done_s: f64,
}

#[derive(Debug, Clone, Serialize)]
struct Probe {
    target: String,
    manifest_s: f64,
    blobs_s: f64,
    total_s: f64,
    blobs: Vec<BlobProbe>,
    /// CPU seconds each server used during the probe (an edge, then its
    /// parent).
    server_cpu_s: Vec<f64>,
    /// Metrics (summed over labels) of the server after the probe, and
    /// the parent's deltas, for an edge.
    metrics: BTreeMap<String, f64>,
}

/// GET the manifest by tag, then every blob at once; check every digest.
async fn probe_pull(
    http: reqwest::Client,
    addr: SocketAddr,
    img: ImageMeta,
) -> Result<(f64, f64, Vec<BlobProbe>)> {
    let base = format!("http://{addr}/v2/{REPO}");
    let t0 = Instant::now();
    let r = http
        .get(format!("{base}/manifests/{TAG}"))
        .header(
            reqwest::header::ACCEPT,
            format!("{OCI_MANIFEST}, {DOCKER_MANIFEST}"),
        )
        .send()
        .await?;
    ensure!(r.status() == 200, "manifest GET: {}", r.status());
    let body = r.bytes().await?;
    let sum = hex(&sha2::Sha256::digest(&body));
    ensure!(
        sum == digest_hex(&img.manifest.digest),
        "WRONG BYTES: manifest is sha256:{sum}, not {}",
        img.manifest.digest
    );
    let manifest_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut tasks = Vec::new();
    for b in img.blobs().cloned() {
        let http = http.clone();
        let url = format!("{base}/blobs/{}", b.digest);
        tasks.push(tokio::spawn(async move {
            let mut r = http.get(url).send().await?;
            let headers_s = t1.elapsed().as_secs_f64();
            ensure!(r.status() == 200, "blob {} GET: {}", b.digest, r.status());
            // Kept in memory and hashed after the clock stops, so the
            // client's CPU competes as little as it can with the servers'.
            let mut body = Vec::with_capacity(usize::try_from(b.bytes).unwrap_or(0));
            let mut first = None;
            while let Some(c) = r.chunk().await? {
                first.get_or_insert_with(|| t1.elapsed().as_secs_f64());
                body.extend_from_slice(&c);
            }
            let done_s = t1.elapsed().as_secs_f64();
            let n = body.len() as u64;
            let sum = hex(&sha2::Sha256::digest(&body));
            ensure!(
                sum == digest_hex(&b.digest) && n == b.bytes,
                "WRONG BYTES: blob {} came as {n} bytes hashing to sha256:{sum}",
                b.digest
            );
            Ok(BlobProbe {
                digest: b.digest,
                bytes: n,
                headers_s,
                first_byte_s: first.unwrap_or(done_s),
                done_s,
            })
        }));
    }
    let mut blobs = Vec::new();
    for t in tasks {
        blobs.push(t.await??);
    }
    Ok((manifest_s, t1.elapsed().as_secs_f64(), blobs))
}

fn probe(env: &Env<'_>, target: &str, s: &Server, parent: Option<&Server>) -> Result<Probe> {
    let before = parent.map(|p| env.metrics(p)).unwrap_or_default();
    let servers: Vec<&Server> = std::iter::once(s).chain(parent).collect();
    let cpu0: Vec<f64> = servers.iter().map(|x| pid_cpu(x.proc.pid)).collect();
    let t = Instant::now();
    let (manifest_s, blobs_s, blobs) = env
        .rt
        .block_on(probe_pull(env.http.clone(), s.registry, env.image.clone()))
        .with_context(|| format!("probe of {target}"))?;
    let total_s = t.elapsed().as_secs_f64();
    let server_cpu_s = servers
        .iter()
        .zip(&cpu0)
        .map(|(x, c0)| pid_cpu(x.proc.pid) - c0)
        .collect();
    let mut metrics = env.metrics(s);
    if let Some(p) = parent {
        for (k, v) in env.metrics(p) {
            metrics.insert(
                format!("parent:{k}"),
                v - before.get(&k).copied().unwrap_or(0.0),
            );
        }
    }
    progress(format!(
        "  probe {target:<34} manifest {manifest_s:.3} s, blobs {blobs_s:.2} s"
    ));
    Ok(Probe {
        target: target.to_owned(),
        manifest_s,
        blobs_s,
        total_s,
        blobs,
        server_cpu_s,
        metrics,
    })
}

// ---------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------

#[derive(Debug, Default, Serialize)]
struct Results {
    push_dr: Series,
    push_cairn: Series,
    warm_dr: Series,
    warm_cairn: Series,
    cold_edge: Series,
    proxy_dr: Series,
    /// Per cold-edge rep: the edge's metrics after the pull and the core's
    /// deltas (`parent:` prefix).
    cold_metrics: Vec<BTreeMap<String, f64>>,
    probes: Vec<Probe>,
}

fn add_parent_deltas(
    m: &mut BTreeMap<String, f64>,
    before: &BTreeMap<String, f64>,
    after: BTreeMap<String, f64>,
) {
    for (k, v) in after {
        m.insert(
            format!("parent:{k}"),
            v - before.get(&k).copied().unwrap_or(0.0),
        );
    }
}

fn run(env: &Env<'_>) -> Result<Results> {
    let o = env.opts;
    let bytes = env.image.moved_bytes();
    let mut r = Results::default();

    // 1. Push, fresh servers per rep; the last rep's stay up as holders.
    let mut holders: Option<(Server, Server)> = None;
    if o.runs("push") {
        progress("push");
        for rep in 0..o.reps {
            let dr = env.docker_registry(&format!("dr-{rep}"), None)?;
            let core = env.cairn(&format!("core-{rep}"), "core", None)?;
            if rep % 2 == 0 {
                r.push_dr.add(bytes, push(env, &dr)?);
                r.push_cairn.add(bytes, push(env, &core)?);
            } else {
                r.push_cairn.add(bytes, push(env, &core)?);
                r.push_dr.add(bytes, push(env, &dr)?);
            }
            if rep + 1 == o.reps {
                holders = Some((dr, core));
            } else {
                env.stop(dr)?;
                env.stop(core)?;
            }
        }
    }
    if !["warm", "cold", "proxy", "probe"].iter().any(|s| o.runs(s)) {
        if let Some((dr, core)) = holders {
            env.stop(dr)?;
            env.stop(core)?;
        }
        return Ok(r);
    }
    let (dr, core) = match holders {
        Some(h) => h,
        None => {
            progress("seeding (untimed push)");
            let dr = env.docker_registry("dr-holder", None)?;
            let core = env.cairn("core-holder", "core", None)?;
            push(env, &dr)?;
            push(env, &core)?;
            (dr, core)
        }
    };
    let core_quic = core.quic.context("the core printed no QUIC address")?;

    // 2. Warm pulls from the holders.
    if o.runs("warm") || o.runs("cold") {
        progress("pull warm");
        for rep in 0..o.reps {
            if rep % 2 == 0 {
                r.warm_dr
                    .add(bytes, pull(env, &dr, &[], "warm docker-registry")?);
                r.warm_cairn
                    .add(bytes, pull(env, &core, &[], "warm cairn core")?);
            } else {
                r.warm_cairn
                    .add(bytes, pull(env, &core, &[], "warm cairn core")?);
                r.warm_dr
                    .add(bytes, pull(env, &dr, &[], "warm docker-registry")?);
            }
        }
    }

    // 3. Cold edge: a fresh edge per rep.
    if o.runs("cold") {
        progress("pull cold edge (fresh edge per rep, parent = the core)");
        for rep in 0..o.reps {
            let edge = env.cairn(&format!("edge-{rep}"), "edge", Some(core_quic))?;
            let before = env.metrics(&core);
            let m = pull(env, &edge, &[&core], "cold cairn edge")?;
            r.cold_edge.add(bytes, m);
            let mut metrics = env.metrics(&edge);
            add_parent_deltas(&mut metrics, &before, env.metrics(&core));
            r.cold_metrics.push(metrics);
            env.stop(edge)?;
        }
    }

    // 4. Context: docker-registry as a pull-through cache, cold.
    if o.runs("proxy") {
        progress("pull cold docker-registry pull-through cache (context)");
        for rep in 0..o.reps {
            let px = env.docker_registry(&format!("dr-proxy-{rep}"), Some(dr.registry))?;
            r.proxy_dr
                .add(bytes, pull(env, &px, &[&dr], "cold docker-registry proxy")?);
            env.stop(px)?;
        }
    }

    // 5. Probe: phases of one pull from each kind of server.
    if o.runs("probe") {
        progress("probe (plain HTTP client: manifest, then all blobs at once)");
        r.probes
            .push(probe(env, "docker-registry, warm", &dr, None)?);
        r.probes.push(probe(env, "cairn core, warm", &core, None)?);
        let edge = env.cairn("edge-probe", "edge", Some(core_quic))?;
        let p = probe(env, "cairn edge, cold (parent = core)", &edge, Some(&core));
        env.stop(edge)?;
        r.probes.push(p?);
        if o.runs("proxy") {
            let px = env.docker_registry("dr-proxy-probe", Some(dr.registry))?;
            let p = probe(env, "docker-registry pull-through, cold", &px, None);
            env.stop(px)?;
            r.probes.push(p?);
        }
    }
    env.stop(dr)?;
    env.stop(core)?;
    Ok(r)
}

// ---------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------

fn secs_cell(s: &Series) -> String {
    if !s.ran() {
        return "—".into();
    }
    let reps: Vec<String> = s.secs.iter().map(|x| format!("{x:.2}")).collect();
    format!("**{:.2}** ({})", s.median_secs, reps.join(", "))
}

fn mbps_cell(s: &Series) -> String {
    if !s.ran() {
        return "—".into();
    }
    format!("{:.0}", s.median_mbps)
}

fn cpu_cell(v: &[f64]) -> String {
    if v.is_empty() {
        return "—".into();
    }
    format!("{:.1}", median(v))
}

/// Median server CPU-s, split per server when there are several.
fn server_cpu_cell(x: &Series) -> String {
    let total = cpu_cell(&x.server_cpu_s);
    let n = x.server_cpu_each_s.first().map_or(0, Vec::len);
    if n < 2 {
        return total;
    }
    let parts: Vec<String> = (0..n)
        .map(|i| {
            let v: Vec<f64> = x
                .server_cpu_each_s
                .iter()
                .filter_map(|r| r.get(i).copied())
                .collect();
            cpu_cell(&v)
        })
        .collect();
    format!("{total} ({})", parts.join(" + "))
}

struct Report<'a> {
    opts: &'a Opts,
    tools: &'a Tools,
    image: &'a ImageMeta,
    layout: &'a Path,
    image_reused: bool,
    command: String,
    argv: Vec<String>,
    date: String,
    machine: MachineFacts,
    git: String,
    results: &'a Results,
    ends: &'a [ServerEnd],
    total_secs: f64,
    loadavg_end: String,
}

struct Ratios {
    push: f64,
    push_paired: f64,
    warm: f64,
    warm_paired: f64,
    cold: f64,
    cold_vs_proxy: f64,
    proxy: f64,
    warm_pass: Option<bool>,
    cold_pass: Option<bool>,
}

fn ratios(r: &Results) -> Ratios {
    let warm = time_ratio(&r.warm_cairn, &r.warm_dr);
    let cold = time_ratio(&r.cold_edge, &r.warm_dr);
    Ratios {
        push: time_ratio(&r.push_cairn, &r.push_dr),
        push_paired: paired_ratio(&r.push_cairn, &r.push_dr),
        warm,
        warm_paired: paired_ratio(&r.warm_cairn, &r.warm_dr),
        cold,
        cold_vs_proxy: time_ratio(&r.cold_edge, &r.proxy_dr),
        proxy: time_ratio(&r.proxy_dr, &r.warm_dr),
        warm_pass: warm.is_finite().then_some(warm <= WARM_TARGET),
        cold_pass: cold.is_finite().then_some(cold <= COLD_TARGET),
    }
}

/// A metric of one cold-edge rep, summed over labels; "—" if absent.
fn metric_cell(m: &BTreeMap<String, f64>, key: &str, bytes: bool) -> String {
    match m.get(key) {
        Some(v) if bytes => human_bytes(*v as u64),
        Some(v) => format!("{v:.0}"),
        None => "—".into(),
    }
}

fn render(rp: &Report<'_>) -> String {
    let mut s = String::new();
    let o = rp.opts;
    let r = rp.results;
    let img = rp.image;
    let q = ratios(r);
    let _ = writeln!(
        s,
        "# Cairn registry benchmark — {}{}\n",
        rp.date,
        if o.quick { " (quick)" } else { "" }
    );
    let _ = writeln!(s, "Command: `{}`  ", rp.command);
    let _ = writeln!(s, "Binary argv: `{}`  ", rp.argv.join(" "));
    let _ = writeln!(s, "Total run time: {:.0} s\n", rp.total_secs);

    let _ = writeln!(s, "## Summary\n");
    let _ = writeln!(
        s,
        "Ratios are wall-time ratios Cairn / docker-registry of medians (lower is better).\n"
    );
    let mut t = MdTable::new(&["target", "figure", "value", "result"]);
    let pf = |p: Option<bool>| p.map_or("n/a".to_string(), |p| pass_fail(p).to_string());
    t.row(&[
        format!("pull warm: Cairn core / docker-registry ≤ {WARM_TARGET}"),
        "skopeo copy docker:// → dir:, both holding the image".to_string(),
        ratio_cell(q.warm),
        pf(q.warm_pass),
    ]);
    t.row(&[
        format!("pull cold edge: Cairn edge / docker-registry warm ≤ {COLD_TARGET}"),
        "fresh edge pulling through its parent (the core) over QUIC on loopback".to_string(),
        ratio_cell(q.cold),
        pf(q.cold_pass),
    ]);
    t.row(&[
        "(context)".to_string(),
        "push: Cairn core / docker-registry (fresh servers each rep)".to_string(),
        ratio_cell(q.push),
        String::new(),
    ]);
    t.row(&[
        "(context)".to_string(),
        "push, median of per-rep ratios".to_string(),
        ratio_cell(q.push_paired),
        String::new(),
    ]);
    t.row(&[
        "(context)".to_string(),
        "pull warm, median of per-rep ratios".to_string(),
        ratio_cell(q.warm_paired),
        String::new(),
    ]);
    t.row(&[
        "(context)".to_string(),
        "pull cold: Cairn edge / docker-registry pull-through cache (cold)".to_string(),
        ratio_cell(q.cold_vs_proxy),
        String::new(),
    ]);
    t.row(&[
        "(context)".to_string(),
        "docker-registry pull-through cache (cold) / docker-registry warm".to_string(),
        ratio_cell(q.proxy),
        String::new(),
    ]);
    s.push_str(&t.render());

    let _ = writeln!(
        s,
        "\n## Results (image: {} moved per copy)\n",
        human_bytes(img.moved_bytes())
    );
    let mut t = MdTable::new(&[
        "figure",
        "seconds (median **bold**, then each rep)",
        "MB/s",
        "skopeo CPU-s",
        "server CPU-s",
        "/ docker-registry",
    ]);
    let rows: [(&str, &Series, Option<&Series>); 6] = [
        ("push → docker-registry", &r.push_dr, None),
        ("push → Cairn core", &r.push_cairn, Some(&r.push_dr)),
        ("pull warm ← docker-registry", &r.warm_dr, None),
        (
            "**pull warm ← Cairn core**",
            &r.warm_cairn,
            Some(&r.warm_dr),
        ),
        (
            "**pull cold ← Cairn edge** (server CPU: edge + core)",
            &r.cold_edge,
            Some(&r.warm_dr),
        ),
        (
            "pull cold ← docker-registry pull-through cache (context; server CPU: cache + origin)",
            &r.proxy_dr,
            Some(&r.warm_dr),
        ),
    ];
    for (name, x, base) in rows {
        t.row(&[
            name.to_string(),
            secs_cell(x),
            mbps_cell(x),
            cpu_cell(&x.client_cpu_s),
            server_cpu_cell(x),
            base.map_or(String::new(), |b| ratio_cell(time_ratio(x, b))),
        ]);
    }
    s.push_str(&t.render());
    let _ = writeln!(
        s,
        "\nMB/s = image bytes moved (manifest + config + layers, {} B) / wall time, 10^6 B/s. \
         CPU-s = CPU seconds (user + system), median over reps: skopeo's from the bench's \
         reaped-children counters, the servers' from `/proc/PID/stat` before and after. \
         The machine has {} cores, so skopeo + server CPU-s above about 2 × seconds means \
         the copy was CPU-bound.\n",
        img.moved_bytes(),
        rp.machine.nproc
    );
    let _ = writeln!(
        s,
        "- push: `skopeo --insecure-policy copy --dest-tls-verify=false [--dest-creds cairn:TOKEN] \
         oci:LAYOUT:{LAYOUT_TAG} docker://127.0.0.1:PORT/{REPO}:{TAG}`; a fresh docker-registry \
         and a fresh Cairn core per rep (the core's token is the one it writes to \
         DATA/registry-token on first start). The two take turns going first.\n\
         - pull: `skopeo --insecure-policy copy --src-tls-verify=false \
         docker://127.0.0.1:PORT/{REPO}:{TAG} dir:OUT` into a fresh OUT each rep; warm = from \
         the servers of the last push rep. Every pull is verified afterwards (untimed): each \
         blob's sha256 equals its file name, blobs and sizes are the image's, manifest.json is \
         the pushed manifest.\n\
         - cold edge: a fresh `cairn node --identity CA/edge --parent core@QUIC` (fresh data dir) \
         per rep; its registry misses go to the core over QUIC (mutual TLS) on loopback. The \
         edge is started and answering `/v2/` before the clock starts.\n\
         - docker-registry pull-through cache: a fresh `docker-registry` with \
         `proxy.remoteurl` = the docker-registry holding the image, per rep.\n\
         - Servers: docker-registry with filesystem storage, `log.level: warn`, access log off; \
         Cairn nodes with default settings (store engine auto, log level warn{}). All data \
         dirs on the work disk ({}).",
        if o.node_verbose { ", here -v" } else { "" },
        rp.machine.work_fs
    );

    // Probe
    if !r.probes.is_empty() {
        let _ = writeln!(
            s,
            "\n## Where the time goes (probe, context)\n\n\
             One more pull from each server with a plain HTTP client (reqwest, in the bench): \
             GET the manifest by tag, then GET every blob at once (as skopeo does), each \
             checked against its digest (after the clock stops). Times in seconds from the start \
             of the blob phase: response headers / first byte / last byte. Server CPU-s: during \
             the probe (edge + core for the edge).\n"
        );
        let mut header = vec!["server".to_string(), "manifest".to_string()];
        for (i, b) in img.blobs().enumerate() {
            let label = if i == 0 {
                "config".to_string()
            } else {
                format!("layer {i}")
            };
            header.push(format!("{label} ({})", human_bytes(b.bytes)));
        }
        header.push("all blobs".into());
        header.push("server CPU-s".into());
        let mut t = MdTable::new(&header);
        for p in &r.probes {
            let mut row = vec![p.target.clone(), format!("{:.3}", p.manifest_s)];
            for b in &p.blobs {
                row.push(format!(
                    "{:.2} / {:.2} / {:.2}",
                    b.headers_s, b.first_byte_s, b.done_s
                ));
            }
            row.push(format!("{:.2}", p.blobs_s));
            let cpu: Vec<String> = p.server_cpu_s.iter().map(|c| format!("{c:.1}")).collect();
            row.push(cpu.join(" + "));
            t.row(&row);
        }
        s.push_str(&t.render());
        if let Some(p) = r.probes.iter().find(|p| p.target.contains("edge")) {
            let _ = writeln!(
                s,
                "\nThe probed edge's metrics after its pull (`parent:` = the core's change \
                 during it):\n"
            );
            let mut t = MdTable::new(&["metric", "value"]);
            for k in METRICS {
                if let Some(v) = p.metrics.get(*k) {
                    t.row(&[k.to_string(), format!("{v:.0}")]);
                }
            }
            s.push_str(&t.render());
        }
    }

    if !r.cold_metrics.is_empty() {
        let _ = writeln!(
            s,
            "\n### Cold edge pulls: edge and core metrics per rep\n\n\
             Counters summed over labels; `parent:` = the core's change during the pull. The \
             image's blobs are {} ({} B).\n",
            human_bytes(img.moved_bytes() - img.manifest.bytes),
            img.moved_bytes() - img.manifest.bytes
        );
        let mut header = vec!["metric".to_string()];
        header.extend((1..=r.cold_metrics.len()).map(|i| format!("rep {i}")));
        let mut t = MdTable::new(&header);
        for k in METRICS {
            if !r.cold_metrics.iter().any(|m| m.contains_key(*k)) {
                continue;
            }
            let is_bytes = k.contains("bytes");
            let mut row = vec![k.to_string()];
            row.extend(r.cold_metrics.iter().map(|m| metric_cell(m, k, is_bytes)));
            t.row(&row);
        }
        s.push_str(&t.render());
    }

    // Image
    let _ = writeln!(s, "\n## Image\n");
    let mut t = MdTable::new(&["blob", "media type", "size", "files", "file bytes"]);
    t.row(&[
        format!("manifest `{}`", img.manifest.digest),
        img.manifest.media_type.clone(),
        format!("{} B", img.manifest.bytes),
        String::new(),
        String::new(),
    ]);
    t.row(&[
        format!("config `{}`", img.config.digest),
        img.config.media_type.clone(),
        format!("{} B", img.config.bytes),
        String::new(),
        String::new(),
    ]);
    for (i, l) in img.layers.iter().enumerate() {
        t.row(&[
            format!("layer {} `{}`", i + 1, l.blob.digest),
            l.blob.media_type.clone(),
            human_bytes(l.blob.bytes),
            l.files.to_string(),
            human_bytes(l.file_bytes),
        ]);
    }
    t.row(&[
        "**total**".to_string(),
        String::new(),
        human_bytes(img.moved_bytes()),
        img.files.to_string(),
        human_bytes(img.file_bytes),
    ]);
    s.push_str(&t.render());
    let _ = writeln!(
        s,
        "\nReal files from {} (one from each in turn, each in path order; files ≤ {}; hard \
         links once), copied into an umoci bundle and \
         packed one layer at a time (`umoci repack --refresh-bundle`, gzip), then \
         `umoci config --config.cmd sh` and `umoci gc`. The layout is cached in `{}` \
         ({}; built in {:.0} s on {}); page cache is warmed by reading it once before the \
         first push.",
        img.sources.join(", "),
        human_bytes(MAX_FILE),
        rp.layout.display(),
        if rp.image_reused {
            "reused from an earlier run"
        } else {
            "built by this run"
        },
        img.build_secs,
        img.built_on
    );

    // Machine
    let m = &rp.machine;
    let _ = writeln!(s, "\n## Machine\n");
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
        .row(&[
            "load average at start / end",
            &format!("{} / {}", m.loadavg, rp.loadavg_end),
        ])
        .row(&["code (git)", &rp.git]);
    for (k, v) in &rp.tools.versions {
        t.row(&[k.as_str(), v.as_str()]);
    }
    t.row(&["cairn binary", &rp.tools.cairn.display().to_string()]);
    s.push_str(&t.render());
    if let Some(w) = &rp.tools.cairn_stale {
        let _ = writeln!(s, "\n**Warning:** {w}.");
    }

    // Server ends
    let _ = writeln!(s, "\n## Servers\n");
    let mut t = MdTable::new(&[
        "server",
        "stop (SIGTERM → exit)",
        "exit",
        "warn lines",
        "error lines",
        "expected (404s, start-up notes)",
    ]);
    for e in rp.ends {
        t.row(&[
            e.name.clone(),
            format!(
                "{:.2} s{}",
                e.stop_secs,
                if e.killed { " (killed)" } else { "" }
            ),
            e.exit.clone(),
            e.warn_lines.to_string(),
            e.error_lines.to_string(),
            e.expected_lines.to_string(),
        ]);
    }
    s.push_str(&t.render());
    let samples: BTreeSet<&String> = rp.ends.iter().flat_map(|e| &e.samples).collect();
    if !samples.is_empty() {
        let _ = writeln!(
            s,
            "\nWarning/error lines logged (up to 5 per server, distinct):\n"
        );
        s.push_str("```text\n");
        for l in samples.iter().take(20) {
            let _ = writeln!(s, "{l}");
        }
        s.push_str("```\n");
    }
    s
}

/// Metrics shown for cold edge pulls (summed over labels).
const METRICS: &[&str] = &[
    "cairn_registry_pulled_bytes_total",
    "cairn_transport_peer_bytes_in_total",
    "cairn_transport_peer_chunks_fetched_total",
    "cairn_transport_coalesced_total",
    "cairn_transport_peer_errors_total",
    "cairn_transport_peer_verify_failures_total",
    "cairn_store_chunks_written_total",
    "cairn_store_chunks_deduplicated_total",
    "cairn_store_chunks_read_total",
    "cairn_store_ingested_bytes_total",
    "parent:cairn_transport_chunks_served_total",
    "parent:cairn_transport_peer_bytes_out_total",
    "parent:cairn_transport_requests_served_total",
    "parent:cairn_store_chunks_read_total",
];

fn main() -> Result<()> {
    let opts = parse_args()?;
    let started = Instant::now();
    let command = format!(
        "cargo bench -p cairn-bench --bench registry{}",
        if opts.user_args.is_empty() {
            String::new()
        } else {
            format!(" -- {}", opts.user_args.join(" "))
        }
    );
    let tools = Tools::find(&opts)?;
    fs::create_dir_all(&opts.tmp_root)?;
    let (layout, image, image_reused) = image(&opts, &tools)?;
    progress(format!(
        "image: {} files ({}), {} layers, {} of blobs",
        image.files,
        human_bytes(image.file_bytes),
        image.layers.len(),
        human_bytes(image.moved_bytes())
    ));
    // The layout is read from the page cache by every push.
    for b in std::iter::once(&image.manifest).chain(image.blobs()) {
        cairn_bench::read_fully(&blob_path(&layout, &b.digest))?;
    }

    let work = tempfile::Builder::new()
        .prefix("cairn-bench-registry-")
        .tempdir_in(&opts.tmp_root)
        .with_context(|| format!("create a temp dir in {}", opts.tmp_root.display()))?;
    progress(format!("work dir {}", work.path().display()));
    let machine = MachineFacts::collect(work.path());
    let ca = work.path().join("ca");
    run_checked(
        Command::new(&tools.cairn)
            .arg("cluster")
            .arg("init")
            .arg(&ca),
        "cairn cluster init",
    )?;
    for n in ["core", "edge"] {
        run_checked(
            Command::new(&tools.cairn)
                .args(["cluster", "add-node"])
                .arg(&ca)
                .arg(n),
            "cairn cluster add-node",
        )?;
    }
    let env = Env {
        opts: &opts,
        tools: &tools,
        image: &image,
        layout: layout.clone(),
        work: work.path().to_path_buf(),
        ca,
        rt: tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
        http: reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(120 + image.moved_bytes() / 5_000_000))
            .build()?,
        seq: Cell::new(0),
        ends: RefCell::new(Vec::new()),
    };
    let results = run(&env)?;
    let ends = env.ends.take();
    drop(env);
    work.close().context("remove the work dir")?;

    let report = Report {
        opts: &opts,
        tools: &tools,
        image: &image,
        layout: &layout,
        image_reused,
        command,
        argv: std::env::args().collect(),
        date: today(),
        machine,
        git: git_facts(&["node", "cli", "transport", "chunkstore"]),
        results: &results,
        ends: &ends,
        total_secs: started.elapsed().as_secs_f64(),
        loadavg_end: cairn_bench::loadavg(),
    };
    let md = render(&report);
    let q = ratios(&results);
    let json = json!({
        "date": report.date,
        "command": report.command,
        "argv": report.argv,
        "quick": opts.quick,
        "params": {
            "reps": opts.reps,
            "image_file_bytes_target": opts.image_bytes,
            "layers": opts.layers,
            "work_root": opts.tmp_root,
            "only": opts.only,
            "node_verbose": opts.node_verbose,
            "repo": REPO,
            "tag": TAG,
        },
        "tools": tools,
        "machine": report.machine,
        "git": report.git,
        "image": {
            "layout": layout,
            "reused": image_reused,
            "moved_bytes": image.moved_bytes(),
            "meta": image,
        },
        "targets": { "pull_warm_max": WARM_TARGET, "pull_cold_edge_max": COLD_TARGET },
        "ratios": {
            "push": q.push,
            "push_paired": q.push_paired,
            "pull_warm": q.warm,
            "pull_warm_paired": q.warm_paired,
            "pull_cold_edge": q.cold,
            "pull_cold_edge_vs_proxy": q.cold_vs_proxy,
            "proxy_vs_warm": q.proxy,
        },
        "pass": { "pull_warm": q.warm_pass, "pull_cold_edge": q.cold_pass },
        "results": results,
        "servers": ends,
        "total_secs": report.total_secs,
        "loadavg_end": report.loadavg_end,
    });

    print!("{md}");
    if opts.write {
        let mut stem = format!(
            "registry-{}{}",
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
