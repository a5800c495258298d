//! Core and edge nodes: push to the core, pull through the edge over the
//! transport, a second edge through the first, and v2 of an image moving
//! only its new chunks.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_core_pull_edges_and_v2_moves_only_new_chunks() {
    let c = Cluster::new();
    let core = c.node("core", vec![]).await;
    let edge1 = c.node("edge1", vec![peer(&core)]).await;
    let edge2 = c.node("edge2", vec![peer(&edge1)]).await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    let core_reg = core.registry_addr().unwrap().to_string();
    let e1 = edge1.registry_addr().unwrap().to_string();
    let e2 = edge2.registry_addr().unwrap().to_string();

    let base = random(24 << 20, 1);
    let v1 = image(vec![base.clone(), random(3 << 20, 2)]);
    push(&http, &core_reg, "demo/app", "v1", &v1).await;

    // The edge has nothing: it pulls through the core.
    pull(&http, &e1, "demo/app", "v1", &v1).await;
    let after_v1 = fetched(&edge1);
    assert!(after_v1 > 0, "edge1 fetched over the transport");
    // A second edge pulls through the first edge (which now holds it),
    // with a real client when there is one.
    if have_skopeo() {
        let out = c.dir.path().join("pulled");
        let o = tokio::process::Command::new("skopeo")
            .args(["--insecure-policy", "copy", "--src-tls-verify=false"])
            .arg(format!("docker://{e2}/demo/app:v1"))
            .arg(format!("dir:{}", out.display()))
            .output()
            .await
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        for b in &v1.blobs {
            let hex = sha(b).trim_start_matches("sha256:").to_owned();
            assert!(std::fs::read(out.join(&hex)).unwrap() == *b, "blob {hex}");
        }
        assert_eq!(
            std::fs::read(out.join("manifest.json")).unwrap(),
            v1.manifest
        );
    } else {
        assert!(
            std::env::var_os("CAIRN_REQUIRE_CLIENTS").is_none(),
            "skopeo missing"
        );
        pull(&http, &e2, "demo/app", "v1", &v1).await;
    }
    assert!(fetched(&edge2) > 0);

    // `cairn image status`, through edge2's API: complete here and at
    // edge1 (its parent).
    let api = edge2.api_addr().unwrap();
    let st: serde_json::Value = http
        .get(format!("http://{api}/api/v1/image-status"))
        .query(&[("ref", "demo/app:v1")])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let states: Vec<&str> = st["sites"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["complete", "complete"], "{st}");
    assert!(st["chunks"].as_u64().unwrap() > 300, "{st}");

    // v2: the big layer with a few small edits, plus a new small layer.
    let mut edited = base.clone();
    for i in 0..4 {
        let at = (i * 6 + 3) << 20;
        edited[at..at + 100].fill(0xee);
    }
    let v2 = image(vec![edited, random(1 << 20, 3)]);
    push(&http, &core_reg, "demo/app", "v2", &v2).await;
    let before = fetched(&edge1);
    pull(&http, &e1, "demo/app", "v2", &v2).await;
    let v2_chunks = fetched(&edge1) - before;
    // edge2 has not pulled v2: from edge1's view, edge1 complete, core
    // complete; from edge2's, itself partial (it shares v1's chunks).
    let st: serde_json::Value = http
        .get(format!(
            "http://{}/api/v1/image-status",
            edge1.api_addr().unwrap()
        ))
        .query(&[("ref", "demo/app:v2")])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(st["sites"][0]["state"], "complete", "{st}");
    assert_eq!(st["sites"][1]["state"], "complete", "{st}");
    let missing = http
        .get(format!("http://{api}/api/v1/image-status"))
        .query(&[("ref", "demo/app:v2")])
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404, "v2 is not known at edge2");
    // v2 is ~25 MiB (~400 chunks); only the edited neighbourhoods, the new
    // layer, config and manifest are new.
    assert!(
        v2_chunks * 4 < after_v1,
        "v2 fetched {v2_chunks} chunks; v1 took {after_v1}"
    );

    // What the edge serves is byte-identical to what was pushed (checked in
    // pull); and its store is sound.
    assert!(edge1.store().fsck(|_| {}).unwrap().is_clean());

    // Cut off: the core goes away. The edge keeps serving what it holds,
    // accepts pushes, and a miss fails cleanly (404) instead of hanging.
    core.shutdown().await;
    pull(&http, &e1, "demo/app", "v1", &v1).await;
    pull(&http, &e1, "demo/app", "v2", &v2).await;
    let local = image(vec![random(2 << 20, 4)]);
    push(&http, &e1, "site/local", "v1", &local).await;
    pull(&http, &e1, "site/local", "v1", &local).await;
    let t = std::time::Instant::now();
    let r = http
        .get(format!("http://{e1}/v2/demo/app/manifests/never-pushed"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "miss took {:?}",
        t.elapsed()
    );
    for n in [edge2, edge1] {
        n.shutdown().await;
    }
}

/// A cold edge answers a blob GET as the chunks land: the first byte comes
/// long before the last, and the blob is linked at the edge only once the
/// whole of it has hashed to its digest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_edge_streams_first_byte_early() {
    use futures_util::StreamExt;
    let c = Cluster::new();
    let core = c.node("core", vec![]).await;
    let edge = c.node("edge", vec![peer(&core)]).await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    let core_reg = core.registry_addr().unwrap().to_string();
    let e = edge.registry_addr().unwrap().to_string();
    let img = image(vec![random(160 << 20, 7)]);
    push(&http, &core_reg, "big/app", "v1", &img).await;
    let layer = &img.blobs[1];
    let d = sha(layer);

    let t = std::time::Instant::now();
    let r = http
        .get(format!("http://{e}/v2/big/app/blobs/{d}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.content_length(), Some(layer.len() as u64));
    let mut body = r.bytes_stream();
    let mut got = Vec::with_capacity(layer.len());
    let first = body.next().await.unwrap().unwrap();
    let t_first = t.elapsed();
    got.extend_from_slice(&first);
    let link = format!("blob/big/app@{d}");
    assert!(
        edge.store().resolve(&link).is_err(),
        "not linked before the whole blob is verified"
    );
    while let Some(piece) = body.next().await {
        got.extend_from_slice(&piece.unwrap());
    }
    let t_all = t.elapsed();
    assert!(got == *layer, "streamed bytes differ");
    assert!(
        t_first * 4 < t_all,
        "first byte after {t_first:?}, all of it after {t_all:?}"
    );
    // Linked once verified (the streamer links right after the last chunk).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while edge.store().resolve(&link).is_err() {
        assert!(std::time::Instant::now() < deadline, "never linked");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    edge.shutdown().await;
    core.shutdown().await;
}
