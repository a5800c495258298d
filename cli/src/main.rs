//! The `cairn` binary: parse flags, turn them into ready config, run.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cairn_node::chunkstore::{EngineKind, PutOptions, Store, StoreConfig};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

mod cluster;
mod image_cmd;
mod node_cmd;
mod site_cmd;
mod size;
mod volume_cmd;

/// Cairn: the data plane of an edge cloud.
#[derive(Debug, Parser)]
#[command(name = "cairn", version, about, propagate_version = true)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// More logging (-v info, -vv debug). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Work on a local chunk store directly (no daemon needed).
    Store(StoreArgs),
    /// Create a cluster CA and issue node identities for mutual TLS.
    Cluster(cluster::ClusterArgs),
    /// Run a node: serve the local store to peers over QUIC until Ctrl-C.
    Node(node_cmd::NodeArgs),
    /// Fetch an object from peers into the local store, verifying every chunk.
    Fetch(node_cmd::FetchArgs),
    /// Ask a running node about images (--api URL).
    Image(image_cmd::ImageArgs),
    /// Writable volumes on a running node, served over NBD (--api URL).
    Volume(volume_cmd::VolumeArgs),
    /// Sites a running node knows: `ls` lists them, `show NAME` details one
    /// (--api URL).
    Site(site_cmd::SiteArgs),
}

#[derive(Debug, clap::Args)]
struct StoreArgs {
    /// Data directory; created if missing.
    #[arg(long, env = "CAIRN_DATA_DIR", default_value = "cairn-data")]
    data_dir: PathBuf,
    /// I/O engine for segment files.
    #[arg(long, default_value = "auto")]
    engine: EngineKind,
    /// Byte budget for chunk payloads (e.g. 20G); least recently used chunks
    /// of unpinned objects are evicted past it.
    #[arg(long, value_parser = size::parse_size)]
    budget: Option<u64>,
    /// zstd-compress chunks that shrink by at least 10%.
    #[arg(long)]
    compress: bool,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Option<StoreCmd>,
}

#[derive(Debug, Subcommand)]
enum StoreCmd {
    /// Store a file ("-" for stdin); prints its object id, sha256, chunk count and dedup saving.
    Put {
        /// File to store.
        file: PathBuf,
        /// Name to point at the object.
        #[arg(long)]
        name: Option<String>,
        /// Also compute sha512.
        #[arg(long)]
        sha512: bool,
        /// Do not pin the object (GC may then remove it unless it is named).
        #[arg(long)]
        no_pin: bool,
    },
    /// Write an object to a file or stdout.
    Get {
        /// Object id, name, or digest (sha256:…).
        what: String,
        /// Output file (default stdout).
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// List names, pins and objects.
    Ls,
    /// Show one object, or the whole store without an argument.
    Stat {
        /// Object id, name, or digest.
        what: Option<String>,
    },
    /// Verify every chunk and every index entry; exit 2 if anything is wrong.
    Fsck,
    /// Remove unreferenced objects and chunks, and compact segments.
    Gc,
    /// Re-read one object and check its chunks and its sha256; exit 2 on mismatch.
    Verify {
        /// Object id, name, or digest.
        what: String,
    },
    /// Remove a name, a pin, or every root of an object id.
    Rm {
        /// Name, pin key, or object id.
        what: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cairn: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn init_logging(cli: &Cli) {
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cli.log_format == "json" {
        b.json().init();
    } else {
        b.init();
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.cmd {
        Cmd::Store(args) => store_cmd(args),
        Cmd::Cluster(args) => cluster::run(args),
        Cmd::Node(args) => node_cmd::run_node(args).map(|()| ExitCode::SUCCESS),
        Cmd::Fetch(args) => node_cmd::run_fetch(args).map(|()| ExitCode::SUCCESS),
        Cmd::Image(args) => image_cmd::run(args).map(|()| ExitCode::SUCCESS),
        Cmd::Volume(args) => volume_cmd::run(args).map(|()| ExitCode::SUCCESS),
        Cmd::Site(args) => site_cmd::run(args).map(|()| ExitCode::SUCCESS),
    }
}

pub(crate) fn bar(total: u64, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() || total < (64 << 20) {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb.set_message(what.to_owned());
    pb
}

fn open(args: &StoreArgs) -> anyhow::Result<Store> {
    let cfg = StoreConfig {
        engine: args.engine,
        budget_bytes: args.budget,
        compress: args.compress,
        ..StoreConfig::default()
    };
    Store::open(&args.data_dir, cfg)
        .with_context(|| format!("open store at {}", args.data_dir.display()))
}

fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn store_cmd(args: StoreArgs) -> anyhow::Result<ExitCode> {
    let store = open(&args)?;
    let Some(cmd) = &args.cmd else {
        return summary(&store, args.json);
    };
    match cmd {
        StoreCmd::Put {
            file,
            name,
            sha512,
            no_pin,
        } => {
            let progress = Arc::new(AtomicU64::new(0));
            let opts = PutOptions {
                name: name.clone(),
                pin: !no_pin,
                sha512: *sha512,
                progress: Some(progress.clone()),
                chunker: None,
            };
            let start = Instant::now();
            let res = if file.as_os_str() == "-" {
                store.put_reader(std::io::stdin().lock(), &opts)?
            } else {
                let f = std::fs::File::open(file)
                    .with_context(|| format!("open {}", file.display()))?;
                let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                let pb = bar(len, "put");
                let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let ticker = {
                    let (pb, done, progress) = (pb.clone(), done.clone(), progress.clone());
                    std::thread::spawn(move || {
                        while !done.load(Ordering::Relaxed) {
                            pb.set_position(progress.load(Ordering::Relaxed));
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    })
                };
                let r = store.put_reader(std::io::BufReader::with_capacity(1 << 20, f), &opts);
                done.store(true, Ordering::Relaxed);
                let _ = ticker.join();
                pb.finish_and_clear();
                r.with_context(|| format!("store {}", file.display()))?
            };
            if args.json {
                print_json(&res)?;
            } else {
                let secs = start.elapsed().as_secs_f64();
                println!("object  {}", res.object);
                println!("sha256  {}", res.sha256);
                if let Some(s) = &res.sha512 {
                    println!("sha512  {s}");
                }
                println!("size    {} ({})", res.len, size::human(res.len));
                println!("chunks  {} ({} new)", res.chunks, res.new_chunks);
                println!(
                    "dedup   {:.1}% saved ({} new bytes, {} on disk)",
                    res.dedup_saving() * 100.0,
                    size::human(res.new_bytes),
                    size::human(res.stored_bytes)
                );
                if let Some(n) = name {
                    println!("name    {n}");
                }
                println!(
                    "time    {:.2}s ({}/s)",
                    secs,
                    size::human((res.len as f64 / secs.max(1e-9)) as u64)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        StoreCmd::Get { what, output } => {
            let id = store.resolve(what)?;
            let h = store.open_object(&id)?;
            let pb = bar(h.len(), "get");
            let mut out: Box<dyn Write> = match output {
                Some(p) => Box::new(std::io::BufWriter::new(
                    std::fs::File::create(p).with_context(|| format!("create {}", p.display()))?,
                )),
                None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
            };
            for c in h.chunks() {
                let c = c.with_context(|| format!("read object {id}"))?;
                out.write_all(&c).context("write output")?;
                pb.inc(c.len() as u64);
            }
            out.flush().context("write output")?;
            pb.finish_and_clear();
            Ok(ExitCode::SUCCESS)
        }
        StoreCmd::Ls => {
            let names = store.names()?;
            let pins = store.pins()?;
            if args.json {
                let names: Vec<_> = names
                    .iter()
                    .map(|(n, e)| serde_json::json!({"name": n, "object": e.object}))
                    .collect();
                let pins: Vec<_> = pins
                    .iter()
                    .map(|(k, o)| serde_json::json!({"pin": k, "object": o}))
                    .collect();
                print_json(&serde_json::json!({"names": names, "pins": pins}))?;
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{:<40} {:<12} {:>12} {:>9}",
                "NAME / PIN", "OBJECT", "SIZE", "STATE"
            );
            for (label, obj) in names
                .iter()
                .map(|(n, e)| (n.clone(), e.object))
                .chain(pins.iter().map(|(k, o)| (format!("[pin] {k}"), *o)))
            {
                let (size, state) = match store.object_stat(&obj) {
                    Ok(s) => (size::human(s.len), s.state()),
                    Err(_) => ("-".into(), "dangling"),
                };
                let label = if label.len() > 40 {
                    format!("{}…", &label[..39])
                } else {
                    label
                };
                println!(
                    "{:<40} {:<12} {:>12} {:>9}",
                    label,
                    obj.fmt_short(),
                    size,
                    state
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        StoreCmd::Stat { what: None } => summary(&store, args.json),
        StoreCmd::Stat { what: Some(what) } => {
            let id = store.resolve(what)?;
            let s = store.object_stat(&id)?;
            if args.json {
                print_json(&s)?;
                return Ok(ExitCode::SUCCESS);
            }
            println!("object   {}", s.id);
            println!("size     {} ({})", s.len, size::human(s.len));
            println!(
                "chunks   {} ({} distinct, {} present)",
                s.chunks, s.unique_chunks, s.present_chunks
            );
            println!(
                "state    {} ({:.1}% present)",
                s.state(),
                if s.len == 0 {
                    100.0
                } else {
                    s.present_bytes as f64 * 100.0 / s.len as f64
                }
            );
            println!("on disk  {}", size::human(s.stored_bytes));
            println!("pinned   {}", if s.pinned { "yes" } else { "no" });
            if !s.names.is_empty() {
                println!("names    {}", s.names.join(", "));
            }
            if let Some(i) = &s.info {
                println!("sha256   {}", i.sha256);
                if let Some(x) = &i.sha512 {
                    println!("sha512   {x}");
                }
                println!("blake3   {}", i.blake3);
            }
            Ok(ExitCode::SUCCESS)
        }
        StoreCmd::Fsck => {
            let pb = bar(store.summary().physical_bytes, "fsck");
            let r = store.fsck(|n| pb.inc(n))?;
            pb.finish_and_clear();
            if args.json {
                print_json(&r)?;
            } else {
                println!(
                    "chunks verified  {} ({})",
                    r.chunks_checked,
                    size::human(r.bytes_checked)
                );
                println!("objects checked  {}", r.objects_checked);
                println!(
                    "garbage bytes    {} (reclaimed by gc)",
                    size::human(r.garbage_bytes)
                );
                for c in &r.corrupt {
                    println!("CORRUPT   {c}");
                }
                for b in &r.bad_entries {
                    println!("BAD       {b}");
                }
                for (o, c) in &r.missing {
                    println!("MISSING   chunk {c} of object {o}");
                }
                for d in &r.dangling {
                    println!("DANGLING  {d}");
                }
                println!(
                    "{}",
                    if r.is_clean() {
                        "clean"
                    } else {
                        "PROBLEMS FOUND"
                    }
                );
            }
            Ok(if r.is_clean() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            })
        }
        StoreCmd::Gc => {
            let r = store.gc()?;
            if args.json {
                print_json(&r)?;
            } else {
                println!("objects removed   {}", r.objects_removed);
                println!(
                    "chunks removed    {} ({})",
                    r.chunks_removed,
                    size::human(r.chunk_bytes_removed)
                );
                println!(
                    "segments compacted {} ({} chunks moved)",
                    r.segments_compacted, r.chunks_moved
                );
                println!("disk reclaimed    {}", size::human(r.bytes_reclaimed));
            }
            Ok(ExitCode::SUCCESS)
        }
        StoreCmd::Verify { what } => {
            let id = store.resolve(what)?;
            let pb = bar(store.recipe(&id)?.total_len(), "verify");
            let r = store.verify_object(&id, |n| pb.inc(n))?;
            pb.finish_and_clear();
            if args.json {
                print_json(&r)?;
            } else {
                println!(
                    "{} {} bytes: {}",
                    r.object,
                    r.bytes,
                    if r.sha256_ok { "ok" } else { "SHA256 MISMATCH" }
                );
            }
            Ok(if r.sha256_ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            })
        }
        StoreCmd::Rm { what } => {
            let n = store.remove(what)?;
            if n == 0 {
                bail!("nothing named {what}");
            }
            println!("removed {n} root(s); run `cairn store gc` to reclaim space");
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn summary(store: &Store, json: bool) -> anyhow::Result<ExitCode> {
    let s = store.summary();
    if json {
        print_json(&s)?;
        return Ok(ExitCode::SUCCESS);
    }
    println!("store     {}", s.dir.display());
    println!("engine    {}", s.engine);
    println!("objects   {}", store.objects()?.len());
    println!("logical   {}", size::human(s.logical_bytes));
    println!("physical  {}", size::human(s.physical_bytes));
    println!(
        "segments  {} files, {}",
        s.segments,
        size::human(s.segment_bytes)
    );
    if s.physical_bytes > 0 {
        println!(
            "dedup     {:.2}x",
            s.logical_bytes as f64 / s.physical_bytes as f64
        );
    }
    match s.budget_bytes {
        Some(b) => println!("budget    {}", size::human(b)),
        None => println!("budget    none"),
    }
    Ok(ExitCode::SUCCESS)
}
