//! Opening a GGUF file: the header and metadata through Candle's reader, validated up front so
//! that a bad file fails at load time with a message naming the problem (not a short read deep
//! inside model construction).
//!
//! Tensor data is read through a memory map of the file: the kernels that multiply the file's
//! blocks as stored (Q4_1, Q4_K, Q6_K on the CPU) use the mapped pages themselves, so those
//! weights are never copied, load in no time, and are resident once (as page cache, shared by
//! every process that maps the file). As with llama.cpp's default mmap, the file must not be
//! truncated or rewritten while a model uses it.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;

use crate::error::{Error, Result};

pub use candle_core::quantized::gguf_file::Value as MetadataValue;

pub struct GgufFile {
    path: PathBuf,
    content: Content,
    map: Arc<Mmap>,
}

/// A tensor's bytes inside the mapped file.
#[derive(Clone)]
pub struct Mapped {
    map: Arc<Mmap>,
    range: Range<usize>,
}

impl AsRef<[u8]> for Mapped {
    fn as_ref(&self) -> &[u8] {
        &self.map[self.range.clone()]
    }
}

impl GgufFile {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let io = |source: std::io::Error| Error::Io {
            path: path.clone(),
            source,
        };
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::FileNotFound { path });
            }
            Err(e) => return Err(io(e)),
        };
        if file.metadata().map_err(io)?.is_dir() {
            return Err(Error::Io {
                path,
                source: std::io::Error::other("is a directory, not a GGUF file"),
            });
        }
        let mut magic = Vec::with_capacity(4);
        (&mut file).take(4).read_to_end(&mut magic).map_err(io)?;
        if magic != b"GGUF" {
            let found = if magic.is_empty() {
                "an empty file".to_string()
            } else {
                format!("{:?}", String::from_utf8_lossy(&magic))
            };
            return Err(Error::NotGguf { path, found });
        }
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        let file_len = file.metadata().map_err(io)?.len();
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader).map_err(|e| {
            let reason = e.to_string();
            if reason.contains("unknown dtype") {
                Error::UnsupportedTensorType {
                    path: path.clone(),
                    reason,
                }
            } else {
                Error::InvalidGguf {
                    path: path.clone(),
                    reason,
                }
            }
        })?;
        // Every tensor's data must lie inside the file: a truncated download is caught here.
        for (name, info) in &content.tensor_infos {
            let elems = info.shape.elem_count();
            let block = info.ggml_dtype.block_size();
            if elems % block != 0 {
                return Err(Error::BadTensor {
                    name: name.clone(),
                    reason: format!(
                        "{elems} elements is not a multiple of the {:?} block size {block}",
                        info.ggml_dtype
                    ),
                });
            }
            let size = (elems / block * info.ggml_dtype.type_size()) as u64;
            let end = content
                .tensor_data_offset
                .saturating_add(info.offset)
                .saturating_add(size);
            if end > file_len {
                return Err(Error::InvalidGguf {
                    path,
                    reason: format!(
                        "tensor {name:?} ends at byte {end} but the file has {file_len} bytes (truncated?)"
                    ),
                });
            }
        }
        // SAFETY: the map is read-only; like llama.cpp, we rely on the file not being truncated
        // or rewritten while it is in use (the module documentation says so).
        let map = unsafe { Mmap::map(reader.get_ref()) }.map_err(io)?;
        Ok(Self {
            path,
            content,
            map: Arc::new(map),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn metadata(&self) -> &std::collections::HashMap<String, Value> {
        &self.content.metadata
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn required(&self, key: &str) -> Result<&Value> {
        self.get(key)
            .ok_or_else(|| Error::MissingMetadata(key.to_string()))
    }

    fn bad(key: &str, e: candle_core::Error) -> Error {
        Error::BadMetadata {
            key: key.to_string(),
            reason: e.to_string(),
        }
    }

    /// An unsigned integer of any width (writers disagree on u32 vs u64 vs i32).
    pub fn get_usize(&self, key: &str) -> Result<Option<usize>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let n: i128 = match v {
            Value::U8(x) => *x as i128,
            Value::I8(x) => *x as i128,
            Value::U16(x) => *x as i128,
            Value::I16(x) => *x as i128,
            Value::U32(x) => *x as i128,
            Value::I32(x) => *x as i128,
            Value::U64(x) => *x as i128,
            Value::I64(x) => *x as i128,
            other => {
                return Err(Error::BadMetadata {
                    key: key.to_string(),
                    reason: format!("expected an integer, found {:?}", other.value_type()),
                })
            }
        };
        usize::try_from(n)
            .map(Some)
            .map_err(|_| Error::BadMetadata {
                key: key.to_string(),
                reason: format!("{n} is not a valid size"),
            })
    }

    pub fn require_usize(&self, key: &str) -> Result<usize> {
        self.get_usize(key)?
            .ok_or_else(|| Error::MissingMetadata(key.to_string()))
    }

    pub fn get_f32(&self, key: &str) -> Result<Option<f32>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::F64(x)) => Ok(Some(*x as f32)),
            Some(v) => v.to_f32().map(Some).map_err(|e| Self::bad(key, e)),
        }
    }

    pub fn get_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.to_bool().map(Some).map_err(|e| Self::bad(key, e)),
        }
    }

    pub fn get_str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .to_string()
                .map(|s| Some(s.as_str()))
                .map_err(|e| Self::bad(key, e)),
        }
    }

    pub fn require_str(&self, key: &str) -> Result<&str> {
        self.get_str(key)?
            .ok_or_else(|| Error::MissingMetadata(key.to_string()))
    }

    pub fn require_array(&self, key: &str) -> Result<&Vec<Value>> {
        self.required(key)?.to_vec().map_err(|e| Self::bad(key, e))
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    pub fn tensor_names(&self) -> impl Iterator<Item = &String> {
        self.content.tensor_infos.keys()
    }

    /// Shape (outermost first, as Candle orders it) and type of a tensor.
    pub fn tensor_info(&self, name: &str) -> Option<(Vec<usize>, GgmlDType)> {
        self.content
            .tensor_infos
            .get(name)
            .map(|i| (i.shape.dims().to_vec(), i.ggml_dtype))
    }

    /// A tensor's type and bytes as stored, checking its shape (the bytes were checked to lie
    /// inside the file at open).
    pub fn tensor_bytes(&self, name: &str, shape: &[usize]) -> Result<(GgmlDType, Mapped)> {
        let Some(info) = self.content.tensor_infos.get(name) else {
            return Err(Error::BadTensor {
                name: name.to_string(),
                reason: "missing from the file".to_string(),
            });
        };
        if info.shape.dims() != shape {
            return Err(Error::BadTensor {
                name: name.to_string(),
                reason: format!(
                    "shape {:?} is inconsistent with the metadata, which implies {shape:?}",
                    info.shape.dims()
                ),
            });
        }
        let dtype = info.ggml_dtype;
        let start = self.content.tensor_data_offset as usize + info.offset as usize;
        let len = info.shape.elem_count() / dtype.block_size() * dtype.type_size();
        Ok((
            dtype,
            Mapped {
                map: self.map.clone(),
                range: start..start + len,
            },
        ))
    }

    /// Loads a tensor as stored (no re-quantization) into Candle's storage, checking its shape.
    /// The mapped pages it was copied from are then released from this process (they stay in
    /// the page cache), so the copy is the only one counted as resident.
    pub fn tensor(&self, name: &str, shape: &[usize], device: &Device) -> Result<QTensor> {
        let (dtype, bytes) = self.tensor_bytes(name, shape)?;
        let t = candle_core::quantized::ggml_file::qtensor_from_ggml(
            dtype,
            bytes.as_ref(),
            shape.to_vec(),
            device,
        )
        .map_err(|e| Error::BadTensor {
            name: name.to_string(),
            reason: e.to_string(),
        })?;
        #[cfg(unix)]
        // SAFETY: the map is read-only and the file unchanged, so a page dropped here reads the
        // same bytes when it is touched again (a neighbouring tensor may share an edge page).
        // Failing to release is harmless.
        let _ = unsafe {
            self.map.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                bytes.range.start,
                bytes.range.len(),
            )
        };
        Ok(t)
    }
}
