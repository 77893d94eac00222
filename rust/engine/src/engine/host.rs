//! What the engine asks of the machine it runs on: the device, the CPU thread count, the
//! memory available, and handing freed memory back.

use std::sync::OnceLock;

use candle_core::Device;

use crate::error::{Error, Result};

pub fn parse_device(spec: &str) -> Result<Device> {
    let spec = spec.trim();
    if spec.is_empty() || spec == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match spec {
        "cuda" => 0,
        _ => match spec.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => n,
            _ => {
                return Err(Error::Device(format!(
                    "{spec:?} is not a device (use \"cpu\", \"cuda\" or \"cuda:N\")"
                )))
            }
        },
    };
    if !candle_core::utils::cuda_is_available() {
        return Err(Error::Device(format!(
            "{spec:?}: this build of smolcandle has no CUDA support (build with --features cuda)"
        )));
    }
    Device::new_cuda(ordinal).map_err(|e| Error::Device(format!("{spec:?}: {e}")))
}

/// Bytes of memory the system can give without swapping (Linux's `MemAvailable`); 4 GiB
/// where that cannot be read.
pub(super) fn available_memory() -> usize {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
            let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
            kib.checked_mul(1024)
        })
        .unwrap_or(4 << 30)
}

/// Candle sizes its CPU thread pool once per process, from the environment, on first use.
pub(super) fn configure_threads(n_threads: Option<usize>) -> Result<()> {
    static CHOSEN: OnceLock<Option<usize>> = OnceLock::new();
    if n_threads == Some(0) {
        return Err(Error::invalid("n_threads", "must be at least 1"));
    }
    let chosen = *CHOSEN.get_or_init(|| {
        if let Some(n) = n_threads {
            for var in ["CANDLE_NUM_THREADS", "RAYON_NUM_THREADS"] {
                // Set before any thread pool exists, from the loading thread.
                std::env::set_var(var, n.to_string());
            }
        }
        n_threads
    });
    if n_threads.is_some() && n_threads != chosen {
        tracing::warn!(
            requested = n_threads,
            in_use = chosen,
            "the CPU thread count is fixed by the first model loaded in this process"
        );
    }
    Ok(())
}

/// Hands the heap's free pages back to the system. After load, they are the file's metadata as
/// Candle's reader parsed it (on SmolLM2's vocabulary about 100,000 strings), freed in between
/// allocations that live on, which glibc would otherwise keep resident: 3 MB on SmolLM2. When
/// the engine goes idle, they are the finished sequences' key/value caches and buffers.
pub(crate) fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        unsafe extern "C" {
            fn malloc_trim(pad: usize) -> std::ffi::c_int;
        }
        // SAFETY: glibc's malloc_trim takes any padding and releases only free memory.
        unsafe {
            malloc_trim(0);
        }
    }
}
