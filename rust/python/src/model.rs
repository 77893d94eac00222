//! `Model`: a loaded GGUF model and its engine: the file's configuration, metadata and
//! vocabulary, tokenizing, logits, and starting generations.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use smolcandle_engine::limits;
use smolcandle_engine::{Engine, Error};

use crate::errors::{engine_error, guarded, py_err};
use crate::gguf::metadata_dict;
use crate::request::{PyGenerateRequest, PyLoadOptions};
use crate::stream::TokenStream;

/// A dict of named counts, for the figures the engine reports.
fn counters<'py>(py: Python<'py>, items: &[(&str, u64)]) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for (name, value) in items {
        d.set_item(name, value)?;
    }
    Ok(d)
}

/// A loaded GGUF model and its engine; `close` stops the engine.
#[pyclass(module = "smolcandle._native", name = "Model", frozen)]
pub(crate) struct PyModel {
    engine: Mutex<Option<Arc<Engine>>>,
}

impl PyModel {
    fn engine(&self, py: Python<'_>) -> PyResult<Arc<Engine>> {
        let engine = self.engine.lock().ok().and_then(|e| e.clone());
        engine.ok_or_else(|| engine_error(py, "the model is closed".into()))
    }
}

#[pymethods]
impl PyModel {
    /// Loads the GGUF file at `path` with `options` and starts its engine.
    #[staticmethod]
    fn load(py: Python<'_>, path: PathBuf, options: &PyLoadOptions) -> PyResult<Self> {
        let options = options.0.clone();
        let engine = guarded(py, || Engine::load(&path, &options))?;
        Ok(Self {
            engine: Mutex::new(Some(Arc::new(engine))),
        })
    }
    #[getter]
    fn n_vocab(&self, py: Python<'_>) -> PyResult<usize> {
        Ok(self.engine(py)?.model().config().n_vocab)
    }

    /// Key/value storage held by the engine: `bytes` now, `peak_bytes` the most at once.
    #[getter]
    fn kv_cache_bytes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let (bytes, peak) = self.engine(py)?.kv_bytes();
        counters(py, &[("bytes", bytes as u64), ("peak_bytes", peak as u64)])
    }

    /// Counters of the prefix cache: kept `entries` (prefixes), the `segments` holding them and
    /// their `bytes`, `hits`,
    /// `misses`, `reused_tokens`, `evictions`; with a disk tier, its `disk_files`,
    /// `disk_bytes`, `disk_hits`, `disk_reused_tokens`, `disk_writes` and `disk_refused`.
    #[getter]
    fn prefix_cache_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.engine(py)?.prefix_stats();
        let mut all = vec![
            ("entries", s.entries as u64),
            ("segments", s.segments as u64),
            ("bytes", s.bytes as u64),
            ("hits", s.hits),
            ("misses", s.misses),
            ("reused_tokens", s.reused_tokens),
            ("evictions", s.evictions),
        ];
        if let Some(d) = s.disk {
            all.extend([
                ("disk_files", d.files as u64),
                ("disk_bytes", d.bytes),
                ("disk_hits", d.hits),
                ("disk_reused_tokens", d.reused_tokens),
                ("disk_writes", d.writes),
                ("disk_refused", d.refused),
            ]);
        }
        counters(py, &all)
    }

    /// The scheduler's limits and its use of them: `max_active`, `max_queued`,
    /// `kv_budget_bytes`, and now `active`, `queued`, `kv_reserved_bytes`, and `refused` so far.
    #[getter]
    fn admission<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let a = self.engine(py)?.admission();
        counters(
            py,
            &[
                ("max_active", a.max_active as u64),
                ("max_queued", a.max_queued as u64),
                ("kv_budget_bytes", a.kv_budget_bytes as u64),
                ("active", a.active as u64),
                ("queued", a.queued as u64),
                ("kv_reserved_bytes", a.kv_reserved_bytes as u64),
                ("refused", a.refused),
            ],
        )
    }

    /// Speculative decoding: `enabled` (0 or 1), and the `drafted_tokens` and
    /// `accepted_tokens` of the `steps` that verified a draft, so far.
    #[getter]
    fn speculation<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.engine(py)?.speculation();
        counters(
            py,
            &[
                ("enabled", s.enabled as u64),
                ("drafted_tokens", s.drafted_tokens),
                ("accepted_tokens", s.accepted_tokens),
                ("steps", s.steps),
            ],
        )
    }

    #[getter]
    fn kv_cache_dtype(&self, py: Python<'_>) -> PyResult<String> {
        Ok(self.engine(py)?.model().kv_type().name().to_string())
    }

    #[getter]
    fn kv_bytes_per_token(&self, py: Python<'_>) -> PyResult<usize> {
        Ok(self.engine(py)?.model().new_cache().bytes_per_position())
    }

    #[getter]
    fn n_ctx(&self, py: Python<'_>) -> PyResult<usize> {
        Ok(self.engine(py)?.model().n_ctx())
    }

    #[getter]
    fn architecture(&self, py: Python<'_>) -> PyResult<String> {
        Ok(self.engine(py)?.model().config().architecture.clone())
    }

    #[getter]
    fn device(&self, py: Python<'_>) -> PyResult<String> {
        Ok(self.engine(py)?.model().device_name())
    }

    /// The model's hyper-parameters, as read from the file.
    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let engine = self.engine(py)?;
        let c = engine.model().config();
        let d = PyDict::new(py);
        d.set_item("architecture", &c.architecture)?;
        d.set_item("n_layer", c.n_layer)?;
        d.set_item("n_embd", c.n_embd)?;
        d.set_item("n_ff", c.n_ff)?;
        d.set_item("n_head", c.n_head)?;
        d.set_item("n_head_kv", c.n_head_kv)?;
        d.set_item("head_dim", c.head_dim)?;
        d.set_item("n_vocab", c.n_vocab)?;
        d.set_item("n_ctx_train", c.n_ctx_train)?;
        d.set_item("rope_freq_base", c.rope_freq_base)?;
        let yarn = c
            .rope_scaling
            .map(|y| -> PyResult<_> {
                let r = PyDict::new(py);
                r.set_item("rope_type", "yarn")?;
                r.set_item("factor", y.factor)?;
                r.set_item("original_max_position_embeddings", y.original_context)?;
                r.set_item("beta_fast", y.beta_fast)?;
                r.set_item("beta_slow", y.beta_slow)?;
                r.set_item("attention_factor", y.attention_factor)?;
                Ok(r)
            })
            .transpose()?;
        d.set_item("rope_scaling", yarn)?;
        d.set_item("max_context", c.max_context())?;
        d.set_item("rms_eps", c.rms_eps)?;
        d.set_item("use_rope", c.use_rope.clone())?;
        d.set_item("tied_embeddings", c.tied_embeddings)?;
        Ok(d)
    }

    /// GGUF metadata; arrays longer than 1024 entries (vocabulary, merges) are left out.
    #[getter]
    fn metadata<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let engine = self.engine(py)?;
        Ok(metadata_dict(py, engine.metadata())?.0)
    }

    #[getter]
    fn bos_token_id(&self, py: Python<'_>) -> PyResult<Option<u32>> {
        Ok(self.engine(py)?.tokenizer().bos())
    }

    #[getter]
    fn eos_token_id(&self, py: Python<'_>) -> PyResult<Option<u32>> {
        Ok(self.engine(py)?.tokenizer().eos())
    }

    #[getter]
    fn add_bos_token(&self, py: Python<'_>) -> PyResult<bool> {
        Ok(self.engine(py)?.tokenizer().add_bos())
    }

    #[getter]
    fn eog_token_ids(&self, py: Python<'_>) -> PyResult<Vec<u32>> {
        Ok(self.engine(py)?.tokenizer().eog_tokens().to_vec())
    }

    fn token_to_id(&self, py: Python<'_>, text: &str) -> PyResult<Option<u32>> {
        Ok(self.engine(py)?.tokenizer().token_id(text))
    }

    fn id_to_token(&self, py: Python<'_>, id: u32) -> PyResult<Option<String>> {
        Ok(self
            .engine(py)?
            .tokenizer()
            .token_text(id)
            .map(str::to_string))
    }

    /// The bytes a token stands for (empty for an id outside the vocabulary).
    fn token_bytes<'py>(&self, py: Python<'py>, id: u32) -> PyResult<Bound<'py, PyBytes>> {
        let engine = self.engine(py)?;
        Ok(PyBytes::new(py, engine.tokenizer().token_bytes(id)))
    }

    #[pyo3(signature = (text, add_bos, special))]
    fn tokenize(
        &self,
        py: Python<'_>,
        text: &str,
        add_bos: Option<bool>,
        special: bool,
    ) -> PyResult<Vec<u32>> {
        let engine = self.engine(py)?;
        let text = text.to_string();
        guarded(py, || {
            let tok = engine.tokenizer();
            Ok(tok.encode(&text, add_bos.unwrap_or(tok.add_bos()), special))
        })
    }

    fn detokenize(&self, py: Python<'_>, ids: Vec<u32>) -> PyResult<String> {
        let engine = self.engine(py)?;
        let n = engine.tokenizer().n_vocab();
        if let Some(bad) = ids.iter().find(|&&t| t as usize >= n) {
            return Err(py_err(
                py,
                Error::invalid(
                    "ids",
                    format!("token id {bad} is outside the vocabulary of {n}"),
                ),
            ));
        }
        Ok(engine.tokenizer().decode(&ids))
    }

    /// `(bytes of float32 row-major logits, rows, n_vocab)` for a fresh sequence.
    fn logits<'py>(
        &self,
        py: Python<'py>,
        ids: Vec<u32>,
    ) -> PyResult<(Bound<'py, PyBytes>, usize, usize)> {
        let engine = self.engine(py)?;
        if ids.is_empty() {
            return Err(py_err(py, Error::invalid("ids", "is empty")));
        }
        let (values, n_vocab) = guarded(py, || engine.logits(&ids))?;
        let bytes: &[u8] = unsafe {
            // f32 has no padding or invalid bit patterns; reading its bytes is sound.
            std::slice::from_raw_parts(values.as_ptr() as *const u8, values.len() * 4)
        };
        Ok((PyBytes::new(py, bytes), ids.len(), n_vocab))
    }

    /// The embedding of each input (token ids): the final hidden states mean-pooled and
    /// L2-normalised, computed on the engine thread with the GIL released.
    fn embed(&self, py: Python<'_>, inputs: Vec<Vec<u32>>) -> PyResult<Vec<Vec<f32>>> {
        let engine = self.engine(py)?;
        guarded(py, || engine.embed(&inputs))
    }

    /// Starts a generation; errors in the request are raised here, before any stream exists.
    fn generate(&self, py: Python<'_>, request: &PyGenerateRequest) -> PyResult<TokenStream> {
        let engine = self.engine(py)?;
        let request = request.0.clone();
        // Compiling a grammar (and, the first time, the vocabulary's token trie) takes a while.
        let stream = guarded(py, || engine.generate(request))?;
        Ok(TokenStream::new(stream))
    }

    /// Tokens a conversation's prompt may take so that an answer of `max_tokens` fits
    /// (see `limits::prompt_budget`).
    fn prompt_budget(&self, py: Python<'_>, max_tokens: usize) -> PyResult<usize> {
        Ok(limits::prompt_budget(
            self.engine(py)?.model().n_ctx(),
            max_tokens,
        ))
    }

    /// Stops the engine; open streams end as cancelled. Further calls raise EngineError.
    fn close(&self, py: Python<'_>) {
        let engine = self.engine.lock().ok().and_then(|mut e| e.take());
        if let Some(engine) = engine {
            py.detach(|| engine.shutdown());
        }
    }

    #[getter]
    fn closed(&self) -> bool {
        self.engine.lock().map(|e| e.is_none()).unwrap_or(true)
    }
}
