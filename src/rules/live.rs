//! [`Live`]: a compiled policy that a configuration reload replaces while requests read it.
//!
//! Why not a lock or a guard: the degraded-mode code borrows from the rules it consults
//! (`FailOpen::decide` hands back references into them), and the hot path must not take a
//! lock. A published value is therefore never freed: `Live` hands out `&'static`
//! references, and a reload that changes the rules leaks the previous ones (a few KB of
//! compiled globs and replies). Reloads that change nothing do not publish, so only an
//! operator's real changes cost memory.
//!
//! Since nothing published is freed, the current value is a plain atomic pointer: reading
//! it is one load, where an `ArcSwap` guard (taken on every cacheable read) cost more than
//! the policy check it guarded.

use std::fmt;
use std::sync::atomic::{AtomicPtr, Ordering};

pub struct Live<T: 'static> {
    /// Always a value leaked by `new` or `replace`: valid for the rest of the process.
    current: AtomicPtr<T>,
}

impl<T: Send + Sync + 'static> Live<T> {
    pub fn new(value: T) -> Live<T> {
        Live {
            current: AtomicPtr::new(Box::leak(Box::new(value))),
        }
    }

    /// Publishes `value`: requests that start from now on see it.
    pub fn replace(&self, value: T) {
        self.current
            .store(Box::leak(Box::new(value)), Ordering::Release);
    }

    pub fn get(&self) -> &'static T {
        // SAFETY: every pointer stored comes from `Box::leak` and is never freed.
        unsafe { &*self.current.load(Ordering::Acquire) }
    }
}

impl<T: Send + Sync + 'static> std::ops::Deref for Live<T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.get()
    }
}

impl<T: fmt::Debug + Send + Sync + 'static> fmt::Debug for Live<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.get().fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::Live;

    #[test]
    fn readers_keep_what_they_borrowed_and_new_reads_see_the_replacement() {
        let live = Live::new(String::from("old"));
        let borrowed: &str = &live;
        live.replace(String::from("new"));
        assert_eq!(borrowed, "old");
        assert_eq!(&*live, "new");
    }
}
