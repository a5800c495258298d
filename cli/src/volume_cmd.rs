//! `cairn volume ...`, against a running node's API: writable volumes,
//! served by the node over NBD as `volume/NAME`.

use anyhow::Context;

use crate::image_cmd::{answer, client};

/// `cairn volume ...`.
#[derive(Debug, clap::Args)]
pub(crate) struct VolumeArgs {
    /// The node's API.
    #[arg(
        long,
        env = "CAIRN_API",
        default_value = "http://127.0.0.1:7480",
        global = true
    )]
    api: String,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: VolumeCmd,
}

#[derive(Debug, clap::Subcommand)]
enum VolumeCmd {
    /// Create a writable volume, exported over NBD as `volume/NAME`: a
    /// copy-on-write overlay (64 KiB blocks) over a VM image, or, without
    /// --from, zeroes. Writes are durable once the client flushes (or sends
    /// them with FUA).
    Create {
        /// Volume name: 1 to 128 characters from A-Z a-z 0-9 . _ -.
        name: String,
        /// Base VM image (see `cairn image ls`).
        #[arg(long)]
        from: Option<String>,
        /// Size (e.g. 10G): required without --from; with it, defaults to
        /// the image's size and may only grow it. At most 16 GiB, a
        /// multiple of 512 bytes.
        #[arg(long, value_parser = crate::size::parse_size)]
        size: Option<u64>,
        /// Copy-on-write block size, a power of two from 4K to 1M (default
        /// 64K). Smaller blocks make small random writes cheaper; the
        /// volume's recipe, rewritten at every flush, grows with them.
        #[arg(long, value_parser = crate::size::parse_size)]
        block_size: Option<u64>,
    },
    /// List volumes.
    Ls,
    /// Remove a volume (refused while an NBD client has it open).
    Rm {
        /// Volume name.
        name: String,
    },
    /// Flush a volume and keep its current contents as an immutable VM
    /// image SNAP (exported as `image/SNAP`; other sites can pull it).
    Snapshot {
        /// Volume name.
        name: String,
        /// Name of the new image.
        snap: String,
    },
}

fn url(api: &str, tail: &str) -> String {
    format!("{}/api/v1/volumes{tail}", api.trim_end_matches('/'))
}

pub(crate) fn run(args: VolumeArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    rt.block_on(run_async(args))
}

async fn run_async(args: VolumeArgs) -> anyhow::Result<()> {
    let api = args.api.as_str();
    let c = client()?;
    let reach = || format!("cannot reach the node's API at {api}");
    let body = match &args.cmd {
        VolumeCmd::Create {
            name,
            from,
            size,
            block_size,
        } => {
            cairn_node::vm::validate_name(name)?;
            let req = serde_json::json!({
                "name": name, "from": from, "size": size, "block_size": block_size
            });
            answer(
                c.post(url(api, ""))
                    .json(&req)
                    .send()
                    .await
                    .with_context(reach)?,
            )
            .await?
        }
        VolumeCmd::Ls => answer(c.get(url(api, "")).send().await.with_context(reach)?).await?,
        VolumeCmd::Rm { name } => {
            cairn_node::vm::validate_name(name)?;
            answer(
                c.delete(url(api, &format!("/{name}")))
                    .send()
                    .await
                    .with_context(reach)?,
            )
            .await?
        }
        VolumeCmd::Snapshot { name, snap } => {
            cairn_node::vm::validate_name(name)?;
            cairn_node::vm::validate_name(snap)?;
            answer(
                c.post(url(api, &format!("/{name}/snapshot")))
                    .json(&serde_json::json!({ "image": snap }))
                    .send()
                    .await
                    .with_context(reach)?,
            )
            .await?
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(());
    }
    let s = |v: &serde_json::Value, k: &str| v[k].as_str().unwrap_or("-").to_owned();
    let size = |v: &serde_json::Value| crate::size::human(v["size"].as_u64().unwrap_or(0));
    match &args.cmd {
        VolumeCmd::Create { .. } => {
            println!(
                "created volume {} ({}, base {}), object {}",
                s(&body, "name"),
                size(&body),
                s(&body, "base_image"),
                s(&body, "object")
            );
            println!("NBD export: {}", s(&body, "export"));
        }
        VolumeCmd::Ls => {
            println!(
                "{:<32} {:>10} {:<24} {:<6} {:>10}  OBJECT",
                "NAME", "SIZE", "BASE", "OPEN", "UNFLUSHED"
            );
            for v in body["volumes"].as_array().into_iter().flatten() {
                println!(
                    "{:<32} {:>10} {:<24} {:<6} {:>10}  {}",
                    s(v, "name"),
                    size(v),
                    s(v, "base_image"),
                    if v["open"].as_bool().unwrap_or(false) {
                        "yes"
                    } else {
                        "no"
                    },
                    crate::size::human(v["dirty_bytes"].as_u64().unwrap_or(0)),
                    s(v, "object")
                );
            }
        }
        VolumeCmd::Rm { name } => println!("removed volume {name}"),
        VolumeCmd::Snapshot { .. } => {
            println!(
                "snapshot of {} is image {} ({}, {} chunks), object {}",
                s(&body, "volume"),
                s(&body, "image"),
                size(&body),
                body["chunks"].as_u64().unwrap_or(0),
                s(&body, "object")
            );
            println!("NBD export: {}", s(&body, "export"));
        }
    }
    Ok(())
}
