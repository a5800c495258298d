//! `cairn-wan`: check the link emulator against its settings, or keep a
//! topology up. Needs root.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use cairn_wan::check::{
    forwarder_ceiling, run_check, short_spec, CheckConfig, CheckReport, Machine,
};
use cairn_wan::{Event, LinkSpec, QueueLimit, Wan};
use clap::{Parser, Subcommand};
use serde::Deserialize;

#[derive(Debug, Parser)]
#[command(name = "cairn-wan", about = "A WAN on one machine (needs root)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Build two sites joined by one link and measure the link against its
    /// settings (ping RTT, iperf3 TCP and UDP); write a report.
    Check(CheckArgs),
    /// Keep the topology of a TOML file up until Ctrl-C.
    Up {
        /// The topology (see the crate docs / README for the format).
        config: PathBuf,
    },
    /// Delete namespaces left behind by cairn-wan processes that died.
    Clean,
    /// Run a benchmark scenario over an emulated link.
    Scenario {
        #[command(subcommand)]
        which: ScenarioCmd,
    },
}

#[derive(Debug, Subcommand)]
enum ScenarioCmd {
    /// Scenario 1: cold image pull at an edge (Cairn edge ← core, skopeo
    /// straight from docker-registry at the core, docker-registry
    /// pull-through cache at the edge). Needs `cairn`, skopeo, umoci and
    /// docker-registry.
    ColdPull(ColdPullArgs),
    /// Scenario 2: image update v1 → v2 at an edge that holds v1 (v2
    /// changes every 20th file), Cairn edge ← core against skopeo straight
    /// from docker-registry at the core and a docker-registry pull-through
    /// cache at the edge: WAN bytes and time of the v2 pull. Needs `cairn`,
    /// skopeo, umoci and docker-registry.
    ImageUpdate(ImageUpdateArgs),
    /// Scenario 3: a VM image at an edge over NBD (a Cairn edge's lazy
    /// export ← Cairn core, against copying the raw image first with
    /// nbdcopy from qemu-nbd at the core): a full read and a boot-like
    /// sparse trace. Needs `cairn`, nbdcopy, qemu-io, qemu-nbd, qemu-img,
    /// mkfs.ext4 and curl.
    VmNbd(VmNbdArgs),
}

/// Flags every scenario takes.
#[derive(Debug, clap::Args)]
struct ScenarioArgs {
    /// Smoke run: a small image, one rep, no link self-check, no files
    /// written unless --out is given.
    #[arg(long)]
    quick: bool,
    /// One-way delay in ms (RTT is twice this).
    #[arg(long, default_value_t = 25.0)]
    delay_ms: f64,
    /// Rate in Mbit/s (IP bytes).
    #[arg(long, default_value_t = 100.0)]
    rate_mbit: f64,
    /// Random loss in percent.
    #[arg(long, default_value_t = 0.5)]
    loss: f64,
    /// Repetitions (default 3; 1 with --quick).
    #[arg(long)]
    reps: Option<usize>,
    /// The cairn binary (default: target/release/cairn of this workspace).
    #[arg(long, env = "CAIRN_BIN")]
    cairn: Option<PathBuf>,
    /// Scratch root (image cache, work dirs).
    #[arg(long, default_value = "/tmp")]
    tmp: PathBuf,
    /// Seconds allowed for one timed step (a pull, a copy, a replay).
    #[arg(long, default_value_t = 300)]
    timeout_s: u64,
    /// Skip the link self-check.
    #[arg(long)]
    skip_check: bool,
    /// Seconds per iperf3 run of the self-check.
    #[arg(long, default_value_t = 5)]
    check_duration_s: u64,
    /// Directory for wan-scenarioN-DATE.{md,json} (default bench/results;
    /// with --quick nothing is written unless given).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Suffix for the file names.
    #[arg(long)]
    suffix: Option<String>,
}

impl ScenarioArgs {
    /// The link both directions get (queue: one BDP, at least 50 ms).
    fn link(&self) -> Result<LinkSpec> {
        let mut link = spec(self.delay_ms, 0.0, self.rate_mbit, self.loss)?;
        link.queue = QueueLimit::Auto;
        Ok(link)
    }

    fn reps(&self) -> usize {
        self.reps.unwrap_or(if self.quick { 1 } else { 3 }).max(1)
    }

    fn cairn(&self) -> PathBuf {
        self.cairn.clone().unwrap_or_else(default_cairn)
    }

    /// The link self-check (skipped with --skip-check or --quick).
    fn check(&self, link: LinkSpec) -> Result<Option<CheckReport>> {
        link_check(self.skip_check || self.quick, link, self.check_duration_s)
    }
}

#[derive(Debug, clap::Args)]
struct VmNbdArgs {
    #[command(flatten)]
    common: ScenarioArgs,
    /// Size of the raw disk image in MiB (default 256; 32 with --quick).
    #[arg(long)]
    image_mib: Option<u64>,
    /// MiB of real files in it (default 5/8 of the image).
    #[arg(long)]
    file_mib: Option<u64>,
    /// Percent of the image's 4 KiB blocks the boot-like trace reads.
    #[arg(long, default_value_t = 3.0)]
    trace_pct: f64,
    /// Seed of the trace.
    #[arg(long, default_value_t = 1)]
    trace_seed: u64,
    /// QUIC congestion controller of both Cairn nodes: bbr (default: the
    /// copy-first TCP baseline uses the host's default, usually bbr here;
    /// with cubic the 0.5% loss starves Cairn, see scenario 1) or cubic.
    #[arg(long, default_value = "bbr")]
    congestion: String,
}

#[derive(Debug, clap::Args)]
struct ImageUpdateArgs {
    #[command(flatten)]
    common: ScenarioArgs,
    /// MiB of real files in the image before compression (default 320; 8
    /// with --quick).
    #[arg(long)]
    image_mib: Option<u64>,
    /// Layers (default 4; 2 with --quick).
    #[arg(long)]
    layers: Option<usize>,
    /// v2 changes every N-th file by sorted path (20: 5% of the files).
    #[arg(long, default_value_t = 20)]
    change_every: usize,
    /// Uncompressed tar layers (both versions) instead of gzip.
    #[arg(long)]
    uncompressed: bool,
    /// Contestants in run order, comma-separated: cairn (node default
    /// CUBIC), cairn-bbr (both Cairn nodes with --congestion bbr), direct,
    /// proxy.
    #[arg(long, value_delimiter = ',', default_value = "cairn-bbr,direct,proxy")]
    contestants: Vec<String>,
}

#[derive(Debug, clap::Args)]
struct ColdPullArgs {
    #[command(flatten)]
    common: ScenarioArgs,
    /// MiB of real files in the image before gzip (default 320; 8 with --quick).
    #[arg(long)]
    image_mib: Option<u64>,
    /// Layers (default 4; 2 with --quick).
    #[arg(long)]
    layers: Option<usize>,
    /// Contestants in run order, comma-separated: cairn, cairn-bbr (both
    /// Cairn nodes with --congestion bbr), direct, proxy.
    #[arg(long, value_delimiter = ',', default_value = "cairn,direct,proxy")]
    contestants: Vec<String>,
}

#[derive(Debug, clap::Args)]
struct CheckArgs {
    /// One-way delay in ms (RTT is twice this).
    #[arg(long, default_value_t = 25.0)]
    delay_ms: f64,
    /// Jitter in ms (extra delay, uniform in [0, jitter]).
    #[arg(long, default_value_t = 0.0)]
    jitter_ms: f64,
    /// Rate in Mbit/s (IP bytes).
    #[arg(long, default_value_t = 100.0)]
    rate_mbit: f64,
    /// Random loss in percent.
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Reordering probability in percent.
    #[arg(long, default_value_t = 0.0)]
    reorder: f64,
    /// Queue limit in ms of the rate (default: one BDP, at least 50 ms).
    #[arg(long)]
    queue_ms: Option<u64>,
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 8)]
    duration_s: u64,
    /// Ignore the link flags and run the standard set: 50 ms / 100 Mbit/s /
    /// 0%, 50 ms / 100 Mbit/s / 0.5%, 10 ms / 1000 Mbit/s / 0%.
    #[arg(long)]
    standard: bool,
    /// Directory for wan-check-DATE.{md,json}.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Suffix for the file names (wan-check-DATE-SUFFIX.md).
    #[arg(long)]
    suffix: Option<String>,
    /// Do not write files, only print.
    #[arg(long)]
    no_write: bool,
}

fn spec(delay_ms: f64, jitter_ms: f64, rate_mbit: f64, loss_pct: f64) -> Result<LinkSpec> {
    Ok(LinkSpec {
        delay: Duration::try_from_secs_f64(delay_ms / 1e3).context("--delay-ms")?,
        jitter: Duration::try_from_secs_f64(jitter_ms / 1e3).context("--jitter-ms")?,
        rate_bps: (rate_mbit * 1e6) as u64,
        loss: loss_pct / 100.0,
        ..LinkSpec::default()
    })
}

/// This process's command line, as `cairn-wan ARGS`.
fn command_line() -> String {
    std::iter::once("cairn-wan".to_owned())
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The link self-check of a scenario, unless `skip`.
fn link_check(skip: bool, link: LinkSpec, duration_s: u64) -> Result<Option<CheckReport>> {
    if skip {
        return Ok(None);
    }
    eprintln!("self-check of the link {} ...", short_spec(&link));
    let mut c = CheckConfig::new(link);
    c.duration = Duration::from_secs(duration_s.max(3));
    let r = run_check(&c).context("link self-check")?;
    eprintln!("{}", r.to_markdown());
    Ok(Some(r))
}

/// The report's link self-check section.
fn check_section(check: Option<&CheckReport>, link: &LinkSpec) -> String {
    match check {
        Some(r) => format!(
            "## Link self-check ({})\n\nOverall: **{}**\n\n{}\n",
            short_spec(link),
            if r.passed() { "PASS" } else { "FAIL" },
            r.to_markdown()
        ),
        None => "Link self-check: skipped.\n\n".to_owned(),
    }
}

/// Where a scenario writes its report: `--out`, else bench/results unless
/// `--quick`.
fn out_dir(out: Option<PathBuf>, quick: bool) -> Option<PathBuf> {
    match (out, quick) {
        (Some(o), _) => Some(o),
        (None, false) => Some(PathBuf::from("bench/results")),
        (None, true) => None,
    }
}

/// Writes `NAME-DATE[-SUFFIX].{md,json}` into `out`.
fn write_report(
    out: &std::path::Path,
    name: &str,
    date: &str,
    suffix: Option<&str>,
    md: &str,
    json: &serde_json::Value,
) -> Result<()> {
    let stem = match suffix {
        Some(s) => format!("{name}-{date}-{s}"),
        None => format!("{name}-{date}"),
    };
    std::fs::create_dir_all(out)?;
    let md_path = out.join(format!("{stem}.md"));
    std::fs::write(&md_path, md)?;
    std::fs::write(
        out.join(format!("{stem}.json")),
        serde_json::to_string_pretty(json)?,
    )?;
    eprintln!("wrote {}", md_path.display());
    Ok(())
}

/// YYYY-MM-DD (UTC) from the system clock.
fn today() -> String {
    let days = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400) as i64;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

fn check(args: CheckArgs) -> Result<()> {
    let specs = if args.standard {
        vec![
            spec(25.0, 0.0, 100.0, 0.0)?,
            spec(25.0, 0.0, 100.0, 0.5)?,
            spec(5.0, 0.0, 1000.0, 0.0)?,
        ]
    } else {
        let mut s = spec(args.delay_ms, args.jitter_ms, args.rate_mbit, args.loss)?;
        s.reorder = args.reorder / 100.0;
        if let Some(ms) = args.queue_ms {
            s.queue = QueueLimit::Millis(ms);
        }
        vec![s]
    };
    let machine = Machine::collect();
    let command = command_line();
    let date = today();
    let mut reports: Vec<CheckReport> = Vec::new();
    for s in specs {
        eprintln!("checking {} ...", short_spec(&s));
        let mut cfg = CheckConfig::new(s);
        cfg.duration = Duration::from_secs(args.duration_s.max(3));
        let r = run_check(&cfg).with_context(|| format!("self-check of {}", short_spec(&s)))?;
        eprintln!("{}", r.to_markdown());
        reports.push(r);
    }
    let ceiling = if args.standard {
        eprintln!("measuring the forwarder ceiling ...");
        Some(forwarder_ceiling(Duration::from_secs(
            args.duration_s.max(3),
        ))?)
    } else {
        None
    };
    let all_pass = reports.iter().all(CheckReport::passed);
    let mut md = format!(
        "# WAN emulator self-check, {date}\n\nCommand (as root; the binary from `cargo build --release -p cairn-wan`): `{command}`\n\nMachine: {} CPUs ({}), kernel {}, {}, TCP congestion control {}, load average {} at the start.\n\n\
         Each link is measured against its own settings: ping RTT, iperf3 TCP bulk (judged at 0% loss only), \
         iperf3 UDP at 110% of the rate (capacity) and at 80% (loss). Pass = within 10% (loss: see tolerance).\n\n\
         Overall: **{}**\n\n",
        machine.nproc,
        machine.cpu,
        machine.kernel,
        machine.iperf3,
        machine.tcp_congestion_control,
        machine.loadavg,
        if all_pass { "PASS" } else { "FAIL (see below)" }
    );
    let mut summary =
        "| link | RTT set/measured ms | TCP Mbit/s | UDP capacity Mbit/s | UDP loss % | result |\n|---|---|---|---|---|---|\n"
            .to_string();
    for r in &reports {
        let f = |i: usize| r.figures.get(i).map_or(f64::NAN, |f| f.measured);
        let s = |i: usize| r.figures.get(i).map_or(f64::NAN, |f| f.set);
        summary.push_str(&format!(
            "| {} | {:.1} / {:.1} | {:.1} | {:.1} | {:.3} (set {:.2}) | {} |\n",
            short_spec(&r.spec),
            s(0),
            f(0),
            f(1),
            f(2),
            f(3),
            s(3),
            if r.passed() { "PASS" } else { "FAIL" }
        ));
    }
    md.push_str(&summary);
    md.push('\n');
    if let Some(c) = &ceiling {
        md.push_str(&format!(
            "Forwarder ceiling (1 ms delay, no rate limit, iperf3 on the same {} CPUs): \
             TCP one stream {:.0} Mbit/s; UDP offered {:.0} Mbit/s, received {:.0} Mbit/s at IP level ({:.2}% lost).\n\n",
            machine.nproc, c.tcp_mbit, c.udp_offered_mbit, c.udp_received_mbit, c.udp_loss_pct
        ));
    }
    for r in &reports {
        md.push_str(&r.to_markdown());
        md.push('\n');
    }
    println!("{md}");
    if !args.no_write {
        let stem = match &args.suffix {
            Some(s) => format!("wan-check-{date}-{s}"),
            None => format!("wan-check-{date}"),
        };
        std::fs::create_dir_all(&args.out)?;
        let json = serde_json::json!({
            "date": date,
            "command": command,
            "machine": machine,
            "pass": all_pass,
            "forwarder_ceiling": ceiling,
            "runs": reports,
        });
        let md_path = args.out.join(format!("{stem}.md"));
        std::fs::write(&md_path, &md)?;
        std::fs::write(
            args.out.join(format!("{stem}.json")),
            serde_json::to_string_pretty(&json)?,
        )?;
        eprintln!("wrote {}", md_path.display());
    }
    if !all_pass {
        bail!("self-check failed");
    }
    Ok(())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpConfig {
    #[serde(default)]
    seed: u64,
    sites: Vec<String>,
    #[serde(default)]
    links: Vec<LinkCfg>,
    #[serde(default)]
    events: Vec<EventCfg>,
}

#[derive(Debug, Deserialize)]
struct LinkCfg {
    a: String,
    b: String,
    #[serde(flatten)]
    spec: LinkSpec,
}

#[derive(Debug, Deserialize)]
struct EventCfg {
    at_ms: u64,
    #[serde(flatten)]
    event: Event,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn up(path: PathBuf) -> Result<()> {
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    let cfg: UpConfig = toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
    let mut b = Wan::builder().seed(cfg.seed);
    for s in &cfg.sites {
        b = b.site(s);
    }
    for l in &cfg.links {
        b = b.link(&l.a, &l.b, l.spec);
    }
    for e in cfg.events {
        b = b.at(Duration::from_millis(e.at_ms), e.event);
    }
    let wan = b.start()?;
    for s in wan.sites() {
        println!(
            "site {s}: {} in netns {} (ip netns exec {} ...)",
            wan.addr(s)?,
            wan.netns(s)?,
            wan.netns(s)?
        );
    }
    println!("up; Ctrl-C to tear down");
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only stores to an atomic (async-signal-safe).
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
    while !STOP.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("tearing down");
    drop(wan);
    Ok(())
}

fn default_cairn() -> PathBuf {
    // bench/wan -> the workspace root.
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let p = target.join("release/cairn");
    if p.is_file() {
        p
    } else {
        root.join("target/release/cairn")
    }
}

fn cold_pull(a: ColdPullArgs) -> Result<()> {
    use cairn_wan::scenario::{run_cold_pull, ColdPullConfig};
    let c = &a.common;
    let link = c.link()?;
    let cfg = ColdPullConfig {
        spec: link,
        reps: c.reps(),
        image_file_bytes: a.image_mib.unwrap_or(if c.quick { 8 } else { 320 }) << 20,
        layers: a.layers.unwrap_or(if c.quick { 2 } else { 4 }).max(1),
        cairn: c.cairn(),
        contestants: a.contestants,
        tmp: c.tmp.clone(),
        pull_timeout: Duration::from_secs(c.timeout_s),
        seed: 1,
    };
    // Fail early and clearly on missing programs.
    cairn_wan::scenario::Tools::find(&cfg.cairn)?;
    let machine = Machine::collect();
    let command = command_line();
    let date = today();
    let check = c.check(link)?;
    let report = run_cold_pull(&cfg)?;
    let mut md = format!(
        "# Scenario 1: cold image pull at an edge, {date}\n\nCommand (as root; binary from `CARGO_TARGET_DIR=/tmp/wan-target cargo build --release -p cairn-wan`): `{command}`\n\nMachine: {} CPUs ({}), kernel {}, TCP congestion control {} (namespaces inherit it: docker-registry and skopeo use it), load average {} at the start.\n\n",
        machine.nproc, machine.cpu, machine.kernel, machine.tcp_congestion_control, machine.loadavg
    );
    md.push_str(&check_section(check.as_ref(), &link));
    md.push_str("## Result\n\n");
    md.push_str(&report.to_markdown());
    md.push_str(
        "\n## Method\n\nSites `core` (10.99.0.1) and `edge` (10.99.0.2) are network namespaces joined by the cairn-wan userspace link emulator. The image is pushed inside the core namespace (loopback) to a Cairn core node and to docker-registry. Per rep, in the order of `--contestants`: a fresh edge server (fresh data/cache dir) where there is one, then `skopeo --insecure-policy copy --src-tls-verify=false docker://HOST:PORT/bench/img:v1 dir:OUT` in the edge namespace, timed as the wall time of the skopeo process; then the pull is verified (sha256 of every blob, blob set, manifest digest), untimed. Utilisation = image bytes × 8 / seconds / link rate (for a pull killed at the timeout: IP bytes delivered core→edge × 8 / seconds / rate). WAN bytes are IP bytes the link model delivered core→edge during the pull.\n",
    );
    println!("{md}");
    if let Some(out) = out_dir(c.out.clone(), c.quick) {
        let json = serde_json::json!({
            "date": date,
            "command": command,
            "machine": machine,
            "link_check": check,
            "result": report,
            "summary": {
                "image_bytes": report.image.bytes(),
                "secs": report.config.contestants.iter().map(|c| (c.clone(), serde_json::json!(cairn_wan::scenario::Stats::of(&report.secs(c))))).collect::<serde_json::Map<_, _>>(),
                "utilisation": report.config.contestants.iter().map(|c| (c.clone(), serde_json::json!(report.utilisation(c)))).collect::<serde_json::Map<_, _>>(),
                "ratio_cairn_direct": report.ratio("cairn", "direct"),
                "ratio_cairn_proxy": report.ratio("cairn", "proxy"),
                "ratio_cairn_bbr_direct": report.ratio("cairn-bbr", "direct"),
                "ratio_cairn_bbr_proxy": report.ratio("cairn-bbr", "proxy"),
                "target_met_cairn": report.target_met(),
            },
        });
        write_report(
            &out,
            "wan-scenario1",
            &date,
            c.suffix.as_deref(),
            &md,
            &json,
        )?;
    }
    Ok(())
}

fn image_update(a: ImageUpdateArgs) -> Result<()> {
    use cairn_wan::image_update::{run_image_update, ImageUpdateConfig};
    use cairn_wan::scenario::Stats;
    let c = &a.common;
    let link = c.link()?;
    let cfg = ImageUpdateConfig {
        spec: link,
        reps: c.reps(),
        image_file_bytes: a.image_mib.unwrap_or(if c.quick { 8 } else { 320 }) << 20,
        layers: a.layers.unwrap_or(if c.quick { 2 } else { 4 }).max(1),
        change_every: a.change_every.max(1),
        uncompressed: a.uncompressed,
        cairn: c.cairn(),
        contestants: a.contestants,
        tmp: c.tmp.clone(),
        pull_timeout: Duration::from_secs(c.timeout_s),
        seed: 1,
    };
    // Fail early and clearly on missing programs.
    cairn_wan::scenario::Tools::find(&cfg.cairn)?;
    let machine = Machine::collect();
    let command = command_line();
    let date = today();
    let check = c.check(link)?;
    let report = run_image_update(&cfg)?;
    let mut md = format!(
        "# Scenario 2: image update v1 → v2 at an edge, {date}\n\nCommand (as root; binary from `CARGO_TARGET_DIR=/tmp/wan-target cargo build --release -p cairn-wan`): `{command}`\n\nMachine: {} CPUs ({}), kernel {}, TCP congestion control {} (namespaces inherit it: docker-registry and skopeo use it), load average {} at the start.\n\n",
        machine.nproc, machine.cpu, machine.kernel, machine.tcp_congestion_control, machine.loadavg
    );
    md.push_str(&check_section(check.as_ref(), &link));
    md.push_str("## Result\n\n");
    md.push_str(&report.to_markdown());
    let _ = write!(
        md,
        "\n## Method\n\nSites `core` (10.99.0.1) and `edge` (10.99.0.2) are network namespaces joined by the cairn-wan userspace link emulator. \
         **The images.** v1 is scenario 1's image: real files from /usr (sorted paths, round robin over the sources), split over the layers by cumulative size, \
         each layer made by copying its files into an umoci bundle, pinning every file's and directory's times (`touch -h -d @1700000000`) and `umoci repack` \
         ({}). v2 is built the same way from the same files into the same layers, except that every {}th file by sorted path (indices {}, {}, …) \
         has up to 4 KiB in its middle rewritten and 256 bytes appended (splitmix64 bytes seeded by the file's index; its size changes, so the rest of the layer's tar shifts). \
         {} of the {} layers hold changed files, so their digests change. \
         Both versions are pushed as `bench/img:v1` and `bench/img:v2` inside the core namespace (loopback; checked not to cross the link) to a Cairn core node per Cairn contestant and to docker-registry. \
         **Per rep and contestant** (in the order of `--contestants`), with a fresh edge server (fresh data/cache dir) where there is one: \
         a **warm-up**, untimed, `skopeo --insecure-policy copy --src-tls-verify=false docker://HOST:PORT/bench/img:v1 oci:OUT:v1` in the edge namespace, verified; \
         then, once the link has carried less than 64 KiB in a second (up to 20 s), the **update** `skopeo … copy … docker://HOST:PORT/bench/img:v2 oci:OUT:v2` into the same layout, timed as the wall time of the skopeo process, \
         then verified untimed (the layout's index names v2's manifest digest under `v2`; manifest, config and every layer present with the right size and sha256). \
         After the warm-up the edge side holds v1 on every path: the Cairn edge's chunk store holds v1's chunks (it served v1 and fetched what it lacked from its parent), \
         the pull-through cache holds v1's blobs, and the local `oci:` layout holds v1's blobs for every contestant alike. \
         skopeo (1.9.3) does reuse an `oci:` destination: a layer blob whose file is already in the layout's `blobs/sha256/` is not fetched \
         (checked against docker-registry's access log: a second pull of the same image into the layout GETs the manifest and the config only); \
         the table counts v2 layers whose file was in the layout before the pull and untouched after it as skipped. \
         Here v2 shares {} of its {} blobs (config + layers) with v1, so on the direct and proxy paths {:.1} MiB of v2's {:.1} MiB have to cross the link; \
         only Cairn can reuse parts of changed layers, through content-defined chunks (FastCDC, 64 KiB average) its edge already holds. \
         WAN bytes are IP bytes the link model delivered core→edge during the v2 pull (headers, retransmissions and requests' answers included); \
         for Cairn the edge's `cairn_transport_peer_bytes_in_total` gained during the pull is listed too. Ratios are of the medians over the reps.\n",
        if report.config.uncompressed {
            "then `skopeo copy --dest-decompress` into `dir:` and `skopeo copy --dest-oci-accept-uncompressed-layers` back into an `oci:` layout: \
             uncompressed tar layers, pushed with curl (POST and PUT per blob, PUT of the manifest) because skopeo gzips uncompressed layers on their way to a registry; \
             every pull below adds `--dest-oci-accept-uncompressed-layers`, else skopeo gzips them into the `oci:` layout"
        } else {
            "gzip layers, as umoci writes them"
        },
        report.config.change_every,
        report.config.change_every - 1,
        2 * report.config.change_every - 1,
        report.changed_layers(),
        report.v2.layers.len(),
        report.v2.layers.len() + 1 - report.changed_layers() - usize::from(report.v1.config.digest != report.v2.config.digest),
        report.v2.layers.len() + 1,
        report.new_blob_bytes() as f64 / (1 << 20) as f64,
        report.v2.bytes() as f64 / (1 << 20) as f64,
    );
    println!("{md}");
    if let Some(out) = out_dir(c.out.clone(), c.quick) {
        let who = |f: &dyn Fn(&str) -> serde_json::Value| {
            report
                .config
                .contestants
                .iter()
                .map(|c| (c.clone(), f(c)))
                .collect::<serde_json::Map<_, _>>()
        };
        let ratios = report
            .pairs()
            .into_iter()
            .map(|(x, y)| {
                (
                    format!("{x}/{y}"),
                    serde_json::json!({
                        "time": report.time_ratio(x, y),
                        "wan_bytes": report.wan_ratio(x, y),
                    }),
                )
            })
            .collect::<serde_json::Map<_, _>>();
        let json = serde_json::json!({
            "date": date,
            "command": command,
            "machine": machine,
            "link_check": check,
            "result": report,
            "summary": {
                "v1_bytes": report.v1.bytes(),
                "v2_bytes": report.v2.bytes(),
                "v2_new_blob_bytes": report.new_blob_bytes(),
                "changed_layers": report.changed_layers(),
                "changed_files": report.v2.changed_files,
                "secs": who(&|c| serde_json::json!(Stats::of(&report.secs(c)))),
                "wan_bytes_core_to_edge": who(&|c| serde_json::json!(Stats::of(&report.wan_bytes(c)))),
                "ratios_of_medians": ratios,
            },
        });
        write_report(
            &out,
            "wan-scenario2",
            &date,
            c.suffix.as_deref(),
            &md,
            &json,
        )?;
    }
    Ok(())
}

fn vm_nbd(a: VmNbdArgs) -> Result<()> {
    use cairn_wan::scenario::Stats;
    use cairn_wan::vm_nbd::{run_vm_nbd, VmNbdConfig, VmTools};
    let c = &a.common;
    let link = c.link()?;
    let image_mib = a.image_mib.unwrap_or(if c.quick { 32 } else { 256 });
    let cfg = VmNbdConfig {
        spec: link,
        reps: c.reps(),
        image_bytes: image_mib << 20,
        file_bytes: a.file_mib.unwrap_or(image_mib * 5 / 8) << 20,
        cairn: c.cairn(),
        congestion: a.congestion,
        tmp: c.tmp.clone(),
        timeout: Duration::from_secs(c.timeout_s),
        seed: 1,
        trace_seed: a.trace_seed,
        trace_fraction: a.trace_pct / 100.0,
    };
    // Fail early and clearly on missing programs.
    VmTools::find(&cfg.cairn)?;
    let machine = Machine::collect();
    let command = command_line();
    let date = today();
    let check = c.check(link)?;
    let report = run_vm_nbd(&cfg)?;
    let mut md = format!(
        "# Scenario 3: a VM image at an edge over NBD, {date}\n\nCommand (as root; binary from `CARGO_TARGET_DIR=/tmp/wan-target cargo build --release -p cairn-wan`): `{command}`\n\nMachine: {} CPUs ({}), kernel {}, TCP congestion control {} (namespaces inherit it: qemu-nbd and nbdcopy use it), load average {} at the start.\n\n",
        machine.nproc, machine.cpu, machine.kernel, machine.tcp_congestion_control, machine.loadavg
    );
    md.push_str(&check_section(check.as_ref(), &link));
    md.push_str("## Result\n\n");
    md.push_str(&report.to_markdown());
    md.push_str(
        "\n## Method\n\nSites `core` (10.99.0.1) and `edge` (10.99.0.2) are network namespaces joined by the cairn-wan userspace link emulator. \
         The disk image is a raw ext4 file system made by `mkfs.ext4 -F -q -b 4096 -U UUID -E root_owner=0:0,hash_seed=UUID -d TREE` (with `E2FSPROGS_FAKE_TIME`) \
         over a tree of real files (the cold-pull scenario's selection: sorted paths, round robin over /usr sources) whose times are pinned (`touch -h -d @1700000000`; inode ctimes afterwards with `debugfs -w -f CMDS`, `sif <INO> ctime @1700000000`), \
         so the same files give the same image byte for byte (the sha256 above); it is built once and cached. \
         A Cairn core node imports it inside the core namespace (`cairn image import`, loopback); `qemu-nbd -r -t -e 8` serves the same raw file at the core on 10.99.0.1:10810. \
         Per rep, in the edge namespace and in this order: **copy-full** `nbdcopy nbd://10.99.0.1:10810/img LOCAL` (the copy-first transfer, a plain NBD-over-TCP copy of the raw file across the link; verified with `cmp`); \
         **copy-trace** the trace replayed with `qemu-io -r -f raw -c 'read -q OFF LEN' -c 'sleep MS' … LOCAL` (page cache warm, as right after the copy); \
         **cairn-full** a fresh Cairn edge node (fresh data dir, `--parent core@10.99.0.1:7443`, NBD and API on its loopback), then `nbdcopy nbd://127.0.0.1:10809/image/NAME null:` (verified untimed with `qemu-img compare` against the original; \
         the destination is nbdcopy's `null:`, not `/dev/null`, because nbdcopy writes a `/dev/null` destination synchronously, one request at a time, \
         which serialises the reads while the copy-first path's regular-file destination gets nbdcopy's usual parallel requests); \
         **cairn-warm** right after that (same edge node, image now complete there: every read local) the same qemu-io replay against its export: warm local; \
         then three more fresh edge nodes (fresh data dirs), each replaying the trace once against its export: \
         **cairn-lazy** with `[prefetch] enabled = false` (chunks fetched on demand only), **cairn-profile** with the defaults (`enabled = true`, `use_profile = true`, lead 16M, 32 chunks in flight), \
         **cairn-successors** with `use_profile = false` (successor model only). The edge nodes get these settings from a `--config` TOML file (`version = 1` plus `[prefetch]`; cairn-full uses the defaults too). \
         Before the reps, the trace is replayed once with qemu-io against the core's own export (core namespace, loopback) as training: the core records the access trace and publishes `prefetch/<OBJECT>` from it, \
         which each edge fetches (background priority) when its export opens; the scenario waits until the core's `GET /api/v1/vm-images/NAME/traces` lists the trace, then 2 s. \
         Every step is the wall time of its client process (connection set-up included). \
         Replays run as `stdbuf -oL qemu-io …`: every read is quiet (`read -q`) except the trace's first file-extent read (the first read beyond the image's head), whose completion line `read N/N bytes at offset X` \
         the harness timestamps as it arrives on the pipe: **first useful work** (DADI-style) = seconds from spawning the replay until that line. \
         After each Cairn step the harness waits 0.3 s, then polls the edge's `/metrics` (every 0.1 s, up to 10 s) until `cairn_prefetch_active` is 0, so the export has closed and unread prefetched bytes count as wasted. \
         Targets (issue 6/8), judged on the median of the per-rep ratios: cairn-profile / cairn-warm ≤ 1.3; cairn-lazy / cairn-profile ≥ 3; prefetch wasted / fetched bytes (cairn-profile) ≤ 10%. \
         Ratio (a) = cairn-full / copy-full; ratio (b) = cairn-lazy / (copy-full + copy-trace); ratio (c) = cairn-profile / (copy-full + copy-trace); all per rep, then min / median / max over the reps. \
         WAN bytes are IP bytes the link model delivered core→edge during the step; the edge's `/metrics` give `cairn_nbd_fetched_bytes_total` (demand fetches), `cairn_transport_peer_bytes_in_total`, `cairn_nbd_image_reads_total{source}`, `cairn_nbd_demand_fetch_seconds`, `cairn_prefetch_bytes_total{outcome}` and `cairn_prefetch_reads_total{kind}`. \
         nbdcopy skips ranges the server reports as holes (qemu-nbd: the sparse file's holes; Cairn: all-zero chunks) on both paths.\n\n\
         The trace: deterministic (splitmix64, the seed above) over the blocks holding data; about the given percentage of the image's 4 KiB blocks, \
         two thirds in the head of the image (its first 1/8: superblock, group descriptors, bitmaps, inode tables, directories, first small files; positions biased to its start, runs of 1–8 blocks), \
         one third as file extents beyond it (runs of 8–64 blocks, read in pieces of at most 128 KiB); a read of blocks all read before is dropped (a guest's page cache absorbs it). \
         It starts with the superblock and group descriptors and a burst of head reads (mount), \
         then each file extent follows 1–3 head reads (path lookups; more while the head lags its share); 0–2 ms of think time after each read; one request at a time, in order.\n",
    );
    println!("{md}");
    if let Some(out) = out_dir(c.out.clone(), c.quick) {
        let secs = cairn_wan::vm_nbd::STEPS
            .iter()
            .map(|(w, _)| {
                (
                    (*w).to_owned(),
                    serde_json::json!(Stats::of(&report.secs(w))),
                )
            })
            .collect::<serde_json::Map<_, _>>();
        let first_work = [
            "cairn-warm",
            "cairn-lazy",
            "cairn-profile",
            "cairn-successors",
            "copy-first",
        ]
        .iter()
        .map(|w| {
            (
                (*w).to_owned(),
                serde_json::json!(Stats::of(&report.first_work(w))),
            )
        })
        .collect::<serde_json::Map<_, _>>();
        let json = serde_json::json!({
            "date": date,
            "command": command,
            "machine": machine,
            "link_check": check,
            "result": report,
            "summary": {
                "image_bytes": report.image.bytes,
                "trace_distinct_blocks": report.trace.distinct_blocks,
                "secs": secs,
                "copy_first_trace_secs": Stats::of(&report.copy_first_trace_secs()),
                "ratio_full_cairn_copy_first": Stats::of(&report.ratios_full()),
                "ratio_trace_cairn_copy_first": Stats::of(&report.ratios_trace()),
                "ratio_trace_profile_copy_first": Stats::of(&report.ratios("cairn-profile", "copy-first")),
                "prefetch_targets": report.targets().into_iter().map(|(what, target, v, pass)| {
                    serde_json::json!({
                        "what": what,
                        "target": target,
                        "per_rep": v,
                        "stats": Stats::of(&v),
                        "pass": pass,
                    })
                }).collect::<Vec<_>>(),
                "first_useful_work_secs": first_work,
                "wan_bytes_core_to_edge_median": cairn_wan::vm_nbd::STEPS
                    .iter()
                    .map(|(w, _)| ((*w).to_owned(), serde_json::json!(report.wan_bytes(w))))
                    .collect::<serde_json::Map<_, _>>(),
            },
        });
        write_report(
            &out,
            "wan-scenario3",
            &date,
            c.suffix.as_deref(),
            &md,
            &json,
        )?;
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if !cairn_wan::sys::is_root() {
        eprintln!("cairn-wan: needs root for network namespaces and TUN; run as root");
        return std::process::ExitCode::from(2);
    }
    let res = match cli.cmd {
        Cmd::Check(a) => check(a),
        Cmd::Up { config } => up(config),
        Cmd::Clean => cairn_wan::sys::remove_stale()
            .map(|names| {
                for n in &names {
                    println!("removed {n}");
                }
                println!("{} stale namespaces removed", names.len());
            })
            .map_err(Into::into),
        Cmd::Scenario {
            which: ScenarioCmd::ColdPull(a),
        } => cold_pull(a),
        Cmd::Scenario {
            which: ScenarioCmd::ImageUpdate(a),
        } => image_update(a),
        Cmd::Scenario {
            which: ScenarioCmd::VmNbd(a),
        } => vm_nbd(a),
    };
    match res {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cairn-wan: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
