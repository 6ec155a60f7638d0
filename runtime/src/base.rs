//! Return visits: an agent that comes back to a host it left sends only the pages that host
//! does not hold.
//!
//! A host keeps the carried pages of each agent it handed on, its *base* for that agent, in a
//! [`BaseCache`] bounded in bytes. When the agent is offered back, the host answers with the
//! hash of every base page ([`BaseList`]); the source leaves out of the image each page whose
//! hash the list holds at the same index ([`encode_against`]), and the host fills them in from
//! the base before it checks the image's digest ([`AgentImage::decode`]). The digest
//! covers the whole memory, so a wrong match (a stale list, a hash collision, a lying peer)
//! makes a refused transfer, after which the agent goes on at the source — never a wrong agent.
//!
//! A base serves only a later hop of the same agent with the same module, owner and home: a
//! host that offers another agent under the id of one that left cannot have its pages put
//! into code of its choosing. What such a host can learn is the list itself, 8-byte hash
//! prefixes of the pages the agent left with, enough to confirm a guess of a page's content.
//! The list costs 8 bytes per base page on the wire.

use crate::context::AgentId;
use crate::image::{AgentImage, BasePages, EncodeOptions, Encoded, LeaveOut};
use crate::modules::ModuleHash;
use crate::snapshot::{PAGE_SIZE, PageMap, PageRun, indices, push_index};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// Bytes of hash per page in a [`BaseList`].
const HASH_BYTES: usize = 8;

/// Most pages a base may have to be offered: its list must fit in one control message.
const MAX_LISTED_PAGES: u64 = 1 << 17;

/// Images smaller than this travel whole: hashing the pages, listing them and encoding
/// against the list cost more time than the few bytes they save, on the critical path of
/// every hop between two hosts.
pub const WORTH_A_BASE: u64 = 64 << 10;

/// A short hash of one page: enough to pick pages, since the image's digest checks the result.
fn page_hash(page: &[u8]) -> [u8; HASH_BYTES] {
    let mut out = [0u8; HASH_BYTES];
    out.copy_from_slice(&blake3::hash(page).as_bytes()[..HASH_BYTES]);
    out
}

/// The pages a host holds for an agent, as it tells a source that offers the agent back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseList {
    /// Hop sequence number of the image the pages come from.
    pub seq: u64,
    /// The pages held.
    pub runs: Vec<PageRun>,
    /// [`HASH_BYTES`] bytes of hash per page, in page order.
    #[serde(with = "serde_bytes")]
    pub hashes: Vec<u8>,
}

impl BaseList {
    /// Bytes the list takes in a message.
    pub fn wire_bytes(&self) -> u64 {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for this plain data type.
        let _ = ciborium::into_writer(self, &mut out);
        out.len() as u64
    }

    /// Each listed page with its hash; `None` when the list is malformed (it comes from a
    /// peer: runs out of order, or not one hash per page).
    fn entries(&self) -> Option<impl Iterator<Item = (u32, &[u8])>> {
        let pages = PageMap::check(&self.runs, u64::MAX).ok()?;
        (pages.checked_mul(HASH_BYTES as u64)? == self.hashes.len() as u64)
            .then(|| indices(&self.runs).zip(self.hashes.chunks_exact(HASH_BYTES)))
    }
}

/// What an offer must match for a base to serve it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    /// The agent's module.
    pub module: ModuleHash,
    /// Its owner.
    pub owner: String,
    /// Its home host.
    pub home: String,
}

/// A host's earlier image of an agent: the pages it carried when it left here.
#[derive(Debug)]
pub struct Base {
    pages: PageMap,
    list: BaseList,
    binding: Binding,
}

impl Base {
    /// The base of the image of hop `seq` with these pages (hashes every page), for offers
    /// that match `binding`.
    pub fn new(seq: u64, pages: PageMap, binding: Binding) -> Base {
        let mut hashes = Vec::with_capacity(pages.pages() as usize * HASH_BYTES);
        for (_, page) in pages.iter() {
            hashes.extend_from_slice(&page_hash(page));
        }
        let list = BaseList {
            seq,
            runs: pages.runs.clone(),
            hashes,
        };
        Base {
            pages,
            list,
            binding,
        }
    }

    /// Whether the base may serve an offer of an agent with this binding.
    pub fn serves(&self, binding: &Binding) -> bool {
        self.binding == *binding
    }

    /// Hop sequence number of the image the base comes from.
    pub fn seq(&self) -> u64 {
        self.list.seq
    }

    /// The pages.
    pub fn pages(&self) -> &PageMap {
        &self.pages
    }

    /// The pages, for decoding an image that leaves some of them out.
    pub fn as_base_pages(&self) -> BasePages<'_> {
        BasePages {
            seq: self.seq(),
            pages: &self.pages,
        }
    }

    /// What a source needs to leave pages out.
    pub fn list(&self) -> &BaseList {
        &self.list
    }

    /// Memory the base takes.
    fn bytes(&self) -> u64 {
        bytes_of(&self.pages)
    }
}

/// Memory a base of these pages takes: the pages and their hashes. Counted from the runs, so
/// that it can be asked of pages not yet copied out of the agent's memory.
fn bytes_of(pages: &PageMap) -> u64 {
    pages.pages() * (PAGE_SIZE + HASH_BYTES) as u64
}

/// Encodes `image` for a host that holds the pages of `list`: pages whose hash matches the
/// list at the same index are left out. `own`, the source's base made of the same pages, saves
/// hashing them again. Returns the bytes and how many pages were left out, or `None` when
/// there is nothing to leave out (or the list is malformed): then the plain image is what to
/// send.
///
/// # Errors
/// When zstd fails to compress (out of memory).
pub fn encode_against(
    image: &AgentImage,
    list: &BaseList,
    own: Option<&Base>,
) -> std::io::Result<Option<(Encoded, u64)>> {
    let Some(entries) = list.entries() else {
        return Ok(None);
    };
    let mut own = own
        .filter(|b| b.pages.runs == image.pages.runs)
        .map(|b| b.list.hashes.chunks_exact(HASH_BYTES));
    let mut held = entries.peekable();
    let mut left_out = Vec::new();
    let mut body = Vec::with_capacity(image.pages.data.len());
    for (index, page) in image.pages.iter() {
        let mine = own.as_mut().and_then(Iterator::next);
        while held.next_if(|(i, _)| *i < index).is_some() {}
        let same = held
            .next_if(|(i, _)| *i == index)
            .is_some_and(|(_, hash)| match mine {
                Some(mine) => mine == hash,
                None => hash == page_hash(page),
            });
        match same {
            true => push_index(&mut left_out, index),
            false => body.extend_from_slice(page),
        }
    }
    let left: u64 = left_out.iter().map(|r| u64::from(r.count)).sum();
    if left == 0 {
        return Ok(None);
    }
    let bytes = image.encode(EncodeOptions {
        leave_out: Some(LeaveOut {
            base_seq: list.seq,
            runs: left_out,
            rest: body.into(),
        }),
        ..EncodeOptions::default()
    })?;
    Ok(Some((bytes, left)))
}

/// The bases a host keeps, oldest dropped first once they take more than the budget.
#[derive(Debug)]
pub struct BaseCache {
    budget: u64,
    used: u64,
    next: u64,
    bases: HashMap<AgentId, (u64, Arc<Base>)>,
    /// Insertion order: (agent, insertion number); stale entries are skipped.
    order: VecDeque<(AgentId, u64)>,
}

impl BaseCache {
    /// A cache that keeps at most `budget` bytes of bases (0: none).
    pub fn new(budget: u64) -> BaseCache {
        BaseCache {
            budget,
            used: 0,
            next: 0,
            bases: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// Whether a base of these pages could be kept: not empty, within the budget, and few
    /// enough pages for a list. Asked before hashing pages that would be dropped anyway.
    pub fn fits(&self, pages: &PageMap) -> bool {
        pages.pages() > 0 && bytes_of(pages) <= self.budget && pages.pages() <= MAX_LISTED_PAGES
    }

    /// Keeps `base` for `agent`, in place of an earlier one. A base that does not
    /// [`fit`](BaseCache::fits) is not kept, nor one older than the base already kept.
    pub fn insert(&mut self, agent: AgentId, base: Arc<Base>) {
        if self.get(&agent).is_some_and(|kept| kept.seq() > base.seq()) {
            return;
        }
        self.remove(&agent);
        if !self.fits(&base.pages) {
            return;
        }
        self.used += base.bytes();
        self.next += 1;
        self.bases.insert(agent, (self.next, base));
        self.order.push_back((agent, self.next));
        while self.used > self.budget {
            let Some((oldest, n)) = self.order.pop_front() else {
                break;
            };
            if self.bases.get(&oldest).is_some_and(|(m, _)| *m == n) {
                self.remove(&oldest);
            }
        }
        if self.order.len() > 2 * self.bases.len() + 16 {
            let bases = &self.bases;
            self.order
                .retain(|(a, n)| bases.get(a).is_some_and(|(m, _)| m == n));
        }
    }

    /// The base kept for `agent`, if any.
    pub fn get(&self, agent: &AgentId) -> Option<Arc<Base>> {
        self.bases.get(agent).map(|(_, base)| base.clone())
    }

    /// Drops the base of `agent` (it arrived here again: its next departure makes a new one).
    pub fn remove(&mut self, agent: &AgentId) {
        if let Some((_, base)) = self.bases.remove(agent) {
            self.used -= base.bytes();
        }
    }

    /// Drops the base of `agent` if it is the one of hop `seq`.
    pub fn remove_seq(&mut self, agent: &AgentId, seq: u64) {
        if self.get(agent).is_some_and(|b| b.seq() == seq) {
            self.remove(agent);
        }
    }

    /// Bytes the kept bases take.
    pub fn used(&self) -> u64 {
        self.used
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::{DecodeOptions, ImageError, ImageLimits};
    use crate::modules::ModuleHash;
    use crate::snapshot::{InitialImage, PAGE_SIZE};

    const PAGES: usize = 64;

    /// An image of a 64-page memory whose pages hold `fill(page index)` (0: a zero page).
    fn image(fill: impl Fn(usize) -> u8) -> AgentImage {
        let mut memory = vec![0u8; PAGES * PAGE_SIZE];
        for (i, page) in memory.chunks_mut(PAGE_SIZE).enumerate() {
            page.fill(fill(i));
        }
        AgentImage {
            module: ModuleHash([3; 32]),
            memory_bytes: (PAGES * PAGE_SIZE) as u64,
            globals: Vec::new(),
            pages: PageMap::capture(&memory, &InitialImage::default()),
            context: crate::AgentContext::new("a", "alice", Vec::new(), Default::default()),
        }
    }

    fn kept(seq: u64, pages: PageMap) -> Base {
        Base::new(
            seq,
            pages,
            Binding {
                module: ModuleHash([3; 32]),
                owner: "alice".into(),
                home: "a".into(),
            },
        )
    }

    fn limits() -> ImageLimits {
        ImageLimits::default()
    }

    /// Decodes `bytes` with `base`'s pages at hand; says whether pages were filled in.
    fn decode_against(
        bytes: &bytes::Bytes,
        limits: &ImageLimits,
        base: Option<&Base>,
    ) -> Result<(AgentImage, bool), ImageError> {
        let options = DecodeOptions {
            limits: *limits,
            base: base.map(Base::as_base_pages),
            ..DecodeOptions::default()
        };
        AgentImage::decode(bytes.clone(), &options).map(|d| (d.image, d.filled_in))
    }

    #[test]
    fn a_return_visit_sends_only_the_changed_pages_and_restores_every_page() {
        // Left at hop 2 with pages 1..40 dirty; since then pages 5 and 6 changed, page 50
        // was written and page 39 was cleared.
        let before = image(|i| if (1..40).contains(&i) { i as u8 } else { 0 });
        let base = kept(2, before.pages.clone());
        let after = image(|i| match i {
            5 | 6 => 200,
            50 => 7,
            39 => 0,
            1..40 => i as u8,
            _ => 0,
        });
        let (bytes, left) = encode_against(&after, base.list(), None)
            .expect("encode")
            .expect("pages to leave out");
        assert_eq!(left, 36, "39 carried pages: 5 and 6 changed, 50 is new");
        // The source's own base of the same pages gives the same image without hashing again;
        // one of other pages is not used.
        for own in [kept(4, after.pages.clone()), kept(4, before.pages.clone())] {
            let again = encode_against(&after, base.list(), Some(&own)).expect("encode");
            assert_eq!(again, Some((bytes.clone(), left)));
        }
        let full = after
            .encode(EncodeOptions::default())
            .expect("encode")
            .to_vec();
        assert!(bytes.len() < full.len());
        assert_eq!(
            decode_against(&bytes.to_vec().into(), &limits(), Some(&base)),
            Ok((after.clone(), true))
        );
        // A plain decode, or one against another base, cannot fill the pages in.
        assert_eq!(
            decode_against(&bytes.to_vec().into(), &limits(), None).map(|(image, _)| image),
            Err(ImageError::NeedsBase(2))
        );
        let other = kept(3, before.pages.clone());
        assert_eq!(
            decode_against(&bytes.to_vec().into(), &limits(), Some(&other)),
            Err(ImageError::NeedsBase(2))
        );
        // A full image decodes with or without a base.
        assert_eq!(
            decode_against(&full.clone().into(), &limits(), Some(&base)),
            Ok((after, false))
        );
    }

    #[test]
    fn a_base_that_differs_from_the_list_is_a_refused_image_not_a_wrong_agent() {
        let before = image(|i| i as u8);
        let list = kept(2, before.pages.clone()).list().clone();
        let after = image(|i| if i == 9 { 99 } else { i as u8 });
        let (bytes, _) = encode_against(&after, &list, None)
            .expect("encode")
            .expect("pages to leave out");
        // The receiver's base of hop 2 is not what it listed: page 3 differs.
        let wrong = kept(2, image(|i| if i == 3 { 1 } else { i as u8 }).pages);
        assert_eq!(
            decode_against(&bytes.to_vec().into(), &limits(), Some(&wrong)),
            Err(ImageError::HashMismatch)
        );
        // A base lacking a left-out page.
        let short = kept(2, image(|i| if i < 10 { i as u8 } else { 0 }).pages);
        assert!(matches!(
            decode_against(&bytes.to_vec().into(), &limits(), Some(&short)),
            Err(ImageError::BadPages(_))
        ));
    }

    #[test]
    fn a_malformed_or_useless_list_leaves_nothing_out() {
        let img = image(|i| i as u8);
        let good = kept(1, img.pages.clone()).list().clone();
        let bad_lists = [
            BaseList {
                hashes: good.hashes[1..].to_vec(),
                ..good.clone()
            },
            BaseList {
                runs: vec![
                    PageRun { start: 9, count: 1 },
                    PageRun { start: 2, count: 1 },
                ],
                ..good.clone()
            },
            BaseList {
                runs: vec![PageRun {
                    start: u32::MAX,
                    count: u32::MAX,
                }],
                hashes: Vec::new(),
                seq: 1,
            },
            kept(1, image(|i| i as u8 ^ 0x80).pages).list().clone(),
        ];
        for list in bad_lists {
            assert_eq!(encode_against(&img, &list, None).expect("encode"), None);
        }
    }

    #[test]
    fn the_cache_keeps_the_newest_bases_within_its_budget() {
        let pages = image(|i| if i < 4 { 1 } else { 0 }).pages; // 4 pages
        let each = kept(0, pages.clone()).bytes();
        let mut cache = BaseCache::new(2 * each);
        let ids: Vec<AgentId> = (0..3u8).map(|i| AgentId([i; 16])).collect();
        for id in &ids {
            cache.insert(*id, Arc::new(kept(1, pages.clone())));
        }
        assert!(cache.get(&ids[0]).is_none(), "the oldest was dropped");
        assert!(cache.get(&ids[1]).is_some() && cache.get(&ids[2]).is_some());
        assert_eq!(cache.used(), 2 * each);
        // Replacing a base does not count it twice; removing frees it.
        cache.insert(ids[1], Arc::new(kept(2, pages.clone())));
        assert_eq!(cache.get(&ids[1]).map(|b| b.seq()), Some(2));
        assert_eq!(cache.used(), 2 * each);
        // An older base (a late insertion) does not replace a newer one.
        cache.insert(ids[1], Arc::new(kept(1, pages.clone())));
        assert_eq!(cache.get(&ids[1]).map(|b| b.seq()), Some(2));
        // A failed hop drops only the base it made.
        cache.remove_seq(&ids[1], 1);
        assert!(cache.get(&ids[1]).is_some());
        cache.remove_seq(&ids[1], 2);
        assert!(cache.get(&ids[1]).is_none());
        cache.remove(&ids[2]);
        assert_eq!(cache.used(), 0);
        // A budget of 0 keeps nothing.
        let mut none = BaseCache::new(0);
        none.insert(ids[0], Arc::new(kept(1, pages)));
        assert!(none.get(&ids[0]).is_none());
    }
}
