//! `cairn site ls|show` against a stand-in for the node's API (a tiny HTTP
//! server with canned answers), and against nothing at all.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_cairn");

const LIST: &str = r#"{"site":"core","sites":[
 {"name":"edge1","state":"up",
  "labels":{"region":"eu","zone":"a","kind":"edge","extra":{"rack":"r7"}},
  "geo":{"lat":48.1,"lon":11.5},"parent":"core",
  "capacity":{"disk_total":107374182400,"disk_free":53687091200,"cache_budget":0,"cpu_millis":0,"mem_bytes":0},
  "heartbeat":{"counter":12,"wall_ms":1796230000000},
  "last_heard_ms_ago":1200,"rtt_ms":0.4,"rtt_est_ms":0.5,"objects":3,"complete":2},
 {"name":"core","state":"self",
  "labels":{"region":"eu","zone":"","kind":"core","extra":{}},
  "geo":null,"parent":null,
  "capacity":{"disk_total":0,"disk_free":0,"cache_budget":0,"cpu_millis":0,"mem_bytes":0},
  "heartbeat":{"counter":40,"wall_ms":1796230001000},
  "last_heard_ms_ago":null,"rtt_ms":null,"rtt_est_ms":null,"objects":10,"complete":10}]}"#;

/// Serve `n` requests: the request line goes to `route`, which gives
/// (status line, body).
fn serve(n: usize, route: fn(&str) -> (&'static str, String)) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("http://{}", l.local_addr().unwrap());
    std::thread::spawn(move || {
        for _ in 0..n {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = Vec::new();
            let mut b = [0u8; 4096];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                let k = s.read(&mut b).unwrap();
                if k == 0 {
                    break;
                }
                buf.extend_from_slice(&b[..k]);
            }
            let req = String::from_utf8_lossy(&buf).into_owned();
            let line = req.lines().next().unwrap_or("").to_owned();
            let (status, body) = route(&line);
            let resp = format!(
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            s.write_all(resp.as_bytes()).unwrap();
        }
    });
    addr
}

fn cairn(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("CAIRN_API")
        .output()
        .unwrap()
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn route(line: &str) -> (&'static str, String) {
    if line.starts_with("GET /api/v1/sites ") {
        ("200 OK", LIST.to_owned())
    } else if line.starts_with("GET /api/v1/sites/edge1 ") {
        let v: serde_json::Value = serde_json::from_str(LIST).unwrap();
        ("200 OK", v["sites"][0].to_string())
    } else if line.starts_with("GET /api/v1/sites/") {
        (
            "404 Not Found",
            r#"{"error":"no site named \"nope\" is known here"}"#.to_owned(),
        )
    } else {
        ("404 Not Found", String::new())
    }
}

#[test]
fn site_ls_show_json_and_errors() {
    let api = serve(5, route);

    let o = cairn(&["site", "ls", "--api", &api]);
    assert!(o.status.success(), "{}", err(&o));
    let t = out(&o);
    let lines: Vec<&str> = t.lines().collect();
    assert!(
        lines[0].starts_with("  SITE   STATE  REGION  KIND  PARENT"),
        "{t}"
    );
    assert!(lines[1].starts_with("* core   self"), "{t}");
    assert!(lines[2].starts_with("  edge1  up"), "{t}");
    assert!(lines[2].contains("0.4 ms"), "{t}");
    assert!(lines[2].contains("50.0 GiB/100.0 GiB"), "{t}");
    assert!(lines[2].ends_with("2/3    1.2s ago"), "{t}");

    let o = cairn(&["site", "ls", "--json", "--api", &api]);
    assert!(o.status.success(), "{}", err(&o));
    let v: serde_json::Value = serde_json::from_str(&out(&o)).unwrap();
    assert_eq!(v, serde_json::from_str::<serde_json::Value>(LIST).unwrap());

    let o = cairn(&["site", "show", "edge1", "--api", &api]);
    assert!(o.status.success(), "{}", err(&o));
    let t = out(&o);
    assert!(t.contains("name:         edge1\n"), "{t}");
    assert!(t.contains("label rack:   r7\n"), "{t}");
    assert!(t.contains("geo:          48.1000, 11.5000\n"), "{t}");

    let o = cairn(&["site", "show", "nope", "--api", &api]);
    assert!(!o.status.success());
    assert!(
        err(&o).contains(r#"no site named "nope" is known here"#),
        "{}",
        err(&o)
    );

    // Not the sites API at all: 404 without JSON.
    let o = cairn(&["site", "ls", "--api", &format!("{api}/elsewhere")]);
    assert!(!o.status.success());
    assert!(
        err(&o).contains("has no /elsewhere/api/v1/sites"),
        "{}",
        err(&o)
    );
}

#[test]
fn site_unreachable_node() {
    // A port nobody listens on: bind, note the port, close.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let api = format!("http://127.0.0.1:{port}");
    let o = cairn(&["site", "ls", "--api", &api]);
    assert!(!o.status.success());
    let e = err(&o);
    assert!(
        e.contains(&format!("cannot reach the node's API at {api}")),
        "{e}"
    );
    assert!(e.contains("--api-listen"), "{e}");
}
