//! A peer with a valid host certificate that sends bad transfers (a buggy or compromised
//! host): a module whose bytes do not match its hash, an image of another module, a stream
//! cut short, a whole image never confirmed by DEPARTED or confirmed for another hop, a large
//! image whose bytes do not match its digest. The
//! destination refuses each with a clear reason, commits nothing, and keeps serving.

use agent_e2e::{Cluster, block_on, example};
use agent_runtime::engine::new_engine;
use agent_runtime::net::certs::{self, Role};
use agent_runtime::net::client::{Client, HostAddr};
use agent_runtime::net::messages::{
    Departed, Offer, OfferReply, Request, TransferReply, TransferStatus,
};
use agent_runtime::net::tls::Credentials;
use agent_runtime::net::wire::{read_msg, write_blob, write_msg};
use agent_runtime::{
    AgentContext, AgentImage, AgentInstance, Corpus, ImageLimits, Limits, ModuleCache, Site,
};
use std::sync::Arc;

/// A real image of a freshly launched agent of `wasm`, and its offer.
fn image_of(wasm: &[u8]) -> (Vec<u8>, Offer) {
    let engine = new_engine().unwrap();
    let cache = ModuleCache::new(&engine, None).unwrap();
    let module = cache.admit(wasm).unwrap();
    let site = Arc::new(Site::new("siteB", Corpus::empty()));
    let mut context = AgentContext::new("siteB", "alice", Vec::new(), Default::default());
    context.hop_seq = 1;
    let mut agent = block_on(AgentInstance::launch(
        module.clone(),
        site,
        context,
        &Limits::default(),
    ))
    .unwrap();
    let image = agent.capture();
    let bytes = (image.encode(Default::default())).unwrap().to_vec();
    let offer = Offer {
        agent: image.context.agent_id,
        seq: 1,
        module: module.hash,
        module_bytes: wasm.len() as u64,
        memory_bytes: image.memory_bytes,
        image_bytes: bytes.len() as u64,
        abi: agent_abi::ABI_VERSION,
        owner: "alice".into(),
        home: "siteB".into(),
        image_follows: false,
    };
    (bytes, offer)
}

/// Offers, then sends `module` (if asked for), `image` and DEPARTED; the destination's verdict.
async fn transfer(
    client: &Client,
    offer: &Offer,
    module: &[u8],
    image: &[u8],
) -> Result<TransferReply, String> {
    let (mut send, mut recv) = send_image(client, offer, module, image).await?;
    write_msg(
        &mut send,
        &Departed {
            seq: offer.seq,
            home: None,
        },
    )
    .await
    .map_err(|e| e.to_string())?;
    read_msg(&mut recv).await.map_err(|e| e.to_string())
}

/// Offers, then sends `module` (if asked for) and `image`; the streams, to go on with.
async fn send_image(
    client: &Client,
    offer: &Offer,
    module: &[u8],
    image: &[u8],
) -> Result<(quinn::SendStream, quinn::RecvStream), String> {
    let (mut send, mut recv) = client
        .open(&Request::Hop(offer.clone()))
        .await
        .map_err(|e| e.to_string())?;
    let reply: OfferReply = read_msg(&mut recv).await.map_err(|e| e.to_string())?;
    let OfferReply::Accept { need_module, .. } = reply else {
        return Err(format!("offer not accepted: {reply:?}"));
    };
    if need_module {
        write_blob(&mut send, module)
            .await
            .map_err(|e| e.to_string())?;
    }
    write_blob(&mut send, image)
        .await
        .map_err(|e| e.to_string())?;
    Ok((send, recv))
}

/// Credentials of siteB (not started: the tests speak for it) and the address of siteA.
fn as_site_b(cluster: &Cluster) -> (Credentials, HostAddr) {
    let peer = Credentials::load(
        &certs::ca_files(&cluster.certs()).cert,
        &certs::files(&cluster.certs(), Role::Host, "siteB"),
    )
    .unwrap();
    let host = HostAddr {
        name: "siteA".into(),
        addr: cluster.addrs["siteA"],
    };
    (peer, host)
}

/// Launches a real search agent on siteA, which must succeed.
fn launch_search_on_site_a(cluster: &Cluster) {
    example("search");
    let wasm = agent_e2e::repo().join("examples/target/wasm32-wasip1/release/search.wasm");
    let out = cluster.agent(
        &["launch", &wasm.display().to_string(), "--arg", "query=host"],
        "siteA",
        "alice",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_rogue_host_plants_nothing_and_the_destination_keeps_serving() {
    let up: &[&str] = &[];
    let cluster = Cluster::start(&["siteA", "siteB"], &[("siteA", up)]);
    let (rogue, host) = as_site_b(&cluster);
    let search = example("search");
    let heap = example("heap");
    let (image, offer) = image_of(&search);
    let (other_image, _) = image_of(&heap);
    let (unconfirmed, offer4) = image_of(&search);
    let (misconfirmed, offer5) = image_of(&search);

    block_on(async {
        let client = Client::connect(&host, &rogue).await.unwrap();

        // The module's bytes are not the module the offer names.
        let verdict = transfer(&client, &offer, &heap, &image).await;
        assert_eq!(
            verdict,
            Ok(TransferReply::Refused(
                "the module bytes do not match the offered hash".into()
            ))
        );

        // The right module, but the image of an agent of another module.
        let offer2 = Offer {
            seq: 2,
            ..offer.clone()
        };
        let verdict = transfer(&client, &offer2, &search, &other_image).await;
        assert_eq!(
            verdict,
            Ok(TransferReply::Refused(
                "the image does not match the offer".into()
            ))
        );

        // A stream cut short: half the image, then the end of the stream.
        let offer3 = Offer {
            seq: 3,
            ..offer.clone()
        };
        let (mut send, mut recv) = client.open(&Request::Hop(offer3.clone())).await.unwrap();
        let reply: OfferReply = read_msg(&mut recv).await.unwrap();
        assert_eq!(
            reply,
            OfferReply::Accept {
                need_module: false,
                base: None
            }
        );
        send.write_all(&(image.len() as u64).to_le_bytes())
            .await
            .unwrap();
        send.write_all(&image[..image.len() / 2]).await.unwrap();
        let _ = send.finish();
        assert!(read_msg::<TransferReply>(&mut recv).await.is_err());

        // A whole, valid image (the destination restores it and starts it), but the stream
        // ends without DEPARTED: as if the source crashed before its record was durable.
        let (mut send, mut recv) = send_image(&client, &offer4, &search, &unconfirmed)
            .await
            .unwrap();
        let _ = send.finish();
        assert!(read_msg::<TransferReply>(&mut recv).await.is_err());

        // A whole, valid image confirmed for another hop.
        let (mut send, mut recv) = send_image(&client, &offer5, &search, &misconfirmed)
            .await
            .unwrap();
        write_msg(&mut send, &Departed { seq: 7, home: None })
            .await
            .unwrap();
        let verdict: TransferReply = read_msg(&mut recv).await.unwrap();
        assert_eq!(
            verdict,
            TransferReply::Refused("DEPARTED names hop 7".into())
        );

        // Nothing was committed: asking settles each transfer as aborted, for good.
        let transfers = [
            (offer.agent, 1),
            (offer.agent, 2),
            (offer.agent, 3),
            (offer4.agent, 1),
            (offer5.agent, 1),
        ];
        for (agent, seq) in transfers {
            let status: Result<TransferStatus, String> = client
                .request(&Request::Query { agent, seq })
                .await
                .unwrap();
            assert_eq!(status, Ok(TransferStatus::Aborted), "{agent} seq {seq}");
        }
        client.close().await;
    });
    let log = cluster.log("siteA");
    assert!(!log.contains("agent arrived"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
    // The two whole images ran until their first operation, which waited for the commit.
    assert_eq!(
        log.matches("dropped an arrival that was never committed")
            .count(),
        2,
        "{log}"
    );

    // Still serving: a real agent runs there.
    launch_search_on_site_a(&cluster);
}

/// The image may follow the offer at once (`image_follows`, what a source does for a small
/// image to a host it believes holds the module): a destination that lacks the module after
/// all reads the image, asks for the module, and commits.
#[test]
fn an_image_sent_with_the_offer_is_committed_even_when_the_module_is_asked_for() {
    let up: &[&str] = &[];
    // siteB is not started: its certificate stands for a host that sends its image early.
    let cluster = Cluster::start(&["siteA", "siteB"], &[("siteA", up)]);
    let (peer, host) = as_site_b(&cluster);
    let search = example("search");
    let (image, offer) = image_of(&search);
    let offer = Offer {
        image_follows: true,
        ..offer
    };
    block_on(async {
        let client = Client::connect(&host, &peer).await.unwrap();
        let (mut send, mut recv) = client.open(&Request::Hop(offer.clone())).await.unwrap();
        write_blob(&mut send, &image).await.unwrap();
        let reply: OfferReply = read_msg(&mut recv).await.unwrap();
        assert_eq!(
            reply,
            OfferReply::Accept {
                need_module: true,
                base: None
            }
        );
        write_blob(&mut send, &search).await.unwrap();
        write_msg(
            &mut send,
            &Departed {
                seq: offer.seq,
                home: None,
            },
        )
        .await
        .unwrap();
        let verdict: TransferReply = read_msg(&mut recv).await.unwrap();
        assert!(
            matches!(verdict, TransferReply::Committed { .. }),
            "{verdict:?}"
        );
        let status: Result<TransferStatus, String> = client
            .request(&Request::Query {
                agent: offer.agent,
                seq: offer.seq,
            })
            .await
            .unwrap();
        assert_eq!(status, Ok(TransferStatus::Committed));
        client.close().await;
    });
    let log = cluster.log("siteA");
    assert!(log.contains("agent arrived"), "{log}");
}

/// `image` (of a freshly launched agent) with `mib` MiB of pseudo-random pages above the
/// memory the agent uses: large enough that the destination makes its instance ready and
/// hashes the pages as they come, and harmless to the agent if it ever runs.
fn with_noise(image: &[u8], offer: &Offer, mib: usize) -> (Vec<u8>, Offer) {
    use agent_runtime::snapshot::{PAGE_SIZE, PageRun};
    let mut image = AgentImage::decode(
        image.to_vec(),
        &agent_runtime::image::DecodeOptions::new(ImageLimits::default()),
    )
    .unwrap()
    .image;
    let pages = mib * (1 << 20) / PAGE_SIZE;
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let noise = (0..pages * PAGE_SIZE / 8).flat_map(|_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x.to_le_bytes()
    });
    let mut data = image.pages.data.to_vec();
    data.extend(noise);
    image.pages.runs.push(PageRun {
        start: (image.memory_bytes / PAGE_SIZE as u64) as u32,
        count: pages as u32,
    });
    image.pages.data = data.into();
    image.memory_bytes += (mib as u64) << 20;
    let bytes = (image.encode(Default::default())).unwrap().to_vec();
    let offer = Offer {
        memory_bytes: image.memory_bytes,
        image_bytes: bytes.len() as u64,
        ..offer.clone()
    };
    (bytes, offer)
}

/// A large image whose pages were changed after it was hashed (the last byte) is refused at
/// the commit, though the destination had its instance ready and resumed it before hashing
/// its pages; the same image untouched is committed.
#[test]
fn a_large_image_changed_after_it_was_hashed_is_refused_and_the_same_untouched_arrives() {
    let up: &[&str] = &[];
    let cluster = Cluster::start(&["siteA", "siteB"], &[("siteA", up)]);
    let (peer, host) = as_site_b(&cluster);
    // siteA holds the module first (a real launch), so no image below brings it: only then
    // does the destination get an instance ready while the image travels.
    launch_search_on_site_a(&cluster);
    let search = example("search");

    let (small, offer) = image_of(&search);
    let (image, offer) = with_noise(&small, &offer, 12);
    assert!(image.len() > 12 << 20);
    let mut tampered = image.clone();
    if let Some(b) = tampered.last_mut() {
        *b ^= 1;
    }
    let (small, other) = image_of(&search);
    let (untouched, other) = with_noise(&small, &other, 12);
    block_on(async {
        let client = Client::connect(&host, &peer).await.unwrap();
        let verdict = transfer(&client, &offer, &search, &tampered).await;
        assert!(
            matches!(&verdict, Ok(TransferReply::Refused(why)) if why.contains("hash mismatch")),
            "{verdict:?}"
        );
        let status: Result<TransferStatus, String> = client
            .request(&Request::Query {
                agent: offer.agent,
                seq: offer.seq,
            })
            .await
            .unwrap();
        assert_eq!(status, Ok(TransferStatus::Aborted));

        let verdict = transfer(&client, &other, &search, &untouched).await;
        assert!(
            matches!(verdict, Ok(TransferReply::Committed { .. })),
            "{verdict:?}"
        );
        client.close().await;
    });
    let log = cluster.log("siteA");
    assert_eq!(log.matches("agent arrived").count(), 1, "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

/// A membership message from a genuine cluster member named `from`, asking siteA in.
fn announce_from(from: &str, cluster: &Cluster) -> Vec<u8> {
    use agent_runtime::cluster::wire::HostId;
    use agent_runtime::cluster::{Cluster as Members, Output, load::Facts, settings};
    let me = HostId {
        name: from.into(),
        addr: "127.0.0.1:9".parse().unwrap(),
        start: 1,
    };
    let mut members = Members::new(me, Facts::default(), settings(4), 1);
    let site_a = HostId {
        name: "siteA".into(),
        addr: cluster.addrs["siteA"],
        start: 0,
    };
    members.join(site_a).unwrap();
    members
        .outputs()
        .into_iter()
        .find_map(|o| match o {
            Output::Send { data, .. } => Some(data.to_vec()),
            _ => None,
        })
        .unwrap()
}

#[test]
fn a_host_cannot_gossip_for_another_and_users_and_garbage_are_refused() {
    use agent_runtime::net::messages::{Refusal, Reply};
    let up: &[&str] = &[];
    let cluster = Cluster::start(&["siteA", "siteB", "siteC"], &[("siteA", up)]);
    let (peer, host) = as_site_b(&cluster);
    let gossip = |data: Vec<u8>| Request::Gossip {
        data: serde_bytes::ByteBuf::from(data),
    };
    block_on(async {
        let client = Client::connect(&host, &peer).await.unwrap();
        // siteB's certificate, siteC's name in the message.
        let forged = gossip(announce_from("siteC", &cluster));
        match client.request::<Reply<()>>(&forged).await.unwrap() {
            Err(Refusal::BadGossip(why)) => assert!(why.contains("siteC"), "{why}"),
            other => panic!("a forged sender was taken: {other:?}"),
        }
        let garbage = client
            .request::<Reply<()>>(&gossip(vec![0xff; 64]))
            .await
            .unwrap();
        assert!(matches!(garbage, Err(Refusal::BadGossip(_))), "{garbage:?}");
        let huge = client
            .request::<Reply<()>>(&gossip(vec![0; 64 << 10]))
            .await
            .unwrap();
        assert!(matches!(huge, Err(Refusal::BadGossip(_))), "{huge:?}");
        // The genuine one is taken.
        let own = gossip(announce_from("siteB", &cluster));
        assert_eq!(client.request::<Reply<()>>(&own).await.unwrap(), Ok(()));
        client.close().await;
    });
    let own = gossip(announce_from("siteB", &cluster));
    let (as_user, hosts) = block_on(async {
        let user = cluster.client("siteA", "alice").await.unwrap();
        let as_user = user.request::<Reply<()>>(&own).await;
        (as_user, user.hosts().await.unwrap())
    });
    assert!(
        matches!(as_user, Ok(Err(Refusal::OnlyHosts(_)))),
        "{as_user:?}"
    );
    // siteA knows siteB (which spoke for itself), never siteC.
    let names: Vec<&str> = hosts.iter().map(|h| h.name.as_str()).collect();
    assert!(names.contains(&"siteB"), "{names:?}");
    assert!(!names.contains(&"siteC"), "{names:?}");
}
