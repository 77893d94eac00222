//! The exceptions the bindings raise, and how engine errors and panics become them.
//!
//! The hierarchy is declared once, in Python (`smolcandle.errors`: several classes have two
//! bases, such as `GGUFError(ModelLoadError, ValueError)`, and `InvalidParameterError` takes a
//! `param`). That module hands its classes over when it is imported (`register_errors`), and
//! every class the bindings raise is looked up then, once: a class that is missing or is not a
//! `SmolcandleError` fails that import, instead of an error turning silently into another
//! class when it is raised.

use std::cell::RefCell;
use std::panic::{AssertUnwindSafe, PanicHookInfo};
use std::sync::{Once, RwLock};

use pyo3::exceptions::{PyImportError, PyRuntimeError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyType};

use smolcandle_engine::error::panic_message;
use smolcandle_engine::Error;

/// Declares [`Classes`], one field per class of `smolcandle.errors` that the bindings raise,
/// with the name it is looked up by: the only place those names are written in Rust.
macro_rules! classes {
    ($($field:ident => $name:literal,)*) => {
        /// The classes of `smolcandle.errors` that the bindings raise.
        struct Classes {
            $($field: Py<PyType>,)*
        }

        impl Classes {
            /// Every class from `classes` (name to class), each checked to be a subclass of
            /// `SmolcandleError`; an `ImportError` naming every class missing or wrong.
            fn resolve(classes: &Bound<'_, PyDict>) -> PyResult<Self> {
                let mismatch = |problems: &[String]| {
                    PyImportError::new_err(format!(
                        "smolcandle.errors does not match the native module: {}",
                        problems.join("; ")
                    ))
                };
                let base = lookup(classes, "SmolcandleError", None).map_err(|e| mismatch(&[e]))?;
                let mut problems = Vec::new();
                $(let $field = lookup(classes, $name, Some(&base)).map_err(|e| problems.push(e));)*
                match ($($field,)*) {
                    ($(Ok($field),)*) => Ok(Self { $($field,)* }),
                    _ => Err(mismatch(&problems)),
                }
            }
        }
    };
}

classes! {
    model_load => "ModelLoadError",
    model_not_found => "ModelNotFoundError",
    gguf => "GGUFError",
    unsupported_model => "UnsupportedModelError",
    tokenizer => "TokenizerError",
    device => "DeviceError",
    invalid_parameter => "InvalidParameterError",
    context_length => "ContextLengthError",
    engine => "EngineError",
    busy => "BusyError",
}

/// The class named `name` in `classes`: an exception class, and a subclass of `base` if given.
fn lookup(
    classes: &Bound<'_, PyDict>,
    name: &str,
    base: Option<&Py<PyType>>,
) -> Result<Py<PyType>, String> {
    let found = classes
        .get_item(name)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("it has no class {name}"))?;
    let class = found
        .cast_into::<PyType>()
        .map_err(|_| format!("its {name} is not a class"))?;
    let py = class.py();
    let parent = match base {
        Some(base) => base.bind(py).clone(),
        None => py.get_type::<pyo3::exceptions::PyException>(),
    };
    if !class.is_subclass(&parent).unwrap_or(false) {
        let parent = parent.name().map(|n| n.to_string()).unwrap_or_default();
        return Err(format!("its {name} is not a subclass of {parent}"));
    }
    Ok(class.unbind())
}

/// The classes, once `smolcandle.errors` has registered them. A lock rather than a cell: a
/// reloaded `smolcandle.errors` registers its new classes, which are then the ones raised.
static CLASSES: RwLock<Option<Classes>> = RwLock::new(None);

/// Called by `smolcandle.errors` when it is imported, with its classes by name.
#[pyfunction]
pub(crate) fn register_errors(classes: &Bound<'_, PyDict>) -> PyResult<()> {
    let resolved = Classes::resolve(classes)?;
    let mut slot = CLASSES
        .write()
        .map_err(|_| PyRuntimeError::new_err("the error classes' lock is poisoned"))?;
    *slot = Some(resolved);
    Ok(())
}

/// An exception of the class `pick` chooses, with `param` as its second argument if given.
fn raise(
    py: Python<'_>,
    pick: impl FnOnce(&Classes) -> &Py<PyType>,
    message: String,
    param: Option<&'static str>,
) -> PyErr {
    let class = CLASSES
        .read()
        .ok()
        .and_then(|c| c.as_ref().map(|c| pick(c).clone_ref(py)));
    match (class, param) {
        (Some(cls), Some(param)) => PyErr::from_type(cls.into_bound(py), (message, param)),
        (Some(cls), None) => PyErr::from_type(cls.into_bound(py), message),
        // Only where the module was loaded without the package around it.
        (None, _) => PyRuntimeError::new_err(format!(
            "{message} (smolcandle.errors is not imported, so this is not its exception class)"
        )),
    }
}

/// The engine error as its `smolcandle.errors` exception. An `InvalidParameterError` (and a
/// `ContextLengthError`) carries the parameter's name as `param`.
pub(crate) fn py_err(py: Python<'_>, e: Error) -> PyErr {
    let param = match &e {
        Error::InvalidParameter { name, .. } => Some(*name),
        Error::ContextOverflow { .. } => Some("prompt"),
        _ => None,
    };
    raise(py, |c| c.of(&e), e.to_string(), param)
}

impl Classes {
    /// The class an engine error is raised as.
    fn of(&self, e: &Error) -> &Py<PyType> {
        match e {
            Error::FileNotFound { .. } => &self.model_not_found,
            Error::Io { .. } => &self.model_load,
            Error::NotGguf { .. }
            | Error::InvalidGguf { .. }
            | Error::MissingMetadata(_)
            | Error::BadMetadata { .. }
            | Error::BadTensor { .. } => &self.gguf,
            Error::UnsupportedArchitecture(_) | Error::UnsupportedTensorType { .. } => {
                &self.unsupported_model
            }
            Error::Tokenizer(_) => &self.tokenizer,
            Error::ContextOverflow { .. } => &self.context_length,
            Error::InvalidParameter { .. } => &self.invalid_parameter,
            Error::Device(_) => &self.device,
            Error::Busy { .. } => &self.busy,
            Error::EngineStopped | Error::Inference(_) | Error::Candle(_) | Error::Panic(_) => {
                &self.engine
            }
        }
    }
}

/// An `EngineError` with this message (a failed stream's, or a closed model's).
pub(crate) fn engine_error(py: Python<'_>, message: String) -> PyErr {
    raise(py, |c| &c.engine, message, None)
}

/// Runs engine work with the GIL released; its error, or a panic inside it, becomes the
/// matching `smolcandle.errors` exception. No Rust panic reaches Python as a `PanicException`,
/// and none prints anything: the panic hook keeps its message for the `EngineError`.
pub(crate) fn guarded<T: Send>(
    py: Python<'_>,
    f: impl FnOnce() -> Result<T, Error> + Send,
) -> PyResult<T> {
    py.detach(|| caught(f)).map_err(|e| py_err(py, e))
}

/// Runs `f`, a panic inside it becoming [`Error::Panic`] with the message (and place) that the
/// hook recorded for it.
fn caught<T>(f: impl FnOnce() -> Result<T, Error>) -> Result<T, Error> {
    std::panic::catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let message = LAST_PANIC
            .with(|last| last.borrow_mut().take())
            .unwrap_or_else(|| panic_message(payload.as_ref()));
        Err(Error::Panic(message))
    })
}

thread_local! {
    /// The message of the last panic on this thread, for the error that reports it.
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Replaces Rust's panic hook, which prints the message on stderr, by one that keeps it (with
/// the place of the panic) for the error that reports it, and logs it with `tracing`. Library
/// code prints nothing: every panic here is either caught at the boundary and raised as an
/// `EngineError` ("internal error: …"), or caught by the engine, which reports it likewise.
/// The hook is this module's own: each build of the native module links its own `std`.
pub(crate) fn install_panic_hook() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| std::panic::set_hook(Box::new(record_panic)));
}

fn record_panic(info: &PanicHookInfo<'_>) {
    let what = panic_message(info.payload());
    let message = match info.location() {
        Some(at) => format!("{what} (at {}:{})", at.file(), at.line()),
        None => what,
    };
    tracing::error!(target: "smolcandle", "panic: {message}");
    // `try_with`: a panic while this thread's locals are being destroyed has nowhere to go.
    let _ = LAST_PANIC.try_with(|last| {
        if let Ok(mut last) = last.try_borrow_mut() {
            *last = Some(message);
        }
    });
}
