//! Cairn's peer transport: QUIC with mutual TLS, the `cairn/1` wire protocol
//! and verified multi-source chunk fetch.
//!
//! - [`wire`]: the sans-IO frame codec (always built; fuzzed).
//! - With the default `net` feature: identity and TLS, the QUIC endpoint, the
//!   chunk server and the fetch client.
#![deny(missing_docs)]

pub mod wire;

#[cfg(feature = "net")]
pub mod endpoint;
#[cfg(feature = "net")]
pub mod fetch;
#[cfg(feature = "net")]
pub mod identity;
#[cfg(feature = "net")]
pub mod metrics;
#[cfg(feature = "net")]
pub mod server;
#[cfg(feature = "net")]
pub mod tls;

#[cfg(feature = "net")]
pub use endpoint::{Congestion, EndpointConfig};
#[cfg(feature = "net")]
pub use fetch::{FetchConfig, FetchError, FetchReport, Fetcher, PeerAddr};
#[cfg(feature = "net")]
pub use metrics::TransportMetrics;
#[cfg(feature = "net")]
pub use server::{ChunkSource, Server, ServerConfig, SourceError, SourceObject};

pub use cairn_chunkstore::{ChunkId, ObjectId};
