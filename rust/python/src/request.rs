//! The keyword classes a caller fills and hands over whole: `LoadOptions` for `Model.load`,
//! `GenerateRequest` for `Model.generate`. Values are converted here (an integer out of its
//! type's range is an invalid parameter that names it) and checked by the engine, so each
//! range has one home.

use pyo3::prelude::*;
use pyo3::types::PyDict;

use smolcandle_engine::limits;
use smolcandle_engine::model::YarnOptions;
use smolcandle_engine::reasoning::Reasoning;
use smolcandle_engine::{CacheScope, Error, GenerateRequest, Grammar, LoadOptions, SamplingParams};

use crate::errors::py_err;

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

/// A size given in MiB, in bytes.
fn mib(name: &'static str, v: Option<i128>) -> Result<Option<usize>, Error> {
    unsigned::<usize>(name, v)?
        .map(|n| {
            n.checked_mul(1 << 20)
                .ok_or_else(|| Error::invalid(name, format!("{n} MiB is too large")))
        })
        .transpose()
}

/// transformers' `rope_scaling` dict: `{"rope_type": "yarn", "factor": 2.0,
/// "original_max_position_embeddings": 65536}`, with `beta_fast`, `beta_slow` and
/// `attention_factor` optional. Anything else is refused by name rather than ignored.
fn yarn_options(d: &Bound<'_, PyDict>) -> Result<YarnOptions, Error> {
    let bad = |reason: String| Error::invalid("rope_scaling", reason);
    let typed = |key: &str, what: &str, v: &Bound<'_, PyAny>| {
        bad(format!("{key:?} must be {what}, not {v}"))
    };
    let number = |key: &str, v: &Bound<'_, PyAny>| -> Result<Option<f32>, Error> {
        if v.is_none() {
            return Ok(None);
        }
        v.extract::<f64>()
            .map(|x| Some(x as f32))
            .map_err(|_| typed(key, "a number", v))
    };
    let mut out = YarnOptions::default();
    let (mut kind, mut factor) = (None, None);
    for (k, v) in d.iter() {
        let k: String = k
            .extract()
            .map_err(|_| bad(format!("key {k} is not a string")))?;
        match k.as_str() {
            "rope_type" | "type" => {
                kind = Some(
                    v.extract::<String>()
                        .map_err(|_| typed(&k, "a string", &v))?,
                )
            }
            "factor" => factor = number(&k, &v)?,
            "original_max_position_embeddings" => {
                let n: Option<i128> = v.extract().map_err(|_| typed(&k, "an integer", &v))?;
                out.original_context = unsigned("rope_scaling", n)?;
            }
            "beta_fast" => out.beta_fast = number(&k, &v)?,
            "beta_slow" => out.beta_slow = number(&k, &v)?,
            "attention_factor" => out.attention_factor = number(&k, &v)?,
            "truncate" if v.extract::<bool>().unwrap_or(false) => {}
            other => {
                return Err(bad(format!(
                    "{other:?} is not a YaRN setting this engine supports"
                )))
            }
        }
    }
    match kind.as_deref() {
        Some("yarn") => {}
        Some(other) => {
            return Err(bad(format!(
                "rope type {other:?} is not supported (\"yarn\" is)"
            )))
        }
        None => return Err(bad("needs \"rope_type\": \"yarn\"".into())),
    }
    out.factor = factor.ok_or_else(|| bad("needs a \"factor\"".into()))?;
    Ok(out)
}

/// How to load a model: every option a keyword, each left unset (`None`) taking the engine's
/// default. Sizes are in MiB here and in bytes in the engine.
#[pyclass(module = "smolcandle._native", name = "LoadOptions", frozen)]
pub(crate) struct PyLoadOptions(pub(crate) LoadOptions);

#[pymethods]
impl PyLoadOptions {
    #[new]
    #[pyo3(signature = (*, device = "cpu".to_string(), n_threads = None, n_ctx = None,
                        kv_cache_dtype = None, max_active = None, max_queued = None,
                        kv_budget_mib = None, prefix_cache_mib = None, speculative = None,
                        decode_slowdown = None, disk_cache_dir = None, disk_cache_mib = None,
                        rope_scaling = None))]
    #[allow(clippy::too_many_arguments)] // a keyword class: one argument per option
    fn new(
        py: Python<'_>,
        device: String,
        n_threads: Option<i128>,
        n_ctx: Option<i128>,
        kv_cache_dtype: Option<String>,
        max_active: Option<i128>,
        max_queued: Option<i128>,
        kv_budget_mib: Option<i128>,
        prefix_cache_mib: Option<i128>,
        speculative: Option<bool>,
        decode_slowdown: Option<f64>,
        disk_cache_dir: Option<std::path::PathBuf>,
        disk_cache_mib: Option<i128>,
        rope_scaling: Option<Bound<'_, PyDict>>,
    ) -> PyResult<Self> {
        let build = || -> Result<LoadOptions, Error> {
            let rope_scaling = rope_scaling.as_ref().map(yarn_options).transpose()?;
            let kv_budget_bytes = mib("kv_budget_mib", kv_budget_mib)?;
            if kv_budget_bytes == Some(0) {
                // The engine checks bytes; MiB are this class's unit, so the error names it.
                return Err(Error::invalid("kv_budget_mib", "must be at least 1"));
            }
            Ok(LoadOptions {
                device,
                n_threads: unsigned("n_threads", n_threads)?,
                n_ctx: unsigned("n_ctx", n_ctx)?,
                kv_cache_dtype,
                rope_scaling,
                prefix_cache_bytes: mib("prefix_cache_mib", prefix_cache_mib)?,
                max_active: unsigned("max_active", max_active)?,
                max_queued: unsigned("max_queued", max_queued)?,
                kv_budget_bytes,
                speculative,
                decode_slowdown,
                disk_cache_dir,
                disk_cache_bytes: mib("disk_cache_mib", disk_cache_mib)?.map(|b| b as u64),
            })
        };
        build().map(Self).map_err(|e| py_err(py, e))
    }

    /// The options set, as the engine takes them (sizes in bytes).
    fn __repr__(&self) -> String {
        let o = &self.0;
        let mut set = vec![format!("device={:?}", o.device)];
        let sizes = [
            ("n_threads", o.n_threads),
            ("n_ctx", o.n_ctx),
            ("max_active", o.max_active),
            ("max_queued", o.max_queued),
            ("kv_budget_bytes", o.kv_budget_bytes),
            ("prefix_cache_bytes", o.prefix_cache_bytes),
            ("disk_cache_bytes", o.disk_cache_bytes.map(|b| b as usize)),
        ];
        set.extend(
            sizes
                .iter()
                .filter_map(|(k, v)| v.map(|v| format!("{k}={v}"))),
        );
        if let Some(dtype) = &o.kv_cache_dtype {
            set.push(format!("kv_cache_dtype={dtype:?}"));
        }
        if let Some(on) = o.speculative {
            set.push(format!("speculative={}", if on { "True" } else { "False" }));
        }
        if let Some(x) = o.decode_slowdown {
            set.push(format!("decode_slowdown={x}"));
        }
        if let Some(y) = &o.rope_scaling {
            set.push(format!("rope_scaling={y:?}"));
        }
        if let Some(dir) = &o.disk_cache_dir {
            set.push(format!("disk_cache_dir={:?}", dir.display().to_string()));
        }
        format!("LoadOptions({})", set.join(", "))
    }
}

/// One generation's settings: the prompt's token ids and keyword options, each left unset
/// (`None`) taking the engine's default.
#[pyclass(module = "smolcandle._native", name = "GenerateRequest", frozen)]
pub(crate) struct PyGenerateRequest(pub(crate) GenerateRequest);

#[pymethods]
impl PyGenerateRequest {
    #[new]
    #[pyo3(signature = (prompt, *, max_tokens = None, temperature = None, top_k = None,
                        top_p = None, min_p = None, repeat_penalty = None,
                        frequency_penalty = None, presence_penalty = None, seed = None,
                        stop = Vec::new(), stop_token_ids = Vec::new(), ignore_eos = false,
                        grammar = None, logprobs = None, tenant = None, reuse_prefix = true,
                        client = None, reasoning = None, max_reasoning_tokens = None))]
    #[allow(clippy::too_many_arguments)] // a keyword class: one argument per option
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
