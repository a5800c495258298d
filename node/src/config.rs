//! Node configuration: a TOML file (with a `version` field), overridden by
//! command-line flags. `cairn.example.toml` at the repository root documents
//! every field; a test parses it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use cairn_chunkstore::{EngineKind, StoreConfig};
use cairn_transport::{Congestion, EndpointConfig, FetchConfig, PeerAddr};
use serde::Deserialize;

/// The config file format this build reads.
pub const CONFIG_VERSION: u32 = 1;

/// Default registry listener.
pub const DEFAULT_REGISTRY: &str = "127.0.0.1:5000";
/// Default API listener (`/metrics`, `/healthz`, admin API).
pub const DEFAULT_API: &str = "127.0.0.1:7480";
/// Default QUIC listener.
pub const DEFAULT_QUIC: &str = "127.0.0.1:7443";
/// Default NBD listener.
pub const DEFAULT_NBD: &str = "127.0.0.1:10809";

/// A config file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this format.
    #[error("config {path}: {why}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong (with line and column from the TOML parser).
        why: String,
    },
    /// A value is out of range.
    #[error("config: {0}")]
    Invalid(String),
}

/// The config file, as written. Every field is optional; see
/// `cairn.example.toml`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Format version; must be 1.
    pub version: u32,
    /// Data directory.
    pub data_dir: Option<PathBuf>,
    /// Site name.
    pub site: Option<String>,
    /// Free-form labels of this site (placement uses them later).
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Identity directory from `cairn cluster add-node`.
    pub identity: Option<PathBuf>,
    /// Parent sites (`HOST:PORT` or `NAME@HOST:PORT`).
    #[serde(default)]
    pub parents: Vec<String>,
    /// Peer sites.
    #[serde(default)]
    pub peers: Vec<String>,
    /// Node names refused in either direction.
    #[serde(default)]
    pub deny: Vec<String>,
    /// Listen addresses.
    #[serde(default)]
    pub listen: ListenSection,
    /// Chunk store.
    #[serde(default)]
    pub store: StoreSection,
    /// Peer transport.
    #[serde(default)]
    pub transport: TransportSection,
    /// OCI registry.
    #[serde(default)]
    pub registry: RegistrySection,
}

/// `[listen]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenSection {
    /// OCI registry (HTTP).
    pub registry: Option<SocketAddr>,
    /// `/metrics`, `/healthz` and the admin API (HTTP).
    pub api: Option<SocketAddr>,
    /// QUIC (UDP).
    pub quic: Option<SocketAddr>,
    /// NBD (TCP).
    pub nbd: Option<SocketAddr>,
}

/// `[store]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    /// `auto`, `uring` or `psync`.
    pub engine: Option<String>,
    /// Byte budget, e.g. `"20G"`.
    pub budget: Option<String>,
    /// zstd-compress chunks on disk.
    pub compress: Option<bool>,
}

/// `[transport]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransportSection {
    /// `cubic` or `bbr`.
    pub congestion: Option<String>,
    /// zstd on the wire when it pays.
    pub wire_zstd: Option<bool>,
    /// Requests in flight per peer and priority class.
    pub window: Option<usize>,
}

/// `[registry]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistrySection {
    /// File holding the token required for push. Without it (and without
    /// `push_open`), the node creates `DATA_DIR/registry-token` on first
    /// start.
    pub push_token_file: Option<PathBuf>,
    /// Allow push without any token (only when no token file is given).
    pub push_open: Option<bool>,
    /// Require the token for pulls too.
    pub pull_requires_token: Option<bool>,
    /// Upstream OCI registry for the top site (`http://…`).
    pub upstream: Option<String>,
    /// TLS certificate (PEM) for the registry listener.
    pub tls_cert: Option<PathBuf>,
    /// TLS key (PEM) for the registry listener.
    pub tls_key: Option<PathBuf>,
}

impl FileConfig {
    /// Parse a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|why| ConfigError::Parse {
            path: path.to_owned(),
            why,
        })
    }

    /// Parse config text.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.len() > 1 << 20 {
            return Err("config file is over 1 MiB".into());
        }
        let c: FileConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        if c.version != CONFIG_VERSION {
            return Err(format!(
                "version = {} is not supported (this build reads version = {CONFIG_VERSION})",
                c.version
            ));
        }
        Ok(c)
    }
}

/// Parse a size: a number with an optional K/M/G/T suffix (powers of 1024,
/// with or without `iB`/`B`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("not a size: {s:?} (try 512M or 20G)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => return Err(format!("unknown size unit {other:?} in {s:?}")),
    };
    let v = n * mult as f64;
    if !v.is_finite() || v < 0.0 || v > u64::MAX as f64 {
        return Err(format!("size out of range: {s:?}"));
    }
    Ok(v as u64)
}

/// Parse a peer: `HOST:PORT` or `NAME@HOST:PORT` (the name is pinned in TLS).
pub fn parse_peer(s: &str) -> Result<PeerAddr, String> {
    let (name, addr) = match s.split_once('@') {
        Some((n, a)) => (Some(n.to_owned()), a),
        None => (None, s),
    };
    let addr: SocketAddr = match addr.parse() {
        Ok(a) => a,
        Err(_) => {
            use std::net::ToSocketAddrs;
            addr.to_socket_addrs()
                .ok()
                .and_then(|mut it| it.next())
                .ok_or_else(|| {
                    format!("bad peer address {addr:?} (want HOST:PORT or NAME@HOST:PORT)")
                })?
        }
    };
    if let Some(n) = &name {
        cairn_transport::identity::validate_node_name(n).map_err(|e| e.to_string())?;
    }
    Ok(PeerAddr { addr, name })
}

fn addr(v: Option<SocketAddr>, default: &str) -> SocketAddr {
    v.unwrap_or_else(|| {
        default
            .parse()
            .unwrap_or_else(|_| unreachable_default(default))
    })
}

#[cold]
fn unreachable_default(s: &str) -> ! {
    // The defaults are constants checked by a test.
    panic!("bad built-in default address {s}")
}

/// Everything a node needs to start, resolved from defaults, file and flags.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Data directory: the chunk store (the same layout `cairn store
    /// --data-dir` works on) plus `uploads/`.
    pub data_dir: PathBuf,
    /// Chunk store settings.
    pub store: StoreConfig,
    /// Node identity directory; `None` makes a throw-away single-node cluster.
    pub identity: Option<PathBuf>,
    /// Node names refused in either direction.
    pub deny: Vec<String>,
    /// Site name, announced to peers.
    pub site: String,
    /// Site labels.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Parent sites.
    pub parents: Vec<PeerAddr>,
    /// Peer sites.
    pub peers: Vec<PeerAddr>,
    /// QUIC endpoint settings (listen address, congestion control, windows).
    pub endpoint: EndpointConfig,
    /// Fetch client settings.
    pub fetch: FetchConfig,
    /// Send chunks zstd-compressed when it saves at least 10%.
    pub wire_zstd: bool,
    /// Registry listener (`None`: no registry).
    pub registry_listen: Option<SocketAddr>,
    /// API listener (`None`: no API).
    pub api_listen: Option<SocketAddr>,
    /// NBD listener (reserved; NBD arrives with issue 4/8).
    pub nbd_listen: SocketAddr,
    /// Registry settings.
    pub registry: RegistrySection,
}

impl NodeConfig {
    /// Built-in defaults for a data directory.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        let endpoint = EndpointConfig {
            listen: addr(None, DEFAULT_QUIC),
            ..Default::default()
        };
        Self {
            data_dir: data_dir.into(),
            store: StoreConfig::default(),
            identity: None,
            deny: Vec::new(),
            site: "local".into(),
            labels: Default::default(),
            parents: Vec::new(),
            peers: Vec::new(),
            endpoint,
            fetch: FetchConfig::default(),
            wire_zstd: true,
            registry_listen: Some(addr(None, DEFAULT_REGISTRY)),
            api_listen: Some(addr(None, DEFAULT_API)),
            nbd_listen: addr(None, DEFAULT_NBD),
            registry: RegistrySection::default(),
        }
    }

    /// Defaults overlaid with a config file. Relative paths in the file are
    /// taken relative to the file's directory.
    pub fn from_file(
        f: &FileConfig,
        base: &Path,
        default_data_dir: &Path,
    ) -> Result<Self, ConfigError> {
        let rel = |p: &PathBuf| {
            if p.is_absolute() {
                p.clone()
            } else {
                base.join(p)
            }
        };
        let mut c = Self::new(
            f.data_dir
                .as_ref()
                .map(rel)
                .unwrap_or_else(|| default_data_dir.to_owned()),
        );
        if let Some(s) = &f.site {
            c.site = s.clone();
        }
        c.labels = f.labels.clone();
        c.identity = f.identity.as_ref().map(rel);
        c.deny = f.deny.clone();
        c.parents = f
            .parents
            .iter()
            .map(|p| parse_peer(p).map_err(ConfigError::Invalid))
            .collect::<Result<_, _>>()?;
        c.peers = f
            .peers
            .iter()
            .map(|p| parse_peer(p).map_err(ConfigError::Invalid))
            .collect::<Result<_, _>>()?;
        if let Some(a) = f.listen.registry {
            c.registry_listen = Some(a);
        }
        if let Some(a) = f.listen.api {
            c.api_listen = Some(a);
        }
        if let Some(a) = f.listen.quic {
            c.endpoint.listen = a;
        }
        if let Some(a) = f.listen.nbd {
            c.nbd_listen = a;
        }
        if let Some(e) = &f.store.engine {
            c.store.engine = e
                .parse::<EngineKind>()
                .map_err(|e| ConfigError::Invalid(format!("store.engine: {e}")))?;
        }
        if let Some(b) = &f.store.budget {
            c.store.budget_bytes = Some(
                parse_size(b).map_err(|e| ConfigError::Invalid(format!("store.budget: {e}")))?,
            );
        }
        if let Some(z) = f.store.compress {
            c.store.compress = z;
        }
        if let Some(cc) = &f.transport.congestion {
            c.endpoint.congestion = cc
                .parse::<Congestion>()
                .map_err(|e| ConfigError::Invalid(format!("transport.congestion: {e}")))?;
        }
        if let Some(z) = f.transport.wire_zstd {
            c.wire_zstd = z;
        }
        if let Some(w) = f.transport.window {
            if !(1..=256).contains(&w) {
                return Err(ConfigError::Invalid(format!(
                    "transport.window = {w}: must be 1..=256"
                )));
            }
            c.fetch.window = w;
        }
        let mut reg = f.registry.clone();
        reg.push_token_file = reg.push_token_file.as_ref().map(rel);
        reg.tls_cert = reg.tls_cert.as_ref().map(rel);
        reg.tls_key = reg.tls_key.as_ref().map(rel);
        if reg.tls_cert.is_some() != reg.tls_key.is_some() {
            return Err(ConfigError::Invalid(
                "registry.tls_cert and registry.tls_key go together".into(),
            ));
        }
        c.registry = reg;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse() {
        let c = NodeConfig::new("d");
        assert_eq!(c.registry_listen, Some(DEFAULT_REGISTRY.parse().unwrap()));
        assert_eq!(c.api_listen, Some(DEFAULT_API.parse().unwrap()));
        assert_eq!(c.endpoint.listen, DEFAULT_QUIC.parse().unwrap());
        assert_eq!(c.nbd_listen, DEFAULT_NBD.parse().unwrap());
    }

    #[test]
    fn example_file_parses_and_applies() {
        let text = include_str!("../../cairn.example.toml");
        let f = FileConfig::parse(text).unwrap();
        let c = NodeConfig::from_file(&f, Path::new("/etc/cairn"), Path::new("x")).unwrap();
        assert_eq!(c.site, "edge-berlin-1");
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/cairn"));
        assert_eq!(c.parents.len(), 1);
        assert_eq!(c.parents[0].name.as_deref(), Some("core-1"));
        assert_eq!(c.store.budget_bytes, Some(200 << 30));
        assert_eq!(
            c.identity,
            Some(PathBuf::from("/etc/cairn/ca/edge-berlin-1"))
        );
        assert_eq!(
            c.labels.get("region").map(String::as_str),
            Some("eu-central")
        );
    }

    #[test]
    fn bad_configs_are_clear() {
        let e = FileConfig::parse("version = 2").unwrap_err();
        assert!(e.contains("version = 2"), "{e}");
        let e = FileConfig::parse("version = 1\nsurprise = true").unwrap_err();
        assert!(e.contains("surprise"), "{e}");
        let e = FileConfig::parse("version = 1\n[listen]\napi = \"nope\"").unwrap_err();
        assert!(e.contains("api") || e.contains("address"), "{e}");
        let f = FileConfig::parse("version = 1\nparents = [\"::bad\"]").unwrap();
        assert!(NodeConfig::from_file(&f, Path::new("."), Path::new("d")).is_err());
        let f = FileConfig::parse("version = 1\n[store]\nbudget = \"12Q\"").unwrap();
        assert!(NodeConfig::from_file(&f, Path::new("."), Path::new("d")).is_err());
        assert!(FileConfig::parse("").is_err(), "version is required");
    }

    #[test]
    fn sizes_and_peers() {
        assert_eq!(parse_size("20G").unwrap(), 20 << 30);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert!(parse_size("x").is_err());
        let p = parse_peer("core@127.0.0.1:7443").unwrap();
        assert_eq!(p.name.as_deref(), Some("core"));
        assert!(parse_peer("Bad_Name@127.0.0.1:1").is_err());
        assert!(parse_peer("nowhere").is_err());
    }
}
