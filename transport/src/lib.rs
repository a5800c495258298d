//! Cairn's peer transport: QUIC with mutual TLS, the `cairn/1` wire protocol
//! and verified multi-source chunk fetch.
//!
//! Not built yet: issue 2/8. The crate exists so the workspace has the shape
//! DESIGN.md draws; it depends on `chunkstore` for ids only.

pub use cairn_chunkstore::{ChunkId, ObjectId};
