//! Mutually authenticated QUIC: quinn endpoints whose TLS 1.3 configuration trusts only the
//! private CA, requires a client certificate, and names our protocol in ALPN.

use super::certs::{self, CertFiles, Identity};
use super::quota::{HOST_STREAMS, HOST_WINDOW, USER_STREAMS, USER_WINDOW};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// ALPN protocol id: our protocol and its version. A host or client of another version fails
/// the handshake (TLS alert 120) instead of exchanging messages it reads differently
/// (docs/protocol.md says what each version changed).
pub const ALPN: &[u8] = b"wasm-agents/7";

/// The TLS alert a peer sends when it speaks none of the protocols offered in ALPN.
const NO_APPLICATION_PROTOCOL: u8 = 120;

/// Says what failed when a connection could not be made, and why when the peer speaks
/// another version of the protocol.
pub fn connect_error(e: &quinn::ConnectionError) -> String {
    let code = match e {
        quinn::ConnectionError::ConnectionClosed(close) => Some(close.error_code),
        quinn::ConnectionError::TransportError(error) => Some(error.code),
        _ => None,
    };
    match code == Some(quinn::TransportErrorCode::crypto(NO_APPLICATION_PROTOCOL)) {
        true => format!(
            "{e}: the peer speaks another version of the protocol than {} (hosts and their \
             users must run one release)",
            String::from_utf8_lossy(ALPN)
        ),
        false => e.to_string(),
    }
}

/// Errors setting up TLS.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// What failed.
        source: rustls::pki_types::pem::Error,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    /// A verifier of certificates could not be built.
    #[error("TLS configuration: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// The configuration offers QUIC no cipher suite.
    #[error("TLS configuration: {0}")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
}

/// A CA to trust and a certificate to present.
#[derive(Debug)]
pub struct Credentials {
    roots: Arc<rustls::RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Clone for Credentials {
    fn clone(&self) -> Self {
        Credentials {
            roots: self.roots.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

fn read_err(path: &Path) -> impl FnOnce(rustls::pki_types::pem::Error) -> TlsError + '_ {
    move |source| TlsError::Read {
        path: path.display().to_string(),
        source,
    }
}

impl Credentials {
    /// Loads the CA certificate and a certificate/key pair from PEM files.
    ///
    /// # Errors
    /// When a file is missing or not PEM of the right kind.
    pub fn load(ca: &Path, files: &CertFiles) -> Result<Credentials, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca).map_err(read_err(ca))? {
            roots.add(cert.map_err(read_err(ca))?)?;
        }
        let chain = CertificateDer::pem_file_iter(&files.cert)
            .map_err(read_err(&files.cert))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(read_err(&files.cert))?;
        let key = PrivateKeyDer::from_pem_file(&files.key).map_err(read_err(&files.key))?;
        Ok(Credentials {
            roots: Arc::new(roots),
            chain,
            key,
        })
    }

    /// The identity in our own certificate.
    ///
    /// # Errors
    /// When our certificate lacks a name or role.
    pub fn identity(&self) -> Result<Identity, certs::CertError> {
        let first = self
            .chain
            .first()
            .ok_or_else(|| certs::CertError::Bad("empty certificate file".into()))?;
        certs::identity(first)
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Flow-control windows sized so multi-MiB images stream without stalling; `streams` is how
/// many streams the peer may open at once, `window` how many bytes it may send ahead of what
/// was read on all of them.
///
/// `segmentation_offload: false` sends datagrams one by one instead of as GSO batches: needed
/// when a peer is a big-endian host under qemu-user, which mis-reads the coalesced batches it
/// receives (seen with s390x: handshakes work, bulk transfers stall until the idle timeout).
fn transport(segmentation_offload: bool, streams: u32, window: u32) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.stream_receive_window(quinn::VarInt::from_u32(32 << 20))
        .receive_window(quinn::VarInt::from_u32(window))
        .send_window(128 << 20)
        .max_concurrent_bidi_streams(quinn::VarInt::from_u32(streams))
        .keep_alive_interval(Some(Duration::from_secs(5)))
        .enable_segmentation_offload(segmentation_offload);
    if let Ok(idle) = quinn::IdleTimeout::try_from(Duration::from_secs(30)) {
        t.max_idle_timeout(Some(idle));
    }
    Arc::new(t)
}

/// Server side: only clients with a certificate from the CA get in. See [`transport`] for
/// `segmentation_offload`. A client may open [`USER_STREAMS`] streams at once and send
/// [`USER_WINDOW`] bytes ahead until the server raises both for a host it identified.
///
/// # Errors
/// When rustls rejects the certificate or key.
pub fn server_config(
    creds: &Credentials,
    segmentation_offload: bool,
) -> Result<quinn::ServerConfig, TlsError> {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        creds.roots.clone(),
        provider(),
    )
    .build()?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(creds.chain.clone(), creds.key.clone_key())?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(transport(segmentation_offload, USER_STREAMS, USER_WINDOW));
    Ok(config)
}

/// The name a host dials when it knows only an address (`--join ADDR`): the server's
/// certificate must then be from the CA and valid for the name it carries, whatever that
/// is; the caller reads the name (and checks the role) from the connection.
pub const ANY_HOST: &str = "any-host.invalid";

/// Verifies servers as webpki does, for the name dialled, except for [`ANY_HOST`]: then
/// for the name in the certificate itself.
#[derive(Debug)]
struct ServerVerifier {
    webpki: Arc<rustls::client::WebPkiServerVerifier>,
}

impl rustls::client::danger::ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let any = matches!(server_name, ServerName::DnsName(n) if n.as_ref() == ANY_HOST);
        if !any {
            let webpki = &self.webpki;
            return webpki.verify_server_cert(
                end_entity,
                intermediates,
                server_name,
                ocsp_response,
                now,
            );
        }
        let bad = |e: String| rustls::Error::General(format!("the host's certificate: {e}"));
        let identity = certs::identity(end_entity).map_err(|e| bad(e.to_string()))?;
        let named = ServerName::try_from(identity.name).map_err(|e| bad(e.to_string()))?;
        (self.webpki).verify_server_cert(end_entity, intermediates, &named, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// Client side: the server must present a certificate from the CA for the name dialled
/// (or, dialling [`ANY_HOST`], for the name it carries). See [`transport`] for
/// `segmentation_offload`.
///
/// # Errors
/// When rustls rejects the certificate or key.
pub fn client_config(
    creds: &Credentials,
    segmentation_offload: bool,
) -> Result<quinn::ClientConfig, TlsError> {
    let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
        creds.roots.clone(),
        provider(),
    )
    .build()?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ServerVerifier { webpki }))
        .with_client_auth_cert(creds.chain.clone(), creds.key.clone_key())?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(transport(segmentation_offload, HOST_STREAMS, HOST_WINDOW));
    Ok(config)
}

/// The verified identity of the peer of `conn`.
///
/// # Errors
/// When the peer presented no certificate or one without our fields.
pub fn peer_identity(conn: &quinn::Connection) -> Result<Identity, certs::CertError> {
    let certs = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or_else(|| certs::CertError::Bad("the peer presented no certificate".into()))?;
    let first = certs
        .first()
        .ok_or_else(|| certs::CertError::Bad("the peer presented no certificate".into()))?;
    certs::identity(first)
}
