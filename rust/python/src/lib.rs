//! `smolcandle._native`: thin PyO3 bindings over the engine, one module per class family as
//! HF tokenizers' are. Blocking work (loading, forward passes, waiting for tokens) runs with
//! the GIL released.
//!
//! - [`model`] holds `Model`;
//! - [`request`], the keyword classes handed over whole, `LoadOptions` and `GenerateRequest`;
//! - [`stream`], `TokenStream` and what it yields, `Chunk`, `Logprob`, `Usage`;
//! - [`gguf`], `inspect_gguf` and `quantize_gguf`;
//! - [`errors`], engine errors and panics as `smolcandle.errors` exceptions;
//! - [`defaults`], `DEFAULTS` and `BUILD`.
//!
//! `python/smolcandle/_native.pyi` describes this module; tests/test_native_stub.py checks it.

use pyo3::prelude::*;

mod defaults;
mod errors;
mod gguf;
mod model;
mod request;
mod stream;

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    errors::install_panic_hook();
    m.add_function(wrap_pyfunction!(gguf::quantize_gguf, m)?)?;
    m.add_function(wrap_pyfunction!(gguf::inspect_gguf, m)?)?;
    m.add_function(wrap_pyfunction!(errors::register_errors, m)?)?;
    m.add_class::<model::PyModel>()?;
    m.add_class::<request::PyLoadOptions>()?;
    m.add_class::<request::PyGenerateRequest>()?;
    m.add_class::<stream::TokenStream>()?;
    m.add_class::<stream::Chunk>()?;
    m.add_class::<stream::Logprob>()?;
    m.add_class::<stream::PyUsage>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("DEFAULTS", defaults::defaults(m.py())?)?;
    m.add("BUILD", defaults::build(m.py())?)?;
    // Whether this build has the `cuda` feature, so that "cuda" devices can be asked for.
    m.add("has_cuda", cfg!(feature = "cuda"))?;
    Ok(())
}
