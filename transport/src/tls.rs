//! Mutual TLS between the nodes of one cluster, for quinn.
//!
//! Both directions are TLS 1.3 only, ALPN [`ALPN`], with the ring provider
//! chosen explicitly (no process-default provider is needed). Each side
//! presents its node certificate and verifies the peer's chain against the
//! cluster CA alone (never the system roots), then extracts the peer's node
//! name ([`crate::identity::node_name_from_cert`]) and refuses names on the
//! [`DenyList`]. Session resumption is off, so every connection is verified
//! in full and a deny-list change applies to the next handshake.
//!
//! # Counting refusals
//! [`Refusals`] counts refused handshakes by reason. Our certificate
//! verifiers count every rejection they raise themselves (`unknown_ca`,
//! `bad_certificate`, `denied`, and `other` for odd verifier errors); every
//! error they return is a rustls `InvalidCertificate` error, which quinn
//! reports as a local `TransportError` whose reason starts with
//! `invalid peer certificate`. [`refusal_reason`] returns `None` for exactly
//! those, so callers never count them twice, and returns the reason only for
//! refusals no verifier saw: a client that sent no certificate
//! (`no_certificate`; rustls refuses it before any verifier runs) and other
//! local handshake failures such as an ALPN or version mismatch (`other`).
//! Failures caused by the *peer* (it closed the connection, e.g. because it
//! refused our certificate), timeouts and resets are not our refusals and give
//! `None`. So the accept loop (and the connect path) just calls
//! [`Refusals::count_handshake_error`] on every failed handshake.

use std::sync::Arc;

use prometheus::{IntCounterVec, Opts, Registry};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::ConnectionError;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::identity::{node_name_from_cert, DenyList, Identity, IdentityError};

/// The ALPN protocol of the cairn wire protocol.
pub const ALPN: &[u8] = b"cairn/1";

/// Refusal reasons, the values of the `reason` label.
pub mod reason {
    /// The client presented no certificate.
    pub const NO_CERTIFICATE: &str = "no_certificate";
    /// The peer's certificate does not chain to our cluster CA.
    pub const UNKNOWN_CA: &str = "unknown_ca";
    /// The peer's certificate chains to our CA but is unusable (expired,
    /// wrong name, wrong key usage, no valid node name, bad signature, ...).
    pub const BAD_CERTIFICATE: &str = "bad_certificate";
    /// The peer's node name is on the deny list.
    pub const DENIED: &str = "denied";
    /// Any other handshake failure on our side.
    pub const OTHER: &str = "other";
    /// Every reason.
    pub const ALL: [&str; 5] = [NO_CERTIFICATE, UNKNOWN_CA, BAD_CERTIFICATE, DENIED, OTHER];
}

/// Metric name of [`Refusals`].
pub const REFUSALS_METRIC: &str = "cairn_transport_handshakes_refused_total";

/// Counter of refused TLS handshakes, by reason (see [`reason`]).
///
/// Cheap to clone; clones share the counter.
#[derive(Clone, Debug)]
pub struct Refusals {
    counter: IntCounterVec,
}

impl Default for Refusals {
    fn default() -> Self {
        Self::new()
    }
}

impl Refusals {
    /// A counter with every reason present at 0 (not yet registered).
    pub fn new() -> Self {
        #[allow(clippy::expect_used)] // static, valid name and label
        let counter = IntCounterVec::new(
            Opts::new(
                REFUSALS_METRIC,
                "TLS handshakes this node refused, by reason.",
            ),
            &["reason"],
        )
        .expect("valid metric definition");
        for r in reason::ALL {
            counter.with_label_values(&[r]);
        }
        Self { counter }
    }

    /// Register the counter in `reg`.
    pub fn register(&self, reg: &Registry) -> prometheus::Result<()> {
        reg.register(Box::new(self.counter.clone()))
    }

    /// Count one refusal; a reason not in [`reason::ALL`] counts as `other`.
    pub fn count(&self, reason: &str) {
        let r = if reason::ALL.contains(&reason) {
            reason
        } else {
            reason::OTHER
        };
        self.counter.with_label_values(&[r]).inc();
    }

    /// Refusals counted for `reason` so far.
    pub fn get(&self, reason: &str) -> u64 {
        if reason::ALL.contains(&reason) {
            self.counter.with_label_values(&[reason]).get()
        } else {
            0
        }
    }

    /// Refusals counted for all reasons.
    pub fn total(&self) -> u64 {
        reason::ALL.iter().map(|r| self.get(r)).sum()
    }

    /// Count a failed handshake (incoming or outgoing) unless a verifier
    /// already counted it or it was not our refusal; see [`refusal_reason`].
    /// Returns the reason counted.
    pub fn count_handshake_error(&self, e: &ConnectionError) -> Option<&'static str> {
        let r = refusal_reason(e)?;
        self.count(r);
        Some(r)
    }
}

/// TLS alert numbers (RFC 8446 §6) seen in QUIC crypto error codes.
mod alert {
    pub(super) const BAD_CERTIFICATE: u8 = 42;
    pub(super) const CERTIFICATE_UNKNOWN: u8 = 46;
    pub(super) const UNKNOWN_CA: u8 = 48;
    pub(super) const ACCESS_DENIED: u8 = 49;
    pub(super) const DECRYPT_ERROR: u8 = 51;
    pub(super) const CERTIFICATE_REQUIRED: u8 = 116;
}

/// How rustls phrases every `InvalidCertificate` error; our verifiers only
/// return such errors.
const VERIFIER_ERROR_PREFIX: &str = "invalid peer certificate";

/// The reason behind a failed handshake, whichever side refused it: from the
/// TLS alert in a QUIC crypto error (ours or the peer's). Anything that is not
/// a TLS refusal is `other`. For logs; to *count*, use [`refusal_reason`].
pub fn classify_handshake_error(e: &ConnectionError) -> &'static str {
    match e {
        ConnectionError::TransportError(te) => classify_code(u64::from(te.code), &te.reason),
        ConnectionError::ConnectionClosed(c) => {
            classify_code(u64::from(c.error_code), &String::from_utf8_lossy(&c.reason))
        }
        _ => reason::OTHER,
    }
}

fn classify_code(code: u64, text: &str) -> &'static str {
    if !(0x100..0x200).contains(&code) {
        return if text.contains("peer sent no certificates") {
            reason::NO_CERTIFICATE
        } else {
            reason::OTHER
        };
    }
    match (code & 0xff) as u8 {
        alert::CERTIFICATE_REQUIRED => reason::NO_CERTIFICATE,
        alert::UNKNOWN_CA => reason::UNKNOWN_CA,
        alert::ACCESS_DENIED => reason::DENIED,
        alert::BAD_CERTIFICATE..=alert::CERTIFICATE_UNKNOWN => reason::BAD_CERTIFICATE,
        alert::DECRYPT_ERROR if text.starts_with(VERIFIER_ERROR_PREFIX) => reason::BAD_CERTIFICATE,
        _ => reason::OTHER,
    }
}

/// The reason to *count* for a failed handshake, or `None` when there is
/// nothing to count: the failure was raised by one of our certificate
/// verifiers (which counted it already), or it is not our refusal at all (the
/// peer closed the connection, a timeout, a reset, a local close).
///
/// In practice this returns `no_certificate` or `other`.
pub fn refusal_reason(e: &ConnectionError) -> Option<&'static str> {
    match e {
        ConnectionError::TransportError(te) if te.reason.starts_with(VERIFIER_ERROR_PREFIX) => None,
        ConnectionError::TransportError(_) => Some(classify_handshake_error(e)),
        _ => None,
    }
}

/// The reason our verifier reports for a rustls verification error.
fn reason_of(e: &rustls::Error) -> &'static str {
    match e {
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => reason::UNKNOWN_CA,
        rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure) => {
            reason::DENIED
        }
        rustls::Error::InvalidCertificate(_) => reason::BAD_CERTIFICATE,
        rustls::Error::NoCertificatesPresented => reason::NO_CERTIFICATE,
        _ => reason::OTHER,
    }
}

/// Make every error our verifiers return an `InvalidCertificate` error, so
/// [`refusal_reason`] can tell it was counted.
fn as_cert_error(e: rustls::Error) -> rustls::Error {
    match e {
        rustls::Error::InvalidCertificate(_) => e,
        other => rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(
            Arc::new(other),
        ))),
    }
}

/// The checks both verifiers add after the WebPKI chain check.
#[derive(Debug)]
struct PeerCheck {
    deny: Arc<DenyList>,
    refusals: Refusals,
    /// "client" or "server": the role of the peer being verified.
    peer_role: &'static str,
}

impl PeerCheck {
    fn refuse(&self, reason: &'static str, peer: &str, err: rustls::Error) -> rustls::Error {
        let err = as_cert_error(err);
        tracing::warn!(
            peer,
            reason,
            error = %err,
            "refused TLS handshake: {} certificate rejected",
            self.peer_role
        );
        self.refusals.count(reason);
        err
    }

    /// After the inner WebPKI verification: extract the peer's node name and
    /// apply the deny list; count and log any rejection.
    fn check<T>(
        &self,
        inner: Result<T, rustls::Error>,
        end_entity: &CertificateDer<'_>,
    ) -> Result<T, rustls::Error> {
        let name = node_name_from_cert(end_entity);
        match (inner, name) {
            (Err(e), name) => {
                // The name is unverified here; it only helps the log.
                let claimed = name.unwrap_or_else(|_| "<unknown>".into());
                Err(self.refuse(reason_of(&e), &format!("{claimed} (unverified)"), e))
            }
            (Ok(_), Err(e)) => Err(self.refuse(
                reason::BAD_CERTIFICATE,
                "<no valid name>",
                rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(
                    Arc::new(e),
                ))),
            )),
            (Ok(_), Ok(name)) if self.deny.contains(&name) => Err(self.refuse(
                reason::DENIED,
                &name,
                rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure),
            )),
            (Ok(v), Ok(_)) => Ok(v),
        }
    }

    fn check_signature(
        &self,
        r: Result<HandshakeSignatureValid, rustls::Error>,
        cert: &CertificateDer<'_>,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        r.map_err(|e| {
            let peer = node_name_from_cert(cert).unwrap_or_else(|_| "<unknown>".into());
            self.refuse(reason::BAD_CERTIFICATE, &peer, e)
        })
    }
}

/// Server side: WebPKI client verification against the cluster CA, then the
/// name and deny-list check.
#[derive(Debug)]
struct ClusterClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    check: PeerCheck,
}

impl ClientCertVerifier for ClusterClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check.check(
            self.inner
                .verify_client_cert(end_entity, intermediates, now),
            end_entity,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.check
            .check_signature(self.inner.verify_tls12_signature(message, cert, dss), cert)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.check
            .check_signature(self.inner.verify_tls13_signature(message, cert, dss), cert)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Client side: WebPKI server verification (chain to the cluster CA and the
/// server name we asked for), then the name and deny-list check.
#[derive(Debug)]
struct ClusterServerVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    check: PeerCheck,
}

impl ServerCertVerifier for ClusterServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check.check(
            self.inner.verify_server_cert(
                end_entity,
                intermediates,
                server_name,
                ocsp_response,
                now,
            ),
            end_entity,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.check
            .check_signature(self.inner.verify_tls12_signature(message, cert, dss), cert)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.check
            .check_signature(self.inner.verify_tls13_signature(message, cert, dss), cert)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn root_hint_subjects(&self) -> Option<&[DistinguishedName]> {
        self.inner.root_hint_subjects()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn cluster_roots(id: &Identity) -> Result<Arc<rustls::RootCertStore>, IdentityError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(id.ca_cert())?;
    Ok(Arc::new(roots))
}

/// The rustls server config of a node: TLS 1.3, ALPN `cairn/1`, client
/// certificate required and verified against the cluster CA, names on `deny`
/// refused; rejections are logged and counted in `refusals`.
pub fn server_crypto(
    id: &Identity,
    deny: Arc<DenyList>,
    refusals: Refusals,
) -> Result<rustls::ServerConfig, IdentityError> {
    let provider = provider();
    let inner = rustls::server::WebPkiClientVerifier::builder_with_provider(
        cluster_roots(id)?,
        provider.clone(),
    )
    .build()
    .map_err(|e| IdentityError::Config(format!("client verifier: {e}")))?;
    let verifier = Arc::new(ClusterClientVerifier {
        inner,
        check: PeerCheck {
            deny,
            refusals,
            peer_role: "client",
        },
    });
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.cert_chain(), id.private_key())?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    // No resumption: a resumed session would skip the verifier and with it
    // the deny list.
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(cfg)
}

/// The rustls client config of a node: TLS 1.3, ALPN `cairn/1`, presents our
/// certificate, verifies the server against the cluster CA only (and the
/// server name we connect with: a node name, or
/// [`ANY_PEER`](crate::identity::ANY_PEER) for any node of the cluster), names
/// on `deny` refused; rejections are logged and counted in `refusals`.
pub fn client_crypto(
    id: &Identity,
    deny: Arc<DenyList>,
    refusals: Refusals,
) -> Result<rustls::ClientConfig, IdentityError> {
    let provider = provider();
    let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
        cluster_roots(id)?,
        provider.clone(),
    )
    .build()
    .map_err(|e| IdentityError::Config(format!("server verifier: {e}")))?;
    let verifier = Arc::new(ClusterServerVerifier {
        inner,
        check: PeerCheck {
            deny,
            refusals,
            peer_role: "server",
        },
    });
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(id.cert_chain(), id.private_key())?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(cfg)
}

/// [`server_crypto`] as a quinn server config (default transport parameters).
pub fn quinn_server_config(
    id: &Identity,
    deny: Arc<DenyList>,
    refusals: Refusals,
) -> Result<quinn::ServerConfig, IdentityError> {
    let crypto = QuicServerConfig::try_from(server_crypto(id, deny, refusals)?)
        .map_err(|e| IdentityError::Config(format!("QUIC server: {e}")))?;
    Ok(quinn::ServerConfig::with_crypto(Arc::new(crypto)))
}

/// [`client_crypto`] as a quinn client config (default transport parameters).
pub fn quinn_client_config(
    id: &Identity,
    deny: Arc<DenyList>,
    refusals: Refusals,
) -> Result<quinn::ClientConfig, IdentityError> {
    let crypto = QuicClientConfig::try_from(client_crypto(id, deny, refusals)?)
        .map_err(|e| IdentityError::Config(format!("QUIC client: {e}")))?;
    Ok(quinn::ClientConfig::new(Arc::new(crypto)))
}

/// The verified node name of the peer of an established connection.
pub fn peer_name(conn: &quinn::Connection) -> Option<String> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    node_name_from_cert(certs.first()?).ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn closed(alert: u8, reason: &str) -> ConnectionError {
        ConnectionError::ConnectionClosed(quinn::ConnectionClose {
            error_code: quinn::TransportErrorCode::crypto(alert),
            frame_type: None,
            reason: bytes::Bytes::copy_from_slice(reason.as_bytes()),
        })
    }

    #[test]
    fn classify_alerts() {
        let cases = [
            (116, "peer sent no certificates", reason::NO_CERTIFICATE),
            (
                48,
                "invalid peer certificate: UnknownIssuer",
                reason::UNKNOWN_CA,
            ),
            (
                49,
                "invalid peer certificate: ApplicationVerificationFailure",
                reason::DENIED,
            ),
            (
                42,
                "invalid peer certificate: BadEncoding",
                reason::BAD_CERTIFICATE,
            ),
            (
                45,
                "invalid peer certificate: Expired",
                reason::BAD_CERTIFICATE,
            ),
            (
                46,
                "invalid peer certificate: Other(..)",
                reason::BAD_CERTIFICATE,
            ),
            (
                51,
                "invalid peer certificate: BadSignature",
                reason::BAD_CERTIFICATE,
            ),
            (51, "cannot decrypt peer's message", reason::OTHER),
            (
                120,
                "peer doesn't support any known protocol",
                reason::OTHER,
            ),
            (40, "", reason::OTHER),
        ];
        for (alert, text, want) in cases {
            let e = closed(alert, text);
            assert_eq!(classify_handshake_error(&e), want, "{alert} {text}");
            // The peer closed it: never our refusal to count.
            assert_eq!(refusal_reason(&e), None);
        }
        for e in [
            ConnectionError::TimedOut,
            ConnectionError::Reset,
            ConnectionError::LocallyClosed,
            ConnectionError::VersionMismatch,
        ] {
            assert_eq!(classify_handshake_error(&e), reason::OTHER);
            assert_eq!(refusal_reason(&e), None);
        }
    }

    #[test]
    fn verifier_reasons() {
        use rustls::Error as E;
        let c = |e| E::InvalidCertificate(e);
        assert_eq!(
            reason_of(&c(CertificateError::UnknownIssuer)),
            reason::UNKNOWN_CA
        );
        assert_eq!(
            reason_of(&c(CertificateError::ApplicationVerificationFailure)),
            reason::DENIED
        );
        assert_eq!(
            reason_of(&c(CertificateError::Expired)),
            reason::BAD_CERTIFICATE
        );
        assert_eq!(
            reason_of(&c(CertificateError::NotValidForName)),
            reason::BAD_CERTIFICATE
        );
        assert_eq!(
            reason_of(&E::NoCertificatesPresented),
            reason::NO_CERTIFICATE
        );
        assert_eq!(reason_of(&E::DecryptError), reason::OTHER);
        // Everything a verifier returns carries the prefix refusal_reason skips.
        for e in [
            c(CertificateError::UnknownIssuer),
            as_cert_error(E::DecryptError),
        ] {
            assert!(e.to_string().starts_with(VERIFIER_ERROR_PREFIX), "{e}");
        }
    }

    #[test]
    fn refusals_metric() {
        let r = Refusals::new();
        let reg = Registry::new();
        r.register(&reg).unwrap();
        r.count(reason::DENIED);
        r.clone().count(reason::DENIED);
        r.count("no-such-reason");
        assert_eq!(r.get(reason::DENIED), 2);
        assert_eq!(r.get(reason::OTHER), 1);
        assert_eq!(r.get("no-such-reason"), 0);
        assert_eq!(r.total(), 3);
        let families = reg.gather();
        assert_eq!(families.len(), 1);
        assert_eq!(families[0].name(), REFUSALS_METRIC);
        // Every reason is exported, even at zero.
        assert_eq!(families[0].get_metric().len(), reason::ALL.len());
        assert!(r.register(&reg).is_err(), "double registration is refused");
    }

    #[test]
    fn configs_build() {
        let id = Identity::ephemeral("solo").unwrap();
        let deny = Arc::new(DenyList::default());
        let s = server_crypto(&id, deny.clone(), Refusals::new()).unwrap();
        assert_eq!(s.alpn_protocols, vec![ALPN.to_vec()]);
        let c = client_crypto(&id, deny.clone(), Refusals::new()).unwrap();
        assert_eq!(c.alpn_protocols, vec![ALPN.to_vec()]);
        quinn_server_config(&id, deny.clone(), Refusals::new()).unwrap();
        quinn_client_config(&id, deny, Refusals::new()).unwrap();
    }
}
