//! Return visits between real hosts: an agent coming back to a host it left sends only the
//! pages that host does not hold, and ends exactly as if it had never moved.

use agent_e2e::{Cluster, example_path, json};

/// `agent launch --json` of the bench agent with `dirty` KiB of incompressible heap, 64 KiB
/// of it rewritten before each of four hops through `hops`; the parsed output.
fn launch(cluster: &Cluster, hops: &str, dirty: &str) -> serde_json::Value {
    let wasm = example_path("bench");
    let dirty = format!("dirty_kib={dirty}");
    let args = [
        "launch",
        &wasm,
        "--hop",
        hops,
        "--arg",
        &dirty,
        "--arg",
        "rewrite_kib=64",
        "--arg",
        "hops=4",
        "--json",
    ];
    let out = cluster.agent(&args, "siteA", "alice");
    assert!(
        out.status.success(),
        "{}\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        cluster.log("siteB")
    );
    json(&out)
}

fn field(hop: &serde_json::Value, key: &str) -> u64 {
    hop[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no {key} in {hop}"))
}

#[test]
fn a_returning_agent_sends_only_the_pages_it_changed_and_ends_as_if_it_never_moved() {
    // siteB keeps no pages of agents that left it; siteA keeps them (the default).
    let cluster = Cluster::start(
        &["siteA", "siteB"],
        &[("siteA", &[]), ("siteB", &["--return-cache-mib", "0"])],
    );
    let moved = launch(&cluster, "siteB,siteA", "1024");
    let hops = moved["hops"].as_array().cloned().unwrap_or_default();
    assert_eq!(hops.len(), 4, "{moved}");
    let image = |i: usize| field(&hops[i], "image_bytes");
    let reused = |i: usize| field(&hops[i], "pages_reused");
    // Hop 1: 1 MiB of incompressible pages leave siteA for siteB, which never saw them.
    assert!(image(0) > 1 << 20, "{moved}");
    assert_eq!(reused(0), 0, "{moved}");
    // Hop 3 returns to siteB, which kept nothing: the whole image again.
    assert!(image(2) > 1 << 20, "{moved}");
    assert_eq!(reused(2), 0, "{moved}");
    assert_eq!(field(&hops[2], "base_list_bytes"), 0, "{moved}");
    // Hops 2 and 4 return to siteA, which kept the pages the agent left with: only the
    // 64 KiB rewritten since (and the few pages of stack and allocator state) travel.
    for back_home in [1, 3] {
        assert!(reused(back_home) >= 240, "{moved}");
        assert!(image(back_home) < 128 << 10, "{moved}");
        let list = field(&hops[back_home], "base_list_bytes");
        assert!(list > 0 && list < 4 << 10, "{moved}");
    }

    // The same agent kept on its home host (a hop to the host itself does not migrate).
    let stayed = launch(&cluster, "siteA", "1024");
    assert_eq!(stayed["hops"].as_array().map(Vec::len), Some(0), "{stayed}");
    assert_eq!(moved["result"], stayed["result"]);
    assert_eq!(moved["result"]["hops"], 4);
}

#[test]
fn a_small_agent_travels_whole_without_a_page_list() {
    let cluster = Cluster::start(&["siteA", "siteB"], &[("siteA", &[]), ("siteB", &[])]);
    let moved = launch(&cluster, "siteB,siteA", "0");
    let hops = moved["hops"].as_array().cloned().unwrap_or_default();
    assert_eq!(hops.len(), 4, "{moved}");
    for hop in &hops {
        // Under 64 KiB a list and the hashing behind it would cost more than they save.
        assert!(field(hop, "image_bytes") < 64 << 10, "{moved}");
        assert_eq!(field(hop, "base_list_bytes"), 0, "{moved}");
        assert_eq!(field(hop, "pages_reused"), 0, "{moved}");
    }
}

#[test]
fn a_large_agent_restored_into_an_instance_made_ready_in_flight_ends_as_if_it_never_moved() {
    // 12 MiB: large enough that each destination makes its instance ready as the image
    // arrives; no host keeps pages, so every hop carries the whole image.
    let none: &[&str] = &["--return-cache-mib", "0"];
    let cluster = Cluster::start(
        &["siteA", "siteB", "siteC"],
        &[("siteA", none), ("siteB", none), ("siteC", none)],
    );
    let moved = launch(&cluster, "siteB,siteC", "12288");
    let hops = moved["hops"].as_array().cloned().unwrap_or_default();
    assert_eq!(hops.len(), 4, "{moved}");
    for hop in &hops {
        assert!(field(hop, "image_bytes") > 12 << 20, "{moved}");
        assert_eq!(field(hop, "pages_reused"), 0, "{moved}");
    }
    let stayed = launch(&cluster, "siteA", "12288");
    assert_eq!(moved["result"], stayed["result"]);
}

#[test]
fn a_large_agent_sent_from_its_memory_still_leaves_out_the_pages_its_destination_holds() {
    // siteA keeps no pages, so a 12 MiB agent leaving it is sent from its suspended memory;
    // siteB keeps them (the default), so when the agent comes back it offers their list.
    let none: &[&str] = &["--return-cache-mib", "0"];
    let cluster = Cluster::start(&["siteA", "siteB"], &[("siteA", none), ("siteB", &[])]);
    let moved = launch(&cluster, "siteB,siteA", "12288");
    let hops = moved["hops"].as_array().cloned().unwrap_or_default();
    assert_eq!(hops.len(), 4, "{moved}");
    let image = |i: usize| field(&hops[i], "image_bytes");
    let reused = |i: usize| field(&hops[i], "pages_reused");
    // Hops 1 and 3 leave siteA; hop 3 goes back to siteB, which kept the agent's pages when
    // it left at hop 2: only the 64 KiB rewritten since (and stack pages) travel.
    assert!(image(0) > 12 << 20, "{moved}");
    assert_eq!(reused(0), 0, "{moved}");
    assert!(reused(2) >= 3000, "{moved}");
    assert!(image(2) < 256 << 10, "{moved}");
    // Hops 2 and 4 go to siteA, which kept nothing: the whole image each time.
    for to_a in [1, 3] {
        assert!(image(to_a) > 12 << 20, "{moved}");
        assert_eq!(reused(to_a), 0, "{moved}");
    }
    let stayed = launch(&cluster, "siteA", "12288");
    assert_eq!(moved["result"], stayed["result"]);
}
