//! The `cairn/1` wire protocol: frames and a sans-IO codec.
//!
//! One request per bidirectional QUIC stream. The client writes one request
//! frame and finishes its side; the server answers with a sequence of
//! response frames and finishes. Every frame is
//!
//! ```text
//! len u32 LE (bytes after this field) | version u8 | kind u8 | body
//! ```
//!
//! and every length has a limit, checked from the header before the body is
//! awaited, so a hostile peer cannot make us buffer more than
//! [`MAX_FRAME`] bytes per stream.
//!
//! The codec is sans-IO: [`encode_request`] and [`encode_response`] append a
//! frame to a buffer; [`decode_request`] and [`decode_response`] take one
//! complete frame off the front of a buffer, or return `Ok(None)` (buffer
//! untouched) when it does not hold a whole frame yet.
//!
//! # Body encoding
//!
//! Hand-written little-endian binary. Integers are fixed-size LE; an id
//! (`ChunkId`, `ObjectId`) is its 32 raw bytes; a `str` is `len u16` then
//! that many bytes of UTF-8 (at most [`MAX_STRING`]); a `bool` is a `u8`
//! 0 or 1; a [`Priority`] is a `u8` (0 demand, 1 background, 2 prefetch); an
//! [`ObjectKey`] is `tag u8` (0 id, 1 digest, 2 name) then an id or a `str`.
//! `rest` means "every remaining byte of the frame". Any other value, a body
//! that ends early or a body with bytes left over is
//! [`WireError::Malformed`]; a length or count over its limit is
//! [`WireError::TooLarge`].
//!
//! Requests and responses number their kinds separately; kind 0 is unused in
//! both, and a kind not listed for the direction is
//! [`WireError::UnknownKind`].
//!
//! Requests (client to server):
//!
//! | kind | frame | body |
//! |---|---|---|
//! | 1 | `Hello` | `node str \| site str \| version u16 \| n u16 \| n × capability str` (n ≤ [`MAX_CAPABILITIES`]) |
//! | 2 | `GetObject` | `priority u8 \| key` |
//! | 3 | `GetChunks` | `priority u8 \| accept_zstd bool \| n u16 \| n × id` (n in 1..=[`MAX_BATCH`]) |
//! | 4 | `Have` | `n u16 \| n × id` (n in 1..=[`MAX_BATCH`]) |
//! | 5 | `Ping` | `nonce u64` |
//! | 6 | `Offer` | `repo str \| tag str \| digest str \| version u64` |
//! | 7 | `MetaSync` | empty; the rest of the stream, both ways, is the site-metadata exchange in its own framing |
//!
//! Responses (server to client):
//!
//! | kind | frame | body |
//! |---|---|---|
//! | 1 | `Hello` | as the request |
//! | 2 | `ObjectHeader` | `id \| len u64 \| recipe_len u64 \| sha256 str` (empty or 64 lowercase hex) |
//! | 3 | `RecipePart` | `rest` (1..=[`MAX_RECIPE_PART`] bytes) |
//! | 4 | `Chunk` | `id \| raw_len u32 \| zstd bool \| payload rest` |
//! | 5 | `Missing` | `id` |
//! | 6 | `HaveBitmap` | `count u32 \| bits rest` (count ≤ [`MAX_BATCH`], bits exactly ⌈count/8⌉ bytes) |
//! | 7 | `Pong` | `nonce u64` |
//! | 8 | `End` | empty |
//! | 9 | `Error` | `code u16 \| message str` |
//! | 10 | `Offered` | `digest str \| version u64` |
//!
//! A `Chunk`'s `raw_len` is in 1..=[`MAX_CHUNK`]; a plain payload is exactly
//! `raw_len` bytes, a zstd payload at most [`MAX_ZSTD_PAYLOAD`] bytes. The
//! `RecipePart` and `Chunk` limits are checked from the frame header alone.
//!
//! Decoded `Chunk` payloads, `RecipePart`s and bitmaps share the receive
//! buffer's allocation (no copy).
//!
//! Encoding takes trusted local values: over-limit inputs trip a
//! `debug_assert!` and, in release builds, still produce a well-formed frame
//! that the peer rejects (strings are cut to [`MAX_STRING`] bytes at a
//! character boundary; an `Error` message is cut silently).

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::{ChunkId, ObjectId};

/// Protocol version carried in every frame header.
pub const PROTOCOL_VERSION: u8 = 1;
/// Bytes in a frame header: len u32 + version u8 + kind u8.
pub const HEADER_LEN: usize = 6;
/// Largest raw (uncompressed) chunk: the chunk store's maximum chunk size.
pub const MAX_CHUNK: usize = 256 * 1024;
/// Most ids in one `GetChunks` or `Have`.
pub const MAX_BATCH: usize = 1024;
/// Largest `RecipePart` payload.
pub const MAX_RECIPE_PART: usize = 1 << 20;
/// Longest string field (names, digests, node and site names, messages).
pub const MAX_STRING: usize = 1024;
/// Most capabilities in a `Hello`.
pub const MAX_CAPABILITIES: usize = 32;
/// Largest value of a frame's `len` field (any kind).
pub const MAX_FRAME: usize = 2 + MAX_RECIPE_PART + 64;
/// Largest zstd-compressed `Chunk` payload: at least zstd's compress bound
/// for a [`MAX_CHUNK`] input (`ZSTD_COMPRESSBOUND(MAX_CHUNK)` is
/// `MAX_CHUNK + MAX_CHUNK / 256`), with room to spare.
pub const MAX_ZSTD_PAYLOAD: usize = MAX_CHUNK + MAX_CHUNK / 128 + 1024;

/// How urgent a request is. Demand goes ahead of everything, on the wire too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    /// A client is waiting on these bytes.
    Demand = 0,
    /// Replication and staging.
    Background = 1,
    /// Speculative reads ahead of demand.
    Prefetch = 2,
}

impl Priority {
    /// The quinn stream priority for this class (higher is sent first).
    pub fn stream_priority(self) -> i32 {
        match self {
            Priority::Demand => 100,
            Priority::Background => 0,
            Priority::Prefetch => -100,
        }
    }
}

/// How a `GetObject` names its object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ObjectKey {
    /// By object id (BLAKE3 of the recipe).
    Id(ObjectId),
    /// By content digest, e.g. `sha256:<hex>`.
    Digest(String),
    /// By name, e.g. `library/alpine:3.20`.
    Name(String),
}

/// The first exchange on a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Node name (as in its certificate).
    pub node: String,
    /// Site name.
    pub site: String,
    /// Highest protocol version the sender speaks.
    pub version: u16,
    /// Optional features, e.g. `zstd`.
    pub capabilities: Vec<String>,
}

/// A request: the first and only frame the client sends on a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Introduce ourselves; answered by [`Response::Hello`].
    Hello(Hello),
    /// Ask for an object's recipe; answered by `ObjectHeader`, then
    /// `RecipePart`s, then `End` (or `Error` with [`ErrorCode::NotFound`]).
    GetObject {
        /// Which object.
        key: ObjectKey,
        /// How urgent.
        priority: Priority,
    },
    /// Ask for chunks; answered by one `Chunk` or `Missing` per id, in
    /// request order, then `End`.
    GetChunks {
        /// The chunks (1..=[`MAX_BATCH`]).
        ids: Vec<ChunkId>,
        /// How urgent.
        priority: Priority,
        /// The client accepts zstd-compressed payloads.
        accept_zstd: bool,
    },
    /// Which of these does the server hold? Answered by `HaveBitmap`.
    Have {
        /// The chunks (1..=[`MAX_BATCH`]).
        ids: Vec<ChunkId>,
    },
    /// Liveness and RTT probe; answered by `Pong` with the same nonce.
    Ping {
        /// Echoed back.
        nonce: u64,
    },
    /// Replication: "I hold manifest `digest` of `repo` (tagged `tag` at
    /// `version`, when `tag` is not empty); take it from me." The server
    /// pulls what it lacks from the sender over this same connection's
    /// peer, links it, and answers `Offered` with the state of the tag
    /// afterwards (the winner, when both sides changed it), or `Error`.
    Offer {
        /// Repository name.
        repo: String,
        /// Tag, or empty for an untagged manifest.
        tag: String,
        /// Manifest digest, e.g. `sha256:<hex>`.
        digest: String,
        /// The tag's version (a hybrid logical clock reading); 0 if untagged.
        version: u64,
    },
    /// Site metadata: after this frame the stream carries one anti-entropy
    /// exchange (the `cairn-meta` sync messages, in their own length-limited
    /// framing) in both directions. Servers without metadata answer `Error`.
    MetaSync,
}

/// Application error codes, in `Error` frames and QUIC stream resets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The peer sent a frame we could not decode.
    Malformed,
    /// A length over its limit.
    TooLarge,
    /// The object or name is not here.
    NotFound,
    /// A protocol version we do not speak.
    Version,
    /// The server is shutting down or overloaded.
    Busy,
    /// The server failed (I/O, corrupt store); try another peer.
    Internal,
    /// A code this build does not know.
    Other(u16),
}

impl ErrorCode {
    /// The numeric code on the wire.
    pub fn as_u16(self) -> u16 {
        match self {
            ErrorCode::Malformed => 1,
            ErrorCode::TooLarge => 2,
            ErrorCode::NotFound => 3,
            ErrorCode::Version => 4,
            ErrorCode::Busy => 5,
            ErrorCode::Internal => 6,
            ErrorCode::Other(c) => c,
        }
    }

    /// From the numeric code on the wire.
    pub fn from_u16(c: u16) -> Self {
        match c {
            1 => ErrorCode::Malformed,
            2 => ErrorCode::TooLarge,
            3 => ErrorCode::NotFound,
            4 => ErrorCode::Version,
            5 => ErrorCode::Busy,
            6 => ErrorCode::Internal,
            c => ErrorCode::Other(c),
        }
    }
}

/// A response frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// Answer to `Hello`.
    Hello(Hello),
    /// First frame of a `GetObject` answer.
    ObjectHeader {
        /// The object id; the receiver checks BLAKE3(recipe) == id.
        id: ObjectId,
        /// Object length in bytes.
        len: u64,
        /// Length of the canonical recipe encoding that follows in parts.
        recipe_len: u64,
        /// sha256 of the object bytes, hex (64 chars), or empty if unknown.
        sha256: String,
    },
    /// A piece of the recipe encoding (1..=[`MAX_RECIPE_PART`] bytes).
    RecipePart(Bytes),
    /// One chunk. `payload` is zstd-compressed when `zstd` is set; `raw_len`
    /// is the uncompressed length (1..=[`MAX_CHUNK`]).
    Chunk {
        /// The chunk's id; the receiver verifies BLAKE3(raw) == id.
        id: ChunkId,
        /// Uncompressed length.
        raw_len: u32,
        /// Payload is zstd.
        zstd: bool,
        /// The bytes as sent.
        payload: Bytes,
    },
    /// The server does not hold this chunk.
    Missing {
        /// Which one.
        id: ChunkId,
    },
    /// Answer to `Have`: bit `i` (LSB first in byte `i / 8`) is set when
    /// `ids[i]` is held.
    HaveBitmap {
        /// Number of ids answered (== request's).
        count: u32,
        /// ceil(count / 8) bytes.
        bits: Bytes,
    },
    /// Answer to `Ping`.
    Pong {
        /// The request's nonce.
        nonce: u64,
    },
    /// The answer is complete.
    End,
    /// Answer to `Offer`: the manifest the tag names at the receiver now,
    /// and its version (the offered digest and 0 when nothing was tagged).
    Offered {
        /// Manifest digest.
        digest: String,
        /// Version of the tag.
        version: u64,
    },
    /// The request failed; the stream ends after this frame.
    Error {
        /// What kind of failure.
        code: ErrorCode,
        /// Human-readable detail (≤ [`MAX_STRING`] bytes).
        message: String,
    },
}

/// A frame that cannot be decoded. The stream carrying it is closed with
/// [`WireError::code`]; the connection and the node carry on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// A length or count over its limit.
    #[error("{what} {len} is over the limit {max}")]
    TooLarge {
        /// Which length or count.
        what: &'static str,
        /// Its value.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A version we do not speak.
    #[error("unsupported protocol version {0}")]
    Version(u8),
    /// A kind byte we do not know (for this direction).
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// The body does not parse.
    #[error("malformed {kind} frame: {why}")]
    Malformed {
        /// Frame kind name.
        kind: &'static str,
        /// What is wrong.
        why: &'static str,
    },
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame ({0} bytes buffered)")]
    Truncated(usize),
}

impl WireError {
    /// The error code to reset the stream with.
    pub fn code(&self) -> ErrorCode {
        match self {
            WireError::TooLarge { .. } => ErrorCode::TooLarge,
            WireError::Version(_) => ErrorCode::Version,
            _ => ErrorCode::Malformed,
        }
    }
}

// Request kinds.
const REQ_HELLO: u8 = 1;
const REQ_GET_OBJECT: u8 = 2;
const REQ_GET_CHUNKS: u8 = 3;
const REQ_HAVE: u8 = 4;
const REQ_PING: u8 = 5;
const REQ_OFFER: u8 = 6;
const REQ_META_SYNC: u8 = 7;

// Response kinds.
const RESP_HELLO: u8 = 1;
const RESP_OBJECT_HEADER: u8 = 2;
const RESP_RECIPE_PART: u8 = 3;
const RESP_CHUNK: u8 = 4;
const RESP_MISSING: u8 = 5;
const RESP_HAVE_BITMAP: u8 = 6;
const RESP_PONG: u8 = 7;
const RESP_END: u8 = 8;
const RESP_ERROR: u8 = 9;
const RESP_OFFERED: u8 = 10;

// ObjectKey tags.
const KEY_ID: u8 = 0;
const KEY_DIGEST: u8 = 1;
const KEY_NAME: u8 = 2;

/// Bytes of the length field at the start of every frame.
const LEN_FIELD: usize = 4;
/// Bytes of a `Chunk` body before its payload: id, raw_len, zstd.
const CHUNK_HEAD: usize = 32 + 4 + 1;
/// Bytes of a `HaveBitmap` body before its bits: count.
const BITMAP_HEAD: usize = 4;
/// Length of a non-empty sha256 hex string.
const SHA256_HEX: usize = 64;

// The limits fit together: the zstd bound covers zstd's own compress bound
// (`ZSTD_COMPRESSBOUND(s)` is `s + s / 256` for inputs of 128 KiB and up),
// and the largest `Chunk` frame fits in a frame.
const _: () = {
    assert!(MAX_ZSTD_PAYLOAD >= MAX_CHUNK + MAX_CHUNK / 256);
    assert!(2 + CHUNK_HEAD + MAX_ZSTD_PAYLOAD <= MAX_FRAME);
    assert!(2 + MAX_RECIPE_PART <= MAX_FRAME);
    assert!(MAX_BATCH <= u16::MAX as usize && MAX_STRING <= u16::MAX as usize);
    assert!(MAX_CAPABILITIES <= u16::MAX as usize);
};

/// Append one request frame to `out`.
pub fn encode_request(req: &Request, out: &mut BytesMut) {
    match req {
        Request::Hello(h) => {
            let start = begin_frame(out, REQ_HELLO);
            put_hello(out, h);
            finish_frame(out, start);
        }
        Request::GetObject { key, priority } => {
            let start = begin_frame(out, REQ_GET_OBJECT);
            out.put_u8(*priority as u8);
            match key {
                ObjectKey::Id(id) => {
                    out.put_u8(KEY_ID);
                    out.put_slice(id.as_bytes());
                }
                ObjectKey::Digest(d) => {
                    out.put_u8(KEY_DIGEST);
                    put_str(out, d);
                }
                ObjectKey::Name(n) => {
                    out.put_u8(KEY_NAME);
                    put_str(out, n);
                }
            }
            finish_frame(out, start);
        }
        Request::GetChunks {
            ids,
            priority,
            accept_zstd,
        } => {
            let start = begin_frame(out, REQ_GET_CHUNKS);
            out.put_u8(*priority as u8);
            out.put_u8(u8::from(*accept_zstd));
            put_ids(out, ids);
            finish_frame(out, start);
        }
        Request::Have { ids } => {
            let start = begin_frame(out, REQ_HAVE);
            put_ids(out, ids);
            finish_frame(out, start);
        }
        Request::Ping { nonce } => {
            let start = begin_frame(out, REQ_PING);
            out.put_u64_le(*nonce);
            finish_frame(out, start);
        }
        Request::Offer {
            repo,
            tag,
            digest,
            version,
        } => {
            let start = begin_frame(out, REQ_OFFER);
            put_str(out, repo);
            put_str(out, tag);
            put_str(out, digest);
            out.put_u64_le(*version);
            finish_frame(out, start);
        }
        Request::MetaSync => {
            let start = begin_frame(out, REQ_META_SYNC);
            finish_frame(out, start);
        }
    }
}

/// Append one response frame to `out` (copies a chunk payload; see
/// [`chunk_frame_header`] for the zero-copy path).
pub fn encode_response(resp: &Response, out: &mut BytesMut) {
    match resp {
        Response::Hello(h) => {
            let start = begin_frame(out, RESP_HELLO);
            put_hello(out, h);
            finish_frame(out, start);
        }
        Response::ObjectHeader {
            id,
            len,
            recipe_len,
            sha256,
        } => {
            debug_assert!(
                valid_sha256(sha256),
                "sha256 must be empty or 64 lowercase hex"
            );
            let start = begin_frame(out, RESP_OBJECT_HEADER);
            out.put_slice(id.as_bytes());
            out.put_u64_le(*len);
            out.put_u64_le(*recipe_len);
            put_str(out, sha256);
            finish_frame(out, start);
        }
        Response::RecipePart(part) => {
            debug_assert!(
                (1..=MAX_RECIPE_PART).contains(&part.len()),
                "recipe part of {} bytes",
                part.len()
            );
            let start = begin_frame(out, RESP_RECIPE_PART);
            out.put_slice(part);
            finish_frame(out, start);
        }
        Response::Chunk {
            id,
            raw_len,
            zstd,
            payload,
        } => {
            out.reserve(LEN_FIELD + 2 + CHUNK_HEAD + payload.len());
            put_chunk_header(out, id, *raw_len, *zstd, payload.len());
            out.put_slice(payload);
        }
        Response::Missing { id } => {
            let start = begin_frame(out, RESP_MISSING);
            out.put_slice(id.as_bytes());
            finish_frame(out, start);
        }
        Response::HaveBitmap { count, bits } => {
            debug_assert!(*count as usize <= MAX_BATCH, "bitmap of {count} ids");
            debug_assert_eq!(bits.len(), bitmap_len(*count), "bitmap length");
            let start = begin_frame(out, RESP_HAVE_BITMAP);
            out.put_u32_le(*count);
            out.put_slice(bits);
            finish_frame(out, start);
        }
        Response::Pong { nonce } => {
            let start = begin_frame(out, RESP_PONG);
            out.put_u64_le(*nonce);
            finish_frame(out, start);
        }
        Response::End => {
            let start = begin_frame(out, RESP_END);
            finish_frame(out, start);
        }
        Response::Offered { digest, version } => {
            let start = begin_frame(out, RESP_OFFERED);
            put_str(out, digest);
            out.put_u64_le(*version);
            finish_frame(out, start);
        }
        Response::Error { code, message } => {
            let start = begin_frame(out, RESP_ERROR);
            out.put_u16_le(code.as_u16());
            // Messages are often formatted errors of any length: cut, do not assert.
            put_str_unchecked(out, message);
            finish_frame(out, start);
        }
    }
}

/// The bytes of a `Chunk` frame up to its payload, so a sender can write the
/// header and then the payload `Bytes` without copying it.
pub fn chunk_frame_header(id: &ChunkId, raw_len: u32, zstd: bool, payload_len: usize) -> Vec<u8> {
    let mut out = BytesMut::with_capacity(LEN_FIELD + 2 + CHUNK_HEAD);
    put_chunk_header(&mut out, id, raw_len, zstd, payload_len);
    out.to_vec()
}

/// Take one complete request frame off the front of `buf`. `Ok(None)` means
/// more bytes are needed; a header announcing an oversize frame is an error
/// at once, before its body arrives. Bodies are validated against every limit.
pub fn decode_request(buf: &mut BytesMut) -> Result<Option<Request>, WireError> {
    let Some((kind, body_len)) = peek_frame(buf, request_body_limit)? else {
        return Ok(None);
    };
    let frame_len = HEADER_LEN + body_len;
    let req = parse_request(kind, &buf[HEADER_LEN..frame_len])?;
    buf.advance(frame_len);
    Ok(Some(req))
}

/// Take one complete response frame off the front of `buf` (see
/// [`decode_request`]). A `Chunk` payload is split off `buf` without a copy.
pub fn decode_response(buf: &mut BytesMut) -> Result<Option<Response>, WireError> {
    let Some((kind, body_len)) = peek_frame(buf, response_body_limit)? else {
        return Ok(None);
    };
    let frame_len = HEADER_LEN + body_len;
    let body = &buf[HEADER_LEN..frame_len];
    let resp = match kind {
        RESP_RECIPE_PART => {
            if body.is_empty() {
                return Err(malformed("RecipePart", "empty part"));
            }
            buf.advance(HEADER_LEN);
            Response::RecipePart(buf.split_to(body_len).freeze())
        }
        RESP_CHUNK => {
            let (id, raw_len, zstd) = parse_chunk_head(body)?;
            buf.advance(HEADER_LEN + CHUNK_HEAD);
            let payload = buf.split_to(body_len - CHUNK_HEAD).freeze();
            Response::Chunk {
                id,
                raw_len,
                zstd,
                payload,
            }
        }
        RESP_HAVE_BITMAP => {
            let count = parse_bitmap_head(body)?;
            buf.advance(HEADER_LEN + BITMAP_HEAD);
            let bits = buf.split_to(body_len - BITMAP_HEAD).freeze();
            Response::HaveBitmap { count, bits }
        }
        _ => {
            let resp = parse_response(kind, body)?;
            buf.advance(frame_len);
            resp
        }
    };
    Ok(Some(resp))
}

// ---------------------------------------------------------------------------
// Encoding helpers.

/// Start a frame: a placeholder length, the version and the kind. Returns
/// where the frame starts, for [`finish_frame`].
fn begin_frame(out: &mut BytesMut, kind: u8) -> usize {
    let start = out.len();
    out.put_u32_le(0);
    out.put_u8(PROTOCOL_VERSION);
    out.put_u8(kind);
    start
}

/// Patch the length of the frame started at `start`.
fn finish_frame(out: &mut BytesMut, start: usize) {
    let len = out.len() - start - LEN_FIELD;
    debug_assert!(len <= MAX_FRAME, "frame of {len} bytes");
    let len = u32::try_from(len).unwrap_or(u32::MAX);
    out[start..start + LEN_FIELD].copy_from_slice(&len.to_le_bytes());
}

fn put_chunk_header(
    out: &mut BytesMut,
    id: &ChunkId,
    raw_len: u32,
    zstd: bool,
    payload_len: usize,
) {
    debug_assert!(
        (1..=MAX_CHUNK).contains(&(raw_len as usize)),
        "chunk raw_len {raw_len}"
    );
    debug_assert!(
        if zstd {
            payload_len <= MAX_ZSTD_PAYLOAD
        } else {
            payload_len == raw_len as usize
        },
        "chunk payload of {payload_len} bytes (raw_len {raw_len}, zstd {zstd})"
    );
    let len = (2 + CHUNK_HEAD).saturating_add(payload_len);
    out.put_u32_le(u32::try_from(len).unwrap_or(u32::MAX));
    out.put_u8(PROTOCOL_VERSION);
    out.put_u8(RESP_CHUNK);
    out.put_slice(id.as_bytes());
    out.put_u32_le(raw_len);
    out.put_u8(u8::from(zstd));
}

fn put_hello(out: &mut BytesMut, h: &Hello) {
    put_str(out, &h.node);
    put_str(out, &h.site);
    out.put_u16_le(h.version);
    debug_assert!(
        h.capabilities.len() <= MAX_CAPABILITIES,
        "{} capabilities",
        h.capabilities.len()
    );
    let caps = &h.capabilities[..h.capabilities.len().min(usize::from(u16::MAX))];
    out.put_u16_le(caps.len() as u16);
    for c in caps {
        put_str(out, c);
    }
}

fn put_ids(out: &mut BytesMut, ids: &[ChunkId]) {
    debug_assert!(
        (1..=MAX_BATCH).contains(&ids.len()),
        "batch of {} ids",
        ids.len()
    );
    let ids = &ids[..ids.len().min(usize::from(u16::MAX))];
    out.put_u16_le(ids.len() as u16);
    for id in ids {
        out.put_slice(id.as_bytes());
    }
}

fn put_str(out: &mut BytesMut, s: &str) {
    debug_assert!(s.len() <= MAX_STRING, "string of {} bytes", s.len());
    put_str_unchecked(out, s);
}

/// Write `s`, cut to [`MAX_STRING`] bytes at a character boundary.
fn put_str_unchecked(out: &mut BytesMut, s: &str) {
    let s = truncate_str(s, MAX_STRING);
    out.put_u16_le(s.len() as u16); // ≤ MAX_STRING < u16::MAX
    out.put_slice(s.as_bytes());
}

fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

// ---------------------------------------------------------------------------
// Decoding helpers.

fn malformed(kind: &'static str, why: &'static str) -> WireError {
    WireError::Malformed { kind, why }
}

/// Checks on a kind known from the header alone: its name, and the largest
/// body it may have when that is below the generic [`MAX_FRAME`].
type BodyLimit = fn(u8, usize) -> Result<(), WireError>;

fn request_body_limit(kind: u8, _body_len: usize) -> Result<(), WireError> {
    match kind {
        REQ_HELLO | REQ_GET_OBJECT | REQ_GET_CHUNKS | REQ_HAVE | REQ_PING | REQ_OFFER
        | REQ_META_SYNC => Ok(()),
        k => Err(WireError::UnknownKind(k)),
    }
}

fn response_body_limit(kind: u8, body_len: usize) -> Result<(), WireError> {
    match kind {
        RESP_RECIPE_PART if body_len > MAX_RECIPE_PART => Err(WireError::TooLarge {
            what: "recipe part length",
            len: body_len,
            max: MAX_RECIPE_PART,
        }),
        RESP_CHUNK if body_len > CHUNK_HEAD + MAX_ZSTD_PAYLOAD => Err(WireError::TooLarge {
            what: "chunk payload length",
            len: body_len - CHUNK_HEAD,
            max: MAX_ZSTD_PAYLOAD,
        }),
        RESP_HELLO | RESP_OBJECT_HEADER | RESP_RECIPE_PART | RESP_CHUNK | RESP_MISSING
        | RESP_HAVE_BITMAP | RESP_PONG | RESP_END | RESP_ERROR | RESP_OFFERED => Ok(()),
        k => Err(WireError::UnknownKind(k)),
    }
}

/// Check the header at the front of `buf` as far as it has arrived. Returns
/// the kind and body length once the whole frame is buffered, `Ok(None)`
/// before that.
fn peek_frame(buf: &[u8], body_limit: BodyLimit) -> Result<Option<(u8, usize)>, WireError> {
    let [l0, l1, l2, l3, rest @ ..] = buf else {
        return Ok(None);
    };
    let len = u32::from_le_bytes([*l0, *l1, *l2, *l3]);
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    if len > MAX_FRAME {
        return Err(WireError::TooLarge {
            what: "frame length",
            len,
            max: MAX_FRAME,
        });
    }
    if len < 2 {
        return Err(malformed("frame", "length shorter than version and kind"));
    }
    let Some(&version) = rest.first() else {
        return Ok(None);
    };
    if version != PROTOCOL_VERSION {
        return Err(WireError::Version(version));
    }
    let Some(&kind) = rest.get(1) else {
        return Ok(None);
    };
    let body_len = len - 2;
    body_limit(kind, body_len)?;
    if rest.len() < len {
        return Ok(None);
    }
    Ok(Some((kind, body_len)))
}

/// A cursor over one frame's body.
struct Reader<'a> {
    buf: &'a [u8],
    kind: &'static str,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], kind: &'static str) -> Self {
        Self { buf, kind }
    }

    fn malformed(&self, why: &'static str) -> WireError {
        malformed(self.kind, why)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(self.malformed("body ends inside a field"));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn chunk_id(&mut self) -> Result<ChunkId, WireError> {
        Ok(ChunkId::from_bytes(self.array()?))
    }

    fn object_id(&mut self) -> Result<ObjectId, WireError> {
        Ok(ObjectId::from_bytes(self.array()?))
    }

    fn bool(&mut self) -> Result<bool, WireError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(self.malformed("bool is not 0 or 1")),
        }
    }

    fn priority(&mut self) -> Result<Priority, WireError> {
        match self.u8()? {
            0 => Ok(Priority::Demand),
            1 => Ok(Priority::Background),
            2 => Ok(Priority::Prefetch),
            _ => Err(self.malformed("unknown priority")),
        }
    }

    fn string(&mut self) -> Result<String, WireError> {
        let len = usize::from(self.u16()?);
        if len > MAX_STRING {
            return Err(WireError::TooLarge {
                what: "string length",
                len,
                max: MAX_STRING,
            });
        }
        let bytes = self.take(len)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| self.malformed("string is not UTF-8"))
    }

    /// `n u16 | n × id`, n in 1..=MAX_BATCH.
    fn ids(&mut self) -> Result<Vec<ChunkId>, WireError> {
        let n = usize::from(self.u16()?);
        if n == 0 {
            return Err(self.malformed("empty id batch"));
        }
        if n > MAX_BATCH {
            return Err(WireError::TooLarge {
                what: "id count",
                len: n,
                max: MAX_BATCH,
            });
        }
        let bytes = self.take(n * ChunkId::LEN)?;
        let mut ids = Vec::with_capacity(n);
        for raw in bytes.chunks_exact(ChunkId::LEN) {
            let mut a = [0u8; 32];
            a.copy_from_slice(raw);
            ids.push(ChunkId::from_bytes(a));
        }
        Ok(ids)
    }

    fn hello(&mut self) -> Result<Hello, WireError> {
        let node = self.string()?;
        let site = self.string()?;
        let version = self.u16()?;
        let n = usize::from(self.u16()?);
        if n > MAX_CAPABILITIES {
            return Err(WireError::TooLarge {
                what: "capability count",
                len: n,
                max: MAX_CAPABILITIES,
            });
        }
        let mut capabilities = Vec::with_capacity(n);
        for _ in 0..n {
            capabilities.push(self.string()?);
        }
        Ok(Hello {
            node,
            site,
            version,
            capabilities,
        })
    }

    fn object_key(&mut self) -> Result<ObjectKey, WireError> {
        match self.u8()? {
            KEY_ID => Ok(ObjectKey::Id(self.object_id()?)),
            KEY_DIGEST => Ok(ObjectKey::Digest(self.string()?)),
            KEY_NAME => Ok(ObjectKey::Name(self.string()?)),
            _ => Err(self.malformed("unknown object key tag")),
        }
    }

    /// The body must be used up.
    fn finish(self) -> Result<(), WireError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(self.malformed("trailing bytes after the body"))
        }
    }
}

fn parse_request(kind: u8, body: &[u8]) -> Result<Request, WireError> {
    let req = match kind {
        REQ_HELLO => {
            let mut r = Reader::new(body, "Hello");
            let h = r.hello()?;
            r.finish()?;
            Request::Hello(h)
        }
        REQ_GET_OBJECT => {
            let mut r = Reader::new(body, "GetObject");
            let priority = r.priority()?;
            let key = r.object_key()?;
            r.finish()?;
            Request::GetObject { key, priority }
        }
        REQ_GET_CHUNKS => {
            let mut r = Reader::new(body, "GetChunks");
            let priority = r.priority()?;
            let accept_zstd = r.bool()?;
            let ids = r.ids()?;
            r.finish()?;
            Request::GetChunks {
                ids,
                priority,
                accept_zstd,
            }
        }
        REQ_HAVE => {
            let mut r = Reader::new(body, "Have");
            let ids = r.ids()?;
            r.finish()?;
            Request::Have { ids }
        }
        REQ_PING => {
            let mut r = Reader::new(body, "Ping");
            let nonce = r.u64()?;
            r.finish()?;
            Request::Ping { nonce }
        }
        REQ_OFFER => {
            let mut r = Reader::new(body, "Offer");
            let repo = r.string()?;
            let tag = r.string()?;
            let digest = r.string()?;
            let version = r.u64()?;
            r.finish()?;
            Request::Offer {
                repo,
                tag,
                digest,
                version,
            }
        }
        REQ_META_SYNC => {
            Reader::new(body, "MetaSync").finish()?;
            Request::MetaSync
        }
        k => return Err(WireError::UnknownKind(k)),
    };
    Ok(req)
}

/// Responses without a trailing `Bytes` field.
fn parse_response(kind: u8, body: &[u8]) -> Result<Response, WireError> {
    let resp = match kind {
        RESP_HELLO => {
            let mut r = Reader::new(body, "Hello");
            let h = r.hello()?;
            r.finish()?;
            Response::Hello(h)
        }
        RESP_OBJECT_HEADER => {
            let mut r = Reader::new(body, "ObjectHeader");
            let id = r.object_id()?;
            let len = r.u64()?;
            let recipe_len = r.u64()?;
            let sha256 = r.string()?;
            if !valid_sha256(&sha256) {
                return Err(r.malformed("sha256 is not empty or 64 lowercase hex"));
            }
            r.finish()?;
            Response::ObjectHeader {
                id,
                len,
                recipe_len,
                sha256,
            }
        }
        RESP_MISSING => {
            let mut r = Reader::new(body, "Missing");
            let id = r.chunk_id()?;
            r.finish()?;
            Response::Missing { id }
        }
        RESP_PONG => {
            let mut r = Reader::new(body, "Pong");
            let nonce = r.u64()?;
            r.finish()?;
            Response::Pong { nonce }
        }
        RESP_END => {
            Reader::new(body, "End").finish()?;
            Response::End
        }
        RESP_ERROR => {
            let mut r = Reader::new(body, "Error");
            let code = ErrorCode::from_u16(r.u16()?);
            let message = r.string()?;
            r.finish()?;
            Response::Error { code, message }
        }
        RESP_OFFERED => {
            let mut r = Reader::new(body, "Offered");
            let digest = r.string()?;
            let version = r.u64()?;
            r.finish()?;
            Response::Offered { digest, version }
        }
        k => return Err(WireError::UnknownKind(k)),
    };
    Ok(resp)
}

/// Validate a whole `Chunk` body; returns its fixed fields.
fn parse_chunk_head(body: &[u8]) -> Result<(ChunkId, u32, bool), WireError> {
    let mut r = Reader::new(body, "Chunk");
    let id = r.chunk_id()?;
    let raw_len = r.u32()?;
    let zstd = r.bool()?;
    let payload_len = r.buf.len();
    let raw = usize::try_from(raw_len).unwrap_or(usize::MAX);
    if raw == 0 {
        return Err(r.malformed("raw_len is 0"));
    }
    if raw > MAX_CHUNK {
        return Err(WireError::TooLarge {
            what: "chunk raw_len",
            len: raw,
            max: MAX_CHUNK,
        });
    }
    let max = if zstd { MAX_ZSTD_PAYLOAD } else { MAX_CHUNK };
    if payload_len > max {
        return Err(WireError::TooLarge {
            what: "chunk payload length",
            len: payload_len,
            max,
        });
    }
    if !zstd && payload_len != raw {
        return Err(r.malformed("uncompressed payload length differs from raw_len"));
    }
    Ok((id, raw_len, zstd))
}

/// Validate a whole `HaveBitmap` body; returns its count.
fn parse_bitmap_head(body: &[u8]) -> Result<u32, WireError> {
    let mut r = Reader::new(body, "HaveBitmap");
    let count = r.u32()?;
    let n = usize::try_from(count).unwrap_or(usize::MAX);
    if n > MAX_BATCH {
        return Err(WireError::TooLarge {
            what: "bitmap count",
            len: n,
            max: MAX_BATCH,
        });
    }
    if r.buf.len() != bitmap_len(count) {
        return Err(r.malformed("bitmap length is not ceil(count / 8)"));
    }
    Ok(count)
}

/// Bytes in a bitmap of `count` bits.
fn bitmap_len(count: u32) -> usize {
    usize::try_from(count.div_ceil(8)).unwrap_or(usize::MAX)
}

fn valid_sha256(s: &str) -> bool {
    s.is_empty()
        || (s.len() == SHA256_HEX && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;

    // -- strategies ---------------------------------------------------------

    fn arb_bytes32() -> impl Strategy<Value = [u8; 32]> {
        any::<[u8; 32]>()
    }

    fn arb_chunk_id() -> impl Strategy<Value = ChunkId> {
        arb_bytes32().prop_map(ChunkId::from_bytes)
    }

    fn arb_object_id() -> impl Strategy<Value = ObjectId> {
        arb_bytes32().prop_map(ObjectId::from_bytes)
    }

    /// Short names, or any Unicode up to exactly `MAX_STRING` bytes.
    fn arb_string() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z0-9:/._-]{0,40}",
            vec(any::<char>(), 0..=MAX_STRING / 4).prop_map(|cs| cs.into_iter().collect()),
        ]
    }

    fn arb_priority() -> impl Strategy<Value = Priority> {
        prop_oneof![
            Just(Priority::Demand),
            Just(Priority::Background),
            Just(Priority::Prefetch),
        ]
    }

    fn arb_hello() -> impl Strategy<Value = Hello> {
        (
            arb_string(),
            arb_string(),
            any::<u16>(),
            vec(arb_string(), 0..=MAX_CAPABILITIES),
        )
            .prop_map(|(node, site, version, capabilities)| Hello {
                node,
                site,
                version,
                capabilities,
            })
    }

    fn arb_key() -> impl Strategy<Value = ObjectKey> {
        prop_oneof![
            arb_object_id().prop_map(ObjectKey::Id),
            arb_string().prop_map(ObjectKey::Digest),
            arb_string().prop_map(ObjectKey::Name),
        ]
    }

    fn arb_request() -> impl Strategy<Value = Request> {
        prop_oneof![
            arb_hello().prop_map(Request::Hello),
            (arb_key(), arb_priority())
                .prop_map(|(key, priority)| Request::GetObject { key, priority }),
            (
                vec(arb_chunk_id(), 1..=MAX_BATCH),
                arb_priority(),
                any::<bool>()
            )
                .prop_map(|(ids, priority, accept_zstd)| Request::GetChunks {
                    ids,
                    priority,
                    accept_zstd,
                }),
            vec(arb_chunk_id(), 1..=MAX_BATCH).prop_map(|ids| Request::Have { ids }),
            any::<u64>().prop_map(|nonce| Request::Ping { nonce }),
            Just(Request::MetaSync),
            (arb_string(), arb_string(), arb_string(), any::<u64>()).prop_map(
                |(repo, tag, digest, version)| Request::Offer {
                    repo,
                    tag,
                    digest,
                    version,
                }
            ),
        ]
    }

    fn arb_sha256() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(String::new()),
            arb_object_id().prop_map(|id| id.to_hex()),
        ]
    }

    fn arb_chunk() -> impl Strategy<Value = Response> {
        prop_oneof![
            // Plain: the payload is the raw bytes.
            (arb_chunk_id(), vec(any::<u8>(), 1..=4096)).prop_map(|(id, raw)| Response::Chunk {
                id,
                raw_len: raw.len() as u32,
                zstd: false,
                payload: Bytes::from(raw),
            }),
            // zstd: any raw length, any payload within the bound.
            (
                arb_chunk_id(),
                1..=MAX_CHUNK as u32,
                vec(any::<u8>(), 0..=4096)
            )
                .prop_map(|(id, raw_len, payload)| Response::Chunk {
                    id,
                    raw_len,
                    zstd: true,
                    payload: Bytes::from(payload),
                }),
        ]
    }

    fn arb_bitmap() -> impl Strategy<Value = Response> {
        (0..=MAX_BATCH as u32).prop_flat_map(|count| {
            vec(any::<u8>(), bitmap_len(count)).prop_map(move |bits| Response::HaveBitmap {
                count,
                bits: Bytes::from(bits),
            })
        })
    }

    fn arb_response() -> impl Strategy<Value = Response> {
        prop_oneof![
            arb_hello().prop_map(Response::Hello),
            (arb_object_id(), any::<u64>(), any::<u64>(), arb_sha256()).prop_map(
                |(id, len, recipe_len, sha256)| Response::ObjectHeader {
                    id,
                    len,
                    recipe_len,
                    sha256,
                }
            ),
            vec(any::<u8>(), 1..=4096).prop_map(|b| Response::RecipePart(Bytes::from(b))),
            arb_chunk(),
            arb_chunk_id().prop_map(|id| Response::Missing { id }),
            arb_bitmap(),
            any::<u64>().prop_map(|nonce| Response::Pong { nonce }),
            (arb_string(), any::<u64>())
                .prop_map(|(digest, version)| Response::Offered { digest, version }),
            Just(Response::End),
            (any::<u16>(), arb_string()).prop_map(|(c, message)| Response::Error {
                code: ErrorCode::from_u16(c),
                message,
            }),
        ]
    }

    // -- helpers -----------------------------------------------------------

    fn enc_req(r: &Request) -> BytesMut {
        let mut b = BytesMut::new();
        encode_request(r, &mut b);
        b
    }

    fn enc_resp(r: &Response) -> BytesMut {
        let mut b = BytesMut::new();
        encode_response(r, &mut b);
        b
    }

    /// A version-1 frame with any kind and body, built by hand.
    fn frame(kind: u8, body: &[u8]) -> BytesMut {
        let mut b = BytesMut::new();
        b.put_u32_le(2 + body.len() as u32);
        b.put_u8(PROTOCOL_VERSION);
        b.put_u8(kind);
        b.put_slice(body);
        b
    }

    fn req_err(mut b: BytesMut) -> WireError {
        decode_request(&mut b).expect_err("request must be rejected")
    }

    fn resp_err(mut b: BytesMut) -> WireError {
        decode_response(&mut b).expect_err("response must be rejected")
    }

    fn is_malformed(e: &WireError) -> bool {
        matches!(e, WireError::Malformed { .. })
    }

    fn too_large(e: &WireError, field: &str) -> bool {
        matches!(e, WireError::TooLarge { what, len, max } if *what == field && len > max)
    }

    fn str_field(s: &str) -> Vec<u8> {
        let mut v = (s.len() as u16).to_le_bytes().to_vec();
        v.extend_from_slice(s.as_bytes());
        v
    }

    fn chunk_body(raw_len: u32, zstd: u8, payload_len: usize) -> Vec<u8> {
        let mut v = vec![7u8; 32];
        v.extend_from_slice(&raw_len.to_le_bytes());
        v.push(zstd);
        v.resize(v.len() + payload_len, 0xab);
        v
    }

    /// Decode every frame in `buf` in one direction until it needs more bytes
    /// or fails; every decoded frame must re-encode and decode to itself.
    fn drain_checked(buf: &mut BytesMut, requests: bool) {
        loop {
            if requests {
                match decode_request(buf) {
                    Ok(Some(r)) => {
                        let mut again = enc_req(&r);
                        assert_eq!(decode_request(&mut again), Ok(Some(r)));
                        assert!(again.is_empty());
                    }
                    Ok(None) | Err(_) => return,
                }
            } else {
                match decode_response(buf) {
                    Ok(Some(r)) => {
                        let mut again = enc_resp(&r);
                        assert_eq!(decode_response(&mut again), Ok(Some(r)));
                        assert!(again.is_empty());
                    }
                    Ok(None) | Err(_) => return,
                }
            }
        }
    }

    // -- round trips ---------------------------------------------------------

    proptest! {
        #[test]
        fn request_round_trip(req in arb_request()) {
            let mut b = enc_req(&req);
            prop_assert!(b.len() - LEN_FIELD <= MAX_FRAME);
            prop_assert_eq!(decode_request(&mut b), Ok(Some(req)));
            prop_assert!(b.is_empty());
        }

        #[test]
        fn response_round_trip(resp in arb_response()) {
            let mut b = enc_resp(&resp);
            prop_assert!(b.len() - LEN_FIELD <= MAX_FRAME);
            prop_assert_eq!(decode_response(&mut b), Ok(Some(resp)));
            prop_assert!(b.is_empty());
        }

        #[test]
        fn chunk_header_plus_payload_is_the_encoding(resp in arb_chunk()) {
            let Response::Chunk { id, raw_len, zstd, payload } = &resp else {
                unreachable!("arb_chunk makes chunks");
            };
            let mut joined = chunk_frame_header(id, *raw_len, *zstd, payload.len());
            joined.extend_from_slice(payload);
            prop_assert_eq!(&joined[..], &enc_resp(&resp)[..]);
        }

        #[test]
        fn requests_decode_incrementally(
            reqs in vec(arb_request(), 1..6),
            splits in vec(1usize..2048, 1..64),
        ) {
            let mut stream = BytesMut::new();
            for r in &reqs {
                encode_request(r, &mut stream);
            }
            let mut got = Vec::new();
            let mut buf = BytesMut::new();
            let mut rest = &stream[..];
            let mut splits = splits.iter().cycle();
            while !rest.is_empty() {
                let n = (*splits.next().unwrap_or(&1)).min(rest.len());
                buf.extend_from_slice(&rest[..n]);
                rest = &rest[n..];
                while let Some(r) = decode_request(&mut buf).expect("valid stream") {
                    got.push(r);
                }
            }
            prop_assert!(buf.is_empty());
            prop_assert_eq!(got, reqs);
        }

        #[test]
        fn responses_decode_incrementally(
            resps in vec(arb_response(), 1..6),
            splits in vec(1usize..2048, 1..64),
        ) {
            let mut stream = BytesMut::new();
            for r in &resps {
                encode_response(r, &mut stream);
            }
            let mut got = Vec::new();
            let mut buf = BytesMut::new();
            let mut rest = &stream[..];
            let mut splits = splits.iter().cycle();
            while !rest.is_empty() {
                let n = (*splits.next().unwrap_or(&1)).min(rest.len());
                buf.extend_from_slice(&rest[..n]);
                rest = &rest[n..];
                while let Some(r) = decode_response(&mut buf).expect("valid stream") {
                    got.push(r);
                }
            }
            prop_assert!(buf.is_empty());
            prop_assert_eq!(got, resps);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn frames_decode_one_byte_at_a_time(
            reqs in vec(arb_request(), 1..4),
            resps in vec(arb_response(), 1..4),
        ) {
            let mut stream = BytesMut::new();
            for r in &reqs {
                encode_request(r, &mut stream);
            }
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            for &byte in &stream[..] {
                let before = buf.len();
                buf.put_u8(byte);
                match decode_request(&mut buf).expect("valid stream") {
                    Some(r) => got.push(r),
                    None => prop_assert_eq!(buf.len(), before + 1),
                }
            }
            prop_assert_eq!(got, reqs);

            let mut stream = BytesMut::new();
            for r in &resps {
                encode_response(r, &mut stream);
            }
            let mut got = Vec::new();
            for &byte in &stream[..] {
                buf.put_u8(byte);
                if let Some(r) = decode_response(&mut buf).expect("valid stream") {
                    got.push(r);
                }
            }
            prop_assert!(buf.is_empty());
            prop_assert_eq!(got, resps);
        }
    }

    #[test]
    fn max_size_frames_round_trip() {
        let id = ChunkId::of(b"max");
        let long = "é".repeat(MAX_STRING / 2);
        assert_eq!(long.len(), MAX_STRING);
        let requests = [
            Request::Hello(Hello {
                node: long.clone(),
                site: long.clone(),
                version: u16::MAX,
                capabilities: vec![long.clone(); MAX_CAPABILITIES],
            }),
            Request::GetObject {
                key: ObjectKey::Name(long.clone()),
                priority: Priority::Prefetch,
            },
            Request::GetChunks {
                ids: vec![id; MAX_BATCH],
                priority: Priority::Demand,
                accept_zstd: true,
            },
            Request::Have {
                ids: vec![id; MAX_BATCH],
            },
        ];
        for req in requests {
            let mut b = enc_req(&req);
            assert!(b.len() - LEN_FIELD <= MAX_FRAME);
            assert_eq!(decode_request(&mut b), Ok(Some(req)));
        }
        let responses = [
            Response::Chunk {
                id,
                raw_len: MAX_CHUNK as u32,
                zstd: false,
                payload: Bytes::from(vec![1u8; MAX_CHUNK]),
            },
            Response::Chunk {
                id,
                raw_len: MAX_CHUNK as u32,
                zstd: true,
                payload: Bytes::from(vec![2u8; MAX_ZSTD_PAYLOAD]),
            },
            Response::RecipePart(Bytes::from(vec![3u8; MAX_RECIPE_PART])),
            Response::HaveBitmap {
                count: MAX_BATCH as u32,
                bits: Bytes::from(vec![0xffu8; MAX_BATCH / 8]),
            },
            Response::HaveBitmap {
                count: 0,
                bits: Bytes::new(),
            },
            Response::Error {
                code: ErrorCode::Internal,
                message: long.clone(),
            },
            Response::ObjectHeader {
                id: ObjectId::from_bytes([9; 32]),
                len: u64::MAX,
                recipe_len: u64::MAX,
                sha256: "0123456789abcdef".repeat(4),
            },
        ];
        for resp in responses {
            let mut b = enc_resp(&resp);
            assert!(b.len() - LEN_FIELD <= MAX_FRAME);
            assert_eq!(decode_response(&mut b), Ok(Some(resp)));
        }
    }

    #[test]
    fn payloads_are_split_off_without_a_copy() {
        let payload = Bytes::from(vec![5u8; 1000]);
        let mut b = enc_resp(&Response::Chunk {
            id: ChunkId::of(&payload),
            raw_len: 1000,
            zstd: false,
            payload: payload.clone(),
        });
        encode_response(&Response::RecipePart(payload.clone()), &mut b);
        let base = b.as_ptr() as usize;
        let Ok(Some(Response::Chunk { payload: got, .. })) = decode_response(&mut b) else {
            panic!("expected a chunk");
        };
        assert_eq!(got, payload);
        assert_eq!(got.as_ptr() as usize, base + HEADER_LEN + CHUNK_HEAD);
        let Ok(Some(Response::RecipePart(part))) = decode_response(&mut b) else {
            panic!("expected a recipe part");
        };
        assert_eq!(
            part.as_ptr() as usize,
            base + HEADER_LEN + CHUNK_HEAD + 1000 + HEADER_LEN
        );
    }

    #[test]
    fn long_error_message_is_cut_at_a_char_boundary() {
        let message = "€".repeat(1000); // 3000 bytes, 3 per char
        let mut b = enc_resp(&Response::Error {
            code: ErrorCode::Busy,
            message: message.clone(),
        });
        let Ok(Some(Response::Error { code, message: got })) = decode_response(&mut b) else {
            panic!("expected an error frame");
        };
        assert_eq!(code, ErrorCode::Busy);
        assert_eq!(got.len(), MAX_STRING / 3 * 3);
        assert!(message.starts_with(&got));
    }

    // -- hostile input -------------------------------------------------------

    proptest! {
        #[test]
        fn random_bytes_never_panic(data in vec(any::<u8>(), 0..512)) {
            drain_checked(&mut BytesMut::from(&data[..]), true);
            drain_checked(&mut BytesMut::from(&data[..]), false);
        }

        #[test]
        fn random_bodies_never_panic(kind in 0u8..12, body in vec(any::<u8>(), 0..300)) {
            drain_checked(&mut frame(kind, &body), true);
            drain_checked(&mut frame(kind, &body), false);
        }

        #[test]
        fn truncated_frames_need_more_bytes(
            req in arb_request(),
            resp in arb_response(),
            cut in any::<prop::sample::Index>(),
        ) {
            let full = enc_req(&req);
            let mut b = BytesMut::from(&full[..cut.index(full.len())]);
            let before = b.clone();
            prop_assert_eq!(decode_request(&mut b), Ok(None));
            prop_assert_eq!(b, before);

            let full = enc_resp(&resp);
            let mut b = BytesMut::from(&full[..cut.index(full.len())]);
            let before = b.clone();
            prop_assert_eq!(decode_response(&mut b), Ok(None));
            prop_assert_eq!(b, before);
        }

        #[test]
        fn bit_flipped_frames_never_panic(
            req in arb_request(),
            resp in arb_response(),
            at in any::<prop::sample::Index>(),
            bit in 0u8..8,
        ) {
            let mut b = enc_req(&req);
            let i = at.index(b.len());
            b[i] ^= 1 << bit;
            drain_checked(&mut b, true);

            let mut b = enc_resp(&resp);
            let i = at.index(b.len());
            b[i] ^= 1 << bit;
            drain_checked(&mut b, false);
        }
    }

    #[test]
    fn huge_len_is_too_large_from_the_header_alone() {
        for len in [u32::MAX, MAX_FRAME as u32 + 1] {
            let mut h = BytesMut::new();
            h.put_u32_le(len);
            h.put_u8(PROTOCOL_VERSION);
            h.put_u8(REQ_PING);
            assert_eq!(h.len(), HEADER_LEN);
            assert!(too_large(&req_err(h.clone()), "frame length"));
            assert!(too_large(&resp_err(h), "frame length"));
        }
        // The largest allowed length just waits for its body.
        let mut h = BytesMut::new();
        h.put_u32_le(MAX_FRAME as u32);
        h.put_u8(PROTOCOL_VERSION);
        h.put_u8(REQ_HELLO);
        assert_eq!(decode_request(&mut h), Ok(None));
    }

    #[test]
    fn len_below_two_is_malformed() {
        for len in [0u32, 1] {
            let mut h = BytesMut::new();
            h.put_u32_le(len);
            assert!(is_malformed(&req_err(h.clone())));
            assert!(is_malformed(&resp_err(h)));
        }
    }

    #[test]
    fn short_header_needs_more_bytes() {
        let full = enc_req(&Request::Ping { nonce: 1 });
        for n in 0..HEADER_LEN {
            let mut b = BytesMut::from(&full[..n]);
            assert_eq!(decode_request(&mut b), Ok(None));
            assert_eq!(b.len(), n);
        }
    }

    #[test]
    fn wrong_version_is_rejected() {
        let mut b = enc_req(&Request::Ping { nonce: 1 });
        b[4] = PROTOCOL_VERSION + 1;
        assert_eq!(req_err(b.clone()), WireError::Version(PROTOCOL_VERSION + 1));
        // Known from the first five bytes.
        b.truncate(5);
        assert_eq!(req_err(b), WireError::Version(PROTOCOL_VERSION + 1));
        let mut b = enc_resp(&Response::End);
        b[4] = 0;
        assert_eq!(resp_err(b), WireError::Version(0));
    }

    #[test]
    fn unknown_kinds_are_rejected_per_direction() {
        for k in [0u8, 8, 9, 200] {
            assert_eq!(req_err(frame(k, &[])), WireError::UnknownKind(k));
        }
        // MetaSync has an empty body; anything in it is malformed.
        assert!(is_malformed(&req_err(frame(REQ_META_SYNC, &[1]))));
        for k in [0u8, 11, 255] {
            assert_eq!(resp_err(frame(k, &[])), WireError::UnknownKind(k));
        }
        // Known from the header alone.
        let mut h = frame(200, &[0; 100]);
        h.truncate(HEADER_LEN);
        assert_eq!(req_err(h), WireError::UnknownKind(200));
    }

    #[test]
    fn id_batches_must_be_1_to_max_batch() {
        // GetChunks: priority, accept_zstd, count.
        let empty = [0u8, 0, 0, 0];
        assert!(is_malformed(&req_err(frame(REQ_GET_CHUNKS, &empty))));
        assert!(is_malformed(&req_err(frame(REQ_HAVE, &[0, 0]))));

        let n = MAX_BATCH + 1;
        let mut body = vec![0u8, 0];
        body.extend_from_slice(&(n as u16).to_le_bytes());
        body.resize(body.len() + n * 32, 1);
        assert!(too_large(
            &req_err(frame(REQ_GET_CHUNKS, &body)),
            "id count"
        ));
        assert!(too_large(&req_err(frame(REQ_HAVE, &body[2..])), "id count"));
        // A count larger than the ids present.
        let mut body = vec![0u8, 0, 3, 0];
        body.resize(body.len() + 2 * 32, 1);
        assert!(is_malformed(&req_err(frame(REQ_GET_CHUNKS, &body))));
    }

    #[test]
    fn capabilities_over_limit_are_too_large() {
        let mut body = [str_field("n"), str_field("s")].concat();
        body.extend_from_slice(&1u16.to_le_bytes());
        let n = MAX_CAPABILITIES + 1;
        body.extend_from_slice(&(n as u16).to_le_bytes());
        for _ in 0..n {
            body.extend_from_slice(&str_field("zstd"));
        }
        assert!(too_large(
            &req_err(frame(REQ_HELLO, &body)),
            "capability count"
        ));
        assert!(too_large(
            &resp_err(frame(RESP_HELLO, &body)),
            "capability count"
        ));
    }

    #[test]
    fn strings_over_limit_or_not_utf8_are_rejected() {
        let long = "x".repeat(MAX_STRING + 1);
        let body = [vec![0u8, KEY_NAME], str_field(&long)].concat();
        assert!(too_large(
            &req_err(frame(REQ_GET_OBJECT, &body)),
            "string length"
        ));
        let body = [1u16.to_le_bytes().to_vec(), str_field(&long)].concat();
        assert!(too_large(
            &resp_err(frame(RESP_ERROR, &body)),
            "string length"
        ));

        let bad = [0u8, KEY_DIGEST, 2, 0, 0xc3, 0x28];
        assert!(is_malformed(&req_err(frame(REQ_GET_OBJECT, &bad))));
        // A string longer than the body.
        let short = [0u8, KEY_DIGEST, 10, 0, b'a'];
        assert!(is_malformed(&req_err(frame(REQ_GET_OBJECT, &short))));
    }

    #[test]
    fn priority_bool_and_key_tag_out_of_range_are_malformed() {
        let id = [1u8; 32];
        let bad_priority = [&[3u8, KEY_ID][..], &id].concat();
        assert!(is_malformed(&req_err(frame(REQ_GET_OBJECT, &bad_priority))));
        let bad_tag = [&[0u8, 3][..], &id].concat();
        assert!(is_malformed(&req_err(frame(REQ_GET_OBJECT, &bad_tag))));
        let bad_bool = [&[0u8, 2, 1, 0][..], &id].concat();
        assert!(is_malformed(&req_err(frame(REQ_GET_CHUNKS, &bad_bool))));
        assert!(is_malformed(&resp_err(frame(
            RESP_CHUNK,
            &chunk_body(1, 2, 1)
        ))));
        let ok = [&[2u8, 1, 1, 0][..], &id].concat();
        assert!(decode_request(&mut frame(REQ_GET_CHUNKS, &ok)).is_ok());
    }

    #[test]
    fn chunk_limits() {
        let ok = |b: Vec<u8>| decode_response(&mut frame(RESP_CHUNK, &b));
        assert!(matches!(ok(chunk_body(1, 0, 1)), Ok(Some(_))));
        assert!(matches!(ok(chunk_body(1, 1, 0)), Ok(Some(_))));
        // raw_len 0.
        assert!(is_malformed(&resp_err(frame(
            RESP_CHUNK,
            &chunk_body(0, 0, 0)
        ))));
        assert!(is_malformed(&resp_err(frame(
            RESP_CHUNK,
            &chunk_body(0, 1, 10)
        ))));
        // raw_len over MAX_CHUNK.
        let over = MAX_CHUNK as u32 + 1;
        let e = resp_err(frame(RESP_CHUNK, &chunk_body(over, 1, 10)));
        assert!(too_large(&e, "chunk raw_len"));
        // Plain payload longer than MAX_CHUNK, or not raw_len bytes.
        let e = resp_err(frame(
            RESP_CHUNK,
            &chunk_body(MAX_CHUNK as u32, 0, MAX_CHUNK + 1),
        ));
        assert!(too_large(&e, "chunk payload length"));
        assert!(is_malformed(&resp_err(frame(
            RESP_CHUNK,
            &chunk_body(10, 0, 9)
        ))));
        assert!(is_malformed(&resp_err(frame(
            RESP_CHUNK,
            &chunk_body(10, 0, 11)
        ))));
        // zstd payload over its bound: rejected from the header alone.
        let mut h = frame(RESP_CHUNK, &chunk_body(10, 1, MAX_ZSTD_PAYLOAD + 1));
        assert!(h.len() - LEN_FIELD <= MAX_FRAME);
        h.truncate(HEADER_LEN);
        assert!(too_large(&resp_err(h), "chunk payload length"));
        // A body shorter than the fixed fields.
        assert!(is_malformed(&resp_err(frame(RESP_CHUNK, &[0; 36]))));
    }

    #[test]
    fn recipe_part_limits() {
        assert!(is_malformed(&resp_err(frame(RESP_RECIPE_PART, &[]))));
        let mut h = frame(RESP_RECIPE_PART, &vec![0; MAX_RECIPE_PART + 1]);
        assert!(h.len() - LEN_FIELD <= MAX_FRAME);
        h.truncate(HEADER_LEN);
        assert!(too_large(&resp_err(h), "recipe part length"));
    }

    #[test]
    fn bitmap_limits() {
        let body = |count: u32, bits: usize| {
            let mut v = count.to_le_bytes().to_vec();
            v.resize(4 + bits, 0xff);
            v
        };
        let over = MAX_BATCH as u32 + 1;
        let e = resp_err(frame(RESP_HAVE_BITMAP, &body(over, bitmap_len(over))));
        assert!(too_large(&e, "bitmap count"));
        let e = resp_err(frame(RESP_HAVE_BITMAP, &body(u32::MAX, 0)));
        assert!(too_large(&e, "bitmap count"));
        assert!(is_malformed(&resp_err(frame(
            RESP_HAVE_BITMAP,
            &body(9, 1)
        ))));
        assert!(is_malformed(&resp_err(frame(
            RESP_HAVE_BITMAP,
            &body(9, 3)
        ))));
        assert!(is_malformed(&resp_err(frame(
            RESP_HAVE_BITMAP,
            &body(0, 1)
        ))));
        assert!(is_malformed(&resp_err(frame(RESP_HAVE_BITMAP, &[0, 0]))));
        assert!(matches!(
            decode_response(&mut frame(RESP_HAVE_BITMAP, &body(9, 2))),
            Ok(Some(Response::HaveBitmap { count: 9, .. }))
        ));
    }

    #[test]
    fn sha256_must_be_empty_or_64_lowercase_hex() {
        let header = |sha: &str| {
            let mut v = vec![1u8; 32];
            v.extend_from_slice(&5u64.to_le_bytes());
            v.extend_from_slice(&6u64.to_le_bytes());
            v.extend_from_slice(&str_field(sha));
            frame(RESP_OBJECT_HEADER, &v)
        };
        let good = "ab".repeat(32);
        assert!(matches!(decode_response(&mut header(&good)), Ok(Some(_))));
        assert!(matches!(decode_response(&mut header("")), Ok(Some(_))));
        for bad in [
            "AB".repeat(32),
            "ab".repeat(31),
            "ab".repeat(33),
            "g".repeat(64),
        ] {
            assert!(is_malformed(&resp_err(header(&bad))), "{bad}");
        }
    }

    #[test]
    fn trailing_bytes_are_malformed() {
        let with_extra = |mut b: BytesMut, requests: bool| {
            b[0] += 1;
            b.put_u8(0);
            let e = if requests { req_err(b) } else { resp_err(b) };
            assert!(is_malformed(&e), "{e}");
        };
        with_extra(enc_req(&Request::Ping { nonce: 7 }), true);
        with_extra(
            enc_req(&Request::Have {
                ids: vec![ChunkId::EMPTY],
            }),
            true,
        );
        with_extra(
            enc_req(&Request::GetObject {
                key: ObjectKey::Name("a".into()),
                priority: Priority::Demand,
            }),
            true,
        );
        with_extra(enc_resp(&Response::End), false);
        with_extra(enc_resp(&Response::Missing { id: ChunkId::EMPTY }), false);
        with_extra(
            enc_resp(&Response::Error {
                code: ErrorCode::NotFound,
                message: "no".into(),
            }),
            false,
        );
    }

    #[test]
    fn short_bodies_are_malformed() {
        assert!(is_malformed(&req_err(frame(REQ_PING, &[0; 7]))));
        assert!(is_malformed(&resp_err(frame(RESP_PONG, &[]))));
        assert!(is_malformed(&resp_err(frame(RESP_MISSING, &[0; 31]))));
        assert!(is_malformed(&req_err(frame(REQ_HELLO, &[0, 0]))));
    }

    #[test]
    fn error_codes() {
        let cases = [
            (
                WireError::TooLarge {
                    what: "x",
                    len: 2,
                    max: 1,
                },
                ErrorCode::TooLarge,
            ),
            (WireError::Version(2), ErrorCode::Version),
            (WireError::UnknownKind(99), ErrorCode::Malformed),
            (
                WireError::Malformed {
                    kind: "Ping",
                    why: "short",
                },
                ErrorCode::Malformed,
            ),
            (WireError::Truncated(3), ErrorCode::Malformed),
        ];
        for (e, code) in cases {
            assert_eq!(e.code(), code, "{e}");
        }
        for c in 0..=20u16 {
            assert_eq!(ErrorCode::from_u16(c).as_u16(), c);
        }
        assert_eq!(ErrorCode::from_u16(3), ErrorCode::NotFound);
        assert_eq!(ErrorCode::from_u16(999), ErrorCode::Other(999));
    }
}
