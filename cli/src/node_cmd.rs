//! `cairn node` (run a node) and `cairn fetch` (fill a local store from
//! peers).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cairn_node::chunkstore::EngineKind;
use cairn_node::transport::wire::{ObjectKey, Priority};
use cairn_node::transport::{Congestion, PeerAddr};
use cairn_node::{config, FileConfig, Node, NodeConfig};

/// Flags shared by `node` and `fetch`. Each overrides the config file, which
/// overrides the built-in defaults.
#[derive(Debug, clap::Args)]
pub(crate) struct NodeFlags {
    /// TOML config file (see cairn.example.toml).
    #[arg(long, env = "CAIRN_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory (the chunk store); created if missing [default: cairn-data].
    #[arg(long, env = "CAIRN_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Node identity from `cairn cluster add-node` (DIR/NAME). Without it the
    /// node is a throw-away single-node cluster.
    #[arg(long, env = "CAIRN_IDENTITY")]
    identity: Option<PathBuf>,
    /// Refuse this node name, in either direction (repeatable).
    #[arg(long = "deny", value_name = "NAME")]
    deny: Vec<String>,
    /// Congestion controller for QUIC connections: cubic or bbr [default: cubic].
    #[arg(long)]
    congestion: Option<Congestion>,
    /// I/O engine for segment files [default: auto].
    #[arg(long)]
    engine: Option<EngineKind>,
    /// Byte budget for chunk payloads (e.g. 20G).
    #[arg(long, value_parser = config::parse_size)]
    budget: Option<u64>,
}

#[derive(Debug, clap::Args)]
pub(crate) struct NodeArgs {
    #[command(flatten)]
    flags: NodeFlags,
    /// Site name announced to peers [default: local].
    #[arg(long)]
    site: Option<String>,
    /// Parent site, HOST:PORT or NAME@HOST:PORT (repeatable).
    #[arg(long = "parent", value_name = "PEER")]
    parents: Vec<String>,
    /// Peer site, HOST:PORT or NAME@HOST:PORT (repeatable).
    #[arg(long = "peer", value_name = "PEER")]
    peers: Vec<String>,
    /// OCI registry listener [default: 127.0.0.1:5000].
    #[arg(long)]
    registry_listen: Option<SocketAddr>,
    /// API listener: /metrics, /healthz, admin API [default: 127.0.0.1:7480].
    #[arg(long)]
    api_listen: Option<SocketAddr>,
    /// QUIC listener for peers [default: 127.0.0.1:7443].
    #[arg(long)]
    quic_listen: Option<SocketAddr>,
    /// NBD listener for VM image exports (image/NAME) [default:
    /// 127.0.0.1:10809]. Must be loopback unless --nbd-allow-remote.
    #[arg(long)]
    nbd_listen: Option<SocketAddr>,
    /// Allow a non-loopback --nbd-listen. NBD STARTTLS is not implemented:
    /// images are then served unencrypted to whoever can reach the port.
    #[arg(long)]
    nbd_allow_remote: bool,
    /// Top site: pull registry misses through this upstream OCI registry
    /// (http://HOST:PORT or https://…).
    #[arg(long, value_name = "URL")]
    upstream: Option<String>,
}

#[derive(Debug, clap::Args)]
pub(crate) struct FetchArgs {
    #[command(flatten)]
    flags: NodeFlags,
    /// A peer to fetch from: ADDR or NAME@ADDR (pins the peer's name).
    /// Repeat for several sources.
    #[arg(long = "from", required = true, value_name = "PEER")]
    from: Vec<String>,
    /// Fetch as background traffic instead of demand.
    #[arg(long)]
    background: bool,
    /// Object id, digest (sha256:…) or name.
    what: String,
}

/// Defaults, then the config file, then the flags.
fn config(f: &NodeFlags) -> anyhow::Result<NodeConfig> {
    let default_dir = PathBuf::from("cairn-data");
    let mut cfg = match &f.config {
        Some(path) => {
            let file = FileConfig::load(path)?;
            let base = path
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from("."));
            NodeConfig::from_file(&file, &base, &default_dir)?
        }
        None => NodeConfig::new(&default_dir),
    };
    if let Some(d) = &f.data_dir {
        cfg.data_dir = d.clone();
    }
    if let Some(i) = &f.identity {
        cfg.identity = Some(i.clone());
    }
    cfg.deny.extend(f.deny.iter().cloned());
    if let Some(c) = f.congestion {
        cfg.endpoint.congestion = c;
    }
    if let Some(e) = f.engine {
        cfg.store.engine = e;
    }
    if let Some(b) = f.budget {
        cfg.store.budget_bytes = Some(b);
    }
    Ok(cfg)
}

fn peers(list: &[String]) -> anyhow::Result<Vec<PeerAddr>> {
    list.iter()
        .map(|p| config::parse_peer(p).map_err(|e| anyhow::anyhow!(e)))
        .collect()
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")
}

/// SIGINT and SIGTERM, caught from the moment this is made (so a signal
/// that arrives while the node starts is not lost to the default action).
struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            int: signal(SignalKind::interrupt()).context("install the SIGINT handler")?,
            term: signal(SignalKind::terminate()).context("install the SIGTERM handler")?,
        })
    }

    /// Resolves on SIGINT or SIGTERM.
    async fn recv(&mut self) {
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
        }
    }
}

pub(crate) fn run_node(args: NodeArgs) -> anyhow::Result<()> {
    let mut cfg = config(&args.flags)?;
    if let Some(s) = args.site {
        cfg.site = s;
    }
    cfg.parents.extend(peers(&args.parents)?);
    cfg.peers.extend(peers(&args.peers)?);
    if let Some(a) = args.registry_listen {
        cfg.registry_listen = Some(a);
    }
    if let Some(a) = args.api_listen {
        cfg.api_listen = Some(a);
    }
    if let Some(a) = args.quic_listen {
        cfg.endpoint.listen = a;
    }
    if let Some(a) = args.nbd_listen {
        cfg.nbd_listen = Some(a);
    }
    if args.nbd_allow_remote {
        cfg.nbd_allow_remote = true;
    }
    if let Some(u) = args.upstream {
        cfg.registry.upstream = Some(u);
    }
    runtime()?.block_on(async {
        let mut signals = Signals::install()?;
        let node = Node::start(cfg).await.context("start node")?;
        let show = |a: Option<SocketAddr>| a.map(|a| a.to_string()).unwrap_or_else(|| "-".into());
        eprintln!(
            "cairn node {} (site {}) serving {} on quic {} api {} registry {} nbd {} (Ctrl-C stops)",
            node.identity().name(),
            node.config().site,
            node.config().data_dir.display(),
            show(node.local_addr()),
            show(node.api_addr()),
            show(node.registry_addr()),
            show(node.nbd_addr()),
        );
        let cancel = node.cancel_token();
        tokio::select! {
            _ = signals.recv() => {}
            _ = cancel.cancelled() => {}
        }
        node.shutdown().await;
        Ok(())
    })
}

fn parse_key(s: &str) -> ObjectKey {
    if s.len() == 64 {
        if let Ok(id) = s.parse() {
            return ObjectKey::Id(id);
        }
    }
    if s.starts_with("sha256:") || s.starts_with("sha512:") || s.starts_with("blake3:") {
        return ObjectKey::Digest(s.to_owned());
    }
    ObjectKey::Name(s.to_owned())
}

pub(crate) fn run_fetch(args: FetchArgs) -> anyhow::Result<()> {
    let peers = peers(&args.from)?;
    let mut cfg = config(&args.flags)?;
    if cfg.identity.is_none() {
        bail!("fetch needs --identity DIR/NAME: peers only talk to nodes of their own cluster");
    }
    // A client: an ephemeral port, no HTTP listeners.
    cfg.endpoint.listen = SocketAddr::from(([0, 0, 0, 0], 0));
    cfg.api_listen = None;
    cfg.registry_listen = None;
    let key = parse_key(&args.what);
    let prio = if args.background {
        Priority::Background
    } else {
        Priority::Demand
    };
    runtime()?.block_on(async {
        let mut signals = Signals::install()?;
        let node = Node::start(cfg).await.context("start node")?;
        let started = Instant::now();
        let fetcher = node.fetcher().clone();
        let res = async {
            let (id, recipe) = fetcher
                .fetch_recipe(&key, &peers, prio)
                .await
                .with_context(|| format!("fetch recipe of {}", args.what))?;
            let pb = crate::bar(recipe.total_len(), "fetch");
            let metrics = node.transport_metrics().clone();
            let labels: Vec<String> = peers.iter().map(|p| p.addr.to_string()).collect();
            let want: Vec<_> = recipe.chunks().iter().map(|c| (c.id, c.len)).collect();
            let fetch = fetcher.fetch_chunks(&want, &peers, prio);
            tokio::pin!(fetch);
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            let report = loop {
                tokio::select! {
                    r = &mut fetch => break r,
                    _ = tick.tick() => {
                        let got: u64 = labels.iter().map(|l| metrics.bytes_in.with_label_values(&[l]).get()).sum();
                        pb.set_position(got.min(recipe.total_len()));
                    }
                }
            };
            pb.finish_and_clear();
            let report = report.with_context(|| format!("fetch chunks of {id}"))?;
            anyhow::Ok((id, recipe, report))
        };
        let out = tokio::select! {
            r = res => r,
            _ = signals.recv() => Err(anyhow::anyhow!("interrupted")),
        };
        node.shutdown().await;
        let (id, recipe, report) = out?;
        let secs = started.elapsed().as_secs_f64();
        println!("object    {id}");
        println!("length    {}", recipe.total_len());
        println!(
            "chunks    {} ({} already here, {} fetched, {} waited for)",
            report.chunks, report.local, report.fetched, report.coalesced
        );
        println!(
            "fetched   {} bytes in {secs:.2} s ({:.1} MB/s)",
            report.bytes,
            report.bytes as f64 / secs / 1e6
        );
        let mut per: Vec<_> = report.per_peer.iter().collect();
        per.sort();
        for (addr, n) in per {
            println!("from      {addr}: {n} chunks");
        }
        if report.verify_failures > 0 {
            println!(
                "rejected  {} chunk(s) that failed verification (fetched again elsewhere)",
                report.verify_failures
            );
        }
        Ok(())
    })
}
