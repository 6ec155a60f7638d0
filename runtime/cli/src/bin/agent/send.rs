//! `agent send`: a message to one of your agents, wherever it is.

use crate::connection::{Connection, client_error};
use agent_runtime::AgentId;
use agent_runtime::net::client::{ClientError, Mailer};
use anyhow::{Context as _, bail};
use std::time::Duration;

/// Tries of one message when the connection fails; a message sent again is held once.
const TRIES: u32 = 3;

/// How long one try waits for the home's answer: a home that went away mid-request sends
/// nothing back, and its connection would take the idle timeout to fail.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);

/// The message's CBOR: `text` as a string, or the JSON value `json`.
pub fn body(text: Option<&str>, json: Option<&str>) -> anyhow::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    match (text, json) {
        (_, Some(json)) => {
            let value: serde_json::Value =
                serde_json::from_str(json).context("--json takes a JSON value")?;
            ciborium::into_writer(&value, &mut bytes)?;
        }
        (Some(text), None) => ciborium::into_writer(text, &mut bytes)?,
        (None, None) => bail!("give the message as TEXT or --json VALUE"),
    }
    if bytes.len() > agent_abi::MAX_MAIL {
        let limit = agent_abi::MAX_MAIL;
        bail!(
            "the message is {} bytes encoded; a message may be at most {limit}",
            bytes.len()
        );
    }
    Ok(bytes)
}

/// Sends `body` to `agent` through its home host; tries again, as the same message, when
/// the connection fails.
pub async fn send(conn: &Connection, agent: AgentId, body: Vec<u8>) -> anyhow::Result<()> {
    let mut mailer = Mailer::new();
    let mut tried = 0;
    loop {
        tried += 1;
        let sent = match conn.connect().await {
            Ok(client) => {
                let sent = client.send_message(&mut mailer, agent, body.clone());
                let sent = tokio::time::timeout(ANSWER_WITHIN, sent).await;
                client.close().await;
                match sent {
                    Ok(sent) => sent.map_err(|e| match e {
                        ClientError::Refused(r) => Err(client_error(ClientError::Refused(r))),
                        other => Ok(client_error(other)),
                    }),
                    Err(_) => Err(Ok(anyhow::anyhow!(
                        "no answer from the home host within {ANSWER_WITHIN:?}"
                    ))),
                }
            }
            Err(e) => Err(Ok(e)),
        };
        match sent {
            Ok(()) => {
                eprintln!("sent to agent {agent}");
                return Ok(());
            }
            Err(Err(refused)) => return Err(refused),
            Err(Ok(failed)) if tried < TRIES => {
                eprintln!("warning: {failed:#}; trying again");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(Ok(failed)) => return Err(failed),
        }
    }
}
