//! Repository names, tags, digests and references as the spec defines them,
//! and the chunk-store names that link blobs, manifests and tags into
//! repositories.
//!
//! Store names (all GC roots, all checked by
//! [`cairn_chunkstore::index::validate_name`]):
//! - `blob/<repo>@<digest>`: a blob linked into a repository;
//! - `manifest/<repo>@<digest>`: a manifest in a repository;
//! - `mtype/<repo>@<digest>`: a tiny object whose bytes are the manifest's
//!   media type (the `Content-Type` it was pushed with);
//! - `tag/<repo>:<tag>`: a tag, pointing at the manifest object;
//! - `ref/<repo>@<subject digest>/<manifest digest>`: the referrers index,
//!   pointing at the referring manifest object;
//! - `upload/<session id>`: a temporary root that keeps a just-ingested
//!   upload alive until its digest is checked and it is linked.

use sha2::Digest as _;

use super::errors::{ApiError, Code};

/// Longest repository name accepted (the spec's usual client limit).
pub(crate) const MAX_REPO_LEN: usize = 255;
/// Longest tag (`[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`).
pub(crate) const MAX_TAG_LEN: usize = 128;
/// Longest digest string looked at (`sha512:` + 128 hex is 135).
const MAX_DIGEST_LEN: usize = 200;

/// A supported digest algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Algo {
    Sha256,
    Sha512,
}

impl Algo {
    fn name(self) -> &'static str {
        match self {
            Algo::Sha256 => "sha256",
            Algo::Sha512 => "sha512",
        }
    }

    fn hex_len(self) -> usize {
        match self {
            Algo::Sha256 => 64,
            Algo::Sha512 => 128,
        }
    }
}

/// A validated content digest: `sha256:` + 64 or `sha512:` + 128 lowercase hex.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Digest {
    algo: Algo,
    hex: String,
}

impl Digest {
    /// Parse and validate a digest; `DIGEST_INVALID` otherwise.
    pub(crate) fn parse(s: &str) -> Result<Self, ApiError> {
        let bad = |why: &str| {
            ApiError::new(Code::DigestInvalid, format!("invalid digest: {why}"))
                .detail(serde_json::json!({ "digest": truncate(s, MAX_DIGEST_LEN) }))
        };
        if s.len() > MAX_DIGEST_LEN {
            return Err(bad("too long"));
        }
        let Some((algo, hex)) = s.split_once(':') else {
            return Err(bad("expected <algorithm>:<hex>"));
        };
        let algo = match algo {
            "sha256" => Algo::Sha256,
            "sha512" => Algo::Sha512,
            a if is_algorithm(a) => {
                return Err(bad(
                    "unsupported algorithm (sha256 and sha512 are supported)",
                ))
            }
            _ => return Err(bad("malformed algorithm")),
        };
        if hex.len() != algo.hex_len()
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(bad(&format!(
                "{} needs {} lowercase hex characters",
                algo.name(),
                algo.hex_len()
            )));
        }
        Ok(Self {
            algo,
            hex: hex.to_owned(),
        })
    }

    /// The digest of `bytes` with `algo`.
    pub(crate) fn of(algo: Algo, bytes: &[u8]) -> Self {
        let hex = match algo {
            Algo::Sha256 => hex::encode(sha2::Sha256::digest(bytes)),
            Algo::Sha512 => hex::encode(sha2::Sha512::digest(bytes)),
        };
        Self { algo, hex }
    }

    /// A sha256 digest from hex the store computed.
    pub(crate) fn sha256_hex(hex: &str) -> Result<Self, ApiError> {
        Self::parse(&format!("sha256:{hex}"))
    }

    /// The algorithm.
    pub(crate) fn algo(&self) -> Algo {
        self.algo
    }

    /// Does what the store computed for an object match this digest?
    pub(crate) fn matches(&self, sha256: &str, sha512: Option<&str>) -> bool {
        match self.algo {
            Algo::Sha256 => sha256 == self.hex,
            Algo::Sha512 => sha512 == Some(self.hex.as_str()),
        }
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.algo.name(), self.hex)
    }
}

/// `[a-z0-9]+([+._-][a-z0-9]+)*`, the spec's algorithm grammar.
fn is_algorithm(a: &str) -> bool {
    !a.is_empty()
        && a.split(['+', '.', '_', '-']).all(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        })
}

/// A manifest reference: a tag or a digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reference {
    Tag(String),
    Digest(Digest),
}

impl Reference {
    /// A reference with a `:` is a digest, otherwise a tag.
    pub(crate) fn parse(s: &str) -> Result<Self, ApiError> {
        if s.contains(':') {
            Ok(Reference::Digest(Digest::parse(s)?))
        } else {
            validate_tag(s)?;
            Ok(Reference::Tag(s.to_owned()))
        }
    }
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reference::Tag(t) => f.write_str(t),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// Check a repository name against the spec:
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(\/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`,
/// at most 255 bytes. `..`, empty components and anything else are
/// `NAME_INVALID`.
pub(crate) fn validate_repo(name: &str) -> Result<(), ApiError> {
    let bad = |why: &str| {
        ApiError::new(Code::NameInvalid, format!("invalid repository name: {why}"))
            .detail(serde_json::json!({ "name": truncate(name, MAX_REPO_LEN) }))
    };
    if name.is_empty() {
        return Err(bad("empty"));
    }
    if name.len() > MAX_REPO_LEN {
        return Err(bad("longer than 255 bytes"));
    }
    for comp in name.split('/') {
        if !valid_component(comp) {
            return Err(bad(
                "each path component must match [a-z0-9]+((\\.|_|__|-+)[a-z0-9]+)*",
            ));
        }
    }
    Ok(())
}

fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    let (Some(&first), Some(&last)) = (b.first(), b.last()) else {
        return false;
    };
    if !alnum(first) || !alnum(last) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &b[start..i];
        let ok = sep == b"." || sep == b"_" || sep == b"__" || sep.iter().all(|&x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// Check a tag: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`, else `TAG_INVALID`.
pub(crate) fn validate_tag(tag: &str) -> Result<(), ApiError> {
    let b = tag.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= MAX_TAG_LEN
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b[1..]
            .iter()
            .all(|&x| x.is_ascii_alphanumeric() || matches!(x, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::new(
            Code::TagInvalid,
            "invalid tag: must match [a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}",
        )
        .detail(serde_json::json!({ "tag": truncate(tag, MAX_TAG_LEN + 8) })))
    }
}

/// A checked store name.
fn store_name(name: String) -> Result<String, ApiError> {
    cairn_chunkstore::index::validate_name(&name).map_err(|e| {
        ApiError::new(
            Code::NameInvalid,
            format!("repository name too long for this digest: {e}"),
        )
    })?;
    Ok(name)
}

/// `blob/<repo>@<digest>`.
pub(crate) fn blob_link(repo: &str, d: &Digest) -> Result<String, ApiError> {
    store_name(format!("blob/{repo}@{d}"))
}

/// `manifest/<repo>@<digest>`.
pub(crate) fn manifest_link(repo: &str, d: &Digest) -> Result<String, ApiError> {
    store_name(format!("manifest/{repo}@{d}"))
}

/// `mtype/<repo>@<digest>`.
pub(crate) fn mtype_link(repo: &str, d: &Digest) -> Result<String, ApiError> {
    store_name(format!("mtype/{repo}@{d}"))
}

/// `tag/<repo>:<tag>`.
pub(crate) fn tag_link(repo: &str, tag: &str) -> Result<String, ApiError> {
    store_name(format!("tag/{repo}:{tag}"))
}

/// Prefix of all tags of a repository.
pub(crate) fn tag_prefix(repo: &str) -> String {
    format!("tag/{repo}:")
}

/// `ref/<repo>@<subject>/<manifest>`.
pub(crate) fn ref_link(
    repo: &str,
    subject: &Digest,
    manifest: &Digest,
) -> Result<String, ApiError> {
    store_name(format!("ref/{repo}@{subject}/{manifest}"))
}

/// Prefix of the referrers of `subject` in a repository.
pub(crate) fn ref_prefix(repo: &str, subject: &Digest) -> String {
    format!("ref/{repo}@{subject}/")
}

/// Prefix of temporary upload roots.
pub(crate) const UPLOAD_PREFIX: &str = "upload/";

/// `upload/<id>`.
pub(crate) fn upload_root(id: &str) -> String {
    format!("{UPLOAD_PREFIX}{id}")
}

/// The repository a link name belongs to, for the catalog: the part
/// between the kind prefix and `@` (or `:` for tags).
pub(crate) fn repo_of_link(name: &str) -> Option<&str> {
    if let Some(rest) = name.strip_prefix("tag/") {
        return rest.split_once(':').map(|(r, _)| r);
    }
    let rest = name
        .strip_prefix("manifest/")
        .or_else(|| name.strip_prefix("blob/"))?;
    rest.split_once('@').map(|(r, _)| r)
}

/// Decode `%XX` escapes of one path segment or query value. Invalid
/// escapes and non-UTF-8 results are `None`.
pub(crate) fn percent_decode(s: &str) -> Option<String> {
    if !s.contains('%') {
        return Some(s.to_owned());
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = b.get(i + 1..i + 3)?;
            let h = std::str::from_utf8(h).ok()?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repos() {
        for ok in ["a", "demo/busybox", "a.b_c__d---e/f0", "library/x-y"] {
            assert!(validate_repo(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "..",
            "../x",
            "a/../../b",
            "a//b",
            "A",
            "a/",
            "/a",
            "a..b",
            "a___b",
            "a_.b",
            "-a",
            "a-",
            "a b",
            "a%2fb",
            "a:b",
            "a@b",
        ] {
            assert!(validate_repo(bad).is_err(), "{bad}");
        }
        assert!(validate_repo(&"a".repeat(256)).is_err());
    }

    #[test]
    fn tags_and_digests() {
        assert!(validate_tag("v1.0-rc_2").is_ok());
        assert!(validate_tag("_x").is_ok());
        assert!(validate_tag(".x").is_err());
        assert!(validate_tag("-x").is_err());
        assert!(validate_tag(&"a".repeat(129)).is_err());
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(Digest::parse(&d).map(|d| d.to_string()).ok(), Some(d));
        assert!(Digest::parse(&format!("sha512:{}", "0".repeat(128))).is_ok());
        assert!(Digest::parse(&format!("sha256:{}", "A".repeat(64))).is_err());
        assert!(Digest::parse("md5:abc").is_err());
        assert!(Digest::parse("sha256").is_err());
        assert_eq!(percent_decode("sha256%3Aab").as_deref(), Some("sha256:ab"));
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(repo_of_link("tag/a/b:v1"), Some("a/b"));
        assert_eq!(repo_of_link("blob/a@sha256:x"), Some("a"));
        assert_eq!(repo_of_link("mtype/a@sha256:x"), None);
    }
}
