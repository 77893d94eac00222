//! GGUF files without a model: reading a header (`inspect_gguf`), quantizing a file
//! (`quantize_gguf`), and the metadata as Python values, which `Model.metadata` shares.

use std::collections::HashMap;
use std::path::PathBuf;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use smolcandle_engine::gguf::{GgufFile, MetadataValue};
use smolcandle_engine::limits::MAX_METADATA_ARRAY;
use smolcandle_engine::quantize;

use crate::errors::{guarded, py_err};

fn metadata_to_py<'py>(py: Python<'py>, v: &MetadataValue) -> PyResult<Bound<'py, PyAny>> {
    Ok(match v {
        MetadataValue::U8(x) => x.into_pyobject(py)?.into_any(),
        MetadataValue::I8(x) => x.into_pyobject(py)?.into_any(),
        MetadataValue::U16(x) => x.into_pyobject(py)?.into_any(),
        MetadataValue::I16(x) => x.into_pyobject(py)?.into_any(),
        MetadataValue::U32(x) => x.into_pyobject(py)?.into_any(),
        MetadataValue::I32(x) => x.into_pyobject(py)?.into_any(),
        MetadataValue::U64(x) => x.into_pyobject(py)?.into_any(),
        MetadataValue::I64(x) => x.into_pyobject(py)?.into_any(),
        MetadataValue::F32(x) => x.into_pyobject(py)?.into_any(),
        MetadataValue::F64(x) => x.into_pyobject(py)?.into_any(),
        MetadataValue::Bool(x) => x.into_pyobject(py)?.to_owned().into_any(),
        MetadataValue::String(x) => x.into_pyobject(py)?.into_any(),
        MetadataValue::Array(xs) => {
            let list = PyList::empty(py);
            for x in xs {
                list.append(metadata_to_py(py, x)?)?;
            }
            list.into_any()
        }
    })
}

/// The metadata as a dict, sorted by key, without the long arrays; and the lengths of those.
pub(crate) fn metadata_dict<'py>(
    py: Python<'py>,
    metadata: &HashMap<String, MetadataValue>,
) -> PyResult<(Bound<'py, PyDict>, Bound<'py, PyDict>)> {
    let d = PyDict::new(py);
    let long = PyDict::new(py);
    let mut keys: Vec<&String> = metadata.keys().collect();
    keys.sort();
    for k in keys {
        let v = &metadata[k];
        match v {
            MetadataValue::Array(xs) if xs.len() > MAX_METADATA_ARRAY => {
                long.set_item(k, xs.len())?;
            }
            _ => d.set_item(k, metadata_to_py(py, v)?)?,
        }
    }
    Ok((d, long))
}

/// Writes `dst`: the GGUF file `src` with its 2-D weights quantized to `mix` ("q8_0",
/// "q4_k_m", "q6_k"…). For making test fixtures and benchmark files from F32/F16 exports.
#[pyfunction]
pub(crate) fn quantize_gguf(py: Python<'_>, src: PathBuf, dst: PathBuf, mix: &str) -> PyResult<()> {
    let mix = quantize::Mix::parse(mix).map_err(|e| py_err(py, e))?;
    guarded(py, || quantize::quantize_file(&src, &dst, mix))
}

/// Reads a GGUF file's header without loading weights: `{"metadata": {...},
/// "array_lengths": {key: n} (the arrays left out of metadata), "tensors": [(name, shape, type)]}`.
/// The file is validated as `Model.load` validates it (magic, truncation, tensor sizes).
#[pyfunction]
pub(crate) fn inspect_gguf(py: Python<'_>, path: PathBuf) -> PyResult<Bound<'_, PyDict>> {
    let gguf = guarded(py, || GgufFile::open(&path))?;
    let (metadata, long) = metadata_dict(py, gguf.metadata())?;
    let mut names: Vec<&String> = gguf.tensor_names().collect();
    names.sort();
    let tensors = PyList::empty(py);
    for name in names {
        if let Some((shape, dtype)) = gguf.tensor_info(name) {
            tensors.append((name, shape, format!("{dtype:?}")))?;
        }
    }
    let out = PyDict::new(py);
    out.set_item("metadata", metadata)?;
    out.set_item("array_lengths", long)?;
    out.set_item("tensors", tensors)?;
    Ok(out)
}
