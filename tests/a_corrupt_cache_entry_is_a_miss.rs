//! A shared cache is a trust boundary: entries that do not fit the model's embeddings —
//! the wrong shape or width, non-finite values, another dtype — are misses, recomputed and
//! counted in `stats().cache_invalid`, never served. The cache here is a test double
//! (`corrupt`, fault injection) that answers every lookup with one of them.
#![cfg(feature = "candle")]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use kiln::{Cache, CacheKey, CacheSetup, CacheStats, NamedTensors, Result, Tensor};

/// Which corruption the next lookup returns.
static NEXT: AtomicUsize = AtomicUsize::new(0);

struct Corrupt;

impl Cache for Corrupt {
    fn get(&self, _: &CacheKey) -> Option<Arc<NamedTensors>> {
        let entry = match NEXT.fetch_add(1, Ordering::Relaxed) % 5 {
            0 => Tensor::from_vec(vec![3], vec![1.0f32; 3]),
            1 => Tensor::from_vec(vec![0], Vec::<f32>::new()),
            2 => Tensor::from_vec(vec![2, 192], vec![0.5f32; 384]),
            3 => Tensor::from_vec(vec![384], vec![f32::NAN; 384]),
            _ => Tensor::from_vec(vec![1_000], vec![0.1f32; 1_000]),
        };
        Some(Arc::new(NamedTensors::new().with("embedding", entry.unwrap())))
    }
    fn insert(&self, _: CacheKey, _: Arc<NamedTensors>) {}
    fn invalidate_all(&self) {}
    fn stats(&self) -> CacheStats {
        CacheStats::default()
    }
}

fn build(_: &CacheSetup) -> Result<Arc<dyn Cache>> {
    Ok(Arc::new(Corrupt))
}

kiln::register_cache!("corrupt", "fault injection: every entry misfits the model", build);

#[tokio::test]
async fn misfit_entries_are_recomputed_and_counted() {
    let reference = support::reference();
    let texts: Vec<String> = reference.texts.iter().take(10).cloned().collect();
    let plain = kiln::Optimizer::from_config(support::minilm_config(&["cache.enabled=false"])).await.unwrap();
    let expected = plain.embed(&texts).await.unwrap();
    plain.shutdown().await.unwrap();
    let corrupt =
        kiln::Optimizer::from_config(support::minilm_config(&["cache.kind=\"corrupt\""])).await.unwrap();
    let got = corrupt.embed(&texts).await.unwrap();
    for (a, b) in got.iter().zip(&expected) {
        assert_eq!(a.len(), 384);
        assert!(support::cosine(a, b) > 0.99999, "a cache entry was served");
    }
    let stats = corrupt.shutdown().await.unwrap();
    assert_eq!(stats.cache_invalid, 10, "{stats:?}");
}
