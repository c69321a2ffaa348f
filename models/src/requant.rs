//! Requantizing a GGUF into another format of the same weights: each quantized tensor is
//! dequantized and quantized again with candle's quantizers, like llama.cpp's
//! `llama-quantize --allow-requantize`. The result is a different module (its own weights
//! hash and quantization): what a dishonest node might run while advertising the original,
//! so verification benchmarks and adversarial tests make their substitutes with this.
//!
//! Tensors whose rows do not split into the target's blocks (K-quants need multiples of
//! 256; SmolLM2's width is 576) fall back to Q4_0, as llama.cpp falls back for them; norms
//! and other f32 tensors are copied.

use std::path::Path;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::Device;

/// Why a requantization failed.
#[derive(Debug, thiserror::Error)]
pub enum RequantError {
    /// Reading or writing a file failed.
    #[error("{path}: {cause}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        cause: std::io::Error,
    },
    /// The tensor library refused.
    #[error("requantizing {tensor}: {cause}")]
    Tensor {
        /// The tensor.
        tensor: String,
        /// Why.
        cause: candle_core::Error,
    },
    /// The target format is not one we write.
    #[error("cannot requantize to {0:?}: supported targets are q8_0, q4_0, q4_1, q5_0, q2_k, q4_k, q6_k")]
    Unsupported(GgmlDType),
}

/// A target format by its llama.cpp name (`q8_0`, `q4_0`, `q2_k`, …).
pub fn parse_format(name: &str) -> Option<GgmlDType> {
    Some(match name.to_ascii_lowercase().as_str() {
        "q8_0" => GgmlDType::Q8_0,
        "q4_0" => GgmlDType::Q4_0,
        "q4_1" => GgmlDType::Q4_1,
        "q5_0" => GgmlDType::Q5_0,
        "q2_k" => GgmlDType::Q2K,
        "q4_k" => GgmlDType::Q4K,
        "q6_k" => GgmlDType::Q6K,
        _ => return None,
    })
}

/// llama.cpp's `general.file_type` for a whole file in `dtype`.
fn file_type(dtype: GgmlDType) -> Option<u32> {
    Some(match dtype {
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q8_0 => 7,
        GgmlDType::Q5_0 => 8,
        GgmlDType::Q2K => 10,
        GgmlDType::Q4K => 15,
        GgmlDType::Q6K => 18,
        _ => return None,
    })
}

/// What a requantization did.
#[derive(Debug, Clone, Default)]
pub struct RequantSummary {
    /// Tensors written in the target format.
    pub converted: usize,
    /// Tensors that fell back to Q4_0 (rows not a multiple of the target's block).
    pub fallback: usize,
    /// Tensors copied as they were (not quantized in the source).
    pub copied: usize,
}

/// Writes `src` requantized to `to` at `dst`.
pub fn requantize(src: &Path, dst: &Path, to: GgmlDType) -> Result<RequantSummary, RequantError> {
    let ft = file_type(to).ok_or(RequantError::Unsupported(to))?;
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |cause| RequantError::Io { path, cause }
    };
    let mut reader = std::io::BufReader::new(std::fs::File::open(src).map_err(io(src))?);
    let content = gguf_file::Content::read(&mut reader).map_err(|cause| RequantError::Tensor {
        tensor: "(header)".into(),
        cause,
    })?;
    let mut summary = RequantSummary::default();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort_by_key(|n| content.tensor_infos[*n].offset);
    let mut tensors: Vec<(String, QTensor)> = Vec::with_capacity(names.len());
    for name in names {
        let fail = |cause| RequantError::Tensor {
            tensor: name.clone(),
            cause,
        };
        let q = content
            .tensor(&mut reader, name, &Device::Cpu)
            .map_err(fail)?;
        let dtype = q.dtype();
        if matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) {
            summary.copied += 1;
            tensors.push((name.clone(), q));
            continue;
        }
        let cols = *q.shape().dims().last().unwrap_or(&0);
        let target = if cols % to.block_size() == 0 {
            summary.converted += 1;
            to
        } else {
            summary.fallback += 1;
            GgmlDType::Q4_0
        };
        let f = q.dequantize(&Device::Cpu).map_err(fail)?;
        let out = QTensor::quantize(&f, target).map_err(fail)?;
        tensors.push((name.clone(), out));
    }
    let mut metadata: Vec<(String, gguf_file::Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    metadata.retain(|(k, _)| k != "general.file_type");
    metadata.push(("general.file_type".into(), gguf_file::Value::U32(ft)));
    metadata.sort_by(|a, b| a.0.cmp(&b.0));
    let md_refs: Vec<(&str, &gguf_file::Value)> =
        metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    // A private temporary file per call (not per process: tests in one process may make
    // the same substitute at once), renamed into place when whole.
    let dir = dst
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = tempfile::NamedTempFile::new_in(dir).map_err(io(dir))?;
    let mut out = std::io::BufWriter::new(tmp);
    gguf_file::write(&mut out, &md_refs, &t_refs).map_err(|cause| RequantError::Tensor {
        tensor: "(writing)".into(),
        cause,
    })?;
    let tmp = out.into_inner().map_err(|e| io(dst)(e.into_error()))?;
    tmp.persist(dst).map_err(|e| io(dst)(e.error))?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tiny_model_requantizes_into_another_module_that_still_loads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("tiny.gguf");
        crate::test_support::write_tiny_gguf(&src, &crate::test_support::TinySpec::default())
            .expect("tiny model");
        let dst = dir.path().join("tiny-q4_0.gguf");
        let summary = requantize(&src, &dst, GgmlDType::Q4_0).expect("requantize");
        assert!(summary.converted > 0, "{summary:?}");
        let a = crate::Model::load(&src, "tiny").expect("load original");
        let b = crate::Model::load(&dst, "tiny-q4_0").expect("load requantized");
        assert_ne!(a.module_id(), b.module_id());
        assert_eq!(b.module_id().quantization.to_string(), "q4_0");
        assert!(matches!(
            requantize(&src, &dst, GgmlDType::F32),
            Err(RequantError::Unsupported(_))
        ));
    }
}
