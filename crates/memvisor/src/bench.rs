//! `memvisor bench pagestore`: the store on real pages, against memcpy and lz4_flex on the
//! same pages in the same run.

use std::hint::black_box;
use std::ops::ControlFlow;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use pagestore::{
    Class, Config, DeltaCodec, MAX_COMPRESSED, Outcome, PAGE_SIZE, Page, PageId, PageStore, is_zero,
};
use serde::Serialize;

use crate::alloc::live_bytes;
use crate::analyze::lz4_held;
use crate::input::Input;

const CLASSES: [&str; 5] = ["zero", "shared", "patched", "compressed", "raw"];

fn class_ix(o: Outcome) -> usize {
    match o {
        Outcome::Zero => 0,
        Outcome::Shared => 1,
        Outcome::Patched { .. } => 2,
        Outcome::Compressed { .. } => 3,
        Outcome::Raw => 4,
    }
}

/// Pages from the inputs, or from every process of this machine but ourselves.
pub fn collect_pages(inputs: &[Input], max_pages: usize) -> Result<(Vec<Page>, Vec<String>)> {
    let inputs = if inputs.is_empty() {
        machine_processes()
    } else {
        inputs.to_vec()
    };
    let mut pages = Vec::new();
    let mut used = Vec::new();
    for input in &inputs {
        if pages.len() >= max_pages {
            break;
        }
        let src = match input.open() {
            Ok(s) => s,
            // Processes come and go while we scan the machine; named inputs must work.
            Err(_) if matches!(input, Input::Pid(_)) => continue,
            Err(e) => return Err(e.into()),
        };
        src.for_each_page(
            |p| {
                pages.push(*p);
                if pages.len() < max_pages {
                    ControlFlow::Continue(())
                } else {
                    ControlFlow::Break(())
                }
            },
            |_| {},
        )
        .with_context(|| format!("reading {}", src.name))?;
        used.push(src.name.clone());
    }
    if pages.is_empty() {
        bail!("no pages to measure: the inputs hold no resident memory");
    }
    Ok((pages, used))
}

fn machine_processes() -> Vec<Input> {
    let me = std::process::id();
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|&p| p != me)
        .collect();
    pids.sort_unstable();
    pids.into_iter().map(Input::Pid).collect()
}

/// Median, minimum and maximum of one figure over the runs.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Spread {
    /// median
    pub median: f64,
    /// smallest
    pub min: f64,
    /// largest
    pub max: f64,
}

fn spread(mut v: Vec<f64>) -> Spread {
    v.sort_by(f64::total_cmp);
    Spread {
        median: v[v.len() / 2],
        min: v[0],
        max: v[v.len() - 1],
    }
}

#[derive(Debug, Default, Clone)]
struct Run {
    memcpy_gbps: f64,
    classify_gbps: f64,
    classify_dup_gbps: f64,
    insert_pages: [u64; 5],
    insert_gbps: [f64; 5],
    read_gbps: [f64; 5],
    read_p50_us: [f64; 5],
    read_p99_us: [f64; 5],
    read_1t_gbps: f64,
    read_nt_gbps: f64,
    lz4_scaling: f64,
    lz4_gbps: f64,
    insert_compressed_gbps: f64,
    still_compressed: f64,
    held: u64,
    payload: u64,
    metadata: u64,
    heap: u64,
    malloc: u64,
}

fn gbps(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

fn one_run(pages: &[Page], cfg: Config) -> Result<Run> {
    let mut r = Run::default();
    let bytes = std::mem::size_of_val(pages);

    // Baseline: copying the same pages.
    let mut dst = vec![[1u8; PAGE_SIZE]; pages.len()];
    let t = Instant::now();
    for (d, p) in dst.iter_mut().zip(pages) {
        d.copy_from_slice(black_box(p));
    }
    black_box(&dst);
    r.memcpy_gbps = gbps(bytes, t.elapsed().as_secs_f64());
    drop(dst);

    // Insert every page, timing each by the class it lands in.
    let mut ids: Vec<(PageId, usize)> = Vec::with_capacity(pages.len());
    let mut secs = [0f64; 5];
    let heap0 = live_bytes();
    let malloc0 = crate::alloc::malloc_in_use();
    let store = PageStore::new(cfg)?;
    for (i, p) in pages.iter().enumerate() {
        let t = Instant::now();
        let (id, o) = store.insert_with_outcome(p)?;
        let dt = t.elapsed().as_secs_f64();
        let c = class_ix(o);
        secs[c] += dt;
        r.insert_pages[c] += 1;
        ids.push((id, c));
        black_box(i);
    }
    r.heap = (live_bytes() - heap0) as u64;
    r.malloc = crate::alloc::malloc_in_use().saturating_sub(malloc0) as u64;
    for ((g, &n), &s) in r.insert_gbps.iter_mut().zip(&r.insert_pages).zip(&secs) {
        *g = n as f64 * PAGE_SIZE as f64 / s / 1e9;
    }
    let st = store.stats();
    (r.held, r.payload, r.metadata) = (st.held_bytes(), st.payload_bytes(), st.metadata_bytes);

    // Read every page back, timing each; check the bytes while at it.
    let mut lat: [Vec<f64>; 5] = Default::default();
    let mut out = [0u8; PAGE_SIZE];
    for (i, &(id, c)) in ids.iter().enumerate() {
        let t = Instant::now();
        store.read(id, &mut out)?;
        lat[c].push(t.elapsed().as_secs_f64());
        if out != pages[i] {
            bail!("page {i} read back different bytes: a store bug");
        }
    }
    for (c, l) in lat.iter_mut().enumerate() {
        if l.is_empty() {
            continue;
        }
        r.read_gbps[c] = gbps(l.len() * PAGE_SIZE, l.iter().sum());
        l.sort_by(f64::total_cmp);
        r.read_p50_us[c] = l[l.len() / 2] * 1e6;
        r.read_p99_us[c] = l[l.len() * 99 / 100] * 1e6;
    }

    // All reads again without per-read clocks, on one thread and then on every core at once
    // (each thread its own share of the ids): no read takes a global lock, so this scales.
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let t = Instant::now();
    for &(id, _) in &ids {
        store.read(id, &mut out)?;
        black_box(&out);
    }
    r.read_1t_gbps = gbps(bytes, t.elapsed().as_secs_f64());
    let t = Instant::now();
    std::thread::scope(|sc| {
        for part in ids.chunks(ids.len().div_ceil(threads)) {
            let store = &store;
            sc.spawn(move || {
                let mut out = [0u8; PAGE_SIZE];
                for &(id, _) in part {
                    store.read(id, &mut out).expect("held page reads");
                    black_box(&out);
                }
            });
        }
    });
    r.read_nt_gbps = gbps(bytes, t.elapsed().as_secs_f64());
    r.lz4_scaling = lz4_decode_scaling(pages, threads);

    // Classification alone, against the full store: every page finds itself, so this pays
    // the hash, the lookups and the full compare (decompressing where the copy is compressed).
    let t = Instant::now();
    for p in pages {
        black_box(store.classify(black_box(p))?);
    }
    r.classify_dup_gbps = gbps(bytes, t.elapsed().as_secs_f64());

    // Classification as pages arrive: each page against the store as it was when it came, the
    // mix a scanner sees (unique pages pay hash and lookups, duplicates the compare too).
    let arrival = PageStore::new(cfg)?;
    let mut secs = 0.0;
    for p in pages {
        let t = Instant::now();
        black_box(arrival.classify(black_box(p))?);
        secs += t.elapsed().as_secs_f64();
        arrival.insert(p)?;
    }
    r.classify_gbps = gbps(bytes, secs);
    drop(arrival);

    // The pages that ended compressed: lz4_flex alone against a fresh store's insert.
    let comp: Vec<&Page> = ids
        .iter()
        .zip(pages)
        .filter(|((_, c), _)| *c == 3)
        .map(|(_, p)| p)
        .collect();
    if !comp.is_empty() {
        let mut buf = [0u8; MAX_COMPRESSED];
        let t = Instant::now();
        for p in &comp {
            black_box(lz4_flex::block::compress_into(black_box(&p[..]), &mut buf).ok());
        }
        r.lz4_gbps = gbps(comp.len() * PAGE_SIZE, t.elapsed().as_secs_f64());
        let fresh = PageStore::new(cfg)?;
        let mut n_comp = 0;
        let t = Instant::now();
        for p in &comp {
            let (_, o) = fresh.insert_with_outcome(black_box(p))?;
            n_comp += usize::from(matches!(o, Outcome::Compressed { .. }));
        }
        r.insert_compressed_gbps = gbps(comp.len() * PAGE_SIZE, t.elapsed().as_secs_f64());
        r.still_compressed = n_comp as f64 / comp.len() as f64;
    }

    for (id, _) in ids {
        store.remove(id)?;
    }
    Ok(r)
}

/// How lz4_flex alone scales from one thread to `threads` decoding the same pages: what the
/// machine allows, against which the store's parallel reads are judged.
fn lz4_decode_scaling(pages: &[Page], threads: usize) -> f64 {
    let comp: Vec<Vec<u8>> = pages.iter().map(|p| lz4_flex::block::compress(p)).collect();
    let work = |part: &[Vec<u8>]| {
        let mut out = [0u8; PAGE_SIZE];
        for c in part {
            black_box(lz4_flex::block::decompress_into(c, &mut out).ok());
        }
    };
    let t = Instant::now();
    work(&comp);
    let one = t.elapsed().as_secs_f64();
    let t = Instant::now();
    std::thread::scope(|sc| {
        for part in comp.chunks(comp.len().div_ceil(threads)) {
            sc.spawn(move || work(part));
        }
    });
    one / t.elapsed().as_secs_f64()
}

/// What sharing only (each distinct page once, found by whole-page equality) and LZ4 only
/// (zram's rule) would hold for the non-zero pages.
fn baselines(pages: &[Page]) -> (u64, u64) {
    let mut buf = [0u8; MAX_COMPRESSED];
    let nonzero: Vec<&Page> = pages.iter().filter(|p| !is_zero(p)).collect();
    let distinct: std::collections::HashSet<&Page> = nonzero.iter().copied().collect();
    let lz4 = nonzero.iter().map(|p| lz4_held(p, &mut buf)).sum();
    (distinct.len() as u64 * PAGE_SIZE as u64, lz4)
}

/// One delta codec on the (page, reference) pairs that the similarity index proposed.
#[derive(Debug, Serialize)]
pub struct CodecFigures {
    /// codec name
    pub codec: &'static str,
    /// pairs tried
    pub pairs: usize,
    /// pairs whose patch fit under the cap
    pub kept: usize,
    /// mean patch bytes of those
    pub mean_bytes: f64,
    /// encode time per pair, microseconds
    pub encode_us: f64,
    /// decode time per kept patch, microseconds
    pub decode_us: f64,
    /// bytes saved per microsecond of encode+decode: the figure the default was chosen by
    pub saved_per_us: f64,
}

fn codec_figures(pages: &[Page], cfg: Config) -> Result<Vec<CodecFigures>> {
    let store = PageStore::new(cfg)?;
    let mut pairs: Vec<(Page, Page)> = Vec::new();
    let mut reference = [0u8; PAGE_SIZE];
    for p in pages {
        if pairs.len() < 20_000
            && store.classify(p)? == Class::Similar
            && store.similar_reference(p, &mut reference)
        {
            pairs.push((*p, reference));
        }
        store.insert(p)?;
    }
    let cap = cfg.patch.map_or(2048, |p| p.max_patch);
    let mut figures = Vec::new();
    for codec in DeltaCodec::ALL {
        let mut patches = Vec::with_capacity(pairs.len());
        let mut d = Vec::with_capacity(PAGE_SIZE);
        let t = Instant::now();
        for (p, r) in &pairs {
            if codec.encode(p, r, cap, &mut d) {
                patches.push((d.clone(), r));
            }
        }
        let enc = t.elapsed().as_secs_f64();
        let mut out = [0u8; PAGE_SIZE];
        let t = Instant::now();
        for (d, r) in &patches {
            codec.decode(d, r, &mut out)?;
            black_box(&out);
        }
        let dec = t.elapsed().as_secs_f64();
        let bytes: usize = patches.iter().map(|(d, _)| d.len()).sum();
        let n = patches.len().max(1) as f64;
        let saved = (patches.len() * PAGE_SIZE - bytes) as f64;
        figures.push(CodecFigures {
            codec: codec.name(),
            pairs: pairs.len(),
            kept: patches.len(),
            mean_bytes: bytes as f64 / n,
            encode_us: enc * 1e6 / pairs.len().max(1) as f64,
            decode_us: dec * 1e6 / n,
            saved_per_us: saved / ((enc + dec) * 1e6).max(1e-9),
        });
    }
    Ok(figures)
}

/// Everything `bench pagestore` prints, for `--json`.
#[derive(Debug, Serialize)]
pub struct Summary {
    /// the inputs read
    pub inputs: Vec<String>,
    /// pages measured
    pub pages: usize,
    /// runs taken
    pub runs: usize,
    /// memcpy of the same pages, GB/s
    pub memcpy_gbps: Spread,
    /// classify (hash, lookups, compare) as pages arrive, GB/s
    pub classify_gbps: Spread,
    /// classify when every page is a duplicate of a held one (the full compare), GB/s
    pub classify_dup_gbps: Spread,
    /// per class: name, pages, insert GB/s, read GB/s, read p50 us, read p99 us
    pub classes: Vec<ClassFigures>,
    /// threads used for the parallel read figure (one per core)
    pub threads: usize,
    /// reading every page back on one thread, GB/s
    pub read_1t_gbps: Spread,
    /// the same reads spread over `threads` threads, GB/s
    pub read_nt_gbps: Spread,
    /// read_nt / read_1t, per run
    pub read_scaling: Spread,
    /// lz4_flex decoding the same pages, N threads over one
    pub lz4_scaling: Spread,
    /// lz4_flex compressing the pages that the store kept compressed, GB/s
    pub lz4_gbps: Spread,
    /// the store inserting those same pages, GB/s
    pub insert_compressed_gbps: Spread,
    /// insert_compressed / lz4, per run
    pub insert_compressed_vs_lz4: Spread,
    /// bytes the store holds (payload + metadata)
    pub held_bytes: u64,
    /// of which metadata
    pub metadata_bytes: u64,
    /// heap bytes the process gained while filling the store (bytes asked of the allocator)
    pub heap_bytes: u64,
    /// what glibc malloc holds for them, its chunk headers and rounding included
    pub malloc_bytes: u64,
    /// sharing only (KSM) on the same pages
    pub sharing_only_bytes: u64,
    /// LZ4 only (zram) on the same pages
    pub lz4_only_bytes: u64,
    /// the same pages in a real zram device (lz4), as the kernel counts them
    pub zram: Option<crate::zram::ZramStats>,
    /// why zram was not measured
    pub zram_skipped: Option<String>,
    /// the delta codecs compared
    pub codecs: Vec<CodecFigures>,
}

/// One class's figures.
#[derive(Debug, Serialize)]
pub struct ClassFigures {
    /// class name
    pub class: &'static str,
    /// pages that landed in it
    pub pages: u64,
    /// insert throughput
    pub insert_gbps: Spread,
    /// read throughput
    pub read_gbps: Spread,
    /// median read latency
    pub read_p50_us: Spread,
    /// 99th percentile read latency
    pub read_p99_us: Spread,
}

/// Runs the benchmark.
pub fn run(inputs: &[Input], max_pages: usize, runs: usize, cfg: Config) -> Result<Summary> {
    let (pages, used) = collect_pages(inputs, max_pages)?;
    let runs = runs.max(1);
    let rs: Vec<Run> = (0..runs)
        .map(|_| one_run(&pages, cfg))
        .collect::<Result<_>>()?;
    let f = |g: &dyn Fn(&Run) -> f64| spread(rs.iter().map(g).collect());
    let last = rs.last().expect("at least one run");
    let (sharing_only, lz4_only) = baselines(&pages);
    let (zram, zram_skipped) = match crate::zram::measure(&pages, "lz4") {
        Ok(z) => (Some(z), None),
        Err(e) => (None, Some(e.to_string())),
    };
    let classes = (0..5)
        .map(|c| ClassFigures {
            class: CLASSES[c],
            pages: last.insert_pages[c],
            insert_gbps: f(&|r| r.insert_gbps[c]),
            read_gbps: f(&|r| r.read_gbps[c]),
            read_p50_us: f(&|r| r.read_p50_us[c]),
            read_p99_us: f(&|r| r.read_p99_us[c]),
        })
        .collect();
    Ok(Summary {
        inputs: used,
        pages: pages.len(),
        runs,
        memcpy_gbps: f(&|r| r.memcpy_gbps),
        classify_gbps: f(&|r| r.classify_gbps),
        classify_dup_gbps: f(&|r| r.classify_dup_gbps),
        classes,
        threads: std::thread::available_parallelism().map_or(1, usize::from),
        read_1t_gbps: f(&|r| r.read_1t_gbps),
        read_nt_gbps: f(&|r| r.read_nt_gbps),
        read_scaling: f(&|r| r.read_nt_gbps / r.read_1t_gbps),
        lz4_scaling: f(&|r| r.lz4_scaling),
        lz4_gbps: f(&|r| r.lz4_gbps),
        insert_compressed_gbps: f(&|r| r.insert_compressed_gbps),
        insert_compressed_vs_lz4: f(&|r| r.insert_compressed_gbps / r.lz4_gbps),
        held_bytes: last.held,
        metadata_bytes: last.metadata,
        heap_bytes: last.heap,
        malloc_bytes: last.malloc,
        sharing_only_bytes: sharing_only,
        lz4_only_bytes: lz4_only,
        zram,
        zram_skipped,
        codecs: codec_figures(&pages, cfg)?,
    })
}

fn sp(s: Spread, prec: usize) -> String {
    format!("{:.p$} ({:.p$}-{:.p$})", s.median, s.min, s.max, p = prec)
}

/// The summary as a table for people.
pub fn render(s: &Summary) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let names = if s.inputs.len() > 6 {
        format!(
            "{} inputs ({} ... {})",
            s.inputs.len(),
            s.inputs[0],
            s.inputs[s.inputs.len() - 1]
        )
    } else {
        s.inputs.join(" ")
    };
    let _ = writeln!(
        o,
        "pages: {} ({:.1} MiB) from {names}",
        s.pages,
        (s.pages * PAGE_SIZE) as f64 / (1 << 20) as f64
    );
    let _ = writeln!(o, "one thread; median of {} runs (min-max)\n", s.runs);
    let m = s.memcpy_gbps.median;
    let _ = writeln!(
        o,
        "baseline memcpy of the same pages       {} GB/s",
        sp(s.memcpy_gbps, 2)
    );
    let _ = writeln!(
        o,
        "classify as pages arrive                {} GB/s   = {:.2} x memcpy",
        sp(s.classify_gbps, 2),
        s.classify_gbps.median / m
    );
    let _ = writeln!(
        o,
        "classify, every page a duplicate        {} GB/s   = {:.2} x memcpy  (hash, lookups, full byte compare)",
        sp(s.classify_dup_gbps, 2),
        s.classify_dup_gbps.median / m
    );
    let _ = writeln!(
        o,
        "\n{:<11} {:>8} {:>22} {:>22} {:>20} {:>10}",
        "class", "pages", "insert GB/s", "read GB/s", "read p50 us", "p99 us"
    );
    for c in &s.classes {
        if c.pages == 0 {
            let _ = writeln!(o, "{:<11} {:>8}", c.class, 0);
            continue;
        }
        let _ = writeln!(
            o,
            "{:<11} {:>8} {:>22} {:>22} {:>20} {:>10.2}",
            c.class,
            c.pages,
            sp(c.insert_gbps, 2),
            sp(c.read_gbps, 2),
            sp(c.read_p50_us, 2),
            c.read_p99_us.median
        );
    }
    let _ = writeln!(
        o,
        "(per-page timings include about 20-40 ns of clock reads each)"
    );
    let _ = writeln!(
        o,
        "\nall reads, one thread {} GB/s; {} threads at once {} GB/s = {}x one thread\n  (lz4_flex alone decoding the same pages scales {}x here: the machine's own bound)",
        sp(s.read_1t_gbps, 2),
        s.threads,
        sp(s.read_nt_gbps, 2),
        sp(s.read_scaling, 2),
        sp(s.lz4_scaling, 2)
    );
    let _ = writeln!(
        o,
        "\npages kept compressed: lz4_flex alone {} GB/s, memvisor insert {} GB/s = {} of lz4_flex",
        sp(s.lz4_gbps, 2),
        sp(s.insert_compressed_gbps, 2),
        sp(s.insert_compressed_vs_lz4, 2)
    );
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let _ = writeln!(
        o,
        "\nfootprint: memvisor {:.1} MiB (metadata {:.2} MiB), sharing only {:.1} MiB, LZ4 only {:.1} MiB",
        mib(s.held_bytes),
        mib(s.metadata_bytes),
        mib(s.sharing_only_bytes),
        mib(s.lz4_only_bytes)
    );
    let _ = writeln!(
        o,
        "  cross-check: the heap grew {:.1} MiB as asked of the allocator, {:.1} MiB as glibc malloc holds it",
        mib(s.heap_bytes),
        mib(s.malloc_bytes)
    );
    let _ = writeln!(
        o,
        "  memvisor / sharing only = {:.3}; memvisor / LZ4 only = {:.3}",
        s.held_bytes as f64 / s.sharing_only_bytes.max(1) as f64,
        s.held_bytes as f64 / s.lz4_only_bytes.max(1) as f64
    );
    match (&s.zram, &s.zram_skipped) {
        (Some(z), _) => {
            let _ = writeln!(
                o,
                "  zram (lz4), measured by the kernel: {:.1} MiB in use ({:.1} MiB compressed data, {:.1} MiB zsmalloc overhead); memvisor / zram = {:.3}",
                mib(z.mem_used_bytes),
                mib(z.compr_data_bytes),
                mib(z.mem_used_bytes.saturating_sub(z.compr_data_bytes)),
                s.held_bytes as f64 / z.mem_used_bytes.max(1) as f64
            );
        }
        (None, Some(why)) => {
            let _ = writeln!(o, "  zram not measured: {why}");
        }
        _ => {}
    }
    let _ = writeln!(
        o,
        "\ndelta codecs on the {} (page, reference) pairs the similarity index proposed:",
        s.codecs.first().map_or(0, |c| c.pairs)
    );
    let _ = writeln!(
        o,
        "{:<12} {:>7} {:>11} {:>10} {:>10} {:>14}",
        "codec", "kept", "mean bytes", "encode us", "decode us", "saved B / us"
    );
    for c in &s.codecs {
        let _ = writeln!(
            o,
            "{:<12} {:>7} {:>11.0} {:>10.2} {:>10.2} {:>14.0}",
            c.codec, c.kept, c.mean_bytes, c.encode_us, c.decode_us, c.saved_per_us
        );
    }
    o
}
