//! What the server serves: the [`Export`] and [`ExportProvider`] traits.
//!
//! Both are object-safe (`Arc<dyn Export>`), with async methods returning
//! boxed futures ([`BoxFuture`]); an implementation writes
//! `Box::pin(async move { ... })`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;

use crate::proto::{Errno, ExportInfo, Extent};

/// A boxed, `Send` future borrowing from `'a`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A failed export operation: the errno the client sees, and a message for
/// the client (structured replies carry it) and the logs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{errno}: {message}")]
pub struct ExportError {
    /// The protocol errno sent back.
    pub errno: Errno,
    /// Human-readable detail (at most 4096 bytes are sent).
    pub message: String,
}

impl ExportError {
    /// An error with this errno and message.
    pub fn new(errno: Errno, message: impl Into<String>) -> Self {
        Self {
            errno,
            message: message.into(),
        }
    }

    /// `EIO`.
    pub fn io(message: impl Into<String>) -> Self {
        Self::new(Errno::Io, message)
    }

    /// `EINVAL`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(Errno::Inval, message)
    }

    /// `ENOSPC`.
    pub fn no_space(message: impl Into<String>) -> Self {
        Self::new(Errno::NoSpc, message)
    }

    /// `EPERM`, for a write to something read-only.
    pub fn read_only() -> Self {
        Self::new(Errno::Perm, "export is read-only")
    }

    /// `ESHUTDOWN`.
    pub fn shutdown() -> Self {
        Self::new(Errno::Shutdown, "server is shutting down")
    }
}

impl From<std::io::Error> for ExportError {
    /// Maps the OS error the way the protocol asks: `EDQUOT`/`EFBIG` become
    /// `ENOSPC`, permission errors `EPERM`; anything unknown is `EIO`.
    fn from(e: std::io::Error) -> Self {
        use std::io::ErrorKind;
        // Linux errno values (the finer ErrorKinds need Rust 1.83).
        let errno = match (e.raw_os_error(), e.kind()) {
            (Some(28 | 122 | 27), _) => Errno::NoSpc, // ENOSPC, EDQUOT, EFBIG
            (Some(30), _) | (_, ErrorKind::PermissionDenied) => Errno::Perm, // EROFS
            (_, ErrorKind::InvalidInput | ErrorKind::UnexpectedEof) => Errno::Inval,
            (_, ErrorKind::OutOfMemory) => Errno::NoMem,
            (_, ErrorKind::Unsupported) => Errno::NotSup,
            _ => Errno::Io,
        };
        Self::new(errno, e.to_string())
    }
}

/// One block device served over NBD.
///
/// The server has already checked every request against [`Export::size`],
/// [`Export::read_only`] and the request size limit before it calls a
/// method: ranges lie inside the export, and write-type methods are only
/// called on writable exports. Calls may run concurrently (the server
/// pipelines up to its in-flight limit per connection), so the
/// implementation does its own locking.
pub trait Export: Send + Sync {
    /// Size in bytes; fixed while a connection uses the export.
    fn size(&self) -> u64;

    /// Refuse writes, trims and write-zeroes (`EPERM`, checked by the
    /// server) and advertise `NBD_FLAG_READ_ONLY`.
    fn read_only(&self) -> bool;

    /// Advertise `NBD_FLAG_CAN_MULTI_CONN`: the export has no per-connection
    /// cache, so a flush or FUA on one connection covers writes from all.
    fn can_multi_conn(&self) -> bool {
        false
    }

    /// Description for `NBD_INFO_DESCRIPTION`.
    fn description(&self) -> Option<String> {
        None
    }

    /// Preferred I/O size for `NBD_INFO_BLOCK_SIZE` (rounded to a power of
    /// two of at least 512).
    fn preferred_block_size(&self) -> u32 {
        4096
    }

    /// Fill `buf` with the bytes at `offset`.
    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8])
        -> BoxFuture<'a, Result<(), ExportError>>;

    /// Write `data` at `offset`; with `fua`, persist it before returning.
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> BoxFuture<'_, Result<(), ExportError>> {
        let _ = (offset, data, fua);
        Box::pin(async { Err(ExportError::read_only()) })
    }

    /// Persist every write that has completed.
    fn flush(&self) -> BoxFuture<'_, Result<(), ExportError>> {
        Box::pin(async { Ok(()) })
    }

    /// Discard hint for `len` bytes at `offset` (the default ignores it,
    /// which the protocol allows).
    fn trim(&self, offset: u64, len: u32, fua: bool) -> BoxFuture<'_, Result<(), ExportError>> {
        let _ = (offset, len, fua);
        Box::pin(async { Ok(()) })
    }

    /// Make `len` bytes at `offset` read as zeroes; with `no_hole` they must
    /// stay allocated. The default writes zero buffers through
    /// [`Export::write`].
    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
        no_hole: bool,
    ) -> BoxFuture<'_, Result<(), ExportError>> {
        let _ = no_hole;
        Box::pin(async move {
            let mut done = 0u64;
            let len = u64::from(len);
            while done < len {
                let n = (len - done).min(ZEROES.len() as u64) as usize;
                let last = done + n as u64 == len;
                self.write(offset + done, Bytes::from_static(&ZEROES[..n]), fua && last)
                    .await?;
                done += n as u64;
            }
            Ok(())
        })
    }

    /// `base:allocation` status of `len` bytes at `offset`: consecutive
    /// extents from `offset` (the server drops empty ones, merges, and cuts
    /// them to the request). The default says "all data", which is always
    /// correct.
    fn block_status(
        &self,
        offset: u64,
        len: u32,
    ) -> BoxFuture<'_, Result<Vec<Extent>, ExportError>> {
        let _ = offset;
        Box::pin(async move { Ok(vec![Extent::data(len)]) })
    }

    /// Prefetch hint (`NBD_CMD_CACHE`): the client will soon read this
    /// range. The default does nothing.
    fn cache(&self, offset: u64, len: u32) -> BoxFuture<'_, Result<(), ExportError>> {
        let _ = (offset, len);
        Box::pin(async { Ok(()) })
    }
}

static ZEROES: [u8; 1 << 20] = [0; 1 << 20];

/// What the handshake tells a client about `export`.
pub fn export_info(export: &dyn Export) -> ExportInfo {
    ExportInfo {
        size: export.size(),
        read_only: export.read_only(),
        multi_conn: export.can_multi_conn(),
        preferred_block_size: export.preferred_block_size(),
        description: export.description(),
    }
}

/// Why an export cannot be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// No export by that name (`NBD_REP_ERR_UNKNOWN`).
    #[error("no such export")]
    Unknown,
    /// It exists but cannot be served now (`NBD_REP_ERR_UNKNOWN` with this
    /// message).
    #[error("export unavailable: {0}")]
    Unavailable(String),
    /// Not allowed (`NBD_REP_ERR_POLICY`).
    #[error("export not permitted: {0}")]
    Denied(String),
}

/// The set of exports a server offers, by name.
pub trait ExportProvider: Send + Sync {
    /// Export names for `NBD_OPT_LIST`.
    fn list(&self) -> Vec<String>;

    /// Open an export by name (the empty name is the default export, if
    /// any). Called for `NBD_OPT_INFO` as well as for `NBD_OPT_GO`, so it
    /// should be cheap or cached.
    fn open<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Arc<dyn Export>, OpenError>>;
}
