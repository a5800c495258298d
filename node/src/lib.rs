//! The Cairn node daemon: configuration, lifecycle, and the wiring between the
//! chunk store, the transport and the front ends.
//!
//! Only the chunk store exists so far (issue 1/8); the daemon, the OCI
//! registry and NBD arrive with issues 3/8 and 4/8. Until then this crate
//! re-exports the store so the CLI depends on `node` alone, as ARCHITECTURE.md
//! draws it.

pub use cairn_chunkstore as chunkstore;
