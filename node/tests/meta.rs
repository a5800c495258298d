//! Site metadata across three nodes on loopback: records converge through
//! a parent, a partitioned site keeps answering from its own state, writes
//! made on both sides of a cut resolve to the same winner everywhere after
//! healing, and liveness goes up → suspect → down → up with the link.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use cairn_meta::Key;
use cairn_node::meta::{MetaSettings, SitesView};
use cairn_node::{Node, NodeConfig};
use cairn_transport::PeerAddr;

mod common;

use common::*;

fn fast_meta(cfg: &mut NodeConfig) {
    cfg.meta = MetaSettings {
        interval: Duration::from_millis(150),
        heartbeat: Duration::from_millis(250),
        suspect_after: Duration::from_millis(1500),
        down_after: Duration::from_millis(3000),
        cpu_millis: 4000,
        ..MetaSettings::default()
    };
    cfg.labels.insert("region".into(), "eu".into());
    cfg.labels.insert("team".into(), "edge".into());
}

fn state_of(v: &SitesView, site: &str) -> Option<String> {
    v.sites
        .iter()
        .find(|s| s.name == site)
        .map(|s| s.state.clone())
}

/// Poll `cond` every 50 ms for up to `secs`; panic with `what` if it never holds.
async fn wait_for(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn key() -> Key {
    Key::Other {
        namespace: "test".into(),
        key: Bytes::from_static(b"placement/app"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_converge_survive_a_partition_and_liveness_follows_the_link() {
    let c = Cluster::new();
    let core = c.node_with("core", vec![], fast_meta).await;
    let edge1 = c.node_with("edge1", vec![peer(&core)], fast_meta).await;
    // edge2 reaches its parent through a relay the test can cut.
    let relay = Relay::start(core.local_addr().unwrap()).await;
    let edge2 = c
        .node_with(
            "edge2",
            vec![PeerAddr::named(relay.addr, "core")],
            fast_meta,
        )
        .await;
    let nodes: [&Node; 3] = [&core, &edge1, &edge2];

    // Every site learns every other, edge1 and edge2 through core only.
    wait_for(30, "all sites known and up everywhere", || {
        nodes.iter().all(|n| {
            let v = n.meta().sites();
            v.sites.len() == 3
                && v.sites
                    .iter()
                    .all(|s| s.state == "up" || s.name == v.site && s.state == "self")
        })
    })
    .await;
    let v = edge1.meta().sites();
    let e2 = v.sites.iter().find(|s| s.name == "edge2").unwrap();
    assert_eq!(e2.labels.region, "eu");
    assert_eq!(
        e2.labels.extra.get("team").map(String::as_str),
        Some("edge")
    );
    assert_eq!(e2.parent.as_deref(), Some("core"));
    assert_eq!(e2.capacity.cpu_millis, 4000);
    assert!(e2.capacity.disk_total > 0 && e2.capacity.disk_free <= e2.capacity.disk_total);
    // edge1 talks to core: a measured RTT; never to edge2: none.
    let core_view = v.sites.iter().find(|s| s.name == "core").unwrap();
    assert!(core_view.rtt_ms.is_some_and(|r| r > 0.0 && r < 1000.0));
    assert!(e2.rtt_ms.is_none());

    // Every site gets a coordinate (core from the exchanges it answers), so
    // edge1 estimates its RTT to edge2 without ever measuring it.
    wait_for(20, "an estimated RTT from edge1 to edge2", || {
        edge1
            .meta()
            .sites()
            .sites
            .iter()
            .any(|s| s.name == "edge2" && s.rtt_est_ms.is_some_and(|r| r.is_finite() && r >= 0.0))
    })
    .await;
    // A record written at the core reaches both edges.
    core.meta().put(key(), Bytes::from_static(b"v0")).unwrap();
    wait_for(20, "v0 everywhere", || {
        nodes
            .iter()
            .all(|n| n.meta().get(&key()).as_deref() == Some(&b"v0"[..]))
    })
    .await;

    // Cut edge2 off. It keeps answering from its own state, and both sides
    // write the same record while apart.
    relay.set_cut(true);
    edge1
        .meta()
        .put(key(), Bytes::from_static(b"from-edge1"))
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    edge2
        .meta()
        .put(key(), Bytes::from_static(b"from-edge2"))
        .unwrap();
    wait_for(20, "edge2 suspect, then down, at core and edge1", || {
        state_of(&core.meta().sites(), "edge2").as_deref() == Some("down")
            && state_of(&edge1.meta().sites(), "edge2").as_deref() == Some("down")
    })
    .await;
    let apart = edge2.meta().sites();
    assert_eq!(
        apart.sites.len(),
        3,
        "a cut-off site still lists every site"
    );
    assert_eq!(state_of(&apart, "core").as_deref(), Some("down"));
    assert_eq!(
        edge2.meta().get(&key()).as_deref(),
        Some(&b"from-edge2"[..]),
        "the cut-off site answers from its own state"
    );
    assert_eq!(core.meta().get(&key()).as_deref(), Some(&b"from-edge1"[..]));

    // Heal: one winner everywhere (edge2 wrote last, so its version is
    // higher), and edge2 is up again at every site.
    relay.set_cut(false);
    wait_for(60, "one winner everywhere and edge2 up again", || {
        nodes
            .iter()
            .all(|n| n.meta().get(&key()).as_deref() == Some(&b"from-edge2"[..]))
            && state_of(&core.meta().sites(), "edge2").as_deref() == Some("up")
            && state_of(&edge1.meta().sites(), "edge2").as_deref() == Some("up")
            && state_of(&edge2.meta().sites(), "edge1").as_deref() == Some("up")
    })
    .await;
    // The exchanges were counted, and some found the peer already in sync.
    assert!(counter(&edge1, "cairn_meta_exchanges_total") > 10.0);
    assert!(counter(&edge1, "cairn_meta_bytes_total") > 0.0);

    // The record survives a restart of a site.
    edge1.shutdown().await;
    let edge1 = c.node_with("edge1", vec![peer(&core)], fast_meta).await;
    assert_eq!(
        edge1.meta().get(&key()).as_deref(),
        Some(&b"from-edge2"[..])
    );
    assert_eq!(edge1.meta().sites().sites.len(), 3);

    // And the API serves it.
    let api = edge1.api_addr().unwrap();
    let http = reqwest::Client::new();
    let all: SitesView = http
        .get(format!("http://{api}/api/v1/sites"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(all.site, "edge1");
    assert_eq!(
        all.sites
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>(),
        ["core", "edge1", "edge2"]
    );
    let r = http
        .get(format!("http://{api}/api/v1/sites/nowhere"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.text().await.unwrap().contains("nowhere"));

    edge1.shutdown().await;
    edge2.shutdown().await;
    core.shutdown().await;
    relay.stop().await;
}
