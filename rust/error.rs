//! The library's error type: every fallible kernel returns `Result<T, Error>`, and the Python
//! layer maps each kind onto the matching Python exception.

use std::fmt;

/// What went wrong, classified the way Python callers expect it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// A value is out of range or inconsistent with another (`ValueError`).
    Value(String),
    /// An argument has the wrong kind, dtype or layout (`TypeError`).
    Type(String),
    /// The operation failed for a reason outside the caller's arguments (`RuntimeError`).
    Runtime(String),
    /// Reading or writing a file failed (`OSError`).
    Io(String),
}

impl Error {
    pub fn value(msg: impl Into<String>) -> Self {
        Error::Value(msg.into())
    }
    pub fn type_(msg: impl Into<String>) -> Self {
        Error::Type(msg.into())
    }
    pub fn runtime(msg: impl Into<String>) -> Self {
        Error::Runtime(msg.into())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Value(m) | Error::Type(m) | Error::Runtime(m) | Error::Io(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Error {}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, Error>;
