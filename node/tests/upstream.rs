//! The top site pulls through from an upstream OCI registry over HTTP:
//! docker-registry 2.8, started and stopped by the test.

#![allow(clippy::unwrap_used)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cairn_node::{Node, NodeConfig};
use rand::{RngCore, SeedableRng};
use sha2::Digest as _;

fn sha(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(b)))
}

struct Upstream {
    child: Child,
    addr: String,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_docker_registry(dir: &std::path::Path) -> Option<Upstream> {
    let have = Command::new("sh")
        .args(["-c", "command -v docker-registry"])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !have {
        assert!(
            std::env::var_os("CAIRN_REQUIRE_CLIENTS").is_none(),
            "docker-registry missing"
        );
        eprintln!("docker-registry not installed: skipping");
        return None;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let cfg = dir.join("config.yml");
    std::fs::write(
        &cfg,
        format!(
            "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
            dir.join("data").display()
        ),
    )
    .unwrap();
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let up = Upstream { child, addr };
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(&up.addr).is_err() {
        assert!(Instant::now() < deadline, "docker-registry did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Some(up)
}

/// Push a blob the way every registry accepts: POST, then PUT with the body.
async fn push_blob(http: &reqwest::Client, reg: &str, repo: &str, b: &[u8]) {
    let r = http
        .post(format!("http://{reg}/v2/{repo}/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let loc = r.headers()["location"].to_str().unwrap().to_owned();
    let url = if loc.starts_with("http") {
        loc
    } else {
        format!("http://{reg}{loc}")
    };
    let sep = if url.contains('?') { '&' } else { '?' };
    let r = http
        .put(format!("{url}{sep}digest={}", sha(b)))
        .body(b.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_site_pulls_through_docker_registry() {
    let dir = tempfile::tempdir().unwrap();
    let Some(up) = start_docker_registry(dir.path()) else {
        return;
    };
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let mut layer = vec![0u8; 6 << 20];
    rand::rngs::StdRng::seed_from_u64(5).fill_bytes(&mut layer);
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    push_blob(&http, &up.addr, "lib/app", &layer).await;
    push_blob(&http, &up.addr, "lib/app", config).await;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": sha(config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "digest": sha(&layer), "size": layer.len()}],
    }))
    .unwrap();
    let r = http
        .put(format!("http://{}/v2/lib/app/manifests/v1", up.addr))
        .header(
            "content-type",
            "application/vnd.docker.distribution.manifest.v2+json",
        )
        .body(manifest.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());

    let mut cfg = NodeConfig::new(dir.path().join("cairn"));
    cfg.endpoint.listen = "127.0.0.1:0".parse().unwrap();
    cfg.api_listen = None;
    cfg.registry_listen = Some("127.0.0.1:0".parse().unwrap());
    cfg.registry.upstream = Some(format!("http://{}", up.addr));
    let node = Node::start(cfg).await.unwrap();
    let reg = node.registry_addr().unwrap();

    let pull = |http: reqwest::Client| {
        let manifest = manifest.clone();
        let layer = layer.clone();
        async move {
            let r = http
                .get(format!("http://{reg}/v2/lib/app/manifests/v1"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            assert_eq!(
                r.headers()["docker-content-digest"],
                sha(&manifest).as_str()
            );
            assert_eq!(
                r.headers()["content-type"],
                "application/vnd.docker.distribution.manifest.v2+json"
            );
            assert_eq!(r.bytes().await.unwrap(), manifest);
            let r = http
                .get(format!("http://{reg}/v2/lib/app/blobs/{}", sha(&layer)))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            assert!(r.bytes().await.unwrap() == layer, "layer bytes");
        }
    };
    pull(http.clone()).await;
    // The upstream goes away: what was pulled stays served locally.
    drop(up);
    pull(http.clone()).await;
    let r = http
        .get(format!("http://{reg}/v2/lib/app/manifests/other"))
        .send()
        .await
        .unwrap();
    assert!(r.status() == 404 || r.status() == 502, "{}", r.status());
    node.shutdown().await;
}
