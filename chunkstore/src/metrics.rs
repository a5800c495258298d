//! Store metrics, one typed struct registered into a Prometheus registry.

use prometheus::{Gauge, IntCounter, IntGauge, Opts, Registry};

/// Counters and gauges of one store. Names are prefixed `cairn_store_`.
#[derive(Debug, Clone)]
pub struct StoreMetrics {
    /// Bytes of all stored objects, counting duplicates.
    pub logical_bytes: IntGauge,
    /// Bytes of distinct chunks held (after dedup and compression).
    pub physical_bytes: IntGauge,
    /// Bytes of segment files on disk, including space GC has not compacted yet.
    pub segment_bytes: IntGauge,
    /// logical / physical.
    pub dedup_ratio: Gauge,
    /// Chunks written to disk.
    pub chunks_written: IntCounter,
    /// Chunks that were already present at ingest.
    pub chunks_deduplicated: IntCounter,
    /// Chunks read from disk.
    pub chunks_read: IntCounter,
    /// Bytes ingested (object bytes, before dedup).
    pub ingested_bytes: IntCounter,
    /// Chunks whose bytes did not match their id.
    pub verify_failures: IntCounter,
    /// Random reads served from the verified chunk cache (no I/O, no hash).
    pub chunk_cache_hits: IntCounter,
    /// Random reads that looked in the verified chunk cache and missed.
    pub chunk_cache_misses: IntCounter,
    /// Bytes charged to the verified chunk cache (chunk bytes plus a fixed
    /// per-entry overhead).
    pub chunk_cache_bytes: IntGauge,
    /// Chunks evicted under the byte budget.
    pub evictions: IntCounter,
    /// Bytes evicted under the byte budget.
    pub evicted_bytes: IntCounter,
    /// Completed GC runs.
    pub gc_runs: IntCounter,
    /// Chunks GC removed because nothing referenced them.
    pub gc_chunks_reclaimed: IntCounter,
    /// Segment bytes compaction gave back to the file system.
    pub gc_bytes_reclaimed: IntCounter,
}

fn counter(reg: &Registry, name: &str, help: &str) -> IntCounter {
    let c =
        IntCounter::with_opts(Opts::new(name, help)).unwrap_or_else(|_| unreachable_metric(name));
    // Registering twice (two stores in one registry) is the caller's choice;
    // the second store then keeps private metrics instead of failing.
    let _ = reg.register(Box::new(c.clone()));
    c
}

fn gauge(reg: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::with_opts(Opts::new(name, help)).unwrap_or_else(|_| unreachable_metric(name));
    let _ = reg.register(Box::new(g.clone()));
    g
}

#[cold]
fn unreachable_metric(name: &str) -> ! {
    // Names and help strings are compile-time constants checked by tests.
    panic!("invalid metric definition {name}")
}

impl StoreMetrics {
    /// Create the metrics and register them in `reg`.
    pub fn new(reg: &Registry) -> Self {
        let dedup_ratio = Gauge::with_opts(Opts::new(
            "cairn_store_dedup_ratio",
            "Logical bytes divided by physical bytes",
        ))
        .unwrap_or_else(|_| unreachable_metric("cairn_store_dedup_ratio"));
        let _ = reg.register(Box::new(dedup_ratio.clone()));
        Self {
            logical_bytes: gauge(
                reg,
                "cairn_store_logical_bytes",
                "Bytes of all stored objects, counting duplicates",
            ),
            physical_bytes: gauge(
                reg,
                "cairn_store_physical_bytes",
                "Bytes of distinct chunks held, after dedup and compression",
            ),
            segment_bytes: gauge(
                reg,
                "cairn_store_segment_bytes",
                "Bytes of segment files on disk, including uncompacted garbage",
            ),
            dedup_ratio,
            chunks_written: counter(
                reg,
                "cairn_store_chunks_written_total",
                "Chunks written to disk",
            ),
            chunks_deduplicated: counter(
                reg,
                "cairn_store_chunks_deduplicated_total",
                "Chunks already present at ingest",
            ),
            chunks_read: counter(
                reg,
                "cairn_store_chunks_read_total",
                "Chunk reads served from disk",
            ),
            ingested_bytes: counter(
                reg,
                "cairn_store_ingested_bytes_total",
                "Object bytes ingested, before dedup",
            ),
            verify_failures: counter(
                reg,
                "cairn_store_verify_failures_total",
                "Chunks whose bytes did not match their id",
            ),
            chunk_cache_hits: counter(
                reg,
                "cairn_store_chunk_cache_hits_total",
                "Random reads served from the verified chunk cache",
            ),
            chunk_cache_misses: counter(
                reg,
                "cairn_store_chunk_cache_misses_total",
                "Random reads that missed the verified chunk cache",
            ),
            chunk_cache_bytes: gauge(
                reg,
                "cairn_store_chunk_cache_bytes",
                "Bytes held by the verified chunk cache, with per-entry overhead",
            ),
            evictions: counter(
                reg,
                "cairn_store_evictions_total",
                "Chunks evicted under the byte budget",
            ),
            evicted_bytes: counter(
                reg,
                "cairn_store_evicted_bytes_total",
                "Bytes evicted under the byte budget",
            ),
            gc_runs: counter(
                reg,
                "cairn_store_gc_runs_total",
                "Completed garbage collections",
            ),
            gc_chunks_reclaimed: counter(
                reg,
                "cairn_store_gc_chunks_reclaimed_total",
                "Unreferenced chunks removed by GC",
            ),
            gc_bytes_reclaimed: counter(
                reg,
                "cairn_store_gc_bytes_reclaimed_total",
                "Segment bytes returned to the file system by compaction",
            ),
        }
    }

    pub(crate) fn update_ratio(&self) {
        let p = self.physical_bytes.get();
        let l = self.logical_bytes.get();
        self.dedup_ratio
            .set(if p > 0 { l as f64 / p as f64 } else { 1.0 });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::Encoder;

    #[test]
    fn all_metrics_are_exposed() {
        let reg = Registry::new();
        let m = StoreMetrics::new(&reg);
        m.chunks_written.inc();
        let mut out = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&reg.gather(), &mut out)
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        for name in [
            "cairn_store_dedup_ratio",
            "cairn_store_chunks_written_total 1",
            "cairn_store_gc_runs_total",
            "cairn_store_verify_failures_total",
            "cairn_store_evictions_total",
            "cairn_store_chunk_cache_hits_total",
            "cairn_store_chunk_cache_misses_total",
            "cairn_store_chunk_cache_bytes",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }
}
