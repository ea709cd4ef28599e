//! The secret that signs stream names, shared by `pgbus stream url` and `pgbus serve`.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use pgbus_stream::Signer;

/// Where the generated signing secret is kept when `PGBUS_STREAM_SECRET` is not set.
const SECRET_FILE: &str = "stream-secret";

/// The signer shared by `pgbus stream url` and `pgbus serve`: the key ring in
/// `PGBUS_STREAM_SECRET` (secrets of at least 16 bytes separated by commas: the first
/// signs, all verify, so a secret is rotated by putting a new one first), else a random
/// secret generated on first use and kept in the pgbus home, readable by its owner only.
/// Every `serve` of one deployment must share it, or the URLs one hands out are refused by
/// the others: set the variable in production.
pub(crate) fn signer() -> anyhow::Result<Signer> {
    if let Some(secrets) = std::env::var_os("PGBUS_STREAM_SECRET").filter(|s| !s.is_empty()) {
        let secrets = secrets
            .into_string()
            .map_err(|_| anyhow::anyhow!("PGBUS_STREAM_SECRET is not UTF-8"))?;
        return Signer::with_keys(secrets.split(',').map(str::trim)).context("PGBUS_STREAM_SECRET");
    }
    let home = super::database::home()?;
    std::fs::create_dir_all(&home)
        .with_context(|| format!("creating the pgbus home {}", home.display()))?;
    let path = home.join(SECRET_FILE);
    let secret = match read_secret(&path) {
        Ok(secret) => secret,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => create_secret(&path)?,
        Err(err) => return Err(err).with_context(|| format!("reading {}", path.display())),
    };
    Signer::new(secret.trim()).with_context(|| format!("the secret in {}", path.display()))
}

/// The secret file's text, refused when others may read or write it (as ssh does with
/// keys): a secret others could read signs URLs for anyone.
fn read_secret(path: &Path) -> std::io::Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)?.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "its permissions are {:o}, open to others: chmod 600 it",
                mode & 0o777
            ),
        ));
    }
    std::fs::read_to_string(path)
}

/// Writes a new random secret to a private temporary file and links it into place, so the
/// secret appears whole or not at all; when another process got there first, its secret
/// is used.
fn create_secret(path: &Path) -> anyhow::Result<String> {
    use rand::Rng;
    use std::os::unix::fs::OpenOptionsExt;
    let bytes: [u8; 32] = rand::rng().random();
    let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let temp = path.with_extension(format!("tmp-{}", std::process::id()));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temp)
        .and_then(|mut file| {
            file.write_all(secret.as_bytes())?;
            file.sync_all()
        });
    if let Err(err) = written {
        let _ = std::fs::remove_file(&temp);
        return Err(err).with_context(|| format!("writing {}", temp.display()));
    }
    let linked = std::fs::hard_link(&temp, path);
    let _ = std::fs::remove_file(&temp);
    match linked {
        Ok(()) => Ok(secret),
        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {
            read_secret(path).with_context(|| format!("reading {}", path.display()))
        }
        Err(err) => Err(err).with_context(|| format!("creating {}", path.display())),
    }
}
