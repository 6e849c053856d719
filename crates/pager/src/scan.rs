//! The scanner: NRU aging, write-protect arming, and race-free reclaim within a CPU budget.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::atomic::{AtomicBool, AtomicI32};
use std::time::{Duration, Instant};

use pagestore::{PAGE_SIZE, PageId, is_zero};

use crate::Inner;
use crate::region::{
    ARMED, Aged, BUSY_FAULT, BUSY_RECLAIM, DEEP, EMPTY, Meta, PAGE, RESIDENT, Region, STORED,
};
use crate::stats::{Form, thread_cpu_ns};
use crate::uffd::Resolved;

/// Pages reclaimed per batch: one write-protect and one `MADV_DONTNEED` per contiguous run,
/// and one remove event for the handlers to read per run.
pub(crate) const BATCH: usize = 256;

/// The scanner's scheduling. Its aging and compressing can always wait, and a vCPU that
/// waits for a CPU behind it loses that time, so it runs in `SCHED_IDLE`: any other thread
/// that wakes takes the CPU from it at once (nice 19 alone does not promise that). But a
/// starved idle thread that holds what fault handlers, and so vCPUs, wait for could keep
/// them waiting for seconds on a busy host. So a thread that is about to wait on the scanner
/// lifts it to the default class until it holds nothing again ([`Holder`]): a handler that
/// finds a page busy with reclaim, and any thread that would wait for a store lock (the
/// store's contention hook). Compaction, which holds a shard's lock for a millisecond or
/// two, runs in the default class throughout ([`Urgent`]). Leaving `SCHED_IDLE` needs the
/// right to nice 0 (`CAP_SYS_NICE` or `RLIMIT_NICE` of 20); without it, the scanner stays
/// in the default class at nice 5, as ksmd does.
fn idle_priority() {
    if can_return_to_nice_0() {
        set_class(0, libc::SCHED_IDLE);
    } else {
        // SAFETY: setpriority on this thread's own id; lowering one's priority needs no
        // privilege, and if it fails the scanner runs at nice 0.
        unsafe {
            libc::setpriority(libc::PRIO_PROCESS, libc::gettid().cast_unsigned(), 5);
        }
    }
}

/// Whether this thread may raise its priority back to nice 0 (the kernel's test for leaving
/// `SCHED_IDLE` too): tried by going to nice 1 and back. If the way back is refused, the
/// thread stays at nice 1, which is harmless for the scanner.
fn can_return_to_nice_0() -> bool {
    // SAFETY: setpriority on this thread's own id with valid nice values; it changes nothing
    // else.
    unsafe {
        let me = libc::gettid().cast_unsigned();
        libc::setpriority(libc::PRIO_PROCESS, me, 1) == 0
            && libc::setpriority(libc::PRIO_PROCESS, me, 0) == 0
    }
}

/// Sets the scheduling class (`SCHED_IDLE` or `SCHED_OTHER`) of thread `tid` of this
/// process (0: the calling thread); false if refused.
fn set_class(tid: libc::pid_t, policy: libc::c_int) -> bool {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler on a thread of this process with a valid sched_param that
    // lives across the call; it changes nothing but that thread's class.
    unsafe { libc::sched_setscheduler(tid, policy, &raw const param) == 0 }
}

/// Whether the calling thread runs in `SCHED_IDLE`.
fn in_idle_class() -> bool {
    // SAFETY: sched_getscheduler(0) only reads the calling thread's class.
    unsafe { libc::sched_getscheduler(0) == libc::SCHED_IDLE }
}

/// While it lives, a thread in `SCHED_IDLE` runs in the default class (see
/// [`idle_priority`]); any other thread is left as it is.
struct Urgent(bool);

impl Urgent {
    fn new() -> Urgent {
        Urgent(in_idle_class() && set_class(0, libc::SCHED_OTHER))
    }
}

impl Drop for Urgent {
    fn drop(&mut self) {
        if self.0 {
            set_class(0, libc::SCHED_IDLE);
        }
    }
}

/// The scanner thread, while it runs in `SCHED_IDLE`, whether it holds anything others may
/// wait for (busy pages, a store lock), and whether a waiter has lifted it to the default
/// class: priority inheritance, where the waiters say they wait. A waiter cannot tell whose
/// lock it waits for, so a lift counts only while the scanner is engaged; it lasts until the
/// scanner lets go. A lift that lands just as the scanner lets go is undone when it next
/// engages or waits idle (at most 50 ms later); one that is lost the same way was not
/// waiting on it.
#[derive(Debug, Default)]
pub(crate) struct Holder {
    /// The scanner's thread id; 0 when there is none in `SCHED_IDLE`.
    tid: AtomicI32,
    engaged: AtomicBool,
    lifted: AtomicBool,
}

thread_local! {
    /// Whether this thread is a registered scanner: reclaim also runs on callers' threads
    /// (`Pager::reclaim`), which are not the one a lift would reach.
    static SCANNER: Cell<bool> = const { Cell::new(false) };
}

impl Holder {
    /// Registers the calling thread (the scanner) if it runs in `SCHED_IDLE`.
    fn register(&self) {
        if in_idle_class() {
            // SAFETY: gettid has no preconditions.
            self.tid.store(unsafe { libc::gettid() }, SeqCst);
            SCANNER.set(true);
        }
    }

    /// The scanner is ending. A lift that read its id just before this could still reach
    /// the id once the thread is gone; ids are handed out in turn up to `pid_max`, so one
    /// is not reused within the microseconds that would take.
    fn unregister(&self) {
        self.tid.store(0, SeqCst);
        SCANNER.set(false);
    }

    /// While the guard lives, the calling thread, if it is the scanner, may hold what others
    /// wait for, and a waiter lifts it.
    fn engage(&self) -> Engaged<'_> {
        let scanner = SCANNER.get();
        if scanner {
            // A lift that landed after the last letting go is undone first: left set, it
            // would make a lift during this span do nothing.
            self.settle_down();
            self.engaged.store(true, SeqCst);
        }
        Engaged(self, scanner)
    }

    /// Someone is about to wait, maybe for what the scanner holds: if it is engaged, it
    /// runs in the default class until it lets go.
    pub(crate) fn lift(&self) {
        if !self.engaged.load(SeqCst) {
            return;
        }
        let tid = self.tid.load(SeqCst);
        if tid != 0 && !self.lifted.swap(true, SeqCst) && !set_class(tid, libc::SCHED_OTHER) {
            self.lifted.store(false, SeqCst);
        }
    }

    /// [`Holder::lift`] if `m`, the word of a page found busy, says reclaim holds it.
    pub(crate) fn lift_for(&self, m: Meta) {
        if m.0 & BUSY_RECLAIM != 0 {
            self.lift();
        }
    }

    /// Called by the scanner where it holds nothing: back to `SCHED_IDLE` if lifted. The
    /// class goes first: a lift between the two steps finds `lifted` set and does nothing,
    /// which is right, as nothing is held.
    fn settle_down(&self) {
        if self.lifted.load(SeqCst) {
            set_class(0, libc::SCHED_IDLE);
            self.lifted.store(false, SeqCst);
        }
    }
}

/// The scanner's engagement ([`Holder::engage`]); the bool says whether it is the scanner.
struct Engaged<'a>(&'a Holder, bool);

impl Drop for Engaged<'_> {
    fn drop(&mut self) {
        if self.1 {
            self.0.engaged.store(false, SeqCst);
            self.0.settle_down();
        }
    }
}

pub(crate) fn run(inner: &Arc<Inner>) {
    idle_priority();
    inner.holder.register();
    let mut cpu_mark = thread_cpu_ns();
    let mut next = Instant::now();
    while !inner.stop.load(Relaxed) {
        let policy = *inner.policy.lock();
        let now = Instant::now();
        if now < next || !inner.scanning.load(Relaxed) {
            let wait = next
                .saturating_duration_since(now)
                .min(Duration::from_millis(50));
            inner.holder.settle_down();
            std::thread::sleep(wait.max(Duration::from_millis(1)));
            continue;
        }
        let started = Instant::now();
        let start_cpu = thread_cpu_ns();
        scan_once(inner, &policy, started, start_cpu);
        inner.counters.scans.fetch_add(1, Relaxed);
        let cpu = thread_cpu_ns();
        inner
            .counters
            .scanner_cpu_ns
            .fetch_add(cpu.saturating_sub(cpu_mark), Relaxed);
        cpu_mark = cpu;
        next = started + policy.interval;
    }
    inner.holder.unregister();
}

/// A policy's number of scans (idle before a page is cold, or stored before it is
/// recompressed), doubled for each step of the page's backoff, but within what a page's age
/// can count (255), or a page that kept coming back would never be taken again.
fn backed_off(scans: u32, backoff: u32) -> u32 {
    scans.saturating_mul(1 << backoff).min(255)
}

/// Sleeps as long as it takes for the CPU spent since `start_cpu` to fit the budget.
fn throttle(inner: &Inner, budget: f64, started: Instant, start_cpu: u64) {
    let used = thread_cpu_ns().saturating_sub(start_cpu) as f64 / 1e9;
    let allowed = started.elapsed().as_secs_f64() * budget;
    if used > allowed && !inner.stop.load(Relaxed) {
        std::thread::sleep(Duration::from_secs_f64(
            ((used - allowed) / budget).min(1.0),
        ));
    }
}

fn scan_once(inner: &Inner, policy: &crate::Policy, started: Instant, start_cpu: u64) {
    let regions: Vec<Arc<Region>> = inner.regions.read().clone();
    let mut nru = [0u64; 4];
    // (region, page) of the cold pages, and (age, region, page) of the idle ones that a
    // target may take too.
    let mut cold: Vec<(usize, usize)> = Vec::new();
    let mut warm: Vec<(u32, usize, usize)> = Vec::new();
    // (region, page) of the stored pages held compressed long enough to recompress.
    let mut deep: Vec<(usize, usize)> = Vec::new();
    let deepen = policy.cold_compression.is_some() && policy.deep_scans > 0;
    let mut resident = 0u64;
    let mut armed = 0u64;
    for (ri, region) in regions.iter().enumerate() {
        let mut arm_from: Option<usize> = None;
        for ix in 0..region.pages() {
            // A page not mapped (stored or empty) costs nothing to protect: it may lengthen
            // a run, but never starts one.
            let mut arm = arm_from.is_some();
            let mut verdict = None;
            let mut due = false;
            region.update(ix, |m| {
                if m.state() == STORED && deepen {
                    // A stored page's age counts the scans it has stayed away.
                    // Raw too: LZ4 leaves a page raw above 3/4 of a page, zstd may not.
                    if !matches!(m.form(), Form::Compressed | Form::Raw) || m.0 & DEEP != 0 {
                        return None;
                    }
                    let age = (m.age() + 1).min(255);
                    due = age >= backed_off(policy.deep_scans, m.backoff());
                    return Some(m.with_age(age));
                }
                if m.state() != RESIDENT {
                    return None;
                }
                let (mut n, a) = m.aged();
                verdict = Some((a, n.backoff()));
                // A resting hot page is left writable; one protected already and not
                // written since needs nothing, and protecting it again would cost the guest.
                arm = !matches!(a, Aged::Modified { arm: false }) && n.0 & ARMED == 0;
                if arm {
                    n = n.set(ARMED);
                }
                Some(n)
            });
            if due {
                deep.push((ri, ix));
            }
            if let Some((a, backoff)) = verdict {
                resident += 1;
                armed += u64::from(arm);
                match a {
                    Aged::Modified { .. } => nru[0] += 1,
                    Aged::Referenced => nru[1] += 1,
                    Aged::Idle { age } => {
                        nru[if age >= policy.cold_scans { 3 } else { 2 }] += 1;
                        if age >= backed_off(policy.cold_scans, backoff) {
                            cold.push((ri, ix));
                        } else if policy.target_resident.is_some() {
                            warm.push((age, ri, ix));
                        }
                    }
                }
            }
            // Arm write protection in runs; a resting hot page breaks a run.
            match (arm, arm_from) {
                (true, None) => arm_from = Some(ix),
                (false, Some(from)) => {
                    arm_range(inner, region, from, ix);
                    arm_from = None;
                }
                _ => {}
            }
        }
        if let Some(from) = arm_from {
            arm_range(inner, region, from, region.pages());
        }
        throttle(inner, policy.cpu_budget, started, start_cpu);
    }
    inner.counters.armed.fetch_add(armed, Relaxed);
    for (slot, n) in inner.counters.nru.iter().zip(nru) {
        slot.store(n, Relaxed);
    }
    // Cold pages go first, in address order so that runs are long; then, with a target,
    // idle pages, longest idle first, until under it.
    // The scan found cold pages in address order already.
    warm.sort_unstable_by_key(|p| std::cmp::Reverse(p.0));
    let mut over = policy
        .target_resident
        .map_or(0, |t| (resident * PAGE).saturating_sub(t) / PAGE);
    let mut batch: Vec<usize> = Vec::with_capacity(BATCH);
    let mut batch_region = usize::MAX;
    let n_cold = cold.len();
    let warm = warm.into_iter().map(|(_, ri, ix)| (ri, ix));
    for (i, (ri, ix)) in cold.into_iter().chain(warm).enumerate() {
        if i >= n_cold && over == 0 {
            break;
        }
        if ri != batch_region || batch.len() == BATCH {
            if !batch.is_empty() {
                let n = reclaim(inner, &regions[batch_region], &batch);
                over = over.saturating_sub(n as u64);
                throttle(inner, policy.cpu_budget, started, start_cpu);
            }
            batch.clear();
            batch_region = ri;
        }
        batch.push(ix);
        if inner.stop.load(Relaxed) || !inner.scanning.load(Relaxed) {
            return;
        }
    }
    if !batch.is_empty() {
        reclaim(inner, &regions[batch_region], &batch);
    }
    if let Some(cold) = policy.cold_compression {
        recompress(
            inner,
            &regions,
            &deep,
            cold,
            policy.cpu_budget,
            started,
            start_cpu,
        );
    }
    // Refaults free store space and recompression leaves holes: give whole chunks back.
    let freed = {
        let _urgent = Urgent::new();
        inner.store.compact(COMPACT_AT)
    };
    if freed > 0 {
        inner
            .counters
            .compacted_bytes
            .fetch_add(freed as u64, Relaxed);
        // SAFETY: malloc_trim only hands free heap memory back to the system.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

/// Pages LZ4 holds in fewer bytes are not recompressed: zstd would save a few dozen bytes
/// of each, for the same CPU as any page. On the mixed set of `bench memory` (40 s, 4
/// guests) recompressing every page held 159.9 MiB; from 1 KiB up, 163.5 MiB; from 2 KiB
/// up, 185.4 MiB (CPU differences were within the noise of single runs).
const RECOMPRESS_MIN_BYTES: usize = 512;

/// Compact the store once this much of a shard's arena is free space: a shard's copy
/// takes a millisecond or two, and refaults free about 1% of the store a second.
const COMPACT_AT: f64 = 0.0625;

/// Recompresses the stored pages `deep` with `cold`, in place: their ids and bytes stay,
/// so a fault racing with this reads the page either way. A page that came back meanwhile
/// is skipped (its id is no longer held, or its meta word says so).
fn recompress(
    inner: &Inner,
    regions: &[Arc<Region>],
    deep: &[(usize, usize)],
    cold: pagestore::Compression,
    budget: f64,
    started: Instant,
    start_cpu: u64,
) {
    for (n, &(ri, ix)) in deep.iter().enumerate() {
        if inner.stop.load(Relaxed) || !inner.scanning.load(Relaxed) {
            return;
        }
        let region = &regions[ri];
        let id = PageId::from_u64(region.ids[ix].load(Relaxed));
        // The page was tried for a patch at reclaim: compression alone now. References
        // too: kept as LZ4 (or raw) they held 2.5 MiB more of 115 in `bench memory`, and
        // the patched faults they would speed up are 6% of all.
        let how = pagestore::Reencode {
            compression: cold,
            patch: false,
            references: true,
            min_bytes: RECOMPRESS_MIN_BYTES,
        };
        // In SCHED_IDLE: reencode compresses outside the shard's lock, and a fault that
        // would wait for that lock lifts the scanner (the store's contention hook).
        let done = {
            let _engaged = inner.holder.engage();
            matches!(inner.store.reencode(id, how), Ok(Some(_)))
        };
        // Marked even when no smaller, so it is not tried again while it stays away. The
        // id is checked under the meta word's update: ids change only while a page is busy.
        let marked = region.update(ix, |m| {
            if m.state() != STORED || region.ids[ix].load(Relaxed) != id.as_u64() {
                return None;
            }
            let m = m.set(DEEP);
            Some(if done {
                m.with_form(Form::Compressed)
            } else {
                m
            })
        });
        if done && marked.is_some() {
            inner.counters.recompressed.fetch_add(1, Relaxed);
        }
        if n % 64 == 63 {
            throttle(inner, budget, started, start_cpu);
        }
    }
}

fn arm_range(inner: &Inner, region: &Region, from: usize, to: usize) {
    if from >= to {
        return;
    }
    let len = (to - from) as u64 * PAGE;
    // Arming is only a hint for aging (reclaim protects each page itself), so a retry
    // later is as good as now: the next scan arms again what this one could not.
    if !matches!(
        inner.uffd.write_protect(region.addr(from), len, true),
        Ok(Resolved::Done | Resolved::Exists)
    ) {
        for ix in from..to {
            region.update(ix, |m| (m.0 & ARMED != 0).then(|| m.clear(ARMED)));
        }
    }
}

/// Calls `f` on each run of consecutive page indices in `ixs` (sorted).
fn runs(ixs: &[usize], mut f: impl FnMut(usize, usize)) {
    let mut i = 0;
    while i < ixs.len() {
        let mut j = i + 1;
        while j < ixs.len() && ixs[j] == ixs[j - 1] + 1 {
            j += 1;
        }
        f(ixs[i], ixs[j - 1] + 1);
        i = j;
    }
}

/// Retries a write-protect or drop that the kernel refused for an unread remove event:
/// the handlers read it within microseconds.
fn until_done(mut f: impl FnMut() -> Result<Resolved, crate::UffdError>) -> bool {
    for _ in 0..100_000 {
        match f() {
            Ok(Resolved::Again) => std::thread::yield_now(),
            Ok(_) => return true,
            Err(_) => return false,
        }
    }
    false
}

/// Reclaims the pages `ixs` (sorted) of `region`: write-protect, copy, store, drop, then
/// encode. Returns how many went to the store. A page that is busy or not resident is
/// skipped.
pub(crate) fn reclaim(inner: &Inner, region: &Region, ixs: &[usize]) -> usize {
    let mut raw = Vec::new();
    // The pages are busy from here until stored: a fault on one waits for this batch, and
    // lifts the scanner out of SCHED_IDLE until then.
    let n = {
        let _engaged = inner.holder.engage();
        take(inner, region, ixs, &mut raw)
    };
    settle(inner, region, &raw);
    n
}

/// Patches or compresses the pages `raw` (page, id, compressor) that [`take`] stored raw,
/// in place, as [`recompress`] does: a fault meanwhile reads the raw copy, or the new form.
/// Done after the pages are released and in the scanner's idle class: when `take` encoded
/// them while they were busy, in the default class, the guests felt it (docs/pager.md).
fn settle(inner: &Inner, region: &Region, raw: &[(usize, PageId, pagestore::Compression)]) {
    for &(ix, id, compression) in raw {
        let done = {
            let _engaged = inner.holder.engage();
            inner
                .store
                .reencode(id, pagestore::Reencode::settle(compression))
        };
        let Ok(Some(outcome)) = done else {
            // Nothing smaller (it stays raw, as an insert would have left it), or the page
            // came back meanwhile.
            continue;
        };
        // The page's meta word is told only if it still holds this id: a fault (which
        // removes it from the store) may have come between.
        region.update(ix, |m| {
            (m.state() == STORED
                && m.form() == Form::Raw
                && region.ids[ix].load(Relaxed) == id.as_u64())
            .then(|| m.with_form(Form::of(outcome)))
        });
    }
}

/// Reclaim's part while the pages are busy: write-protect, copy, store, drop. Pages stored
/// raw that the store could patch or compress are pushed to `raw` for [`settle`].
fn take(
    inner: &Inner,
    region: &Region,
    ixs: &[usize],
    raw: &mut Vec<(usize, PageId, pagestore::Compression)>,
) -> usize {
    let c = &inner.counters;
    let mut ixs: Vec<usize> = ixs.to_vec();
    ixs.sort_unstable();
    let mut locked: Vec<(usize, Meta)> = Vec::with_capacity(ixs.len());
    for &ix in &ixs {
        if let Ok(m) = region.try_lock(ix, BUSY_RECLAIM) {
            if m.state() == RESIDENT {
                locked.push((ix, m));
            } else {
                region.unlock(ix, m);
            }
        }
    }
    if locked.is_empty() {
        return 0;
    }
    // 1. Write-protect: from here no one can change these pages.
    let lix: Vec<usize> = locked.iter().map(|p| p.0).collect();
    let mut protected = true;
    runs(&lix, |a, b| {
        let (addr, len) = (region.addr(a), (b - a) as u64 * PAGE);
        protected &= until_done(|| inner.uffd.write_protect(addr, len, true));
    });
    if !protected {
        for &(ix, m) in &locked {
            region.unlock(ix, m);
        }
        c.reclaim_aborted.fetch_add(locked.len() as u64, Relaxed);
        return 0;
    }
    // 2. Copy each page out and into the store.
    let (cold_compression, deep_scans) = {
        let p = inner.policy.lock();
        (p.cold_compression, p.deep_scans)
    };
    let cfg = inner.store.config();
    // Deferred only where there is encoding to defer: sharing alone stores raw anyway.
    let defer = cfg.patch.is_some() || cfg.max_compressed > 0;
    let mut page = Box::new([0u8; PAGE_SIZE]);
    let mut stored: Vec<(usize, Meta, PageId, Form)> = Vec::with_capacity(locked.len());
    for &(ix, m) in &locked {
        // SAFETY: the page lies inside the region's mapping, which stays mapped while the
        // region is managed; it is write-protected, so its bytes cannot change under us.
        unsafe {
            std::ptr::copy_nonoverlapping(
                region.addr(ix) as *const u8,
                page.as_mut_ptr(),
                PAGE_SIZE,
            );
        }
        if is_zero(&page) {
            stored.push((ix, m, PageId::ZERO, Form::Zero));
            continue;
        }
        // With deep_scans, the cold compressor waits until a page has stayed away.
        let compression = match cold_compression {
            Some(c) if m.backoff() == 0 && deep_scans == 0 => c,
            _ => cfg.compression,
        };
        let done = if defer {
            inner.store.insert_raw(&page)
        } else {
            inner.store.insert_compressed_with(&page, compression)
        };
        match done {
            Ok((id, outcome)) => {
                if defer && outcome == pagestore::Outcome::Raw {
                    raw.push((ix, id, compression));
                }
                stored.push((ix, m, id, Form::of(outcome)));
            }
            Err(_) => {
                region.unlock(ix, m);
                c.reclaim_aborted.fetch_add(1, Relaxed);
            }
        }
    }
    // 3. Publish "stored" (still held), then drop the frames. A fault from now on waits
    //    for the unlock below and is served from the store.
    for &(ix, m, id, form) in &stored {
        region.ids[ix].store(id.as_u64(), Relaxed);
        let held = m.with_state(STORED).with_form(form).set(BUSY_RECLAIM);
        region.meta[ix].store(held.0, std::sync::atomic::Ordering::Release);
    }
    let six: Vec<usize> = stored.iter().map(|p| p.0).collect();
    let mut dropped = true;
    runs(&six, |a, b| {
        let range = (region.addr(a), region.addr(b));
        inner.own_removes.lock().push(range);
        // SAFETY: [a, b) pages lie inside the region's mapping; dropping them is what
        // reclaim is for, and their content is in the store.
        let r = unsafe {
            libc::madvise(
                region.addr(a) as *mut libc::c_void,
                (b - a) * PAGE_SIZE,
                libc::MADV_DONTNEED,
            )
        };
        dropped &= r == 0;
    });
    if !dropped {
        // madvise on a private anonymous mapping fails only if it was unmapped under us;
        // the pages are gone either way. Fail loudly rather than guess.
        inner.fail(&format!("MADV_DONTNEED failed on {}", region.name));
    }
    for &(ix, m, _, form) in &stored {
        region.unlock(
            ix,
            m.with_state(STORED).with_form(form).with_age(0).clear(DEEP),
        );
    }
    c.reclaimed.fetch_add(stored.len() as u64, Relaxed);
    inner.kick_handlers();
    stored.len()
}

/// Writes every stored page of `region` back into it (detach: nothing is lost).
pub(crate) fn restore_all(inner: &Inner, region: &Region) {
    let mut page = Box::new([0u8; PAGE_SIZE]);
    for ix in 0..region.pages() {
        loop {
            match region.try_lock(ix, BUSY_FAULT) {
                Ok(m) if m.state() == STORED => {
                    let id = PageId::from_u64(region.ids[ix].load(Relaxed));
                    if m.form() == Form::Zero {
                        page.fill(0);
                    } else if inner.store.read(id, &mut page).is_err() {
                        region.unlock(ix, m);
                        break;
                    }
                    let ok = until_done(|| inner.uffd.copy(region.addr(ix), &page, true));
                    if ok {
                        if m.form() != Form::Zero {
                            let _ = inner.store.remove(id);
                        }
                        region.unlock(ix, m.with_state(RESIDENT));
                    } else {
                        region.unlock(ix, m);
                    }
                    break;
                }
                Ok(m) => {
                    region.unlock(ix, m);
                    break;
                }
                Err(m) => wait_for(inner, m),
            }
        }
    }
}

/// Waits a moment for a page busy as `m` says, lifting the scanner if it holds the page.
fn wait_for(inner: &Inner, m: Meta) {
    inner.holder.lift_for(m);
    std::thread::yield_now();
}

/// Forgets every stored page of `region` (its owner discards the memory).
pub(crate) fn drop_all(inner: &Inner, region: &Region) {
    for ix in 0..region.pages() {
        loop {
            match region.try_lock(ix, BUSY_FAULT) {
                Ok(m) => {
                    if m.state() == STORED && m.form() != Form::Zero {
                        let _ = inner
                            .store
                            .remove(PageId::from_u64(region.ids[ix].load(Relaxed)));
                    }
                    region.unlock(ix, m.with_state(EMPTY));
                    break;
                }
                Err(m) => wait_for(inner, m),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scanner_leaves_sched_idle_while_guests_wait_on_it() {
        std::thread::spawn(|| {
            let class = || {
                // SAFETY: reads the calling thread's class.
                unsafe { libc::sched_getscheduler(0) }
            };
            idle_priority();
            if !can_return_to_nice_0() {
                // Unprivileged: the default class at nice 5, never SCHED_IDLE.
                assert_eq!(class(), libc::SCHED_OTHER);
                return;
            }
            assert_eq!(class(), libc::SCHED_IDLE);
            {
                let _urgent = Urgent::new();
                assert_eq!(class(), libc::SCHED_OTHER);
                // Nested: the inner guard finds the default class and leaves it.
                drop(Urgent::new());
                assert_eq!(class(), libc::SCHED_OTHER);
            }
            assert_eq!(class(), libc::SCHED_IDLE);
            // Lifted by a waiter (another thread) only while engaged, until it lets go; a
            // lift once it has ended reaches no one.
            let holder = Holder::default();
            holder.register();
            let lift = || std::thread::scope(|s| s.spawn(|| holder.lift()).join().unwrap());
            lift();
            assert_eq!(
                class(),
                libc::SCHED_IDLE,
                "not engaged: nothing to wait for"
            );
            {
                let _engaged = holder.engage();
                assert_eq!(class(), libc::SCHED_IDLE);
                lift();
                assert_eq!(class(), libc::SCHED_OTHER);
                holder.lift();
            }
            assert_eq!(class(), libc::SCHED_IDLE);
            holder.settle_down();
            assert_eq!(class(), libc::SCHED_IDLE);
            holder.unregister();
            let _engaged = holder.engage();
            lift();
            assert_eq!(class(), libc::SCHED_IDLE);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_page_that_kept_coming_back_can_still_go_cold() {
        assert_eq!(backed_off(5, 0), 5);
        assert_eq!(backed_off(5, 4), 80);
        // 5 × 64 is past what an age counts: the threshold stops at 255.
        assert_eq!(backed_off(5, crate::region::MAX_BACKOFF), 255);
        assert_eq!(backed_off(255, crate::region::MAX_BACKOFF), 255);
    }
}
