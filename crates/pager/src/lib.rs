//! `pager`: Difference Engine on live memory through userfaultfd.
//!
//! The pager manages anonymous mappings (guest RAM, or any mapping: it knows nothing of KVM).
//! A scanner ages the resident pages into Difference Engine's NRU classes from write-protect
//! faults and refaults, and reclaims the cold ones into a [`pagestore::PageStore`] (shared,
//! patched, compressed) before dropping them with `MADV_DONTNEED`; fault handler threads give
//! each page back, byte for byte, the moment anything touches it.
//!
//! Reclaim never loses a write: a page is write-protected before it is copied, and a write
//! that arrives meanwhile waits in the kernel until the page is in the store and dropped,
//! then faults it back in. See docs/pager.md.
#![warn(missing_docs)]
// userfaultfd with write-protect exists on 64-bit Linux only, where usize is u64: page
// indices and counts move between the two freely.
#![cfg_attr(
    target_pointer_width = "64",
    allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap)
)]

mod handler;
mod region;
mod scan;
pub mod stats;
pub mod uffd;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use pagestore::{Config, PageStore};
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

pub use region::Region;
pub use stats::{Form, Latency, Stats};
pub use uffd::UffdError;

use crate::region::{PAGE, RESIDENT, STORED};
use crate::stats::Counters;
use crate::uffd::{Modes, Uffd};

/// Why the pager could not start or manage a region.
#[derive(Debug, thiserror::Error)]
pub enum PagerError {
    /// userfaultfd is missing or not allowed.
    #[error(transparent)]
    Uffd(#[from] UffdError),
    /// The store configuration is invalid.
    #[error("bad page store configuration")]
    Store(#[source] pagestore::ConfigError),
    /// The region is not whole pages.
    #[error("a region must be page-aligned and a whole number of pages: {start:#x}+{len:#x}")]
    Unaligned {
        /// its start
        start: u64,
        /// its length
        len: u64,
    },
    /// mmap or mincore failed.
    #[error("cannot {0} the region")]
    Map(&'static str, #[source] std::io::Error),
    /// A thread could not start.
    #[error("cannot start the pager's {0} thread")]
    Thread(&'static str, #[source] std::io::Error),
    /// The policy is inconsistent.
    #[error("bad pager policy: {0}")]
    Policy(String),
}

/// What the store may do with a reclaimed page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Identical pages once (and zero pages not at all); the rest raw.
    Share,
    /// Sharing, and similar pages as patches.
    SharePatch,
    /// Sharing, patching, and compression of the rest.
    Full,
}

impl Mode {
    /// The page store configuration for this mode.
    pub fn store_config(self) -> Config {
        match self {
            Mode::Share => Config::sharing_only(),
            Mode::SharePatch => Config {
                max_compressed: 0,
                ..Config::default()
            },
            Mode::Full => Config::default(),
        }
    }
}

/// When and how hard the pager works: a user's trade of CPU for memory.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    /// Time between scans.
    pub interval: Duration,
    /// A page untouched for this many scans is cold (C4) and is reclaimed.
    pub cold_scans: u32,
    /// The most CPU the scanner (aging and reclaim) may use, as a fraction of one core.
    /// Fault service is never throttled.
    pub cpu_budget: f64,
    /// If set, keep the resident bytes of all regions under this, reclaiming the pages idle
    /// longest first even before they are cold.
    pub target_resident: Option<u64>,
    /// Fault handler threads: faults on different pages are served in parallel.
    pub handlers: usize,
    /// The compressor for pages that stay away, if not the store's own: zstd buys a better
    /// ratio on the coldest pages, while the store's faster one (LZ4) keeps the faults that
    /// do happen quick.
    pub cold_compression: Option<pagestore::Compression>,
    /// When `cold_compression` applies: 0, at the first reclaim of a page never seen to come
    /// back; N, to a page held compressed for N scans (times 2^backoff for a page that came
    /// back before), recompressed in place, so that a page read again soon after its
    /// reclaim comes back from the fast compressor.
    pub deep_scans: u32,
}

impl Default for Policy {
    /// Safe defaults: pages cold for 8 s, at most a quarter of a core.
    fn default() -> Self {
        Policy {
            interval: Duration::from_secs(1),
            cold_scans: 8,
            cpu_budget: 0.25,
            target_resident: None,
            handlers: 2,
            cold_compression: None,
            deep_scans: 0,
        }
    }
}

impl Policy {
    fn check(&self) -> Result<(), PagerError> {
        let bad = |s: &str| Err(PagerError::Policy(s.into()));
        if self.interval < Duration::from_millis(1) {
            return bad("the scan interval must be at least 1 ms");
        }
        if !(self.cpu_budget > 0.0 && self.cpu_budget <= 64.0) {
            return bad("the CPU budget must be a fraction of a core above 0 (e.g. 0.25)");
        }
        if !(1..=255).contains(&self.cold_scans) {
            return bad("cold-scans must be 1 to 255");
        }
        if !(1..=16).contains(&self.handlers) {
            return bad("the pager runs 1 to 16 fault handler threads");
        }
        Ok(())
    }
}

type FailureHook = Box<dyn Fn(&str) + Send + Sync>;

/// State shared by the pager's threads.
pub(crate) struct Inner {
    pub uffd: Uffd,
    pub store: PageStore,
    pub regions: RwLock<Vec<Arc<Region>>>,
    pub policy: Mutex<Policy>,
    pub counters: Counters,
    pub stop: AtomicBool,
    /// Wakes the handlers to retry deferred faults (an eventfd).
    pub kick: std::os::fd::OwnedFd,
    pub failure: Mutex<Option<String>>,
    pub on_failure: Mutex<Option<FailureHook>>,
    /// Whether the scanner runs on its own (off: only explicit reclaims).
    pub scanning: AtomicBool,
    /// Ranges the reclaimer is dropping right now. The kernel lets `MADV_DONTNEED` return
    /// once a handler has read its remove event, not once the handler has acted on it, so
    /// a handler must be able to tell our own drops (pages now in the store) from a guest's.
    pub own_removes: Mutex<Vec<(u64, u64)>>,
    /// The scanner, for a thread about to wait on it to lift out of `SCHED_IDLE`; shared
    /// with the store's contention hook.
    pub holder: Arc<scan::Holder>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner").finish_non_exhaustive()
    }
}

impl Inner {
    pub(crate) fn region_of(&self, addr: u64) -> Option<Arc<Region>> {
        let regions = self.regions.read();
        let i = regions.partition_point(|r| r.start <= addr);
        let r = regions.get(i.checked_sub(1)?)?;
        r.index(addr).map(|_| Arc::clone(r))
    }

    pub(crate) fn kick_handlers(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from `one` to the eventfd; a full counter (EAGAIN) is fine.
        unsafe {
            libc::write(
                std::os::fd::AsRawFd::as_raw_fd(&self.kick),
                (&raw const one).cast(),
                8,
            )
        };
    }

    /// The fault service cannot go on: say why, stop the owner (the VM), and release every
    /// waiting thread by unregistering, so nothing hangs.
    pub(crate) fn fail(&self, why: &str) {
        {
            let mut f = self.failure.lock();
            if f.is_some() {
                return;
            }
            *f = Some(why.to_owned());
        }
        if let Some(hook) = self.on_failure.lock().as_ref() {
            hook(why);
        }
        for r in self.regions.read().iter() {
            let _ = self.uffd.unregister(r.start, r.len);
        }
        self.stop.store(true, Ordering::SeqCst);
        self.kick_handlers();
    }
}

/// The pager: a store, the regions it manages, a scanner and fault handlers.
#[derive(Debug)]
pub struct Pager {
    inner: Arc<Inner>,
    threads: Vec<JoinHandle<()>>,
}

impl Pager {
    /// A pager whose store works in `mode`, running `policy`. The scanner starts at once;
    /// regions come with [`Pager::map_anonymous`] or [`Pager::attach`].
    pub fn new(mode: Mode, policy: Policy) -> Result<Pager, PagerError> {
        Self::with_config(mode.store_config(), policy, true)
    }

    /// A pager with an explicit store configuration; `scan` false leaves reclaim to explicit
    /// calls of [`Pager::reclaim`] (tests, benchmarks that drive it).
    pub fn with_config(config: Config, policy: Policy, scan: bool) -> Result<Pager, PagerError> {
        policy.check()?;
        let uffd = Uffd::new()?;
        if !uffd.has_write_protect() {
            return Err(UffdError::Feature("write-protect faults").into());
        }
        let store = PageStore::new(config).map_err(PagerError::Store)?;
        // SAFETY: eventfd takes an initial value and flags and returns a new fd or -1.
        let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(PagerError::Map("signal", std::io::Error::last_os_error()));
        }
        // SAFETY: the fd was just created and is owned by nothing else.
        let kick = unsafe { std::os::fd::FromRawFd::from_raw_fd(efd) };
        let holder = Arc::new(scan::Holder::default());
        let lift = Arc::clone(&holder);
        store.on_contention(Arc::new(move || lift.lift()));
        let inner = Arc::new(Inner {
            uffd,
            store,
            regions: RwLock::new(Vec::new()),
            policy: Mutex::new(policy),
            counters: Counters::default(),
            stop: AtomicBool::new(false),
            kick,
            failure: Mutex::new(None),
            on_failure: Mutex::new(None),
            scanning: AtomicBool::new(scan),
            own_removes: Mutex::new(Vec::new()),
            holder,
        });
        let mut threads = Vec::new();
        for i in 0..policy.handlers {
            let inner = Arc::clone(&inner);
            threads.push(
                std::thread::Builder::new()
                    .name(format!("pager-fault-{i}"))
                    .spawn(move || handler::run(&inner))
                    .map_err(|e| PagerError::Thread("fault handler", e))?,
            );
        }
        let scanner = Arc::clone(&inner);
        threads.push(
            std::thread::Builder::new()
                .name("pager-scan".into())
                .spawn(move || scan::run(&scanner))
                .map_err(|e| PagerError::Thread("scanner", e))?,
        );
        Ok(Pager { inner, threads })
    }

    /// Maps `len` bytes of fresh anonymous memory and manages it.
    pub fn map_anonymous(&self, len: usize, name: &str) -> Result<Arc<Region>, PagerError> {
        // SAFETY: a new private anonymous mapping; the kernel picks the address.
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
        if p == libc::MAP_FAILED {
            return Err(PagerError::Map("map", std::io::Error::last_os_error()));
        }
        self.add(p as u64, len as u64, name, true)
    }

    /// Manages an existing private anonymous mapping (guest RAM). The pages it holds now
    /// stay where they are until the scanner finds them cold.
    ///
    /// # Safety
    /// [ptr, ptr+len) must be a private anonymous mapping that stays mapped until
    /// [`Pager::detach`] returns or the pager is dropped.
    pub unsafe fn attach(
        &self,
        ptr: *mut u8,
        len: usize,
        name: &str,
    ) -> Result<Arc<Region>, PagerError> {
        self.add(ptr as u64, len as u64, name, false)
    }

    fn add(
        &self,
        start: u64,
        len: u64,
        name: &str,
        owned: bool,
    ) -> Result<Arc<Region>, PagerError> {
        if !start.is_multiple_of(PAGE) || !len.is_multiple_of(PAGE) || len == 0 {
            return Err(PagerError::Unaligned { start, len });
        }
        let region = Arc::new(Region::new(start, len, name.into(), owned));
        region
            .init_residency()
            .map_err(|e| PagerError::Map("inspect", e))?;
        self.inner.uffd.register(
            start,
            len,
            Modes {
                missing: true,
                write_protect: true,
            },
        )?;
        let mut regions = self.inner.regions.write();
        regions.push(Arc::clone(&region));
        regions.sort_by_key(|r| r.start);
        Ok(region)
    }

    /// Stops managing `region`: every page the store held for it is written back into it
    /// first (no data is dropped), then the range is unregistered.
    pub fn detach(&self, region: &Arc<Region>) -> Result<(), PagerError> {
        scan::restore_all(&self.inner, region);
        self.inner
            .regions
            .write()
            .retain(|r| !Arc::ptr_eq(r, region));
        self.inner.uffd.unregister(region.start, region.len)?;
        Ok(())
    }

    /// Stops managing `region` and drops what the store held for it, without writing it
    /// back: only for memory its owner is about to discard (a VM that has ended). Its
    /// reclaimed pages read as zero afterwards.
    pub fn forget(&self, region: &Arc<Region>) -> Result<(), PagerError> {
        self.inner
            .regions
            .write()
            .retain(|r| !Arc::ptr_eq(r, region));
        self.inner.uffd.unregister(region.start, region.len)?;
        scan::drop_all(&self.inner, region);
        Ok(())
    }

    /// Reclaims, now, every resident page of `region` that `pick` selects (by page index),
    /// whatever its age; returns how many went to the store. For tests and benchmarks that
    /// drive reclaim themselves.
    pub fn reclaim(&self, region: &Region, pick: impl Fn(usize) -> bool) -> usize {
        let ixs: Vec<usize> = (0..region.pages())
            .filter(|&ix| pick(ix) && region.load(ix).state() == RESIDENT)
            .collect();
        let mut n = 0;
        for chunk in ixs.chunks(scan::BATCH) {
            n += scan::reclaim(&self.inner, region, chunk);
        }
        n
    }

    /// Changes the policy; the scanner takes it at its next scan.
    pub fn set_policy(&self, policy: Policy) -> Result<(), PagerError> {
        policy.check()?;
        *self.inner.policy.lock() = policy;
        Ok(())
    }

    /// The policy in force.
    pub fn policy(&self) -> Policy {
        *self.inner.policy.lock()
    }

    /// Turns the scanner on or off.
    pub fn set_scanning(&self, on: bool) {
        self.inner.scanning.store(on, Ordering::SeqCst);
    }

    /// Calls `hook` with the reason if the fault service ever fails (the VMM stops the VM).
    pub fn on_failure(&self, hook: impl Fn(&str) + Send + Sync + 'static) {
        *self.inner.on_failure.lock() = Some(Box::new(hook));
    }

    /// Why the fault service failed, if it did.
    pub fn failure(&self) -> Option<String> {
        self.inner.failure.lock().clone()
    }

    /// The store that holds the reclaimed pages.
    pub fn store(&self) -> &PageStore {
        &self.inner.store
    }

    /// Everything the pager can tell.
    pub fn stats(&self) -> Stats {
        let inner = &self.inner;
        let c = &inner.counters;
        let ld = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let mut pages = stats::Pages::default();
        let mut pager_metadata = size_of::<Inner>() as u64;
        for r in inner.regions.read().iter() {
            pages.total += r.pages() as u64;
            pager_metadata += r.metadata_bytes();
            for ix in 0..r.pages() {
                let m = r.load(ix);
                match m.state() {
                    RESIDENT => pages.resident += 1,
                    STORED => pages.add_form(m.form()),
                    _ => pages.empty += 1,
                }
            }
        }
        let store = inner.store.stats();
        let store_bytes = store.held_bytes();
        let resident = pages.resident * PAGE;
        let failure = self.failure();
        Stats {
            pages,
            bytes: stats::Bytes {
                resident,
                store: store_bytes,
                pager_metadata,
                held: resident + store_bytes + pager_metadata,
                without_pager: (pages.total - pages.empty) * PAGE,
            },
            store,
            nru: stats::Nru {
                modified: ld(&c.nru[0]),
                referenced: ld(&c.nru[1]),
                idle: ld(&c.nru[2]),
                cold: ld(&c.nru[3]),
            },
            faults: stats::Faults {
                missing: ld(&c.missing),
                first_touch: ld(&c.first_touch),
                refaults: ld(&c.refaults),
                write_protect: ld(&c.write_protect),
                deferred: ld(&c.deferred),
                again: ld(&c.again),
                exists: ld(&c.exists),
                removed: ld(&c.removed),
                anomalies: ld(&c.anomalies),
            },
            latency: Form::ALL
                .iter()
                .map(|&f| (f, c.latency[f.ix()].summary()))
                .collect(),
            refault_latency: {
                let merged = stats::Histogram::default();
                for h in &c.latency[1..] {
                    h.merge_into(&merged);
                }
                merged.summary()
            },
            first_touch_latency: c.first_touch_latency.summary(),
            write_protect_latency: c.wp_latency.summary(),
            reclaimed: ld(&c.reclaimed),
            reclaim_aborted: ld(&c.reclaim_aborted),
            recompressed: ld(&c.recompressed),
            compacted_bytes: ld(&c.compacted_bytes),
            scans: ld(&c.scans),
            armed: ld(&c.armed),
            scanner_cpu_s: ld(&c.scanner_cpu_ns) as f64 / 1e9,
            handler_cpu_s: ld(&c.handler_cpu_ns) as f64 / 1e9,
            failure,
        }
    }
}

impl Drop for Pager {
    fn drop(&mut self) {
        // Give every stored page back before the regions are released: a region attached
        // from the VMM may outlive the pager, and must read back what was written.
        let regions: Vec<Arc<Region>> = self.inner.regions.read().clone();
        for r in &regions {
            if !r.owned && self.inner.failure.lock().is_none() {
                scan::restore_all(&self.inner, r);
            }
            let _ = self.inner.uffd.unregister(r.start, r.len);
        }
        self.inner.stop.store(true, Ordering::SeqCst);
        self.inner.kick_handlers();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        for r in &regions {
            if r.owned {
                // SAFETY: the pager made this mapping in map_anonymous; its threads have
                // stopped, so nothing of ours touches it any more.
                unsafe { libc::munmap(r.start().cast(), r.len()) };
            }
        }
    }
}
