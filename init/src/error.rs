//! One error type for the whole boot path: a sentence a person can act on.
//!
//! Every message names the thing that failed (a file, a device, an argument) and, where
//! there is one, the fix. At boot these strings go straight to the console. An error
//! from the kernel keeps its errno, so callers decide on the cause (a full disk, a busy
//! mount point), never on the text, which differs between C libraries.

use std::fmt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    message: String,
    errno: Option<Errno>,
    /// The file or device the failure is about, when there is one: callers (the
    /// builder's `--json`, tests) read it without parsing the sentence.
    path: Option<PathBuf>,
}

pub type Result<T> = std::result::Result<T, Error>;

/// A failure the kernel reported: its text, and its errno where it has one.
pub trait OsCause: fmt::Display {
    fn errno(&self) -> Option<Errno>;
}

impl OsCause for Errno {
    fn errno(&self) -> Option<Errno> {
        Some(*self)
    }
}

impl OsCause for std::io::Error {
    fn errno(&self) -> Option<Errno> {
        self.raw_os_error().map(Errno::from_raw)
    }
}

impl Error {
    pub fn new(msg: impl Into<String>) -> Self {
        Error {
            message: msg.into(),
            errno: None,
            path: None,
        }
    }

    /// A failure the kernel reported while doing `what` (a sentence), its errno kept.
    pub fn os(what: impl fmt::Display, err: impl OsCause) -> Self {
        Error {
            message: format!("{what}: {err}"),
            errno: err.errno(),
            path: None,
        }
    }

    /// An I/O failure on `path` while doing `what`.
    pub fn io(what: &str, path: impl AsRef<Path>, err: impl OsCause) -> Self {
        let path = path.as_ref();
        Error {
            message: format!("{what} {}: {err}", path.display()),
            errno: err.errno(),
            path: Some(path.to_path_buf()),
        }
    }

    /// Names the file or device a composed message is about.
    pub fn with_path(self, path: impl Into<PathBuf>) -> Self {
        Error {
            path: Some(path.into()),
            ..self
        }
    }

    /// The file or device the failure is about, if one was named.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Records the kernel's reason behind a message composed by the caller.
    pub fn with_errno(self, errno: Option<Errno>) -> Self {
        Error { errno, ..self }
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    /// The kernel's reason, if the kernel gave one.
    pub fn errno(&self) -> Option<Errno> {
        self.errno
    }

    /// Prefix the message with the step that was being attempted.
    pub fn context(self, what: impl fmt::Display) -> Self {
        Error {
            message: format!("{what}: {}", self.message),
            ..self
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

/// A sentence composed by the caller (argument checks, the builder's own findings).
impl From<String> for Error {
    fn from(message: String) -> Self {
        Error::new(message)
    }
}

impl From<&str> for Error {
    fn from(message: &str) -> Self {
        Error::new(message)
    }
}

/// `Result::context` for our own results.
pub trait Context<T> {
    fn context(self, what: impl fmt::Display) -> Result<T>;
}

impl<T> Context<T> for Result<T> {
    fn context(self, what: impl fmt::Display) -> Result<T> {
        self.map_err(|e| e.context(what))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_errno_survives_context() {
        let e = Error::io(
            "cannot write",
            Path::new("/x"),
            std::io::Error::from_raw_os_error(nix::libc::ENOSPC),
        )
        .context("filling");
        assert_eq!(e.errno(), Some(Errno::ENOSPC));
        assert_eq!(e.path(), Some(Path::new("/x")));
        assert!(e.message().starts_with("filling: cannot write /x: "), "{e}");
        assert_eq!(Error::new("plain").errno(), None);
    }
}
