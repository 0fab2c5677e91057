//! A test certificate authority and a server certificate for localhost.

use anyhow::Context as _;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

/// PEM material for a TLS server on loopback, and the CA that signed it.
pub struct TestCerts {
    /// The CA certificate clients should trust.
    pub ca_pem: String,
    /// Server certificate for `localhost`, `127.0.0.1` and `::1`.
    pub cert_pem: String,
    /// The server certificate's private key (PKCS#8).
    pub key_pem: String,
}

impl TestCerts {
    /// Generates a fresh CA and server certificate.
    pub fn generate() -> anyhow::Result<Self> {
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "authgres test CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)
            .context("self-signing the test CA")?;
        let server_key = KeyPair::generate()?;
        let server_params = CertificateParams::new(vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
        ])?;
        let server = server_params
            .signed_by(&server_key, &ca)
            .context("signing the server certificate")?;
        Ok(Self {
            ca_pem: ca.pem(),
            cert_pem: server.pem(),
            key_pem: server_key.serialize_pem(),
        })
    }

    /// Writes `ca.pem`, `server.crt` and `server.key` into `dir`.
    pub fn write_to(&self, dir: &std::path::Path) -> anyhow::Result<()> {
        std::fs::write(dir.join("ca.pem"), &self.ca_pem)?;
        std::fs::write(dir.join("server.crt"), &self.cert_pem)?;
        // The private key is the owner's alone, as a real one would be.
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let path = dir.join("server.key");
        let _ = std::fs::remove_file(&path);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?
            .write_all(self.key_pem.as_bytes())?;
        Ok(())
    }
}
