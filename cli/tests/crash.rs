//! Crash safety: `cairn store put` (and `gc`) killed with SIGKILL at random
//! points until 25 kills have landed mid-flight. After each kill the store reopens, `fsck` is clean, and
//! every object whose id was printed (acknowledged) reads back identical.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use rand::{Rng, RngCore, SeedableRng};
use sha2::Digest;

const BIN: &str = env!("CARGO_BIN_EXE_cairn");

fn cairn(dir: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.arg("store").arg("--data-dir").arg(dir);
    c
}

#[test]
fn sigkill_at_random_points_loses_nothing_acknowledged() {
    let work = tempfile::tempdir().unwrap();
    let data_dir = work.path().join("data");
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xC0FFEE);
    // Inputs share a common prefix so later puts dedup against earlier ones.
    let mut common = vec![0u8; 2 << 20];
    rng.fill_bytes(&mut common);
    let mut inputs = Vec::new();
    for i in 0..8 {
        let mut d = common[..rng.gen_range(0..common.len())].to_vec();
        let mut tail = vec![0u8; rng.gen_range(1..12 << 20)];
        rng.fill_bytes(&mut tail);
        d.extend_from_slice(&tail);
        let p = work.path().join(format!("in{i}"));
        std::fs::write(&p, &d).unwrap();
        inputs.push((p, hex::encode(sha2::Sha256::digest(&d))));
    }

    let mut acked: Vec<(String, String)> = Vec::new(); // (object id, sha256)
    let mut kills = 0;
    let mut round = 0;
    while kills < 25 && round < 80 {
        round += 1;
        let gc_round = round % 6 == 5;
        let mut cmd = cairn(&data_dir);
        let which = rng.gen_range(0..inputs.len());
        if gc_round {
            cmd.arg("gc");
        } else {
            cmd.arg("--json").arg("put").arg(&inputs[which].0);
            if rng.gen_bool(0.5) {
                cmd.arg("--no-pin").arg("--name").arg(format!("n{round}"));
            }
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..250)));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            kills += 1;
        }
        let out = child.wait_with_output().unwrap();
        if !gc_round {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
                let id = v["object"].as_str().unwrap().to_owned();
                let sha = v["sha256"].as_str().unwrap().to_owned();
                assert_eq!(sha, inputs[which].1, "put reported a wrong sha256");
                acked.push((id, sha));
            }
        }

        // Reopen: fsck must be clean and every acknowledged object intact.
        let fsck = cairn(&data_dir).args(["--json", "fsck"]).output().unwrap();
        assert!(
            fsck.status.success(),
            "round {round}: fsck failed after kill:\n{}\n{}",
            String::from_utf8_lossy(&fsck.stdout),
            String::from_utf8_lossy(&fsck.stderr)
        );
        for (id, sha) in &acked {
            let v = cairn(&data_dir)
                .args(["--json", "verify", id])
                .output()
                .unwrap();
            assert!(
                v.status.success(),
                "round {round}: object {id} damaged: {}",
                String::from_utf8_lossy(&v.stderr)
            );
            let r: serde_json::Value = serde_json::from_slice(&v.stdout).unwrap();
            assert_eq!(r["sha256_ok"], true);
            let stat = cairn(&data_dir)
                .args(["--json", "stat", id])
                .output()
                .unwrap();
            let s: serde_json::Value = serde_json::from_slice(&stat.stdout).unwrap();
            assert_eq!(s["info"]["sha256"].as_str(), Some(sha.as_str()));
        }
    }
    assert!(
        kills >= 25,
        "only {kills} of {round} rounds were killed mid-flight"
    );
    assert!(
        !acked.is_empty(),
        "no put ever completed; the delays are too short"
    );

    // Finally the bytes themselves, through `get`.
    for (id, sha) in &acked {
        let out = cairn(&data_dir).args(["get", id]).output().unwrap();
        assert!(out.status.success());
        assert_eq!(&hex::encode(sha2::Sha256::digest(&out.stdout)), sha);
    }
}
