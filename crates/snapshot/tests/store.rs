//! The snapshot store's promises: exact bytes back in every form, dedup across snapshots,
//! O(1) clones, collection that frees bytes and keeps the rest, fsck that finds damage,
//! hostile files that never panic, the performance bars, and a store that survives SIGKILL
//! at any moment of a write or a gc.
#![allow(clippy::cast_possible_truncation)] // test pages are built by truncating on purpose

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use snapshot::store::{Snapshot, Store, StoreError, StoreOptions};

const PAGE: usize = 4096;
type Page = [u8; PAGE];

// ---------------------------------------------------------------------------------------------
// Helpers

/// A fresh directory under the system's temporary directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "snapshot-store-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    fn store(&self) -> PathBuf {
        self.0.join("store")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A compressible page unlike any other seed's: words of a small vocabulary, as text and
/// program data are (zstd gets it to about a third).
fn text_page(seed: u64) -> Page {
    const WORDS: [&[u8]; 16] = [
        b"the ",
        b"page ",
        b"store ",
        b"guest ",
        b"memory ",
        b"0x7f3a ",
        b"kernel ",
        b"of ",
        b"snapshot ",
        b"and ",
        b"= ",
        b"NULL ",
        b"struct ",
        b"{ ",
        b"}\n",
        b"return ",
    ];
    let mut p = [0u8; PAGE];
    let mut s = seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ 0x1234;
    let mut at = 0;
    while at < PAGE {
        let r = splitmix(&mut s);
        let w: &[u8] = if r.is_multiple_of(16) {
            // a number here and there keeps pages distinct
            &r.to_le_bytes()[..6]
        } else {
            WORDS[(r >> 8) as usize % WORDS.len()]
        };
        let n = w.len().min(PAGE - at);
        p[at..at + n].copy_from_slice(&w[..n]);
        at += n;
    }
    p
}

/// Bytes no compressor can shrink.
fn noise_page(seed: u64) -> Page {
    let mut p = [0u8; PAGE];
    let mut s = seed ^ 0xdead_beef;
    for w in p.chunks_exact_mut(8) {
        w.copy_from_slice(&splitmix(&mut s).to_le_bytes());
    }
    p
}

/// `p` with `n` bytes changed at spread-out offsets: a similar page.
fn edited(p: &Page, n: usize, salt: u64) -> Page {
    let mut q = *p;
    for i in 0..n {
        let at = (i * 997 + salt as usize * 131) % PAGE;
        q[at] = q[at].wrapping_add(1 + (salt % 200) as u8);
    }
    q
}

fn read(s: &Snapshot, i: u64) -> Page {
    let mut out = [0xAAu8; PAGE];
    s.read_page(i, &mut out)
        .unwrap_or_else(|e| panic!("page {i}: {e}"));
    out
}

/// Writes `pages` as snapshot `name` (one thread) and returns its info.
fn write(store: &Store, name: &str, pages: &[Page]) -> snapshot::store::SnapshotInfo {
    let w = store.writer(name, (pages.len() * PAGE) as u64).unwrap();
    for (i, p) in pages.iter().enumerate() {
        w.put_page(i as u64, p).unwrap();
    }
    w.set_state(format!("state of {name}").into_bytes());
    w.set_order((0..pages.len() as u32).rev().collect());
    w.finish().unwrap()
}

fn assert_reads_back(store: &Store, name: &str, pages: &[Page]) {
    let s = store.open_snapshot(name).unwrap();
    assert_eq!(s.pages(), pages.len() as u64);
    for (i, p) in pages.iter().enumerate() {
        assert!(read(&s, i as u64) == *p, "{name}: page {i} differs");
        assert_eq!(s.is_zero(i as u64), p.iter().all(|&b| b == 0));
    }
}

fn assert_clean(store: &Store) -> snapshot::store::FsckReport {
    let r = store.fsck().unwrap();
    assert!(r.is_clean(), "fsck: {:#?}", r.problems);
    r
}

fn packs_of(store: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(store.join("packs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

/// The `pct`th percentile (0 to 100).
fn percentile(v: &mut [f64], pct: usize) -> f64 {
    v.sort_by(f64::total_cmp);
    v[(v.len() - 1) * pct / 100]
}

// ---------------------------------------------------------------------------------------------
// Round trips

#[test]
fn every_form_round_trips() {
    let t = TempDir::new("forms");
    let store = Store::open(&t.store()).unwrap();
    let text = text_page(1);
    let noise = noise_page(2);
    let pages = vec![
        text,                        // compressed
        [0u8; PAGE],                 // zero
        noise,                       // raw: incompressible
        text,                        // duplicate of page 0
        edited(&noise, 4, 1),        // a few bytes changed: a patch against page 2
        edited(&text, 3, 2),         // a patch against page 0
        noise,                       // duplicate of a raw page
        [0u8; PAGE],                 // zero
        text_page(3),                // compressed
        edited(&text_page(3), 1, 3), // a patch against page 8
    ];
    let info = write(&store, "forms", &pages);
    assert_eq!(info.pages_nonzero, 8);
    assert_eq!(info.logical_bytes, 8 * PAGE as u64);
    assert_reads_back(&store, "forms", &pages);
    let u = store.du().unwrap();
    assert_eq!(
        (u.raw.objects, u.compressed.objects, u.delta.objects),
        (1, 2, 3),
        "{u:?}"
    );
    assert!(
        u.delta.bytes < 3 * 200,
        "patches of a few bytes are small: {u:?}"
    );
    assert!(u.compressed.bytes < 2 * 2500, "{u:?}");
    let s = store.open_snapshot("forms").unwrap();
    assert_eq!(s.state(), b"state of forms");
    assert_eq!(s.order(), &(0..10u32).rev().collect::<Vec<_>>()[..]);
    assert_eq!(s.ram_size(), 10 * PAGE as u64);
    assert!(matches!(
        s.read_page(10, &mut [0; PAGE]),
        Err(StoreError::PageOutOfRange {
            index: 10,
            pages: 10
        })
    ));
    let r = assert_clean(&store);
    assert_eq!((r.snapshots, r.records, r.pages), (1, 6, 8));
}

#[test]
fn pages_are_put_from_several_threads_at_once() {
    let t = TempDir::new("threads");
    let store = Store::open(&t.store()).unwrap();
    let n = 4096u64;
    // Many duplicates across threads, so that racing inserts of the same page happen.
    let page = |i: u64| match i % 5 {
        0 => [0u8; PAGE],
        1 => text_page(i % 64),
        2 => edited(&text_page(i % 64), 2, i),
        _ => text_page(10_000 + i),
    };
    let w = store.writer("threads", n * PAGE as u64).unwrap();
    std::thread::scope(|s| {
        for k in 0..4 {
            let w = &w;
            s.spawn(move || {
                for i in (k..n).step_by(4) {
                    w.put_page(i, &page(i)).unwrap();
                }
            });
        }
    });
    w.finish().unwrap();
    let pages: Vec<Page> = (0..n).map(page).collect();
    assert_reads_back(&store, "threads", &pages);
    let distinct: HashSet<Page> = pages
        .iter()
        .filter(|p| p.iter().any(|&b| b != 0))
        .copied()
        .collect();
    let u = store.du().unwrap();
    let objects = u.raw.objects + u.compressed.objects + u.delta.objects;
    assert_eq!(
        objects,
        distinct.len() as u64,
        "each distinct page stored once"
    );
    assert_clean(&store);
}

#[test]
fn a_second_snapshot_of_nearly_the_same_memory_adds_little() {
    let t = TempDir::new("dedup");
    let store = Store::open(&t.store()).unwrap();
    let n = 2048u64;
    let first: Vec<Page> = (0..n)
        .map(|i| {
            if i % 4 == 0 {
                [0u8; PAGE]
            } else {
                text_page(i)
            }
        })
        .collect();
    // The guest ran on a little: 2% of pages had a few bytes written, 1% are new.
    let second: Vec<Page> = first
        .iter()
        .enumerate()
        .map(|(i, p)| match i % 100 {
            1 | 2 => edited(p, 8, i as u64),
            3 => text_page(1_000_000 + i as u64),
            _ => *p,
        })
        .collect();
    write(&store, "before", &first);
    let a = store.du().unwrap().total_bytes;
    write(&store, "after", &second);
    let b = store.du().unwrap().total_bytes;
    let added = b - a;
    println!(
        "first snapshot {} KiB on disk for {} KiB of non-zero pages; the second added {} KiB ({:.1}%)",
        a >> 10,
        (n * 3 / 4 * PAGE as u64) >> 10,
        added >> 10,
        added as f64 * 100.0 / a as f64
    );
    // 1% new pages (~1/3 compressed) and 2% patches: a few per cent, and the manifest.
    assert!(
        added * 100 < a * 5,
        "second snapshot added {added} bytes to {a}"
    );
    assert_reads_back(&store, "before", &first);
    assert_reads_back(&store, "after", &second);
    let list = store.list().unwrap();
    let after = list.iter().find(|i| i.name == "after").unwrap();
    assert!(
        after.unique_bytes * 100 < after.stored_bytes * 10,
        "{after:?}"
    );
    assert_clean(&store);
}

// ---------------------------------------------------------------------------------------------
// Clones, remove, gc

#[test]
fn clones_take_constant_time_and_bytes_and_restore_exactly() {
    let t = TempDir::new("clone");
    let store = Store::open(&t.store()).unwrap();
    let big_n = 16_384u64; // 64 MiB of guest RAM
    let big: Vec<Page> = (0..big_n).map(|i| text_page(i % 512)).collect();
    write(&store, "big", &big);
    write(&store, "small", &[text_page(1)]);
    let time = |from: &str, to: &str| {
        let t0 = Instant::now();
        store.clone_snapshot(from, to).unwrap();
        t0.elapsed()
    };
    let (tb, ts) = (time("big", "big-c"), time("small", "sma-c"));
    let size = |n: &str| {
        std::fs::metadata(t.store().join("manifests").join(n))
            .unwrap()
            .len()
    };
    println!(
        "clone of a 64 MiB snapshot: {tb:?}, {} bytes; of a 4 KiB one: {ts:?}, {} bytes; the 64 MiB manifest: {} bytes",
        size("big-c"),
        size("sma-c"),
        size("big")
    );
    // Same-length base names: the clone manifests are the same size whatever the base.
    assert_eq!(size("big-c") + 2, size("sma-c"));
    assert!(size("big-c") < 200);
    assert!(
        tb < Duration::from_millis(100) && tb < ts * 10 + Duration::from_millis(20),
        "{tb:?} vs {ts:?}"
    );
    // A clone of a clone names the original base.
    store.clone_snapshot("big-c", "big-cc").unwrap();
    let list = store.list().unwrap();
    let info = |n: &str| list.iter().find(|i| i.name == n).unwrap().clone();
    assert_eq!(info("big-cc").base.as_deref(), Some("big"));
    assert_eq!(info("big-c").ram_bytes, big_n * PAGE as u64);
    assert_eq!(info("big").unique_bytes, 0, "its clones share every page");
    assert_reads_back(&store, "big-cc", &big);
    let c = store.open_snapshot("big-c").unwrap();
    assert_eq!((c.base(), c.state()), (Some("big"), &b"state of big"[..]));
    assert!(matches!(
        store.clone_snapshot("nope", "x"),
        Err(StoreError::NoSuchSnapshot { .. })
    ));
    assert!(matches!(
        store.clone_snapshot("big", "small"),
        Err(StoreError::NameTaken { .. })
    ));
    assert_clean(&store);
}

#[test]
fn remove_is_refused_while_clones_exist() {
    let t = TempDir::new("remove-clones");
    let store = Store::open(&t.store()).unwrap();
    write(&store, "base", &[text_page(1), text_page(2)]);
    store.clone_snapshot("base", "c1").unwrap();
    store.clone_snapshot("c1", "c2").unwrap();
    let e = store.remove("base").unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(&e, StoreError::HasClones { clones, .. } if clones == &["c1", "c2"]),
        "{e:?}"
    );
    assert!(
        msg.contains("c1") && msg.contains("c2") && msg.contains("remove them first"),
        "{msg}"
    );
    store.remove("c1").unwrap();
    assert!(store.remove("base").is_err());
    store.remove("c2").unwrap();
    store.remove("base").unwrap();
    assert!(matches!(
        store.remove("base"),
        Err(StoreError::NoSuchSnapshot { .. })
    ));
    assert!(store.list().unwrap().is_empty());
}

#[test]
fn remove_and_gc_free_bytes_and_leave_the_others_intact() {
    let t = TempDir::new("gc");
    let opts = StoreOptions {
        repack_percent: 5,
        ..StoreOptions::default()
    };
    let store = Store::open_with(&t.store(), opts).unwrap();
    let a: Vec<Page> = (0..300).map(text_page).collect();
    // b shares a third of a's pages, patches a third, and has a third of its own.
    let b: Vec<Page> = (0..300)
        .map(|i| match i % 3 {
            0 => a[i as usize],
            1 => edited(&a[i as usize], 5, i),
            _ => text_page(5000 + i),
        })
        .collect();
    let c: Vec<Page> = (0..200).map(|i| noise_page(9000 + i)).collect();
    write(&store, "a", &a);
    write(&store, "b", &b);
    write(&store, "c", &c);
    let before = store.du().unwrap();
    let list = store.list().unwrap();
    let ua = list.iter().find(|i| i.name == "a").unwrap().unique_bytes;
    let uc = list.iter().find(|i| i.name == "c").unwrap().unique_bytes;
    assert!(uc >= 200 * PAGE as u64, "c's noise is all its own: {uc}");

    // a's pack holds pages b needs (b's patches' bases, the shared third): gc must copy those
    // into a new pack, point b's manifest at it, and drop the rest.
    store.remove("a").unwrap();
    let r = store.gc().unwrap();
    let after = store.du().unwrap();
    println!("removed a ({ua} unique bytes): {r:?}");
    assert_eq!(r.packs_repacked, 1, "{r:?}");
    assert_eq!(r.manifests_rewritten, 1, "{r:?}");
    assert!(
        before.total_bytes - after.total_bytes >= ua * 9 / 10,
        "freed {} of {ua}",
        before.total_bytes - after.total_bytes
    );
    assert_reads_back(&store, "b", &b);
    assert_reads_back(&store, "c", &c);
    assert_clean(&store);

    // c's pack has nothing anyone else needs: deleted whole.
    store.remove("c").unwrap();
    let r = store.gc().unwrap();
    assert_eq!((r.packs_deleted, r.packs_repacked), (1, 0), "{r:?}");
    assert!(store.du().unwrap().total_bytes <= after.total_bytes - uc);
    assert_reads_back(&store, "b", &b);
    let r = assert_clean(&store);
    assert_eq!((r.unreferenced_packs, r.leftovers.len()), (0, 0));
    // Nothing left to do.
    let r = store.gc().unwrap();
    assert_eq!(r.bytes_before, r.bytes_after, "{r:?}");
}

#[test]
fn a_reader_keeps_reading_while_gc_deletes_its_pack() {
    let t = TempDir::new("reader-gc");
    let store = Store::open_with(
        &t.store(),
        StoreOptions {
            repack_percent: 1,
            ..StoreOptions::default()
        },
    )
    .unwrap();
    let first: Vec<Page> = (0..200).map(text_page).collect();
    let second: Vec<Page> = (0..200)
        .map(|i| {
            if i < 100 {
                first[i as usize]
            } else {
                text_page(700 + i)
            }
        })
        .collect();
    write(&store, "first", &first);
    write(&store, "second", &second);
    let open = store.open_snapshot("second").unwrap();
    let packs = packs_of(&t.store());
    store.remove("first").unwrap();
    let r = store.gc().unwrap();
    assert_eq!(r.packs_repacked, 1, "{r:?}");
    assert!(
        packs.iter().any(|p| !p.exists()),
        "a pack the reader uses is gone"
    );
    for (i, p) in second.iter().enumerate() {
        assert!(read(&open, i as u64) == *p);
    }
    assert_reads_back(&store, "second", &second);
}

#[test]
fn a_dropped_writer_leaves_nothing_and_gc_removes_leftovers() {
    let t = TempDir::new("dropped");
    let store = Store::open(&t.store()).unwrap();
    {
        let w = store.writer("gone", 64 * PAGE as u64).unwrap();
        for i in 0..64 {
            w.put_page(i, &text_page(i)).unwrap();
        }
    }
    assert!(store.list().unwrap().is_empty());
    assert!(matches!(
        store.open_snapshot("gone"),
        Err(StoreError::NoSuchSnapshot { .. })
    ));
    assert_eq!(
        store.du().unwrap().leftover_bytes,
        0,
        "its pack was removed at drop"
    );
    // What a crash leaves: a half-written pack in tmp/, a finished pack no manifest names.
    write(&store, "kept", &[text_page(1)]);
    write(&store, "removed", &[text_page(2)]);
    store.remove("removed").unwrap();
    std::fs::write(t.store().join("tmp/0123456789abcdef.pack"), b"half a pack").unwrap();
    let f = assert_clean(&store);
    assert_eq!((f.unreferenced_packs, f.leftovers.len()), (1, 1));
    let r = store.gc().unwrap();
    assert_eq!((r.leftovers_removed, r.packs_deleted), (1, 1), "{r:?}");
    let f = assert_clean(&store);
    assert_eq!((f.unreferenced_packs, f.leftovers.len()), (0, 0));
    assert_reads_back(&store, "kept", &[text_page(1)]);
    // The name is free again.
    write(&store, "gone", &[text_page(3)]);
}

#[test]
fn gc_and_writers_exclude_each_other() {
    let t = TempDir::new("busy");
    let store = Store::open(&t.store()).unwrap();
    let w = store.writer("w", PAGE as u64).unwrap();
    let e = store.gc().unwrap_err();
    assert!(matches!(e, StoreError::Busy { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("busy") && msg.contains(&t.store().display().to_string()),
        "{msg}"
    );
    // A second store handle (as another process would open it) sees the same lock.
    let other = Store::open_with(
        &t.store(),
        StoreOptions {
            busy_timeout: Duration::from_secs(10),
            ..StoreOptions::default()
        },
    )
    .unwrap();
    std::thread::scope(|s| {
        let g = s.spawn(|| other.gc());
        std::thread::sleep(Duration::from_millis(100));
        w.put_page(0, &text_page(1)).unwrap();
        w.finish().unwrap();
        // The waiting gc runs once the writer is done.
        g.join().unwrap().unwrap();
    });
    assert_reads_back(&store, "w", &[text_page(1)]);
}

// ---------------------------------------------------------------------------------------------
// Refusals

#[test]
fn bad_names_sizes_orders_and_double_puts_are_refused() {
    let t = TempDir::new("refusals");
    let store = Store::open(&t.store()).unwrap();
    for bad in ["", ".hidden", "a/b", "a b", "ü", &"x".repeat(201)] {
        assert!(
            matches!(store.writer(bad, 4096), Err(StoreError::BadName { .. })),
            "{bad:?}"
        );
    }
    for bad in [0, 4095, 4097] {
        assert!(matches!(
            store.writer("ok", bad),
            Err(StoreError::BadRamSize(_))
        ));
    }
    let w = store.writer("ok", 4 * PAGE as u64).unwrap();
    assert!(matches!(
        store.writer("ok", 4096),
        Err(StoreError::NameTaken { .. })
    ));
    w.put_page(1, &text_page(1)).unwrap();
    assert!(matches!(
        w.put_page(1, &text_page(1)),
        Err(StoreError::PageTwice { index: 1, .. })
    ));
    assert!(matches!(w.put_zero(1), Err(StoreError::PageTwice { .. })));
    w.put_zero(2).unwrap();
    assert!(matches!(
        w.put_page(2, &[0; PAGE]),
        Err(StoreError::PageTwice { .. })
    ));
    assert!(matches!(
        w.put_page(4, &text_page(1)),
        Err(StoreError::PageOutOfRange { .. })
    ));
    w.set_order(vec![0, 4]);
    let e = w.finish().unwrap_err();
    assert!(matches!(e, StoreError::BadOrder { index: 4, .. }), "{e:?}");
    assert!(store.list().unwrap().is_empty());
    write(&store, "ok", &[text_page(1)]);
    assert!(matches!(
        store.writer("ok", 4096),
        Err(StoreError::NameTaken { .. })
    ));
}

#[test]
fn a_directory_that_is_not_a_store_is_refused() {
    let t = TempDir::new("not-a-store");
    // Missing: created.
    Store::open(&t.0.join("new")).unwrap();
    // Empty: made a store.
    std::fs::create_dir(t.0.join("empty")).unwrap();
    Store::open(&t.0.join("empty")).unwrap();
    Store::open(&t.0.join("empty")).unwrap();
    // Anything else: refused, by name, with the fix.
    std::fs::create_dir(t.0.join("home")).unwrap();
    std::fs::write(t.0.join("home/notes.txt"), b"mine").unwrap();
    let e = Store::open(&t.0.join("home")).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, StoreError::NotAStore { .. }), "{e:?}");
    assert!(
        msg.contains("home") && msg.contains("empty or new directory"),
        "{msg}"
    );
    assert_eq!(
        std::fs::read_dir(t.0.join("home")).unwrap().count(),
        1,
        "left untouched"
    );
}

#[test]
fn newer_versions_are_named() {
    let t = TempDir::new("versions");
    let store = Store::open(&t.store()).unwrap();
    write(&store, "s", &[text_page(1)]);
    // A manifest of a newer version: the version is checked before anything else.
    let m = t.store().join("manifests/s");
    let mut b = std::fs::read(&m).unwrap();
    b[8] = 2;
    std::fs::write(&m, &b).unwrap();
    let msg = store.open_snapshot("s").unwrap_err().to_string();
    assert!(
        msg.contains("version 2") && msg.contains("upgrade") && msg.contains("manifests/s"),
        "{msg}"
    );
    b[8] = 1;
    std::fs::write(&m, &b).unwrap();
    // A pack of a newer version.
    let p = &packs_of(&t.store())[0];
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(&[3], 8).unwrap();
    let msg = store.open_snapshot("s").unwrap_err().to_string();
    assert!(msg.contains("version 3") && msg.contains(".pack"), "{msg}");
    f.write_all_at(&[1], 8).unwrap();
    store.open_snapshot("s").unwrap();
    // A store of a newer version.
    std::fs::write(
        t.store().join("STORE"),
        "memvisor snapshot store\nversion 7\n",
    )
    .unwrap();
    let msg = Store::open(&t.store()).unwrap_err().to_string();
    assert!(msg.contains("version 7") && msg.contains("STORE"), "{msg}");
}

// ---------------------------------------------------------------------------------------------
// Damage

#[test]
fn fsck_finds_a_flipped_byte_in_a_pack_and_reads_refuse_it() {
    let t = TempDir::new("flip");
    let store = Store::open(&t.store()).unwrap();
    let pages: Vec<Page> = (0..32).map(text_page).collect();
    write(&store, "s", &pages);
    let p = &packs_of(&t.store())[0];
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .unwrap();
    // A byte in the middle of the records.
    let at = 64 + 5000;
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x04], at).unwrap();
    let r = store.fsck().unwrap();
    assert!(!r.is_clean());
    println!("{:#?}", r.problems);
    assert!(r.problems.iter().any(|p| {
        p.path
            .ends_with(packs_of(&t.store())[0].file_name().unwrap())
    }));
    assert!(
        r.problems.iter().any(|p| p.path.ends_with("manifests/s")),
        "the snapshot is named too"
    );
    // Reads give an error for the damaged page and the right bytes for every other.
    let s = store.open_snapshot("s").unwrap();
    let mut errors = 0;
    for (i, want) in pages.iter().enumerate() {
        let mut out = [0u8; PAGE];
        match s.read_page(i as u64, &mut out) {
            Ok(()) => assert!(out == *want, "page {i}: wrong bytes, silently"),
            Err(e) => {
                errors += 1;
                assert!(matches!(e, StoreError::Corrupt { .. }), "{e:?}");
            }
        }
    }
    assert_eq!(errors, 1);
    // gc refuses to copy a damaged record rather than spread it (nothing to copy here, so it
    // runs; the pack is live and untouched).
    store.gc().unwrap();
    assert!(!store.fsck().unwrap().is_clean());
}

#[test]
fn fsck_finds_a_truncated_manifest() {
    let t = TempDir::new("truncated");
    let store = Store::open(&t.store()).unwrap();
    write(&store, "whole", &[text_page(1)]);
    write(&store, "cut", &[text_page(2), text_page(3)]);
    let m = t.store().join("manifests/cut");
    let len = std::fs::metadata(&m).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&m)
        .unwrap()
        .set_len(len - 3)
        .unwrap();
    let r = store.fsck().unwrap();
    assert_eq!(r.problems.len(), 1, "{:#?}", r.problems);
    assert!(r.problems[0].path.ends_with("manifests/cut"));
    assert!(
        r.problems[0].what.contains("truncated"),
        "{}",
        r.problems[0]
    );
    let e = store.open_snapshot("cut").unwrap_err();
    assert!(matches!(e, StoreError::Corrupt { .. }), "{e:?}");
    assert!(e.to_string().contains("fsck"), "{e}");
    assert_reads_back(&store, "whole", &[text_page(1)]);
    // gc refuses to run on a store whose manifests it cannot read: it cannot know what is live.
    assert!(matches!(store.gc(), Err(StoreError::Corrupt { .. })));
    // The fix its message names: remove the damaged snapshot; then gc collects its pages.
    store.remove("cut").unwrap();
    let r = store.gc().unwrap();
    assert_eq!(r.packs_deleted, 1, "{r:?}");
    assert_clean(&store);
    assert_reads_back(&store, "whole", &[text_page(1)]);
    // A file in manifests/ that is no snapshot's (a snapshot renamed by hand, say) could name
    // live pages: gc will not run, fsck names it.
    let stray = t.store().join("manifests/whole copy");
    std::fs::copy(t.store().join("manifests/whole"), &stray).unwrap();
    assert!(matches!(store.gc(), Err(StoreError::Corrupt { path, .. }) if path == stray));
    assert_eq!(store.fsck().unwrap().problems[0].path, stray);
    std::fs::remove_file(&stray).unwrap();
    store.gc().unwrap();
}

#[test]
fn writers_stores_and_snapshots_are_send_and_sync() {
    fn both<T: Send + Sync>() {}
    both::<Store>();
    both::<snapshot::store::SnapshotWriter>();
    both::<Snapshot>();
}

/// Seals a manifest after an edit: recomputes its body and header checksums, as a hostile
/// writer would.
fn seal_manifest(b: &mut [u8]) {
    use xxhash_rust::xxh3::xxh3_64;
    if b.len() < 96 {
        return;
    }
    let body = xxh3_64(&b[96..]);
    b[64..72].copy_from_slice(&body.to_le_bytes());
    let head = xxh3_64(&b[..88]);
    b[88..96].copy_from_slice(&head.to_le_bytes());
}

/// Every record of a pack as (offset, length), from its index.
fn records_of(pack: &[u8]) -> Vec<(usize, usize)> {
    let f = &pack[pack.len() - 40..];
    let at = u64::from_le_bytes(f[8..16].try_into().unwrap()) as usize;
    let n = u64::from_le_bytes(f[16..24].try_into().unwrap()) as usize;
    (0..n)
        .map(|i| {
            let e = &pack[at + 96 * i..at + 96 * (i + 1)];
            (
                u64::from_le_bytes(e[64..72].try_into().unwrap()) as usize,
                u32::from_le_bytes(e[72..76].try_into().unwrap()) as usize,
            )
        })
        .collect()
}

/// Runs everything a user can run on a damaged store; nothing may panic. Returns whether
/// every page that read without error had its right bytes.
fn exercise(dir: &Path, names: &[&str], pages: &HashMap<&str, Vec<Page>>) -> bool {
    let Ok(store) = Store::open(dir) else {
        return true;
    };
    let mut exact = true;
    for name in names {
        if let Ok(s) = store.open_snapshot(name) {
            let _ = (s.state(), s.order(), s.ram_size());
            for i in 0..s.pages() + 2 {
                let _ = s.is_zero(i);
                let mut out = [0u8; PAGE];
                if s.read_page(i, &mut out).is_ok()
                    && let Some(want) = pages[name].get(i as usize)
                    && out != *want
                {
                    exact = false;
                }
            }
        }
    }
    let _ = store.list();
    let _ = store.du();
    let _ = store.fsck();
    let _ = store.gc();
    let _ = store.fsck();
    exact
}

fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

/// Every file of a small store damaged in turn: cut short, a bit flipped, garbage appended,
/// emptied, or a field rewritten with its checksums made to match. 40 rounds a file by
/// default; `HOSTILE_ROUNDS=1500` runs 9,000 stores (about 30 s in a debug build).
#[test]
fn hostile_files_never_panic_and_damage_never_reads_as_wrong_bytes() {
    let t = TempDir::new("hostile");
    let pristine = t.0.join("pristine");
    let store = Store::open(&pristine).unwrap();
    let a: Vec<Page> = (0..12)
        .map(|i| match i % 4 {
            0 => [0u8; PAGE],
            1 => text_page(i),
            2 => noise_page(i),
            _ => edited(&text_page(i - 2), 3, i),
        })
        .collect();
    let b: Vec<Page> = a
        .iter()
        .enumerate()
        .map(|(i, p)| if i == 5 { edited(p, 2, 9) } else { *p })
        .collect();
    write(&store, "a", &a);
    write(&store, "b", &b);
    store.clone_snapshot("a", "c").unwrap();
    drop(store);
    let names = ["a", "b", "c"];
    let pages: HashMap<&str, Vec<Page>> =
        [("a", a.clone()), ("b", b), ("c", a)].into_iter().collect();
    let mut files: Vec<PathBuf> = packs_of(&pristine);
    for n in names {
        files.push(pristine.join("manifests").join(n));
    }
    files.push(pristine.join("STORE"));
    let work = t.0.join("work");
    let mut seed = 42u64;
    let mut cases = 0;
    for f in &files {
        let rel = f.strip_prefix(&pristine).unwrap();
        let orig = std::fs::read(f).unwrap();
        let is_manifest = rel.starts_with("manifests");
        let is_pack = rel.starts_with("packs");
        for round in 0..std::env::var("HOSTILE_ROUNDS").map_or(40, |v| v.parse().unwrap()) {
            copy_dir(&pristine, &work);
            let mut b = orig.clone();
            let r = splitmix(&mut seed);
            let mut sealed = false;
            match round % 5 {
                // Cut short anywhere.
                0 => b.truncate(r as usize % b.len()),
                // A flipped byte anywhere.
                1 => {
                    let at = r as usize % b.len();
                    b[at] ^= 1 << ((r >> 32) % 8);
                }
                // Garbage appended.
                2 => b.extend_from_slice(&noise_page(r)[..(r >> 40) as usize % 100 + 1]),
                // A field rewritten and the checksums made to match: a crafted file.
                3 | 4 if is_manifest && b.len() > 96 => {
                    let at = if round % 5 == 3 {
                        12 + (r as usize % 76)
                    } else {
                        96 + r as usize % (b.len() - 96)
                    };
                    b[at] = (r >> 48) as u8;
                    seal_manifest(&mut b);
                    sealed = true;
                }
                3 | 4 if is_pack => {
                    let recs = records_of(&b);
                    let (off, len) = recs[r as usize % recs.len()];
                    let at = off + 8 + (r >> 20) as usize % (len - 8);
                    b[at] = (r >> 48) as u8;
                    let sum = xxhash_rust::xxh3::xxh3_64(&b[off + 8..off + len]);
                    b[off..off + 8].copy_from_slice(&sum.to_le_bytes());
                    sealed = true;
                }
                _ => b.clear(),
            }
            std::fs::write(work.join(rel), &b).unwrap();
            let exact = exercise(&work, &names, &pages);
            // A record rewritten with a valid checksum can say anything (its id is only
            // checked by fsck); everything else must give an error or the right bytes.
            if !sealed {
                assert!(
                    exact,
                    "{} damaged ({round}) read back wrong bytes",
                    rel.display()
                );
            }
            cases += 1;
        }
    }
    println!("{cases} damaged stores exercised");
}

// ---------------------------------------------------------------------------------------------
// The performance bars

fn release() -> bool {
    !cfg!(debug_assertions)
}

#[test]
fn performance_of_a_1gib_snapshot() {
    let t = TempDir::new("perf");
    let store = Store::open(&t.store()).unwrap();
    // 1 GiB in release builds (the bar); a slice in debug builds, where only shape is checked.
    let n: u64 = if release() { 262_144 } else { 8192 };
    // Distinct compressible pages: every page costs a hash, two similarity lookups and a
    // zstd compression, the worst case for put_page and the largest manifest.
    let w = store.writer("big", n * PAGE as u64).unwrap();
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for k in 0..2 {
            let w = &w;
            s.spawn(move || {
                for i in (k..n).step_by(2) {
                    w.put_page(i, &text_page(i)).unwrap();
                }
            });
        }
    });
    let put = t0.elapsed();
    w.set_order((0..n as u32).collect());
    let t1 = Instant::now();
    let info = w.finish().unwrap();
    let finish = t1.elapsed();
    let manifest = std::fs::metadata(t.store().join("manifests/big"))
        .unwrap()
        .len();
    // Includes generating the pages (about a tenth of the time).
    println!(
        "put {} MiB of distinct compressible pages on 2 threads: {:.2} s ({:.0} MiB/s), finish {:.0} ms; stored {} MiB; manifest {} KiB",
        n >> 8,
        put.as_secs_f64(),
        (n >> 8) as f64 / put.as_secs_f64(),
        finish.as_secs_f64() * 1e3,
        info.stored_bytes >> 20,
        manifest >> 10
    );

    // open_snapshot: the restore's critical path. The manifest is in the page cache, as it is
    // right after a snapshot or on a restore host that serves it.
    let mut opens = Vec::new();
    for _ in 0..21 {
        let t = Instant::now();
        let s = store.open_snapshot("big").unwrap();
        opens.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(s.pages(), n);
    }
    let open_p50 = percentile(&mut opens, 50);
    println!(
        "open_snapshot of {} MiB: p50 {open_p50:.2} ms (min {:.2}, max {:.2})",
        n >> 8,
        opens[0],
        opens[opens.len() - 1]
    );

    // read_page from the page cache, random pages.
    let s = store.open_snapshot("big").unwrap();
    let mut out = [0u8; PAGE];
    let mut x = 7u64;
    let mut lat = Vec::with_capacity(20_000);
    for _ in 0..20_000 {
        let i = splitmix(&mut x) % n;
        let t = Instant::now();
        s.read_page(i, &mut out).unwrap();
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let (p50, p99) = (percentile(&mut lat, 50), percentile(&mut lat, 99));
    println!("read_page (zstd pages, page cache): p50 {p50:.2} us, p99 {p99:.2} us");
    for i in (0..n).step_by(997) {
        assert!(read(&s, i) == text_page(i));
    }
    // The first writer of a process reads every pack's index (for dedup): its cost grows with
    // the store.
    let t2 = Instant::now();
    let w = Store::open(&t.store())
        .unwrap()
        .writer("next", PAGE as u64)
        .unwrap();
    println!(
        "first writer of a new process on this store: {:.0} ms",
        t2.elapsed().as_secs_f64() * 1e3
    );
    drop(w);
    if release() {
        // Generous bounds for a shared CI machine; docs/snapshots.md has the real figures.
        assert!(open_p50 < 50.0, "open of 1 GiB took {open_p50:.2} ms");
        assert!(p50 < 50.0, "read_page p50 {p50:.2} us");
        assert!(put < Duration::from_secs(30), "put of 1 GiB took {put:?}");
    }
}

#[test]
fn put_page_throughput_by_kind_of_page() {
    let t = TempDir::new("put");
    let store = Store::open(&t.store()).unwrap();
    let n: u64 = if release() { 32_768 } else { 2048 };
    let base: Vec<Page> = (0..n).map(text_page).collect();
    write(&store, "base", &base);
    type Kind<'a> = (&'a str, Box<dyn Fn(u64) -> Page + 'a>);
    let kinds: [Kind<'_>; 4] = [
        ("zero", Box::new(|_| [0u8; PAGE])),
        ("duplicate of the store's", Box::new(|i| base[i as usize])),
        (
            "a few bytes changed (patch)",
            Box::new(|i| edited(&base[i as usize], 4, i)),
        ),
        ("new, compressible (zstd)", Box::new(|i| text_page(n + i))),
    ];
    for (k, (what, page)) in kinds.iter().enumerate() {
        let pages: Vec<Page> = (0..n).map(page).collect();
        let w = store.writer(&format!("k{k}"), n * PAGE as u64).unwrap();
        let t0 = Instant::now();
        for (i, p) in pages.iter().enumerate() {
            w.put_page(i as u64, p).unwrap();
        }
        let dt = t0.elapsed().as_secs_f64();
        w.finish().unwrap();
        println!(
            "put_page, {what}: {:.2} us a page, {:.0} MiB/s on one thread",
            dt * 1e6 / n as f64,
            (n * PAGE as u64) as f64 / dt / (1 << 20) as f64
        );
    }
}

/// Figures on real guest memory, if `memvisor images` has built them (docs/memimages.md):
/// two boots of the same workload (different KASLR), snapshotted one after the other. Not run
/// by default (it reads 512 MiB); `cargo test --release -p snapshot --test store real -- --ignored --nocapture`.
#[test]
#[ignore = "figures on real memory images; needs `memvisor images`"]
fn real_guest_memory_images() {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    let Some(dir) = std::fs::read_dir(home.join(".cache/memvisor/memimages"))
        .ok()
        .and_then(|mut d| d.next())
        .and_then(Result::ok)
        .map(|e| e.path())
    else {
        println!("no memory images: run `memvisor images` first");
        return;
    };
    let t = TempDir::new("real");
    let store = Store::open(&t.store()).unwrap();
    let mut total_before = 0;
    for name in ["mixed-1", "mixed-2", "mixed-3"] {
        let ram = read_elf_ram(&dir.join(format!("{name}.elf")));
        let n = ram.len() / PAGE;
        let w = store.writer(name, ram.len() as u64).unwrap();
        let t0 = Instant::now();
        for (i, c) in ram.chunks_exact(PAGE).enumerate() {
            w.put_page(i as u64, c.try_into().unwrap()).unwrap();
        }
        let dt = t0.elapsed();
        let info = w.finish().unwrap();
        let u = store.du().unwrap();
        println!(
            "{name}: {} MiB RAM, {} MiB non-zero; put in {:.2} s ({:.0} MiB/s of RAM, one thread); store +{:.1} MiB (now {:.1} MiB: raw {} compressed {} delta {})",
            ram.len() >> 20,
            info.logical_bytes >> 20,
            dt.as_secs_f64(),
            (ram.len() >> 20) as f64 / dt.as_secs_f64(),
            (u.total_bytes - total_before) as f64 / (1 << 20) as f64,
            u.total_bytes as f64 / (1 << 20) as f64,
            u.raw.objects,
            u.compressed.objects,
            u.delta.objects,
        );
        total_before = u.total_bytes;
        let s = store.open_snapshot(name).unwrap();
        let mut lat = Vec::new();
        // Non-zero pages: a restore answers zero pages without reading them.
        for i in (0..n).step_by(7).filter(|&i| !s.is_zero(i as u64)) {
            let mut out = [0u8; PAGE];
            let t = Instant::now();
            s.read_page(i as u64, &mut out).unwrap();
            lat.push(t.elapsed().as_secs_f64() * 1e6);
            assert!(out[..] == ram[i * PAGE..(i + 1) * PAGE]);
        }
        println!(
            "  read_page of non-zero pages: p50 {:.2} us, p99 {:.2} us",
            percentile(&mut lat, 50),
            percentile(&mut lat, 99)
        );
    }
    for i in store.list().unwrap() {
        println!(
            "  {} stored {:.1} MiB, unique {:.1} MiB",
            i.name,
            i.stored_bytes as f64 / 1048576.0,
            i.unique_bytes as f64 / 1048576.0
        );
    }
}

/// Guest RAM from an ELF core's PT_LOAD segments (the images are dumped with RAM only).
fn read_elf_ram(path: &Path) -> Vec<u8> {
    let f = std::fs::File::open(path).unwrap();
    let mut h = [0u8; 64];
    f.read_exact_at(&mut h, 0).unwrap();
    let u64_at = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    let phoff = u64_at(&h, 32);
    let phnum = u16::from_le_bytes([h[56], h[57]]) as u64;
    let mut segs = Vec::new();
    for i in 0..phnum {
        let mut ph = [0u8; 56];
        f.read_exact_at(&mut ph, phoff + i * 56).unwrap();
        if u32::from_le_bytes(ph[0..4].try_into().unwrap()) == 1 {
            segs.push((u64_at(&ph, 8), u64_at(&ph, 24), u64_at(&ph, 32)));
        }
    }
    let end = segs.iter().map(|s| s.1 + s.2).max().unwrap() as usize;
    let mut ram = vec![0u8; end.div_ceil(PAGE) * PAGE];
    for (off, paddr, filesz) in segs {
        f.read_exact_at(&mut ram[paddr as usize..(paddr + filesz) as usize], off)
            .unwrap();
    }
    ram
}

// ---------------------------------------------------------------------------------------------
// Crash safety: SIGKILL at random moments of writes, clones, removes and gcs

const CRASH_STORE: &str = "SNAPSHOT_CRASH_STORE";
const CRASH_PREFIX: &str = "SNAPSHOT_CRASH_PREFIX";
const CRASH_PAGES: u64 = 384;

fn name_seed(name: &str) -> u64 {
    let h = blake3::hash(name.as_bytes());
    u64::from_le_bytes(h.as_bytes()[..8].try_into().unwrap())
}

/// Page `i` of the crash test's snapshot `name`: zero pages, pages every snapshot shares,
/// pages a few bytes away from those (patches across snapshots), duplicates within the
/// snapshot, and pages of its own, compressible and not.
fn crash_page(name: &str, i: u64) -> Page {
    let seed = name_seed(name);
    match i % 7 {
        0 => [0u8; PAGE],
        1 => text_page(1_000 + i),
        2 => edited(&text_page(2_000 + i), 3, seed % 1000),
        3 => text_page(seed.wrapping_mul(7919).wrapping_add(i / 7 % 5)),
        6 => noise_page(seed ^ i),
        _ => text_page(seed.wrapping_add(i)),
    }
}

fn crash_state(name: &str) -> Vec<u8> {
    format!("state of {name}")
        .repeat(1 + (name_seed(name) % 50) as usize)
        .into_bytes()
}

fn crash_order(name: &str) -> Vec<u32> {
    let s = name_seed(name);
    (0..CRASH_PAGES as u32)
        .map(|i| (i + s as u32) % CRASH_PAGES as u32)
        .collect()
}

fn crash_options() -> StoreOptions {
    StoreOptions {
        // Small packs and eager repacking: every gc copies and rewrites something.
        pack_limit: 256 << 10,
        repack_percent: 1,
        ..StoreOptions::default()
    }
}

const CRASH_KEEP: &str = "SNAPSHOT_CRASH_KEEP";
const CRASH_AT: &str = "MEMVISOR_STORE_CRASH_AT";

/// The child side of the crash tests (a no-op when run as a test): writes snapshots on two
/// threads, clones, removes the oldest beyond a handful, and collects, in a loop, printing
/// what it has finished, until it is killed (or reaches its failpoint).
#[test]
fn crash_child() {
    let Some(dir) = std::env::var_os(CRASH_STORE) else {
        return;
    };
    let prefix = std::env::var(CRASH_PREFIX).unwrap();
    let keep: usize = std::env::var(CRASH_KEEP).map_or(6, |k| k.parse().unwrap());
    let store = Store::open_with(Path::new(&dir), crash_options()).unwrap();
    let say = |line: String| {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}").unwrap();
        out.flush().unwrap();
    };
    for i in 0..10_000u64 {
        let name = format!("{prefix}-{i}");
        let w = store.writer(&name, CRASH_PAGES * PAGE as u64).unwrap();
        std::thread::scope(|s| {
            for k in 0..2 {
                let (w, name) = (&w, &name);
                s.spawn(move || {
                    for p in (k..CRASH_PAGES).step_by(2) {
                        w.put_page(p, &crash_page(name, p)).unwrap();
                    }
                });
            }
        });
        w.set_state(crash_state(&name));
        w.set_order(crash_order(&name));
        w.finish().unwrap();
        say(format!("done {name}"));
        if i % 3 == 1 {
            let clone = format!("{name}-clone");
            store.clone_snapshot(&name, &clone).unwrap();
            say(format!("done {clone}"));
        }
        // Keep a handful: remove the oldest (clones before their bases).
        loop {
            let list = store.list().unwrap();
            if list.len() <= keep {
                break;
            }
            let bases: HashSet<&str> = list.iter().filter_map(|i| i.base.as_deref()).collect();
            let victim = list
                .iter()
                .find(|i| !bases.contains(i.name.as_str()))
                .unwrap();
            say(format!("removing {}", victim.name));
            store.remove(&victim.name).unwrap();
        }
        store.gc().unwrap();
    }
}

/// What the children reported: snapshots finished, and snapshots they set out to remove.
#[derive(Default)]
struct Reported {
    finished: HashSet<String>,
    removing: HashSet<String>,
}

impl Reported {
    fn read(&mut self, out: &str) -> usize {
        let mut n = 0;
        for line in out.lines() {
            if let Some(name) = line.strip_prefix("done ") {
                self.finished.insert(name.to_string());
                n += 1;
            } else if let Some(name) = line.strip_prefix("removing ") {
                self.removing.insert(name.to_string());
            }
        }
        n
    }
}

/// After a crash: fsck is clean, every snapshot finished (and not being removed) is there,
/// and every snapshot there reads back byte for byte (`pages_of` gives the pages of snapshots
/// the children did not write).
fn verify_after_crash(
    dir: &Path,
    reported: &Reported,
    what: &str,
    pages_of: &dyn Fn(&str) -> Option<Vec<Page>>,
) -> snapshot::store::FsckReport {
    let store = Store::open_with(dir, crash_options()).unwrap();
    let report = store.fsck().unwrap();
    assert!(report.is_clean(), "{what}: {:#?}", report.problems);
    let list = store.list().unwrap();
    let present: HashSet<&str> = list.iter().map(|i| i.name.as_str()).collect();
    for n in &reported.finished {
        assert!(
            reported.removing.contains(n) || present.contains(n.as_str()),
            "{what}: finished snapshot {n} is gone"
        );
    }
    for info in &list {
        // The last snapshot may have become visible just before its "done" line.
        let content_of = info.base.clone().unwrap_or_else(|| info.name.clone());
        let s = store.open_snapshot(&info.name).unwrap();
        if let Some(pages) = pages_of(&content_of) {
            for (p, want) in pages.iter().enumerate() {
                assert!(
                    read(&s, p as u64) == *want,
                    "{what}: {} page {p} differs",
                    info.name
                );
            }
            continue;
        }
        assert_eq!(s.state(), crash_state(&content_of), "{what}: {}", info.name);
        assert_eq!(s.order(), crash_order(&content_of), "{what}: {}", info.name);
        for p in 0..CRASH_PAGES {
            assert!(
                read(&s, p) == crash_page(&content_of, p),
                "{what}: {} page {p} differs",
                info.name
            );
        }
    }
    report
}

fn crash_child_command(dir: &Path, prefix: &str) -> Command {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
        .env(CRASH_STORE, dir)
        .env(CRASH_PREFIX, prefix)
        .env_remove(CRASH_AT)
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    c
}

#[test]
fn crash_safety_under_sigkill() {
    let t = TempDir::new("crash");
    let dir = t.store();
    Store::open_with(&dir, crash_options()).unwrap();
    // `SNAPSHOT_CRASH_ROUNDS=200 SNAPSHOT_CRASH_SEED=7` for a longer, different run.
    let env = |k: &str, d: u64| std::env::var(k).map_or(d, |v| v.parse().unwrap());
    let rounds = env("SNAPSHOT_CRASH_ROUNDS", 20) as usize;
    let mut reported = Reported::default();
    let mut x = env("SNAPSHOT_CRASH_SEED", 0x5eed);
    let mut total = 0;
    for round in 0..rounds {
        let mut child = crash_child_command(&dir, &format!("r{round}"))
            .spawn()
            .unwrap();
        // From the middle of the first write to several cycles in.
        let delay = Duration::from_millis(20 + splitmix(&mut x) % 400);
        std::thread::sleep(delay);
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let mut out = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        total += reported.read(&out);
        let what = format!("round {round} (killed after {delay:?})");
        let r = verify_after_crash(&dir, &reported, &what, &|_| None);
        println!(
            "{what}: {} leftovers, {} unreferenced packs",
            r.leftovers.len(),
            r.unreferenced_packs
        );
    }
    // The next gc clears whatever the kills left.
    let store = Store::open(&dir).unwrap();
    store.gc().unwrap();
    let r = assert_clean(&store);
    assert_eq!((r.leftovers.len(), r.unreferenced_packs), (0, 0));
    assert!(
        total >= rounds,
        "the children got far enough: {total} snapshots"
    );
}

/// A crash at each step of the protocol, made certain with the store's failpoints
/// (`MEMVISOR_STORE_CRASH_AT`): the child aborts there, and the store must be consistent.
#[test]
fn a_crash_at_every_step_of_the_protocol_leaves_a_consistent_store() {
    // `:2`: the second time (the writer's second pack; the clone's manifest).
    let steps = [
        "pack-written",
        "pack-linked",
        "pack-linked:2",
        "manifest-written",
        "manifest-linked",
        "manifest-linked:3",
        "remove-unlinked",
        "gc-leftovers-removed",
        "gc-pack-written",
        "gc-pack-linked",
        "gc-manifest-rewritten",
        "gc-pack-deleted",
    ];
    let gone: Vec<Page> = (0..64).map(text_page).collect();
    let keep: Vec<Page> = (0..64)
        .map(|i| {
            if i % 2 == 0 {
                gone[i]
            } else {
                text_page(100 + i as u64)
            }
        })
        .collect();
    let pages_of = |name: &str| match name {
        "gone" => Some(gone.clone()),
        "keep" => Some(keep.clone()),
        _ => None,
    };
    for step in steps {
        let t = TempDir::new("step");
        let dir = t.store();
        let store = Store::open_with(&dir, crash_options()).unwrap();
        // The child writes a third snapshot, removes "gone" (the oldest), and collects: half
        // of gone's pack is still needed by "keep", so gc copies it, rewrites keep's manifest
        // and deletes gone's pack.
        write(&store, "gone", &gone);
        write(&store, "keep", &keep);
        std::fs::write(dir.join("tmp/leftover"), b"of an earlier crash").unwrap();
        drop(store);
        let mut child = crash_child_command(&dir, "s")
            .env(CRASH_KEEP, "2")
            .env(CRASH_AT, step)
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if t0.elapsed() > Duration::from_secs(20) {
                child.kill().unwrap();
                panic!("{step}: the child never reached the step");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGABRT), "{step}: {status:?}");
        let mut out = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        let mut reported = Reported::default();
        reported.finished.insert("keep".into());
        reported.read(&out);
        verify_after_crash(&dir, &reported, step, &pages_of);
        let store = Store::open(&dir).unwrap();
        store.gc().unwrap();
        let r = assert_clean(&store);
        assert_eq!((r.leftovers.len(), r.unreferenced_packs), (0, 0), "{step}");
        assert_reads_back(&store, "keep", &keep);
    }
}
