//! The resource segment: services a site offers its agents, bound on arrival by name.
//!
//! Requests and responses cross the sandbox as bounded CBOR. Services never move with an
//! agent; each host answers with its own.

use agent_abi::CallError;
use agent_abi::services::{CORPUS, CorpusHit, CorpusQuery, CorpusReply, HOST_INFO, HostInfo};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// Largest service request or response, in bytes.
pub const MAX_CALL_BYTES: usize = 1 << 20;

/// Most hits one corpus query returns.
pub const MAX_HITS: u32 = 1000;

/// A site: a name and the services bound to agents that run there.
#[derive(Debug)]
pub struct Site {
    name: String,
    corpus: Corpus,
}

impl Site {
    /// A site serving `corpus`.
    pub fn new(name: &str, corpus: Corpus) -> Site {
        Site {
            name: name.to_string(),
            corpus,
        }
    }

    /// The site's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The site's corpus.
    pub fn corpus(&self) -> &Corpus {
        &self.corpus
    }

    /// The services worth asking for here, as placement filters on them: host facts always,
    /// the corpus when it holds documents.
    pub fn services(&self) -> Vec<String> {
        let mut offered = vec![HOST_INFO.to_string()];
        if !self.corpus.docs.is_empty() {
            offered.push(CORPUS.to_string());
        }
        offered
    }

    /// Answers one service call.
    ///
    /// # Errors
    /// [`CallError`] for an unknown service, an undecodable or oversized request, or a
    /// response over [`MAX_CALL_BYTES`].
    pub fn call(&self, service: &str, request: &[u8]) -> Result<Vec<u8>, CallError> {
        if request.len() > MAX_CALL_BYTES {
            return Err(CallError::TooLarge {
                limit: MAX_CALL_BYTES as u64,
            });
        }
        let reply = match service {
            CORPUS => {
                let query: CorpusQuery = decode(request)?;
                encode(&self.corpus.search(&query.query, query.limit.min(MAX_HITS)))
            }
            HOST_INFO => encode(&HostInfo {
                site: self.name.clone(),
                arch: std::env::consts::ARCH.to_string(),
                os: std::env::consts::OS.to_string(),
                runtime: env!("CARGO_PKG_VERSION").to_string(),
                documents: self.corpus.docs.len() as u64,
            }),
            other => return Err(CallError::UnknownService(other.to_string())),
        };
        if reply.len() > MAX_CALL_BYTES {
            return Err(CallError::TooLarge {
                limit: MAX_CALL_BYTES as u64,
            });
        }
        Ok(reply)
    }
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, CallError> {
    ciborium::de::from_reader_with_recursion_limit(bytes, 32)
        .map_err(|e| CallError::BadRequest(e.to_string()))
}

fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    let mut out = Vec::new();
    // Encoding into a Vec cannot fail for these plain data types.
    let _ = ciborium::into_writer(value, &mut out);
    out
}

/// A directory of text documents, indexed by word for search.
#[derive(Debug, Default)]
pub struct Corpus {
    docs: Vec<Document>,
    /// word → (document, line index), in document order.
    index: HashMap<String, Vec<(u32, u32)>>,
}

#[derive(Debug)]
struct Document {
    path: String,
    lines: Vec<String>,
}

/// Words of a text, lower-cased; what both documents and queries are split into.
fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
}

impl Corpus {
    /// An empty corpus.
    pub fn empty() -> Corpus {
        Corpus::default()
    }

    /// Loads every text file under `dir` (recursively, in path order).
    ///
    /// # Errors
    /// When `dir` cannot be read, with the path in the message.
    pub fn load(dir: &Path) -> std::io::Result<Corpus> {
        let mut files = Vec::new();
        collect_files(dir, &mut files)?;
        files.sort();
        let mut corpus = Corpus::default();
        for file in files {
            let bytes = std::fs::read(&file).map_err(|e| annotate(&file, e))?;
            if bytes.contains(&0) {
                continue; // binary file
            }
            let rel = file
                .strip_prefix(dir)
                .unwrap_or(&file)
                .to_string_lossy()
                .replace('\\', "/");
            corpus.add(&rel, &String::from_utf8_lossy(&bytes));
        }
        Ok(corpus)
    }

    /// Adds a document.
    pub fn add(&mut self, path: &str, text: &str) {
        let doc = self.docs.len() as u32;
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        for (n, line) in lines.iter().enumerate() {
            for word in words(line).collect::<BTreeSet<_>>() {
                self.index.entry(word).or_default().push((doc, n as u32));
            }
        }
        self.docs.push(Document {
            path: path.to_string(),
            lines,
        });
    }

    /// Number of documents.
    pub fn len(&self) -> usize {
        self.docs.len()
    }

    /// Whether the corpus has no documents.
    pub fn is_empty(&self) -> bool {
        self.docs.is_empty()
    }

    /// Lines containing every word of `query`, in document order, at most `limit`.
    pub fn search(&self, query: &str, limit: u32) -> CorpusReply {
        let terms: BTreeSet<String> = words(query).collect();
        let mut postings: Vec<&Vec<(u32, u32)>> = Vec::new();
        for term in &terms {
            match self.index.get(term) {
                Some(p) => postings.push(p),
                None => return CorpusReply::default(),
            }
        }
        postings.sort_by_key(|p| p.len());
        let Some((first, rest)) = postings.split_first() else {
            return CorpusReply::default();
        };
        let mut reply = CorpusReply::default();
        for at in first
            .iter()
            .filter(|at| rest.iter().all(|p| p.binary_search(at).is_ok()))
        {
            if reply.hits.len() as u32 >= limit {
                reply.truncated = true;
                break;
            }
            let doc = &self.docs[at.0 as usize];
            reply.hits.push(CorpusHit {
                doc: doc.path.clone(),
                line: at.1 + 1,
                text: doc.lines[at.1 as usize].trim().to_string(),
            });
        }
        reply
    }
}

fn annotate(path: &Path, e: std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir).map_err(|e| annotate(dir, e))? {
        let entry = entry.map_err(|e| annotate(dir, e))?;
        let path = entry.path();
        if entry.file_type().map_err(|e| annotate(&path, e))?.is_dir() {
            collect_files(&path, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_finds_lines_with_every_word() {
        let mut c = Corpus::empty();
        c.add(
            "a.txt",
            "The quick brown fox\njumps over the lazy dog\nA fox, quick!",
        );
        c.add("b.txt", "no match here\nquick fox");
        let r = c.search("Quick FOX", 10);
        let found: Vec<_> = r.hits.iter().map(|h| (h.doc.as_str(), h.line)).collect();
        assert_eq!(found, [("a.txt", 1), ("a.txt", 3), ("b.txt", 2)]);
        assert!(!r.truncated);
        let r = c.search("quick fox", 2);
        assert_eq!(r.hits.len(), 2);
        assert!(r.truncated);
        assert!(c.search("fox unicorn", 10).hits.is_empty());
        assert!(c.search("", 10).hits.is_empty());
    }

    #[test]
    fn calls_are_checked() {
        let site = Site::new("s", Corpus::empty());
        assert_eq!(
            site.call("nope", &[]),
            Err(CallError::UnknownService("nope".into()))
        );
        assert!(matches!(
            site.call(CORPUS, b"\xff\xff"),
            Err(CallError::BadRequest(_))
        ));
        let big = vec![0u8; MAX_CALL_BYTES + 1];
        assert_eq!(
            site.call(CORPUS, &big),
            Err(CallError::TooLarge {
                limit: MAX_CALL_BYTES as u64
            })
        );
        let info: HostInfo =
            decode(&site.call(HOST_INFO, &encode(&())).unwrap_or_default()).unwrap();
        assert_eq!(info.arch, std::env::consts::ARCH);
    }
}
