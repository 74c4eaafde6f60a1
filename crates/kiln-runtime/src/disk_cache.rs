//! `cache.kind = "disk"`: results kept as files in a folder, so they outlive the process —
//! a second `kiln run` of the same inputs (or a longer video over the same keyframes)
//! reads them instead of running the model.
//!
//! One file per entry, `<dir>/<key as hex>.kt`, in kiln's tensor byte layout
//! (`NamedTensors::to_bytes`), written to a temporary name and renamed, so a reader never
//! sees half a file. An entry older than `cache.ttl_s` (by its modification time) is a
//! miss and is removed. Past `cache.max_bytes` the oldest files go first. An unreadable or
//! foreign file is a miss, never an error; a failed write is counted and logged once.
//! A local moka tier sits in front, so repeated lookups in one process touch no file.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use kiln_core::{Cache, CacheKey, CacheSetup, CacheStats, ConfigIssue, Error, NamedTensors, Result};

use crate::cache::MokaCache;

/// The keys `[cache]` takes for `kind = "disk"`, besides `ttl_s` and `max_bytes`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DiskOptions {
    /// The folder (created when missing).
    dir: PathBuf,
}

/// A [`Cache`] of files in a folder, with an in-process tier in front.
pub struct DiskCache {
    local: MokaCache,
    dir: PathBuf,
    ttl: Duration,
    max_bytes: u64,
    /// The folder's size as last counted plus what was written since (a scan only when
    /// that passes `max_bytes`).
    bytes: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    disk_hits: AtomicU64,
    writes: AtomicU64,
    errors: AtomicU64,
    warned: AtomicBool,
}

impl DiskCache {
    /// A cache in `dir` (created now), entries living `config.ttl_s`, the folder held
    /// under `config.max_bytes`.
    pub fn new(config: &kiln_core::CacheConfig, dir: PathBuf) -> Result<Self> {
        std::fs::create_dir_all(&dir).map_err(|e| {
            Error::Config(vec![ConfigIssue::new(
                "cache.dir",
                format!("{} ({e})", dir.display()),
                "a folder kiln can create and write",
            )])
        })?;
        let cache = DiskCache {
            local: MokaCache::new(config),
            dir,
            ttl: Duration::from_secs(config.ttl_s),
            max_bytes: config.max_bytes,
            bytes: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            disk_hits: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            warned: AtomicBool::new(false),
        };
        let files = cache.files().map_err(|e| Error::io("reading", cache.dir.display().to_string(), e))?;
        cache.bytes.store(files.iter().map(|f| f.1).sum(), Ordering::Relaxed);
        Ok(cache)
    }

    /// The entries' files: modification time, size, path.
    fn files(&self) -> std::io::Result<Vec<(SystemTime, u64, PathBuf)>> {
        Ok(std::fs::read_dir(&self.dir)?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "kt"))
            .filter_map(|e| {
                let meta = e.metadata().ok()?;
                Some((meta.modified().ok()?, meta.len(), e.path()))
            })
            .collect())
    }

    fn path(&self, key: &CacheKey) -> PathBuf {
        self.dir.join(format!("{}.kt", key.to_hex()))
    }

    fn read(&self, key: &CacheKey) -> Option<Arc<NamedTensors>> {
        let path = self.path(key);
        let age = std::fs::metadata(&path).ok()?.modified().ok()?.elapsed().unwrap_or_default();
        if age > self.ttl {
            let _ = std::fs::remove_file(&path);
            return None;
        }
        let value = Arc::new(NamedTensors::from_bytes(&std::fs::read(&path).ok()?).ok()?);
        self.local.insert(*key, value.clone());
        Some(value)
    }

    fn write(&self, key: &CacheKey, value: &NamedTensors) -> std::io::Result<()> {
        let path = self.path(key);
        let partial = path.with_extension(format!("kt.{}.partial", std::process::id()));
        let bytes = value.to_bytes();
        std::fs::write(&partial, &bytes)?;
        std::fs::rename(&partial, &path)?;
        let total = self.bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed) + bytes.len() as u64;
        if total > self.max_bytes { self.trim() } else { Ok(()) }
    }

    /// Removes the oldest files until the folder is under 90% of `max_bytes` (so the
    /// next writes do not each trigger a scan).
    fn trim(&self) -> std::io::Result<()> {
        let mut files = self.files()?;
        let mut total: u64 = files.iter().map(|f| f.1).sum();
        files.sort();
        for (_, len, path) in files {
            if total <= self.max_bytes / 10 * 9 {
                break;
            }
            std::fs::remove_file(&path)?;
            total -= len;
        }
        self.bytes.store(total, Ordering::Relaxed);
        Ok(())
    }
}

impl Cache for DiskCache {
    fn get(&self, key: &CacheKey) -> Option<Arc<NamedTensors>> {
        let found = self.local.get(key).or_else(|| {
            let read = self.read(key);
            if read.is_some() {
                self.disk_hits.fetch_add(1, Ordering::Relaxed);
            }
            read
        });
        let counter = if found.is_some() { &self.hits } else { &self.misses };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    fn insert(&self, key: CacheKey, value: Arc<NamedTensors>) {
        match self.write(&key, &value) {
            Ok(()) => {
                self.writes.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                if !self.warned.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "disk cache in {}: cannot write ({e}); keeping results in memory",
                        self.dir.display()
                    );
                }
            }
        }
        self.local.insert(key, value);
    }

    fn invalidate_all(&self) {
        // Memory pressure: the files cost no memory; only the in-process tier goes.
        self.local.invalidate_all();
    }

    fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            remote_hits: self.disk_hits.load(Ordering::Relaxed),
            remote_writes: self.writes.load(Ordering::Relaxed),
            remote_errors: self.errors.load(Ordering::Relaxed),
            remote_up: Some(self.errors.load(Ordering::Relaxed) == 0),
            ..self.local.stats()
        }
    }
}

fn build_disk(setup: &CacheSetup) -> Result<Arc<dyn Cache>> {
    let options: DiskOptions = setup.options()?;
    Ok(Arc::new(DiskCache::new(&setup.config, options.dir)?))
}

kiln_core::register_cache!(
    "disk",
    "files in cache.dir, kept across runs (an in-process tier in front)",
    build_disk
);

#[cfg(test)]
mod tests {
    use kiln_core::{CacheConfig, Tensor};

    use super::*;

    fn value(x: f32) -> Arc<NamedTensors> {
        Arc::new(NamedTensors::new().with("v", Tensor::from_vec(vec![2], vec![x, -x]).unwrap()))
    }

    #[test]
    fn entries_outlive_the_cache_that_wrote_them() {
        let dir = tempfile::tempdir().unwrap();
        let config = CacheConfig::default();
        let key = CacheKey([9; 16]);
        DiskCache::new(&config, dir.path().into()).unwrap().insert(key, value(1.5));
        let second = DiskCache::new(&config, dir.path().into()).unwrap();
        assert_eq!(*second.get(&key).unwrap(), *value(1.5));
        assert!(second.get(&CacheKey([1; 16])).is_none());
        let s = second.stats();
        assert_eq!((s.hits, s.misses, s.remote_hits), (1, 1, 1));
        // Garbage in the folder is a miss, not an error.
        std::fs::write(second.path(&CacheKey([2; 16])), b"not tensors").unwrap();
        assert!(second.get(&CacheKey([2; 16])).is_none());
    }

    #[test]
    fn the_folder_stays_under_max_bytes_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let one = value(0.0).to_bytes().len() as u64;
        let config = CacheConfig { max_bytes: one * 3, ..CacheConfig::default() };
        let cache = DiskCache::new(&config, dir.path().into()).unwrap();
        for i in 0..6u8 {
            cache.insert(CacheKey([i; 16]), value(f32::from(i)));
        }
        let files = std::fs::read_dir(dir.path()).unwrap().count() as u64;
        assert!(files <= 3, "{files} files kept");
    }

    #[test]
    fn an_unset_dir_is_a_config_error_naming_it() {
        let mut config = CacheConfig { kind: "disk".into(), ..CacheConfig::default() };
        let e = kiln_core::build_cache(&config).err().unwrap().to_string();
        assert!(e.contains("cache") && e.contains("dir"), "{e}");
        config.options.insert("dir".into(), "/proc/no/such/place".into());
        let e = kiln_core::build_cache(&config).err().unwrap().to_string();
        assert!(e.contains("cache.dir"), "{e}");
    }
}
