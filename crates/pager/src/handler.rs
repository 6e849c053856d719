//! Fault service: missing faults rebuilt from the store, write-protect faults recorded and
//! lifted, remove events applied to the books.
//!
//! Every handler thread reads the one userfaultfd and never waits on a page: a fault on a
//! page that the reclaimer (or another handler) holds is set aside and retried when the
//! holder kicks the eventfd. This matters because the reclaimer's own `MADV_DONTNEED` blocks
//! in the kernel until a handler has read the remove event it raises: a handler that waited
//! for the reclaimer would wait forever.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use pagestore::{PAGE_SIZE, PageId};

use crate::Inner;
use crate::region::{ARMED, BUSY_RECLAIM, WRITTEN};
use crate::region::{BUSY_FAULT, EMPTY, MAX_BACKOFF, Meta, REFAULTED, RESIDENT, Region, STORED};
use crate::stats::{Form, thread_cpu_ns};
use crate::uffd::{Event, Resolved};

/// A fault set aside longer than this means something holds a page for good: the service
/// stops with an error rather than leave the faulting thread hanging.
const STUCK: Duration = Duration::from_secs(10);

#[repr(C, align(4096))]
struct PageBuf([u8; PAGE_SIZE]);

static ZEROS: PageBuf = PageBuf([0; PAGE_SIZE]);

/// What handling one event came to.
enum Done {
    /// Served (or nothing to do).
    Yes,
    /// Retry later.
    Later,
}

pub(crate) fn run(inner: &Arc<Inner>) {
    let mut buf = Box::new(PageBuf([0; PAGE_SIZE]));
    let mut events = [Event::Other(0); 16];
    let mut deferred: Vec<(Event, Instant, Instant)> = Vec::new();
    let mut cpu_mark = thread_cpu_ns();
    let kick_fd = std::os::fd::AsRawFd::as_raw_fd(&inner.kick);
    while !inner.stop.load(Relaxed) {
        let mut fds = [
            libc::pollfd {
                fd: inner.uffd.raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: kick_fd,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // With faults set aside, look again soon even if no one kicks.
        let timeout = if deferred.is_empty() { 100 } else { 1 };
        // SAFETY: two valid pollfds, for the length given.
        unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
        if fds[1].revents & libc::POLLIN != 0 {
            let mut v: u64 = 0;
            // SAFETY: reads the eventfd's 8-byte counter into `v`.
            unsafe { libc::read(kick_fd, (&raw mut v).cast(), 8) };
        }
        loop {
            let n = match inner.uffd.read(&mut events) {
                Ok(n) => n,
                Err(e) => {
                    inner.fail(&format!("reading faults: {e}"));
                    return;
                }
            };
            for &ev in &events[..n] {
                let t0 = Instant::now();
                if let Done::Later = handle(inner, ev, &mut buf.0, t0) {
                    inner.counters.deferred.fetch_add(1, Relaxed);
                    deferred.push((ev, t0, t0));
                }
            }
            if n < events.len() {
                break;
            }
        }
        if !deferred.is_empty() {
            let now = Instant::now();
            let mut keep = Vec::with_capacity(deferred.len());
            for (ev, first, _) in deferred.drain(..) {
                if let Done::Later = handle(inner, ev, &mut buf.0, first) {
                    if now.duration_since(first) > STUCK {
                        inner.fail(&format!(
                            "a fault ({ev:?}) waited {} s for its page",
                            STUCK.as_secs()
                        ));
                        return;
                    }
                    keep.push((ev, first, now));
                }
            }
            deferred = keep;
        }
        let now = thread_cpu_ns();
        inner
            .counters
            .handler_cpu_ns
            .fetch_add(now.saturating_sub(cpu_mark), Relaxed);
        cpu_mark = now;
    }
}

fn handle(inner: &Inner, ev: Event, buf: &mut [u8; PAGE_SIZE], t0: Instant) -> Done {
    match ev {
        Event::Missing { addr, write } => missing(inner, addr, write, buf, t0),
        Event::WriteProtect { addr } => write_protect(inner, addr, t0),
        Event::Remove { start, end } => {
            remove(inner, start, end);
            Done::Yes
        }
        Event::Other(_) => Done::Yes,
    }
}

fn elapsed_ns(t0: Instant) -> u64 {
    u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Maps a zero page at `addr` (a copy of zeros if the thread is writing, which saves it a
/// second fault); wakes the thread only if `wake`, so that a caller can first bring its
/// books up to date.
fn zero_fill(inner: &Inner, addr: u64, write: bool, wake: bool) -> Result<Resolved, String> {
    let r = if write {
        inner.uffd.copy(addr, &ZEROS.0, wake)
    } else {
        inner.uffd.zeropage(addr, wake)
    };
    r.map_err(|e| format!("filling page {addr:#x}: {e}"))
}

fn missing(inner: &Inner, addr: u64, write: bool, buf: &mut [u8; PAGE_SIZE], t0: Instant) -> Done {
    let c = &inner.counters;
    let Some(region) = inner.region_of(addr) else {
        // Not ours (a region being detached): waking lets the thread retry without us.
        let _ = inner.uffd.wake(addr, 4096);
        return Done::Yes;
    };
    let ix = region.index(addr).expect("region_of checked");
    let m = match region.try_lock(ix, BUSY_FAULT) {
        Ok(m) => m,
        Err(m) if m.0 & BUSY_RECLAIM != 0 && m.state() == RESIDENT => {
            // The reclaimer holds a page that our books call resident, yet it is missing:
            // someone else dropped it (MADV_DONTNEED), so its content is zero. The
            // reclaimer may be reading it right now and waits for this very fault.
            return match zero_fill(inner, addr, write, true) {
                Ok(Resolved::Again) => Done::Later,
                Ok(Resolved::Exists) => {
                    let _ = inner.uffd.wake(addr, 4096);
                    Done::Yes
                }
                Ok(Resolved::Done) => Done::Yes,
                Err(e) => {
                    inner.fail(&e);
                    Done::Yes
                }
            };
        }
        Err(m) => {
            inner.holder.lift_for(m);
            return Done::Later;
        }
    };
    match m.state() {
        STORED => {
            let id = PageId::from_u64(region.ids[ix].load(Relaxed));
            let form = m.form();
            if form == Form::Zero {
                buf.fill(0);
            } else if let Err(e) = inner.store.read(id, buf) {
                region.unlock(ix, m);
                inner.fail(&format!(
                    "the store cannot give back page {addr:#x} of {}: {e}",
                    region.name
                ));
                return Done::Yes;
            }
            // Mapped and woken in one ioctl (a separate wake cost every refault another):
            // the page stays locked until the books below say where it is, so a reclaim or
            // a second fault waits for them.
            let r = if form == Form::Zero && !write {
                inner.uffd.zeropage(addr, true)
            } else {
                inner.uffd.copy(addr, buf, true)
            };
            match r {
                Ok(Resolved::Done) => {
                    // Reads are invisible to the scanner, so a page that comes back is the
                    // only sign it is read: wait sixteen times as long before taking it
                    // again (64 times after a second return, within the 255 scans an age
                    // counts). A wrong guess costs the guest a fault and KVM's exits with it,
                    // far more than the page's 4 KiB held a minute longer.
                    let back = (m.backoff() + 4).min(MAX_BACKOFF);
                    let mut n = m.with_state(RESIDENT).with_age(0).with_backoff(back);
                    n = n.set(if write { WRITTEN } else { REFAULTED });
                    region.unlock(ix, n);
                    c.latency[form.ix()].record(elapsed_ns(t0));
                    // The store's copy goes once the thread runs again: freeing a whole page
                    // decodes it once more (its similarity keys), which no fault should wait
                    // for. The id was read under the page's lock, so it is this page's.
                    if form != Form::Zero {
                        let _ = inner.store.remove(id);
                    }
                    // Counted once the copy is gone, so that a count says the store is done.
                    c.missing.fetch_add(1, Relaxed);
                    c.refaults.fetch_add(1, Relaxed);
                    Done::Yes
                }
                Ok(Resolved::Again) => {
                    c.again.fetch_add(1, Relaxed);
                    region.unlock(ix, m);
                    Done::Later
                }
                Ok(Resolved::Exists) => {
                    // Our books say the page is in the store and only we map pages: this
                    // cannot happen. Keep the stored copy (never lose data), wake, count.
                    c.anomalies.fetch_add(1, Relaxed);
                    region.unlock(ix, m);
                    let _ = inner.uffd.wake(addr, 4096);
                    Done::Yes
                }
                Err(e) => {
                    region.unlock(ix, m);
                    inner.fail(&format!("giving back page {addr:#x}: {e}"));
                    Done::Yes
                }
            }
        }
        // Never populated, dropped by its owner, or (resident) dropped by someone else whose
        // remove event is not read yet, or a second message for a page already served.
        _ => match zero_fill(inner, addr, write, false) {
            Ok(Resolved::Again) => {
                c.again.fetch_add(1, Relaxed);
                region.unlock(ix, m);
                Done::Later
            }
            Ok(r) => {
                let mut n = m.with_state(RESIDENT);
                if m.state() != RESIDENT {
                    n = n.with_age(0);
                }
                if write {
                    n = n.set(WRITTEN);
                }
                region.unlock(ix, n);
                let _ = inner.uffd.wake(addr, 4096);
                if r == Resolved::Exists {
                    c.exists.fetch_add(1, Relaxed);
                } else {
                    c.missing.fetch_add(1, Relaxed);
                    c.first_touch.fetch_add(1, Relaxed);
                    c.first_touch_latency.record(elapsed_ns(t0));
                }
                Done::Yes
            }
            Err(e) => {
                region.unlock(ix, m);
                inner.fail(&e);
                Done::Yes
            }
        },
    }
}

fn write_protect(inner: &Inner, addr: u64, t0: Instant) -> Done {
    let c = &inner.counters;
    let Some(region) = inner.region_of(addr) else {
        let _ = inner.uffd.wake(addr, 4096);
        return Done::Yes;
    };
    let ix = region.index(addr).expect("region_of checked");
    let m = match region.try_lock(ix, BUSY_FAULT) {
        Ok(m) => m,
        Err(m) => {
            // The reclaimer is copying it out (or another fault holds it): the write waits
            // until the page is in the store.
            inner.holder.lift_for(m);
            return Done::Later;
        }
    };
    if m.state() != RESIDENT {
        // Reclaimed meanwhile: the writer retries, faults it back, and writes then.
        region.unlock(ix, m);
        let _ = inner.uffd.wake(addr, 4096);
        return Done::Yes;
    }
    match inner.uffd.write_protect(addr, 4096, false) {
        Ok(Resolved::Done | Resolved::Exists) => {
            region.unlock(ix, m.set(WRITTEN).clear(ARMED));
            c.write_protect.fetch_add(1, Relaxed);
            c.wp_latency.record(elapsed_ns(t0));
            Done::Yes
        }
        Ok(Resolved::Again) => {
            c.again.fetch_add(1, Relaxed);
            region.unlock(ix, m);
            Done::Later
        }
        Err(e) => {
            region.unlock(ix, m);
            inner.fail(&format!("lifting write protection of {addr:#x}: {e}"));
            Done::Yes
        }
    }
}

/// Someone dropped [start, end): forget what the store held for it. The reclaimer's own
/// drops are recognised by their range and left alone: those pages are in the store.
fn remove(inner: &Inner, start: u64, end: u64) {
    {
        let mut own = inner.own_removes.lock();
        if let Some(i) = own.iter().position(|&r| r == (start, end)) {
            own.swap_remove(i);
            return;
        }
    }
    let mut addr = start & !4095;
    while addr < end {
        let Some(region) = inner.region_of(addr) else {
            addr += 4096;
            continue;
        };
        let last = end.min(region.start + region.len);
        while addr < last {
            let ix = region.index(addr).expect("inside the region");
            drop_page(inner, &region, ix);
            addr += 4096;
        }
    }
}

fn drop_page(inner: &Inner, region: &Region, ix: usize) {
    let Ok(m) = region.try_lock(ix, BUSY_FAULT) else {
        return;
    };
    match m.state() {
        STORED => {
            if m.form() != Form::Zero {
                let _ = inner
                    .store
                    .remove(PageId::from_u64(region.ids[ix].load(Relaxed)));
            }
            inner.counters.removed.fetch_add(1, Relaxed);
        }
        RESIDENT => {
            inner.counters.removed.fetch_add(1, Relaxed);
        }
        _ => {}
    }
    region.unlock(ix, Meta(m.0).with_state(EMPTY).with_age(0));
}
