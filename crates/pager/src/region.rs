//! A managed memory region and the pager's per-page books.
//!
//! One `AtomicU32` per page holds where the page is and what the scanner knows of it; a
//! second word holds the store's id while the page is reclaimed. Every change of place
//! (resident, stored, empty) happens under the page's busy bit, which the reclaimer and the
//! fault handlers take with a compare-and-swap and never wait on: a fault that finds the bit
//! taken is deferred and retried, so no thread ever blocks on another while the kernel
//! waits for it (see docs/pager.md, "Why nothing waits").

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::stats::Form;

pub(crate) const PAGE: u64 = 4096;

// Where the page is.
pub(crate) const EMPTY: u32 = 0;
pub(crate) const RESIDENT: u32 = 1;
pub(crate) const STORED: u32 = 2;
const STATE_MASK: u32 = 3;
/// Taken by the reclaimer.
pub(crate) const BUSY_RECLAIM: u32 = 1 << 2;
/// Taken by a fault handler or the remove path.
pub(crate) const BUSY_FAULT: u32 = 1 << 3;
pub(crate) const BUSY: u32 = BUSY_RECLAIM | BUSY_FAULT;
/// Written since the last scan (a write-protect fault was served).
pub(crate) const WRITTEN: u32 = 1 << 4;
/// Brought back from the store since the last scan (it was read or written).
pub(crate) const REFAULTED: u32 = 1 << 5;
/// A stored page already recompressed with the cold compressor (or found no smaller).
pub(crate) const DEEP: u32 = 1 << 6;
/// A resident page the scanner write-protected and no write has faulted on since. Arming it
/// again would change nothing but cost the guest: every UFFDIO_WRITEPROTECT tells KVM to drop
/// its mappings of the range, and the guest then faults on each page it touches, reads too.
/// A hint only (reclaim protects each page itself): any change of place clears it.
pub(crate) const ARMED: u32 = 1 << 7;
const AGE_SHIFT: u32 = 8;
const AGE_MASK: u32 = 0xff << AGE_SHIFT;
const BACKOFF_SHIFT: u32 = 16;
const BACKOFF_MASK: u32 = 7 << BACKOFF_SHIFT;
/// Most doublings of the cold threshold for a page that keeps coming back (64x, but the
/// threshold stops at the 255 scans a page's age counts).
pub(crate) const MAX_BACKOFF: u32 = 6;
const FORM_SHIFT: u32 = 19;
const FORM_MASK: u32 = 7 << FORM_SHIFT;
/// Scans left during which a recently written page is not write-protected again.
const REST_SHIFT: u32 = 22;
const MAX_REST: u32 = 63;
const REST_MASK: u32 = MAX_REST << REST_SHIFT;
/// How many scans in a row found the page written (its rest grows with each).
const HEAT_SHIFT: u32 = 28;
const HEAT_MASK: u32 = 7 << HEAT_SHIFT;
const MAX_HEAT: u32 = 3;
/// A written page's rest by its heat: one scan after a first write, for a page written once
/// is likely idle soon; then a quarter of a minute, then a minute.
const RESTS: [u32; MAX_HEAT as usize + 1] = [0, 1, 15, MAX_REST];

/// Accessors for one page's meta word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Meta(pub u32);

impl Meta {
    pub fn state(self) -> u32 {
        self.0 & STATE_MASK
    }
    /// In state `s`, with a fresh mapping: no longer [`ARMED`].
    pub fn with_state(self, s: u32) -> Meta {
        Meta((self.0 & !(STATE_MASK | ARMED)) | s)
    }
    pub fn busy(self) -> bool {
        self.0 & BUSY != 0
    }
    pub fn age(self) -> u32 {
        (self.0 & AGE_MASK) >> AGE_SHIFT
    }
    pub fn with_age(self, a: u32) -> Meta {
        Meta((self.0 & !AGE_MASK) | (a.min(255) << AGE_SHIFT))
    }
    pub fn backoff(self) -> u32 {
        (self.0 & BACKOFF_MASK) >> BACKOFF_SHIFT
    }
    pub fn with_backoff(self, b: u32) -> Meta {
        Meta((self.0 & !BACKOFF_MASK) | (b.min(MAX_BACKOFF) << BACKOFF_SHIFT))
    }
    pub fn form(self) -> Form {
        Form::from_ix((self.0 & FORM_MASK) >> FORM_SHIFT)
    }
    pub fn with_form(self, f: Form) -> Meta {
        Meta((self.0 & !FORM_MASK) | ((f.ix() as u32) << FORM_SHIFT))
    }
    pub fn rest(self) -> u32 {
        (self.0 & REST_MASK) >> REST_SHIFT
    }
    pub fn with_rest(self, r: u32) -> Meta {
        Meta((self.0 & !REST_MASK) | (r.min(MAX_REST) << REST_SHIFT))
    }
    pub fn heat(self) -> u32 {
        (self.0 & HEAT_MASK) >> HEAT_SHIFT
    }
    pub fn with_heat(self, h: u32) -> Meta {
        Meta((self.0 & !HEAT_MASK) | (h.min(MAX_HEAT) << HEAT_SHIFT))
    }
    pub fn set(self, bits: u32) -> Meta {
        Meta(self.0 | bits)
    }
    pub fn clear(self, bits: u32) -> Meta {
        Meta(self.0 & !bits)
    }
}

/// What the scanner concluded about one resident page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Aged {
    /// Written: C1. `arm`: write-protect it this scan.
    Modified { arm: bool },
    /// Refaulted (read): C2.
    Referenced,
    /// Untouched for `age` scans: C3 or C4.
    Idle { age: u32 },
}

impl Meta {
    /// One scan's step of Difference Engine's NRU aging, from what the fault handlers saw.
    /// A page found written rests (is not write-protected again) for 1, 15, then 63 scans
    /// ([`RESTS`]), so that a hot page costs one write-protect fault a minute instead of one
    /// every 16 scans. Each such fault costs the guest more than the fault itself: lifting the
    /// protection makes KVM drop its mapping of the page, and the guest exits again on its
    /// next touch (docs/pager.md has what that costs a guest here).
    pub fn aged(self) -> (Meta, Aged) {
        if self.0 & WRITTEN != 0 {
            let heat = (self.heat() + 1).min(MAX_HEAT);
            let m = self
                .clear(WRITTEN | REFAULTED)
                .with_age(0)
                .with_heat(heat)
                .with_rest(RESTS[heat as usize]);
            (m, Aged::Modified { arm: false })
        } else if self.rest() > 0 {
            let rest = self.rest() - 1;
            (
                self.clear(REFAULTED).with_rest(rest),
                Aged::Modified { arm: rest == 0 },
            )
        } else if self.0 & REFAULTED != 0 {
            (
                self.clear(REFAULTED).with_age(0).with_heat(0),
                Aged::Referenced,
            )
        } else {
            let age = (self.age() + 1).min(255);
            (self.with_age(age).with_heat(0), Aged::Idle { age })
        }
    }
}

/// One managed mapping.
#[derive(Debug)]
pub struct Region {
    pub(crate) start: u64,
    pub(crate) len: u64,
    pub(crate) name: String,
    pub(crate) meta: Box<[AtomicU32]>,
    pub(crate) ids: Box<[AtomicU64]>,
    /// Unmapped when the region goes, if the pager made the mapping.
    pub(crate) owned: bool,
}

impl Region {
    pub(crate) fn new(start: u64, len: u64, name: String, owned: bool) -> Region {
        let pages = usize::try_from(len / PAGE).expect("a mapping fits the address space");
        Region {
            start,
            len,
            name,
            meta: (0..pages).map(|_| AtomicU32::new(EMPTY)).collect(),
            ids: (0..pages).map(|_| AtomicU64::new(0)).collect(),
            owned,
        }
    }

    /// The first byte, as an address.
    pub fn start(&self) -> *mut u8 {
        self.start as *mut u8
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// Whether it has no pages (never: regions are at least one page).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Its name, for stats.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn pages(&self) -> usize {
        self.meta.len()
    }

    pub(crate) fn index(&self, addr: u64) -> Option<usize> {
        if addr >= self.start && addr < self.start + self.len {
            Some(((addr - self.start) / PAGE) as usize)
        } else {
            None
        }
    }

    pub(crate) fn addr(&self, ix: usize) -> u64 {
        self.start + ix as u64 * PAGE
    }

    pub(crate) fn load(&self, ix: usize) -> Meta {
        Meta(self.meta[ix].load(Ordering::Acquire))
    }

    /// Takes page `ix`'s busy bit `who` if it is free; returns the meta word it found.
    /// Fails only if the page is busy: a word changed meanwhile by an unlocked update (the
    /// scanner's aging of a stored page) is read again, or a remove event could be lost.
    pub(crate) fn try_lock(&self, ix: usize, who: u32) -> Result<Meta, Meta> {
        let mut cur = self.load(ix);
        loop {
            if cur.busy() {
                return Err(cur);
            }
            match self.meta[ix].compare_exchange_weak(
                cur.0,
                cur.0 | who,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(cur),
                Err(now) => cur = Meta(now),
            }
        }
    }

    /// Publishes `m` (busy bits cleared) and releases the page.
    pub(crate) fn unlock(&self, ix: usize, m: Meta) {
        self.meta[ix].store(m.clear(BUSY).0, Ordering::Release);
    }

    /// Applies `f` to an unbusy page's meta word atomically; `None` if the page was busy.
    pub(crate) fn update(
        &self,
        ix: usize,
        mut f: impl FnMut(Meta) -> Option<Meta>,
    ) -> Option<Meta> {
        self.meta[ix]
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |m| {
                let m = Meta(m);
                if m.busy() { None } else { f(m).map(|m| m.0) }
            })
            .ok()
            .map(Meta)
    }

    /// Marks resident the pages mincore finds in memory (at attach).
    pub(crate) fn init_residency(&self) -> std::io::Result<()> {
        let mut vec = vec![0u8; self.pages()];
        // SAFETY: mincore reads the page tables of [start, start+len), which is mapped, and
        // writes one byte per page into `vec`, which has one byte per page.
        let r = unsafe { libc::mincore(self.start().cast(), self.len(), vec.as_mut_ptr()) };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        for (ix, &v) in vec.iter().enumerate() {
            if v & 1 != 0 {
                self.meta[ix].store(RESIDENT, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Bytes of the pager's own tables for this region.
    pub(crate) fn metadata_bytes(&self) -> u64 {
        (self.meta.len() * (size_of::<AtomicU32>() + size_of::<AtomicU64>())) as u64
            + size_of::<Region>() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_do_not_overlap() {
        let m = Meta(RESIDENT)
            .with_age(200)
            .with_backoff(3)
            .with_form(Form::Patched)
            .with_rest(9)
            .with_heat(2)
            .set(WRITTEN | ARMED);
        assert_eq!(m.state(), RESIDENT);
        assert_eq!(m.age(), 200);
        assert_eq!(m.backoff(), 3);
        assert_eq!(m.form(), Form::Patched);
        assert_eq!(m.rest(), 9);
        assert_eq!(m.heat(), 2);
        assert!(m.0 & ARMED != 0 && m.0 & WRITTEN != 0);
        assert!(!m.busy());
        assert_eq!(m.with_state(STORED).0 & ARMED, 0);
        assert!(m.set(BUSY_FAULT).busy());
        // The widest values stay in their own bits.
        let w = m
            .with_rest(63)
            .with_heat(MAX_HEAT)
            .with_backoff(MAX_BACKOFF);
        assert_eq!(
            (w.rest(), w.heat(), w.backoff()),
            (63, MAX_HEAT, MAX_BACKOFF)
        );
        assert_eq!(
            (w.age(), w.form(), w.state()),
            (200, Form::Patched, RESIDENT)
        );
        assert_eq!(
            w.with_rest(0).with_heat(0).with_backoff(3).0,
            m.with_rest(0).with_heat(0).0
        );
    }

    #[test]
    fn a_written_page_rests_longer_each_time() {
        let mut m = Meta(RESIDENT);
        let mut rests = vec![];
        for _ in 0..5 {
            let (n, a) = m.set(WRITTEN).aged();
            assert_eq!(a, Aged::Modified { arm: false });
            rests.push(n.rest());
            m = n;
        }
        assert_eq!(rests, vec![1, 15, 63, 63, 63]);
        // It rests, then is armed, then ages as idle if nothing writes it.
        for _ in 0..62 {
            m = m.aged().0;
        }
        let (n, a) = m.aged();
        assert_eq!(a, Aged::Modified { arm: true });
        assert_eq!(n.aged().1, Aged::Idle { age: 1 });
    }
}
