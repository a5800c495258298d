//! Scenario 2 of the WAN benchmark: **image update v1 → v2 at an edge**.
//!
//! Two sites, `core` (10.99.0.1) and `edge` (10.99.0.2), joined by one
//! emulated link, as in scenario 1 ([`crate::scenario`], whose image
//! builder, servers, pushes and checks this module reuses). v1 is scenario
//! 1's image (real files, umoci layers); v2 is built the same way from the
//! same files in the same layers, except that every `change_every`-th file
//! by sorted path (default: every 20th, 5% of the files) has up to 4 KiB in
//! its middle rewritten and 256 bytes appended, deterministically
//! ([`crate::scenario::ImageVariant`]). Every file's times are pinned, so
//! the layer tars differ only around the changed files; but a layer that
//! holds a changed file gets a new digest (with 5% of the files changed,
//! every layer of the default image does): a registry that moves whole
//! layers moves all of them, while Cairn's content-defined chunks could
//! move only the chunks that changed. With gzip layers (the default, as
//! scenario 1) the compressed stream after a changed file differs too,
//! which limits what chunking can share; `uncompressed` builds both
//! versions with plain tar layers instead.
//!
//! Both versions are pushed inside the core namespace (loopback) to a
//! Cairn core node per Cairn contestant and to a docker-registry. Then per
//! repetition and contestant, with a fresh edge server where there is one:
//!
//! 1. **warm-up** (untimed, recorded): `skopeo copy docker://EDGE/bench/img:v1
//!    oci:OUT:v1` in the edge namespace, so the edge side holds v1: the
//!    Cairn edge's store holds v1's chunks, the pull-through cache holds
//!    v1's blobs, and the local `oci:` layout holds v1's blobs (skopeo skips
//!    a layer blob its `oci:` destination already has, for every
//!    contestant alike; it fetches the config again); then verified, then
//!    the link is let go quiet;
//! 2. **update** (timed): `skopeo copy docker://EDGE/bench/img:v2
//!    oci:OUT:v2` into the same layout; the link model's counters give the
//!    bytes core→edge; verified untimed (index tag, manifest digest, every
//!    blob's size and sha256).
//!
//! Contestants: `cairn` / `cairn-bbr` (a Cairn edge whose parent is the
//! Cairn core; CUBIC or BBR on both nodes), `direct` (docker-registry at
//! the core across the link) and `proxy` (a docker-registry pull-through
//! cache at the edge).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use serde::Serialize;

use crate::check::short_spec;
use crate::model::LinkSpec;
use crate::scenario::{
    blob_path, core_edge, core_servers, edge_server, image_variant, in_path, link_bytes,
    push_image, skopeo_in, verify_layout, ImageMeta, ImageVariant, Server, Stats, Tools,
};
use crate::wan::Wan;

const MIB: u64 = 1 << 20;

/// A ratio with two decimals, or two significant digits below 0.1 (0.0084).
pub fn fmt_ratio(x: f64) -> String {
    let d = if x > 0.0 && x < 0.1 {
        (1 - x.log10().floor() as i32).clamp(2, 6) as usize
    } else {
        2
    };
    format!("{x:.d$}")
}

/// Tags of the two versions in the registries.
pub const V1: &str = "v1";
/// See [`V1`].
pub const V2: &str = "v2";
/// The contestants by default, in run order within a repetition. Cairn
/// with its default congestion control (CUBIC) is loss-bound under the
/// default link's 0.5% random loss (scenario 1: ≈ 4 Mbit/s), so the
/// default runs Cairn with BBR; `cairn` can be added.
pub const UPDATE_CONTESTANTS: &[&str] = &["cairn-bbr", "direct", "proxy"];
/// Every contestant there is, with what it is in this scenario.
pub const UPDATE_DESCRIPTIONS: &[(&str, &str)] = &[
    (
        "cairn",
        "Cairn edge holding v1 ← Cairn core over QUIC, node default congestion control (CUBIC)",
    ),
    (
        "cairn-bbr",
        "Cairn edge holding v1 ← Cairn core over QUIC, `--congestion bbr` on both nodes",
    ),
    (
        "direct",
        "skopeo straight from docker-registry at the core, across the link",
    ),
    (
        "proxy",
        "docker-registry pull-through cache at the edge holding v1",
    ),
];
/// The Cairn edge's API port (an edge node always uses the default ports).
const EDGE_API_PORT: u16 = 7480;

/// What to run.
#[derive(Debug, Clone, Serialize)]
pub struct ImageUpdateConfig {
    /// The link core↔edge (both directions).
    pub spec: LinkSpec,
    /// Repetitions per contestant.
    pub reps: usize,
    /// Bytes of real files in the image (before compression).
    pub image_file_bytes: u64,
    /// Layers.
    pub layers: usize,
    /// v2 changes every this-many-th file by sorted path (20: 5%).
    pub change_every: usize,
    /// Uncompressed tar layers instead of gzip (both versions).
    pub uncompressed: bool,
    /// The `cairn` binary.
    pub cairn: PathBuf,
    /// Contestants, in run order within a repetition.
    pub contestants: Vec<String>,
    /// Scratch root (image cache and work dirs).
    pub tmp: PathBuf,
    /// Bound on one pull.
    pub pull_timeout: Duration,
    /// Seed of the link models.
    pub seed: u64,
}

/// One contestant's warm-up and timed update in one repetition.
#[derive(Debug, Clone, Serialize)]
pub struct UpdatePull {
    /// Contestant.
    pub who: String,
    /// Repetition (0-based).
    pub rep: usize,
    /// Wall seconds of the untimed v1 warm-up pull (context).
    pub warmup_secs: f64,
    /// IP bytes core→edge during the warm-up.
    pub warmup_wan_bytes_core_to_edge: u64,
    /// Wall seconds of the v2 `skopeo copy` (the timeout if it timed out:
    /// a lower bound).
    pub secs: f64,
    /// Killed at the timeout (not verified).
    pub timed_out: bool,
    /// IP bytes the link delivered core→edge during the v2 pull.
    pub wan_bytes_core_to_edge: u64,
    /// IP bytes edge→core.
    pub wan_bytes_edge_to_core: u64,
    /// Packets dropped core→edge (random loss + queue).
    pub dropped_core_to_edge: u64,
    /// v2 layers skopeo did not fetch: already in the local `oci:` layout
    /// from v1 (the file there before the pull and untouched after).
    pub skopeo_layers_skipped: usize,
    /// v2 layers skopeo fetched.
    pub skopeo_layers_copied: usize,
    /// What the Cairn edge's `cairn_transport_peer_bytes_in_total` gained
    /// during the v2 pull (Cairn contestants; `None` if a scrape failed).
    pub edge_transport_bytes_in: Option<u64>,
    /// Log lines at warning level or worse from the servers involved.
    pub server_log_problems: Vec<String>,
}

/// The whole result.
#[derive(Debug, Clone, Serialize)]
pub struct ImageUpdateReport {
    /// What ran.
    pub config: ImageUpdateConfig,
    /// Tool versions.
    pub tools: Tools,
    /// Version 1.
    pub v1: ImageMeta,
    /// Version 2.
    pub v2: ImageMeta,
    /// Push times inside the core namespace (context).
    pub push_secs: BTreeMap<String, f64>,
    /// Every contestant's pulls, in run order.
    pub pulls: Vec<UpdatePull>,
}

impl ImageUpdateReport {
    /// Seconds of a contestant's v2 pulls.
    pub fn secs(&self, who: &str) -> Vec<f64> {
        self.of(who, |p| p.secs)
    }
    /// WAN bytes core→edge of a contestant's v2 pulls.
    pub fn wan_bytes(&self, who: &str) -> Vec<f64> {
        self.of(who, |p| p.wan_bytes_core_to_edge as f64)
    }
    fn of(&self, who: &str, f: impl Fn(&UpdatePull) -> f64) -> Vec<f64> {
        self.pulls.iter().filter(|p| p.who == who).map(f).collect()
    }
    /// Median v2 seconds of `a` over those of `b`.
    pub fn time_ratio(&self, a: &str, b: &str) -> f64 {
        Stats::of(&self.secs(a)).median / Stats::of(&self.secs(b)).median
    }
    /// Median v2 WAN bytes of `a` over those of `b`.
    pub fn wan_ratio(&self, a: &str, b: &str) -> f64 {
        Stats::of(&self.wan_bytes(a)).median / Stats::of(&self.wan_bytes(b)).median
    }
    /// Bytes of v2's manifest and of its blobs v1 does not have: what a
    /// registry that moves whole blobs must move for the update.
    pub fn new_blob_bytes(&self) -> u64 {
        let old: BTreeSet<&str> = std::iter::once(&self.v1.manifest)
            .chain(self.v1.blobs())
            .map(|b| b.digest.as_str())
            .collect();
        std::iter::once(&self.v2.manifest)
            .chain(self.v2.blobs())
            .filter(|b| !old.contains(b.digest.as_str()))
            .map(|b| b.bytes)
            .sum()
    }
    /// Layers whose digest differs between v1 and v2.
    pub fn changed_layers(&self) -> usize {
        let old: BTreeSet<&str> = self.v1.layers.iter().map(|b| b.digest.as_str()).collect();
        self.v2
            .layers
            .iter()
            .filter(|b| !old.contains(b.digest.as_str()))
            .count()
    }
    /// (cairn variant, peer) pairs present in this run.
    pub fn pairs(&self) -> Vec<(&'static str, &'static str)> {
        let has = |w: &str| self.config.contestants.iter().any(|c| c == w);
        let mut v = Vec::new();
        for a in ["cairn", "cairn-bbr"] {
            for b in ["direct", "proxy"] {
                if has(a) && has(b) {
                    v.push((a, b));
                }
            }
        }
        v
    }

    /// The Markdown section (no header, no link check).
    pub fn to_markdown(&self) -> String {
        let (v1, v2) = (&self.v1, &self.v2);
        let mib = |b: f64| b / MIB as f64;
        let new = self.new_blob_bytes();
        let mut md = String::new();
        let _ = writeln!(
            md,
            "Link core↔edge: {} (both directions). Image v1: {} files, {:.1} MiB of real files from {}, \
             {} {} layers (umoci); a pull of v1 moves {:.1} MiB. \
             **v2** changes every {}th file by sorted path: **{} files ({:.1}% of {})**, {} bytes rewritten or appended in all; \
             a pull of v2 moves **{:.1} MiB** ({} bytes: manifest + config + layers). \
             **{} of {} layer digests changed**; v2's manifest and blobs not in v1: **{:.1} MiB** ({:.0}% of v2), \
             what a registry that moves whole blobs has to move.\n",
            short_spec(&self.config.spec),
            v1.files,
            mib(v1.file_bytes as f64),
            v1.sources.join(", "),
            v1.layers.len(),
            if self.config.uncompressed {
                "uncompressed tar"
            } else {
                "gzip"
            },
            mib(v1.bytes() as f64),
            self.config.change_every,
            v2.changed_files,
            v2.changed_files as f64 * 100.0 / v2.files.max(1) as f64,
            v2.files,
            v2.changed_bytes,
            mib(v2.bytes() as f64),
            v2.bytes(),
            self.changed_layers(),
            v2.layers.len(),
            mib(new as f64),
            new as f64 * 100.0 / v2.bytes() as f64,
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
            "| ratio of medians, v2 pull (lower is better for Cairn) | time | WAN bytes core→edge |\n|---|---|---|\n",
        );
        for (a, b) in self.pairs() {
            let _ = writeln!(
                md,
                "| {a} / {b} | **{}×** | **{}×** |",
                fmt_ratio(self.time_ratio(a, b)),
                fmt_ratio(self.wan_ratio(a, b))
            );
        }
        md.push('\n');
        md.push_str(
            "| contestant | reps | v2 seconds min / median / max | v2 WAN MiB core→edge, median (× v2 image, × new blobs) | v1 warm-up seconds / WAN MiB (median) | skopeo v2 layers skipped / fetched (median) |\n|---|---|---|---|---|---|\n",
        );
        for &(who, d) in UPDATE_DESCRIPTIONS {
            if !self.config.contestants.iter().any(|c| c == who) {
                continue;
            }
            let s = Stats::of(&self.secs(who));
            let wb = Stats::of(&self.wan_bytes(who)).median;
            let warm = Stats::of(&self.of(who, |p| p.warmup_secs)).median;
            let warm_wb =
                Stats::of(&self.of(who, |p| p.warmup_wan_bytes_core_to_edge as f64)).median;
            let skipped = Stats::of(&self.of(who, |p| p.skopeo_layers_skipped as f64)).median;
            let copied = Stats::of(&self.of(who, |p| p.skopeo_layers_copied as f64)).median;
            let timeouts = self
                .pulls
                .iter()
                .filter(|p| p.who == who && p.timed_out)
                .count();
            let _ = writeln!(
                md,
                "| **{who}**: {d} | {}{} | {:.2} / **{:.2}** / {:.2} | **{:.1}** ({}×, {}×) | {:.2} / {:.1} | {} / {} |",
                self.secs(who).len(),
                if timeouts > 0 {
                    format!(" ({timeouts} TIMED OUT)")
                } else {
                    String::new()
                },
                s.min,
                s.median,
                s.max,
                mib(wb),
                fmt_ratio(wb / v2.bytes() as f64),
                fmt_ratio(wb / new as f64),
                warm,
                mib(warm_wb),
                skipped,
                copied,
            );
        }
        md.push('\n');
        for (a, b) in self.pairs() {
            let _ = writeln!(
                md,
                "- **{a} / {b}: time {}×, WAN bytes {}×** (medians of the v2 pull).",
                fmt_ratio(self.time_ratio(a, b)),
                fmt_ratio(self.wan_ratio(a, b))
            );
        }
        md.push_str(
            "\nPer pull (in run order):\n\n| rep | contestant | v1 warm-up s | v1 warm-up WAN MiB | v2 seconds | v2 WAN MiB core→edge | edge→core MiB | dropped core→edge, pkts | skopeo v2 layers skipped / fetched | Cairn edge transport in, MiB |\n|---|---|---|---|---|---|---|---|---|---|\n",
        );
        for p in &self.pulls {
            let _ = writeln!(
                md,
                "| {} | {} | {:.2} | {:.1} | {}{:.2} | {:.2} | {:.2} | {} | {} / {} | {} |",
                p.rep + 1,
                p.who,
                p.warmup_secs,
                mib(p.warmup_wan_bytes_core_to_edge as f64),
                if p.timed_out { "TIMED OUT ≥ " } else { "" },
                p.secs,
                mib(p.wan_bytes_core_to_edge as f64),
                mib(p.wan_bytes_edge_to_core as f64),
                p.dropped_core_to_edge,
                p.skopeo_layers_skipped,
                p.skopeo_layers_copied,
                p.edge_transport_bytes_in
                    .map_or("—".to_owned(), |b| format!("{:.2}", mib(b as f64))),
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
            "\nLayers (v1 → v2, bytes): {}.",
            v1.layers
                .iter()
                .zip(&v2.layers)
                .map(|(a, b)| format!(
                    "{} → {}{}",
                    a.bytes,
                    b.bytes,
                    if a.digest == b.digest { " (same)" } else { "" }
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
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

/// (inode, mtime in ns) of each of `img`'s layer blob files present in
/// `layout`, by digest.
fn layer_files(layout: &Path, img: &ImageMeta) -> BTreeMap<String, (u64, i128)> {
    use std::os::unix::fs::MetadataExt as _;
    img.layers
        .iter()
        .filter_map(|b| {
            let m = fs::metadata(blob_path(layout, &b.digest)).ok()?;
            let t = i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec());
            Some((b.digest.clone(), (m.ino(), t)))
        })
        .collect()
}

/// Layers of `img` skopeo skipped (their file was in the layout before the
/// pull and is the same file, untouched, after) and the rest.
fn layers_skipped(
    before: &BTreeMap<String, (u64, i128)>,
    after: &BTreeMap<String, (u64, i128)>,
    img: &ImageMeta,
) -> (usize, usize) {
    let skipped = img
        .layers
        .iter()
        .filter(|b| {
            before
                .get(&b.digest)
                .is_some_and(|x| after.get(&b.digest) == Some(x))
        })
        .count();
    (skipped, img.layers.len() - skipped)
}

/// Waits (up to 20 s) until the link has carried less than 64 KiB either
/// way for a second (keepalives are fine), so background work after the
/// warm-up does not count in the update.
fn quiesce(wan: &Wan) -> Result<()> {
    let t = Instant::now();
    let mut start = link_bytes(wan)?;
    let mut since = Instant::now();
    while t.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(250));
        let now = link_bytes(wan)?;
        if (now.0 - start.0) + (now.1 - start.1) >= 64 << 10 {
            start = now;
            since = Instant::now();
        } else if since.elapsed() >= Duration::from_secs(1) {
            return Ok(());
        }
    }
    eprintln!("the link was still busy 20 s after the warm-up; going on");
    Ok(())
}

/// The Cairn edge's `cairn_transport_peer_bytes_in_total` (all peers).
fn edge_transport_in(wan: &Wan) -> Option<u64> {
    if !in_path("curl") {
        return None;
    }
    let url = format!("http://127.0.0.1:{EDGE_API_PORT}/metrics");
    let out = wan
        .run_in("edge", "curl", ["-sf", "--max-time", "10", url.as_str()])
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    crate::vm_nbd::metric_sum(&text, "cairn_transport_peer_bytes_in_total").map(|v| v as u64)
}

/// Runs the scenario on a fresh WAN (progress on stderr). A v2 pull that
/// outlives the timeout is killed and recorded as timed out; any other
/// failure (a server that does not start, a failed or wrong pull, a
/// warm-up that times out) is an error. Servers, namespaces and the work
/// dir are gone when it returns.
pub fn run_image_update(cfg: &ImageUpdateConfig) -> Result<ImageUpdateReport> {
    let tools = Tools::find(&cfg.cairn)?;
    ensure!(cfg.change_every >= 1, "change_every must be at least 1");
    ensure!(!cfg.contestants.is_empty(), "no contestants");
    ensure!(
        !cfg.uncompressed || in_path("curl"),
        "curl not found on the PATH (uncompressed images are pushed with it)"
    );
    for c in &cfg.contestants {
        ensure!(
            UPDATE_DESCRIPTIONS.iter().any(|(n, _)| n == c),
            "unknown contestant {c}; known: {:?}",
            UPDATE_DESCRIPTIONS.iter().map(|c| c.0).collect::<Vec<_>>()
        );
    }
    let build = |change_every| {
        image_variant(
            &cfg.tmp,
            cfg.image_file_bytes,
            cfg.layers,
            ImageVariant {
                change_every,
                uncompressed: cfg.uncompressed,
            },
        )
    };
    let (layout1, v1) = build(0)?;
    let (layout2, v2) = build(cfg.change_every)?;
    ensure!(
        v1.files == v2.files && v1.layers.len() == v2.layers.len(),
        "v1 and v2 were built from different file sets ({} / {} files)",
        v1.files,
        v2.files
    );
    eprintln!(
        "v1 {:.1} MiB, v2 {:.1} MiB to pull; v2 changes {} of {} files",
        v1.bytes() as f64 / MIB as f64,
        v2.bytes() as f64 / MIB as f64,
        v2.changed_files,
        v2.files
    );
    let work = cfg
        .tmp
        .join(format!("cairn-wan-update-{}", std::process::id()));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    let result = run_in_work(cfg, &tools, [(&layout1, &v1), (&layout2, &v2)], &work);
    let _ = fs::remove_dir_all(&work);
    result
}

fn run_in_work(
    cfg: &ImageUpdateConfig,
    tools: &Tools,
    [(layout1, v1), (layout2, v2)]: [(&PathBuf, &ImageMeta); 2],
    work: &Path,
) -> Result<ImageUpdateReport> {
    let (ca, wan) = core_edge(&cfg.cairn, work, cfg.seed, cfg.spec)?;
    let (cores, core_reg) = core_servers(&wan, &cfg.cairn, &cfg.contestants, &ca, work)?;
    let mut push_secs = BTreeMap::new();
    for (layout, tag) in [(layout1, V1), (layout2, V2)] {
        push_image(
            &wan,
            cores.iter().chain([&core_reg]),
            layout,
            tag,
            work,
            cfg.pull_timeout,
            cfg.uncompressed,
            &mut push_secs,
        )?;
    }
    let mut pulls = Vec::new();
    for rep in 0..cfg.reps {
        for who in &cfg.contestants {
            let who = who.as_str();
            let ctx = || format!("{who} rep {}", rep + 1);
            let dir = work.join(format!("{rep}-{who}"));
            fs::create_dir_all(&dir)?;
            let edge = edge_server(&wan, &cfg.cairn, who, &ca, &dir.join("edge"), &core_reg)?;
            let source: &Server = edge.as_ref().unwrap_or(&core_reg);
            let out = dir.join("oci");
            let pull = |tag: &str, log: &Path| {
                let mut args = vec!["--src-tls-verify=false".to_owned()];
                if cfg.uncompressed {
                    // Else skopeo gzips the layers into the layout.
                    args.push("--dest-oci-accept-uncompressed-layers".to_owned());
                }
                args.push(source.image_ref_tag(tag));
                args.push(format!("oci:{}:{tag}", out.display()));
                skopeo_in(&wan, "edge", &args, log, cfg.pull_timeout)
            };
            // Warm-up: v1 at the edge (untimed, verified).
            let before = link_bytes(&wan)?;
            let (warmup_secs, to) = pull(V1, &dir.join("skopeo-v1.log"))
                .with_context(|| format!("{} warm-up", ctx()))?;
            ensure!(!to, "{}: the v1 warm-up timed out", ctx());
            let warm_after = link_bytes(&wan)?;
            verify_layout(&out, V1, v1).with_context(|| format!("verify v1, {}", ctx()))?;
            quiesce(&wan)?;
            // The update, timed.
            let cairn = who.starts_with("cairn");
            let tin_before = if cairn { edge_transport_in(&wan) } else { None };
            let files_before = layer_files(&out, v2);
            let before2 = link_bytes(&wan)?;
            let (secs, timed_out) = pull(V2, &dir.join("skopeo-v2.log")).with_context(ctx)?;
            let after = link_bytes(&wan)?;
            let tin_after = if cairn { edge_transport_in(&wan) } else { None };
            if !timed_out {
                verify_layout(&out, V2, v2).with_context(|| format!("verify v2, {}", ctx()))?;
            }
            let (skipped, copied) = layers_skipped(&files_before, &layer_files(&out, v2), v2);
            let mut problems = edge.as_ref().map(Server::log_problems).unwrap_or_default();
            if cairn {
                for c in &cores {
                    problems.extend(c.log_problems());
                }
            }
            let p = UpdatePull {
                who: who.to_owned(),
                rep,
                warmup_secs,
                warmup_wan_bytes_core_to_edge: warm_after.0 - before.0,
                secs,
                timed_out,
                wan_bytes_core_to_edge: after.0 - before2.0,
                wan_bytes_edge_to_core: after.1 - before2.1,
                dropped_core_to_edge: after.2 - before2.2,
                skopeo_layers_skipped: skipped,
                skopeo_layers_copied: copied,
                edge_transport_bytes_in: tin_after
                    .zip(tin_before)
                    .map(|(a, b)| a.saturating_sub(b)),
                server_log_problems: problems,
            };
            eprintln!(
                "rep {} {who:<9} v1 warm-up {warmup_secs:>6.2} s ({:.1} MiB); v2 {secs:>6.2} s  WAN {:.1} MiB  layers skipped {skipped} fetched {copied} {}",
                rep + 1,
                p.warmup_wan_bytes_core_to_edge as f64 / MIB as f64,
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
    drop(cores);
    drop(core_reg);
    drop(wan);
    Ok(ImageUpdateReport {
        config: cfg.clone(),
        tools: tools.clone(),
        v1: v1.clone(),
        v2: v2.clone(),
        push_secs,
        pulls,
    })
}
