//! Shared binary encoding helpers and the decode error type.
//!
//! Integers are unsigned LEB128 varints unless a field is fixed-width;
//! strings and byte strings are length-prefixed and every length has a
//! limit that is checked before anything is allocated.

use bytes::{BufMut, Bytes};
use thiserror::Error;

/// Why untrusted bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// The input ended before the value did.
    #[error("input truncated while reading {what}")]
    Truncated {
        /// What was being read.
        what: &'static str,
    },
    /// The encoding version is not one this build understands.
    #[error("unsupported {what} encoding version {version}")]
    Version {
        /// What was being read.
        what: &'static str,
        /// The version byte found.
        version: u8,
    },
    /// A type tag has no meaning.
    #[error("unknown {what} tag {tag}")]
    UnknownTag {
        /// What was being read.
        what: &'static str,
        /// The tag found.
        tag: u8,
    },
    /// A length or count is over its limit.
    #[error("{what} length {len} exceeds the limit of {limit}")]
    TooLong {
        /// What was being read.
        what: &'static str,
        /// The length or count found.
        len: u64,
        /// The limit.
        limit: u64,
    },
    /// A string is not UTF-8.
    #[error("{what} is not valid UTF-8")]
    Utf8 {
        /// What was being read.
        what: &'static str,
    },
    /// Bytes were left over after the value.
    #[error("{0} trailing bytes after the value")]
    Trailing(usize),
    /// A field holds a value outside its domain.
    #[error("invalid {what}: {why}")]
    Invalid {
        /// What was being read.
        what: &'static str,
        /// What is wrong with it.
        why: &'static str,
    },
}

/// A cursor over untrusted input. Byte strings are returned as cheap slices
/// of the underlying [`Bytes`].
#[derive(Debug)]
pub(crate) struct Reader {
    buf: Bytes,
    pos: usize,
}

impl Reader {
    pub(crate) fn new(buf: Bytes) -> Self {
        Reader { buf, pos: 0 }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(crate) fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(DecodeError::Trailing(n)),
        }
    }

    pub(crate) fn take(&mut self, n: usize, what: &'static str) -> Result<Bytes, DecodeError> {
        if n > self.remaining() {
            return Err(DecodeError::Truncated { what });
        }
        let out = self.buf.slice(self.pos..self.pos + n);
        self.pos += n;
        Ok(out)
    }

    pub(crate) fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        let b = *self
            .buf
            .get(self.pos)
            .ok_or(DecodeError::Truncated { what })?;
        self.pos += 1;
        Ok(b)
    }

    pub(crate) fn array<const N: usize>(
        &mut self,
        what: &'static str,
    ) -> Result<[u8; N], DecodeError> {
        let b = self
            .buf
            .get(self.pos..self.pos + N)
            .ok_or(DecodeError::Truncated { what })?;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        self.pos += N;
        Ok(out)
    }

    pub(crate) fn u16_le(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }

    pub(crate) fn u64_le(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    pub(crate) fn u128_le(&mut self, what: &'static str) -> Result<u128, DecodeError> {
        Ok(u128::from_le_bytes(self.array(what)?))
    }

    pub(crate) fn f32_le(&mut self, what: &'static str) -> Result<f32, DecodeError> {
        let v = f32::from_le_bytes(self.array(what)?);
        if v.is_finite() {
            Ok(v)
        } else {
            Err(DecodeError::Invalid {
                what,
                why: "not a finite number",
            })
        }
    }

    /// An unsigned LEB128 varint of at most 64 bits.
    pub(crate) fn varint(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        let mut out: u64 = 0;
        for i in 0..10u32 {
            let b = self.u8(what)?;
            let low = u64::from(b & 0x7f);
            if i == 9 && low > 1 {
                return Err(DecodeError::Invalid {
                    what,
                    why: "varint overflows 64 bits",
                });
            }
            out |= low << (7 * i);
            if b & 0x80 == 0 {
                return Ok(out);
            }
        }
        Err(DecodeError::Invalid {
            what,
            why: "varint longer than 10 bytes",
        })
    }

    /// A varint that must not exceed `limit`.
    pub(crate) fn len(&mut self, what: &'static str, limit: usize) -> Result<usize, DecodeError> {
        let v = self.varint(what)?;
        if v > limit as u64 {
            return Err(DecodeError::TooLong {
                what,
                len: v,
                limit: limit as u64,
            });
        }
        // `limit` is a usize, so `v` fits.
        Ok(v as usize)
    }

    /// A count of items each at least `min_item` bytes long: bounded by
    /// `limit` and by what the remaining input could possibly hold, so a
    /// hostile count cannot make the caller allocate.
    pub(crate) fn count(
        &mut self,
        what: &'static str,
        limit: usize,
        min_item: usize,
    ) -> Result<usize, DecodeError> {
        let n = self.len(what, limit)?;
        if n.saturating_mul(min_item.max(1)) > self.remaining() {
            return Err(DecodeError::Truncated { what });
        }
        Ok(n)
    }

    pub(crate) fn bytes(&mut self, what: &'static str, limit: usize) -> Result<Bytes, DecodeError> {
        let n = self.len(what, limit)?;
        self.take(n, what)
    }

    pub(crate) fn string(
        &mut self,
        what: &'static str,
        limit: usize,
    ) -> Result<String, DecodeError> {
        let b = self.bytes(what, limit)?;
        String::from_utf8(b.to_vec()).map_err(|_| DecodeError::Utf8 { what })
    }
}

pub(crate) fn put_varint(out: &mut impl BufMut, mut v: u64) {
    while v >= 0x80 {
        out.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    out.put_u8(v as u8);
}

pub(crate) fn varint_len(v: u64) -> usize {
    let bits = 64 - (v | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

pub(crate) fn put_bytes(out: &mut impl BufMut, b: &[u8]) {
    put_varint(out, b.len() as u64);
    out.put_slice(b);
}

pub(crate) fn bytes_len(b: &[u8]) -> usize {
    varint_len(b.len() as u64) + b.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn varint_roundtrip(v: u64) {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            prop_assert_eq!(out.len(), varint_len(v));
            let mut r = Reader::new(Bytes::from(out));
            prop_assert_eq!(r.varint("v").unwrap(), v);
            prop_assert!(r.finish().is_ok());
        }

        #[test]
        fn varint_never_panics(b: Vec<u8>) {
            let mut r = Reader::new(Bytes::from(b));
            let _ = r.varint("v");
        }
    }

    #[test]
    fn varint_overflow_rejected() {
        let mut r = Reader::new(Bytes::from_static(&[0xff; 10]));
        assert!(r.varint("v").is_err());
        let mut r = Reader::new(Bytes::from_static(&[
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02,
        ]));
        assert!(r.varint("v").is_err());
    }

    #[test]
    fn hostile_count_is_bounded_by_input() {
        let mut out = Vec::new();
        put_varint(&mut out, 1_000_000);
        let mut r = Reader::new(Bytes::from(out));
        assert!(matches!(
            r.count("n", usize::MAX, 8),
            Err(DecodeError::Truncated { .. })
        ));
    }
}
