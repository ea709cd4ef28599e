//! Mapping driver errors to [`pgbus_core::Error`], with transient ones marked.

use pgbus_core::Error;
use tokio_postgres::error::SqlState;

use crate::connect::tls_failure;

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
