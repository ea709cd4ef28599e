//! [`TestCa`]: certificates for TLS tests, generated in-process (feature `test-tls`).

use std::fs;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use super::{io_err, write_private, ClusterError};

/// A throwaway certificate authority for tests: it issues server certificates (for
/// [`LocalClusterBuilder::tls`](super::LocalClusterBuilder::tls)) and client certificates,
/// written as PEM files. Nothing is ever trusted outside the test that made it.
///
/// ```
/// # fn main() -> Result<(), pgbus_pg::ClusterError> {
/// let dir = tempfile::tempdir().unwrap();
/// let ca = pgbus_pg::TestCa::new("pgbus test CA")?;
/// let ca_file = ca.write_cert(&dir.path().join("ca.crt"))?;
/// let server = ca.server_cert(dir.path(), "server", &["localhost", "127.0.0.1"])?;
/// # let _ = (ca_file, server);
/// # Ok(()) }
/// ```
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the private key.
        f.debug_struct("TestCa").finish_non_exhaustive()
    }
}

/// A certificate and its private key, as PEM files written by [`TestCa`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CertFiles {
    /// The certificate.
    pub cert: PathBuf,
    /// The private key (PKCS#8), mode 0600.
    pub key: PathBuf,
}

impl TestCa {
    /// A new CA with a fresh key, its certificate's common name `name`.
    pub fn new(name: &str) -> Result<TestCa, ClusterError> {
        let key = KeyPair::generate().map_err(cert_err)?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).map_err(cert_err)?;
        Ok(TestCa {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Writes the CA certificate to `path` (what clients put in `sslrootcert`); returns
    /// `path`.
    pub fn write_cert(&self, path: &Path) -> Result<PathBuf, ClusterError> {
        fs::write(path, &self.cert_pem).map_err(io_err("write", path))?;
        Ok(path.to_path_buf())
    }

    /// Issues a server certificate for `names` (DNS names, or IP addresses such as
    /// `127.0.0.1`, which become IP subject alternative names), written to
    /// `<dir>/<stem>.crt` and `<dir>/<stem>.key`.
    pub fn server_cert(
        &self,
        dir: &Path,
        stem: &str,
        names: &[&str],
    ) -> Result<CertFiles, ClusterError> {
        let names: Vec<String> = names.iter().map(|name| (*name).to_owned()).collect();
        let mut params = CertificateParams::new(names.clone()).map_err(cert_err)?;
        if let Some(first) = names.first() {
            params.distinguished_name.push(DnType::CommonName, first);
        }
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params, dir, stem)
    }

    /// Issues a client certificate whose common name is `user` (what PostgreSQL's `cert`
    /// authentication matches against the role), written to `<dir>/<stem>.crt` and
    /// `<dir>/<stem>.key`.
    pub fn client_cert(
        &self,
        dir: &Path,
        stem: &str,
        user: &str,
    ) -> Result<CertFiles, ClusterError> {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, user);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params, dir, stem)
    }

    fn issue(
        &self,
        params: CertificateParams,
        dir: &Path,
        stem: &str,
    ) -> Result<CertFiles, ClusterError> {
        let key = KeyPair::generate().map_err(cert_err)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(cert_err)?;
        let files = CertFiles {
            cert: dir.join(format!("{stem}.crt")),
            key: dir.join(format!("{stem}.key")),
        };
        fs::write(&files.cert, cert.pem()).map_err(io_err("write", &files.cert))?;
        write_private(&files.key, key.serialize_pem().as_bytes())?;
        Ok(files)
    }
}

fn cert_err(source: rcgen::Error) -> ClusterError {
    ClusterError::Certificate(Box::new(source))
}
