//! What can go wrong with a store, each message naming the path and what to do about it.

use std::path::PathBuf;

/// An error of the snapshot store. Every message names the file or directory involved and,
/// where there is one, the fix.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// a file system call failed
    #[error("cannot {action} {}", path.display())]
    Io {
        /// what the store was doing ("read", "fsync", ...)
        action: &'static str,
        /// the file or directory
        path: PathBuf,
        /// the system's error
        #[source]
        source: std::io::Error,
    },
    /// the directory holds something other than a store
    #[error(
        "{} is not a snapshot store (a non-empty directory without a STORE file); give an empty or new directory",
        path.display()
    )]
    NotAStore {
        /// the directory
        path: PathBuf,
    },
    /// a file of a format version this code does not know
    #[error(
        "{} has format version {found}, newer than this memvisor reads (up to {supported}); upgrade memvisor to use this store",
        path.display()
    )]
    NewerVersion {
        /// the file
        path: PathBuf,
        /// its version
        found: u32,
        /// the newest version this code reads
        supported: u32,
    },
    /// a file's contents are damaged or inconsistent
    #[error(
        "{} is corrupt: {what}; run fsck on the store to list every problem, and remove the snapshots it names",
        path.display()
    )]
    Corrupt {
        /// the file
        path: PathBuf,
        /// what is wrong
        what: String,
        /// the decoder's complaint, if a decoder made it
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// another process (or thread) holds the store in a way that excludes this operation
    #[error(
        "store {} is busy: {what} runs (an advisory lock on its lock file); retry when it is done",
        path.display()
    )]
    Busy {
        /// the store directory
        path: PathBuf,
        /// what holds the store ("a garbage collection", "a snapshot writer or reader")
        what: &'static str,
    },
    /// a snapshot name outside the allowed alphabet
    #[error(
        "invalid snapshot name {name:?}: {why}; use 1 to 200 of A-Z a-z 0-9 . _ -, not starting with '.'"
    )]
    BadName {
        /// the name given
        name: String,
        /// which rule it breaks
        why: &'static str,
    },
    /// the name is in use
    #[error(
        "snapshot {name:?} already exists (or is being written) in {}; pick another name or remove it first",
        dir.display()
    )]
    NameTaken {
        /// the name
        name: String,
        /// the store directory
        dir: PathBuf,
    },
    /// no snapshot of that name
    #[error("no snapshot {name:?} in {}; `list` shows the snapshots it holds", dir.display())]
    NoSuchSnapshot {
        /// the name
        name: String,
        /// the store directory
        dir: PathBuf,
    },
    /// a RAM size the store cannot hold
    #[error(
        "RAM size {0} bytes is not a positive multiple of 4096 up to 4 TiB; give the guest's RAM size in whole pages"
    )]
    BadRamSize(u64),
    /// a page index past the end of guest RAM
    #[error(
        "page {index} is beyond the snapshot's {pages} pages; indexes count 4 KiB pages from 0"
    )]
    PageOutOfRange {
        /// the index given
        index: u64,
        /// pages in the snapshot
        pages: u64,
    },
    /// a page was put twice
    #[error("page {index} was already put into snapshot {name:?}; each page may be put once")]
    PageTwice {
        /// the snapshot
        name: String,
        /// the index
        index: u64,
    },
    /// the first-touch order names a page past the end of RAM
    #[error(
        "the first-touch order of snapshot {name:?} names page {index}, beyond its {pages} pages; give page indexes below the RAM size"
    )]
    BadOrder {
        /// the snapshot
        name: String,
        /// the bad entry
        index: u32,
        /// pages in the snapshot
        pages: u64,
    },
    /// an earlier write of this snapshot failed, so it cannot be finished
    #[error(
        "snapshot {name:?} cannot be finished: an earlier page write failed ({what}); drop the writer and take the snapshot again"
    )]
    WriterFailed {
        /// the snapshot
        name: String,
        /// the first failure
        what: String,
    },
    /// removing a snapshot that clones still need
    #[error(
        "cannot remove snapshot {name:?}: the clones {clones:?} refer to it; remove them first"
    )]
    HasClones {
        /// the snapshot
        name: String,
        /// the clones that name it as their base
        clones: Vec<String>,
    },
    /// a snapshot too large for one manifest
    #[error("snapshot {name:?} is too large for a manifest: {what}")]
    TooLarge {
        /// the snapshot
        name: String,
        /// which limit
        what: &'static str,
    },
}

impl StoreError {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        StoreError::Io {
            action,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn corrupt(path: impl Into<PathBuf>, what: impl Into<String>) -> Self {
        StoreError::Corrupt {
            path: path.into(),
            what: what.into(),
            source: None,
        }
    }
}

/// Shorthand: attach an action and a path to an I/O result.
pub(crate) trait IoContext<T> {
    fn ctx(self, action: &'static str, path: &std::path::Path) -> Result<T, StoreError>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, action: &'static str, path: &std::path::Path) -> Result<T, StoreError> {
        self.map_err(|e| StoreError::io(action, path, e))
    }
}
