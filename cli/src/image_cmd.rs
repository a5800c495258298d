//! `cairn image ...`, against a running node's API:
//! - `status REF`: where an OCI image's bytes are, per site;
//! - `import NAME FILE`, `ls`, `rm NAME`: VM images, served by the node over
//!   NBD as `image/NAME`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// `cairn image ...`.
#[derive(Debug, clap::Args)]
pub(crate) struct ImageArgs {
    /// The node's API.
    #[arg(
        long,
        env = "CAIRN_API",
        default_value = "http://127.0.0.1:7480",
        global = true
    )]
    api: String,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: ImageCmd,
}

#[derive(Debug, clap::Subcommand)]
enum ImageCmd {
    /// Per site (this node, its parents and peers): complete, partial (how
    /// much) or absent, for an OCI image.
    Status {
        /// REPO:TAG or REPO@DIGEST.
        reference: String,
    },
    /// Import a VM disk image into the node; it is then served over NBD as
    /// export `image/NAME` (read-only).
    ///
    /// FILE is a raw disk image, streamed to the node (content-defined
    /// chunks, so images sharing blocks share storage). A qcow2 file
    /// (magic `QFI\xfb`) is first converted to raw in a temporary file with
    /// `qemu-img convert -O raw` (from qemu-utils); without qemu-img on PATH
    /// a qcow2 import fails. Other formats are imported as raw bytes.
    Import {
        /// Image name: 1 to 128 characters from A-Z a-z 0-9 . _ -.
        name: String,
        /// Raw or qcow2 disk image.
        file: PathBuf,
    },
    /// List the node's VM images: size, object id, and whether every chunk
    /// is local (`complete`) or some are fetched on first read (`partial`).
    Ls,
    /// Remove a VM image (its name and pin; space comes back at GC).
    Rm {
        /// Image name.
        name: String,
    },
}

pub(crate) fn run(args: ImageArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    let reference = match args.cmd {
        ImageCmd::Status { reference } => reference,
        ImageCmd::Import { name, file } => {
            return rt.block_on(import(&args.api, args.json, &name, &file))
        }
        ImageCmd::Ls => return rt.block_on(ls(&args.api, args.json)),
        ImageCmd::Rm { name } => return rt.block_on(rm(&args.api, args.json, &name)),
    };
    let url = format!("{}/api/v1/image-status", args.api.trim_end_matches('/'));
    let (status, body): (u16, serde_json::Value) = rt.block_on(async {
        let r = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(60))
            .build()?
            .get(&url)
            .query(&[("ref", reference.as_str())])
            .send()
            .await
            .with_context(|| format!("cannot reach the node's API at {}", args.api))?;
        let status = r.status().as_u16();
        let body = r.json().await.context("the API's answer is not JSON")?;
        anyhow::Ok((status, body))
    })?;
    if status != 200 {
        bail!(
            "{}",
            body["error"]
                .as_str()
                .unwrap_or("the node could not answer")
        );
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(());
    }
    let total = body["bytes"].as_u64().unwrap_or(0);
    println!("image    {}", body["reference"].as_str().unwrap_or("?"));
    println!("digest   {}", body["digest"].as_str().unwrap_or("?"));
    println!(
        "size     {} in {} chunks",
        crate::size::human(total),
        body["chunks"].as_u64().unwrap_or(0)
    );
    println!();
    println!("{:<32} {:<12} {:>10} {:>7}", "SITE", "STATE", "HELD", "%");
    for s in body["sites"].as_array().into_iter().flatten() {
        let held = s["bytes"].as_u64().unwrap_or(0);
        let pct = if total == 0 {
            100.0
        } else {
            held as f64 * 100.0 / total as f64
        };
        let mut line = format!(
            "{:<32} {:<12} {:>10} {:>6.1}%",
            s["site"].as_str().unwrap_or("?"),
            s["state"].as_str().unwrap_or("?"),
            crate::size::human(held),
            pct
        );
        if let Some(e) = s["error"].as_str() {
            line.push_str(&format!("  ({e})"));
        }
        println!("{line}");
    }
    Ok(())
}

const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";

pub(crate) fn client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(10))
        .build()?)
}

fn vm_url(api: &str, name: Option<&str>) -> String {
    let base = format!("{}/api/v1/vm-images", api.trim_end_matches('/'));
    match name {
        Some(n) => format!("{base}/{n}"),
        None => base,
    }
}

/// The JSON body, or the API's error message.
pub(crate) async fn answer(r: reqwest::Response) -> anyhow::Result<serde_json::Value> {
    let status = r.status();
    let body: serde_json::Value = r
        .json()
        .await
        .with_context(|| format!("the API answered {status} without JSON"))?;
    if !status.is_success() {
        bail!(
            "{}",
            body["error"]
                .as_str()
                .unwrap_or("the node could not answer")
        );
    }
    Ok(body)
}

fn is_qcow2(path: &Path) -> anyhow::Result<bool> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut magic = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = f.read(&mut magic[got..])?;
        if n == 0 {
            return Ok(false);
        }
        got += n;
    }
    Ok(&magic == QCOW2_MAGIC)
}

fn on_path(bin: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
        .unwrap_or(false)
}

/// qcow2 to a raw temporary file with `qemu-img convert`.
fn qcow2_to_raw(path: &Path) -> anyhow::Result<tempfile::TempPath> {
    if !on_path("qemu-img") {
        bail!(
            "{} is a qcow2 image; converting it needs qemu-img on PATH \
             (apt-get install qemu-utils), or convert it to raw yourself",
            path.display()
        );
    }
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
    let tmp = tempfile::Builder::new()
        .prefix(".cairn-import-")
        .suffix(".raw")
        .tempfile_in(dir.unwrap_or(Path::new(".")))
        .or_else(|_| tempfile::Builder::new().suffix(".raw").tempfile())
        .context("create a temporary file for the qcow2 conversion")?
        .into_temp_path();
    eprintln!("converting qcow2 to raw with qemu-img ...");
    let o = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(path)
        .arg(&tmp)
        .output()
        .context("run qemu-img")?;
    if !o.status.success() {
        bail!(
            "qemu-img convert failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(tmp)
}

async fn import(api: &str, json: bool, name: &str, file: &Path) -> anyhow::Result<()> {
    use futures_util::StreamExt as _;
    cairn_node::vm::validate_name(name)?;
    let converted = if is_qcow2(file)? {
        Some(qcow2_to_raw(file)?)
    } else {
        None
    };
    let path: &Path = converted.as_deref().unwrap_or(file);
    let f = tokio::fs::File::open(path)
        .await
        .with_context(|| format!("open {}", path.display()))?;
    let len = f.metadata().await?.len();
    if len == 0 {
        bail!("{} is empty", path.display());
    }
    let pb = crate::bar(len, "import");
    let pb2 = pb.clone();
    let stream = tokio_util::io::ReaderStream::with_capacity(f, 1 << 20).inspect(move |r| {
        if let Ok(b) = r {
            pb2.inc(b.len() as u64);
        }
    });
    let r = client()?
        .put(vm_url(api, Some(name)))
        .header(reqwest::header::CONTENT_LENGTH, len)
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .with_context(|| format!("cannot reach the node's API at {api}"))?;
    pb.finish_and_clear();
    let body = answer(r).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(());
    }
    println!(
        "imported {} ({}, {} chunks, {} new), object {}",
        body["name"].as_str().unwrap_or(name),
        crate::size::human(body["size"].as_u64().unwrap_or(0)),
        body["chunks"].as_u64().unwrap_or(0),
        body["new_chunks"].as_u64().unwrap_or(0),
        body["object"].as_str().unwrap_or("?"),
    );
    println!("NBD export: {}", body["export"].as_str().unwrap_or("?"));
    Ok(())
}

async fn ls(api: &str, json: bool) -> anyhow::Result<()> {
    let r = client()?
        .get(vm_url(api, None))
        .send()
        .await
        .with_context(|| format!("cannot reach the node's API at {api}"))?;
    let body = answer(r).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(());
    }
    println!(
        "{:<32} {:>10} {:<10} {:>7}  OBJECT",
        "NAME", "SIZE", "STATE", "LOCAL%"
    );
    for i in body["images"].as_array().into_iter().flatten() {
        let chunks = i["chunks"].as_u64().unwrap_or(0);
        let present = i["present_chunks"].as_u64().unwrap_or(0);
        let pct = if chunks == 0 {
            100.0
        } else {
            present as f64 * 100.0 / chunks as f64
        };
        println!(
            "{:<32} {:>10} {:<10} {:>6.1}%  {}",
            i["name"].as_str().unwrap_or("?"),
            crate::size::human(i["size"].as_u64().unwrap_or(0)),
            i["state"].as_str().unwrap_or("?"),
            pct,
            i["object"].as_str().unwrap_or("?"),
        );
    }
    Ok(())
}

async fn rm(api: &str, json: bool, name: &str) -> anyhow::Result<()> {
    cairn_node::vm::validate_name(name)?;
    let r = client()?
        .delete(vm_url(api, Some(name)))
        .send()
        .await
        .with_context(|| format!("cannot reach the node's API at {api}"))?;
    let body = answer(r).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&body)?);
    } else {
        println!("removed {name}");
    }
    Ok(())
}
