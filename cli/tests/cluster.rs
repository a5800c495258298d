//! The `cairn cluster` commands, driven as a user would.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_cairn");

fn cluster(args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("cluster")
        .args(args)
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn init_add_node_and_refusals() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("cluster");
    let d = dir.to_str().unwrap();

    let o = cluster(&["init", d]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains(&dir.join("ca.pem").display().to_string()),
        "{out}"
    );
    let fp = out
        .lines()
        .find_map(|l| l.strip_prefix("fingerprint"))
        .unwrap()
        .trim()
        .to_owned();
    assert_eq!(fp.len(), 64, "{out}");
    assert!(dir.join("ca.key").is_file());

    // A second init refuses and says why.
    let o = cluster(&["init", d]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains("already exists") && err.contains("ca.pem"),
        "{err}"
    );

    let o = cluster(&["add-node", d, "edge-1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let node_dir = dir.join("edge-1");
    for f in ["node.pem", "node.key", "ca.pem"] {
        assert!(node_dir.join(f).is_file(), "{f}");
    }
    assert!(
        out.contains(&format!("cairn node --identity {}", node_dir.display())),
        "{out}"
    );
    assert!(
        out.contains(&fp),
        "node output names the CA fingerprint: {out}"
    );

    // Duplicate node: non-zero exit, clear message, nothing overwritten.
    let before = std::fs::read(node_dir.join("node.pem")).unwrap();
    let o = cluster(&["add-node", d, "edge-1"]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains("edge-1") && err.contains("already exists"),
        "{err}"
    );
    assert_eq!(std::fs::read(node_dir.join("node.pem")).unwrap(), before);

    // Invalid name.
    let o = cluster(&["add-node", d, "Bad_Name"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("invalid node name"), "{}", stderr(&o));

    // No CA there.
    let empty = work.path().join("empty");
    let o = cluster(&["add-node", empty.to_str().unwrap(), "x"]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.contains("ca.pem"), "{err}");
}
