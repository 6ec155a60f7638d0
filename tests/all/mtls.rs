//! Every connection is mutually authenticated against the private CA: the wrong certificates
//! are refused with a clear message, and the host keeps serving.

use agent_e2e::Cluster;
use agent_e2e::block_on;
use agent_runtime::net::certs::{self, Role, Validity};
use agent_runtime::net::client::{Client, HostAddr};
use agent_runtime::net::messages::{Offer, OfferReply, Request};
use agent_runtime::net::tls::{self, Credentials};
use agent_runtime::{AgentId, ModuleHash};
use std::sync::Arc;

fn creds(ca_dir: &std::path::Path, dir: &std::path::Path, role: Role, name: &str) -> Credentials {
    Credentials::load(
        &certs::ca_files(ca_dir).cert,
        &certs::files(dir, role, name),
    )
    .unwrap()
}

/// Connects and makes one request; the error a refused client sees.
async fn list_as(host: &HostAddr, creds: &Credentials) -> Result<(), String> {
    let client = Client::connect(host, creds)
        .await
        .map_err(|e| e.to_string())?;
    let result = client.list().await.map(|_| ()).map_err(|e| e.to_string());
    client.close().await;
    result
}

/// Hosts siteA and siteB, the CA's directory, siteA's address, and user alice's credentials.
fn site_a() -> (Cluster, std::path::PathBuf, HostAddr, Credentials) {
    let up: &[&str] = &[];
    let cluster = Cluster::start(&["siteA", "siteB"], &[("siteA", up)]);
    let certs_dir = cluster.certs();
    let host = HostAddr {
        name: "siteA".into(),
        addr: cluster.addrs["siteA"],
    };
    let alice = creds(&certs_dir, &certs_dir, Role::User, "alice");
    (cluster, certs_dir, host, alice)
}

#[test]
fn wrong_certificates_are_refused_and_the_host_keeps_serving() {
    let (cluster, certs_dir, host, alice) = site_a();

    block_on(async {
        // A certificate from another CA.
        let other = cluster.dir.path().join("other-ca");
        certs::init_ca(&other).unwrap();
        certs::issue(&other, &other, Role::User, "mallory", Validity::default()).unwrap();
        let foreign = creds(&certs_dir, &other, Role::User, "mallory");
        let e = list_as(&host, &foreign)
            .await
            .expect_err("a foreign CA's certificate must be refused");
        assert!(
            e.starts_with("the host refused our certificate:")
                && e.contains("invalid peer certificate: UnknownIssuer"),
            "{e}"
        );

        // An expired certificate from the right CA.
        let old = cluster.dir.path().join("old");
        let expired = Validity {
            from: time::Duration::days(-30),
            until: time::Duration::days(-1),
        };
        certs::issue(&certs_dir, &old, Role::User, "alice", expired).unwrap();
        let e = list_as(&host, &creds(&certs_dir, &old, Role::User, "alice"))
            .await
            .expect_err("an expired certificate must be refused");
        assert!(
            e.starts_with("the host refused our certificate:") && e.contains("certificate expired"),
            "{e}"
        );

        // No client certificate at all.
        let e = no_client_cert(&host, &certs_dir)
            .await
            .expect_err("a client without a certificate must be refused");
        assert!(e.contains("peer sent no certificates"), "{e}");

        // A host certificate whose name is not the site dialled.
        let wrong_name = HostAddr {
            name: "siteB".into(),
            addr: cluster.addrs["siteA"],
        };
        let e = list_as(&wrong_name, &alice)
            .await
            .expect_err("a host answering with another name must be refused");
        assert!(e.contains(r#"certificate not valid for name "siteB"; certificate is only valid for DnsName("siteA")"#), "{e}");

        // A user certificate trying a host-only transfer.
        let client = Client::connect(&host, &alice).await.unwrap();
        let offer = Offer {
            agent: AgentId([9; 16]),
            seq: 1,
            module: ModuleHash([1; 32]),
            module_bytes: 10,
            memory_bytes: 1 << 16,
            image_bytes: 10,
            abi: agent_abi::ABI_VERSION,
            owner: "alice".into(),
            home: "siteA".into(),
            image_follows: false,
        };
        let reply: OfferReply = client.request(&Request::Hop(offer)).await.unwrap();
        assert_eq!(
            reply,
            OfferReply::Refuse(
                "only hosts may transfer agents, and user alice is not a host".into()
            )
        );
        client.close().await;

        // After all that, the host still serves a legitimate user.
        list_as(&host, &alice)
            .await
            .expect("the host stopped serving");
    });
}

/// A QUIC client that trusts the CA but presents no certificate.
async fn no_client_cert(host: &HostAddr, certs_dir: &std::path::Path) -> Result<(), String> {
    let mut tls = rustls::ClientConfig::builder_with_provider(ring())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots(certs_dir))
        .with_no_client_auth();
    tls.alpn_protocols = vec![tls::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| e.to_string())?;
    let mut endpoint = quinn::Endpoint::client(
        "127.0.0.1:0"
            .parse()
            .map_err(|e: std::net::AddrParseError| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    let conn = endpoint
        .connect(host.addr, &host.name)
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    agent_runtime::net::wire::write_msg(&mut send, &Request::List)
        .await
        .map_err(|e| e.to_string())?;
    let reply: Result<agent_runtime::net::messages::ListReply, String> =
        agent_runtime::net::wire::read_msg(&mut recv)
            .await
            .map_err(|e| match conn.close_reason() {
                Some(reason) => reason.to_string(),
                None => e.to_string(),
            });
    reply.map(|_| ())
}

/// The certificates in a PEM file.
fn pem_certs(path: &std::path::Path) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .unwrap()
}

/// A certificate chain and key from PEM files.
fn pem(
    files: &certs::CertFiles,
) -> (
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
) {
    use rustls::pki_types::PrivateKeyDer;
    use rustls::pki_types::pem::PemObject;
    let key = PrivateKeyDer::from_pem_file(&files.key).unwrap();
    (pem_certs(&files.cert), key)
}

/// The roots a client trusts: the CA's certificate under `certs_dir`.
fn roots(certs_dir: &std::path::Path) -> Arc<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in pem_certs(&certs::ca_files(certs_dir).cert) {
        roots.add(cert).unwrap();
    }
    Arc::new(roots)
}

fn ring() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A host or user of another protocol version fails the handshake, both ways, with an error
/// that says so; the host keeps serving.
#[test]
fn a_peer_of_another_protocol_version_is_refused_at_the_handshake() {
    const OLD: &[u8] = b"wasm-agents/1";
    let (_cluster, certs_dir, host, alice) = site_a();
    let roots = roots(&certs_dir);

    block_on(async {
        // A user of the old version, with a good certificate, dials the host.
        let (chain, key) = pem(&certs::files(&certs_dir, Role::User, "alice"));
        let mut old_user = rustls::ClientConfig::builder_with_provider(ring())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(chain, key)
            .unwrap();
        old_user.alpn_protocols = vec![OLD.to_vec()];
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(old_user).unwrap();
        let mut endpoint = quinn::Endpoint::client(([127, 0, 0, 1], 0).into()).unwrap();
        endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
        let refused = endpoint
            .connect(host.addr, &host.name)
            .unwrap()
            .await
            .expect_err("a host must refuse a user of another version");
        let e = tls::connect_error(&refused);
        assert!(
            e.contains("another version of the protocol than wasm-agents/7"),
            "{e}"
        );

        // Our user dials a host of the old version.
        let (chain, key) = pem(&certs::files(&certs_dir, Role::Host, "siteB"));
        let mut old_host = rustls::ServerConfig::builder_with_provider(ring())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        old_host.alpn_protocols = vec![OLD.to_vec()];
        let quic = quinn::crypto::rustls::QuicServerConfig::try_from(old_host).unwrap();
        let server = quinn::Endpoint::server(
            quinn::ServerConfig::with_crypto(Arc::new(quic)),
            ([127, 0, 0, 1], 0).into(),
        )
        .unwrap();
        let old = HostAddr {
            name: "siteB".into(),
            addr: server.local_addr().unwrap(),
        };
        let accepting = tokio::spawn(async move {
            let incoming = server.accept().await?;
            incoming.await.err()
        });
        let e = list_as(&old, &alice)
            .await
            .expect_err("a host of another version must be refused");
        assert!(
            e.starts_with("cannot connect to siteB")
                && e.contains("another version of the protocol than wasm-agents/7"),
            "{e}"
        );
        let failed = accepting.await.unwrap();
        assert!(failed.is_some(), "the old host's handshake must fail too");

        // After both, the host still serves a user of its version.
        list_as(&host, &alice)
            .await
            .expect("the host stopped serving");
    });
}
