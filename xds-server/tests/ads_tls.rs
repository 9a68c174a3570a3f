//! ADS over mTLS against the in-process server: who gets a stream, and certificate renewal on disk
//! without a restart. (A real Envoy over mTLS: `tests/tests/xds_mtls.rs`.)

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use sluice_xds_server::ads::{self, AdsServer};
use sluice_xds_server::resources::{CLUSTER_TYPE_URL, Resources};
use sluice_xds_server::snapshot::Snapshot;
use sluice_xds_server::tls::{ReloadingServerConfig, TlsFiles};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, watch};
use tokio_rustls::TlsConnector;
use tokio_stream::StreamExt;

const PATIENCE: Duration = Duration::from_secs(20);
const SERVER_NAME: &str = "xds.sluice.test";

/// A CA that signs leaves.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
    der: CertificateDer<'static>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    fn leaf(&self, name: &str) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![name.to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            key_pem: key.serialize_pem(),
            key_der: key.serialize_der(),
        }
    }
}

struct Leaf {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    key_pem: String,
    key_der: Vec<u8>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client trusting `server_ca`, presenting `cert` (or nothing).
fn client_config(server_ca: &Ca, cert: Option<&Leaf>) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(server_ca.der.clone()).unwrap();
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match cert {
        Some(leaf) => builder
            .with_client_auth_cert(
                vec![leaf.cert_der.clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf.key_der.clone())),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// The files `sluice xds --tls-cert --tls-key --client-ca` reads.
struct Files {
    _dir: tempfile::TempDir,
    files: TlsFiles,
}

impl Files {
    fn new(server: &Leaf, client_ca: &Ca) -> Files {
        let dir = tempfile::tempdir().unwrap();
        let files = TlsFiles {
            cert: dir.path().join("tls.crt"),
            key: dir.path().join("tls.key"),
            client_ca: dir.path().join("ca.crt"),
        };
        let f = Files { _dir: dir, files };
        f.write_server(server);
        f.write_client_ca(client_ca);
        f
    }

    fn write_server(&self, leaf: &Leaf) {
        write(&self.files.cert, &leaf.cert_pem);
        write(&self.files.key, &leaf.key_pem);
    }

    fn write_client_ca(&self, ca: &Ca) {
        write(&self.files.client_ca, &ca.pem);
    }
}

/// Replaces a file the way a Secret volume does: the new content appears at once, never half written.
fn write(path: &Path, content: &str) {
    let tmp: PathBuf = path.with_extension("tmp");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

struct Server {
    addr: std::net::SocketAddr,
    _shutdown: oneshot::Sender<()>,
    _snapshots: watch::Sender<Arc<Snapshot>>,
}

async fn start(files: &Files) -> Server {
    let resources = Resources {
        clusters: vec![Arc::new(Cluster {
            name: "only".into(),
            ..Default::default()
        })],
        ..Default::default()
    };
    let (tx, rx) = watch::channel(Arc::new(Snapshot::from_resources(1, &resources)));
    let (server, _status) = AdsServer::new(rx);
    let tls = Arc::new(ReloadingServerConfig::load(files.files.clone()).expect("TLS files load"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (shutdown, shutdown_rx) = oneshot::channel::<()>();
    tokio::spawn(ads::serve_tls(listener, tls, server, async move {
        let _ = shutdown_rx.await;
    }));
    Server {
        addr,
        _shutdown: shutdown,
        _snapshots: tx,
    }
}

/// Opens a SotW stream over TLS with `config` and asks for Clusters: the names it gets, or the error.
async fn fetch_clusters(
    addr: std::net::SocketAddr,
    config: Arc<ClientConfig>,
) -> Result<Vec<String>, String> {
    let connector = TlsConnector::from(config);
    let channel = tonic::transport::Endpoint::from_static("http://xds.sluice.test")
        .connect_with_connector(tower::service_fn(move |_| {
            let connector = connector.clone();
            async move {
                let tcp = TcpStream::connect(addr).await?;
                let tls = connector
                    .connect(ServerName::try_from(SERVER_NAME).unwrap(), tcp)
                    .await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    let request = DiscoveryRequest {
        node: Some(Node {
            id: "gateway".into(),
            cluster: "test".into(),
            ..Default::default()
        }),
        type_url: CLUSTER_TYPE_URL.into(),
        ..Default::default()
    };
    let call = async {
        let mut stream = AggregatedDiscoveryServiceClient::new(channel)
            .stream_aggregated_resources(
                tokio_stream::iter(vec![request]).chain(tokio_stream::pending()),
            )
            .await
            .map_err(|e| format!("open: {e}"))?
            .into_inner();
        let response = stream
            .message()
            .await
            .map_err(|e| format!("receive: {e}"))?
            .ok_or_else(|| "stream ended".to_string())?;
        Ok(response
            .resources
            .iter()
            .map(|r| {
                <Cluster as prost::Message>::decode(r.value.as_slice())
                    .unwrap()
                    .name
            })
            .collect())
    };
    tokio::time::timeout(PATIENCE, call)
        .await
        .map_err(|_| "timed out".to_string())?
}

/// The certificate the server presents on a new connection (the client trusts `ca` and shows
/// `client`).
async fn served_certificate(
    addr: std::net::SocketAddr,
    ca: &Ca,
    client: &Leaf,
) -> Result<CertificateDer<'static>, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let tls = tokio::time::timeout(
        PATIENCE,
        TlsConnector::from(client_config(ca, Some(client)))
            .connect(ServerName::try_from(SERVER_NAME).unwrap(), tcp),
    )
    .await
    .map_err(|_| "handshake timed out".to_string())?
    .map_err(|e| e.to_string())?;
    Ok(tls.get_ref().1.peer_certificates().unwrap()[0].clone())
}

#[tokio::test]
async fn only_clients_with_a_certificate_from_the_client_ca_get_config() {
    let server_ca = Ca::new("xds server CA");
    let client_ca = Ca::new("gateway CA");
    let files = Files::new(&server_ca.leaf(SERVER_NAME), &client_ca);
    let server = start(&files).await;

    let gateway = client_ca.leaf("gateway");
    assert_eq!(
        fetch_clusters(server.addr, client_config(&server_ca, Some(&gateway))).await,
        Ok(vec!["only".to_string()])
    );

    let stranger = Ca::new("another CA").leaf("gateway");
    let refused = fetch_clusters(server.addr, client_config(&server_ca, Some(&stranger))).await;
    assert!(
        refused.is_err(),
        "a certificate from another CA: {refused:?}"
    );
    let refused = fetch_clusters(server.addr, client_config(&server_ca, None)).await;
    assert!(refused.is_err(), "no client certificate: {refused:?}");

    // Plain h2c (no TLS at all) gets nothing either.
    let plain = async {
        let mut client =
            AggregatedDiscoveryServiceClient::connect(format!("http://{}", server.addr)).await?;
        client
            .stream_aggregated_resources(tokio_stream::pending::<DiscoveryRequest>())
            .await?
            .into_inner()
            .message()
            .await?;
        Ok::<_, Box<dyn std::error::Error>>(())
    };
    let plain = tokio::time::timeout(PATIENCE, plain)
        .await
        .expect("plain client refused in time");
    assert!(plain.is_err(), "plain gRPC was served");

    // The refusals cost the good client nothing.
    assert_eq!(
        fetch_clusters(server.addr, client_config(&server_ca, Some(&gateway))).await,
        Ok(vec!["only".to_string()])
    );
}

#[tokio::test]
async fn renewed_files_serve_new_connections_without_a_restart() {
    let server_ca = Ca::new("xds server CA");
    let client_ca = Ca::new("gateway CA");
    let first = server_ca.leaf(SERVER_NAME);
    let files = Files::new(&first, &client_ca);
    let server = start(&files).await;
    let gateway = client_ca.leaf("gateway");
    assert_eq!(
        served_certificate(server.addr, &server_ca, &gateway).await,
        Ok(first.cert_der.clone())
    );

    // A renewed server certificate: the next connection gets it.
    let renewed = server_ca.leaf(SERVER_NAME);
    files.write_server(&renewed);
    assert_eq!(
        served_certificate(server.addr, &server_ca, &gateway).await,
        Ok(renewed.cert_der.clone())
    );

    // Half a renewal (the certificate before its key) does not load: the last good pair serves.
    let next = server_ca.leaf(SERVER_NAME);
    write(&files.files.cert, &next.cert_pem);
    assert_eq!(
        served_certificate(server.addr, &server_ca, &gateway).await,
        Ok(renewed.cert_der.clone())
    );
    write(&files.files.key, &next.key_pem);
    assert_eq!(
        served_certificate(server.addr, &server_ca, &gateway).await,
        Ok(next.cert_der.clone())
    );

    // A new client CA: gateways of the old one are refused, those of the new one get config.
    let new_client_ca = Ca::new("gateway CA 2");
    files.write_client_ca(&new_client_ca);
    let refused = fetch_clusters(server.addr, client_config(&server_ca, Some(&gateway))).await;
    assert!(refused.is_err(), "the old CA's gateway: {refused:?}");
    assert_eq!(
        fetch_clusters(
            server.addr,
            client_config(&server_ca, Some(&new_client_ca.leaf("gateway")))
        )
        .await,
        Ok(vec!["only".to_string()])
    );
}

#[test]
fn bad_files_are_named_in_the_error() {
    let server_ca = Ca::new("xds server CA");
    let client_ca = Ca::new("gateway CA");
    let files = Files::new(&server_ca.leaf(SERVER_NAME), &client_ca);
    write(&files.files.client_ca, "not a certificate\n");
    let e = ReloadingServerConfig::load(files.files.clone())
        .err()
        .expect("a CA file without a certificate fails")
        .to_string();
    assert!(
        e.contains("ca.crt") && e.contains("no PEM certificate"),
        "{e}"
    );

    files.write_client_ca(&client_ca);
    write(&files.files.key, &server_ca.leaf(SERVER_NAME).key_pem);
    let e = ReloadingServerConfig::load(files.files.clone())
        .err()
        .expect("a key that is not the certificate's fails")
        .to_string();
    assert!(e.contains("tls.crt") && e.contains("tls.key"), "{e}");

    let missing = TlsFiles {
        cert: files.files.cert.with_file_name("absent.crt"),
        ..files.files.clone()
    };
    let e = ReloadingServerConfig::load(missing)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("absent.crt"), "{e}");
}
