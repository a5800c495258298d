//! Writable volumes over NBD from real nodes, driven by real clients:
//! qemu-io (pattern writes, discard, write-zeroes, flush), fio's nbd engine
//! with verify, nbdinfo --map, and ext4 made on a volume through nbdfuse and
//! a loop mount, snapshotted, and pulled by another site.
//!
//! A test whose client binary is missing is skipped with a printed reason,
//! or fails when `CAIRN_REQUIRE_CLIENTS=1`.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use cairn_node::chunkstore::{ChunkId, ObjectId};
use cairn_node::Node;
use serde_json::json;

mod common;

use common::nbd::*;
use common::*;

const MIB: u64 = 1 << 20;

async fn create(n: &Node, body: serde_json::Value) -> (u16, serde_json::Value) {
    let r = http()
        .post(format!("http://{}/api/v1/volumes", n.api_addr().unwrap()))
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

async fn volumes(n: &Node) -> Vec<serde_json::Value> {
    let r = http()
        .get(format!("http://{}/api/v1/volumes", n.api_addr().unwrap()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    v["volumes"].as_array().unwrap().clone()
}

async fn snapshot(n: &Node, vol: &str, image: &str) -> (u16, serde_json::Value) {
    let r = http()
        .post(format!(
            "http://{}/api/v1/volumes/{vol}/snapshot",
            n.api_addr().unwrap()
        ))
        .json(&json!({ "image": image }))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

async fn remove(n: &Node, vol: &str) -> u16 {
    http()
        .delete(format!(
            "http://{}/api/v1/volumes/{vol}",
            n.api_addr().unwrap()
        ))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// qemu-io with these commands against `export`; every pattern check must
/// pass.
async fn qemu_io(n: &Node, export: &str, cmds: &[String]) -> String {
    let u = uri(n, export);
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.extend(["-c", c.as_str()]);
    }
    args.push(&u);
    let o = run("qemu-io", &args).await;
    let t = text(&o);
    assert!(o.status.success(), "qemu-io {cmds:?}:\n{t}");
    assert!(!t.contains("Pattern verification failed"), "{t}");
    assert!(!t.contains("failed:"), "{t}");
    t
}

fn fill(v: &mut [u8], off: u64, len: u64, b: u8) {
    v[off as usize..(off + len) as usize].fill(b);
}

async fn copy_out(n: &Node, export: &str, path: &Path) -> Vec<u8> {
    run_ok("nbdcopy", &[&uri(n, export), path.to_str().unwrap()]).await;
    std::fs::read(path).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_api_refuses_bad_input_and_qemu_io_round_trips() {
    let c = Cluster::new();
    let node = c.node("solo", vec![]).await;

    for (body, status) in [
        (json!({"name": "-bad", "size": MIB}), 400),
        (json!({"name": "v"}), 400),
        (json!({"name": "v", "size": 1000}), 400),
        (json!({"name": "v", "size": 0}), 400),
        (json!({"name": "v", "size": 32u64 << 30}), 400),
        (json!({"name": "v", "from": "nope"}), 404),
        (json!({"name": "v", "size": MIB, "block_size": 3000}), 400),
        (json!({"name": "v", "size": MIB, "block_size": 2048}), 400),
        (
            json!({"name": "v", "size": MIB, "block_size": 2 << 20}),
            400,
        ),
    ] {
        let (s, v) = create(&node, body.clone()).await;
        assert_eq!(s, status, "{body}: {v}");
        assert!(v["error"].as_str().unwrap().len() > 5, "{v}");
    }
    let (s, v) = create(&node, json!({"name": "v", "size": 16 * MIB})).await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["export"], "volume/v");
    assert_eq!(v["size"], 16 * MIB);
    assert_eq!(v["block_size"], 65536);
    let (s, v) = create(&node, json!({"name": "v", "size": MIB})).await;
    assert_eq!(s, 409, "{v}");
    let l = volumes(&node).await;
    assert_eq!(l.len(), 1, "{l:?}");
    assert_eq!(l[0]["name"], "v");
    assert_eq!(l[0]["open"], false);

    if !have("qemu-io") || !have("nbdinfo") {
        return;
    }
    let info = run_ok("nbdinfo", &[&uri(&node, "volume/v")]).await;
    assert!(info.contains("is_read_only: false"), "{info}");
    assert!(info.contains("can_flush: true"), "{info}");
    assert!(info.contains("can_fua: true"), "{info}");
    assert!(info.contains("can_multi_conn: true"), "{info}");
    let port = node.nbd_addr().unwrap().port();
    let l = run_ok("nbdinfo", &["--list", &format!("nbd://127.0.0.1:{port}")]).await;
    assert!(l.contains("volume/v"), "{l}");

    // Writes across block boundaries, write-zeroes and discard, then a
    // flush; a second connection (a fresh load of the volume) reads back.
    let m3 = 3 * MIB;
    qemu_io(
        &node,
        "volume/v",
        &[
            "write -P 0x11 0 1M".into(),
            "write -P 0x22 61440 8192".into(),
            format!("write -P 0x33 {m3} 1M"),
            format!("write -z {} 128k", m3 + 64 * 1024),
            format!("discard {} 64k", m3 + 512 * 1024),
            "flush".into(),
        ],
    )
    .await;
    let mut want = vec![0u8; (16 * MIB) as usize];
    fill(&mut want, 0, MIB, 0x11);
    fill(&mut want, 61440, 8192, 0x22);
    fill(&mut want, m3, MIB, 0x33);
    fill(&mut want, m3 + 65536, 131072, 0);
    fill(&mut want, m3 + 524288, 65536, 0);
    qemu_io(
        &node,
        "volume/v",
        &[
            "read -P 0x11 0 61440".into(),
            "read -P 0x22 61440 8192".into(),
            format!("read -P 0x11 69632 {}", MIB - 69632),
            format!("read -P 0x33 {m3} 64k"),
            format!("read -P 0 {} 128k", m3 + 65536),
            format!("read -P 0x33 {} 320k", m3 + 196608),
            format!("read -P 0 {} 64k", m3 + 524288),
            format!("read -P 0x33 {} 448k", m3 + 589824),
            format!("read -P 0 {} 12M", 4 * MIB),
        ],
    )
    .await;
    // Multi-conn: a connection opened before another connection's write
    // and flush reads that write.
    let u = uri(&node, "volume/v");
    let early = tokio::process::Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "sleep 3000",
            "-c",
            "read -P 0x44 8M 64k",
            &u,
        ])
        .kill_on_drop(true)
        .output();
    let late = async {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        qemu_io(
            &node,
            "volume/v",
            &[format!("write -P 0x44 {} 64k", 8 * MIB), "flush".into()],
        )
        .await
    };
    let (o, _) = tokio::join!(early, late);
    let o = o.unwrap();
    assert!(
        o.status.success() && !text(&o).contains("Pattern verification failed"),
        "the first connection did not see the second's write:\n{}",
        text(&o)
    );
    fill(&mut want, 8 * MIB, 65536, 0x44);
    if have("nbdcopy") {
        let got = copy_out(&node, "volume/v", &c.dir.path().join("v.raw")).await;
        assert!(got == want, "volume bytes differ from what was written");
    }
    // Unwritten space is reported as a hole.
    let map = run_ok("nbdinfo", &["--map", &uri(&node, "volume/v")]).await;
    assert!(map.contains("hole,zero"), "{map}");
    assert!(map.contains("data"), "{map}");
    let last = map.lines().last().unwrap();
    assert!(
        last.contains(&(8 * MIB + 65536).to_string()) && last.contains("hole"),
        "{map}"
    );

    let m = metrics(&node).await;
    assert!(metric(&m, "cairn_volume_flushes_total") >= 1.0, "{m}");
    assert!(metric(&m, "cairn_volume_writes_total") >= 5.0, "{m}");
    assert_eq!(metric(&m, "cairn_volume_dirty_bytes"), 0.0, "{m}");

    // Reads of a volume leave access traces too (stored when it closes).
    let t = Instant::now();
    while !node
        .store()
        .names()
        .unwrap()
        .iter()
        .any(|(k, _)| k.starts_with("trace/"))
    {
        assert!(t.elapsed() < Duration::from_secs(10), "no volume trace");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Removal: gone from the list and NBD; again is a 404.
    assert_eq!(remove(&node, "v").await, 200);
    assert!(volumes(&node).await.is_empty());
    assert_eq!(remove(&node, "v").await, 404);
    let o = run("nbdinfo", &["--size", &uri(&node, "volume/v")]).await;
    assert!(!o.status.success(), "{}", text(&o));
    node.shutdown().await;
}

fn recipe_ids(n: &Node, object: &serde_json::Value) -> HashSet<ChunkId> {
    let id: ObjectId = object.as_str().unwrap().parse().unwrap();
    n.store()
        .recipe(&id)
        .unwrap()
        .chunks()
        .iter()
        .map(|c| c.id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_over_image_snapshots_share_chunks_and_ship_only_changes() {
    if !have("qemu-io") || !have("nbdcopy") {
        return;
    }
    let c = Cluster::new();
    let core = c.node("core", vec![]).await;
    let edge = c.node("edge", vec![peer(&core)]).await;
    let img_len = 8 * MIB;
    let src = disk_image(img_len as usize, 3);
    import(&core, "base", &src).await;

    let (s, v) = create(&core, json!({"name": "v", "from": "base", "size": 4 * MIB})).await;
    assert_eq!(s, 400, "shrinking must be refused: {v}");
    let (s, v) = create(
        &core,
        json!({"name": "v", "from": "base", "size": 16 * MIB}),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["base_image"], "base");
    let mut want = src.clone();
    want.resize((16 * MIB) as usize, 0);
    let got = copy_out(&core, "volume/v", &c.dir.path().join("a.raw")).await;
    assert!(
        got == want,
        "a fresh volume must read as its image plus zeroes"
    );

    // Copy-on-write: unaligned writes inside the image and past its end.
    qemu_io(
        &core,
        "volume/v",
        &[
            "write -P 0x5a 1000000 70000".into(),
            format!("write -P 0xa5 {} 64k", 12 * MIB),
            "flush".into(),
        ],
    )
    .await;
    fill(&mut want, 1_000_000, 70_000, 0x5a);
    fill(&mut want, 12 * MIB, 65536, 0xa5);
    let (s, s1) = snapshot(&core, "v", "s1").await;
    assert_eq!(s, 201, "{s1}");
    assert_eq!(s1["export"], "image/s1");
    let (s, v) = snapshot(&core, "v", "s1").await;
    assert_eq!(s, 409, "{v}");
    let got = copy_out(&core, "image/s1", &c.dir.path().join("s1.raw")).await;
    assert!(got == want, "snapshot s1 differs from the volume");
    // The image underneath is untouched.
    let got = copy_out(&core, "image/base", &c.dir.path().join("b.raw")).await;
    assert!(got == src, "the base image changed");

    // A second snapshot after a 4 KiB write shares everything else.
    qemu_io(
        &core,
        "volume/v",
        &[format!("write -P 0x77 {} 4k", 5 * MIB), "flush".into()],
    )
    .await;
    let want1 = want.clone();
    fill(&mut want, 5 * MIB, 4096, 0x77);
    let (s, s2) = snapshot(&core, "v", "s2").await;
    assert_eq!(s, 201, "{s2}");
    let (r1, r2) = (
        recipe_ids(&core, &s1["object"]),
        recipe_ids(&core, &s2["object"]),
    );
    let changed: Vec<_> = r2.difference(&r1).collect();
    assert!(
        !changed.is_empty() && changed.len() <= 3,
        "s2 should differ from s1 by the written block and at most two fragments, not {}",
        changed.len()
    );

    // Another site pulls s1, then s2: the second moves only what changed.
    let got = copy_out(&edge, "image/s1", &c.dir.path().join("e1.raw")).await;
    assert!(got == want1, "s1 at the edge differs");
    let before = fetched(&edge);
    let got = copy_out(&edge, "image/s2", &c.dir.path().join("e2.raw")).await;
    assert!(got == want, "s2 at the edge differs");
    let moved = fetched(&edge) - before;
    assert!(
        moved >= 1 && moved <= changed.len() as u64,
        "pulling s2 after s1 fetched {moved} chunks; {} changed",
        changed.len()
    );

    // Snapshots outlive their volume.
    assert_eq!(remove(&core, "v").await, 200);
    let got = copy_out(&core, "image/s2", &c.dir.path().join("s2b.raw")).await;
    assert!(got == want, "s2 changed when its volume went");
    edge.shutdown().await;
    core.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fio_random_writes_verify_on_a_volume() {
    if !have("fio") {
        return;
    }
    let c = Cluster::new();
    let node = c.node("solo", vec![]).await;
    let (s, v) = create(&node, json!({"name": "f", "size": 64 * MIB})).await;
    assert_eq!(s, 201, "{v}");
    let u = uri(&node, "volume/f");
    let out = run_ok(
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={u}"),
            "--rw=randwrite",
            "--bs=4k",
            "--size=32M",
            "--iodepth=16",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--randrepeat=1",
            "--output-format=json",
        ],
    )
    .await;
    let j: serde_json::Value = serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
    let job = &j["jobs"][0];
    assert_eq!(job["error"], 0, "{job}");
    assert_eq!(job["write"]["io_bytes"], 32 * MIB, "{job}");
    // The verify pass read every written block back.
    assert_eq!(job["read"]["io_bytes"], 32 * MIB, "{job}");
    node.shutdown().await;
}

/// Wait until `path` exists (nbdfuse creates its file when connected).
async fn wait_for(path: &Path) {
    let t = Instant::now();
    while !path.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{} never appeared",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext4_on_a_volume_snapshots_and_checks_clean_elsewhere() {
    for b in ["nbdfuse", "mkfs.ext4", "fsck.ext4", "debugfs", "nbdcopy"] {
        if !have(b) {
            return;
        }
    }
    if !Path::new("/dev/fuse").exists() {
        eprintln!("SKIP: no /dev/fuse");
        return;
    }
    let c = Cluster::new();
    let core = c.node("core", vec![]).await;
    let edge = c.node("edge", vec![peer(&core)]).await;
    let (s, v) = create(&core, json!({"name": "fs", "size": 64 * MIB})).await;
    assert_eq!(s, 201, "{v}");

    // Files to put on the filesystem.
    let src = c.dir.path().join("src");
    std::fs::create_dir_all(src.join("dir")).unwrap();
    let files: Vec<(String, Vec<u8>)> = (0..6u64)
        .map(|i| {
            let len = [0usize, 1, 4096, 70_000, 1 << 20, 3 << 20][i as usize];
            (format!("dir/file{i}"), random(len, 100 + i))
        })
        .collect();
    for (p, d) in &files {
        std::fs::write(src.join(p), d).unwrap();
    }

    let mnt = c.dir.path().join("fuse");
    std::fs::create_dir_all(&mnt).unwrap();
    let mut fuse = tokio::process::Command::new("nbdfuse")
        .arg(&mnt)
        .arg(uri(&core, "volume/fs"))
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let dev = mnt.join("nbd");
    wait_for(&dev).await;
    let dev_s = dev.to_str().unwrap();
    run_ok("mkfs.ext4", &["-q", "-F", "-b", "4096", dev_s]).await;
    // Mount through a loop device and write the files, as a VM would; where
    // loop mounts are not allowed (not root), mkfs.ext4 -d writes them.
    let dir = c.dir.path().join("mnt");
    std::fs::create_dir_all(&dir).unwrap();
    let dir_s = dir.to_str().unwrap();
    let mounted = root()
        && run("mount", &["-o", "loop", dev_s, dir_s])
            .await
            .status
            .success();
    if mounted {
        let o = run("cp", &["-a", &format!("{}/.", src.display()), dir_s]).await;
        let u = run("umount", &[dir_s]).await;
        assert!(o.status.success(), "{}", text(&o));
        assert!(u.status.success(), "{}", text(&u));
    } else {
        eprintln!("note: no loop mount here; populating with mkfs.ext4 -d");
        run_ok(
            "mkfs.ext4",
            &["-q", "-F", "-b", "4096", "-d", src.to_str().unwrap(), dev_s],
        )
        .await;
    }
    run_ok("fsck.ext4", &["-n", "-f", dev_s]).await;
    run_ok("sync", &[]).await;
    run_ok("fusermount3", &["-u", mnt.to_str().unwrap()]).await;
    let st = tokio::time::timeout(Duration::from_secs(20), fuse.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(st.success(), "nbdfuse exited {st:?}");

    let (s, snap) = snapshot(&core, "fs", "fs-snap").await;
    assert_eq!(s, 201, "{snap}");
    // Another site pulls the snapshot; the filesystem checks clean there
    // and holds the files.
    let img = c.dir.path().join("edge.img");
    copy_out(&edge, "image/fs-snap", &img).await;
    let img_s = img.to_str().unwrap();
    run_ok("fsck.ext4", &["-n", "-f", img_s]).await;
    for (p, d) in &files {
        let out = c.dir.path().join("out");
        run_ok(
            "debugfs",
            &["-R", &format!("dump /{p} {}", out.display()), img_s],
        )
        .await;
        assert!(std::fs::read(&out).unwrap() == *d, "{p} differs");
    }
    edge.shutdown().await;
    core.shutdown().await;
}

/// Poll `n`'s image list until `name` is there with every chunk local.
async fn wait_complete(n: &Node, name: &str) -> serde_json::Value {
    let t = Instant::now();
    loop {
        if let Some(i) = list(n).await.into_iter().find(|i| i["name"] == name) {
            if i["state"] == "complete" {
                return i;
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "image {name} never arrived complete"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_and_snapshots_made_at_an_edge_replicate_to_its_parent() {
    if !have("qemu-io") || !have("nbdcopy") {
        return;
    }
    let c = Cluster::new();
    let core = c.node("core", vec![]).await;
    let edge = c.node("edge", vec![peer(&core)]).await;
    let src = disk_image((8 * MIB) as usize, 5);
    let r = import(&edge, "golden", &src).await;
    let at_core = wait_complete(&core, "golden").await;
    assert_eq!(at_core["object"], r["object"]);
    let got = copy_out(&core, "image/golden", &c.dir.path().join("g.raw")).await;
    assert!(got == src, "the replicated image differs");

    // A snapshot of an edge volume travels the same way.
    let (s, v) = create(&edge, json!({"name": "w", "from": "golden"})).await;
    assert_eq!(s, 201, "{v}");
    qemu_io(
        &edge,
        "volume/w",
        &["write -P 0x3c 4096 4096".into(), "flush".into()],
    )
    .await;
    let (s, snap) = snapshot(&edge, "w", "w-1").await;
    assert_eq!(s, 201, "{snap}");
    let at_core = wait_complete(&core, "w-1").await;
    assert_eq!(at_core["object"], snap["object"]);
    let mut want = src.clone();
    fill(&mut want, 4096, 4096, 0x3c);
    let got = copy_out(&core, "image/w-1", &c.dir.path().join("w.raw")).await;
    assert!(got == want, "the replicated snapshot differs");
    let m = metrics(&edge).await;
    assert!(
        metric(&m, "cairn_replication_offers_sent_total{result=\"ok\"}") >= 2.0,
        "{m}"
    );
    edge.shutdown().await;
    core.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zeroing_a_whole_large_volume_is_cheap_and_reads_back_zeroes() {
    if !have("qemu-io") || !have("nbdinfo") {
        return;
    }
    let c = Cluster::new();
    let node = c.node("solo", vec![]).await;
    let (s, v) = create(&node, json!({"name": "big", "size": 8u64 << 30})).await;
    assert_eq!(s, 201, "{v}");
    let g = 1u64 << 30;
    qemu_io(
        &node,
        "volume/big",
        &[
            format!("write -P 0x09 {g} 1M"),
            format!("write -P 0x0a {} 64k", 5 * g),
            "flush".into(),
        ],
    )
    .await;
    // Zeroing 8 GiB must not hold 8 GiB of zero buffers: whole zeroed
    // blocks are markers, and the flush stores one zero chunk.
    let t = Instant::now();
    qemu_io(
        &node,
        "volume/big",
        &(0..4)
            .map(|i| format!("write -z {} {g}", i * g))
            .chain((4..8).map(|i| format!("discard {} {g}", i * g)))
            .chain([
                "flush".into(),
                format!("read -P 0 {g} 1M"),
                format!("read -P 0 {} 64k", 5 * g),
            ])
            .collect::<Vec<_>>(),
    )
    .await;
    assert!(
        t.elapsed() < Duration::from_secs(60),
        "zeroing took {:?}",
        t.elapsed()
    );
    let m = metrics(&node).await;
    assert_eq!(metric(&m, "cairn_volume_dirty_bytes"), 0.0, "{m}");
    let map = run_ok("nbdinfo", &["--map", &uri(&node, "volume/big")]).await;
    assert_eq!(map.lines().count(), 1, "all one hole: {map}");
    assert!(map.contains("hole,zero"), "{map}");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_block_volumes_copy_on_write_in_4k_units() {
    if !have("qemu-io") || !have("nbdcopy") {
        return;
    }
    let c = Cluster::new();
    let node = c.node("solo", vec![]).await;
    let src = disk_image((4 * MIB) as usize, 9);
    import(&node, "img", &src).await;
    let (s, v) = create(
        &node,
        json!({"name": "s", "from": "img", "size": 8 * MIB, "block_size": 4096}),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["block_size"], 4096);
    qemu_io(
        &node,
        "volume/s",
        &[
            "write -P 0x61 4096 4096".into(),
            "write -P 0x62 10000 3000".into(),
            format!("write -P 0x63 {} 8k", 6 * MIB),
            "flush".into(),
        ],
    )
    .await;
    let mut want = src.clone();
    want.resize((8 * MIB) as usize, 0);
    fill(&mut want, 4096, 4096, 0x61);
    fill(&mut want, 10000, 3000, 0x62);
    fill(&mut want, 6 * MIB, 8192, 0x63);
    let got = copy_out(&node, "volume/s", &c.dir.path().join("s.raw")).await;
    assert!(
        got == want,
        "4 KiB-block volume differs from what was written"
    );
    let m = metrics(&node).await;
    // One block per aligned 4 KiB write, two for the write across a block
    // boundary (10000..13000 lies in blocks 2 and 3), two for the 8 KiB.
    assert_eq!(metric(&m, "cairn_volume_flushed_blocks_total"), 5.0, "{m}");
    node.shutdown().await;
}
