//! Smoke runs of the WAN scenarios over 50 ms RTT / 100 Mbit/s / 0.5% loss;
//! each checks that the namespaces are gone afterwards.
//!
//! * Scenario 1 (cold image pull at an edge): a small image, one rep of each
//!   contestant; every pull completed and verified. About 10 s. Needs
//!   skopeo, umoci and docker-registry.
//! * Scenario 2 (image update v1 → v2 at an edge): a small image and its
//!   v2 (every 20th file changed), one rep of each default contestant; every
//!   warm-up and update completed and verified, v2 moved across the link
//!   on the layer-level paths, the edge held v1. About 20 s. Needs what
//!   scenario 1 needs.
//! * Scenario 3 (a VM image at an edge over NBD): a 32 MiB disk image, one
//!   rep; every step completed, the full reads verified, the trace moved
//!   far less than the image. About 15 s. Needs nbdcopy, qemu-io, qemu-nbd,
//!   qemu-img, mkfs.ext4 and curl.
//!
//! All need root and the `cairn` binary (`cargo build --release -p
//! cairn-cli`; `CAIRN_BIN` overrides the path). Without them a test prints a
//! SKIP line and passes, unless `CAIRN_REQUIRE_CLIENTS=1`.

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use cairn_wan::image_update::{run_image_update, ImageUpdateConfig, UPDATE_CONTESTANTS};
use cairn_wan::scenario::{run_cold_pull, ColdPullConfig, Tools, CONTESTANTS};
use cairn_wan::vm_nbd::{run_vm_nbd, VmNbdConfig, VmTools, STEPS};
use cairn_wan::LinkSpec;

/// The smokes run one at a time: each checks that no namespace outlives it
/// (the other's would look leaked), and they would share the 2 CPUs.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// `CAIRN_BIN`, else `release/cairn` under `CARGO_TARGET_DIR` or the
/// workspace's `target/`.
fn cairn_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("CAIRN_BIN") {
        return PathBuf::from(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"),
        PathBuf::from,
    );
    target.join("release/cairn")
}

#[test]
fn cold_pull_smoke() -> anyhow::Result<()> {
    let _serial = serial();
    let cairn = cairn_bin();
    let why = if !cairn_wan::sys::is_root() {
        Some("needs root for network namespaces and TUN".to_owned())
    } else {
        Tools::find(&cairn).err().map(|e| e.to_string())
    };
    if let Some(why) = why {
        if cairn_wan::require_clients() {
            panic!("cold_pull_smoke: {why} (CAIRN_REQUIRE_CLIENTS=1)");
        }
        println!("SKIP cold_pull_smoke: {why}");
        return Ok(());
    }
    let cfg = ColdPullConfig {
        spec: LinkSpec {
            delay: Duration::from_millis(25),
            rate_bps: 100_000_000,
            loss: 0.005,
            ..LinkSpec::default()
        },
        reps: 1,
        image_file_bytes: 8 << 20,
        layers: 2,
        cairn,
        contestants: CONTESTANTS.iter().map(|c| (*c).to_owned()).collect(),
        tmp: std::env::temp_dir(),
        pull_timeout: Duration::from_secs(60),
        seed: 3,
    };
    let before = netns_names();
    let r = run_cold_pull(&cfg)?;
    for who in CONTESTANTS {
        let s = r.secs(who);
        assert_eq!(s.len(), 1, "{who}: {s:?}");
        // At least one RTT, and far less than the timeout.
        assert!(s[0] > 0.05 && s[0] < 60.0, "{who}: {s:?}");
    }
    for p in &r.pulls {
        assert!(
            p.wan_bytes_core_to_edge >= r.image.bytes(),
            "{}: only {} bytes crossed the link for a {}-byte image",
            p.who,
            p.wan_bytes_core_to_edge,
            r.image.bytes()
        );
    }
    let after = netns_names();
    let leaked: Vec<_> = after.iter().filter(|n| !before.contains(n)).collect();
    assert!(leaked.is_empty(), "namespaces left behind: {leaked:?}");
    Ok(())
}

#[test]
fn image_update_smoke() -> anyhow::Result<()> {
    let _serial = serial();
    let cairn = cairn_bin();
    let why = if !cairn_wan::sys::is_root() {
        Some("needs root for network namespaces and TUN".to_owned())
    } else {
        Tools::find(&cairn).err().map(|e| e.to_string())
    };
    if let Some(why) = why {
        if cairn_wan::require_clients() {
            panic!("image_update_smoke: {why} (CAIRN_REQUIRE_CLIENTS=1)");
        }
        println!("SKIP image_update_smoke: {why}");
        return Ok(());
    }
    let cfg = ImageUpdateConfig {
        spec: LinkSpec {
            delay: Duration::from_millis(25),
            rate_bps: 100_000_000,
            loss: 0.005,
            ..LinkSpec::default()
        },
        reps: 1,
        image_file_bytes: 8 << 20,
        layers: 2,
        change_every: 20,
        uncompressed: false,
        cairn,
        contestants: UPDATE_CONTESTANTS.iter().map(|c| (*c).to_owned()).collect(),
        tmp: std::env::temp_dir(),
        pull_timeout: Duration::from_secs(60),
        seed: 3,
    };
    let before = netns_names();
    let r = run_image_update(&cfg)?;
    // v2 is v1 with about 5% of its files changed.
    assert!(r.v2.changed_files > 0 && r.v2.changed_files * 15 < r.v2.files);
    assert_eq!(r.v1.files, r.v2.files);
    assert!(r.changed_layers() >= 1);
    assert_ne!(r.v1.manifest.digest, r.v2.manifest.digest);
    for who in UPDATE_CONTESTANTS {
        let s = r.secs(who);
        assert_eq!(s.len(), 1, "{who}: {s:?}");
        assert!(s[0] > 0.05 && s[0] < 60.0, "{who}: {s:?}");
    }
    for p in &r.pulls {
        assert!(!p.timed_out, "{p:?}");
        // The warm-up moved v1 across the link.
        assert!(p.warmup_wan_bytes_core_to_edge >= r.v1.bytes(), "{p:?}");
        // Whole-blob paths move at least v2's new blobs; Cairn moves
        // something (the manifest at least) and not much more than v2.
        if p.who.starts_with("cairn") {
            assert!(p.wan_bytes_core_to_edge > 0, "{p:?}");
            assert!(p.wan_bytes_core_to_edge < 3 * r.v2.bytes(), "{p:?}");
        } else {
            assert!(p.wan_bytes_core_to_edge >= r.new_blob_bytes(), "{p:?}");
        }
    }
    assert_eq!(r.pairs().len(), 2);
    let after = netns_names();
    let leaked: Vec<_> = after.iter().filter(|n| !before.contains(n)).collect();
    assert!(leaked.is_empty(), "namespaces left behind: {leaked:?}");
    Ok(())
}

#[test]
fn vm_nbd_smoke() -> anyhow::Result<()> {
    let _serial = serial();
    let cairn = cairn_bin();
    let why = if !cairn_wan::sys::is_root() {
        Some("needs root for network namespaces and TUN".to_owned())
    } else {
        VmTools::find(&cairn).err().map(|e| e.to_string())
    };
    if let Some(why) = why {
        if cairn_wan::require_clients() {
            panic!("vm_nbd_smoke: {why} (CAIRN_REQUIRE_CLIENTS=1)");
        }
        println!("SKIP vm_nbd_smoke: {why}");
        return Ok(());
    }
    let cfg = VmNbdConfig {
        spec: LinkSpec {
            delay: Duration::from_millis(25),
            rate_bps: 100_000_000,
            loss: 0.005,
            ..LinkSpec::default()
        },
        reps: 1,
        image_bytes: 32 << 20,
        file_bytes: 20 << 20,
        cairn,
        congestion: "bbr".to_owned(),
        tmp: std::env::temp_dir(),
        timeout: Duration::from_secs(60),
        seed: 3,
        trace_seed: 1,
        trace_fraction: 0.03,
    };
    let before = netns_names();
    let r = run_vm_nbd(&cfg)?;
    for (what, _) in STEPS {
        let s = r.secs(what);
        assert_eq!(s.len(), 1, "{what}: {s:?}");
        assert!(s[0] > 0.0 && s[0] < 60.0, "{what}: {s:?}");
        assert!(r.steps.iter().all(|s| !s.timed_out), "{:?}", r.steps);
    }
    // Both full reads cross the link (and take at least one RTT); the
    // trace moves far less than the image.
    for what in ["copy-full", "cairn-full"] {
        assert!(r.secs(what)[0] > 0.05, "{what}");
        assert!(r.wan_bytes(what) > 4.0 * 1024.0 * 1024.0, "{what}");
    }
    assert!(
        r.wan_bytes("cairn-lazy") < r.wan_bytes("copy-full") / 4.0,
        "the trace moved {} bytes",
        r.wan_bytes("cairn-lazy")
    );
    // The warm replay reads locally only; every replay timed its first
    // useful work.
    assert!(
        r.wan_bytes("cairn-warm") < 64.0 * 1024.0,
        "warm moved bytes"
    );
    for what in [
        "cairn-warm",
        "cairn-lazy",
        "cairn-profile",
        "cairn-successors",
        "copy-first",
    ] {
        assert_eq!(r.first_work(what).len(), 1, "{what}");
    }
    assert_eq!(r.training.traces, 1);
    assert_eq!(r.wan_bytes("copy-trace"), 0.0);
    assert_eq!(r.ratios_full().len(), 1);
    assert_eq!(r.ratios_trace().len(), 1);
    let after = netns_names();
    let leaked: Vec<_> = after.iter().filter(|n| !before.contains(n)).collect();
    assert!(leaked.is_empty(), "namespaces left behind: {leaked:?}");
    Ok(())
}

fn netns_names() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("cwan"))
                .collect()
        })
        .unwrap_or_default()
}
