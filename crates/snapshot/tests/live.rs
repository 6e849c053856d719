//! Live snapshots on a plain mapping with writer threads: the snapshot must equal, page for
//! page, a pause-and-copy snapshot taken at the same instant, while the writers keep writing.

#![allow(clippy::cast_possible_truncation)] // page counts and random draws in tests

mod common;

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use snapshot::live::{self, LiveError};
use snapshot::{BoxError, PAGE, PageSink};

/// Pages held in memory; a page put twice is an error (the snapshot copies each once).
struct MemSink {
    pages: Vec<Mutex<Option<Vec<u8>>>>,
}

impl MemSink {
    fn new(n: usize) -> Self {
        MemSink {
            pages: (0..n).map(|_| Mutex::new(None)).collect(),
        }
    }
    fn get(&self, i: usize) -> Option<Vec<u8>> {
        self.pages[i].lock().unwrap().clone()
    }
}

impl PageSink for MemSink {
    fn put_page(&self, index: u64, page: &[u8; PAGE]) -> Result<(), BoxError> {
        let mut slot = self.pages[index as usize].lock().unwrap();
        if slot.is_some() {
            return Err(format!("page {index} put twice").into());
        }
        *slot = Some(page.to_vec());
        Ok(())
    }
    fn put_zero(&self, index: u64) -> Result<(), BoxError> {
        self.put_page(index, &[0; PAGE])
    }
}

struct Map {
    ptr: *mut u8,
    len: usize,
}
// SAFETY: the mapping is shared memory that the test's threads write with volatile stores.
unsafe impl Sync for Map {}

impl Map {
    fn new(len: usize) -> Map {
        Map {
            ptr: common::map(len),
            len,
        }
    }
    fn write(&self, page: usize, word: usize, v: u64) {
        // SAFETY: inside the mapping; u64-aligned.
        unsafe {
            std::ptr::write_volatile(self.ptr.add(page * PAGE + word * 8).cast::<u64>(), v);
        }
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: unmaps what new mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

fn snapshot_equals_pause_and_copy(pages: usize, writers: usize) {
    let map = Map::new(pages * PAGE);
    // Half the pages are written before the snapshot; the rest are first touched after it.
    for p in 0..pages / 2 {
        map.write(p, 0, p as u64 + 1);
    }
    let pause = AtomicBool::new(false);
    let parked = AtomicUsize::new(0);
    let done = AtomicBool::new(false);
    let live_sink = MemSink::new(pages);
    let reference = MemSink::new(pages);
    let report = std::thread::scope(|s| {
        for w in 0..writers {
            let (map, pause, parked, done) = (&map, &pause, &parked, &done);
            s.spawn(move || {
                let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ w as u64;
                let mut n: u64 = 0;
                while !done.load(Ordering::Acquire) {
                    if pause.load(Ordering::Acquire) {
                        parked.fetch_add(1, Ordering::AcqRel);
                        while pause.load(Ordering::Acquire) {
                            std::hint::spin_loop();
                        }
                        parked.fetch_sub(1, Ordering::AcqRel);
                    }
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    n += 1;
                    let page = (x as usize) % pages;
                    map.write(page, (x >> 32) as usize % (PAGE / 8), n);
                }
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        // SAFETY: the mapping is private anonymous, lives past the call, and only the
        // writers write it.
        let r = unsafe {
            live::take(map.ptr, map.len, &live_sink, |arm| {
                pause.store(true, Ordering::Release);
                while parked.load(Ordering::Acquire) < writers {
                    std::hint::spin_loop();
                }
                arm()?;
                // Paused, so this is the same instant (inside the unsafe block above).
                live::copy_paused(map.ptr, map.len, &reference)?;
                pause.store(false, Ordering::Release);
                Ok::<_, BoxError>(())
            })
        };
        // Let the writers run on a little after the snapshot, then stop them.
        std::thread::sleep(std::time::Duration::from_millis(50));
        done.store(true, Ordering::Release);
        r
    });
    let ((), report) = report.expect("live snapshot");
    let mut differ = 0;
    for p in 0..pages {
        let (a, b) = (live_sink.get(p), reference.get(p));
        assert!(a.is_some(), "page {p} missing from the live snapshot");
        if a != b {
            differ += 1;
        }
    }
    assert_eq!(
        differ, 0,
        "{differ} pages differ from the pause-and-copy snapshot"
    );
    assert_eq!(report.pages, pages as u64);
    assert!(
        report.copied_on_write > 0,
        "the writers never raced the copier: {report:?}"
    );
    eprintln!(
        "{pages} pages, {writers} writers: {} copied, {} copied on write, {} zero, {} missing \
         faults, arm {:?}, copy {:?}, fault p50 {} ns p99 {} ns",
        report.copied,
        report.copied_on_write,
        report.zero,
        report.missing_faults,
        report.arm,
        report.copy,
        report.fault.p50_ns,
        report.fault.p99_ns
    );
}

#[test]
fn live_snapshot_equals_pause_and_copy_one_writer() {
    snapshot_equals_pause_and_copy(16384, 1);
}

#[test]
fn live_snapshot_equals_pause_and_copy_many_writers() {
    for _ in 0..3 {
        snapshot_equals_pause_and_copy(65536, 3);
    }
}

#[test]
fn a_failing_store_abandons_the_snapshot_and_the_writers_run_on() {
    struct Full;
    impl PageSink for Full {
        fn put_page(&self, index: u64, _: &[u8; PAGE]) -> Result<(), BoxError> {
            Err(format!("no space for page {index}").into())
        }
        fn put_zero(&self, _: u64) -> Result<(), BoxError> {
            Ok(())
        }
    }
    let map = Map::new(1024 * PAGE);
    for p in 0..1024 {
        map.write(p, 0, 7);
    }
    // SAFETY: as in the tests above; nothing writes the mapping during the call.
    let r = unsafe { live::take(map.ptr, map.len, &Full, |arm| Ok::<_, BoxError>(arm()?)) };
    assert!(matches!(r, Err(LiveError::Sink(..))), "{r:?}");
    // Protection is lifted and the range unregistered: writes go through.
    for p in 0..1024 {
        map.write(p, 1, 9);
    }
}

#[test]
#[ignore = "a measurement, not a check"]
fn arm_cost() {
    use pager::uffd::{Modes, Uffd};
    for huge in [false, true] {
        let len = 1usize << 30;
        let map = Map::new(len);
        // SAFETY: advice on our own mapping.
        unsafe {
            libc::madvise(
                map.ptr.cast(),
                len,
                if huge {
                    libc::MADV_HUGEPAGE
                } else {
                    libc::MADV_NOHUGEPAGE
                },
            )
        };
        for p in 0..len / PAGE {
            map.write(p, 0, 1);
        }
        let u = Uffd::new().unwrap();
        let m = Modes {
            missing: true,
            write_protect: true,
        };
        u.register(map.ptr as u64, len as u64, m).unwrap();
        for _ in 0..3 {
            let t = std::time::Instant::now();
            u.write_protect(map.ptr as u64, len as u64, true).unwrap();
            let a = t.elapsed();
            let t = std::time::Instant::now();
            u.write_protect(map.ptr as u64, len as u64, false).unwrap();
            eprintln!("huge {huge}: protect {a:?}, unprotect {:?}", t.elapsed());
        }
    }
}
