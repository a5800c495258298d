//! The portable engine: positional `pread`/`pwrite` and `fdatasync`.
//!
//! It works everywhere, under every seccomp policy, and it is the fallback
//! when io_uring is refused. `read_many` keeps the trait's default (one
//! `pread` per op, in order).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use super::IoEngine;

/// Positional syscalls, one per request. Stateless, so it is free to copy.
#[derive(Debug, Clone, Copy, Default)]
pub struct PsyncEngine;

impl IoEngine for PsyncEngine {
    fn name(&self) -> &'static str {
        "psync"
    }

    fn read_exact_at(&self, file: &File, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        // std retries `EINTR` and short reads, and maps a read of 0 bytes
        // before the buffer is full to `UnexpectedEof`.
        file.read_exact_at(buf, offset)
    }

    fn write_all_at(&self, file: &File, offset: u64, buf: &[u8]) -> io::Result<()> {
        // std retries `EINTR` and short writes; a write of 0 bytes is `WriteZero`.
        file.write_all_at(buf, offset)
    }

    fn sync_data(&self, file: &File) -> io::Result<()> {
        file.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The shared scenarios in `engine::tests` cover behaviour; this checks the
    // bits that are psync's own.
    #[test]
    fn name_is_psync() {
        assert_eq!(PsyncEngine.name(), "psync");
    }

    #[test]
    fn write_then_read_back() {
        let file = tempfile::tempfile().expect("temp file");
        PsyncEngine.write_all_at(&file, 3, b"hello").expect("write");
        PsyncEngine.sync_data(&file).expect("sync");
        let mut buf = [0u8; 8];
        PsyncEngine.read_exact_at(&file, 0, &mut buf).expect("read");
        assert_eq!(&buf, b"\0\0\0hello");
    }
}
