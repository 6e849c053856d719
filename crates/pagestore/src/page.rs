//! The unit of everything: a 4 KiB page.

/// Bytes in a page. memvisor works in x86 base pages only.
pub const PAGE_SIZE: usize = 4096;

/// One page of guest (or any) memory.
pub type Page = [u8; PAGE_SIZE];

/// True when every byte of `page` is zero.
///
/// Word-at-a-time, so it runs at memory speed; the zero test comes before any hashing because
/// young guests are mostly zero pages.
#[inline]
pub fn is_zero(page: &Page) -> bool {
    page.chunks_exact(8)
        .all(|w| u64::from_ne_bytes(w.try_into().expect("8-byte chunk")) == 0)
}

/// Length of the common prefix of `a` and `b`, compared eight bytes at a time.
#[inline]
pub(crate) fn match_len(a: &[u8], b: &[u8]) -> usize {
    let n = a.len().min(b.len());
    let mut i = 0;
    while i + 8 <= n {
        let x = u64::from_le_bytes(a[i..i + 8].try_into().expect("8 bytes"))
            ^ u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        if x != 0 {
            return i + (x.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while i < n && a[i] == b[i] {
        i += 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        let mut p = [0u8; PAGE_SIZE];
        assert!(is_zero(&p));
        p[PAGE_SIZE - 1] = 1;
        assert!(!is_zero(&p));
    }

    #[test]
    fn match_len_finds_first_difference() {
        let a = [7u8; 100];
        let mut b = a;
        assert_eq!(match_len(&a, &b), 100);
        b[37] = 0;
        assert_eq!(match_len(&a, &b), 37);
        b[3] = 0;
        assert_eq!(match_len(&a, &b), 3);
        assert_eq!(match_len(&a[..5], &b[..3]), 3);
    }
}
