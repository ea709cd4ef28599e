//! The password of a URL that has none, as libpq finds it: `PGPASSWORD`, else the password
//! file (`PGPASSFILE`, default `~/.pgpass`). Written by hand: the format is five
//! colon-separated fields a line, and no maintained crate reads it.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use tokio_postgres::config::Host;
use tokio_postgres::Config;

/// libpq's default port.
const DEFAULT_PORT: u16 = 5432;

/// The password for `config`'s first host, port, database and user, if any is found.
pub(super) fn password_for(config: &Config) -> Option<String> {
    if let Some(password) = std::env::var("PGPASSWORD").ok().filter(|p| !p.is_empty()) {
        return Some(password);
    }
    let path = password_file()?;
    let text = read_private(&path)?;
    let user = config
        .get_user()
        .map(str::to_owned)
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_default();
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(host)) => host.clone(),
        Some(Host::Unix(path)) => path.to_string_lossy().into_owned(),
        None => "localhost".to_owned(),
    };
    let port = config
        .get_ports()
        .first()
        .copied()
        .unwrap_or(DEFAULT_PORT)
        .to_string();
    let database = config.get_dbname().unwrap_or(&user).to_owned();
    lookup(&text, [&host, &port, &database, &user])
}

fn password_file() -> Option<PathBuf> {
    match std::env::var_os("PGPASSFILE").filter(|p| !p.is_empty()) {
        Some(path) => Some(PathBuf::from(path)),
        None => std::env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .map(|home| PathBuf::from(home).join(".pgpass")),
    }
}

/// The file's text, unless it is missing or readable by others (libpq ignores such a
/// file too, with a warning).
fn read_private(path: &PathBuf) -> Option<String> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_file() {
        return None;
    }
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(
            target: "pgbus::connection",
            path = %path.display(),
            "password file has group or world access and is ignored; chmod 0600 it"
        );
        return None;
    }
    std::fs::read_to_string(path).ok()
}

/// The password of the first line whose fields match `wanted` (`*` matches anything).
fn lookup(text: &str, wanted: [&str; 4]) -> Option<String> {
    text.lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .find_map(|line| {
            let fields = fields(line);
            let [host, port, database, user, password] = fields.as_slice() else {
                return None;
            };
            let matches = [host, port, database, user]
                .iter()
                .zip(wanted)
                .all(|(field, want)| field.as_str() == "*" || field.as_str() == want);
            matches.then(|| password.clone())
        })
}

/// A line's colon-separated fields, with `\:` and `\\` unescaped.
fn fields(line: &str) -> Vec<String> {
    let mut fields = Vec::new();
    let mut current = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => current.extend(chars.next()),
            ':' if fields.len() < 4 => fields.push(std::mem::take(&mut current)),
            c => current.push(c),
        }
    }
    fields.push(current);
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_matching_line_wins_with_wildcards_and_escapes() {
        let text = "# comment\n\
                    db.example:5432:app:alice:first\n\
                    *:*:*:alice:any\\:thing\\\\\n\
                    broken line\n";
        assert_eq!(
            lookup(text, ["db.example", "5432", "app", "alice"]).as_deref(),
            Some("first")
        );
        assert_eq!(
            lookup(text, ["other", "6543", "x", "alice"]).as_deref(),
            Some("any:thing\\")
        );
        assert_eq!(lookup(text, ["other", "6543", "x", "bob"]), None);
    }

    #[test]
    fn a_password_may_contain_colons_after_the_fourth() {
        assert_eq!(
            lookup("h:1:d:u:a:b", ["h", "1", "d", "u"]).as_deref(),
            Some("a:b")
        );
    }
}
