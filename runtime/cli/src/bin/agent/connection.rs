//! How a user reaches a host: its address and the user's certificate.

use agent_runtime::net::certs::{self, Role};
use agent_runtime::net::client::{Client, HostAddr};
use agent_runtime::net::tls::Credentials;
use anyhow::{Context as _, bail};
use std::path::{Path, PathBuf};

/// How to reach a host as a user.
#[derive(clap::Args, Clone)]
pub struct Connection {
    /// The host: its site name and UDP address.
    #[arg(
        long,
        value_name = "NAME@ADDR",
        default_value = "localhost@127.0.0.1:4433"
    )]
    pub host: HostAddr,
    /// Directory with ca.crt and user-NAME.crt/.key.
    #[arg(long, default_value = "agent-host-data/certs")]
    pub certs: PathBuf,
    /// User name (the certificate to use) [default: the only user certificate in --certs].
    #[arg(long)]
    pub user: Option<String>,
}

impl Connection {
    fn credentials(&self) -> anyhow::Result<Credentials> {
        let user = match &self.user {
            Some(u) => u.clone(),
            None => only_user(&self.certs)?,
        };
        let files = certs::files(&self.certs, Role::User, &user);
        Credentials::load(&certs::ca_files(&self.certs).cert, &files).with_context(|| {
            format!("no user certificate for {user} in {} (make one with `agent-host certs issue --dir DIR --user {user}`)", self.certs.display())
        })
    }

    /// Connects as the user.
    pub async fn connect(&self) -> anyhow::Result<Client> {
        let creds = self.credentials()?;
        Client::connect(&self.host, &creds)
            .await
            .map_err(client_error)
    }
}

/// A client error for the user. Its message already carries its cause, so it is kept as a
/// message rather than as a chain that `{:#}` would print twice.
pub fn client_error(e: agent_runtime::net::client::ClientError) -> anyhow::Error {
    anyhow::Error::msg(e)
}

fn only_user(dir: &Path) -> anyhow::Result<String> {
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    let users: Vec<String> = entries
        .flatten()
        .filter_map(|e| {
            e.file_name().to_str().and_then(|n| {
                n.strip_prefix("user-")?
                    .strip_suffix(".crt")
                    .map(str::to_string)
            })
        })
        .collect();
    match users.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!("no user certificate in {}", dir.display()),
        many => bail!(
            "several user certificates in {} ({}): choose one with --user",
            dir.display(),
            many.join(", ")
        ),
    }
}
