//! How an agent ended, and where that leaves it: data the home records and the launcher
//! hears (`LaunchEvent::Finished`), never words to recognise a kill or a limit by.

use crate::instance::AgentError;
use crate::limits::LimitExceeded;
use agent_abi::Outcome;
use serde::{Deserialize, Deserializer, Serialize};

#[derive(Deserialize)]
#[serde(untagged)]
enum Stored {
    Now(AgentEnd),
    Before(Version2),
}

/// An end as version 2 wrote it: the CBOR of the result, or why the agent failed.
#[derive(Deserialize)]
enum Version2 {
    Ok(serde_bytes::ByteBuf),
    Err(String),
}

/// Reads an agent's end as hosts of protocol version 2 stored it too (a held end, a report
/// in the outbox): CBOR of the result, or why it failed, in words.
pub(crate) fn read_stored<'de, D: Deserializer<'de>>(d: D) -> Result<AgentEnd, D::Error> {
    Ok(match Stored::deserialize(d)? {
        Stored::Now(end) => end,
        Stored::Before(Version2::Ok(bytes)) => AgentEnd::Finished(bytes.into_vec()),
        // That release said a kill only in these words.
        Stored::Before(Version2::Err(why)) if why == AgentError::Killed.to_string() => {
            AgentEnd::Killed
        }
        Stored::Before(Version2::Err(why)) => AgentEnd::Broken(why),
    })
}

/// How an agent ended: data, so that nobody recognises a kill or a limit from a message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentEnd {
    /// It returned: CBOR of its result.
    Finished(#[serde(with = "serde_bytes")] Vec<u8>),
    /// It returned an error.
    Failed(String),
    /// It panicked.
    Panicked(String),
    /// Its owner killed it.
    Killed,
    /// It tried to grow its memory past the limit.
    OutOfMemory {
        /// The limit in bytes.
        limit: u64,
        /// The size it asked for, in bytes.
        wanted: u64,
    },
    /// It used up its CPU budget.
    OutOfCpu {
        /// The budget.
        budget: std::time::Duration,
    },
    /// It recursed too deep.
    StackOverflow,
    /// It trapped, broke the ABI, or could not be restored or instantiated: why.
    Broken(String),
}

impl AgentEnd {
    /// Its result, if it finished.
    pub fn result(&self) -> Option<&[u8]> {
        match self {
            AgentEnd::Finished(bytes) => Some(bytes),
            _ => None,
        }
    }

    /// The state it leaves its agent in.
    pub fn state(&self) -> AgentState {
        match self {
            AgentEnd::Finished(_) => AgentState::Finished,
            AgentEnd::Killed => AgentState::Killed,
            _ => AgentState::Failed,
        }
    }

    /// Why it did not finish (the agent's error as the runtime says it), if it did not.
    pub fn error(&self) -> Option<String> {
        let error = match self {
            AgentEnd::Finished(_) => return None,
            AgentEnd::Failed(why) => AgentError::Failed(why.clone()),
            AgentEnd::Panicked(why) => AgentError::Panicked(why.clone()),
            AgentEnd::Killed => AgentError::Killed,
            AgentEnd::OutOfMemory { limit, wanted } => AgentError::Limit(LimitExceeded::Memory {
                limit: *limit,
                wanted: *wanted,
            }),
            AgentEnd::OutOfCpu { budget } => {
                AgentError::Limit(LimitExceeded::Cpu { budget: *budget })
            }
            AgentEnd::StackOverflow => AgentError::StackOverflow,
            AgentEnd::Broken(why) => return Some(why.clone()),
        };
        Some(error.to_string())
    }
}

impl From<&AgentError> for AgentEnd {
    fn from(error: &AgentError) -> AgentEnd {
        match error {
            AgentError::Failed(why) => AgentEnd::Failed(why.clone()),
            AgentError::Panicked(why) => AgentEnd::Panicked(why.clone()),
            AgentError::Killed => AgentEnd::Killed,
            AgentError::Limit(LimitExceeded::Memory { limit, wanted }) => AgentEnd::OutOfMemory {
                limit: *limit,
                wanted: *wanted,
            },
            AgentError::Limit(LimitExceeded::Cpu { budget }) => {
                AgentEnd::OutOfCpu { budget: *budget }
            }
            AgentError::StackOverflow => AgentEnd::StackOverflow,
            other => AgentEnd::Broken(other.to_string()),
        }
    }
}

impl From<Outcome> for AgentEnd {
    fn from(outcome: Outcome) -> AgentEnd {
        match outcome {
            Outcome::Ok(bytes) => AgentEnd::Finished(bytes),
            Outcome::Err(why) => AgentEnd::Failed(why),
            Outcome::Panicked(why) => AgentEnd::Panicked(why),
        }
    }
}

/// Where an agent is in its life, as its home host knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentState {
    /// It runs, sleeps or travels.
    Running,
    /// It returned a result.
    Finished,
    /// It failed: an error, a panic, a trap or a limit.
    Failed,
    /// Its owner killed it.
    Killed,
}

impl AgentState {
    /// How the CLI and the JSON views name it.
    pub fn as_str(self) -> &'static str {
        match self {
            AgentState::Running => "running",
            AgentState::Finished => "finished",
            AgentState::Failed => "failed",
            AgentState::Killed => "killed",
        }
    }
}

impl std::fmt::Display for AgentState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::messages::LaunchEvent;
    use serde::Serialize;

    /// A finished event as protocol version 2 wrote it.
    #[derive(Serialize)]
    enum StoredBefore {
        Finished {
            site: String,
            hops: u64,
            outcome: Version2,
        },
    }

    /// Its outcome: serde writes a `Result` as this enum.
    #[derive(Serialize)]
    enum Version2 {
        Ok(serde_bytes::ByteBuf),
        Err(String),
    }

    fn read_back(outcome: Version2) -> AgentEnd {
        let before = StoredBefore::Finished {
            site: "siteB".into(),
            hops: 2,
            outcome,
        };
        let mut bytes = Vec::new();
        ciborium::into_writer(&before, &mut bytes).unwrap();
        match ciborium::from_reader(bytes.as_slice()).unwrap() {
            LaunchEvent::Finished {
                outcome, hops: 2, ..
            } => outcome,
            other => panic!("read back as {other:?}"),
        }
    }

    #[test]
    fn an_end_stored_by_the_release_before_reads_back_as_what_it_was() {
        let result = serde_bytes::ByteBuf::from(vec![0xf5]);
        assert_eq!(
            read_back(Version2::Ok(result)),
            AgentEnd::Finished(vec![0xf5])
        );
        let killed = AgentError::Killed.to_string();
        assert_eq!(read_back(Version2::Err(killed)), AgentEnd::Killed);
        let failed = "agent failed: no corpus".to_string();
        let broken = AgentEnd::Broken(failed.clone());
        assert_eq!(read_back(Version2::Err(failed)), broken);
    }

    #[test]
    fn every_end_reads_back_as_it_was_written() {
        let ends = [
            AgentEnd::Finished(vec![1, 2]),
            AgentEnd::Failed("no".into()),
            AgentEnd::Panicked("oops".into()),
            AgentEnd::Killed,
            AgentEnd::OutOfMemory {
                limit: 1,
                wanted: 2,
            },
            AgentEnd::OutOfCpu {
                budget: std::time::Duration::from_millis(5),
            },
            AgentEnd::StackOverflow,
            AgentEnd::Broken("trap".into()),
        ];
        for outcome in ends {
            let event = LaunchEvent::Finished {
                site: "a".into(),
                hops: 0,
                outcome: outcome.clone(),
            };
            let mut bytes = Vec::new();
            ciborium::into_writer(&event, &mut bytes).unwrap();
            let back: LaunchEvent = ciborium::from_reader(bytes.as_slice()).unwrap();
            assert_eq!(back, event);
        }
    }
}
