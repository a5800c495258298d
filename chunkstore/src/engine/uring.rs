//! The io_uring engine: one ring per calling thread, created lazily.
//!
//! Every call pushes its SQEs, submits, and reaps every completion it pushed
//! before returning, so a thread's ring is always empty between calls, and the
//! borrowed buffers in the SQEs outlive the kernel's use of them. That
//! invariant is what makes the `unsafe` pushes below sound; [`run_batch`] is
//! the one place that keeps it.
//!
//! Rings are per thread rather than shared so that no lock sits on the I/O
//! path and completions never have to be routed to another thread's waiter.
//!
//! Only batches of reads ([`IoEngine::read_many`]) use the ring. Single
//! reads, writes and `fdatasync` are plain syscalls: one synchronous
//! operation gains nothing from a ring, and buffered I/O on many
//! filesystems is punted to a kernel worker thread, a thread switch per
//! operation (measured in `UringEngine::write_all_at`'s notes).

use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::{opcode, squeue, types, IoUring};

use super::psync::PsyncEngine;
use super::{IoEngine, ReadOp};

/// Ring size chosen by [`UringEngine::probe`]: SQ entries, so also the most
/// reads [`IoEngine::read_many`] keeps in flight at once.
const DEFAULT_ENTRIES: u32 = 64;

/// The most Linux moves in one read or write (`MAX_RW_COUNT`). Longer
/// requests come back short anyway, and the SQE length field is a `u32`.
const MAX_RW: usize = 0x7fff_f000;

thread_local! {
    /// This thread's ring; `None` until first use, or after it broke.
    static RING: RefCell<Option<Ring>> = const { RefCell::new(None) };
}

#[cfg(test)]
thread_local! {
    /// Test hook: make ring creation fail on this thread.
    static FAIL_NEW_RING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// io_uring, one ring per calling thread.
///
/// Get one from [`UringEngine::probe`], which checks that the kernel (and any
/// seccomp policy) allows io_uring. If a later thread cannot create its ring,
/// that call quietly uses `pread`/`pwrite` instead.
#[derive(Debug)]
pub struct UringEngine {
    /// SQ size for the rings this engine creates.
    entries: u32,
}

impl UringEngine {
    /// Check that io_uring works here: create a ring, make sure the kernel
    /// has the opcodes we use, and round-trip one no-op. Returns the OS error
    /// when io_uring is refused (`ENOSYS`, `EPERM` from seccomp, ...), or
    /// `Unsupported` when the kernel is too old (before 5.6).
    pub fn probe() -> io::Result<Self> {
        let entries = DEFAULT_ENTRIES;
        let mut ring = Ring::new(entries)?;

        // Read, Write and the probe interface all arrived in 5.6; older
        // kernels fail `register_probe` with EINVAL.
        let mut probe = io_uring::Probe::new();
        ring.ring.submitter().register_probe(&mut probe)?;
        for (code, name) in [
            (opcode::Nop::CODE, "NOP"),
            (opcode::Read::CODE, "READ"),
            (opcode::Write::CODE, "WRITE"),
            (opcode::Fsync::CODE, "FSYNC"),
        ] {
            if !probe.is_supported(code) {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("io_uring has no IORING_OP_{name} on this kernel"),
                ));
            }
        }

        // Some seccomp policies allow io_uring_setup but refuse io_uring_enter.
        let mut res = None;
        // SAFETY: a no-op refers to no buffer or file.
        unsafe {
            run_batch(&mut ring, &[opcode::Nop::new().build()], |_, r| {
                res = Some(r)
            })
        }?;
        match res {
            Some(0) => Ok(Self { entries }),
            Some(r) if r < 0 => Err(io::Error::from_raw_os_error(-r)),
            other => Err(io::Error::other(format!(
                "io_uring no-op completed with {other:?}"
            ))),
        }
    }

    /// Run `f` on this thread's ring, creating the ring if needed. `None`
    /// means there is no ring to use on this thread right now (creation
    /// failed, or the thread is exiting), and the caller should fall back to
    /// psync.
    fn with_ring<R>(&self, f: impl FnOnce(&mut Ring) -> io::Result<R>) -> Option<io::Result<R>> {
        RING.try_with(|cell| {
            // Only a re-entrant call could find the ring borrowed; none of
            // ours are, but falling back is correct either way.
            let mut slot = cell.try_borrow_mut().ok()?;
            if slot.is_none() {
                match Ring::new(self.entries) {
                    Ok(ring) => *slot = Some(ring),
                    Err(err) => {
                        tracing::debug!(%err, "cannot create io_uring on this thread; using pread/pwrite");
                        return None;
                    }
                }
            }
            let ring = slot.as_mut()?;
            let res = f(ring);
            if ring.broken {
                *slot = None;
            }
            Some(res)
        })
        .ok()
        .flatten()
    }
}

impl IoEngine for UringEngine {
    fn name(&self) -> &'static str {
        "uring"
    }

    /// A plain `pread`, like writes (see [`Self::write_all_at`]): one
    /// synchronous read gains nothing from the ring, and buffered reads that
    /// cannot complete inline are punted to a kernel worker. The ring is for
    /// [`Self::read_many`], which keeps many reads in flight at once.
    fn read_exact_at(&self, file: &File, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        PsyncEngine.read_exact_at(file, offset, buf)
    }

    fn read_many(&self, ops: &mut [ReadOp<'_>]) -> io::Result<()> {
        if ops.iter().all(|op| op.buf.is_empty()) {
            return Ok(());
        }
        match self.with_ring(|ring| ring_read_many(ring, ops)) {
            Some(res) => res,
            None => PsyncEngine.read_many(ops),
        }
    }

    /// A plain `pwrite`. Every call here submits one operation and waits
    /// for it, so the ring could only add cost: buffered writes (and
    /// `fdatasync`) on filesystems without async buffered-write support
    /// (tmpfs, ext2/3, ...) are handed to an io-wq kernel worker, one thread
    /// switch per write. Fetching a 1 GiB object into a tmpfs store took
    /// 6.5-6.7 CPU-s/GB with ring reads and writes and 5.1-5.3 with plain
    /// syscalls (`--engine uring` vs `psync` of the transport bench, same
    /// machine, back to back).
    fn write_all_at(&self, file: &File, offset: u64, buf: &[u8]) -> io::Result<()> {
        PsyncEngine.write_all_at(file, offset, buf)
    }

    /// A plain `fdatasync`, for the reason given at [`Self::write_all_at`].
    fn sync_data(&self, file: &File) -> io::Result<()> {
        PsyncEngine.sync_data(file)
    }
}

/// A thread's ring, and whether it may be used again.
struct Ring {
    ring: IoUring,
    /// Set when `io_uring_enter` itself failed: SQEs may be stuck in the
    /// queue, so the ring is dropped rather than reused.
    broken: bool,
}

impl Ring {
    fn new(entries: u32) -> io::Result<Self> {
        #[cfg(test)]
        if FAIL_NEW_RING.with(|fail| fail.get()) {
            return Err(io::Error::from_raw_os_error(libc::ENOMEM));
        }
        Ok(Self {
            ring: IoUring::new(entries)?,
            broken: false,
        })
    }

    /// How many SQEs fit in one batch.
    fn capacity(&self) -> usize {
        // The CQ is twice the SQ by default, so a full batch of completions
        // always fits and never overflows.
        (self.ring.params().sq_entries() as usize).max(1)
    }
}

/// Push `entries`, submit them, and wait until every one of them has
/// completed, handing each completion's `(user_data, result)` to `on_cqe`.
///
/// This never returns while one of `entries` is still in flight in the kernel:
/// an interrupted or refused wait is retried, and if the ring fails outright
/// with operations in flight the process aborts, because returning (or
/// unwinding) would free buffers the kernel is still writing to.
///
/// # Safety
///
/// Every buffer and file descriptor an entry refers to must be valid until
/// this returns. `entries.len()` must not exceed [`Ring::capacity`].
unsafe fn run_batch(
    ring: &mut Ring,
    entries: &[squeue::Entry],
    mut on_cqe: impl FnMut(u64, i32),
) -> io::Result<()> {
    let expected = entries.len();
    debug_assert!(expected <= ring.capacity());
    // SAFETY: the caller keeps the entries' buffers and fds valid until we
    // return, and we return only after reaping all `expected` completions
    // (or with nothing in flight).
    if unsafe { ring.ring.submission().push_multiple(entries) }.is_err() {
        // Nothing was pushed: the queue is empty between calls, so this only
        // happens if `expected` exceeds its capacity.
        return Err(io::Error::other(
            "io_uring submission queue has no room for the batch",
        ));
    }

    let mut reaped = 0;
    loop {
        for cqe in ring.ring.completion() {
            on_cqe(cqe.user_data(), cqe.result());
            reaped += 1;
        }
        if reaped >= expected {
            debug_assert_eq!(reaped, expected, "stray io_uring completion");
            return Ok(());
        }
        // Also resubmits whatever the kernel did not take last time.
        match ring.ring.submit_and_wait(expected - reaped) {
            Ok(_) => {}
            // A signal cut the wait short: wait again.
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            // Transient shortage of kernel resources, or the CQ is
            // backlogged: let completions land and retry.
            Err(err) if matches!(err.raw_os_error(), Some(libc::EAGAIN | libc::EBUSY)) => {
                std::thread::yield_now();
            }
            Err(err) => {
                ring.broken = true;
                let unsubmitted = ring.ring.submission().len();
                let in_flight = expected - reaped - unsubmitted.min(expected - reaped);
                if in_flight == 0 {
                    // Unsubmitted SQEs die with the ring, which the caller
                    // drops because it is marked broken.
                    return Err(err);
                }
                tracing::error!(%err, in_flight, "io_uring_enter failed with reads or writes in flight");
                eprintln!(
                    "cairn: io_uring_enter failed ({err}) with {in_flight} operation(s) in flight; \
                     aborting rather than freeing buffers the kernel may still write"
                );
                std::process::abort();
            }
        }
    }
}

/// Refuse offsets `pread` would refuse. io_uring reads `u64::MAX` (-1) as
/// "use and advance the file position", which must never happen by accident.
fn check_offset(offset: u64) -> io::Result<()> {
    if offset > i64::MAX as u64 {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    Ok(())
}

/// The error for a completion's negative result.
fn cqe_error(res: i32) -> io::Error {
    io::Error::from_raw_os_error(-res)
}

fn ring_read_exact(
    ring: &mut Ring,
    fd: RawFd,
    mut offset: u64,
    mut buf: &mut [u8],
) -> io::Result<()> {
    while !buf.is_empty() {
        check_offset(offset)?;
        let len = buf.len().min(MAX_RW);
        let sqe = opcode::Read::new(types::Fd(fd), buf.as_mut_ptr(), len as u32)
            .offset(offset)
            .build();
        let mut res = 0;
        // SAFETY: `buf` is exclusively borrowed for this whole function and
        // `run_batch` waits for the read's completion before returning, so
        // the kernel writes only while the buffer is alive and unaliased.
        // `fd` belongs to a `File` our caller borrows for the same span.
        unsafe { run_batch(ring, &[sqe], |_, r| res = r) }?;
        match res {
            r if r == -libc::EINTR => {}
            r if r < 0 => return Err(cqe_error(r)),
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "failed to fill whole buffer",
                ))
            }
            n => {
                let n = (n as usize).min(len);
                buf = &mut std::mem::take(&mut buf)[n..];
                offset += n as u64;
            }
        }
    }
    Ok(())
}

/// Run `ops` in batches of up to the ring's capacity, every read of a batch in
/// flight at once, then finish short reads one by one.
fn ring_read_many(ring: &mut Ring, ops: &mut [ReadOp<'_>]) -> io::Result<()> {
    let cap = ring.capacity();
    let mut sqes = Vec::with_capacity(cap.min(ops.len()));
    let mut results = Vec::with_capacity(cap.min(ops.len()));
    for batch in ops.chunks_mut(cap) {
        // Validate the whole batch before pushing any of it.
        for op in batch.iter() {
            if !op.buf.is_empty() {
                check_offset(op.offset)?;
            }
        }
        sqes.clear();
        for (i, op) in batch.iter_mut().enumerate() {
            if op.buf.is_empty() {
                continue;
            }
            let len = op.buf.len().min(MAX_RW) as u32;
            let sqe = opcode::Read::new(types::Fd(op.file.as_raw_fd()), op.buf.as_mut_ptr(), len)
                .offset(op.offset)
                .build()
                .user_data(i as u64);
            sqes.push(sqe);
        }
        results.clear();
        results.resize(batch.len(), 0i32);
        // SAFETY: each entry points into a different `op.buf` (they are
        // `&mut`, so disjoint), and `batch` keeps all of them and their files
        // borrowed until this function returns. `run_batch` reaps every
        // completion of the batch before returning, even when some reads
        // fail, so no buffer is touched by the kernel after that.
        unsafe {
            run_batch(ring, &sqes, |user_data, res| {
                if let Some(slot) = results.get_mut(user_data as usize) {
                    *slot = res;
                }
            })
        }?;

        // Nothing is in flight now. Go through results in op order so the
        // error we return is that of the first failing op, as if the reads
        // had run one after another.
        for (op, &res) in batch.iter_mut().zip(&results) {
            if op.buf.is_empty() {
                continue;
            }
            let fd = op.file.as_raw_fd();
            match res {
                // Interrupted before transferring anything: redo it alone.
                r if r == -libc::EINTR => ring_read_exact(ring, fd, op.offset, op.buf)?,
                r if r < 0 => return Err(cqe_error(r)),
                0 => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "failed to fill whole buffer",
                    ))
                }
                n => {
                    let n = (n as usize).min(op.buf.len());
                    if n < op.buf.len() {
                        ring_read_exact(ring, fd, op.offset + n as u64, &mut op.buf[n..])?;
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::io::Write as _;

    /// The engine, or `None` (with a note) when io_uring is refused here.
    fn engine() -> Option<UringEngine> {
        match UringEngine::probe() {
            Ok(engine) => Some(engine),
            Err(err) => {
                eprintln!("note: io_uring refused ({err}); skipping this io_uring test");
                None
            }
        }
    }

    fn ring_exists() -> bool {
        RING.with(|cell| cell.borrow().is_some())
    }

    /// One read through the ring (a batch of one).
    fn ring_read(engine: &UringEngine, file: &File, offset: u64, buf: &mut [u8]) {
        let mut ops = [ReadOp { file, offset, buf }];
        engine.read_many(&mut ops).expect("read_many");
    }

    fn file_with(bytes: &[u8]) -> File {
        let mut file = tempfile::tempfile().expect("temp file");
        file.write_all(bytes).expect("fill temp file");
        file
    }

    #[test]
    fn name_is_uring() {
        if let Some(engine) = engine() {
            assert_eq!(engine.name(), "uring");
        }
    }

    #[test]
    fn probe_result_matches_what_a_ring_can_do() {
        // Whatever probe says, it must agree with trying it by hand.
        let by_hand = IoUring::new(8).is_ok();
        match UringEngine::probe() {
            Ok(_) => assert!(by_hand, "probe succeeded where a ring cannot be created"),
            Err(err) => eprintln!("note: probe refused io_uring: {err}"),
        }
    }

    #[test]
    fn ring_is_created_lazily_once_per_thread() {
        let Some(engine) = engine() else { return };
        std::thread::spawn(move || {
            assert!(!ring_exists(), "a new thread starts without a ring");
            let file = file_with(b"abcdef");
            let mut buf = [0u8; 3];
            engine.read_exact_at(&file, 2, &mut buf).expect("read");
            assert_eq!(&buf, b"cde");
            assert!(!ring_exists(), "single reads do not use the ring");
            ring_read(&engine, &file, 2, &mut buf);
            assert_eq!(&buf, b"cde");
            assert!(ring_exists(), "the first batch creates the ring");
            let fd_before = RING.with(|cell| cell.borrow().as_ref().map(|r| r.ring.as_raw_fd()));
            ring_read(&engine, &file, 0, &mut buf);
            assert_eq!(&buf, b"abc");
            let fd_after = RING.with(|cell| cell.borrow().as_ref().map(|r| r.ring.as_raw_fd()));
            assert_eq!(fd_before, fd_after, "later calls reuse the ring");
        })
        .join()
        .expect("thread");
    }

    #[test]
    fn falls_back_to_psync_when_a_thread_cannot_create_a_ring() {
        let Some(engine) = engine() else { return };
        std::thread::spawn(move || {
            FAIL_NEW_RING.with(|fail| fail.set(true));
            let file = tempfile::tempfile().expect("temp file");
            engine.write_all_at(&file, 1, b"xyz").expect("write");
            engine.sync_data(&file).expect("sync");
            let mut buf = [0u8; 4];
            engine.read_exact_at(&file, 0, &mut buf).expect("read");
            assert_eq!(&buf, b"\0xyz");
            let (mut a, mut b) = ([0u8; 2], [0u8; 1]);
            let mut ops = [
                ReadOp {
                    file: &file,
                    offset: 2,
                    buf: &mut a,
                },
                ReadOp {
                    file: &file,
                    offset: 1,
                    buf: &mut b,
                },
            ];
            engine.read_many(&mut ops).expect("read_many");
            assert_eq!((&a, &b), (b"yz", b"x"));
            let err = engine
                .read_exact_at(&file, 3, &mut buf)
                .expect_err("past EOF");
            assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
            assert!(!ring_exists(), "no ring was created, all calls used psync");

            // Once rings can be made again, the next batch gets one.
            FAIL_NEW_RING.with(|fail| fail.set(false));
            ring_read(&engine, &file, 0, &mut buf);
            assert_eq!(&buf, b"\0xyz");
            assert!(ring_exists());
        })
        .join()
        .expect("thread");
    }

    #[test]
    fn read_many_batches_beyond_ring_capacity() {
        let Some(engine) = engine() else { return };
        // 3 full batches and a partial one, each op reading its own index.
        let n = DEFAULT_ENTRIES as usize * 3 + 5;
        let data: Vec<u8> = (0..n * 4).map(|i| (i / 4) as u8).collect();
        let file = file_with(&data);
        let mut bufs = vec![[0u8; 4]; n];
        let mut ops: Vec<ReadOp<'_>> = bufs
            .iter_mut()
            .enumerate()
            .map(|(i, buf)| ReadOp {
                file: &file,
                offset: (i * 4) as u64,
                buf,
            })
            .collect();
        engine.read_many(&mut ops).expect("read_many");
        drop(ops);
        for (i, buf) in bufs.iter().enumerate() {
            assert_eq!(buf, &[i as u8; 4], "op {i}");
        }
    }

    #[test]
    fn read_many_error_leaves_the_ring_usable() {
        let Some(engine) = engine() else { return };
        std::thread::spawn(move || {
            let file = file_with(&[7u8; 64]);
            let (mut a, mut b, mut c) = ([0u8; 8], [0u8; 8], [0u8; 8]);
            let mut ops = [
                ReadOp {
                    file: &file,
                    offset: 0,
                    buf: &mut a,
                },
                ReadOp {
                    file: &file,
                    offset: 60,
                    buf: &mut b,
                },
                ReadOp {
                    file: &file,
                    offset: 8,
                    buf: &mut c,
                },
            ];
            let err = engine.read_many(&mut ops).expect_err("op 1 runs past EOF");
            assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
            assert_eq!(a, [7u8; 8], "ops before the failing one completed");
            // Every completion was reaped, so the same ring goes on working.
            let fd_before = RING.with(|cell| cell.borrow().as_ref().map(|r| r.ring.as_raw_fd()));
            let mut buf = [0u8; 4];
            engine.read_exact_at(&file, 60, &mut buf).expect("read");
            assert_eq!(buf, [7u8; 4]);
            let fd_after = RING.with(|cell| cell.borrow().as_ref().map(|r| r.ring.as_raw_fd()));
            assert_eq!(fd_before, fd_after);
        })
        .join()
        .expect("thread");
    }

    #[test]
    fn signals_during_the_wait_are_retried_not_returned() {
        // Regression guard for EINTR: a read that blocks (on a pipe) while
        // signals keep arriving must still complete with the data, not fail
        // with `Interrupted` or leave its SQE behind.
        let Some(engine) = engine() else { return };

        extern "C" fn ignore(_: libc::c_int) {}
        // SAFETY: installs a handler that does nothing (async-signal-safe),
        // without SA_RESTART so the signal interrupts io_uring_enter.
        // SIGUSR1 is not used elsewhere in this test binary.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = ignore as extern "C" fn(libc::c_int) as libc::sighandler_t;
            libc::sigemptyset(&mut action.sa_mask);
            assert_eq!(
                libc::sigaction(libc::SIGUSR1, &action, std::ptr::null_mut()),
                0
            );
        }

        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe(2) writes.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: pipe(2) just returned these descriptors, and nothing else owns them.
        let (reader, writer) = unsafe {
            use std::os::fd::FromRawFd;
            (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1]))
        };

        let blocked = std::thread::spawn(move || {
            let mut buf = [0u8; 5];
            let mut ops = [ReadOp {
                file: &reader,
                offset: 0,
                buf: &mut buf,
            }];
            engine.read_many(&mut ops).map(|()| buf)
        });
        use std::os::unix::thread::JoinHandleExt;
        let thread = blocked.as_pthread_t();
        for _ in 0..50 {
            // SAFETY: the thread is alive: it cannot finish before we write.
            assert_eq!(unsafe { libc::pthread_kill(thread, libc::SIGUSR1) }, 0);
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        (&writer).write_all(b"hello").expect("write to pipe");
        let got = blocked
            .join()
            .expect("thread")
            .expect("read despite signals");
        assert_eq!(&got, b"hello");
    }

    #[test]
    fn offset_minus_one_is_refused_not_read_at_file_position() {
        // io_uring treats offset -1 as "current position"; we must not.
        let Some(engine) = engine() else { return };
        let file = file_with(b"abc");
        let mut buf = [0u8; 1];
        let err = engine
            .read_exact_at(&file, u64::MAX, &mut buf)
            .expect_err("bad offset");
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
        let mut ops = [ReadOp {
            file: &file,
            offset: u64::MAX,
            buf: &mut buf,
        }];
        let err = engine.read_many(&mut ops).expect_err("bad offset");
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
        let err = engine
            .write_all_at(&file, u64::MAX, b"x")
            .expect_err("bad offset");
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
        assert_eq!(file.metadata().expect("metadata").len(), 3);
    }
}
