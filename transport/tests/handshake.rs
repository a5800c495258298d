//! Mutual TLS between real quinn endpoints on 127.0.0.1: cluster identities,
//! the deny list, name pinning and refusal counting.
#![cfg(feature = "net")]
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cairn_transport::identity::{ClusterCa, DenyList, Identity, IdentityError, ANY_PEER};
use cairn_transport::tls::{
    self, peer_name, quinn_client_config, quinn_server_config, reason, Refusals, ALPN,
};
use quinn::Endpoint;

const TEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Run a test body with a deadline so a stuck handshake fails instead of hanging.
async fn within<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(TEST_TIMEOUT, f)
        .await
        .expect("test timed out")
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// A cluster in a tempdir with the given nodes (issued partly by a reloaded
/// CA, so both the fresh and the loaded CA are exercised).
fn cluster(names: &[&str]) -> (tempfile::TempDir, Vec<Identity>) {
    let dir = tempfile::tempdir().unwrap();
    let ca = ClusterCa::init(dir.path()).unwrap();
    let reloaded = ClusterCa::load(dir.path()).unwrap();
    let ids = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let issuer = if i % 2 == 0 { &ca } else { &reloaded };
            let node_dir = issuer.add_node(dir.path(), n).unwrap();
            Identity::load(&node_dir).unwrap()
        })
        .collect();
    (dir, ids)
}

/// A node's server endpoint: accepts connections and, on each bi stream,
/// answers "<peer name>:" followed by the bytes it received. Failed incoming
/// handshakes are counted the way the node's accept loop does.
struct Server {
    ep: Endpoint,
    addr: SocketAddr,
    refusals: Refusals,
    deny: Arc<DenyList>,
}

fn server(id: &Identity, deny: &[&str]) -> Server {
    let refusals = Refusals::new();
    let deny = Arc::new(DenyList::new(deny.iter().map(|s| s.to_string())));
    let cfg = quinn_server_config(id, deny.clone(), refusals.clone()).unwrap();
    let ep = Endpoint::server(cfg, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = ep.local_addr().unwrap();
    let (ep2, refusals2) = (ep.clone(), refusals.clone());
    tokio::spawn(async move {
        while let Some(incoming) = ep2.accept().await {
            let refusals = refusals2.clone();
            tokio::spawn(async move {
                match incoming.await {
                    Ok(conn) => echo(conn).await,
                    Err(e) => {
                        refusals.count_handshake_error(&e);
                    }
                }
            });
        }
    });
    Server {
        ep,
        addr,
        refusals,
        deny,
    }
}

async fn echo(conn: quinn::Connection) {
    let who = peer_name(&conn).unwrap_or_else(|| "?".into());
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        let who = who.clone();
        tokio::spawn(async move {
            let Ok(data) = recv.read_to_end(1 << 20).await else {
                return;
            };
            let mut out = format!("{who}:").into_bytes();
            out.extend_from_slice(&data);
            let _ = send.write_all(&out).await;
            let _ = send.finish();
        });
    }
}

fn client_ep() -> Endpoint {
    Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap()
}

async fn close(ep: &Endpoint) {
    ep.close(0u32.into(), b"done");
    ep.wait_idle().await;
}

/// Connect and do one echo round trip. In QUIC the client's handshake can
/// complete before the server has checked the client's certificate, so only a
/// round trip proves the server accepted us. Returns (server name as the
/// client saw it, echoed bytes), or the error text.
async fn round_trip(
    ep: &Endpoint,
    cfg: quinn::ClientConfig,
    addr: SocketAddr,
    server_name: &str,
    payload: &[u8],
) -> Result<(String, Vec<u8>), String> {
    let conn = ep
        .connect_with(cfg, addr, server_name)
        .map_err(|e| format!("connect: {e}"))?
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let result = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| format!("open: {e}"))?;
        send.write_all(payload)
            .await
            .map_err(|e| format!("write: {e}"))?;
        send.finish().map_err(|e| format!("finish: {e}"))?;
        let echoed = recv
            .read_to_end(1 << 20)
            .await
            .map_err(|e| format!("read: {e}"))?;
        Ok((peer_name(&conn).unwrap_or_default(), echoed))
    }
    .await;
    conn.close(0u32.into(), b"bye");
    result
}

/// Wait (bounded) until `f` holds; the server counts some refusals in its
/// accept task, which may run just after the client saw the close.
async fn eventually(what: &str, f: impl Fn() -> bool) {
    for _ in 0..200 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never happened: {what}");
}

fn no_deny() -> Arc<DenyList> {
    Arc::new(DenyList::default())
}

/// A hand-built client config: trusts `ca`, presents `cert` (if any).
fn raw_client(ca: &Identity, cert: Option<&Identity>) -> quinn::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.ca_cert()).unwrap();
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let mut c = match cert {
        Some(id) => b
            .with_client_auth_cert(id.cert_chain(), id.private_key())
            .unwrap(),
        None => b.with_no_client_auth(),
    };
    c.alpn_protocols = vec![ALPN.to_vec()];
    let q = quinn::crypto::rustls::QuicClientConfig::try_from(c).unwrap();
    quinn::ClientConfig::new(Arc::new(q))
}

#[tokio::test]
async fn same_cluster_nodes_connect_by_name_and_any_peer() {
    init_tracing();
    within(async {
        let (_dir, ids) = cluster(&["a", "b"]);
        let (a, b) = (&ids[0], &ids[1]);
        assert_eq!((a.name(), b.name()), ("a", "b"));
        assert_eq!(a.ca_fingerprint(), b.ca_fingerprint());
        let srv = server(b, &[]);
        let ep = client_ep();
        let refusals = Refusals::new();
        for name in ["b", ANY_PEER] {
            let cfg = quinn_client_config(a, no_deny(), refusals.clone()).unwrap();
            let (server_seen, echoed) = round_trip(&ep, cfg, srv.addr, name, b"hello cairn")
                .await
                .unwrap();
            assert_eq!(server_seen, "b", "client's view of the server ({name})");
            assert_eq!(
                echoed, b"a:hello cairn",
                "server's view of the client ({name})"
            );
        }
        assert_eq!(refusals.total(), 0);
        assert_eq!(srv.refusals.total(), 0);
        close(&ep).await;
        close(&srv.ep).await;
    })
    .await;
}

#[tokio::test]
async fn ephemeral_single_node_cluster_talks_to_itself_only() {
    init_tracing();
    within(async {
        let solo = Identity::ephemeral("solo").unwrap();
        let srv = server(&solo, &[]);
        let ep = client_ep();
        let cfg = quinn_client_config(&solo, no_deny(), Refusals::new()).unwrap();
        let (seen, echoed) = round_trip(&ep, cfg, srv.addr, ANY_PEER, b"x")
            .await
            .unwrap();
        assert_eq!((seen.as_str(), echoed.as_slice()), ("solo", &b"solo:x"[..]));
        // Another ephemeral node (another throw-away CA) is a stranger.
        let other = Identity::ephemeral("solo").unwrap();
        let r = Refusals::new();
        let cfg = quinn_client_config(&other, no_deny(), r.clone()).unwrap();
        assert!(round_trip(&ep, cfg, srv.addr, ANY_PEER, b"x")
            .await
            .is_err());
        assert_eq!(r.get(reason::UNKNOWN_CA), 1);
        close(&ep).await;
        close(&srv.ep).await;
    })
    .await;
}

#[tokio::test]
async fn client_from_another_cluster_is_refused() {
    init_tracing();
    within(async {
        let (_dir, ids) = cluster(&["b"]);
        let (_dir2, strangers) = cluster(&["a"]);
        let (b, stranger) = (&ids[0], &strangers[0]);
        let srv = server(b, &[]);
        let ep = client_ep();

        // A stranger that trusts our CA (so it gets as far as presenting its
        // certificate) is refused by the server: unknown_ca.
        let cfg = raw_client(b, Some(stranger));
        let err = round_trip(&ep, cfg, srv.addr, "b", b"x").await.unwrap_err();
        eprintln!("stranger with our CA: {err}");
        eventually("server counts unknown_ca", || {
            srv.refusals.get(reason::UNKNOWN_CA) >= 1
        })
        .await;

        // A stranger using its own cluster config refuses our server first.
        let r = Refusals::new();
        let cfg = quinn_client_config(stranger, no_deny(), r.clone()).unwrap();
        let err = round_trip(&ep, cfg, srv.addr, ANY_PEER, b"x")
            .await
            .unwrap_err();
        eprintln!("stranger with its own CA: {err}");
        assert_eq!(r.get(reason::UNKNOWN_CA), 1);

        // Counted once each: the verifier counted, the accept loop did not.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(srv.refusals.get(reason::UNKNOWN_CA), 1);
        assert_eq!(srv.refusals.total(), 1);
        close(&ep).await;
        close(&srv.ep).await;
    })
    .await;
}

#[tokio::test]
async fn client_without_certificate_is_refused() {
    init_tracing();
    within(async {
        let (_dir, ids) = cluster(&["b"]);
        let srv = server(&ids[0], &[]);
        let ep = client_ep();
        let cfg = raw_client(&ids[0], None);
        let err = round_trip(&ep, cfg, srv.addr, "b", b"x").await.unwrap_err();
        eprintln!("no certificate: {err}");
        eventually("server counts no_certificate", || {
            srv.refusals.get(reason::NO_CERTIFICATE) == 1
        })
        .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(srv.refusals.total(), 1);
        close(&ep).await;
        close(&srv.ep).await;
    })
    .await;
}

#[tokio::test]
async fn deny_lists_refuse_in_both_directions() {
    init_tracing();
    within(async {
        let (_dir, ids) = cluster(&["a", "b", "c"]);
        let (a, b, c) = (&ids[0], &ids[1], &ids[2]);
        let srv = server(b, &["c"]);
        let ep = client_ep();

        // c is denied by b from the start.
        let cfg = quinn_client_config(c, no_deny(), Refusals::new()).unwrap();
        let err = round_trip(&ep, cfg, srv.addr, "b", b"x").await.unwrap_err();
        eprintln!("denied client: {err}");
        assert_eq!(srv.refusals.get(reason::DENIED), 1);

        // a gets in, then is denied at runtime, then allowed again.
        let cfg = || quinn_client_config(a, no_deny(), Refusals::new()).unwrap();
        round_trip(&ep, cfg(), srv.addr, "b", b"x").await.unwrap();
        srv.deny.insert("a");
        assert!(round_trip(&ep, cfg(), srv.addr, "b", b"x").await.is_err());
        assert_eq!(srv.refusals.get(reason::DENIED), 2);
        srv.deny.remove("a");
        round_trip(&ep, cfg(), srv.addr, "b", b"x").await.unwrap();

        // The client side refuses a denied server, by pinned name or not.
        let client_refusals = Refusals::new();
        let client_deny = Arc::new(DenyList::new(["b".to_string()]));
        for name in ["b", ANY_PEER] {
            let cfg = quinn_client_config(a, client_deny.clone(), client_refusals.clone()).unwrap();
            let err = round_trip(&ep, cfg, srv.addr, name, b"x")
                .await
                .unwrap_err();
            eprintln!("denied server ({name}): {err}");
        }
        assert_eq!(client_refusals.get(reason::DENIED), 2);
        assert_eq!(client_refusals.total(), 2);

        // The server was refused, it did not refuse: nothing more counted.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(srv.refusals.total(), 2);
        close(&ep).await;
        close(&srv.ep).await;
    })
    .await;
}

#[tokio::test]
async fn pinned_name_must_match_the_server() {
    init_tracing();
    within(async {
        let (_dir, ids) = cluster(&["a", "b", "c"]);
        let srv = server(&ids[1], &[]);
        let ep = client_ep();
        let r = Refusals::new();
        let cfg = quinn_client_config(&ids[0], no_deny(), r.clone()).unwrap();
        let err = round_trip(&ep, cfg, srv.addr, "c", b"x").await.unwrap_err();
        eprintln!("pinned c, reached b: {err}");
        assert!(err.starts_with("handshake"), "{err}");
        assert_eq!(r.get(reason::BAD_CERTIFICATE), 1);
        close(&ep).await;
        close(&srv.ep).await;
    })
    .await;
}

#[tokio::test]
async fn handshake_error_classification_on_real_failures() {
    init_tracing();
    within(async {
        let (_dir, ids) = cluster(&["a", "b"]);
        let srv = server(&ids[1], &["a"]);
        let ep = client_ep();
        // The client sees the server's refusal as the peer's close: the
        // reason is readable for logs, but it is not the client's to count.
        let cfg = quinn_client_config(&ids[0], no_deny(), Refusals::new()).unwrap();
        let conn = ep.connect_with(cfg, srv.addr, "b").unwrap().await;
        let e = match conn {
            Err(e) => e,
            Ok(conn) => conn.closed().await,
        };
        assert_eq!(tls::classify_handshake_error(&e), reason::DENIED, "{e}");
        assert_eq!(tls::refusal_reason(&e), None);
        close(&ep).await;
        close(&srv.ep).await;
    })
    .await;
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn identity_files_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cluster");
    let ca = ClusterCa::init(&dir).unwrap();
    assert_eq!(mode(&dir.join("ca.key")), 0o600);
    assert!(dir.join("ca.pem").is_file());

    // init refuses an existing CA and leaves it alone.
    let before = std::fs::read(dir.join("ca.pem")).unwrap();
    let e = ClusterCa::init(&dir).unwrap_err();
    assert!(matches!(e, IdentityError::AlreadyExists { .. }), "{e}");
    assert!(e.to_string().contains("ca.pem"), "{e}");
    assert_eq!(std::fs::read(dir.join("ca.pem")).unwrap(), before);

    let node_dir = ca.add_node(&dir, "edge-1").unwrap();
    assert_eq!(node_dir, dir.join("edge-1"));
    assert_eq!(mode(&node_dir.join("node.key")), 0o600);
    assert_eq!(std::fs::read(node_dir.join("ca.pem")).unwrap(), before);
    let id = Identity::load(&node_dir).unwrap();
    assert_eq!(id.name(), "edge-1");
    assert_eq!(id.ca_fingerprint(), ca.fingerprint());
    assert!(!format!("{id:?}").contains("PRIVATE"));

    // A reloaded CA issues nodes that the same ca.pem accepts.
    let ca2 = ClusterCa::load(&dir).unwrap();
    assert_eq!(ca2.fingerprint(), ca.fingerprint());
    let id2 = Identity::load(&ca2.add_node(&dir, "edge-2").unwrap()).unwrap();
    assert_eq!(id2.ca_fingerprint(), id.ca_fingerprint());

    // Duplicates and invalid names are refused.
    let e = ca.add_node(&dir, "edge-1").unwrap_err();
    assert!(matches!(e, IdentityError::AlreadyExists { .. }), "{e}");
    assert!(e.to_string().contains("node."), "{e}");
    let long = "x".repeat(64);
    for bad in ["Bad_Name", "", long.as_str(), "-a", "a-", "a.b", "../x"] {
        let e = ca.add_node(&dir, bad).unwrap_err();
        assert!(matches!(e, IdentityError::InvalidName { .. }), "{bad}: {e}");
    }
    assert!(!dir.join("Bad_Name").exists());

    // Broken files are reported by path.
    let broken = tmp.path().join("broken");
    std::fs::create_dir(&broken).unwrap();
    for f in ["node.key", "ca.pem"] {
        std::fs::copy(node_dir.join(f), broken.join(f)).unwrap();
    }
    let e = Identity::load(&broken).unwrap_err().to_string();
    assert!(e.contains("node.pem") && e.contains("cannot read"), "{e}");
    std::fs::write(
        broken.join("node.pem"),
        b"-----BEGIN CERTIFICATE-----\nnot base64!\n",
    )
    .unwrap();
    let e = Identity::load(&broken).unwrap_err().to_string();
    assert!(
        e.contains(&broken.join("node.pem").display().to_string()),
        "{e}"
    );
    std::fs::write(broken.join("node.pem"), b"no pem here").unwrap();
    let e = Identity::load(&broken).unwrap_err().to_string();
    assert!(e.contains("node.pem"), "{e}");
    // A certificate that is valid PEM but not DER.
    std::fs::write(
        broken.join("node.pem"),
        b"-----BEGIN CERTIFICATE-----\nAAECAw==\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let e = Identity::load(&broken).unwrap_err().to_string();
    assert!(e.contains("node.pem"), "{e}");

    // Mismatched pieces: another node's key, another cluster's CA.
    std::fs::copy(node_dir.join("node.pem"), broken.join("node.pem")).unwrap();
    std::fs::copy(dir.join("edge-2/node.key"), broken.join("node.key")).unwrap();
    let e = Identity::load(&broken).unwrap_err().to_string();
    assert!(e.contains("node.key"), "{e}");
    std::fs::copy(node_dir.join("node.key"), broken.join("node.key")).unwrap();
    Identity::load(&broken).unwrap();
    let other = tempfile::tempdir().unwrap();
    ClusterCa::init(other.path()).unwrap();
    std::fs::copy(other.path().join("ca.pem"), broken.join("ca.pem")).unwrap();
    let e = Identity::load(&broken).unwrap_err().to_string();
    assert!(e.contains("node.pem") && e.contains("ca.pem"), "{e}");

    // ClusterCa::load names its files too.
    let e = ClusterCa::load(other.path().join("nope").as_path())
        .unwrap_err()
        .to_string();
    assert!(e.contains("ca.pem"), "{e}");
    std::fs::copy(dir.join("ca.key"), other.path().join("ca.key")).unwrap();
    let e = ClusterCa::load(other.path()).unwrap_err().to_string();
    assert!(e.contains("ca.key"), "{e}");
}
