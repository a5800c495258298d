//! The replicated record map and the typed records it carries.
//!
//! A [`Replica`] maps [`Key`]s to versioned [`Entry`]s. A change is an entry
//! stamped with a [`Version`] (HLC timestamp plus origin); a deletion is a
//! tombstone entry. Merging keeps, per key, the entry with the greatest
//! `(version, value)`: last writer wins, the same way on every site whatever
//! order entries arrive in, however often.
//!
//! The keyspace is split into [`BUCKETS`] buckets by a hash of the key,
//! grouped [`BUCKETS_PER_GROUP`] to a group. Each bucket, group and the whole
//! replica carry a digest, the XOR of the 128-bit hashes of the entries
//! below them. Every merge updates the three digests in place, so digests
//! are never rebuilt by scanning; [`crate::sync`] compares them to find what
//! differs.
//!
//! Entries are held behind [`Arc`] and values are [`Bytes`], so one entry
//! can be shared between replicas (the scale simulation holds thousands of
//! replicas in one process) and handed to persistence without copying.

use std::cmp::Ordering;
use std::sync::Arc;

use bytes::{BufMut, Bytes};
use thiserror::Error;

use crate::codec::{bytes_len, put_bytes, put_varint, varint_len, DecodeError, Reader};
use crate::hlc::{Hlc, Timestamp, Version};
use crate::vivaldi::{Coord, DIMS};

/// Number of digest buckets the keyspace is split into.
pub const BUCKETS: usize = 1024;
/// Buckets per digest group.
pub const BUCKETS_PER_GROUP: usize = 32;
/// Number of digest groups.
pub const GROUPS: usize = BUCKETS / BUCKETS_PER_GROUP;

/// Longest site name, tag, label value or parent name, in bytes.
pub const MAX_NAME_LEN: usize = 255;
/// Longest OCI repository name in a [`Key::Tag`], in bytes.
pub const MAX_REPO_LEN: usize = 1024;
/// Longest namespace of a [`Key::Other`], in bytes.
pub const MAX_NAMESPACE_LEN: usize = 64;
/// Longest key bytes of a [`Key::Other`].
pub const MAX_OTHER_KEY_LEN: usize = 1024;
/// Largest value of an entry, in bytes.
pub const MAX_VALUE_LEN: usize = 64 * 1024;
/// Longest label key, region, zone or kind, in bytes.
pub const MAX_LABEL_LEN: usize = 63;
/// Most free-form labels on a site.
pub const MAX_EXTRA_LABELS: usize = 32;
/// Largest encoded [`SiteRecord`], in bytes.
pub const MAX_SITE_RECORD_LEN: usize = 4096;
/// Largest encoded [`InventoryEntry`], in bytes.
pub const MAX_INVENTORY_LEN: usize = 64;

/// A BLAKE3-256 object id (the identity of a blob, image, volume or
/// snapshot recipe).
pub type ObjectId = [u8; 32];

/// Why a key, value or record could not be built or encoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RecordError {
    /// A field is longer than its limit.
    #[error("{what} length {len} exceeds the limit of {limit}")]
    TooLong {
        /// Which field.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// A field holds a value outside its domain.
    #[error("invalid {what}: {why}")]
    Invalid {
        /// Which field.
        what: &'static str,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A stored value did not decode.
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

fn limit(what: &'static str, len: usize, limit: usize) -> Result<(), RecordError> {
    if len > limit {
        Err(RecordError::TooLong { what, len, limit })
    } else {
        Ok(())
    }
}

/// The key of a replicated record.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Key {
    /// A site's own record ([`SiteRecord`]), written by that site.
    Site(String),
    /// One object a site holds ([`InventoryEntry`]), written by that site.
    Inventory {
        /// The holding site.
        site: String,
        /// The object.
        object: ObjectId,
    },
    /// An OCI tag: a multi-writer name pointing at an object.
    Tag {
        /// The repository.
        repo: String,
        /// The tag.
        tag: String,
    },
    /// Anything else (control-plane records such as workload specs and
    /// placements): a namespace and opaque key bytes.
    Other {
        /// The namespace, e.g. `"workload"`.
        namespace: String,
        /// The key within the namespace.
        key: Bytes,
    },
}

const KEY_SITE: u8 = 1;
const KEY_INVENTORY: u8 = 2;
const KEY_TAG: u8 = 3;
const KEY_OTHER: u8 = 4;

impl Key {
    /// Checks every field against its limit.
    pub fn validate(&self) -> Result<(), RecordError> {
        match self {
            Key::Site(name) => limit("site name", name.len(), MAX_NAME_LEN),
            Key::Inventory { site, .. } => limit("site name", site.len(), MAX_NAME_LEN),
            Key::Tag { repo, tag } => {
                limit("repository", repo.len(), MAX_REPO_LEN)?;
                limit("tag", tag.len(), MAX_NAME_LEN)
            }
            Key::Other { namespace, key } => {
                limit("namespace", namespace.len(), MAX_NAMESPACE_LEN)?;
                limit("key", key.len(), MAX_OTHER_KEY_LEN)
            }
        }
    }

    /// Appends the canonical encoding (tag byte, then length-prefixed
    /// fields).
    pub fn encode(&self, out: &mut impl KeySink) {
        match self {
            Key::Site(name) => {
                out.sink_u8(KEY_SITE);
                sink_bytes(out, name.as_bytes());
            }
            Key::Inventory { site, object } => {
                out.sink_u8(KEY_INVENTORY);
                sink_bytes(out, site.as_bytes());
                out.sink_slice(object);
            }
            Key::Tag { repo, tag } => {
                out.sink_u8(KEY_TAG);
                sink_bytes(out, repo.as_bytes());
                sink_bytes(out, tag.as_bytes());
            }
            Key::Other { namespace, key } => {
                out.sink_u8(KEY_OTHER);
                sink_bytes(out, namespace.as_bytes());
                sink_bytes(out, key);
            }
        }
    }

    /// Length of [`encode`](Self::encode)'s output.
    pub fn encoded_len(&self) -> usize {
        1 + match self {
            Key::Site(name) => bytes_len(name.as_bytes()),
            Key::Inventory { site, .. } => bytes_len(site.as_bytes()) + 32,
            Key::Tag { repo, tag } => bytes_len(repo.as_bytes()) + bytes_len(tag.as_bytes()),
            Key::Other { namespace, key } => bytes_len(namespace.as_bytes()) + bytes_len(key),
        }
    }

    /// Decodes a key encoded by [`encode`](Self::encode), rejecting trailing
    /// bytes.
    pub fn decode(bytes: &[u8]) -> Result<Key, DecodeError> {
        let mut r = Reader::new(Bytes::copy_from_slice(bytes));
        let k = Key::read(&mut r)?;
        r.finish()?;
        Ok(k)
    }

    pub(crate) fn read(r: &mut Reader) -> Result<Key, DecodeError> {
        match r.u8("key tag")? {
            KEY_SITE => Ok(Key::Site(r.string("site name", MAX_NAME_LEN)?)),
            KEY_INVENTORY => Ok(Key::Inventory {
                site: r.string("site name", MAX_NAME_LEN)?,
                object: r.array("object id")?,
            }),
            KEY_TAG => Ok(Key::Tag {
                repo: r.string("repository", MAX_REPO_LEN)?,
                tag: r.string("tag", MAX_NAME_LEN)?,
            }),
            KEY_OTHER => Ok(Key::Other {
                namespace: r.string("namespace", MAX_NAMESPACE_LEN)?,
                key: r.bytes("key", MAX_OTHER_KEY_LEN)?,
            }),
            tag => Err(DecodeError::UnknownTag { what: "key", tag }),
        }
    }

    /// Heap bytes the key owns.
    fn heap_len(&self) -> usize {
        match self {
            Key::Site(name) => name.len(),
            Key::Inventory { site, .. } => site.len(),
            Key::Tag { repo, tag } => repo.len() + tag.len(),
            Key::Other { namespace, key } => namespace.len() + key.len(),
        }
    }
}

/// One versioned record change: a value, or a tombstone (`value == None`).
///
/// Immutable once built; its key hash (which picks the bucket) and its
/// 128-bit content hash (which feeds the digests) are computed once, here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    key: Key,
    version: Version,
    value: Option<Bytes>,
    key_hash: u64,
    hash: u128,
}

fn first_u64(h: &blake3::Hash) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&h.as_bytes()[..8]);
    u64::from_le_bytes(b)
}

fn key_hash_of(key: &Key) -> u64 {
    let mut h = blake3::Hasher::new();
    key.encode(&mut HashSink(&mut h));
    first_u64(&h.finalize())
}

/// Feeds encoded bytes straight into a hasher (no buffer).
struct HashSink<'a>(&'a mut blake3::Hasher);

impl KeySink for HashSink<'_> {
    fn sink_u8(&mut self, b: u8) {
        self.0.update(&[b]);
    }
    fn sink_slice(&mut self, s: &[u8]) {
        self.0.update(s);
    }
}

/// Where key encodings go: any [`BufMut`] (e.g. a `Vec<u8>`), or a hasher.
pub trait KeySink {
    /// Appends one byte.
    fn sink_u8(&mut self, b: u8);
    /// Appends bytes.
    fn sink_slice(&mut self, s: &[u8]);
}

impl<B: BufMut> KeySink for B {
    fn sink_u8(&mut self, b: u8) {
        self.put_u8(b);
    }
    fn sink_slice(&mut self, s: &[u8]) {
        self.put_slice(s);
    }
}

/// A stack buffer for one encoded version.
#[derive(Default)]
struct VersionBuf {
    buf: [u8; 32],
    len: usize,
}

impl VersionBuf {
    fn as_slice(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl KeySink for VersionBuf {
    fn sink_u8(&mut self, b: u8) {
        if let Some(x) = self.buf.get_mut(self.len) {
            *x = b;
            self.len += 1;
        }
    }
    fn sink_slice(&mut self, s: &[u8]) {
        for &b in s {
            self.sink_u8(b);
        }
    }
}

fn sink_varint(out: &mut impl KeySink, mut v: u64) {
    while v >= 0x80 {
        out.sink_u8((v as u8) | 0x80);
        v >>= 7;
    }
    out.sink_u8(v as u8);
}

fn sink_bytes(out: &mut impl KeySink, b: &[u8]) {
    sink_varint(out, b.len() as u64);
    out.sink_slice(b);
}

fn put_version(out: &mut impl KeySink, v: &Version) {
    sink_varint(out, v.ts.wall_ms);
    sink_varint(out, u64::from(v.ts.logical));
    out.sink_slice(&v.origin.to_le_bytes());
}

fn version_len(v: &Version) -> usize {
    varint_len(v.ts.wall_ms) + varint_len(u64::from(v.ts.logical)) + 8
}

fn read_version(r: &mut Reader) -> Result<Version, DecodeError> {
    let wall_ms = r.varint("version wall time")?;
    let logical =
        u32::try_from(r.varint("version logical counter")?).map_err(|_| DecodeError::Invalid {
            what: "version logical counter",
            why: "above 2^32",
        })?;
    let origin = r.u64_le("version origin")?;
    Ok(Version {
        ts: Timestamp { wall_ms, logical },
        origin,
    })
}

impl Entry {
    /// Builds an entry, checking the key and value limits.
    pub fn new(key: Key, version: Version, value: Option<Bytes>) -> Result<Entry, RecordError> {
        key.validate()?;
        if let Some(v) = &value {
            limit("value", v.len(), MAX_VALUE_LEN)?;
        }
        let mut h = blake3::Hasher::new();
        key.encode(&mut HashSink(&mut h));
        let key_hash = first_u64(&h.finalize());
        let mut v = VersionBuf::default();
        put_version(&mut v, &version);
        h.update(v.as_slice());
        match &value {
            Some(val) => {
                h.update(&[1]);
                h.update(val);
            }
            None => {
                h.update(&[0]);
            }
        }
        let mut b = [0u8; 16];
        b.copy_from_slice(&h.finalize().as_bytes()[..16]);
        Ok(Entry {
            key,
            version,
            value,
            key_hash,
            hash: u128::from_le_bytes(b),
        })
    }

    /// The key.
    pub fn key(&self) -> &Key {
        &self.key
    }

    /// The version.
    pub fn version(&self) -> Version {
        self.version
    }

    /// The value, or `None` for a tombstone.
    pub fn value(&self) -> Option<&Bytes> {
        self.value.as_ref()
    }

    /// Whether this entry records a deletion.
    pub fn is_tombstone(&self) -> bool {
        self.value.is_none()
    }

    /// The 64-bit hash of the key (picks the bucket).
    pub fn key_hash(&self) -> u64 {
        self.key_hash
    }

    /// The bucket this entry belongs to.
    pub fn bucket(&self) -> usize {
        bucket_of(self.key_hash)
    }

    /// The 128-bit hash of key, version and value (what digests XOR).
    pub fn hash(&self) -> u128 {
        self.hash
    }

    /// The 64-bit fingerprint anti-entropy lists entries by.
    pub fn fingerprint(&self) -> u64 {
        self.hash as u64
    }

    /// Whether this entry beats `other` (same key) under last-writer-wins:
    /// greater version, and on an exact version tie (which only a buggy or
    /// hostile writer produces) the greater value, a tombstone being least.
    pub fn wins_over(&self, other: &Entry) -> bool {
        self.order(other) == Ordering::Greater
    }

    fn order(&self, other: &Entry) -> Ordering {
        self.version
            .cmp(&other.version)
            .then_with(|| self.value.cmp(&other.value))
    }

    /// Bytes a replica holding this entry unshared would use for it: the
    /// entry itself, its `Arc` header and slot, and the heap the key and
    /// value own.
    pub fn held_bytes(&self) -> usize {
        std::mem::size_of::<Entry>()
            + 2 * std::mem::size_of::<usize>()
            + std::mem::size_of::<Arc<Entry>>()
            + self.key.heap_len()
            + self.value.as_ref().map_or(0, Bytes::len)
    }

    /// Appends the wire encoding: key, version, then a presence byte and the
    /// length-prefixed value.
    pub fn encode(&self, out: &mut impl BufMut) {
        self.key.encode(out);
        put_version(out, &self.version);
        match &self.value {
            Some(v) => {
                out.put_u8(1);
                put_bytes(out, v);
            }
            None => BufMut::put_u8(out, 0),
        }
    }

    /// Length of [`encode`](Self::encode)'s output.
    pub fn encoded_len(&self) -> usize {
        self.key.encoded_len()
            + version_len(&self.version)
            + 1
            + self.value.as_ref().map_or(0, |v| bytes_len(v))
    }

    /// Decodes one entry encoded by [`encode`](Self::encode), rejecting
    /// trailing bytes. The value shares `bytes`' buffer.
    pub fn decode(bytes: Bytes) -> Result<Entry, DecodeError> {
        let mut r = Reader::new(bytes);
        let e = Entry::read(&mut r)?;
        r.finish()?;
        Ok(e)
    }

    pub(crate) fn read(r: &mut Reader) -> Result<Entry, DecodeError> {
        let key = Key::read(r)?;
        let version = read_version(r)?;
        let value = match r.u8("value presence")? {
            0 => None,
            1 => Some(r.bytes("value", MAX_VALUE_LEN)?),
            tag => {
                return Err(DecodeError::UnknownTag {
                    what: "value presence",
                    tag,
                })
            }
        };
        Entry::new(key, version, value).map_err(|e| match e {
            RecordError::Decode(d) => d,
            RecordError::TooLong { what, len, limit } => DecodeError::TooLong {
                what,
                len: len as u64,
                limit: limit as u64,
            },
            RecordError::Invalid { what, why } => DecodeError::Invalid { what, why },
        })
    }
}

/// The bucket a key hash falls in.
pub fn bucket_of(key_hash: u64) -> usize {
    (key_hash % BUCKETS as u64) as usize
}

/// What [`Replica::merge`] did with an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeOutcome {
    /// The key was new: the entry was added.
    Inserted,
    /// The entry beat the one held and replaced it.
    Replaced,
    /// The same entry was already held.
    Duplicate,
    /// The held entry wins, or the entry is a tombstone older than the GC
    /// horizon for a key not held: nothing changed.
    Stale,
}

impl MergeOutcome {
    /// Whether the replica changed (persist the entry when it did).
    pub fn changed(self) -> bool {
        matches!(self, MergeOutcome::Inserted | MergeOutcome::Replaced)
    }
}

#[derive(Debug, Default, Clone)]
struct Bucket {
    digest: u128,
    /// Sorted by `(key_hash, key)`.
    entries: Vec<Arc<Entry>>,
}

/// One site's copy of the replicated map.
#[derive(Debug, Clone)]
pub struct Replica {
    buckets: Box<[Bucket]>,
    groups: Box<[u128]>,
    root: u128,
    live: usize,
    tombstones: usize,
    entry_bytes: usize,
    gc_horizon: Timestamp,
}

impl Default for Replica {
    fn default() -> Self {
        Replica::new()
    }
}

impl Replica {
    /// An empty replica.
    pub fn new() -> Self {
        Replica {
            buckets: vec![Bucket::default(); BUCKETS].into_boxed_slice(),
            groups: vec![0u128; GROUPS].into_boxed_slice(),
            root: 0,
            live: 0,
            tombstones: 0,
            entry_bytes: 0,
            gc_horizon: Timestamp::default(),
        }
    }

    fn find(&self, key_hash: u64, key: &Key) -> (usize, Result<usize, usize>) {
        let b = bucket_of(key_hash);
        let pos = self.buckets[b]
            .entries
            .binary_search_by(|x| (x.key_hash, &x.key).cmp(&(key_hash, key)));
        (b, pos)
    }

    fn flip(&mut self, b: usize, hash: u128) {
        self.buckets[b].digest ^= hash;
        self.groups[b / BUCKETS_PER_GROUP] ^= hash;
        self.root ^= hash;
    }

    fn count(&mut self, e: &Entry, add: bool) {
        let (n, bytes) = if e.is_tombstone() {
            (&mut self.tombstones, e.held_bytes())
        } else {
            (&mut self.live, e.held_bytes())
        };
        if add {
            *n += 1;
            self.entry_bytes += bytes;
        } else {
            *n = n.saturating_sub(1);
            self.entry_bytes = self.entry_bytes.saturating_sub(bytes);
        }
    }

    /// Merges an entry (last writer wins), updating the digests in place.
    pub fn merge(&mut self, entry: Entry) -> MergeOutcome {
        self.merge_shared(Arc::new(entry))
    }

    /// [`merge`](Self::merge) for an entry that may be shared with other
    /// replicas.
    pub fn merge_shared(&mut self, entry: Arc<Entry>) -> MergeOutcome {
        let (b, pos) = self.find(entry.key_hash, &entry.key);
        match pos {
            Ok(i) => {
                let cur = Arc::clone(&self.buckets[b].entries[i]);
                match entry.order(&cur) {
                    Ordering::Greater => {
                        self.flip(b, cur.hash);
                        self.count(&cur, false);
                        self.flip(b, entry.hash);
                        self.count(&entry, true);
                        self.buckets[b].entries[i] = entry;
                        MergeOutcome::Replaced
                    }
                    Ordering::Equal => MergeOutcome::Duplicate,
                    Ordering::Less => MergeOutcome::Stale,
                }
            }
            Err(i) => {
                if entry.is_tombstone() && entry.version.ts < self.gc_horizon {
                    return MergeOutcome::Stale;
                }
                self.flip(b, entry.hash);
                self.count(&entry, true);
                self.buckets[b].entries.insert(i, entry);
                MergeOutcome::Inserted
            }
        }
    }

    /// The entry held for `key`, tombstones included.
    pub fn entry(&self, key: &Key) -> Option<&Arc<Entry>> {
        let (b, pos) = self.find(key_hash_of(key), key);
        pos.ok().map(|i| &self.buckets[b].entries[i])
    }

    /// The live value held for `key` (`None` if absent or deleted).
    pub fn get(&self, key: &Key) -> Option<&Bytes> {
        self.entry(key).and_then(|e| e.value())
    }

    /// A local write: stamps `value` with a fresh version from `clock` at
    /// wall time `wall_ms` (after the version of the entry held for the key,
    /// so the write wins locally) and merges it. Returns the entry to
    /// persist.
    pub fn put(
        &mut self,
        clock: &mut Hlc,
        wall_ms: u64,
        key: Key,
        value: Bytes,
    ) -> Result<Arc<Entry>, RecordError> {
        self.write(clock, wall_ms, key, Some(value))
    }

    /// A local deletion: merges a tombstone for `key` (see
    /// [`put`](Self::put)).
    pub fn delete(
        &mut self,
        clock: &mut Hlc,
        wall_ms: u64,
        key: Key,
    ) -> Result<Arc<Entry>, RecordError> {
        self.write(clock, wall_ms, key, None)
    }

    fn write(
        &mut self,
        clock: &mut Hlc,
        wall_ms: u64,
        key: Key,
        value: Option<Bytes>,
    ) -> Result<Arc<Entry>, RecordError> {
        key.validate()?;
        if let Some(cur) = self.entry(&key) {
            // A held version from a clock within the accepted drift moves
            // ours past it; one further ahead is refused (and may win).
            let _ = clock.observe(cur.version.ts, wall_ms);
        }
        let entry = Arc::new(Entry::new(key, clock.version(wall_ms), value)?);
        self.merge_shared(Arc::clone(&entry));
        Ok(entry)
    }

    /// Drops tombstones older than `horizon` and refuses older tombstones
    /// for keys not held from then on. Returns the dropped tombstones (to
    /// delete from persistent storage too).
    ///
    /// Every site must use the same horizon rule, and the horizon must lie
    /// further back than the longest partition that should heal correctly:
    /// a site cut off for longer could otherwise bring a deleted record
    /// back.
    pub fn gc(&mut self, horizon: Timestamp) -> Vec<Arc<Entry>> {
        self.gc_horizon = self.gc_horizon.max(horizon);
        let mut dropped = Vec::new();
        for b in 0..BUCKETS {
            let expired: Vec<Arc<Entry>> = self.buckets[b]
                .entries
                .iter()
                .filter(|e| e.is_tombstone() && e.version.ts < horizon)
                .cloned()
                .collect();
            if expired.is_empty() {
                continue;
            }
            self.buckets[b]
                .entries
                .retain(|e| !(e.is_tombstone() && e.version.ts < horizon));
            for e in expired {
                self.flip(b, e.hash);
                self.count(&e, false);
                dropped.push(e);
            }
        }
        dropped
    }

    /// The GC horizon.
    pub fn gc_horizon(&self) -> Timestamp {
        self.gc_horizon
    }

    /// The digest of the whole replica: equal digests mean equal contents.
    pub fn root_digest(&self) -> u128 {
        self.root
    }

    /// The digest of group `g` (`None` out of range).
    pub fn group_digest(&self, g: usize) -> Option<u128> {
        self.groups.get(g).copied()
    }

    /// All group digests, in order.
    pub fn group_digests(&self) -> &[u128] {
        &self.groups
    }

    /// The digest of bucket `b` (`None` out of range).
    pub fn bucket_digest(&self, b: usize) -> Option<u128> {
        self.buckets.get(b).map(|x| x.digest)
    }

    /// The entries of bucket `b`, sorted by key hash (empty out of range).
    pub fn bucket(&self, b: usize) -> &[Arc<Entry>] {
        self.buckets.get(b).map_or(&[], |x| &x.entries)
    }

    /// Every entry held, tombstones included, bucket by bucket.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Entry>> + '_ {
        self.buckets.iter().flat_map(|b| b.entries.iter())
    }

    /// Every live site record, decoded (`Err` for a value that does not
    /// decode).
    pub fn sites(&self) -> impl Iterator<Item = Result<SiteRecord, DecodeError>> + '_ {
        self.iter().filter_map(|e| match (e.key(), e.value()) {
            (Key::Site(_), Some(v)) => Some(SiteRecord::decode(v)),
            _ => None,
        })
    }

    /// Live entries held.
    pub fn live_len(&self) -> usize {
        self.live
    }

    /// Tombstones held.
    pub fn tombstones(&self) -> usize {
        self.tombstones
    }

    /// Entries held, tombstones included.
    pub fn len(&self) -> usize {
        self.live + self.tombstones
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes this replica would use on its own (entries unshared, plus the
    /// bucket and digest tables): the metadata memory of one site.
    /// Maintained on every merge, not computed by a scan.
    pub fn held_bytes(&self) -> usize {
        std::mem::size_of::<Replica>()
            + BUCKETS * std::mem::size_of::<Bucket>()
            + GROUPS * std::mem::size_of::<u128>()
            + self.entry_bytes
    }
}

/// Labels of a site.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Labels {
    /// Region, e.g. `"eu-west"`.
    pub region: String,
    /// Zone within the region.
    pub zone: String,
    /// Kind of site, e.g. `"core"`, `"regional"`, `"edge"`.
    pub kind: String,
    /// Free-form `key=value` labels (at most [`MAX_EXTRA_LABELS`]).
    pub extra: Vec<(String, String)>,
}

/// A geographic position in degrees.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Geo {
    /// Latitude, -90..=90.
    pub lat: f32,
    /// Longitude, -180..=180.
    pub lon: f32,
}

/// What a site has and offers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capacity {
    /// Disk size in bytes.
    pub disk_total: u64,
    /// Free disk in bytes.
    pub disk_free: u64,
    /// Chunk cache budget in bytes.
    pub cache_budget: u64,
    /// CPU offered to workloads, in millicores (configured).
    pub cpu_millis: u64,
    /// Memory offered to workloads, in bytes (configured).
    pub mem_bytes: u64,
}

/// A site's heartbeat: a counter the site bumps, and its wall time then.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Heartbeat {
    /// Increases with every heartbeat.
    pub counter: u64,
    /// The site's wall time at the heartbeat, in milliseconds.
    pub wall_ms: u64,
}

/// The record a site owns about itself (the value of [`Key::Site`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SiteRecord {
    /// The site's name.
    pub name: String,
    /// Its labels.
    pub labels: Labels,
    /// Where it is, if known.
    pub geo: Option<Geo>,
    /// Its parent site, if any.
    pub parent: Option<String>,
    /// Its capacity.
    pub capacity: Capacity,
    /// Its latest heartbeat.
    pub heartbeat: Heartbeat,
    /// Its network coordinate, if it has one.
    pub coord: Option<Coord>,
}

const SITE_RECORD_V1: u8 = 1;
const FLAG_GEO: u8 = 1;
const FLAG_PARENT: u8 = 2;
const FLAG_COORD: u8 = 4;

impl SiteRecord {
    /// Encodes the record (version 1), checking every limit.
    pub fn encode(&self) -> Result<Bytes, RecordError> {
        limit("site name", self.name.len(), MAX_NAME_LEN)?;
        limit("region", self.labels.region.len(), MAX_LABEL_LEN)?;
        limit("zone", self.labels.zone.len(), MAX_LABEL_LEN)?;
        limit("kind", self.labels.kind.len(), MAX_LABEL_LEN)?;
        limit("labels", self.labels.extra.len(), MAX_EXTRA_LABELS)?;
        for (k, v) in &self.labels.extra {
            limit("label key", k.len(), MAX_LABEL_LEN)?;
            limit("label value", v.len(), MAX_NAME_LEN)?;
        }
        if let Some(p) = &self.parent {
            limit("parent", p.len(), MAX_NAME_LEN)?;
        }
        if let Some(g) = &self.geo {
            check_geo(g).map_err(|why| RecordError::Invalid { what: "geo", why })?;
        }
        let mut out = Vec::with_capacity(96 + self.name.len());
        out.put_u8(SITE_RECORD_V1);
        put_bytes(&mut out, self.name.as_bytes());
        put_bytes(&mut out, self.labels.region.as_bytes());
        put_bytes(&mut out, self.labels.zone.as_bytes());
        put_bytes(&mut out, self.labels.kind.as_bytes());
        put_varint(&mut out, self.labels.extra.len() as u64);
        for (k, v) in &self.labels.extra {
            put_bytes(&mut out, k.as_bytes());
            put_bytes(&mut out, v.as_bytes());
        }
        let flags = (if self.geo.is_some() { FLAG_GEO } else { 0 })
            | (if self.parent.is_some() {
                FLAG_PARENT
            } else {
                0
            })
            | (if self.coord.is_some() { FLAG_COORD } else { 0 });
        out.put_u8(flags);
        if let Some(g) = &self.geo {
            out.put_f32_le(g.lat);
            out.put_f32_le(g.lon);
        }
        if let Some(p) = &self.parent {
            put_bytes(&mut out, p.as_bytes());
        }
        let c = &self.capacity;
        for v in [
            c.disk_total,
            c.disk_free,
            c.cache_budget,
            c.cpu_millis,
            c.mem_bytes,
            self.heartbeat.counter,
            self.heartbeat.wall_ms,
        ] {
            put_varint(&mut out, v);
        }
        if let Some(coord) = &self.coord {
            for x in coord.pos {
                out.put_f32_le(x as f32);
            }
            out.put_f32_le(coord.height as f32);
            out.put_f32_le(coord.error as f32);
        }
        limit("site record", out.len(), MAX_SITE_RECORD_LEN)?;
        Ok(Bytes::from(out))
    }

    /// Decodes a record, rejecting unknown versions, over-long fields,
    /// out-of-range numbers and trailing bytes.
    pub fn decode(bytes: &[u8]) -> Result<SiteRecord, DecodeError> {
        if bytes.len() > MAX_SITE_RECORD_LEN {
            return Err(DecodeError::TooLong {
                what: "site record",
                len: bytes.len() as u64,
                limit: MAX_SITE_RECORD_LEN as u64,
            });
        }
        let mut r = Reader::new(Bytes::copy_from_slice(bytes));
        let version = r.u8("site record version")?;
        if version != SITE_RECORD_V1 {
            return Err(DecodeError::Version {
                what: "site record",
                version,
            });
        }
        let name = r.string("site name", MAX_NAME_LEN)?;
        let region = r.string("region", MAX_LABEL_LEN)?;
        let zone = r.string("zone", MAX_LABEL_LEN)?;
        let kind = r.string("kind", MAX_LABEL_LEN)?;
        let n = r.count("labels", MAX_EXTRA_LABELS, 2)?;
        let mut extra = Vec::with_capacity(n);
        for _ in 0..n {
            extra.push((
                r.string("label key", MAX_LABEL_LEN)?,
                r.string("label value", MAX_NAME_LEN)?,
            ));
        }
        let flags = r.u8("site record flags")?;
        if flags & !(FLAG_GEO | FLAG_PARENT | FLAG_COORD) != 0 {
            return Err(DecodeError::Invalid {
                what: "site record flags",
                why: "unknown flag bits",
            });
        }
        let geo = if flags & FLAG_GEO != 0 {
            let g = Geo {
                lat: r.f32_le("latitude")?,
                lon: r.f32_le("longitude")?,
            };
            check_geo(&g).map_err(|why| DecodeError::Invalid { what: "geo", why })?;
            Some(g)
        } else {
            None
        };
        let parent = if flags & FLAG_PARENT != 0 {
            Some(r.string("parent", MAX_NAME_LEN)?)
        } else {
            None
        };
        let mut v = [0u64; 7];
        for x in &mut v {
            *x = r.varint("capacity")?;
        }
        let coord = if flags & FLAG_COORD != 0 {
            let mut pos = [0f64; DIMS];
            for x in &mut pos {
                *x = f64::from(r.f32_le("coordinate")?);
            }
            let height = f64::from(r.f32_le("coordinate height")?);
            let error = f64::from(r.f32_le("coordinate error")?);
            if height < 0.0 || error < 0.0 {
                return Err(DecodeError::Invalid {
                    what: "coordinate",
                    why: "negative height or error",
                });
            }
            Some(Coord { pos, height, error })
        } else {
            None
        };
        r.finish()?;
        Ok(SiteRecord {
            name,
            labels: Labels {
                region,
                zone,
                kind,
                extra,
            },
            geo,
            parent,
            capacity: Capacity {
                disk_total: v[0],
                disk_free: v[1],
                cache_budget: v[2],
                cpu_millis: v[3],
                mem_bytes: v[4],
            },
            heartbeat: Heartbeat {
                counter: v[5],
                wall_ms: v[6],
            },
            coord,
        })
    }
}

fn check_geo(g: &Geo) -> Result<(), &'static str> {
    if !(g.lat.is_finite() && (-90.0..=90.0).contains(&g.lat)) {
        return Err("latitude out of range");
    }
    if !(g.lon.is_finite() && (-180.0..=180.0).contains(&g.lon)) {
        return Err("longitude out of range");
    }
    Ok(())
}

/// The kind of an object a site holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ObjectKind {
    /// A VM image.
    Image,
    /// An OCI blob.
    Blob,
    /// A volume.
    Volume,
    /// A volume snapshot.
    Snapshot,
}

/// Parts per million that mean "complete".
pub const COMPLETE_PPM: u32 = 1_000_000;

/// One object a site holds (the value of [`Key::Inventory`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InventoryEntry {
    /// What the object is.
    pub kind: ObjectKind,
    /// Its logical size in bytes.
    pub size_bytes: u64,
    /// How much of it the site holds, in parts per million
    /// ([`COMPLETE_PPM`] = all of it).
    pub held_ppm: u32,
}

const INVENTORY_V1: u8 = 1;

impl InventoryEntry {
    /// Whether the site holds all of the object.
    pub fn is_complete(&self) -> bool {
        self.held_ppm >= COMPLETE_PPM
    }

    /// The fraction held, 0.0..=1.0.
    pub fn fraction(&self) -> f64 {
        f64::from(self.held_ppm.min(COMPLETE_PPM)) / f64::from(COMPLETE_PPM)
    }

    /// Encodes the entry (version 1).
    pub fn encode(&self) -> Result<Bytes, RecordError> {
        if self.held_ppm > COMPLETE_PPM {
            return Err(RecordError::Invalid {
                what: "held fraction",
                why: "above one million ppm",
            });
        }
        let mut out = Vec::with_capacity(16);
        out.put_u8(INVENTORY_V1);
        out.put_u8(match self.kind {
            ObjectKind::Image => 0,
            ObjectKind::Blob => 1,
            ObjectKind::Volume => 2,
            ObjectKind::Snapshot => 3,
        });
        put_varint(&mut out, self.size_bytes);
        put_varint(&mut out, u64::from(self.held_ppm));
        Ok(Bytes::from(out))
    }

    /// Decodes an entry, rejecting unknown versions and kinds, fractions
    /// above one and trailing bytes.
    pub fn decode(bytes: &[u8]) -> Result<InventoryEntry, DecodeError> {
        if bytes.len() > MAX_INVENTORY_LEN {
            return Err(DecodeError::TooLong {
                what: "inventory entry",
                len: bytes.len() as u64,
                limit: MAX_INVENTORY_LEN as u64,
            });
        }
        let mut r = Reader::new(Bytes::copy_from_slice(bytes));
        let version = r.u8("inventory version")?;
        if version != INVENTORY_V1 {
            return Err(DecodeError::Version {
                what: "inventory entry",
                version,
            });
        }
        let kind = match r.u8("object kind")? {
            0 => ObjectKind::Image,
            1 => ObjectKind::Blob,
            2 => ObjectKind::Volume,
            3 => ObjectKind::Snapshot,
            tag => {
                return Err(DecodeError::UnknownTag {
                    what: "object kind",
                    tag,
                })
            }
        };
        let size_bytes = r.varint("object size")?;
        let held_ppm = r.len("held fraction", COMPLETE_PPM as usize)? as u32;
        r.finish()?;
        Ok(InventoryEntry {
            kind,
            size_bytes,
            held_ppm,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key_strategy() -> impl Strategy<Value = Key> {
        prop_oneof![
            (0..6u8).prop_map(|i| Key::Site(format!("site-{i}"))),
            (0..3u8, 0..3u8).prop_map(|(s, o)| Key::Inventory {
                site: format!("site-{s}"),
                object: [o; 32]
            }),
            (0..3u8).prop_map(|t| Key::Tag {
                repo: "library/app".into(),
                tag: format!("v{t}")
            }),
        ]
    }

    fn entry_strategy() -> impl Strategy<Value = Entry> {
        (
            key_strategy(),
            0..20u64,
            0..3u32,
            0..4u64,
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..8)),
        )
            .prop_map(|(k, wall, logical, origin, v)| {
                Entry::new(
                    k,
                    Version {
                        ts: Timestamp {
                            wall_ms: wall,
                            logical,
                        },
                        origin,
                    },
                    v.map(Bytes::from),
                )
                .unwrap()
            })
    }

    fn contents(r: &Replica) -> Vec<Entry> {
        r.iter().map(|e| (**e).clone()).collect()
    }

    proptest! {
        /// Any permutation with duplicates of the same deliveries converges
        /// to the same contents and digests.
        #[test]
        fn merge_is_order_and_duplicate_insensitive(
            entries in proptest::collection::vec(entry_strategy(), 0..40),
            perm in proptest::collection::vec(any::<proptest::sample::Index>(), 0..80),
        ) {
            let mut a = Replica::new();
            for e in &entries {
                a.merge(e.clone());
            }
            let mut b = Replica::new();
            if !entries.is_empty() {
                for i in &perm {
                    b.merge(i.get(&entries).clone());
                }
                for e in entries.iter().rev() {
                    b.merge(e.clone());
                }
            }
            prop_assert_eq!(a.root_digest(), b.root_digest());
            prop_assert_eq!(contents(&a), contents(&b));
            prop_assert_eq!(a.held_bytes(), b.held_bytes());
            // The digests equal a fresh XOR over the contents.
            let fresh = a.iter().fold(0u128, |acc, e| acc ^ e.hash());
            prop_assert_eq!(fresh, a.root_digest());
            for g in 0..GROUPS {
                let fresh = (g * BUCKETS_PER_GROUP..(g + 1) * BUCKETS_PER_GROUP)
                    .flat_map(|bk| a.bucket(bk).iter())
                    .fold(0u128, |acc, e| acc ^ e.hash());
                prop_assert_eq!(Some(fresh), a.group_digest(g));
            }
        }

        #[test]
        fn entry_roundtrip(e in entry_strategy()) {
            let mut out = Vec::new();
            e.encode(&mut out);
            prop_assert_eq!(out.len(), e.encoded_len());
            prop_assert_eq!(Entry::decode(Bytes::from(out)).unwrap(), e);
        }

        #[test]
        fn decoders_never_panic(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Entry::decode(Bytes::from(b.clone()));
            let _ = Key::decode(&b);
            let _ = SiteRecord::decode(&b);
            let _ = InventoryEntry::decode(&b);
        }
    }

    fn site() -> SiteRecord {
        SiteRecord {
            name: "edge-0042".into(),
            labels: Labels {
                region: "eu-west".into(),
                zone: "eu-west-2".into(),
                kind: "edge".into(),
                extra: vec![("rack".into(), "r7".into())],
            },
            geo: Some(Geo {
                lat: 51.5,
                lon: -0.12,
            }),
            parent: Some("regional-eu-west-0".into()),
            capacity: Capacity {
                disk_total: 4 << 40,
                disk_free: 1 << 40,
                cache_budget: 1 << 39,
                cpu_millis: 16_000,
                mem_bytes: 64 << 30,
            },
            heartbeat: Heartbeat {
                counter: 77,
                wall_ms: 1_764_000_000_000,
            },
            coord: Some(Coord {
                pos: [1.5; DIMS],
                height: 3.25,
                error: 0.5,
            }),
        }
    }

    #[test]
    fn site_record_roundtrip_and_truncation() {
        let s = site();
        let enc = s.encode().unwrap();
        assert!(enc.len() < 160, "compact: {} bytes", enc.len());
        assert_eq!(SiteRecord::decode(&enc).unwrap(), s);
        for n in 0..enc.len() {
            assert!(SiteRecord::decode(&enc[..n]).is_err(), "prefix {n}");
        }
        let mut trailing = enc.to_vec();
        trailing.push(0);
        assert_eq!(SiteRecord::decode(&trailing), Err(DecodeError::Trailing(1)));
        let mut v2 = enc.to_vec();
        v2[0] = 2;
        assert!(matches!(
            SiteRecord::decode(&v2),
            Err(DecodeError::Version { .. })
        ));
    }

    #[test]
    fn site_record_limits() {
        let mut s = site();
        s.name = "x".repeat(MAX_NAME_LEN + 1);
        assert!(matches!(s.encode(), Err(RecordError::TooLong { .. })));
        let mut s = site();
        s.geo = Some(Geo {
            lat: 91.0,
            lon: 0.0,
        });
        assert!(matches!(s.encode(), Err(RecordError::Invalid { .. })));
        let mut s = site();
        s.labels.extra = (0..=MAX_EXTRA_LABELS)
            .map(|i| (format!("k{i}"), "v".into()))
            .collect();
        assert!(s.encode().is_err());
    }

    #[test]
    fn inventory_roundtrip() {
        let e = InventoryEntry {
            kind: ObjectKind::Snapshot,
            size_bytes: 10 << 30,
            held_ppm: 250_000,
        };
        let enc = e.encode().unwrap();
        assert_eq!(InventoryEntry::decode(&enc).unwrap(), e);
        assert!((e.fraction() - 0.25).abs() < 1e-9);
        assert!(!e.is_complete());
        let bad = [1u8, 9, 0, 0];
        assert!(matches!(
            InventoryEntry::decode(&bad),
            Err(DecodeError::UnknownTag { .. })
        ));
        let mut over = vec![1u8, 0, 0];
        put_varint(&mut over, 1_000_001);
        assert!(InventoryEntry::decode(&over).is_err());
    }

    #[test]
    fn put_delete_gc() {
        let mut r = Replica::new();
        let mut c = Hlc::new(1, 1000);
        let k = Key::Tag {
            repo: "r".into(),
            tag: "latest".into(),
        };
        r.put(&mut c, 10, k.clone(), Bytes::from_static(b"a"))
            .unwrap();
        assert_eq!(r.get(&k).map(|b| &b[..]), Some(&b"a"[..]));
        let tomb = r.delete(&mut c, 10, k.clone()).unwrap();
        assert!(r.get(&k).is_none());
        assert_eq!(r.tombstones(), 1);
        assert_eq!(r.gc(Timestamp::from_millis(11)).len(), 1);
        assert!(r.is_empty());
        assert_eq!(r.root_digest(), 0);
        // An old tombstone for an unknown key stays out.
        assert_eq!(r.merge((*tomb).clone()), MergeOutcome::Stale);
        // A write after a remote write from a clock ahead of ours wins.
        let ahead = Entry::new(
            k.clone(),
            Version {
                ts: Timestamp::from_millis(500),
                origin: 9,
            },
            Some(Bytes::from_static(b"remote")),
        )
        .unwrap();
        r.merge(ahead);
        r.put(&mut c, 20, k.clone(), Bytes::from_static(b"local"))
            .unwrap();
        assert_eq!(r.get(&k).map(|b| &b[..]), Some(&b"local"[..]));
    }

    #[test]
    fn memory_accounting_is_small() {
        let mut r = Replica::new();
        let mut c = Hlc::new(1, 1000);
        let before = r.held_bytes();
        let v = site().encode().unwrap();
        r.put(&mut c, 1, Key::Site("edge-0042".into()), v.clone())
            .unwrap();
        let per = r.held_bytes() - before;
        assert!(per < 4096, "{per}");
        assert!(per >= v.len());
    }
}
