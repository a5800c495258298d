//! # cairn-wan: a WAN on one machine
//!
//! Emulates wide-area links between *sites* on a single Linux host, at the
//! packet level, so every protocol (TCP, QUIC, ICMP) crosses the same link.
//! `netem` is not available on our machines, so the link is emulated in
//! userspace.
//!
//! ## Topology and addressing
//!
//! Each site is a network namespace created with `ip netns add`
//! (named `cwan<pid>x<n>-<site>`, so concurrent runs never collide), with
//! loopback up and one TUN device `wan0` (MTU 1500) holding
//! `10.99.0.<i+1>/24`, where `i` is the site's position in declaration
//! order. The `/24` installs the route for the emulated subnet via `wan0`.
//! A namespace has no other interface: nothing a site sends can leave the
//! machine.
//!
//! ## How a packet flows
//!
//! The forwarder lives in the calling process (root namespace). It opens
//! `/dev/net/tun` from a throwaway thread that `setns`-ed into the site's
//! namespace, so the device is created there while the descriptor stays
//! usable from anywhere. Per site there is one reader and one writer thread:
//!
//! 1. the reader of site *S* reads an IP packet from *S*'s TUN;
//! 2. it takes the IPv4 destination, maps `10.99.0.<k>` to site *D* (no
//!    site, no link, or not IPv4: dropped and counted as unroutable);
//! 3. it offers the packet to the *S→D* [`LinkDir`] model with the current
//!    time, which answers *drop* or *deliver at t*;
//! 4. delivered packets go into *D*'s time-ordered outbox ([`DelayLine`]);
//!    the reader wakes *D*'s writer only if the packet is the new head;
//! 5. *D*'s writer sleeps until the head is due (timer slack lowered to
//!    1 µs), then writes every packet due within 20 µs to *D*'s TUN.
//!    A packet admitted before a cut of its link is dropped at departure.
//!
//! ## The link model ([`model`])
//!
//! Sans-IO, deterministic (seeded RNG, time passed in). Per direction: a cut
//! flag; a bottleneck serialising at `rate_bps` (IP bytes) behind a FIFO with
//! tail drop, sized in bytes or milliseconds of the rate (default: one
//! bandwidth-delay product of the base RTT, at least 50 ms); random loss;
//! one-way delay plus uniform jitter in `[0, jitter]` without reordering;
//! optional reordering by holding a packet back so others overtake it.
//!
//! ## Control
//!
//! [`Wan::builder`] declares sites, links ([`LinkSpec`]) and a schedule of
//! cuts and restores by time ([`Event`]); [`Wan`] runs commands in a site
//! ([`Wan::command`], [`Wan::run_in`]), cuts and restores links at run time
//! and tears everything down on drop (threads joined, processes left in the
//! namespaces killed, namespaces deleted). [`check`] measures a link against
//! its settings with `ping` and `iperf3`. Everything needs root.
//!
//! ## Command line
//!
//! ```text
//! cairn-wan check --delay-ms 25 --rate-mbit 100 --loss 0.5   # one link
//! cairn-wan check --standard      # the three reference links + ceiling
//! cairn-wan up topology.toml      # keep a topology up until Ctrl-C
//! cairn-wan clean                 # delete namespaces of dead runs
//! cairn-wan scenario cold-pull    # scenario 1: cold image pull at an edge
//! cairn-wan scenario image-update # scenario 2: image update v1 → v2 at an edge
//! cairn-wan scenario vm-nbd       # scenario 3: a VM image at an edge over NBD
//! ```
//!
//! `check` writes `bench/results/wan-check-DATE.{md,json}` and exits
//! non-zero if a judged figure is off by more than 10%. A topology file:
//!
//! ```toml
//! seed = 7
//! sites = ["core", "edge"]          # 10.99.0.1, 10.99.0.2
//!
//! [[links]]
//! a = "core"
//! b = "edge"
//! delay = 25                        # one-way, ms
//! jitter = 2.5                      # ms, uniform in [0, jitter]
//! rate_bps = 100_000_000            # 0 = unlimited
//! loss = 0.005                      # probability
//! reorder = 0.0                     # probability
//! queue = { millis = 50 }           # or { bytes = N }, or "auto"
//!
//! [[events]]
//! at_ms = 10_000
//! action = "cut"                    # or "restore"
//! a = "core"
//! b = "edge"
//! ```
//!
//! ## Limits
//!
//! * Userspace forwarding costs two syscalls and two thread hand-offs per
//!   packet, with no segmentation offload: on a small machine the ceiling is
//!   a few hundred Mbit/s to about 1 Gbit/s (see the `wan-check` results in
//!   `bench/results/`), and the forwarder competes for CPU with the programs
//!   under test.
//! * IPv4 only, one `/24`, at most 253 sites; a site reaches only sites it
//!   has a link to (no multi-hop routing).
//! * Time resolution is that of thread wake-ups (tens of µs), fine for
//!   millisecond delays, not for sub-100 µs ones.
//! * Loss is independent per packet (no Gilbert-Elliott bursts).

pub mod check;
pub mod image_update;
pub mod model;
pub mod scenario;
pub mod sys;
pub mod vm_nbd;
mod wan;

pub use model::{DelayLine, DirStats, DropReason, LinkDir, LinkSpec, QueueLimit, Verdict};
pub use wan::{
    site_addr, ChildGuard, Event, ForwarderStats, Wan, WanBuilder, WanError, SUBNET, TUN_NAME,
};

/// Whether tests that need root should fail rather than skip
/// (`CAIRN_REQUIRE_CLIENTS=1`).
pub fn require_clients() -> bool {
    std::env::var("CAIRN_REQUIRE_CLIENTS").is_ok_and(|v| v == "1")
}
