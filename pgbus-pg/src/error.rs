//! Mapping driver errors to [`pgbus_core::Error`], with transient ones marked, and the
//! one-line reasons for failed TLS handshakes. It imports no other module of the crate:
//! every module that talks to the server (`connect/` included) uses it.

use std::error::Error as StdError;

use pgbus_core::Error;
use rustls::CertificateError;
use tokio_postgres::error::SqlState;

/// Whether a Postgres error may go away by itself: the connection broke, the server is
/// shutting down or starting, a serialization failure or deadlock, too many connections.
pub(crate) fn is_transient(err: &tokio_postgres::Error) -> bool {
    if err.is_closed() {
        return true;
    }
    // A certificate or TLS setup problem does not go away by retrying.
    if tls_failure(err).is_some() {
        return false;
    }
    match err.code() {
        // No server error: an I/O or protocol failure on the connection.
        None => true,
        Some(code) => {
            let class = &code.code()[..2];
            class == "08" // connection exception
                || class == "57" && code != &SqlState::QUERY_CANCELED // operator intervention
                || code == &SqlState::T_R_SERIALIZATION_FAILURE
                || code == &SqlState::T_R_DEADLOCK_DETECTED
                || code == &SqlState::TOO_MANY_CONNECTIONS
                || code == &SqlState::LOCK_NOT_AVAILABLE
        }
    }
}

/// The server's message and SQLSTATE when there is one (the driver's own `Display` says
/// only "db error"), else the cause of a TLS failure, else the driver's message.
pub(crate) fn describe(err: &tokio_postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => tls_failure(err).unwrap_or_else(|| err.to_string()),
    }
}

/// Wraps a driver error, saying what pgbus was doing.
pub(crate) fn db(context: &str, err: tokio_postgres::Error) -> Error {
    let transient = is_transient(&err);
    Error::backend(format!("{context}: {}", describe(&err)), transient, err)
}

/// Wraps a pool checkout failure.
pub(crate) fn pool(err: bb8::RunError<tokio_postgres::Error>) -> Error {
    match err {
        bb8::RunError::User(err) => db("connecting to the database", err),
        bb8::RunError::TimedOut => Error::Backend {
            message: "timed out waiting for a database connection from the pool".into(),
            transient: true,
            source: None,
        },
    }
}

/// An error text as it can be stored: PostgreSQL text cannot hold NUL, which a failing
/// command's output may contain, so each becomes U+FFFD. (Refusing it instead would leave
/// the message unsettled, to fail the same way at every delivery.)
pub(crate) fn storable(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains('\0') {
        text.replace('\0', "\u{fffd}").into()
    } else {
        text.into()
    }
}

/// A setting pgbus refuses (a bad URL, sslmode or certificate file): not transient, no
/// driver error behind it.
pub(crate) fn invalid(message: String) -> Error {
    Error::Backend {
        message,
        transient: false,
        source: None,
    }
}

/// Why a connection's TLS failed, in one line naming the cause, or `None` when `err` is
/// not a TLS failure.
pub(crate) fn tls_failure(err: &(dyn StdError + 'static)) -> Option<String> {
    let mut next = Some(err);
    while let Some(err) = next {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return Some(describe_rustls(tls));
        }
        // An io::Error's `source` skips the error it wraps: look inside.
        if let Some(inner) = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(describe_rustls(inner));
        }
        if err.to_string().contains("server does not support TLS") {
            return Some(
                "the server does not support TLS (it has ssl = off), and this sslmode requires it"
                    .to_owned(),
            );
        }
        next = err.source();
    }
    None
}

fn describe_rustls(err: &rustls::Error) -> String {
    use rustls::AlertDescription as Alert;
    match err {
        rustls::Error::InvalidCertificate(cert) => match cert {
            CertificateError::UnknownIssuer => "TLS: the server's certificate is not trusted \
                (its issuer is not in sslrootcert)"
                .to_owned(),
            CertificateError::NotValidForName => {
                "TLS: the server's certificate does not match the host name (name mismatch)"
                    .to_owned()
            }
            CertificateError::NotValidForNameContext {
                expected,
                presented,
            } => format!(
                "TLS: the server's certificate does not match the host name {expected:?} \
                 (name mismatch; it is for {})",
                presented.join(", ")
            ),
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "TLS: the server's certificate has expired".to_owned()
            }
            other => format!("TLS: the server's certificate was rejected: {other:?}"),
        },
        rustls::Error::AlertReceived(
            alert @ (Alert::CertificateRequired
            | Alert::BadCertificate
            | Alert::UnknownCA
            | Alert::CertificateUnknown
            | Alert::AccessDenied),
        ) => format!(
            "TLS: the server refused our client certificate ({alert:?}): check sslcert and sslkey"
        ),
        other => format!("TLS handshake failed: {other}"),
    }
}
