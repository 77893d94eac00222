//! Admission's limits and the counters shared between callers and the engine thread: at most
//! `max_active` sequences run, together within the key/value budget, and at most `max_queued`
//! wait; past that a request is refused with [`Error::Busy`]. Which waiting request starts
//! next is the scheduler's choice ([`super::scheduler`]).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use super::host::available_memory;
use super::request::LoadOptions;
use crate::error::{Error, Result};
use crate::limits::{default_kv_budget, default_max_active, QUEUED_PER_ACTIVE};

/// The scheduler's limits and where it stands against them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AdmissionStats {
    pub max_active: usize,
    pub max_queued: usize,
    pub kv_budget_bytes: usize,
    pub active: usize,
    pub queued: usize,
    /// Key/value bytes the active sequences have reserved.
    pub kv_reserved_bytes: usize,
    /// Requests refused because the queue was full.
    pub refused: u64,
}

/// The limits, and counters shared between the callers and the engine thread.
pub(super) struct Admission {
    pub(super) max_active: usize,
    pub(super) max_queued: usize,
    pub(super) kv_budget: usize,
    /// Submitted and not yet running (nor cancelled while waiting).
    pub(super) queued: AtomicUsize,
    pub(super) active: AtomicUsize,
    pub(super) reserved: AtomicUsize,
    refused: AtomicU64,
}

impl Admission {
    pub(super) fn new(options: &LoadOptions) -> Result<Self> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let max_active = options.max_active.unwrap_or(default_max_active(cores));
        let max_queued = options
            .max_queued
            .unwrap_or(max_active.saturating_mul(QUEUED_PER_ACTIVE));
        let kv_budget = options
            .kv_budget_bytes
            .unwrap_or_else(|| default_kv_budget(available_memory()));
        if max_active == 0 {
            return Err(Error::invalid("max_active", "must be at least 1"));
        }
        if kv_budget == 0 {
            return Err(Error::invalid("kv_budget_bytes", "must be at least 1"));
        }
        if max_queued == 0 {
            // Every request passes through the queue, if only until the next step.
            return Err(Error::invalid("max_queued", "must be at least 1"));
        }
        Ok(Self {
            max_active,
            max_queued,
            kv_budget,
            queued: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            reserved: AtomicUsize::new(0),
            refused: Default::default(),
        })
    }

    /// Takes a place in the queue, or says the queue is full.
    pub(super) fn enqueue(&self) -> Result<()> {
        self.queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                (q < self.max_queued).then_some(q + 1)
            })
            .map(drop)
            .map_err(|queued| {
                self.refused.fetch_add(1, Ordering::Relaxed);
                Error::Busy { queued }
            })
    }

    pub(super) fn stats(&self) -> AdmissionStats {
        AdmissionStats {
            max_active: self.max_active,
            max_queued: self.max_queued,
            kv_budget_bytes: self.kv_budget,
            active: self.active.load(Ordering::Relaxed),
            queued: self.queued.load(Ordering::Relaxed),
            kv_reserved_bytes: self.reserved.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
        }
    }
}
