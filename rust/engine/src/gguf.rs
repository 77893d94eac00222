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
        // Candle's reader divides by the alignment: a file that declares 0 (or any alignment
        // that is not a power of two) is refused before it is read.
        if let Some(alignment) = declared_alignment(&mut reader, file_len) {
            if alignment <= 0 || !(alignment as u128).is_power_of_two() {
                return Err(Error::InvalidGguf {
                    path,
                    reason: format!("general.alignment is {alignment}, not a power of two"),
                });
            }
        }
        reader.seek(SeekFrom::Start(0)).map_err(io)?;
        // Should Candle's reader panic on some other crafted header, that is an invalid file
        // too, not a crash.
        let read =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Content::read(&mut reader)))
                .unwrap_or_else(|panic| {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "the header could not be read".into());
                    Err(candle_core::Error::Msg(what))
                });
        let content = read.map_err(|e| {
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
            let elems = info
                .shape
                .dims()
                .iter()
                .try_fold(1usize, |n, &d| n.checked_mul(d))
                .ok_or_else(|| Error::BadTensor {
                    name: name.clone(),
                    reason: format!("dimensions {:?} overflow", info.shape.dims()),
                })?;
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
            let size = (elems / block)
                .checked_mul(info.ggml_dtype.type_size())
                .ok_or_else(|| Error::BadTensor {
                    name: name.clone(),
                    reason: format!("{elems} elements overflow a size"),
                })? as u64;
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

/// GGUF value types (`gguf_type` in ggml): the size of each fixed-size one.
fn value_size(value_type: u32) -> Option<u64> {
    match value_type {
        0 | 1 | 7 => Some(1), // u8, i8, bool
        2 | 3 => Some(2),     // u16, i16
        4..=6 => Some(4),     // u32, i32, f32
        10..=12 => Some(8),   // u64, i64, f64
        _ => None,            // 8 string, 9 array, or not a type
    }
}

const STRING: u32 = 8;
const ARRAY: u32 = 9;
/// How deeply Candle's reader lets arrays nest.
const MAX_DEPTH: usize = 64;

/// The integer value of the last `general.alignment` in a GGUF header (the one Candle's reader
/// keeps), found by walking the metadata without keeping it. `None` where the header has none
/// as an integer, or cannot be walked: then Candle's reader, which reads the header next, says
/// what is wrong with it. Every length is checked against the file's before it is skipped.
fn declared_alignment(reader: &mut BufReader<File>, file_len: u64) -> Option<i128> {
    fn u32_at(r: &mut impl Read) -> Option<u32> {
        let mut b = [0; 4];
        r.read_exact(&mut b).ok()?;
        Some(u32::from_le_bytes(b))
    }
    fn u64_at(r: &mut impl Read) -> Option<u64> {
        let mut b = [0; 8];
        r.read_exact(&mut b).ok()?;
        Some(u64::from_le_bytes(b))
    }
    /// Lengths and counts: 32 bits in version 1, 64 after.
    fn length(r: &mut impl Read, v1: bool) -> Option<u64> {
        if v1 {
            u32_at(r).map(u64::from)
        } else {
            u64_at(r)
        }
    }
    fn skip(r: &mut BufReader<File>, n: u64, file_len: u64) -> Option<()> {
        if n > file_len {
            return None;
        }
        // Within the buffer where it can: the vocabulary is thousands of short strings.
        r.seek_relative(i64::try_from(n).ok()?).ok()?;
        Some(())
    }
    fn skip_value(
        r: &mut BufReader<File>,
        value_type: u32,
        v1: bool,
        depth: usize,
        file_len: u64,
    ) -> Option<()> {
        if let Some(size) = value_size(value_type) {
            return skip(r, size, file_len);
        }
        if depth > MAX_DEPTH {
            return None;
        }
        match value_type {
            STRING => {
                let n = length(r, v1)?;
                skip(r, n, file_len)
            }
            ARRAY => {
                let item = u32_at(r)?;
                let n = length(r, v1)?;
                if let Some(size) = value_size(item) {
                    return skip(r, n.checked_mul(size)?, file_len);
                }
                // Each string or array takes at least 4 bytes: the count is bounded by the file.
                if n > file_len / 4 {
                    return None;
                }
                (0..n).try_for_each(|_| skip_value(r, item, v1, depth + 1, file_len))
            }
            _ => None,
        }
    }
    fn integer(r: &mut impl Read, value_type: u32) -> Option<i128> {
        let mut b = [0; 8];
        let size = value_size(value_type)? as usize;
        r.read_exact(&mut b[..size]).ok()?;
        Some(match value_type {
            0 => b[0] as i128,
            1 => b[0] as i8 as i128,
            2 => u16::from_le_bytes([b[0], b[1]]) as i128,
            3 => i16::from_le_bytes([b[0], b[1]]) as i128,
            4 => u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i128,
            5 => i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i128,
            10 => u64::from_le_bytes(b) as i128,
            11 => i64::from_le_bytes(b) as i128,
            _ => return None,
        })
    }

    const KEY: &[u8] = b"general.alignment";
    let mut magic = [0; 4];
    reader.read_exact(&mut magic).ok()?;
    let v1 = u32_at(reader)? == 1;
    let _n_tensors = length(reader, v1)?;
    let n_kv = length(reader, v1)?;
    let mut found = None;
    for _ in 0..n_kv {
        let key_len = length(reader, v1)?;
        let is_alignment = key_len == KEY.len() as u64 && {
            let mut key = [0; KEY.len()];
            reader.read_exact(&mut key).ok()?;
            key == KEY
        };
        if key_len != KEY.len() as u64 {
            skip(reader, key_len, file_len)?;
        }
        let value_type = u32_at(reader)?;
        if is_alignment && value_size(value_type).is_some() {
            match integer(reader, value_type) {
                Some(v) => found = Some(v),
                None => skip(reader, value_size(value_type)?, file_len)?, // a float or a bool
            }
        } else {
            skip_value(reader, value_type, v1, 0, file_len)?;
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::gguf_file;
    use candle_core::Tensor;

    use super::*;

    /// A file in the temporary directory, removed when dropped.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(name: &str, bytes: &[u8]) -> Self {
            let path =
                std::env::temp_dir().join(format!("smolcandle-{}-{name}", std::process::id()));
            std::fs::write(&path, bytes).unwrap();
            Self(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// A valid GGUF: metadata of a few types and one F32 tensor `[4, 8]`.
    fn gguf_bytes() -> Vec<u8> {
        let t = Tensor::arange(0f32, 32., &Device::Cpu)
            .unwrap()
            .reshape((4, 8))
            .unwrap();
        let q = QTensor::quantize(&t, GgmlDType::F32).unwrap();
        let meta = [
            ("n.u32", Value::U32(7)),
            ("n.i32", Value::I32(-1)),
            ("s", Value::String("text".into())),
        ];
        let meta: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
        let mut out = std::io::Cursor::new(Vec::new());
        gguf_file::write(&mut out, &meta, &[("w", &q)]).unwrap();
        out.into_inner()
    }

    #[test]
    fn a_valid_file_reads_its_metadata_and_tensors() {
        let f = TempFile::new("valid.gguf", &gguf_bytes());
        let g = GgufFile::open(&f.0).unwrap();
        assert_eq!(g.get_usize("n.u32").unwrap(), Some(7));
        assert_eq!(g.get_usize("absent").unwrap(), None);
        assert_eq!(g.get_str("s").unwrap(), Some("text"));
        assert_eq!(g.tensor_info("w"), Some((vec![4, 8], GgmlDType::F32)));
        let (_, bytes) = g.tensor_bytes("w", &[4, 8]).unwrap();
        assert_eq!(bytes.as_ref().len(), 32 * 4);
        assert_eq!(&bytes.as_ref()[4..8], &1f32.to_le_bytes());
    }

    #[test]
    fn metadata_of_the_wrong_kind_is_named() {
        let f = TempFile::new("kinds.gguf", &gguf_bytes());
        let g = GgufFile::open(&f.0).unwrap();
        let e = g.get_usize("n.i32").unwrap_err().to_string();
        assert!(
            e.contains("n.i32") && e.contains("-1 is not a valid size"),
            "{e}"
        );
        let e = g.get_usize("s").unwrap_err().to_string();
        assert!(
            e.contains("\"s\"") && e.contains("expected an integer"),
            "{e}"
        );
        let e = g.require_usize("absent").unwrap_err();
        assert!(matches!(e, Error::MissingMetadata(_)), "{e}");
        assert!(
            g.tensor_bytes("w", &[8, 4]).is_err(),
            "a shape the file does not have"
        );
        assert!(g.tensor_bytes("nope", &[4, 8]).is_err());
    }

    #[test]
    fn files_that_are_not_gguf_are_named_as_such() {
        let missing = std::env::temp_dir().join("smolcandle-no-such-file.gguf");
        assert!(matches!(
            GgufFile::open(&missing),
            Err(Error::FileNotFound { .. })
        ));
        let e = GgufFile::open(std::env::temp_dir())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("is a directory"), "{e}");
        let empty = TempFile::new("empty.gguf", b"");
        let e = GgufFile::open(&empty.0).err().unwrap();
        assert!(
            matches!(&e, Error::NotGguf { found, .. } if found == "an empty file"),
            "{e}"
        );
        let other = TempFile::new("other.gguf", b"PK\x03\x04 a zip");
        assert!(matches!(
            GgufFile::open(&other.0),
            Err(Error::NotGguf { .. })
        ));
    }

    #[test]
    fn crafted_headers_are_invalid_files_not_crashes() {
        let t = QTensor::quantize(
            &Tensor::zeros((4, 8), candle_core::DType::F32, &Device::Cpu).unwrap(),
            GgmlDType::F32,
        )
        .unwrap();
        let write = |meta: &[(&str, Value)]| {
            let meta: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
            let mut out = std::io::Cursor::new(Vec::new());
            gguf_file::write(&mut out, &meta, &[("w", &t)]).unwrap();
            out.into_inner()
        };
        let zero = TempFile::new(
            "align0.gguf",
            &write(&[("general.alignment", Value::U32(0))]),
        );
        let e = GgufFile::open(&zero.0).err().unwrap();
        assert!(matches!(e, Error::InvalidGguf { .. }), "{e}");
        assert!(e.to_string().contains("general.alignment is 0"), "{e}");
        // Not a power of two, in any integer type; and the last of two values is the one read.
        for (name, meta) in [
            ("align48", vec![("general.alignment", Value::U32(48))]),
            ("alignneg", vec![("general.alignment", Value::I16(-32))]),
            ("align64bits", vec![("general.alignment", Value::U64(0))]),
            (
                "alignlast",
                vec![
                    ("general.alignment", Value::U32(32)),
                    ("s", Value::Array(vec![Value::String("x".into()); 3])),
                    ("general.alignment", Value::U8(0)),
                ],
            ),
        ] {
            let f = TempFile::new(&format!("{name}.gguf"), &write(&meta));
            let e = GgufFile::open(&f.0).err().unwrap();
            assert!(e.to_string().contains("not a power of two"), "{name}: {e}");
        }
        let f = TempFile::new(
            "align32.gguf",
            &write(&[
                ("v", Value::Array(vec![Value::U32(1); 5])),
                ("general.alignment", Value::U32(32)),
            ]),
        );
        assert!(GgufFile::open(&f.0).is_ok());
        // A tensor whose dimensions multiply past usize: patch the first dimension of `w`.
        let mut bytes = write(&[]);
        let at = bytes
            .windows(9)
            .position(|w| w == b"\x01\0\0\0\0\0\0\0w")
            .unwrap()
            + 9;
        // n_dims (u32) follows the name, then the dimensions (u64 each).
        bytes[at + 4..at + 12].copy_from_slice(&u64::MAX.to_le_bytes());
        let huge = TempFile::new("huge.gguf", &bytes);
        let e = GgufFile::open(&huge.0).err().unwrap();
        assert!(
            matches!(&e, Error::BadTensor { reason, .. } if reason.contains("overflow"))
                || matches!(e, Error::InvalidGguf { .. }),
            "{e}"
        );
    }

    #[test]
    fn truncated_files_are_invalid_wherever_they_are_cut() {
        let bytes = gguf_bytes();
        // Inside the tensor data, and inside the header (the tensor table, the metadata).
        for cut in [bytes.len() - 1, bytes.len() - 64, 60, 30, 8] {
            let f = TempFile::new(&format!("cut{cut}.gguf"), &bytes[..cut]);
            let e = GgufFile::open(&f.0).err().unwrap();
            assert!(matches!(e, Error::InvalidGguf { .. }), "cut at {cut}: {e}");
        }
    }
}
