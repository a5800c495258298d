//! Helpers for the NBD tests: disk images, real client binaries (skipped
//! with a printed reason when missing, unless `CAIRN_REQUIRE_CLIENTS=1`),
//! the VM image and metrics API.

use std::process::Output;
use std::time::Duration;

use cairn_node::Node;
use rand::{Rng, RngCore, SeedableRng};

/// Deterministic, pseudo-random but compressible: runs of zeroes, of random
/// bytes and of text-like bytes from a small alphabet.
pub fn disk_image(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = Vec::with_capacity(len);
    const ALPHABET: &[u8] = b"abcdefghijklmnop \n";
    while v.len() < len {
        let n = rng.gen_range(4096..(1usize << 20)).min(len - v.len());
        match rng.gen_range(0..4) {
            0 => v.resize(v.len() + n, 0),
            1 => {
                let start = v.len();
                v.resize(start + n, 0);
                rng.fill_bytes(&mut v[start..]);
            }
            _ => v.extend((0..n).map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())])),
        }
    }
    v
}

pub fn have(bin: &str) -> bool {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
        .unwrap_or(false);
    if !found {
        if std::env::var("CAIRN_REQUIRE_CLIENTS").as_deref() == Ok("1") {
            panic!("{bin} is not on PATH and CAIRN_REQUIRE_CLIENTS=1 (apt-get install -y libnbd-bin qemu-utils)");
        }
        eprintln!("SKIP: {bin} is not on PATH (apt-get install -y libnbd-bin qemu-utils)");
    }
    found
}

pub async fn run(bin: &str, args: &[&str]) -> Output {
    let child = tokio::process::Command::new(bin)
        .args(args)
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(180), child)
        .await
        .unwrap_or_else(|_| panic!("{bin} {args:?} timed out"))
        .unwrap_or_else(|e| panic!("{bin} failed to start: {e}"))
}

pub fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

pub async fn run_ok(bin: &str, args: &[&str]) -> String {
    let o = run(bin, args).await;
    assert!(o.status.success(), "{bin} {args:?} failed:\n{}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn uri(n: &Node, export: &str) -> String {
    format!("nbd://127.0.0.1:{}/{export}", n.nbd_addr().unwrap().port())
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .unwrap()
}

pub async fn import(n: &Node, name: &str, data: &[u8]) -> serde_json::Value {
    let r = http()
        .put(format!(
            "http://{}/api/v1/vm-images/{name}",
            n.api_addr().unwrap()
        ))
        .body(data.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    r.json().await.unwrap()
}

pub async fn list(n: &Node) -> Vec<serde_json::Value> {
    let r = http()
        .get(format!("http://{}/api/v1/vm-images", n.api_addr().unwrap()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    v["images"].as_array().unwrap().clone()
}

pub async fn metrics(n: &Node) -> String {
    http()
        .get(format!("http://{}/metrics", n.api_addr().unwrap()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of one exposition line, e.g. `cairn_nbd_image_reads_total{source="local"}`.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}
