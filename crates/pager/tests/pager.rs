//! The pager on plain anonymous mappings with writer threads: no write is ever lost or
//! stale, whatever reclaim does meanwhile.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use pager::{Mode, Pager, Policy, Region};

const PAGE: usize = 4096;
const WORDS: usize = PAGE / 8;

fn manual(mode: Mode) -> Pager {
    let policy = Policy {
        handlers: 2,
        ..Policy::default()
    };
    Pager::with_config(mode.store_config(), policy, false).expect("userfaultfd (run as root)")
}

fn word(region: &Region, page: usize, w: usize) -> *mut u64 {
    // Inside the region: page < pages, w < WORDS.
    region.start().wrapping_add(page * PAGE + w * 8).cast()
}

fn read(region: &Region, page: usize, w: usize) -> u64 {
    // SAFETY: inside the mapping the pager owns; any fault is served by the pager.
    unsafe { word(region, page, w).read_volatile() }
}

fn write(region: &Region, page: usize, w: usize, v: u64) {
    // SAFETY: as in `read`; each test writes only pages it owns.
    unsafe { word(region, page, w).write_volatile(v) }
}

/// The body of page `page`: the same for pages of one family, so that the store finds
/// identical and similar pages, as in real guest memory.
fn body(page: usize, w: usize) -> u64 {
    let family = (page % 16) as u64;
    if w.is_multiple_of(64) {
        0
    } else {
        (w as u64 / 4).wrapping_mul(0x9e37_79b9) ^ family
    }
}

fn fill(region: &Region, page: usize) {
    for w in 2..WORDS {
        write(region, page, w, body(page, w));
    }
    write(region, page, 1, page as u64);
}

/// Checks every word of `page` against its body, `page` and sequence number `seq`.
fn check(region: &Region, page: usize, seq: u64) -> Result<(), String> {
    let got = read(region, page, 0);
    if got != seq {
        return Err(format!("page {page}: sequence {got}, expected {seq}"));
    }
    if read(region, page, 1) != page as u64 {
        return Err(format!("page {page}: wrong identity word"));
    }
    for w in 2..WORDS {
        if read(region, page, w) != body(page, w) {
            return Err(format!("page {page}: word {w} corrupted"));
        }
    }
    Ok(())
}

/// The acceptance test: writer threads on a plain mapping, reclaim as fast as it can go,
/// at least 10^7 page writes, each page checked whole before every write and at the end.
#[test]
fn ten_million_writes_under_full_speed_reclaim_lose_nothing() {
    const PAGES: usize = 4096;
    const WRITERS: usize = 2;
    let writes: u64 = std::env::var("PAGER_STRESS_WRITES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000_000);
    let pager = manual(Mode::Full);
    let region = pager.map_anonymous(PAGES * PAGE, "stress").unwrap();
    for p in 0..PAGES {
        fill(&region, p);
    }
    let done = AtomicBool::new(false);
    let total = AtomicU64::new(0);
    let rounds = AtomicU64::new(0);
    let seqs: Vec<Vec<u64>> = std::thread::scope(|s| {
        let reclaimer = s.spawn(|| {
            let mut phase = 0usize;
            while !done.load(Ordering::Relaxed) {
                // A rotating 1/32 of the pages at a time, back to back: writers meet both
                // resident pages and pages in the store, and reclaim races with writes
                // all the time.
                pager.reclaim(&region, |ix| (ix / 64 + phase).is_multiple_of(32));
                phase += 1;
                rounds.fetch_add(1, Ordering::Relaxed);
            }
        });
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let (region, total) = (&region, &total);
                s.spawn(move || {
                    let mine: Vec<usize> = (0..PAGES).filter(|p| p % WRITERS == w).collect();
                    let mut seq = vec![0u64; PAGES];
                    let mut x = 0x2545_f491_4f6c_dd1du64 ^ w as u64;
                    let mut n = 0u64;
                    while n < writes / WRITERS as u64 {
                        // xorshift: a different page each time, all over the region.
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let p = mine[usize::try_from(x % mine.len() as u64).unwrap()];
                        // A few writes per visit, as a program writes a page it has open;
                        // the reclaimer still takes pages between and during visits.
                        for _ in 0..8 {
                            if let Err(e) = check(region, p, seq[p]) {
                                panic!("writer {w} after {n} writes: {e}");
                            }
                            seq[p] += 1;
                            write(region, p, 0, seq[p]);
                            n += 1;
                        }
                    }
                    total.fetch_add(n, Ordering::Relaxed);
                    seq
                })
            })
            .collect();
        let seqs: Vec<Vec<u64>> = writers.into_iter().map(|h| h.join().unwrap()).collect();
        done.store(true, Ordering::Relaxed);
        reclaimer.join().unwrap();
        seqs
    });
    // Once more, with every page reclaimed first: all must come back from the store.
    pager.reclaim(&region, |_| true);
    for p in 0..PAGES {
        check(&region, p, seqs[p % WRITERS][p]).unwrap();
    }
    let st = pager.stats();
    eprintln!(
        "{} writes; {} reclaim rounds; reclaimed {}, refaults {}, wp faults {}, deferred {}, \
         again {}, exists {}; refault p50 {} ns p99 {} ns",
        total.load(Ordering::Relaxed),
        rounds.load(Ordering::Relaxed),
        st.reclaimed,
        st.faults.refaults,
        st.faults.write_protect,
        st.faults.deferred,
        st.faults.again,
        st.faults.exists,
        st.refault_latency.p50_ns,
        st.refault_latency.p99_ns
    );
    assert!(total.load(Ordering::Relaxed) >= writes);
    assert_eq!(st.faults.anomalies, 0);
    assert_eq!(st.failure, None);
    // Reclaim really raced with the writers.
    assert!(st.reclaimed > 100_000, "{st:?}");
    assert!(st.faults.refaults > 50_000, "{st:?}");
}

#[test]
fn every_form_comes_back_byte_for_byte() {
    let pager = manual(Mode::Full);
    let pages = 512;
    let region = pager.map_anonymous(pages * PAGE, "forms").unwrap();
    // Zero pages (untouched), identical pages, similar pages, and compressible ones.
    for p in 0..pages {
        match p % 4 {
            0 => {} // never touched
            1 => {
                // A copy of page 1.
                for w in 0..WORDS {
                    write(&region, p, w, body(1, w));
                }
            }
            _ => fill(&region, p),
        }
    }
    let before: Vec<Vec<u64>> = (0..pages)
        .map(|p| (0..WORDS).map(|w| read(&region, p, w)).collect())
        .collect();
    let n = pager.reclaim(&region, |_| true);
    let st = pager.stats();
    assert_eq!(
        n, pages,
        "every page was resident (reads mapped the zero page): {st:?}"
    );
    let st = pager.stats();
    assert_eq!(st.pages.resident, 0);
    assert!(
        st.pages.zero >= 128 && st.pages.shared >= 100,
        "{:?}",
        st.pages
    );
    assert!(st.pages.patched + st.pages.compressed > 0, "{:?}", st.pages);
    // Reclaim stores pages raw while they are busy and encodes them after: every page
    // here compresses, so none is left raw, in the store or in the pager's count.
    assert_eq!(st.pages.raw, 0, "{:?}", st.pages);
    assert_eq!(st.store.raw.stored, 0, "{:?}", st.store);
    assert!(st.bytes.held < st.bytes.without_pager / 2, "{:?}", st.bytes);
    for (p, words) in before.iter().enumerate() {
        for (w, &v) in words.iter().enumerate() {
            assert_eq!(read(&region, p, w), v, "page {p} word {w}");
        }
    }
    // The handler counts a fault just after waking its thread: give it a moment.
    let deadline = Instant::now() + Duration::from_secs(2);
    while pager.stats().faults.refaults < pages as u64 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    let st = pager.stats();
    assert_eq!(st.faults.refaults, pages as u64, "{st:?}");
    assert_eq!(st.pages.resident, pages as u64);
    assert_eq!(
        st.store.logical_pages(),
        0,
        "faulted-in pages leave the store"
    );
}

#[test]
fn a_dropped_range_reads_zero_and_leaves_the_store() {
    let pager = manual(Mode::Full);
    let region = pager.map_anonymous(64 * PAGE, "remove").unwrap();
    for p in 0..64 {
        fill(&region, p);
    }
    pager.reclaim(&region, |ix| ix < 32);
    let held = pager.store().stats().logical_pages();
    assert!(held > 0);
    // A balloon (or the guest) gives back pages 16..48: half stored, half resident.
    // SAFETY: inside the mapping the pager owns.
    let r = unsafe {
        libc::madvise(
            region.start().wrapping_add(16 * PAGE).cast(),
            32 * PAGE,
            libc::MADV_DONTNEED,
        )
    };
    assert_eq!(r, 0);
    // The remove event is read before madvise returns; the books follow within a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    while pager.stats().faults.removed < 32 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(pager.stats().faults.removed, 32);
    assert!(pager.store().stats().logical_pages() < held);
    for p in 16..48 {
        assert!((0..WORDS).all(|w| read(&region, p, w) == 0), "page {p}");
    }
    for p in (0..16).chain(48..64) {
        check(&region, p, 0).unwrap();
    }
}

#[test]
fn the_scanner_reclaims_cold_pages_and_keeps_hot_ones() {
    let policy = Policy {
        interval: Duration::from_millis(20),
        cold_scans: 3,
        cpu_budget: 1.0,
        target_resident: None,
        handlers: 1,
        cold_compression: None,
        deep_scans: 0,
    };
    let pager = Pager::new(Mode::Full, policy).unwrap();
    let pages = 1024;
    let region = pager.map_anonymous(pages * PAGE, "aging").unwrap();
    for p in 0..pages {
        fill(&region, p);
    }
    // Pages 0..64 are written all the time; the rest never again.
    let mut seq = vec![0u64; 64];
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(1500) {
        for (p, s) in seq.iter_mut().enumerate() {
            check(&region, p, *s).unwrap();
            *s += 1;
            write(&region, p, 0, *s);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let st = pager.stats();
    eprintln!("{:?} {:?} wp {}", st.pages, st.nru, st.faults.write_protect);
    assert!(
        st.pages.resident <= 128,
        "cold pages stay resident: {:?}",
        st.pages
    );
    assert!(st.pages.stored() >= (pages - 128) as u64, "{:?}", st.pages);
    // The hot pages were never taken: no refaults among them... or very few.
    assert!(st.faults.refaults < 64, "{:?}", st.faults);
    assert!(st.nru.modified > 0, "{:?}", st.nru);
    for (p, &s) in seq.iter().enumerate() {
        check(&region, p, s).unwrap();
    }
    for p in 64..pages {
        check(&region, p, 0).unwrap();
    }
}

#[test]
fn a_target_bounds_resident_memory() {
    let policy = Policy {
        interval: Duration::from_millis(20),
        cold_scans: 200,
        cpu_budget: 1.0,
        target_resident: Some(256 * PAGE as u64),
        handlers: 1,
        cold_compression: Some(pagestore::Compression::Zstd { level: 1 }),
        deep_scans: 0,
    };
    let pager = Pager::new(Mode::Full, policy).unwrap();
    let region = pager.map_anonymous(2048 * PAGE, "target").unwrap();
    for p in 0..2048 {
        fill(&region, p);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while pager.stats().pages.resident > 256 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let st = pager.stats();
    assert!(st.pages.resident <= 256, "{:?}", st.pages);
    for p in 0..2048 {
        check(&region, p, 0).unwrap();
    }
}

/// Each page is write-protected once to watch it, and again only after a write: protecting
/// it again would change nothing but make KVM drop its mappings of the page (the guest would
/// then exit on its next touch, a read too).
#[test]
fn a_watched_page_is_protected_again_only_after_a_write() {
    let policy = Policy {
        interval: Duration::from_millis(20),
        cold_scans: 255,
        cpu_budget: 1.0,
        target_resident: None,
        handlers: 1,
        cold_compression: None,
        deep_scans: 0,
    };
    let pager = Pager::new(Mode::Full, policy).unwrap();
    let pages = 256;
    let region = pager.map_anonymous(pages * PAGE, "armed").unwrap();
    for p in 0..pages {
        fill(&region, p);
    }
    let scans = |n: u64| {
        let until = pager.stats().scans + n;
        let deadline = Instant::now() + Duration::from_secs(20);
        while pager.stats().scans < until {
            assert!(Instant::now() < deadline, "the scanner stalled");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    // The fill's first touches are served unprotected: the first scan arms every page (the
    // first scan may find a page's fault just served and leave it to the next).
    scans(3);
    let st = pager.stats();
    assert_eq!(st.armed, pages as u64, "{st:?}");
    scans(5);
    assert_eq!(pager.stats().armed, pages as u64, "nothing was written");
    // Ten pages are written once: each faults once, rests a scan, and is armed again.
    for p in 0..10 {
        write(&region, p, 0, 7);
    }
    scans(6);
    let st = pager.stats();
    assert_eq!(st.faults.write_protect, 10, "{:?}", st.faults);
    assert_eq!(st.armed, pages as u64 + 10, "{st:?}");
    // And they were armed for real: each new write faults again.
    for p in 0..10 {
        write(&region, p, 0, 8);
    }
    // (The handler counts a fault after waking its writer.)
    let deadline = Instant::now() + Duration::from_secs(5);
    while pager.stats().faults.write_protect < 20 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(pager.stats().faults.write_protect, 20);
    for p in 0..pages {
        check(&region, p, if p < 10 { 8 } else { 0 }).unwrap();
    }
}

/// A word of text over 16 letters, distinct for every page: LZ4 finds too few repeats to
/// take it under 3/4 of a page, zstd's entropy coder halves it.
fn text(page: usize, w: usize) -> u64 {
    // splitmix64 of the word's place, then 4 bits a letter.
    let mut z = ((page * WORDS + w) as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (0..8).fold(0, |v, b| {
        v | u64::from(b'a' + ((z >> (4 * b)) & 15) as u8) << (8 * b)
    })
}

/// The store's payload and metadata: what its pages cost, whatever the arena's slack.
fn held(s: &pagestore::Stats) -> u64 {
    s.payload_bytes() + s.metadata_bytes
}

#[test]
fn pages_that_stay_away_are_recompressed_in_place_and_come_back_exact() {
    let policy = Policy {
        interval: Duration::from_millis(20),
        cold_scans: 2,
        cpu_budget: 1.0,
        target_resident: None,
        handlers: 1,
        cold_compression: Some(pagestore::Compression::Zstd { level: 1 }),
        deep_scans: 3,
    };
    let pager = Pager::new(Mode::Full, policy).unwrap();
    let pages = 512;
    let region = pager.map_anonymous(pages * PAGE, "deep").unwrap();
    for p in 0..pages {
        for w in 0..WORDS {
            write(&region, p, w, text(p, w));
        }
    }
    // Pages 0..32 are read now and then, so they come back while others are recompressed.
    // On a loaded machine the scanner's passes fall behind, so wait for the last pages too.
    let half = (pages * PAGE / 2 + (256 << 10)) as u64;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut round = 0;
    loop {
        let st = pager.stats();
        let done = st.recompressed >= (pages - 64) as u64 && held(&st.store) < half;
        if done || Instant::now() > deadline {
            break;
        }
        round += 1;
        if round % 10 == 0 {
            for p in 0..32 {
                assert_eq!(read(&region, p, WORDS - 1), text(p, WORDS - 1));
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(100));
    let st = pager.stats();
    assert!(st.recompressed >= (pages - 64) as u64, "{st:?}");
    assert!(
        st.store.compressed.stored >= (pages - 64) as u64,
        "raw under LZ4, compressed under zstd: {:?}",
        st.store
    );
    assert!(
        held(&st.store) < half,
        "zstd holds these pages in about half: {:?}",
        st.store
    );
    // Compaction gives back the holes in-place recompression leaves (about half the arena
    // here), but a shard keeps up to two 16 KiB chunks of holes plus its newest chunk's end.
    assert!(
        st.store.slack_bytes <= 16 * 3 * (16 << 10),
        "compaction leaves at most three chunks of slack a shard: {:?}",
        st.store
    );
    for p in 0..pages {
        for w in 0..WORDS {
            assert_eq!(read(&region, p, w), text(p, w), "page {p} word {w}");
        }
    }
}

#[test]
fn detach_gives_every_page_back() {
    let pager = manual(Mode::SharePatch);
    // SAFETY: a fresh private anonymous mapping, unmapped at the end of the test.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            128 * PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    // SAFETY: the mapping lives until munmap below, after detach.
    let region = unsafe { pager.attach(p.cast(), 128 * PAGE, "attached") }.unwrap();
    for pg in 0..128 {
        fill(&region, pg);
    }
    assert_eq!(pager.reclaim(&region, |_| true), 128);
    pager.detach(&region).unwrap();
    for pg in 0..128 {
        check(&region, pg, 0).unwrap();
    }
    // SAFETY: mapped above; nothing uses it any more.
    unsafe { libc::munmap(p, 128 * PAGE) };
}
