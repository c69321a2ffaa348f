//! Opening model files: check that a path is a complete GGUF of an architecture we serve,
//! hash it (the module id carries its blake3), and read the metadata the engine needs.
//! Every failure is one clear line naming the file and what is wrong with it.

use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use tessera_protocol::{ModuleId, Quantization, WeightsHash};

use crate::catalog;

/// Why a model file could not be opened or loaded.
/// Each message already names its cause (fields `cause`, not `source`), so printing the
/// error chain shows it once.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The name is neither a catalogue alias nor an existing file.
    #[error("unknown model {0:?}: not a catalogue alias ({aliases}) nor a GGUF file; try \"tessera models list\"", aliases = catalog::aliases())]
    UnknownModel(String),
    /// A catalogue model that has not been fetched.
    #[error("model {alias} is not downloaded yet: run \"tessera models fetch {alias}\"")]
    NotFetched {
        /// The alias.
        alias: String,
    },
    /// The file cannot be opened.
    #[error("cannot open model file {path}: {cause}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The OS error.
        cause: std::io::Error,
    },
    /// The file is not a readable GGUF.
    #[error("{path} is not a valid GGUF model file: {reason}")]
    NotGguf {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },
    /// The header promises more tensor data than the file holds.
    #[error(
        "{path} is truncated: tensor {tensor} ends at byte {needed} but the file has {len} bytes"
    )]
    Truncated {
        /// The file.
        path: PathBuf,
        /// First tensor that does not fit.
        tensor: String,
        /// Bytes the file should have at least.
        needed: u64,
        /// Bytes it has.
        len: u64,
    },
    /// A cached catalogue file whose bytes differ from the published hash.
    #[error("{path} is corrupt (blake3 {got}, expected {expected}): run \"tessera models fetch --force {alias}\"")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The alias it should hold.
        alias: &'static str,
        /// Hash found.
        got: String,
        /// Hash expected.
        expected: &'static str,
    },
    /// A GGUF of an architecture Tessera cannot run.
    #[error("{path}: unsupported model architecture {arch:?} (supported: llama, gemma3)")]
    UnsupportedArchitecture {
        /// The file.
        path: PathBuf,
        /// `general.architecture`.
        arch: String,
    },
    /// Metadata the loader needs is missing or has the wrong type.
    #[error("{path}: bad metadata: {reason}")]
    BadMetadata {
        /// The file.
        path: PathBuf,
        /// What is missing or wrong.
        reason: String,
    },
    /// The tokenizer could not be built from the metadata.
    #[error("{path}: {cause}")]
    Tokenizer {
        /// The file.
        path: PathBuf,
        /// The tokenizer's error.
        cause: crate::tokenizer::TokenizerError,
    },
    /// candle failed to build the model from valid-looking tensors.
    #[error("{path}: cannot load weights: {cause}")]
    Weights {
        /// The file.
        path: PathBuf,
        /// What failed (the first line of candle's error: it may append a backtrace).
        cause: String,
    },
}

/// Where a tensor's bytes lie in the file, or `None` when its header numbers overflow or its
/// element count is not whole blocks of its type (the one place this arithmetic is done).
pub(crate) fn tensor_span(
    content: &gguf_file::Content,
    t: &gguf_file::TensorInfo,
) -> Option<std::ops::Range<u64>> {
    let elems = t
        .shape
        .dims()
        .iter()
        .try_fold(1u64, |n, &d| n.checked_mul(d as u64))?;
    let block = t.ggml_dtype.block_size() as u64;
    if elems % block != 0 {
        return None;
    }
    let bytes = (elems / block).checked_mul(t.ggml_dtype.type_size() as u64)?;
    let start = content.tensor_data_offset.checked_add(t.offset)?;
    Some(start..start.checked_add(bytes)?)
}

/// Model architectures the engine can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// llama-family (SmolLM2, Llama, Mistral-style) via candle's `quantized_llama`.
    Llama,
    /// Gemma 3 via candle's `quantized_gemma3`.
    Gemma3,
}

impl Architecture {
    /// Longest context `backend` can serve for this architecture (candle's stock models
    /// have fixed-size rope tables; ours grow theirs on demand, so the model's own applies).
    pub fn max_context(self, backend: Backend) -> u32 {
        match (self, backend) {
            (_, Backend::Tessera) => u32::MAX,
            (Self::Llama, Backend::Candle) => {
                candle_transformers::models::quantized_llama::MAX_SEQ_LEN as u32
            }
            (Self::Gemma3, Backend::Candle) => {
                candle_transformers::models::quantized_gemma3::MAX_SEQ_LEN as u32
            }
        }
    }

    /// The name GGUF uses in `general.architecture`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Gemma3 => "gemma3",
        }
    }
}

/// Which implementation runs a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// Our serving models and kernels where we have them (llama), candle's otherwise.
    #[default]
    Tessera,
    /// candle-transformers' stock quantized models: the numerics reference.
    Candle,
}

impl std::str::FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tessera" => Ok(Self::Tessera),
            "candle" => Ok(Self::Candle),
            other => Err(format!(
                "unknown backend {other:?}: expected \"tessera\" or \"candle\""
            )),
        }
    }
}

/// Where a model name pointed.
#[derive(Debug, Clone)]
pub struct ResolvedModel {
    /// The file to load.
    pub path: PathBuf,
    /// The catalogue entry, when the name was an alias or the file is a catalogue file.
    pub entry: Option<&'static catalog::CatalogEntry>,
}

/// Turns a user's model name (catalogue alias or GGUF path) into a file, without fetching.
pub fn resolve(name: &str, home: &Path) -> Result<ResolvedModel, LoadError> {
    if let Some(entry) = catalog::find(name) {
        let path = entry.cache_path(home);
        if !path.exists() {
            return Err(LoadError::NotFetched {
                alias: entry.alias.to_owned(),
            });
        }
        return Ok(ResolvedModel {
            path,
            entry: Some(entry),
        });
    }
    let path = PathBuf::from(name);
    if path.is_file() {
        let entry = catalog::CATALOG.iter().find(|e| e.cache_path(home) == path);
        return Ok(ResolvedModel { path, entry });
    }
    if path.exists() || name.ends_with(".gguf") || name.contains(std::path::MAIN_SEPARATOR) {
        let cause = if path.is_dir() {
            std::io::Error::other("it is a directory, not a GGUF file")
        } else {
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file")
        };
        return Err(LoadError::Open { path, cause });
    }
    Err(LoadError::UnknownModel(name.to_owned()))
}

/// A model file that parsed, fits its size, and has a known architecture.
#[derive(Debug)]
pub struct ModelFile {
    /// The file.
    pub path: PathBuf,
    /// The GGUF header and metadata.
    pub content: gguf_file::Content,
    /// Its architecture.
    pub arch: Architecture,
    /// Its quantization (`general.file_type`).
    pub quantization: Quantization,
    /// Context length the engine serves: the smaller of the model's and the engine's.
    pub context_length: u32,
    /// The memory-mapped file.
    pub(crate) mmap: std::sync::Arc<memmap2::Mmap>,
}

impl ModelFile {
    /// Opens, parses and size-checks `path` (no hashing, no weights loaded), for `backend`.
    pub fn open(path: &Path) -> Result<Self, LoadError> {
        Self::open_for(path, Backend::default())
    }

    /// Like [`ModelFile::open`], with the context length `backend` can serve.
    pub fn open_for(path: &Path, backend: Backend) -> Result<Self, LoadError> {
        let file = File::open(path).map_err(|cause| LoadError::Open {
            path: path.to_owned(),
            cause,
        })?;
        let len = file
            .metadata()
            .map_err(|cause| LoadError::Open {
                path: path.to_owned(),
                cause,
            })?
            .len();
        let mmap = map(&file).map_err(|cause| LoadError::Open {
            path: path.to_owned(),
            cause,
        })?;
        let not_gguf = |reason: String| LoadError::NotGguf {
            path: path.to_owned(),
            reason,
        };
        if len < 4 || &mmap[..4] != b"GGUF" {
            return Err(not_gguf("missing GGUF magic".into()));
        }
        // candle's parser bounds every length by the file size but divides by the header's
        // `general.alignment` unchecked: a hostile 0 must be an error, not a crash.
        if declared_alignment(&mmap) == Some(0) {
            return Err(not_gguf("general.alignment is 0".into()));
        }
        let content = gguf_file::Content::read(&mut std::io::Cursor::new(&mmap[..]))
            .map_err(|e| not_gguf(first_line(&e.to_string())))?;
        for (name, t) in &content.tensor_infos {
            let Some(span) = tensor_span(&content, t) else {
                return Err(not_gguf(format!(
                    "tensor {name} has an impossible shape {:?} or offset for {:?}",
                    t.shape.dims(),
                    t.ggml_dtype
                )));
            };
            let needed = span.end;
            if needed > len {
                return Err(LoadError::Truncated {
                    path: path.to_owned(),
                    tensor: name.clone(),
                    needed,
                    len,
                });
            }
        }
        let bad = |reason: String| LoadError::BadMetadata {
            path: path.to_owned(),
            reason,
        };
        let arch_name = content
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .ok_or_else(|| bad("no general.architecture".into()))?
            .clone();
        let arch = match arch_name.as_str() {
            "llama" => Architecture::Llama,
            "gemma3" => Architecture::Gemma3,
            _ => {
                return Err(LoadError::UnsupportedArchitecture {
                    path: path.to_owned(),
                    arch: arch_name,
                })
            }
        };
        let md_u32 = |key: &str| content.metadata.get(key).and_then(|v| v.to_u32().ok());
        let model_ctx = md_u32(&format!("{arch_name}.context_length"))
            .ok_or_else(|| bad(format!("no {arch_name}.context_length")))?;
        let quantization = match md_u32("general.file_type") {
            Some(ft) => Quantization::from_gguf_file_type(ft),
            None => guess_quantization(&content),
        };
        Ok(Self {
            path: path.to_owned(),
            arch,
            quantization,
            context_length: model_ctx.min(arch.max_context(backend)),
            content,
            mmap: std::sync::Arc::new(mmap),
        })
    }

    /// blake3 of the whole file: the weights hash of its module id.
    pub fn weights_hash(&self) -> WeightsHash {
        let mut h = blake3::Hasher::new();
        h.update(&self.mmap);
        h.finalize().into()
    }

    /// The module id this file is served as, given its weights hash.
    pub fn module_id(&self, weights: WeightsHash) -> ModuleId {
        ModuleId::new(
            self.arch.as_str(),
            self.quantization.clone(),
            self.context_length,
            weights,
        )
        .expect("architecture names are valid module families")
    }

    /// Reads a string metadata value.
    pub fn metadata_str(&self, key: &str) -> Option<&str> {
        self.content
            .metadata
            .get(key)
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
    }
}

#[allow(unsafe_code)]
fn map(file: &File) -> std::io::Result<memmap2::Mmap> {
    // SAFETY: the mapping is read-only and model files are never modified in place (the
    // fetcher writes a temporary file and renames it); a concurrent writer outside Tessera
    // could change bytes under us, which would corrupt outputs but not memory safety of the
    // Rust code beyond what reading a changing `&[u8]` implies.
    unsafe { memmap2::Mmap::map(file) }
}

fn guess_quantization(content: &gguf_file::Content) -> Quantization {
    // The most common dtype among 2-D weights names the file's quantization.
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for t in content.tensor_infos.values() {
        if t.shape.rank() == 2 {
            *counts
                .entry(format!("{:?}", t.ggml_dtype).to_lowercase())
                .or_default() += 1;
        }
    }
    let name = counts
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .map(|(k, _)| k)
        .unwrap_or_else(|| "unknown".into());
    Quantization::try_from(name).unwrap_or_else(|_| Quantization::from_gguf_file_type(u32::MAX))
}

/// The integer `general.alignment` a GGUF header declares, found by walking its metadata in
/// place (no allocation, every read bounds-checked). `None` when absent or when the header
/// is malformed, which candle's parser then reports.
fn declared_alignment(bytes: &[u8]) -> Option<u64> {
    struct Reader<'a> {
        b: &'a [u8],
        at: usize,
        wide: bool,
    }
    impl<'a> Reader<'a> {
        fn take(&mut self, n: u64) -> Option<&'a [u8]> {
            let end = self.at.checked_add(usize::try_from(n).ok()?)?;
            let s = self.b.get(self.at..end)?;
            self.at = end;
            Some(s)
        }
        fn uint(&mut self, size: u64) -> Option<u64> {
            let mut v = [0u8; 8];
            v[..size as usize].copy_from_slice(self.take(size)?);
            Some(u64::from_le_bytes(v))
        }
        fn len(&mut self) -> Option<u64> {
            self.uint(if self.wide { 8 } else { 4 })
        }
        fn skip(&mut self, ty: u64, depth: u32) -> Option<()> {
            match (ty, fixed_size(ty)) {
                (_, Some(size)) => self.take(size).map(drop),
                (8, None) => {
                    let n = self.len()?;
                    self.take(n).map(drop)
                }
                (9, None) if depth < 4 => {
                    let elem = self.uint(4)?;
                    let n = self.len()?;
                    if let Some(size) = fixed_size(elem) {
                        return self.take(n.checked_mul(size)?).map(drop);
                    }
                    (0..n).try_for_each(|_| self.skip(elem, depth + 1))
                }
                _ => None,
            }
        }
    }
    fn fixed_size(ty: u64) -> Option<u64> {
        match ty {
            0 | 1 | 7 => Some(1),
            2 | 3 => Some(2),
            4..=6 => Some(4),
            10..=12 => Some(8),
            _ => None,
        }
    }
    let mut r = Reader {
        b: bytes,
        at: 4,
        wide: false,
    };
    r.wide = r.uint(4)? >= 2;
    let _tensors = r.len()?;
    let kvs = r.len()?;
    for _ in 0..kvs {
        let key_len = r.len()?;
        let key = r.take(key_len)?;
        let ty = r.uint(4)?;
        if key == b"general.alignment" {
            // U8, I8, U16, I16, U32, I32: the integer types candle reads it from.
            return match ty {
                0..=5 => r.uint(fixed_size(ty)?),
                _ => None,
            };
        }
        r.skip(ty, 0)?;
    }
    None
}

pub(crate) fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or(s).to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{write_tiny_gguf, TinySpec};

    #[test]
    fn declared_alignment_is_found_past_the_tokenizer_arrays() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.gguf");
        write_tiny_gguf(&path, &TinySpec::default()).expect("write");
        assert_eq!(
            declared_alignment(&std::fs::read(&path).expect("read")),
            None
        );
        let spec = TinySpec {
            // Written last, after every string and array the walk has to skip.
            metadata: vec![("general.alignment".into(), gguf_file::Value::U32(64))],
            ..TinySpec::default()
        };
        write_tiny_gguf(&path, &spec).expect("write");
        let bytes = std::fs::read(&path).expect("read");
        assert_eq!(declared_alignment(&bytes), Some(64));
        // Cut anywhere before the value: no answer, and no panic.
        let key = bytes
            .windows(17)
            .position(|w| w == b"general.alignment")
            .expect("key written");
        for cut in (0..key + 21).step_by(7) {
            assert_eq!(declared_alignment(&bytes[..cut]), None, "cut at {cut}");
        }
    }
}
