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
pub mod engine;
mod error;
mod gc;
mod id;
pub mod index;
mod ingest;
mod metrics;
pub mod outboard;
pub mod recipe;
pub mod segment;
mod store;

pub use chunker::{Chunker, ChunkerConfig};
pub use engine::EngineKind;
pub use error::{Result, StoreError};
pub use gc::{FsckReport, GcReport, VerifyReport};
pub use id::{ChunkId, ObjectId, ParseIdError};
pub use ingest::{PutOptions, PutResult};
pub use metrics::StoreMetrics;
pub use recipe::Recipe;
pub use store::{ObjectHandle, ObjectReader, ObjectStat, Store, StoreConfig, StoreSummary};
