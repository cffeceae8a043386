//! How long work reports progress without printing: library crates call an [`Observer`], and the
//! program that embeds them decides what reaches a terminal, a log or nothing ([`Silent`]).
//!
//! Work is reported as tasks: [`Observer::begin`] a task of `total` units, [`Observer::advance`]
//! it with a short status, [`Observer::end`] it. Tasks may nest (an RL run inside an experiment);
//! an observer that draws bars shows the innermost one. [`Observer::message`] is a line for the
//! user (a data report, a summary), never an error: errors are returned.

/// Receives progress and messages from library code. Every method defaults to doing nothing.
pub trait Observer: Sync {
    /// A line for the user, e.g. "1,312 records read, 3 skipped".
    fn message(&self, _text: &str) {}
    /// A task named `what` of `total` units begins, `done` of them already done (a resumed run).
    fn begin(&self, _what: &str, _total: u64, _done: u64) {}
    /// `n` more units of the innermost task are done; `status` describes the latest one (may be
    /// empty).
    fn advance(&self, _n: u64, _status: &str) {}
    /// The innermost task ended (finished, or stopped early).
    fn end(&self) {}
}

/// Drops everything: tests, benchmarks, and programs that want no output.
#[derive(Debug, Clone, Copy, Default)]
pub struct Silent;

impl Observer for Silent {}

/// A shared [`Silent`], for defaults.
pub static SILENT: Silent = Silent;

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// An observer that records what it was told.
    #[derive(Default)]
    struct Log(Mutex<Vec<String>>);

    impl Observer for Log {
        fn message(&self, text: &str) {
            self.0.lock().unwrap().push(format!("msg {text}"));
        }
        fn begin(&self, what: &str, total: u64, done: u64) {
            self.0
                .lock()
                .unwrap()
                .push(format!("begin {what} {done}/{total}"));
        }
        fn advance(&self, n: u64, status: &str) {
            self.0.lock().unwrap().push(format!("advance {n} {status}"));
        }
        fn end(&self) {
            self.0.lock().unwrap().push("end".into());
        }
    }

    fn work(obs: &dyn Observer) {
        obs.begin("steps", 2, 0);
        obs.advance(1, "a");
        obs.advance(1, "b");
        obs.end();
        obs.message("done");
    }

    #[test]
    fn observers_receive_tasks_in_order_and_silent_drops_them() {
        let log = Log::default();
        work(&log);
        assert_eq!(
            log.0.into_inner().unwrap(),
            [
                "begin steps 0/2",
                "advance 1 a",
                "advance 1 b",
                "end",
                "msg done"
            ]
        );
        work(&SILENT);
    }
}
