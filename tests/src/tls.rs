//! TLS material for the `tls` and `httpoption` cases: a self-signed CA and a leaf certificate for given
//! hosts (rcgen), and rustls configs that trust that CA (client) or serve that leaf (server, for tests
//! of the helpers themselves).

use std::sync::Arc;

use anyhow::{Context, Result};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// A CA and a leaf certificate it signed.
#[derive(Clone)]
pub struct TlsMaterial {
    pub ca_cert_pem: String,
    pub ca_cert_der: CertificateDer<'static>,
    /// The leaf certificate (what goes into a kubernetes.io/tls Secret's tls.crt).
    pub cert_pem: String,
    pub cert_der: CertificateDer<'static>,
    /// The leaf's PKCS#8 private key (tls.key).
    pub key_pem: String,
    pub key_der: Vec<u8>,
}

impl TlsMaterial {
    /// A fresh CA, and a leaf for `hosts` (DNS names) signed by it.
    pub fn issue(hosts: &[&str]) -> Result<TlsMaterial> {
        let ca_key = KeyPair::generate().context("CA key")?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).context("CA params")?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "sluice-e2e test CA");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params
            .self_signed(&ca_key)
            .context("self-signing the CA")?;
        let issuer = Issuer::new(ca_params, ca_key);

        let leaf_key = KeyPair::generate().context("leaf key")?;
        let names: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
        let mut leaf_params = CertificateParams::new(names).context("leaf params (host names)")?;
        if let Some(first) = hosts.first() {
            leaf_params
                .distinguished_name
                .push(DnType::CommonName, *first);
        }
        let leaf = leaf_params
            .signed_by(&leaf_key, &issuer)
            .context("signing the leaf")?;

        Ok(TlsMaterial {
            ca_cert_pem: ca_cert.pem(),
            ca_cert_der: ca_cert.der().clone(),
            cert_pem: leaf.pem(),
            cert_der: leaf.der().clone(),
            key_pem: leaf_key.serialize_pem(),
            key_der: leaf_key.serialize_der(),
        })
    }

    /// A client config that trusts only this CA, speaking `alpn` (e.g. `[b"http/1.1"]`).
    pub fn client_config(&self, alpn: &[&[u8]]) -> Result<Arc<ClientConfig>> {
        let mut roots = RootCertStore::empty();
        roots
            .add(self.ca_cert_der.clone())
            .context("adding the CA to the root store")?;
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }

    /// A server config serving the leaf (chain: leaf, CA).
    pub fn server_config(&self) -> Result<Arc<ServerConfig>> {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()));
        let config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_no_client_auth()
            .with_single_cert(vec![self.cert_der.clone(), self.ca_cert_der.clone()], key)
            .context("server certificate")?;
        Ok(Arc::new(config))
    }
}

/// ring, explicitly: the process-wide default provider is ambiguous when several are compiled in.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}
