//! Scenario 1 of the WAN benchmark: **cold image pull at an edge**.
//!
//! Two sites, `core` (10.99.0.1) and `edge` (10.99.0.2), joined by one
//! emulated link. The image (real files, built once with umoci and cached)
//! is pushed inside the core namespace (loopback, never across the link) to
//! a Cairn core node and to a docker-registry. Then, per repetition and in
//! this order, `skopeo copy docker://… dir:OUT` runs in the edge namespace
//! against:
//!
//! * **cairn**: a fresh `cairn node` edge (fresh data dir) whose parent is
//!   the Cairn core's QUIC address across the link (cold edge);
//! * **direct**: the docker-registry at the core, across the link;
//! * **proxy**: a fresh docker-registry pull-through cache at the edge
//!   (`proxy.remoteurl` = the core's docker-registry; cold cache).
//!
//! Every pull is timed (wall clock of the skopeo process, including its
//! start-up), then verified untimed (every blob hashes to its name, the
//! blob set is the image's). The bytes crossing the link core→edge during
//! the pull come from the link model's counters.
//!
//! Everything runs as processes (`cairn`, `docker-registry`, `skopeo`,
//! `umoci`, `sha256sum`); this crate links no Cairn crate.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::check::short_spec;
use crate::model::LinkSpec;
use crate::wan::{ChildGuard, Wan};

/// Repository and tag the image is pushed as.
pub const REPO: &str = "bench/img";
/// Tag in the registries.
pub const TAG: &str = "v1";
/// Tag inside the OCI layout.
pub(crate) const LAYOUT_TAG: &str = "img";
const MIB: u64 = 1 << 20;
/// Where the image's files come from (each walked in path order; one file
/// from each source in turn).
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
/// Bumped when the way the image is built changes (part of the cache key).
/// 2: every file and directory's times pinned to [`FIXED_TIME`] before each
/// repack, so two builds of the same files give the same layer tars.
const IMAGE_RECIPE: u32 = 2;
/// The time every file and directory of the image gets (2023-11-14).
const FIXED_TIME: u64 = 1_700_000_000;
/// Ports, the same in every site.
const CAIRN_REGISTRY_PORT: u16 = 5000;
const DOCKER_REGISTRY_PORT: u16 = 5001;
const CAIRN_QUIC_PORT: u16 = 7443;

/// The contestants, in the order they run within a repetition by default.
/// `cairn-bbr` (both Cairn nodes with `--congestion bbr`) can be added.
pub const CONTESTANTS: &[&str] = &["cairn", "direct", "proxy"];
/// Every contestant there is, with what it is.
pub const ALL_CONTESTANTS: &[(&str, &str)] = &[
    (
        "cairn",
        "Cairn edge (cold) ← Cairn core over QUIC, node default congestion control (CUBIC)",
    ),
    (
        "cairn-bbr",
        "the same with `--congestion bbr` on both Cairn nodes",
    ),
    ("direct", "docker-registry at the core, across the link"),
    (
        "proxy",
        "docker-registry pull-through cache at the edge (cold)",
    ),
];

/// What to run.
#[derive(Debug, Clone, Serialize)]
pub struct ColdPullConfig {
    /// The link core↔edge (both directions).
    pub spec: LinkSpec,
    /// Repetitions per contestant.
    pub reps: usize,
    /// Bytes of real files in the image (before gzip).
    pub image_file_bytes: u64,
    /// Layers.
    pub layers: usize,
    /// The `cairn` binary.
    pub cairn: PathBuf,
    /// Contestants, in run order within a repetition (see
    /// [`ALL_CONTESTANTS`]).
    pub contestants: Vec<String>,
    /// Scratch root (image cache and work dirs).
    pub tmp: PathBuf,
    /// Bound on one pull.
    pub pull_timeout: Duration,
    /// Seed of the link models.
    pub seed: u64,
}

/// The programs the scenario drives; a clear error if one is missing.
#[derive(Debug, Clone, Serialize)]
pub struct Tools {
    /// Versions, by program.
    pub versions: BTreeMap<String, String>,
}

pub(crate) fn in_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
}

pub(crate) fn first_line(cmd: &mut Command) -> String {
    cmd.stdin(Stdio::null())
        .output()
        .map(|o| {
            let s = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&s)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned()
        })
        .unwrap_or_default()
}

impl Tools {
    /// Checks that every program is there.
    pub fn find(cairn: &Path) -> Result<Self> {
        let apt = "apt-get install -y --no-install-recommends skopeo umoci docker-registry";
        for t in [
            "skopeo",
            "umoci",
            "docker-registry",
            "sha256sum",
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
        versions.insert(
            "skopeo".into(),
            first_line(Command::new("skopeo").arg("--version")),
        );
        versions.insert(
            "umoci".into(),
            first_line(Command::new("umoci").arg("--version")),
        );
        versions.insert(
            "docker-registry".into(),
            first_line(Command::new("docker-registry").arg("--version")),
        );
        versions.insert(
            "cairn".into(),
            first_line(Command::new(cairn).arg("--version")),
        );
        Ok(Self { versions })
    }
}

pub(crate) fn run_checked(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("start {what}"))?;
    ensure!(
        out.status.success(),
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

// ---------------------------------------------------------------------------
// The image
// ---------------------------------------------------------------------------

/// One blob of the image.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Blob {
    /// `sha256:…`.
    pub digest: String,
    /// Size in bytes.
    pub bytes: u64,
}

/// The image's facts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageMeta {
    recipe: u32,
    /// The manifest blob.
    pub manifest: Blob,
    /// The config blob.
    pub config: Blob,
    /// Layer blobs (gzip, as umoci writes them).
    pub layers: Vec<Blob>,
    /// Files in the image.
    pub files: usize,
    /// Their bytes (uncompressed).
    pub file_bytes: u64,
    /// Where they came from.
    pub sources: Vec<String>,
    /// How this build differs from the plain one (v1, gzip).
    #[serde(default)]
    pub variant: ImageVariant,
    /// Files changed from v1 (0 for v1).
    #[serde(default)]
    pub changed_files: usize,
    /// Bytes of those files rewritten or appended.
    #[serde(default)]
    pub changed_bytes: u64,
}

/// How an image build differs from the plain one (scenario 1's v1, gzip
/// layers). Part of the cache key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageVariant {
    /// 0: the files as they are (v1). `n > 0`: v2, where every `n`-th file
    /// by sorted path (indices `n-1`, `2n-1`, …) is changed: up to 4 KiB
    /// in its middle rewritten and 256 bytes appended, deterministically
    /// (splitmix64 seeded with the file's index).
    pub change_every: usize,
    /// Layers as uncompressed tar (the gzip build through `skopeo copy
    /// --dest-decompress` into `dir:` and back into `oci:` with
    /// `--dest-oci-accept-uncompressed-layers`) instead of gzip. Such a
    /// layout must be pushed with `push_raw`: skopeo would gzip the layers.
    pub uncompressed: bool,
}

impl ImageVariant {
    /// `v1` or `v2`.
    pub fn version(&self) -> &'static str {
        if self.change_every == 0 {
            "v1"
        } else {
            "v2"
        }
    }
    fn cache_suffix(&self) -> String {
        let mut s = String::new();
        if self.change_every > 0 {
            let _ = write!(s, "-v2every{}", self.change_every);
        }
        if self.uncompressed {
            s.push_str("-tar");
        }
        s
    }
}

/// Bytes appended to a changed file of v2.
const APPENDED: usize = 256;
/// At most this many bytes in the middle of a changed file are rewritten.
const REWRITTEN: u64 = 4096;

/// splitmix64, for the v2 changes.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The v2 change of a file (see [`ImageVariant::change_every`]); returns
/// the bytes rewritten and appended.
fn change_file(path: &Path, index: usize) -> Result<u64> {
    use std::io::{Seek as _, SeekFrom, Write as _};
    let len = fs::metadata(path)?.len();
    let mut st = index as u64 ^ 0x5EED_0002;
    let mut bytes = |n: usize| -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&splitmix(&mut st).to_le_bytes());
        }
        v.truncate(n);
        v
    };
    let n = REWRITTEN.min(len);
    let mut f = fs::OpenOptions::new().write(true).open(path)?;
    if n > 0 {
        f.seek(SeekFrom::Start((len - n) / 2))?;
        f.write_all(&bytes(n as usize))?;
    }
    f.seek(SeekFrom::End(0))?;
    f.write_all(&bytes(APPENDED))?;
    Ok(n + APPENDED as u64)
}

impl ImageMeta {
    pub(crate) fn blobs(&self) -> impl Iterator<Item = &Blob> {
        std::iter::once(&self.config).chain(&self.layers)
    }
    /// Manifest + config + layers: what a pull moves.
    pub fn bytes(&self) -> u64 {
        self.manifest.bytes + self.blobs().map(|b| b.bytes).sum::<u64>()
    }
}

pub(crate) fn hex_of(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

pub(crate) fn blob_path(layout: &Path, digest: &str) -> PathBuf {
    layout.join("blobs/sha256").join(hex_of(digest))
}

fn regular_files(root: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = fs::read_dir(&dir) else { continue };
        let mut entries: Vec<_> = rd.filter_map(Result::ok).map(|e| e.path()).collect();
        entries.sort();
        // Reverse so that the stack pops in path order.
        for p in entries.into_iter().rev() {
            let Ok(m) = fs::symlink_metadata(&p) else {
                continue;
            };
            if m.is_dir() {
                stack.push(p);
            } else if m.is_file() {
                out.push((p, m.len()));
            }
        }
    }
    out.sort();
    out
}

pub(crate) fn select_files(target: u64) -> (Vec<(PathBuf, u64)>, Vec<String>) {
    use std::os::unix::fs::MetadataExt as _;
    let mut lists: Vec<(&str, std::vec::IntoIter<(PathBuf, u64)>)> = SOURCES
        .iter()
        .filter(|s| Path::new(s).is_dir())
        .map(|s| (*s, regular_files(Path::new(s)).into_iter()))
        .collect();
    let mut inodes = std::collections::HashSet::new();
    let mut used = std::collections::BTreeSet::new();
    let (mut files, mut total) = (Vec::new(), 0u64);
    while total < target && !lists.is_empty() {
        lists.retain_mut(|(src, it)| {
            if total >= target {
                return true;
            }
            for (p, len) in it.by_ref() {
                let Ok(meta) = fs::metadata(&p) else { continue };
                if len > MAX_FILE.min((target / 8).max(64 * 1024))
                    || !inodes.insert((meta.dev(), meta.ino()))
                    || fs::File::open(&p).is_err()
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

fn parse_blob(v: &serde_json::Value) -> Result<Blob> {
    Ok(Blob {
        digest: v["digest"]
            .as_str()
            .context("descriptor without digest")?
            .to_owned(),
        bytes: v["size"].as_u64().context("descriptor without size")?,
    })
}

fn load_cached(root: &Path) -> Option<ImageMeta> {
    let meta: ImageMeta = serde_json::from_slice(&fs::read(root.join("meta.json")).ok()?).ok()?;
    if meta.recipe != IMAGE_RECIPE {
        return None;
    }
    let layout = root.join("layout");
    let ok = std::iter::once(&meta.manifest)
        .chain(meta.blobs())
        .all(|b| {
            fs::metadata(blob_path(&layout, &b.digest))
                .map(|m| m.len())
                .ok()
                == Some(b.bytes)
        });
    ok.then_some(meta)
}

/// The image in `tmp/cairn-wan-image/<N>mib-<L>layers/layout` (tag `img`),
/// built with umoci on first use: `file_bytes` of real files from
/// [`SOURCES`], split over `layers` layers of roughly equal size, every
/// time pinned, then cached. Returns the layout and its facts.
pub fn image(tmp: &Path, file_bytes: u64, layers: usize) -> Result<(PathBuf, ImageMeta)> {
    image_variant(tmp, file_bytes, layers, ImageVariant::default())
}

/// [`image`], built as `variant` (cached under a name with the variant's
/// suffix). The same files in the same layers, so v1 and v2 of one size
/// differ only in the changed files (and in the config's times).
pub fn image_variant(
    tmp: &Path,
    file_bytes: u64,
    layers: usize,
    variant: ImageVariant,
) -> Result<(PathBuf, ImageMeta)> {
    let root = tmp.join("cairn-wan-image").join(format!(
        "{}mib-{layers}layers{}",
        file_bytes / MIB,
        variant.cache_suffix()
    ));
    if let Some(m) = load_cached(&root).filter(|m| m.variant == variant) {
        eprintln!("reusing the cached image in {}", root.display());
        return Ok((root.join("layout"), m));
    }
    let (files, sources) = select_files(file_bytes);
    // Which files v2 changes: every n-th by sorted path.
    let changed: BTreeMap<&Path, usize> = if variant.change_every > 0 {
        let mut sorted: Vec<&Path> = files.iter().map(|f| f.0.as_path()).collect();
        sorted.sort();
        sorted
            .into_iter()
            .enumerate()
            .filter(|(i, _)| i % variant.change_every == variant.change_every - 1)
            .map(|(i, p)| (p, i))
            .collect()
    } else {
        BTreeMap::new()
    };
    let mut changed_bytes = 0u64;
    ensure!(
        files.len() >= layers,
        "too few readable files under {SOURCES:?}"
    );
    let total: u64 = files.iter().map(|f| f.1).sum();
    eprintln!(
        "building the image ({}{}): {} files, {:.1} MiB from {} into {layers} layers (umoci; cached)",
        variant.version(),
        if variant.uncompressed { ", uncompressed" } else { ", gzip" },
        files.len(),
        total as f64 / MIB as f64,
        sources.join(", ")
    );
    let build = root.with_extension("building");
    let _ = fs::remove_dir_all(&build);
    fs::create_dir_all(&build)?;
    let layout = build.join("layout");
    let bundle = build.join("bundle");
    let (layout_s, bundle_s) = (layout.display().to_string(), bundle.display().to_string());
    let image = format!("{layout_s}:{LAYOUT_TAG}");
    let umoci = |args: &[&str]| run_checked(Command::new("umoci").args(args), "umoci").map(|_| ());
    umoci(&["init", "--layout", &layout_s])?;
    umoci(&["new", "--image", &image])?;
    umoci(&["unpack", "--image", &image, &bundle_s])?;
    let rootfs = bundle.join("rootfs");
    let per_layer = total.div_ceil(layers as u64);
    let mut groups: Vec<Vec<&(PathBuf, u64)>> = vec![Vec::new(); layers];
    let mut cum = 0u64;
    for f in &files {
        let k = usize::try_from(cum / per_layer)
            .unwrap_or(0)
            .min(layers - 1);
        groups[k].push(f);
        cum += f.1;
    }
    for (i, g) in groups.iter().enumerate() {
        for (p, _) in g {
            let dest = rootfs.join(p.strip_prefix("/").unwrap_or(p));
            if let Some(parent) = dest.parent() {
                fs::create_dir_all(parent)?;
            }
            fs::copy(p, &dest).with_context(|| format!("copy {}", p.display()))?;
            if let Some(&index) = changed.get(p.as_path()) {
                changed_bytes += change_file(&dest, index)?;
            }
        }
        // Pin every time, so the layer tars depend on the files only.
        run_checked(
            Command::new("find")
                .arg(&rootfs)
                .args(["-exec", "touch", "-h", "-d"])
                .arg(format!("@{FIXED_TIME}"))
                .args(["{}", "+"]),
            "touch (pin times)",
        )?;
        let by = format!("cairn-wan layer {}", i + 1);
        umoci(&[
            "repack",
            "--refresh-bundle",
            "--history.created_by",
            &by,
            "--image",
            &image,
            &bundle_s,
        ])?;
    }
    umoci(&["config", "--image", &image, "--config.cmd", "sh"])?;
    umoci(&["gc", "--layout", &layout_s])?;
    fs::remove_dir_all(&bundle)?;
    let layout = if variant.uncompressed {
        // skopeo decompresses only into `dir:`, and compresses uncompressed
        // layers on the way into `oci:` unless told not to.
        let dir = build.join("dir-tar");
        let tar = build.join("layout-tar");
        run_checked(
            Command::new("skopeo")
                .args(["--insecure-policy", "copy", "--dest-decompress"])
                .arg(format!("oci:{layout_s}:{LAYOUT_TAG}"))
                .arg(format!("dir:{}", dir.display())),
            "skopeo copy --dest-decompress",
        )?;
        run_checked(
            Command::new("skopeo")
                .args([
                    "--insecure-policy",
                    "copy",
                    "--dest-oci-accept-uncompressed-layers",
                ])
                .arg(format!("dir:{}", dir.display()))
                .arg(format!("oci:{}:{LAYOUT_TAG}", tar.display())),
            "skopeo copy --dest-oci-accept-uncompressed-layers",
        )?;
        fs::remove_dir_all(&dir)?;
        fs::remove_dir_all(&layout)?;
        fs::rename(&tar, &layout)?;
        layout
    } else {
        layout
    };
    let index: serde_json::Value = serde_json::from_slice(&fs::read(layout.join("index.json"))?)?;
    let desc = index["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == LAYOUT_TAG)
        .context("index.json has no manifest tagged img")?;
    let manifest = parse_blob(desc)?;
    let m: serde_json::Value =
        serde_json::from_slice(&fs::read(blob_path(&layout, &manifest.digest))?)?;
    let gzip = m["layers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|l| l["mediaType"].as_str().is_some_and(|t| t.ends_with("gzip")))
        .count();
    ensure!(
        if variant.uncompressed {
            gzip == 0
        } else {
            gzip == layers
        },
        "the built image has {gzip} gzip layers of {layers} (uncompressed: {})",
        variant.uncompressed
    );
    let meta = ImageMeta {
        recipe: IMAGE_RECIPE,
        manifest,
        config: parse_blob(&m["config"])?,
        layers: m["layers"]
            .as_array()
            .context("manifest without layers")?
            .iter()
            .map(parse_blob)
            .collect::<Result<_>>()?,
        files: files.len(),
        file_bytes: total,
        sources,
        variant,
        changed_files: changed.len(),
        changed_bytes,
    };
    ensure!(
        meta.layers.len() == layers,
        "umoci made {} layers, expected {layers}",
        meta.layers.len()
    );
    fs::write(build.join("meta.json"), serde_json::to_vec_pretty(&meta)?)?;
    let _ = fs::remove_dir_all(&root);
    fs::rename(&build, &root)?;
    Ok((root.join("layout"), meta))
}

/// Checks a `dir:` pull: every blob hashes to its name, the set is the
/// image's, the manifest is the pushed one.
fn verify_pulled(dir: &Path, img: &ImageMeta) -> Result<()> {
    let mut want: BTreeMap<String, u64> = img
        .blobs()
        .map(|b| (hex_of(&b.digest).to_owned(), b.bytes))
        .collect();
    let mut paths = Vec::new();
    for e in fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name != "version" {
            paths.push((name, e.path()));
        }
    }
    let out = run_checked(
        Command::new("sha256sum").args(paths.iter().map(|p| &p.1)),
        "sha256sum",
    )?;
    let sums: BTreeMap<String, String> = out
        .lines()
        .filter_map(|l| {
            let (sum, path) = l.split_once("  ")?;
            Some((
                Path::new(path).file_name()?.to_string_lossy().into_owned(),
                sum.to_owned(),
            ))
        })
        .collect();
    let mut manifest = false;
    for (name, path) in &paths {
        let sum = sums
            .get(name)
            .with_context(|| format!("no sum for {name}"))?;
        if name == "manifest.json" {
            ensure!(
                sum == hex_of(&img.manifest.digest),
                "WRONG BYTES: the pulled manifest is sha256:{sum}, not {}",
                img.manifest.digest
            );
            manifest = true;
            continue;
        }
        ensure!(
            sum == name,
            "WRONG BYTES: blob {name} hashes to sha256:{sum}"
        );
        let len = fs::metadata(path)?.len();
        match want.remove(name) {
            Some(n) => ensure!(n == len, "blob {name} is {len} bytes, not {n}"),
            None => bail!("unexpected blob {name}"),
        }
    }
    ensure!(manifest, "no manifest.json in {}", dir.display());
    ensure!(
        want.is_empty(),
        "blobs missing: {:?}",
        want.keys().collect::<Vec<_>>()
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Servers in the sites
// ---------------------------------------------------------------------------

/// A server in a site: killed on drop (the WAN also kills leftovers).
#[derive(Debug)]
pub(crate) struct Server {
    pub(crate) name: String,
    _guard: ChildGuard,
    log: PathBuf,
    dir: PathBuf,
    /// `HOST:PORT` of its registry.
    pub(crate) registry: String,
    /// The push token (Cairn).
    pub(crate) token: Option<String>,
}

pub(crate) fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

pub(crate) fn wait_listening(
    wan: &Wan,
    site: &str,
    port: u16,
    log: &Path,
    what: &str,
) -> Result<()> {
    let t = Instant::now();
    loop {
        let out = wan.run_in(site, "ss", ["-Htln", &format!("sport = :{port}")])?;
        if !out.stdout.is_empty() {
            return Ok(());
        }
        ensure!(
            t.elapsed() < Duration::from_secs(30),
            "{what} does not listen on :{port} after 30 s; log:\n{}",
            tail(log, 30)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Wait (up to 30 s) for a `cairn node` logging to `log` to print its
/// start line.
pub(crate) fn wait_node_started(site: &str, log: &Path) -> Result<()> {
    let t = Instant::now();
    loop {
        let text = fs::read_to_string(log).unwrap_or_default();
        if text.lines().any(|l| l.starts_with("cairn node ")) {
            return Ok(());
        }
        ensure!(
            t.elapsed() < Duration::from_secs(30),
            "cairn node in {site} printed no start line in 30 s; log:\n{}",
            tail(log, 30)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub(crate) fn spawn_logged(wan: &Wan, mut cmd: Command, log: &Path) -> Result<ChildGuard> {
    let f = fs::File::create(log)?;
    cmd.stdout(f.try_clone()?).stderr(f);
    Ok(wan.spawn(cmd)?)
}

pub(crate) fn docker_registry(
    wan: &Wan,
    site: &str,
    dir: &Path,
    proxy: Option<&str>,
) -> Result<Server> {
    fs::create_dir_all(dir.join("data"))?;
    let addr = format!("{}:{DOCKER_REGISTRY_PORT}", wan.addr(site)?);
    let mut cfg = format!(
        "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n\
         storage:\n  filesystem:\n    rootdirectory: \"{}\"\n  delete:\n    enabled: true\n\
         http:\n  addr: {addr}\n",
        dir.join("data").display()
    );
    if let Some(p) = proxy {
        let _ = writeln!(cfg, "proxy:\n  remoteurl: http://{p}");
    }
    let config = dir.join("config.yml");
    fs::write(&config, cfg)?;
    let log = dir.join("log");
    let mut cmd = wan.command(site, "docker-registry")?;
    cmd.arg("serve").arg(&config);
    let guard = spawn_logged(wan, cmd, &log)?;
    wait_listening(wan, site, DOCKER_REGISTRY_PORT, &log, "docker-registry")?;
    Ok(Server {
        name: format!("docker-registry@{site}"),
        _guard: guard,
        log,
        dir: dir.to_path_buf(),
        registry: addr,
        token: None,
    })
}

pub(crate) fn cairn_node(
    wan: &Wan,
    cairn: &Path,
    site: &str,
    ca: &Path,
    dir: &Path,
    parent: Option<&str>,
    bbr: bool,
) -> Result<Server> {
    // The BBR core listens on the next ports, next to the default one.
    let off = u16::from(bbr && parent.is_none());
    fs::create_dir_all(dir)?;
    let ip = wan.addr(site)?;
    let data = dir.join("data");
    let log = dir.join("log");
    let mut cmd = wan.command(site, cairn)?;
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
        .arg(&data)
        .arg("--identity")
        .arg(ca.join(site))
        .args(["--site", site])
        .args([
            "--registry-listen",
            &format!("{ip}:{}", CAIRN_REGISTRY_PORT + 2 * off),
        ])
        .args(["--api-listen", &format!("127.0.0.1:{}", 7480 + off)])
        .args(["--quic-listen", &format!("{ip}:{}", CAIRN_QUIC_PORT + off)])
        .args(["--nbd-listen", &format!("127.0.0.1:{}", 10809 + off)]);
    if bbr {
        cmd.args(["--congestion", "bbr"]);
    }
    if let Some(p) = parent {
        cmd.arg("--parent").arg(p);
    }
    let guard = spawn_logged(wan, cmd, &log)?;
    wait_node_started(site, &log)?;
    wait_listening(wan, site, CAIRN_REGISTRY_PORT + 2 * off, &log, "cairn node")?;
    let token = fs::read_to_string(data.join("registry-token"))
        .ok()
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty());
    Ok(Server {
        name: format!("cairn@{site}"),
        _guard: guard,
        log,
        dir: dir.to_path_buf(),
        registry: format!("{ip}:{}", CAIRN_REGISTRY_PORT + 2 * off),
        token,
    })
}

impl Server {
    fn image_ref(&self) -> String {
        self.image_ref_tag(TAG)
    }
    /// `docker://HOST:PORT/bench/img:TAG`.
    pub(crate) fn image_ref_tag(&self, tag: &str) -> String {
        format!("docker://{}/{REPO}:{tag}", self.registry)
    }
    /// Warning/error lines in the log (a sample).
    pub(crate) fn log_problems(&self) -> Vec<String> {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                (l.contains(" WARN ")
                    || l.contains(" ERROR ")
                    || l.contains("level=error")
                    || l.contains("panicked"))
                    && !l.contains("blob unknown")
                    && !l.contains("manifest unknown")
            })
            .take(5)
            .map(|l| l.chars().take(300).collect())
            .collect()
    }
}

// ---------------------------------------------------------------------------
// Measurements
// ---------------------------------------------------------------------------

/// One timed skopeo run.
#[derive(Debug, Clone, Serialize)]
pub struct Pull {
    /// Contestant.
    pub who: String,
    /// Repetition (0-based).
    pub rep: usize,
    /// Wall seconds of `skopeo copy` (when timed out: the timeout, a lower
    /// bound).
    pub secs: f64,
    /// Killed at the timeout (not verified; `secs` is a lower bound).
    pub timed_out: bool,
    /// IP bytes the link delivered core→edge during the pull.
    pub wan_bytes_core_to_edge: u64,
    /// IP bytes edge→core.
    pub wan_bytes_edge_to_core: u64,
    /// Packets the link dropped core→edge (random loss + queue).
    pub dropped_core_to_edge: u64,
    /// Of which by tail drop at the bottleneck queue (the rest: random
    /// loss).
    pub queue_drops_core_to_edge: u64,
    /// Image bytes × 8 / secs / link rate.
    pub utilisation: f64,
    /// Log lines at warning level or worse from the servers involved.
    pub server_log_problems: Vec<String>,
}

/// min / median / max.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Stats {
    /// Smallest.
    pub min: f64,
    /// Median.
    pub median: f64,
    /// Largest.
    pub max: f64,
}

impl Stats {
    /// Of a non-empty slice (NaN otherwise).
    pub fn of(v: &[f64]) -> Self {
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        if s.is_empty() {
            return Self {
                min: f64::NAN,
                median: f64::NAN,
                max: f64::NAN,
            };
        }
        let n = s.len();
        let median = if n % 2 == 1 {
            s[n / 2]
        } else {
            (s[n / 2 - 1] + s[n / 2]) / 2.0
        };
        Self {
            min: s[0],
            median,
            max: s[n - 1],
        }
    }
}

/// The whole result.
#[derive(Debug, Clone, Serialize)]
pub struct ColdPullReport {
    /// What ran.
    pub config: ColdPullConfig,
    /// Tool versions.
    pub tools: Tools,
    /// The image.
    pub image: ImageMeta,
    /// Push times inside the core namespace (context): cairn, docker-registry.
    pub push_secs: BTreeMap<String, f64>,
    /// Every pull.
    pub pulls: Vec<Pull>,
}

impl ColdPullReport {
    /// Seconds of a contestant's pulls.
    pub fn secs(&self, who: &str) -> Vec<f64> {
        self.pulls
            .iter()
            .filter(|p| p.who == who)
            .map(|p| p.secs)
            .collect()
    }
    /// Median of `a` over median of `b`.
    pub fn ratio(&self, a: &str, b: &str) -> f64 {
        Stats::of(&self.secs(a)).median / Stats::of(&self.secs(b)).median
    }
    /// Median utilisation of a contestant.
    pub fn utilisation(&self, who: &str) -> Stats {
        let v: Vec<f64> = self
            .pulls
            .iter()
            .filter(|p| p.who == who)
            .map(|p| p.utilisation)
            .collect();
        Stats::of(&v)
    }
    /// Whether the target holds: cairn ≤ 0.8 × direct at ≥ 85%
    /// utilisation (medians).
    pub fn target_met(&self) -> bool {
        self.ratio("cairn", "direct") <= 0.8 && self.utilisation("cairn").median >= 0.85
    }

    /// The Markdown section (no header, no link check).
    pub fn to_markdown(&self) -> String {
        let img = &self.image;
        let mut md = String::new();
        let _ = writeln!(
            md,
            "Link core↔edge: {} (both directions). Image: {} files, {:.1} MiB of real files from {}, \
             {} gzip layers (umoci); a pull moves **{:.1} MiB** ({} bytes: manifest + config + layers).\n",
            short_spec(&self.config.spec),
            img.files,
            img.file_bytes as f64 / MIB as f64,
            img.sources.join(", "),
            img.layers.len(),
            img.bytes() as f64 / MIB as f64,
            img.bytes(),
        );
        let _ = writeln!(
            md,
            "Tools: {}. Pull timeout {} s (a timed-out pull counts as the timeout: a lower bound).\n",
            self.tools
                .versions
                .iter()
                .map(|(k, v)| format!("{k} `{v}`"))
                .collect::<Vec<_>>()
                .join(", "),
            self.config.pull_timeout.as_secs()
        );
        md.push_str(
            "| contestant | reps | seconds min / median / max | utilisation median (min–max) | WAN bytes core→edge (median) | Cairn time ratio |\n|---|---|---|---|---|---|\n",
        );
        let desc = ALL_CONTESTANTS
            .iter()
            .filter(|(n, _)| self.config.contestants.iter().any(|c| c == n));
        for &(who, d) in desc {
            let s = Stats::of(&self.secs(who));
            let u = self.utilisation(who);
            let mut wb: Vec<f64> = self
                .pulls
                .iter()
                .filter(|p| p.who == who)
                .map(|p| p.wan_bytes_core_to_edge as f64)
                .collect();
            wb.sort_by(f64::total_cmp);
            let wbm = Stats::of(&wb).median;
            let _ = writeln!(
                md,
                "| **{who}**: {d} | {}{} | {:.2} / **{:.2}** / {:.2} | **{:.0}%** ({:.0}–{:.0}%) | {:.1} MiB ({:.2}× image) | {} |",
                self.secs(who).len(),
                match self.pulls.iter().filter(|p| p.who == who && p.timed_out).count() {
                    0 => String::new(),
                    n => format!(" ({n} TIMED OUT)"),
                },
                s.min,
                s.median,
                s.max,
                u.median * 100.0,
                u.min * 100.0,
                u.max * 100.0,
                wbm / MIB as f64,
                wbm / img.bytes() as f64,
                if who.starts_with("cairn") {
                    format!("vs direct {:.2}×, vs proxy {:.2}×", self.ratio(who, "direct"), self.ratio(who, "proxy"))
                } else {
                    "—".to_owned()
                },
            );
        }
        md.push('\n');
        for who in ["cairn", "cairn-bbr"] {
            if !self.config.contestants.iter().any(|c| c == who) {
                continue;
            }
            let r_direct = self.ratio(who, "direct");
            let r_proxy = self.ratio(who, "proxy");
            let u = self.utilisation(who).median;
            let met = r_direct <= 0.8 && u >= 0.85;
            let _ = writeln!(
                md,
                "- **{who} / direct = {r_direct:.2}×, {who} / proxy = {r_proxy:.2}×** (median times; lower is better); \
                 {who}'s link utilisation {:.0}%. Target (issue 6: ≤ 0.8× direct at ≥ 85% utilisation): **{}**.",
                u * 100.0,
                if met { "MET" } else { "NOT MET" },
            );
        }
        md.push_str("\nPer pull (in run order):\n\n| rep | contestant | seconds | utilisation | WAN MiB core→edge | edge→core MiB | dropped core→edge, pkts (of which queue) |\n|---|---|---|---|---|---|---|\n");
        for p in &self.pulls {
            let _ = writeln!(
                md,
                "| {} | {} | {}{:.2} | {:.0}% | {:.1} | {:.2} | {} ({}) |",
                p.rep + 1,
                p.who,
                if p.timed_out { "TIMED OUT ≥ " } else { "" },
                p.secs,
                p.utilisation * 100.0,
                p.wan_bytes_core_to_edge as f64 / MIB as f64,
                p.wan_bytes_edge_to_core as f64 / MIB as f64,
                p.dropped_core_to_edge,
                p.queue_drops_core_to_edge
            );
        }
        let problems: Vec<String> = self
            .pulls
            .iter()
            .flat_map(|p| {
                p.server_log_problems
                    .iter()
                    .map(move |l| format!("{} rep {}: {l}", p.who, p.rep + 1))
            })
            .take(10)
            .collect();
        if !problems.is_empty() {
            md.push_str("\nServer log lines at warning level or worse (first 10):\n\n");
            for l in problems {
                let _ = writeln!(md, "- `{}`", l.replace('`', "'"));
            }
        }
        let _ = writeln!(
            md,
            "\nPushes (inside the core namespace, over its loopback; context only): {}.",
            self.push_secs
                .iter()
                .map(|(k, v)| format!("{k} {v:.2} s"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        md
    }
}

/// `skopeo --insecure-policy copy ARGS` in `site`, output to `log`:
/// seconds, and whether it was killed at the timeout.
pub(crate) fn skopeo_in(
    wan: &Wan,
    site: &str,
    args: &[String],
    log: &Path,
    timeout: Duration,
) -> Result<(f64, bool)> {
    let mut cmd = wan.command(site, "skopeo")?;
    cmd.arg("--insecure-policy").arg("copy").args(args);
    let f = fs::File::create(log)?;
    cmd.stdout(f.try_clone()?).stderr(f);
    let t = Instant::now();
    let mut child = cmd.spawn().context("start skopeo")?;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if t.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            eprintln!(
                "skopeo copy {} took over {timeout:?}; killed",
                args.join(" ")
            );
            return Ok((t.elapsed().as_secs_f64(), true));
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let secs = t.elapsed().as_secs_f64();
    ensure!(
        status.success(),
        "skopeo copy {} failed ({status}); log:\n{}",
        args.join(" "),
        tail(log, 20)
    );
    Ok((secs, false))
}

/// Link counters: IP bytes delivered core→edge and edge→core, packets
/// dropped core→edge (all, and by the queue).
pub(crate) fn link_bytes(wan: &Wan) -> Result<(u64, u64, u64, u64)> {
    let ce = wan.stats("core", "edge")?;
    let ec = wan.stats("edge", "core")?;
    Ok((
        ce.delivered_bytes,
        ec.delivered_bytes,
        ce.dropped_loss + ce.dropped_queue,
        ce.dropped_queue,
    ))
}

/// Runs the scenario on a fresh WAN (progress goes to stderr). A pull that
/// outlives `pull_timeout` is killed and recorded as timed out; any other
/// failure (a server that does not start, a failed or wrong pull) is an
/// error. Servers, namespaces and the work dir are gone when it returns.
pub fn run_cold_pull(cfg: &ColdPullConfig) -> Result<ColdPullReport> {
    let tools = Tools::find(&cfg.cairn)?;
    let (layout, img) = image(&cfg.tmp, cfg.image_file_bytes, cfg.layers)?;
    eprintln!(
        "image: {} layers, {:.1} MiB to pull",
        img.layers.len(),
        img.bytes() as f64 / MIB as f64
    );
    let work = cfg
        .tmp
        .join(format!("cairn-wan-scenario-{}", std::process::id()));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    let result = run_in_work(cfg, &tools, &layout, &img, &work);
    let _ = fs::remove_dir_all(&work);
    result
}

fn run_in_work(
    cfg: &ColdPullConfig,
    tools: &Tools,
    layout: &Path,
    img: &ImageMeta,
    work: &Path,
) -> Result<ColdPullReport> {
    let (ca, wan) = core_edge(&cfg.cairn, work, cfg.seed, cfg.spec)?;
    let (cores, core_reg) = core_servers(&wan, &cfg.cairn, &cfg.contestants, &ca, work)?;
    // Push both inside the core namespace (loopback; never crosses the link).
    let mut push_secs = BTreeMap::new();
    push_image(
        &wan,
        cores.iter().chain([&core_reg]),
        layout,
        TAG,
        work,
        cfg.pull_timeout,
        false,
        &mut push_secs,
    )?;
    let rate = cfg.spec.rate_bps as f64;
    let mut pulls = Vec::new();
    for rep in 0..cfg.reps {
        for who in &cfg.contestants {
            let who = who.as_str();
            let dir = work.join(format!("{rep}-{who}"));
            fs::create_dir_all(&dir)?;
            let edge = edge_server(&wan, &cfg.cairn, who, &ca, &dir.join("edge"), &core_reg)?;
            let source = edge.as_ref().unwrap_or(&core_reg);
            let out = dir.join("out");
            let args = vec![
                "--src-tls-verify=false".to_owned(),
                source.image_ref(),
                format!("dir:{}", out.display()),
            ];
            let before = link_bytes(&wan)?;
            let (secs, timed_out) = skopeo_in(
                &wan,
                "edge",
                &args,
                &dir.join("skopeo.log"),
                cfg.pull_timeout,
            )
            .with_context(|| format!("{who} rep {}", rep + 1))?;
            let after = link_bytes(&wan)?;
            if !timed_out {
                verify_pulled(&out, img)
                    .with_context(|| format!("verify {who} rep {}", rep + 1))?;
            }
            let mut problems = edge.as_ref().map(Server::log_problems).unwrap_or_default();
            if who.starts_with("cairn") {
                for c in &cores {
                    problems.extend(c.log_problems());
                }
            }
            let p = Pull {
                who: who.to_owned(),
                rep,
                secs,
                timed_out,
                wan_bytes_core_to_edge: after.0 - before.0,
                wan_bytes_edge_to_core: after.1 - before.1,
                dropped_core_to_edge: after.2 - before.2,
                queue_drops_core_to_edge: after.3 - before.3,
                utilisation: if rate > 0.0 {
                    let bytes = if timed_out {
                        after.0 - before.0
                    } else {
                        img.bytes()
                    };
                    bytes as f64 * 8.0 / secs / rate
                } else {
                    f64::NAN
                },
                server_log_problems: problems,
            };
            eprintln!(
                "rep {} {who:<9} {secs:>7.2} s  utilisation {:>5.1}%  WAN {:.1} MiB {}",
                rep + 1,
                p.utilisation * 100.0,
                p.wan_bytes_core_to_edge as f64 / MIB as f64,
                if timed_out {
                    "TIMED OUT (not verified)"
                } else {
                    "(verified)"
                }
            );
            pulls.push(p);
            drop(edge);
            let _ = fs::remove_dir_all(&dir);
        }
    }
    let _ = &core_reg.dir;
    drop(cores);
    drop(core_reg);
    drop(wan);
    Ok(ColdPullReport {
        config: cfg.clone(),
        tools: tools.clone(),
        image: img.clone(),
        push_secs,
        pulls,
    })
}

/// A cluster CA with node identities `core` and `edge` under `work/ca`, and
/// the two sites joined by one emulated link.
pub(crate) fn core_edge(
    cairn: &Path,
    work: &Path,
    seed: u64,
    spec: LinkSpec,
) -> Result<(PathBuf, Wan)> {
    let ca = work.join("ca");
    run_checked(
        Command::new(cairn).args(["cluster", "init"]).arg(&ca),
        "cairn cluster init",
    )?;
    for n in ["core", "edge"] {
        run_checked(
            Command::new(cairn)
                .args(["cluster", "add-node"])
                .arg(&ca)
                .arg(n),
            "cairn cluster add-node",
        )?;
    }
    let wan = Wan::builder()
        .seed(seed)
        .site("core")
        .site("edge")
        .link("core", "edge", spec)
        .start()?;
    Ok((ca, wan))
}

/// Checks the contestants' names, then starts the core's servers: a Cairn
/// core node per Cairn variant among `contestants` (`cairn`: default
/// ports; `cairn-bbr`: `--congestion bbr`, the next ports) and a
/// docker-registry (always: the direct and proxy contestants' source).
pub(crate) fn core_servers(
    wan: &Wan,
    cairn: &Path,
    contestants: &[String],
    ca: &Path,
    work: &Path,
) -> Result<(Vec<Server>, Server)> {
    for c in contestants {
        ensure!(
            ALL_CONTESTANTS.iter().any(|(n, _)| n == c),
            "unknown contestant {c}; known: {:?}",
            ALL_CONTESTANTS.iter().map(|c| c.0).collect::<Vec<_>>()
        );
    }
    let want = |w: &str| contestants.iter().any(|c| c == w);
    let mut cores = Vec::new();
    if want("cairn") {
        cores.push(cairn_node(
            wan,
            cairn,
            "core",
            ca,
            &work.join("core-cairn"),
            None,
            false,
        )?);
    }
    if want("cairn-bbr") {
        cores.push(cairn_node(
            wan,
            cairn,
            "core",
            ca,
            &work.join("core-cairn-bbr"),
            None,
            true,
        )?);
        if let Some(s) = cores.last_mut() {
            s.name.push_str("-bbr");
        }
    }
    let core_reg = docker_registry(wan, "core", &work.join("core-registry"), None)?;
    Ok((cores, core_reg))
}

/// Pushes `layout`'s image (tag `img`) as `bench/img:TAG` to each server
/// from inside the core namespace (loopback); fails if a push crosses the
/// link. Records the seconds under `NAME` (`NAME TAG` unless `tag` is
/// [`TAG`]). With `raw`, pushes with plain HTTP requests ([`push_raw`])
/// instead of skopeo, which would gzip uncompressed layers.
#[allow(clippy::too_many_arguments)]
pub(crate) fn push_image<'a>(
    wan: &Wan,
    servers: impl IntoIterator<Item = &'a Server>,
    layout: &Path,
    tag: &str,
    work: &Path,
    timeout: Duration,
    raw: bool,
    secs_out: &mut BTreeMap<String, f64>,
) -> Result<()> {
    for s in servers {
        if raw {
            let before = link_bytes(wan)?;
            let t = Instant::now();
            push_raw(wan, s, layout, tag).with_context(|| format!("push {tag} to {}", s.name))?;
            let secs = t.elapsed().as_secs_f64();
            ensure!(
                link_bytes(wan)? == before,
                "the push of {tag} to {} crossed the link",
                s.name
            );
            eprintln!("pushed {tag} to {} (curl): {secs:.2} s", s.name);
            secs_out.insert(format!("{} {tag}", s.name), secs);
            continue;
        }
        let mut args = vec!["--dest-tls-verify=false".to_owned()];
        if let Some(t) = &s.token {
            args.push("--dest-creds".into());
            args.push(format!("cairn:{t}"));
        }
        args.push(format!("oci:{}:{LAYOUT_TAG}", layout.display()));
        args.push(s.image_ref_tag(tag));
        let before = link_bytes(wan)?;
        let (secs, to) = skopeo_in(
            wan,
            "core",
            &args,
            &work.join(format!("push-{}-{tag}.log", s.name)),
            timeout,
        )?;
        ensure!(!to, "the push of {tag} to {} timed out", s.name);
        ensure!(
            link_bytes(wan)? == before,
            "the push of {tag} to {} crossed the link",
            s.name
        );
        eprintln!("pushed {tag} to {}: {secs:.2} s", s.name);
        let key = if tag == TAG {
            s.name.clone()
        } else {
            format!("{} {tag}", s.name)
        };
        secs_out.insert(key, secs);
    }
    Ok(())
}

/// Pushes `layout`'s image (tag `img`) as `bench/img:TAG` to `server` from
/// the core namespace with curl, blob by blob as stored (POST an upload,
/// PUT it with `?digest=`; then PUT the manifest), with the push token as
/// a bearer token where there is one.
fn push_raw(wan: &Wan, server: &Server, layout: &Path, tag: &str) -> Result<()> {
    let index: serde_json::Value = serde_json::from_slice(&fs::read(layout.join("index.json"))?)?;
    let desc = index["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == LAYOUT_TAG)
        .context("index.json has no manifest tagged img")?;
    let manifest = parse_blob(desc)?;
    let media = desc["mediaType"]
        .as_str()
        .unwrap_or("application/vnd.oci.image.manifest.v1+json")
        .to_owned();
    let m: serde_json::Value =
        serde_json::from_slice(&fs::read(blob_path(layout, &manifest.digest))?)?;
    let blobs: Vec<Blob> = std::iter::once(&m["config"])
        .chain(m["layers"].as_array().into_iter().flatten())
        .map(parse_blob)
        .collect::<Result<_>>()?;
    let base = format!("http://{}", server.registry);
    let curl = || -> Result<Command> {
        let mut c = wan.command("core", "curl")?;
        c.args(["-sS", "-f", "--max-time", "300"]);
        if let Some(t) = &server.token {
            c.arg("-H").arg(format!("Authorization: Bearer {t}"));
        }
        Ok(c)
    };
    for b in &blobs {
        let mut post = curl()?;
        post.args(["-o", "/dev/null", "-D", "-", "-X", "POST"])
            .arg(format!("{base}/v2/{REPO}/blobs/uploads/"));
        let headers = run_checked(&mut post, "curl POST blobs/uploads/")?;
        let loc = headers
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case("location")
                    .then(|| v.trim().to_owned())
            })
            .context("no Location in the upload's answer")?;
        let loc = if loc.starts_with("http") {
            loc
        } else {
            format!("{base}{loc}")
        };
        let sep = if loc.contains('?') { '&' } else { '?' };
        let mut put = curl()?;
        put.args([
            "-o",
            "/dev/null",
            "-H",
            "Content-Type: application/octet-stream",
            "-T",
        ])
        .arg(blob_path(layout, &b.digest))
        .arg(format!("{loc}{sep}digest={}", b.digest));
        run_checked(&mut put, "curl PUT blob")?;
    }
    let mut put = curl()?;
    put.args(["-o", "/dev/null", "-H"])
        .arg(format!("Content-Type: {media}"))
        .arg("-T")
        .arg(blob_path(layout, &manifest.digest))
        .arg(format!("{base}/v2/{REPO}/manifests/{tag}"));
    run_checked(&mut put, "curl PUT manifest")?;
    Ok(())
}

/// The fresh edge server of a contestant (`None` for `direct`, which pulls
/// from `core_reg` across the link): a Cairn edge node whose parent is the
/// matching Cairn core, or a docker-registry pull-through cache of
/// `core_reg`.
pub(crate) fn edge_server(
    wan: &Wan,
    cairn: &Path,
    who: &str,
    ca: &Path,
    dir: &Path,
    core_reg: &Server,
) -> Result<Option<Server>> {
    let core = wan.addr("core")?;
    Ok(match who {
        "cairn" => Some(cairn_node(
            wan,
            cairn,
            "edge",
            ca,
            dir,
            Some(&format!("core@{core}:{CAIRN_QUIC_PORT}")),
            false,
        )?),
        "cairn-bbr" => Some(cairn_node(
            wan,
            cairn,
            "edge",
            ca,
            dir,
            Some(&format!("core@{core}:{}", CAIRN_QUIC_PORT + 1)),
            true,
        )?),
        "proxy" => Some(docker_registry(wan, "edge", dir, Some(&core_reg.registry))?),
        _ => None,
    })
}

/// sha256 (hex) of each file, by `sha256sum`.
fn sha256_of(paths: &[PathBuf]) -> Result<BTreeMap<PathBuf, String>> {
    if paths.is_empty() {
        return Ok(BTreeMap::new());
    }
    let out = run_checked(Command::new("sha256sum").args(paths), "sha256sum")?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let (sum, path) = l.split_once("  ")?;
            Some((PathBuf::from(path), sum.to_owned()))
        })
        .collect())
}

/// Checks an `oci:` layout pull of `img` tagged `tag`: the index names the
/// image's manifest under `tag`, and the manifest, config and every layer
/// are there with the right sizes and hash to their names.
pub(crate) fn verify_layout(layout: &Path, tag: &str, img: &ImageMeta) -> Result<()> {
    let index: serde_json::Value = serde_json::from_slice(
        &fs::read(layout.join("index.json")).context("read the pulled index.json")?,
    )?;
    let desc = index["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .with_context(|| format!("the pulled index.json has no manifest tagged {tag}"))?;
    let got = parse_blob(desc)?;
    ensure!(
        got.digest == img.manifest.digest,
        "WRONG BYTES: {tag} in the pulled layout is {}, not {}",
        got.digest,
        img.manifest.digest
    );
    let all: Vec<&Blob> = std::iter::once(&img.manifest).chain(img.blobs()).collect();
    let paths: Vec<PathBuf> = all.iter().map(|b| blob_path(layout, &b.digest)).collect();
    for (b, p) in all.iter().zip(&paths) {
        let len = fs::metadata(p)
            .with_context(|| format!("blob {} missing from the pulled layout", b.digest))?
            .len();
        ensure!(
            len == b.bytes,
            "blob {} is {len} bytes, not {}",
            b.digest,
            b.bytes
        );
    }
    let sums = sha256_of(&paths)?;
    for (b, p) in all.iter().zip(&paths) {
        let sum = sums
            .get(p)
            .with_context(|| format!("no sum for {}", p.display()))?;
        ensure!(
            sum == hex_of(&b.digest),
            "WRONG BYTES: blob {} hashes to sha256:{sum}",
            b.digest
        );
    }
    Ok(())
}
