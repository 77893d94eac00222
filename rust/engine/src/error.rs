//! Errors of the engine. Every input-dependent failure is a variant here with a message that
//! names what was wrong; the Python bindings map each variant to an exception class.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: no such file", path.display())]
    FileNotFound { path: PathBuf },

    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{}: not a GGUF file (starts with {found}, expected \"GGUF\")", path.display())]
    NotGguf { path: PathBuf, found: String },

    #[error("{}: invalid or truncated GGUF: {reason}", path.display())]
    InvalidGguf { path: PathBuf, reason: String },

    #[error("unsupported architecture {0:?} (supported: smollm3, llama)")]
    UnsupportedArchitecture(String),

    #[error("{}: unsupported tensor type: {reason}", path.display())]
    UnsupportedTensorType { path: PathBuf, reason: String },

    #[error("missing metadata key {0:?}")]
    MissingMetadata(String),

    #[error("metadata key {key:?}: {reason}")]
    BadMetadata { key: String, reason: String },

    #[error("tensor {name:?}: {reason}")]
    BadTensor { name: String, reason: String },

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("prompt of {n_prompt} tokens does not fit in the context of {n_ctx} tokens")]
    ContextOverflow { n_prompt: usize, n_ctx: usize },

    #[error("invalid parameter {name}: {reason}")]
    InvalidParameter { name: &'static str, reason: String },

    #[error("device {0}")]
    Device(String),

    #[error("the engine is busy: {queued} requests are already waiting; try again later")]
    Busy { queued: usize },

    #[error("internal error: {0}")]
    Panic(String),

    #[error("the engine has stopped")]
    EngineStopped,

    #[error("inference failed: {0}")]
    Inference(String),

    #[error("inference failed: {0}")]
    Candle(#[from] candle_core::Error),
}

impl Error {
    pub fn invalid(name: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidParameter {
            name,
            reason: reason.into(),
        }
    }
}

/// The message of a caught panic's payload.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Runs `f`, turning a panic inside it into [`Error::Panic`]: no panic crosses from the
/// engine into its callers (the bindings, the engine thread's loop).
pub fn catch_panic<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .unwrap_or_else(|payload| Err(Error::Panic(panic_message(payload.as_ref()))))
}

pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_an_error_with_its_message() {
        let caught = catch_panic(|| -> Result<()> { panic!("index out of bounds") });
        assert!(
            matches!(&caught, Err(Error::Panic(m)) if m == "index out of bounds"),
            "{caught:?}"
        );
        let formatted = catch_panic(|| -> Result<()> { panic!("{} of {}", 3, 2) });
        assert_eq!(formatted.unwrap_err().to_string(), "internal error: 3 of 2");
        assert_eq!(catch_panic(|| Ok(7)).unwrap(), 7);
    }
}
