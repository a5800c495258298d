//! The Cairn node daemon: configuration, lifecycle, and the wiring between the
//! chunk store, the transport and the front ends.
//!
//! A node opens its chunk store, binds its QUIC endpoint with the cluster
//! identity, serves its chunks to peers and fetches from them, and serves
//! `/metrics`, `/healthz` and the admin API over HTTP, and VM images as
//! read-only NBD exports ([`vm`]). Prefetch and placement arrive with
//! issues 6/8 onwards.
//!
//! Lifecycle: one root [`CancellationToken`] per node; every task stops on
//! it. Shutdown order:
//! 1. cancel the root token: HTTP listeners stop accepting and finish the
//!    requests in flight (an upload not yet committed is not acknowledged,
//!    so nothing acknowledged is lost); the NBD server stops accepting and
//!    gives each connection's in-flight requests a short grace (images are
//!    read-only: nothing to flush); the QUIC server stops accepting;
//!    fetches stop (a read waiting on a demand fetch fails with EIO);
//! 2. wait for the HTTP servers, the NBD server and the QUIC accept loop to
//!    end;
//! 3. close the QUIC endpoint (peers see a clean close) and let it drain;
//! 4. drop the store (RocksDB flushes; everything acknowledged was already
//!    synced when it was acknowledged).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub mod api;
pub mod config;
pub mod hlc;
pub mod meta;
pub mod prefetch;
pub mod prefetcher;
pub mod pullthrough;
pub mod registry;
pub mod replicate;
pub mod tls_listener;
pub mod trace;
pub mod upstream_http;
pub mod vm;
pub mod volume;

pub use config::{ConfigError, FileConfig, NodeConfig};

pub use cairn_chunkstore as chunkstore;
pub use cairn_transport as transport;

use cairn_chunkstore::{Store, StoreError};
use cairn_transport::identity::{DenyList, Identity, IdentityError};
use cairn_transport::tls::Refusals;
use cairn_transport::wire::{Hello, PROTOCOL_VERSION};
use cairn_transport::{endpoint, Fetcher, Server, ServerConfig, TransportMetrics};
pub use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The chunk store failed to open.
    #[error("chunk store at {path}: {source}")]
    Store {
        /// Store directory.
        path: PathBuf,
        /// Why.
        source: StoreError,
    },
    /// The identity could not be loaded or made.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The QUIC endpoint could not be set up.
    #[error(transparent)]
    Endpoint(#[from] cairn_transport::endpoint::EndpointError),
    /// The OCI registry could not be set up.
    #[error("registry: {0}")]
    Registry(registry::RegistryError),
    /// A setting is invalid.
    #[error("config: {0}")]
    Config(String),
    /// A TCP listener could not be bound.
    #[error("cannot listen for {what} on {addr}: {source}")]
    Listen {
        /// Which listener.
        what: &'static str,
        /// Address asked for.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// The registry's settings from the node's: uploads under the data dir, the
/// push token from its file.
fn registry_config(cfg: &NodeConfig) -> Result<registry::RegistryConfig, NodeError> {
    let mut r = registry::RegistryConfig::new(cfg.data_dir.join("uploads"));
    let token_file = match (&cfg.registry.push_token_file, cfg.registry.push_open) {
        (Some(path), _) => Some(path.clone()),
        (None, Some(true)) => None,
        // Push is never open by accident: without a token file, the node
        // makes one in its data dir on first start.
        (None, _) => {
            let path = cfg.data_dir.join("registry-token");
            if !path.exists() {
                make_token_file(&path)?;
                info!(path = %path.display(), "registry: created a push token");
            }
            Some(path)
        }
    };
    if let Some(path) = token_file {
        let token = std::fs::read_to_string(&path).map_err(|e| {
            NodeError::Config(format!("registry push token file {}: {e}", path.display()))
        })?;
        let token = token.trim();
        if token.is_empty() {
            return Err(NodeError::Config(format!(
                "registry push token file {} is empty",
                path.display()
            )));
        }
        r.push_token = Some(token.to_owned());
    }
    r.pull_token_required = cfg.registry.pull_requires_token.unwrap_or(false);
    if r.pull_token_required && r.push_token.is_none() {
        return Err(NodeError::Config(
            "registry.pull_requires_token needs a push token".into(),
        ));
    }
    Ok(r)
}

fn make_token_file(path: &std::path::Path) -> Result<(), NodeError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let token: [u8; 32] = rand::random();
    let fail = |e: std::io::Error| {
        NodeError::Config(format!(
            "cannot create push token file {}: {e}",
            path.display()
        ))
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(fail)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(fail)?;
    writeln!(f, "{}", hex::encode(token)).map_err(fail)?;
    f.sync_all().map_err(fail)
}

async fn listen(
    what: &'static str,
    addr: SocketAddr,
) -> Result<tokio::net::TcpListener, NodeError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| NodeError::Listen { what, addr, source })
}

/// A running node.
#[derive(Debug)]
pub struct Node {
    store: Arc<Store>,
    identity: Identity,
    endpoint: quinn::Endpoint,
    server: Option<Server>,
    fetcher: Fetcher,
    registry: prometheus::Registry,
    transport_metrics: TransportMetrics,
    refusals: Refusals,
    cancel: CancellationToken,
    http: Vec<tokio::task::JoinHandle<()>>,
    api_addr: Option<SocketAddr>,
    registry_addr: Option<SocketAddr>,
    nbd_addr: Option<SocketAddr>,
    nbd: Option<tokio::task::JoinHandle<()>>,
    nbd_stats: Arc<cairn_nbd::ServerStats>,
    volumes: volume::Volumes,
    meta: meta::Meta,
    cfg: NodeConfig,
}

impl Node {
    /// Open the store, bind every listener and start serving.
    pub async fn start(cfg: NodeConfig) -> Result<Self, NodeError> {
        cfg.check_nbd().map_err(|e| match e {
            ConfigError::Invalid(m) => NodeError::Config(m),
            e => NodeError::Config(e.to_string()),
        })?;
        // Checked before anything starts, so a bad file is a clean error.
        let mut registry_tls = match (&cfg.registry.tls_cert, &cfg.registry.tls_key) {
            (Some(cert), Some(key)) => Some(
                tls_listener::acceptor(cert, key).map_err(|e| NodeError::Config(e.to_string()))?,
            ),
            (None, None) => None,
            _ => {
                return Err(NodeError::Config(
                    "registry.tls_cert and registry.tls_key go together".into(),
                ))
            }
        };
        let identity = match &cfg.identity {
            Some(dir) => Identity::load(dir)?,
            None => {
                let id = Identity::ephemeral("local")?;
                warn!(
                    "no --identity given: running as a throw-away single-node cluster \
                     (peers cannot connect; use `cairn cluster init` and `cairn cluster add-node`)"
                );
                id
            }
        };
        let registry = prometheus::Registry::new();
        let store_dir = cfg.data_dir.clone();
        let store = Arc::new(
            Store::open_with_registry(&store_dir, cfg.store.clone(), &registry).map_err(
                |source| NodeError::Store {
                    path: store_dir.clone(),
                    source,
                },
            )?,
        );
        let transport_metrics = TransportMetrics::new(&registry);
        let refusals = Refusals::new();
        let _ = refusals.register(&registry);
        let deny = Arc::new(DenyList::new(cfg.deny.iter().cloned()));
        let ep = endpoint::bind(&identity, deny, refusals.clone(), &cfg.endpoint)?;
        let cancel = CancellationToken::new();
        let hello = Hello {
            node: identity.name().to_owned(),
            site: cfg.site.clone(),
            version: u16::from(PROTOCOL_VERSION),
            capabilities: if cfg.wire_zstd {
                vec!["zstd".into()]
            } else {
                Vec::new()
            },
        };
        let fetcher = Fetcher::new(
            ep.clone(),
            store.clone(),
            cfg.fetch.clone(),
            hello.clone(),
            transport_metrics.clone(),
            cancel.child_token(),
        );
        let mut http = Vec::new();
        // The registry (and replication, which needs it) exists before the
        // transport server, which hands replication offers to it.
        let reg = match cfg.registry_listen {
            Some(_) => Some(
                registry::Registry::new(
                    store.clone(),
                    registry_config(&cfg)?,
                    &registry,
                    cancel.child_token(),
                )
                .map_err(NodeError::Registry)?,
            ),
            None => None,
        };
        let replicator = match &reg {
            Some(reg) => {
                let r = replicate::Replicator::new(
                    reg.clone(),
                    fetcher.clone(),
                    cfg.replication.clone(),
                    &cfg.parents,
                    &cfg.peers,
                    &registry,
                    cancel.child_token(),
                )
                .map_err(|e| NodeError::Registry(e.into()))?;
                reg.set_push_hook(r.push_hook());
                http.push(tokio::spawn(r.clone().run()));
                Some(r)
            }
            None => None,
        };
        let mut meta_settings = cfg.meta.clone();
        if meta_settings.parent.is_none() {
            meta_settings.parent = cfg.parents.first().and_then(|p| p.name.clone());
        }
        let meta = meta::Meta::open(
            store.clone(),
            &cfg.site,
            cfg.labels.clone(),
            meta_settings,
            &registry,
        )
        .map_err(|e| NodeError::Config(format!("site metadata: {e}")))?;
        {
            let links: Vec<cairn_transport::PeerAddr> =
                cfg.parents.iter().chain(&cfg.peers).cloned().collect();
            http.push(tokio::spawn(meta.clone().run(
                fetcher.clone(),
                links,
                cancel.child_token(),
            )));
        }
        let server = Server::spawn(
            ep.clone(),
            store.clone(),
            ServerConfig {
                hello,
                wire_zstd: cfg.wire_zstd,
                offers: replicator
                    .as_ref()
                    .map(replicate::Replicator::offer_handler),
                meta: Some(meta.stream_handler()),
            },
            transport_metrics.clone(),
            refusals.clone(),
            cancel.child_token(),
        );
        let api_l = match cfg.api_listen {
            Some(a) => Some(listen("the API", a).await?),
            None => None,
        };
        let api_addr = api_l.as_ref().and_then(|l| l.local_addr().ok());
        let nbd_l = match cfg.nbd_listen {
            Some(a) => Some(listen("NBD", a).await?),
            None => None,
        };
        let nbd_addr = nbd_l.as_ref().and_then(|l| l.local_addr().ok());
        let nbd_stats = Arc::new(cairn_nbd::ServerStats::default());
        let vm_sources: Vec<cairn_transport::PeerAddr> = cfg
            .parents
            .iter()
            .chain(cfg.peers.iter())
            .cloned()
            .collect();
        let nbd_metrics = vm::NbdMetrics::new(&registry, nbd_stats.clone())
            .map_err(|e| NodeError::Config(format!("NBD metrics: {e}")))?;
        let vm_images = if cfg.nbd_background_fill {
            vm::VmImages::with_background_fill(
                store.clone(),
                Some(fetcher.clone()),
                vm_sources,
                nbd_metrics,
                cancel.child_token(),
            )
        } else {
            vm::VmImages::new(
                store.clone(),
                Some(fetcher.clone()),
                vm_sources,
                nbd_metrics,
            )
        };
        if let Some(r) = &replicator {
            let weak = r.downgrade();
            vm_images.set_announce_hook(Arc::new(move |name, object| match weak.upgrade() {
                Some(r) => r.announce_image(name, object).map_err(|e| e.to_string()),
                None => Err("the node is shutting down".into()),
            }));
        }
        vm_images.set_prefetch(
            cfg.prefetch.clone(),
            prefetcher::PrefetchMetrics::new(&registry)
                .map_err(|e| NodeError::Config(format!("prefetch metrics: {e}")))?,
            cancel.child_token(),
        );
        let volumes = volume::Volumes::new(
            store.clone(),
            vm_images.clone(),
            volume::VolumeMetrics::new(&registry)
                .map_err(|e| NodeError::Config(format!("volume metrics: {e}")))?,
        );
        let nbd = nbd_l.map(|l| {
            if cfg.nbd_allow_remote && nbd_addr.is_some_and(|a| !a.ip().is_loopback()) {
                warn!(addr = ?nbd_addr, "NBD listens beyond loopback without TLS: images are served in the clear");
            }
            tokio::spawn(cairn_nbd::serve_with_stats(
                l,
                Arc::new(vm::ImageProvider::new(vm_images.clone()).with_volumes(volumes.clone())),
                cancel.child_token(),
                cairn_nbd::ServerLimits::default(),
                nbd_stats.clone(),
            ))
        });
        let mut registry_addr = None;
        if let (Some(addr), Some(reg)) = (cfg.registry_listen, reg) {
            let l = listen("the registry", addr).await?;
            registry_addr = l.local_addr().ok();
            let reg = if let Some(url) = &cfg.registry.upstream {
                // The top site: misses go to an upstream OCI registry.
                let mut up = upstream_http::HttpUpstream::new(url, store.clone())
                    .map_err(|e| NodeError::Config(e.to_string()))?;
                if let (Some(user), Some(file)) = (
                    &cfg.registry.upstream_username,
                    &cfg.registry.upstream_password_file,
                ) {
                    let creds = upstream_http::UpstreamCredentials::from_file(user, file)
                        .map_err(|e| NodeError::Config(e.to_string()))?;
                    up = up.with_credentials(creds);
                }
                if !cfg.parents.is_empty() {
                    warn!("registry.upstream is set: parents are used for chunks, not for registry misses");
                }
                reg.with_upstream(Arc::new(up))
            } else if cfg.parents.is_empty() && cfg.peers.is_empty() {
                reg
            } else {
                reg.with_upstream(Arc::new(pullthrough::PullThrough::new(
                    fetcher.clone(),
                    &cfg.parents,
                    &cfg.peers,
                    cancel.child_token(),
                )))
            };
            match registry_tls.take() {
                Some(acc) => {
                    let tl = tls_listener::TlsListener::new(l, acc, cancel.child_token()).map_err(
                        |source| NodeError::Listen {
                            what: "the registry",
                            addr,
                            source,
                        },
                    )?;
                    info!("registry serves HTTPS");
                    http.push(tokio::spawn(api::serve(
                        "registry",
                        tl,
                        reg.router(),
                        cancel.child_token(),
                    )));
                }
                None => http.push(tokio::spawn(api::serve(
                    "registry",
                    l,
                    reg.router(),
                    cancel.child_token(),
                ))),
            }
        }
        if let Some(l) = api_l {
            let info = api::NodeInfo {
                node: identity.name().to_owned(),
                site: cfg.site.clone(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
                quic: ep.local_addr().ok(),
                registry: registry_addr,
                api: api_addr,
                parents: cfg.parents.iter().map(|p| p.addr.to_string()).collect(),
                peers: cfg.peers.iter().map(|p| p.addr.to_string()).collect(),
            };
            let router = api::router(api::ApiState {
                registry: registry.clone(),
                store: store.clone(),
                info: Arc::new(info),
                fetcher: Some(fetcher.clone()),
                sites: cfg
                    .parents
                    .iter()
                    .chain(cfg.peers.iter())
                    .cloned()
                    .collect(),
            })
            .merge(vm::routes(vm_images.clone()))
            .merge(volume::routes(volumes.clone()))
            .merge(meta::routes(meta.clone()));
            http.push(tokio::spawn(api::serve(
                "api",
                l,
                router,
                cancel.child_token(),
            )));
        }
        info!(
            node = identity.name(),
            site = %cfg.site,
            ca = %identity.ca_fingerprint(),
            quic = ?ep.local_addr().ok(),
            api = ?api_addr,
            nbd = ?nbd_addr,
            store = %store_dir.display(),
            engine = store.engine_name(),
            "node started"
        );
        Ok(Self {
            store,
            identity,
            endpoint: ep,
            server: Some(server),
            fetcher,
            registry,
            transport_metrics,
            refusals,
            cancel,
            http,
            api_addr,
            registry_addr,
            nbd_addr,
            nbd,
            nbd_stats,
            volumes,
            meta,
            cfg,
        })
    }

    /// Where the API listener is bound.
    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.api_addr
    }

    /// Where the registry listener is bound.
    pub fn registry_addr(&self) -> Option<SocketAddr> {
        self.registry_addr
    }

    /// Where the NBD listener is bound.
    pub fn nbd_addr(&self) -> Option<SocketAddr> {
        self.nbd_addr
    }

    /// The NBD server's counters.
    pub fn nbd_stats(&self) -> &Arc<cairn_nbd::ServerStats> {
        &self.nbd_stats
    }

    /// The configuration the node runs with.
    pub fn config(&self) -> &NodeConfig {
        &self.cfg
    }

    /// The node's chunk store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The fetch client.
    pub fn fetcher(&self) -> &Fetcher {
        &self.fetcher
    }

    /// The node's identity.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Where the QUIC endpoint listens.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.endpoint.local_addr().ok()
    }

    /// The node's site metadata.
    pub fn meta(&self) -> &meta::Meta {
        &self.meta
    }

    /// The node's metrics registry.
    pub fn registry(&self) -> &prometheus::Registry {
        &self.registry
    }

    /// Transport metrics.
    pub fn transport_metrics(&self) -> &TransportMetrics {
        &self.transport_metrics
    }

    /// Handshake refusals.
    pub fn refusals(&self) -> &Refusals {
        &self.refusals
    }

    /// The node's cancellation token (cancelling it starts shutdown).
    pub fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Shut down in the documented order; see the crate docs.
    pub async fn shutdown(mut self) {
        info!("node shutting down");
        self.cancel.cancel();
        for h in self.http.drain(..) {
            let _ = h.await;
        }
        if let Some(h) = self.nbd.take() {
            let _ = h.await;
        }
        // Writes a client left unflushed are kept, as a clean shutdown should.
        self.volumes.flush_all().await;
        if let Some(s) = self.server.take() {
            s.shutdown().await;
        }
        self.endpoint.close(0u32.into(), b"node shutting down");
        if tokio::time::timeout(Duration::from_secs(5), self.endpoint.wait_idle())
            .await
            .is_err()
        {
            warn!("QUIC endpoint did not drain within 5 s");
        }
        info!("node stopped");
    }
}
