//! The Cairn node daemon: configuration, lifecycle, and the wiring between the
//! chunk store, the transport and the front ends.
//!
//! So far a node opens its chunk store, binds its QUIC endpoint with the
//! cluster identity, serves its chunks to peers and fetches from them
//! (issues 1/8 and 2/8). The OCI registry, NBD, `/metrics` over HTTP,
//! prefetch and placement arrive with issues 3/8 onwards.
//!
//! Lifecycle: one [`CancellationToken`] per node; every task stops on it.
//! Shutdown order: stop accepting (server), cancel fetches, close the QUIC
//! endpoint (peers see a clean close), wait for it to drain, then drop the
//! store (RocksDB flushes; everything acknowledged was already synced).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use cairn_chunkstore as chunkstore;
pub use cairn_transport as transport;

use cairn_chunkstore::{Store, StoreConfig, StoreError};
use cairn_transport::identity::{DenyList, Identity, IdentityError};
use cairn_transport::tls::Refusals;
use cairn_transport::wire::{Hello, PROTOCOL_VERSION};
use cairn_transport::{
    endpoint, EndpointConfig, FetchConfig, Fetcher, Server, ServerConfig, TransportMetrics,
};
pub use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Everything a node needs to start.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Data directory: the chunk store, the same layout `cairn store
    /// --data-dir` works on.
    pub data_dir: PathBuf,
    /// Chunk store settings.
    pub store: StoreConfig,
    /// Node identity directory from `cairn cluster add-node`; `None` makes a
    /// throw-away single-node cluster.
    pub identity: Option<PathBuf>,
    /// Node names refused in either direction.
    pub deny: Vec<String>,
    /// Site name, announced to peers.
    pub site: String,
    /// QUIC endpoint settings (listen address, congestion control, windows).
    pub endpoint: EndpointConfig,
    /// Fetch client settings.
    pub fetch: FetchConfig,
    /// Send chunks zstd-compressed when it saves at least 10%.
    pub wire_zstd: bool,
}

impl NodeConfig {
    /// Defaults for a data directory: listen on 0.0.0.0:7441, no identity.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            store: StoreConfig::default(),
            identity: None,
            deny: Vec::new(),
            site: "local".into(),
            endpoint: EndpointConfig::default(),
            fetch: FetchConfig::default(),
            wire_zstd: true,
        }
    }
}

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
}

impl Node {
    /// Open the store, bind the endpoint and start serving. Must run inside
    /// a tokio runtime.
    pub fn start(cfg: NodeConfig) -> Result<Self, NodeError> {
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
        let server = Server::spawn(
            ep.clone(),
            store.clone(),
            ServerConfig {
                hello: hello.clone(),
                wire_zstd: cfg.wire_zstd,
            },
            transport_metrics.clone(),
            refusals.clone(),
            cancel.child_token(),
        );
        let fetcher = Fetcher::new(
            ep.clone(),
            store.clone(),
            cfg.fetch.clone(),
            hello,
            transport_metrics.clone(),
            cancel.child_token(),
        );
        info!(
            node = identity.name(),
            ca = %identity.ca_fingerprint(),
            addr = ?ep.local_addr().ok(),
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
        })
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

    /// All metrics of this node.
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
