//! `cairn node` and `cairn fetch` as a user drives them: two real processes
//! talking QUIC with mutual TLS on loopback.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rand::{RngCore, SeedableRng};

const BIN: &str = env!("CARGO_BIN_EXE_cairn");

fn cairn(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A `cairn node` child; killed (SIGTERM, then SIGKILL) on drop.
struct NodeProc {
    child: Child,
    addr: String,
}

impl NodeProc {
    // The child is waited for by `stop` or `Drop`.
    #[allow(clippy::zombie_processes)]
    fn start(data: &Path, identity: Option<&Path>) -> Self {
        let mut cmd = Command::new(BIN);
        cmd.args([
            "node",
            "--quic-listen",
            "127.0.0.1:0",
            "--api-listen",
            "127.0.0.1:0",
            "--nbd-listen",
            "127.0.0.1:0",
            "--registry-listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(data)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        if let Some(i) = identity {
            cmd.arg("--identity").arg(i);
        }
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("node did not start; stderr: {seen:#?}"));
            if let Some(rest) = line.split(" on quic ").nth(1) {
                let addr = rest.split_whitespace().next().unwrap().to_owned();
                // Keep draining stderr so the child never blocks on it.
                std::thread::spawn(move || while rx.recv().is_ok() {});
                return Self { child, addr };
            }
            seen.push(line);
        }
    }

    fn stop(mut self) -> std::process::ExitStatus {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc_kill(self.child.id() as i32, 15) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > deadline {
                self.child.kill().unwrap();
                panic!("node did not stop on SIGTERM within 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

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
