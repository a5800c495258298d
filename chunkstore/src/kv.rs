//! Small durable records kept beside the chunks, in their own RocksDB
//! column family: the node's site metadata (records, inventory, tags of
//! issue 7/8). Opaque keys and values; every write is one synced batch.

use rocksdb::{IteratorMode, WriteBatch};

use crate::error::{Result, StoreError};
use crate::index;
use crate::store::{sync_write, Store};

/// Longest key [`Store::meta_write`] accepts.
pub const MAX_META_KEY: usize = 4096;
/// Largest value [`Store::meta_write`] accepts.
pub const MAX_META_VALUE: usize = 1 << 20;

/// One metadata record as stored: key and value.
pub type MetaRecord = (Box<[u8]>, Box<[u8]>);

impl Store {
    /// Put `puts` and delete `deletes` in one batch, durable when this
    /// returns (synced WAL). Keys are 1..=[`MAX_META_KEY`] bytes, values at
    /// most [`MAX_META_VALUE`].
    pub fn meta_write(&self, puts: &[(Vec<u8>, Vec<u8>)], deletes: &[Vec<u8>]) -> Result<()> {
        let check = |k: &[u8]| {
            if k.is_empty() || k.len() > MAX_META_KEY {
                return Err(StoreError::Invalid(format!(
                    "metadata key of {} bytes (1..={MAX_META_KEY})",
                    k.len()
                )));
            }
            Ok(())
        };
        let cf = self.cf(index::CF_META);
        let mut batch = WriteBatch::default();
        for (k, v) in puts {
            check(k)?;
            if v.len() > MAX_META_VALUE {
                return Err(StoreError::Invalid(format!(
                    "metadata value of {} bytes (at most {MAX_META_VALUE})",
                    v.len()
                )));
            }
            batch.put_cf(cf, k, v);
        }
        for k in deletes {
            check(k)?;
            batch.delete_cf(cf, k);
        }
        if batch.is_empty() {
            return Ok(());
        }
        self.inner.db.write_opt(batch, &sync_write())?;
        Ok(())
    }

    /// Every metadata record, in key order.
    pub fn meta_scan(&self) -> Result<Vec<MetaRecord>> {
        let cf = self.cf(index::CF_META);
        let mut out = Vec::new();
        for item in self.inner.db.iterator_cf(cf, IteratorMode::Start) {
            out.push(item?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use crate::{Store, StoreConfig, StoreError};

    #[test]
    fn records_survive_reopen_and_limits_hold() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path(), StoreConfig::default()).unwrap();
            s.meta_write(
                &[
                    (b"b".to_vec(), b"2".to_vec()),
                    (b"a".to_vec(), b"1".to_vec()),
                ],
                &[],
            )
            .unwrap();
            s.meta_write(&[(b"c".to_vec(), vec![])], &[b"b".to_vec()])
                .unwrap();
            assert!(matches!(
                s.meta_write(&[(vec![], b"x".to_vec())], &[]),
                Err(StoreError::Invalid(_))
            ));
            assert!(matches!(
                s.meta_write(&[(b"k".to_vec(), vec![0; super::MAX_META_VALUE + 1])], &[]),
                Err(StoreError::Invalid(_))
            ));
        }
        let s = Store::open(dir.path(), StoreConfig::default()).unwrap();
        let got: Vec<(Vec<u8>, Vec<u8>)> = s
            .meta_scan()
            .unwrap()
            .into_iter()
            .map(|(k, v)| (k.into_vec(), v.into_vec()))
            .collect();
        assert_eq!(
            got,
            vec![(b"a".to_vec(), b"1".to_vec()), (b"c".to_vec(), vec![])]
        );
    }
}
