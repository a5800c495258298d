//! `cairn node` (run a node) and `cairn fetch` (fill a local store from
//! peers).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cairn_node::chunkstore::{EngineKind, StoreConfig};
use cairn_node::transport::wire::{ObjectKey, Priority};
use cairn_node::transport::{Congestion, PeerAddr};
use cairn_node::{Node, NodeConfig};

use crate::size;

/// Flags shared by `node` and `fetch`.
#[derive(Debug, clap::Args)]
pub(crate) struct NodeFlags {
    /// Data directory (the chunk store); created if missing.
    #[arg(long, env = "CAIRN_DATA_DIR", default_value = "cairn-data")]
    data_dir: PathBuf,
    /// Node identity from `cairn cluster add-node` (DIR/NAME). Without it the
    /// node is a throw-away single-node cluster.
    #[arg(long, env = "CAIRN_IDENTITY")]
    identity: Option<PathBuf>,
    /// Refuse this node name, in either direction (repeatable).
    #[arg(long = "deny", value_name = "NAME")]
    deny: Vec<String>,
    /// Congestion controller for QUIC connections.
    #[arg(long, default_value = "cubic")]
    congestion: Congestion,
    /// I/O engine for segment files.
    #[arg(long, default_value = "auto")]
    engine: EngineKind,
    /// Byte budget for chunk payloads (e.g. 20G).
    #[arg(long, value_parser = size::parse_size)]
    budget: Option<u64>,
}

#[derive(Debug, clap::Args)]
pub(crate) struct NodeArgs {
    #[command(flatten)]
    flags: NodeFlags,
    /// QUIC listen address.
    #[arg(long, default_value = "0.0.0.0:7441")]
    listen: SocketAddr,
    /// Site name announced to peers.
    #[arg(long, default_value = "local")]
    site: String,
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

fn config(f: &NodeFlags, listen: SocketAddr) -> NodeConfig {
    let mut cfg = NodeConfig::new(&f.data_dir);
    cfg.identity = f.identity.clone();
    cfg.deny = f.deny.clone();
    cfg.endpoint.listen = listen;
    cfg.endpoint.congestion = f.congestion;
    cfg.store = StoreConfig {
        engine: f.engine,
        budget_bytes: f.budget,
        ..StoreConfig::default()
    };
    cfg
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

pub(crate) fn run_node(args: NodeArgs) -> anyhow::Result<()> {
    let mut cfg = config(&args.flags, args.listen);
    cfg.site = args.site;
    runtime()?.block_on(async {
        let node = Node::start(cfg).context("start node")?;
        eprintln!(
            "cairn node {} serving {} on {} (Ctrl-C stops)",
            node.identity().name(),
            args.flags.data_dir.display(),
            node.local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|| "?".into())
        );
        let cancel = node.cancel_token();
        tokio::select! {
            _ = shutdown_signal() => {}
            _ = cancel.cancelled() => {}
        }
        node.shutdown().await;
        Ok(())
    })
}

fn parse_peer(s: &str) -> anyhow::Result<PeerAddr> {
    let (name, addr) = match s.split_once('@') {
        Some((n, a)) => (Some(n.to_owned()), a),
        None => (None, s),
    };
    let addr: SocketAddr = addr
        .parse()
        .with_context(|| format!("bad peer address {addr:?} (want IP:PORT or NAME@IP:PORT)"))?;
    Ok(PeerAddr { addr, name })
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
    if args.flags.identity.is_none() {
        bail!("fetch needs --identity DIR/NAME: peers only talk to nodes of their own cluster");
    }
    let peers = args
        .from
        .iter()
        .map(|p| parse_peer(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let cfg = config(&args.flags, SocketAddr::from(([0, 0, 0, 0], 0)));
    let key = parse_key(&args.what);
    let prio = if args.background {
        Priority::Background
    } else {
        Priority::Demand
    };
    runtime()?.block_on(async {
        let node = Node::start(cfg).context("start node")?;
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
            _ = shutdown_signal() => Err(anyhow::anyhow!("interrupted")),
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
