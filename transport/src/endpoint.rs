//! The QUIC endpoint: one UDP socket that both serves and dials peers, with
//! transport parameters sized for long fat WAN links.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::{IdleTimeout, VarInt};

use crate::identity::{DenyList, Identity};
use crate::tls::{self, Refusals};

/// Congestion controller for every connection of an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Congestion {
    /// CUBIC (quinn's default; robust on shared links).
    #[default]
    Cubic,
    /// BBR (keeps long fat links full under random loss; quinn marks it
    /// experimental).
    Bbr,
}

impl std::str::FromStr for Congestion {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "cubic" => Ok(Congestion::Cubic),
            "bbr" => Ok(Congestion::Bbr),
            other => Err(format!(
                "unknown congestion controller {other:?} (cubic or bbr)"
            )),
        }
    }
}

/// Transport parameters.
#[derive(Debug, Clone)]
pub struct EndpointConfig {
    /// Address to bind (port 0 picks one).
    pub listen: SocketAddr,
    /// Congestion controller.
    pub congestion: Congestion,
    /// Per-stream receive window. A reply batch is a few MiB.
    pub stream_window: u64,
    /// Per-connection receive and send window. Default 32 MiB: several
    /// times the 3.75 MB bandwidth-delay product of 100 Mbit/s × 300 ms.
    pub conn_window: u64,
    /// Concurrent bidirectional streams a peer may open to us.
    pub max_streams: u32,
    /// Close a connection after this long without any packet.
    pub idle_timeout: Duration,
    /// Send keep-alives this often so NATs and idle timeouts leave live
    /// connections alone.
    pub keep_alive: Duration,
}

impl Default for EndpointConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7443)),
            congestion: Congestion::Cubic,
            stream_window: 8 << 20,
            conn_window: 32 << 20,
            max_streams: 256,
            idle_timeout: Duration::from_secs(30),
            keep_alive: Duration::from_secs(5),
        }
    }
}

/// Errors setting up an endpoint.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// TLS configuration from the identity failed.
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
    /// The UDP socket could not be bound.
    #[error("cannot bind QUIC endpoint on {addr}: {source}")]
    Bind {
        /// Address asked for.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// A transport parameter is out of range.
    #[error("invalid transport parameter: {0}")]
    Param(String),
}

/// Build quinn transport parameters from `cfg`.
pub fn transport_config(cfg: &EndpointConfig) -> Result<quinn::TransportConfig, EndpointError> {
    let var = |v: u64, what: &str| {
        VarInt::from_u64(v).map_err(|_| EndpointError::Param(format!("{what} = {v} is too large")))
    };
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(VarInt::from_u32(cfg.max_streams))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .stream_receive_window(var(cfg.stream_window, "stream window")?)
        .receive_window(var(cfg.conn_window, "connection window")?)
        .send_window(cfg.conn_window)
        .max_idle_timeout(Some(
            IdleTimeout::try_from(cfg.idle_timeout)
                .map_err(|_| EndpointError::Param("idle timeout too large".into()))?,
        ))
        .keep_alive_interval(Some(cfg.keep_alive));
    match cfg.congestion {
        Congestion::Cubic => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default()))
        }
        Congestion::Bbr => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()))
        }
    };
    Ok(t)
}

/// Bind a QUIC endpoint that serves with `id` and dials peers with it.
/// Both directions require a certificate from the cluster CA whose name is
/// not on `deny`.
pub fn bind(
    id: &Identity,
    deny: Arc<DenyList>,
    refusals: Refusals,
    cfg: &EndpointConfig,
) -> Result<quinn::Endpoint, EndpointError> {
    let transport = Arc::new(transport_config(cfg)?);
    let mut server = tls::quinn_server_config(id, deny.clone(), refusals.clone())?;
    server.transport_config(transport.clone());
    let mut client = tls::quinn_client_config(id, deny, refusals)?;
    client.transport_config(transport);
    let mut ep =
        quinn::Endpoint::server(server, cfg.listen).map_err(|source| EndpointError::Bind {
            addr: cfg.listen,
            source,
        })?;
    ep.set_default_client_config(client);
    Ok(ep)
}
