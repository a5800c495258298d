//! Helpers for the tests that drive the `cairn` binary: run it, check it,
//! and keep a `cairn node` child running.

#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_cairn");

pub fn cairn(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

pub fn ok(o: &Output) -> String {
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
pub struct NodeProc {
    pub child: Child,
    /// QUIC address.
    pub addr: String,
    /// API address (`-` when off).
    pub api: String,
    /// NBD address (`-` when off).
    pub nbd: String,
}

impl NodeProc {
    // The child is waited for by `stop` or `Drop`.
    #[allow(clippy::zombie_processes)]
    pub fn start(data: &Path, identity: Option<&Path>) -> Self {
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
                // "on quic Q api A registry R nbd N (Ctrl-C stops)"
                let w: Vec<&str> = rest.split_whitespace().collect();
                let after = |k: &str| {
                    w.iter()
                        .position(|x| *x == k)
                        .and_then(|i| w.get(i + 1))
                        .map(|s| (*s).to_owned())
                        .unwrap_or_else(|| "-".to_owned())
                };
                let (addr, api, nbd) = (w[0].to_owned(), after("api"), after("nbd"));
                // Keep draining stderr so the child never blocks on it.
                std::thread::spawn(move || while rx.recv().is_ok() {});
                return Self {
                    child,
                    addr,
                    api,
                    nbd,
                };
            }
            seen.push(line);
        }
    }

    /// `kill -9`, and reap it.
    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub fn stop(mut self) -> std::process::ExitStatus {
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
    pub fn libc_kill(pid: i32, sig: i32) -> i32;
}
