//! Pull-through from an upstream OCI registry over HTTP(S), for the top site
//! (config `registry.upstream = "http://…"`). On a miss the manifest is
//! fetched with every manifest media type accepted, and a blob is streamed
//! straight into the chunk store; the registry then checks the digest
//! before linking either.
//!
//! Auth: with `registry.upstream_username` and `upstream_password_file`
//! set, a `401` answered with `WWW-Authenticate: Basic` is retried with
//! those credentials, and one answered with `Bearer realm=…,service=…,
//! scope=…` (the Distribution token flow, as Docker Hub and most hosted
//! registries use) fetches a token from the realm, sending the credentials
//! if there are any, anonymously otherwise. Tokens are cached per scope
//! until shortly before they expire.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use cairn_chunkstore::{ObjectId, PutOptions, Store};
use futures_util::TryStreamExt;
use tracing::{debug, info};

use crate::registry::{BoxFuture, Upstream, UpstreamError, UpstreamManifest};

/// Manifest media types asked for, in the `Accept` header.
const ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.v2+json, \
application/vnd.docker.distribution.manifest.list.v2+json";

/// Largest manifest taken from upstream.
const MAX_MANIFEST: usize = 4 << 20;

/// Largest token-service answer read.
const MAX_TOKEN_ANSWER: usize = 64 << 10;
/// Largest `WWW-Authenticate` header parsed.
const MAX_CHALLENGE: usize = 4096;
/// Token lifetime assumed when the token service does not say (the
/// specification's default).
const DEFAULT_TOKEN_SECS: u64 = 60;
/// Most cached tokens (one per scope); the cache is cleared when full.
const MAX_TOKENS: usize = 1024;

/// Credentials for the upstream registry.
#[derive(Clone)]
pub struct UpstreamCredentials {
    /// User name.
    pub username: String,
    /// Password or access token.
    pub password: String,
}

impl std::fmt::Debug for UpstreamCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamCredentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl UpstreamCredentials {
    /// `username` with the password on the first line of `password_file`.
    pub fn from_file(username: &str, password_file: &Path) -> Result<Self, UpstreamConfigError> {
        let bad = |why: String| UpstreamConfigError {
            url: password_file.display().to_string(),
            why,
        };
        let meta = std::fs::metadata(password_file).map_err(|e| bad(e.to_string()))?;
        if meta.len() > 64 << 10 {
            return Err(bad("password file is over 64 KiB".into()));
        }
        let text = std::fs::read_to_string(password_file).map_err(|e| bad(e.to_string()))?;
        let password = text.lines().next().unwrap_or("").trim().to_owned();
        if password.is_empty() {
            return Err(bad("password file is empty".into()));
        }
        if username.is_empty() || username.contains(':') {
            return Err(bad(
                "upstream_username must be non-empty, without ':'".into()
            ));
        }
        Ok(Self {
            username: username.to_owned(),
            password,
        })
    }
}

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

/// Parse `Basic realm="x"` or `Bearer realm="…",service="…",scope="…"`.
fn parse_challenge(h: &str) -> Option<Challenge> {
    if h.len() > MAX_CHALLENGE {
        return None;
    }
    let h = h.trim();
    let (scheme, rest) = h.split_once(' ').unwrap_or((h, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut params: HashMap<String, String> = HashMap::new();
    let mut s = rest.trim();
    while !s.is_empty() {
        let (key, after) = s.split_once('=')?;
        let key = key.trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (value, next) = if let Some(q) = after.strip_prefix('"') {
            let end = q.find('"')?;
            (&q[..end], &q[end + 1..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim(), &after[end..])
        };
        params.insert(key, value.to_owned());
        s = next.trim_start().trim_start_matches(',').trim_start();
    }
    let realm = params.remove("realm")?;
    if !(realm.starts_with("http://") || realm.starts_with("https://")) {
        return None;
    }
    Some(Challenge::Bearer {
        realm,
        service: params.remove("service"),
        scope: params.remove("scope"),
    })
}

#[derive(serde::Deserialize)]
struct TokenAnswer {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
}

/// How requests authenticate, learnt from the upstream's challenges.
#[derive(Debug, Default)]
struct AuthState {
    /// The upstream asked for Basic: send it up front.
    basic: bool,
    /// Bearer tokens by scope (the challenge's `scope`, or "" without one),
    /// with when they stop being used.
    tokens: HashMap<String, (String, Instant)>,
}

/// An upstream OCI registry.
#[derive(Debug, Clone)]
pub struct HttpUpstream {
    base: String,
    client: reqwest::Client,
    store: Arc<Store>,
    creds: Option<UpstreamCredentials>,
    auth: Arc<Mutex<AuthState>>,
}

/// The upstream setting is unusable.
#[derive(Debug, thiserror::Error)]
#[error("registry.upstream {url:?}: {why}")]
pub struct UpstreamConfigError {
    url: String,
    why: String,
}

impl HttpUpstream {
    /// An upstream at `url` (`http://host:port` or `https://…`; a path prefix
    /// is not supported).
    pub fn new(url: &str, store: Arc<Store>) -> Result<Self, UpstreamConfigError> {
        let bad = |why: &str| UpstreamConfigError {
            url: url.to_owned(),
            why: why.to_owned(),
        };
        let base = url.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(bad("must start with http:// or https://"));
        }
        if base.len() > 2048 {
            return Err(bad("too long"));
        }
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(60))
            .user_agent(concat!("cairn/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| bad(&e.to_string()))?;
        Ok(Self {
            base,
            client,
            store,
            creds: None,
            auth: Arc::default(),
        })
    }

    /// Authenticate with these credentials (see the module docs).
    pub fn with_credentials(mut self, creds: UpstreamCredentials) -> Self {
        self.creds = Some(creds);
        self
    }

    /// The scope a request for `repo` needs.
    fn scope(repo: &str) -> String {
        format!("repository:{repo}:pull")
    }

    /// Add what the upstream asked for before to `req`.
    fn authorize(&self, req: reqwest::RequestBuilder, scope: &str) -> reqwest::RequestBuilder {
        let (basic, token) = {
            let Ok(a) = self.auth.lock() else {
                return req;
            };
            let token = a
                .tokens
                .get(scope)
                .filter(|(_, until)| Instant::now() < *until)
                .map(|(t, _)| t.clone());
            (a.basic, token)
        };
        if let Some(t) = token {
            return req.bearer_auth(t);
        }
        match (&self.creds, basic) {
            (Some(c), true) => req.basic_auth(&c.username, Some(&c.password)),
            _ => req,
        }
    }

    /// GET `url` for `repo`, answering one auth challenge if the upstream
    /// sends one.
    async fn get(
        &self,
        url: &str,
        repo: &str,
        accept: Option<&str>,
    ) -> Result<reqwest::Response, UpstreamError> {
        let scope = Self::scope(repo);
        let build = || {
            let mut r = self.client.get(url);
            if let Some(a) = accept {
                r = r.header(reqwest::header::ACCEPT, a);
            }
            r
        };
        let r = self.authorize(build(), &scope).send().await?;
        if r.status() != reqwest::StatusCode::UNAUTHORIZED {
            return Ok(r);
        }
        let challenge = r
            .headers()
            .get(reqwest::header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_challenge);
        match challenge {
            Some(Challenge::Basic) => {
                let Some(c) = &self.creds else {
                    return Err("upstream registry wants a user name and password \
                        (set registry.upstream_username and upstream_password_file)"
                        .into());
                };
                if let Ok(mut a) = self.auth.lock() {
                    a.basic = true;
                }
                let r = build()
                    .basic_auth(&c.username, Some(&c.password))
                    .send()
                    .await?;
                if r.status() == reqwest::StatusCode::UNAUTHORIZED {
                    return Err("upstream registry refused the configured credentials".into());
                }
                Ok(r)
            }
            Some(Challenge::Bearer {
                realm,
                service,
                scope: asked,
            }) => {
                let key = asked.clone().unwrap_or_else(|| scope.clone());
                let token = self.fetch_token(&realm, service.as_deref(), &key).await?;
                let r = build().bearer_auth(&token).send().await?;
                if r.status() == reqwest::StatusCode::UNAUTHORIZED {
                    return Err("upstream registry refused the token its token service gave".into());
                }
                if key != scope {
                    // Remember it under the scope we look up by, too.
                    if let Ok(mut a) = self.auth.lock() {
                        let until = a.tokens.get(&key).map(|(_, u)| *u);
                        if let Some(until) = until {
                            a.tokens.insert(scope, (token, until));
                        }
                    }
                }
                Ok(r)
            }
            None => Err("upstream registry answered 401 without a usable \
                WWW-Authenticate challenge"
                .into()),
        }
    }

    /// Ask the token service at `realm` for a token for `scope`.
    async fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: &str,
    ) -> Result<String, UpstreamError> {
        let mut q: Vec<(&str, &str)> = vec![("scope", scope)];
        if let Some(s) = service {
            q.push(("service", s));
        }
        let mut req = self.client.get(realm).query(&q);
        if let Some(c) = &self.creds {
            req = req.basic_auth(&c.username, Some(&c.password));
        }
        let r = req.send().await?;
        if !r.status().is_success() {
            return Err(format!("upstream token service {realm}: HTTP {}", r.status()).into());
        }
        if r.content_length()
            .is_some_and(|n| n > MAX_TOKEN_ANSWER as u64)
        {
            return Err("upstream token service answer is too large".into());
        }
        let mut body = BytesMut::new();
        let mut stream = r.bytes_stream();
        while let Some(piece) = stream.try_next().await? {
            if body.len() + piece.len() > MAX_TOKEN_ANSWER {
                return Err("upstream token service answer is too large".into());
            }
            body.extend_from_slice(&piece);
        }
        let answer: TokenAnswer = serde_json::from_slice(&body)
            .map_err(|e| format!("upstream token service answer is not JSON: {e}"))?;
        let token = answer
            .token
            .or(answer.access_token)
            .filter(|t| !t.is_empty())
            .ok_or("upstream token service answered without a token")?;
        // Stop using it a little before it expires.
        let secs = answer
            .expires_in
            .unwrap_or(DEFAULT_TOKEN_SECS)
            .clamp(1, 86_400);
        let until = Instant::now() + Duration::from_secs(secs).mul_f64(0.9);
        if let Ok(mut a) = self.auth.lock() {
            if a.tokens.len() >= MAX_TOKENS {
                a.tokens.clear();
            }
            a.tokens.insert(scope.to_owned(), (token.clone(), until));
        }
        debug!(%realm, %scope, secs, "token from the upstream's token service");
        Ok(token)
    }
}

fn status_err(what: &str, r: &reqwest::Response) -> UpstreamError {
    format!("upstream {what}: HTTP {}", r.status()).into()
}

impl Upstream for HttpUpstream {
    fn resolve_manifest<'a>(
        &'a self,
        repo: &'a str,
        reference: &'a str,
    ) -> BoxFuture<'a, Result<Option<UpstreamManifest>, UpstreamError>> {
        Box::pin(async move {
            let url = format!("{}/v2/{repo}/manifests/{reference}", self.base);
            let r = self.get(&url, repo, Some(ACCEPT)).await?;
            if r.status() == reqwest::StatusCode::NOT_FOUND {
                return Ok(None);
            }
            if !r.status().is_success() {
                return Err(status_err("manifest", &r));
            }
            let header = |name: &str| {
                r.headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            let media_type = header("content-type").unwrap_or_default();
            let digest = header("docker-content-digest");
            if r.content_length().is_some_and(|n| n > MAX_MANIFEST as u64) {
                return Err("upstream manifest is over 4 MiB".into());
            }
            let mut body = BytesMut::new();
            let mut stream = r.bytes_stream();
            while let Some(piece) = stream.try_next().await? {
                if body.len() + piece.len() > MAX_MANIFEST {
                    return Err("upstream manifest is over 4 MiB".into());
                }
                body.extend_from_slice(&piece);
            }
            let bytes: Bytes = body.freeze();
            let digest = match digest {
                Some(d) => d,
                None => {
                    use sha2::Digest as _;
                    format!("sha256:{}", hex::encode(sha2::Sha256::digest(&bytes)))
                }
            };
            info!(%repo, %reference, %digest, "manifest pulled from upstream registry");
            Ok(Some(UpstreamManifest {
                bytes,
                media_type,
                digest,
            }))
        })
    }

    fn fetch_blob<'a>(
        &'a self,
        repo: &'a str,
        digest: &'a str,
    ) -> BoxFuture<'a, Result<Option<ObjectId>, UpstreamError>> {
        Box::pin(async move {
            let url = format!("{}/v2/{repo}/blobs/{digest}", self.base);
            let r = self.get(&url, repo, None).await?;
            if r.status() == reqwest::StatusCode::NOT_FOUND {
                return Ok(None);
            }
            if !r.status().is_success() {
                return Err(status_err("blob", &r));
            }
            let reader =
                tokio_util::io::StreamReader::new(r.bytes_stream().map_err(std::io::Error::other));
            // Pinned (obj:<id>) so it stays until the registry links it;
            // the registry checks the digest the store computed.
            let opts = PutOptions {
                sha512: digest.starts_with("sha512:"),
                ..PutOptions::default()
            };
            let put = self.store.put_async(reader, opts).await?;
            debug!(%repo, %digest, bytes = put.len, new = put.new_bytes, "blob pulled from upstream registry");
            Ok(Some(put.object))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_parse() {
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/alpine:pull".into()),
            })
        );
        assert_eq!(
            parse_challenge(r#"bearer realm="http://127.0.0.1:9/t""#),
            Some(Challenge::Bearer {
                realm: "http://127.0.0.1:9/t".into(),
                service: None,
                scope: None,
            })
        );
        // No realm, a realm that is not a URL, an unknown scheme, garbage.
        for bad in [
            r#"Bearer service="x""#,
            r#"Bearer realm="file:///etc/passwd""#,
            "Digest realm=x",
            "Bearer realm=\"unterminated",
            "",
        ] {
            assert_eq!(parse_challenge(bad), None, "{bad}");
        }
        assert_eq!(parse_challenge(&"a".repeat(MAX_CHALLENGE + 1)), None);
    }
}
