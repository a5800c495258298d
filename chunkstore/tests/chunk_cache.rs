//! The verified chunk cache behind `ObjectHandle::read_at`: hits copy bytes
//! that were hashed against their id, with no I/O; what was never cached is
//! still verified on disk; quarantine, GC and a zero budget behave.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt as _;
use std::path::PathBuf;

use cairn_chunkstore::index::Location;
use cairn_chunkstore::{
    ChunkRef, EngineKind, ObjectId, PutOptions, Store, StoreConfig, StoreError,
};
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

fn cfg(engine: EngineKind, chunk_cache_bytes: u64) -> StoreConfig {
    StoreConfig {
        engine,
        chunk_cache_bytes,
        ..StoreConfig::default()
    }
}

/// Hits, misses, chunks read from disk, cache bytes.
fn counts(store: &Store) -> (u64, u64, u64, i64) {
    let m = store.metrics();
    (
        m.chunk_cache_hits.get(),
        m.chunk_cache_misses.get(),
        m.chunks_read.get(),
        m.chunk_cache_bytes.get(),
    )
}

/// Where a chunk's payload lives on disk.
fn payload(store: &Store, id: &cairn_chunkstore::ChunkId) -> (PathBuf, u64) {
    let meta = store.chunk_meta(id).unwrap().unwrap();
    let Location::Segment { seg, offset, .. } = meta.loc else {
        panic!("expected a segment chunk")
    };
    (
        store
            .dir()
            .join("segments")
            .join(cairn_chunkstore::segment::file_name(seg)),
        offset,
    )
}

/// Flip one byte of a chunk's payload on disk, under the open store.
fn corrupt(store: &Store, c: &ChunkRef, at: u64) {
    let (path, offset) = payload(store, &c.id);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, offset + at).unwrap();
    b[0] ^= 0x5a;
    f.write_all_at(&b, offset + at).unwrap();
    f.sync_data().unwrap();
}

/// A store holding `data` as one object, reopened so every cache is empty.
fn stored(dir: &std::path::Path, data: &[u8], c: StoreConfig) -> (Store, ObjectId, Vec<ChunkRef>) {
    let put = {
        let s = Store::open(dir, c.clone()).unwrap();
        s.put_bytes(data, &PutOptions::default()).unwrap()
    };
    let store = Store::open(dir, c).unwrap();
    let chunks = store.recipe(&put.object).unwrap().chunks().to_vec();
    assert!(
        chunks.len() >= 8,
        "want several chunks, got {}",
        chunks.len()
    );
    (store, put.object, chunks)
}

fn read(store: &Store, obj: &ObjectId, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    store
        .open_object(obj)
        .unwrap()
        .read_at(offset, &mut buf)
        .unwrap();
    buf
}

/// The first read of a chunk misses and fills the cache; every later read of
/// it is a hit that returns the right bytes without touching the disk (it
/// keeps returning them after the disk copy is damaged).
#[test]
fn hits_return_the_verified_bytes_without_io() {
    for engine in engines() {
        let dir = tempfile::tempdir().unwrap();
        let data = random(2 << 20, 1);
        let (store, obj, chunks) = stored(dir.path(), &data, cfg(engine, 64 << 20));
        let h = store.open_object(&obj).unwrap();
        let c = chunks[2];
        let at = |k: u64| c.offset + k * 997 % (u64::from(c.len) - 4096);
        assert_eq!(counts(&store), (0, 0, 0, 0));

        let mut buf = vec![0u8; 4096];
        h.read_at(at(0), &mut buf).unwrap();
        assert_eq!(buf, data[at(0) as usize..at(0) as usize + 4096]);
        let (hits, misses, disk, bytes) = counts(&store);
        assert_eq!((hits, misses, disk), (0, 1, 1));
        assert!(bytes >= i64::from(c.len), "cache holds {bytes} bytes");

        for k in 1..=9 {
            h.read_at(at(k), &mut buf).unwrap();
            assert_eq!(buf, data[at(k) as usize..at(k) as usize + 4096], "read {k}");
        }
        assert_eq!(counts(&store), (9, 1, 1, bytes));

        // Served from memory: damage on disk is not seen, the bytes handed
        // out are the ones hashed when the chunk was first read.
        corrupt(&store, &c, at(3) - c.offset + 10);
        h.read_at(at(3), &mut buf).unwrap();
        assert_eq!(buf, data[at(3) as usize..at(3) as usize + 4096]);
        assert_eq!(store.metrics().verify_failures.get(), 0);
        assert_eq!(counts(&store).0, 10);

        // Another chunk is another miss; a read spanning two chunks is one
        // lookup per chunk.
        let d = chunks[5];
        h.read_at(d.offset + 5, &mut buf).unwrap();
        assert_eq!(counts(&store).1, 2);
        let mut wide = vec![0u8; 8192];
        h.read_at(d.offset + u64::from(d.len) - 4096, &mut wide)
            .unwrap();
        let s = (d.offset + u64::from(d.len) - 4096) as usize;
        assert_eq!(wide, data[s..s + 8192]);
        let (hits, misses, _, _) = counts(&store);
        assert_eq!((hits, misses), (11, 3));
    }
}

/// A chunk that was never cached is still checked on disk: the read fails
/// as corrupt, the chunk is quarantined, cached neighbours keep working.
#[test]
fn corruption_of_an_uncached_chunk_is_detected() {
    for engine in engines() {
        let dir = tempfile::tempdir().unwrap();
        let data = random(2 << 20, 2);
        let (store, obj, chunks) = stored(dir.path(), &data, cfg(engine, 64 << 20));
        let (good, bad) = (chunks[1], chunks[4]);
        assert_eq!(
            read(&store, &obj, good.offset, 100),
            data[good.offset as usize..][..100]
        );
        corrupt(&store, &bad, 5000);
        let h = store.open_object(&obj).unwrap();
        let mut buf = vec![0u8; 4096];
        match h.read_at(bad.offset + 4096, &mut buf) {
            Err(StoreError::Corrupt { id, .. }) => assert_eq!(id, bad.id),
            other => panic!("expected Corrupt, got {other:?}"),
        }
        assert_eq!(store.metrics().verify_failures.get(), 1);
        assert!(matches!(
            h.read_at(bad.offset, &mut buf),
            Err(StoreError::ChunkMissing(id)) if id == bad.id
        ));
        h.read_at(good.offset + 7, &mut buf).unwrap();
        assert_eq!(buf, data[good.offset as usize + 7..][..4096]);
    }
}

/// A chunk that left the cache but whose outboard is still known is read
/// group-wise and verified; damage there is caught too. Repeated reads
/// bring it back into the cache within `PROMOTE_EVERY` (8) reads.
#[test]
fn evicted_chunks_are_verified_and_come_back() {
    for engine in engines() {
        let dir = tempfile::tempdir().unwrap();
        let data = random(4 << 20, 3);
        // Room for a few chunks only.
        let (store, obj, chunks) = stored(dir.path(), &data, cfg(engine, 512 << 10));
        let h = store.open_object(&obj).unwrap();
        let a = *chunks
            .iter()
            .find(|c| c.len > 3 * 4096 && c.len < 128 << 10)
            .unwrap();
        let mut buf = vec![0u8; 4096];
        h.read_at(a.offset, &mut buf).unwrap();
        assert_eq!(buf, data[a.offset as usize..][..4096]);
        // The cache keeps what it saw first unless newer chunks are read
        // again: read every other chunk twice in a row, twice over, so the
        // newcomers earn their place and push `a` out.
        let others: Vec<ChunkRef> = chunks.iter().filter(|c| c.id != a.id).copied().collect();
        let evict_a = |buf: &mut [u8]| {
            for _ in 0..2 {
                for c in &others {
                    for _ in 0..2 {
                        h.read_at(c.offset, buf).unwrap();
                        assert_eq!(buf, &data[c.offset as usize..][..4096]);
                    }
                }
            }
        };
        evict_a(&mut buf);
        let (hits, _, _, bytes) = counts(&store);
        assert!(bytes <= 512 << 10, "cache over budget: {bytes}");

        // Read `a` until it hits again: a miss first, then at most 8 misses
        // (the outboard is known, so each is a group-wise verified read or,
        // one in 8, a whole-chunk read that caches it).
        let mut tries = 0;
        while counts(&store).0 == hits {
            let off = a.offset + 4096 + (tries * 331) % 4096;
            h.read_at(off, &mut buf).unwrap();
            assert_eq!(buf, data[off as usize..][..4096], "try {tries}");
            tries += 1;
            assert!(tries <= 9, "not back in the cache after {tries} reads");
        }
        assert!(tries >= 2, "`a` was never pushed out of the cache");

        // Push it out again and damage it: the group-wise or whole read
        // catches it on the first read.
        evict_a(&mut buf);
        corrupt(&store, &a, 4096 + 10);
        match h.read_at(a.offset + 4096, &mut buf) {
            Err(StoreError::Corrupt { id, .. }) => assert_eq!(id, a.id),
            other => panic!("damage not caught: {other:?}"),
        }
    }
}

/// Quarantine drops the cache entry: after it the chunk reads as missing,
/// and once the data is put again the next read is a miss served from the
/// fresh disk copy, not the old entry.
#[test]
fn quarantined_chunk_is_not_served_from_cache() {
    for engine in engines() {
        let dir = tempfile::tempdir().unwrap();
        let data = random(2 << 20, 4);
        let (store, obj, chunks) = stored(dir.path(), &data, cfg(engine, 64 << 20));
        let c = chunks[3];
        assert_eq!(
            read(&store, &obj, c.offset, 4096),
            data[c.offset as usize..][..4096]
        );
        assert_eq!(
            read(&store, &obj, c.offset, 4096),
            data[c.offset as usize..][..4096]
        );
        let (hits, misses, _, bytes) = counts(&store);
        assert_eq!((hits, misses), (1, 1));
        assert!(bytes > 0);

        // fsck reads the disk, not the cache: it finds and quarantines it.
        corrupt(&store, &c, 123);
        let r = store.fsck(|_| {}).unwrap();
        assert_eq!(r.corrupt.len(), 1, "{r:?}");
        assert!(r.corrupt[0].contains(&c.id.to_string()));
        assert_eq!(counts(&store).3, 0, "cache entry not dropped");

        let h = store.open_object(&obj).unwrap();
        let mut buf = vec![0u8; 4096];
        assert!(matches!(
            h.read_at(c.offset, &mut buf),
            Err(StoreError::ChunkMissing(id)) if id == c.id
        ));
        assert_eq!(counts(&store).0, 1);

        store.put_bytes(&data, &PutOptions::default()).unwrap();
        h.read_at(c.offset, &mut buf).unwrap();
        assert_eq!(buf, data[c.offset as usize..][..4096]);
        let (hits, misses, _, _) = counts(&store);
        assert_eq!((hits, misses), (1, 2));
        h.read_at(c.offset + 1, &mut buf).unwrap();
        assert_eq!(counts(&store).0, 2);
    }
}

/// `chunk_cache_bytes = 0` (and `verify_reads = false`) turn the cache off:
/// reads still work and still verify, nothing is counted or held.
#[test]
fn disabled_cache_still_reads_and_verifies() {
    for engine in engines() {
        let dir = tempfile::tempdir().unwrap();
        let data = random(2 << 20, 5);
        let (store, obj, chunks) = stored(dir.path(), &data, cfg(engine, 0));
        let mut rng = rand::rngs::StdRng::seed_from_u64(50);
        let h = store.open_object(&obj).unwrap();
        let mut buf = vec![0u8; 4096];
        for _ in 0..200 {
            let off = rng.gen_range(0..data.len() as u64 - 4096);
            h.read_at(off, &mut buf).unwrap();
            assert_eq!(buf, data[off as usize..][..4096]);
        }
        let (hits, misses, disk, bytes) = counts(&store);
        assert_eq!((hits, misses, bytes), (0, 0, 0));
        assert!(disk >= 200);
        // Every read goes to disk, so damage to an already read chunk shows.
        let c = chunks[2];
        h.read_at(c.offset, &mut buf).unwrap();
        corrupt(&store, &c, 10);
        assert!(matches!(
            h.read_at(c.offset, &mut buf),
            Err(StoreError::Corrupt { id, .. }) if id == c.id
        ));
        drop((h, store));

        let no_verify = StoreConfig {
            verify_reads: false,
            ..cfg(engine, 64 << 20)
        };
        let dir = tempfile::tempdir().unwrap();
        let (store, obj, chunks) = stored(dir.path(), &data, no_verify);
        for off in [0, 1, 1, 3, 3].map(|i| chunks[i].offset) {
            assert_eq!(read(&store, &obj, off, 4096), data[off as usize..][..4096]);
        }
        assert_eq!(counts(&store), (0, 0, 5, 0));
    }
}

/// Compressed chunks are decompressed and verified once, then served from
/// the cache.
#[test]
fn compressed_chunks_are_cached_decompressed() {
    let dir = tempfile::tempdir().unwrap();
    let mut data = Vec::new();
    let mut i = 0u64;
    while data.len() < 3 << 20 {
        data.extend_from_slice(format!("line {i} of a compressible object\n").as_bytes());
        i += 1;
    }
    let c = StoreConfig {
        compress: true,
        ..cfg(EngineKind::Auto, 64 << 20)
    };
    let (store, obj, chunks) = stored(dir.path(), &data, c);
    let k = chunks[1];
    assert!(store.chunk_meta(&k.id).unwrap().unwrap().compressed);
    for d in [0u64, 5000, 9000] {
        let off = k.offset + d;
        assert_eq!(read(&store, &obj, off, 4096), data[off as usize..][..4096]);
    }
    let (hits, misses, disk, _) = counts(&store);
    assert_eq!((hits, misses, disk), (2, 1, 1));
}

/// GC gives the memory of collected chunks back.
#[test]
fn gc_drops_collected_chunks_from_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let data = random(2 << 20, 6);
    let (store, obj, chunks) = stored(dir.path(), &data, cfg(EngineKind::Auto, 64 << 20));
    for c in &chunks {
        assert_eq!(
            read(&store, &obj, c.offset, 64),
            data[c.offset as usize..][..64]
        );
    }
    assert!(counts(&store).3 >= data.len() as i64);
    store.remove(&obj.to_string()).unwrap();
    let r = store.gc().unwrap();
    assert_eq!(r.chunks_removed, chunks.len() as u64);
    assert_eq!(counts(&store).3, 0);
}

/// Two threads reading at random through one handle get the right bytes.
#[test]
fn concurrent_readers_get_the_right_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let data = random(3 << 20, 7);
    let (store, obj, _) = stored(dir.path(), &data, cfg(EngineKind::Auto, 1 << 20));
    let h = store.open_object(&obj).unwrap();
    std::thread::scope(|s| {
        for t in 0..2u64 {
            let (h, data) = (&h, &data);
            s.spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(t);
                let mut buf = vec![0u8; 4096];
                for _ in 0..3000 {
                    let off = rng.gen_range(0..data.len() as u64 - 4096);
                    h.read_at(off, &mut buf).unwrap();
                    assert_eq!(buf, data[off as usize..][..4096]);
                }
            });
        }
    });
    let (hits, misses, _, bytes) = counts(&store);
    assert_eq!(hits + misses, 6000 + count_crossing(&store, &obj));
    assert!(hits > 0 && bytes <= 1 << 20, "{hits} hits, {bytes} bytes");
}

/// Reads above that crossed a chunk boundary looked in the cache twice;
/// recomputed here with the same seeds.
fn count_crossing(store: &Store, obj: &ObjectId) -> u64 {
    let r = store.recipe(obj).unwrap();
    let len = r.total_len();
    let mut n = 0;
    for t in 0..2u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(t);
        for _ in 0..3000 {
            let off = rng.gen_range(0..len - 4096);
            let a = r.chunk_at(off).unwrap();
            let b = r.chunk_at(off + 4095).unwrap();
            n += (b - a) as u64;
        }
    }
    n
}
