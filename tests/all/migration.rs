//! Migration is invisible to the agent: the result with a move at every safe point (or at
//! random ones) equals the result without any migration.

use agent_e2e::{example, launch, run, runner};
use agent_runtime::Limits;
use agent_runtime::runner::{HOME_SITE, Migration};
use proptest::prelude::*;

fn result(report: &agent_runtime::runner::RunReport) -> serde_json::Value {
    match &report.outcome {
        Ok(v) => v.clone(),
        Err(e) => panic!("agent failed: {e}"),
    }
}

#[test]
fn search_finds_hits_on_all_three_sites() {
    let r = runner(Limits::default());
    let report = run(
        &r,
        &example("search"),
        launch(&["siteA", "siteB", "siteC"], &[("query", "migration")]),
        Migration::OnlyHops,
    );
    let value = result(&report);
    let sites: std::collections::BTreeSet<&str> = value["hits"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|h| h["site"].as_str())
        .collect();
    assert_eq!(
        sites.into_iter().collect::<Vec<_>>(),
        ["siteA", "siteB", "siteC"]
    );
    assert_eq!(
        value["visited"],
        serde_json::json!(["siteA", "siteB", "siteC"]),
        "ctx.site() names the host it runs on"
    );
    let path: Vec<(&str, &str)> = report
        .moves
        .iter()
        .map(|m| (m.from.as_str(), m.to.as_str()))
        .collect();
    assert_eq!(
        path,
        [(HOME_SITE, "siteA"), ("siteA", "siteB"), ("siteB", "siteC")]
    );
    assert_eq!(
        report.moves.iter().map(|m| m.seq).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert_eq!(report.site, "siteC");
    // Each hit really is a line of that site's documents.
    for hit in value["hits"].as_array().into_iter().flatten() {
        let path = agent_e2e::repo()
            .join("examples/search/sites")
            .join(hit["site"].as_str().unwrap_or(""))
            .join(hit["doc"].as_str().unwrap_or(""));
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let line = text
            .lines()
            .nth(hit["line"].as_u64().unwrap_or(0) as usize - 1)
            .unwrap_or("");
        assert_eq!(line.trim(), hit["text"].as_str().unwrap_or("-"));
        assert!(line.to_lowercase().contains("migration"));
    }
}

#[test]
fn a_hop_to_an_unknown_site_is_an_error_the_agent_can_skip() {
    let r = runner(Limits::default());
    let report = run(
        &r,
        &example("search"),
        launch(&["siteA", "atlantis", "siteC"], &[("query", "host")]),
        Migration::OnlyHops,
    );
    let value = result(&report);
    assert_eq!(value["visited"], serde_json::json!(["siteA", "siteC"]));
    assert_eq!(
        value["skipped"],
        serde_json::json!(["atlantis: unknown site `atlantis`"])
    );
}

#[test]
fn examples_give_the_same_result_with_a_move_at_every_safe_point() {
    let r = runner(Limits::default());
    type Case<'a> = (&'a str, &'a [&'a str], &'a [(&'a str, &'a str)]);
    let cases: [Case; 5] = [
        ("search", &["siteA", "siteB", "siteC"], &[("query", "the")]),
        ("heap", &[], &[("steps", "6"), ("chunk_kib", "300")]),
        (
            "heap",
            &["siteA", "siteB"],
            &[("steps", "5"), ("chunk_kib", "64")],
        ),
        ("statics", &[], &[("rounds", "7")]),
        ("spin", &[], &[("n", "20000"), ("every", "500")]),
    ];
    for (name, itinerary, args) in cases {
        let wasm = example(name);
        let still = run(&r, &wasm, launch(itinerary, args), Migration::OnlyHops);
        let moved = run(
            &r,
            &wasm,
            launch(itinerary, args),
            Migration::EverySafePoint,
        );
        assert!(
            moved.safe_points >= 3,
            "{name}: only {} safe points",
            moved.safe_points
        );
        assert_eq!(
            moved.moves.len() as u64,
            moved.safe_points,
            "{name}: the agent moved at every safe point"
        );
        assert_eq!(
            result(&moved),
            result(&still),
            "{name} {args:?}: migration changed the result"
        );
    }
}

#[test]
fn heap_and_statics_survive_and_report_intact() {
    let r = runner(Limits::default());
    let heap = result(&run(
        &r,
        &example("heap"),
        launch(&["siteA", "siteB", "siteC"], &[("steps", "9")]),
        Migration::EverySafePoint,
    ));
    assert_eq!(heap["intact"], true);
    assert_eq!(
        heap["sites"],
        serde_json::json!([
            HOME_SITE, "siteA", "siteB", "siteC", "siteA", "siteB", "siteC", "siteA", "siteB",
            "siteC"
        ])
    );
    let statics = result(&run(
        &r,
        &example("statics"),
        launch(&["siteA", "siteB"], &[("rounds", "4")]),
        Migration::OnlyHops,
    ));
    assert_eq!(
        statics["born_on"], HOME_SITE,
        "a OnceLock initialised before the first hop keeps its value"
    );
    assert_eq!(
        statics["names"],
        serde_json::json!([
            "round-0@home",
            "round-1@siteA",
            "round-2@siteB",
            "round-3@siteA"
        ])
    );
    assert_eq!(
        statics["closures"],
        serde_json::json!([3000, 1000 ^ (1 << 8), 3002, 1000 ^ (3 << 8)])
    );
}

#[test]
fn a_mostly_zero_64_mib_heap_makes_a_small_image() {
    let r = runner(Limits::default());
    let report = run(
        &r,
        &example("heap"),
        launch(
            &["siteA"],
            &[("steps", "1"), ("chunk_kib", "4"), ("zero_mib", "64")],
        ),
        Migration::OnlyHops,
    );
    let value = result(&report);
    assert_eq!(value["zero_buffer_sum"], (0..64u64).sum::<u64>());
    let hop = &report.moves[0];
    assert!(
        hop.memory_bytes >= 64 << 20,
        "memory is {} bytes",
        hop.memory_bytes
    );
    assert!(
        hop.image_bytes < 512 << 10,
        "image of {} bytes for {} bytes of memory",
        hop.image_bytes,
        hop.memory_bytes
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, .. ProptestConfig::default() })]

    /// Moves at random safe points, many times over, while the heap grows.
    #[test]
    fn random_migrations_never_change_the_result(
        choices in proptest::collection::vec(any::<bool>(), 1..40),
        agent in prop_oneof![Just("heap"), Just("statics"), Just("spin"), Just("search")],
    ) {
        let (itinerary, args): (&[&str], &[(&str, &str)]) = match agent {
            "heap" => (&["siteA", "siteB"], &[("steps", "12"), ("chunk_kib", "40")]),
            "statics" => (&[], &[("rounds", "10")]),
            "spin" => (&[], &[("n", "8000"), ("every", "300")]),
            _ => (&["siteC", "siteB", "siteA"], &[("query", "a")]),
        };
        let r = runner(Limits::default());
        let wasm = example(agent);
        let still = run(&r, &wasm, launch(itinerary, args), Migration::OnlyHops);
        let pick = choices.clone();
        let chosen = Migration::Chosen(Box::new(move |n| pick[(n as usize) % pick.len()]));
        let moved = run(&r, &wasm, launch(itinerary, args), chosen);
        prop_assert_eq!(result(&moved), result(&still));
    }
}
