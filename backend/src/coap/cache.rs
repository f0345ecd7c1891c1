//! Package bytes for PCP segments and Block2 blocks: whole packages kept in memory up to
//! `lwm2m.cache_bytes` (least recently used dropped first), loaded once however many devices ask at the
//! same moment; a package larger than the cache is read range by range from the store instead.

use std::ops::Range;
use std::sync::Mutex;

use bytes::Bytes;
use futures::TryStreamExt;

use super::{HashMap, lock};
use crate::driver::SegmentSource;
use crate::objects::PackageStore;

/// Package bytes by package id, with when each was last used.
#[derive(Default)]
struct Entries {
    entries: HashMap<String, (Bytes, u64)>,
    bytes: usize,
    tick: u64,
}

impl Entries {
    /// A package's bytes, marked as just used.
    fn get(&mut self, package_id: &str) -> Option<Bytes> {
        self.tick += 1;
        let tick = self.tick;
        self.entries.get_mut(package_id).map(|(b, t)| {
            *t = tick;
            b.clone()
        })
    }

    /// Adds a package, then drops the least recently used others until the total is within `limit`
    /// (the new one stays, even alone over the limit).
    fn insert(&mut self, package_id: &str, bytes: Bytes, limit: usize) {
        self.tick += 1;
        let tick = self.tick;
        self.bytes += bytes.len();
        if let Some((old, _)) = self.entries.insert(package_id.to_owned(), (bytes, tick)) {
            self.bytes -= old.len();
        }
        while self.bytes > limit && self.entries.len() > 1 {
            let Some(oldest) = self
                .entries
                .iter()
                .filter(|(id, _)| id.as_str() != package_id)
                .min_by_key(|(_, (_, t))| *t)
                .map(|(id, _)| id.clone())
            else {
                break;
            };
            if let Some((b, _)) = self.entries.remove(&oldest) {
                self.bytes -= b.len();
            }
        }
    }
}

/// The cache.
pub(super) struct PackageCache {
    store: PackageStore,
    limit: usize,
    entries: Mutex<Entries>,
    /// Loads in progress, so a crowd asking for one package loads it once.
    loading: tokio::sync::Mutex<()>,
}

impl PackageCache {
    pub(super) fn new(store: PackageStore, limit: usize) -> Self {
        Self {
            store,
            limit,
            entries: Mutex::default(),
            loading: tokio::sync::Mutex::new(()),
        }
    }

    /// The whole package, if it is cached.
    pub(super) fn cached(&self, package_id: &str) -> Option<Bytes> {
        lock(&self.entries).get(package_id)
    }

    /// The whole package, from the cache or loaded into it once.
    pub(super) async fn package(&self, source: &SegmentSource) -> crate::Result<Bytes> {
        if let Some(b) = self.cached(&source.package_id) {
            return Ok(b);
        }
        let _loading = self.loading.lock().await;
        if let Some(b) = self.cached(&source.package_id) {
            return Ok(b);
        }
        let bytes = self.read(source, 0..source.size).await?;
        lock(&self.entries).insert(&source.package_id, bytes.clone(), self.limit);
        Ok(bytes)
    }

    /// Bytes `range` of a package: from the cache, from the whole package loaded into it when it fits,
    /// else read from the store on their own, so a package larger than the cache is never held whole to
    /// serve one block.
    pub(super) async fn range(
        &self,
        source: &SegmentSource,
        range: Range<usize>,
    ) -> crate::Result<Bytes> {
        if let Some(b) = self.cached(&source.package_id) {
            return Ok(b.slice(range));
        }
        if usize::try_from(source.size).is_ok_and(|size| size <= self.limit) {
            return Ok(self.package(source).await?.slice(range));
        }
        self.read(source, range.start as u64..range.end as u64)
            .await
    }

    /// Bytes `range` of a package, read from the store.
    async fn read(&self, source: &SegmentSource, range: Range<u64>) -> crate::Result<Bytes> {
        let capacity = usize::try_from(range.end - range.start).unwrap_or(0);
        let reader = self
            .store
            .open_range(&source.object_key, range, 64 * 1024)
            .await?;
        let all = reader
            .try_fold(Vec::with_capacity(capacity), |mut all, chunk| async move {
                all.extend_from_slice(&chunk);
                Ok(all)
            })
            .await
            .map_err(|e| {
                crate::Error::Internal(format!("reading package {}: {e}", source.package_id))
            })?;
        Ok(Bytes::from(all))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(n: usize) -> Bytes {
        Bytes::from(vec![0u8; n])
    }

    #[test]
    fn the_least_recently_used_package_goes_first_and_the_newest_stays() {
        let mut e = Entries::default();
        e.insert("a", bytes(40), 100);
        e.insert("b", bytes(40), 100);
        assert!(e.get("a").is_some());
        // Over the limit: `b` was used longest ago.
        e.insert("c", bytes(40), 100);
        assert!(e.get("b").is_none());
        assert!(e.get("a").is_some() && e.get("c").is_some());
        assert_eq!(e.bytes, 80);
        // A package larger than the limit stays alone.
        e.insert("huge", bytes(500), 100);
        assert_eq!(e.entries.len(), 1);
        assert_eq!(e.bytes, 500);
        // The same package again is counted once.
        e.insert("huge", bytes(500), 1000);
        assert_eq!(e.bytes, 500);
    }
}
