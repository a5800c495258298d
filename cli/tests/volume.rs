//! Volume durability as a user meets it: `cairn volume` against a real
//! `cairn node` process, qemu-io writing over NBD, and `kill -9` of the
//! node. Every write acknowledged after a FLUSH, or sent with FUA, must be
//! there after the restart.
//!
//! Skipped with a printed reason when qemu-io is missing, unless
//! `CAIRN_REQUIRE_CLIENTS=1`.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::process::Command;

mod common;

use common::*;

fn have_qemu_io() -> bool {
    let ok = Command::new("qemu-io").arg("--version").output().is_ok();
    if !ok {
        assert!(
            std::env::var("CAIRN_REQUIRE_CLIENTS").as_deref() != Ok("1"),
            "qemu-io missing and CAIRN_REQUIRE_CLIENTS=1"
        );
        eprintln!("SKIP: qemu-io is not installed (apt-get install qemu-utils)");
    }
    ok
}

/// qemu-io commands against `volume/NAME`; every pattern check must pass.
fn qemu_io(nbd: &str, name: &str, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for x in cmds {
        c.args(["-c", x]);
    }
    c.arg(format!("nbd://{nbd}/volume/{name}"));
    let out = ok(&c.output().unwrap());
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(!out.contains("failed:"), "{out}");
    out
}

/// One series of the node's /metrics, over plain HTTP/1.0.
fn metric(api: &str, series: &str) -> f64 {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(api).unwrap();
    c.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut s = String::new();
    c.read_to_string(&mut s).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn volume(api: &str, args: &[&str]) -> String {
    let mut a = vec!["volume", "--api"];
    let url = format!("http://{api}");
    a.push(&url);
    a.extend_from_slice(args);
    ok(&cairn(&a))
}

#[test]
fn flushed_and_fua_writes_survive_kill_9() {
    if !have_qemu_io() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let node = NodeProc::start(&data, None);
    let out = volume(&node.api, &["create", "disk", "--size", "32M"]);
    assert!(out.contains("volume/disk"), "{out}");

    // Flushed writes (the connection closes after them).
    qemu_io(
        &node.nbd,
        "disk",
        &["write -P 0xab 0 4M", "write -P 0xcd 8M 100k", "flush"],
    );
    let ls = volume(&node.api, &["ls"]);
    assert!(ls.contains("disk") && ls.contains("32.0 MiB"), "{ls}");

    // A FUA write on a connection that stays open, with no flush after it:
    // once the node has persisted it (the flush counter moves), kill -9.
    let flushes = metric(&node.api, "cairn_volume_flushes_total");
    let mut held = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -f -P 0xef 20M 8k",
            "-c",
            "sleep 60000",
        ])
        .arg(format!("nbd://{}/volume/disk", node.nbd))
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while metric(&node.api, "cairn_volume_flushes_total") < flushes + 1.0 {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(30),
            "the FUA write was never persisted"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    node.kill9();
    let _ = held.kill();
    let _ = held.wait();

    let node = NodeProc::start(&data, None);
    qemu_io(
        &node.nbd,
        "disk",
        &[
            "read -P 0xab 0 4M",
            "read -P 0 4M 4M",
            "read -P 0xcd 8M 100k",
            "read -P 0xef 20M 8k",
            "read -P 0 24M 8M",
        ],
    );

    // A snapshot is an image; the volume cannot be removed twice; bad
    // names are refused before any request.
    let out = volume(&node.api, &["snapshot", "disk", "disk-snap"]);
    assert!(out.contains("image/disk-snap"), "{out}");
    let o = cairn(&["image", "--api", &format!("http://{}", node.api), "ls"]);
    assert!(ok(&o).contains("disk-snap"));
    volume(&node.api, &["rm", "disk"]);
    let o = cairn(&[
        "volume",
        "--api",
        &format!("http://{}", node.api),
        "rm",
        "disk",
    ]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no such volume"),
        "{o:?}"
    );
    let o = cairn(&[
        "volume",
        "--api",
        "http://127.0.0.1:9",
        "create",
        "a/b",
        "--size",
        "1M",
    ]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("invalid"),
        "{o:?}"
    );
    node.stop();
}
