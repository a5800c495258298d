//! Helpers shared by the multi-site tests: a cluster CA, nodes, OCI images
//! pushed and pulled over HTTP, and a UDP relay that can cut a link.

#![allow(clippy::unwrap_used, dead_code, unreachable_pub)]

pub mod nbd;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use cairn_node::transport::identity::ClusterCa;
use cairn_node::transport::PeerAddr;
use cairn_node::{Node, NodeConfig};
use rand::{RngCore, SeedableRng};
use sha2::Digest as _;
use tokio_util::sync::CancellationToken;

pub fn sha(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(b)))
}

pub fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub ca: ClusterCa,
}

impl Cluster {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = ClusterCa::init(&dir.path().join("ca")).unwrap();
        Self { dir, ca }
    }

    pub async fn node(&self, name: &str, parents: Vec<PeerAddr>) -> Node {
        self.node_with(name, parents, |_| {}).await
    }

    /// A node whose config `tweak` adjusts before it starts.
    pub async fn node_with(
        &self,
        name: &str,
        parents: Vec<PeerAddr>,
        tweak: impl FnOnce(&mut NodeConfig),
    ) -> Node {
        // A node restarted under the same name keeps its identity.
        let existing = self.dir.path().join("ca").join(name);
        let id = if existing.exists() {
            existing
        } else {
            self.ca.add_node(&self.dir.path().join("ca"), name).unwrap()
        };
        let mut cfg = NodeConfig::new(self.dir.path().join(format!("data-{name}")));
        cfg.identity = Some(id);
        cfg.site = name.to_owned();
        cfg.endpoint.listen = "127.0.0.1:0".parse().unwrap();
        cfg.api_listen = Some("127.0.0.1:0".parse().unwrap());
        cfg.nbd_listen = Some("127.0.0.1:0".parse().unwrap());
        cfg.registry_listen = Some("127.0.0.1:0".parse().unwrap());
        cfg.registry.push_open = Some(true);
        cfg.parents = parents;
        tweak(&mut cfg);
        Node::start(cfg).await.unwrap()
    }
}

pub fn peer(n: &Node) -> PeerAddr {
    PeerAddr::named(n.local_addr().unwrap(), n.identity().name())
}

pub struct Image {
    pub manifest: Vec<u8>,
    pub digest: String,
    pub blobs: Vec<Vec<u8>>,
}

pub fn image(layers: Vec<Vec<u8>>) -> Image {
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#
            .to_vec();
    let desc = |mt: &str, b: &[u8]| serde_json::json!({"mediaType": mt, "digest": sha(b), "size": b.len()});
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": desc("application/vnd.oci.image.config.v1+json", &config),
        "layers": layers.iter().map(|l| desc("application/vnd.oci.image.layer.v1.tar", l)).collect::<Vec<_>>(),
    }))
    .unwrap();
    let digest = sha(&manifest);
    let mut blobs = vec![config];
    blobs.extend(layers);
    Image {
        manifest,
        digest,
        blobs,
    }
}

pub async fn push(http: &reqwest::Client, reg: &str, repo: &str, tag: &str, img: &Image) {
    for b in &img.blobs {
        let r = http
            .post(format!(
                "http://{reg}/v2/{repo}/blobs/uploads/?digest={}",
                sha(b)
            ))
            .body(b.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    }
    let r = http
        .put(format!("http://{reg}/v2/{repo}/manifests/{tag}"))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(img.manifest.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
}

/// Pull like a client: manifest by tag, then every blob; check digests and bytes.
pub async fn pull(http: &reqwest::Client, reg: &str, repo: &str, tag: &str, img: &Image) {
    let r = http
        .get(format!("http://{reg}/v2/{repo}/manifests/{tag}"))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap();
    if r.status() != 200 {
        panic!(
            "pull {repo}:{tag} from {reg}: {} {}",
            r.status(),
            r.text().await.unwrap()
        );
    }
    assert_eq!(r.headers()["docker-content-digest"], img.digest.as_str());
    assert_eq!(
        r.headers()["content-type"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(r.bytes().await.unwrap(), img.manifest);
    for b in &img.blobs {
        let r = http
            .get(format!("http://{reg}/v2/{repo}/blobs/{}", sha(b)))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let got = r.bytes().await.unwrap();
        assert!(got.as_ref() == b.as_slice(), "blob {} differs", sha(b));
    }
}

pub fn fetched(n: &Node) -> u64 {
    let mut total = 0;
    for fam in n.registry().gather() {
        if fam.name() == "cairn_transport_peer_chunks_fetched_total" {
            for s in fam.get_metric() {
                total += s.get_counter().get_value() as u64;
            }
        }
    }
    total
}

pub fn have_skopeo() -> bool {
    std::process::Command::new("skopeo")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// A UDP relay in front of one node: point a peer at `addr`, and `cut`
/// drops every packet both ways (a partition) until it is cleared. The
/// node behind sees the relay's back socket as the peer's address, and
/// connections it opens to that address reach the peer through the relay.
pub struct Relay {
    pub addr: SocketAddr,
    pub cut: Arc<AtomicBool>,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    pub async fn start(target: SocketAddr) -> Self {
        let front = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let back = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        back.connect(target).await.unwrap();
        let addr = front.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let cancel = CancellationToken::new();
        let (c2, k2) = (cut.clone(), cancel.clone());
        let task = tokio::spawn(async move {
            let mut client: Option<SocketAddr> = None;
            let mut a = vec![0u8; 65536];
            let mut b = vec![0u8; 65536];
            loop {
                tokio::select! {
                    _ = k2.cancelled() => break,
                    r = front.recv_from(&mut a) => {
                        let Ok((n, from)) = r else { break };
                        client = Some(from);
                        if !c2.load(Ordering::Relaxed) {
                            let _ = back.send(&a[..n]).await;
                        }
                    }
                    r = back.recv(&mut b) => {
                        let Ok(n) = r else { continue };
                        if let (Some(c), false) = (client, c2.load(Ordering::Relaxed)) {
                            let _ = front.send_to(&b[..n], c).await;
                        }
                    }
                }
            }
        });
        Self {
            addr,
            cut,
            cancel,
            task,
        }
    }

    pub fn set_cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::Relaxed);
    }

    pub async fn stop(self) {
        self.cancel.cancel();
        let _ = self.task.await;
    }
}

/// The sum of a counter family's series in a node's metrics.
pub fn counter(n: &Node, family: &str) -> f64 {
    let mut total = 0.0;
    for fam in n.registry().gather() {
        if fam.name() == family {
            for s in fam.get_metric() {
                total += s.get_counter().get_value() + s.get_gauge().get_value();
            }
        }
    }
    total
}
