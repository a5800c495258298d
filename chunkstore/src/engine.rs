//! The I/O engine: how segment bytes reach and leave the disk.
//!
//! Two engines sit behind one trait, chosen at run time ([`EngineKind::Auto`]
//! tries io_uring first and falls back to positional syscalls when the kernel
//! or a seccomp policy refuses it):
//! - [`uring::UringEngine`]: one io_uring per calling thread, created lazily.
//! - [`psync::PsyncEngine`]: portable `pread`/`pwrite`/`fdatasync`.
//!
//! Every call is synchronous: it submits and waits for its own completion
//! before returning. That is why plain borrowed slices are sound here even for
//! io_uring: the kernel is done with the buffer before the borrow ends. Callers
//! on async runtimes run these from blocking threads.

use std::fs::File;
use std::io;
use std::sync::Arc;

pub mod psync;
pub mod uring;

/// Which engine to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// io_uring when the kernel allows it, otherwise psync.
    #[default]
    Auto,
    /// io_uring only; opening fails if it is refused.
    Uring,
    /// pread/pwrite only.
    Psync,
}

impl std::str::FromStr for EngineKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "uring" | "io_uring" | "io-uring" => Ok(Self::Uring),
            "psync" | "pread" => Ok(Self::Psync),
            other => Err(format!(
                "unknown I/O engine {other:?} (expected auto, uring or psync)"
            )),
        }
    }
}

/// One read in a batch: fill `buf` from `file` at `offset`.
#[derive(Debug)]
pub struct ReadOp<'a> {
    /// File to read from.
    pub file: &'a File,
    /// Byte offset in the file.
    pub offset: u64,
    /// Destination; the read fills it completely or fails.
    pub buf: &'a mut [u8],
}

/// Positional, synchronous file I/O.
pub trait IoEngine: Send + Sync + std::fmt::Debug {
    /// Short name for logs and metrics: `"uring"` or `"psync"`.
    fn name(&self) -> &'static str;

    /// Fill `buf` completely from `file` at `offset`. A short file is an
    /// `UnexpectedEof` error. Short reads from the kernel are retried.
    fn read_exact_at(&self, file: &File, offset: u64, buf: &mut [u8]) -> io::Result<()>;

    /// Run several reads, possibly in parallel inside the kernel. Each op
    /// behaves as [`IoEngine::read_exact_at`]; the first error is returned.
    fn read_many(&self, ops: &mut [ReadOp<'_>]) -> io::Result<()> {
        for op in ops.iter_mut() {
            self.read_exact_at(op.file, op.offset, op.buf)?;
        }
        Ok(())
    }

    /// Write all of `buf` to `file` at `offset`. Short writes are retried.
    fn write_all_at(&self, file: &File, offset: u64, buf: &[u8]) -> io::Result<()>;

    /// Make the file's data durable (`fdatasync`).
    fn sync_data(&self, file: &File) -> io::Result<()>;
}

/// Open the engine `kind` asks for. `Auto` probes io_uring with a no-op and
/// falls back to psync, logging why.
pub fn open_engine(kind: EngineKind) -> io::Result<Arc<dyn IoEngine>> {
    match kind {
        EngineKind::Psync => Ok(Arc::new(psync::PsyncEngine)),
        EngineKind::Uring => Ok(Arc::new(uring::UringEngine::probe()?)),
        EngineKind::Auto => match uring::UringEngine::probe() {
            Ok(e) => Ok(Arc::new(e)),
            Err(err) => {
                tracing::warn!(%err, "io_uring refused; falling back to pread/pwrite");
                Ok(Arc::new(psync::PsyncEngine))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    //! One body per scenario, run against every engine (as iroh-blobs and
    //! garage `db` do), so the engines cannot drift apart. io_uring is skipped
    //! with a note where the kernel refuses it, unless `CAIRN_REQUIRE_URING`
    //! is set (for CI machines where it must work).

    use super::*;

    use std::io::Write as _;
    use std::os::unix::fs::FileExt as _;

    use rand::rngs::StdRng;
    use rand::{Rng, RngCore, SeedableRng};

    use super::psync::PsyncEngine;
    use super::uring::UringEngine;

    /// A seeded RNG; the seed is printed, and `CAIRN_TEST_SEED` replays it.
    fn rng() -> StdRng {
        let seed = std::env::var("CAIRN_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(rand::random::<u64>);
        eprintln!("CAIRN_TEST_SEED={seed}");
        StdRng::seed_from_u64(seed)
    }

    fn random_bytes(rng: &mut StdRng, len: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; len];
        rng.fill_bytes(&mut bytes);
        bytes
    }

    fn file_with(bytes: &[u8]) -> File {
        let mut file = tempfile::tempfile().expect("temp file");
        file.write_all(bytes).expect("fill temp file");
        file
    }

    fn uring_engine() -> Option<UringEngine> {
        match UringEngine::probe() {
            Ok(engine) => Some(engine),
            Err(err) if std::env::var_os("CAIRN_REQUIRE_URING").is_some() => {
                panic!("io_uring refused but CAIRN_REQUIRE_URING is set: {err}")
            }
            Err(err) => {
                eprintln!("note: io_uring refused here ({err}); skipping the uring engine");
                None
            }
        }
    }

    fn write_then_read_at_random_offsets(engine: &dyn IoEngine) {
        const SIZE: usize = 256 * 1024;
        let mut rng = rng();
        let file = tempfile::tempfile().expect("temp file");
        let mut model = random_bytes(&mut rng, SIZE);
        engine
            .write_all_at(&file, 0, &model)
            .expect("initial write");

        for _ in 0..200 {
            let len = rng.gen_range(1..=8192);
            let offset = rng.gen_range(0..=SIZE - len);
            let bytes = random_bytes(&mut rng, len);
            engine
                .write_all_at(&file, offset as u64, &bytes)
                .expect("write");
            model[offset..offset + len].copy_from_slice(&bytes);
        }
        // A write past the end extends the file, leaving a hole of zeros.
        let tail = random_bytes(&mut rng, 1000);
        engine
            .write_all_at(&file, (SIZE + 24) as u64, &tail)
            .expect("write past end");
        model.extend_from_slice(&[0; 24]);
        model.extend_from_slice(&tail);
        assert_eq!(file.metadata().expect("metadata").len(), model.len() as u64);

        for _ in 0..200 {
            let len = rng.gen_range(1..=16384);
            let offset = rng.gen_range(0..=model.len() - len);
            let mut buf = vec![0u8; len];
            engine
                .read_exact_at(&file, offset as u64, &mut buf)
                .expect("read");
            assert!(
                buf == model[offset..offset + len],
                "bytes at {offset}+{len}"
            );
        }
        let mut all = vec![0u8; model.len()];
        engine.read_exact_at(&file, 0, &mut all).expect("read all");
        assert!(all == model, "whole file");
    }

    fn large_buffers(engine: &dyn IoEngine) {
        // Several MiB in one call, and an odd length.
        let mut rng = rng();
        let data = random_bytes(&mut rng, (5 << 20) + 3);
        let file = tempfile::tempfile().expect("temp file");
        engine.write_all_at(&file, 7, &data).expect("write");
        let mut back = vec![0u8; data.len()];
        engine.read_exact_at(&file, 7, &mut back).expect("read");
        assert!(back == data);
        // The bytes really are in the file, as another reader sees them.
        let mut seen = vec![0u8; data.len()];
        file.read_exact_at(&mut seen, 7).expect("pread");
        assert!(seen == data);
    }

    fn read_many_random_ops(engine: &dyn IoEngine) {
        let mut rng = rng();
        let small = random_bytes(&mut rng, 64 * 1024);
        let big = random_bytes(&mut rng, 1024 * 1024);
        let files = [(file_with(&small), &small), (file_with(&big), &big)];

        // Overlapping, unordered, some zero-length, across both files; 200
        // ops is more than one ring's worth, so batching is exercised too.
        let plan: Vec<(usize, usize, usize)> = (0..200)
            .map(|i| {
                let which = rng.gen_range(0..files.len());
                let data = files[which].1;
                let len = if i % 17 == 0 {
                    0
                } else {
                    rng.gen_range(1..=16384)
                };
                let offset = rng.gen_range(0..=data.len() - len);
                (which, offset, len)
            })
            .collect();
        let mut bufs: Vec<Vec<u8>> = plan.iter().map(|&(_, _, len)| vec![0xAA; len]).collect();
        let mut ops: Vec<ReadOp<'_>> = plan
            .iter()
            .zip(bufs.iter_mut())
            .map(|(&(which, offset, _), buf)| ReadOp {
                file: &files[which].0,
                offset: offset as u64,
                buf,
            })
            .collect();
        engine.read_many(&mut ops).expect("read_many");
        drop(ops);

        for (i, (&(which, offset, len), buf)) in plan.iter().zip(&bufs).enumerate() {
            let want = &files[which].1[offset..offset + len];
            assert!(buf[..] == *want, "op {i}: file {which} at {offset}+{len}");
        }
    }

    fn read_past_eof_is_unexpected_eof(engine: &dyn IoEngine) {
        let data: Vec<u8> = (0..100).collect();
        let file = file_with(&data);
        let eof = |res: io::Result<()>| {
            let err = res.expect_err("read past EOF must fail");
            assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
        };

        let mut buf = [0u8; 10];
        eof(engine.read_exact_at(&file, 95, &mut buf));
        eof(engine.read_exact_at(&file, 100, &mut buf[..1]));
        eof(engine.read_exact_at(&file, 1 << 40, &mut buf));

        // Up to the last byte is fine.
        let mut all = [0u8; 100];
        engine
            .read_exact_at(&file, 0, &mut all)
            .expect("read to EOF");
        assert_eq!(all[..], data[..]);
        engine
            .read_exact_at(&file, 90, &mut buf)
            .expect("read last 10");
        assert_eq!(buf[..], data[90..]);

        // In a batch, one op past EOF fails the whole call.
        let mut bufs = vec![[0u8; 10]; 150];
        let mut ops: Vec<ReadOp<'_>> = bufs
            .iter_mut()
            .enumerate()
            .map(|(i, buf)| ReadOp {
                file: &file,
                offset: if i == 120 { 95 } else { (i % 90) as u64 },
                buf,
            })
            .collect();
        eof(engine.read_many(&mut ops));
    }

    fn zero_length_buffers(engine: &dyn IoEngine) {
        let file = tempfile::tempfile().expect("temp file");
        engine.read_exact_at(&file, 0, &mut []).expect("empty read");
        engine
            .read_exact_at(&file, 1 << 40, &mut [])
            .expect("empty read far past EOF");
        engine
            .write_all_at(&file, 1 << 40, &[])
            .expect("empty write");
        assert_eq!(
            file.metadata().expect("metadata").len(),
            0,
            "an empty write does not extend the file"
        );
        engine.read_many(&mut []).expect("no ops");

        let other = file_with(b"0123456789");
        let (mut a, mut b, mut c) = ([0u8; 0], [0u8; 4], [0u8; 0]);
        let mut ops = [
            ReadOp {
                file: &file,
                offset: 1 << 40,
                buf: &mut a,
            },
            ReadOp {
                file: &other,
                offset: 3,
                buf: &mut b,
            },
            ReadOp {
                file: &other,
                offset: 99,
                buf: &mut c,
            },
        ];
        engine.read_many(&mut ops).expect("mixed empty ops");
        assert_eq!(&b, b"3456");

        let mut d = [0u8; 0];
        let mut only_empty = [ReadOp {
            file: &file,
            offset: 5,
            buf: &mut d,
        }];
        engine.read_many(&mut only_empty).expect("only empty ops");
    }

    fn sync_data_then_reopen(engine: &dyn IoEngine) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("segment");
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .expect("create");
        engine.write_all_at(&file, 0, b"durable ").expect("write");
        engine.write_all_at(&file, 8, b"bytes").expect("write");
        engine.sync_data(&file).expect("sync_data");
        engine
            .sync_data(&file)
            .expect("sync_data again, nothing dirty");
        drop(file);
        assert_eq!(std::fs::read(&path).expect("reopen"), b"durable bytes");
    }

    fn os_errors_come_back_as_errors(engine: &dyn IoEngine) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("f");
        std::fs::write(&path, [1u8; 32]).expect("create");
        let write_only = File::options().write(true).open(&path).expect("open wo");
        let read_only = File::open(&path).expect("open ro");

        let mut buf = [0u8; 8];
        let err = engine
            .read_exact_at(&write_only, 0, &mut buf)
            .expect_err("read from write-only");
        assert_eq!(err.raw_os_error(), Some(libc::EBADF), "{err}");
        let err = engine
            .write_all_at(&read_only, 0, b"x")
            .expect_err("write to read-only");
        assert_eq!(err.raw_os_error(), Some(libc::EBADF), "{err}");

        // An offset pread refuses (io_uring would read -1 as "file position").
        let err = engine
            .read_exact_at(&read_only, u64::MAX, &mut buf)
            .expect_err("offset past i64::MAX");
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{err}");

        // A failing op in the middle of a batch fails the call; its
        // neighbours are still read correctly.
        let (mut a, mut b, mut c) = ([0u8; 8], [0u8; 8], [0u8; 8]);
        let mut ops = [
            ReadOp {
                file: &read_only,
                offset: 0,
                buf: &mut a,
            },
            ReadOp {
                file: &write_only,
                offset: 0,
                buf: &mut b,
            },
            ReadOp {
                file: &read_only,
                offset: 8,
                buf: &mut c,
            },
        ];
        let err = engine.read_many(&mut ops).expect_err("bad op in batch");
        assert_eq!(err.raw_os_error(), Some(libc::EBADF), "{err}");
        assert_eq!(a, [1u8; 8]);

        // The engine is still fine afterwards.
        engine
            .read_exact_at(&read_only, 24, &mut buf)
            .expect("read");
        assert_eq!(buf, [1u8; 8]);
    }

    fn concurrent_threads(engine: &dyn IoEngine) {
        // Each thread owns a region of one shared file (and, for io_uring,
        // its own ring).
        const THREADS: usize = 4;
        const REGION: usize = 64 * 1024;
        let file = tempfile::tempfile().expect("temp file");
        std::thread::scope(|scope| {
            for t in 0..THREADS {
                let file = &file;
                scope.spawn(move || {
                    let base = (t * REGION) as u64;
                    let data: Vec<u8> = (0..REGION).map(|i| (i * 31 + t) as u8).collect();
                    for round in 0..20 {
                        let chunk = REGION / 4;
                        for (k, piece) in data.chunks(chunk).enumerate() {
                            engine
                                .write_all_at(file, base + (k * chunk) as u64, piece)
                                .expect("write");
                        }
                        let mut back = vec![vec![0u8; chunk]; 4];
                        let mut ops: Vec<ReadOp<'_>> = back
                            .iter_mut()
                            .enumerate()
                            .rev()
                            .map(|(k, buf)| ReadOp {
                                file,
                                offset: base + (k * chunk) as u64,
                                buf,
                            })
                            .collect();
                        engine.read_many(&mut ops).expect("read_many");
                        drop(ops);
                        assert!(back.concat() == data, "thread {t} round {round}");
                    }
                    engine.sync_data(file).expect("sync");
                });
            }
        });
    }

    /// Expand each scenario into one `#[test]` per engine.
    macro_rules! for_each_engine {
        ($($scenario:ident),* $(,)?) => {
            mod on_psync {
                $(
                    #[test]
                    fn $scenario() {
                        super::$scenario(&super::PsyncEngine);
                    }
                )*
            }
            mod on_uring {
                $(
                    #[test]
                    fn $scenario() {
                        if let Some(engine) = super::uring_engine() {
                            super::$scenario(&engine);
                        }
                    }
                )*
            }
        };
    }

    for_each_engine!(
        write_then_read_at_random_offsets,
        large_buffers,
        read_many_random_ops,
        read_past_eof_is_unexpected_eof,
        zero_length_buffers,
        sync_data_then_reopen,
        os_errors_come_back_as_errors,
        concurrent_threads,
    );

    #[test]
    fn open_engine_honours_the_kind() {
        assert_eq!(
            open_engine(EngineKind::Psync).expect("psync").name(),
            "psync"
        );
        let uring_works = UringEngine::probe().is_ok();
        match open_engine(EngineKind::Uring) {
            Ok(engine) => assert_eq!(engine.name(), "uring"),
            Err(err) => assert!(!uring_works, "probe works but Uring failed: {err}"),
        }
        let auto = open_engine(EngineKind::Auto).expect("auto never fails");
        assert_eq!(auto.name(), if uring_works { "uring" } else { "psync" });
    }

    #[test]
    fn engine_kind_parses() {
        for (s, kind) in [
            ("auto", EngineKind::Auto),
            ("uring", EngineKind::Uring),
            ("io_uring", EngineKind::Uring),
            ("psync", EngineKind::Psync),
        ] {
            assert_eq!(s.parse::<EngineKind>(), Ok(kind));
        }
        assert!("aio".parse::<EngineKind>().is_err());
    }
}
