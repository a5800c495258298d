//! Prometheus metrics of the registry (prefix `cairn_registry_`).

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts};

use super::errors::RegistryError;

/// The registry's counters and gauges.
#[derive(Debug, Clone)]
pub(crate) struct Metrics {
    /// Requests by method, route kind and status class.
    pub(crate) requests: IntCounterVec,
    /// Bytes of blobs and manifests sent to clients.
    pub(crate) pulled_bytes: IntCounter,
    /// Bytes of blobs and manifests received and committed.
    pub(crate) pushed_bytes: IntCounter,
    /// Open upload sessions.
    pub(crate) uploads_in_progress: IntGauge,
    /// Pushes whose content did not match the digest the client claimed.
    pub(crate) digest_mismatches: IntCounter,
}

impl Metrics {
    /// Create and register the metrics.
    pub(crate) fn new(registry: &prometheus::Registry) -> Result<Self, RegistryError> {
        let m = Self {
            requests: IntCounterVec::new(
                Opts::new(
                    "cairn_registry_requests_total",
                    "OCI registry requests by method, route kind and status class.",
                ),
                &["method", "route", "status"],
            )?,
            pulled_bytes: IntCounter::new(
                "cairn_registry_pulled_bytes_total",
                "Bytes of blobs and manifests served to clients.",
            )?,
            pushed_bytes: IntCounter::new(
                "cairn_registry_pushed_bytes_total",
                "Bytes of blobs and manifests pushed by clients and committed.",
            )?,
            uploads_in_progress: IntGauge::new(
                "cairn_registry_uploads_in_progress",
                "Open blob upload sessions.",
            )?,
            digest_mismatches: IntCounter::new(
                "cairn_registry_digest_mismatches_total",
                "Pushes rejected because the content did not match the claimed digest.",
            )?,
        };
        registry.register(Box::new(m.requests.clone()))?;
        registry.register(Box::new(m.pulled_bytes.clone()))?;
        registry.register(Box::new(m.pushed_bytes.clone()))?;
        registry.register(Box::new(m.uploads_in_progress.clone()))?;
        registry.register(Box::new(m.digest_mismatches.clone()))?;
        Ok(m)
    }
}
