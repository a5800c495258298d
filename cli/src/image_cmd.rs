//! `cairn image status REF`: where an image's bytes are, per site, asked of
//! a running node's API.

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
    /// much) or absent.
    Status {
        /// REPO:TAG or REPO@DIGEST.
        reference: String,
    },
}

pub(crate) fn run(args: ImageArgs) -> anyhow::Result<()> {
    let ImageCmd::Status { reference } = args.cmd;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
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
