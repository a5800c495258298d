//! The registry over TLS (`registry.tls_cert` / `registry.tls_key`): a
//! client that trusts the certificate pushes and pulls over HTTPS, skopeo
//! inspects through it with a cert dir, and plain HTTP to the port fails.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use cairn_node::{Node, NodeConfig};

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_serves_https_with_the_given_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let cert_pem = ck.cert.pem();
    let (cert, key) = (dir.path().join("reg.crt"), dir.path().join("reg.key"));
    std::fs::write(&cert, &cert_pem).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();

    let mut cfg = NodeConfig::new(dir.path().join("data"));
    cfg.endpoint.listen = "127.0.0.1:0".parse().unwrap();
    cfg.api_listen = None;
    cfg.nbd_listen = None;
    cfg.registry_listen = Some("127.0.0.1:0".parse().unwrap());
    cfg.registry.push_open = Some(true);
    cfg.registry.tls_cert = Some(cert.clone());
    cfg.registry.tls_key = Some(key.clone());
    let node = Node::start(cfg).await.unwrap();
    let port = node.registry_addr().unwrap().port();

    let https = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(cert_pem.as_bytes()).unwrap())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let base = format!("https://127.0.0.1:{port}");
    let r = https.get(format!("{base}/v2/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let img = image(vec![random(300 << 10, 7)]);
    for b in &img.blobs {
        let r = https
            .post(format!(
                "{base}/v2/tls/app/blobs/uploads/?digest={}",
                sha(b)
            ))
            .body(b.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }
    let r = https
        .put(format!("{base}/v2/tls/app/manifests/v1"))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(img.manifest.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let got = https
        .get(format!("{base}/v2/tls/app/blobs/{}", sha(&img.blobs[1])))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(got.as_ref() == img.blobs[1].as_slice());

    // A client that does not trust the certificate is refused by its own
    // TLS stack; plain HTTP gets no HTTP answer.
    let untrusting = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    assert!(untrusting.get(format!("{base}/v2/")).send().await.is_err());
    let plain = untrusting
        .get(format!("http://127.0.0.1:{port}/v2/"))
        .send()
        .await;
    assert!(plain.is_err() || plain.unwrap().status() != 200);
    // The server is still up after both.
    assert_eq!(
        https
            .get(format!("{base}/v2/"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    // skopeo, trusting the certificate through a cert dir.
    if have_skopeo() {
        let certs = dir.path().join("certs");
        std::fs::create_dir_all(&certs).unwrap();
        std::fs::write(certs.join("ca.crt"), &cert_pem).unwrap();
        let out = tokio::process::Command::new("skopeo")
            .args(["inspect", "--raw", "--cert-dir"])
            .arg(&certs)
            .arg(format!("docker://127.0.0.1:{port}/tls/app:v1"))
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "skopeo: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.stdout, img.manifest);
    } else if std::env::var_os("CAIRN_REQUIRE_CLIENTS").is_some() {
        panic!("skopeo is required (CAIRN_REQUIRE_CLIENTS is set)");
    } else {
        eprintln!("skipping the skopeo part: skopeo is not installed");
    }
    node.shutdown().await;
}

#[tokio::test]
async fn unusable_tls_files_are_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.pem");
    std::fs::write(&bad, "not a certificate").unwrap();
    let mut cfg = NodeConfig::new(dir.path().join("data"));
    cfg.endpoint.listen = "127.0.0.1:0".parse().unwrap();
    cfg.api_listen = None;
    cfg.nbd_listen = None;
    cfg.registry_listen = Some("127.0.0.1:0".parse().unwrap());
    cfg.registry.push_open = Some(true);
    cfg.registry.tls_cert = Some(bad.clone());
    cfg.registry.tls_key = Some(bad);
    let e = Node::start(cfg).await.unwrap_err().to_string();
    assert!(e.contains("bad.pem") && e.contains("certificate"), "{e}");
}
