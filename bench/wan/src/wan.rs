//! The running WAN: namespaces, TUN devices, the forwarder threads and the
//! control handle.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::model::{DelayLine, DirStats, LinkDir, LinkSpec, SpecError, Verdict};
use crate::sys::{self, Netns};

/// Errors from building or driving a WAN.
#[derive(Debug, thiserror::Error)]
pub enum WanError {
    /// Not running as root.
    #[error("needs root for network namespaces and TUN; run as root")]
    NotRoot,
    /// A link spec is invalid.
    #[error("link {a}<->{b}: {source}")]
    Spec {
        /// One end.
        a: String,
        /// The other end.
        b: String,
        /// What is wrong.
        source: SpecError,
    },
    /// A site or interface name is unusable.
    #[error("invalid name {0:?}: use 1-24 characters of [A-Za-z0-9_-]")]
    InvalidName(String),
    /// A site was declared twice.
    #[error("site {0:?} declared twice")]
    DuplicateSite(String),
    /// A name that is not a site.
    #[error("no site named {0:?}")]
    UnknownSite(String),
    /// Two sites without a link.
    #[error("no link between {0:?} and {1:?}")]
    NoLink(String, String),
    /// A link was declared twice or from a site to itself.
    #[error("bad link {0:?}<->{1:?}: duplicate or a loop")]
    BadLink(String, String),
    /// More sites than the /24 can address.
    #[error("at most 253 sites")]
    TooManySites,
    /// A helper program could not be started.
    #[error("could not run {cmd}: {source}")]
    Spawn {
        /// The command.
        cmd: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A helper program failed.
    #[error("{cmd} failed ({status}): {stderr}")]
    Command {
        /// The command.
        cmd: String,
        /// Its exit status.
        status: String,
        /// Its stderr.
        stderr: String,
    },
    /// A system call failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}

impl WanError {
    pub(crate) fn io(context: &'static str, source: std::io::Error) -> Self {
        Self::Io { context, source }
    }
}

/// A scheduled change of the topology.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "action")]
pub enum Event {
    /// Cut the link between two sites (both directions).
    Cut {
        /// One end.
        a: String,
        /// The other end.
        b: String,
    },
    /// Restore the link between two sites (both directions).
    Restore {
        /// One end.
        a: String,
        /// The other end.
        b: String,
    },
}

/// The TUN device name inside every site namespace.
pub const TUN_NAME: &str = "wan0";
/// The first three octets of the emulated subnet; site `i` (0-based, in
/// declaration order) is `10.99.0.(i+1)/24`.
pub const SUBNET: [u8; 3] = [10, 99, 0];
/// How long blocking waits last before re-checking for shutdown.
const TICK: Duration = Duration::from_millis(50);
/// Packets due within this much of now leave together (saves wake-ups).
const RELEASE_SLACK: Duration = Duration::from_micros(20);
/// Largest IP packet read from a TUN.
const MAX_PACKET: usize = 65_536;

/// Builds a [`Wan`].
#[derive(Debug, Clone, Default)]
pub struct WanBuilder {
    sites: Vec<String>,
    links: Vec<(String, String, LinkSpec, LinkSpec)>,
    schedule: Vec<(Duration, Event)>,
    seed: u64,
}

impl WanBuilder {
    /// Adds a site (a network namespace with one TUN device).
    pub fn site(mut self, name: &str) -> Self {
        self.sites.push(name.to_owned());
        self
    }

    /// Adds a symmetric link: `spec` applies to each direction.
    pub fn link(self, a: &str, b: &str, spec: LinkSpec) -> Self {
        self.link_asym(a, b, spec, spec)
    }

    /// Adds a link with one spec for `a`→`b` and another for `b`→`a`.
    pub fn link_asym(mut self, a: &str, b: &str, a_to_b: LinkSpec, b_to_a: LinkSpec) -> Self {
        self.links
            .push((a.to_owned(), b.to_owned(), a_to_b, b_to_a));
        self
    }

    /// Schedules an event at `at` after start.
    pub fn at(mut self, at: Duration, event: Event) -> Self {
        self.schedule.push((at, event));
        self
    }

    /// Seeds the link models' RNGs (default 0).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Creates the namespaces and TUN devices and starts the forwarder.
    pub fn start(self) -> Result<Wan, WanError> {
        sys::require_root()?;
        let n = self.sites.len();
        if n > 253 {
            return Err(WanError::TooManySites);
        }
        let mut seen = HashSet::new();
        for s in &self.sites {
            valid_name(s)?;
            if !seen.insert(s.as_str()) {
                return Err(WanError::DuplicateSite(s.clone()));
            }
        }
        let index = |name: &str| -> Result<usize, WanError> {
            self.sites
                .iter()
                .position(|s| s == name)
                .ok_or_else(|| WanError::UnknownSite(name.to_owned()))
        };
        let mut dirs: Vec<Option<Arc<DirState>>> = (0..n * n).map(|_| None).collect();
        for (k, (a, b, ab, ba)) in self.links.iter().enumerate() {
            let (ia, ib) = (index(a)?, index(b)?);
            if ia == ib || dirs[ia * n + ib].is_some() || dirs[ib * n + ia].is_some() {
                return Err(WanError::BadLink(a.clone(), b.clone()));
            }
            for (from, to, spec, salt) in [(ia, ib, ab, 0u64), (ib, ia, ba, 1u64)] {
                let seed = self
                    .seed
                    .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                    .wrapping_add((k as u64) << 1 | salt);
                let model = LinkDir::new(*spec, seed).map_err(|source| WanError::Spec {
                    a: a.clone(),
                    b: b.clone(),
                    source,
                })?;
                dirs[from * n + to] = Some(Arc::new(DirState {
                    model: Mutex::new(model),
                    epoch: AtomicU64::new(0),
                }));
            }
        }
        for (_, ev) in &self.schedule {
            let (Event::Cut { a, b } | Event::Restore { a, b }) = ev;
            let (ia, ib) = (index(a)?, index(b)?);
            if dirs[ia * n + ib].is_none() {
                return Err(WanError::NoLink(a.clone(), b.clone()));
            }
        }

        // Namespaces and TUNs. Any error drops what was built so far.
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let tag = format!(
            "cwan{}x{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let mut sites = Vec::with_capacity(n);
        let mut fds = Vec::with_capacity(n);
        for (i, name) in self.sites.iter().enumerate() {
            let ns = Netns::create(&format!("{tag}-{name}"))?;
            let fd = ns.open_tun(TUN_NAME)?;
            let addr = site_addr(i);
            sys::configure_tun(&ns, TUN_NAME, &format!("{addr}/24"))?;
            sites.push(Site {
                name: name.clone(),
                addr,
                ns,
            });
            fds.push(Arc::new(fd));
        }

        let shared = Arc::new(Shared {
            start: Instant::now(),
            stop: AtomicBool::new(false),
            n,
            dirs,
            lines: (0..n).map(|_| Outbox::default()).collect(),
            counters: Counters::default(),
        });
        let mut wan = Wan {
            sites,
            shared: Arc::clone(&shared),
            threads: Vec::new(),
        };
        for (i, fd) in fds.iter().enumerate() {
            let (sh, fd_r) = (Arc::clone(&shared), Arc::clone(fd));
            wan.threads
                .push(spawn(format!("wan-rx{i}"), move || reader(&sh, i, &fd_r))?);
            let (sh, fd_w) = (Arc::clone(&shared), Arc::clone(fd));
            wan.threads
                .push(spawn(format!("wan-tx{i}"), move || writer(&sh, i, &fd_w))?);
        }
        if !self.schedule.is_empty() {
            let mut schedule = self.schedule;
            schedule.sort_by_key(|(at, _)| *at);
            let sh = Arc::clone(&shared);
            let names = self.sites.clone();
            wan.threads.push(spawn("wan-sched".into(), move || {
                scheduler(&sh, &names, schedule)
            })?);
        }
        Ok(wan)
    }
}

fn spawn(name: String, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, WanError> {
    std::thread::Builder::new()
        .name(name)
        .spawn(f)
        .map_err(|e| WanError::io("spawning a forwarder thread", e))
}

fn valid_name(s: &str) -> Result<(), WanError> {
    let ok = (1..=24).contains(&s.len())
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-');
    if ok {
        Ok(())
    } else {
        Err(WanError::InvalidName(s.to_owned()))
    }
}

/// The address of the site with this 0-based index.
pub fn site_addr(i: usize) -> Ipv4Addr {
    let last = u8::try_from(i + 1).unwrap_or(u8::MAX);
    Ipv4Addr::new(SUBNET[0], SUBNET[1], SUBNET[2], last)
}

#[derive(Debug)]
struct Site {
    name: String,
    addr: Ipv4Addr,
    ns: Netns,
}

#[derive(Debug)]
struct DirState {
    model: Mutex<LinkDir>,
    /// Bumped on every cut; packets admitted under an older epoch are
    /// dropped at departure (they were in flight on a cut link).
    epoch: AtomicU64,
}

#[derive(Debug)]
struct Scheduled {
    packet: Vec<u8>,
    dir: usize,
    epoch: u64,
}

#[derive(Debug, Default)]
struct Outbox {
    line: Mutex<DelayLine<Scheduled>>,
    wake: Condvar,
}

/// Forwarder-wide counters (the per-direction ones live in the models).
#[derive(Debug, Default)]
struct Counters {
    rx_packets: AtomicU64,
    tx_packets: AtomicU64,
    unroutable: AtomicU64,
    dropped_in_flight: AtomicU64,
    write_errors: AtomicU64,
}

/// Forwarder-wide counters.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ForwarderStats {
    /// Packets read from all TUNs.
    pub rx_packets: u64,
    /// Packets written to all TUNs.
    pub tx_packets: u64,
    /// Packets not IPv4, or for an address with no site or no link.
    pub unroutable: u64,
    /// Packets in flight when their link was cut.
    pub dropped_in_flight: u64,
    /// Failed TUN writes.
    pub write_errors: u64,
}

#[derive(Debug)]
struct Shared {
    start: Instant,
    stop: AtomicBool,
    n: usize,
    /// `dirs[src * n + dst]`.
    dirs: Vec<Option<Arc<DirState>>>,
    /// One outbox per destination site.
    lines: Vec<Outbox>,
    counters: Counters,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking forwarder thread must not take the others down.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn dir(&self, src: usize, dst: usize) -> Option<&Arc<DirState>> {
        self.dirs.get(src * self.n + dst)?.as_ref()
    }

    fn set_cut(&self, a: usize, b: usize, cut: bool) {
        for (s, d) in [(a, b), (b, a)] {
            if let Some(dir) = self.dir(s, d) {
                let mut m = lock(&dir.model);
                m.set_cut(cut);
                if cut {
                    dir.epoch.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
    }
}

/// Destination site index from an IPv4 packet.
fn route(packet: &[u8], n: usize) -> Option<usize> {
    if packet.len() < 20 || packet[0] >> 4 != 4 {
        return None;
    }
    let dst = &packet[16..20];
    if dst[..3] != SUBNET {
        return None;
    }
    let i = usize::from(dst[3]).checked_sub(1)?;
    (i < n).then_some(i)
}

fn reader(sh: &Shared, src: usize, fd: &OwnedFd) {
    let mut buf = vec![0u8; MAX_PACKET];
    while !sh.stop.load(Ordering::Relaxed) {
        let len = match sys::read_fd(fd, &mut buf) {
            Ok(Some(len)) => len,
            Ok(None) => {
                sys::poll_readable(fd, TICK);
                continue;
            }
            Err(_) => {
                // The device is gone (teardown); wait for the stop flag.
                std::thread::sleep(TICK);
                continue;
            }
        };
        sh.counters.rx_packets.fetch_add(1, Ordering::Relaxed);
        let packet = &buf[..len];
        let Some((dst, dir_idx, dir)) = route(packet, sh.n)
            .filter(|&d| d != src)
            .and_then(|d| Some((d, src * sh.n + d, sh.dir(src, d)?)))
        else {
            sh.counters.unroutable.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let now = sh.start.elapsed();
        let (verdict, epoch) = {
            let mut m = lock(&dir.model);
            (m.offer(now, len), dir.epoch.load(Ordering::SeqCst))
        };
        if let Verdict::Deliver { at } = verdict {
            let out = &sh.lines[dst];
            let mut line = lock(&out.line);
            let wake = line.next_due().map_or(true, |head| at < head);
            line.push(
                at,
                Scheduled {
                    packet: packet.to_vec(),
                    dir: dir_idx,
                    epoch,
                },
            );
            drop(line);
            if wake {
                out.wake.notify_one();
            }
        }
    }
}

fn writer(sh: &Shared, dst: usize, fd: &OwnedFd) {
    sys::tight_timer_slack();
    let out = &sh.lines[dst];
    let mut due = Vec::with_capacity(256);
    while !sh.stop.load(Ordering::Relaxed) {
        {
            let mut line = lock(&out.line);
            let now = sh.start.elapsed();
            match line.next_due() {
                Some(at) if at <= now + RELEASE_SLACK => {
                    while due.len() < 256 {
                        match line.pop_due(now + RELEASE_SLACK) {
                            Some((_, p)) => due.push(p),
                            None => break,
                        }
                    }
                }
                next => {
                    let wait = next.map_or(TICK, |at| (at - now).min(TICK));
                    let _unused = out
                        .wake
                        .wait_timeout(line, wait)
                        .unwrap_or_else(|p| p.into_inner());
                    continue;
                }
            }
        }
        for p in due.drain(..) {
            let current = sh.dirs[p.dir]
                .as_ref()
                .is_some_and(|d| d.epoch.load(Ordering::Relaxed) == p.epoch);
            if !current {
                sh.counters
                    .dropped_in_flight
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            }
            match sys::write_fd(fd, &p.packet) {
                Ok(_) => sh.counters.tx_packets.fetch_add(1, Ordering::Relaxed),
                Err(_) => sh.counters.write_errors.fetch_add(1, Ordering::Relaxed),
            };
        }
    }
}

fn scheduler(sh: &Shared, names: &[String], schedule: Vec<(Duration, Event)>) {
    let index = |s: &str| names.iter().position(|n| n == s);
    for (at, ev) in schedule {
        // Bounded by the schedule's last time; wakes every TICK for stop.
        loop {
            if sh.stop.load(Ordering::Relaxed) {
                return;
            }
            let now = sh.start.elapsed();
            if now >= at {
                break;
            }
            std::thread::sleep((at - now).min(TICK));
        }
        let (Event::Cut { a, b } | Event::Restore { a, b }) = &ev;
        if let (Some(ia), Some(ib)) = (index(a), index(b)) {
            sh.set_cut(ia, ib, matches!(ev, Event::Cut { .. }));
        }
    }
}

/// A running WAN. Dropping it stops the forwarder, kills every process left
/// in its namespaces and deletes them.
#[derive(Debug)]
pub struct Wan {
    // Field order matters for drop: threads are joined in `Drop`, then the
    // namespaces go.
    sites: Vec<Site>,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Wan {
    /// Starts describing a WAN.
    pub fn builder() -> WanBuilder {
        WanBuilder::default()
    }

    fn index(&self, site: &str) -> Result<usize, WanError> {
        self.sites
            .iter()
            .position(|s| s.name == site)
            .ok_or_else(|| WanError::UnknownSite(site.to_owned()))
    }

    /// The site names in declaration order.
    pub fn sites(&self) -> impl Iterator<Item = &str> {
        self.sites.iter().map(|s| s.name.as_str())
    }

    /// A site's address on the emulated subnet.
    pub fn addr(&self, site: &str) -> Result<Ipv4Addr, WanError> {
        Ok(self.sites[self.index(site)?].addr)
    }

    /// A site's network namespace name (for `ip netns exec`).
    pub fn netns(&self, site: &str) -> Result<&str, WanError> {
        Ok(self.sites[self.index(site)?].ns.name())
    }

    /// Time since the WAN started (the clock of scheduled events).
    pub fn elapsed(&self) -> Duration {
        self.shared.start.elapsed()
    }

    /// A command that runs `program` inside the site's namespace; add
    /// arguments and run it as usual.
    pub fn command(&self, site: &str, program: impl AsRef<OsStr>) -> Result<Command, WanError> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", self.netns(site)?])
            .arg(program)
            .stdin(Stdio::null());
        Ok(cmd)
    }

    /// Runs `program args…` inside the site's namespace to completion and
    /// returns its output, whatever its exit status.
    pub fn run_in<I, S>(&self, site: &str, program: &str, args: I) -> Result<Output, WanError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.command(site, program)?;
        cmd.args(args);
        let shown = format!("{cmd:?}");
        cmd.output()
            .map_err(|source| WanError::Spawn { cmd: shown, source })
    }

    /// Starts `cmd` (from [`Wan::command`]); the guard kills it on drop.
    pub fn spawn(&self, mut cmd: Command) -> Result<ChildGuard, WanError> {
        let shown = format!("{cmd:?}");
        cmd.spawn()
            .map(|child| ChildGuard { child: Some(child) })
            .map_err(|source| WanError::Spawn { cmd: shown, source })
    }

    /// Runs `cmd` (from [`Wan::command`]) with its output going to files,
    /// killing it if it outlives `timeout`. Returns its output.
    pub fn output_timeout(&self, mut cmd: Command, timeout: Duration) -> Result<Output, WanError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let base = std::env::temp_dir().join(format!(
            "cairn-wan-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let (out_path, err_path) = (base.with_extension("out"), base.with_extension("err"));
        let files = std::fs::File::create(&out_path)
            .and_then(|o| Ok((o, std::fs::File::create(&err_path)?)))
            .map_err(|e| WanError::io("creating output files", e));
        let result = files.and_then(|(o, e)| {
            cmd.stdout(o).stderr(e);
            let mut out = self.spawn(cmd)?.wait_with_timeout(timeout)?;
            out.stdout = std::fs::read(&out_path).unwrap_or_default();
            out.stderr = std::fs::read(&err_path).unwrap_or_default();
            Ok(out)
        });
        let _ = std::fs::remove_file(&out_path);
        let _ = std::fs::remove_file(&err_path);
        result
    }

    fn pair(&self, a: &str, b: &str) -> Result<(usize, usize), WanError> {
        let (ia, ib) = (self.index(a)?, self.index(b)?);
        if self.shared.dir(ia, ib).is_none() {
            return Err(WanError::NoLink(a.to_owned(), b.to_owned()));
        }
        Ok((ia, ib))
    }

    /// Cuts the link between `a` and `b`: both directions drop everything,
    /// including packets already in flight.
    pub fn cut(&self, a: &str, b: &str) -> Result<(), WanError> {
        let (ia, ib) = self.pair(a, b)?;
        self.shared.set_cut(ia, ib, true);
        Ok(())
    }

    /// Restores a cut link.
    pub fn restore(&self, a: &str, b: &str) -> Result<(), WanError> {
        let (ia, ib) = self.pair(a, b)?;
        self.shared.set_cut(ia, ib, false);
        Ok(())
    }

    /// Counters of the `from`→`to` direction.
    pub fn stats(&self, from: &str, to: &str) -> Result<DirStats, WanError> {
        let (ia, ib) = self.pair(from, to)?;
        Ok(self
            .shared
            .dir(ia, ib)
            .map(|d| lock(&d.model).stats())
            .unwrap_or_default())
    }

    /// Forwarder-wide counters.
    pub fn forwarder_stats(&self) -> ForwarderStats {
        let c = &self.shared.counters;
        ForwarderStats {
            rx_packets: c.rx_packets.load(Ordering::Relaxed),
            tx_packets: c.tx_packets.load(Ordering::Relaxed),
            unroutable: c.unroutable.load(Ordering::Relaxed),
            dropped_in_flight: c.dropped_in_flight.load(Ordering::Relaxed),
            write_errors: c.write_errors.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Wan {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for out in &self.shared.lines {
            out.wake.notify_all();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // `sites` (and their namespaces) drop after this.
    }
}

/// A child process killed (SIGKILL) and reaped on drop.
#[derive(Debug)]
pub struct ChildGuard {
    child: Option<Child>,
}

impl ChildGuard {
    /// Waits up to `timeout` for the child to exit by itself, then kills it,
    /// and returns its output (streams are captured only if piped).
    pub fn wait_with_timeout(mut self, timeout: Duration) -> Result<Output, WanError> {
        let Some(mut child) = self.child.take() else {
            return Err(WanError::io(
                "waiting for a child",
                std::io::Error::other("already reaped"),
            ));
        };
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(WanError::io("waiting for a child", e));
                }
            }
        }
        let _ = child.kill();
        child
            .wait_with_output()
            .map_err(|e| WanError::io("collecting a child's output", e))
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
