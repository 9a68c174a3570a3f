//! mTLS for the ADS server: only gateways with a certificate signed by the client CA get config.
//!
//! The certificate, key and client CA are files (a mounted Kubernetes Secret, renewed in place by
//! cert-manager or a Job). [`ReloadingServerConfig`] re-reads them whenever a connection arrives and
//! builds a new rustls `ServerConfig` when their contents changed, so a renewed certificate or CA
//! serves the next connection without a restart; established ADS streams keep the session they have.
//! A change that does not load (a key written before its certificate, say) is logged and the last
//! good config keeps serving until the files are whole again. Content is compared, not mtimes: a
//! Secret volume swaps a symlink, and a test may rewrite a file within one mtime tick.
//!
//! tonic's own `ServerTlsConfig` cannot reload, so [`incoming`] accepts TCP, runs the handshake
//! with tokio-rustls (ring, as the rest of the workspace) and hands tonic only finished TLS streams.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// A client that opens TCP and never finishes the handshake must not hold a task forever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshaken connections waiting for tonic to take them.
const ACCEPTED_BUFFER: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(
        "--tls-cert, --tls-key and --client-ca go together (mTLS needs all three); missing {0}"
    )]
    Incomplete(&'static str),
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path}: no PEM certificate in it")]
    NoCertificate { path: PathBuf },
    #[error("{path}: {message}")]
    Pem { path: PathBuf, message: String },
    #[error("client CA {path}: {message}")]
    ClientCa { path: PathBuf, message: String },
    #[error("certificate {cert} with key {key}: {source}")]
    Config {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
}

/// Where the xds-server's certificate, its key, and the CA that signs gateways' certificates are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

impl TlsFiles {
    /// All three or none: half an mTLS setup is a mistake to report, never plain gRPC.
    pub fn from_options(
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        client_ca: Option<PathBuf>,
    ) -> Result<Option<TlsFiles>, TlsError> {
        match (cert, key, client_ca) {
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), Some(client_ca)) => Ok(Some(TlsFiles {
                cert,
                key,
                client_ca,
            })),
            (None, _, _) => Err(TlsError::Incomplete("--tls-cert")),
            (_, None, _) => Err(TlsError::Incomplete("--tls-key")),
            (_, _, None) => Err(TlsError::Incomplete("--client-ca")),
        }
    }

    fn read(&self) -> Result<Contents, TlsError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| TlsError::Read {
                path: path.to_path_buf(),
                source,
            })
        };
        Ok(Contents {
            cert: read(&self.cert)?,
            key: read(&self.key)?,
            client_ca: read(&self.client_ca)?,
        })
    }
}

/// The three files' bytes, as one config was built from.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Contents {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Vec<u8>,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server config that requires a client certificate signed by one of `client_ca`'s certificates,
/// and speaks only HTTP/2 (gRPC).
fn server_config(files: &TlsFiles, c: &Contents) -> Result<Arc<ServerConfig>, TlsError> {
    let pem_err = |path: &Path| {
        let path = path.to_path_buf();
        move |e: rustls::pki_types::pem::Error| TlsError::Pem {
            path: path.clone(),
            message: e.to_string(),
        }
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&c.cert)
        .collect::<Result<_, _>>()
        .map_err(pem_err(&files.cert))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: files.cert.clone(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(&c.key).map_err(pem_err(&files.key))?;
    let cas: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&c.client_ca)
        .collect::<Result<_, _>>()
        .map_err(pem_err(&files.client_ca))?;
    if cas.is_empty() {
        return Err(TlsError::NoCertificate {
            path: files.client_ca.clone(),
        });
    }
    let ca_err = |message: String| TlsError::ClientCa {
        path: files.client_ca.clone(),
        message,
    };
    let mut roots = RootCertStore::empty();
    for ca in cas {
        roots.add(ca).map_err(|e| ca_err(e.to_string()))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| ca_err(e.to_string()))?;
    let config_err = |source| TlsError::Config {
        cert: files.cert.clone(),
        key: files.key.clone(),
        source,
    };
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(config_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(config_err)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The server's TLS config, rebuilt from the files when they change (checked per connection).
pub struct ReloadingServerConfig {
    files: TlsFiles,
    state: Mutex<Loaded>,
}

struct Loaded {
    contents: Contents,
    config: Arc<ServerConfig>,
    /// Contents that failed to load, so a broken renewal is reported once, not per connection.
    failed: Option<Contents>,
}

impl ReloadingServerConfig {
    /// Loads the files now: a bad setup fails at start, with the file to fix.
    pub fn load(files: TlsFiles) -> Result<ReloadingServerConfig, TlsError> {
        let contents = files.read()?;
        let config = server_config(&files, &contents)?;
        Ok(ReloadingServerConfig {
            files,
            state: Mutex::new(Loaded {
                contents,
                config,
                failed: None,
            }),
        })
    }

    /// The config for a new connection: the files' current contents if they load, else the last
    /// good config.
    pub fn current(&self) -> Arc<ServerConfig> {
        let read = self.files.read();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let contents = match read {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("xds TLS files: {e}; serving with the last good ones");
                return state.config.clone();
            }
        };
        if contents == state.contents || state.failed.as_ref() == Some(&contents) {
            return state.config.clone();
        }
        match server_config(&self.files, &contents) {
            Ok(config) => {
                tracing::info!(
                    cert = %self.files.cert.display(),
                    "xds TLS certificate, key or client CA changed: new connections use them"
                );
                *state = Loaded {
                    contents,
                    config,
                    failed: None,
                };
            }
            Err(e) => {
                tracing::warn!(
                    "xds TLS files changed but do not load: {e}; serving with the last good ones"
                );
                state.failed = Some(contents);
            }
        }
        state.config.clone()
    }
}

/// An accepted ADS connection after its TLS handshake.
pub struct TlsConnection(TlsStream<TcpStream>);

impl Connected for TlsConnection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.0.get_ref().0.connect_info()
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

/// Accepts connections on `listener` and yields those whose client passed the mTLS handshake. Each
/// handshake runs in its own task, so a slow or hostile client holds up no one; a refused one
/// (no certificate, another CA's, an expired one) is logged and dropped. Ends when the stream is
/// dropped.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<ReloadingServerConfig>,
) -> ReceiverStream<Result<TlsConnection, io::Error>> {
    let (tx, rx) = mpsc::channel(ACCEPTED_BUFFER);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = tx.closed() => return,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    tracing::warn!("accepting an ADS connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!("setting TCP_NODELAY: {e}");
            }
            let acceptor = TlsAcceptor::from(tls.current());
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(TlsConnection(stream))).await;
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(%peer, "refused an ADS client: TLS handshake failed: {e}")
                    }
                    Err(_) => tracing::warn!(
                        %peer,
                        "refused an ADS client: no TLS handshake within {HANDSHAKE_TIMEOUT:?}"
                    ),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Option<PathBuf> {
        Some(PathBuf::from(s))
    }

    #[test]
    fn tls_options_come_all_three_or_none() {
        assert_eq!(TlsFiles::from_options(None, None, None).unwrap(), None);
        assert_eq!(
            TlsFiles::from_options(p("c"), p("k"), p("ca")).unwrap(),
            Some(TlsFiles {
                cert: "c".into(),
                key: "k".into(),
                client_ca: "ca".into()
            })
        );
        for (args, missing) in [
            ((None, p("k"), p("ca")), "--tls-cert"),
            ((p("c"), None, p("ca")), "--tls-key"),
            ((p("c"), p("k"), None), "--client-ca"),
            ((p("c"), None, None), "--tls-key"),
        ] {
            let e = TlsFiles::from_options(args.0, args.1, args.2)
                .unwrap_err()
                .to_string();
            assert!(e.contains("go together") && e.ends_with(missing), "{e}");
        }
    }
}
