//! Telling someone that a thread is about to wait for a store lock.
//!
//! The pager's scanner runs at idle priority and takes store locks. Preempted while it holds
//! one on a busy host, it could keep a fault waiting for as long as the scheduler leaves an
//! idle thread off the CPU. A fault that cannot take a lock at once calls the hook first
//! (the pager's lifts the scanner to the default class), then waits.

use std::sync::{Arc, OnceLock};

use parking_lot::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Called by a thread that is about to wait for a lock another thread holds.
pub type ContentionHook = Arc<dyn Fn() + Send + Sync>;

/// The store's hook, shared with its similarity index; set at most once.
#[derive(Clone, Default)]
pub(crate) struct Waits(Arc<OnceLock<ContentionHook>>);

impl std::fmt::Debug for Waits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Waits")
            .field(&self.0.get().is_some())
            .finish()
    }
}

impl Waits {
    /// Sets the hook; false if one was set already.
    pub(crate) fn set(&self, hook: ContentionHook) -> bool {
        self.0.set(hook).is_ok()
    }

    fn waiting(&self) {
        if let Some(h) = self.0.get() {
            h();
        }
    }

    /// `lock.read()`, calling the hook first if it would wait.
    pub(crate) fn read<'a, T>(&self, lock: &'a RwLock<T>) -> RwLockReadGuard<'a, T> {
        lock.try_read().unwrap_or_else(|| {
            self.waiting();
            lock.read()
        })
    }

    /// `lock.write()`, calling the hook first if it would wait.
    pub(crate) fn write<'a, T>(&self, lock: &'a RwLock<T>) -> RwLockWriteGuard<'a, T> {
        lock.try_write().unwrap_or_else(|| {
            self.waiting();
            lock.write()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn a_thread_about_to_wait_calls_the_hook_first_and_no_one_else_does() {
        let waits = Waits::default();
        let calls = Arc::new(AtomicUsize::new(0));
        let c = Arc::clone(&calls);
        assert!(waits.set(Arc::new(move || {
            c.fetch_add(1, Ordering::SeqCst);
        })));
        assert!(!waits.set(Arc::new(|| {})), "set once");
        let lock = RwLock::new(0u32);
        // Free: no call.
        drop(waits.read(&lock));
        drop(waits.write(&lock));
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        // Held for writing: a reader calls the hook, then waits until the writer lets go.
        let mut held = lock.write();
        std::thread::scope(|s| {
            let reader = s.spawn(|| *waits.read(&lock));
            while calls.load(Ordering::SeqCst) == 0 {
                std::thread::yield_now();
            }
            *held = 7;
            drop(held);
            assert_eq!(reader.join().unwrap(), 7);
        });
        // Held for reading: a writer calls it too.
        let r = lock.read();
        std::thread::scope(|s| {
            let writer = s.spawn(|| *waits.write(&lock) = 8);
            while calls.load(Ordering::SeqCst) == 1 {
                std::thread::yield_now();
            }
            drop(r);
            writer.join().unwrap();
        });
        assert_eq!((*lock.read(), calls.load(Ordering::SeqCst)), (8, 2));
    }
}
