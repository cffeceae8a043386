//! The terminal side of the libraries' [`Observer`]: messages go to stderr, tasks are drawn as
//! indicatif progress bars (the innermost task of a nested set is the one drawn).

use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressStyle};
use r2m_core::Observer;

/// Progress bars on stderr.
#[derive(Default)]
pub struct Terminal {
    /// Open tasks, outermost first.
    bars: Mutex<Vec<ProgressBar>>,
}

impl Terminal {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Observer for Terminal {
    fn message(&self, text: &str) {
        match self.bars.lock().expect("bars").last() {
            Some(pb) => pb.println(text),
            None => eprintln!("{text}"),
        }
    }

    fn begin(&self, what: &str, total: u64, done: u64) {
        let pb = ProgressBar::new(total);
        let template = format!(
            "{} {{pos}}/{{len}} [{{elapsed_precise}}<{{eta_precise}}] {{wide_bar}} {{msg}}",
            what.replace('{', "{{").replace('}', "}}")
        );
        pb.set_style(ProgressStyle::with_template(&template).expect("template"));
        pb.set_position(done);
        self.bars.lock().expect("bars").push(pb);
    }

    fn advance(&self, n: u64, status: &str) {
        if let Some(pb) = self.bars.lock().expect("bars").last() {
            if !status.is_empty() {
                pb.set_message(status.to_string());
            }
            pb.inc(n);
        }
    }

    fn end(&self) {
        if let Some(pb) = self.bars.lock().expect("bars").pop() {
            pb.finish_and_clear();
        }
    }
}
