//! Sans-IO NBD server protocol: a state machine fed bytes, plus encoders.
//!
//! [`ServerProto`] covers one connection, fixed newstyle only. The caller
//!
//! 1. sends whatever [`ServerProto::take_output`] holds (the greeting first),
//! 2. feeds received bytes with [`ServerProto::feed`] (or reads straight into
//!    [`ServerProto::input_mut`]),
//! 3. calls [`ServerProto::poll`] until it returns `Ok(None)` ("need more
//!    bytes"), acting on each [`Event`], and sends the output again.
//!
//! Options that need no knowledge of the exports (structured replies,
//! metadata contexts, `STARTTLS`, unknown or malformed options) are answered
//! inside the state machine. Two events need an answer from the caller before
//! the state machine moves on: [`Event::ListExports`] (answer with
//! [`ServerProto::answer_list`]) and [`Event::ExportQuery`] (answer with
//! [`ServerProto::answer_export`]).
//!
//! In transmission, every well-formed request whose flags, offset and length
//! are valid for the export becomes an [`Event::Request`]; the caller runs it
//! and encodes the reply with the `encode_*` functions (replies may go out in
//! any order: the cookie ties them to the request). An invalid request is
//! answered inside the state machine with the errno the protocol asks for,
//! and reported as [`Event::Rejected`].
//!
//! # Limits
//!
//! Nothing the peer claims is allocated before it is checked against
//! [`ProtoConfig`]: option data above `max_option_len` is answered
//! `NBD_REP_ERR_TOO_BIG` and skipped without buffering (or the connection is
//! closed when it is longer than `max_skip_len`); a `WRITE` payload above
//! `max_request_len` is answered `EINVAL` and skipped the same way; export
//! names and metadata queries are at most 4096 bytes.
//!
//! # Errors
//!
//! A [`ProtoError`] means the peer broke a rule that leaves no way to answer
//! (bad magic, unknown client flags, an `NBD_OPT_EXPORT_NAME` that cannot be
//! served, a payload too big to skip). The state machine is closed from then
//! on; the caller sends any pending output and drops the connection.

use std::fmt;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::consts::*;

/// Default cap on one option's data (`NBD_OPT_*` payload).
pub const DEFAULT_MAX_OPTION_LEN: u32 = 64 * 1024;
/// Default cap on one `READ` or `WRITE` (nbdkit's and qemu's 32 MiB).
pub const DEFAULT_MAX_REQUEST_LEN: u32 = 32 * 1024 * 1024;
/// Default cap on bytes skipped (not buffered) for one rejected option or
/// write payload before the connection is closed instead.
pub const DEFAULT_MAX_SKIP_LEN: u64 = 64 * 1024 * 1024;
/// Most descriptors sent in one `NBD_REPLY_TYPE_BLOCK_STATUS` chunk.
pub const MAX_EXTENTS: usize = 8192;
/// Metadata context id handed out for `base:allocation`.
pub const ALLOCATION_CONTEXT_ID: u32 = 1;
/// Most bytes [`ServerProto::read_hint`] asks for while skipping.
const SKIP_READ_HINT: usize = 64 * 1024;

/// Error numbers of the transmission phase (the protocol's fixed set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Errno {
    /// `NBD_EPERM`: operation not permitted (a write to a read-only export).
    Perm = 1,
    /// `NBD_EIO`: input/output error.
    Io = 5,
    /// `NBD_ENOMEM`: cannot allocate memory.
    NoMem = 12,
    /// `NBD_EINVAL`: invalid argument.
    Inval = 22,
    /// `NBD_ENOSPC`: no space left (a write past the end of the export).
    NoSpc = 28,
    /// `NBD_EOVERFLOW`: value too large.
    Overflow = 75,
    /// `NBD_ENOTSUP`: operation not supported.
    NotSup = 95,
    /// `NBD_ESHUTDOWN`: the server is shutting down.
    Shutdown = 108,
}

impl Errno {
    /// The value sent on the wire.
    pub fn code(self) -> u32 {
        self as u32
    }

    /// The errno for a wire value, if it is one the protocol defines.
    pub fn from_code(code: u32) -> Option<Self> {
        Some(match code {
            1 => Self::Perm,
            5 => Self::Io,
            12 => Self::NoMem,
            22 => Self::Inval,
            28 => Self::NoSpc,
            75 => Self::Overflow,
            95 => Self::NotSup,
            108 => Self::Shutdown,
            _ => return None,
        })
    }

    /// The protocol's name for it (`"EINVAL"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Self::Perm => "EPERM",
            Self::Io => "EIO",
            Self::NoMem => "ENOMEM",
            Self::Inval => "EINVAL",
            Self::NoSpc => "ENOSPC",
            Self::Overflow => "EOVERFLOW",
            Self::NotSup => "ENOTSUP",
            Self::Shutdown => "ESHUTDOWN",
        }
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Limits of one connection's state machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProtoConfig {
    /// Longest option data buffered; longer options get
    /// `NBD_REP_ERR_TOO_BIG`.
    pub max_option_len: u32,
    /// Longest `READ` or `WRITE`; advertised as the maximum block size.
    /// Longer requests get `EINVAL`.
    pub max_request_len: u32,
    /// Longest rejected option or write payload that is skipped; anything
    /// longer closes the connection.
    pub max_skip_len: u64,
}

impl Default for ProtoConfig {
    fn default() -> Self {
        Self {
            max_option_len: DEFAULT_MAX_OPTION_LEN,
            max_request_len: DEFAULT_MAX_REQUEST_LEN,
            max_skip_len: DEFAULT_MAX_SKIP_LEN,
        }
    }
}

/// What the server tells a client about an export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Writes, trims and write-zeroes are refused with `EPERM`.
    pub read_only: bool,
    /// Advertise `NBD_FLAG_CAN_MULTI_CONN`: flush and FUA on one connection
    /// cover writes made through every connection.
    pub multi_conn: bool,
    /// Preferred block size (a power of two, 512 at least) for
    /// `NBD_INFO_BLOCK_SIZE`.
    pub preferred_block_size: u32,
    /// Optional human-readable description (`NBD_INFO_DESCRIPTION`).
    pub description: Option<String>,
}

impl ExportInfo {
    /// A writable export of `size` bytes with default block sizes.
    pub fn new(size: u64) -> Self {
        Self {
            size,
            read_only: false,
            multi_conn: false,
            preferred_block_size: 4096,
            description: None,
        }
    }

    /// The transmission flags for this export: they tell the truth about
    /// what the server accepts.
    pub fn transmission_flags(&self) -> u16 {
        let mut flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_CACHE;
        if self.read_only {
            flags |= FLAG_READ_ONLY;
        } else {
            flags |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES;
        }
        if self.multi_conn {
            flags |= FLAG_CAN_MULTI_CONN;
        }
        flags
    }
}

/// Which option asked about an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryKind {
    /// `NBD_OPT_INFO`: describe, stay in negotiation.
    Info,
    /// `NBD_OPT_GO`: describe and enter transmission.
    Go,
    /// `NBD_OPT_EXPORT_NAME`: enter transmission; a refusal closes the
    /// connection (the option cannot carry an error).
    ExportName,
}

/// Why an export query is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// `NBD_REP_ERR_UNKNOWN`: no such export (or it cannot be served now),
    /// with a message for the user.
    Unknown(String),
    /// `NBD_REP_ERR_POLICY`: the export exists but is not allowed.
    Policy(String),
    /// `NBD_REP_ERR_SHUTDOWN`: the server is shutting down.
    Shutdown,
}

/// Where the state machine is after [`ServerProto::answer_export`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Still negotiating options.
    Negotiating,
    /// Transmission has begun with the export just described.
    Transmission,
}

/// A validated transmission request's operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `NBD_CMD_READ`.
    Read,
    /// `NBD_CMD_WRITE`, with its payload (exactly `length` bytes).
    Write(Bytes),
    /// `NBD_CMD_FLUSH`.
    Flush,
    /// `NBD_CMD_TRIM`.
    Trim,
    /// `NBD_CMD_CACHE`: a prefetch hint.
    Cache,
    /// `NBD_CMD_WRITE_ZEROES`.
    WriteZeroes,
    /// `NBD_CMD_BLOCK_STATUS` for the `base:allocation` context.
    BlockStatus,
}

/// A transmission request that passed validation: the range lies inside
/// the export, the length is within limits and the flags apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Opaque client cookie ("handle"), echoed in the reply.
    pub cookie: u64,
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// Byte offset into the export.
    pub offset: u64,
    /// Length in bytes (zero for `FLUSH`).
    pub length: u32,
    /// What to do.
    pub op: Op,
}

impl Request {
    /// `NBD_CMD_FLAG_FUA`: persist before replying.
    pub fn fua(&self) -> bool {
        self.flags & CMD_FLAG_FUA != 0
    }

    /// `NBD_CMD_FLAG_NO_HOLE` (write-zeroes only): keep the range allocated.
    pub fn no_hole(&self) -> bool {
        self.flags & CMD_FLAG_NO_HOLE != 0
    }

    /// `NBD_CMD_FLAG_REQ_ONE` (block-status only): one extent is enough.
    pub fn req_one(&self) -> bool {
        self.flags & CMD_FLAG_REQ_ONE != 0
    }

    /// The wire command number.
    pub fn command(&self) -> u16 {
        match self.op {
            Op::Read => CMD_READ,
            Op::Write(_) => CMD_WRITE,
            Op::Flush => CMD_FLUSH,
            Op::Trim => CMD_TRIM,
            Op::Cache => CMD_CACHE,
            Op::WriteZeroes => CMD_WRITE_ZEROES,
            Op::BlockStatus => CMD_BLOCK_STATUS,
        }
    }
}

/// Something the caller must act on (or may count).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// `NBD_OPT_LIST`: answer with [`ServerProto::answer_list`].
    ListExports,
    /// `NBD_OPT_INFO`, `NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME` named an export:
    /// answer with [`ServerProto::answer_export`].
    ExportQuery {
        /// The export name (valid UTF-8, no NUL, at most 4096 bytes).
        name: String,
        /// Which option asked.
        kind: QueryKind,
    },
    /// `NBD_OPT_ABORT`: the ACK is in the output; send it and close.
    Abort,
    /// A valid transmission request to run and answer.
    Request(Request),
    /// An invalid request; its error reply is already in the output.
    Rejected {
        /// The request's cookie.
        cookie: u64,
        /// The request's command number (may be unknown).
        command: u16,
        /// The errno sent back.
        errno: Errno,
    },
    /// `NBD_CMD_DISC`: finish outstanding requests, then close.
    Disconnect,
}

/// A peer error after which the connection must be closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// The client set flags the server does not know or did not offer.
    #[error("client sent unknown client flags {0:#x}")]
    UnknownClientFlags(u32),
    /// An option did not start with `IHAVEOPT`.
    #[error("bad option magic {0:#018x}")]
    BadOptionMagic(u64),
    /// Option data too long even to skip.
    #[error("option {option} claims {len} bytes of data, over the limit")]
    OptionTooLarge {
        /// The option number.
        option: u32,
        /// The claimed data length.
        len: u32,
    },
    /// `NBD_OPT_EXPORT_NAME` carried a name that is not a valid string.
    #[error("NBD_OPT_EXPORT_NAME carried an invalid export name")]
    BadExportName,
    /// `NBD_OPT_EXPORT_NAME` named an export that cannot be served.
    #[error("export {0:?} refused after NBD_OPT_EXPORT_NAME")]
    ExportRefused(String),
    /// A request did not start with `NBD_REQUEST_MAGIC`.
    #[error("bad request magic {0:#010x}")]
    BadRequestMagic(u32),
    /// A rejected write's payload is too long to skip.
    #[error("rejected write payload of {0} bytes is too large to skip")]
    PayloadTooLarge(u32),
}

/// One request header as sent by a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags.
    pub flags: u16,
    /// Command number (`CMD_*`).
    pub command: u16,
    /// Client cookie.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Length in bytes.
    pub length: u32,
}

/// Append a request (header, then `payload` for a write) to `out`: the
/// client side, for tests, fuzzing and tools.
pub fn encode_request(out: &mut BytesMut, header: &RequestHeader, payload: &[u8]) {
    out.reserve(REQUEST_HEADER_LEN + payload.len());
    out.put_u32(REQUEST_MAGIC);
    out.put_u16(header.flags);
    out.put_u16(header.command);
    out.put_u64(header.cookie);
    out.put_u64(header.offset);
    out.put_u32(header.length);
    out.put_slice(payload);
}

/// Decode a request header from the front of `buf` without consuming it:
/// `Ok(None)` when fewer than [`REQUEST_HEADER_LEN`] bytes are there.
pub fn decode_request_header(buf: &[u8]) -> Result<Option<RequestHeader>, ProtoError> {
    if buf.len() < REQUEST_HEADER_LEN {
        return Ok(None);
    }
    let mut b = &buf[..REQUEST_HEADER_LEN];
    let magic = b.get_u32();
    if magic != REQUEST_MAGIC {
        return Err(ProtoError::BadRequestMagic(magic));
    }
    Ok(Some(RequestHeader {
        flags: b.get_u16(),
        command: b.get_u16(),
        cookie: b.get_u64(),
        offset: b.get_u64(),
        length: b.get_u32(),
    }))
}

/// Append an option (`IHAVEOPT`, number, length, data) to `out`: the client
/// side, for tests, fuzzing and tools.
pub fn encode_option(out: &mut BytesMut, option: u32, data: &[u8]) {
    out.reserve(OPTION_HEADER_LEN + data.len());
    out.put_u64(IHAVEOPT);
    out.put_u32(option);
    out.put_u32(u32::try_from(data.len()).unwrap_or(u32::MAX));
    out.put_slice(data);
}

/// One `base:allocation` extent: `length` bytes with status `flags`
/// ([`STATE_HOLE`], [`STATE_ZERO`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes (zero-length extents are dropped).
    pub length: u32,
    /// `STATE_*` bits.
    pub flags: u32,
}

impl Extent {
    /// Allocated data.
    pub fn data(length: u32) -> Self {
        Self { length, flags: 0 }
    }

    /// Allocated, reads as zeroes.
    pub fn zero(length: u32) -> Self {
        Self {
            length,
            flags: STATE_ZERO,
        }
    }

    /// Unallocated, reads as zeroes.
    pub fn hole(length: u32) -> Self {
        Self {
            length,
            flags: STATE_HOLE | STATE_ZERO,
        }
    }
}

/// Make an export's extent list fit a block-status reply for a request of
/// `length` bytes (`length` > 0): drop empty extents, merge neighbours with
/// equal flags, cut at `length` and at [`MAX_EXTENTS`], keep one extent when
/// `req_one`. An empty list becomes one data extent covering the request
/// (status 0 is always a safe answer).
pub fn normalize_extents(extents: &[Extent], length: u32, req_one: bool) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::new();
    let mut remaining = length;
    for e in extents {
        if remaining == 0 {
            break;
        }
        if e.length == 0 {
            continue;
        }
        let take = e.length.min(remaining);
        remaining -= take;
        let full = req_one || out.len() >= MAX_EXTENTS;
        match out.last_mut() {
            Some(last) if last.flags == e.flags => last.length += take,
            Some(_) if full => break,
            _ => out.push(Extent {
                length: take,
                flags: e.flags,
            }),
        }
    }
    if out.is_empty() && length > 0 {
        out.push(Extent::data(length));
    }
    out
}

/// Append a simple reply header (`error` 0 for success) to `out`.
pub fn encode_simple_reply(out: &mut BytesMut, cookie: u64, error: u32) {
    out.reserve(SIMPLE_REPLY_HEADER_LEN);
    out.put_u32(SIMPLE_REPLY_MAGIC);
    out.put_u32(error);
    out.put_u64(cookie);
}

/// Append a structured reply chunk header to `out`; `len` payload bytes
/// must follow.
pub fn encode_chunk_header(out: &mut BytesMut, flags: u16, ty: u16, cookie: u64, len: u32) {
    out.reserve(STRUCTURED_REPLY_HEADER_LEN);
    out.put_u32(STRUCTURED_REPLY_MAGIC);
    out.put_u16(flags);
    out.put_u16(ty);
    out.put_u64(cookie);
    out.put_u32(len);
}

/// Bytes [`encode_read_reply_header`] writes.
pub fn read_reply_header_len(structured: bool, length: u32) -> usize {
    match (structured, length) {
        (false, _) => SIMPLE_REPLY_HEADER_LEN,
        (true, 0) => STRUCTURED_REPLY_HEADER_LEN,
        (true, _) => STRUCTURED_REPLY_HEADER_LEN + 8,
    }
}

/// Append the header of a successful read reply; exactly `length` data
/// bytes must follow. Simple replies: a simple reply with error 0.
/// Structured: one final `OFFSET_DATA` chunk (or a `NONE` chunk for a
/// zero-length read).
pub fn encode_read_reply_header(
    out: &mut BytesMut,
    structured: bool,
    cookie: u64,
    offset: u64,
    length: u32,
) {
    if !structured {
        encode_simple_reply(out, cookie, 0);
    } else if length == 0 {
        encode_chunk_header(out, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0);
    } else {
        // length <= u32::MAX - 8 is the caller's limit (max_request_len).
        let len = length.saturating_add(8);
        encode_chunk_header(out, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, cookie, len);
        out.put_u64(offset);
    }
}

/// Append a successful reply without payload (write, flush, trim, ...): a
/// simple reply, which the protocol allows even with structured replies.
pub fn encode_ok_reply(out: &mut BytesMut, cookie: u64) {
    encode_simple_reply(out, cookie, 0);
}

/// Append an error reply: a final `NBD_REPLY_TYPE_ERROR` chunk carrying
/// `message` when structured replies are on, else a simple reply.
pub fn encode_error_reply(
    out: &mut BytesMut,
    structured: bool,
    cookie: u64,
    errno: Errno,
    message: &str,
) {
    if structured {
        let msg = truncate_str(message, MAX_STRING_LEN);
        let len = 6 + msg.len() as u32;
        encode_chunk_header(out, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie, len);
        out.put_u32(errno.code());
        out.put_u16(msg.len() as u16);
        out.put_slice(msg.as_bytes());
    } else {
        encode_simple_reply(out, cookie, errno.code());
    }
}

/// Append a final `NBD_REPLY_TYPE_BLOCK_STATUS` chunk for `context_id`.
/// `extents` should come from [`normalize_extents`] (non-empty, at most
/// [`MAX_EXTENTS`]).
pub fn encode_block_status_reply(
    out: &mut BytesMut,
    cookie: u64,
    context_id: u32,
    extents: &[Extent],
) {
    let extents = &extents[..extents.len().min(MAX_EXTENTS)];
    let len = 4 + 8 * extents.len() as u32;
    encode_chunk_header(out, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, cookie, len);
    out.put_u32(context_id);
    for e in extents {
        out.put_u32(e.length);
        out.put_u32(e.flags);
    }
}

/// Append an `NBD_REPLY_TYPE_OFFSET_HOLE` chunk: `hole_len` (> 0) bytes at
/// `offset` read as zeroes.
pub fn encode_offset_hole(out: &mut BytesMut, cookie: u64, offset: u64, hole_len: u32, done: bool) {
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    encode_chunk_header(out, flags, REPLY_TYPE_OFFSET_HOLE, cookie, 12);
    out.put_u64(offset);
    out.put_u32(hole_len);
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

/// A protocol string: UTF-8, no NUL, at most 4096 bytes.
fn parse_string(bytes: &[u8]) -> Option<String> {
    if bytes.len() > MAX_STRING_LEN || bytes.contains(&0) {
        return None;
    }
    std::str::from_utf8(bytes).ok().map(str::to_owned)
}

#[derive(Debug)]
enum State {
    ClientFlags,
    OptionHeader,
    OptionData {
        option: u32,
        len: usize,
    },
    SkipOption {
        remaining: u64,
    },
    AwaitList,
    AwaitExport {
        option: u32,
        kind: QueryKind,
        name: String,
        info_requests: Vec<u16>,
    },
    Transmission,
    WritePayload {
        header: RequestHeader,
    },
    SkipPayload {
        remaining: u64,
    },
    Closed,
}

#[derive(Debug)]
struct MetaSelection {
    export: String,
    allocation: bool,
}

/// The server side of one NBD connection, as a state machine.
#[derive(Debug)]
pub struct ServerProto {
    config: ProtoConfig,
    state: State,
    input: BytesMut,
    output: BytesMut,
    no_zeroes: bool,
    structured: bool,
    meta: Option<MetaSelection>,
    export: Option<ExportInfo>,
    allocation_context: Option<u32>,
}

impl ServerProto {
    /// A new connection; the greeting is already in the output.
    pub fn new(config: ProtoConfig) -> Self {
        let mut output = BytesMut::with_capacity(256);
        output.put_u64(NBDMAGIC);
        output.put_u64(IHAVEOPT);
        output.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        Self {
            config,
            state: State::ClientFlags,
            input: BytesMut::new(),
            output,
            no_zeroes: false,
            structured: false,
            meta: None,
            export: None,
            allocation_context: None,
        }
    }

    /// The limits in force.
    pub fn config(&self) -> &ProtoConfig {
        &self.config
    }

    /// Append received bytes (ignored once closed).
    pub fn feed(&mut self, data: &[u8]) {
        if !matches!(self.state, State::Closed) {
            self.input.extend_from_slice(data);
        }
    }

    /// The receive buffer, to read into directly (`read_buf`). Reserve
    /// [`Self::read_hint`] bytes first.
    pub fn input_mut(&mut self) -> &mut BytesMut {
        &mut self.input
    }

    /// Bytes still missing for the message being assembled (bounded for
    /// skipped data), or 0 when no input is wanted (closed, or waiting for
    /// an answer).
    pub fn read_hint(&self) -> usize {
        let have = self.input.len();
        let need = |n: usize| n.saturating_sub(have);
        match &self.state {
            State::ClientFlags => need(4),
            State::OptionHeader => need(OPTION_HEADER_LEN),
            State::OptionData { len, .. } => need(*len),
            State::SkipOption { remaining } | State::SkipPayload { remaining } => {
                usize::try_from(*remaining)
                    .unwrap_or(usize::MAX)
                    .min(SKIP_READ_HINT)
            }
            State::Transmission => need(REQUEST_HEADER_LEN),
            State::WritePayload { header } => need(header.length as usize),
            State::AwaitList | State::AwaitExport { .. } | State::Closed => 0,
        }
    }

    /// Bytes waiting to be sent.
    pub fn output(&self) -> &[u8] {
        &self.output
    }

    /// Take the bytes waiting to be sent.
    pub fn take_output(&mut self) -> BytesMut {
        self.output.split()
    }

    /// The connection is over (abort, disconnect or a protocol error).
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// Transmission has begun (and not ended).
    pub fn in_transmission(&self) -> bool {
        matches!(
            self.state,
            State::Transmission | State::WritePayload { .. } | State::SkipPayload { .. }
        )
    }

    /// An event is waiting for [`Self::answer_list`] or
    /// [`Self::answer_export`].
    pub fn awaiting_answer(&self) -> bool {
        matches!(self.state, State::AwaitList | State::AwaitExport { .. })
    }

    /// Structured replies were negotiated.
    pub fn structured_replies(&self) -> bool {
        self.structured
    }

    /// The `base:allocation` context id, when it was selected for the export
    /// in transmission.
    pub fn allocation_context(&self) -> Option<u32> {
        self.allocation_context
    }

    /// The export in transmission.
    pub fn export(&self) -> Option<&ExportInfo> {
        self.export.as_ref()
    }

    fn fail(&mut self, e: ProtoError) -> ProtoError {
        self.state = State::Closed;
        self.input.clear();
        e
    }

    /// Advance on buffered input: the next event, `Ok(None)` when more input
    /// (or an answer) is needed, or an error after which the connection
    /// must be closed (send the output first).
    pub fn poll(&mut self) -> Result<Option<Event>, ProtoError> {
        loop {
            match &mut self.state {
                State::Closed | State::AwaitList | State::AwaitExport { .. } => return Ok(None),
                State::ClientFlags => {
                    if self.input.len() < 4 {
                        return Ok(None);
                    }
                    let flags = self.input.get_u32();
                    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
                        return Err(self.fail(ProtoError::UnknownClientFlags(flags)));
                    }
                    self.no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
                    self.state = State::OptionHeader;
                }
                State::OptionHeader => {
                    if self.input.len() < OPTION_HEADER_LEN {
                        return Ok(None);
                    }
                    let magic = self.input.get_u64();
                    if magic != IHAVEOPT {
                        return Err(self.fail(ProtoError::BadOptionMagic(magic)));
                    }
                    let option = self.input.get_u32();
                    let len = self.input.get_u32();
                    if len > self.config.max_option_len {
                        let msg = format!(
                            "option data of {len} bytes exceeds the server's limit of {} bytes",
                            self.config.max_option_len
                        );
                        self.reply_error(option, REP_ERR_TOO_BIG, &msg);
                        if u64::from(len) > self.config.max_skip_len {
                            return Err(self.fail(ProtoError::OptionTooLarge { option, len }));
                        }
                        self.state = State::SkipOption {
                            remaining: u64::from(len),
                        };
                    } else {
                        self.state = State::OptionData {
                            option,
                            len: len as usize,
                        };
                    }
                }
                State::OptionData { option, len } => {
                    let (option, len) = (*option, *len);
                    if self.input.len() < len {
                        return Ok(None);
                    }
                    let data = self.input.split_to(len).freeze();
                    self.state = State::OptionHeader;
                    if let Some(event) = self.handle_option(option, &data)? {
                        return Ok(Some(event));
                    }
                }
                State::SkipOption { remaining } | State::SkipPayload { remaining } => {
                    let n = usize::try_from(*remaining)
                        .unwrap_or(usize::MAX)
                        .min(self.input.len());
                    self.input.advance(n);
                    *remaining -= n as u64;
                    if *remaining > 0 {
                        return Ok(None);
                    }
                    self.state = if matches!(self.state, State::SkipOption { .. }) {
                        State::OptionHeader
                    } else {
                        State::Transmission
                    };
                }
                State::Transmission => {
                    let header = match decode_request_header(&self.input) {
                        Ok(Some(h)) => h,
                        Ok(None) => return Ok(None),
                        Err(e) => return Err(self.fail(e)),
                    };
                    self.input.advance(REQUEST_HEADER_LEN);
                    if let Some(event) = self.handle_request(header)? {
                        return Ok(Some(event));
                    }
                }
                State::WritePayload { header } => {
                    let header = *header;
                    let len = header.length as usize;
                    if self.input.len() < len {
                        return Ok(None);
                    }
                    let data = self.input.split_to(len).freeze();
                    self.state = State::Transmission;
                    return Ok(Some(Event::Request(Request {
                        cookie: header.cookie,
                        flags: header.flags,
                        offset: header.offset,
                        length: header.length,
                        op: Op::Write(data),
                    })));
                }
            }
        }
    }

    /// Answer [`Event::ListExports`] with the export names (names that are
    /// not valid protocol strings are left out). No-op when no list was
    /// asked for.
    pub fn answer_list<S: AsRef<str>>(&mut self, names: &[S]) {
        if !matches!(self.state, State::AwaitList) {
            debug_assert!(false, "answer_list without a pending NBD_OPT_LIST");
            return;
        }
        for name in names {
            let name = name.as_ref();
            if name.len() > MAX_STRING_LEN || name.contains('\0') {
                continue;
            }
            let mut data = BytesMut::with_capacity(4 + name.len());
            data.put_u32(name.len() as u32);
            data.put_slice(name.as_bytes());
            self.reply(OPT_LIST, REP_SERVER, &data);
        }
        self.reply(OPT_LIST, REP_ACK, &[]);
        self.state = State::OptionHeader;
    }

    /// Answer [`Event::ExportQuery`]: describe the export (and for `GO` and
    /// `EXPORT_NAME` enter transmission), or refuse it. A refused
    /// `EXPORT_NAME` is an error: the connection must be closed.
    pub fn answer_export(
        &mut self,
        result: Result<ExportInfo, Refusal>,
    ) -> Result<Answer, ProtoError> {
        let state = std::mem::replace(&mut self.state, State::OptionHeader);
        let State::AwaitExport {
            option,
            kind,
            name,
            info_requests,
        } = state
        else {
            debug_assert!(false, "answer_export without a pending export query");
            self.state = state;
            return Ok(Answer::Negotiating);
        };
        let info = match result {
            Ok(info) => info,
            Err(refusal) => {
                if kind == QueryKind::ExportName {
                    return Err(self.fail(ProtoError::ExportRefused(name)));
                }
                let (ty, msg) = match refusal {
                    Refusal::Unknown(m) => (REP_ERR_UNKNOWN, m),
                    Refusal::Policy(m) => (REP_ERR_POLICY, m),
                    Refusal::Shutdown => (REP_ERR_SHUTDOWN, "server is shutting down".to_owned()),
                };
                self.reply_error(option, ty, &msg);
                return Ok(Answer::Negotiating);
            }
        };
        let flags = info.transmission_flags();
        if kind == QueryKind::ExportName {
            self.output.reserve(8 + 2 + 124);
            self.output.put_u64(info.size);
            self.output.put_u16(flags);
            if !self.no_zeroes {
                self.output.put_bytes(0, 124);
            }
            self.enter_transmission(&name, info);
            return Ok(Answer::Transmission);
        }

        let mut data = BytesMut::with_capacity(64);
        data.put_u16(INFO_EXPORT);
        data.put_u64(info.size);
        data.put_u16(flags);
        self.reply(option, REP_INFO, &data.split());
        if info_requests.contains(&INFO_NAME) {
            data.put_u16(INFO_NAME);
            data.put_slice(name.as_bytes());
            self.reply(option, REP_INFO, &data.split());
        }
        if let (true, Some(desc)) = (
            info_requests.contains(&INFO_DESCRIPTION),
            info.description.as_deref(),
        ) {
            let desc = truncate_str(desc, MAX_STRING_LEN);
            data.put_u16(INFO_DESCRIPTION);
            data.put_slice(desc.as_bytes());
            self.reply(option, REP_INFO, &data.split());
        }
        // Always sent: the maximum is not the protocol's default.
        let max = self.config.max_request_len.max(1);
        let max_pow2 = 1u32 << (31 - max.leading_zeros());
        let preferred = info
            .preferred_block_size
            .clamp(512, 1 << 24)
            .next_power_of_two()
            .min(max_pow2.max(512));
        data.put_u16(INFO_BLOCK_SIZE);
        data.put_u32(1);
        data.put_u32(preferred);
        data.put_u32(max);
        self.reply(option, REP_INFO, &data.split());
        self.reply(option, REP_ACK, &[]);
        if kind == QueryKind::Go {
            self.enter_transmission(&name, info);
            Ok(Answer::Transmission)
        } else {
            Ok(Answer::Negotiating)
        }
    }

    fn enter_transmission(&mut self, name: &str, info: ExportInfo) {
        self.allocation_context = match &self.meta {
            Some(m) if m.allocation && m.export == name => Some(ALLOCATION_CONTEXT_ID),
            _ => None,
        };
        self.export = Some(info);
        self.state = State::Transmission;
    }

    fn reply(&mut self, option: u32, ty: u32, data: &[u8]) {
        self.output.reserve(OPTION_REPLY_HEADER_LEN + data.len());
        self.output.put_u64(OPTION_REPLY_MAGIC);
        self.output.put_u32(option);
        self.output.put_u32(ty);
        self.output.put_u32(data.len() as u32);
        self.output.put_slice(data);
    }

    fn reply_error(&mut self, option: u32, ty: u32, message: &str) {
        let msg = truncate_str(message, MAX_STRING_LEN);
        self.reply(option, ty, msg.as_bytes());
    }

    fn handle_option(&mut self, option: u32, data: &[u8]) -> Result<Option<Event>, ProtoError> {
        match option {
            OPT_EXPORT_NAME => {
                let Some(name) = parse_string(data) else {
                    return Err(self.fail(ProtoError::BadExportName));
                };
                self.state = State::AwaitExport {
                    option,
                    kind: QueryKind::ExportName,
                    name: name.clone(),
                    info_requests: Vec::new(),
                };
                Ok(Some(Event::ExportQuery {
                    name,
                    kind: QueryKind::ExportName,
                }))
            }
            OPT_ABORT => {
                // Data, if any, is ignored (the spec says so).
                self.reply(option, REP_ACK, &[]);
                self.state = State::Closed;
                self.input.clear();
                Ok(Some(Event::Abort))
            }
            OPT_LIST => {
                if !data.is_empty() {
                    self.reply_error(option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
                    return Ok(None);
                }
                self.state = State::AwaitList;
                Ok(Some(Event::ListExports))
            }
            OPT_STARTTLS => {
                if data.is_empty() {
                    self.reply_error(option, REP_ERR_POLICY, "TLS is not offered by this server");
                } else {
                    self.reply_error(option, REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data");
                }
                Ok(None)
            }
            OPT_INFO | OPT_GO => match parse_info(data) {
                Ok((name, info_requests)) => {
                    let kind = if option == OPT_GO {
                        QueryKind::Go
                    } else {
                        QueryKind::Info
                    };
                    self.state = State::AwaitExport {
                        option,
                        kind,
                        name: name.clone(),
                        info_requests,
                    };
                    Ok(Some(Event::ExportQuery { name, kind }))
                }
                Err(msg) => {
                    self.reply_error(option, REP_ERR_INVALID, msg);
                    Ok(None)
                }
            },
            OPT_STRUCTURED_REPLY => {
                if data.is_empty() {
                    self.structured = true;
                    self.reply(option, REP_ACK, &[]);
                } else {
                    self.reply_error(
                        option,
                        REP_ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    );
                }
                Ok(None)
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = option == OPT_SET_META_CONTEXT;
                if set {
                    // Replaced even when this request fails.
                    self.meta = None;
                }
                if !self.structured {
                    self.reply_error(
                        option,
                        REP_ERR_INVALID,
                        "metadata contexts need structured replies first",
                    );
                    return Ok(None);
                }
                let (export, queries) = match parse_meta(data) {
                    Ok(v) => v,
                    Err(msg) => {
                        self.reply_error(option, REP_ERR_INVALID, msg);
                        return Ok(None);
                    }
                };
                let allocation = if set {
                    queries.iter().any(|q| q == META_BASE_ALLOCATION)
                } else {
                    queries.is_empty()
                        || queries
                            .iter()
                            .any(|q| q == "base:" || q == META_BASE_ALLOCATION)
                };
                if allocation {
                    let id = if set { ALLOCATION_CONTEXT_ID } else { 0 };
                    let mut data = BytesMut::with_capacity(4 + META_BASE_ALLOCATION.len());
                    data.put_u32(id);
                    data.put_slice(META_BASE_ALLOCATION.as_bytes());
                    self.reply(option, REP_META_CONTEXT, &data);
                }
                self.reply(option, REP_ACK, &[]);
                if set {
                    self.meta = Some(MetaSelection { export, allocation });
                }
                Ok(None)
            }
            _ => {
                let msg = format!("option {option} is not supported");
                self.reply_error(option, REP_ERR_UNSUP, &msg);
                Ok(None)
            }
        }
    }

    fn handle_request(&mut self, h: RequestHeader) -> Result<Option<Event>, ProtoError> {
        if h.command == CMD_DISC {
            self.state = State::Closed;
            self.input.clear();
            return Ok(Some(Event::Disconnect));
        }
        match self.validate(&h) {
            Ok(op) => {
                if h.command == CMD_WRITE && h.length > 0 {
                    self.state = State::WritePayload { header: h };
                    return Ok(None);
                }
                Ok(Some(Event::Request(Request {
                    cookie: h.cookie,
                    flags: h.flags,
                    offset: h.offset,
                    length: h.length,
                    op,
                })))
            }
            Err((errno, msg)) => {
                encode_error_reply(&mut self.output, self.structured, h.cookie, errno, msg);
                if h.command == CMD_WRITE && h.length > 0 {
                    if u64::from(h.length) > self.config.max_skip_len {
                        return Err(self.fail(ProtoError::PayloadTooLarge(h.length)));
                    }
                    self.state = State::SkipPayload {
                        remaining: u64::from(h.length),
                    };
                }
                Ok(Some(Event::Rejected {
                    cookie: h.cookie,
                    command: h.command,
                    errno,
                }))
            }
        }
    }

    fn validate(&self, h: &RequestHeader) -> Result<Op, (Errno, &'static str)> {
        let Some(info) = &self.export else {
            return Err((Errno::Inval, "no export"));
        };
        let allowed = match h.command {
            CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
            CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
            _ => CMD_FLAG_FUA,
        };
        if h.flags & !allowed != 0 {
            return Err((Errno::Inval, "unsupported command flags"));
        }
        let end = h.offset.checked_add(u64::from(h.length));
        let in_range = end.is_some_and(|e| e <= info.size);
        let max = self.config.max_request_len;
        match h.command {
            CMD_READ => {
                if h.length > max {
                    return Err((Errno::Inval, "read length exceeds the maximum block size"));
                }
                if !in_range {
                    return Err((Errno::Inval, "read beyond the end of the export"));
                }
                Ok(Op::Read)
            }
            CMD_WRITE => {
                if h.length > max {
                    return Err((Errno::Inval, "write length exceeds the maximum block size"));
                }
                if info.read_only {
                    return Err((Errno::Perm, "export is read-only"));
                }
                if !in_range {
                    return Err((Errno::NoSpc, "write beyond the end of the export"));
                }
                Ok(Op::Write(Bytes::new()))
            }
            CMD_FLUSH => {
                if h.offset != 0 || h.length != 0 {
                    return Err((Errno::Inval, "flush offset and length must be zero"));
                }
                Ok(Op::Flush)
            }
            CMD_TRIM => {
                if info.read_only {
                    return Err((Errno::Perm, "export is read-only"));
                }
                if !in_range {
                    return Err((Errno::Inval, "trim beyond the end of the export"));
                }
                Ok(Op::Trim)
            }
            CMD_CACHE => {
                if !in_range {
                    return Err((Errno::Inval, "cache beyond the end of the export"));
                }
                Ok(Op::Cache)
            }
            CMD_WRITE_ZEROES => {
                if info.read_only {
                    return Err((Errno::Perm, "export is read-only"));
                }
                if !in_range {
                    return Err((Errno::NoSpc, "write zeroes beyond the end of the export"));
                }
                Ok(Op::WriteZeroes)
            }
            CMD_BLOCK_STATUS => {
                if self.allocation_context.is_none() {
                    return Err((Errno::Inval, "no metadata context was negotiated"));
                }
                if h.length == 0 {
                    return Err((Errno::Inval, "block status length must not be zero"));
                }
                if !in_range {
                    return Err((Errno::Inval, "block status beyond the end of the export"));
                }
                Ok(Op::BlockStatus)
            }
            _ => Err((Errno::Inval, "unknown command")),
        }
    }
}

/// `NBD_OPT_INFO`/`NBD_OPT_GO` data: name, then info requests.
fn parse_info(data: &[u8]) -> Result<(String, Vec<u16>), &'static str> {
    let mut b = data;
    if b.len() < 6 {
        return Err("option data too short");
    }
    let name_len = b.get_u32() as usize;
    if name_len > b.len() - 2 {
        return Err("export name length exceeds the option data");
    }
    let name = parse_string(&b[..name_len]).ok_or("export name is not a valid string")?;
    b.advance(name_len);
    let count = b.get_u16() as usize;
    if b.len() != count * 2 {
        return Err("information request count does not match the option length");
    }
    let requests = (0..count).map(|_| b.get_u16()).collect();
    Ok((name, requests))
}

/// `NBD_OPT_{LIST,SET}_META_CONTEXT` data: name, then queries.
fn parse_meta(data: &[u8]) -> Result<(String, Vec<String>), &'static str> {
    let mut b = data;
    let name = take_string(&mut b).ok_or("malformed export name")?;
    if b.len() < 4 {
        return Err("missing query count");
    }
    let count = b.get_u32() as usize;
    if count > b.len() / 4 {
        return Err("query count exceeds the option data");
    }
    let mut queries = Vec::with_capacity(count);
    for _ in 0..count {
        queries.push(take_string(&mut b).ok_or("malformed query")?);
    }
    if !b.is_empty() {
        return Err("trailing bytes after the queries");
    }
    Ok((name, queries))
}

/// A `len u32` + bytes string from the front of `b`.
fn take_string(b: &mut &[u8]) -> Option<String> {
    if b.len() < 4 {
        return None;
    }
    let len = b.get_u32() as usize;
    if len > b.len() {
        return None;
    }
    let s = parse_string(&b[..len])?;
    b.advance(len);
    Some(s)
}

#[cfg(test)]
mod tests;
