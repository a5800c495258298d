//! Transport metrics: one typed struct, per-peer series labelled `peer`.
//!
//! The `peer` label is, for fetches, the configured peer address (`ip:port`,
//! bounded by the peer set we were given) and, for serving, the verified node
//! name from the peer's certificate (bounded by cluster membership) — never
//! something a stranger chooses.

use prometheus::{GaugeVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry};

/// Counters and gauges of one transport endpoint (`cairn_transport_*`).
#[derive(Debug, Clone)]
pub struct TransportMetrics {
    /// Payload bytes received from a peer (chunk frames as sent).
    pub bytes_in: IntCounterVec,
    /// Payload bytes sent to a peer (labelled by its node name).
    pub bytes_out: IntCounterVec,
    /// Smoothed RTT of the connection to a peer, seconds.
    pub rtt_seconds: GaugeVec,
    /// Requests to a peer in flight now.
    pub inflight: IntGaugeVec,
    /// Failed requests to a peer, by kind (`connect`, `timeout`, `stream`,
    /// `protocol`, `missing`).
    pub errors: IntCounterVec,
    /// Chunks from a peer whose bytes did not match their id.
    pub verify_failures: IntCounterVec,
    /// Verified chunks received from a peer.
    pub chunks_fetched: IntCounterVec,
    /// Chunks served to peers.
    pub chunks_served: IntCounter,
    /// Requests served, by kind.
    pub requests_served: IntCounterVec,
    /// Streams closed because the peer sent a bad frame.
    pub bad_frames: IntCounter,
    /// Chunk requests answered by a fetch already in flight (coalesced).
    pub coalesced: IntCounter,
    /// Demand requests for a chunk a prefetch fetch had in flight, fetched
    /// again at demand priority instead of waiting.
    pub demand_overtakes: IntCounter,
    /// Connections established (both directions).
    pub connections: IntCounterVec,
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help)
}

#[cold]
fn bad_metric(name: &str) -> ! {
    // Names and help strings are compile-time constants checked by tests.
    panic!("invalid metric definition {name}")
}

macro_rules! vec_metric {
    ($reg:expr, $ty:ty, $name:expr, $help:expr, $labels:expr) => {{
        let m = <$ty>::new(opts($name, $help), $labels).unwrap_or_else(|_| bad_metric($name));
        // A second endpoint in one registry keeps private series instead of
        // failing (tests run several nodes in one process).
        let _ = $reg.register(Box::new(m.clone()));
        m
    }};
}

impl TransportMetrics {
    /// Create the metrics and register them in `reg`.
    pub fn new(reg: &Registry) -> Self {
        let chunks_served = IntCounter::with_opts(opts(
            "cairn_transport_chunks_served_total",
            "Chunks served to peers",
        ))
        .unwrap_or_else(|_| bad_metric("chunks_served"));
        let _ = reg.register(Box::new(chunks_served.clone()));
        let bad_frames = IntCounter::with_opts(opts(
            "cairn_transport_bad_frames_total",
            "Streams closed because the peer sent a frame that does not decode",
        ))
        .unwrap_or_else(|_| bad_metric("bad_frames"));
        let _ = reg.register(Box::new(bad_frames.clone()));
        let coalesced = IntCounter::with_opts(opts(
            "cairn_transport_coalesced_total",
            "Chunk requests answered by a fetch of the same chunk already in flight",
        ))
        .unwrap_or_else(|_| bad_metric("coalesced"));
        let _ = reg.register(Box::new(coalesced.clone()));
        let demand_overtakes = IntCounter::with_opts(opts(
            "cairn_transport_demand_overtakes_total",
            "Demand requests for a chunk a prefetch fetch had in flight, fetched again at demand priority instead of waiting",
        ))
        .unwrap_or_else(|_| bad_metric("demand_overtakes"));
        let _ = reg.register(Box::new(demand_overtakes.clone()));
        Self {
            bytes_in: vec_metric!(
                reg,
                IntCounterVec,
                "cairn_transport_peer_bytes_in_total",
                "Chunk payload bytes received from a peer",
                &["peer"]
            ),
            bytes_out: vec_metric!(
                reg,
                IntCounterVec,
                "cairn_transport_peer_bytes_out_total",
                "Chunk payload bytes sent to a peer",
                &["peer"]
            ),
            rtt_seconds: vec_metric!(
                reg,
                GaugeVec,
                "cairn_transport_peer_rtt_seconds",
                "Smoothed round-trip time of the connection to a peer",
                &["peer"]
            ),
            inflight: vec_metric!(
                reg,
                IntGaugeVec,
                "cairn_transport_peer_inflight_requests",
                "Requests to a peer in flight",
                &["peer"]
            ),
            errors: vec_metric!(
                reg,
                IntCounterVec,
                "cairn_transport_peer_errors_total",
                "Failed requests to a peer, by kind",
                &["peer", "kind"]
            ),
            verify_failures: vec_metric!(
                reg,
                IntCounterVec,
                "cairn_transport_peer_verify_failures_total",
                "Chunks from a peer whose bytes did not hash to their id",
                &["peer"]
            ),
            chunks_fetched: vec_metric!(
                reg,
                IntCounterVec,
                "cairn_transport_peer_chunks_fetched_total",
                "Verified chunks received from a peer",
                &["peer"]
            ),
            chunks_served,
            requests_served: vec_metric!(
                reg,
                IntCounterVec,
                "cairn_transport_requests_served_total",
                "Requests served, by kind",
                &["kind"]
            ),
            bad_frames,
            coalesced,
            demand_overtakes,
            connections: vec_metric!(
                reg,
                IntCounterVec,
                "cairn_transport_connections_total",
                "Connections established, by direction",
                &["direction"]
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_and_encodes() {
        let reg = Registry::new();
        let m = TransportMetrics::new(&reg);
        m.bytes_in.with_label_values(&["127.0.0.1:1"]).inc_by(5);
        m.errors
            .with_label_values(&["127.0.0.1:1", "timeout"])
            .inc();
        m.chunks_served.inc();
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&reg.gather())
            .expect("encode");
        assert!(text.contains("cairn_transport_peer_bytes_in_total{peer=\"127.0.0.1:1\"} 5"));
        assert!(text.contains("cairn_transport_chunks_served_total 1"));
    }
}
