//! VM images over NBD from real nodes: import through the admin API, serve
//! `image/NAME` to real clients (nbdinfo, nbdcopy, qemu-img, qemu-io), and
//! lazy loading at an edge that fetches only the chunks a read touches.
//!
//! A test whose client binary is missing is skipped with a printed reason,
//! or fails when `CAIRN_REQUIRE_CLIENTS=1` (`apt-get install -y libnbd-bin
//! qemu-utils`).

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::time::Duration;

use cairn_node::chunkstore::ChunkId;
use cairn_node::Node;

mod common;

use common::nbd::*;
use common::*;

const IMAGE_LEN: usize = 64 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_is_imported_and_served_to_real_clients() {
    let c = Cluster::new();
    let node = c.node("solo", vec![]).await;
    let api = node.api_addr().unwrap();
    let src = disk_image(IMAGE_LEN, 7);
    let src_path = c.dir.path().join("src.raw");
    std::fs::write(&src_path, &src).unwrap();

    let r = import(&node, "disk", &src).await;
    assert_eq!(r["size"], IMAGE_LEN as u64, "{r}");
    assert_eq!(r["export"], "image/disk", "{r}");
    assert_eq!(r["sha256"], sha(&src).trim_start_matches("sha256:"), "{r}");
    let l = list(&node).await;
    assert_eq!(l.len(), 1, "{l:?}");
    assert_eq!(l[0]["name"], "disk");
    assert_eq!(l[0]["size"], IMAGE_LEN as u64);
    assert_eq!(l[0]["state"], "complete");
    assert_eq!(l[0]["object"], r["object"]);

    // Bad names and empty bodies get clear JSON errors.
    for (name, body, status) in [
        ("-bad", b"x".to_vec(), 400),
        ("a%20b", b"x".to_vec(), 400),
        (&*"x".repeat(129), b"x".to_vec(), 400),
        ("empty", Vec::new(), 400),
    ] {
        let r = http()
            .put(format!("http://{api}/api/v1/vm-images/{name}"))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "{name}");
        let v: serde_json::Value = r.json().await.unwrap();
        assert!(v["error"].as_str().unwrap().len() > 5, "{v}");
    }
    assert_eq!(list(&node).await.len(), 1);

    if have("nbdinfo") {
        let size = run_ok("nbdinfo", &["--size", &uri(&node, "image/disk")]).await;
        assert_eq!(size.trim(), IMAGE_LEN.to_string());
        let info = run_ok("nbdinfo", &[&uri(&node, "image/disk")]).await;
        assert!(info.contains("is_read_only: true"), "{info}");
        assert!(info.contains("can_multi_conn: true"), "{info}");
        let port = node.nbd_addr().unwrap().port();
        let l = run_ok("nbdinfo", &["--list", &format!("nbd://127.0.0.1:{port}")]).await;
        assert!(l.contains("image/disk"), "{l}");
        let o = run("nbdinfo", &["--size", &uri(&node, "image/nope")]).await;
        assert!(!o.status.success(), "{}", text(&o));
    }
    if have("nbdcopy") {
        let out = c.dir.path().join("out.raw");
        run_ok(
            "nbdcopy",
            &[&uri(&node, "image/disk"), out.to_str().unwrap()],
        )
        .await;
        assert!(
            std::fs::read(&out).unwrap() == src,
            "nbdcopy output differs from the source"
        );
    }
    if have("qemu-img") {
        run_ok(
            "qemu-img",
            &[
                "compare",
                "-f",
                "raw",
                "-F",
                "raw",
                src_path.to_str().unwrap(),
                &uri(&node, "image/disk"),
            ],
        )
        .await;
    }
    if have("qemu-io") {
        let o = run(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                "write -P 0xcd 0 4k",
                &uri(&node, "image/disk"),
            ],
        )
        .await;
        assert!(
            !o.status.success() || text(&o).contains("Permission denied"),
            "{}",
            text(&o)
        );
        assert!(text(&o).contains("Permission denied"), "{}", text(&o));
        // Read-only open reads the right bytes.
        let o = run_ok(
            "qemu-io",
            &[
                "-r",
                "-f",
                "raw",
                "-c",
                "read -v 0 16",
                &uri(&node, "image/disk"),
            ],
        )
        .await;
        let hex16: String = src[..16].iter().map(|b| format!("{b:02x} ")).collect();
        assert!(o.contains(hex16.trim()), "{o}\nwant {hex16}");
    }
    let s = node.nbd_stats().snapshot();
    assert_eq!(s.bytes_written, 0);
    assert_eq!(s.writes, 0);
    let m = metrics(&node).await;
    if have("nbdcopy") {
        assert!(s.bytes_read >= IMAGE_LEN as u64, "{s:?}");
        assert!(
            metric(&m, "cairn_nbd_read_bytes_total") >= IMAGE_LEN as f64,
            "{m}"
        );
        assert!(metric(&m, "cairn_nbd_connections_total") >= 1.0, "{m}");
        assert!(
            metric(&m, "cairn_nbd_image_reads_total{source=\"local\"}") >= 1.0,
            "{m}"
        );
    }
    assert_eq!(
        metric(&m, "cairn_nbd_image_reads_total{source=\"fetched\"}"),
        0.0
    );

    // Removal: gone from the list and from NBD; a second removal is a 404.
    let url = format!("http://{api}/api/v1/vm-images/disk");
    assert_eq!(http().delete(&url).send().await.unwrap().status(), 200);
    assert!(list(&node).await.is_empty());
    assert_eq!(http().delete(&url).send().await.unwrap().status(), 404);
    if have("nbdinfo") {
        let o = run("nbdinfo", &["--size", &uri(&node, "image/disk")]).await;
        assert!(!o.status.success(), "{}", text(&o));
    }
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_serves_a_core_image_lazily_fetching_only_what_is_read() {
    if !have("qemu-io") || !have("nbdcopy") || !have("nbdinfo") {
        return;
    }
    let c = Cluster::new();
    let core = c.node("core", vec![]).await;
    let edge = c.node("edge", vec![peer(&core)]).await;
    let src = disk_image(IMAGE_LEN, 11);
    import(&core, "base", &src).await;
    let id = core.store().resolve("vmimage/base").unwrap();
    let recipe = core.store().recipe(&id).unwrap();

    // The edge exports it at once: the open resolves the name at the core
    // and records the recipe, no chunk moves.
    let size = run_ok("nbdinfo", &["--size", &uri(&edge, "image/base")]).await;
    assert_eq!(size.trim(), IMAGE_LEN.to_string());
    assert_eq!(fetched(&edge), 0);
    let present = |n: &Node| -> HashSet<ChunkId> {
        recipe
            .chunks()
            .iter()
            .filter(|c| n.store().has_chunk(&c.id).unwrap())
            .map(|c| c.id)
            .collect()
    };
    assert!(present(&edge).is_empty());
    let l = list(&edge).await;
    assert_eq!(l.len(), 1, "{l:?}");
    assert_eq!(l[0]["state"], "partial");
    assert_eq!(l[0]["present_chunks"], 0);

    // A partial read fetches exactly the chunks overlapping its ranges.
    let ranges: [(u64, u64); 3] = [(0, 4096), (32 << 20, 64 << 10), ((60 << 20) + 12345, 1000)];
    let mut args = vec!["-r", "-f", "raw"];
    let cmds: Vec<String> = ranges
        .iter()
        .map(|(o, l)| format!("read -v {o} {l}"))
        .collect();
    for cmd in &cmds {
        args.extend(["-c", cmd.as_str()]);
    }
    let u = uri(&edge, "image/base");
    args.push(&u);
    let out = run_ok("qemu-io", &args).await;
    // The bytes are the source's: check the first line of the first dump.
    let hex16: String = src[..16].iter().map(|b| format!("{b:02x} ")).collect();
    assert!(
        out.contains(hex16.trim()),
        "{}",
        &out[..out.len().min(2000)]
    );
    let mut want = HashSet::new();
    for &(o, l) in &ranges {
        for c in recipe.chunks() {
            if c.offset < o + l && o < c.offset + u64::from(c.len) {
                want.insert(c.id);
            }
        }
    }
    assert!(want.len() < recipe.chunks().len() / 4, "ranges too large");
    assert_eq!(present(&edge), want, "only the chunks read are at the edge");
    assert_eq!(fetched(&edge), want.len() as u64);
    let m = metrics(&edge).await;
    assert_eq!(
        metric(&m, "cairn_nbd_fetched_chunks_total"),
        want.len() as f64,
        "{m}"
    );
    assert!(
        metric(&m, "cairn_nbd_image_reads_total{source=\"fetched\"}") >= 1.0,
        "{m}"
    );
    assert!(
        metric(&m, "cairn_nbd_demand_fetch_seconds_count") >= 1.0,
        "{m}"
    );
    assert!(
        metric(&m, "cairn_nbd_fetched_bytes_total{export=\"base\"}") > 0.0,
        "{m}"
    );

    // A full read at the edge equals the source; now everything is there.
    let out = c.dir.path().join("edge.raw");
    run_ok("nbdcopy", &[&u, out.to_str().unwrap()]).await;
    assert!(
        std::fs::read(&out).unwrap() == src,
        "nbdcopy at the edge differs from the source"
    );
    let all: HashSet<ChunkId> = recipe.chunks().iter().map(|c| c.id).collect();
    assert_eq!(present(&edge), all);
    assert_eq!(fetched(&edge), all.len() as u64, "no chunk fetched twice");
    let l = list(&edge).await;
    assert_eq!(l[0]["state"], "complete");

    edge.shutdown().await;
    core.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_fill_completes_an_edge_image_and_traces_are_kept() {
    if !have("qemu-io") || !have("nbdinfo") || !have("nbdcopy") {
        return;
    }
    let c = Cluster::new();
    let core = c.node("core", vec![]).await;
    let edge = c
        .node_with("edge", vec![peer(&core)], |cfg| {
            cfg.nbd_background_fill = true
        })
        .await;
    let src = disk_image(16 << 20, 21);
    import(&core, "base", &src).await;

    // Opening the export at the edge starts the fill; nothing reads it.
    let size = run_ok("nbdinfo", &["--size", &uri(&edge, "image/base")]).await;
    assert_eq!(size.trim(), (16u64 << 20).to_string());
    let t = std::time::Instant::now();
    loop {
        let l = list(&edge).await;
        if l[0]["state"] == "complete" {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "fill never completed: {l:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let m = metrics(&edge).await;
    assert!(
        metric(&m, "cairn_nbd_background_fill_bytes_total") > 0.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "cairn_nbd_image_reads_total{source=\"fetched\"}"),
        0.0
    );
    let out = c.dir.path().join("filled.raw");
    run_ok(
        "nbdcopy",
        &[&uri(&edge, "image/base"), out.to_str().unwrap()],
    )
    .await;
    assert!(std::fs::read(&out).unwrap() == src, "filled image differs");

    // An access trace: first touches in the order qemu-io read them.
    let id = core.store().resolve("vmimage/base").unwrap();
    let recipe = core.store().recipe(&id).unwrap();
    let offs = [8u64 << 20, 0, 4 << 20];
    let mut args = vec!["-r", "-f", "raw"];
    let cmds: Vec<String> = offs.iter().map(|o| format!("read {o} 4k")).collect();
    for cmd in &cmds {
        args.extend(["-c", cmd.as_str()]);
    }
    let u = uri(&core, "image/base");
    args.push(&u);
    run_ok("qemu-io", &args).await;
    let url = format!(
        "http://{}/api/v1/vm-images/base/traces",
        core.api_addr().unwrap()
    );
    let t = std::time::Instant::now();
    let traces = loop {
        let v: serde_json::Value = http().get(&url).send().await.unwrap().json().await.unwrap();
        if !v["traces"].as_array().unwrap().is_empty() {
            break v;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no trace stored: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(traces["object"], id.to_string());
    let order: Vec<u64> = traces["traces"][0]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["chunk"].as_u64().unwrap())
        .collect();
    let want: Vec<u64> = offs
        .iter()
        .map(|o| recipe.chunk_at(*o).unwrap() as u64)
        .collect();
    let pos: Vec<usize> = want
        .iter()
        .map(|w| {
            order
                .iter()
                .position(|x| x == w)
                .unwrap_or_else(|| panic!("chunk {w} not in trace {order:?}"))
        })
        .collect();
    assert!(
        pos[0] < pos[1] && pos[1] < pos[2],
        "trace {order:?}, want {want:?} in order"
    );
    let r = http()
        .get(format!(
            "http://{}/api/v1/vm-images/nope/traces",
            core.api_addr().unwrap()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    edge.shutdown().await;
    core.shutdown().await;
}

/// Profile prefetch end to end: reads at the core leave a trace, the core
/// publishes `prefetch/<OBJECT>`, and an edge that opens the image fetches
/// the profile's chunks before the reader asks, so the same reads at the
/// edge then never wait for a demand fetch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_prefetches_what_the_profile_says_before_it_is_read() {
    use tokio::io::AsyncWriteExt;
    if !have("qemu-io") {
        return;
    }
    let c = Cluster::new();
    let core = c.node("core", vec![]).await;
    let edge = c.node("edge", vec![peer(&core)]).await;
    let src = disk_image(32 << 20, 31);
    import(&core, "base", &src).await;
    let id = core.store().resolve("vmimage/base").unwrap();
    let recipe = core.store().recipe(&id).unwrap();

    // A "boot" at the core: scattered reads, recorded as a trace.
    let offs = [0u64, 20 << 20, 3 << 20, 9 << 20, 27 << 20, 14 << 20];
    let cmds: Vec<String> = offs.iter().map(|o| format!("read {o} 4k")).collect();
    let mut args = vec!["-r", "-f", "raw"];
    for cmd in &cmds {
        args.extend(["-c", cmd.as_str()]);
    }
    let u = uri(&core, "image/base");
    args.push(&u);
    run_ok("qemu-io", &args).await;
    let model = format!("prefetch/{id}");
    let t = std::time::Instant::now();
    while core.store().resolve(&model).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the core never published {model}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let want: HashSet<ChunkId> = offs
        .iter()
        .map(|o| recipe.chunks()[recipe.chunk_at(*o).unwrap()].id)
        .collect();

    // Prefetch stays within the profile (every chunk the core's reads
    // touched): nothing else of the image moved.
    let url = format!(
        "http://{}/api/v1/vm-images/base/traces",
        core.api_addr().unwrap()
    );
    let v: serde_json::Value = http().get(&url).send().await.unwrap().json().await.unwrap();
    let traced: HashSet<ChunkId> = v["traces"][0]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| recipe.chunks()[e["chunk"].as_u64().unwrap() as usize].id)
        .collect();
    assert!(want.is_subset(&traced), "{traced:?}");

    // The edge opens the export (a qemu-io session that reads nothing yet):
    // prefetch fetches the profile's chunks.
    let mut child = tokio::process::Command::new("qemu-io")
        .args(["-r", "-f", "raw", &uri(&edge, "image/base")])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    loop {
        let here = traced
            .iter()
            .filter(|id| edge.store().has_chunk(id).unwrap())
            .count();
        if here == traced.len() {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "prefetch brought {here} of the profile's {} chunks",
            traced.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = metrics(&edge).await;
    assert!(
        metric(&m, "cairn_prefetch_chunks_total{outcome=\"fetched\"}") == traced.len() as f64,
        "{m}"
    );
    let present: HashSet<ChunkId> = recipe
        .chunks()
        .iter()
        .filter(|c| edge.store().has_chunk(&c.id).unwrap())
        .map(|c| c.id)
        .collect();
    assert_eq!(present, traced, "only the profile's chunks are here");

    // The same reads at the edge: every one is local, none stalls.
    let mut stdin = child.stdin.take().unwrap();
    let mut script = String::new();
    for cmd in &cmds {
        script.push_str(cmd);
        script.push('\n');
    }
    script.push_str("quit\n");
    stdin.write_all(script.as_bytes()).await.unwrap();
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("qemu-io did not finish")
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let m = metrics(&edge).await;
    assert_eq!(
        metric(&m, "cairn_nbd_image_reads_total{source=\"fetched\"}"),
        0.0,
        "a read waited for a demand fetch: {m}"
    );
    assert!(
        metric(&m, "cairn_prefetch_chunks_total{outcome=\"hit\"}") >= want.len() as f64,
        "{m}"
    );
    edge.shutdown().await;
    core.shutdown().await;
}
