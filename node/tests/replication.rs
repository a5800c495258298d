//! Replication between sites: pushes made at a cut-off edge reach the core
//! when the link returns; a tag changed on both sides of the cut settles on
//! the same manifest at both; rules push images on to named sites.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

mod common;

use cairn_node::transport::PeerAddr;
use cairn_node::Node;
use common::*;

/// The manifest digest `repo:tag` resolves to at a registry, if any.
async fn tag_digest(http: &reqwest::Client, reg: &str, repo: &str, tag: &str) -> Option<String> {
    let r = http
        .head(format!("http://{reg}/v2/{repo}/manifests/{tag}"))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .ok()?;
    if r.status() != 200 {
        return None;
    }
    r.headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Wait until `check` holds, or fail after `secs` with `what`.
async fn eventually<F, Fut>(secs: u64, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(secs) {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("not within {secs} s: {what}");
}

fn fast_retry(cfg: &mut cairn_node::NodeConfig) {
    cfg.replication.retry_max = Duration::from_secs(1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_at_cut_off_edge_reaches_core_and_tags_converge() {
    let c = Cluster::new();
    let core = c.node_with("core", vec![], fast_retry).await;
    let relay = Relay::start(core.local_addr().unwrap()).await;
    let via_relay = PeerAddr::named(relay.addr, "core");
    let edge = c.node_with("edge", vec![via_relay], fast_retry).await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let co = core.registry_addr().unwrap().to_string();
    let ed = edge.registry_addr().unwrap().to_string();

    // Before the cut: an image at the core, pulled through the edge.
    let base = image(vec![random(1 << 20, 1)]);
    push(&http, &co, "demo/app", "v1", &base).await;
    pull(&http, &ed, "demo/app", "v1", &base).await;

    // Cut. The edge keeps serving what it holds and accepts pushes; the
    // core accepts pushes too. Both sides change tag `t1` (core first) and
    // `t2` (edge first).
    relay.set_cut(true);
    pull(&http, &ed, "demo/app", "v1", &base).await;
    let local = image(vec![random(2 << 20, 2), random(300 << 10, 3)]);
    push(&http, &ed, "site/local", "v1", &local).await;
    let t1_core = image(vec![random(512 << 10, 10)]);
    let t1_edge = image(vec![random(512 << 10, 11)]);
    let t2_edge = image(vec![random(512 << 10, 12)]);
    let t2_core = image(vec![random(512 << 10, 13)]);
    push(&http, &co, "demo/app", "t1", &t1_core).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    push(&http, &ed, "demo/app", "t1", &t1_edge).await;
    push(&http, &ed, "demo/app", "t2", &t2_edge).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    push(&http, &co, "demo/app", "t2", &t2_core).await;
    // Nothing crossed: the core has not seen the edge's push.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(tag_digest(&http, &co, "site/local", "v1").await, None);
    assert!(counter(&edge, "cairn_replication_outbox_entries") >= 3.0);

    // Heal: the push reaches the core, byte for byte.
    relay.set_cut(false);
    let (h, c2) = (http.clone(), co.clone());
    eventually(60, "the edge's push reaches the core", || {
        let (h, c2) = (h.clone(), c2.clone());
        async move { tag_digest(&h, &c2, "site/local", "v1").await.is_some() }
    })
    .await;
    pull(&http, &co, "site/local", "v1", &local).await;

    // Both tags settle on the later write, identically at both sites.
    for (tag, winner) in [("t1", &t1_edge), ("t2", &t2_core)] {
        let (h, c2, e2) = (http.clone(), co.clone(), ed.clone());
        let want = winner.digest.clone();
        eventually(60, &format!("tag {tag} converges on {want}"), || {
            let (h, c2, e2, want) = (h.clone(), c2.clone(), e2.clone(), want.clone());
            async move {
                tag_digest(&h, &c2, "demo/app", tag).await.as_deref() == Some(want.as_str())
                    && tag_digest(&h, &e2, "demo/app", tag).await.as_deref() == Some(want.as_str())
            }
        })
        .await;
        pull(&http, &co, "demo/app", tag, winner).await;
        pull(&http, &ed, "demo/app", tag, winner).await;
    }
    // The edge learnt the core's winning t2 by adopting it.
    assert!(counter(&edge, "cairn_replication_tag_conflicts_total") >= 1.0);
    let (e3,) = (&edge,);
    eventually(10, "the edge's outbox drains", || async {
        counter(e3, "cairn_replication_outbox_entries") == 0.0
    })
    .await;
    assert!(edge.store().fsck(|_| {}).unwrap().is_clean());
    assert!(core.store().fsck(|_| {}).unwrap().is_clean());

    // The outbox is durable: a push queued while cut off survives a restart
    // of the edge and is delivered afterwards.
    relay.set_cut(true);
    let late = image(vec![random(256 << 10, 20)]);
    push(&http, &ed, "site/late", "v1", &late).await;
    let edge_dir = edge.config().data_dir.clone();
    let held = std::sync::Arc::downgrade(edge.store());
    edge.shutdown().await;
    // Shutdown lets go of the store (no task or reference cycle keeps its
    // RocksDB lock), so the same data dir opens again at once.
    let t = Instant::now();
    while held.strong_count() > 0 && t.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(held.strong_count(), 0, "the store outlived the node");
    relay.set_cut(false);
    let edge = c
        .node_with("edge", vec![PeerAddr::named(relay.addr, "core")], |cfg| {
            fast_retry(cfg);
            cfg.data_dir = edge_dir;
        })
        .await;
    let (h, c2) = (http.clone(), co.clone());
    eventually(60, "the queued push is delivered after a restart", || {
        let (h, c2) = (h.clone(), c2.clone());
        async move { tag_digest(&h, &c2, "site/late", "v1").await.is_some() }
    })
    .await;
    pull(&http, &co, "site/late", "v1", &late).await;

    for n in [edge, core] {
        n.shutdown().await;
    }
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_push_images_on_to_named_sites() {
    let c = Cluster::new();
    // Two edges with no parents: they can only serve what is pushed to them.
    let a = c.node("edge-a", vec![]).await;
    let b = c.node("edge-b", vec![]).await;
    let named = |n: &Node| PeerAddr::named(n.local_addr().unwrap(), n.identity().name());
    let (pa, pb) = (named(&a), named(&b));
    let core = c
        .node_with("core", vec![], move |cfg| {
            fast_retry(cfg);
            cfg.replication.rules = vec![
                cairn_node::config::ReplicationRule {
                    repos: "apps/*".into(),
                    to: vec![pa.clone(), pb.clone()],
                },
                cairn_node::config::ReplicationRule {
                    repos: "only-b".into(),
                    to: vec![pb],
                },
            ];
        })
        .await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let co = core.registry_addr().unwrap().to_string();
    let ra = a.registry_addr().unwrap().to_string();
    let rb = b.registry_addr().unwrap().to_string();
    let web = image(vec![random(1 << 20, 30), random(64 << 10, 31)]);
    let solo = image(vec![random(128 << 10, 32)]);
    let other = image(vec![random(128 << 10, 33)]);
    push(&http, &co, "apps/web", "v1", &web).await;
    push(&http, &co, "only-b", "v1", &solo).await;
    push(&http, &co, "elsewhere", "v1", &other).await;
    for reg in [&ra, &rb] {
        let (h, r) = (http.clone(), reg.clone());
        eventually(60, &format!("apps/web reaches {reg}"), || {
            let (h, r) = (h.clone(), r.clone());
            async move { tag_digest(&h, &r, "apps/web", "v1").await.is_some() }
        })
        .await;
        pull(&http, reg, "apps/web", "v1", &web).await;
    }
    let (h, r) = (http.clone(), rb.clone());
    eventually(60, "only-b reaches edge-b", || {
        let (h, r) = (h.clone(), r.clone());
        async move { tag_digest(&h, &r, "only-b", "v1").await.is_some() }
    })
    .await;
    pull(&http, &rb, "only-b", "v1", &solo).await;
    // No rule sends only-b to edge-a, nor `elsewhere` anywhere.
    assert_eq!(tag_digest(&http, &ra, "only-b", "v1").await, None);
    assert_eq!(tag_digest(&http, &ra, "elsewhere", "v1").await, None);
    assert_eq!(tag_digest(&http, &rb, "elsewhere", "v1").await, None);
    assert_eq!(
        counter(&core, "cairn_replication_offers_sent_total"),
        3.0,
        "one offer per (image, site)"
    );
    for n in [core, a, b] {
        n.shutdown().await;
    }
}
