//! What the pager did: counters, fault latency histograms, and the snapshot a user reads.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::{Deserialize, Serialize};

/// Sub-buckets per power of two: a reported percentile is within 1/8 (12.5%) of the truth.
const SUB: usize = 8;
const BUCKETS: usize = 64 * SUB;

/// A lock-free log-linear histogram of nanosecond latencies.
#[derive(Debug)]
pub struct Histogram {
    counts: Box<[AtomicU64]>,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

fn bucket(ns: u64) -> usize {
    if ns < SUB as u64 {
        return ns as usize;
    }
    let log = 63 - ns.leading_zeros() as usize; // >= 3
    let sub = ((ns >> (log - 3)) & (SUB as u64 - 1)) as usize;
    (log - 2) * SUB + sub
}

/// The smallest value that falls in bucket `b` (its lower bound).
fn lower(b: usize) -> u64 {
    if b < SUB {
        return b as u64;
    }
    let log = b / SUB + 2;
    let sub = (b % SUB) as u64;
    (1u64 << log) | (sub << (log - 3))
}

impl Histogram {
    /// Records one latency.
    pub fn record(&self, ns: u64) {
        self.counts[bucket(ns).min(BUCKETS - 1)].fetch_add(1, Relaxed);
    }

    /// Adds this histogram's counts to `other`.
    pub(crate) fn merge_into(&self, other: &Histogram) {
        for (a, b) in self.counts.iter().zip(other.counts.iter()) {
            b.fetch_add(a.load(Relaxed), Relaxed);
        }
    }

    /// Count, p50 and p99 (bucket midpoints), in nanoseconds.
    pub fn summary(&self) -> Latency {
        let counts: Vec<u64> = self.counts.iter().map(|c| c.load(Relaxed)).collect();
        let count: u64 = counts.iter().sum();
        let at = |q: f64| -> u64 {
            if count == 0 {
                return 0;
            }
            // The rank of the q-quantile, 1-based.
            // q is in (0, 1], so the product is positive.
            #[allow(clippy::cast_sign_loss)]
            let rank = ((count as f64 * q).ceil() as u64).max(1);
            let mut seen = 0;
            for (b, &c) in counts.iter().enumerate() {
                seen += c;
                if seen >= rank {
                    let lo = lower(b);
                    let hi = if b + 1 < BUCKETS { lower(b + 1) } else { lo };
                    return (lo + hi) / 2;
                }
            }
            0
        };
        Latency {
            count,
            p50_ns: at(0.50),
            p99_ns: at(0.99),
        }
    }
}

/// How many and how fast.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Latency {
    /// events recorded
    pub count: u64,
    /// median, nanoseconds
    pub p50_ns: u64,
    /// 99th percentile, nanoseconds
    pub p99_ns: u64,
}

/// The form a reclaimed page was given, which is also what its fault-in costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Form {
    /// All zero: nothing stored; the fault maps the zero page.
    Zero,
    /// Identical to another stored page.
    Shared,
    /// A patch against a similar page.
    Patched,
    /// Compressed.
    Compressed,
    /// Stored as it is.
    Raw,
}

impl Form {
    pub(crate) const ALL: [Form; 5] = [
        Form::Zero,
        Form::Shared,
        Form::Patched,
        Form::Compressed,
        Form::Raw,
    ];

    pub(crate) fn ix(self) -> usize {
        self as usize
    }

    pub(crate) fn from_ix(i: u32) -> Form {
        Form::ALL[(i as usize).min(4)]
    }

    pub(crate) fn of(o: pagestore::Outcome) -> Form {
        match o {
            pagestore::Outcome::Zero => Form::Zero,
            pagestore::Outcome::Shared => Form::Shared,
            pagestore::Outcome::Patched { .. } => Form::Patched,
            pagestore::Outcome::Compressed { .. } => Form::Compressed,
            pagestore::Outcome::Raw => Form::Raw,
        }
    }

    /// Its name, as in the JSON.
    pub fn name(self) -> &'static str {
        match self {
            Form::Zero => "zero",
            Form::Shared => "shared",
            Form::Patched => "patched",
            Form::Compressed => "compressed",
            Form::Raw => "raw",
        }
    }
}

/// Live counters, updated by the pager's threads.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub missing: AtomicU64,
    pub first_touch: AtomicU64,
    pub write_protect: AtomicU64,
    pub refaults: AtomicU64,
    pub deferred: AtomicU64,
    pub again: AtomicU64,
    pub exists: AtomicU64,
    pub removed: AtomicU64,
    pub anomalies: AtomicU64,
    pub reclaimed: AtomicU64,
    pub reclaim_aborted: AtomicU64,
    pub recompressed: AtomicU64,
    pub compacted_bytes: AtomicU64,
    pub scans: AtomicU64,
    pub armed: AtomicU64,
    pub scanner_cpu_ns: AtomicU64,
    pub handler_cpu_ns: AtomicU64,
    /// Fault service latency by the form the page came back from.
    pub latency: [Histogram; 5],
    /// First touches of never-populated pages.
    pub first_touch_latency: Histogram,
    /// Write-protect faults: from read to the writer's wake-up.
    pub wp_latency: Histogram,
    /// NRU classes seen by the last scan.
    pub nru: [AtomicU64; 4],
}

/// Guest pages by where they are now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pages {
    /// Pages of every region, touched or not.
    pub total: u64,
    /// Resident in host RAM.
    pub resident: u64,
    /// Never touched, or dropped by the guest (cost nothing).
    pub empty: u64,
    /// Reclaimed, by the form the store gave them: zero, shared, patched, compressed, raw.
    pub zero: u64,
    /// see `zero`
    pub shared: u64,
    /// see `zero`
    pub patched: u64,
    /// see `zero`
    pub compressed: u64,
    /// see `zero`
    pub raw: u64,
}

impl Pages {
    pub(crate) fn add_form(&mut self, f: Form) {
        match f {
            Form::Zero => self.zero += 1,
            Form::Shared => self.shared += 1,
            Form::Patched => self.patched += 1,
            Form::Compressed => self.compressed += 1,
            Form::Raw => self.raw += 1,
        }
    }

    /// Pages held by the store, any form.
    pub fn stored(&self) -> u64 {
        self.zero + self.shared + self.patched + self.compressed + self.raw
    }
}

/// Difference Engine's NRU classes, as the last scan found the resident pages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nru {
    /// C1: written since the previous scan (or resting after repeated writes).
    pub modified: u64,
    /// C2: read since the previous scan (seen as a refault of a reclaimed page).
    pub referenced: u64,
    /// C3: not accessed since the previous scan.
    pub idle: u64,
    /// C4: not accessed for as many scans as the policy calls cold.
    pub cold: u64,
}

/// Fault counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Faults {
    /// Missing-page faults served (first touches and refaults).
    pub missing: u64,
    /// Of those, first touches of never-populated pages (served with the zero page).
    pub first_touch: u64,
    /// Of those, pages brought back from the store.
    pub refaults: u64,
    /// Write-protect faults served.
    pub write_protect: u64,
    /// Faults that waited for a reclaim of the same page to finish.
    pub deferred: u64,
    /// Resolutions the kernel asked to retry (EAGAIN).
    pub again: u64,
    /// Resolutions that found the page already mapped (EEXIST).
    pub exists: u64,
    /// Pages dropped by remove events (MADV_DONTNEED or MADV_REMOVE by others).
    pub removed: u64,
    /// Faults that contradicted the pager's books (never expected; see docs/pager.md).
    pub anomalies: u64,
}

/// Bytes the host spends on the managed memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bytes {
    /// Resident guest pages, 4 KiB each.
    pub resident: u64,
    /// Everything the store holds: payload, metadata and slack.
    pub store: u64,
    /// The pager's own per-page tables.
    pub pager_metadata: u64,
    /// resident + store + pager_metadata.
    pub held: u64,
    /// What the touched pages would hold with no pager: (total - empty) x 4 KiB.
    pub without_pager: u64,
}

/// Everything the pager reports, in one consistent-enough snapshot.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Pages by place and form.
    pub pages: Pages,
    /// Bytes held.
    pub bytes: Bytes,
    /// The store's own exact accounting.
    pub store: pagestore::Stats,
    /// NRU classes at the last scan.
    pub nru: Nru,
    /// Fault counts.
    pub faults: Faults,
    /// Fault service latency from the form the page came back from (zero, shared, patched,
    /// compressed, raw), from reading the fault to waking the faulting thread.
    pub latency: Vec<(Form, Latency)>,
    /// All refaults together.
    pub refault_latency: Latency,
    /// First touches (zero page).
    pub first_touch_latency: Latency,
    /// Write-protect faults.
    pub write_protect_latency: Latency,
    /// Pages reclaimed since start.
    pub reclaimed: u64,
    /// Reclaims given up because the page was written or the store refused it.
    pub reclaim_aborted: u64,
    /// Stored pages recompressed in place with the cold compressor.
    pub recompressed: u64,
    /// Store arena bytes given back by compaction.
    pub compacted_bytes: u64,
    /// Scans done.
    pub scans: u64,
    /// Pages the scanner write-protected to watch for writes: each page once, and again only
    /// after a write lifted it (protecting a page twice would only cost the guest).
    #[serde(default)]
    pub armed: u64,
    /// CPU time of the scanner (aging and reclaim), seconds.
    pub scanner_cpu_s: f64,
    /// CPU time of the fault handlers, seconds.
    pub handler_cpu_s: f64,
    /// Why the pager stopped serving, if it did.
    pub failure: Option<String>,
}

impl Stats {
    /// The engine's CPU: scanner and fault handlers.
    pub fn cpu_s(&self) -> f64 {
        self.scanner_cpu_s + self.handler_cpu_s
    }
}

/// This thread's CPU time so far, in nanoseconds.
pub(crate) fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes one timespec, which lives for the call.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_tight() {
        let mut last = 0;
        for ns in [
            0u64,
            1,
            7,
            8,
            9,
            15,
            16,
            100,
            1000,
            4321,
            1 << 20,
            u64::MAX / 2,
        ] {
            let b = bucket(ns);
            assert!(b >= last, "{ns}");
            last = b;
            assert!(lower(b) <= ns, "{ns}: lower {}", lower(b));
            if b + 1 < BUCKETS {
                assert!(lower(b + 1) > ns, "{ns}");
                // Within 1/8 of the value.
                assert!((lower(b + 1) - lower(b)) * 8 <= ns.max(8), "{ns}");
            }
        }
    }

    #[test]
    fn percentiles() {
        let h = Histogram::default();
        for i in 1..=1000u64 {
            h.record(i * 1000);
        }
        let s = h.summary();
        assert_eq!(s.count, 1000);
        assert!((470_000..=540_000).contains(&s.p50_ns), "{s:?}");
        assert!((930_000..=1_060_000).contains(&s.p99_ns), "{s:?}");
    }
}
