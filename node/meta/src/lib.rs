//! Site metadata for Cairn, as a sans-IO core: no sockets, no disk, no
//! clocks of its own. Time comes in as arguments (milliseconds), bytes come in
//! and go out as frames, and the caller decides where they travel and what
//! is persisted.
//!
//! - [`hlc`]: hybrid logical clocks ([`hlc::Hlc`]) and the [`hlc::Version`]
//!   every record change carries (HLC timestamp plus origin id), with bounded
//!   accepted drift.
//! - [`record`]: the replicated map ([`record::Replica`]) of versioned
//!   entries with last-writer-wins merge by `(version, value)`, tombstones
//!   with a GC horizon, incrementally maintained bucket digests, and the typed
//!   payloads [`record::SiteRecord`] and [`record::InventoryEntry`] with a
//!   compact, versioned, length-limited encoding.
//! - [`sync`]: delta anti-entropy between two replicas: digests first, then
//!   only what differs, as sans-IO state machines ([`sync::Initiator`],
//!   [`sync::Responder`]) exchanging [`sync::Message`] frames.
//! - [`vivaldi`]: Vivaldi network coordinates with a height vector and the
//!   adaptive timestep of Dabek et al. (SIGCOMM 2004).
//! - [`liveness`]: per-site heartbeat tracking, up → suspect → down and back.
//!
//! Every decoder in this crate takes untrusted bytes and returns a typed
//! error ([`codec::DecodeError`]) instead of panicking; the `meta_decode`
//! fuzz target feeds them arbitrary input.

pub mod codec;
pub mod hlc;
pub mod liveness;
pub mod record;
pub mod sync;
pub mod vivaldi;

pub use codec::DecodeError;
pub use hlc::{Hlc, HlcError, Timestamp, Version};
pub use liveness::{Liveness, LivenessConfig, SiteState};
pub use record::{Entry, InventoryEntry, Key, MergeOutcome, Replica, SiteRecord};
pub use sync::{Initiator, Message, Responder, Step};
pub use vivaldi::{Coord, Vivaldi};
