//! L1/L2 wallet keys on disk: one secp256k1 key per file, hex, readable by its owner
//! only (mode 0600), created once. The same key signs L1 transactions and the L2
//! actions of the account whose address it is.

use alloy::signers::local::PrivateKeySigner;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Why a wallet key could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum WalletError {
    /// Reading or writing the file failed.
    #[error("wallet key {path}: {cause}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        cause: std::io::Error,
    },
    /// The file is not a hex secp256k1 key.
    #[error("wallet key {0} is not a 32-byte hex secp256k1 key")]
    Decode(PathBuf),
    /// Readable by others: refuse a key that may have leaked.
    #[error(
        "wallet key {path} is readable by group or others (mode {mode:o}); run `chmod 600 {path}`"
    )]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
    },
}

/// Loads the key at `path`.
pub fn load(path: &Path) -> Result<PrivateKeySigner, WalletError> {
    let text = std::fs::read_to_string(path).map_err(|cause| WalletError::Io {
        path: path.to_owned(),
        cause,
    })?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .map_err(|cause| WalletError::Io {
                path: path.to_owned(),
                cause,
            })?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(WalletError::Permissions {
                path: path.to_owned(),
                mode: mode & 0o777,
            });
        }
    }
    text.trim()
        .trim_start_matches("0x")
        .parse()
        .map_err(|_| WalletError::Decode(path.to_owned()))
}

/// Loads the key at `path`, or creates one there (mode 0600). Returns it and whether it
/// was created now.
pub fn load_or_create(path: &Path) -> Result<(PrivateKeySigner, bool), WalletError> {
    if path.exists() {
        return Ok((load(path)?, false));
    }
    let io = |cause| WalletError::Io {
        path: path.to_owned(),
        cause,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let key = PrivateKeySigner::random();
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(io)?;
    writeln!(file, "{}", hex::encode(key.to_bytes())).map_err(io)?;
    Ok((key, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_created_once_private_and_refused_when_readable_by_others() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("w/key");
        let (a, created) = load_or_create(&path).expect("create");
        assert!(created);
        let (b, created) = load_or_create(&path).expect("load");
        assert!(!created);
        assert_eq!(a.address(), b.address());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
            assert!(matches!(load(&path), Err(WalletError::Permissions { .. })));
        }
        std::fs::write(dir.path().join("bad"), "zz").expect("write");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(
                dir.path().join("bad"),
                std::fs::Permissions::from_mode(0o600),
            )
            .expect("chmod");
        }
        assert!(matches!(
            load(&dir.path().join("bad")),
            Err(WalletError::Decode(_))
        ));
    }
}
