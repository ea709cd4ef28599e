//! TLS with libpq's `sslmode` semantics on rustls (aws-lc-rs provider). (The one-line
//! reasons for failed handshakes are `crate::error::tls_failure`.)

use std::path::{Path, PathBuf};
use std::sync::Arc;

use pgbus_core::Result;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore};

use super::params::SslParams;
use crate::error::invalid;

/// libpq's `sslmode`: whether TLS is used and what of the server's certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum SslMode {
    /// Plain connections only.
    Disable,
    /// TLS when the server offers it, plain otherwise; the certificate is not checked
    /// (libpq's default).
    #[default]
    Prefer,
    /// TLS or no connection; the certificate is checked against a root certificate when
    /// one is given (as `verify-ca`), not otherwise.
    Require,
    /// TLS, and the server's certificate must chain to the root certificate.
    VerifyCa,
    /// TLS, the certificate must chain to the root certificate and name the host.
    VerifyFull,
}

impl SslMode {
    fn parse(text: &str) -> Result<Self> {
        Ok(match text {
            "disable" => Self::Disable,
            // libpq's `allow` tries plain first; TLS-when-offered is the safer reading.
            "allow" | "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            other => {
                return Err(invalid(format!(
                "invalid sslmode {other:?}: use disable, prefer, require, verify-ca or verify-full"
            )))
            }
        })
    }

    /// What tokio-postgres is told: whether to ask for TLS, and whether to insist.
    pub(super) fn driver_mode(self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as Driver;
        match self {
            Self::Disable => Driver::Disable,
            Self::Prefer => Driver::Prefer,
            Self::Require | Self::VerifyCa | Self::VerifyFull => Driver::Require,
        }
    }
}

/// Where the server's certificate must lead.
enum Roots {
    /// Not checked.
    None,
    /// The certificates of a PEM file.
    File(PathBuf),
    /// The platform's trusted roots (`sslrootcert=system`).
    System,
}

/// The resolved TLS settings of one connection string.
pub(super) struct Settings {
    pub(super) mode: SslMode,
    roots: Roots,
    /// Whether the certificate must name the host.
    check_name: bool,
    client: Option<(PathBuf, PathBuf)>,
}

impl Settings {
    /// Applies libpq's fallbacks: the URL, then `PGSSL*`, then `~/.postgresql/`.
    pub(super) fn resolve(params: SslParams) -> Result<Self> {
        Self::resolve_in(params, &|name| std::env::var(name).ok())
    }

    /// [`resolve`](Self::resolve) with the environment variables (`PGSSL*`, `HOME`) read
    /// through `var`.
    fn resolve_in(params: SslParams, var: &dyn Fn(&str) -> Option<String>) -> Result<Self> {
        let env = |name: &str| var(name).filter(|v| !v.is_empty());
        let default_file = |name: &str| {
            let path = PathBuf::from(env("HOME")?).join(".postgresql").join(name);
            path.exists().then(|| path.to_string_lossy().into_owned())
        };
        let mode_text = params.mode.or_else(|| env("PGSSLMODE"));
        let rootcert = params.rootcert.or_else(|| env("PGSSLROOTCERT"));
        let explicit_root = rootcert.is_some();
        let rootcert = rootcert.or_else(|| default_file("root.crt"));
        let mode = match (&mode_text, rootcert.as_deref()) {
            (Some(text), _) => SslMode::parse(text)?,
            // libpq: the system roots are meant for public names, so they imply verify-full.
            (None, Some("system")) => SslMode::VerifyFull,
            (None, _) => SslMode::Prefer,
        };
        if rootcert.as_deref() == Some("system") && mode != SslMode::VerifyFull {
            return Err(invalid(format!(
                "weak sslmode {:?} may not be used with sslrootcert=system: use verify-full",
                mode_text.unwrap_or_default()
            )));
        }
        let roots = match (mode, rootcert) {
            (SslMode::Disable | SslMode::Prefer, _) => Roots::None,
            (_, Some(root)) if root == "system" => Roots::System,
            // A root certificate that was only found by default is checked under `require`,
            // as libpq does; a missing one under `verify-*` is an error, as in libpq.
            (_, Some(root)) if explicit_root || Path::new(&root).exists() => {
                Roots::File(PathBuf::from(root))
            }
            (SslMode::Require, _) => Roots::None,
            (_, _) => {
                return Err(invalid(format!(
                    "sslmode={} needs a root certificate: set sslrootcert=FILE (or system for \
                     the platform's roots), or create ~/.postgresql/root.crt",
                    if mode == SslMode::VerifyCa {
                        "verify-ca"
                    } else {
                        "verify-full"
                    }
                )))
            }
        };
        let cert = params
            .cert
            .or_else(|| env("PGSSLCERT"))
            .or_else(|| default_file("postgresql.crt"));
        let key = params
            .key
            .or_else(|| env("PGSSLKEY"))
            .or_else(|| default_file("postgresql.key"));
        let client = match (cert, key) {
            (Some(cert), Some(key)) if mode != SslMode::Disable => {
                Some((PathBuf::from(cert), PathBuf::from(key)))
            }
            (Some(_), None) if mode != SslMode::Disable => {
                return Err(invalid(
                    "sslcert is set but sslkey is not: a client certificate needs its key"
                        .to_owned(),
                ))
            }
            _ => None,
        };
        Ok(Self {
            mode,
            check_name: mode == SslMode::VerifyFull,
            roots,
            client,
        })
    }

    /// The rustls configuration: certificates read now, so a bad file fails at start.
    pub(super) fn client_config(&self) -> Result<ClientConfig> {
        // Given explicitly, not installed process-wide: a library leaves that to the program.
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let chain = match &self.roots {
            Roots::None => None,
            roots => Some(
                WebPkiServerVerifier::builder_with_provider(
                    Arc::new(root_store(roots)?),
                    provider.clone(),
                )
                .build()
                .map_err(|err| invalid(format!("sslrootcert: {err}")))?,
            ),
        };
        let verifier = Arc::new(Verifier {
            chain,
            check_name: self.check_name,
            provider: provider.clone(),
        });
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|err| invalid(format!("TLS setup: {err}")))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        match &self.client {
            None => Ok(builder.with_no_client_auth()),
            Some((cert, key)) => {
                let chain = read_certs(cert, "sslcert")?;
                let key = PrivateKeyDer::from_pem_file(key)
                    .map_err(|err| invalid(format!("sslkey {}: {err}", key.display())))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|err| invalid(format!("sslcert/sslkey: {err}")))
            }
        }
    }
}

fn root_store(roots: &Roots) -> Result<RootCertStore> {
    let mut store = RootCertStore::empty();
    match roots {
        Roots::None => {}
        Roots::File(path) => {
            for cert in read_certs(path, "sslrootcert")? {
                store
                    .add(cert)
                    .map_err(|err| invalid(format!("sslrootcert {}: {err}", path.display())))?;
            }
        }
        Roots::System => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(invalid(
                    "sslrootcert=system: no trusted root certificates found on this machine \
                     (Debian: apt-get install ca-certificates)"
                        .to_owned(),
                ));
            }
        }
    }
    Ok(store)
}

fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|err| invalid(format!("{what} {}: {err}", path.display())))?;
    if certs.is_empty() {
        return Err(invalid(format!(
            "{what} {}: no PEM certificate in the file",
            path.display()
        )));
    }
    Ok(certs)
}

/// The certificate check of one `sslmode`: the chain against the root certificates
/// (none for `prefer`, nor for `require` without a root certificate: libpq's meaning of
/// those modes), then the host name (`verify-full` only). The handshake's signatures are
/// verified in every mode.
#[derive(Debug)]
struct Verifier {
    chain: Option<Arc<WebPkiServerVerifier>>,
    check_name: bool,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        // webpki checks the chain before the name, so a name error means the chain is good.
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn resolve(params: SslParams, env: &[(&str, &str)]) -> Result<Settings> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Settings::resolve_in(params, &|name| env.get(name).cloned())
    }

    fn params(mode: Option<&str>, rootcert: Option<&str>) -> SslParams {
        SslParams {
            mode: mode.map(str::to_owned),
            rootcert: rootcert.map(str::to_owned),
            ..SslParams::default()
        }
    }

    fn error(result: Result<Settings>) -> String {
        match result {
            Ok(_) => panic!("resolved"),
            Err(err) => err.to_string(),
        }
    }

    #[test]
    fn the_url_beats_the_environment_which_beats_the_default() {
        let home = tempfile::tempdir().unwrap();
        let home = home.path().to_str().unwrap();
        let from_url = resolve(
            params(Some("disable"), None),
            &[("PGSSLMODE", "verify-full"), ("HOME", home)],
        );
        assert_eq!(from_url.unwrap().mode, SslMode::Disable);
        let from_env = resolve(
            params(None, None),
            &[("PGSSLMODE", "require"), ("HOME", home)],
        );
        assert_eq!(from_env.unwrap().mode, SslMode::Require);
        let default = resolve(params(None, None), &[("HOME", home)]).unwrap();
        assert_eq!(default.mode, SslMode::Prefer);
        assert!(matches!(default.roots, Roots::None));
    }

    #[test]
    fn verify_modes_need_a_root_certificate_and_never_downgrade() {
        let home = tempfile::tempdir().unwrap();
        let home = home.path().to_str().unwrap();
        for mode in ["verify-ca", "verify-full"] {
            let err = error(resolve(params(Some(mode), None), &[("HOME", home)]));
            assert!(err.contains("needs a root certificate"), "{err}");
        }
        let full = resolve(params(Some("verify-full"), Some("/ca.pem")), &[]).unwrap();
        assert!(matches!(full.roots, Roots::File(_)) && full.check_name);
        let ca = resolve(params(Some("verify-ca"), Some("/ca.pem")), &[]).unwrap();
        assert!(matches!(ca.roots, Roots::File(_)) && !ca.check_name);
        assert_eq!(
            ca.mode.driver_mode(),
            tokio_postgres::config::SslMode::Require
        );
    }

    #[test]
    fn require_checks_a_root_certificate_only_when_there_is_one() {
        let home = tempfile::tempdir().unwrap();
        let home_str = home.path().to_str().unwrap();
        let none = resolve(params(Some("require"), None), &[("HOME", home_str)]).unwrap();
        assert!(matches!(none.roots, Roots::None));
        // libpq: a root.crt in ~/.postgresql makes `require` behave as `verify-ca`.
        std::fs::create_dir(home.path().join(".postgresql")).unwrap();
        std::fs::write(home.path().join(".postgresql/root.crt"), "x").unwrap();
        let found = resolve(params(Some("require"), None), &[("HOME", home_str)]).unwrap();
        assert!(matches!(found.roots, Roots::File(_)) && !found.check_name);
        // And `prefer` still checks nothing.
        let prefer = resolve(params(None, None), &[("HOME", home_str)]).unwrap();
        assert!(matches!(prefer.roots, Roots::None));
    }

    #[test]
    fn the_system_roots_imply_verify_full_and_refuse_weaker_modes() {
        let system = resolve(params(None, Some("system")), &[]).unwrap();
        assert_eq!(system.mode, SslMode::VerifyFull);
        assert!(matches!(system.roots, Roots::System));
        let err = error(resolve(params(Some("require"), Some("system")), &[]));
        assert!(
            err.contains("may not be used with sslrootcert=system"),
            "{err}"
        );
        let err = error(resolve(
            params(None, None),
            &[("PGSSLROOTCERT", "system"), ("PGSSLMODE", "verify-ca")],
        ));
        assert!(err.contains("verify-full"), "{err}");
    }

    #[test]
    fn bad_settings_are_refused_by_name() {
        let err = error(resolve(params(Some("verify_full"), None), &[]));
        assert!(err.contains("invalid sslmode \"verify_full\""), "{err}");
        let cert_only = SslParams {
            mode: Some("require".into()),
            cert: Some("/client.crt".into()),
            ..SslParams::default()
        };
        let err = error(resolve(cert_only, &[]));
        assert!(err.contains("needs its key"), "{err}");
        let missing = resolve(
            params(Some("verify-full"), Some("/nonexistent/ca.pem")),
            &[],
        )
        .unwrap()
        .client_config();
        let err = match missing {
            Ok(_) => panic!("a missing root file was accepted"),
            Err(err) => err.to_string(),
        };
        assert!(err.contains("sslrootcert /nonexistent/ca.pem"), "{err}");
    }
}
