//! The peer's long-lived identity: an ed25519 key created once and kept in the data
//! directory, readable by its owner only (mode 0600), in libp2p's protobuf key encoding.

use libp2p::identity::Keypair;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Why the identity key could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Reading or writing the key file failed.
    #[error("identity key {path}: {cause}")]
    Io {
        /// The key file.
        path: PathBuf,
        /// What failed.
        cause: std::io::Error,
    },
    /// The file is not a libp2p key.
    #[error("identity key {path} is not a valid libp2p key: {cause}")]
    Decode {
        /// The key file.
        path: PathBuf,
        /// Why.
        cause: String,
    },
    /// The file is readable by others: refuse to use a key that may have leaked.
    #[error("identity key {path} is readable by group or others (mode {mode:o}); run `chmod 600 {path}`")]
    Permissions {
        /// The key file.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
    },
}

/// Loads the key at `path`, or creates a new ed25519 key there (mode 0600) if none exists.
/// Returns the key and whether it was created now.
pub fn load_or_create_identity(path: &Path) -> Result<(Keypair, bool), IdentityError> {
    let io = |cause| IdentityError::Io {
        path: path.to_owned(),
        cause,
    };
    match std::fs::read(path) {
        Ok(bytes) => {
            check_permissions(path)?;
            let key =
                Keypair::from_protobuf_encoding(&bytes).map_err(|e| IdentityError::Decode {
                    path: path.to_owned(),
                    cause: e.to_string(),
                })?;
            Ok((key, false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(io)?;
            }
            let key = Keypair::generate_ed25519();
            let bytes = key
                .to_protobuf_encoding()
                .expect("ed25519 keys always encode");
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
            let mut file = opts.open(path).map_err(io)?;
            file.write_all(&bytes).map_err(io)?;
            file.sync_all().map_err(io)?;
            Ok((key, true))
        }
        Err(e) => Err(io(e)),
    }
}

#[cfg(unix)]
fn check_permissions(path: &Path) -> Result<(), IdentityError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map_err(|cause| IdentityError::Io {
            path: path.to_owned(),
            cause,
        })?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(IdentityError::Permissions {
            path: path.to_owned(),
            mode: mode & 0o777,
        });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_permissions(_: &Path) -> Result<(), IdentityError> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_created_once_with_owner_only_mode_and_reloaded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/identity.key");
        let (first, created) = load_or_create_identity(&path).expect("create");
        assert!(created);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let (again, created) = load_or_create_identity(&path).expect("load");
        assert!(!created);
        assert_eq!(first.public().to_peer_id(), again.public().to_peer_id());
    }

    #[cfg(unix)]
    #[test]
    fn a_key_others_can_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("identity.key");
        load_or_create_identity(&path).expect("create");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = load_or_create_identity(&path).unwrap_err();
        assert!(
            matches!(err, IdentityError::Permissions { mode: 0o644, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("chmod 600"));
    }

    #[test]
    fn garbage_key_file_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("identity.key");
        std::fs::write(&path, b"not a key").expect("write");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        }
        let err = load_or_create_identity(&path).unwrap_err();
        assert!(matches!(err, IdentityError::Decode { .. }), "{err}");
    }
}
