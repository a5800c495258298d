//! Cluster identity: the cluster CA, node certificates and the deny list.
//!
//! A cluster is one CA. Every node holds a certificate signed by it, and every
//! QUIC connection between nodes is mutual TLS against that CA (see
//! [`crate::tls`]).
//!
//! On disk (`cairn cluster init DIR`, `cairn cluster add-node DIR NAME`):
//! ```text
//! DIR/ca.pem          the cluster CA certificate (public)
//! DIR/ca.key          the CA private key (0600; only needed to add nodes)
//! DIR/NAME/node.pem   the node certificate, CN=NAME, DNS SANs [NAME, any.cairn]
//! DIR/NAME/node.key   the node private key (0600)
//! DIR/NAME/ca.pem     a copy of the CA certificate
//! ```
//! `DIR/NAME/` is everything a node needs (`cairn node --identity DIR/NAME`).
//!
//! A node's name is the first DNS SAN of its certificate that is not
//! [`ANY_PEER`], or its CN when there is none; see [`node_name_from_cert`].

use std::collections::HashSet;
use std::fmt;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use x509_parser::extensions::GeneralName;

/// The DNS name every node certificate carries besides its own name.
///
/// A client that only knows a peer's address connects with this server name:
/// the chain is still verified against the cluster CA, so it reaches *some*
/// node of the cluster, whose name it then learns from the certificate
/// ([`crate::tls::peer_name`]). A client that knows the name pins it instead.
/// It contains a dot, so it can never be a node name.
pub const ANY_PEER: &str = "any.cairn";

/// File name of the CA certificate (in the cluster dir and in each node dir).
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key in the cluster dir.
pub const CA_KEY_FILE: &str = "ca.key";
/// File name of a node certificate in its node dir.
pub const NODE_CERT_FILE: &str = "node.pem";
/// File name of a node private key in its node dir.
pub const NODE_KEY_FILE: &str = "node.key";

/// Longest node name (one DNS label).
pub const MAX_NODE_NAME: usize = 63;

const DAY: Duration = Duration::from_secs(86_400);
/// Validity of a cluster CA certificate.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 86_400);
/// Validity of a node certificate (capped at the CA's expiry).
const NODE_VALIDITY: Duration = Duration::from_secs(2 * 365 * 86_400);
/// Certificates start this long before "now", to tolerate clock skew.
const BACKDATE: Duration = Duration::from_secs(3600);
/// Largest PEM file we read; real ones are well under 2 KiB.
const MAX_PEM_FILE: u64 = 1 << 20;

/// What went wrong creating or loading an identity.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// A node name is not a DNS label of `[a-z0-9-]`.
    #[error("invalid node name {name:?}: {reason}")]
    InvalidName {
        /// The offending name (truncated to 80 characters).
        name: String,
        /// Why it is invalid.
        reason: &'static str,
    },
    /// A file or directory could not be read or written.
    #[error("cannot {op} {}: {error}", path.display())]
    Io {
        /// What was attempted ("read", "create", ...).
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error (part of this error's message, so not
        /// repeated as its `source`).
        error: std::io::Error,
    },
    /// A file that would be written already exists; nothing is overwritten.
    #[error("{} already exists; refusing to overwrite it", path.display())]
    AlreadyExists {
        /// The existing file.
        path: PathBuf,
    },
    /// A file holds no usable certificate or key, or they do not fit together.
    #[error("{}: {reason}", path.display())]
    Invalid {
        /// The file at fault.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A certificate does not carry a usable node name.
    #[error("certificate carries no valid node name: {0}")]
    BadCertificate(String),
    /// Certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Generate(rcgen::Error),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Tls(rustls::Error),
    /// Another TLS/QUIC configuration problem.
    #[error("TLS configuration: {0}")]
    Config(String),
}

// Causes are part of each message, so no variant reports a `source` (which
// would print the cause twice in an error chain).
impl From<rcgen::Error> for IdentityError {
    fn from(e: rcgen::Error) -> Self {
        Self::Generate(e)
    }
}

impl From<rustls::Error> for IdentityError {
    fn from(e: rustls::Error) -> Self {
        Self::Tls(e)
    }
}

fn invalid(path: &Path, reason: impl Into<String>) -> IdentityError {
    IdentityError::Invalid {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

fn io_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> IdentityError + 'a {
    move |error| IdentityError::Io {
        op,
        path: path.to_owned(),
        error,
    }
}

/// Check that `name` is a valid node name: one DNS label, 1..=63 characters
/// of `[a-z0-9-]`, not starting or ending with `-`, and not all digits (such a
/// name is not usable as a TLS server name).
pub fn validate_node_name(name: &str) -> Result<(), IdentityError> {
    let bad = |reason| {
        Err(IdentityError::InvalidName {
            name: name.chars().take(80).collect(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > MAX_NODE_NAME {
        return bad("longer than 63 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return bad("only lowercase letters a-z, digits and '-' are allowed");
    }
    if name.starts_with('-') || name.ends_with('-') {
        return bad("must not start or end with '-'");
    }
    // rustls rejects server names that look like numbers (IPv4 confusion).
    if rustls::pki_types::DnsName::try_from(name).is_err() {
        return bad("looks like a number, which is not a valid TLS server name");
    }
    Ok(())
}

/// The node name a certificate carries: its first DNS SAN that is not
/// [`ANY_PEER`], else its CN; the name must pass [`validate_node_name`].
///
/// This only parses; it does not verify the certificate.
pub fn node_name_from_cert(cert: &CertificateDer<'_>) -> Result<String, IdentityError> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|e| {
        IdentityError::BadCertificate(format!("not a valid X.509 certificate: {e}"))
    })?;
    let san = x509
        .subject_alternative_name()
        .map_err(|e| IdentityError::BadCertificate(format!("bad subjectAltName: {e}")))?;
    let from_san = san.and_then(|san| {
        san.value.general_names.iter().find_map(|g| match g {
            GeneralName::DNSName(n) if !n.eq_ignore_ascii_case(ANY_PEER) => Some(*n),
            _ => None,
        })
    });
    let name = match from_san {
        Some(n) => n.to_owned(),
        None => {
            let cn = x509.subject().iter_common_name().next().ok_or_else(|| {
                IdentityError::BadCertificate("neither a DNS name nor a common name".into())
            })?;
            cn.as_str()
                .map_err(|e| IdentityError::BadCertificate(format!("unreadable common name: {e}")))?
                .to_owned()
        }
    };
    validate_node_name(&name).map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
    Ok(name)
}

fn random_serial() -> SerialNumber {
    let mut b: [u8; 16] = rand::random();
    b[0] &= 0x7f; // positive
    b[0] |= 0x01; // and 16 bytes long
    SerialNumber::from_slice(&b)
}

fn read_file(path: &Path) -> Result<Vec<u8>, IdentityError> {
    let f = std::fs::File::open(path).map_err(io_err("read", path))?;
    let mut buf = Vec::new();
    f.take(MAX_PEM_FILE + 1)
        .read_to_end(&mut buf)
        .map_err(io_err("read", path))?;
    if buf.len() as u64 > MAX_PEM_FILE {
        return Err(invalid(
            path,
            "file is too large to be a PEM certificate or key",
        ));
    }
    Ok(buf)
}

/// Write a new file; never overwrites. `secret` files get mode 0600.
fn write_new(path: &Path, data: &[u8], secret: bool) -> Result<(), IdentityError> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if secret { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut f = opts.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            IdentityError::AlreadyExists {
                path: path.to_owned(),
            }
        } else {
            io_err("create", path)(e)
        }
    })?;
    f.write_all(data).map_err(io_err("write", path))?;
    f.sync_all().map_err(io_err("write", path))?;
    Ok(())
}

fn parse_cert_pem(path: &Path, pem: &[u8]) -> Result<CertificateDer<'static>, IdentityError> {
    let der = CertificateDer::from_pem_slice(pem)
        .map_err(|e| invalid(path, format!("no PEM certificate: {e}")))?;
    x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| invalid(path, format!("not a valid X.509 certificate: {e}")))?;
    Ok(der)
}

fn read_cert(path: &Path) -> Result<CertificateDer<'static>, IdentityError> {
    parse_cert_pem(path, &read_file(path)?)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, IdentityError> {
    PrivateKeyDer::from_pem_slice(&read_file(path)?)
        .map_err(|e| invalid(path, format!("no PEM private key: {e}")))
}

/// Hex BLAKE3 of a certificate's DER, for logs and for comparing CAs by eye.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    blake3::hash(cert.as_ref()).to_hex().to_string()
}

/// A cluster certificate authority: signs node certificates.
///
/// Only the machine that adds nodes needs it; nodes only need the CA
/// certificate (a copy lives in every node dir).
pub struct ClusterCa {
    key: KeyPair,
    /// A certificate with the CA's subject and key, used only as the issuer
    /// when signing (rcgen wants one); not necessarily byte-equal to `der`.
    issuer: rcgen::Certificate,
    /// The CA certificate as distributed (`ca.pem`).
    der: CertificateDer<'static>,
    pem: String,
}

impl fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterCa")
            .field("fingerprint", &self.fingerprint())
            .field("key", &"<redacted>")
            .finish()
    }
}

impl ClusterCa {
    /// A fresh CA in memory: ECDSA P-256, CN "cairn cluster CA <random hex>",
    /// valid for 10 years.
    pub fn generate() -> Result<Self, IdentityError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let tag: [u8; 8] = rand::random();
        let cn = format!("cairn cluster CA {}", hex_lower(&tag));
        // rcgen wants the `time` crate's OffsetDateTime; x509-parser hands one out.
        let now = x509_parser::time::ASN1Time::now().to_datetime();
        let mut p = ca_params(&cn);
        p.not_before = now - BACKDATE;
        p.not_after = now + CA_VALIDITY;
        p.serial_number = Some(random_serial());
        let cert = p.self_signed(&key)?;
        let der = cert.der().clone();
        let pem = cert.pem();
        Ok(Self {
            key,
            issuer: cert,
            der,
            pem,
        })
    }

    /// Create a cluster CA in `dir` (created if needed): writes `ca.pem` and
    /// `ca.key` (mode 0600). Refuses if either already exists.
    pub fn init(dir: &Path) -> Result<Self, IdentityError> {
        std::fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        for p in [&cert_path, &key_path] {
            if p.exists() {
                return Err(IdentityError::AlreadyExists { path: p.clone() });
            }
        }
        let ca = Self::generate()?;
        write_new(&key_path, ca.key.serialize_pem().as_bytes(), true)?;
        write_new(&cert_path, ca.pem.as_bytes(), false)?;
        Ok(ca)
    }

    /// Load the cluster CA from `dir/ca.pem` and `dir/ca.key`.
    pub fn load(dir: &Path) -> Result<Self, IdentityError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let pem_bytes = read_file(&cert_path)?;
        let der = parse_cert_pem(&cert_path, &pem_bytes)?;
        let key_pem = String::from_utf8(read_file(&key_path)?)
            .map_err(|_| invalid(&key_path, "not a PEM file (not UTF-8)"))?;
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|e| invalid(&key_path, format!("no usable private key: {e}")))?;

        let (_, x509) = x509_parser::parse_x509_certificate(der.as_ref())
            .map_err(|e| invalid(&cert_path, format!("not a valid X.509 certificate: {e}")))?;
        if !x509.is_ca() {
            return Err(invalid(&cert_path, "not a CA certificate"));
        }
        if x509.public_key().raw != key.public_key_der().as_slice() {
            return Err(invalid(
                &key_path,
                format!("this key does not belong to {}", cert_path.display()),
            ));
        }
        let cn = x509
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .ok_or_else(|| invalid(&cert_path, "CA certificate has no common name"))?;
        // Rebuild an issuer certificate with the same subject and key; node
        // certificates signed with it chain to the original ca.pem.
        let mut p = ca_params(cn);
        p.not_before = x509.validity().not_before.to_datetime();
        p.not_after = x509.validity().not_after.to_datetime();
        let issuer = p.self_signed(&key)?;
        let same_subject = x509_parser::parse_x509_certificate(issuer.der().as_ref())
            .map(|(_, c)| c.subject().as_raw() == x509.subject().as_raw())
            .unwrap_or(false);
        if !same_subject {
            return Err(invalid(
                &cert_path,
                "CA subject has attributes cairn cannot reproduce (not a cairn cluster CA?)",
            ));
        }
        let pem = String::from_utf8_lossy(&pem_bytes).into_owned();
        Ok(Self {
            key,
            issuer,
            der,
            pem,
        })
    }

    /// The CA certificate.
    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.der
    }

    /// The CA certificate in PEM.
    pub fn cert_pem(&self) -> &str {
        &self.pem
    }

    /// Hex BLAKE3 of the CA certificate's DER.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.der)
    }

    /// Sign a fresh node certificate for `name` (validated): CN=name, DNS
    /// SANs `[name, ANY_PEER]`, serverAuth + clientAuth, ~2 years (never past
    /// the CA's expiry). Returns the certificate and its new key.
    pub fn issue(&self, name: &str) -> Result<(rcgen::Certificate, KeyPair), IdentityError> {
        validate_node_name(name)?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut p = CertificateParams::new(vec![name.to_owned(), ANY_PEER.to_owned()])?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        p.distinguished_name = dn;
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        p.serial_number = Some(random_serial());
        // rcgen wants the `time` crate's OffsetDateTime; x509-parser hands one out.
        let now = x509_parser::time::ASN1Time::now().to_datetime();
        p.not_before = now - BACKDATE;
        p.not_after = (now + NODE_VALIDITY).min(self.issuer.params().not_after);
        if p.not_after <= now + DAY {
            return Err(IdentityError::Config(
                "the cluster CA expires within a day; create a new cluster CA".into(),
            ));
        }
        let cert = p.signed_by(&key, &self.issuer, &self.key)?;
        Ok((cert, key))
    }

    /// Issue a node identity into `dir/name/`: `node.pem`, `node.key` (0600)
    /// and a copy of the CA certificate as `ca.pem`. Refuses an invalid name
    /// and a node dir that already holds a node certificate or key. Returns
    /// the node dir.
    pub fn add_node(&self, dir: &Path, name: &str) -> Result<PathBuf, IdentityError> {
        validate_node_name(name)?;
        let node_dir = dir.join(name);
        let cert_path = node_dir.join(NODE_CERT_FILE);
        let key_path = node_dir.join(NODE_KEY_FILE);
        for p in [&cert_path, &key_path] {
            if p.exists() {
                return Err(IdentityError::AlreadyExists { path: p.clone() });
            }
        }
        let (cert, key) = self.issue(name)?;
        std::fs::create_dir_all(&node_dir).map_err(io_err("create directory", &node_dir))?;
        write_new(&key_path, key.serialize_pem().as_bytes(), true)?;
        let ca_path = node_dir.join(CA_CERT_FILE);
        std::fs::write(&ca_path, self.pem.as_bytes()).map_err(io_err("write", &ca_path))?;
        // node.pem last: its presence marks a complete node dir.
        write_new(&cert_path, cert.pem().as_bytes(), false)?;
        Ok(node_dir)
    }
}

fn ca_params(cn: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p
}

fn hex_lower(b: &[u8]) -> String {
    use std::fmt::Write as _;
    b.iter()
        .fold(String::with_capacity(b.len() * 2), |mut s, x| {
            let _ = write!(s, "{x:02x}");
            s
        })
}

/// A node's identity: its name, certificate, private key and the cluster CA.
///
/// `Debug` never prints the key.
#[derive(Clone)]
pub struct Identity {
    name: String,
    cert: CertificateDer<'static>,
    key: Arc<PrivateKeyDer<'static>>,
    ca: CertificateDer<'static>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("name", &self.name)
            .field("ca_fingerprint", &self.ca_fingerprint())
            .field("key", &"<redacted>")
            .finish()
    }
}

impl Identity {
    /// Load a node identity from `dir` (`node.pem`, `node.key`, `ca.pem`).
    ///
    /// Checks that the certificate carries a valid node name, is currently
    /// valid under `ca.pem`, and matches the key; errors name the file at
    /// fault.
    pub fn load(dir: &Path) -> Result<Self, IdentityError> {
        let cert_path = dir.join(NODE_CERT_FILE);
        let key_path = dir.join(NODE_KEY_FILE);
        let ca_path = dir.join(CA_CERT_FILE);
        let cert = read_cert(&cert_path)?;
        let key = read_key(&key_path)?;
        let ca = read_cert(&ca_path)?;
        let name = node_name_from_cert(&cert).map_err(|e| invalid(&cert_path, e.to_string()))?;
        check_chain(&cert, &ca).map_err(|e| {
            invalid(
                &cert_path,
                format!("not valid under {}: {e}", ca_path.display()),
            )
        })?;
        check_key(&cert, &key).map_err(|e| {
            invalid(
                &key_path,
                format!("does not fit {}: {e}", cert_path.display()),
            )
        })?;
        Ok(Self {
            name,
            cert,
            key: Arc::new(key),
            ca,
        })
    }

    /// A throw-away single-node cluster in memory: a fresh CA and a node
    /// certificate for `name` signed by it. Used when a node starts without
    /// `--identity`; no other node can connect to it or be connected to.
    pub fn ephemeral(name: &str) -> Result<Self, IdentityError> {
        let ca = ClusterCa::generate()?;
        let (cert, key) = ca.issue(name)?;
        Ok(Self {
            name: name.to_owned(),
            cert: cert.der().clone(),
            key: Arc::new(PrivateKeyDer::Pkcs8(key.serialize_der().into())),
            ca: ca.der,
        })
    }

    /// This node's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The certificate chain to present: the node certificate alone (peers
    /// hold the CA already).
    pub fn cert_chain(&self) -> Vec<CertificateDer<'static>> {
        vec![self.cert.clone()]
    }

    /// The node certificate.
    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// A copy of the node's private key.
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }

    /// The cluster CA certificate.
    pub fn ca_cert(&self) -> CertificateDer<'static> {
        self.ca.clone()
    }

    /// Hex BLAKE3 of the cluster CA certificate's DER (for logs).
    pub fn ca_fingerprint(&self) -> String {
        fingerprint(&self.ca)
    }
}

/// Verify `cert` chains to `ca`, is valid now and fits client and server use.
fn check_chain(cert: &CertificateDer<'static>, ca: &CertificateDer<'static>) -> Result<(), String> {
    use rustls::client::danger::ServerCertVerifier as _;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(ca.clone())
        .map_err(|e| format!("unusable CA certificate: {e}"))?;
    let roots = Arc::new(roots);
    let client = rustls::server::WebPkiClientVerifier::builder_with_provider(
        roots.clone(),
        provider.clone(),
    )
    .build()
    .map_err(|e| e.to_string())?;
    client
        .verify_client_cert(cert, &[], UnixTime::now())
        .map_err(|e| e.to_string())?;
    let server = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider)
        .build()
        .map_err(|e| e.to_string())?;
    let any = rustls::pki_types::ServerName::try_from(ANY_PEER).map_err(|e| e.to_string())?;
    server
        .verify_server_cert(cert, &[], &any, &[], UnixTime::now())
        .map_err(|e| e.to_string())?;
    Ok(())
}

fn check_key(cert: &CertificateDer<'static>, key: &PrivateKeyDer<'static>) -> Result<(), String> {
    let provider = rustls::crypto::ring::default_provider();
    let signer = provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| e.to_string())?;
    rustls::sign::CertifiedKey::new(vec![cert.clone()], signer)
        .keys_match()
        .map_err(|e| e.to_string())
}

/// Node names refused at the TLS handshake, in both directions.
///
/// Thread-safe; changes apply to handshakes that start afterwards (TLS
/// session resumption is off, so every connection is checked).
#[derive(Debug, Default)]
pub struct DenyList {
    names: RwLock<HashSet<String>>,
}

impl DenyList {
    /// A deny list holding `names`.
    pub fn new(names: impl IntoIterator<Item = String>) -> Self {
        Self {
            names: RwLock::new(names.into_iter().collect()),
        }
    }

    /// Whether `name` is denied.
    pub fn contains(&self, name: &str) -> bool {
        self.names.read().contains(name)
    }

    /// Deny `name`; false if it already was.
    pub fn insert(&self, name: impl Into<String>) -> bool {
        self.names.write().insert(name.into())
    }

    /// Stop denying `name`; false if it was not denied.
    pub fn remove(&self, name: &str) -> bool {
        self.names.write().remove(name)
    }

    /// How many names are denied.
    pub fn len(&self) -> usize {
        self.names.read().len()
    }

    /// Whether nothing is denied.
    pub fn is_empty(&self) -> bool {
        self.names.read().is_empty()
    }

    /// The denied names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.names.read().iter().cloned().collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn node_names() {
        for ok in [
            "a",
            "b",
            "node-1",
            "edge-042",
            "1node",
            "a1",
            &"x".repeat(63),
        ] {
            assert!(validate_node_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "Bad_Name",
            "A",
            "a.b",
            "a_b",
            "-a",
            "a-",
            "-",
            "ä",
            "a b",
            "123",
            &"x".repeat(64),
        ] {
            let e = validate_node_name(bad).unwrap_err();
            assert!(matches!(e, IdentityError::InvalidName { .. }), "{bad}: {e}");
        }
        assert!(validate_node_name(ANY_PEER).is_err());
        let e = validate_node_name(&"y".repeat(500))
            .unwrap_err()
            .to_string();
        assert!(e.len() < 200, "{e}");
    }

    fn cert_with(sans: &[&str], cn: Option<&str>) -> CertificateDer<'static> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        let mut dn = DistinguishedName::new();
        if let Some(cn) = cn {
            dn.push(DnType::CommonName, cn);
        }
        p.distinguished_name = dn;
        p.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn name_extraction() {
        let n = |sans: &[&str], cn| node_name_from_cert(&cert_with(sans, cn));
        assert_eq!(n(&["a", ANY_PEER], Some("zz")).unwrap(), "a");
        assert_eq!(n(&[ANY_PEER, "b"], Some("zz")).unwrap(), "b");
        assert_eq!(n(&[ANY_PEER], Some("c")).unwrap(), "c");
        assert_eq!(n(&[], Some("d")).unwrap(), "d");
        // The first non-ANY_PEER SAN decides; no fallback when it is bad.
        assert!(n(&["Bad", "e"], Some("e")).is_err());
        assert!(n(&[], Some("Not A Name")).is_err());
        assert!(n(&[ANY_PEER], None).is_err());
        assert!(node_name_from_cert(&CertificateDer::from(vec![1u8, 2, 3])).is_err());
    }

    #[test]
    fn issued_certs_carry_name_and_any_peer() {
        let ca = ClusterCa::generate().unwrap();
        let (cert, _) = ca.issue("edge-7").unwrap();
        assert_eq!(node_name_from_cert(cert.der()).unwrap(), "edge-7");
        let (_, x) = x509_parser::parse_x509_certificate(cert.der().as_ref()).unwrap();
        let sans: Vec<String> = x
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|g| g.to_string())
            .collect();
        assert_eq!(sans, ["DNSName(edge-7)", "DNSName(any.cairn)"]);
        assert!(!x.is_ca());
        check_chain(cert.der(), ca.cert()).unwrap();
        assert!(ca.issue("Bad_Name").is_err());
    }

    #[test]
    fn ephemeral_identity() {
        let id = Identity::ephemeral("solo").unwrap();
        assert_eq!(id.name(), "solo");
        check_chain(id.cert(), &id.ca_cert()).unwrap();
        check_key(id.cert(), &id.private_key()).unwrap();
        assert_eq!(id.ca_fingerprint().len(), 64);
        let dbg = format!("{id:?}");
        assert!(dbg.contains("solo") && dbg.contains("redacted"), "{dbg}");
        let key_bytes = match id.private_key() {
            PrivateKeyDer::Pkcs8(k) => k.secret_pkcs8_der().to_vec(),
            _ => unreachable!(),
        };
        assert!(!dbg.contains(&format!("{:?}", &key_bytes[..8])), "{dbg}");
        assert!(Identity::ephemeral("-x").is_err());
        let other = Identity::ephemeral("solo").unwrap();
        assert_ne!(other.ca_fingerprint(), id.ca_fingerprint());
        assert!(check_chain(other.cert(), &id.ca_cert()).is_err());
    }

    #[test]
    fn deny_list() {
        let d = DenyList::new(["x".to_string()]);
        assert!(d.contains("x") && !d.contains("y"));
        assert!(d.insert("y"));
        assert!(!d.insert("y"));
        assert_eq!(d.names(), ["x", "y"]);
        assert!(d.remove("x"));
        assert!(!d.remove("x"));
        assert_eq!(d.len(), 1);
        assert!(DenyList::default().is_empty());
    }
}
