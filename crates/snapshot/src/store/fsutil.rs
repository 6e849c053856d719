//! File system steps of the crash-safety protocol: durable writes, no-clobber publication,
//! directory fsyncs, advisory locks, fresh ids.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::error::{IoContext, StoreError};

/// Seconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A fresh 64-bit id for a pack or a temporary file: from the kernel's random source, mixed
/// with the time, the process and a counter so that it stays unique even without one.
pub(crate) fn fresh_id() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut r = [0u8; 8];
    // SAFETY: getrandom writes at most `r.len()` bytes into the valid, writable buffer `r`.
    let _ = unsafe { libc::getrandom(r.as_mut_ptr().cast(), r.len(), 0) };
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut h = blake3::Hasher::new();
    h.update(&r);
    h.update(&nanos.to_le_bytes());
    h.update(&std::process::id().to_le_bytes());
    h.update(&COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    let out = h.finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&out.as_bytes()[..8]);
    u64::from_le_bytes(b)
}

/// Makes a directory's entries (creations, renames, unlinks) durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .ctx("fsync directory", dir)
}

/// Writes `bytes` to a new file `tmp` and makes it durable (the caller then publishes it).
pub(crate) fn write_durable(tmp: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(tmp)
        .ctx("create", tmp)?;
    f.write_all(bytes).ctx("write", tmp)?;
    f.sync_all().ctx("fsync", tmp)
}

/// Gives the durable file `tmp` the name `to` atomically, failing (with `AlreadyExists`)
/// rather than replacing a file that has that name: a hard link, then the temporary name goes.
/// A crash between the two leaves only the temporary name behind, which gc removes.
pub(crate) fn publish_no_clobber(tmp: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::hard_link(tmp, to)?;
    match std::fs::remove_file(tmp) {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Held advisory lock (flock) on a store's lock file; dropped, it is released.
#[derive(Debug)]
pub(crate) struct Lock {
    _file: File,
}

fn flock(file: &File, op: libc::c_int) -> std::io::Result<()> {
    loop {
        // SAFETY: flock takes a file descriptor that `file` keeps open for the call.
        let r = unsafe { libc::flock(file.as_raw_fd(), op) };
        if r == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// How a lock is wanted.
#[derive(Debug, Clone, Copy)]
pub(crate) enum LockMode {
    /// Writers, remove, clone and fsck: many at once, never with a gc.
    Shared,
    /// Garbage collection: alone.
    Exclusive,
}

/// Opens (creating if missing) the file a lock is taken on.
fn open_lock_file(path: &Path) -> Result<std::fs::File, StoreError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .ctx("open lock file", path)
}

/// Takes `path`'s lock, retrying for up to `wait`, else [`StoreError::Busy`].
pub(crate) fn lock(
    path: &Path,
    mode: LockMode,
    wait: Duration,
    store: &Path,
) -> Result<Lock, StoreError> {
    let file = open_lock_file(path)?;
    let op = match mode {
        LockMode::Shared => libc::LOCK_SH,
        LockMode::Exclusive => libc::LOCK_EX,
    } | libc::LOCK_NB;
    let deadline = Instant::now() + wait;
    loop {
        match flock(&file, op) {
            Ok(()) => return Ok(Lock { _file: file }),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(StoreError::Busy {
                        path: store.to_path_buf(),
                        what: match mode {
                            LockMode::Shared => "a garbage collection",
                            LockMode::Exclusive => "a snapshot writer, remove, clone or fsck",
                        },
                    });
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(StoreError::io("lock", path, e)),
        }
    }
}

/// Takes `path`'s lock exclusively, waiting as long as it takes: the short critical sections
/// around snapshot names (publish, remove, clone).
pub(crate) fn lock_blocking(path: &Path) -> Result<Lock, StoreError> {
    let file = open_lock_file(path)?;
    flock(&file, libc::LOCK_EX).ctx("lock", path)?;
    Ok(Lock { _file: file })
}

/// The crash-safety tests' failpoints: with `MEMVISOR_STORE_CRASH_AT=<step>` (or
/// `<step>:<n>`) in the environment, the process aborts the first (or n-th) time it reaches
/// that step of the protocol, as a `kill -9` would stop it there. Without it, one load of a
/// cached value. Steps: `pack-written`, `pack-linked`, `manifest-written`, `manifest-linked`,
/// `remove-unlinked`, `gc-leftovers-removed`, `gc-pack-written`, `gc-pack-linked`,
/// `gc-manifest-rewritten`, `gc-pack-deleted`.
pub(crate) fn crash_point(step: &str) {
    static AT: std::sync::OnceLock<Option<(String, u64)>> = std::sync::OnceLock::new();
    static HITS: AtomicU64 = AtomicU64::new(0);
    let at = AT.get_or_init(|| {
        let v = std::env::var("MEMVISOR_STORE_CRASH_AT").ok()?;
        Some(match v.split_once(':') {
            Some((s, n)) => (s.to_string(), n.parse().unwrap_or(1)),
            None => (v, 1),
        })
    });
    if let Some((name, n)) = at
        && name == step
        && HITS.fetch_add(1, Ordering::SeqCst) + 1 == *n
    {
        std::process::abort();
    }
}
