//! The OCI registry against real clients: skopeo, podman and oras (Python).
//!
//! A test whose client is missing is skipped with a message, unless
//! `CAIRN_REQUIRE_CLIENTS` is set (CI installs them:
//! `apt-get install -y --no-install-recommends skopeo umoci busybox-static podman`
//! and `pip install oras`), in which case it fails.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use cairn_node::chunkstore::{Store, StoreConfig};
use cairn_node::registry::{Registry, RegistryConfig};
use cairn_node::CancellationToken;
use serde_json::Value;
use sha2::Digest as _;

/// Longest any one client command may take.
const CMD_TIMEOUT: Duration = Duration::from_secs(180);

struct Server {
    addr: SocketAddr,
    store: Arc<Store>,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    dir: tempfile::TempDir,
}

impl Server {
    async fn start() -> Result<Self> {
        Self::start_with(None).await
    }

    async fn start_with(push_token: Option<&str>) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let store = Arc::new(Store::open(
            dir.path().join("store"),
            StoreConfig::default(),
        )?);
        let cancel = CancellationToken::new();
        let mut rcfg = RegistryConfig::new(dir.path().join("uploads"));
        rcfg.push_token = push_token.map(str::to_owned);
        let reg = Registry::new(
            store.clone(),
            rcfg,
            &prometheus::Registry::new(),
            cancel.clone(),
        )?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let stop = cancel.clone();
        let router = reg.router();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
        });
        Ok(Self {
            addr,
            store,
            cancel,
            task,
            dir,
        })
    }

    async fn stop(self) -> Result<()> {
        self.cancel.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .context("server did not stop")??;
        Ok(())
    }
}

/// Is `name` on PATH?
fn on_path(name: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| {
        std::env::split_paths(&p).any(|d| {
            let f = d.join(name);
            f.is_file()
        })
    })
}

/// Whether the tools are there; a missing tool fails the test under
/// `CAIRN_REQUIRE_CLIENTS`, and skips it otherwise.
fn have(test: &str, tools: &[&str]) -> Result<bool> {
    let missing: Vec<&str> = tools.iter().copied().filter(|t| !on_path(t)).collect();
    if missing.is_empty() {
        return Ok(true);
    }
    if std::env::var_os("CAIRN_REQUIRE_CLIENTS").is_some() {
        bail!("{test}: CAIRN_REQUIRE_CLIENTS is set but {missing:?} not installed");
    }
    eprintln!(
        "SKIPPED {test}: {missing:?} not installed (apt-get install -y --no-install-recommends \
         skopeo umoci busybox-static podman containerd; pip install oras)"
    );
    Ok(false)
}

/// Run a command with a timeout; fail with its output unless it succeeds.
async fn run(program: &str, args: &[&str], cwd: Option<&Path>) -> Result<Output> {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .kill_on_drop(true)
        .stdin(std::process::Stdio::null());
    if let Some(d) = cwd {
        cmd.current_dir(d);
    }
    let out = tokio::time::timeout(CMD_TIMEOUT, cmd.output())
        .await
        .with_context(|| format!("{program} {args:?} timed out"))?
        .with_context(|| format!("cannot run {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {args:?} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

fn sha256_file(p: &Path) -> Result<String> {
    let b = std::fs::read(p).with_context(|| format!("read {}", p.display()))?;
    Ok(hex::encode(sha2::Sha256::digest(&b)))
}

/// A small OCI image built offline: busybox (static) in one layer. Returns
/// the layout directory and the manifest digest.
async fn build_image(work: &Path) -> Result<(PathBuf, String)> {
    let layout = work.join("oci");
    let l = layout.to_str().context("path")?.to_owned();
    let image = format!("{l}:demo");
    let bundle = work.join("bundle");
    let b = bundle.to_str().context("path")?;
    run("umoci", &["init", "--layout", &l], None).await?;
    run("umoci", &["new", "--image", &image], None).await?;
    run("umoci", &["unpack", "--image", &image, b], None).await?;
    let bin = bundle.join("rootfs/bin");
    std::fs::create_dir_all(&bin)?;
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .context("busybox binary")?;
    std::fs::copy(busybox, bin.join("busybox"))?;
    run("umoci", &["repack", "--image", &image, b], None).await?;
    run(
        "umoci",
        &[
            "config",
            "--image",
            &image,
            "--config.cmd",
            "/bin/busybox",
            "--config.cmd",
            "echo",
            "--config.cmd",
            "hello from cairn",
        ],
        None,
    )
    .await?;
    run("umoci", &["gc", "--layout", &l], None).await?;
    let index: Value = serde_json::from_slice(&std::fs::read(layout.join("index.json"))?)?;
    let digest = index["manifests"][0]["digest"]
        .as_str()
        .context("index.json has no manifest")?
        .to_owned();
    Ok((layout, digest))
}

/// The manifest JSON of `digest` in an OCI layout.
fn layout_manifest(layout: &Path, digest: &str) -> Result<(Vec<u8>, Value)> {
    let hex = digest.strip_prefix("sha256:").context("digest")?;
    let bytes = std::fs::read(layout.join("blobs/sha256").join(hex))?;
    let v = serde_json::from_slice(&bytes)?;
    Ok((bytes, v))
}

fn skopeo_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["--insecure-policy"];
    v.extend_from_slice(extra);
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_push_inspect_pull_delete() -> Result<()> {
    if !have("skopeo", &["skopeo", "umoci"])? {
        return Ok(());
    }
    let work = tempfile::tempdir()?;
    let (layout, mdigest) = build_image(work.path()).await?;
    let (mbytes, manifest) = layout_manifest(&layout, &mdigest)?;
    let layer = manifest["layers"][0]["digest"]
        .as_str()
        .context("layer")?
        .to_owned();
    // Push needs the token; skopeo sends it as the Basic auth password.
    let s = Server::start_with(Some("t0ken")).await?;
    let reg = s.addr.to_string();
    let src = format!("oci:{}:demo", layout.display());
    let v1 = format!("docker://{reg}/demo/busybox:v1");
    let v2s2 = format!("docker://{reg}/demo/busybox:v2s2");
    let denied = tokio::process::Command::new("skopeo")
        .args(skopeo_args(&["copy", "--dest-tls-verify=false", &src, &v1]))
        .output()
        .await?;
    ensure!(!denied.status.success(), "push without the token must fail");

    // Push: OCI as is, and converted to Docker schema 2.
    run(
        "skopeo",
        &skopeo_args(&[
            "copy",
            "--dest-tls-verify=false",
            "--dest-creds",
            "cairn:t0ken",
            &src,
            &v1,
        ]),
        None,
    )
    .await?;
    run(
        "skopeo",
        &skopeo_args(&[
            "copy",
            "--dest-tls-verify=false",
            "--dest-creds",
            "cairn:t0ken",
            "--format",
            "v2s2",
            &src,
            &v2s2,
        ]),
        None,
    )
    .await?;

    // The registry linked what skopeo pushed.
    s.store
        .resolve(&format!("manifest/demo/busybox@{mdigest}"))
        .context("manifest not linked")?;
    s.store
        .resolve(&format!("blob/demo/busybox@{layer}"))
        .context("layer not linked")?;

    // Inspect: the OCI manifest came through byte for byte.
    let out = run("skopeo", &["inspect", "--tls-verify=false", &v1], None).await?;
    let info: Value = serde_json::from_slice(&out.stdout)?;
    ensure!(info["Digest"] == mdigest.as_str(), "inspect: {info}");
    let raw = run(
        "skopeo",
        &["inspect", "--raw", "--tls-verify=false", &v1],
        None,
    )
    .await?;
    ensure!(raw.stdout == mbytes, "the manifest changed on the way");
    let raw = run(
        "skopeo",
        &["inspect", "--raw", "--tls-verify=false", &v2s2],
        None,
    )
    .await?;
    let docker: Value = serde_json::from_slice(&raw.stdout)?;
    ensure!(
        docker["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json",
        "{docker}"
    );
    ensure!(
        docker["layers"][0]["digest"] == layer.as_str(),
        "same layer bytes"
    );

    // Pull back into an OCI layout and a dir: same digests, same bytes.
    let back = work.path().join("back");
    run(
        "skopeo",
        &skopeo_args(&[
            "copy",
            "--src-tls-verify=false",
            &v1,
            &format!("oci:{}:v1", back.display()),
        ]),
        None,
    )
    .await?;
    let index: Value = serde_json::from_slice(&std::fs::read(back.join("index.json"))?)?;
    ensure!(
        index["manifests"][0]["digest"] == mdigest.as_str(),
        "{index}"
    );
    let lhex = layer.strip_prefix("sha256:").context("layer digest")?;
    ensure!(
        std::fs::read(back.join("blobs/sha256").join(lhex))?
            == std::fs::read(layout.join("blobs/sha256").join(lhex))?
    );
    let dir = work.path().join("dir");
    run(
        "skopeo",
        &skopeo_args(&[
            "copy",
            "--src-tls-verify=false",
            &v2s2,
            &format!("dir:{}", dir.display()),
        ]),
        None,
    )
    .await?;
    ensure!(
        sha256_file(&dir.join(lhex))? == lhex,
        "dir: layer bytes differ"
    );
    let dm = std::fs::read(dir.join("manifest.json"))?;
    ensure!(dm == raw.stdout, "dir: manifest differs");

    // Registry to registry: the blob is mounted from demo/busybox.
    let physical = s.store.summary().physical_bytes;
    run(
        "skopeo",
        &skopeo_args(&[
            "copy",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
            "--dest-creds",
            "cairn:t0ken",
            &v1,
            &format!("docker://{reg}/other/busybox:v1"),
        ]),
        None,
    )
    .await?;
    let out = run(
        "skopeo",
        &[
            "inspect",
            "--tls-verify=false",
            &format!("docker://{reg}/other/busybox:v1"),
        ],
        None,
    )
    .await?;
    let info: Value = serde_json::from_slice(&out.stdout)?;
    ensure!(info["Digest"] == mdigest.as_str());
    let grew = s.store.summary().physical_bytes - physical;
    ensure!(grew < 64 << 10, "copy stored {grew} new bytes");

    // Tags, then delete one.
    let repo = format!("docker://{reg}/demo/busybox");
    let out = run("skopeo", &["list-tags", "--tls-verify=false", &repo], None).await?;
    let tags: Value = serde_json::from_slice(&out.stdout)?;
    ensure!(tags["Tags"] == serde_json::json!(["v1", "v2s2"]), "{tags}");
    run(
        "skopeo",
        &[
            "delete",
            "--tls-verify=false",
            "--creds",
            "cairn:t0ken",
            &v2s2,
        ],
        None,
    )
    .await?;
    let out = run("skopeo", &["list-tags", "--tls-verify=false", &repo], None).await?;
    let tags: Value = serde_json::from_slice(&out.stdout)?;
    ensure!(tags["Tags"] == serde_json::json!(["v1"]), "{tags}");
    ensure!(
        run("skopeo", &["inspect", "--tls-verify=false", &v2s2], None)
            .await
            .is_err(),
        "deleted tag still resolves"
    );
    s.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn podman_pulls() -> Result<()> {
    if !have("podman", &["podman", "skopeo", "umoci"])? {
        return Ok(());
    }
    let work = tempfile::tempdir()?;
    let (layout, mdigest) = build_image(work.path()).await?;
    // Push needs a token; podman pulls anonymously all the same.
    let s = Server::start_with(Some("t0ken")).await?;
    let reg = s.addr.to_string();
    run(
        "skopeo",
        &skopeo_args(&[
            "copy",
            "--dest-tls-verify=false",
            "--dest-creds",
            "cairn:t0ken",
            &format!("oci:{}:demo", layout.display()),
            &format!("docker://{reg}/demo/busybox:v1"),
        ]),
        None,
    )
    .await?;
    let root = work.path().join("root");
    let runroot = work.path().join("runroot");
    let (root, runroot) = (
        root.to_str().context("path")?,
        runroot.to_str().context("path")?,
    );
    let image = format!("{reg}/demo/busybox:v1");
    let podman = |extra: Vec<&str>| {
        let mut a = vec![
            "--root",
            root,
            "--runroot",
            runroot,
            "--storage-driver",
            "vfs",
            "--cgroup-manager",
            "cgroupfs",
            "--events-backend",
            "file",
        ];
        a.extend(extra);
        a.into_iter().map(str::to_owned).collect::<Vec<String>>()
    };
    let args = podman(vec!["pull", "--tls-verify=false", &image]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run("podman", &args, None).await?;
    let args = podman(vec!["image", "inspect", "--format", "{{.Digest}}", &image]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run("podman", &args, None).await?;
    let got = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    ensure!(got == mdigest, "podman saw {got}, pushed {mdigest}");
    s.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oras_push_pull() -> Result<()> {
    if !have("oras", &["python3"])? {
        return Ok(());
    }
    let probe = tokio::process::Command::new("python3")
        .args(["-c", "import oras.client"])
        .kill_on_drop(true)
        .output()
        .await?;
    if !probe.status.success() {
        if std::env::var_os("CAIRN_REQUIRE_CLIENTS").is_some() {
            bail!("CAIRN_REQUIRE_CLIENTS is set but the Python oras package is missing");
        }
        eprintln!("SKIPPED oras: the Python package is missing (pip install oras)");
        return Ok(());
    }
    let work = tempfile::tempdir()?;
    let s = Server::start().await?;
    let reg = s.addr.to_string();
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(work.path().join("artifact.bin"), &payload)?;
    std::fs::write(work.path().join("notes.txt"), b"chunked upload\n")?;
    let script = r#"
import json, sys
import oras.client
reg = sys.argv[1]
c = oras.client.OrasClient(hostname=reg, insecure=True)
r = c.push(files=["artifact.bin"], target=f"{reg}/demo/artifact:v1")
assert r.status_code == 201, r.status_code
r = c.push(files=["notes.txt"], target=f"{reg}/demo/artifact:chunked", do_chunked=True, chunk_size=4)
assert r.status_code == 201, r.status_code
files = c.pull(target=f"{reg}/demo/artifact:v1", outdir="out")
files += c.pull(target=f"{reg}/demo/artifact:chunked", outdir="out2")
print(json.dumps({"files": files, "tags": c.get_tags(f"{reg}/demo/artifact")}))
"#;
    let out = run("python3", &["-c", script, &reg], Some(work.path())).await?;
    let v: Value = serde_json::from_slice(
        out.stdout
            .split(|&b| b == b'\n')
            .rfind(|l| l.starts_with(b"{"))
            .context("no JSON from the oras script")?,
    )?;
    ensure!(v["tags"] == serde_json::json!(["chunked", "v1"]), "{v}");
    let got = std::fs::read(work.path().join("out/artifact.bin"))?;
    ensure!(got == payload, "oras pulled different bytes");
    let got = std::fs::read(work.path().join("out2/notes.txt"))?;
    ensure!(got == b"chunked upload\n");
    let _ = &s.dir;
    s.stop().await
}

/// A containerd started by the test (own root, state and socket), stopped
/// on drop.
struct Containerd {
    child: std::process::Child,
    sock: PathBuf,
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_containerd(dir: &Path) -> Result<Containerd> {
    std::fs::create_dir_all(dir)?;
    let sock = dir.join("containerd.sock");
    let cfg = dir.join("config.toml");
    std::fs::write(
        &cfg,
        format!(
            "version = 2\nroot = \"{}\"\nstate = \"{}\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{}\"\n",
            dir.join("root").display(),
            dir.join("state").display(),
            sock.display()
        ),
    )?;
    let log = std::fs::File::create(dir.join("containerd.log"))?;
    let child = std::process::Command::new("containerd")
        .arg("--config")
        .arg(&cfg)
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .context("start containerd")?;
    let c = Containerd { child, sock };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !c.sock.exists() {
        ensure!(
            std::time::Instant::now() < deadline,
            "containerd did not start: {}",
            std::fs::read_to_string(dir.join("containerd.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(c)
}

/// containerd pulls through the registry as a docker.io mirror (which adds
/// `?ns=docker.io` to every request) and runs the image. There is no
/// internet here, so a successful pull of a docker.io name came from us.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_mirror_pull_and_run() -> Result<()> {
    if !have("containerd", &["containerd", "ctr", "skopeo", "umoci"])? {
        return Ok(());
    }
    let work = tempfile::tempdir()?;
    let (layout, _) = build_image(work.path()).await?;
    let s = Server::start().await?;
    let reg = s.addr.to_string();
    run(
        "skopeo",
        &skopeo_args(&[
            "copy",
            "--dest-tls-verify=false",
            &format!("oci:{}:demo", layout.display()),
            &format!("docker://{reg}/library/cairn-demo:v1"),
        ]),
        None,
    )
    .await?;
    let hosts = work.path().join("hosts");
    std::fs::create_dir_all(hosts.join("docker.io"))?;
    std::fs::write(
        hosts.join("docker.io/hosts.toml"),
        format!(
            "server = \"https://registry-1.docker.io\"\n\n[host.\"http://{reg}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
        ),
    )?;
    let cd = start_containerd(&work.path().join("containerd"))?;
    let sock = cd.sock.to_str().context("path")?.to_owned();
    let hosts_dir = hosts.to_str().context("path")?.to_owned();
    let image = "docker.io/library/cairn-demo:v1";
    run(
        "ctr",
        &[
            "-a",
            &sock,
            "image",
            "pull",
            "--hosts-dir",
            &hosts_dir,
            "--snapshotter",
            "native",
            image,
        ],
        None,
    )
    .await?;
    let out = run(
        "ctr",
        &[
            "-a",
            &sock,
            "run",
            "--rm",
            "--snapshotter",
            "native",
            "--net-host",
            image,
            "cairn-demo-run",
        ],
        None,
    )
    .await?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        text.contains("hello from cairn"),
        "ctr run printed {text:?}"
    );
    drop(cd);
    s.stop().await
}
