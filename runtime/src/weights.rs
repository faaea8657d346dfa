//! Weights from Hugging Face safetensors files, memory-mapped.
//!
//! A model directory holds `model.safetensors`, or shards named by
//! `model.safetensors.index.json`. Every file's header is checked before a
//! tensor is used: a tensor whose bytes run past the end of its file (a
//! truncated download) is refused naming the tensor and the file, as is a
//! tensor that is missing, has the wrong shape, or a dtype other than
//! FP16, BF16 and FP32.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

use crate::{Error, Result};

/// The model's safetensors files, mapped.
pub struct Weights {
    files: Vec<(PathBuf, Mmap)>,
    /// Tensor name → (file index, dtype, shape).
    index: HashMap<String, (usize, Dtype, Vec<usize>)>,
}

#[derive(Deserialize)]
struct HeaderEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: (usize, usize),
}

impl Weights {
    /// Maps the safetensors files of the model in `dir`.
    pub fn open(dir: &Path) -> Result<Weights> {
        let files = safetensors_files(dir)?;
        let mut weights = Weights {
            files: Vec::new(),
            index: HashMap::new(),
        };
        for path in files {
            let file = std::fs::File::open(&path)
                .map_err(|e| Error::Model(format!("cannot open {}: {e}", path.display())))?;
            // SAFETY: the file is only read; a model file changed under a
            // running replica is an operator error the checks below cannot
            // rule out, as with every engine that maps its weights
            let map = unsafe { Mmap::map(&file) }
                .map_err(|e| Error::Model(format!("cannot map {}: {e}", path.display())))?;
            check_header(&path, &map)?;
            let tensors = SafeTensors::deserialize(&map).map_err(|e| {
                Error::Model(format!("{}: not a safetensors file: {e}", path.display()))
            })?;
            let at = weights.files.len();
            for (name, view) in tensors.tensors() {
                weights
                    .index
                    .insert(name, (at, view.dtype(), view.shape().to_vec()));
            }
            weights.files.push((path, map));
        }
        Ok(weights)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Tensor `name` as f32, checked against `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let (file, dtype, found) = self.index.get(name).ok_or_else(|| {
            Error::Model(format!(
                "tensor {name} is missing from the model's safetensors files ({})",
                self.file_names()
            ))
        })?;
        if found != shape {
            return Err(Error::Model(format!(
                "tensor {name} has shape {found:?}; the model's config.json needs {shape:?}"
            )));
        }
        let (path, map) = &self.files[*file];
        let tensors = SafeTensors::deserialize(map)
            .map_err(|e| Error::Model(format!("{}: {e}", path.display())))?;
        let view = tensors
            .tensor(name)
            .map_err(|e| Error::Model(format!("tensor {name} in {}: {e}", path.display())))?;
        let bytes = view.data();
        Ok(match dtype {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => {
                return Err(Error::Model(format!(
                "tensor {name} is {other:?}; the native executor reads F16, BF16 and F32 weights"
            )))
            }
        })
    }

    fn file_names(&self) -> String {
        let names: Vec<String> = self
            .files
            .iter()
            .map(|(p, _)| {
                p.file_name()
                    .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
            })
            .collect();
        names.join(", ")
    }
}

/// The safetensors files of the model in `dir`: the shards the index
/// names, or `model.safetensors`.
fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        #[derive(Deserialize)]
        struct Index {
            weight_map: HashMap<String, String>,
        }
        let text = std::fs::read_to_string(&index)
            .map_err(|e| Error::Model(format!("cannot read {}: {e}", index.display())))?;
        let parsed: Index = serde_json::from_str(&text)
            .map_err(|e| Error::Model(format!("{}: {e}", index.display())))?;
        let mut files: Vec<String> = parsed.weight_map.into_values().collect();
        files.sort();
        files.dedup();
        for f in &files {
            if f.contains('/') || f.contains("..") {
                return Err(Error::Model(format!(
                    "{} names the shard {f:?}; shards must sit beside it",
                    index.display()
                )));
            }
        }
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    Err(Error::Model(format!(
        "{} holds neither model.safetensors nor model.safetensors.index.json",
        dir.display()
    )))
}

/// Checks a file's header against its length, naming the first tensor
/// whose bytes are not all there.
fn check_header(path: &Path, bytes: &[u8]) -> Result<()> {
    let bad = |why: String| Error::Model(format!("{}: {why}", path.display()));
    let len = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
        .ok_or_else(|| {
            bad(format!(
                "{} bytes is too short for a safetensors header",
                bytes.len()
            ))
        })?;
    let end = 8usize.saturating_add(usize::try_from(len).unwrap_or(usize::MAX));
    let header = bytes.get(8..end).ok_or_else(|| {
        bad(format!(
            "the header says it is {len} bytes but the file is {} bytes (truncated?)",
            bytes.len()
        ))
    })?;
    let entries: HashMap<String, serde_json::Value> =
        serde_json::from_slice(header).map_err(|e| bad(format!("the header is not JSON: {e}")))?;
    let data = bytes.len() - end;
    let mut tensors: Vec<(String, HeaderEntry)> = Vec::new();
    for (name, v) in entries {
        if name == "__metadata__" {
            continue;
        }
        let entry: HeaderEntry = serde_json::from_value(v)
            .map_err(|e| bad(format!("tensor {name}'s header entry: {e}")))?;
        tensors.push((name, entry));
    }
    tensors.sort_by_key(|(_, e)| e.data_offsets.0);
    for (name, e) in &tensors {
        let (start, stop) = e.data_offsets;
        if stop > data || start > stop {
            return Err(bad(format!(
                "tensor {name} ({} {:?}) needs bytes {start}..{stop} of the data but the file holds {data} (truncated?)",
                e.dtype, e.shape
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;

    fn write(dir: &Path, tensors: &[(&str, Vec<usize>)]) -> PathBuf {
        let data: Vec<Vec<u8>> = tensors
            .iter()
            .map(|(_, s)| {
                (0..s.iter().product::<usize>())
                    .flat_map(|i| half::bf16::from_f32(i as f32).to_le_bytes())
                    .collect()
            })
            .collect();
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .zip(&data)
            .map(|((n, s), d)| {
                (
                    n.to_string(),
                    TensorView::new(Dtype::BF16, s.clone(), d).unwrap(),
                )
            })
            .collect();
        let path = dir.join("model.safetensors");
        safetensors::serialize_to_file(views, None, &path).unwrap();
        path
    }

    #[test]
    fn reads_bf16_and_refuses_missing_misshapen_and_truncated_tensors_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            &[("a.weight", vec![2, 3]), ("b.weight", vec![4])],
        );
        let w = Weights::open(dir.path()).unwrap();
        assert_eq!(
            w.get("a.weight", &[2, 3]).unwrap(),
            vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
        );
        let missing = w.get("c.weight", &[1]).unwrap_err().to_string();
        assert!(missing.contains("tensor c.weight is missing"), "{missing}");
        let shape = w.get("a.weight", &[3, 2]).unwrap_err().to_string();
        assert!(
            shape.contains("tensor a.weight has shape [2, 3]"),
            "{shape}"
        );
        drop(w);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        let truncated = Weights::open(dir.path()).err().unwrap().to_string();
        assert!(
            truncated.contains("tensor b.weight") && truncated.contains("truncated"),
            "{truncated}"
        );
        std::fs::write(&path, &bytes[..5]).unwrap();
        let short = Weights::open(dir.path()).err().unwrap().to_string();
        assert!(short.contains("too short"), "{short}");
    }
}
