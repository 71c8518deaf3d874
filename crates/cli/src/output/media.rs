//! Output of `send-file` and `download`: the progress bar (human mode only) and the results.
//! A media message's key never appears in any output.

use std::sync::Mutex;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{Value, json};
use tern_client::{DownloadedFile, MediaRef, Phase, Progress, SentMessage, human_size};

use super::Printer;

/// The media fields of a message for JSON output (without the key).
pub fn media_json(m: &MediaRef) -> Value {
    json!({
        "id": m.id, "file_name": m.file_name, "mime_type": m.mime_type, "size": m.size,
        "encrypted_size": m.encrypted_size, "width": m.width, "height": m.height,
        "caption": m.caption, "thumbnail_bytes": m.thumbnail.len(),
    })
}

/// A progress bar on stderr that follows the phases of a transfer. Hidden with `--json` and
/// when stderr is not a terminal.
pub struct Bar {
    bar: ProgressBar,
    phase: Mutex<Option<Phase>>,
}

impl Bar {
    pub fn update(&self, p: Progress) {
        let mut phase = self.phase.lock().unwrap_or_else(|e| e.into_inner());
        let changed = *phase != Some(p.phase);
        // Length and position first: the bar may be drawn at any moment in between.
        self.bar.set_length(p.total);
        self.bar.set_position(p.done);
        if changed {
            *phase = Some(p.phase);
            self.bar.reset_elapsed();
            self.bar.reset_eta();
            self.bar.set_style(style(p.phase));
            self.bar.set_message(p.phase.as_str());
        }
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

fn style(phase: Phase) -> ProgressStyle {
    let template = match phase {
        Phase::Sending => "{msg:>11} {spinner} waiting for the server's tick",
        _ => "{msg:>11} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
    };
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

impl Printer {
    /// A progress bar for a transfer: drawn in human mode, hidden with `--json`.
    pub fn bar(&self) -> Bar {
        let bar = if self.json {
            ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden())
        } else {
            let b = ProgressBar::new(0);
            b.enable_steady_tick(Duration::from_millis(200));
            b
        };
        Bar {
            bar,
            phase: Mutex::new(None),
        }
    }

    /// `send-file` succeeded: the message's tick and what it carries.
    pub fn file_sent(&self, s: &SentMessage, media: Option<&MediaRef>) {
        if self.json {
            let mut v = super::sent_json(s);
            if let Some(m) = media {
                v["media"] = media_json(m);
            }
            self.line(&v);
        } else {
            let what = media.map_or_else(String::new, |m| {
                format!(" {} ({})", m.file_name, human_size(m.size))
            });
            self.text(&super::sent_line(s, &what));
        }
    }

    /// `download` succeeded.
    pub fn downloaded(&self, d: &DownloadedFile) {
        if self.json {
            self.line(&json!({
                "type": "downloaded", "path": d.path, "size": d.size, "media_id": d.media_id,
                "mime_type": d.mime_type, "file_name": d.file_name,
            }));
        } else {
            self.text(&format!(
                "saved {} ({}, {}), verified",
                d.path.display(),
                human_size(d.size),
                if d.mime_type.is_empty() {
                    "application/octet-stream"
                } else {
                    &d.mime_type
                }
            ));
        }
    }
}
