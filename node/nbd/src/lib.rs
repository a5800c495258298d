//! NBD (Network Block Device) for Cairn: a sans-IO protocol core and a
//! generic async server.
//!
//! - [`proto`]: the server side of the protocol as a state machine fed bytes
//!   ([`proto::ServerProto`]) plus reply encoders. Fixed newstyle handshake;
//!   `NBD_OPT_EXPORT_NAME`, `INFO`, `GO`, `LIST`, `ABORT`,
//!   `STRUCTURED_REPLY`, `LIST_META_CONTEXT`/`SET_META_CONTEXT`
//!   (`base:allocation`); `STARTTLS` is refused with `NBD_REP_ERR_POLICY`.
//!   No I/O and no tokio: the fuzz target builds it alone
//!   (`default-features = false`).
//! - [`Export`] / [`ExportProvider`]: what is served.
//! - [`server`] (feature `server`, on by default): [`server::serve`] runs a
//!   TCP listener, one task per connection, pipelined requests answered
//!   concurrently within in-flight limits, everything stopping on a
//!   cancellation token; [`server::ServerStats`] counts what happened.
//!
//! The protocol document is
//! <https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>.

pub mod consts;
mod export;
pub mod proto;
#[cfg(feature = "server")]
pub mod server;

pub use export::{export_info, BoxFuture, Export, ExportError, ExportProvider, OpenError};
pub use proto::{Errno, Extent};
#[cfg(feature = "server")]
pub use server::{serve, serve_with_stats, ServerLimits, ServerStats, StatsSnapshot};
