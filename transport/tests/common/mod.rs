//! Test nodes on loopback: a store, a QUIC endpoint, a server and a fetcher,
//! all stopped by `TestNode::stop`.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cairn_chunkstore::{ChunkId, PutOptions, Store, StoreConfig};
use cairn_transport::identity::{ClusterCa, DenyList, Identity};
use cairn_transport::server::SourceObject;
use cairn_transport::tls::Refusals;
use cairn_transport::wire::{Hello, ObjectKey};
use cairn_transport::{
    endpoint, ChunkSource, EndpointConfig, FetchConfig, Fetcher, PeerAddr, Server, ServerConfig,
    SourceError, TransportMetrics,
};
use tokio_util::sync::CancellationToken;

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

    pub fn identity(&self, name: &str) -> Identity {
        let d = self.ca.add_node(&self.dir.path().join("ca"), name).unwrap();
        Identity::load(&d).unwrap()
    }
}

pub struct TestNode {
    pub name: String,
    pub store: Arc<Store>,
    pub endpoint: quinn::Endpoint,
    pub server: Option<Server>,
    pub fetcher: Fetcher,
    pub metrics: TransportMetrics,
    pub registry: prometheus::Registry,
    pub refusals: Refusals,
    pub cancel: CancellationToken,
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

pub fn test_endpoint_config() -> EndpointConfig {
    EndpointConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    }
}

pub struct NodeOpts {
    pub endpoint: EndpointConfig,
    pub fetch: FetchConfig,
    /// Serve from this instead of the node's own store.
    pub source: Option<Arc<dyn ChunkSource>>,
    pub deny: Vec<String>,
    /// zstd-compress chunks in the node's store.
    pub compress: bool,
}

impl Default for NodeOpts {
    fn default() -> Self {
        Self {
            endpoint: test_endpoint_config(),
            fetch: FetchConfig::default(),
            source: None,
            deny: Vec::new(),
            compress: false,
        }
    }
}

impl TestNode {
    pub fn start(cluster: &Cluster, name: &str, opts: NodeOpts) -> Self {
        let id = cluster.identity(name);
        Self::start_with(id, name, opts)
    }

    pub fn start_with(id: Identity, name: &str, opts: NodeOpts) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let registry = prometheus::Registry::new();
        let store = Arc::new(
            Store::open_with_registry(
                dir.path().join("store"),
                StoreConfig {
                    compress: opts.compress,
                    ..StoreConfig::default()
                },
                &registry,
            )
            .unwrap(),
        );
        let metrics = TransportMetrics::new(&registry);
        let refusals = Refusals::new();
        refusals.register(&registry).unwrap();
        let deny = Arc::new(DenyList::new(opts.deny));
        let ep = endpoint::bind(&id, deny, refusals.clone(), &opts.endpoint).unwrap();
        let addr = ep.local_addr().unwrap();
        let cancel = CancellationToken::new();
        let hello = Hello {
            node: name.to_owned(),
            site: format!("site-{name}"),
            version: 1,
            capabilities: vec!["zstd".into()],
        };
        let source: Arc<dyn ChunkSource> = match opts.source {
            Some(s) => s,
            None => store.clone(),
        };
        let server = Server::spawn(
            ep.clone(),
            source,
            ServerConfig {
                hello: hello.clone(),
                wire_zstd: true,
                offers: None,
                meta: None,
            },
            metrics.clone(),
            refusals.clone(),
            cancel.child_token(),
        );
        let fetcher = Fetcher::new(
            ep.clone(),
            store.clone(),
            opts.fetch,
            hello,
            metrics.clone(),
            cancel.child_token(),
        );
        Self {
            name: name.to_owned(),
            store,
            endpoint: ep,
            server: Some(server),
            fetcher,
            metrics,
            registry,
            refusals,
            cancel,
            addr,
            _dir: dir,
        }
    }

    pub fn peer(&self) -> PeerAddr {
        PeerAddr::named(self.addr, self.name.clone())
    }

    pub async fn stop(mut self) {
        self.cancel.cancel();
        if let Some(s) = self.server.take() {
            s.shutdown().await;
        }
        self.endpoint.close(0u32.into(), b"test over");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }

    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        for fam in self.registry.gather() {
            if fam.name() != name {
                continue;
            }
            for m in fam.get_metric() {
                let ok = labels.iter().all(|(k, v)| {
                    m.get_label()
                        .iter()
                        .any(|l| l.name() == *k && l.value() == *v)
                });
                if ok {
                    return match fam.get_field_type() {
                        prometheus::proto::MetricType::COUNTER => m.get_counter().get_value(),
                        prometheus::proto::MetricType::GAUGE => m.get_gauge().get_value(),
                        _ => 0.0,
                    };
                }
            }
        }
        0.0
    }
}

/// Deterministic pseudo-random bytes.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut v = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

pub fn put(store: &Store, data: &[u8], name: Option<&str>) -> cairn_chunkstore::ObjectId {
    let opts = PutOptions {
        name: name.map(str::to_owned),
        ..Default::default()
    };
    store.put_bytes(data, &opts).unwrap().object
}

/// Read a whole object back from a store.
pub fn read_all(store: &Store, id: &cairn_chunkstore::ObjectId) -> Vec<u8> {
    let h = store.open_object(id).unwrap();
    let mut out = vec![0u8; h.len() as usize];
    h.read_at(0, &mut out).unwrap();
    out
}

/// A hostile source: serves the real store's chunks with one bit flipped.
pub struct Liar {
    pub inner: Arc<Store>,
    pub served: AtomicU64,
}

impl ChunkSource for Liar {
    fn chunk(&self, id: &ChunkId) -> Result<Option<Bytes>, SourceError> {
        let real = ChunkSource::chunk(&*self.inner, id)?;
        Ok(real.map(|b| {
            self.served.fetch_add(1, Ordering::Relaxed);
            let mut v = b.to_vec();
            let i = v.len() / 2;
            v[i] ^= 0x10;
            Bytes::from(v)
        }))
    }
    fn has(&self, id: &ChunkId) -> Result<bool, SourceError> {
        ChunkSource::has(&*self.inner, id)
    }
    fn object(&self, key: &ObjectKey) -> Result<Option<SourceObject>, SourceError> {
        ChunkSource::object(&*self.inner, key)
    }
}

/// A source whose first read of one chunk blocks until `release` (every
/// other read, including later reads of that chunk, is served at once).
pub struct Gate {
    pub inner: Arc<Store>,
    pub gated: ChunkId,
    pub held: AtomicBool,
    pub open: std::sync::Mutex<bool>,
    pub cv: std::sync::Condvar,
}

impl Gate {
    pub fn new(inner: Arc<Store>, gated: ChunkId) -> Self {
        Self {
            inner,
            gated,
            held: AtomicBool::new(false),
            open: std::sync::Mutex::new(false),
            cv: std::sync::Condvar::new(),
        }
    }

    /// Let the held read go on.
    pub fn release(&self) {
        *self.open.lock().unwrap() = true;
        self.cv.notify_all();
    }
}

impl ChunkSource for Gate {
    fn chunk(&self, id: &ChunkId) -> Result<Option<Bytes>, SourceError> {
        if *id == self.gated && !self.held.swap(true, Ordering::SeqCst) {
            let mut open = self.open.lock().unwrap();
            while !*open {
                open = self.cv.wait(open).unwrap();
            }
        }
        ChunkSource::chunk(&*self.inner, id)
    }
    fn has(&self, id: &ChunkId) -> Result<bool, SourceError> {
        ChunkSource::has(&*self.inner, id)
    }
    fn object(&self, key: &ObjectKey) -> Result<Option<SourceObject>, SourceError> {
        ChunkSource::object(&*self.inner, key)
    }
}

/// A UDP relay the test controls: forwards between one client and `target`,
/// and drops everything while `cut` is set.
pub struct Relay {
    pub addr: SocketAddr,
    pub cut: Arc<AtomicBool>,
    pub forwarded: Arc<AtomicU64>,
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
        let forwarded = Arc::new(AtomicU64::new(0));
        let cancel = CancellationToken::new();
        let (c2, f2, k2) = (cut.clone(), forwarded.clone(), cancel.clone());
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
                            f2.fetch_add(n as u64, Ordering::Relaxed);
                            let _ = back.send(&a[..n]).await;
                        }
                    }
                    r = back.recv(&mut b) => {
                        let Ok(n) = r else { continue };
                        if let (Some(c), false) = (client, c2.load(Ordering::Relaxed)) {
                            f2.fetch_add(n as u64, Ordering::Relaxed);
                            let _ = front.send_to(&b[..n], c).await;
                        }
                    }
                }
            }
        });
        Self {
            addr,
            cut,
            forwarded,
            cancel,
            task,
        }
    }

    pub async fn stop(self) {
        self.cancel.cancel();
        let _ = self.task.await;
    }
}

pub async fn with_timeout<F: std::future::Future>(secs: u64, f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .expect("test timed out")
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

pub fn fsck_clean(store: &Store) {
    let r = store.fsck(|_| {}).unwrap();
    assert!(r.is_clean(), "fsck: {r:?}");
}

pub fn _path(_: &Path) {}
