//! Progress bars for long work (training steps, generation, evaluation). They draw on stderr and
//! are hidden when stderr is not a terminal (logs, CI) or when `RLHF_NO_PROGRESS` is set to
//! anything but "" or "0".

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

/// Whether progress bars are shown in this process.
pub fn progress_enabled() -> bool {
    let disabled = std::env::var_os("RLHF_NO_PROGRESS").is_some_and(|v| !v.is_empty() && v != "0");
    // Data parallelism: rank 0 alone shows progress.
    !disabled && std::io::stderr().is_terminal() && crate::dist::world().is_root()
}

/// A bar counting to `total`, labelled `label`: `label [00:01:23] ====>    120/500 (eta 4m) msg`.
/// Call `inc`, `set_position`, `set_message`, and `finish` (or `finish_and_clear`) on it.
pub fn progress(total: u64, label: &str) -> ProgressBar {
    if !progress_enabled() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    let style = ProgressStyle::with_template(
        "{prefix} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} ({per_sec}, eta {eta}) {msg}",
    )
    .expect("valid template")
    .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(label.to_string());
    bar
}

/// A spinner for work of unknown length.
pub fn spinner(label: &str) -> ProgressBar {
    if !progress_enabled() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {prefix} [{elapsed_precise}] {msg}")
            .expect("valid template"),
    );
    bar.set_prefix(label.to_string());
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_work_and_are_hidden_without_a_terminal() {
        // Under `cargo test` stderr is captured (not a terminal), so the bar is hidden; counting
        // still works.
        let bar = progress(10, "train");
        bar.inc(3);
        assert_eq!(bar.position(), 3);
        if !std::io::stderr().is_terminal() {
            assert!(bar.is_hidden());
        }
        bar.finish_and_clear();
        let s = spinner("loading");
        s.finish_and_clear();
    }
}
