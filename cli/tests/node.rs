//! `cairn node` and `cairn fetch` as a user drives them: two real processes
//! talking QUIC with mutual TLS on loopback.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use rand::{RngCore, SeedableRng};

mod common;

use common::*;

#[test]
fn node_serves_and_fetch_fills_another_store() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let ca = w.join("ca");
    ok(&cairn(&["cluster", "init", ca.to_str().unwrap()]));
    ok(&cairn(&["cluster", "add-node", ca.to_str().unwrap(), "a"]));
    ok(&cairn(&["cluster", "add-node", ca.to_str().unwrap(), "c"]));

    let mut data = vec![0u8; 5 << 20];
    rand::rngs::StdRng::seed_from_u64(9).fill_bytes(&mut data);
    let file = w.join("in.bin");
    std::fs::write(&file, &data).unwrap();
    let da = w.join("data-a");
    let dc = w.join("data-c");
    let put = ok(&cairn(&[
        "store",
        "--data-dir",
        da.to_str().unwrap(),
        "put",
        file.to_str().unwrap(),
        "--name",
        "demo:1",
    ]));
    assert!(put.contains("sha256"), "{put}");

    let node = NodeProc::start(&da, Some(&ca.join("a")));
    let from = format!("a@{}", node.addr);
    let out = ok(&cairn(&[
        "fetch",
        "--data-dir",
        dc.to_str().unwrap(),
        "--identity",
        ca.join("c").to_str().unwrap(),
        "--from",
        &from,
        "demo:1",
    ]));
    assert!(out.contains("fetched"), "{out}");
    let id = out
        .lines()
        .find_map(|l| l.strip_prefix("object"))
        .unwrap()
        .trim()
        .to_owned();

    // A name pinned to another node's name is refused by TLS.
    let wrong = cairn(&[
        "fetch",
        "--data-dir",
        w.join("data-x").to_str().unwrap(),
        "--identity",
        ca.join("c").to_str().unwrap(),
        "--from",
        &format!("b@{}", node.addr),
        "demo:1",
    ]);
    assert!(!wrong.status.success());

    // The node knows its own site: `cairn site ls` marks it, `show` details it.
    let api = format!("http://{}", node.api);
    let ls = ok(&cairn(&["site", "ls", "--api", &api]));
    let me = ls
        .lines()
        .find(|l| l.starts_with("* "))
        .unwrap_or_else(|| panic!("no local site in:\n{ls}"));
    assert!(me.contains("self"), "{ls}");
    let name = me[2..].split_whitespace().next().unwrap().to_owned();
    let show = ok(&cairn(&["site", "show", &name, "--api", &api]));
    assert!(show.contains(&name) && show.contains("self"), "{show}");
    let none = cairn(&["site", "show", "no-such-site", "--api", &api]);
    assert!(!none.status.success());
    assert!(String::from_utf8_lossy(&none.stderr).contains("no-such-site"));

    let status = node.stop();
    assert!(status.success(), "node exit on SIGTERM: {status:?}");

    let back = w.join("back.bin");
    ok(&cairn(&[
        "store",
        "--data-dir",
        dc.to_str().unwrap(),
        "get",
        &id,
        "-o",
        back.to_str().unwrap(),
    ]));
    assert_eq!(std::fs::read(&back).unwrap(), data);
    let fsck = cairn(&["store", "--data-dir", dc.to_str().unwrap(), "fsck"]);
    ok(&fsck);
}

#[test]
fn fetch_without_identity_is_a_clear_error_and_node_without_one_warns() {
    let work = tempfile::tempdir().unwrap();
    let o = cairn(&[
        "fetch",
        "--data-dir",
        work.path().join("d").to_str().unwrap(),
        "--from",
        "127.0.0.1:9",
        "x",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--identity"), "{err}");

    let o = cairn(&[
        "fetch",
        "--data-dir",
        work.path().join("d").to_str().unwrap(),
        "--identity",
        work.path().join("nope").to_str().unwrap(),
        "--from",
        "not-an-address",
        "x",
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("bad peer address"));

    let node = NodeProc::start(&work.path().join("solo"), None);
    assert!(node.stop().success());
}
