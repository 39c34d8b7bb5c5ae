//! One rayon pool for the whole library.
//!
//! Sized by `SLIMFORGE_NUM_THREADS` (default: all cores) or by `set_num_threads`. The pool is
//! tagged with the id of the process that built it: threads do not survive `fork`, so a child
//! process (e.g. a `multiprocessing` worker) that finds a pool built by its parent builds a fresh
//! one instead of waiting forever on threads that no longer exist.

use std::sync::{Arc, Mutex};

use rayon::{ThreadPool, ThreadPoolBuilder};

struct Pool {
    pid: u32,
    threads: usize,
    pool: Arc<ThreadPool>,
}

static POOL: Mutex<Option<Pool>> = Mutex::new(None);
static REQUESTED: Mutex<Option<usize>> = Mutex::new(None);

fn default_threads() -> usize {
    if let Some(n) = REQUESTED.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
        return *n;
    }
    std::env::var("SLIMFORGE_NUM_THREADS")
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// The library's pool, built on first use (and again in a forked child).
pub fn pool() -> Arc<ThreadPool> {
    let mut guard = POOL.lock().unwrap_or_else(|e| e.into_inner());
    let pid = std::process::id();
    if let Some(p) = guard.as_ref() {
        if p.pid == pid {
            return Arc::clone(&p.pool);
        }
        // Inherited across fork: its worker threads are gone. Dropping it would try to join them,
        // so it is leaked on purpose.
        if let Some(old) = guard.take() {
            std::mem::forget(old);
        }
    }
    let threads = default_threads();
    let built = ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("slimforge-{i}"))
        .build()
        .expect("failed to start the slimforge thread pool");
    let pool = Arc::new(built);
    *guard = Some(Pool {
        pid,
        threads,
        pool: Arc::clone(&pool),
    });
    pool
}

/// Run `f` inside the library's pool (so nested `par_iter` calls use it).
pub fn install<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    pool().install(f)
}

/// Number of threads the pool has (or will have when first used).
pub fn num_threads() -> usize {
    let guard = POOL.lock().unwrap_or_else(|e| e.into_inner());
    match guard.as_ref() {
        Some(p) if p.pid == std::process::id() => p.threads,
        _ => default_threads(),
    }
}

/// Resize the pool; work already running finishes on the old one.
pub fn set_num_threads(n: usize) -> crate::error::Result<()> {
    if n == 0 {
        return Err(crate::error::Error::value(
            "number of threads must be at least 1",
        ));
    }
    *REQUESTED.lock().unwrap_or_else(|e| e.into_inner()) = Some(n);
    let mut guard = POOL.lock().unwrap_or_else(|e| e.into_inner());
    if guard
        .as_ref()
        .is_some_and(|p| p.threads != n || p.pid != std::process::id())
    {
        if let Some(old) = guard.take() {
            if old.pid != std::process::id() {
                std::mem::forget(old);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    #[test]
    fn pool_runs_parallel_work() {
        let s: u64 = install(|| (0..10_000u64).into_par_iter().sum());
        assert_eq!(s, 10_000 * 9_999 / 2);
        assert!(num_threads() >= 1);
    }

    #[test]
    fn zero_threads_is_an_error() {
        assert!(set_num_threads(0).is_err());
    }
}
