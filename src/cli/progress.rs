//! Long work shown to a person: on a terminal, a progress bar (installs per
//! step, image builds per layer); on a pipe, plain status lines on stderr,
//! so an MCP client's log shows why a start is slow or failed.
//!
//! Owns only presentation; what the steps are is decided by `acquire` and
//! the image build. Never writes to stdout (in `meshbox run` it is the MCP
//! stream).

use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::acquire::{Progress, ProgressSink, Update};

/// Where the output goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// A bar redrawn in place.
    Terminal,
    /// One line per update.
    Lines,
}

impl Target {
    /// A bar when stderr is a terminal, else lines.
    pub fn stderr() -> Self {
        if std::io::stderr().is_terminal() {
            Target::Terminal
        } else {
            Target::Lines
        }
    }
}

fn new_bar(len: u64, draw: ProgressDrawTarget) -> ProgressBar {
    let b = ProgressBar::with_draw_target(Some(len), draw);
    b.set_style(
        ProgressStyle::with_template("{spinner} [{pos}/{len}] {wide_msg} {elapsed:>4}")
            .expect("a valid template"),
    );
    b.enable_steady_tick(Duration::from_millis(120));
    b
}

/// Install updates on stderr: a bar per install on a terminal, else lines
/// prefixed with `prefix` (e.g. `meshbox: `).
pub fn install_sink(target: Target, prefix: &'static str) -> Progress {
    Arc::new(InstallSink {
        target,
        prefix,
        bar: Mutex::new(None),
        draw: ProgressDrawTarget::stderr,
    })
}

struct InstallSink {
    target: Target,
    prefix: &'static str,
    bar: Mutex<Option<ProgressBar>>,
    draw: fn() -> ProgressDrawTarget,
}

impl InstallSink {
    fn line(&self, text: &str) {
        eprintln!("{}{text}", self.prefix);
    }
}

impl ProgressSink for InstallSink {
    fn update(&self, u: Update<'_>) {
        if self.target == Target::Lines {
            match u {
                Update::Step { n, total, text } if total > 1 => {
                    self.line(&format!("[{n}/{total}] {text}"))
                }
                other => self.line(other.text()),
            }
            return;
        }
        let mut bar = self.bar.lock().expect("progress poisoned");
        match u {
            Update::Step { n, total, text } => {
                let b = bar.get_or_insert_with(|| new_bar(u64::from(total), (self.draw)()));
                b.set_length(u64::from(total.max(n)));
                b.set_position(u64::from(n.saturating_sub(1)));
                b.set_message(text.to_owned());
            }
            // A step's end: the bar leaves, the line stays.
            Update::Line(text) => {
                if let Some(b) = bar.take() {
                    b.finish_and_clear();
                }
                self.line(text);
            }
        }
    }
}

impl Drop for InstallSink {
    fn drop(&mut self) {
        if let Some(b) = self.bar.lock().expect("progress poisoned").take() {
            b.finish_and_clear();
        }
    }
}

/// An image build's output lines: a bar over its `Step N/M` layers on a
/// terminal, every line on a pipe.
pub struct BuildProgress {
    target: Target,
    bar: Option<ProgressBar>,
    draw: fn() -> ProgressDrawTarget,
}

/// `Step 3/12 : RUN …` → (3, 12, `RUN …`).
fn build_step(line: &str) -> Option<(u64, u64, &str)> {
    let rest = line.strip_prefix("Step ")?;
    let (counts, what) = rest.split_once(" : ").unwrap_or((rest, ""));
    let (n, m) = counts.split_once('/')?;
    Some((n.trim().parse().ok()?, m.trim().parse().ok()?, what))
}

impl BuildProgress {
    pub fn new(target: Target) -> Self {
        BuildProgress {
            target,
            bar: None,
            draw: ProgressDrawTarget::stderr,
        }
    }

    /// One line of the build's output.
    pub fn line(&mut self, line: &str) {
        if self.target == Target::Lines {
            eprintln!("  {line}");
            return;
        }
        match build_step(line) {
            Some((n, m, what)) => {
                let b = self.bar.get_or_insert_with(|| new_bar(m, (self.draw)()));
                b.set_length(m.max(n));
                b.set_position(n.saturating_sub(1));
                b.set_message(what.to_owned());
            }
            // A layer's own output: its latest line, in place of the step's.
            None => {
                if let Some(b) = &self.bar {
                    b.set_message(line.chars().take(120).collect::<String>());
                }
            }
        }
    }

    /// The build is over (done or failed): the bar leaves the screen.
    pub fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

impl Drop for BuildProgress {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_steps_are_read_from_the_classic_builder_output() {
        assert_eq!(
            build_step("Step 3/12 : RUN apt-get update"),
            Some((3, 12, "RUN apt-get update"))
        );
        assert_eq!(build_step("Step 1/2"), Some((1, 2, "")));
        assert_eq!(build_step(" ---> Running in 0a1b"), None);
        assert_eq!(build_step("Step x/2 : FROM a"), None);
    }

    #[test]
    fn a_build_bar_follows_its_layers() {
        let mut p = BuildProgress {
            target: Target::Terminal,
            bar: None,
            draw: ProgressDrawTarget::hidden,
        };
        let at = |p: &BuildProgress| p.bar.as_ref().map(|b| (b.position(), b.length()));
        p.line("Step 1/4 : FROM debian");
        assert_eq!(at(&p), Some((0, Some(4))));
        p.line(" ---> 1234");
        assert_eq!(p.bar.as_ref().unwrap().message(), " ---> 1234");
        p.line("Step 3/4 : RUN make");
        assert_eq!(at(&p), Some((2, Some(4))));
        p.finish();
        assert_eq!(at(&p), None);
    }

    #[test]
    fn an_install_bar_follows_its_steps_and_ends_with_the_step() {
        let sink = InstallSink {
            target: Target::Terminal,
            prefix: "",
            bar: Mutex::new(None),
            draw: ProgressDrawTarget::hidden,
        };
        let at = |s: &InstallSink| {
            s.bar
                .lock()
                .unwrap()
                .as_ref()
                .map(|b| (b.position(), b.length(), b.message()))
        };
        sink.update(Update::Step {
            n: 1,
            total: 2,
            text: "installing dependencies",
        });
        assert_eq!(
            at(&sink),
            Some((0, Some(2), "installing dependencies".to_owned()))
        );
        sink.update(Update::Step {
            n: 2,
            total: 2,
            text: "building",
        });
        assert_eq!(at(&sink), Some((1, Some(2), "building".to_owned())));
        sink.update(Update::Line("installed"));
        assert_eq!(at(&sink), None, "a step's end line ends the bar");
    }
}
