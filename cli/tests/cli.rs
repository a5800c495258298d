//! The `cairn store` commands, driven as a user would.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::path::Path;
use std::process::{Command, Output};

use rand::{RngCore, SeedableRng};

const BIN: &str = env!("CARGO_BIN_EXE_cairn");

fn run(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("store")
        .arg("--data-dir")
        .arg(dir)
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
fn put_get_stat_ls_rm_gc() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("d");
    let mut data = vec![0u8; 3 << 20];
    rand::rngs::StdRng::seed_from_u64(1).fill_bytes(&mut data);
    let file = work.path().join("f.bin");
    std::fs::write(&file, &data).unwrap();

    let o = run(
        &dir,
        &["put", file.to_str().unwrap(), "--name", "demo/x:v1"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let id = out
        .lines()
        .find_map(|l| l.strip_prefix("object  "))
        .unwrap()
        .to_owned();
    assert_eq!(id.len(), 64);
    assert!(out.contains("sha256  "), "{out}");
    assert!(out.contains("chunks  "), "{out}");
    assert!(out.contains("0.0% saved"), "{out}");

    // Second put of the same bytes: everything deduplicated.
    let o = run(&dir, &["put", file.to_str().unwrap()]);
    assert!(stdout(&o).contains("100.0% saved"), "{}", stdout(&o));

    for what in [id.as_str(), "demo/x:v1"] {
        let out_file = work.path().join("out");
        let o = run(&dir, &["get", what, "-o", out_file.to_str().unwrap()]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(std::fs::read(&out_file).unwrap(), data);
    }
    let o = run(&dir, &["stat", "demo/x:v1"]);
    assert!(stdout(&o).contains("complete"), "{}", stdout(&o));
    let o = run(&dir, &["ls"]);
    assert!(stdout(&o).contains("demo/x:v1"));
    let o = run(&dir, &["verify", "demo/x:v1"]);
    assert!(o.status.success() && stdout(&o).contains("ok"));
    let o = run(&dir, &["fsck"]);
    assert!(
        o.status.success() && stdout(&o).contains("clean"),
        "{}",
        stdout(&o)
    );

    // Remove every root; GC then reclaims the bytes.
    let o = run(&dir, &["rm", &id]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(&dir, &["--json", "gc"]);
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["objects_removed"], 1);
    assert!(r["chunks_removed"].as_u64().unwrap() > 0);
    let o = run(&dir, &["get", &id]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("no such object"), "{}", stderr(&o));
}

#[test]
fn errors_are_clear_and_nonzero() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("d");
    let o = run(&dir, &["put", "/nonexistent/file"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("/nonexistent/file"), "{}", stderr(&o));
    let o = run(&dir, &["get", "zzzz"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("no such object: zzzz"),
        "{}",
        stderr(&o)
    );
    let o = run(&dir, &["get", &"ab".repeat(32)]);
    assert_eq!(o.status.code(), Some(1));
    let o = Command::new(BIN)
        .args(["store", "--budget", "12Q", "ls"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2)); // clap usage error
    assert!(stderr(&o).contains("unknown size unit"));
}

#[test]
fn fsck_exit_code_reports_corruption() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("d");
    let mut data = vec![0u8; 1 << 20];
    rand::rngs::StdRng::seed_from_u64(2).fill_bytes(&mut data);
    let file = work.path().join("f");
    std::fs::write(&file, &data).unwrap();
    assert!(run(&dir, &["put", file.to_str().unwrap()]).status.success());
    // Damage the middle of the only segment with data.
    let seg = std::fs::read_dir(dir.join("segments"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let mut b = std::fs::read(&seg).unwrap();
    let mid = b.len() / 2;
    b[mid] ^= 0x55;
    std::fs::write(&seg, b).unwrap();
    let o = run(&dir, &["fsck"]);
    assert_eq!(o.status.code(), Some(2), "{}", stdout(&o));
    assert!(stdout(&o).contains("CORRUPT"), "{}", stdout(&o));
    assert!(
        stdout(&o).contains(seg.file_name().unwrap().to_str().unwrap()),
        "{}",
        stdout(&o)
    );
    // The corrupt chunk now reads as missing, with a clear error.
    let o = run(
        &dir,
        &[
            "get",
            "-o",
            "/dev/null",
            &format!("sha256:{}", {
                use sha2::Digest;
                hex::encode(sha2::Sha256::digest(&data))
            }),
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("missing"), "{}", stderr(&o));
}
