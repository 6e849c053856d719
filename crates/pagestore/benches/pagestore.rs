//! Criterion benches of the store's hot paths, each beside its baseline on the same pages:
//! memcpy for reads and classification, lz4_flex for compressed inserts and reads.
//!
//! The pages are the bench binary's own executable: real code and data, not random fill.
//! `memvisor bench pagestore` runs the same comparisons on any memory image or process.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use pagestore::{Config, DeltaCodec, MAX_COMPRESSED, Outcome, PAGE_SIZE, Page, PageId, PageStore};

#[path = "../tests/common/mod.rs"]
mod common;

/// Each page with 8 bytes changed: pages that patch against the originals.
fn near_copies(pages: &[Page]) -> Vec<Page> {
    pages
        .iter()
        .enumerate()
        .map(|(i, p)| common::edited(p, 8, u8::try_from(i % 251).expect("< 251")))
        .collect()
}

fn benches(c: &mut Criterion) {
    let pages = common::real_pages(2048);
    let near = near_copies(&pages);
    let bytes = (pages.len() * PAGE_SIZE) as u64;

    let mut g = c.benchmark_group("pagestore");
    g.throughput(Throughput::Bytes(bytes));
    g.sample_size(20)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));

    // Baselines.
    g.bench_function("baseline/memcpy", |b| {
        let mut dst = vec![[0u8; PAGE_SIZE]; pages.len()];
        b.iter(|| {
            for (d, p) in dst.iter_mut().zip(&pages) {
                d.copy_from_slice(black_box(p));
            }
        });
    });
    g.bench_function("baseline/lz4_compress", |b| {
        let mut buf = [0u8; MAX_COMPRESSED];
        b.iter(|| {
            for p in &pages {
                black_box(lz4_flex::block::compress_into(black_box(p), &mut buf).ok());
            }
        });
    });

    // Classification (hash, lookups, byte compare) against a store holding every page.
    let full = PageStore::new(Config::default()).unwrap();
    let ids: Vec<(PageId, Outcome)> = pages
        .iter()
        .map(|p| full.insert_with_outcome(p).unwrap())
        .collect();
    g.bench_function("classify/duplicates", |b| {
        b.iter(|| {
            for p in &pages {
                black_box(full.classify(black_box(p)).unwrap());
            }
        });
    });
    g.bench_function("classify/new", |b| {
        let empty = PageStore::new(Config::default()).unwrap();
        b.iter(|| {
            for p in &pages {
                black_box(empty.classify(black_box(p)).unwrap());
            }
        });
    });

    // Inserts into a fresh store: mostly compressed; then the near copies, mostly patched.
    g.bench_function("insert/fresh", |b| {
        b.iter_batched(
            || PageStore::new(Config::default()).unwrap(),
            |s| {
                for p in &pages {
                    black_box(s.insert(p).unwrap());
                }
                s
            },
            BatchSize::LargeInput,
        );
    });
    g.bench_function("insert/near_copies", |b| {
        b.iter_batched(
            || {
                let s = PageStore::new(Config::default()).unwrap();
                for p in &pages {
                    s.insert(p).unwrap();
                }
                s
            },
            |s| {
                for p in &near {
                    black_box(s.insert(p).unwrap());
                }
                s
            },
            BatchSize::LargeInput,
        );
    });

    // Reads per class.
    let patched_store = PageStore::new(Config::default()).unwrap();
    for p in &pages {
        patched_store.insert(p).unwrap();
    }
    let patched: Vec<PageId> = near
        .iter()
        .filter_map(|p| match patched_store.insert_with_outcome(p).unwrap() {
            (id, Outcome::Patched { .. }) => Some(id),
            _ => None,
        })
        .collect();
    let compressed: Vec<PageId> = ids
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::Compressed { .. }))
        .map(|(id, _)| *id)
        .collect();
    for (name, store, set) in [
        ("read/compressed", &full, &compressed),
        ("read/patched", &patched_store, &patched),
    ] {
        g.throughput(Throughput::Bytes((set.len() * PAGE_SIZE) as u64));
        g.bench_function(name, |b| {
            let mut out = [0u8; PAGE_SIZE];
            b.iter(|| {
                for id in set {
                    store.read(*id, &mut out).unwrap();
                    black_box(&out);
                }
            });
        });
    }

    // Delta codecs on the (original, near copy) pairs.
    g.throughput(Throughput::Bytes(bytes));
    for codec in DeltaCodec::ALL {
        g.bench_function(format!("delta/{}/encode", codec.name()), |b| {
            let mut d = Vec::with_capacity(PAGE_SIZE);
            b.iter(|| {
                for (p, r) in near.iter().zip(&pages) {
                    black_box(codec.encode(p, r, 2048, &mut d));
                }
            });
        });
    }
    g.finish();
}

criterion_group!(pagestore, benches);
criterion_main!(pagestore);
