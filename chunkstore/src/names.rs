//! Versioned names: the compare-and-set that lets a name written at several
//! sites (an OCI tag changed on both sides of a partition) settle on the
//! same value everywhere, whatever order the writes arrive in.

use crate::error::Result;
use crate::id::ObjectId;
use crate::index::{self, NameEntry};
use crate::store::{now_ms, sync_write, Store};

impl Store {
    /// The entry of `name`, if it is set.
    pub fn name_entry(&self, name: &str) -> Result<Option<NameEntry>> {
        index::validate_name(name)?;
        match self
            .inner
            .db
            .get_pinned_cf(self.cf(index::CF_NAMES), name.as_bytes())?
        {
            Some(v) => Ok(Some(NameEntry::decode(name.as_bytes(), &v)?)),
            None => Ok(None),
        }
    }

    /// The object pinned under `key`, if that pin exists.
    pub fn pin_target(&self, key: &str) -> Result<Option<ObjectId>> {
        index::validate_name(key)?;
        match self
            .inner
            .db
            .get_pinned_cf(self.cf(index::CF_PINS), key.as_bytes())?
        {
            Some(v) => Ok(ObjectId::from_slice(&v)),
            None => Ok(None),
        }
    }

    /// Point `name` at `object` with `version`, unless the name already
    /// holds an entry that wins over it ([`NameEntry::wins_over`]: higher
    /// version, then higher object id). Returns the entry the name holds
    /// afterwards and whether this call changed it. Applying the same set of
    /// writes in any order leaves every store with the same entry.
    ///
    /// An unversioned [`Store::set_name`] always overwrites and resets the
    /// version to 0; names that replicate should only use this method.
    pub fn set_name_versioned(
        &self,
        name: &str,
        object: &ObjectId,
        version: u64,
    ) -> Result<(NameEntry, bool)> {
        index::validate_name(name)?;
        self.recipe(object)?;
        let new = NameEntry {
            object: *object,
            updated_ms: now_ms(),
            version,
        };
        let _n = self.inner.names_lock.lock();
        if let Some(cur) = self.name_entry(name)? {
            if cur.object == new.object && cur.version == new.version {
                return Ok((cur, false));
            }
            if !new.wins_over(&cur) {
                return Ok((cur, false));
            }
        }
        let _c = self.inner.commit_lock.read();
        self.inner.db.put_cf_opt(
            self.cf(index::CF_NAMES),
            name.as_bytes(),
            new.encode(),
            &sync_write(),
        )?;
        Ok((new, true))
    }
}

#[cfg(test)]
mod tests {
    use crate::{PutOptions, Store, StoreConfig};

    fn obj(store: &Store, bytes: &[u8]) -> crate::ObjectId {
        store
            .put_bytes(
                bytes,
                &PutOptions {
                    pin: true,
                    ..PutOptions::default()
                },
            )
            .map(|p| p.object)
            .expect("put")
    }

    #[test]
    fn highest_version_wins_in_any_order() {
        let dirs: Vec<_> = (0..2)
            .map(|_| tempfile::tempdir().expect("tempdir"))
            .collect();
        let stores: Vec<Store> = dirs
            .iter()
            .map(|d| Store::open(d.path(), StoreConfig::default()).expect("open"))
            .collect();
        let writes = |s: &Store| {
            let a = obj(s, b"manifest a");
            let b = obj(s, b"manifest b");
            let c = obj(s, b"manifest c");
            vec![(a, 5u64), (b, 9), (c, 9), (a, 7)]
        };
        let w0 = writes(&stores[0]);
        let w1 = writes(&stores[1]);
        for (o, v) in &w0 {
            stores[0].set_name_versioned("tag/r:t", o, *v).expect("set");
        }
        for (o, v) in w1.iter().rev() {
            stores[1].set_name_versioned("tag/r:t", o, *v).expect("set");
        }
        let e0 = stores[0].name_entry("tag/r:t").expect("get").expect("set");
        let e1 = stores[1].name_entry("tag/r:t").expect("get").expect("set");
        assert_eq!(e0.version, 9);
        assert_eq!((e0.object, e0.version), (e1.object, e1.version));
        // Version 9 was written twice: the higher object id wins the tie.
        let (b, c) = (w0[1].0, w0[2].0);
        let want = if b.as_bytes() > c.as_bytes() { b } else { c };
        assert_eq!(e0.object, want);
        // A lower version changes nothing and says so.
        let (e, changed) = stores[0]
            .set_name_versioned("tag/r:t", &w0[0].0, 8)
            .expect("set");
        assert!(!changed);
        assert_eq!(e.object, want);
    }

    #[test]
    fn versions_survive_reopen_and_old_entries_read_as_zero() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let s = Store::open(dir.path(), StoreConfig::default()).expect("open");
            let a = obj(&s, b"a");
            s.set_name("plain", &a).expect("set");
            s.set_name_versioned("tag/r:v", &a, 42).expect("set");
        }
        let s = Store::open(dir.path(), StoreConfig::default()).expect("reopen");
        assert_eq!(
            s.name_entry("plain").expect("get").map(|e| e.version),
            Some(0)
        );
        assert_eq!(
            s.name_entry("tag/r:v").expect("get").map(|e| e.version),
            Some(42)
        );
        assert_eq!(s.name_entry("absent").expect("get"), None);
        // Versioned names are ordinary names to everything else.
        assert_eq!(
            s.resolve("tag/r:v").expect("resolve"),
            s.resolve("plain").expect("resolve")
        );
    }
}
