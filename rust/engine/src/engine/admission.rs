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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testing::{letters, received, request, Harness, BYTES_PER_POSITION};

    const PLENTY: usize = 1 << 30;

    #[test]
    fn limits_of_zero_are_refused_by_name() {
        for (options, name) in [
            (
                LoadOptions {
                    max_active: Some(0),
                    ..Default::default()
                },
                "max_active",
            ),
            (
                LoadOptions {
                    max_queued: Some(0),
                    kv_budget_bytes: Some(1),
                    ..Default::default()
                },
                "max_queued",
            ),
            (
                LoadOptions {
                    kv_budget_bytes: Some(0),
                    ..Default::default()
                },
                "kv_budget_bytes",
            ),
        ] {
            let e = Admission::new(&options).err().expect("refused").to_string();
            assert!(e.contains(name) && e.contains("must be at least 1"), "{e}");
        }
    }

    #[test]
    fn past_the_queue_bound_a_request_is_refused_as_busy() {
        let mut h = Harness::new(1, 2, PLENTY);
        let _a = h.submit(request(letters(0, 3), 2, "a")).unwrap();
        let _b = h.submit(request(letters(5, 3), 2, "a")).unwrap();
        let e = h.submit(request(letters(9, 3), 2, "a")).err().unwrap();
        assert!(matches!(e, Error::Busy { queued: 2 }), "{e}");
        let stats = h.admission.stats();
        assert_eq!((stats.queued, stats.refused), (2, 1));
        // Once one starts, its place in the queue is free again.
        assert!(h.turn());
        assert_eq!(h.admission.stats().queued, 1);
        let _c = h.submit(request(letters(9, 3), 2, "a")).unwrap();
        assert_eq!(h.admission.stats().queued, 2);
    }

    #[test]
    fn at_most_max_active_run_and_the_others_wait_in_place() {
        let mut h = Harness::new(2, 8, PLENTY);
        let streams: Vec<_> = (0..3)
            .map(|i| h.submit(request(letters(3 * i, 3), 2, "a")).unwrap())
            .collect();
        assert_eq!(streams[2].place().get(), 3);
        assert!(h.turn());
        let prompts: Vec<_> = h.last_step().into_iter().map(|f| f.tokens).collect();
        assert_eq!(prompts, vec![letters(0, 3), letters(3, 3)]);
        assert_eq!(streams[2].place().get(), 1);
        let stats = h.admission.stats();
        assert_eq!((stats.active, stats.queued), (2, 1));
        // The first two generate their second token and end; the third starts after them.
        assert!(h.turn());
        assert_eq!(h.last_step().len(), 2);
        assert!(received(&streams[0]).1.is_some());
        assert!(h.turn());
        assert_eq!(streams[2].place().get(), 0);
        let prompts: Vec<_> = h.last_step().into_iter().map(|f| f.tokens).collect();
        assert_eq!(prompts, vec![letters(6, 3)]);
    }

    /// Key/value bytes a request reserves: its prompt and answer, and a quarter more.
    fn reserve(n_prompt: usize, max_tokens: usize) -> usize {
        let positions = n_prompt + max_tokens;
        (positions + positions / 4) * BYTES_PER_POSITION
    }

    #[test]
    fn a_request_that_does_not_fit_the_kv_budget_waits() {
        let one = reserve(4, 4);
        let mut h = Harness::new(4, 8, one + one / 2);
        let a = h.submit(request(letters(0, 4), 4, "a")).unwrap();
        let b = h.submit(request(letters(10, 4), 4, "b")).unwrap();
        assert!(h.turn());
        assert_eq!(h.last_step().len(), 1, "a place is free, the budget is not");
        assert_eq!(b.place().get(), 1);
        assert_eq!(h.admission.stats().kv_reserved_bytes, one);
        for _ in 0..3 {
            assert!(h.turn());
        }
        assert!(received(&a).1.is_some());
        assert!(h.turn());
        assert_eq!(b.place().get(), 0);
        assert_eq!(h.last_step()[0].tokens, letters(10, 4));
    }

    #[test]
    fn a_request_larger_than_the_budget_runs_alone() {
        let mut h = Harness::new(4, 8, reserve(4, 4) / 2);
        let _a = h.submit(request(letters(0, 4), 4, "a")).unwrap();
        let b = h.submit(request(letters(10, 4), 4, "b")).unwrap();
        assert!(h.turn());
        assert_eq!(h.last_step()[0].tokens, letters(0, 4));
        assert_eq!(h.last_step().len(), 1);
        assert_eq!(b.place().get(), 1);
    }

    /// The first token each step fed to a sequence that started in it: the prompts in the
    /// order they started.
    fn started(h: &Harness) -> Vec<u32> {
        h.steps()
            .iter()
            .flatten()
            .filter(|f| f.pos == 0)
            .map(|f| f.tokens[0])
            .collect()
    }

    #[test]
    fn the_client_with_fewest_running_starts_next() {
        let mut h = Harness::new(2, 8, PLENTY);
        let a: Vec<_> = [0, 4, 8]
            .map(|first| h.submit(request(letters(first, 3), 5, "a")).unwrap())
            .into();
        let b = h.submit(request(letters(12, 3), 5, "b")).unwrap();
        assert!(h.turn());
        // "b" came last but has nothing running.
        assert_eq!(started(&h), vec![0, 12]);
        assert_eq!(b.place().get(), 0);
        assert_eq!((a[1].place().get(), a[2].place().get()), (1, 2));
    }

    #[test]
    fn among_equals_the_client_started_longest_ago_goes_first() {
        let mut h = Harness::new(1, 8, PLENTY);
        let _a1 = h.submit(request(letters(0, 3), 1, "a")).unwrap();
        let _a2 = h.submit(request(letters(4, 3), 1, "a")).unwrap();
        let _b1 = h.submit(request(letters(8, 3), 1, "b")).unwrap();
        let _a3 = h.submit(request(letters(16, 3), 1, "a")).unwrap();
        let _c1 = h.submit(request(letters(20, 3), 1, "c")).unwrap();
        while h.turn() {}
        // Never started, "b" and "c" go before "a" starts again; then "a" has waited longest.
        assert_eq!(started(&h), vec![0, 8, 20, 4, 16]);
    }
}
