//! Predictive prefetch, sans IO (issue 6/8): what to fetch for an export
//! before the reader asks for it. Pure computation: no tokio, no store, no
//! clock; the node's prefetch task feeds events in and issues the fetches
//! [`Planner::next`] asks for.
//!
//! # Profile
//!
//! A [`Profile`] condenses an object's access traces ([`crate::trace`]) into
//! one prefetch order. Per chunk it keeps integer statistics over the
//! traces that touched it: `count` (number of traces), `sum_ms` (sum of the
//! first-touch times) and `min_ms` (earliest first touch). Entries are
//! ordered by mean time (`sum_ms / count`, integer division), then `min_ms`,
//! then chunk index: a total order with no floating point, so the result
//! depends only on the statistics.
//!
//! **Merge** adds counts and sums and takes the minimum of minima per chunk,
//! then re-sorts. It is commutative: `a.merge(&b)` and `b.merge(&a)` have
//! byte-identical encodings. **Bound:** a profile holds at most
//! `max_entries` entries (never more than [`Profile::MAX_ENTRIES`]); over
//! the bound it keeps the entries with the highest `count` (ties: earlier
//! mean, then lower chunk index) and re-sorts them. Without truncation merge
//! is also associative (all operations are integer additions and minima;
//! additions saturate, which stays associative for unsigned values). Once
//! truncation drops entries it is **not** associative: an entry dropped by an
//! intermediate merge loses its statistics, so `(a ∪ b) ∪ c` may differ from
//! `a ∪ (b ∪ c)`.
//!
//! Encoding (little-endian): magic `CPF1`, u32 entry count, then per entry
//! u32 chunk, u32 count, u64 sum_ms, u32 min_ms (20 bytes). Decoding accepts
//! only canonical encodings: entries strictly in prefetch order, no
//! duplicate chunks, `count >= 1`, `min_ms * count <= sum_ms`.
//!
//! # Successors
//!
//! [`Successors`] is a first-order model of the reader: for each chunk, the
//! chunks touched right after it (consecutive first touches `a -> b` in a
//! trace) with how often. **Bounds:** at most [`Successors::MAX_PER_CHUNK`]
//! successors per chunk (keeping the highest counts; ties: lower successor
//! index) and at most [`Successors::MAX_CHUNKS`] chunks (keeping the chunks
//! whose kept successors have the highest total count; ties: lower chunk
//! index). Merge adds counts and then truncates, so it is commutative (and,
//! like profiles, associative only while nothing is truncated). Prediction
//! follows the most likely successor not yet on the path (ties: lower index).
//!
//! Encoding: magic `CSU1`, u32 chunk count, then per chunk (ascending) u32
//! chunk, u8 successor count (1..=4), and per successor (canonical order:
//! count descending, then index ascending) u32 chunk and u32 count.
//!
//! # Planner
//!
//! A [`Planner`] drives the prefetch of one open export. It walks the
//! profile order, skipping chunks that are local, read, in flight, failed or
//! already prefetched.
//!
//! *Cursor.* The reader's cursor is one past the position, in the profile
//! order, of the furthest profile chunk the reader has touched. Prefetch
//! only considers positions at or after the cursor.
//!
//! *Lead.* A prefetched chunk that is not read yet and is still on the
//! reader's predicted path (at or after the cursor in the profile, or in the
//! current successor prediction) counts against `lead_bytes`; the planner
//! never issues a chunk that would take that total above `lead_bytes`, and
//! never has more than `max_inflight` requests in flight. A chunk leaves the
//! path when the reader passes it (the cursor moves beyond it), when a new
//! successor prediction no longer contains it, or when the reader leaves the
//! profile (see below). Chunks that leave the path unread are what
//! [`PlannerStats::wasted`] counts if they are never read; each such
//! event can strand at most `lead_bytes`.
//!
//! *Leaving the profile.* When there is no profile, every read predicts from
//! its last chunk with the successor model. With a profile, a demand miss on
//! a chunk not in the profile means the reader left the recorded path: if
//! there is a successor model, the profile stream is suspended, its unread
//! prefetches stop counting against the lead, and the successor model
//! predicts from the chunk just read (depth: as many chunks as fit in the
//! lead); predictions go ahead of the profile. Every further read off the
//! profile predicts again. When the reader touches a profile chunk again,
//! the successor prediction is dropped, the profile stream resumes from the
//! cursor and its unread prefetches ahead of the cursor count again. Without
//! a successor model the profile stream simply continues (it stalls at the
//! lead since the reader reads none of it).

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap, VecDeque};

use crate::trace::TraceEntry;

/// Why a profile or successor model could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PrefetchError {
    /// The bytes do not start with the expected magic.
    #[error("bad magic")]
    BadMagic,
    /// The bytes end early.
    #[error("truncated")]
    Truncated,
    /// Bytes follow the last entry.
    #[error("{0} trailing bytes")]
    Trailing(usize),
    /// More entries than allowed.
    #[error("{count} entries, at most {max} allowed")]
    TooMany {
        /// Entries claimed.
        count: u64,
        /// The bound.
        max: u64,
    },
    /// A chunk appears twice.
    #[error("chunk {0} appears twice")]
    Duplicate(u32),
    /// Entries are not in canonical order.
    #[error("entry {0} out of order")]
    OutOfOrder(usize),
    /// An entry's values are impossible.
    #[error("entry {index}: {why}")]
    Invalid {
        /// Entry index.
        index: usize,
        /// What is wrong.
        why: &'static str,
    },
}

/// A small little-endian reader over untrusted bytes.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], PrefetchError> {
        let (h, t) = self
            .0
            .split_first_chunk::<N>()
            .ok_or(PrefetchError::Truncated)?;
        self.0 = t;
        Ok(*h)
    }
    fn u8(&mut self) -> Result<u8, PrefetchError> {
        Ok(self.take::<1>()?[0])
    }
    fn u32(&mut self) -> Result<u32, PrefetchError> {
        Ok(u32::from_le_bytes(self.take()?))
    }
    fn u64(&mut self) -> Result<u64, PrefetchError> {
        Ok(u64::from_le_bytes(self.take()?))
    }
    fn magic(&mut self, m: &[u8; 4]) -> Result<(), PrefetchError> {
        match self.0.strip_prefix(m) {
            Some(r) => {
                self.0 = r;
                Ok(())
            }
            None => Err(PrefetchError::BadMagic),
        }
    }
    fn end(&self) -> Result<(), PrefetchError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(PrefetchError::Trailing(self.0.len()))
        }
    }
}

// ---------------------------------------------------------------- profile

/// Statistics of one chunk over the traces that touched it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProfileEntry {
    /// Chunk index in the object's recipe.
    pub chunk: u32,
    /// Number of traces that touched it (at least 1).
    pub count: u32,
    /// Sum of its first-touch times, in ms.
    pub sum_ms: u64,
    /// Earliest first-touch time, in ms.
    pub min_ms: u32,
}

impl ProfileEntry {
    /// Mean first-touch time in ms (integer division).
    pub fn mean_ms(&self) -> u64 {
        self.sum_ms / u64::from(self.count.max(1))
    }

    fn order_key(&self) -> (u64, u32, u32) {
        (self.mean_ms(), self.min_ms, self.chunk)
    }

    fn keep_key(&self) -> (Reverse<u32>, u64, u32) {
        (Reverse(self.count), self.mean_ms(), self.chunk)
    }

    fn add(&mut self, o: &ProfileEntry) {
        self.count = self.count.saturating_add(o.count);
        self.sum_ms = self.sum_ms.saturating_add(o.sum_ms);
        self.min_ms = self.min_ms.min(o.min_ms);
    }
}

/// A prefetch order learned from access traces; see the module docs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Profile {
    entries: Vec<ProfileEntry>,
}

const PROFILE_MAGIC: &[u8; 4] = b"CPF1";
const PROFILE_ENTRY_LEN: usize = 20;

impl Profile {
    /// The most entries a profile may hold (and decode accepts).
    pub const MAX_ENTRIES: usize = 1 << 20;

    /// A profile of `traces`, at most `max_entries` entries (clamped to
    /// [`Self::MAX_ENTRIES`]). A chunk that appears twice in one trace
    /// counts once, with its first time.
    pub fn from_traces(traces: &[Vec<TraceEntry>], max_entries: usize) -> Profile {
        let mut acc: HashMap<u32, (ProfileEntry, usize)> = HashMap::new();
        for (ti, t) in traces.iter().enumerate() {
            for e in t {
                let ms = u64::from(e.ms);
                match acc.get_mut(&e.chunk) {
                    Some((_, seen)) if *seen == ti => {}
                    Some((p, seen)) => {
                        *seen = ti;
                        p.add(&ProfileEntry {
                            chunk: e.chunk,
                            count: 1,
                            sum_ms: ms,
                            min_ms: e.ms,
                        });
                    }
                    None => {
                        acc.insert(
                            e.chunk,
                            (
                                ProfileEntry {
                                    chunk: e.chunk,
                                    count: 1,
                                    sum_ms: ms,
                                    min_ms: e.ms,
                                },
                                ti,
                            ),
                        );
                    }
                }
            }
        }
        Self::finish(acc.into_values().map(|(e, _)| e).collect(), max_entries)
    }

    /// Truncate to the bound and sort in prefetch order.
    fn finish(mut v: Vec<ProfileEntry>, max_entries: usize) -> Profile {
        let max = max_entries.min(Self::MAX_ENTRIES);
        if v.len() > max {
            v.sort_unstable_by_key(ProfileEntry::keep_key);
            v.truncate(max);
        }
        v.sort_unstable_by_key(ProfileEntry::order_key);
        Profile { entries: v }
    }

    /// Both profiles' statistics added per chunk, truncated to
    /// `max_entries`. Commutative; associative only while nothing is
    /// truncated (see the module docs).
    pub fn merge(&self, other: &Profile, max_entries: usize) -> Profile {
        let mut m: BTreeMap<u32, ProfileEntry> = BTreeMap::new();
        for e in self.entries.iter().chain(other.entries.iter()) {
            m.entry(e.chunk).and_modify(|p| p.add(e)).or_insert(*e);
        }
        Self::finish(m.into_values().collect(), max_entries)
    }

    /// Chunk indices in prefetch order.
    pub fn order(&self) -> Vec<u32> {
        self.entries.iter().map(|e| e.chunk).collect()
    }

    /// The entries, in prefetch order.
    pub fn entries(&self) -> &[ProfileEntry] {
        &self.entries
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the profile is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Encode (see the module docs).
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(8 + self.entries.len() * PROFILE_ENTRY_LEN);
        v.extend_from_slice(PROFILE_MAGIC);
        v.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for e in &self.entries {
            v.extend_from_slice(&e.chunk.to_le_bytes());
            v.extend_from_slice(&e.count.to_le_bytes());
            v.extend_from_slice(&e.sum_ms.to_le_bytes());
            v.extend_from_slice(&e.min_ms.to_le_bytes());
        }
        v
    }

    /// Decode a canonical encoding; anything else is an error.
    pub fn decode(b: &[u8]) -> Result<Profile, PrefetchError> {
        let mut r = Reader(b);
        r.magic(PROFILE_MAGIC)?;
        let n = r.u32()? as usize;
        if n > Self::MAX_ENTRIES {
            return Err(PrefetchError::TooMany {
                count: n as u64,
                max: Self::MAX_ENTRIES as u64,
            });
        }
        if r.0.len() < n * PROFILE_ENTRY_LEN {
            return Err(PrefetchError::Truncated);
        }
        let mut entries = Vec::with_capacity(n);
        let mut seen = std::collections::HashSet::with_capacity(n);
        for index in 0..n {
            let e = ProfileEntry {
                chunk: r.u32()?,
                count: r.u32()?,
                sum_ms: r.u64()?,
                min_ms: r.u32()?,
            };
            if e.count == 0 {
                return Err(PrefetchError::Invalid {
                    index,
                    why: "count is zero",
                });
            }
            if u64::from(e.min_ms) * u64::from(e.count) > e.sum_ms {
                return Err(PrefetchError::Invalid {
                    index,
                    why: "min_ms above the mean",
                });
            }
            if !seen.insert(e.chunk) {
                return Err(PrefetchError::Duplicate(e.chunk));
            }
            if let Some(prev) = entries.last() {
                if ProfileEntry::order_key(prev) >= e.order_key() {
                    return Err(PrefetchError::OutOfOrder(index));
                }
            }
            entries.push(e);
        }
        r.end()?;
        Ok(Profile { entries })
    }
}

// ------------------------------------------------------------- successors

/// Which chunks follow which; see the module docs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Successors {
    /// chunk -> (successor, count), canonical order: count descending, then
    /// successor ascending; 1..=MAX_PER_CHUNK entries.
    map: BTreeMap<u32, Vec<(u32, u32)>>,
}

const SUCC_MAGIC: &[u8; 4] = b"CSU1";

fn succ_key(&(next, count): &(u32, u32)) -> (Reverse<u32>, u32) {
    (Reverse(count), next)
}

impl Successors {
    /// Successors kept per chunk.
    pub const MAX_PER_CHUNK: usize = 4;
    /// Chunks kept.
    pub const MAX_CHUNKS: usize = 1 << 18;

    /// An empty model.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of chunks with successors.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether nothing was learned.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The kept successors of `chunk`, most likely first, with counts.
    pub fn successors(&self, chunk: u32) -> &[(u32, u32)] {
        self.map.get(&chunk).map_or(&[], Vec::as_slice)
    }

    /// Build a canonical, bounded model from raw pair counts.
    fn from_pairs(pairs: BTreeMap<u32, BTreeMap<u32, u32>>) -> Self {
        let mut map: BTreeMap<u32, Vec<(u32, u32)>> = BTreeMap::new();
        for (a, nexts) in pairs {
            let mut v: Vec<(u32, u32)> = nexts.into_iter().filter(|&(_, c)| c > 0).collect();
            v.sort_unstable_by_key(succ_key);
            v.truncate(Self::MAX_PER_CHUNK);
            if !v.is_empty() {
                map.insert(a, v);
            }
        }
        if map.len() > Self::MAX_CHUNKS {
            let mut totals: Vec<(Reverse<u64>, u32)> = map
                .iter()
                .map(|(&a, v)| (Reverse(v.iter().map(|&(_, c)| u64::from(c)).sum()), a))
                .collect();
            totals.sort_unstable();
            for &(_, a) in &totals[Self::MAX_CHUNKS..] {
                map.remove(&a);
            }
        }
        Successors { map }
    }

    fn pairs(&self, into: &mut BTreeMap<u32, BTreeMap<u32, u32>>) {
        for (&a, v) in &self.map {
            let m = into.entry(a).or_default();
            for &(b, c) in v {
                let e = m.entry(b).or_insert(0);
                *e = e.saturating_add(c);
            }
        }
    }

    /// Learn the consecutive first touches `a -> b` of `trace` (self-loops
    /// are ignored). Same as merging with a model of the trace alone.
    pub fn learn(&mut self, trace: &[TraceEntry]) {
        let mut p: BTreeMap<u32, BTreeMap<u32, u32>> = BTreeMap::new();
        for w in trace.windows(2) {
            if let [a, b] = w {
                if a.chunk != b.chunk {
                    let e = p.entry(a.chunk).or_default().entry(b.chunk).or_insert(0);
                    *e = e.saturating_add(1);
                }
            }
        }
        *self = self.merge(&Self::from_pairs(p));
    }

    /// Counts added per pair, then truncated to the bounds. Commutative.
    pub fn merge(&self, other: &Successors) -> Successors {
        let mut p = BTreeMap::new();
        self.pairs(&mut p);
        other.pairs(&mut p);
        Self::from_pairs(p)
    }

    /// Up to `depth` chunks likely to follow `chunk`: from each chunk, the
    /// most likely successor not already on the path (nor `chunk` itself);
    /// stops when there is none. Deterministic (ties: lower index).
    pub fn predict(&self, chunk: u32, depth: usize) -> Vec<u32> {
        let mut out = Vec::new();
        let mut seen = std::collections::HashSet::new();
        seen.insert(chunk);
        let mut cur = chunk;
        while out.len() < depth {
            let next = self
                .successors(cur)
                .iter()
                .map(|&(b, _)| b)
                .find(|b| !seen.contains(b));
            match next {
                Some(b) => {
                    seen.insert(b);
                    out.push(b);
                    cur = b;
                }
                None => break,
            }
        }
        out
    }

    /// Encode (see the module docs).
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(8 + self.map.len() * 40);
        v.extend_from_slice(SUCC_MAGIC);
        v.extend_from_slice(&(self.map.len() as u32).to_le_bytes());
        for (&a, s) in &self.map {
            v.extend_from_slice(&a.to_le_bytes());
            v.push(s.len() as u8);
            for &(b, c) in s {
                v.extend_from_slice(&b.to_le_bytes());
                v.extend_from_slice(&c.to_le_bytes());
            }
        }
        v
    }

    /// Decode a canonical encoding; anything else is an error.
    pub fn decode(b: &[u8]) -> Result<Successors, PrefetchError> {
        let mut r = Reader(b);
        r.magic(SUCC_MAGIC)?;
        let n = r.u32()? as usize;
        if n > Self::MAX_CHUNKS {
            return Err(PrefetchError::TooMany {
                count: n as u64,
                max: Self::MAX_CHUNKS as u64,
            });
        }
        // Each chunk takes at least 13 bytes: no allocation beyond the input.
        if r.0.len() < n * 13 {
            return Err(PrefetchError::Truncated);
        }
        let mut map = BTreeMap::new();
        let mut prev: Option<u32> = None;
        for index in 0..n {
            let a = r.u32()?;
            if prev == Some(a) {
                return Err(PrefetchError::Duplicate(a));
            }
            if prev.is_some_and(|p| p > a) {
                return Err(PrefetchError::OutOfOrder(index));
            }
            prev = Some(a);
            let k = usize::from(r.u8()?);
            if k == 0 || k > Self::MAX_PER_CHUNK {
                return Err(PrefetchError::Invalid {
                    index,
                    why: "successor count not in 1..=MAX_PER_CHUNK",
                });
            }
            let mut v: Vec<(u32, u32)> = Vec::with_capacity(k);
            for _ in 0..k {
                let s = (r.u32()?, r.u32()?);
                if s.1 == 0 {
                    return Err(PrefetchError::Invalid {
                        index,
                        why: "zero count",
                    });
                }
                if s.0 == a {
                    return Err(PrefetchError::Invalid {
                        index,
                        why: "chunk follows itself",
                    });
                }
                if let Some(p) = v.last() {
                    if p.0 == s.0 {
                        return Err(PrefetchError::Duplicate(s.0));
                    }
                    if succ_key(p) >= succ_key(&s) {
                        return Err(PrefetchError::OutOfOrder(index));
                    }
                }
                v.push(s);
            }
            map.insert(a, v);
        }
        r.end()?;
        Ok(Successors { map })
    }
}

// ---------------------------------------------------------------- planner

const LOCAL: u8 = 1;
const READ: u8 = 2;
const INFLIGHT: u8 = 4;
const FAILED: u8 = 8;
/// Requested by this planner (and not failed).
const PREFETCHED: u8 = 16;
/// Requested because of a successor prediction.
const FROM_SUCC: u8 = 32;
/// Counts against the lead.
const COUNTED: u8 = 64;
const NOT_IN_PROFILE: u32 = u32::MAX;
/// Deepest successor prediction.
const MAX_PREDICT: usize = 4096;

/// What a planner did so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlannerStats {
    /// Chunks requested by prefetch (including ones that later failed).
    pub prefetched: u64,
    /// Their bytes.
    pub prefetched_bytes: u64,
    /// Reads of chunks prefetch requested (first touch only).
    pub hits: u64,
    /// Their bytes.
    pub hit_bytes: u64,
    /// Of the hits, chunks requested because of a successor prediction.
    pub successor_hits: u64,
    /// Prefetched (arrived or in flight), not failed, not read yet.
    pub wasted: u64,
    /// Their bytes.
    pub wasted_bytes: u64,
    /// Reads that had to wait for a fetch.
    pub demand_misses: u64,
    /// Chunks requested from the profile order.
    pub from_profile: u64,
    /// Chunks requested from successor predictions.
    pub from_successors: u64,
    /// Prefetches given up on.
    pub failed: u64,
    /// Requests in flight now.
    pub in_flight: usize,
    /// Bytes counting against the lead now.
    pub lead_used_bytes: u64,
}

/// The prefetch plan of one open export; see the module docs.
#[derive(Debug)]
pub struct Planner {
    lens: Vec<u32>,
    flags: Vec<u8>,
    /// Profile order, restricted to chunks of the object.
    order: Vec<u32>,
    /// Chunk -> position in `order`, or NOT_IN_PROFILE.
    pos: Vec<u32>,
    successors: Option<Successors>,
    /// Positions before it are behind the reader.
    cursor: usize,
    /// Next profile position to consider; `>= cursor`.
    scan: usize,
    /// The reader left the profile and the successor model leads.
    diverged: bool,
    /// Profile prefetches released when the reader left the profile.
    written_off: Vec<u32>,
    /// Successor predictions not issued yet, in order.
    chain: VecDeque<u32>,
    /// Successor prefetches that count against the lead.
    succ_counted: Vec<u32>,
    lead: u64,
    /// Shortest non-empty chunk (sizes successor predictions).
    min_len: u32,
    max_inflight: usize,
    used: u64,
    inflight: usize,
    stats: PlannerStats,
}

impl Planner {
    /// A planner for an object whose chunk `i` is `chunk_lens[i]` bytes long
    /// and already in the store if `local[i]` (missing entries: not local).
    /// `lead_bytes` bounds the unread prefetched bytes ahead of the reader
    /// (it should be at least one chunk, or nothing is prefetched);
    /// `max_inflight` bounds the requests in flight. Profile or successor
    /// entries naming chunks beyond the object are ignored.
    pub fn new(
        profile: Option<Profile>,
        successors: Option<Successors>,
        chunk_lens: Vec<u32>,
        local: Vec<bool>,
        lead_bytes: u64,
        max_inflight: usize,
    ) -> Planner {
        let n = chunk_lens.len();
        let min_len = chunk_lens
            .iter()
            .copied()
            .filter(|&l| l > 0)
            .min()
            .unwrap_or(1);
        let flags: Vec<u8> = (0..n)
            .map(|i| {
                if local.get(i).copied().unwrap_or(false) {
                    LOCAL
                } else {
                    0
                }
            })
            .collect();
        let mut pos = vec![NOT_IN_PROFILE; n];
        let mut order = Vec::new();
        for c in profile
            .iter()
            .flat_map(|p| p.entries.iter().map(|e| e.chunk))
        {
            if let Some(p) = pos.get_mut(c as usize) {
                if *p == NOT_IN_PROFILE {
                    *p = order.len() as u32;
                    order.push(c);
                }
            }
        }
        Planner {
            lens: chunk_lens,
            flags,
            order,
            pos,
            successors: successors.filter(|s| !s.is_empty()),
            cursor: 0,
            scan: 0,
            diverged: false,
            written_off: Vec::new(),
            chain: VecDeque::new(),
            succ_counted: Vec::new(),
            lead: lead_bytes,
            min_len,
            max_inflight,
            used: 0,
            inflight: 0,
            stats: PlannerStats::default(),
        }
    }

    fn len_of(&self, c: u32) -> u64 {
        u64::from(self.lens.get(c as usize).copied().unwrap_or(0))
    }

    fn flag(&self, c: u32) -> u8 {
        self.flags.get(c as usize).copied().unwrap_or(0)
    }

    fn eligible(&self, c: u32) -> bool {
        (c as usize) < self.flags.len()
            && self.flag(c) & (LOCAL | READ | INFLIGHT | FAILED | PREFETCHED) == 0
    }

    /// Stop counting `c` against the lead.
    fn release(&mut self, c: u32) {
        let len = self.len_of(c);
        if let Some(f) = self.flags.get_mut(c as usize) {
            if *f & COUNTED != 0 {
                *f &= !COUNTED;
                self.used = self.used.saturating_sub(len);
            }
        }
    }

    /// Count `c` against the lead again if it is an unread prefetch.
    fn recount(&mut self, c: u32) {
        let len = self.len_of(c);
        if let Some(f) = self.flags.get_mut(c as usize) {
            if *f & (PREFETCHED | READ | COUNTED) == PREFETCHED {
                *f |= COUNTED;
                self.used += len;
            }
        }
    }

    fn touch(&mut self, c: u32) {
        let len = self.len_of(c);
        let Some(f) = self.flags.get_mut(c as usize) else {
            return;
        };
        if *f & READ != 0 {
            return;
        }
        *f |= READ;
        if *f & PREFETCHED != 0 {
            self.stats.hits += 1;
            self.stats.hit_bytes += len;
            if *f & FROM_SUCC != 0 {
                self.stats.successor_hits += 1;
            }
            self.stats.wasted = self.stats.wasted.saturating_sub(1);
            self.stats.wasted_bytes = self.stats.wasted_bytes.saturating_sub(len);
        }
        self.release(c);
    }

    /// Replace the successor prediction with one from `chunk`.
    fn predict_from(&mut self, chunk: u32) {
        let Some(s) = &self.successors else {
            return;
        };
        let depth = usize::try_from(self.lead / u64::from(self.min_len))
            .unwrap_or(MAX_PREDICT)
            .min(MAX_PREDICT);
        let mut budget = self.lead;
        let mut chain = VecDeque::new();
        for c in s.predict(chunk, depth) {
            if (c as usize) >= self.lens.len() {
                break;
            }
            let len = self.len_of(c);
            if len > budget {
                break;
            }
            budget -= len;
            chain.push_back(c);
        }
        // Earlier successor prefetches off the new path stop counting.
        let on_path: std::collections::HashSet<u32> = chain.iter().copied().collect();
        let old = std::mem::take(&mut self.succ_counted);
        for c in old {
            if on_path.contains(&c) && self.flag(c) & COUNTED != 0 {
                self.succ_counted.push(c);
            } else {
                self.release(c);
            }
        }
        self.chain = chain;
    }

    /// The reader touched chunks `first..=last` (call when the read starts);
    /// `demand_miss`: it had to wait for a fetch.
    pub fn on_read(&mut self, first: u32, last: u32, demand_miss: bool) {
        if demand_miss {
            self.stats.demand_misses += 1;
        }
        let n = self.lens.len();
        if n == 0 || first as usize >= n || first > last {
            return;
        }
        let last = last.min((n - 1) as u32);
        let mut furthest: Option<usize> = None;
        let mut off_profile = false;
        for c in first..=last {
            self.touch(c);
            match self.pos.get(c as usize).copied() {
                Some(p) if p != NOT_IN_PROFILE => {
                    furthest = Some(furthest.map_or(p as usize, |f| f.max(p as usize)));
                }
                _ => off_profile = true,
            }
        }
        if let Some(p) = furthest {
            // On the recorded path.
            if self.diverged {
                self.diverged = false;
                self.chain.clear();
                for c in std::mem::take(&mut self.succ_counted) {
                    self.release(c);
                }
            }
            if p + 1 > self.cursor {
                for q in self.cursor..=p {
                    if let Some(&c) = self.order.get(q) {
                        self.release(c);
                    }
                }
                self.cursor = p + 1;
                self.scan = self.scan.max(self.cursor);
            }
            for c in std::mem::take(&mut self.written_off) {
                if self
                    .pos
                    .get(c as usize)
                    .is_some_and(|&q| q as usize >= self.cursor)
                {
                    self.recount(c);
                }
            }
        } else if off_profile && self.successors.is_some() {
            if self.order.is_empty() || self.diverged {
                self.predict_from(last);
            } else if demand_miss {
                // The reader left the recorded path: the successor model leads.
                self.diverged = true;
                let end = self.scan.min(self.order.len());
                for q in self.cursor..end {
                    let c = self.order[q];
                    let f = self.flag(c);
                    if f & COUNTED != 0 && f & FROM_SUCC == 0 {
                        self.release(c);
                        self.written_off.push(c);
                    }
                }
                self.predict_from(last);
            }
        }
    }

    /// A chunk this planner asked for arrived (or turned out local).
    pub fn on_fetched(&mut self, chunk: u32) {
        if let Some(f) = self.flags.get_mut(chunk as usize) {
            if *f & INFLIGHT != 0 {
                *f &= !INFLIGHT;
                self.inflight = self.inflight.saturating_sub(1);
            }
            *f |= LOCAL;
        }
    }

    /// Gave up on `chunk`: it is not asked for again.
    pub fn on_failed(&mut self, chunk: u32) {
        let len = self.len_of(chunk);
        self.release(chunk);
        if let Some(f) = self.flags.get_mut(chunk as usize) {
            if *f & INFLIGHT != 0 {
                *f &= !INFLIGHT;
                self.inflight = self.inflight.saturating_sub(1);
            }
            if *f & (PREFETCHED | READ) == PREFETCHED {
                self.stats.wasted = self.stats.wasted.saturating_sub(1);
                self.stats.wasted_bytes = self.stats.wasted_bytes.saturating_sub(len);
            }
            if *f & PREFETCHED != 0 && *f & FAILED == 0 {
                self.stats.failed += 1;
            }
            *f = (*f | FAILED) & !PREFETCHED;
        }
    }

    /// The next eligible candidate without taking it: (chunk, from successors).
    fn peek(&mut self) -> Option<(u32, bool)> {
        while let Some(&c) = self.chain.front() {
            if self.eligible(c) {
                return Some((c, true));
            }
            self.chain.pop_front();
        }
        if self.diverged {
            return None;
        }
        while let Some(&c) = self.order.get(self.scan) {
            if self.eligible(c) {
                return Some((c, false));
            }
            self.scan += 1;
        }
        None
    }

    /// Chunks to request now, marked in flight: within the lead and the
    /// in-flight bound. Empty when there is nothing to do now.
    #[allow(clippy::should_implement_trait)] // the name is the integration's API
    pub fn next(&mut self) -> Vec<u32> {
        let mut out = Vec::new();
        while self.inflight < self.max_inflight {
            let Some((c, succ)) = self.peek() else {
                break;
            };
            let len = self.len_of(c);
            if self.used.saturating_add(len) > self.lead {
                break;
            }
            if succ {
                self.chain.pop_front();
                self.succ_counted.push(c);
                self.stats.from_successors += 1;
            } else {
                self.scan += 1;
                self.stats.from_profile += 1;
            }
            if let Some(f) = self.flags.get_mut(c as usize) {
                *f |= INFLIGHT | PREFETCHED | COUNTED | if succ { FROM_SUCC } else { 0 };
            }
            self.used += len;
            self.inflight += 1;
            self.stats.prefetched += 1;
            self.stats.prefetched_bytes += len;
            self.stats.wasted += 1;
            self.stats.wasted_bytes += len;
            out.push(c);
        }
        out
    }

    /// Nothing left to prefetch and nothing in flight. A later read may give
    /// a successor model new work, so this can turn false again.
    pub fn done(&self) -> bool {
        self.inflight == 0
            && !self.chain.iter().any(|&c| self.eligible(c))
            && !self
                .order
                .get(self.scan..)
                .is_some_and(|r| r.iter().any(|&c| self.eligible(c)))
    }

    /// What the planner did so far.
    pub fn stats(&self) -> PlannerStats {
        PlannerStats {
            in_flight: self.inflight,
            lead_used_bytes: self.used,
            ..self.stats
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BinaryHeap;

    fn te(chunk: u32, ms: u32) -> TraceEntry {
        TraceEntry { chunk, ms }
    }

    fn traces_strategy() -> impl Strategy<Value = Vec<Vec<TraceEntry>>> {
        proptest::collection::vec(
            proptest::collection::vec((0u32..64, 0u32..1000), 0..40)
                .prop_map(|v| v.into_iter().map(|(c, m)| te(c, m)).collect()),
            0..6,
        )
    }

    fn successors_of(traces: &[Vec<TraceEntry>]) -> Successors {
        let mut s = Successors::new();
        for t in traces {
            s.learn(t);
        }
        s
    }

    // ------------------------------------------------------------ profile

    #[test]
    fn profile_orders_by_mean_then_min_then_chunk() {
        let p = Profile::from_traces(
            &[
                vec![te(5, 10), te(1, 20), te(2, 30), te(5, 99)],
                vec![te(1, 0), te(5, 30), te(3, 20)],
            ],
            100,
        );
        // 5: mean 20 min 10; 1: mean 10; 2: 30; 3: 20 min 20.
        assert_eq!(p.order(), vec![1, 5, 3, 2]);
        let e5 = p.entries()[1];
        assert_eq!((e5.count, e5.sum_ms, e5.min_ms), (2, 40, 10));
        // Truncation keeps the highest counts (ties: earlier mean).
        let t = Profile::from_traces(
            &[
                vec![te(5, 10), te(1, 20), te(2, 30)],
                vec![te(1, 0), te(5, 30), te(3, 20)],
            ],
            3,
        );
        assert_eq!(t.order(), vec![1, 5, 3]);
        assert_eq!(Profile::decode(&t.encode()).unwrap(), t);
    }

    #[test]
    fn profile_decode_rejects_non_canonical() {
        let p = Profile::from_traces(&[vec![te(1, 10), te(2, 20)]], 10);
        let good = p.encode();
        assert_eq!(Profile::decode(&good).unwrap(), p);
        let mut bad = good.clone();
        bad[0] = b'X';
        assert_eq!(Profile::decode(&bad), Err(PrefetchError::BadMagic));
        // Swap the two entries: out of order.
        let mut swapped = good[..8].to_vec();
        swapped.extend_from_slice(&good[28..48]);
        swapped.extend_from_slice(&good[8..28]);
        assert_eq!(Profile::decode(&swapped), Err(PrefetchError::OutOfOrder(1)));
        // Same chunk twice (second copy later in order).
        let mut dup = good[..8].to_vec();
        dup.extend_from_slice(&good[8..28]);
        let mut e = good[8..28].to_vec();
        e[8..16].copy_from_slice(&50u64.to_le_bytes());
        dup.extend_from_slice(&e);
        assert_eq!(Profile::decode(&dup), Err(PrefetchError::Duplicate(1)));
        // A count over the bound fails before any allocation.
        let mut big = b"CPF1".to_vec();
        big.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Profile::decode(&big),
            Err(PrefetchError::TooMany { .. })
        ));
        let mut big = b"CPF1".to_vec();
        big.extend_from_slice(&((Profile::MAX_ENTRIES as u32) + 1).to_le_bytes());
        assert!(matches!(
            Profile::decode(&big),
            Err(PrefetchError::TooMany { .. })
        ));
        // Zero count.
        let mut z = good.clone();
        z[12..16].copy_from_slice(&0u32.to_le_bytes());
        assert!(matches!(
            Profile::decode(&z),
            Err(PrefetchError::Invalid { .. })
        ));
        let mut t = good.clone();
        t.push(0);
        assert_eq!(Profile::decode(&t), Err(PrefetchError::Trailing(1)));
    }

    // --------------------------------------------------------- successors

    #[test]
    fn successors_predict_and_bounds() {
        let mut s = Successors::new();
        s.learn(&[te(1, 0), te(2, 0), te(3, 0), te(4, 0)]);
        s.learn(&[te(1, 0), te(2, 0), te(3, 0), te(9, 0)]);
        s.learn(&[te(1, 0), te(7, 0)]);
        assert_eq!(s.predict(1, 10), vec![2, 3, 4]); // 3 -> 4 and 9 tie: lower
        assert_eq!(s.predict(1, 2), vec![2, 3]);
        assert_eq!(s.predict(42, 5), Vec::<u32>::new());
        // No repeats: a cycle stops.
        let mut c = Successors::new();
        c.learn(&[te(1, 0), te(2, 0), te(1, 0), te(2, 0)]);
        assert_eq!(c.predict(1, 10), vec![2]);
        // At most MAX_PER_CHUNK successors, the lowest counts dropped.
        let mut m = Successors::new();
        for (k, next) in [10u32, 11, 12, 13, 14, 15].iter().enumerate() {
            for _ in 0..=k {
                m.learn(&[te(0, 0), te(*next, 0)]);
            }
        }
        // Learned one trace at a time, a newcomer (count 1) never displaces
        // a full list whose lowest count is 1 and index lower: 14 and 15 are
        // dropped each time (the price of the bound).
        let kept: Vec<u32> = m.successors(0).iter().map(|&(b, _)| b).collect();
        assert_eq!(kept, vec![13, 12, 11, 10]);
        // Merged with a model where 15 is frequent, it displaces the least.
        let mut heavy = Successors::new();
        for _ in 0..10 {
            heavy.learn(&[te(0, 0), te(15, 0)]);
        }
        let m = m.merge(&heavy);
        assert_eq!(m.successors(0), &[(15, 10), (13, 4), (12, 3), (11, 2)]);
        assert_eq!(Successors::decode(&m.encode()).unwrap(), m);
    }

    #[test]
    fn successors_chunk_bound() {
        let n = Successors::MAX_CHUNKS as u32 + 10;
        let t: Vec<TraceEntry> = (0..=n).map(|c| te(c, 0)).collect();
        let mut s = Successors::new();
        s.learn(&t);
        // Chunks 0..10 twice: they have the highest totals.
        s.learn(&(0..=10).map(|c| te(c, 0)).collect::<Vec<_>>());
        assert_eq!(s.len(), Successors::MAX_CHUNKS);
        assert_eq!(s.successors(0), &[(1, 2)]);
        // Equal totals: lower chunk indices kept.
        assert!(s.successors(n - 1).is_empty());
        assert_eq!(s.successors(Successors::MAX_CHUNKS as u32 - 1).len(), 1);
        let enc = s.encode();
        assert_eq!(Successors::decode(&enc).unwrap(), s);
    }

    #[test]
    fn successors_decode_rejects_non_canonical() {
        let mut s = Successors::new();
        s.learn(&[te(1, 0), te(2, 0), te(3, 0)]);
        let good = s.encode();
        assert_eq!(Successors::decode(&good).unwrap(), s);
        // Chunks out of order: swap the two 13-byte records.
        let mut sw = good[..8].to_vec();
        sw.extend_from_slice(&good[21..34]);
        sw.extend_from_slice(&good[8..21]);
        assert_eq!(Successors::decode(&sw), Err(PrefetchError::OutOfOrder(1)));
        let mut dup = good[..8].to_vec();
        dup.extend_from_slice(&good[8..21]);
        dup.extend_from_slice(&good[8..21]);
        assert_eq!(Successors::decode(&dup), Err(PrefetchError::Duplicate(1)));
        let mut z = good.clone();
        z[12] = 0; // no successors
        assert!(matches!(
            Successors::decode(&z),
            Err(PrefetchError::Invalid { .. })
        ));
        let mut big = b"CSU1".to_vec();
        big.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Successors::decode(&big),
            Err(PrefetchError::TooMany { .. })
        ));
    }

    proptest! {
        #[test]
        fn profile_round_trips(t in traces_strategy(), max in 1usize..80) {
            let p = Profile::from_traces(&t, max);
            prop_assert!(p.len() <= max);
            prop_assert_eq!(Profile::decode(&p.encode()).unwrap(), p);
        }

        #[test]
        fn successors_round_trip(t in traces_strategy()) {
            let s = successors_of(&t);
            prop_assert_eq!(Successors::decode(&s.encode()).unwrap(), s);
        }

        #[test]
        fn decode_never_panics(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Profile::decode(&b);
            let _ = Successors::decode(&b);
            for m in [b"CPF1", b"CSU1"] {
                let mut v = m.to_vec();
                v.extend_from_slice(&b);
                let _ = Profile::decode(&v);
                let _ = Successors::decode(&v);
            }
        }

        #[test]
        fn every_truncation_errors(t in traces_strategy()) {
            let pe = Profile::from_traces(&t, 100).encode();
            for i in 0..pe.len() {
                prop_assert!(Profile::decode(&pe[..i]).is_err());
            }
            let se = successors_of(&t).encode();
            for i in 0..se.len() {
                prop_assert!(Successors::decode(&se[..i]).is_err());
            }
            let mut longer = pe.clone();
            longer.push(0);
            prop_assert!(Profile::decode(&longer).is_err());
            let mut longer = se.clone();
            longer.push(0);
            prop_assert!(Successors::decode(&longer).is_err());
        }

        #[test]
        fn profile_merge_commutes(a in traces_strategy(), b in traces_strategy(), max in 1usize..80) {
            let (pa, pb) = (Profile::from_traces(&a, max), Profile::from_traces(&b, max));
            let ab = pa.merge(&pb, max);
            prop_assert_eq!(ab.encode(), pb.merge(&pa, max).encode());
            prop_assert!(ab.len() <= max);
        }

        #[test]
        fn profile_merge_matches_joint_profile_without_truncation(
            a in traces_strategy(), b in traces_strategy(), c in traces_strategy(),
        ) {
            let m = Profile::MAX_ENTRIES;
            let (pa, pb, pc) = (
                Profile::from_traces(&a, m),
                Profile::from_traces(&b, m),
                Profile::from_traces(&c, m),
            );
            let all: Vec<Vec<TraceEntry>> = a.iter().chain(&b).cloned().collect();
            prop_assert_eq!(pa.merge(&pb, m), Profile::from_traces(&all, m));
            // Associative while nothing is truncated.
            prop_assert_eq!(pa.merge(&pb, m).merge(&pc, m), pa.merge(&pb.merge(&pc, m), m));
        }

        #[test]
        fn successors_merge_commutes(a in traces_strategy(), b in traces_strategy()) {
            let (sa, sb) = (successors_of(&a), successors_of(&b));
            prop_assert_eq!(sa.merge(&sb).encode(), sb.merge(&sa).encode());
            for (_, v) in sa.merge(&sb).map.iter() {
                prop_assert!(!v.is_empty() && v.len() <= Successors::MAX_PER_CHUNK);
            }
        }

        /// Random events never break the planner's bounds nor panic.
        #[test]
        fn planner_bounds_hold(
            t in traces_strategy(),
            ops in proptest::collection::vec((0u8..4, 0u32..80, 0u32..80, any::<bool>()), 0..200),
            lead in 0u64..5000,
            max_inflight in 0usize..6,
        ) {
            let lens: Vec<u32> = (0..64).map(|i| 100 + (i % 7) * 50).collect();
            let local: Vec<bool> = (0..64).map(|i| i % 5 == 0).collect();
            let mut p = Planner::new(
                Some(Profile::from_traces(&t, 100)),
                Some(successors_of(&t)),
                lens,
                local,
                lead,
                max_inflight,
            );
            let mut inflight: Vec<u32> = Vec::new();
            for (op, a, b, miss) in ops {
                match op {
                    0 => p.on_read(a, b, miss),
                    1 => if let Some(c) = inflight.pop() { p.on_fetched(c) } else { p.on_fetched(a) },
                    2 => if let Some(c) = inflight.pop() { p.on_failed(c) } else { p.on_failed(a) },
                    _ => {
                        let got = p.next();
                        for c in &got {
                            prop_assert!(!inflight.contains(c));
                        }
                        inflight.extend(got);
                    }
                }
                let s = p.stats();
                prop_assert!(s.lead_used_bytes <= lead);
                prop_assert!(s.in_flight <= max_inflight);
                prop_assert_eq!(s.in_flight, inflight.len());
                prop_assert!(s.wasted <= s.prefetched);
            }
        }
    }

    // ------------------------------------------------------------ planner

    #[test]
    fn planner_follows_profile_within_lead_and_inflight() {
        // Profile order 0..10; chunk 2 local; 100-byte chunks.
        let prof = Profile::from_traces(&[(0..10).map(|c| te(c, c * 10)).collect()], 100);
        let mut local = vec![false; 10];
        local[2] = true;
        let mut p = Planner::new(Some(prof), None, vec![100; 10], local, 300, 2);
        assert_eq!(p.next(), vec![0, 1]); // in-flight bound
        assert!(p.next().is_empty());
        p.on_fetched(0);
        assert_eq!(p.next(), vec![3]); // 2 is local; lead now 300
        p.on_fetched(1);
        assert!(p.next().is_empty()); // lead full (0, 1, 3 unread)
        p.on_read(0, 0, false);
        assert_eq!(p.next(), vec![4]);
        // The reader jumps ahead: what it passed stops counting.
        p.on_read(6, 6, true);
        assert_eq!(p.stats().lead_used_bytes, 0);
        p.on_failed(3);
        p.on_fetched(4);
        assert_eq!(p.next(), vec![7, 8]);
        p.on_failed(7);
        p.on_fetched(8);
        assert_eq!(p.next(), vec![9]);
        p.on_fetched(9);
        assert!(p.done());
        let s = p.stats();
        assert_eq!(
            (s.prefetched, s.hits, s.failed, s.wasted, s.demand_misses),
            (7, 1, 2, 4, 1) // wasted: 1, 4 (passed), 8, 9 (unread)
        );
        // 7 failed: never asked again.
        p.on_read(7, 7, true);
        assert!(p.next().is_empty());
    }

    #[test]
    fn planner_hostile_events_do_not_panic() {
        let mut p = Planner::new(None, Some(Successors::new()), vec![], vec![], 100, 4);
        p.on_read(5, 1, true);
        p.on_read(0, u32::MAX, false);
        p.on_fetched(u32::MAX);
        p.on_failed(7);
        assert!(p.next().is_empty());
        assert!(p.done());
        // Profile and successors naming chunks beyond the object.
        let prof = Profile::from_traces(&[vec![te(100, 0), te(1, 5), te(200, 9)]], 10);
        let mut s = Successors::new();
        s.learn(&[te(0, 0), te(300, 0), te(2, 0)]);
        let mut p = Planner::new(Some(prof), Some(s), vec![10; 3], vec![true], 100, 4);
        assert_eq!(p.next(), vec![1]);
        p.on_read(2, 9, true);
        p.on_read(u32::MAX, u32::MAX, true);
        assert!(p.next().is_empty());
    }

    #[test]
    fn planner_without_profile_uses_successors() {
        let mut s = Successors::new();
        s.learn(&(10..20).map(|c| te(c, 0)).collect::<Vec<_>>());
        let mut p = Planner::new(None, Some(s), vec![100; 32], vec![false; 32], 300, 8);
        assert!(p.next().is_empty());
        p.on_read(10, 10, true);
        assert_eq!(p.next(), vec![11, 12, 13]); // depth: what fits in the lead
        p.on_fetched(11);
        p.on_read(11, 11, false);
        assert_eq!(p.next(), vec![14]);
        // The reader goes elsewhere: the old prediction stops counting.
        p.on_read(30, 30, true);
        assert_eq!(p.stats().lead_used_bytes, 0);
        let s = p.stats();
        assert_eq!((s.from_successors, s.successor_hits), (4, 1));
    }

    #[test]
    fn planner_leaves_and_returns_to_profile() {
        let prof = Profile::from_traces(&[(0..10).map(|c| te(c, c * 10)).collect()], 100);
        let mut s = Successors::new();
        s.learn(&(20..24).map(|c| te(c, 0)).collect::<Vec<_>>());
        let mut p = Planner::new(Some(prof), Some(s), vec![100; 32], vec![false; 32], 300, 8);
        assert_eq!(p.next(), vec![0, 1, 2]);
        for c in 0..3 {
            p.on_fetched(c);
        }
        // A read off the profile without a miss changes nothing.
        p.on_read(30, 30, false);
        assert!(p.next().is_empty());
        assert_eq!(p.stats().lead_used_bytes, 300);
        // A demand miss off the profile: the successor model leads.
        p.on_read(20, 20, true);
        assert_eq!(p.stats().lead_used_bytes, 0);
        assert_eq!(p.next(), vec![21, 22, 23]);
        assert!(!p.done());
        // Back on the profile: the prediction is dropped, the profile's
        // unread prefetches ahead of the cursor count again.
        p.on_read(0, 0, false);
        assert_eq!(p.stats().lead_used_bytes, 200);
        assert_eq!(p.next(), vec![3]);
        let st = p.stats();
        assert_eq!(
            (
                st.prefetched,
                st.from_profile,
                st.from_successors,
                st.hits,
                st.wasted
            ),
            (7, 4, 3, 1, 6)
        );
    }

    #[test]
    fn planner_without_models_does_nothing() {
        let mut p = Planner::new(None, None, vec![100; 8], vec![false; 8], 1000, 4);
        assert!(p.done());
        p.on_read(0, 3, true);
        assert!(p.next().is_empty());
        assert!(p.done());
        assert_eq!(p.stats().demand_misses, 1);
    }

    // --------------------------------------------------------- simulation

    const CHUNK: u32 = 64 << 10;
    const OBJECT_CHUNKS: u32 = 4096;

    /// Deterministic PRNG (splitmix64).
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn dedup(t: Vec<TraceEntry>) -> Vec<TraceEntry> {
        let mut seen = std::collections::HashSet::new();
        t.into_iter().filter(|e| seen.insert(e.chunk)).collect()
    }

    /// A boot-like trace: bursts of nearby chunks with think times between,
    /// in `[lo, hi)`.
    fn boot_trace(seed: u64, runs: usize, lo: u32, hi: u32) -> Vec<TraceEntry> {
        let mut r = Rng(seed);
        let mut t = Vec::new();
        let mut ms = 0u32;
        for _ in 0..runs {
            let start = lo + r.below(u64::from(hi - lo - 8)) as u32;
            for k in 0..1 + r.below(8) as u32 {
                t.push(te(start + k, ms));
                ms += 1;
            }
            ms += 10 + r.below(50) as u32;
        }
        dedup(t)
    }

    /// Another run of `base`: times jittered by up to ±5% (which may reorder
    /// close touches), `drop_pm`/1000 of the touches missing and `extra_pm`
    /// /1000 extra random touches.
    fn jitter(base: &[TraceEntry], seed: u64, drop_pm: u64, extra_pm: u64) -> Vec<TraceEntry> {
        let mut r = Rng(seed);
        let mut t = Vec::new();
        for e in base {
            let ms = u64::from(e.ms) * (950 + r.below(101)) / 1000 + r.below(3);
            if r.below(1000) >= drop_pm {
                t.push(te(e.chunk, ms as u32));
            }
            if r.below(1000) < extra_pm {
                t.push(te(r.below(u64::from(OBJECT_CHUNKS)) as u32, ms as u32));
            }
        }
        t.sort_by_key(|e| e.ms);
        dedup(t)
    }

    #[derive(Clone, Copy)]
    struct Link {
        rtt_us: u64,
        bits_per_s: u64,
        /// Bytes the server may have committed to the wire and not yet sent
        /// (its send buffer): a demand can only be behind these.
        send_buffer: u64,
        /// Demand before prefetch in the server's queue; else one FIFO.
        priority: bool,
    }

    const LINK: Link = Link {
        rtt_us: 50_000,
        bits_per_s: 100_000_000,
        send_buffer: 4 * CHUNK as u64,
        priority: true,
    };

    impl Link {
        fn tx_us(&self, len: u64) -> u64 {
            len * 8 * 1_000_000 / self.bits_per_s
        }
    }

    #[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
    enum Ev {
        ReqArrive { chunk: u32, demand: bool },
        WireDone { len: u64 },
        ChunkArrive { chunk: u32 },
        Read { i: usize },
    }

    #[derive(Debug, Default)]
    struct SimResult {
        /// Reads that waited.
        stalls: u64,
        stall_us: u64,
        /// Virtual time when the last read completed.
        total_us: u64,
        /// Longest wait of a read whose chunk nobody had asked for yet.
        max_fresh_wait_us: u64,
        fresh_demands: u64,
        /// Longest wait of any read.
        max_stall_us: u64,
        /// Fresh demands that found prefetches queued at the server.
        demands_behind_prefetch: u64,
        fetched: u64,
        stats: PlannerStats,
        /// Most bytes counted against the lead at any time.
        max_lead_used: u64,
        /// Stats when the reader first read the chunk `mark` (if any).
        marked: Option<PlannerStats>,
    }

    struct Sim<'a> {
        link: Link,
        trace: &'a [TraceEntry],
        planner: Option<Planner>,
        lens: Vec<u32>,
        now: u64,
        seq: u64,
        events: BinaryHeap<Reverse<(u64, u64, Ev)>>,
        present: Vec<bool>,
        requested: Vec<bool>,
        committed: Vec<bool>,
        demand_q: VecDeque<u32>,
        prefetch_q: VecDeque<u32>,
        unsent: u64,
        wire_free: u64,
        waiting: Option<(u32, u64, bool)>,
        res: SimResult,
        mark: Option<u32>,
    }

    impl Sim<'_> {
        fn at(&mut self, t: u64, e: Ev) {
            self.seq += 1;
            self.events.push(Reverse((t, self.seq, e)));
        }

        fn request(&mut self, chunk: u32, demand: bool) {
            self.requested[chunk as usize] = true;
            self.at(
                self.now + self.link.rtt_us / 2,
                Ev::ReqArrive { chunk, demand },
            );
        }

        /// The server commits queued responses to the wire while its send
        /// buffer has room.
        fn pump(&mut self) {
            loop {
                let q = if self.link.priority && !self.demand_q.is_empty() {
                    &mut self.demand_q
                } else {
                    &mut self.prefetch_q
                };
                let Some(&c) = q.front() else { return };
                let len = u64::from(self.lens[c as usize]);
                if self.unsent > 0 && self.unsent + len > self.link.send_buffer {
                    return;
                }
                q.pop_front();
                if self.committed[c as usize] {
                    continue;
                }
                self.committed[c as usize] = true;
                let end = self.now.max(self.wire_free) + self.link.tx_us(len);
                self.wire_free = end;
                self.unsent += len;
                self.res.fetched += 1;
                self.at(end, Ev::WireDone { len });
                self.at(end + self.link.rtt_us / 2, Ev::ChunkArrive { chunk: c });
            }
        }

        fn think_after(&self, i: usize) -> u64 {
            match (self.trace.get(i), self.trace.get(i + 1)) {
                (Some(a), Some(b)) => u64::from(b.ms.saturating_sub(a.ms)) * 1000,
                _ => 0,
            }
        }

        fn prefetch(&mut self) {
            let Some(p) = self.planner.as_mut() else {
                return;
            };
            let got = p.next();
            let s = p.stats();
            self.res.max_lead_used = self.res.max_lead_used.max(s.lead_used_bytes);
            for c in got {
                if self.present[c as usize] {
                    if let Some(p) = self.planner.as_mut() {
                        p.on_fetched(c);
                    }
                } else {
                    self.request(c, false);
                }
            }
        }

        fn run(mut self) -> SimResult {
            self.at(0, Ev::Read { i: 0 });
            while let Some(Reverse((t, _, ev))) = self.events.pop() {
                self.now = t;
                match ev {
                    Ev::Read { i } => {
                        let Some(e) = self.trace.get(i) else {
                            self.res.total_us = t;
                            break;
                        };
                        let c = e.chunk;
                        let hit = self.present[c as usize];
                        if self.mark == Some(c) && self.res.marked.is_none() {
                            self.res.marked = self.planner.as_ref().map(Planner::stats);
                        }
                        if let Some(p) = self.planner.as_mut() {
                            p.on_read(c, c, !hit);
                        }
                        if hit {
                            let next = t + self.think_after(i);
                            self.at(next, Ev::Read { i: i + 1 });
                        } else {
                            self.res.stalls += 1;
                            let fresh = !self.requested[c as usize];
                            if fresh {
                                self.res.fresh_demands += 1;
                                if !self.prefetch_q.is_empty() || self.unsent > 0 {
                                    self.res.demands_behind_prefetch += 1;
                                }
                            }
                            self.waiting = Some((c, t, fresh));
                            self.request(c, true);
                        }
                    }
                    Ev::ReqArrive { chunk, demand } => {
                        if self.committed[chunk as usize] {
                        } else if demand && self.link.priority {
                            self.prefetch_q.retain(|&c| c != chunk);
                            self.demand_q.push_back(chunk);
                        } else if !self.prefetch_q.contains(&chunk) {
                            self.prefetch_q.push_back(chunk);
                        }
                        self.pump();
                    }
                    Ev::WireDone { len } => {
                        self.unsent -= len;
                        self.pump();
                    }
                    Ev::ChunkArrive { chunk } => {
                        self.present[chunk as usize] = true;
                        if let Some(p) = self.planner.as_mut() {
                            p.on_fetched(chunk);
                        }
                        if let Some((c, since, fresh)) = self.waiting {
                            if c == chunk {
                                self.waiting = None;
                                let w = t - since;
                                self.res.stall_us += w;
                                self.res.max_stall_us = self.res.max_stall_us.max(w);
                                if fresh {
                                    self.res.max_fresh_wait_us = self.res.max_fresh_wait_us.max(w);
                                }
                                let i = self
                                    .trace
                                    .iter()
                                    .position(|e| e.chunk == c)
                                    .unwrap_or(usize::MAX - 1);
                                let next = t + self.think_after(i);
                                self.at(next, Ev::Read { i: i + 1 });
                            }
                        }
                    }
                }
                self.prefetch();
            }
            if let Some(p) = &self.planner {
                self.res.stats = p.stats();
            }
            self.res
        }
    }

    fn simulate(
        link: Link,
        trace: &[TraceEntry],
        planner: Option<Planner>,
        mark: Option<u32>,
    ) -> SimResult {
        let n = OBJECT_CHUNKS as usize;
        Sim {
            link,
            trace,
            planner,
            lens: vec![CHUNK; n],
            now: 0,
            seq: 0,
            events: BinaryHeap::new(),
            present: vec![false; n],
            requested: vec![false; n],
            committed: vec![false; n],
            demand_q: VecDeque::new(),
            prefetch_q: VecDeque::new(),
            unsent: 0,
            wire_free: 0,
            waiting: None,
            res: SimResult::default(),
            mark,
        }
        .run()
    }

    const LEAD_CHUNKS: u64 = 32;

    fn planner(
        p: Option<Profile>,
        s: Option<Successors>,
        lead_chunks: u64,
        inflight: usize,
    ) -> Planner {
        let n = OBJECT_CHUNKS as usize;
        Planner::new(
            p,
            s,
            vec![CHUNK; n],
            vec![false; n],
            lead_chunks * u64::from(CHUNK),
            inflight,
        )
    }

    /// Test 3: replaying a boot trace with a profile from earlier runs.
    #[test]
    fn sim_boot_replay_prefetch_beats_demand_only() {
        let base = boot_trace(7, 40, 0, OBJECT_CHUNKS);
        let runs: Vec<Vec<TraceEntry>> = (1..=8).map(|s| jitter(&base, s, 20, 5)).collect();
        let replay = jitter(&base, 100, 20, 5);
        let profile = Profile::from_traces(&runs, Profile::MAX_ENTRIES);
        let off = simulate(LINK, &replay, None, None);
        let on = simulate(
            LINK,
            &replay,
            Some(planner(
                Some(profile.clone()),
                Some(successors_of(&runs)),
                LEAD_CHUNKS,
                16,
            )),
            None,
        );
        println!(
            "boot replay: {} reads, profile {} chunks; off: stalls {} total {} ms; on: stalls {} total {} ms, stats {:?}, max lead {} B",
            replay.len(),
            profile.len(),
            off.stalls,
            off.total_us / 1000,
            on.stalls,
            on.total_us / 1000,
            on.stats,
            on.max_lead_used
        );
        assert_eq!(off.stalls, replay.len() as u64);
        assert!(
            on.stalls * 5 <= off.stalls,
            "stalls on {} off {}",
            on.stalls,
            off.stalls
        );
        assert!(on.total_us < off.total_us);
        assert!(on.stats.wasted * 10 <= on.stats.prefetched);
        assert!(on.max_lead_used <= LEAD_CHUNKS * u64::from(CHUNK));
        // The exact numbers of this deterministic run.
        assert_eq!(
            (
                replay.len(),
                off.stalls,
                on.stalls,
                on.stats.prefetched,
                on.stats.wasted,
                off.total_us / 1000,
                on.total_us / 1000
            ),
            (172, 172, 5, 184, 13, 11_033, 1_603)
        );
    }

    /// Test 4: the reader leaves the profile halfway for a region the
    /// successor model knows.
    #[test]
    fn sim_divergence_successors_take_over() {
        let a = boot_trace(11, 40, 0, 2048);
        let runs: Vec<Vec<TraceEntry>> = (1..=8).map(|s| jitter(&a, s, 0, 0)).collect();
        let profile = Profile::from_traces(&runs, Profile::MAX_ENTRIES);
        // Region B: 3000.. in a fixed order with think times.
        let half = a.len() / 2;
        let t0 = a[half].ms;
        let region_b: Vec<TraceEntry> = (0..120u32)
            .map(|k| te(3000 + k + (k / 10) * 3, t0 + 1 + k * 10))
            .collect();
        let other: Vec<TraceEntry> = a[..half]
            .iter()
            .copied()
            .chain(region_b.iter().copied())
            .collect();
        let mut succ = successors_of(&runs);
        succ.learn(&other);
        succ.learn(&other);
        let reader = other.clone();
        let on = simulate(
            LINK,
            &reader,
            Some(planner(Some(profile), Some(succ), LEAD_CHUNKS, 16)),
            Some(region_b[0].chunk),
        );
        let off = simulate(LINK, &reader, None, None);
        let at_div = on.marked.unwrap_or_default();
        println!(
            "divergence: {} reads ({} in B); off: stalls {} total {} ms; on: stalls {} total {} ms, stats {:?}; at divergence {:?}",
            reader.len(),
            region_b.len(),
            off.stalls,
            off.total_us / 1000,
            on.stalls,
            on.total_us / 1000,
            on.stats,
            at_div
        );
        assert!(on.stats.successor_hits > 0);
        // Unread prefetches the reader had already passed before it left
        // (profile order and this run differ slightly): not the divergence's.
        let passed = at_div.wasted - at_div.lead_used_bytes / u64::from(CHUNK);
        assert!(on.stats.wasted - passed <= LEAD_CHUNKS);
        let stalls_in_b = on.stats.demand_misses - at_div.demand_misses;
        assert!(
            stalls_in_b * 5 <= region_b.len() as u64,
            "{stalls_in_b} stalls in B"
        );
        assert_eq!(
            (
                on.stalls,
                on.stats.successor_hits,
                on.stats.wasted,
                passed,
                stalls_in_b,
                off.stalls,
                off.total_us / 1000,
                on.total_us / 1000
            ),
            (3, 119, 34, 2, 1, 204, 13_203, 2_058)
        );
    }

    /// Test 5: demand reads go ahead of prefetch on a busy link.
    #[test]
    fn sim_demand_priority_over_busy_link() {
        // A long profile path read faster than the link delivers, so
        // prefetch keeps the link busy; every 20th read is a chunk nobody
        // predicted.
        let path: Vec<TraceEntry> = (0..1500u32).map(|k| te(k, k * 2)).collect();
        let profile = Profile::from_traces(std::slice::from_ref(&path), Profile::MAX_ENTRIES);
        let mut reader = Vec::new();
        for (k, e) in path.iter().enumerate() {
            reader.push(*e);
            if k % 20 == 19 {
                reader.push(te(2000 + k as u32, e.ms));
            }
        }
        let bound = 2 * LINK.rtt_us + LINK.tx_us(u64::from(CHUNK));
        let mk = || Some(planner(Some(profile.clone()), None, 128, 64));
        let prio = simulate(LINK, &reader, mk(), None);
        let fifo = simulate(
            Link {
                priority: false,
                ..LINK
            },
            &reader,
            mk(),
            None,
        );
        println!(
            "priority: fresh demands {} ({} behind prefetch), max wait {} us (bound {bound} us), max stall {} us, total {} ms; \
             FIFO: max wait {} us, total {} ms",
            prio.fresh_demands,
            prio.demands_behind_prefetch,
            prio.max_fresh_wait_us,
            prio.max_stall_us,
            prio.total_us / 1000,
            fifo.max_fresh_wait_us,
            fifo.total_us / 1000
        );
        assert_eq!(prio.fresh_demands, 76); // 75 off the path and the first read
        assert!(prio.demands_behind_prefetch * 2 >= prio.fresh_demands);
        assert!(prio.max_fresh_wait_us <= bound);
        assert!(prio.max_stall_us <= bound);
        // Without priority the same check fails: it is a real check.
        assert!(fifo.max_fresh_wait_us > bound);
        assert_eq!(
            (
                prio.demands_behind_prefetch,
                prio.max_fresh_wait_us,
                fifo.max_fresh_wait_us
            ),
            (71, 75_324, 340_730)
        );
    }
}
