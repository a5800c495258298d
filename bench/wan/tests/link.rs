//! Two sites over an emulated link (20 ms one way, 50 Mbit/s): RTT, cut and
//! restore (by hand and scheduled), and bulk throughput with iperf3.
//!
//! Needs root, `ping` and `iperf3`. Without them the tests print a SKIP line
//! and pass, unless `CAIRN_REQUIRE_CLIENTS=1`, in which case they fail.

use std::time::{Duration, Instant};

use cairn_wan::check::{iperf3_client, ping, tools_present, Iperf3Server};
use cairn_wan::{Event, LinkSpec, Wan};

const RATE: u64 = 50_000_000;

fn spec() -> LinkSpec {
    LinkSpec {
        delay: Duration::from_millis(20),
        rate_bps: RATE,
        ..LinkSpec::default()
    }
}

/// `true` when the test can run; otherwise prints SKIP (or panics when
/// clients are required).
fn can_run(test: &str) -> bool {
    let why = if !cairn_wan::sys::is_root() {
        Some("needs root for network namespaces and TUN".to_owned())
    } else {
        tools_present().err().map(|e| e.to_string())
    };
    match why {
        None => true,
        Some(why) if cairn_wan::require_clients() => {
            panic!("{test}: {why} (CAIRN_REQUIRE_CLIENTS=1)")
        }
        Some(why) => {
            println!("SKIP {test}: {why}");
            false
        }
    }
}

fn netns_exists(name: &str) -> bool {
    std::path::Path::new("/run/netns").join(name).exists()
}

#[test]
fn rtt_cut_restore_and_throughput() -> anyhow::Result<()> {
    if !can_run("rtt_cut_restore_and_throughput") {
        return Ok(());
    }
    let started = Instant::now();
    let wan = Wan::builder()
        .site("core")
        .site("edge")
        .link("core", "edge", spec())
        .seed(42)
        .start()?;
    let names: Vec<String> = ["core", "edge"]
        .iter()
        .map(|s| wan.netns(s).map(str::to_owned))
        .collect::<Result<_, _>>()?;
    assert!(names.iter().all(|n| netns_exists(n)));

    // RTT within 10% of 40 ms.
    let (rtt, got) = ping(&wan, "edge", "core", 10)?.expect("ping replies");
    assert_eq!(got, 10, "all pings answered");
    assert!((rtt - 40.0).abs() <= 4.0, "RTT {rtt} ms, want 40 ± 4");

    // A cut makes ping fail...
    wan.cut("core", "edge")?;
    let cut = ping(&wan, "edge", "core", 3)?;
    assert!(
        cut.map_or(true, |(_, got)| got == 0),
        "ping across a cut: {cut:?}"
    );
    assert!(wan.stats("edge", "core")?.dropped_cut >= 3);
    // ...and a restore makes it work again.
    wan.restore("core", "edge")?;
    let (_, got) = ping(&wan, "edge", "core", 3)?.expect("ping after restore");
    assert!(got >= 2, "only {got}/3 pings after restore");

    // TCP bulk edge -> core within 10% of the rate (goodput excludes
    // ~3.5% of headers, well inside the margin).
    let _server = Iperf3Server::start(&wan, "core")?;
    let tcp = iperf3_client(
        &wan,
        "edge",
        "core",
        &["-O".into(), "1".into()],
        Duration::from_secs(5),
    )?;
    let tcp_bps = tcp["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .expect("TCP receiver rate");
    println!("TCP {:.1} Mbit/s over a 50 Mbit/s link", tcp_bps / 1e6);
    assert!(
        (tcp_bps - RATE as f64).abs() <= RATE as f64 * 0.1,
        "TCP {tcp_bps} b/s"
    );

    // UDP offered at 110%: what arrives (at IP level) is the rate.
    let payload_bps = RATE as f64 * 1.1 * 1400.0 / 1428.0;
    let udp = iperf3_client(
        &wan,
        "edge",
        "core",
        &[
            "-u".into(),
            "-l".into(),
            "1400".into(),
            "-w".into(),
            "4M".into(),
            "-b".into(),
            (payload_bps as u64).to_string(),
        ],
        Duration::from_secs(4),
    )?;
    let udp_bps = udp["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .expect("UDP receiver rate")
        * 1428.0
        / 1400.0;
    println!(
        "UDP {:.1} Mbit/s (IP level) over a 50 Mbit/s link",
        udp_bps / 1e6
    );
    assert!(
        (udp_bps - RATE as f64).abs() <= RATE as f64 * 0.1,
        "UDP {udp_bps} b/s"
    );
    assert!(
        wan.stats("edge", "core")?.dropped_queue > 0,
        "queue overflowed"
    );

    drop(_server);
    drop(wan);
    assert!(!names.iter().any(|n| netns_exists(n)), "namespaces deleted");
    println!("took {:?}", started.elapsed());
    Ok(())
}

#[test]
fn scheduled_cut_and_restore() -> anyhow::Result<()> {
    if !can_run("scheduled_cut_and_restore") {
        return Ok(());
    }
    let wan = Wan::builder()
        .site("a")
        .site("b")
        .link("a", "b", spec())
        .at(
            Duration::from_millis(1500),
            Event::Cut {
                a: "a".into(),
                b: "b".into(),
            },
        )
        .at(
            Duration::from_millis(3000),
            Event::Restore {
                a: "b".into(),
                b: "a".into(),
            },
        )
        .start()?;
    // 20 pings 0.2 s apart span ~4 s: about 1.5 s of them cross the cut.
    let (_, got) = ping(&wan, "a", "b", 20)?.expect("some pings pass");
    assert!((5..=16).contains(&got), "{got}/20 pings answered");
    assert!(wan.stats("a", "b")?.dropped_cut >= 3);
    // Restored: everything passes again.
    let (_, got) = ping(&wan, "a", "b", 3)?.expect("pings after restore");
    assert_eq!(got, 3);
    Ok(())
}

#[test]
fn unknown_sites_and_bad_specs_are_errors() {
    // No root needed: validation comes before anything is created... except
    // the root check itself, which comes first.
    let err = Wan::builder()
        .site("a")
        .site("a")
        .start()
        .expect_err("duplicate site");
    if cairn_wan::sys::is_root() {
        assert!(
            matches!(err, cairn_wan::WanError::DuplicateSite(_)),
            "{err}"
        );
        let bad = LinkSpec {
            loss: 2.0,
            ..spec()
        };
        let err = Wan::builder()
            .site("a")
            .site("b")
            .link("a", "b", bad)
            .start()
            .expect_err("bad loss");
        assert!(matches!(err, cairn_wan::WanError::Spec { .. }), "{err}");
        let err = Wan::builder()
            .site("a")
            .link("a", "zz", spec())
            .start()
            .expect_err("unknown site");
        assert!(matches!(err, cairn_wan::WanError::UnknownSite(_)), "{err}");
    } else {
        assert!(matches!(err, cairn_wan::WanError::NotRoot), "{err}");
        assert!(err.to_string().contains("run as root"));
    }
}

/// The binary refuses clearly without root (run as `nobody` via setpriv).
#[test]
fn binary_without_root_says_so() {
    let bin = env!("CARGO_BIN_EXE_cairn-wan");
    let out = if cairn_wan::sys::is_root() {
        match std::process::Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                bin,
                "check",
            ])
            .output()
        {
            Ok(out) => out,
            Err(e) => {
                println!("SKIP binary_without_root_says_so: setpriv: {e}");
                return;
            }
        }
    } else {
        std::process::Command::new(bin)
            .arg("check")
            .output()
            .expect("run cairn-wan")
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("Permission denied") {
        println!("SKIP binary_without_root_says_so: nobody cannot execute {bin}");
        return;
    }
    assert!(!out.status.success());
    assert!(
        stderr.contains("needs root for network namespaces and TUN; run as root"),
        "{stderr}"
    );
}
