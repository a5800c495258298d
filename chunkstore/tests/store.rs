//! Store behaviour, run once per I/O engine.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use cairn_chunkstore::{ChunkerConfig, EngineKind, PutOptions, Store, StoreConfig, StoreError};
use proptest::prelude::*;
use rand::{Rng, RngCore, SeedableRng};

fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

fn engines() -> Vec<EngineKind> {
    let mut v = vec![EngineKind::Psync];
    if cairn_chunkstore::engine::open_engine(EngineKind::Uring).is_ok() {
        v.push(EngineKind::Uring);
    } else {
        eprintln!("io_uring refused here: running the psync engine only");
    }
    v
}

fn cfg(engine: EngineKind) -> StoreConfig {
    StoreConfig {
        engine,
        ..StoreConfig::default()
    }
}

fn small_chunks(engine: EngineKind) -> StoreConfig {
    StoreConfig {
        engine,
        chunker: ChunkerConfig::Cdc {
            min: 1024,
            avg: 4096,
            max: 16384,
        },
        segment_bytes: 1 << 20,
        ..StoreConfig::default()
    }
}

fn read_all(store: &Store, id: &cairn_chunkstore::ObjectId) -> Vec<u8> {
    let h = store.open_object(id).unwrap();
    let mut out = Vec::new();
    for c in h.chunks() {
        out.extend_from_slice(&c.unwrap());
    }
    out
}

/// Sizes around every limit: empty, inline, one group, chunk min/avg/max.
#[test]
fn round_trips_at_edge_sizes() {
    for engine in engines() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), cfg(engine)).unwrap();
        for (i, len) in [
            0usize,
            1,
            4095,
            4096,
            4097,
            16383,
            16384,
            16385,
            65536,
            262143,
            262144,
            262145,
            1 << 20,
            3_000_001,
        ]
        .into_iter()
        .enumerate()
        {
            let data = random(len, i as u64);
            let put = store.put_bytes(&data, &PutOptions::default()).unwrap();
            assert_eq!(put.len, len as u64);
            assert_eq!(read_all(&store, &put.object), data, "{engine:?} len {len}");
            // Random access at awkward places.
            let h = store.open_object(&put.object).unwrap();
            let mut rng = rand::rngs::StdRng::seed_from_u64(len as u64);
            for _ in 0..50.min(len) {
                let off = rng.gen_range(0..len);
                let n = rng.gen_range(0..=(len - off).min(300_000));
                let mut buf = vec![0u8; n];
                h.read_at(off as u64, &mut buf).unwrap();
                assert_eq!(buf, &data[off..off + n]);
            }
            assert!(matches!(
                h.read_at(len as u64, &mut [0u8; 1]),
                Err(StoreError::OutOfRange { .. })
            ));
            let sha = {
                use sha2::Digest;
                hex::encode(sha2::Sha256::digest(&data))
            };
            assert_eq!(put.sha256, sha);
            assert_eq!(store.resolve(&format!("sha256:{sha}")).unwrap(), put.object);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn put_get_round_trips(len in 0usize..600_000, seed in any::<u64>(), compress in any::<bool>()) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), StoreConfig { compress, ..small_chunks(EngineKind::Auto) }).unwrap();
        // Half-compressible data so both zstd paths run.
        let mut data = random(len, seed);
        for b in data.iter_mut().skip(len / 2) { *b &= 0x3; }
        let put = store.put_bytes(&data, &PutOptions::default()).unwrap();
        prop_assert_eq!(read_all(&store, &put.object), data.clone());
        let h = store.open_object(&put.object).unwrap();
        if len > 10 {
            let mut buf = vec![0u8; len / 3];
            h.read_at(len as u64 / 3, &mut buf).unwrap();
            prop_assert_eq!(&buf[..], &data[len / 3..len / 3 + len / 3]);
        }
    }
}

#[test]
fn reopen_keeps_everything_and_dedups() {
    for engine in engines() {
        let dir = tempfile::tempdir().unwrap();
        let data = random(2 << 20, 7);
        let id = {
            let store = Store::open(dir.path(), cfg(engine)).unwrap();
            let put = store
                .put_bytes(
                    &data,
                    &PutOptions {
                        name: Some("demo/x:v1".into()),
                        ..Default::default()
                    },
                )
                .unwrap();
            assert_eq!(put.new_bytes, data.len() as u64);
            put.object
        };
        let store = Store::open(dir.path(), cfg(engine)).unwrap();
        assert_eq!(store.resolve("demo/x:v1").unwrap(), id);
        assert_eq!(read_all(&store, &id), data);
        let again = store.put_bytes(&data, &PutOptions::default()).unwrap();
        assert_eq!(again.object, id);
        assert_eq!(again.new_chunks, 0);
        assert_eq!(again.dedup_saving(), 1.0);
        assert!(store.fsck(|_| {}).unwrap().is_clean());
    }
}

#[test]
fn second_open_of_a_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _a = Store::open(dir.path(), StoreConfig::default()).unwrap();
    assert!(matches!(
        Store::open(dir.path(), StoreConfig::default()),
        Err(StoreError::Locked(_))
    ));
}

#[test]
fn bad_names_and_ids_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let e = store
        .put_bytes(
            b"x",
            &PutOptions {
                name: Some("has space".into()),
                ..Default::default()
            },
        )
        .unwrap_err();
    assert!(e.to_string().contains("whitespace"), "{e}");
    let e = store.resolve(&"0".repeat(64)).unwrap_err();
    assert!(matches!(e, StoreError::NoSuchObject(_)));
    assert!(matches!(
        store.resolve("nope"),
        Err(StoreError::NoSuchObject(_))
    ));
}

/// Flip one byte of a chunk in its segment file: reads and fsck report it,
/// the chunk is moved aside and then reads as missing, and the store keeps
/// working for everything else.
#[test]
fn corrupt_chunk_is_reported_quarantined_and_missing() {
    for engine in engines() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), cfg(engine)).unwrap();
        let data = random(1 << 20, 3);
        let other = random(300_000, 4);
        let put = store.put_bytes(&data, &PutOptions::default()).unwrap();
        let put2 = store.put_bytes(&other, &PutOptions::default()).unwrap();
        let victim = store.recipe(&put.object).unwrap().chunks()[1];
        let meta = store.chunk_meta(&victim.id).unwrap().unwrap();
        let cairn_chunkstore::index::Location::Segment { seg, offset, .. } = meta.loc else {
            panic!("expected a segment chunk")
        };
        drop(store);
        let path = dir
            .path()
            .join("segments")
            .join(cairn_chunkstore::segment::file_name(seg));
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[offset as usize + 100] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();

        let store = Store::open(dir.path(), cfg(engine)).unwrap();
        let h = store.open_object(&put.object).unwrap();
        let mut buf = vec![0u8; 10];
        let e = h.read_at(victim.offset + 95, &mut buf).unwrap_err();
        match &e {
            StoreError::Corrupt {
                id,
                path: p,
                quarantine,
                ..
            } => {
                assert_eq!(*id, victim.id);
                assert_eq!(p, &path);
                assert!(quarantine.exists());
            }
            other => panic!("expected Corrupt, got {other}"),
        }
        assert!(e.to_string().contains(&path.display().to_string()));
        // Now it is missing, and says so.
        assert!(
            matches!(h.read_at(victim.offset, &mut buf), Err(StoreError::ChunkMissing(id)) if id == victim.id)
        );
        assert_eq!(store.metrics().verify_failures.get(), 1);
        // Other objects still read fine.
        assert_eq!(read_all(&store, &put2.object), other);
        let r = store.fsck(|_| {}).unwrap();
        assert!(!r.is_clean());
        assert_eq!(r.missing, vec![(put.object, victim.id)]);
        // Putting the data again heals it.
        store.put_bytes(&data, &PutOptions::default()).unwrap();
        assert_eq!(read_all(&store, &put.object), data);
        assert!(store.fsck(|_| {}).unwrap().is_clean());
    }
}

#[test]
fn fsck_finds_corruption_without_a_read() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let put = store
        .put_bytes(&random(500_000, 9), &PutOptions::default())
        .unwrap();
    let c = store.recipe(&put.object).unwrap().chunks()[0];
    let cairn_chunkstore::index::Location::Segment { seg, offset, .. } =
        store.chunk_meta(&c.id).unwrap().unwrap().loc
    else {
        panic!()
    };
    drop(store);
    let path = dir
        .path()
        .join("segments")
        .join(cairn_chunkstore::segment::file_name(seg));
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[offset as usize] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let r = store.fsck(|_| {}).unwrap();
    assert_eq!(r.corrupt.len(), 1, "{r:?}");
    assert!(r.corrupt[0].contains(&c.id.to_string()));
    assert_eq!(r.missing.len(), 1);
}

#[test]
fn gc_reclaims_only_unreferenced() {
    for engine in engines() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), small_chunks(engine)).unwrap();
        let keep = random(3 << 20, 1);
        let drop_me = random(3 << 20, 2);
        let k = store
            .put_bytes(
                &keep,
                &PutOptions {
                    name: Some("keep".into()),
                    pin: false,
                    ..Default::default()
                },
            )
            .unwrap();
        let d = store.put_bytes(&drop_me, &PutOptions::default()).unwrap();
        let before = store.summary();
        assert_eq!(store.remove(&d.object.to_string()).unwrap(), 1);
        let r = store.gc().unwrap();
        assert_eq!(r.objects_removed, 1);
        assert_eq!(r.chunks_removed, d.chunks);
        assert!(r.bytes_reclaimed > 0, "{r:?}");
        let after = store.summary();
        assert!(after.segment_bytes < before.segment_bytes);
        assert!(matches!(
            store.open_object(&d.object),
            Err(StoreError::NoSuchObject(_))
        ));
        assert_eq!(read_all(&store, &k.object), keep);
        assert!(store.fsck(|_| {}).unwrap().is_clean());
        drop(store);
        let store = Store::open(dir.path(), small_chunks(engine)).unwrap();
        assert_eq!(read_all(&store, &k.object), keep);
        assert_eq!(store.metrics().gc_runs.get(), 0);
    }
}

/// GC runs in a loop while other threads ingest and read. Everything pinned
/// or being read survives, and every committed object reads back intact.
#[test]
fn gc_racing_ingest_and_reads_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), small_chunks(EngineKind::Auto)).unwrap();
    // A shared base so new objects dedup against chunks GC is considering.
    let base = random(1 << 20, 100);
    let pinned = store.put_bytes(&base, &PutOptions::default()).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let mut committed = Vec::new();
    std::thread::scope(|s| {
        let gc = s.spawn(|| {
            let mut runs = 0;
            while !stop.load(Ordering::Relaxed) {
                store.gc().unwrap();
                runs += 1;
            }
            runs
        });
        let reader = s.spawn(|| {
            // Read an unpinned, unnamed object while GC wants to remove it.
            let mut reads = 0;
            while !stop.load(Ordering::Relaxed) {
                let data = random(400_000, 5000 + reads);
                let put = store.put_bytes(
                    &data,
                    &PutOptions {
                        pin: false,
                        ..Default::default()
                    },
                );
                let Ok(put) = put else { continue };
                // Opening may lose the race with GC (not pinned): that is allowed.
                if let Ok(h) = store.open_object(&put.object) {
                    for _ in 0..3 {
                        let mut buf = vec![0u8; data.len()];
                        h.read_at(0, &mut buf).unwrap();
                        assert_eq!(buf, data);
                    }
                }
                reads += 1;
            }
            reads
        });
        for i in 0..40u64 {
            // Each object = part of the pinned base + new bytes, so ingest
            // dedups against chunks while GC sweeps.
            let mut data = base[..(i as usize * 20_000) % base.len()].to_vec();
            data.extend_from_slice(&random(200_000, i));
            let unpinned = store
                .put_bytes(
                    &data,
                    &PutOptions {
                        pin: false,
                        ..Default::default()
                    },
                )
                .unwrap();
            let _ = unpinned; // garbage for GC to chew on
            let put = store
                .put_bytes(
                    &data,
                    &PutOptions {
                        name: Some(format!("obj{i}")),
                        pin: false,
                        ..Default::default()
                    },
                )
                .unwrap();
            committed.push((put.object, data));
        }
        stop.store(true, Ordering::Relaxed);
        let runs = gc.join().unwrap();
        let reads = reader.join().unwrap();
        assert!(runs > 3, "gc ran {runs} times");
        assert!(reads > 0);
    });
    store.gc().unwrap();
    for (id, data) in &committed {
        assert_eq!(&read_all(&store, id), data);
    }
    assert_eq!(read_all(&store, &pinned.object), base);
    let r = store.fsck(|_| {}).unwrap();
    assert!(r.is_clean(), "{r:?}");
}

#[test]
fn budget_evicts_lru_unpinned_and_keeps_pins() {
    let dir = tempfile::tempdir().unwrap();
    let budget = 8 << 20;
    let store = Store::open(
        dir.path(),
        StoreConfig {
            budget_bytes: Some(budget),
            ..small_chunks(EngineKind::Auto)
        },
    )
    .unwrap();
    let pinned_data = random(3 << 20, 1);
    let pinned = store
        .put_bytes(&pinned_data, &PutOptions::default())
        .unwrap();
    let mut cached = Vec::new();
    for i in 0..6u64 {
        let d = random(2 << 20, 10 + i);
        let p = store
            .put_bytes(
                &d,
                &PutOptions {
                    name: Some(format!("cache{i}")),
                    pin: false,
                    ..Default::default()
                },
            )
            .unwrap();
        cached.push((p.object, d));
    }
    let s = store.summary();
    assert!(s.physical_bytes <= budget, "{s:?}");
    assert!(store.metrics().evictions.get() > 0);
    // Pinned: complete. Oldest cached: partial. Newest: complete.
    assert_eq!(read_all(&store, &pinned.object), pinned_data);
    assert_eq!(store.object_stat(&cached[0].0).unwrap().state(), "partial");
    let (newest, data) = cached.last().unwrap();
    assert_eq!(store.object_stat(newest).unwrap().state(), "complete");
    assert_eq!(&read_all(&store, newest), data);
    // A missing chunk is an error that names it, not a panic.
    let h = store.open_object(&cached[0].0).unwrap();
    let err = h.chunks().find_map(|c| c.err()).unwrap();
    assert!(matches!(err, StoreError::ChunkMissing(_)));
}

#[test]
fn metrics_track_dedup() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let data = random(1 << 20, 1);
    store
        .put_bytes(
            &data,
            &PutOptions {
                name: Some("a".into()),
                ..Default::default()
            },
        )
        .unwrap();
    let mut v2 = data.clone();
    v2.extend_from_slice(b"tail");
    store.put_bytes(&v2, &PutOptions::default()).unwrap();
    let m = store.metrics();
    assert!(m.chunks_deduplicated.get() > 0);
    assert!(m.dedup_ratio.get() > 1.5, "ratio {}", m.dedup_ratio.get());
    assert_eq!(m.logical_bytes.get() as usize, data.len() + v2.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_put_and_stream() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let data = random(5 << 20, 11);
    let put = store
        .put_async(&data[..], PutOptions::default())
        .await
        .unwrap();
    let mut rx = store.open_object(&put.object).unwrap().stream(4);
    let mut got = Vec::new();
    while let Some(c) = rx.recv().await {
        got.extend_from_slice(&c.unwrap());
    }
    assert_eq!(got, data);

    // A reader that fails half-way commits nothing.
    struct Failing(usize);
    impl tokio::io::AsyncRead for Failing {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            if self.0 == 0 {
                return std::task::Poll::Ready(Err(std::io::Error::other("disk on fire")));
            }
            let n = buf.remaining().min(self.0);
            buf.put_slice(&vec![1u8; n]);
            self.0 -= n;
            std::task::Poll::Ready(Ok(()))
        }
    }
    let before = store.objects().unwrap().len();
    let e = store
        .put_async(Failing(3 << 20), PutOptions::default())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("disk on fire"), "{e}");
    assert_eq!(store.objects().unwrap().len(), before);
}

/// Regression: every open created a new, empty segment file, so read-only
/// CLI commands piled up empty files.
#[test]
fn read_only_opens_do_not_pile_up_segments() {
    let dir = tempfile::tempdir().unwrap();
    drop(Store::open(dir.path(), StoreConfig::default()).unwrap());
    for _ in 0..5 {
        let s = Store::open(dir.path(), StoreConfig::default()).unwrap();
        s.names().unwrap();
    }
    let n = std::fs::read_dir(dir.path().join("segments"))
        .unwrap()
        .count();
    assert_eq!(n, 1);
    // After data is written, the next open starts a fresh segment.
    let s = Store::open(dir.path(), StoreConfig::default()).unwrap();
    s.put_bytes(&random(100_000, 1), &PutOptions::default())
        .unwrap();
    drop(s);
    drop(Store::open(dir.path(), StoreConfig::default()).unwrap());
    assert_eq!(
        std::fs::read_dir(dir.path().join("segments"))
            .unwrap()
            .count(),
        2
    );
}

/// A store filled from elsewhere: recipe first (pinned), then verified
/// chunks in batches; reopen, GC and fsck keep it whole.
#[test]
fn recipe_then_chunks_from_elsewhere() {
    use cairn_chunkstore::VerifiedChunk;
    for engine in engines() {
        let src_dir = tempfile::tempdir().unwrap();
        let dst_dir = tempfile::tempdir().unwrap();
        let src = Store::open(src_dir.path(), small_chunks(engine)).unwrap();
        let data = random(3 << 20, 77);
        let put = src.put_bytes(&data, &PutOptions::default()).unwrap();
        let recipe = src.recipe(&put.object).unwrap();
        {
            let dst = Store::open(dst_dir.path(), small_chunks(engine)).unwrap();
            let pin = format!("obj:{}", put.object);
            assert_eq!(dst.put_recipe(&recipe, Some(&pin)).unwrap(), put.object);
            let missing = dst.missing_chunks(&recipe).unwrap();
            assert!(!missing.is_empty());
            // Reads of a chunk not yet here fail clearly.
            let h = dst.open_object(&put.object).unwrap();
            let mut buf = vec![0u8; 16];
            assert!(matches!(
                h.read_at(0, &mut buf),
                Err(StoreError::ChunkMissing(_))
            ));
            drop(h);
            // First half, then GC (pinned recipe keeps it), then the rest with
            // duplicates mixed in.
            let half = missing.len() / 2;
            let batch = |refs: &[cairn_chunkstore::ChunkRef]| -> Vec<VerifiedChunk> {
                refs.iter()
                    .map(|r| VerifiedChunk::new(r.id, src.read_chunk(&r.id).unwrap()).unwrap())
                    .collect()
            };
            let r1 = dst.put_chunks(&batch(&missing[..half])).unwrap();
            assert_eq!(r1.new_chunks, half as u64);
            dst.gc().unwrap();
            assert_eq!(
                dst.missing_chunks(&recipe).unwrap().len(),
                missing.len() - half
            );
            let r2 = dst.put_chunks(&batch(&missing)).unwrap();
            assert_eq!(r2.new_chunks, (missing.len() - half) as u64);
            assert!(dst.missing_chunks(&recipe).unwrap().is_empty());
            assert_eq!(read_all(&dst, &put.object), data);
        }
        let dst = Store::open(dst_dir.path(), small_chunks(engine)).unwrap();
        assert_eq!(read_all(&dst, &put.object), data);
        assert!(dst.fsck(|_| {}).unwrap().is_clean());
        // A bad chunk cannot even be built.
        let mut bad = src.read_chunk(&recipe.chunks()[0].id).unwrap().to_vec();
        bad[0] ^= 1;
        assert!(VerifiedChunk::new(recipe.chunks()[0].id, bad.into()).is_err());
    }
}

/// A chunk that arrived as a zstd frame is stored as that frame (not
/// compressed again), reads back as its bytes, and survives reopen and fsck.
#[test]
fn chunks_that_arrive_compressed_keep_their_frame() {
    use cairn_chunkstore::VerifiedChunk;
    for engine in engines() {
        let dir = tempfile::tempdir().unwrap();
        let text: Vec<u8> = b"cairn keeps the frame it was sent ".repeat(2000);
        let id = cairn_chunkstore::ChunkId::of(&text);
        // Level 19: smaller than anything the store's own level would make,
        // so the stored size tells which frame was written.
        let frame = zstd::bulk::compress(&text, 19).unwrap();
        let level1 = zstd::bulk::compress(&text, 1).unwrap();
        assert!(frame.len() < level1.len());
        let chunk = VerifiedChunk::from_zstd(id, frame.clone().into(), text.len()).unwrap();
        let compressing = StoreConfig {
            compress: true,
            ..cfg(engine)
        };
        {
            let store = Store::open(dir.path(), compressing.clone()).unwrap();
            let r = store.put_chunks(&[chunk]).unwrap();
            assert_eq!(r.new_chunks, 1);
            assert_eq!(r.new_bytes, text.len() as u64);
            assert_eq!(r.stored_bytes, frame.len() as u64);
            assert_eq!(store.read_chunk(&id).unwrap(), text);
        }
        let store = Store::open(dir.path(), compressing).unwrap();
        assert_eq!(store.read_chunk(&id).unwrap(), text);
        assert!(store.fsck(|_| {}).unwrap().is_clean());
        // A store that does not compress stores the bytes, not the frame.
        let plain_dir = tempfile::tempdir().unwrap();
        let plain = Store::open(plain_dir.path(), cfg(engine)).unwrap();
        let chunk = VerifiedChunk::from_zstd(id, frame.clone().into(), text.len()).unwrap();
        assert_eq!(
            plain.put_chunks(&[chunk]).unwrap().stored_bytes,
            text.len() as u64
        );
        assert_eq!(plain.read_chunk(&id).unwrap(), text);
        // Incompressible chunks from elsewhere are stored raw.
        let noise = random(64 << 10, 9);
        let r = store
            .put_chunks(&[VerifiedChunk::hash(noise.clone().into())])
            .unwrap();
        assert_eq!(r.stored_bytes, noise.len() as u64);
    }
}

/// Random reads load index entries a window of the recipe at a time. Entries
/// loaded that way stay right when compaction moves the chunks under open
/// handles, and reads of objects spanning many windows return the right bytes.
#[test]
fn random_reads_survive_compaction_of_batched_index_entries() {
    for engine in engines() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = StoreConfig {
            compact_below: 0.9,
            ..small_chunks(engine)
        };
        let store = Store::open(dir.path(), cfg).unwrap();
        // Kept and dropped objects alternate, so segments end up part live.
        let mut keep = Vec::new();
        let mut drop_ids = Vec::new();
        for i in 0..8u64 {
            let data = random(640 << 10, 10 + i);
            let p = store
                .put_bytes(
                    &data,
                    &PutOptions {
                        name: Some(format!("keep-{i}")),
                        pin: false,
                        ..Default::default()
                    },
                )
                .unwrap();
            keep.push((p.object, data));
            let d = store
                .put_bytes(&random(300 << 10, 100 + i), &PutOptions::default())
                .unwrap();
            drop_ids.push(d.object);
        }
        let handles: Vec<_> = keep
            .iter()
            .map(|(id, _)| store.open_object(id).unwrap())
            .collect();
        assert!(
            handles[0].recipe().chunks().len() > 64,
            "spans several windows"
        );
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut check = || {
            for _ in 0..400 {
                let k = rng.gen_range(0..keep.len());
                let (h, data) = (&handles[k], &keep[k].1);
                let len = rng.gen_range(1..=9000usize);
                let off = rng.gen_range(0..=data.len() - len);
                let mut buf = vec![0u8; len];
                h.read_at(off as u64, &mut buf).unwrap();
                assert!(buf == data[off..off + len], "object {k} at {off}+{len}");
            }
        };
        check();
        for d in &drop_ids {
            store.remove(&d.to_string()).unwrap();
        }
        let r = store.gc().unwrap();
        assert!(r.segments_compacted > 0, "{r:?}");
        check();
        drop(handles);
        for (id, data) in &keep {
            assert_eq!(&read_all(&store, id), data);
        }
    }
}

#[test]
fn prefix_scans_return_exactly_the_matching_names_and_pins() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), cfg(EngineKind::Psync)).unwrap();
    let id = store
        .put_bytes(b"x", &PutOptions::default())
        .unwrap()
        .object;
    for n in ["a/1", "a/2", "a0", "b/1", "a"] {
        store.set_name(n, &id).unwrap();
        store.pin(n, &id).unwrap();
    }
    let names: Vec<String> = store
        .names_with_prefix("a/")
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(names, ["a/1", "a/2"]);
    let pins: Vec<String> = store
        .pins_with_prefix("a/")
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(pins, ["a/1", "a/2"]);
    assert!(store.names_with_prefix("c").unwrap().is_empty());
    assert_eq!(store.names_with_prefix("").unwrap().len(), 5);
}
