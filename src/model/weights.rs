//! HF safetensors checkpoints: read a model directory (single `model.safetensors` or sharded
//! `model-0000x-of-0000y.safetensors` + `model.safetensors.index.json`; f32, f16 or bf16) into f32,
//! and write one back in the same layout, atomically.
//!
//! Files are memory-mapped; a tensor is converted to f32 only when it is read, straight into the
//! caller's slice (the model's flat buffer), so loading never holds two f32 copies of the weights.

use crate::tensor::{DType, bytes_to_f32, f32_to_bytes};
use anyhow::{Context, Result, bail};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use serde_json::{Value, json};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The single-file checkpoint name.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Where one tensor lives in an opened checkpoint.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub dtype: DType,
    pub shape: Vec<usize>,
    file: usize,
    /// Byte range in the mapped file.
    bytes: std::ops::Range<usize>,
}

/// An HF safetensors checkpoint opened for reading (memory-mapped).
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<(PathBuf, Mmap)>,
    tensors: BTreeMap<String, TensorInfo>,
    /// True when the directory has `model.safetensors.index.json`.
    pub sharded: bool,
}

fn dtype_of(d: Dtype) -> Option<DType> {
    match d {
        Dtype::F32 => Some(DType::F32),
        Dtype::F16 => Some(DType::F16),
        Dtype::BF16 => Some(DType::BF16),
        _ => None,
    }
}

impl Checkpoint {
    /// Open the safetensors weights of `dir`: the index + its shards if `model.safetensors.index.json`
    /// exists, else `model.safetensors`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index = dir.join(INDEX_FILE);
        let (file_names, sharded) = if index.exists() {
            let text = std::fs::read_to_string(&index)
                .with_context(|| format!("cannot read {}", index.display()))?;
            let v: Value = serde_json::from_str(&text)
                .with_context(|| format!("{}: not valid JSON", index.display()))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .with_context(|| format!("{}: no `weight_map` object", index.display()))?;
            let mut files: Vec<String> = Vec::new();
            for (name, f) in map {
                let f = f.as_str().with_context(|| {
                    format!(
                        "{}: weight_map[{name:?}] is not a file name",
                        index.display()
                    )
                })?;
                if f.contains('/') || f.contains('\\') || f.starts_with('.') {
                    bail!(
                        "{}: weight_map[{name:?}] = {f:?} is not a plain file name",
                        index.display()
                    );
                }
                if !files.iter().any(|x| x == f) {
                    files.push(f.to_owned());
                }
            }
            files.sort();
            (files, true)
        } else if dir.join(SINGLE_FILE).exists() {
            (vec![SINGLE_FILE.to_owned()], false)
        } else if dir.join("pytorch_model.bin").exists() {
            bail!(
                "{}: only safetensors checkpoints are supported (found pytorch_model.bin; convert it with `save_pretrained(..., safe_serialization=True)`)",
                dir.display()
            );
        } else {
            bail!("{}: no {SINGLE_FILE} and no {INDEX_FILE}", dir.display());
        };
        let mut ck = Checkpoint {
            dir: dir.to_owned(),
            files: Vec::new(),
            tensors: BTreeMap::new(),
            sharded,
        };
        for name in file_names {
            let path = dir.join(&name);
            let file = std::fs::File::open(&path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            // SAFETY: the map is read-only; a file truncated under us by another process is outside
            // what any mmap-based reader can defend against.
            let mmap = unsafe { Mmap::map(&file) }
                .with_context(|| format!("cannot map {}", path.display()))?;
            let (header_len, meta) = SafeTensors::read_metadata(&mmap)
                .map_err(|e| anyhow::anyhow!("{}: bad safetensors file: {e}", path.display()))?;
            let data_start = 8 + header_len;
            let fi = ck.files.len();
            for (tname, info) in meta.tensors() {
                let dtype = dtype_of(info.dtype).with_context(|| {
                    format!(
                        "{}: tensor {tname} has dtype {:?} (only F32, F16, BF16 are supported)",
                        path.display(),
                        info.dtype
                    )
                })?;
                let (a, b) = info.data_offsets;
                let info = TensorInfo {
                    dtype,
                    shape: info.shape.clone(),
                    file: fi,
                    bytes: data_start + a..data_start + b,
                };
                if let Some(prev) = ck.tensors.insert(tname.clone(), info) {
                    bail!(
                        "tensor {tname} appears in both {} and {}",
                        ck.files[prev.file].0.display(),
                        path.display()
                    );
                }
            }
            ck.files.push((path, mmap));
        }
        Ok(ck)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(|s| s.as_str())
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    /// The file holding `name`.
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.tensors
            .get(name)
            .map(|i| self.files[i.file].0.as_path())
    }

    /// The dtype most of the bytes are stored in (what a re-save should use by default).
    pub fn main_dtype(&self) -> DType {
        let mut bytes: HashMap<DType, usize> = HashMap::new();
        for t in self.tensors.values() {
            *bytes.entry(t.dtype).or_default() += t.bytes.len();
        }
        bytes
            .into_iter()
            .max_by_key(|(_, n)| *n)
            .map(|(d, _)| d)
            .unwrap_or(DType::F32)
    }

    /// Largest shard in bytes (to re-shard at the same size on save).
    pub fn max_file_bytes(&self) -> usize {
        self.files.iter().map(|(_, m)| m.len()).max().unwrap_or(0)
    }

    /// `out = tensor name` converted to f32; checks the name exists and its shape is `shape`.
    /// Errors name the tensor, the file and both shapes.
    pub fn read_into(&self, name: &str, shape: &[usize], out: &mut [f32]) -> Result<()> {
        let info = self.tensors.get(name).with_context(|| {
            format!(
                "{}: missing tensor {name} (expected shape {shape:?})",
                self.dir.display()
            )
        })?;
        let path = &self.files[info.file].0;
        if info.shape != shape {
            bail!(
                "{}: tensor {name} has shape {:?}, expected {shape:?}",
                path.display(),
                info.shape
            );
        }
        let numel: usize = shape.iter().product();
        assert_eq!(out.len(), numel, "read_into: output slice of wrong size");
        let bytes = self.files[info.file]
            .1
            .get(info.bytes.clone())
            .with_context(|| {
                format!(
                    "{}: tensor {name} lies past the end of the file",
                    path.display()
                )
            })?;
        if bytes.len() != numel * info.dtype.size() {
            bail!(
                "{}: tensor {name} has {} bytes, expected {} for shape {shape:?} in {:?}",
                path.display(),
                bytes.len(),
                numel * info.dtype.size(),
                info.dtype
            );
        }
        convert_into(bytes, info.dtype, out);
        // A NaN or Inf weight would only show up later as a null loss or garbage text.
        if let Some(i) = out.iter().position(|x| !x.is_finite()) {
            bail!(
                "{}: tensor {name} holds a non-finite value ({}) at element {i}",
                path.display(),
                out[i]
            );
        }
        Ok(())
    }

    /// Let the OS drop this process's mapped pages of tensor `name` (they are read from the file
    /// again if the tensor is read again), so a reader that streams tensors one at a time keeps
    /// its resident set at one tensor instead of the whole checkpoint. A no-op where unsupported.
    pub fn release(&self, name: &str) {
        #[cfg(unix)]
        if let Some(info) = self.tensors.get(name) {
            let map = &self.files[info.file].1;
            // SAFETY: the map is read-only and file-backed: MADV_DONTNEED only discards the pages,
            // and any later access (through any slice) reads the same, unchanged file contents.
            let _ = unsafe {
                map.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    info.bytes.start,
                    info.bytes.len(),
                )
            };
        }
    }

    /// The tensor `name` as a fresh f32 vector with its shape (no shape check).
    pub fn read(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let info = self
            .tensors
            .get(name)
            .with_context(|| format!("{}: missing tensor {name}", self.dir.display()))?;
        let shape = info.shape.clone();
        let mut out = vec![0.0; shape.iter().product()];
        self.read_into(name, &shape, &mut out)?;
        Ok((shape, out))
    }
}

/// `out = bytes` (little-endian `dtype`) as f32, in parallel chunks.
fn convert_into(bytes: &[u8], dtype: DType, out: &mut [f32]) {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 16;
    let es = dtype.size();
    out.par_chunks_mut(CHUNK)
        .zip(bytes.par_chunks(CHUNK * es))
        .for_each(|(o, b)| {
            let mut v = Vec::with_capacity(o.len());
            bytes_to_f32(b, dtype, &mut v).expect("whole elements");
            o.copy_from_slice(&v);
        });
}

/// How to write a checkpoint.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SaveOptions {
    pub dtype: DType,
    /// `None`: one `model.safetensors`. `Some(n)`: shards of at most `n` bytes of tensor data each
    /// (a single larger tensor gets a shard of its own) + `model.safetensors.index.json`, as
    /// `save_pretrained(max_shard_size=n)`.
    pub max_shard_bytes: Option<usize>,
}

/// A named f32 tensor to be written.
pub struct HostTensor<'a> {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Cow<'a, [f32]>,
}

struct Prepared {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl safetensors::View for &Prepared {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Write the safetensors files (and, when sharded, the index) for `tensors` into the existing
/// directory `dir`. Prefer [`save_model_dir`], which also writes the config and is atomic.
pub fn write_safetensors(dir: &Path, tensors: &[HostTensor<'_>], opts: SaveOptions) -> Result<()> {
    let st_dtype = match opts.dtype {
        DType::F32 => Dtype::F32,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
    };
    // Group tensors into shards, in the given order.
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut cur = 0usize;
    for (i, t) in tensors.iter().enumerate() {
        let n = t.data.len() * opts.dtype.size();
        if let Some(max) = opts.max_shard_bytes
            && cur > 0
            && cur + n > max
        {
            shards.push(Vec::new());
            cur = 0;
        }
        shards.last_mut().unwrap().push(i);
        cur += n;
    }
    let n_shards = shards.len();
    let mut weight_map = serde_json::Map::new();
    let mut total = 0usize;
    for (si, shard) in shards.iter().enumerate() {
        let fname = if opts.max_shard_bytes.is_some() {
            format!("model-{:05}-of-{:05}.safetensors", si + 1, n_shards)
        } else {
            SINGLE_FILE.to_owned()
        };
        let prepared: Vec<(String, Prepared)> = shard
            .iter()
            .map(|&i| {
                let t = &tensors[i];
                assert_eq!(
                    t.shape.iter().product::<usize>(),
                    t.data.len(),
                    "tensor {} data does not match its shape",
                    t.name
                );
                (
                    t.name.clone(),
                    Prepared {
                        dtype: st_dtype,
                        shape: t.shape.clone(),
                        bytes: f32_to_bytes(&t.data, opts.dtype),
                    },
                )
            })
            .collect();
        for (name, p) in &prepared {
            weight_map.insert(name.clone(), Value::String(fname.clone()));
            total += p.bytes.len();
        }
        let meta = HashMap::from([("format".to_owned(), "pt".to_owned())]);
        let path = dir.join(&fname);
        safetensors::serialize_to_file(
            prepared.iter().map(|(n, p)| (n.as_str(), p)),
            Some(meta),
            &path,
        )
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    }
    if opts.max_shard_bytes.is_some() {
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let text = serde_json::to_string_pretty(&index)? + "\n";
        crate::util::write_atomic(&dir.join(INDEX_FILE), text.as_bytes())?;
    }
    Ok(())
}

/// Write a model directory atomically: `config.json` + the weights (see [`SaveOptions`]) go to a
/// temp sibling directory (removed on failure or signal) which then replaces `dir` through
/// [`crate::util::replace_dir`] (the old content stays until the new is complete). Files other than
/// config and weights already in `dir` (tokenizer files) are carried over.
pub fn save_model_dir(
    dir: &Path,
    config: &super::config::LlamaConfig,
    tensors: &[HostTensor<'_>],
    opts: SaveOptions,
) -> Result<()> {
    let tmp = crate::util::temp_path(dir);
    let guard = crate::util::TempGuard::new(&tmp);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)
            .with_context(|| format!("cannot remove stale {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let mut config = config.clone();
    config.torch_dtype = Some(
        match opts.dtype {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
        }
        .into(),
    );
    let write = || -> Result<()> {
        config.save(&tmp)?;
        write_safetensors(&tmp, tensors, opts)?;
        if dir.is_dir() {
            for e in
                std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?
            {
                let e = e?;
                let name = e.file_name().to_string_lossy().into_owned();
                let is_weights =
                    name == "config.json" || name == INDEX_FILE || name.ends_with(".safetensors");
                if !is_weights && e.file_type()?.is_file() {
                    std::fs::copy(e.path(), tmp.join(&name))
                        .with_context(|| format!("cannot copy {}", e.path().display()))?;
                }
            }
        }
        Ok(())
    };
    write()?;
    crate::util::replace_dir(&tmp, dir)?;
    guard.disarm();
    Ok(())
}
