//! smolcandle's inference engine: SmolLM3 / Llama GGUF models in Candle.
//!
//! - [`gguf`] opens and validates a file, [`model`] builds the decoder (NoPE layers,
//!   grouped-query attention, KV cache) over the weights as quantized in the file;
//! - [`tokenizer`] is byte-level BPE from the GGUF vocabulary, matching llama.cpp;
//! - [`engine`] runs the model on its own thread and streams tokens to callers, with
//!   [`sampling`] and [`detok`] (UTF-8-safe text with stop strings).

pub mod detok;
pub mod engine;
pub mod error;
pub mod gguf;
pub mod grammar;
pub mod kernels;
pub mod limits;
pub mod model;
pub mod prefix;
pub mod quantize;
pub mod reasoning;
pub mod sampling;
pub mod speculative;
pub mod tokenizer;

pub use engine::{
    AdmissionStats, Canceller, Engine, Event, FinishReason, GenerateRequest, LoadOptions,
    QueuePlace, SpeculationStats, Stream, TokenLogprob, Usage,
};
pub use error::{Error, Result};
pub use grammar::Grammar;
pub use prefix::CacheScope;
pub use sampling::SamplingParams;
