//! A mutex whose poisoning we ride through: the data behind a lock that a panicking thread
//! held is still consistent for every use here (counters, maps of handles, state that the next
//! commit rewrites), so a panic elsewhere must not take the service down with it.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// [`Mutex::lock`] without the poisoning.
pub trait Locked<T: ?Sized> {
    fn locked(&self) -> MutexGuard<'_, T>;
}

impl<T: ?Sized> Locked<T> for Mutex<T> {
    fn locked(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
