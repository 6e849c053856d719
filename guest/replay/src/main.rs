//! replay: walks a real memory image (another guest's RAM, which the VMM put in this guest's
//! RAM) with a hot/warm/cold skew, round after round, paced to a duty cycle, until the host
//! asks it to stop; then it exits 0. It is the workload of memvisor's memory benchmarks: its
//! rounds per second are the guest's throughput, which every fault the host takes on its pages
//! lowers.
//!
//! The VMM's `vmm::replay` writes a parameter block at 0x8_0000 (layout there, checked here:
//! magic, version, ranges). Each page with content (the VMM's content map; all-zero pages are
//! free memory in the original guest and are never touched) is hot, warm or cold by a seeded
//! hash of its index. Per round: every hot page has `reads` words read, spread over it, and
//! one word incremented, so it stays modified; 1/`slices` of the warm pages (the next slice
//! each round) have their words read; cold pages are never touched.
//!
//! Rounds go in batches that last from `batch_us` to 4 times that (5 to 20 ms by default: the
//! batch doubles or halves by the host's clock, port 0xf8), because each port access is a VM
//! exit, some 17 µs under PVM. After each batch the guest reports its rounds (0xf5), polls for
//! a stop (0xf6), and pays its sleep debt: busy time (by the clock, from the end of its last
//! sleep) × (100 − duty) / duty, asked of the pacing port (0xf7) once at least 1 ms is owed.
//! Whatever slows the work (faults, a busy host CPU) lengthens the busy time and the sleep
//! with it, and so shows as fewer rounds per second; a sleep the host ends late (a busy host
//! again) is not made up for, so it shows the same way.
//!
//! With several vCPUs each walks its own slice of the pages and reports its own rounds; on a
//! stop, vCPU 0 prints its count and exits 0, the others stop walking.
#![no_std]
#![no_main]

kit::entry!(main);

const PARAMS: u64 = 0x8_0000;
const MAGIC: u64 = u64::from_le_bytes(*b"MVREPLAY");
const VERSION: u64 = 1;
const PAGE: u64 = 4096;
const MIB: u64 = 1 << 20;
/// Kept free below the top of RAM for the vCPUs' stacks.
const STACKS: u64 = MIB;
/// Sleep debt is paid once this much is owed (µs): shorter sleeps would be mostly overhead.
const MIN_SLEEP_US: u64 = 1000;
/// The most one sleep request asks for (µs); the VMM caps there too.
const MAX_SLEEP_US: u64 = 100_000;

/// The parameter block, checked.
#[derive(Clone, Copy)]
struct Params {
    data_base: u64,
    pages: u64,
    map_base: u64,
    hot: u64,
    warm: u64,
    slices: u64,
    reads: u64,
    duty: u64,
    seed: u64,
    /// A batch of rounds shorter than this (µs) doubles, so exits stay a small share of the
    /// time; one of more than a round that is longer than 4 times this halves, so reports
    /// and stops stay prompt.
    batch_us: u32,
}

fn read_u64(addr: u64) -> u64 {
    // SAFETY: called only for addresses inside guest RAM (the parameter block below 1 MiB,
    // the content map checked against the RAM size), identity-mapped and readable.
    unsafe { (addr as *const u64).read_volatile() }
}

/// Reads and checks the parameter block against this guest's RAM and image.
fn params(boot: &kit::Boot) -> Result<Params, &'static str> {
    let field = |i: u64| read_u64(PARAMS + 8 * i);
    if field(0) != MAGIC {
        return Err("no parameter block at 0x80000 (was the image loaded with load_replay?)");
    }
    if field(1) != VERSION {
        return Err("parameter block of another version");
    }
    let p = Params {
        data_base: field(2),
        pages: field(3),
        map_base: field(4),
        hot: field(5),
        warm: field(6),
        slices: field(7),
        reads: field(8),
        duty: field(9),
        seed: field(10),
        batch_us: u32::try_from(field(11)).unwrap_or(0),
    };
    if p.hot.saturating_add(p.warm) > 100
        || p.slices == 0
        || !(1..=512).contains(&p.reads)
        || !(1..=100).contains(&p.duty)
        || !(100..=1_000_000).contains(&p.batch_us)
    {
        return Err("parameters out of range");
    }
    let data_end = p
        .pages
        .checked_mul(PAGE)
        .and_then(|n| n.checked_add(p.data_base));
    let map_end = p.map_base.checked_add(p.pages.div_ceil(8));
    let usable = boot.ram.saturating_sub(STACKS);
    match (data_end, map_end) {
        (Some(d), Some(m))
            if p.data_base >= boot.image_end
                && p.data_base.is_multiple_of(PAGE)
                && p.map_base >= d
                && m <= usable => {}
        _ => return Err("data or content map outside free guest RAM"),
    }
    Ok(p)
}

/// splitmix64's finaliser over the seed and the page index: which class a page is in.
fn hash(seed: u64, page: u64) -> u64 {
    let mut z = seed.wrapping_add(page.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn has_content(p: &Params, page: u64) -> bool {
    // SAFETY: the map's `pages` bits lie inside guest RAM (checked in `params`).
    let byte = unsafe { ((p.map_base + page / 8) as *const u8).read_volatile() };
    byte >> (page % 8) & 1 != 0
}

/// Reads `p.reads` words spread over page `page` (starting at a per-page offset, so that
/// pages do not all meet in the same cache sets); increments one when `write`. Returns the
/// words' sum, so that the reads happen.
fn touch(p: &Params, page: u64, h: u64, write: bool) -> u64 {
    let base = p.data_base + page * PAGE;
    let stride = PAGE / p.reads / 8 * 8;
    let jitter = (h >> 16) % (stride / 8) * 8;
    let mut sum = 0u64;
    for j in 0..p.reads {
        // SAFETY: the page lies inside the data range, in guest RAM (checked in `params`),
        // and `jitter + j * stride` is a word-aligned offset below PAGE.
        sum = sum
            .wrapping_add(unsafe { ((base + jitter + j * stride) as *const u64).read_volatile() });
    }
    if write {
        let w = (base + (h >> 40) % (PAGE / 8) * 8) as *mut u64;
        // SAFETY: a word of the page, as above; only this vCPU walks this page.
        unsafe { w.write_volatile(w.read_volatile().wrapping_add(1)) };
    }
    sum
}

/// One round over pages [lo, hi).
fn round(p: &Params, lo: u64, hi: u64, n: u64) -> u64 {
    let mut sum = 0u64;
    let slice = n % p.slices;
    for page in lo..hi {
        let h = hash(p.seed, page);
        let class = (h >> 32) % 100;
        let hot = class < p.hot;
        let warm = !hot && class < p.hot + p.warm && (h & 0xffff_ffff) % p.slices == slice;
        if (hot || warm) && has_content(p, page) {
            sum = sum.wrapping_add(touch(p, page, h, hot));
        }
    }
    sum
}

fn main(boot: kit::Boot) -> u8 {
    let p = match params(&boot) {
        Ok(p) => p,
        Err(why) => {
            if boot.cpu == 0 {
                kit::print("replay: ");
                kit::print(why);
                kit::print("\n");
            }
            return 2;
        }
    };
    let cpus = boot.cpus.max(1);
    let lo = p.pages * boot.cpu / cpus;
    let hi = p.pages * (boot.cpu + 1) / cpus;
    if boot.cpu == 0 {
        let content = (0..p.pages).filter(|&i| has_content(&p, i)).count() as u64;
        kit::print("replay: ");
        kit::print_u64(p.pages);
        kit::print(" pages, ");
        kit::print_u64(content);
        kit::print(" with content; hot ");
        kit::print_u64(p.hot);
        kit::print("%, warm ");
        kit::print_u64(p.warm);
        kit::print("% (1/");
        kit::print_u64(p.slices);
        kit::print(" a round), duty ");
        kit::print_u64(p.duty);
        kit::print("%, ");
        kit::print_u64(cpus);
        kit::print(" vCPUs\n");
    }

    let mut n = 0u64;
    let mut sink = 0u64;
    let mut batch: u32 = 1;
    let mut debt: u64 = 0;
    let mut t = kit::clock_us();
    'run: loop {
        for _ in 0..batch {
            sink = sink.wrapping_add(round(&p, lo, hi, n));
            n += 1;
        }
        kit::report_rounds(batch);
        if kit::stop_requested() {
            break;
        }
        let now = kit::clock_us();
        let busy = now.wrapping_sub(t);
        t = now;
        if busy < p.batch_us && batch < 1 << 20 {
            batch *= 2;
        } else if busy / 4 > p.batch_us && batch > 1 {
            batch /= 2;
        }
        if p.duty < 100 {
            debt += u64::from(busy) * (100 - p.duty) / p.duty;
            if debt >= MIN_SLEEP_US {
                while debt >= MIN_SLEEP_US {
                    let ask = debt.min(MAX_SLEEP_US);
                    kit::pause_us(ask as u32);
                    debt -= ask;
                    if debt >= MIN_SLEEP_US && kit::stop_requested() {
                        break 'run;
                    }
                }
                // The work resumes now: busy time counts from here.
                t = kit::clock_us();
            }
        }
    }
    core::hint::black_box(sink);
    // vCPU 0 says so and ends the VM; the others just stop walking.
    if boot.cpu != 0 {
        kit::park();
    }
    kit::print("replay: stopped after ");
    kit::print_u64(n);
    kit::print(" rounds\n");
    0
}
