//! One error type for the whole boot path: a sentence a person can act on.
//!
//! Every message names the thing that failed (a file, a device, an argument) and, where
//! there is one, the fix. At boot these strings go straight to the console.

use std::fmt;
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(String);

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn new(msg: impl Into<String>) -> Self {
        Error(msg.into())
    }

    /// An I/O failure on `path` while doing `what`.
    pub fn io(what: &str, path: &Path, err: impl fmt::Display) -> Self {
        Error(format!("{what} {}: {err}", path.display()))
    }

    pub fn message(&self) -> &str {
        &self.0
    }

    /// Prefix the message with the step that was being attempted.
    pub fn context(self, what: impl fmt::Display) -> Self {
        Error(format!("{what}: {}", self.0))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

/// `Result::context` for our own results.
pub trait Context<T> {
    fn context(self, what: impl fmt::Display) -> Result<T>;
}

impl<T> Context<T> for Result<T> {
    fn context(self, what: impl fmt::Display) -> Result<T> {
        self.map_err(|e| e.context(what))
    }
}
