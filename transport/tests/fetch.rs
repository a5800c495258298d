//! Verified multi-source fetch between real nodes on loopback.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use cairn_transport::wire::{self, ObjectKey, Priority, Request, Response};
use cairn_transport::{FetchConfig, FetchError, PeerAddr};
use common::*;

const MIB: usize = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_two_holders_512mib() {
    init_tracing();
    let cluster = Cluster::new();
    let a = TestNode::start(&cluster, "a", NodeOpts::default());
    let b = TestNode::start(&cluster, "b", NodeOpts::default());
    let c = TestNode::start(&cluster, "c", NodeOpts::default());
    let data = random_bytes(512 * MIB, 1);
    let id = put(&a.store, &data, Some("big"));
    assert_eq!(put(&b.store, &data, None), id);
    let expect = blake3::hash(&data);
    drop(data);

    let (got, report) = with_timeout(240, async {
        c.fetcher
            .fetch_object(
                &ObjectKey::Name("big".into()),
                &[a.peer(), b.peer()],
                Priority::Background,
            )
            .await
            .unwrap()
    })
    .await;
    assert_eq!(got, id);
    let n_chunks = c.store.recipe(&id).unwrap().chunks().len() as u64;
    assert_eq!(report.fetched, n_chunks, "{report:?}");
    let from_a = report.per_peer.get(&a.addr).copied().unwrap_or(0);
    let from_b = report.per_peer.get(&b.addr).copied().unwrap_or(0);
    assert!(
        from_a > 0 && from_b > 0,
        "both holders serve: a={from_a} b={from_b}"
    );
    assert_eq!(from_a + from_b, n_chunks);
    // What each holder says it served matches what c says it got.
    assert_eq!(
        a.metric("cairn_transport_chunks_served_total", &[]) as u64,
        from_a
    );
    assert_eq!(
        b.metric("cairn_transport_chunks_served_total", &[]) as u64,
        from_b
    );
    let back = read_all(&c.store, &id);
    assert_eq!(blake3::hash(&back), expect, "byte-identical");
    drop(back);
    fsck_clean(&c.store);

    // A second fetch finds everything local and asks nobody.
    let (_, again) = c
        .fetcher
        .fetch_object(
            &ObjectKey::Id(id),
            &[a.peer(), b.peer()],
            Priority::Background,
        )
        .await
        .unwrap();
    assert_eq!(again.fetched, 0);
    assert_eq!(again.local, n_chunks);
    for n in [a, b, c] {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lying_peer_is_caught_and_counted() {
    init_tracing();
    let cluster = Cluster::new();
    let honest = TestNode::start(&cluster, "honest", NodeOpts::default());
    // The liar's store holds the object; its server flips a bit in every chunk.
    let liar_store_node = TestNode::start(&cluster, "liar-store", NodeOpts::default());
    let data = random_bytes(24 * MIB, 2);
    let id = put(&honest.store, &data, None);
    put(&liar_store_node.store, &data, None);
    let liar_src = Arc::new(Liar {
        inner: liar_store_node.store.clone(),
        served: Default::default(),
    });
    let liar = TestNode::start(
        &cluster,
        "liar",
        NodeOpts {
            source: Some(liar_src.clone()),
            ..Default::default()
        },
    );
    let c = TestNode::start(&cluster, "c", NodeOpts::default());
    let peers = [liar.peer(), honest.peer()];
    let (_, report) = with_timeout(
        120,
        c.fetcher
            .fetch_object(&ObjectKey::Id(id), &peers, Priority::Demand),
    )
    .await
    .unwrap();
    assert_eq!(read_all(&c.store, &id), data);
    let n_chunks = c.store.recipe(&id).unwrap().chunks().len() as u64;
    assert_eq!(
        report.per_peer.get(&liar.addr).copied().unwrap_or(0),
        0,
        "nothing from the liar is kept"
    );
    assert_eq!(report.per_peer.get(&honest.addr).copied(), Some(n_chunks));
    let lies = liar_src.served.load(Ordering::Relaxed);
    assert!(lies > 0, "the liar was asked");
    assert!(report.verify_failures > 0);
    let label = liar.addr.to_string();
    let counted = c.metric(
        "cairn_transport_peer_verify_failures_total",
        &[("peer", &label)],
    );
    assert_eq!(counted as u64, report.verify_failures);
    // The liar's lies that arrived were each rejected (a stream stops at
    // the first bad chunk, so lies sent ≥ lies counted).
    assert!(lies >= report.verify_failures);
    assert!(
        c.metric(
            "cairn_transport_peer_errors_total",
            &[("peer", &label), ("kind", "verify")]
        ) >= 1.0
    );
    fsck_clean(&c.store);
    for n in [honest, liar_store_node, liar, c] {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cut_mid_transfer_resumes_without_refetch() {
    init_tracing();
    let cluster = Cluster::new();
    let mut ep = test_endpoint_config();
    ep.idle_timeout = Duration::from_secs(2);
    ep.keep_alive = Duration::from_millis(300);
    let a = TestNode::start(
        &cluster,
        "a",
        NodeOpts {
            endpoint: ep.clone(),
            ..Default::default()
        },
    );
    let c = TestNode::start(
        &cluster,
        "c",
        NodeOpts {
            endpoint: ep,
            fetch: FetchConfig {
                frame_timeout: Duration::from_secs(3),
                max_backoff: Duration::from_millis(500),
                ..Default::default()
            },
            ..Default::default()
        },
    );
    let data = random_bytes(96 * MIB, 3);
    let id = put(&a.store, &data, None);
    let relay = Relay::start(a.addr).await;
    let via = PeerAddr::named(relay.addr, "a");
    let cut = relay.cut.clone();
    let fwd = relay.forwarded.clone();
    // Cut the link once a third of the bytes have passed, for 4 s (longer
    // than the idle timeout, so the connection dies), then heal it.
    let cutter = tokio::spawn(async move {
        while fwd.load(Ordering::Relaxed) < (32 * MIB) as u64 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        cut.store(true, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(4)).await;
        cut.store(false, Ordering::Relaxed);
    });
    let (_, report) = with_timeout(
        120,
        c.fetcher
            .fetch_object(&ObjectKey::Id(id), &[via], Priority::Background),
    )
    .await
    .unwrap();
    cutter.await.unwrap();
    let n_chunks = c.store.recipe(&id).unwrap().chunks().len() as u64;
    assert!(report.retries > 0, "the cut was felt: {report:?}");
    assert_eq!(report.fetched, n_chunks, "every chunk fetched exactly once");
    let served = a.metric("cairn_transport_chunks_served_total", &[]) as u64;
    // The server may have sent a few chunks that died in the cut; none that
    // arrived were asked for twice.
    assert!(served >= n_chunks);
    assert!(c.metric("cairn_transport_connections_total", &[("direction", "out")]) >= 2.0);
    assert_eq!(read_all(&c.store, &id), data);
    relay.stop().await;
    a.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_fetches_of_one_chunk_coalesce() {
    init_tracing();
    let cluster = Cluster::new();
    let a = TestNode::start(&cluster, "a", NodeOpts::default());
    let c = TestNode::start(&cluster, "c", NodeOpts::default());
    let data = random_bytes(16 * MIB, 4);
    let id = put(&a.store, &data, None);
    let recipe = a.store.recipe(&id).unwrap();
    let want: Vec<_> = recipe.chunks().iter().map(|r| (r.id, r.len)).collect();
    let peers = [a.peer()];
    // The demand call waits for the background call's fetches (it would
    // not wait for a prefetch: see the test after next).
    let f1 = c.fetcher.fetch_chunks(&want, &peers, Priority::Background);
    let f2 = c.fetcher.fetch_chunks(&want, &peers, Priority::Demand);
    let (r1, r2) = with_timeout(60, async { tokio::join!(f1, f2) }).await;
    let (r1, r2) = (r1.unwrap(), r2.unwrap());
    let n = want.len() as u64;
    assert_eq!(
        r1.fetched + r2.fetched,
        n,
        "one network fetch per chunk: {r1:?} {r2:?}"
    );
    assert_eq!(r1.fetched + r1.coalesced + r1.local, n);
    assert_eq!(r2.fetched + r2.coalesced + r2.local, n);
    assert_eq!(
        a.metric("cairn_transport_chunks_served_total", &[]) as u64,
        n
    );
    for r in recipe.chunks() {
        assert!(c.store.has_chunk(&r.id).unwrap());
    }
    a.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demand_is_not_stuck_behind_background() {
    init_tracing();
    let cluster = Cluster::new();
    let a = TestNode::start(&cluster, "a", NodeOpts::default());
    let c = TestNode::start(&cluster, "c", NodeOpts::default());
    let bulk = random_bytes(256 * MIB, 5);
    let bulk_id = put(&a.store, &bulk, None);
    drop(bulk);
    let small = random_bytes(MIB, 6);
    let small_id = put(&a.store, &small, None);
    let small_chunks: Vec<_> = a
        .store
        .recipe(&small_id)
        .unwrap()
        .chunks()
        .iter()
        .map(|r| (r.id, r.len))
        .collect();
    let peers = [a.peer()];
    let fetcher = c.fetcher.clone();
    let p2 = peers.clone();
    let bulk_task = tokio::spawn(async move {
        let t = Instant::now();
        fetcher
            .fetch_object(&ObjectKey::Id(bulk_id), &p2, Priority::Prefetch)
            .await
            .unwrap();
        t.elapsed()
    });
    // Let the bulk transfer fill its window first.
    while c.metric(
        "cairn_transport_peer_chunks_fetched_total",
        &[("peer", &a.addr.to_string())],
    ) < 64.0
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let t = Instant::now();
    let r = with_timeout(
        60,
        c.fetcher
            .fetch_chunks(&small_chunks, &peers, Priority::Demand),
    )
    .await
    .unwrap();
    let demand = t.elapsed();
    assert_eq!(r.fetched, small_chunks.len() as u64);
    let bulk_time = with_timeout(240, bulk_task).await.unwrap();
    assert!(
        demand * 4 < bulk_time,
        "demand took {demand:?} while the whole bulk fetch took {bulk_time:?}"
    );
    a.stop().await;
    c.stop().await;
}

/// A demand request for a chunk a prefetch has in flight does not wait for
/// that fetch: the holder stalls the prefetch's read of the chunk (until
/// the test lets it go), and the demand fetch still completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demand_does_not_wait_for_a_prefetch_of_the_same_chunk() {
    init_tracing();
    let cluster = Cluster::new();
    let holder = TestNode::start(&cluster, "holder-store", NodeOpts::default());
    let data = random_bytes(2 * MIB, 9);
    let id = put(&holder.store, &data, None);
    let chunks: Vec<_> = holder
        .store
        .recipe(&id)
        .unwrap()
        .chunks()
        .iter()
        .map(|r| (r.id, r.len))
        .collect();
    let gated = chunks[0];
    let gate = Arc::new(Gate::new(holder.store.clone(), gated.0));
    let a = TestNode::start(
        &cluster,
        "a",
        NodeOpts {
            source: Some(gate.clone()),
            ..Default::default()
        },
    );
    let c = TestNode::start(&cluster, "c", NodeOpts::default());
    let peers = [a.peer()];
    let (fetcher, p2) = (c.fetcher.clone(), peers.clone());
    let bg = tokio::spawn(async move {
        fetcher
            .fetch_chunks(&[gated], &p2, Priority::Prefetch)
            .await
            .unwrap()
    });
    // The prefetch's read of the chunk is now held at the holder.
    with_timeout(30, async {
        while !gate.held.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let r = with_timeout(
        30,
        c.fetcher
            .fetch_chunks(&chunks[..2], &peers, Priority::Demand),
    )
    .await
    .unwrap();
    assert_eq!(r.fetched, 2, "{r:?}");
    assert!(c.store.has_chunk(&gated.0).unwrap());
    assert_eq!(c.metric("cairn_transport_demand_overtakes_total", &[]), 1.0);
    assert!(!bg.is_finished(), "the prefetch was still held");
    gate.release();
    let r = with_timeout(30, bg).await.unwrap();
    assert_eq!(r.chunks, 1);
    a.stop().await;
    c.stop().await;
    holder.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_nobody_has_fail_clearly() {
    init_tracing();
    let cluster = Cluster::new();
    let a = TestNode::start(&cluster, "a", NodeOpts::default());
    let b = TestNode::start(&cluster, "b", NodeOpts::default());
    let c = TestNode::start(&cluster, "c", NodeOpts::default());
    let have = random_bytes(MIB, 7);
    let id = put(&a.store, &have, None);
    let mut want: Vec<_> = a
        .store
        .recipe(&id)
        .unwrap()
        .chunks()
        .iter()
        .map(|r| (r.id, r.len))
        .collect();
    let ghost = cairn_chunkstore::ChunkId::of(b"nobody has this");
    want.push((ghost, 15));
    let err = with_timeout(
        60,
        c.fetcher
            .fetch_chunks(&want, &[a.peer(), b.peer()], Priority::Demand),
    )
    .await
    .unwrap_err();
    match err {
        FetchError::Unavailable(v) => {
            assert_eq!(v.len(), 1);
            assert_eq!(v[0].0, ghost);
        }
        e => panic!("unexpected {e}"),
    }
    // What could be fetched was fetched and kept.
    for (cid, _) in &want[..want.len() - 1] {
        assert!(c.store.has_chunk(cid).unwrap());
    }
    assert!(!c.store.has_chunk(&ghost).unwrap());
    let nf = with_timeout(
        30,
        c.fetcher.fetch_recipe(
            &ObjectKey::Name("nope".into()),
            &[a.peer()],
            Priority::Demand,
        ),
    )
    .await
    .unwrap_err();
    assert!(matches!(nf, FetchError::NotFound(_)), "{nf}");
    for n in [a, b, c] {
        n.stop().await;
    }
}

/// Raw streams against a server: garbage, oversize and truncated frames
/// close that stream with an error; the connection and node carry on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_close_the_stream_not_the_node() {
    init_tracing();
    let cluster = Cluster::new();
    let a = TestNode::start(&cluster, "a", NodeOpts::default());
    let c = TestNode::start(&cluster, "c", NodeOpts::default());
    let conn = c.endpoint.connect(a.addr, "a").unwrap().await.unwrap();
    let cases: Vec<Vec<u8>> = vec![
        // Oversize length.
        vec![0xff, 0xff, 0xff, 0x7f, 1, 1],
        // Wrong version.
        vec![2, 0, 0, 0, 9, 1],
        // Unknown kind.
        vec![2, 0, 0, 0, wire::PROTOCOL_VERSION, 0xee],
        // Truncated: header promises 100 bytes, stream ends after 3.
        vec![100, 0, 0, 0, wire::PROTOCOL_VERSION, 1, 0, 0, 0],
    ];
    for bytes in cases {
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&bytes).await.unwrap();
        send.finish().unwrap();
        let mut buf = BytesMut::new();
        let got = with_timeout(10, async {
            loop {
                match wire::decode_response(&mut buf) {
                    Ok(Some(r)) => return Some(r),
                    Ok(None) => {}
                    Err(_) => return None,
                }
                match recv.read_chunk(65536, true).await {
                    Ok(Some(ch)) => buf.extend_from_slice(&ch.bytes),
                    _ => return None,
                }
            }
        })
        .await;
        assert!(
            matches!(got, Some(Response::Error { .. }) | None),
            "bad frame {bytes:?} answered with {got:?}"
        );
    }
    assert!(a.metric("cairn_transport_bad_frames_total", &[]) >= 4.0);
    // The same connection still works.
    let frames = cairn_transport::fetch::exchange(
        &conn,
        &Request::Ping { nonce: 42 },
        2,
        std::time::Duration::from_secs(30),
    )
    .await
    .unwrap();
    assert_eq!(frames, vec![Response::Pong { nonce: 42 }]);
    conn.close(0u32.into(), b"done");
    a.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn have_bitmap_and_wire_zstd() {
    init_tracing();
    let cluster = Cluster::new();
    // Both stores compress: A serves its stored frames as they are and C
    // keeps the frames it receives.
    let compressing = || NodeOpts {
        compress: true,
        ..NodeOpts::default()
    };
    let a = TestNode::start(&cluster, "a", compressing());
    let c = TestNode::start(&cluster, "c", compressing());
    // Compressible data travels compressed and arrives intact.
    let text: Vec<u8> = (0..8 * MIB)
        .map(|i| b"cairn edge data "[i % 16] ^ ((i / 4096) as u8))
        .collect();
    let id = put(&a.store, &text, Some("text"));
    let (_, report) = with_timeout(
        60,
        c.fetcher.fetch_object(
            &ObjectKey::Name("text".into()),
            &[a.peer()],
            Priority::Demand,
        ),
    )
    .await
    .unwrap();
    assert_eq!(read_all(&c.store, &id), text);
    let wire_bytes = c.metric(
        "cairn_transport_peer_bytes_in_total",
        &[("peer", &a.addr.to_string())],
    );
    assert!(
        (wire_bytes as u64) * 2 < report.bytes,
        "zstd on the wire: {wire_bytes} wire bytes for {} bytes",
        report.bytes
    );
    // Both hold the same compressed bytes.
    let (sa, sc) = (a.store.summary(), c.store.summary());
    assert_eq!(sc.physical_bytes, sa.physical_bytes);
    assert!(sc.physical_bytes * 2 < report.bytes, "{sc:?} {report:?}");
    let conn = c.endpoint.connect(a.addr, "a").unwrap().await.unwrap();
    let recipe = a.store.recipe(&id).unwrap();
    let mut ids: Vec<_> = recipe.chunks().iter().map(|r| r.id).take(9).collect();
    ids.insert(3, cairn_chunkstore::ChunkId::of(b"absent"));
    let frames = cairn_transport::fetch::exchange(
        &conn,
        &Request::Have { ids: ids.clone() },
        2,
        std::time::Duration::from_secs(30),
    )
    .await
    .unwrap();
    match &frames[..] {
        [Response::HaveBitmap { count, bits }] => {
            assert_eq!(*count as usize, ids.len());
            for i in 0..ids.len() {
                let set = bits[i / 8] & (1 << (i % 8)) != 0;
                assert_eq!(set, i != 3, "bit {i}");
            }
        }
        other => panic!("unexpected {other:?}"),
    }
    conn.close(0u32.into(), b"done");
    a.stop().await;
    c.stop().await;
}
