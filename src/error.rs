//! The library's error type.

use std::path::PathBuf;

/// Everything that can go wrong in the method crate. Each variant names the file, line or key
/// at fault so the CLI can print it as is.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O failure on `path` (the reason is in the message, not a separate source, so
    /// error chains print it once).
    #[error("{path}: {reason}")]
    Io { path: PathBuf, reason: std::io::Error },
    #[error("{path}:{line}: {msg}")]
    DataRow { path: PathBuf, line: usize, msg: String },
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
    #[error("config key `{key}`: {msg}")]
    Config { key: String, msg: String },
    #[error("asset `{asset}`: {msg}")]
    Asset { asset: String, msg: String },
    #[error("model: {0}")]
    Model(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("task: {0}")]
    Task(String),
    #[error("optimizer: {0}")]
    Optimizer(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), reason: source }
    }
    pub fn file(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::File { path: path.into(), msg: msg.into() }
    }
    pub fn row(path: impl Into<PathBuf>, line: usize, msg: impl Into<String>) -> Self {
        Error::DataRow { path: path.into(), line, msg: msg.into() }
    }
    pub fn config(key: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Config { key: key.into(), msg: msg.into() }
    }
}
