//! The top site pulls through from an upstream OCI registry over HTTP:
//! docker-registry 2.8, started and stopped by the test; anonymous, with
//! htpasswd (Basic) auth, and behind a bearer-token gate (the Distribution
//! token flow).

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
    start_docker_registry_with(dir, "")
}

/// docker-registry with `extra` appended to its YAML config.
fn start_docker_registry_with(dir: &std::path::Path, extra: &str) -> Option<Upstream> {
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
    // The port is picked by binding port 0 and letting it go, so another
    // test may take it first: then our registry exits at once and we try
    // again on a new port (and never talk to someone else's listener).
    for _attempt in 0..5 {
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
                "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n{extra}",
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
        let mut up = Upstream { child, addr };
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut exited = false;
        while std::net::TcpStream::connect(&up.addr).is_err() {
            assert!(Instant::now() < deadline, "docker-registry did not start");
            if up.child.try_wait().unwrap().is_some() {
                exited = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // A listener that answered may be another test's: ours must still
        // be running a moment later.
        std::thread::sleep(Duration::from_millis(200));
        if exited || up.child.try_wait().unwrap().is_some() {
            eprintln!("docker-registry exited at start (port {port} taken?); retrying");
            continue;
        }
        return Some(up);
    }
    panic!("docker-registry would not start");
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

/// Push a one-layer Docker v2s2 image `lib/app:v1` to the registry at
/// `reg`; returns the manifest and layer bytes.
async fn push_test_image(http: &reqwest::Client, reg: &str) -> (Vec<u8>, Vec<u8>) {
    let mut layer = vec![0u8; 6 << 20];
    rand::rngs::StdRng::seed_from_u64(5).fill_bytes(&mut layer);
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    push_blob(http, reg, "lib/app", &layer).await;
    push_blob(http, reg, "lib/app", config).await;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": sha(config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "digest": sha(&layer), "size": layer.len()}],
    }))
    .unwrap();
    let r = http
        .put(format!("http://{reg}/v2/lib/app/manifests/v1"))
        .header(
            "content-type",
            "application/vnd.docker.distribution.manifest.v2+json",
        )
        .body(manifest.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());

    (manifest, layer)
}

/// A node whose registry pulls through `upstream`, tweaked by `f`.
async fn top_node(dir: &std::path::Path, upstream: &str, f: impl FnOnce(&mut NodeConfig)) -> Node {
    let mut cfg = NodeConfig::new(dir.join("cairn"));
    cfg.endpoint.listen = "127.0.0.1:0".parse().unwrap();
    cfg.api_listen = None;
    cfg.nbd_listen = None;
    cfg.registry_listen = Some("127.0.0.1:0".parse().unwrap());
    cfg.registry.upstream = Some(upstream.to_owned());
    f(&mut cfg);
    Node::start(cfg).await.unwrap()
}

/// GET `lib/app:v1` and its layer from the node's registry; assert bytes.
async fn pull_and_check(
    http: &reqwest::Client,
    reg: std::net::SocketAddr,
    manifest: &[u8],
    layer: &[u8],
) {
    let r = http
        .get(format!("http://{reg}/v2/lib/app/manifests/v1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert_eq!(r.headers()["docker-content-digest"], sha(manifest).as_str());
    assert_eq!(
        r.headers()["content-type"],
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    assert_eq!(r.bytes().await.unwrap(), manifest);
    let r = http
        .get(format!("http://{reg}/v2/lib/app/blobs/{}", sha(layer)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.bytes().await.unwrap() == layer, "layer bytes");
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
    let (manifest, layer) = push_test_image(&http, &up.addr).await;

    let node = top_node(dir.path(), &format!("http://{}", up.addr), |_| {}).await;
    let reg = node.registry_addr().unwrap();
    pull_and_check(&http, reg, &manifest, &layer).await;
    // The upstream goes away: what was pulled stays served locally.
    drop(up);
    pull_and_check(&http, reg, &manifest, &layer).await;
    let r = http
        .get(format!("http://{reg}/v2/lib/app/manifests/other"))
        .send()
        .await
        .unwrap();
    assert!(r.status() == 404 || r.status() == 502, "{}", r.status());
    node.shutdown().await;
}

/// A client that sends `Authorization: Basic user:pass` on every request.
fn basic_client(user: &str, pass: &str) -> reqwest::Client {
    use base64::Engine as _;
    let v = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
    let mut h = reqwest::header::HeaderMap::new();
    h.insert(
        reqwest::header::AUTHORIZATION,
        format!("Basic {v}").parse().unwrap(),
    );
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .default_headers(h)
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_with_basic_auth_needs_the_configured_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let hash = bcrypt::hash("s3cret", 4).unwrap();
    let htpasswd = dir.path().join("htpasswd");
    std::fs::write(&htpasswd, format!("puller:{hash}\n")).unwrap();
    let extra = format!(
        "auth:\n  htpasswd:\n    realm: cairn-test\n    path: {}\n",
        htpasswd.display()
    );
    let Some(up) = start_docker_registry_with(dir.path(), &extra) else {
        return;
    };
    // The upstream really wants auth.
    let anon = reqwest::Client::new();
    let r = anon
        .get(format!("http://{}/v2/", up.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let (manifest, layer) = push_test_image(&basic_client("puller", "s3cret"), &up.addr).await;
    let url = format!("http://{}", up.addr);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();

    // Without credentials: the miss fails, with a clear error, not a 200.
    let anon_dir = dir.path().join("anon");
    let node = top_node(&anon_dir, &url, |_| {}).await;
    let reg = node.registry_addr().unwrap();
    let r = http
        .get(format!("http://{reg}/v2/lib/app/manifests/v1"))
        .send()
        .await
        .unwrap();
    assert!(
        r.status().is_server_error() || r.status() == 404,
        "{}",
        r.status()
    );
    node.shutdown().await;

    // A wrong password is refused the same way.
    let wrong = dir.path().join("wrong-pass");
    std::fs::write(&wrong, "nope\n").unwrap();
    let node = top_node(&dir.path().join("wrong"), &url, |c| {
        c.registry.upstream_username = Some("puller".into());
        c.registry.upstream_password_file = Some(wrong.clone());
    })
    .await;
    let reg = node.registry_addr().unwrap();
    let r = http
        .get(format!("http://{reg}/v2/lib/app/manifests/v1"))
        .send()
        .await
        .unwrap();
    assert_ne!(r.status(), 200);
    node.shutdown().await;

    // With them: the image comes through, byte for byte.
    let pass = dir.path().join("pass");
    std::fs::write(&pass, "s3cret\n").unwrap();
    let node = top_node(&dir.path().join("authed"), &url, |c| {
        c.registry.upstream_username = Some("puller".into());
        c.registry.upstream_password_file = Some(pass.clone());
    })
    .await;
    pull_and_check(&http, node.registry_addr().unwrap(), &manifest, &layer).await;
    node.shutdown().await;
}

/// A bearer-token gate in front of docker-registry, as hosted registries
/// work: `/v2/…` without `Authorization: Bearer TOKEN` gets a 401 with a
/// `Bearer realm=…` challenge; `/token` hands TOKEN to `puller:s3cret`
/// and counts how often it was asked.
struct TokenGate {
    addr: std::net::SocketAddr,
    tokens_issued: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: tokio_util::sync::CancellationToken,
}

impl Drop for TokenGate {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn start_token_gate(upstream: String) -> TokenGate {
    use axum::extract::{Request, State};
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::{IntoResponse, Response};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[derive(Clone)]
    struct Gate {
        upstream: String,
        realm: String,
        issued: Arc<AtomicUsize>,
        http: reqwest::Client,
    }
    async fn token(State(g): State<Gate>, headers: HeaderMap) -> Response {
        use base64::Engine as _;
        let want = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("puller:s3cret")
        );
        if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(want.as_str()) {
            return StatusCode::UNAUTHORIZED.into_response();
        }
        g.issued.fetch_add(1, Ordering::SeqCst);
        axum::Json(serde_json::json!({"token": "T0K3N", "expires_in": 300})).into_response()
    }
    async fn v2(State(g): State<Gate>, req: Request) -> Response {
        let ok = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            == Some("Bearer T0K3N");
        if !ok {
            let challenge = format!(
                r#"Bearer realm="{}",service="gate",scope="repository:lib/app:pull""#,
                g.realm
            );
            return (StatusCode::UNAUTHORIZED, [("www-authenticate", challenge)]).into_response();
        }
        let mut fwd = g.http.get(format!("{}{}", g.upstream, req.uri()));
        if let Some(a) = req.headers().get("accept") {
            fwd = fwd.header("accept", a.clone());
        }
        let r = fwd.send().await.unwrap();
        let status = StatusCode::from_u16(r.status().as_u16()).unwrap();
        let mut h = HeaderMap::new();
        for name in ["content-type", "docker-content-digest", "content-length"] {
            if let Some(v) = r.headers().get(name) {
                h.insert(name, v.to_str().unwrap().parse().unwrap());
            }
        }
        (status, h, r.bytes().await.unwrap()).into_response()
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let issued = Arc::new(AtomicUsize::new(0));
    let gate = Gate {
        upstream,
        realm: format!("http://{addr}/token"),
        issued: issued.clone(),
        http: reqwest::Client::new(),
    };
    let app = axum::Router::new()
        .route("/token", axum::routing::get(token))
        .fallback(v2)
        .with_state(gate);
    let stop = tokio_util::sync::CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { s.cancelled().await })
            .await
            .unwrap();
    });
    TokenGate {
        addr,
        tokens_issued: issued,
        stop,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_bearer_token_flow_fetches_and_reuses_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let Some(up) = start_docker_registry(dir.path()) else {
        return;
    };
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let (manifest, layer) = push_test_image(&http, &up.addr).await;
    let gate = start_token_gate(format!("http://{}", up.addr)).await;
    let pass = dir.path().join("pass");
    std::fs::write(&pass, "s3cret\n").unwrap();
    let node = top_node(dir.path(), &format!("http://{}", gate.addr), |c| {
        c.registry.upstream_username = Some("puller".into());
        c.registry.upstream_password_file = Some(pass.clone());
    })
    .await;
    pull_and_check(&http, node.registry_addr().unwrap(), &manifest, &layer).await;
    // Manifest and blobs all went through the gate on one token.
    assert_eq!(
        gate.tokens_issued.load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    node.shutdown().await;
}
