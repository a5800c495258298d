//! A running node's API listener: /healthz, /metrics (checked by promtool
//! and scraped by a real Prometheus when installed), /api/v1/status, and an
//! orderly shutdown.

#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cairn_node::{Node, NodeConfig};

fn require_clients() -> bool {
    std::env::var_os("CAIRN_REQUIRE_CLIENTS").is_some()
}

fn have(bin: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {bin}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

async fn start(dir: &std::path::Path) -> Node {
    let mut cfg = NodeConfig::new(dir.join("data"));
    cfg.api_listen = Some("127.0.0.1:0".parse().unwrap());
    cfg.nbd_listen = Some("127.0.0.1:0".parse().unwrap());
    cfg.registry_listen = None;
    cfg.endpoint.listen = "127.0.0.1:0".parse().unwrap();
    cfg.site = "test-site".into();
    Node::start(cfg).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_metrics_status_and_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path()).await;
    let api = node.api_addr().unwrap();
    // Some activity so counters are non-zero.
    node.store()
        .put_bytes(&vec![7u8; 300_000], &Default::default())
        .unwrap();
    let http = reqwest::Client::new();
    let h = http
        .get(format!("http://{api}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(h.status(), 200);
    let m = http
        .get(format!("http://{api}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(m.status(), 200);
    assert!(m.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = m.text().await.unwrap();
    assert!(text.contains("cairn_store_logical_bytes 300000"), "{text}");
    assert!(
        text.contains("cairn_transport_"),
        "transport metrics exposed"
    );
    if have("promtool") {
        let mut child = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    } else {
        assert!(!require_clients(), "promtool missing");
        eprintln!("promtool not installed: skipping the metrics lint");
    }
    let s: serde_json::Value = http
        .get(format!("http://{api}/api/v1/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(s["site"], "test-site");
    assert_eq!(s["node"], "local");
    assert_eq!(s["store"]["logical_bytes"], 300_000, "{s}");
    let t = Instant::now();
    node.shutdown().await;
    assert!(t.elapsed() < Duration::from_secs(10));
    // The listener is gone.
    assert!(http
        .get(format!("http://{api}/healthz"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .is_err());
}

/// A real Prometheus scrapes the node and sees the target up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_prometheus_scrapes_the_node() {
    if !have("prometheus") {
        assert!(!require_clients(), "prometheus missing");
        eprintln!("prometheus not installed: skipping");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path()).await;
    let api = node.api_addr().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = dir.path().join("prom.yml");
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: cairn\n    static_configs:\n      - targets: ['{api}']\n"
        ),
    )
    .unwrap();
    let mut prom = Command::new("prometheus")
        .arg(format!("--config.file={}", cfg.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut up = false;
    let mut last = String::new();
    while Instant::now() < deadline {
        if let Ok(r) = http
            .get(format!(
                "http://127.0.0.1:{port}/api/v1/query?query=up%7Bjob%3D%22cairn%22%7D"
            ))
            .send()
            .await
        {
            last = r.text().await.unwrap_or_default();
            if last.contains("\"value\"") && last.contains("\"1\"]") {
                up = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // A cairn series is queryable too.
    let series = http
        .get(format!(
            "http://127.0.0.1:{port}/api/v1/query?query=cairn_store_dedup_ratio"
        ))
        .send()
        .await
        .map(|r| r.status().is_success())
        .unwrap_or(false);
    let _ = prom.kill();
    let _ = prom.wait();
    node.shutdown().await;
    assert!(up, "prometheus never saw the node up: {last}");
    assert!(series);
}
