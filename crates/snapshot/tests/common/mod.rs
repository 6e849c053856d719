//! What the snapshot crate's tests share.

/// A fresh private anonymous mapping of `len` bytes (never unmapped unless the caller does).
pub fn map(len: usize) -> *mut u8 {
    // SAFETY: a fresh private anonymous mapping, checked below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    p.cast()
}
