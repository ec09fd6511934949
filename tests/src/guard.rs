//! Cleanup that runs on drop, so a failing (panicking) test still removes
//! what it installed.

/// Runs its closure once, when dropped. Errors inside the closure should be
/// printed, not panicked on (a panic while unwinding aborts the test binary).
#[must_use = "the cleanup runs when the guard is dropped; bind it to a variable"]
pub struct Defer<'a>(Option<Box<dyn FnOnce() + 'a>>);

impl<'a> Defer<'a> {
    pub fn new(cleanup: impl FnOnce() + 'a) -> Self {
        Defer(Some(Box::new(cleanup)))
    }

    /// Drop the guard without running the cleanup.
    pub fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for Defer<'_> {
    fn drop(&mut self) {
        if let Some(cleanup) = self.0.take() {
            cleanup();
        }
    }
}

/// Shorthand for [`Defer::new`].
pub fn defer<'a>(cleanup: impl FnOnce() + 'a) -> Defer<'a> {
    Defer::new(cleanup)
}
