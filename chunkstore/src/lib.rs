//! Cairn's content-addressed chunk store.
//!
//! Objects (blobs, images, volume snapshots) are cut into chunks, each
//! identified by its BLAKE3 hash and stored once. Payloads live in
//! append-only segment files; the index, recipes, names and pins live in
//! RocksDB. Every chunk read from disk is verified against its id.
//!
//! ```no_run
//! use cairn_chunkstore::{PutOptions, Store, StoreConfig};
//! # fn main() -> Result<(), cairn_chunkstore::StoreError> {
//! let store = Store::open("/tmp/cairn-data", StoreConfig::default())?;
//! let put = store.put_bytes(b"hello", &PutOptions::default())?;
//! let obj = store.open_object(&put.object)?;
//! let mut buf = [0u8; 5];
//! obj.read_at(0, &mut buf)?;
//! assert_eq!(&buf, b"hello");
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

pub mod chunker;
#[cfg(feature = "store")]
pub mod compress;
#[cfg(feature = "store")]
pub mod engine;
#[cfg(feature = "store")]
mod error;
#[cfg(feature = "store")]
mod gc;
mod id;
#[cfg(feature = "store")]
pub mod index;
#[cfg(feature = "store")]
mod ingest;
#[cfg(feature = "store")]
mod kv;
#[cfg(feature = "store")]
mod metrics;
#[cfg(feature = "store")]
mod names;
pub mod outboard;
pub mod recipe;
#[cfg(feature = "store")]
mod remote;
#[cfg(feature = "store")]
pub mod segment;
#[cfg(feature = "store")]
mod store;
mod verified;

pub use chunker::{Chunker, ChunkerConfig};
#[cfg(feature = "store")]
pub use compress::CompressProbe;
#[cfg(feature = "store")]
pub use engine::EngineKind;
#[cfg(feature = "store")]
pub use error::{Result, StoreError};
#[cfg(feature = "store")]
pub use gc::{FsckReport, GcReport, VerifyReport};
pub use id::{ChunkId, ObjectId, ParseIdError};
#[cfg(feature = "store")]
pub use ingest::{PutOptions, PutResult};
#[cfg(feature = "store")]
pub use kv::{MetaRecord, MAX_META_KEY, MAX_META_VALUE};
#[cfg(feature = "store")]
pub use metrics::StoreMetrics;
pub use recipe::{ChunkRef, Recipe};
#[cfg(feature = "store")]
pub use remote::PutChunksResult;
#[cfg(feature = "store")]
pub use store::{
    ObjectHandle, ObjectReader, ObjectStat, Store, StoreConfig, StoreSummary, StoredChunk,
};
#[cfg(feature = "store")]
pub use verified::FromZstdError;
pub use verified::{VerifiedChunk, VerifyError};
