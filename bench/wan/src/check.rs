//! The self-check: build two sites joined by one link and measure the link
//! against its own settings with `ping` and `iperf3`.
//!
//! * **RTT**: mean `ping` RTT vs `2 × delay + jitter` (the mean of two
//!   uniform `[0, jitter]` draws is `jitter`). Pass within 10%.
//! * **TCP**: iperf3 bulk transfer, receiver goodput vs the rate (the rate
//!   counts IP bytes, so goodput tops out ~3.5% below it). Judged only when
//!   loss is 0: with random loss, TCP throughput is bounded by the loss rate
//!   (Mathis), not the link; it is then reported but not judged.
//! * **UDP capacity**: iperf3 UDP offered at 110% of the rate; the received
//!   IP-level rate vs `rate × (1 − loss)`. Pass within 10%.
//! * **UDP loss**: iperf3 UDP offered at 80% of the rate (no queue drops);
//!   measured loss vs the setting. Pass within max(10% of the setting,
//!   3 binomial standard deviations) + 0.05 percentage points.

use std::time::Duration;

use serde::Serialize;

use crate::model::LinkSpec;
use crate::wan::{Wan, WanError};

/// Errors from the self-check.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// Building or driving the WAN failed.
    #[error(transparent)]
    Wan(#[from] WanError),
    /// A required tool is missing.
    #[error("{0} not found; install it (Debian: apt-get install -y iputils-ping iperf3)")]
    MissingTool(&'static str),
    /// A tool's output could not be understood.
    #[error("{tool}: {detail}")]
    Output {
        /// The tool.
        tool: &'static str,
        /// What went wrong, with the output's tail.
        detail: String,
    },
}

/// What to check.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct CheckConfig {
    /// The link, applied in both directions.
    pub spec: LinkSpec,
    /// Length of each iperf3 run.
    pub duration: Duration,
    /// Number of pings.
    pub pings: u32,
    /// Seed for the link models.
    pub seed: u64,
}

impl CheckConfig {
    /// Defaults: 8 s per iperf3 run, 20 pings, seed 1.
    pub fn new(spec: LinkSpec) -> Self {
        Self {
            spec,
            duration: Duration::from_secs(8),
            pings: 20,
            seed: 1,
        }
    }
}

/// One measured figure against its setting.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    /// What it is.
    pub name: String,
    /// Unit of `set` and `measured`.
    pub unit: &'static str,
    /// The setting (what the measurement should show).
    pub set: f64,
    /// The measurement.
    pub measured: f64,
    /// Allowed absolute deviation.
    pub tolerance: f64,
    /// `Some(pass)` when judged; `None` when only reported.
    pub pass: Option<bool>,
    /// How it was measured / why it is not judged.
    pub note: String,
}

impl Figure {
    fn judged(
        name: &str,
        unit: &'static str,
        set: f64,
        measured: f64,
        tol: f64,
        note: &str,
    ) -> Self {
        Self {
            name: name.into(),
            unit,
            set,
            measured,
            tolerance: tol,
            pass: Some((measured - set).abs() <= tol),
            note: note.into(),
        }
    }
}

/// The outcome of one self-check.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    /// The link that was checked.
    pub spec: LinkSpec,
    /// iperf3 run length in seconds.
    pub duration_s: f64,
    /// The figures.
    pub figures: Vec<Figure>,
    /// Model counters, a→b direction (client to server).
    pub a_to_b: crate::model::DirStats,
    /// Model counters, b→a direction.
    pub b_to_a: crate::model::DirStats,
    /// Forwarder counters.
    pub forwarder: crate::wan::ForwarderStats,
    /// Packets the kernel dropped at the TUN devices' transmit queues of
    /// sites a and b (the forwarder not reading fast enough), not the model.
    pub tun_tx_dropped: [u64; 2],
    /// Forwarder CPU during the TCP run, in cores (1.0 = one core busy).
    pub forwarder_cpu_tcp: f64,
}

impl CheckReport {
    /// Whether every judged figure passed.
    pub fn passed(&self) -> bool {
        self.figures.iter().all(|f| f.pass != Some(false))
    }

    /// The spec in one line.
    pub fn spec_line(&self) -> String {
        let s = &self.spec;
        format!(
            "one-way delay {} ms (RTT {} ms), jitter {} ms, rate {} Mbit/s, loss {}%, reorder {}%, queue {} bytes",
            s.delay.as_secs_f64() * 1e3,
            s.delay.as_secs_f64() * 2e3,
            s.jitter.as_secs_f64() * 1e3,
            s.rate_bps as f64 / 1e6,
            s.loss * 100.0,
            s.reorder * 100.0,
            s.queue_bytes().map_or("unlimited".into(), |b| b.to_string()),
        )
    }

    /// A Markdown section (a heading, the spec, a table).
    pub fn to_markdown(&self) -> String {
        let mut md = format!(
            "### {}\n\n{}; iperf3 runs of {} s.\n\n| check | set | measured | tolerance | result | how |\n|---|---|---|---|---|---|\n",
            short_spec(&self.spec),
            self.spec_line(),
            self.duration_s
        );
        for f in &self.figures {
            let result = match f.pass {
                Some(true) => "PASS",
                Some(false) => "FAIL",
                None => "reported",
            };
            md.push_str(&format!(
                "| {} | {:.3} {} | {:.3} {} | ±{:.3} | {} | {} |\n",
                f.name, f.set, f.unit, f.measured, f.unit, f.tolerance, result, f.note
            ));
        }
        let fw = &self.forwarder;
        md.push_str(&format!(
            "\nModel a→b: {} offered, {} delivered, {} lost, {} tail-dropped. Forwarder: {} packets read, {} written, {} unroutable (IPv6 and the like), {} write errors; kernel TUN queue drops a/b: {}/{}. Forwarder CPU during the TCP run: {:.2} cores.\n",
            self.a_to_b.offered,
            self.a_to_b.delivered,
            self.a_to_b.dropped_loss,
            self.a_to_b.dropped_queue,
            fw.rx_packets,
            fw.tx_packets,
            fw.unroutable,
            fw.write_errors,
            self.tun_tx_dropped[0],
            self.tun_tx_dropped[1],
            self.forwarder_cpu_tcp
        ));
        md
    }
}

/// `50ms RTT / 100 Mbit/s / 0.5% loss`.
pub fn short_spec(s: &LinkSpec) -> String {
    format!(
        "{} ms RTT / {} Mbit/s / {}% loss",
        s.delay.as_secs_f64() * 2e3,
        s.rate_bps as f64 / 1e6,
        s.loss * 100.0
    )
}

fn which(tool: &'static str) -> Result<(), CheckError> {
    let found = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()));
    if found {
        Ok(())
    } else {
        Err(CheckError::MissingTool(tool))
    }
}

/// Whether `ping` and `iperf3` are on the PATH.
pub fn tools_present() -> Result<(), CheckError> {
    which("ping")?;
    which("iperf3")
}

fn tail(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(bytes);
    let t: String = s.chars().rev().take(400).collect();
    t.chars().rev().collect()
}

/// Mean RTT in ms from `ping -q` output, and the count received.
pub fn parse_ping(out: &str) -> Option<(f64, u32)> {
    let rtt = out
        .lines()
        .find(|l| l.starts_with("rtt ") || l.starts_with("round-trip"))?;
    let nums = rtt.split('=').nth(1)?.trim();
    let avg = nums.split('/').nth(1)?.trim().parse().ok()?;
    let received = out
        .lines()
        .find(|l| l.contains("received"))?
        .split(',')
        .find(|p| p.contains("received"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some((avg, received))
}

/// Pings `to` from `from`; returns (mean RTT ms, received, sent).
pub fn ping(wan: &Wan, from: &str, to: &str, count: u32) -> Result<Option<(f64, u32)>, CheckError> {
    which("ping")?;
    let dst = wan.addr(to)?.to_string();
    let mut cmd = wan.command(from, "ping")?;
    cmd.args([
        "-n",
        "-q",
        "-c",
        &count.to_string(),
        "-i",
        "0.2",
        "-W",
        "1",
        &dst,
    ]);
    let out = wan.output_timeout(cmd, Duration::from_secs(u64::from(count) / 5 + 5))?;
    Ok(parse_ping(&String::from_utf8_lossy(&out.stdout)))
}

/// An iperf3 server in a site, killed on drop.
#[derive(Debug)]
pub struct Iperf3Server {
    _guard: crate::wan::ChildGuard,
}

impl Iperf3Server {
    /// Starts `iperf3 -s` in `site` and waits until it listens.
    pub fn start(wan: &Wan, site: &str) -> Result<Self, CheckError> {
        which("iperf3")?;
        let mut cmd = wan.command(site, "iperf3")?;
        cmd.args(["-s", "-p", "5201"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let guard = wan.spawn(cmd)?;
        // Bounded wait for the listening socket (ss is in iproute2).
        for _ in 0..50 {
            let out = wan.run_in(site, "ss", ["-Htln", "sport = :5201"])?;
            if !out.stdout.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Self { _guard: guard })
    }
}

/// Runs an iperf3 client in `from` against the server in `to`; returns the
/// JSON document.
pub fn iperf3_client(
    wan: &Wan,
    from: &str,
    to: &str,
    args: &[String],
    duration: Duration,
) -> Result<serde_json::Value, CheckError> {
    let dst = wan.addr(to)?.to_string();
    let mut cmd = wan.command(from, "iperf3")?;
    cmd.args(["-c", &dst, "-p", "5201", "-J", "--connect-timeout", "3000"])
        .args(["-t", &duration.as_secs().max(1).to_string()])
        .args(args);
    let out = wan.output_timeout(cmd, duration + Duration::from_secs(20))?;
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| CheckError::Output {
            tool: "iperf3",
            detail: format!("{e}: {}{}", tail(&out.stdout), tail(&out.stderr)),
        })?;
    if let Some(err) = v.get("error").and_then(|e| e.as_str()) {
        return Err(CheckError::Output {
            tool: "iperf3",
            detail: err.to_owned(),
        });
    }
    Ok(v)
}

fn num(v: &serde_json::Value, path: &[&str]) -> Result<f64, CheckError> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p).ok_or_else(|| CheckError::Output {
            tool: "iperf3",
            detail: format!("no {} in the JSON", path.join(".")),
        })?;
    }
    cur.as_f64().ok_or_else(|| CheckError::Output {
        tool: "iperf3",
        detail: format!("{} is not a number", path.join(".")),
    })
}

/// UDP payload per datagram used by the check.
const UDP_PAYLOAD: f64 = 1400.0;
/// IP + UDP header bytes.
const UDP_OVERHEAD: f64 = 28.0;

/// Runs the whole self-check on a fresh two-site WAN ("a" client, "b" server).
pub fn run_check(cfg: &CheckConfig) -> Result<CheckReport, CheckError> {
    tools_present()?;
    let s = cfg.spec;
    let wan = Wan::builder()
        .site("a")
        .site("b")
        .link("a", "b", s)
        .seed(cfg.seed)
        .start()?;
    let mut figures = Vec::new();
    let rate_mbit = s.rate_bps as f64 / 1e6;

    // RTT.
    let set_rtt = (s.delay * 2 + s.jitter).as_secs_f64() * 1e3;
    let (rtt, received) = ping(&wan, "a", "b", cfg.pings)?.ok_or(CheckError::Output {
        tool: "ping",
        detail: "no replies".into(),
    })?;
    figures.push(Figure::judged(
        "RTT (ping)",
        "ms",
        set_rtt,
        rtt,
        set_rtt * 0.1,
        &format!("mean of {received}/{} replies, 0.2 s apart", cfg.pings),
    ));

    let _server = Iperf3Server::start(&wan, "b")?;
    let omit = if set_rtt > 100.0 { 3 } else { 2 };

    // TCP bulk.
    let (cpu0, wall0) = (process_cpu(), std::time::Instant::now());
    let tcp = iperf3_client(
        &wan,
        "a",
        "b",
        &["-O".into(), omit.to_string()],
        cfg.duration,
    )?;
    let tcp_mbit = num(&tcp, &["end", "sum_received", "bits_per_second"])? / 1e6;
    let forwarder_cpu_tcp =
        (process_cpu() - cpu0).as_secs_f64() / wall0.elapsed().as_secs_f64().max(1e-9);
    let mut fig = Figure::judged(
        "TCP goodput (iperf3)",
        "Mbit/s",
        rate_mbit,
        tcp_mbit,
        rate_mbit * 0.1,
        &format!("one stream, first {omit} s omitted (slow start); the rate counts IP bytes, so goodput tops out ~3.5% below it"),
    );
    let cc = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control")
        .unwrap_or_default()
        .trim()
        .to_owned();
    fig.note.push_str(&format!("; congestion control {cc}"));
    if s.loss > 0.0 {
        fig.pass = None;
        fig.note = format!(
            "not judged: under {}% random loss loss-based TCP is loss-bound, not rate-bound (Mathis ≈ {:.1} Mbit/s for Reno); congestion control here is {cc}",
            s.loss * 100.0,
            1448.0 * 8.0 / (set_rtt / 1e3) * (1.5f64).sqrt() / s.loss.sqrt() / 1e6
        );
    }
    figures.push(fig);

    // UDP capacity: offer 110% of the link at IP level.
    let payload_rate = |ip_fraction: f64| {
        (s.rate_bps as f64 * ip_fraction * UDP_PAYLOAD / (UDP_PAYLOAD + UDP_OVERHEAD)) as u64
    };
    let udp_args = |rate: u64| -> Vec<String> {
        vec![
            "-u".into(),
            "-l".into(),
            (UDP_PAYLOAD as u64).to_string(),
            "-b".into(),
            rate.to_string(),
            // Socket buffers big enough that the receiving host does not
            // drop at 1 Gbit/s (it did with the defaults).
            "-w".into(),
            "4M".into(),
        ]
    };
    let cap = iperf3_client(&wan, "a", "b", &udp_args(payload_rate(1.1)), cfg.duration)?;
    let (cap_mbit, cap_note) = udp_received_mbit(&cap)?;
    let cap_ip = cap_mbit * (UDP_PAYLOAD + UDP_OVERHEAD) / UDP_PAYLOAD;
    let cap_set = rate_mbit * (1.0 - s.loss);
    figures.push(Figure::judged(
        "UDP capacity (iperf3, 110% offered)",
        "Mbit/s",
        cap_set,
        cap_ip,
        cap_set * 0.1,
        &format!(
            "received, IP level ({} B datagrams); set = rate × (1 − loss); {cap_note}",
            UDP_PAYLOAD + UDP_OVERHEAD
        ),
    ));

    // UDP loss: offer 80% of the link.
    let host_drops_before = udp_rcvbuf_errors(&wan, "b");
    let model_before = wan.stats("a", "b")?;
    let lossrun = iperf3_client(&wan, "a", "b", &udp_args(payload_rate(0.8)), cfg.duration)?;
    let model_after = wan.stats("a", "b")?;
    let host_drops = udp_rcvbuf_errors(&wan, "b").saturating_sub(host_drops_before);
    let model_lost = (model_after.dropped_loss - model_before.dropped_loss)
        + (model_after.dropped_queue - model_before.dropped_queue);
    let lost = num(&lossrun, &["end", "sum", "lost_packets"])?;
    let packets = num(&lossrun, &["end", "sum", "packets"])?.max(1.0);
    let measured = lost / packets * 100.0;
    let set = s.loss * 100.0;
    let sigma = (s.loss * (1.0 - s.loss) / packets).sqrt() * 100.0;
    let tol = (0.1 * set).max(3.0 * sigma) + 0.05;
    figures.push(Figure::judged(
        "UDP loss (iperf3, 80% offered)",
        "%",
        set,
        measured,
        tol,
        &format!(
            "{lost} of {packets} datagrams lost ({model_lost} packets dropped by the model, {host_drops} by the receiving socket); tolerance max(10%, 3σ) + 0.05 pp"
        ),
    ));

    // Under loss, also show a loss-based congestion control (reported only).
    if s.loss > 0.0 {
        let cubic = iperf3_client(
            &wan,
            "a",
            "b",
            &["-O".into(), omit.to_string(), "-C".into(), "cubic".into()],
            cfg.duration,
        )?;
        let mbit = num(&cubic, &["end", "sum_received", "bits_per_second"])? / 1e6;
        figures.push(Figure {
            name: "TCP goodput, CUBIC (iperf3 -C cubic)".into(),
            unit: "Mbit/s",
            set: rate_mbit,
            measured: mbit,
            tolerance: rate_mbit * 0.1,
            pass: None,
            note: format!(
                "not judged: what a loss-based TCP gets under {}% random loss",
                s.loss * 100.0
            ),
        });
    }

    Ok(CheckReport {
        spec: s,
        duration_s: cfg.duration.as_secs_f64(),
        figures,
        a_to_b: wan.stats("a", "b")?,
        b_to_a: wan.stats("b", "a")?,
        forwarder: wan.forwarder_stats(),
        tun_tx_dropped: [tun_tx_dropped(&wan, "a"), tun_tx_dropped(&wan, "b")],
        forwarder_cpu_tcp,
    })
}

/// CPU time (user + system) used by this process so far: the forwarder's
/// threads, since the tools under test run as other processes.
fn process_cpu() -> Duration {
    // SAFETY: an all-zero rusage is valid; getrusage only writes into it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec.max(0) as u64) + Duration::from_micros(t.tv_usec.max(0) as u64)
    };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// The kernel's transmit-queue drops of a site's TUN device (0 if unreadable).
fn tun_tx_dropped(wan: &Wan, site: &str) -> u64 {
    let path = format!("/sys/class/net/{}/statistics/tx_dropped", crate::TUN_NAME);
    wan.run_in(site, "cat", [path])
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(0)
}

/// `RcvbufErrors` from `/proc/net/snmp` in a site (0 if unreadable).
fn udp_rcvbuf_errors(wan: &Wan, site: &str) -> u64 {
    let Ok(out) = wan.run_in(site, "cat", ["/proc/net/snmp"]) else {
        return 0;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let mut udp = text.lines().filter(|l| l.starts_with("Udp:"));
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

/// Received UDP payload rate in Mbit/s from an iperf3 UDP client JSON. The
/// receiver's figure is `end.sum_received` in newer iperf3; older ones
/// report the receiver's bytes via the server output, so fall back to
/// `end.sum` scaled by the packets that arrived.
fn udp_received_mbit(v: &serde_json::Value) -> Result<(f64, &'static str), CheckError> {
    if let Ok(bps) = num(v, &["end", "sum_received", "bits_per_second"]) {
        return Ok((bps / 1e6, "end.sum_received"));
    }
    let bps = num(v, &["end", "sum", "bits_per_second"])?;
    let lost = num(v, &["end", "sum", "lost_packets"])?;
    let packets = num(v, &["end", "sum", "packets"])?.max(1.0);
    Ok((
        bps * (1.0 - lost / packets) / 1e6,
        "end.sum × (1 − lost/packets)",
    ))
}

/// Facts about the machine for the report header.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// Logical CPUs.
    pub nproc: usize,
    /// `uname -r`.
    pub kernel: String,
    /// CPU model name.
    pub cpu: String,
    /// `iperf3 --version`, first line.
    pub iperf3: String,
    /// TCP congestion control new namespaces inherit (BBR shrugs off
    /// random loss; CUBIC and Reno do not).
    pub tcp_congestion_control: String,
    /// `/proc/loadavg` when the check started (other work on the machine).
    pub loadavg: String,
}

impl Machine {
    /// Collects the facts (best effort).
    pub fn collect() -> Self {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let cpu = read("/proc/cpuinfo")
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .unwrap_or("unknown")
            .trim()
            .to_owned();
        let iperf3 = std::process::Command::new("iperf3")
            .arg("--version")
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_owned()
            })
            .unwrap_or_else(|_| "not installed".into());
        Self {
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            cpu,
            iperf3,
            loadavg: read("/proc/loadavg")
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
            tcp_congestion_control: read("/proc/sys/net/ipv4/tcp_congestion_control")
                .trim()
                .to_owned(),
        }
    }
}

/// What the forwarder carries over an unlimited link (1 ms delay, no rate
/// limit), with iperf3 competing for the same CPUs.
#[derive(Debug, Clone, Serialize)]
pub struct Ceiling {
    /// One TCP stream, receiver goodput.
    pub tcp_mbit: f64,
    /// UDP offered by iperf3 (payload).
    pub udp_offered_mbit: f64,
    /// UDP received, IP level.
    pub udp_received_mbit: f64,
    /// UDP datagrams lost, percent.
    pub udp_loss_pct: f64,
}

/// Measures the forwarder's ceiling.
pub fn forwarder_ceiling(duration: Duration) -> Result<Ceiling, CheckError> {
    tools_present()?;
    let spec = LinkSpec {
        delay: Duration::from_millis(1),
        ..LinkSpec::default()
    };
    let wan = Wan::builder()
        .site("a")
        .site("b")
        .link("a", "b", spec)
        .start()?;
    let _server = Iperf3Server::start(&wan, "b")?;
    let tcp = iperf3_client(&wan, "a", "b", &["-O".into(), "1".into()], duration)?;
    let tcp_mbit = num(&tcp, &["end", "sum_received", "bits_per_second"])? / 1e6;
    let offered: u64 = 3_000_000_000;
    let args: Vec<String> = ["-u", "-l", "1400", "-w", "4M", "-b", &offered.to_string()]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let udp = iperf3_client(&wan, "a", "b", &args, duration)?;
    let (received, _) = udp_received_mbit(&udp)?;
    let sent = num(&udp, &["end", "sum", "bits_per_second"])? / 1e6;
    let lost = num(&udp, &["end", "sum", "lost_packets"])?;
    let packets = num(&udp, &["end", "sum", "packets"])?.max(1.0);
    Ok(Ceiling {
        tcp_mbit,
        udp_offered_mbit: sent,
        udp_received_mbit: received * (UDP_PAYLOAD + UDP_OVERHEAD) / UDP_PAYLOAD,
        udp_loss_pct: lost / packets * 100.0,
    })
}
