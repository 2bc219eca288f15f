//! Error type shared by the library. Every user-facing failure names the file or the limit involved.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
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
        Error::Io { path: path.into(), source }
    }
    pub fn image(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Image { path: path.into(), msg: msg.into() }
    }
    pub fn weights(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Weights { path: path.into(), msg: msg.into() }
    }
}
