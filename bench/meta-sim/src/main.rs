//! `cairn-meta-sim`: thousands of Cairn sites in one process, on the real
//! `cairn-meta` code paths. See the crate docs ([`cairn_meta_sim`]).

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

/// Site-metadata scale simulation: converge, partition, update both sides,
/// heal, and report rounds, bytes, coordinate error, memory and time.
#[derive(Debug, Parser)]
#[command(name = "cairn-meta-sim", version)]
struct Args {
    /// Number of sites.
    #[arg(long, default_value_t = 10_000)]
    sites: usize,
    /// Sites cut off from the rest during the partition.
    #[arg(long, default_value_t = 1_000)]
    partitioned: usize,
    /// RNG seed (topology, placement, jitter, order).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Random peer links each site initiates (besides its parent).
    #[arg(long, default_value_t = 3)]
    peers: usize,
    /// Vivaldi probe rounds before coordinates are published.
    #[arg(long, default_value_t = 300)]
    probe_rounds: usize,
    /// Fraction of sites that update their record in the converge and
    /// partition phases.
    #[arg(long, default_value_t = 0.1)]
    update_fraction: f64,
    /// Multi-writer tag keys written concurrently on both sides of the cut.
    #[arg(long, default_value_t = 50)]
    tags: usize,
    /// Give up on convergence after this many rounds in a phase.
    #[arg(long, default_value_t = 30)]
    max_rounds: usize,
    /// Write the markdown report here instead of stdout.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Also write the figures as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let command: Vec<String> = std::env::args().collect();
    let cfg = cairn_meta_sim::Config {
        sites: args.sites,
        partitioned: args.partitioned,
        seed: args.seed,
        peers: args.peers,
        probe_rounds: args.probe_rounds,
        tags: args.tags,
        max_rounds: args.max_rounds,
        update_fraction: args.update_fraction,
        progress: true,
    };
    let report = cairn_meta_sim::run(&cfg)?;
    let reproduce = format!(
        "nice -n 10 cargo run --release -p cairn-meta-sim -- {}\n# ran as: {}",
        command.get(1..).unwrap_or_default().join(" "),
        command.join(" ")
    );
    let md = report.markdown(&reproduce);
    match &args.out {
        Some(p) => std::fs::write(p, &md).with_context(|| format!("writing {}", p.display()))?,
        None => std::io::stdout().write_all(md.as_bytes())?,
    }
    if let Some(p) = &args.json {
        std::fs::write(p, serde_json::to_string_pretty(&report.json())?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    eprintln!("{}", report.verdict_line());
    if !report.all_pass() {
        std::process::exit(1);
    }
    Ok(())
}
