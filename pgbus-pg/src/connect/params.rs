//! Takes libpq's TLS parameters out of a connection string: tokio-postgres knows only
//! `sslmode=disable|prefer|require` and refuses the rest, so they are read here and the
//! remainder goes to the driver.

use pgbus_core::Result;

use crate::error::invalid;

/// The TLS parameters a connection string named (unset: not named).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct SslParams {
    pub(super) mode: Option<String>,
    pub(super) rootcert: Option<String>,
    pub(super) cert: Option<String>,
    pub(super) key: Option<String>,
}

/// A connection string split into its TLS parameters and the rest.
#[derive(Debug)]
pub(super) struct Split {
    /// The connection string without the TLS parameters, for the driver.
    pub(super) rest: String,
    pub(super) ssl: SslParams,
}

/// libpq parameters that would weaken or change certificate checks if silently ignored:
/// refused with the reason.
const REFUSED: &[(&str, &str)] = &[
    (
        "sslpassword",
        "encrypted client keys are not supported: decrypt the key (openssl pkey -in KEY -out KEY.plain)",
    ),
    ("sslcrl", "certificate revocation lists are not supported"),
    ("sslcrldir", "certificate revocation lists are not supported"),
];

/// Splits `url`, a `postgres://` / `postgresql://` URL or a key=value string.
pub(super) fn split(url: &str) -> Result<Split> {
    let url = url.trim();
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        split_url(url)
    } else {
        split_key_value(url)
    }
}

fn take(ssl: &mut SslParams, key: &str, value: String) -> Result<bool> {
    if let Some((_, why)) = REFUSED.iter().find(|(name, _)| *name == key) {
        return Err(invalid(format!("invalid database URL: {key}: {why}")));
    }
    let slot = match key {
        "sslmode" => &mut ssl.mode,
        "sslrootcert" => &mut ssl.rootcert,
        "sslcert" => &mut ssl.cert,
        "sslkey" => &mut ssl.key,
        _ => return Ok(false),
    };
    *slot = Some(value);
    Ok(true)
}

fn split_url(url: &str) -> Result<Split> {
    let mut ssl = SslParams::default();
    let Some((base, query)) = url.split_once('?') else {
        return Ok(Split {
            rest: url.to_owned(),
            ssl,
        });
    };
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if !take(&mut ssl, &percent_decode(key)?, percent_decode(value)?)? {
            kept.push(pair);
        }
    }
    let rest = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok(Split { rest, ssl })
}

fn percent_decode(text: &str) -> Result<String> {
    let bad = || invalid("invalid database URL: bad percent-encoding in a parameter".to_owned());
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3).ok_or_else(bad)?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| bad())
}

/// libpq's key=value syntax: `key = value` pairs separated by white space; a value is
/// single-quoted (with `\'` and `\\`) or runs to the next white space (with `\` escapes).
fn split_key_value(text: &str) -> Result<Split> {
    let mut ssl = SslParams::default();
    let mut kept = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(invalid(format!(
                "invalid database URL: expected `=` after {key:?}"
            )));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\'') => break,
                    Some('\\') => value.extend(chars.next()),
                    Some(c) => value.push(c),
                    None => {
                        return Err(invalid(
                            "invalid database URL: unterminated quoted value".to_owned(),
                        ))
                    }
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
        }
        if !take(&mut ssl, &key, value.clone())? {
            let quoted = value.replace('\\', "\\\\").replace('\'', "\\'");
            kept.push(format!("{key}='{quoted}'"));
        }
    }
    Ok(Split {
        rest: kept.join(" "),
        ssl,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_only_the_tls_parameters() {
        let split = split(
            "postgres://u:p@db.example:5433/app?sslmode=verify-full&connect_timeout=5&sslrootcert=%2Fetc%2Fca.pem",
        )
        .unwrap();
        assert_eq!(
            split.rest,
            "postgres://u:p@db.example:5433/app?connect_timeout=5"
        );
        assert_eq!(split.ssl.mode.as_deref(), Some("verify-full"));
        assert_eq!(split.ssl.rootcert.as_deref(), Some("/etc/ca.pem"));

        let split = split_url("postgresql://h/db?sslmode=require").unwrap();
        assert_eq!(split.rest, "postgresql://h/db");
        let plain = split_url("postgres://h/db").unwrap();
        assert_eq!(plain.rest, "postgres://h/db");
        assert_eq!(plain.ssl, SslParams::default());
    }

    #[test]
    fn key_value_strings_keep_quoting() {
        let split = split_key_value(
            "host=localhost password='it\\'s x' sslmode = verify-ca sslcert=/a\\ b.crt",
        )
        .unwrap();
        assert_eq!(split.rest, "host='localhost' password='it\\'s x'");
        assert_eq!(split.ssl.mode.as_deref(), Some("verify-ca"));
        assert_eq!(split.ssl.cert.as_deref(), Some("/a b.crt"));
        let parsed: tokio_postgres::Config = split.rest.parse().unwrap();
        assert_eq!(parsed.get_password(), Some(&b"it's x"[..]));
    }

    #[test]
    fn refused_parameters_say_why() {
        let err = split("postgres://h/db?sslpassword=x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("encrypted client keys"), "{err}");
        assert!(!err.contains("postgres://"), "{err}");
        let err = split("postgres://h/db?sslmode=%zz")
            .unwrap_err()
            .to_string();
        assert!(err.contains("percent-encoding"), "{err}");
    }
}
