//! A small run of the whole scenario: 300 sites, 30 partitioned.

use cairn_meta_sim::{run, Config};

#[test]
fn small_scenario_converges_with_one_winner() {
    let report = run(&Config {
        sites: 300,
        partitioned: 30,
        seed: 7,
        peers: 3,
        probe_rounds: 300,
        tags: 20,
        max_rounds: 30,
        update_fraction: 0.2,
        progress: false,
    })
    .unwrap();
    let heal = report.heal_rounds().expect("converged after healing");
    assert!(heal <= 10, "healing took {heal} rounds");
    assert!(
        report.tags_ok(),
        "{} sites with the expected winners",
        report.tag_sites_ok
    );
    assert_eq!(report.tags_checked, 20);
    assert!(
        report.vivaldi_median < 0.25,
        "median coordinate error {}",
        report.vivaldi_median
    );
    assert!(report.vivaldi_p90 < 1.0, "p90 {}", report.vivaldi_p90);
    assert!(report.bytes_per_site() < 4096.0);
    // Every phase with writes transferred something and converged.
    for p in &report.phases {
        assert!(p.rounds.is_some(), "{} did not converge", p.name);
    }
    let md = report.markdown("test");
    assert!(md.contains("| PASS | convergence after healing"));
}
