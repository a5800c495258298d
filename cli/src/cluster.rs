//! `cairn cluster`: create a cluster CA and issue node identities.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use cairn_transport::identity::{ClusterCa, Identity, ANY_PEER, CA_CERT_FILE, CA_KEY_FILE};
use clap::Subcommand;

/// Manage the cluster's mutual-TLS identities (no daemon needed).
#[derive(Debug, clap::Args)]
pub(crate) struct ClusterArgs {
    #[command(subcommand)]
    cmd: ClusterCmd,
}

#[derive(Debug, Subcommand)]
enum ClusterCmd {
    /// Create a cluster CA in DIR (created if missing): DIR/ca.pem and
    /// DIR/ca.key. Refuses if DIR already holds one.
    Init {
        /// Cluster directory.
        dir: PathBuf,
    },
    /// Issue a node identity in DIR/NAME (node.pem, node.key, ca.pem), signed
    /// by the cluster CA in DIR.
    AddNode {
        /// Cluster directory (holding ca.pem and ca.key).
        dir: PathBuf,
        /// Node name: 1-63 characters of a-z, 0-9 and '-', not starting or
        /// ending with '-'.
        name: String,
    },
}

pub(crate) fn run(args: ClusterArgs) -> anyhow::Result<ExitCode> {
    match args.cmd {
        ClusterCmd::Init { dir } => init(&dir),
        ClusterCmd::AddNode { dir, name } => add_node(&dir, &name),
    }
}

fn init(dir: &Path) -> anyhow::Result<ExitCode> {
    let ca = ClusterCa::init(dir)
        .with_context(|| format!("create a cluster CA in {}", dir.display()))?;
    println!("cluster CA   {}", dir.join(CA_CERT_FILE).display());
    println!(
        "CA key       {} (keep it secret; only needed to add nodes)",
        dir.join(CA_KEY_FILE).display()
    );
    println!("fingerprint  {}", ca.fingerprint());
    println!(
        "next: cairn cluster add-node {} NAME   (once per node)",
        dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn add_node(dir: &Path, name: &str) -> anyhow::Result<ExitCode> {
    let ca = ClusterCa::load(dir)
        .with_context(|| format!("load the cluster CA from {}", dir.display()))?;
    let node_dir = ca
        .add_node(dir, name)
        .with_context(|| format!("add node {name:?} to the cluster in {}", dir.display()))?;
    // Read it back the way a node will, so a bad identity shows up now.
    let id = Identity::load(&node_dir)
        .with_context(|| format!("check the new identity in {}", node_dir.display()))?;
    println!("node         {}", id.name());
    println!(
        "identity     {} (node.pem, node.key, ca.pem)",
        node_dir.display()
    );
    println!("CA           {}", id.ca_fingerprint());
    println!("peers reach it as {:?} or {ANY_PEER:?}", id.name());
    println!("copy that directory to the node and start it with:");
    println!("  cairn node --identity {}", node_dir.display());
    Ok(ExitCode::SUCCESS)
}
