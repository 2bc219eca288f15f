//! Error type shared by the library. Every user-facing failure names the file or the limit involved.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The operating system's reason is part of the message and deliberately not also returned
    /// by `source()`: printers that append the cause chain (anyhow's `{:#}`) would say it twice
    /// ("Not a directory (os error 20): Not a directory (os error 20)").
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{path}: {msg}")]
    Image { path: PathBuf, msg: String },
    #[error("{path}: {msg}")]
    Weights { path: PathBuf, msg: String },
    #[error("configuration: {0}")]
    Config(String),
    #[error("no GPU adapter: {0}")]
    NoAdapter(String),
    #[error(
        "device limit exceeded: {what} needs {needed} but the device's {limit_name} is {limit}; {hint}"
    )]
    Limit {
        what: String,
        needed: u64,
        limit_name: &'static str,
        limit: u64,
        hint: String,
    },
    #[error("GPU error: {0}")]
    Gpu(String),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            err: source,
        }
    }
    pub fn image(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Image {
            path: path.into(),
            msg: msg.into(),
        }
    }
    pub fn weights(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Weights {
            path: path.into(),
            msg: msg.into(),
        }
    }
}

/// One line for a user: the error's message, then each cause in its chain that does not already
/// appear in what is written so far, joined with ": " (so a message that includes its cause, or a
/// context repeating its inner error, says each thing once); line breaks inside messages become
/// ": ", and a segment equal to the one before it is written once.
pub fn report(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = flatten(&e.to_string());
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = flatten(&c.to_string());
        if !text.is_empty() && !out.contains(&text) {
            if out.is_empty() {
                out = text;
            } else {
                out = format!("{out}: {text}");
            }
        }
        cause = c.source();
    }
    dedup_segments(&out)
}

/// Joins the lines of a message with ": ", dropping empty ones and wgpu's "Caused by:".
fn flatten(msg: &str) -> String {
    msg.lines()
        .map(|l| l.trim().trim_end_matches(':').trim_end())
        .filter(|l| !l.is_empty() && *l != "Caused by")
        .collect::<Vec<_>>()
        .join(": ")
}

/// "a: b: b: c" -> "a: b: c" (only neighbours: the same words in two places can mean two things).
fn dedup_segments(msg: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for p in msg.split(": ") {
        if parts.last() != Some(&p) {
            parts.push(p);
        }
    }
    parts.join(": ")
}
