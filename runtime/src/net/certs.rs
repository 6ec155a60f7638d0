//! The private CA: create it, issue host and user certificates, and read identities back.
//!
//! A certificate's subject carries the name (CN) and the role (OU `agent-host` or
//! `agent-user`); host certificates also carry the site name as a DNS name, which is what a
//! host dialling a peer verifies. Private keys are written with mode 0600 and never leave the
//! machine that made them.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use std::fmt;
use std::path::{Path, PathBuf};
use time::{Duration, OffsetDateTime};

/// What a certificate allows its holder to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Role {
    /// A host: may transfer agents to other hosts.
    Host,
    /// A user: may launch, inspect and kill their own agents.
    User,
}

impl Role {
    fn unit(self) -> &'static str {
        match self {
            Role::Host => "agent-host",
            Role::User => "agent-user",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Host => "host",
            Role::User => "user",
        })
    }
}

/// Who is at the other end of a connection, as proven by its certificate.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Identity {
    /// Site name (hosts) or user name (users).
    pub name: String,
    /// The role.
    pub role: Role,
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.role, self.name)
    }
}

/// Errors of certificate handling.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// rcgen failed.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// A certificate could not be parsed or lacks the fields we need.
    #[error("bad certificate: {0}")]
    Bad(String),
    /// A name unusable as a site or user name.
    #[error(
        "bad name `{0}`: use letters, digits, `-` and `.` (`any` and `least-loaded` are reserved for places)"
    )]
    BadName(String),
    /// `certs init` on a directory that already has a CA.
    #[error("{0} already holds a CA; remove it first or use another directory")]
    Exists(PathBuf),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CertError + '_ {
    move |source| CertError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Checks a site or user name: it becomes a DNS name and a file name.
pub fn check_name(name: &str) -> Result<(), CertError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        && !name.starts_with(['-', '.'])
        // Reserved for places in itineraries (`agent_abi::Place`).
        && !matches!(name, "any" | "least-loaded");
    if ok {
        Ok(())
    } else {
        Err(CertError::BadName(name.to_string()))
    }
}

/// The files of one certificate and its key inside a certificate directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertFiles {
    /// PEM certificate.
    pub cert: PathBuf,
    /// PEM private key (mode 0600).
    pub key: PathBuf,
}

/// Where the CA and each issued certificate live in `dir`.
pub fn ca_files(dir: &Path) -> CertFiles {
    CertFiles {
        cert: dir.join("ca.crt"),
        key: dir.join("ca.key"),
    }
}

/// Where the certificate of `name` in `role` lives in `dir`.
pub fn files(dir: &Path, role: Role, name: &str) -> CertFiles {
    let stem = format!("{role}-{name}");
    CertFiles {
        cert: dir.join(format!("{stem}.crt")),
        key: dir.join(format!("{stem}.key")),
    }
}

fn write_key(path: &Path, pem: &str) -> Result<(), CertError> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut file = options.open(path).map_err(io(path))?;
    file.write_all(pem.as_bytes()).map_err(io(path))
}

/// Creates a private CA in `dir` (`ca.crt`, `ca.key`).
///
/// # Errors
/// When `dir` already has a CA or cannot be written.
pub fn init_ca(dir: &Path) -> Result<CertFiles, CertError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let files = ca_files(dir);
    if files.cert.exists() || files.key.exists() {
        return Err(CertError::Exists(dir.to_path_buf()));
    }
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    // A unique name, so a certificate of another CA is reported as an unknown issuer.
    dn.push(
        DnType::CommonName,
        format!(
            "agent runtime private CA {}",
            crate::context::AgentId::random()
        ),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(3650);
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    write_key(&files.key, &key.serialize_pem())?;
    std::fs::write(&files.cert, cert.pem()).map_err(io(&files.cert))?;
    Ok(files)
}

/// How long an issued certificate is valid, relative to now.
#[derive(Clone, Copy, Debug)]
pub struct Validity {
    /// Start, relative to now (negative: in the past).
    pub from: Duration,
    /// End, relative to now.
    pub until: Duration,
}

impl Default for Validity {
    fn default() -> Self {
        Validity {
            from: Duration::hours(-1),
            until: Duration::days(825),
        }
    }
}

/// Issues a certificate for `name` in `role`, signed by the CA in `ca_dir`, into `out_dir`.
///
/// # Errors
/// When the CA cannot be read, the name is unusable, or files cannot be written.
pub fn issue(
    ca_dir: &Path,
    out_dir: &Path,
    role: Role,
    name: &str,
    validity: Validity,
) -> Result<CertFiles, CertError> {
    check_name(name)?;
    let ca = ca_files(ca_dir);
    let ca_cert = std::fs::read_to_string(&ca.cert).map_err(io(&ca.cert))?;
    let ca_key = KeyPair::from_pem(&std::fs::read_to_string(&ca.key).map_err(io(&ca.key))?)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_cert, ca_key)?;

    let sans = match role {
        Role::Host => vec![name.to_string()],
        Role::User => Vec::new(),
    };
    let mut params = CertificateParams::new(sans)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn.push(DnType::OrganizationalUnitName, role.unit());
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = match role {
        Role::Host => vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
        Role::User => vec![ExtendedKeyUsagePurpose::ClientAuth],
    };
    let now = OffsetDateTime::now_utc();
    params.not_before = now + validity.from;
    params.not_after = now + validity.until;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;

    std::fs::create_dir_all(out_dir).map_err(io(out_dir))?;
    // A host or user given this directory also needs the CA's certificate (never its key)
    // to check its peers.
    let out_ca = ca_files(out_dir).cert;
    match std::fs::read_to_string(&out_ca) {
        Ok(there) if there != ca_cert => {
            return Err(CertError::Bad(format!(
                "{} is another CA's certificate: give --out a directory of this CA",
                out_ca.display()
            )));
        }
        Ok(_) => {}
        Err(_) => std::fs::write(&out_ca, &ca_cert).map_err(io(&out_ca))?,
    }
    let files = files(out_dir, role, name);
    write_key(&files.key, &key.serialize_pem())?;
    std::fs::write(&files.cert, cert.pem()).map_err(io(&files.cert))?;
    Ok(files)
}

/// Reads the identity (name and role) from a DER certificate that rustls already verified.
///
/// # Errors
/// [`CertError::Bad`] when it lacks a CN or a known role.
pub fn identity(der: &[u8]) -> Result<Identity, CertError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| CertError::Bad(e.to_string()))?;
    let subject = cert.subject();
    let first = |attrs: &mut dyn Iterator<Item = &x509_parser::x509::AttributeTypeAndValue<'_>>| {
        attrs
            .next()
            .and_then(|a| a.as_str().ok())
            .map(str::to_string)
    };
    let name = first(&mut subject.iter_common_name())
        .ok_or_else(|| CertError::Bad("no common name".into()))?;
    let role = match first(&mut subject.iter_organizational_unit()).as_deref() {
        Some("agent-host") => Role::Host,
        Some("agent-user") => Role::User,
        other => {
            return Err(CertError::Bad(format!(
                "no agent role in the certificate (OU {other:?})"
            )));
        }
    };
    check_name(&name)?;
    Ok(Identity { name, role })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_carry_name_and_role_and_keys_are_private() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path()).unwrap();
        assert!(matches!(init_ca(dir.path()), Err(CertError::Exists(_))));
        let host = issue(
            dir.path(),
            dir.path(),
            Role::Host,
            "siteA",
            Validity::default(),
        )
        .unwrap();
        let user = issue(
            dir.path(),
            dir.path(),
            Role::User,
            "alice",
            Validity::default(),
        )
        .unwrap();
        for (files, expected) in [
            (
                &host,
                Identity {
                    name: "siteA".into(),
                    role: Role::Host,
                },
            ),
            (
                &user,
                Identity {
                    name: "alice".into(),
                    role: Role::User,
                },
            ),
        ] {
            let pem = std::fs::read(&files.cert).unwrap_or_default();
            let der = rustls::pki_types::CertificateDer::from_pem_slice(&pem).unwrap();
            assert_eq!(identity(&der).unwrap(), expected);
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(&files.key)
                    .map(|m| m.permissions().mode() & 0o777)
                    .unwrap_or(0);
                assert_eq!(mode, 0o600);
            }
        }
        assert!(matches!(
            issue(
                dir.path(),
                dir.path(),
                Role::Host,
                "../evil",
                Validity::default()
            ),
            Err(CertError::BadName(_))
        ));
    }

    use rustls::pki_types::pem::PemObject;
}
