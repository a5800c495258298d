//! Delta anti-entropy between two replicas: digests first, then only what
//! differs.
//!
//! One exchange, started by the initiator `I` against the responder `R`:
//!
//! ```text
//! I → R  Hello { clock, root }            R's root equals: R → I InSync (done)
//! R → I  Groups { clock, 32 digests }     I finds the groups that differ
//! I → R  Buckets { I's digests of every bucket in those groups }
//! R → I  Fingerprints { R's entry fingerprints in each bucket that differs }
//! I → R  Push { I's entries R lacks, fingerprints I wants }
//! R → I  Entries { the wanted entries }   (only if I wanted any)
//! ```
//!
//! After one exchange both sides hold the union of both replicas (merged
//! last-writer-wins) in every bucket that differed, unless a batch (the
//! fingerprint list, the pushed or the returned entries) hit
//! [`MAX_BATCH_BYTES`]; the rest then follows in the next exchange, so
//! every frame stays far below [`MAX_FRAME_LEN`] whatever the replica size.
//! An in-sync pair costs two small frames.
//!
//! Both sides are sans-IO state machines: [`Initiator`] and [`Responder`]
//! take decoded [`Message`]s and a read-only [`Replica`], and return a
//! [`Step`]: the message to send (if any), the entries the caller must merge
//! into its replica (and persist), and the peer's clock reading for the
//! caller's HLC. Frames are `[version u8][type u8][body length u32 LE][body]`
//! ([`Message::encode`], [`Message::decode`], [`frame_len`]); every length
//! and count in a body has a limit, checked before anything is allocated.

use std::sync::Arc;

use bytes::{BufMut, Bytes};
use thiserror::Error;

use crate::codec::{put_varint, DecodeError, Reader};
use crate::hlc::Timestamp;
use crate::record::{Entry, Replica, BUCKETS, BUCKETS_PER_GROUP, GROUPS};

/// Protocol version in every frame header.
pub const PROTOCOL_VERSION: u8 = 1;
/// Bytes of a frame header.
pub const FRAME_HEADER_LEN: usize = 6;
/// Largest frame body, in bytes.
pub const MAX_FRAME_LEN: usize = 16 << 20;
/// Budget of entry bytes one `Push` or `Entries` message carries; what does
/// not fit follows in the next exchange.
pub const MAX_BATCH_BYTES: usize = 4 << 20;
/// Most entries in one message.
pub const MAX_ENTRIES: usize = 1 << 20;
/// Most fingerprints listed for one bucket.
pub const MAX_FINGERPRINTS_PER_BUCKET: usize = 1 << 20;

const T_HELLO: u8 = 1;
const T_IN_SYNC: u8 = 2;
const T_GROUPS: u8 = 3;
const T_BUCKETS: u8 = 4;
const T_FINGERPRINTS: u8 = 5;
const T_PUSH: u8 = 6;
const T_ENTRIES: u8 = 7;

/// Fingerprints of the entries of one bucket.
pub type BucketFingerprints = (u16, Vec<u64>);

/// An anti-entropy protocol message.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// Initiator → responder: opens an exchange.
    Hello {
        /// The initiator's HLC reading.
        clock: Timestamp,
        /// The initiator's root digest.
        root: u128,
        /// Entries the initiator holds (informational).
        entries: u64,
    },
    /// Responder → initiator: the roots are equal; the exchange is over.
    InSync {
        /// The responder's HLC reading.
        clock: Timestamp,
    },
    /// Responder → initiator: the responder's group digests.
    Groups {
        /// The responder's HLC reading.
        clock: Timestamp,
        /// Exactly [`GROUPS`] digests.
        digests: Vec<u128>,
    },
    /// Initiator → responder: the initiator's digests of every bucket in the
    /// groups that differ, by strictly increasing bucket id.
    Buckets {
        /// `(bucket, digest)` pairs.
        digests: Vec<(u16, u128)>,
    },
    /// Responder → initiator: the responder's entry fingerprints in every
    /// bucket whose digest differs.
    Fingerprints {
        /// `(bucket, fingerprints)` by strictly increasing bucket id.
        buckets: Vec<BucketFingerprints>,
    },
    /// Initiator → responder: entries the responder lacks, and the
    /// fingerprints of the responder's entries the initiator wants.
    Push {
        /// Entries for the responder to merge.
        entries: Vec<Arc<Entry>>,
        /// Wanted fingerprints by strictly increasing bucket id.
        want: Vec<BucketFingerprints>,
    },
    /// Responder → initiator: the wanted entries.
    Entries {
        /// Entries for the initiator to merge.
        entries: Vec<Arc<Entry>>,
    },
}

/// A failed exchange.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SyncError {
    /// A message arrived that the state machine does not expect now.
    #[error("unexpected {got} message while {state}")]
    Unexpected {
        /// What the machine was waiting for.
        state: &'static str,
        /// The message type received.
        got: &'static str,
    },
    /// A message named a bucket that was not asked about or is out of range.
    #[error("message names bucket {0}, which is out of range or was not asked about")]
    BadBucket(u16),
    /// The message would not fit in a frame.
    #[error("frame body of {0} bytes exceeds the frame limit")]
    FrameTooLarge(usize),
}

impl Message {
    /// The message type's name (for errors and logs).
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "Hello",
            Message::InSync { .. } => "InSync",
            Message::Groups { .. } => "Groups",
            Message::Buckets { .. } => "Buckets",
            Message::Fingerprints { .. } => "Fingerprints",
            Message::Push { .. } => "Push",
            Message::Entries { .. } => "Entries",
        }
    }

    fn type_byte(&self) -> u8 {
        match self {
            Message::Hello { .. } => T_HELLO,
            Message::InSync { .. } => T_IN_SYNC,
            Message::Groups { .. } => T_GROUPS,
            Message::Buckets { .. } => T_BUCKETS,
            Message::Fingerprints { .. } => T_FINGERPRINTS,
            Message::Push { .. } => T_PUSH,
            Message::Entries { .. } => T_ENTRIES,
        }
    }

    /// Encodes the message as one frame (header and body).
    pub fn encode(&self) -> Result<Bytes, SyncError> {
        let mut body: Vec<u8> = Vec::with_capacity(FRAME_HEADER_LEN + 64);
        body.extend_from_slice(&[0u8; FRAME_HEADER_LEN]);
        match self {
            Message::Hello {
                clock,
                root,
                entries,
            } => {
                put_clock(&mut body, clock);
                body.put_u128_le(*root);
                put_varint(&mut body, *entries);
            }
            Message::InSync { clock } => put_clock(&mut body, clock),
            Message::Groups { clock, digests } => {
                put_clock(&mut body, clock);
                put_varint(&mut body, digests.len() as u64);
                for d in digests {
                    body.put_u128_le(*d);
                }
            }
            Message::Buckets { digests } => {
                put_varint(&mut body, digests.len() as u64);
                for (b, d) in digests {
                    body.put_u16_le(*b);
                    body.put_u128_le(*d);
                }
            }
            Message::Fingerprints { buckets } => put_fingerprints(&mut body, buckets),
            Message::Push { entries, want } => {
                put_entries(&mut body, entries);
                put_fingerprints(&mut body, want);
            }
            Message::Entries { entries } => put_entries(&mut body, entries),
        }
        let len = body.len() - FRAME_HEADER_LEN;
        if len > MAX_FRAME_LEN {
            return Err(SyncError::FrameTooLarge(len));
        }
        body[0] = PROTOCOL_VERSION;
        body[1] = self.type_byte();
        body[2..6].copy_from_slice(&(len as u32).to_le_bytes());
        Ok(Bytes::from(body))
    }

    /// Decodes one whole frame. Never panics; hostile input yields a
    /// [`DecodeError`]. Entry values share `frame`'s buffer.
    pub fn decode(frame: Bytes) -> Result<Message, DecodeError> {
        let mut r = Reader::new(frame);
        let version = r.u8("frame version")?;
        if version != PROTOCOL_VERSION {
            return Err(DecodeError::Version {
                what: "frame",
                version,
            });
        }
        let ty = r.u8("frame type")?;
        let len = u32::from_le_bytes(r.array("frame length")?) as usize;
        if len > MAX_FRAME_LEN {
            return Err(DecodeError::TooLong {
                what: "frame",
                len: len as u64,
                limit: MAX_FRAME_LEN as u64,
            });
        }
        if len != r.remaining() {
            return if len > r.remaining() {
                Err(DecodeError::Truncated { what: "frame body" })
            } else {
                Err(DecodeError::Trailing(r.remaining() - len))
            };
        }
        let msg = match ty {
            T_HELLO => Message::Hello {
                clock: read_clock(&mut r)?,
                root: r.u128_le("root digest")?,
                entries: r.varint("entry count")?,
            },
            T_IN_SYNC => Message::InSync {
                clock: read_clock(&mut r)?,
            },
            T_GROUPS => {
                let clock = read_clock(&mut r)?;
                let n = r.count("group digests", GROUPS, 16)?;
                if n != GROUPS {
                    return Err(DecodeError::Invalid {
                        what: "group digests",
                        why: "wrong number of groups",
                    });
                }
                let mut digests = Vec::with_capacity(n);
                for _ in 0..n {
                    digests.push(r.u128_le("group digest")?);
                }
                Message::Groups { clock, digests }
            }
            T_BUCKETS => {
                let n = r.count("bucket digests", BUCKETS, 18)?;
                let mut digests = Vec::with_capacity(n);
                let mut prev: Option<u16> = None;
                for _ in 0..n {
                    let b = read_bucket(&mut r, &mut prev)?;
                    digests.push((b, r.u128_le("bucket digest")?));
                }
                Message::Buckets { digests }
            }
            T_FINGERPRINTS => Message::Fingerprints {
                buckets: read_fingerprints(&mut r)?,
            },
            T_PUSH => Message::Push {
                entries: read_entries(&mut r)?,
                want: read_fingerprints(&mut r)?,
            },
            T_ENTRIES => Message::Entries {
                entries: read_entries(&mut r)?,
            },
            tag => {
                return Err(DecodeError::UnknownTag {
                    what: "message type",
                    tag,
                })
            }
        };
        r.finish()?;
        Ok(msg)
    }
}

/// The total length of the frame that starts with `header` (header
/// included), once at least [`FRAME_HEADER_LEN`] bytes are available:
/// `Ok(None)` if fewer are, an error for a bad version or an over-long
/// frame. For reading frames off a stream.
pub fn frame_len(header: &[u8]) -> Result<Option<usize>, DecodeError> {
    let Some(h) = header.get(..FRAME_HEADER_LEN) else {
        return Ok(None);
    };
    if h[0] != PROTOCOL_VERSION {
        return Err(DecodeError::Version {
            what: "frame",
            version: h[0],
        });
    }
    let len = u32::from_le_bytes([h[2], h[3], h[4], h[5]]) as usize;
    if len > MAX_FRAME_LEN {
        return Err(DecodeError::TooLong {
            what: "frame",
            len: len as u64,
            limit: MAX_FRAME_LEN as u64,
        });
    }
    Ok(Some(FRAME_HEADER_LEN + len))
}

fn put_clock(out: &mut Vec<u8>, t: &Timestamp) {
    put_varint(out, t.wall_ms);
    put_varint(out, u64::from(t.logical));
}

fn read_clock(r: &mut Reader) -> Result<Timestamp, DecodeError> {
    let wall_ms = r.varint("clock")?;
    let logical = u32::try_from(r.varint("clock logical")?).map_err(|_| DecodeError::Invalid {
        what: "clock logical",
        why: "above 2^32",
    })?;
    Ok(Timestamp { wall_ms, logical })
}

fn read_bucket(r: &mut Reader, prev: &mut Option<u16>) -> Result<u16, DecodeError> {
    let b = r.u16_le("bucket id")?;
    if usize::from(b) >= BUCKETS {
        return Err(DecodeError::Invalid {
            what: "bucket id",
            why: "out of range",
        });
    }
    if prev.is_some_and(|p| p >= b) {
        return Err(DecodeError::Invalid {
            what: "bucket id",
            why: "not strictly increasing",
        });
    }
    *prev = Some(b);
    Ok(b)
}

fn put_fingerprints(out: &mut Vec<u8>, buckets: &[BucketFingerprints]) {
    put_varint(out, buckets.len() as u64);
    for (b, fps) in buckets {
        out.put_u16_le(*b);
        put_varint(out, fps.len() as u64);
        for f in fps {
            out.put_u64_le(*f);
        }
    }
}

fn read_fingerprints(r: &mut Reader) -> Result<Vec<BucketFingerprints>, DecodeError> {
    let n = r.count("fingerprint buckets", BUCKETS, 3)?;
    let mut out = Vec::with_capacity(n);
    let mut prev = None;
    for _ in 0..n {
        let b = read_bucket(r, &mut prev)?;
        let m = r.count("fingerprints", MAX_FINGERPRINTS_PER_BUCKET, 8)?;
        let mut fps = Vec::with_capacity(m);
        for _ in 0..m {
            fps.push(r.u64_le("fingerprint")?);
        }
        out.push((b, fps));
    }
    Ok(out)
}

fn put_entries(out: &mut Vec<u8>, entries: &[Arc<Entry>]) {
    put_varint(out, entries.len() as u64);
    for e in entries {
        e.encode(out);
    }
}

/// The shortest possible encoded entry (tag, empty name, version, flag).
const MIN_ENTRY_LEN: usize = 13;

fn read_entries(r: &mut Reader) -> Result<Vec<Arc<Entry>>, DecodeError> {
    let n = r.count("entries", MAX_ENTRIES, MIN_ENTRY_LEN)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(Arc::new(Entry::read(r)?));
    }
    Ok(out)
}

/// What the caller does after feeding a message to a state machine.
#[derive(Debug, Default)]
pub struct Step {
    /// The message to send to the peer, if any.
    pub send: Option<Message>,
    /// Entries to merge into the local replica (and persist those that
    /// change it). Merge them before handling the next message.
    pub apply: Vec<Arc<Entry>>,
    /// The peer's HLC reading, for the local clock to observe.
    pub peer_clock: Option<Timestamp>,
    /// The exchange is over on this side.
    pub done: bool,
}

fn sorted_fingerprints(entries: &[Arc<Entry>]) -> Vec<u64> {
    let mut v: Vec<u64> = entries.iter().map(|e| e.fingerprint()).collect();
    v.sort_unstable();
    v
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IState {
    AwaitGroups,
    AwaitFingerprints,
    AwaitEntries,
    Done,
}

/// The initiating side of one exchange.
#[derive(Debug)]
pub struct Initiator {
    state: IState,
    asked: Vec<u16>,
}

impl Initiator {
    /// Starts an exchange: returns the machine and the `Hello` to send.
    /// `clock` is the local HLC reading.
    pub fn start(replica: &Replica, clock: Timestamp) -> (Initiator, Message) {
        (
            Initiator {
                state: IState::AwaitGroups,
                asked: Vec::new(),
            },
            Message::Hello {
                clock,
                root: replica.root_digest(),
                entries: replica.len() as u64,
            },
        )
    }

    /// Whether the exchange is over on this side.
    pub fn is_done(&self) -> bool {
        self.state == IState::Done
    }

    fn state_name(&self) -> &'static str {
        match self.state {
            IState::AwaitGroups => "awaiting Groups or InSync",
            IState::AwaitFingerprints => "awaiting Fingerprints",
            IState::AwaitEntries => "awaiting Entries",
            IState::Done => "done",
        }
    }

    /// Feeds one message from the responder. An error ends the exchange;
    /// nothing already merged is lost, and the next exchange resumes.
    pub fn handle(&mut self, replica: &Replica, msg: Message) -> Result<Step, SyncError> {
        let unexpected = SyncError::Unexpected {
            state: self.state_name(),
            got: msg.name(),
        };
        match (self.state, msg) {
            (IState::AwaitGroups, Message::InSync { clock }) => {
                self.state = IState::Done;
                Ok(Step {
                    peer_clock: Some(clock),
                    done: true,
                    ..Step::default()
                })
            }
            (IState::AwaitGroups, Message::Groups { clock, digests }) => {
                let mut out = Vec::new();
                for (g, theirs) in digests.iter().enumerate() {
                    if replica.group_digest(g) == Some(*theirs) {
                        continue;
                    }
                    for b in g * BUCKETS_PER_GROUP..(g + 1) * BUCKETS_PER_GROUP {
                        // b < BUCKETS <= u16::MAX + 1.
                        let id = b as u16;
                        self.asked.push(id);
                        out.push((id, replica.bucket_digest(b).unwrap_or(0)));
                    }
                }
                if out.is_empty() {
                    self.state = IState::Done;
                    return Ok(Step {
                        peer_clock: Some(clock),
                        done: true,
                        ..Step::default()
                    });
                }
                self.state = IState::AwaitFingerprints;
                Ok(Step {
                    send: Some(Message::Buckets { digests: out }),
                    peer_clock: Some(clock),
                    ..Step::default()
                })
            }
            (IState::AwaitFingerprints, Message::Fingerprints { buckets }) => {
                let mut push = Vec::new();
                let mut push_bytes = 0usize;
                let mut want = Vec::new();
                for (b, mut theirs) in buckets {
                    if self.asked.binary_search(&b).is_err() {
                        self.state = IState::Done;
                        return Err(SyncError::BadBucket(b));
                    }
                    theirs.sort_unstable();
                    let own = replica.bucket(usize::from(b));
                    let own_fps = sorted_fingerprints(own);
                    for e in own {
                        if theirs.binary_search(&e.fingerprint()).is_err()
                            && push_bytes < MAX_BATCH_BYTES
                        {
                            push_bytes += e.encoded_len();
                            push.push(Arc::clone(e));
                        }
                    }
                    let wanted: Vec<u64> = theirs
                        .into_iter()
                        .filter(|f| own_fps.binary_search(f).is_err())
                        .collect();
                    if !wanted.is_empty() {
                        want.push((b, wanted));
                    }
                }
                if push.is_empty() && want.is_empty() {
                    self.state = IState::Done;
                    return Ok(Step {
                        done: true,
                        ..Step::default()
                    });
                }
                let done = want.is_empty();
                self.state = if done {
                    IState::Done
                } else {
                    IState::AwaitEntries
                };
                Ok(Step {
                    send: Some(Message::Push {
                        entries: push,
                        want,
                    }),
                    done,
                    ..Step::default()
                })
            }
            (IState::AwaitEntries, Message::Entries { entries }) => {
                self.state = IState::Done;
                Ok(Step {
                    apply: entries,
                    done: true,
                    ..Step::default()
                })
            }
            _ => {
                self.state = IState::Done;
                Err(unexpected)
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RState {
    AwaitHello,
    AwaitBuckets,
    AwaitPush,
    Done,
}

/// The responding side of one exchange.
#[derive(Debug)]
pub struct Responder {
    state: RState,
}

impl Default for Responder {
    fn default() -> Self {
        Responder::new()
    }
}

impl Responder {
    /// A responder awaiting `Hello`.
    pub fn new() -> Self {
        Responder {
            state: RState::AwaitHello,
        }
    }

    /// Whether the exchange is over on this side (the initiator may also
    /// simply stop sending: then the exchange is over too).
    pub fn is_done(&self) -> bool {
        self.state == RState::Done
    }

    fn state_name(&self) -> &'static str {
        match self.state {
            RState::AwaitHello => "awaiting Hello",
            RState::AwaitBuckets => "awaiting Buckets",
            RState::AwaitPush => "awaiting Push",
            RState::Done => "done",
        }
    }

    /// Feeds one message from the initiator. `clock` is the local HLC
    /// reading, sent back in the first reply.
    pub fn handle(
        &mut self,
        replica: &Replica,
        clock: Timestamp,
        msg: Message,
    ) -> Result<Step, SyncError> {
        let unexpected = SyncError::Unexpected {
            state: self.state_name(),
            got: msg.name(),
        };
        match (self.state, msg) {
            (
                RState::AwaitHello,
                Message::Hello {
                    clock: peer, root, ..
                },
            ) => {
                let (send, done) = if root == replica.root_digest() {
                    (Message::InSync { clock }, true)
                } else {
                    (
                        Message::Groups {
                            clock,
                            digests: replica.group_digests().to_vec(),
                        },
                        false,
                    )
                };
                self.state = if done {
                    RState::Done
                } else {
                    RState::AwaitBuckets
                };
                Ok(Step {
                    send: Some(send),
                    peer_clock: Some(peer),
                    done,
                    ..Step::default()
                })
            }
            (RState::AwaitBuckets, Message::Buckets { digests }) => {
                let mut out = Vec::new();
                let mut bytes = 0usize;
                for (b, theirs) in digests {
                    let Some(own) = replica.bucket_digest(usize::from(b)) else {
                        self.state = RState::Done;
                        return Err(SyncError::BadBucket(b));
                    };
                    // Past the batch budget, the remaining buckets wait for
                    // the next exchange (their digests still differ).
                    if own != theirs && bytes < MAX_BATCH_BYTES {
                        let fps = sorted_fingerprints(replica.bucket(usize::from(b)));
                        bytes += 3 + 8 * fps.len();
                        out.push((b, fps));
                    }
                }
                let done = out.is_empty();
                self.state = if done {
                    RState::Done
                } else {
                    RState::AwaitPush
                };
                Ok(Step {
                    send: Some(Message::Fingerprints { buckets: out }),
                    done,
                    ..Step::default()
                })
            }
            (RState::AwaitPush, Message::Push { entries, want }) => {
                self.state = RState::Done;
                let send = if want.is_empty() {
                    None
                } else {
                    let mut out = Vec::new();
                    let mut bytes = 0usize;
                    'outer: for (b, mut fps) in want {
                        fps.sort_unstable();
                        for e in replica.bucket(usize::from(b)) {
                            if fps.binary_search(&e.fingerprint()).is_ok() {
                                if bytes >= MAX_BATCH_BYTES {
                                    break 'outer;
                                }
                                bytes += e.encoded_len();
                                out.push(Arc::clone(e));
                            }
                        }
                    }
                    Some(Message::Entries { entries: out })
                };
                Ok(Step {
                    send,
                    apply: entries,
                    done: true,
                    ..Step::default()
                })
            }
            _ => {
                self.state = RState::Done;
                Err(unexpected)
            }
        }
    }
}

/// Byte and message counts of one exchange.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExchangeStats {
    /// Frames sent by the initiator.
    pub initiator_frames: u64,
    /// Frames sent by the responder.
    pub responder_frames: u64,
    /// Frame bytes sent by the initiator.
    pub initiator_bytes: u64,
    /// Frame bytes sent by the responder.
    pub responder_bytes: u64,
    /// Entries the initiator merged.
    pub initiator_applied: u64,
    /// Entries the responder merged.
    pub responder_applied: u64,
    /// The responder's clock reading, as the initiator received it.
    pub clock_at_initiator: Option<Timestamp>,
    /// The initiator's clock reading, as the responder received it.
    pub clock_at_responder: Option<Timestamp>,
}

impl ExchangeStats {
    /// All frame bytes both ways.
    pub fn bytes(&self) -> u64 {
        self.initiator_bytes + self.responder_bytes
    }
}

/// Runs one whole exchange between two replicas in memory, through the real
/// encoders, decoders and state machines: for tests and simulations.
pub fn run_exchange(
    initiator: &mut Replica,
    responder: &mut Replica,
    initiator_clock: Timestamp,
    responder_clock: Timestamp,
) -> Result<ExchangeStats, ExchangeError> {
    run_exchange_with(
        initiator,
        responder,
        initiator_clock,
        responder_clock,
        |r, e| {
            r.merge_shared(e);
        },
    )
}

/// [`run_exchange`] with a custom merge: `merge(replica, entry)` is called
/// for every entry a side must apply (e.g. to intern shared entries or to
/// persist them).
pub fn run_exchange_with(
    initiator: &mut Replica,
    responder: &mut Replica,
    initiator_clock: Timestamp,
    responder_clock: Timestamp,
    mut merge: impl FnMut(&mut Replica, Arc<Entry>),
) -> Result<ExchangeStats, ExchangeError> {
    let mut stats = ExchangeStats::default();
    let (mut i, hello) = Initiator::start(initiator, initiator_clock);
    let mut r = Responder::new();
    let mut to_responder = Some(hello);
    while let Some(msg) = to_responder.take() {
        let frame = msg.encode()?;
        stats.initiator_frames += 1;
        stats.initiator_bytes += frame.len() as u64;
        let step = r.handle(responder, responder_clock, Message::decode(frame)?)?;
        stats.clock_at_responder = stats.clock_at_responder.or(step.peer_clock);
        stats.responder_applied += step.apply.len() as u64;
        for e in step.apply {
            merge(responder, e);
        }
        let Some(reply) = step.send else { break };
        let frame = reply.encode()?;
        stats.responder_frames += 1;
        stats.responder_bytes += frame.len() as u64;
        let step = i.handle(initiator, Message::decode(frame)?)?;
        stats.clock_at_initiator = stats.clock_at_initiator.or(step.peer_clock);
        stats.initiator_applied += step.apply.len() as u64;
        for e in step.apply {
            merge(initiator, e);
        }
        to_responder = step.send;
    }
    Ok(stats)
}

/// Why an in-memory exchange failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ExchangeError {
    /// A state machine refused a message.
    #[error(transparent)]
    Sync(#[from] SyncError),
    /// A frame did not decode.
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hlc::{Hlc, Version};
    use crate::record::Key;
    use proptest::prelude::*;

    fn clock() -> Timestamp {
        Timestamp::from_millis(1)
    }

    #[test]
    fn in_sync_costs_two_small_frames() {
        let mut a = Replica::new();
        let mut b = Replica::new();
        let s = run_exchange(&mut a, &mut b, clock(), clock()).unwrap();
        assert_eq!((s.initiator_frames, s.responder_frames), (1, 1));
        assert!(s.bytes() < 40, "{}", s.bytes());
    }

    #[test]
    fn one_exchange_syncs_both_ways() {
        let mut a = Replica::new();
        let mut b = Replica::new();
        let mut ca = Hlc::new(1, 1000);
        let mut cb = Hlc::new(2, 1000);
        for i in 0..500 {
            a.put(
                &mut ca,
                i,
                Key::Site(format!("a{i}")),
                Bytes::from_static(b"x"),
            )
            .unwrap();
            b.put(
                &mut cb,
                i,
                Key::Site(format!("b{i}")),
                Bytes::from_static(b"y"),
            )
            .unwrap();
        }
        let s = run_exchange(&mut a, &mut b, clock(), clock()).unwrap();
        assert_eq!(a.root_digest(), b.root_digest());
        assert_eq!(a.len(), 1000);
        assert_eq!((s.initiator_applied, s.responder_applied), (500, 500));
        let s = run_exchange(&mut b, &mut a, clock(), clock()).unwrap();
        assert_eq!(s.initiator_frames, 1);
    }

    #[test]
    fn batches_over_budget_finish_in_later_exchanges() {
        let mut a = Replica::new();
        let mut b = Replica::new();
        let mut c = Hlc::new(1, 1000);
        let value = Bytes::from(vec![7u8; 1024]);
        for i in 0..6000 {
            a.put(&mut c, i, Key::Site(format!("s{i}")), value.clone())
                .unwrap();
        }
        let first = run_exchange(&mut b, &mut a, clock(), clock()).unwrap();
        assert!(first.initiator_applied > 0 && (first.initiator_applied as usize) < 6000);
        let mut rounds = 1;
        while a.root_digest() != b.root_digest() {
            run_exchange(&mut b, &mut a, clock(), clock()).unwrap();
            rounds += 1;
            assert!(rounds < 5);
        }
        assert_eq!(b.len(), 6000);
    }

    #[test]
    fn out_of_order_messages_are_refused() {
        let a = Replica::new();
        let mut r = Responder::new();
        let err = r
            .handle(&a, clock(), Message::Entries { entries: vec![] })
            .unwrap_err();
        assert!(matches!(err, SyncError::Unexpected { .. }));
        let (mut i, _) = Initiator::start(&a, clock());
        assert!(i
            .handle(&a, Message::Fingerprints { buckets: vec![] })
            .is_err());
        assert!(i.is_done());
    }

    #[test]
    fn unasked_bucket_is_refused() {
        let mut a = Replica::new();
        let mut c = Hlc::new(1, 0);
        a.put(&mut c, 1, Key::Site("s".into()), Bytes::new())
            .unwrap();
        let (mut i, _) = Initiator::start(&a, clock());
        let step = i
            .handle(
                &a,
                Message::Groups {
                    clock: clock(),
                    digests: vec![0; GROUPS],
                },
            )
            .unwrap();
        let Some(Message::Buckets { digests }) = step.send else {
            panic!("expected Buckets");
        };
        let asked: Vec<u16> = digests.iter().map(|d| d.0).collect();
        let bad = (0..BUCKETS as u16).find(|b| !asked.contains(b)).unwrap();
        assert_eq!(
            i.handle(
                &a,
                Message::Fingerprints {
                    buckets: vec![(bad, vec![])]
                }
            )
            .unwrap_err(),
            SyncError::BadBucket(bad)
        );
    }

    fn sample_messages() -> Vec<Message> {
        let e = Entry::new(
            Key::Tag {
                repo: "r".into(),
                tag: "t".into(),
            },
            Version {
                ts: Timestamp::from_millis(9),
                origin: 3,
            },
            Some(Bytes::from_static(b"value")),
        )
        .unwrap();
        vec![
            Message::Hello {
                clock: clock(),
                root: 42,
                entries: 7,
            },
            Message::InSync { clock: clock() },
            Message::Groups {
                clock: clock(),
                digests: (0..GROUPS as u128).collect(),
            },
            Message::Buckets {
                digests: vec![(1, 5), (900, 6)],
            },
            Message::Fingerprints {
                buckets: vec![(3, vec![1, 2, 3]), (4, vec![])],
            },
            Message::Push {
                entries: vec![Arc::new(e.clone())],
                want: vec![(0, vec![9])],
            },
            Message::Entries {
                entries: vec![Arc::new(e.clone()), Arc::new(e)],
            },
        ]
    }

    #[test]
    fn frames_roundtrip_and_truncation_fails() {
        for m in sample_messages() {
            let f = m.encode().unwrap();
            assert_eq!(frame_len(&f).unwrap(), Some(f.len()));
            assert_eq!(Message::decode(f.clone()).unwrap(), m);
            for n in 0..f.len() {
                assert!(
                    Message::decode(f.slice(..n)).is_err(),
                    "{} at {n}",
                    m.name()
                );
            }
        }
        assert_eq!(frame_len(&[1, 2]).unwrap(), None);
        assert!(frame_len(&[1, 1, 0xff, 0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn unsorted_buckets_are_refused() {
        let m = Message::Buckets {
            digests: vec![(5, 1), (5, 2)],
        };
        assert!(Message::decode(m.encode().unwrap()).is_err());
        let m = Message::Buckets {
            digests: vec![(BUCKETS as u16, 1)],
        };
        assert!(Message::decode(m.encode().unwrap()).is_err());
    }

    proptest! {
        #[test]
        fn decode_never_panics(b in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Message::decode(Bytes::from(b.clone()));
            let _ = frame_len(&b);
        }

        /// Mutated valid frames decode to errors or to messages, never panic.
        #[test]
        fn mutated_frames_never_panic(which in 0..7usize, pos: proptest::sample::Index, byte: u8) {
            let f = sample_messages()[which].encode().unwrap().to_vec();
            let mut g = f.clone();
            let i = pos.index(g.len());
            g[i] = byte;
            let _ = Message::decode(Bytes::from(g));
        }

        /// Replicas with random concurrent writes, syncing only across the
        /// links a random partition leaves, converge once every pair may
        /// sync again; concurrent writes to the same keys resolve to one
        /// winner everywhere.
        #[test]
        fn replicas_converge_after_partitions(
            ops in proptest::collection::vec((0..4usize, 0..12u8, 0..3u8, any::<bool>()), 1..120),
            cuts in proptest::collection::vec(proptest::collection::vec(any::<bool>(), 4), 1..6),
            syncs in proptest::collection::vec((0..4usize, 0..4usize), 0..40),
        ) {
            let n = 4;
            let mut reps: Vec<Replica> = (0..n).map(|_| Replica::new()).collect();
            let mut clocks: Vec<Hlc> = (0..n as u64).map(|i| Hlc::new(i, 1_000_000)).collect();
            let mut wall = 1000u64;
            for (step, (site, key, val, del)) in ops.iter().enumerate() {
                wall += 1;
                let key = if key % 3 == 0 {
                    Key::Tag { repo: "r".into(), tag: format!("t{}", key % 4) }
                } else {
                    Key::Site(format!("s{key}"))
                };
                // Skewed clocks: site i runs i*7 ms ahead.
                let w = wall + *site as u64 * 7;
                if *del {
                    reps[*site].delete(&mut clocks[*site], w, key).unwrap();
                } else {
                    reps[*site].put(&mut clocks[*site], w, key, Bytes::from(vec![*val; 3])).unwrap();
                }
                // Partial syncs under the partition of this epoch.
                let cut = &cuts[step % cuts.len()];
                if let Some(&(a, b)) = syncs.get(step % syncs.len().max(1)) {
                    if a != b && cut[a] == cut[b] {
                        let (x, y) = pair(&mut reps, a, b);
                        run_exchange(x, y, clocks[a].now(w), clocks[b].now(w)).unwrap();
                    }
                }
            }
            // Heal: a ring of exchanges twice reaches everyone.
            for _ in 0..2 {
                for a in 0..n {
                    let b = (a + 1) % n;
                    let (x, y) = pair(&mut reps, a, b);
                    run_exchange(x, y, clock(), clock()).unwrap();
                }
            }
            for r in &reps[1..] {
                prop_assert_eq!(r.root_digest(), reps[0].root_digest());
                let xs: Vec<_> = r.iter().collect();
                let ys: Vec<_> = reps[0].iter().collect();
                prop_assert_eq!(xs, ys);
            }
        }
    }

    fn pair(v: &mut [Replica], a: usize, b: usize) -> (&mut Replica, &mut Replica) {
        if a < b {
            let (l, r) = v.split_at_mut(b);
            (&mut l[a], &mut r[0])
        } else {
            let (l, r) = v.split_at_mut(a);
            (&mut r[0], &mut l[b])
        }
    }
}
