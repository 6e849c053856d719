//! Real pages for tests: the bytes of this test program's own executable (code, data,
//! symbols), which look like real program memory, never random fill.
#![allow(dead_code)]

use pagestore::{PAGE_SIZE, Page, is_zero};

/// Distinct non-zero pages of the running test binary.
pub fn real_pages(max: usize) -> Vec<Page> {
    let exe =
        std::fs::read(std::env::current_exe().expect("own path")).expect("read own executable");
    let mut seen = std::collections::HashSet::new();
    exe.chunks_exact(PAGE_SIZE)
        .map(|c| -> Page { c.try_into().expect("a page") })
        .filter(|p| !is_zero(p) && seen.insert(*p))
        .take(max)
        .collect()
}

/// A copy of `p` with `n` bytes changed at spread-out offsets: a similar page.
pub fn edited(p: &Page, n: usize, salt: u8) -> Page {
    let mut q = *p;
    for i in 0..n {
        let at = (i * 997 + usize::from(salt) * 13) % PAGE_SIZE;
        q[at] = q[at].wrapping_add(1 + salt);
    }
    q
}
