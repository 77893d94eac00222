//! `smolcandle._native`: thin PyO3 bindings over the engine. Blocking work (loading, forward
//! passes, waiting for tokens) runs with the GIL released.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyDict, PyList, PyType};

use smolcandle_engine::error::catch_panic;
use smolcandle_engine::gguf::MetadataValue;
use smolcandle_engine::limits::{self, MAX_METADATA_ARRAY};
use smolcandle_engine::reasoning::Reasoning;
use smolcandle_engine::{
    CacheScope, Canceller, Engine, Error, Event, GenerateRequest, Grammar, LoadOptions, QueuePlace,
    SamplingParams, TokenLogprob, Usage,
};

/// Maps an engine error to its class in `smolcandle.errors`. An `InvalidParameterError`
/// (and a `ContextLengthError`) carries the parameter's name as `param`.
fn py_err(py: Python<'_>, e: Error) -> PyErr {
    let class = match &e {
        Error::FileNotFound { .. } => "ModelNotFoundError",
        Error::Io { .. } => "ModelLoadError",
        Error::NotGguf { .. }
        | Error::InvalidGguf { .. }
        | Error::MissingMetadata(_)
        | Error::BadMetadata { .. }
        | Error::BadTensor { .. } => "GGUFError",
        Error::UnsupportedArchitecture(_) | Error::UnsupportedTensorType { .. } => {
            "UnsupportedModelError"
        }
        Error::Tokenizer(_) => "TokenizerError",
        Error::ContextOverflow { .. } => "ContextLengthError",
        Error::InvalidParameter { .. } => "InvalidParameterError",
        Error::Device(_) => "DeviceError",
        Error::Busy { .. } => "BusyError",
        Error::EngineStopped | Error::Inference(_) | Error::Candle(_) | Error::Panic(_) => {
            "EngineError"
        }
    };
    let param = match &e {
        Error::InvalidParameter { name, .. } => Some(*name),
        Error::ContextOverflow { .. } => Some("prompt"),
        _ => None,
    };
    match (error_class(py, class), param) {
        (Ok(cls), Some(param)) => PyErr::from_type(cls, (e.to_string(), param)),
        (Ok(cls), None) => PyErr::from_type(cls, e.to_string()),
        (Err(_), _) => PyRuntimeError::new_err(e.to_string()),
    }
}

/// Runs engine work with the GIL released; its error, or a panic inside it, becomes the
/// matching `smolcandle.errors` exception. No Rust panic reaches Python as a `PanicException`.
fn guarded<T: Send>(py: Python<'_>, f: impl FnOnce() -> Result<T, Error> + Send) -> PyResult<T> {
    py.detach(|| catch_panic(f)).map_err(|e| py_err(py, e))
}

/// The exception classes of `smolcandle.errors` by name, which that module hands over when
/// it is imported (`register_errors`): the native module raises them without importing the
/// Python package above it.
static ERRORS: PyOnceLock<Py<PyDict>> = PyOnceLock::new();

#[pyfunction]
fn register_errors(py: Python<'_>, classes: Bound<'_, PyDict>) {
    let _ = ERRORS.set(py, classes.unbind());
}

fn error_class<'py>(py: Python<'py>, class: &str) -> PyResult<Bound<'py, PyType>> {
    let classes = ERRORS
        .get(py)
        .ok_or_else(|| PyRuntimeError::new_err("smolcandle.errors is not imported"))?;
    match classes.bind(py).get_item(class)? {
        Some(cls) => Ok(cls.cast_into::<PyType>()?),
        None => Err(PyRuntimeError::new_err(format!("no error class {class}"))),
    }
}

fn error_of_class(py: Python<'_>, class: &str, message: String) -> PyErr {
    match error_class(py, class) {
        Ok(cls) => PyErr::from_type(cls, message),
        Err(_) => PyRuntimeError::new_err(message),
    }
}

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
fn metadata_dict<'py>(
    py: Python<'py>,
    metadata: &std::collections::HashMap<String, MetadataValue>,
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

/// A dict of named counts, for the figures the engine reports.
fn counters<'py>(py: Python<'py>, items: &[(&str, u64)]) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for (name, value) in items {
        d.set_item(name, value)?;
    }
    Ok(d)
}

#[pyclass(module = "smolcandle._native", name = "Model", frozen)]
struct PyModel {
    engine: Mutex<Option<Arc<Engine>>>,
}

impl PyModel {
    fn engine(&self, py: Python<'_>) -> PyResult<Arc<Engine>> {
        let engine = self.engine.lock().ok().and_then(|e| e.clone());
        engine.ok_or_else(|| error_of_class(py, "EngineError", "the model is closed".into()))
    }
}

#[pymethods]
impl PyModel {
    #[staticmethod]
    #[pyo3(signature = (path, device = "cpu".to_string(), n_threads = None, n_ctx = None,
                        kv_cache_dtype = None, prefix_cache_bytes = None, max_active = None,
                        max_queued = None, kv_budget_bytes = None, speculative = None))]
    #[allow(clippy::too_many_arguments)]
    fn load(
        py: Python<'_>,
        path: PathBuf,
        device: String,
        n_threads: Option<usize>,
        n_ctx: Option<usize>,
        kv_cache_dtype: Option<String>,
        prefix_cache_bytes: Option<usize>,
        max_active: Option<usize>,
        max_queued: Option<usize>,
        kv_budget_bytes: Option<usize>,
        speculative: Option<bool>,
    ) -> PyResult<Self> {
        let options = LoadOptions {
            device,
            n_threads,
            n_ctx,
            kv_cache_dtype,
            prefix_cache_bytes,
            max_active,
            max_queued,
            kv_budget_bytes,
            speculative,
        };
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

    /// Counters of the prefix cache: kept `entries` and their `bytes`, `hits`, `misses`,
    /// `reused_tokens`, `evictions`.
    #[getter]
    fn prefix_cache_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.engine(py)?.prefix_stats();
        counters(
            py,
            &[
                ("entries", s.entries as u64),
                ("bytes", s.bytes as u64),
                ("hits", s.hits),
                ("misses", s.misses),
                ("reused_tokens", s.reused_tokens),
                ("evictions", s.evictions),
            ],
        )
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

    /// Starts a generation; errors in the request are raised here, before any stream exists.
    fn generate(&self, py: Python<'_>, request: &PyGenerateRequest) -> PyResult<TokenStream> {
        let engine = self.engine(py)?;
        let request = request.0.clone();
        // Compiling a grammar (and, the first time, the vocabulary's token trie) takes a while.
        let stream = guarded(py, || engine.generate(request))?;
        Ok(TokenStream {
            canceller: stream.canceller(),
            place: stream.place(),
            stream: Mutex::new(Some(stream)),
            result: Mutex::new(None),
        })
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

/// One generation's settings: the prompt's token ids and keyword options, each left unset
/// (`None`) taking the engine's default. Values are converted here and checked by the engine
/// when the request is submitted, so each range has one home.
#[pyclass(module = "smolcandle._native", name = "GenerateRequest", frozen)]
struct PyGenerateRequest(GenerateRequest);

/// An integer option from Python in the engine's unsigned type: a value outside its range (a
/// negative one, a seed past 2^64) is an invalid parameter that names it, not an overflow.
fn unsigned<T: TryFrom<i128>>(name: &'static str, v: Option<i128>) -> Result<Option<T>, Error> {
    v.map(|v| {
        T::try_from(v).map_err(|_| {
            let why = if v < 0 { "is negative" } else { "is too large" };
            Error::invalid(name, format!("{v} {why}"))
        })
    })
    .transpose()
}

#[pymethods]
impl PyGenerateRequest {
    #[new]
    #[pyo3(signature = (prompt, *, max_tokens = None, temperature = None, top_k = None,
                        top_p = None, min_p = None, repeat_penalty = None,
                        frequency_penalty = None, presence_penalty = None, seed = None,
                        stop = Vec::new(), stop_token_ids = Vec::new(), ignore_eos = false,
                        grammar = None, logprobs = None, tenant = None, reuse_prefix = true,
                        client = None, reasoning = None, max_reasoning_tokens = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        prompt: Vec<u32>,
        max_tokens: Option<i128>,
        temperature: Option<f32>,
        top_k: Option<i128>,
        top_p: Option<f32>,
        min_p: Option<f32>,
        repeat_penalty: Option<f32>,
        frequency_penalty: Option<f32>,
        presence_penalty: Option<f32>,
        seed: Option<i128>,
        stop: Vec<String>,
        stop_token_ids: Vec<u32>,
        ignore_eos: bool,
        grammar: Option<(String, String)>,
        logprobs: Option<i128>,
        tenant: Option<String>,
        reuse_prefix: bool,
        client: Option<String>,
        reasoning: Option<(String, String, bool)>,
        max_reasoning_tokens: Option<i128>,
    ) -> PyResult<Self> {
        let build = || -> Result<GenerateRequest, Error> {
            let grammar = match grammar {
                None => None,
                Some((kind, text)) => Some(match kind.as_str() {
                    "json_schema" => Grammar::JsonSchema(text),
                    "lark" => Grammar::Lark(text),
                    "regex" => Grammar::Regex(text),
                    _ => return Err(Error::invalid("grammar", format!("unknown kind {kind:?}"))),
                }),
            };
            let budget = unsigned("max_reasoning_tokens", max_reasoning_tokens)?;
            let reasoning = match (reasoning, budget) {
                (Some((open, close, inside)), budget) => Some(Reasoning {
                    open,
                    close,
                    inside,
                    budget,
                }),
                (None, Some(_)) => {
                    return Err(Error::invalid(
                        "max_reasoning_tokens",
                        "needs the reasoning block's tags",
                    ))
                }
                (None, None) => None,
            };
            let defaults = SamplingParams::default();
            Ok(GenerateRequest {
                prompt,
                max_tokens: unsigned("max_tokens", max_tokens)?
                    .unwrap_or(limits::DEFAULT_MAX_TOKENS),
                sampling: SamplingParams {
                    temperature: temperature.unwrap_or(defaults.temperature),
                    top_k: unsigned("top_k", top_k)?,
                    top_p,
                    min_p,
                    repeat_penalty,
                    frequency_penalty,
                    presence_penalty,
                    seed: unsigned("seed", seed)?,
                },
                stop_strings: stop,
                stop_token_ids,
                ignore_eog: ignore_eos,
                grammar,
                logprobs: unsigned("logprobs", logprobs)?,
                cache_scope: match (reuse_prefix, tenant) {
                    (false, _) => CacheScope::Private,
                    (true, None) => CacheScope::Shared,
                    (true, Some(t)) => CacheScope::Tenant(t),
                },
                client,
                reasoning,
            })
        };
        build().map(Self).map_err(|e| py_err(py, e))
    }

    fn __repr__(&self) -> String {
        let r = &self.0;
        format!(
            "GenerateRequest(prompt=<{} tokens>, max_tokens={}, sampling={:?}, stop={:?}, stop_token_ids={:?}, ignore_eos={}, grammar={}, logprobs={:?})",
            r.prompt.len(), r.max_tokens, r.sampling, r.stop_strings, r.stop_token_ids, r.ignore_eog, r.grammar.is_some(), r.logprobs
        )
    }
}

/// One piece of streamed output: complete text and the tokens it came from, with their
/// log-probabilities when they were asked for.
#[pyclass(module = "smolcandle._native", frozen, get_all)]
struct Chunk {
    text: String,
    token_ids: Vec<u32>,
    logprobs: Vec<Logprob>,
}

#[pymethods]
impl Chunk {
    fn __repr__(&self) -> String {
        format!(
            "Chunk(text={:?}, token_ids={:?})",
            self.text, self.token_ids
        )
    }
}

/// A generated token's natural-log probability under the model, and the most likely tokens
/// at its position as `(token_id, logprob)`, most likely first.
#[pyclass(module = "smolcandle._native", frozen, get_all)]
#[derive(Clone)]
struct Logprob {
    token_id: u32,
    logprob: f32,
    top_logprobs: Vec<(u32, f32)>,
}

impl From<TokenLogprob> for Logprob {
    fn from(t: TokenLogprob) -> Self {
        Self {
            token_id: t.id,
            logprob: t.logprob,
            top_logprobs: t.top,
        }
    }
}

#[pymethods]
impl Logprob {
    fn __repr__(&self) -> String {
        format!(
            "Logprob(token_id={}, logprob={:.4}, top_logprobs={:?})",
            self.token_id, self.logprob, self.top_logprobs
        )
    }
}

#[pyclass(module = "smolcandle._native", name = "Usage", frozen, get_all)]
#[derive(Clone)]
struct PyUsage {
    prompt_tokens: usize,
    cached_tokens: usize,
    completion_tokens: usize,
    reasoning_tokens: usize,
    prefill_seconds: f64,
    decode_seconds: f64,
    drafted_tokens: usize,
    accepted_tokens: usize,
}

impl From<Usage> for PyUsage {
    fn from(u: Usage) -> Self {
        Self {
            prompt_tokens: u.prompt_tokens,
            cached_tokens: u.cached_tokens,
            completion_tokens: u.completion_tokens,
            reasoning_tokens: u.reasoning_tokens,
            prefill_seconds: u.prefill_seconds,
            decode_seconds: u.decode_seconds,
            drafted_tokens: u.drafted_tokens,
            accepted_tokens: u.accepted_tokens,
        }
    }
}

#[pymethods]
impl PyUsage {
    #[getter]
    fn total_tokens(&self) -> usize {
        self.prompt_tokens + self.completion_tokens
    }

    /// Computed (not cached) prompt tokens per second of prefill.
    #[getter]
    fn prefill_tokens_per_second(&self) -> f64 {
        rate(
            self.prompt_tokens - self.cached_tokens,
            self.prefill_seconds,
        )
    }

    /// Generated tokens per second after the first (which the prefill produced).
    #[getter]
    fn decode_tokens_per_second(&self) -> f64 {
        rate(
            self.completion_tokens.saturating_sub(1),
            self.decode_seconds,
        )
    }

    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("prompt_tokens", self.prompt_tokens)?;
        d.set_item("cached_tokens", self.cached_tokens)?;
        d.set_item("completion_tokens", self.completion_tokens)?;
        d.set_item("reasoning_tokens", self.reasoning_tokens)?;
        d.set_item("total_tokens", self.total_tokens())?;
        d.set_item("prefill_seconds", self.prefill_seconds)?;
        d.set_item("decode_seconds", self.decode_seconds)?;
        d.set_item("drafted_tokens", self.drafted_tokens)?;
        d.set_item("accepted_tokens", self.accepted_tokens)?;
        Ok(d)
    }

    fn __repr__(&self) -> String {
        format!(
            "Usage(prompt_tokens={}, cached_tokens={}, completion_tokens={}, prefill_seconds={:.4}, decode_seconds={:.4})",
            self.prompt_tokens, self.cached_tokens, self.completion_tokens, self.prefill_seconds, self.decode_seconds
        )
    }
}

fn rate(n: usize, seconds: f64) -> f64 {
    if seconds > 0.0 {
        n as f64 / seconds
    } else {
        0.0
    }
}

/// An iterator of `Chunk`s. `__next__` waits with the GIL released, waking every 100 ms to let
/// Python deliver signals (Ctrl-C cancels the generation and raises KeyboardInterrupt).
#[pyclass(module = "smolcandle._native", frozen)]
struct TokenStream {
    stream: Mutex<Option<smolcandle_engine::Stream>>,
    canceller: Canceller,
    place: QueuePlace,
    result: Mutex<Option<(String, PyUsage)>>,
}

enum Next {
    Chunk(Chunk),
    Done(String, Usage),
    Failed(String),
    Ended,
    Waiting,
}

#[pymethods]
impl TokenStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<Chunk>> {
        loop {
            let next = py.detach(|| {
                let guard = match self.stream.lock() {
                    Ok(g) => g,
                    Err(_) => return Next::Ended,
                };
                let Some(stream) = guard.as_ref() else {
                    return Next::Ended;
                };
                match stream.recv_timeout(Duration::from_millis(100)) {
                    Ok(Event::Chunk {
                        text,
                        token_ids,
                        logprobs,
                    }) => Next::Chunk(Chunk {
                        text,
                        token_ids,
                        logprobs: logprobs.into_iter().map(Logprob::from).collect(),
                    }),
                    Ok(Event::Done {
                        finish_reason,
                        usage,
                    }) => Next::Done(finish_reason.as_str().to_string(), usage),
                    Ok(Event::Error(e)) => Next::Failed(e),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Next::Waiting,
                    // Gone without its last event: the engine thread itself stopped.
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                        Next::Failed(Error::EngineStopped.to_string())
                    }
                }
            });
            match next {
                Next::Chunk(chunk) => return Ok(Some(chunk)),
                Next::Done(reason, usage) => {
                    self.end(Some((reason, usage.into())));
                    return Ok(None);
                }
                Next::Failed(message) => {
                    self.end(None);
                    // The message is already an engine error's text ("inference failed: …").
                    return Err(error_of_class(py, "EngineError", message));
                }
                Next::Ended => {
                    self.end(None);
                    return Ok(None);
                }
                Next::Waiting => {
                    if let Err(e) = py.check_signals() {
                        self.canceller.cancel();
                        return Err(e);
                    }
                }
            }
        }
    }

    /// Stops the generation. Safe from any thread; the iterator then ends.
    fn cancel(&self) {
        self.canceller.cancel();
    }

    /// The request's place in the engine's queue: 1 for the next to start, 0 once it runs.
    /// Safe to read from any thread while another iterates.
    #[getter]
    fn queue_position(&self) -> usize {
        self.place.get()
    }

    /// "stop", "length" or "cancelled" once the stream has ended; None before.
    #[getter]
    fn finish_reason(&self) -> Option<String> {
        self.result.lock().ok()?.as_ref().map(|(r, _)| r.clone())
    }

    #[getter]
    fn usage(&self) -> Option<PyUsage> {
        self.result.lock().ok()?.as_ref().map(|(_, u)| u.clone())
    }
}

impl TokenStream {
    fn end(&self, result: Option<(String, PyUsage)>) {
        if let Ok(mut r) = self.result.lock() {
            if r.is_none() {
                *r = result.or_else(|| Some(("cancelled".into(), PyUsage::from(Usage::default()))));
            }
        }
        if let Ok(mut s) = self.stream.lock() {
            s.take();
        }
    }
}

/// Writes `dst`: the GGUF file `src` with its 2-D weights quantized to `mix` ("q8_0",
/// "q4_k_m", "q6_k"…). For making test fixtures and benchmark files from F32/F16 exports.
#[pyfunction]
fn quantize_gguf(py: Python<'_>, src: PathBuf, dst: PathBuf, mix: &str) -> PyResult<()> {
    let mix = smolcandle_engine::quantize::Mix::parse(mix).map_err(|e| py_err(py, e))?;
    guarded(py, || {
        smolcandle_engine::quantize::quantize_file(&src, &dst, mix)
    })
}

/// Reads a GGUF file's header without loading weights: `{"metadata": {...},
/// "array_lengths": {key: n} (the arrays left out of metadata), "tensors": [(name, shape, type)]}`.
/// The file is validated as `Model.load` validates it (magic, truncation, tensor sizes).
#[pyfunction]
fn inspect_gguf(py: Python<'_>, path: PathBuf) -> PyResult<Bound<'_, PyDict>> {
    let gguf = guarded(py, || smolcandle_engine::gguf::GgufFile::open(&path))?;
    let (metadata, long) = metadata_dict(py, gguf.metadata())?;
    let mut names: Vec<&String> = gguf.tensor_names().collect();
    names.sort();
    let tensors = PyList::empty(py);
    for name in names {
        let (shape, dtype) = gguf.tensor_info(name).expect("listed tensor");
        tensors.append((name, shape, format!("{dtype:?}")))?;
    }
    let out = PyDict::new(py);
    out.set_item("metadata", metadata)?;
    out.set_item("array_lengths", long)?;
    out.set_item("tensors", tensors)?;
    Ok(out)
}

/// The engine's defaults and limits (`limits`), for the layers above to read rather than keep
/// their own.
fn defaults(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("temperature", limits::DEFAULT_TEMPERATURE)?;
    d.set_item("max_tokens", limits::DEFAULT_MAX_TOKENS)?;
    d.set_item("chat_max_tokens", limits::DEFAULT_CHAT_MAX_TOKENS)?;
    d.set_item("n_ctx", limits::DEFAULT_N_CTX)?;
    d.set_item("prefix_cache_bytes", limits::DEFAULT_PREFIX_CACHE_BYTES)?;
    d.set_item("max_top_logprobs", limits::MAX_TOP_LOGPROBS)?;
    d.set_item("repeat_last_n", limits::REPEAT_LAST_N)?;
    d.set_item("queued_per_active", limits::QUEUED_PER_ACTIVE)?;
    Ok(d)
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(quantize_gguf, m)?)?;
    m.add_function(wrap_pyfunction!(inspect_gguf, m)?)?;
    m.add_function(wrap_pyfunction!(register_errors, m)?)?;
    m.add_class::<PyModel>()?;
    m.add_class::<PyGenerateRequest>()?;
    m.add_class::<TokenStream>()?;
    m.add_class::<Chunk>()?;
    m.add_class::<Logprob>()?;
    m.add_class::<PyUsage>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("DEFAULTS", defaults(m.py())?)?;
    // The SIMD this build's kernels were compiled for, and what the running CPU offers.
    let build = PyDict::new(m.py());
    build.set_item("simd", smolcandle_engine::kernels::simd())?;
    build.set_item("cpu", smolcandle_engine::kernels::cpu_levels())?;
    build.set_item("cuda", cfg!(feature = "cuda"))?;
    // The SIMD target features it was compiled with: Candle's quantized kernels use AVX, FMA
    // and F16C only where these say so, and fall back to scalar code otherwise.
    let mut features = Vec::new();
    macro_rules! compiled {
        ($($f:tt),*) => {$(if cfg!(target_feature = $f) { features.push($f); })*};
    }
    compiled!(
        "sse4.2",
        "avx",
        "avx2",
        "fma",
        "f16c",
        "avx512f",
        "avx512bw",
        "avx512vl",
        "avx512vnni"
    );
    build.set_item("target_features", features)?;
    m.add("BUILD", build)?;
    // Whether this build has the `cuda` feature, so that "cuda" devices can be asked for.
    m.add("has_cuda", cfg!(feature = "cuda"))?;
    Ok(())
}
