//! Progress bars for long layer work, shown only on a terminal.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A byte-counting progress bar on stderr, or nothing. Cheap to clone and to update from
/// several threads.
#[derive(Clone)]
pub struct Progress(Option<ProgressBar>);

/// Below this much work a bar would only flicker.
const MIN_BYTES: u64 = 64 << 20;

impl Progress {
    pub fn none() -> Progress {
        Progress(None)
    }

    /// A bar for `total` bytes of work, when `enabled`, stderr is a terminal and the work is
    /// large enough to be worth watching.
    pub fn bytes(label: &str, total: u64, enabled: bool) -> Progress {
        if !enabled || total < MIN_BYTES || !std::io::stderr().is_terminal() {
            return Progress(None);
        }
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_message(label.to_owned());
        bar.enable_steady_tick(Duration::from_millis(200));
        Progress(Some(bar))
    }

    pub fn inc(&self, n: u64) {
        if let Some(b) = &self.0 {
            b.inc(n);
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.0 {
            b.finish_and_clear();
        }
    }
}
