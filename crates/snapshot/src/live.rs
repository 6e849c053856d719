//! Live snapshots of guest RAM: copy-on-write through userfaultfd write protection.
//!
//! The guest is paused only while the caller saves its vCPU state and this module arms write
//! protection over all of guest RAM (one ioctl). From then on every page is copied out exactly
//! once, with the content it had at that instant:
//!
//! - a background copier walks RAM in address order;
//! - a guest write to a page not yet copied faults into the handler thread, which copies the
//!   page first and only then lifts the protection and wakes the writer;
//! - a page absent at the instant (never touched, so zero) faults as missing when first
//!   touched: it is recorded as zero and mapped as zero.
//!
//! One atomic word per page says who copies it (the copier or the handler), so a page is
//! never copied twice nor after a write. The pages the guest touched first, in the order it
//! touched them, are kept: a restore prefetches them first.

use parking_lot::Mutex;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use pager::stats::{Histogram, Latency};
use pager::uffd::{Event, Modes, Resolved, Uffd};

use crate::{BoxError, PAGE, PageSink};

/// Why a live snapshot failed. The guest keeps running in every case: protection is lifted
/// and guest RAM unregistered before the error is returned.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    /// userfaultfd could not be set up or refused an operation
    #[error("userfaultfd")]
    Uffd(#[from] pager::UffdError),
    /// this kernel's userfaultfd has no write protection, which live snapshots need
    #[error(
        "this kernel's userfaultfd has no write-protect faults (Linux 5.19 or later for \
         anonymous memory); take a paused snapshot instead"
    )]
    NoWriteProtect,
    /// the guest RAM range is not whole pages
    #[error("guest RAM at {0:#x}, {1} bytes, is not whole 4 KiB pages")]
    Range(u64, usize),
    /// /proc/self/pagemap could not be read
    #[error("reading /proc/self/pagemap")]
    Pagemap(#[source] std::io::Error),
    /// pausing the VM (or saving its state) failed
    #[error("pausing the VM")]
    Freeze(#[source] BoxError),
    /// the store refused a page
    #[error("storing page {0}")]
    Sink(u64, #[source] BoxError),
    /// something dropped guest RAM (MADV_DONTNEED) during the snapshot: the pages' content at
    /// the snapshot's instant may be gone, so the snapshot is abandoned
    #[error(
        "guest RAM [{0:#x}, {1:#x}) was dropped while the snapshot was being taken; the \
         snapshot is abandoned (is a balloon or a pager active on this VM?)"
    )]
    Removed(u64, u64),
    /// the handler thread could not be started
    #[error("starting the snapshot's fault handler")]
    Thread(#[source] std::io::Error),
}

/// What a live snapshot did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LiveReport {
    /// pages of guest RAM
    pub pages: u64,
    /// pages copied by the background copier
    pub copied: u64,
    /// pages copied by the handler because the guest wrote them first
    pub copied_on_write: u64,
    /// pages that were absent (zero) at the instant
    pub zero: u64,
    /// missing faults served (first touches of zero pages)
    pub missing_faults: u64,
    /// time to arm write protection over all of guest RAM
    pub arm: Duration,
    /// time from arming to the last page stored
    pub copy: Duration,
    /// service time of the guest's write faults (read to wake)
    pub fault: Latency,
    /// the pages the guest touched first, in order (for a restore's prefetch)
    #[serde(skip)]
    pub order: Vec<u32>,
}

const PENDING: u8 = 0;
const CLAIMED: u8 = 1;
const DONE: u8 = 2;

/// Pages the copier takes between two unprotect calls (2 MiB).
const CHUNK: usize = 512;

/// Pagemap entry: page present in RAM / in swap.
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAP: u64 = 1 << 62;

struct Live<'a> {
    uffd: Uffd,
    base: u64,
    state: Box<[AtomicU8]>,
    sink: &'a dyn PageSink,
    order: Mutex<Vec<u32>>,
    stop: AtomicBool,
    /// Set once write protection is armed: the snapshot's instant. Before it a missing fault
    /// is served as plain zero and a write-protect fault lifts the protection (the page may
    /// still change before the instant), and the page goes on `dirty`; from it on, faults
    /// copy. The handler holds it for reading across each decision and resolution, so the
    /// arm cannot fall between them.
    armed: parking_lot::RwLock<bool>,
    /// Pages made writable again after the early arm, to protect again at the instant.
    dirty: Mutex<Vec<u32>>,
    /// Set before guest RAM is let go: a fault still queued then was woken by the unregister,
    /// and resolving it finds the range gone (ENOENT), which is no failure.
    finishing: AtomicBool,
    failure: Mutex<Option<LiveError>>,
    copied_on_write: AtomicU64,
    missing: AtomicU64,
    zero: AtomicU64,
    fault_ns: Histogram,
}

/// Takes a live snapshot of the guest RAM at `ram` (`len` bytes) into `sink`.
///
/// `freeze` must pause the VM, call the `arm` function it is given (which write-protects
/// guest RAM), save the VM's vCPU and device state, resume the VM and return that state. It
/// runs after guest RAM is registered with a userfaultfd of this module's own. This returns
/// once every page is in `sink`, with `freeze`'s value and a report.
///
/// # Safety
/// `ram` must be a private anonymous mapping of `len` bytes that stays mapped for the whole
/// call and is not registered with another userfaultfd; nothing but the guest (and KVM on its
/// behalf) may write it meanwhile.
pub unsafe fn take<T>(
    ram: *mut u8,
    len: usize,
    sink: &dyn PageSink,
    freeze: impl FnOnce(&mut dyn FnMut() -> Result<(), LiveError>) -> Result<T, BoxError>,
) -> Result<(T, LiveReport), LiveError> {
    let base = ram as u64;
    if !base.is_multiple_of(PAGE as u64) || !len.is_multiple_of(PAGE) || len == 0 {
        return Err(LiveError::Range(base, len));
    }
    let pages = len / PAGE;
    let uffd = Uffd::new()?;
    if !uffd.has_write_protect() {
        return Err(LiveError::NoWriteProtect);
    }
    let pagemap = std::fs::File::open("/proc/self/pagemap").map_err(LiveError::Pagemap)?;
    uffd.register(
        base,
        len as u64,
        Modes {
            missing: true,
            write_protect: true,
        },
    )?;
    let live = Live {
        uffd,
        base,
        state: (0..pages).map(|_| AtomicU8::new(PENDING)).collect(),
        sink,
        order: Mutex::new(Vec::new()),
        stop: AtomicBool::new(false),
        armed: parking_lot::RwLock::new(false),
        dirty: Mutex::new(Vec::new()),
        finishing: AtomicBool::new(false),
        failure: Mutex::new(None),
        copied_on_write: AtomicU64::new(0),
        missing: AtomicU64::new(0),
        zero: AtomicU64::new(0),
        fault_ns: Histogram::default(),
    };
    let mut arm_time = Duration::ZERO;
    let result = std::thread::scope(|s| {
        let handler = std::thread::Builder::new()
            .name("snapshot-uffd".into())
            .spawn_scoped(s, || live.serve())
            .map_err(LiveError::Thread)?;
        let out = (|| -> Result<(T, u64, Duration), LiveError> {
            // Protect everything while the guest still runs (1 GiB of 4 KiB pages takes
            // 8 ms, more with KVM's shadow pages to drop), so that the pause only has to
            // protect again what the guest wrote meanwhile.
            live.protect_parallel(pages)?;
            let mut arm = || {
                let t = Instant::now();
                let mut armed = live.armed.write();
                live.protect_dirty()?;
                *armed = true;
                arm_time = t.elapsed();
                Ok(())
            };
            let frozen = freeze(&mut arm).map_err(LiveError::Freeze)?;
            let t = Instant::now();
            let copied = live.copy_all(&pagemap, pages);
            // Pages the handler claimed may still be in its hands: wait for them.
            for st in live.state.iter() {
                while st.load(Ordering::Acquire) == CLAIMED {
                    std::thread::yield_now();
                }
            }
            Ok((frozen, copied?, t.elapsed()))
        })();
        // Whatever happened, the guest must run on: lift every protection (waking all
        // writers), then let go of guest RAM, then stop the handler.
        live.finishing.store(true, Ordering::Release);
        let lifted = live.protect(0, pages, false);
        let unregistered = live.uffd.unregister(base, len as u64);
        live.stop.store(true, Ordering::Release);
        let _ = handler.join();
        let (frozen, copied, copy) = out?;
        lifted?;
        unregistered?;
        Ok::<_, LiveError>((frozen, copied, copy))
    });
    let (frozen, copied, copy) = result?;
    if let Some(e) = live.failure.lock().take() {
        return Err(e);
    }
    let report = LiveReport {
        pages: pages as u64,
        copied,
        copied_on_write: live.copied_on_write.load(Ordering::Relaxed),
        zero: live.zero.load(Ordering::Relaxed),
        missing_faults: live.missing.load(Ordering::Relaxed),
        arm: arm_time,
        copy,
        fault: live.fault_ns.summary(),
        order: std::mem::take(&mut *live.order.lock()),
    };
    Ok((frozen, report))
}

/// Copies all `len` bytes of guest RAM at `ram` into `sink` as they are now: the reference
/// (pause-and-copy) snapshot, for use inside a paused VM. Returns the pages stored non-zero.
///
/// # Safety
/// `ram` must be mapped and readable for `len` bytes for the whole call.
pub unsafe fn copy_paused(
    ram: *const u8,
    len: usize,
    sink: &dyn PageSink,
) -> Result<u64, LiveError> {
    let mut page = [0u8; PAGE];
    let mut stored = 0;
    for i in 0..len / PAGE {
        // SAFETY: page i lies inside the mapping the caller vouches for.
        unsafe { std::ptr::copy_nonoverlapping(ram.add(i * PAGE), page.as_mut_ptr(), PAGE) };
        let idx = i as u64;
        if pagestore::is_zero(&page) {
            sink.put_zero(idx).map_err(|e| LiveError::Sink(idx, e))?;
        } else {
            sink.put_page(idx, &page)
                .map_err(|e| LiveError::Sink(idx, e))?;
            stored += 1;
        }
    }
    Ok(stored)
}

impl Live<'_> {
    fn addr(&self, idx: usize) -> u64 {
        self.base + (idx * PAGE) as u64
    }

    /// Write-protects (or unprotects, waking writers) pages [first, first+n). An unread
    /// remove event makes the kernel answer EAGAIN: the handler reads it, so retry.
    fn protect(&self, first: usize, n: usize, on: bool) -> Result<(), LiveError> {
        // EAGAIN lasts until the handler reads the remove event; never spin on it for long
        // (the handler itself, or an arm that holds the lock the handler waits on, would spin
        // forever): give up, and the snapshot is abandoned.
        let start = Instant::now();
        loop {
            match self
                .uffd
                .write_protect(self.addr(first), (n * PAGE) as u64, on)?
            {
                Resolved::Again if start.elapsed() < Duration::from_millis(200) => {
                    std::thread::yield_now();
                }
                Resolved::Again => {
                    let a = self.addr(first);
                    return Err(LiveError::Removed(a, a + (n * PAGE) as u64));
                }
                Resolved::Done | Resolved::Exists => return Ok(()),
            }
        }
    }

    /// Write-protects all `pages`, split among the host's cores: the kernel walks each part's
    /// page tables under a shared lock, so the parts go in parallel (1 GiB of 4 KiB pages:
    /// about 8 ms alone). It runs before the pause, so it costs the guest no pause time.
    fn protect_parallel(&self, pages: usize) -> Result<(), LiveError> {
        let threads = std::thread::available_parallelism()
            .map_or(1, std::num::NonZero::get)
            .clamp(1, 8);
        // Parts of whole 2 MiB runs, so no huge mapping is split between two calls.
        let per = pages.div_ceil(threads).div_ceil(CHUNK) * CHUNK;
        if threads == 1 || per >= pages {
            return self.protect(0, pages, true);
        }
        std::thread::scope(|s| {
            let parts: Vec<_> = (per..pages)
                .step_by(per)
                .map(|first| s.spawn(move || self.protect(first, per.min(pages - first), true)))
                .collect();
            let mine = self.protect(0, per, true);
            parts
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(LiveError::Thread(std::io::Error::other(
                            "a write-protect thread panicked",
                        )))
                    })
                })
                .chain(std::iter::once(mine))
                .collect::<Result<Vec<()>, LiveError>>()
                .map(drop)
        })
    }

    /// Protects again, in runs, the pages made writable since the early arm.
    fn protect_dirty(&self) -> Result<(), LiveError> {
        let mut dirty = std::mem::take(&mut *self.dirty.lock());
        dirty.sort_unstable();
        dirty.dedup();
        let mut k = 0;
        while k < dirty.len() {
            let start = dirty[k];
            let mut end = start + 1;
            k += 1;
            while k < dirty.len() && dirty[k] == end {
                end += 1;
                k += 1;
            }
            self.protect(start as usize, (end - start) as usize, true)?;
        }
        Ok(())
    }

    fn early(&self, idx: usize) {
        if let Ok(i) = u32::try_from(idx) {
            self.dirty.lock().push(i);
        }
    }

    fn fail(&self, e: LiveError) {
        let gone = matches!(&e, LiveError::Uffd(pager::UffdError::Ioctl { source, .. })
            if source.raw_os_error() == Some(libc::ENOENT));
        if gone && self.finishing.load(Ordering::Acquire) {
            return;
        }
        let mut f = self.failure.lock();
        if f.is_none() {
            *f = Some(e);
        }
    }

    /// Copies page `idx` (write-protected or absent, so stable) into `out` once claimed.
    fn read(&self, idx: usize, out: &mut [u8; PAGE]) {
        let src = self.addr(idx) as *const u8;
        // SAFETY: the page lies inside guest RAM, mapped for the whole snapshot (take's
        // contract); it is write-protected or was absent, so no one writes it meanwhile.
        unsafe { std::ptr::copy_nonoverlapping(src, out.as_mut_ptr(), PAGE) };
    }

    fn store(&self, idx: usize, page: &[u8; PAGE]) {
        let i = idx as u64;
        let r = if pagestore::is_zero(page) {
            self.sink.put_zero(i)
        } else {
            self.sink.put_page(i, page)
        };
        if let Err(e) = r {
            self.fail(LiveError::Sink(i, e));
        }
    }

    /// The background copier: every page no fault claimed, in address order. Returns how
    /// many it copied (absent pages included, as zeros).
    fn copy_all(&self, pagemap: &std::fs::File, pages: usize) -> Result<u64, LiveError> {
        let mut entries = vec![0u64; CHUNK];
        let mut mine = vec![false; CHUNK];
        let mut page = [0u8; PAGE];
        let mut copied = 0;
        for first in (0..pages).step_by(CHUNK) {
            let n = CHUNK.min(pages - first);
            // Presence read before the claims is safe: an absent page becomes present only
            // through a missing fault, and the handler claims the page before serving it.
            read_pagemap(
                pagemap,
                self.base / PAGE as u64 + first as u64,
                &mut entries[..n],
            )
            .map_err(LiveError::Pagemap)?;
            for k in 0..n {
                let idx = first + k;
                mine[k] = self.state[idx]
                    .compare_exchange(PENDING, CLAIMED, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok();
                if !mine[k] {
                    continue;
                }
                if entries[k] & (PM_PRESENT | PM_SWAP) == 0 {
                    self.state[idx].store(DONE, Ordering::Release);
                    self.zero.fetch_add(1, Ordering::Relaxed);
                    self.store_zero(idx);
                } else {
                    self.read(idx, &mut page);
                    self.state[idx].store(DONE, Ordering::Release);
                    self.store(idx, &page);
                }
                copied += 1;
            }
            // Lift protection from runs of pages this thread copied; a page the handler
            // holds is never in a run, so its writer cannot slip past the copy.
            let mut k = 0;
            while k < n {
                if !mine[k] {
                    k += 1;
                    continue;
                }
                let start = k;
                while k < n && mine[k] {
                    k += 1;
                }
                self.protect(first + start, k - start, false)?;
            }
            if self.failure.lock().is_some() {
                break;
            }
        }
        Ok(copied)
    }

    fn store_zero(&self, idx: usize) {
        if let Err(e) = self.sink.put_zero(idx as u64) {
            self.fail(LiveError::Sink(idx as u64, e));
        }
    }

    /// Claims page `idx` if nobody has.
    fn try_claim(&self, idx: usize) -> bool {
        self.state[idx]
            .compare_exchange(PENDING, CLAIMED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Waits for the copier to finish its copy of page `idx`, for a while: it holds a page
    /// only for one 4 KiB copy, unless guest RAM was dropped under it (a remove event, which
    /// has already abandoned the snapshot).
    fn await_copier(&self, idx: usize) {
        let start = Instant::now();
        while self.state[idx].load(Ordering::Acquire) == CLAIMED {
            if start.elapsed() > Duration::from_secs(1) {
                let a = self.addr(idx);
                self.fail(LiveError::Removed(a, a + PAGE as u64));
                return;
            }
            std::hint::spin_loop();
        }
    }

    /// Claims page `idx` for the handler, or waits for whoever holds it to finish. Returns
    /// whether the handler now owns the copy.
    fn claim(&self, idx: usize) -> bool {
        if self.try_claim(idx) {
            return true;
        }
        self.await_copier(idx);
        false
    }

    fn touched(&self, idx: usize) {
        if let Ok(i) = u32::try_from(idx) {
            self.order.lock().push(i);
        }
    }

    /// The handler thread: serves write-protect and missing faults until told to stop.
    fn serve(&self) {
        let mut events = [Event::Other(0); 16];
        let mut page = [0u8; PAGE];
        let zeros = [0u8; PAGE];
        let pages = self.state.len();
        while !self.stop.load(Ordering::Acquire) {
            let mut pfd = libc::pollfd {
                fd: self.uffd.as_fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, for the length given.
            if unsafe { libc::poll(&raw mut pfd, 1, 10) } <= 0 {
                continue;
            }
            let n = match self.uffd.read(&mut events) {
                Ok(n) => n,
                Err(e) => {
                    self.fail(e.into());
                    return;
                }
            };
            for ev in &events[..n] {
                let t = Instant::now();
                match *ev {
                    Event::WriteProtect { addr } => {
                        let Some(idx) = self.index(addr, pages) else {
                            continue;
                        };
                        let armed = self.armed.read();
                        if !*armed {
                            // Before the instant: let the write through, protect it again
                            // at the instant.
                            if let Err(e) = self.protect(idx, 1, false) {
                                self.fail(e);
                            }
                            self.early(idx);
                            continue;
                        }
                        drop(armed);
                        if self.claim(idx) {
                            self.read(idx, &mut page);
                            self.state[idx].store(DONE, Ordering::Release);
                            self.copied_on_write.fetch_add(1, Ordering::Relaxed);
                            self.touched(idx);
                            if let Err(e) = self.protect(idx, 1, false) {
                                self.fail(e);
                            }
                            self.fault_ns.record(nanos(t.elapsed()));
                            self.store(idx, &page);
                        } else if let Err(e) = self.protect(idx, 1, false) {
                            self.fail(e);
                        }
                    }
                    Event::Missing { addr, write } => {
                        let Some(idx) = self.index(addr, pages) else {
                            continue;
                        };
                        let armed = self.armed.read();
                        self.missing.fetch_add(1, Ordering::Relaxed);
                        // Map zero first, without waking anyone: only the fault that really
                        // maps the page knows it was absent until now (a second fault for the
                        // same page, read in the same batch, finds it mapped).
                        let r = if write {
                            self.uffd.copy(addr, &zeros, false)
                        } else {
                            self.uffd.zeropage(addr, false)
                        };
                        match r {
                            Ok(Resolved::Done) if *armed => {
                                // Absent until now, so at the instant: zero in the snapshot,
                                // unless the copier took it (having seen it absent, or mapped
                                // just now: then it copies zeros, before anyone is woken).
                                if self.try_claim(idx) {
                                    self.state[idx].store(DONE, Ordering::Release);
                                    self.zero.fetch_add(1, Ordering::Relaxed);
                                    self.touched(idx);
                                    self.store_zero(idx);
                                } else {
                                    self.await_copier(idx);
                                }
                            }
                            // Before the instant: protect it again at the instant.
                            Ok(Resolved::Done) => self.early(idx),
                            // Mapped by an earlier fault, or the space is changing: the
                            // writer retries once woken and faults again if it must.
                            Ok(Resolved::Exists | Resolved::Again) => {}
                            Err(e) => self.fail(e.into()),
                        }
                        let _ = self.uffd.wake(addr, PAGE as u64);
                        drop(armed);
                    }
                    Event::Remove { start, end } => self.fail(LiveError::Removed(start, end)),
                    Event::Other(_) => {}
                }
            }
        }
    }

    fn index(&self, addr: u64, pages: usize) -> Option<usize> {
        let idx = usize::try_from(addr.checked_sub(self.base)? / PAGE as u64).ok()?;
        (idx < pages).then_some(idx)
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Reads the pagemap entries of `out.len()` pages from virtual page number `vpn`.
fn read_pagemap(f: &std::fs::File, vpn: u64, out: &mut [u64]) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; out.len() * 8];
    f.read_exact_at(&mut buf, vpn * 8)?;
    for (o, b) in out.iter_mut().zip(buf.chunks_exact(8)) {
        *o = u64::from_le_bytes(b.try_into().expect("8 bytes"));
    }
    Ok(())
}
