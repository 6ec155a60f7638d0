use super::compression::FIRST_RESERVE;
use super::format::{MAGIC, WireHeader};
use super::*;
use crate::context::AgentContext;
use crate::globals::GlobalKind;
use crate::snapshot::{PAGE_SIZE, PageRun};

const TRAVEL_LEVEL: i32 = Compression::Travel.level();

/// `image` encoded to travel, in one buffer.
fn encoded(image: &AgentImage) -> std::io::Result<Vec<u8>> {
    image.encode(EncodeOptions::default()).map(|e| e.to_vec())
}

/// Decodes `bytes` as one shared buffer, checking the digest.
fn decode_with(bytes: &[u8], limits: &ImageLimits) -> Result<AgentImage, ImageError> {
    decode_shared(&bytes::Bytes::copy_from_slice(bytes), limits)
}

fn decode_shared(bytes: &bytes::Bytes, limits: &ImageLimits) -> Result<AgentImage, ImageError> {
    let options = DecodeOptions {
        limits: *limits,
        ..DecodeOptions::default()
    };
    AgentImage::decode(bytes.clone(), &options).map(|d| d.image)
}

/// Decodes `bytes` leaving the digest to be checked.
fn decode_unverified(
    bytes: &bytes::Bytes,
    limits: &ImageLimits,
) -> Result<(AgentImage, Unverified), ImageError> {
    let options = DecodeOptions {
        limits: *limits,
        verify: Verify::Later,
        ..DecodeOptions::default()
    };
    let decoded = AgentImage::decode(bytes.clone(), &options)?;
    let Some(unverified) = decoded.unverified else {
        panic!("an image decoded with Verify::Later comes with its check")
    };
    Ok((decoded.image, unverified))
}

fn image() -> AgentImage {
    let mut data = vec![0u8; 3 * PAGE_SIZE];
    data.iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = (i * 7 % 251) as u8);
    let mut context = AgentContext::new(
        "home",
        "alice",
        vec!["a".into(), "b".into()],
        Default::default(),
    );
    context.pending = Some(agent_abi::Op::Hop { site: "b".into() });
    AgentImage {
        module: ModuleHash([7; 32]),
        memory_bytes: 4 << 16,
        globals: vec![
            GlobalValue {
                index: 0,
                kind: GlobalKind::I32,
                bits: 65536,
            },
            GlobalValue {
                index: 3,
                kind: GlobalKind::F64,
                bits: f64::NAN.to_bits() | 5,
            },
        ],
        pages: PageMap {
            runs: vec![
                PageRun { start: 1, count: 2 },
                PageRun {
                    start: 40,
                    count: 1,
                },
            ],
            data: data.into(),
        },
        context,
    }
}

/// Encodes `image` after letting the test tamper with its header.
fn encode_with(
    image: &AgentImage,
    body: Option<Vec<u8>>,
    tamper: impl FnOnce(&mut WireHeader),
) -> Vec<u8> {
    let body = body.unwrap_or_else(|| {
        zstd::bulk::compress(&image.pages.data, TRAVEL_LEVEL).unwrap_or_default()
    });
    let mut header = WireHeader {
        format: FORMAT_VERSION,
        abi: agent_abi::ABI_VERSION,
        module: image.module,
        memory_bytes: image.memory_bytes,
        globals: image.globals.clone(),
        runs: image.pages.runs.clone(),
        body_bytes: body.len() as u64,
        hash: image.digest(),
        context: image.context.clone(),
        base: None,
        raw: false,
    };
    tamper(&mut header);
    let mut head = Vec::new();
    ciborium::into_writer(&header, &mut head).unwrap_or_default();
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&(head.len() as u32).to_le_bytes());
    out.extend_from_slice(&head);
    out.extend_from_slice(&body);
    out
}

fn decode(bytes: &[u8]) -> Result<AgentImage, ImageError> {
    decode_with(bytes, &ImageLimits::default())
}

#[test]
fn round_trip_keeps_everything_bit_for_bit() {
    let img = image();
    let bytes = encoded(&img).unwrap_or_default();
    assert_eq!(decode(&bytes), Ok(img.clone()));
    assert_eq!(
        bytes,
        encode_with(&img, None, |_| {}),
        "the test encoder matches the real one"
    );
}

#[test]
fn an_image_kept_is_compressed_harder_and_reads_the_same() {
    // Pages like a small agent's: text, small integers and zeros.
    let mut img = image();
    let text = b"let mut x = vec![0u32; 16]; x[3] = 7; // state of the search ";
    let data: Vec<u8> = (0..3 * PAGE_SIZE)
        .map(|i| match i % 256 < 64 {
            true => text[i % text.len()],
            false => (i % 7) as u8 * u8::from(i % 3 == 0),
        })
        .collect();
    img.pages.data = data.into();
    let travels = encoded(&img).unwrap_or_default();
    let kept = img
        .encode(EncodeOptions {
            compression: Compression::Keep,
            ..EncodeOptions::default()
        })
        .map(|e| e.to_vec())
        .unwrap_or_default();
    assert!(
        kept.len() < travels.len(),
        "{} !< {}",
        kept.len(),
        travels.len()
    );
    assert_eq!(decode(&kept), Ok(img.clone()));
    assert_eq!(decode(&travels), Ok(img));
}

/// The header of encoded image `bytes`.
fn header_of(bytes: &[u8]) -> Option<WireHeader> {
    let len = u32::from_le_bytes(bytes.get(8..12)?.try_into().ok()?) as usize;
    ciborium::from_reader(bytes.get(12..12 + len)?).ok()
}

/// An image of `pages` pages of pseudo-random (incompressible) bytes.
fn noisy(pages: u32) -> AgentImage {
    let mut img = image();
    let data = crate::net::host::incompressible(pages as usize * PAGE_SIZE);
    img.memory_bytes = u64::from(pages).next_multiple_of(16) * PAGE_SIZE as u64;
    img.pages = PageMap {
        runs: vec![PageRun {
            start: 0,
            count: pages,
        }],
        data: data.into(),
    };
    img
}

#[test]
fn an_image_read_in_place_is_byte_for_byte_the_image_copied_out() {
    // Noise with zero pages between runs, and a run in the last pages of the memory.
    let mut memory = crate::net::host::incompressible(600 * PAGE_SIZE);
    memory.resize(640 * PAGE_SIZE, 0);
    memory[640 * PAGE_SIZE - 1] = 7;
    for hole in [0, 3, 4, 100, 599] {
        memory[hole * PAGE_SIZE..(hole + 1) * PAGE_SIZE].fill(0);
    }
    let mut img = image();
    img.memory_bytes = memory.len() as u64;
    img.pages = PageMap::capture(&memory, &crate::snapshot::InitialImage::default());
    assert_eq!(img.pages.runs.len(), 4, "{:?}", img.pages.runs);
    let copied = encoded(&img).unwrap_or_default();

    let mut runs_only = img.clone();
    runs_only.pages.data = bytes::Bytes::new();
    let Ok(Some(in_place)) = runs_only.encode_in_place(&memory) else {
        panic!("2.3 MiB of noise is read in place")
    };
    assert_eq!(in_place.len(), copied.len());
    assert!(in_place.parts().concat() == copied, "the encodings differ");
    assert_eq!(decode(&in_place.parts().concat()), Ok(img.clone()));

    // Pages worth compressing are left to be copied out and compressed.
    let plain: Vec<u8> = memory.iter().map(|b| b & 1).collect();
    assert!(matches!(runs_only.encode_in_place(&plain), Ok(None)));
    // As are runs the memory does not hold.
    assert!(matches!(
        runs_only.encode_in_place(&memory[..639 * PAGE_SIZE]),
        Ok(None)
    ));
}

#[test]
fn incompressible_pages_travel_raw_and_compressible_ones_compressed() {
    let mut img = noisy(512);
    // A heap of noise above a stack and data of zeros, as in the benchmark agent.
    let mut data = img.pages.data.to_vec();
    data[..16 * PAGE_SIZE].fill(0);
    img.pages.data = data.into();
    let bytes = encoded(&img).unwrap_or_default();
    assert!(
        header_of(&bytes).is_some_and(|h| h.raw),
        "2 MiB of noise is sent raw"
    );
    assert_eq!(decode(&bytes), Ok(img.clone()));

    let mut tampered = bytes.clone();
    if let Some(b) = tampered.last_mut() {
        *b ^= 1;
    }
    assert_eq!(decode(&tampered), Err(ImageError::HashMismatch));
    let short = &bytes[..bytes.len() - 1];
    assert!(matches!(decode(short), Err(ImageError::Truncated(_))));

    let mut plain = img.clone();
    plain.pages.data = plain.pages.data.iter().map(|b| b & 1).collect();
    let bytes = encoded(&plain).unwrap_or_default();
    assert!(header_of(&bytes).is_some_and(|h| !h.raw));
    assert!(bytes.len() < plain.pages.data.len() / 2);
    assert_eq!(decode(&bytes), Ok(plain));
}

#[test]
fn a_raw_body_is_lent_from_the_buffer_it_was_decoded_from() {
    let img = noisy(512);
    let bytes = bytes::Bytes::from(encoded(&img).unwrap_or_default());
    assert!(header_of(&bytes).is_some_and(|h| h.raw));
    let decoded = decode_shared(&bytes, &ImageLimits::default());
    let pages = decoded.map(|d| d.pages.data).unwrap_or_default();
    assert_eq!(pages, img.pages.data);
    let lent = bytes.as_ptr_range();
    assert!(
        lent.contains(&pages.as_ptr()),
        "the pages were copied out of the buffer"
    );
}

#[test]
fn an_image_encoded_in_parts_shares_its_raw_pages_and_reads_as_the_whole() {
    let img = noisy(512);
    let parts = img.encode(EncodeOptions::default()).unwrap();
    assert_eq!(parts.to_vec(), encoded(&img).unwrap_or_default());
    assert_eq!(parts.len(), parts.head().len() + parts.body().len());
    assert_eq!(
        parts.body().as_ptr(),
        img.pages.data.as_ptr(),
        "the pages were copied to be encoded"
    );
    // A compressed body is the compressor's own: it reads back the same.
    let small = image();
    let parts = small.encode(EncodeOptions::default()).unwrap();
    assert_ne!(parts.body().as_ptr(), small.pages.data.as_ptr());
    assert_eq!(decode(&parts.parts().concat()), Ok(small));
}

#[test]
fn images_encoded_for_many_contexts_are_each_the_image_with_its_context() {
    for img in [image(), noisy(512)] {
        let contexts: Vec<AgentContext> = (0..3)
            .map(|i| img.context.child(1, i, ("siteA", "siteB")))
            .collect();
        let each = img.encode_each(contexts.clone()).unwrap();
        assert_eq!(each.len(), 3);
        for (encoded, context) in each.iter().zip(contexts) {
            let alone = AgentImage {
                context,
                ..img.clone()
            };
            // Byte for byte what encoding it alone gives, and one body shared by all.
            assert_eq!(encoded.to_vec(), encoded_bytes(&alone));
            assert_eq!(decode(&encoded.to_vec()), Ok(alone));
            assert_eq!(encoded.body().as_ptr(), each[0].body().as_ptr());
        }
    }
}

fn encoded_bytes(image: &AgentImage) -> Vec<u8> {
    encoded(image).unwrap_or_default()
}

#[test]
fn the_claimed_digest_is_the_header_hash_of_an_image_that_stands_alone() {
    let img = image();
    let bytes = encoded(&img).unwrap_or_default();
    assert_eq!(AgentImage::claimed_digest(&bytes), Some(img.digest()));
    // Read without checking: a tampered body still shows the header's claim.
    let mut tampered = bytes.clone();
    if let Some(b) = tampered.last_mut() {
        *b ^= 1;
    }
    assert_eq!(AgentImage::claimed_digest(&tampered), Some(img.digest()));
    for junk in [
        &b""[..],
        b"AGNTIMG\0",
        b"AGNTIMG\0\xff\xff\xff\xff",
        &bytes[..20],
        b"not an image",
    ] {
        assert_eq!(AgentImage::claimed_digest(junk), None);
    }
    // An image that leaves out pages claims the whole image's digest: it has none of its own.
    let partial = img
        .encode(EncodeOptions {
            leave_out: Some(LeaveOut {
                base_seq: 1,
                runs: vec![PageRun { start: 1, count: 1 }],
                rest: img.pages.data.slice(PAGE_SIZE..),
            }),
            ..EncodeOptions::default()
        })
        .map(|e| e.to_vec())
        .unwrap_or_default();
    assert!(header_of(&partial).is_some_and(|h| h.base.is_some()));
    assert_eq!(AgentImage::claimed_digest(&partial), None);
}

#[test]
fn every_truncation_is_a_clear_error() {
    let bytes = encoded(&image()).unwrap_or_default();
    for len in 0..bytes.len() {
        match decode(&bytes[..len]) {
            Err(ImageError::Truncated(_) | ImageError::NotAnImage | ImageError::BadHeader(_)) => {}
            other => panic!("prefix of {len} bytes gave {other:?}"),
        }
    }
    assert!(matches!(
        decode(&bytes[..100]),
        Err(ImageError::Truncated(_))
    ));
}

#[test]
fn bad_images_are_refused_with_the_exact_error() {
    let img = image();
    let good = encoded(&img).unwrap_or_default();
    assert_eq!(decode(b"GIF89a......"), Err(ImageError::NotAnImage));

    let mut trailing = good.clone();
    trailing.push(0);
    assert_eq!(decode(&trailing), Err(ImageError::TrailingBytes(1)));

    let mut huge = good.clone();
    huge[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(
        decode(&huge),
        Err(ImageError::HeaderTooLarge {
            size: u64::from(u32::MAX),
            limit: 4 << 20
        })
    );

    let mut garbage = good.clone();
    garbage[12..20].fill(0xff);
    assert!(matches!(decode(&garbage), Err(ImageError::BadHeader(_))));

    assert_eq!(
        decode(&encode_with(&img, None, |h| h.format = 2)),
        Err(ImageError::VersionSkew {
            found: 2,
            supported: FORMAT_VERSION
        })
    );
    assert_eq!(
        decode_with(
            &good,
            &ImageLimits {
                max_memory: 1 << 16,
                ..ImageLimits::default()
            }
        ),
        Err(ImageError::MemoryTooLarge {
            size: 4 << 16,
            limit: 1 << 16
        })
    );
}

#[test]
fn images_with_bad_contents_are_refused_with_the_exact_error() {
    let img = image();
    let good = encoded(&img).unwrap_or_default();
    assert!(matches!(
        decode(&encode_with(&img, None, |h| h.memory_bytes = 1000)),
        Err(ImageError::BadHeader(_))
    ));
    assert!(matches!(
        decode(&encode_with(&img, None, |h| h.runs[1].start = 64)),
        Err(ImageError::BadPages(_))
    ));
    assert!(matches!(
        decode(&encode_with(&img, None, |h| h.runs.push(PageRun {
            start: 41,
            count: 1
        }))),
        Err(ImageError::CorruptBody(_))
    ));
    // The header's hash no longer matches a changed global or context.
    assert_eq!(
        decode(&encode_with(&img, None, |h| h.globals[0].bits += 1)),
        Err(ImageError::HashMismatch)
    );
    assert_eq!(
        decode(&encode_with(&img, None, |h| h.context.hop_seq = 9)),
        Err(ImageError::HashMismatch)
    );
    // A changed page byte (compressed body still valid).
    let mut other = img.pages.data.to_vec();
    other[5] ^= 1;
    let body = zstd::bulk::compress(&other, 1).unwrap_or_default();
    assert_eq!(
        decode(&encode_with(&img, Some(body), |_| {})),
        Err(ImageError::HashMismatch)
    );
    // Flipped bits in the compressed body.
    let mut flipped = good.clone();
    let at = flipped.len() - 3;
    flipped[at] ^= 0x55;
    assert!(matches!(
        decode(&flipped),
        Err(ImageError::CorruptBody(_) | ImageError::HashMismatch)
    ));
}

#[test]
fn a_tiny_body_claiming_a_huge_memory_allocates_nothing_of_that_size() {
    // A header may claim far more memory than its body holds: the decoder must not reserve
    // the claimed size up front (here 1 TiB, an allocation that aborts the process).
    let img = image();
    let limits = ImageLimits {
        max_memory: 1 << 40,
        ..ImageLimits::default()
    };
    let pages = ((1u64 << 40) / PAGE_SIZE as u64) as u32;
    for body in [
        vec![0u8],
        vec![],
        zstd::bulk::compress(b"x", 1).unwrap_or_default(),
    ] {
        let bytes = encode_with(&img, Some(body), |h| {
            h.memory_bytes = 1 << 40;
            h.runs = vec![PageRun {
                start: 0,
                count: pages,
            }];
        });
        assert!(matches!(
            decode_with(&bytes, &limits),
            Err(ImageError::CorruptBody(_))
        ));
    }
}

#[test]
fn an_image_larger_than_the_first_reserve_round_trips() {
    let pages = FIRST_RESERVE / PAGE_SIZE + 3;
    let mut img = image();
    img.memory_bytes = ((pages as u64 * PAGE_SIZE as u64) / crate::admission::WASM_PAGE + 1)
        * crate::admission::WASM_PAGE;
    img.pages = PageMap {
        runs: vec![PageRun {
            start: 0,
            count: pages as u32,
        }],
        data: (0..pages * PAGE_SIZE)
            .map(|i| (i * 13 % 241) as u8)
            .collect::<Vec<u8>>()
            .into(),
    };
    let bytes = encoded(&img).unwrap_or_default();
    assert_eq!(decode(&bytes), Ok(img.clone()));
    // One page short or one page too many in the body.
    for data in [
        img.pages.data[PAGE_SIZE..].to_vec(),
        [&img.pages.data[..], &[0u8; PAGE_SIZE][..]].concat(),
    ] {
        let body = zstd::bulk::compress(&data, TRAVEL_LEVEL).unwrap_or_default();
        assert!(matches!(
            decode(&encode_with(&img, Some(body), |_| {})),
            Err(ImageError::CorruptBody(_))
        ));
    }
}

#[test]
fn an_image_decoded_unverified_is_the_image_and_its_check_catches_tampering() {
    let limits = ImageLimits::default();
    for img in [noisy(1024), image()] {
        let bytes = bytes::Bytes::from(encoded(&img).unwrap_or_default());
        let (decoded, unverified) = decode_unverified(&bytes, &limits).unwrap();
        assert_eq!(decoded, img);
        assert_eq!(unverified.check(), Ok(()));
    }

    // A page changed on the way decodes, and fails its check.
    let img = noisy(1024);
    let mut tampered = encoded(&img).unwrap_or_default();
    if let Some(b) = tampered.last_mut() {
        *b ^= 1;
    }
    let tampered = bytes::Bytes::from(tampered);
    let (_, unverified) = decode_unverified(&tampered, &limits).unwrap();
    assert_eq!(unverified.check(), Err(ImageError::HashMismatch));
    assert_eq!(
        AgentImage::decode(tampered.clone(), &DecodeOptions::default())
            .map(|d| (d.image, d.filled_in)),
        Err(ImageError::HashMismatch)
    );

    // The digest covers the context too: a header naming another agent over the same
    // pages and digest fails its check.
    let forged = encode_with(&img, None, |header| {
        header.context.agent_id = crate::context::AgentId::random();
    });
    let forged = bytes::Bytes::from(forged);
    let (_, unverified) = decode_unverified(&forged, &limits).unwrap();
    assert_eq!(unverified.check(), Err(ImageError::HashMismatch));
}

#[test]
fn a_decompression_bomb_stops_at_the_size_the_page_map_implies() {
    let img = image();
    let bomb = zstd::bulk::compress(&vec![0u8; 256 << 20], 3).unwrap_or_default();
    assert!(bomb.len() < 64 << 10, "the bomb is small on the wire");
    assert!(matches!(
        decode(&encode_with(&img, Some(bomb), |_| {})),
        Err(ImageError::CorruptBody(_))
    ));
}
