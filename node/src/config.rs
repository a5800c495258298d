//! Node configuration: a TOML file (with a `version` field), overridden by
//! command-line flags. `cairn.example.toml` at the repository root documents
//! every field; a test parses it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

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
    /// Pushing images on to other sites.
    #[serde(default)]
    pub replication: ReplicationSection,
    /// `[nbd]`.
    #[serde(default)]
    pub nbd: NbdSection,
    /// `[prefetch]`.
    #[serde(default)]
    pub prefetch: PrefetchSection,
    /// `[meta]`.
    #[serde(default)]
    pub meta: MetaSection,
}

/// `[meta]`: site metadata (see `cairn_node::meta`). Times in milliseconds.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetaSection {
    /// Between anti-entropy rounds with parents and peers (default 5000;
    /// 100 to 3600000).
    pub interval_ms: Option<u64>,
    /// Between rewrites of this site's record (default 30000).
    pub heartbeat_ms: Option<u64>,
    /// Silence before a site is suspect (default 90000).
    pub suspect_after_ms: Option<u64>,
    /// Silence before a site is down (default 300000; above suspect).
    pub down_after_ms: Option<u64>,
    /// CPU offered to workloads, millicores.
    pub cpu_millis: Option<u64>,
    /// Memory offered to workloads, e.g. `"16G"`.
    pub memory: Option<String>,
    /// Latitude and longitude in degrees, e.g. `[48.1, 11.6]`.
    pub geo: Option<[f32; 2]>,
}

/// `[replication]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicationSection {
    /// Forward every push accepted here to the parents (default true), so a
    /// push made at an edge (even while it is cut off) reaches the core.
    pub forward_to_parents: Option<bool>,
    /// Longest wait between retries to an unreachable site, in seconds
    /// (default 30).
    pub retry_max_secs: Option<u64>,
    /// Push matching repositories on to named sites as soon as they commit.
    #[serde(default)]
    pub rules: Vec<RuleSection>,
}

/// `[[replication.rules]]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSection {
    /// Repositories: an exact name, or a prefix ending in `*` (`apps/*`,
    /// `*` for all).
    pub repos: String,
    /// Target sites: the name of a parent or peer, or `NAME@HOST:PORT`.
    pub to: Vec<String>,
}

/// One replication rule, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicationRule {
    /// Repository pattern (exact, or a prefix ending in `*`).
    pub repos: String,
    /// Where matching pushes go.
    pub to: Vec<PeerAddr>,
}

impl ReplicationRule {
    /// Does `repo` match this rule's pattern?
    pub fn matches(&self, repo: &str) -> bool {
        match self.repos.strip_suffix('*') {
            Some(prefix) => repo.starts_with(prefix),
            None => repo == self.repos,
        }
    }
}

/// Replication settings, resolved.
#[derive(Debug, Clone)]
pub struct ReplicationConfig {
    /// Forward pushes to the parents.
    pub forward_to_parents: bool,
    /// Longest retry interval to an unreachable site.
    pub retry_max: std::time::Duration,
    /// Push-on rules.
    pub rules: Vec<ReplicationRule>,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        Self {
            forward_to_parents: true,
            retry_max: std::time::Duration::from_secs(30),
            rules: Vec::new(),
        }
    }
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
    /// NBD (TCP). Must be a loopback address unless `nbd_allow_remote`.
    pub nbd: Option<SocketAddr>,
    /// Allow a non-loopback NBD listener. NBD STARTTLS is not implemented,
    /// so a remote listener serves images in the clear to anyone who can
    /// reach it (default false).
    pub nbd_allow_remote: Option<bool>,
}

/// `[nbd]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NbdSection {
    /// Fetch the rest of a partly local image in the background, at
    /// background priority, once an export of it is opened (default false:
    /// only what is read is fetched).
    pub background_fill: Option<bool>,
}

/// `[prefetch]`: predictive prefetch for NBD exports of partly local
/// images (see `cairn_node::prefetcher`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefetchSection {
    /// Prefetch at all (default true).
    pub enabled: Option<bool>,
    /// How far ahead of the reader prefetch may run, e.g. `"16M"`
    /// (default 16 MiB; 64 KiB to 1 GiB).
    pub lead: Option<String>,
    /// Prefetched chunks in flight at most (default 32; 1 to 256).
    pub max_inflight: Option<usize>,
    /// Follow access profiles (default true); false leaves only the
    /// successor model, which predicts after each read.
    pub use_profile: Option<bool>,
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
    /// Memory for the verified chunk cache (random reads: NBD), e.g.
    /// `"1G"`; `"0"` turns it off.
    pub chunk_cache: Option<String>,
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
    /// User name for the upstream registry (Basic auth, or the credentials
    /// sent to its token service). Without it pulls are anonymous.
    pub upstream_username: Option<String>,
    /// File holding the upstream password or access token (first line).
    pub upstream_password_file: Option<PathBuf>,
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
    /// NBD listener (`None`: no NBD server). Loopback only unless
    /// `nbd_allow_remote`; see [`NodeConfig::check_nbd`].
    pub nbd_listen: Option<SocketAddr>,
    /// Allow a non-loopback `nbd_listen` (no STARTTLS: traffic is clear).
    pub nbd_allow_remote: bool,
    /// Complete partly local images in the background once exported.
    pub nbd_background_fill: bool,
    /// Predictive prefetch for exports of partly local images.
    pub prefetch: crate::prefetcher::PrefetchSettings,
    /// Site metadata: anti-entropy, heartbeats, liveness.
    pub meta: crate::meta::MetaSettings,
    /// Registry settings.
    pub registry: RegistrySection,
    /// Replication of pushes to other sites.
    pub replication: ReplicationConfig,
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
            nbd_listen: Some(addr(None, DEFAULT_NBD)),
            nbd_allow_remote: false,
            nbd_background_fill: false,
            prefetch: Default::default(),
            meta: Default::default(),
            registry: RegistrySection::default(),
            replication: ReplicationConfig::default(),
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
            c.nbd_listen = Some(a);
        }
        if let Some(r) = f.listen.nbd_allow_remote {
            c.nbd_allow_remote = r;
        }
        if let Some(b) = f.nbd.background_fill {
            c.nbd_background_fill = b;
        }
        apply_meta(&f.meta, &mut c.meta)?;
        if let Some(b) = f.prefetch.enabled {
            c.prefetch.enabled = b;
        }
        if let Some(l) = &f.prefetch.lead {
            let v =
                parse_size(l).map_err(|e| ConfigError::Invalid(format!("prefetch.lead: {e}")))?;
            if !(64 << 10..=1 << 30).contains(&v) {
                return Err(ConfigError::Invalid(format!(
                    "prefetch.lead: {l} is outside 64K..1G"
                )));
            }
            c.prefetch.lead_bytes = v;
        }
        if let Some(n) = f.prefetch.max_inflight {
            if !(1..=256).contains(&n) {
                return Err(ConfigError::Invalid(format!(
                    "prefetch.max_inflight: {n} is outside 1..256"
                )));
            }
            c.prefetch.max_inflight = n;
        }
        if let Some(b) = f.prefetch.use_profile {
            c.prefetch.use_profile = b;
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
        if let Some(cc) = &f.store.chunk_cache {
            let n = parse_size(cc)
                .map_err(|e| ConfigError::Invalid(format!("store.chunk_cache: {e}")))?;
            if n > 1 << 40 {
                return Err(ConfigError::Invalid(format!(
                    "store.chunk_cache = {cc}: at most 1T"
                )));
            }
            c.store.chunk_cache_bytes = n;
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
        reg.upstream_password_file = reg.upstream_password_file.as_ref().map(rel);
        if reg.upstream_username.is_some() != reg.upstream_password_file.is_some() {
            return Err(ConfigError::Invalid(
                "registry.upstream_username and registry.upstream_password_file go together".into(),
            ));
        }
        if reg.tls_cert.is_some() != reg.tls_key.is_some() {
            return Err(ConfigError::Invalid(
                "registry.tls_cert and registry.tls_key go together".into(),
            ));
        }
        c.registry = reg;
        if let Some(f) = f.replication.forward_to_parents {
            c.replication.forward_to_parents = f;
        }
        if let Some(s) = f.replication.retry_max_secs {
            if !(1..=3600).contains(&s) {
                return Err(ConfigError::Invalid(format!(
                    "replication.retry_max_secs = {s}: must be 1..=3600"
                )));
            }
            c.replication.retry_max = std::time::Duration::from_secs(s);
        }
        for r in &f.replication.rules {
            let rule = resolve_rule(r, &c.parents, &c.peers).map_err(ConfigError::Invalid)?;
            c.replication.rules.push(rule);
        }
        Ok(c)
    }
}

impl NodeConfig {
    /// Refuse a non-loopback NBD listener unless `nbd_allow_remote` is set:
    /// the NBD server has no STARTTLS, so it would serve images in the clear.
    pub fn check_nbd(&self) -> Result<(), ConfigError> {
        match self.nbd_listen {
            Some(a) if !a.ip().is_loopback() && !self.nbd_allow_remote => {
                Err(ConfigError::Invalid(format!(
                    "nbd listen address {a} is not loopback; NBD has no TLS (STARTTLS is not \
                     implemented), so set listen.nbd_allow_remote = true (or --nbd-allow-remote) \
                     to serve images unencrypted to the network"
                )))
            }
            _ => Ok(()),
        }
    }
}

/// Resolve a rule's targets: a known parent or peer by name, or
/// `NAME@HOST:PORT`.
pub fn resolve_rule(
    r: &RuleSection,
    parents: &[PeerAddr],
    peers: &[PeerAddr],
) -> Result<ReplicationRule, String> {
    let pat = r.repos.trim();
    let body = pat.strip_suffix('*').unwrap_or(pat);
    if pat.is_empty() || body.contains('*') || pat.len() > 255 {
        return Err(format!(
            "replication.rules: repos = {:?}: want a repository name or a prefix ending in '*'",
            r.repos
        ));
    }
    if r.to.is_empty() {
        return Err(format!("replication.rules for {pat:?}: `to` is empty"));
    }
    let mut to = Vec::new();
    for t in &r.to {
        let p = if t.contains('@') {
            parse_peer(t)?
        } else {
            parents
                .iter()
                .chain(peers)
                .find(|p| p.name.as_deref() == Some(t.as_str()))
                .cloned()
                .ok_or_else(|| {
                    format!(
                        "replication.rules for {pat:?}: site {t:?} is not a named parent or peer \
                         (give it as NAME@HOST:PORT)"
                    )
                })?
        };
        if p.name.is_none() {
            return Err(format!(
                "replication.rules for {pat:?}: target {t:?} needs a site name (NAME@HOST:PORT)"
            ));
        }
        to.push(p);
    }
    Ok(ReplicationRule {
        repos: pat.to_owned(),
        to,
    })
}

fn apply_meta(f: &MetaSection, m: &mut crate::meta::MetaSettings) -> Result<(), ConfigError> {
    let ms =
        |what: &str, v: Option<u64>, lo: u64, hi: u64| -> Result<Option<Duration>, ConfigError> {
            match v {
                None => Ok(None),
                Some(v) if (lo..=hi).contains(&v) => Ok(Some(Duration::from_millis(v))),
                Some(v) => Err(ConfigError::Invalid(format!(
                    "meta.{what}: {v} is outside {lo}..{hi}"
                ))),
            }
        };
    const DAY: u64 = 24 * 3600 * 1000;
    if let Some(d) = ms("interval_ms", f.interval_ms, 100, 3600 * 1000)? {
        m.interval = d;
    }
    if let Some(d) = ms("heartbeat_ms", f.heartbeat_ms, 100, DAY)? {
        m.heartbeat = d;
    }
    if let Some(d) = ms("suspect_after_ms", f.suspect_after_ms, 100, DAY)? {
        m.suspect_after = d;
    }
    if let Some(d) = ms("down_after_ms", f.down_after_ms, 200, 30 * DAY)? {
        m.down_after = d;
    }
    if m.suspect_after >= m.down_after {
        return Err(ConfigError::Invalid(
            "meta.suspect_after_ms must be below meta.down_after_ms".into(),
        ));
    }
    if let Some(c) = f.cpu_millis {
        m.cpu_millis = c;
    }
    if let Some(s) = &f.memory {
        m.mem_bytes =
            parse_size(s).map_err(|e| ConfigError::Invalid(format!("meta.memory: {e}")))?;
    }
    if let Some([lat, lon]) = f.geo {
        if !(-90.0..=90.0).contains(&lat) || !(-180.0..=180.0).contains(&lon) {
            return Err(ConfigError::Invalid(format!(
                "meta.geo: [{lat}, {lon}] is not a latitude and longitude"
            )));
        }
        m.geo = Some((lat, lon));
    }
    Ok(())
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
        assert_eq!(c.nbd_listen, Some(DEFAULT_NBD.parse().unwrap()));
        assert!(!c.nbd_allow_remote);
        c.check_nbd().unwrap();
    }

    #[test]
    fn remote_nbd_needs_the_flag() {
        let mut c = NodeConfig::new("d");
        c.nbd_listen = Some("0.0.0.0:10809".parse().unwrap());
        let e = c.check_nbd().unwrap_err().to_string();
        assert!(
            e.contains("nbd_allow_remote") && e.contains("0.0.0.0"),
            "{e}"
        );
        c.nbd_listen = Some("[::]:10809".parse().unwrap());
        assert!(c.check_nbd().is_err());
        c.nbd_allow_remote = true;
        c.check_nbd().unwrap();
        c.nbd_allow_remote = false;
        c.nbd_listen = Some("[::1]:0".parse().unwrap());
        c.check_nbd().unwrap();
        c.nbd_listen = None;
        c.check_nbd().unwrap();
        // From a file.
        let f = FileConfig::parse(
            "version = 1\n[listen]\nnbd = \"10.1.2.3:10809\"\nnbd_allow_remote = true\n",
        )
        .unwrap();
        let c = NodeConfig::from_file(&f, Path::new("."), Path::new("d")).unwrap();
        assert!(c.nbd_allow_remote);
        c.check_nbd().unwrap();
        let f = FileConfig::parse("version = 1\n[listen]\nnbd = \"10.1.2.3:10809\"\n").unwrap();
        let c = NodeConfig::from_file(&f, Path::new("."), Path::new("d")).unwrap();
        assert!(c.check_nbd().is_err());
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
        assert_eq!(c.store.chunk_cache_bytes, 1 << 30);
        assert_eq!(
            c.identity,
            Some(PathBuf::from("/etc/cairn/ca/edge-berlin-1"))
        );
        assert_eq!(
            c.labels.get("region").map(String::as_str),
            Some("eu-central")
        );
        assert!(c.prefetch.enabled && c.prefetch.use_profile);
        assert_eq!(c.prefetch.lead_bytes, 16 << 20);
        assert_eq!(c.prefetch.max_inflight, 32);
        assert_eq!(c.meta.interval, Duration::from_secs(5));
        assert_eq!(c.meta.mem_bytes, 16 << 30);
        assert_eq!(c.meta.cpu_millis, 8000);
        assert_eq!(c.meta.geo, Some((48.14, 11.58)));
    }

    #[test]
    fn meta_limits_are_checked() {
        let cfg = |t: &str| {
            let f = FileConfig::parse(&format!("version = 1\n[meta]\n{t}"))?;
            NodeConfig::from_file(&f, Path::new("."), Path::new("d")).map_err(|e| e.to_string())
        };
        let c = cfg("interval_ms = 200\nsuspect_after_ms = 1000\ndown_after_ms = 2000").unwrap();
        assert_eq!(c.meta.interval, Duration::from_millis(200));
        assert_eq!(c.meta.down_after, Duration::from_millis(2000));
        for bad in [
            "interval_ms = 5",
            "suspect_after_ms = 5000\ndown_after_ms = 4000",
            "geo = [91.0, 0.0]",
            "memory = \"lots\"",
            "colour = 1",
        ] {
            assert!(cfg(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn prefetch_limits_are_checked() {
        let cfg = |t: &str| {
            let f = FileConfig::parse(&format!("version = 1\n[prefetch]\n{t}")).unwrap();
            NodeConfig::from_file(&f, Path::new("."), Path::new("d"))
        };
        let c = cfg("lead = \"4M\"\nmax_inflight = 2\nuse_profile = false").unwrap();
        assert_eq!(c.prefetch.lead_bytes, 4 << 20);
        assert_eq!(c.prefetch.max_inflight, 2);
        assert!(!c.prefetch.use_profile);
        for bad in [
            "lead = \"1K\"",
            "lead = \"2G\"",
            "max_inflight = 0",
            "max_inflight = 257",
        ] {
            let e = cfg(bad).unwrap_err().to_string();
            assert!(e.contains("prefetch."), "{bad}: {e}");
        }
        assert!(cfg("enabled = false").is_ok_and(|c| !c.prefetch.enabled));
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
    fn replication_rules() {
        let f = FileConfig::parse(
            "version = 1\npeers = [\"edge-a@127.0.0.1:1\"]\n[replication]\nretry_max_secs = 5\n\
             [[replication.rules]]\nrepos = \"apps/*\"\nto = [\"edge-a\", \"edge-b@127.0.0.1:2\"]\n",
        )
        .unwrap();
        let c = NodeConfig::from_file(&f, Path::new("."), Path::new("d")).unwrap();
        assert_eq!(c.replication.retry_max.as_secs(), 5);
        let r = &c.replication.rules[0];
        assert!(r.matches("apps/web") && !r.matches("app") && !r.matches("other/apps/x"));
        assert_eq!(r.to.len(), 2);
        assert_eq!(r.to[1].addr.port(), 2);
        for bad in [
            "[[replication.rules]]\nrepos = \"a/*/b\"\nto = [\"x@127.0.0.1:1\"]",
            "[[replication.rules]]\nrepos = \"a\"\nto = []",
            "[[replication.rules]]\nrepos = \"a\"\nto = [\"unknown-site\"]",
            "[replication]\nretry_max_secs = 0",
        ] {
            let f = FileConfig::parse(&format!("version = 1\n{bad}")).unwrap();
            let e = NodeConfig::from_file(&f, Path::new("."), Path::new("d")).unwrap_err();
            assert!(e.to_string().contains("replication"), "{e}");
        }
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
