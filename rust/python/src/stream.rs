//! What a generation gives back: `TokenStream`, an iterator of `Chunk`s (text, token ids and
//! their `Logprob`s), and its `Usage` once it has ended.

use std::sync::mpsc::RecvTimeoutError;
use std::sync::Mutex;
use std::time::Duration;

use pyo3::prelude::*;
use pyo3::types::PyDict;

use smolcandle_engine::{Canceller, Error, Event, QueuePlace, TokenLogprob, Usage};

use crate::errors::engine_error;

/// One piece of streamed output: complete text and the tokens it came from, with their
/// log-probabilities when they were asked for.
#[pyclass(module = "smolcandle._native", frozen, get_all)]
pub(crate) struct Chunk {
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
pub(crate) struct Logprob {
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

/// A finished generation's counts and times: the engine's [`Usage`] itself.
#[pyclass(module = "smolcandle._native", name = "Usage", frozen)]
#[derive(Clone, Default)]
pub(crate) struct PyUsage(Usage);

/// `Usage`'s Python class from the engine's fields, named once: a getter for each, and the
/// same fields in `to_dict` and `__repr__`.
macro_rules! usage_class {
    ($($(#[doc = $doc:literal])* $field:ident: $ty:ty,)*) => {
        // Every field of the engine's `Usage` is listed: a field added there fails this.
        const _: fn(&Usage) = |u| {
            let Usage { $($field: _,)* } = u;
        };

        #[pymethods]
        impl PyUsage {
            $(
                $(#[doc = $doc])*
                #[getter]
                fn $field(&self) -> $ty {
                    self.0.$field
                }
            )*

            /// `prompt_tokens` and `completion_tokens` together.
            #[getter]
            fn total_tokens(&self) -> usize {
                self.0.prompt_tokens + self.0.completion_tokens
            }

            /// Computed (not cached) prompt tokens per second of prefill.
            #[getter]
            fn prefill_tokens_per_second(&self) -> f64 {
                rate(
                    self.0.prompt_tokens.saturating_sub(self.0.cached_tokens),
                    self.0.prefill_seconds,
                )
            }

            /// Generated tokens per second after the first (which the prefill produced).
            #[getter]
            fn decode_tokens_per_second(&self) -> f64 {
                rate(
                    self.0.completion_tokens.saturating_sub(1),
                    self.0.decode_seconds,
                )
            }

            /// Every field, and `total_tokens`.
            fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
                let d = PyDict::new(py);
                $(d.set_item(stringify!($field), self.0.$field)?;)*
                d.set_item("total_tokens", self.total_tokens())?;
                Ok(d)
            }

            fn __repr__(&self) -> String {
                let fields: &[String] =
                    &[$(format!("{}={:?}", stringify!($field), self.0.$field)),*];
                format!("Usage({})", fields.join(", "))
            }
        }
    };
}

usage_class! {
    prompt_tokens: usize,
    /// Prompt tokens reused from the prefix cache rather than computed.
    cached_tokens: usize,
    completion_tokens: usize,
    /// Completion tokens inside the reasoning block, its closing tag included.
    reasoning_tokens: usize,
    prefill_seconds: f64,
    decode_seconds: f64,
    /// Draft tokens verified (speculative decoding).
    drafted_tokens: usize,
    /// Draft tokens kept as the tokens chosen.
    accepted_tokens: usize,
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
pub(crate) struct TokenStream {
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

impl TokenStream {
    pub(crate) fn new(stream: smolcandle_engine::Stream) -> Self {
        Self {
            canceller: stream.canceller(),
            place: stream.place(),
            stream: Mutex::new(Some(stream)),
            result: Mutex::new(None),
        }
    }

    fn end(&self, result: Option<(String, PyUsage)>) {
        if let Ok(mut r) = self.result.lock() {
            if r.is_none() {
                *r = result.or_else(|| Some(("cancelled".into(), PyUsage::default())));
            }
        }
        if let Ok(mut s) = self.stream.lock() {
            s.take();
        }
    }
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
                    Err(RecvTimeoutError::Timeout) => Next::Waiting,
                    // Gone without its last event: the engine thread itself stopped.
                    Err(RecvTimeoutError::Disconnected) => {
                        Next::Failed(Error::EngineStopped.to_string())
                    }
                }
            });
            match next {
                Next::Chunk(chunk) => return Ok(Some(chunk)),
                Next::Done(reason, usage) => {
                    self.end(Some((reason, PyUsage(usage))));
                    return Ok(None);
                }
                Next::Failed(message) => {
                    self.end(None);
                    // The message is already an engine error's text ("inference failed: …").
                    return Err(engine_error(py, message));
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
