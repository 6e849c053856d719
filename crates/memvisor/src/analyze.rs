//! `memvisor analyze`: what sharing, patching and compression would save on memory images.
//!
//! Every page of every input goes through one real [`PageStore`] (so "memvisor" is what the
//! store actually holds, metadata included), and through the baselines computed on the same
//! pages: sharing only (what KSM can do), LZ4 only (what zram/zswap do), and both.

use std::ops::ControlFlow;

use pagestore::{
    Compression, Config, MAX_COMPRESSED, Outcome, PAGE_SIZE, Page, PageStore, StoreError,
};
use serde::Serialize;

use crate::input::{Input, InputError, Kind, Skipped, Source};

/// Why an analysis failed.
#[derive(Debug, thiserror::Error)]
pub enum AnalyzeError {
    /// an input could not be read
    #[error(transparent)]
    Input(#[from] InputError),
    /// the page store refused a page
    #[error("page store failed")]
    Store(#[from] StoreError),
}

/// zram keeps a page that compresses to more than this as a whole page (its "huge" class);
/// the LZ4 baselines follow the same rule, as does the store's default.
pub const ZRAM_HUGE: usize = PAGE_SIZE * 3 / 4;

/// Bytes each strategy would hold for the non-zero pages.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct Held {
    /// No policy: every non-zero page whole.
    pub plain: u64,
    /// Identical pages once (KSM).
    pub sharing_only: u64,
    /// Every page compressed with LZ4 (zram, zswap).
    pub lz4_only: u64,
    /// Identical pages once, compressed.
    pub sharing_lz4: u64,
    /// memvisor: shared, patched, compressed, with its metadata.
    pub memvisor: u64,
}

impl Held {
    /// Per cent of `plain` that `held` saves.
    pub fn saving(&self, held: u64) -> f64 {
        if self.plain == 0 {
            0.0
        } else {
            100.0 * (1.0 - held as f64 / self.plain as f64)
        }
    }

    fn add(&mut self, o: &Held) {
        self.plain += o.plain;
        self.sharing_only += o.sharing_only;
        self.lz4_only += o.lz4_only;
        self.sharing_lz4 += o.sharing_lz4;
        self.memvisor += o.memvisor;
    }
}

/// Counts for one input (pages first seen in earlier inputs count as duplicates here).
#[derive(Debug, Default, Clone, Serialize)]
pub struct Report {
    /// The input as named.
    pub name: String,
    /// raw, core or process.
    pub kind: Option<Kind>,
    /// Pages read.
    pub pages: u64,
    /// All-zero pages.
    pub zero: u64,
    /// Non-zero pages whose exact bytes appeared earlier in the inputs.
    pub duplicate: u64,
    /// Pages stored as patches against a similar page.
    pub patched: u64,
    /// Bytes of those patches.
    pub patch_bytes: u64,
    /// Pages stored compressed.
    pub compressed: u64,
    /// Pages stored whole.
    pub raw: u64,
    /// Pages the input skipped.
    pub skipped: Skipped,
    /// Bytes held per strategy.
    pub held: Held,
}

/// The whole analysis.
#[derive(Debug, Serialize)]
pub struct Analysis {
    /// The store's configuration.
    pub config: Config,
    /// One report per input.
    pub inputs: Vec<Report>,
    /// All inputs together.
    pub total: Report,
    /// The store's own figures: payload, metadata, per class.
    pub store: pagestore::Stats,
}

/// Runs the analysis. `progress` is told the total bytes first, then each chunk read.
pub fn analyze(
    inputs: &[Input],
    config: Config,
    mut on_start: impl FnMut(u64),
    mut progress: impl FnMut(u64),
) -> Result<Analysis, AnalyzeError> {
    let sources: Vec<Source> = inputs.iter().map(Input::open).collect::<Result<_, _>>()?;
    on_start(sources.iter().map(Source::mapped_bytes).sum());
    let store = PageStore::new(config).expect("a validated configuration");
    let mut reports = Vec::new();
    let mut cbuf = [0u8; MAX_COMPRESSED];
    for src in &sources {
        let mut r = Report {
            name: src.name.clone(),
            kind: Some(src.kind),
            ..Report::default()
        };
        let mut failure = None;
        r.skipped = src.for_each_page(
            |page: &Page| match store.insert_with_outcome(page) {
                Ok((_, outcome)) => {
                    count(&mut r, outcome, page, &mut cbuf);
                    ControlFlow::Continue(())
                }
                Err(e) => {
                    failure = Some(e);
                    ControlFlow::Break(())
                }
            },
            &mut progress,
        )?;
        if let Some(e) = failure {
            return Err(e.into());
        }
        reports.push(r);
    }
    let stats = store.stats();
    // Metadata and arena slack serve all inputs: spread them by each one's share of stored pages.
    let stored: u64 = reports
        .iter()
        .map(|r| r.patched + r.compressed + r.raw)
        .sum();
    for r in &mut reports {
        let mine = r.patched + r.compressed + r.raw;
        if stored > 0 {
            let overhead = stats.metadata_bytes + stats.slack_bytes;
            let share = u128::from(overhead) * u128::from(mine) / u128::from(stored);
            r.held.memvisor += u64::try_from(share).expect("a share of a u64 fits a u64");
        }
    }
    let mut total = Report {
        name: "all inputs".into(),
        ..Report::default()
    };
    for r in &reports {
        total.pages += r.pages;
        total.zero += r.zero;
        total.duplicate += r.duplicate;
        total.patched += r.patched;
        total.patch_bytes += r.patch_bytes;
        total.compressed += r.compressed;
        total.raw += r.raw;
        total.skipped.add(r.skipped);
        total.held.add(&r.held);
    }
    // The total is the store's exact figure, not the sum of rounded shares.
    total.held.memvisor = stats.held_bytes();
    Ok(Analysis {
        config,
        inputs: reports,
        total,
        store: stats,
    })
}

/// What zram would hold for `page` with LZ4: the compressed bytes, or the whole page when
/// it compresses to more than [`ZRAM_HUGE`].
pub fn lz4_held(page: &Page, buf: &mut [u8; MAX_COMPRESSED]) -> u64 {
    match Compression::Lz4.compress(page, buf) {
        Some(n) if n <= ZRAM_HUGE => n as u64,
        _ => PAGE_SIZE as u64,
    }
}

fn count(r: &mut Report, outcome: Outcome, page: &Page, buf: &mut [u8; MAX_COMPRESSED]) {
    r.pages += 1;
    if outcome == Outcome::Zero {
        r.zero += 1;
        return;
    }
    let lz4 = lz4_held(page, buf);
    r.held.plain += PAGE_SIZE as u64;
    r.held.lz4_only += lz4;
    if outcome == Outcome::Shared {
        r.duplicate += 1;
        return;
    }
    r.held.sharing_only += PAGE_SIZE as u64;
    r.held.sharing_lz4 += lz4;
    match outcome {
        Outcome::Patched { bytes } => {
            r.patched += 1;
            r.patch_bytes += bytes as u64;
        }
        Outcome::Compressed { .. } => r.compressed += 1,
        _ => r.raw += 1,
    }
    r.held.memvisor += outcome.stored_bytes() as u64;
}

fn mib(b: u64) -> String {
    format!("{:.2} MiB", b as f64 / (1 << 20) as f64)
}

/// The analysis as tables for people.
pub fn render(a: &Analysis) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<28} {:>9} {:>9} {:>9} {:>9} {:>8} | saved: {:>6} {:>6} {:>8} {:>8}",
        "input", "pages", "zero", "dup", "patched", "avg B", "KSM", "LZ4", "KSM+LZ4", "memvisor"
    );
    for r in a.inputs.iter().chain([&a.total]) {
        if std::ptr::eq(r, &a.total) {
            let _ = writeln!(s, "{}", "-".repeat(117));
        }
        let h = &r.held;
        // Long names keep their last 27 characters (not bytes: a path may be UTF-8).
        let name = match r.name.char_indices().rev().nth(26) {
            Some((at, _)) if r.name.chars().count() > 28 => format!("…{}", &r.name[at..]),
            _ => r.name.clone(),
        };
        let _ = writeln!(
            s,
            "{:<28} {:>9} {:>9} {:>9} {:>9} {:>8} | {:>13.1}% {:>5.1}% {:>7.1}% {:>8.1}%",
            name,
            r.pages,
            r.zero,
            r.duplicate,
            r.patched,
            r.patch_bytes.checked_div(r.patched).unwrap_or(0),
            h.saving(h.sharing_only),
            h.saving(h.lz4_only),
            h.saving(h.sharing_lz4),
            h.saving(h.memvisor),
        );
    }
    let h = &a.total.held;
    let _ = writeln!(
        s,
        "\nheld for the {} non-zero pages ({}):",
        a.total.pages - a.total.zero,
        mib(h.plain)
    );
    for (name, b) in [
        ("sharing only (KSM)", h.sharing_only),
        ("LZ4 only (zram/zswap)", h.lz4_only),
        ("sharing + LZ4", h.sharing_lz4),
        ("memvisor (share+patch+compress)", h.memvisor),
    ] {
        let _ = writeln!(
            s,
            "  {name:<32} {:>12}  saves {:>5.1}%",
            mib(b),
            h.saving(b)
        );
    }
    let st = &a.store;
    let _ = writeln!(
        s,
        "  memvisor holds {} of payload, {} of metadata ({:.1} B per stored page; KSM's rmap_item is 64 B per page) and {} of arena slack",
        mib(st.payload_bytes()),
        mib(st.metadata_bytes),
        st.metadata_bytes as f64 / st.stored_pages().max(1) as f64,
        mib(st.slack_bytes)
    );
    let class = |name: &str, f: &pagestore::FormStats| {
        format!(
            "{name} {} pages {} (+{} entries)",
            f.stored,
            mib(f.payload_bytes),
            mib(f.metadata_bytes)
        )
    };
    let _ = writeln!(
        s,
        "  by class: {}; {}; {}; shared {} and zero {} pages store nothing more",
        class("patched", &st.patched),
        class("compressed", &st.compressed),
        class("raw", &st.raw),
        st.shared_pages,
        st.zero_pages
    );
    let _ = writeln!(
        s,
        "  (the baselines count page contents only: KSM's own metadata and zram's table and zsmalloc rounding are left out)"
    );
    let _ = writeln!(
        s,
        "  memvisor / sharing only = {:.3}, memvisor / LZ4 only = {:.3}",
        h.memvisor as f64 / h.sharing_only.max(1) as f64,
        h.memvisor as f64 / h.lz4_only.max(1) as f64
    );
    let sk = a.total.skipped;
    if sk.not_resident + sk.unreadable > 0 {
        let _ = writeln!(
            s,
            "  not counted: {} mapped pages not resident (they cost nothing), {} pages the kernel would not read",
            sk.not_resident, sk.unreadable
        );
    }
    s
}
