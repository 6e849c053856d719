//! `memvisor bench memory`: guests of the guest kit replaying real Linux memory images, run
//! under each memory policy in turn (none, KSM, and the pager's modes), side by side in one
//! run: host memory held over time, CPU, fault latency and the guests' own throughput.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use vmm::{Control, ReplayParams, Vm};

use crate::memimages::{self, ImageSet};
use crate::memory::{self, Ksm, Policy};

/// The experiment's settings.
#[derive(Debug, Clone)]
pub struct Bench {
    /// Which images.
    pub set: ImageSet,
    /// Guests per run (images are used in turn).
    pub guests: usize,
    /// Seconds each policy runs.
    pub seconds: u64,
    /// Seconds at the start not counted in the guests' throughput.
    pub warmup: u64,
    /// The policies, in order.
    pub policies: Vec<Policy>,
    /// Passes over the policies; each figure is then also given as its median over them.
    pub repeat: usize,
    /// The guests' access skew and pacing.
    pub replay: ReplayParams,
    /// ksmd's pages_to_scan and sleep_millisecs.
    pub ksm: (u64, u64),
    /// Pager: seconds untouched before a page is cold; CPU budget.
    pub cold_secs: f64,
    /// Pager CPU budget, fraction of one core.
    pub cpu_budget: f64,
    /// The full policy's compressor for pages that stay away.
    pub compression: pagestore::Compression,
    /// Seconds stored before that compressor applies (0: at the first reclaim).
    pub recompress_after: f64,
    /// Print a line per sample.
    pub verbose: bool,
}

/// One policy's run.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Run {
    /// The policy.
    pub policy: &'static str,
    /// Which pass over the policies (from 1).
    pub pass: usize,
    /// Throughput lost against the `none` runs on either side of this one (their mean), as
    /// a fraction; None without a `none` run.
    pub slowdown: Option<f64>,
    /// Busy time per round against the same `none` runs, as a fraction: the slowdown of the
    /// guests' work alone, leaving out how late their pacing sleeps ended.
    pub busy_slowdown: Option<f64>,
    /// (seconds, bytes held) each second.
    pub series: Vec<(f64, u64)>,
    /// Bytes held at the end.
    pub held: u64,
    /// Of which resident guest pages (mincore).
    pub resident: u64,
    /// Of which the store and the pager's tables.
    pub store: u64,
    /// Guest workload rounds per second, summed over guests, after the warm-up.
    pub rounds_per_s: f64,
    /// CPU seconds of the engine (pager threads, or ksmd).
    pub cpu_s: f64,
    /// Of the pager's, its fault handlers' (the rest is the scanner's).
    pub handler_cpu_s: f64,
    /// Of which in the second half of the run: what the engine costs once it has done its
    /// first pass, as a fraction of one core.
    pub cpu_late_core: f64,
    /// Fault service p50 and p99 (ns), refaults from the store, for pager runs.
    pub fault_p50_ns: u64,
    /// see `fault_p50_ns`
    pub fault_p99_ns: u64,
    /// Refaults served.
    pub refaults: u64,
    /// Refaults by the form they came back from: form, count, p50 ns.
    pub refaults_by_form: Vec<(String, u64, u64)>,
    /// Stored pages recompressed with the cold compressor.
    pub recompressed: u64,
    /// Write-protect faults served (the pager's write tracking), and their p50 in ns.
    pub write_faults: (u64, u64),
    /// KSM's pages_sharing and general_profit, for the KSM run.
    pub ksm_pages_sharing: u64,
    /// see `ksm_pages_sharing`
    pub ksm_general_profit: i64,
    /// Growth of the process's RSS from just before the guests start to the end, bytes:
    /// the cross-check of `held` for the pager's runs.
    pub rss_growth: i64,
    /// Pages by form at the end, for pager runs: zero, shared, patched, compressed.
    pub pages: Option<pager::stats::Pages>,
    /// Other processes whose pages KSM merged during the KSM run (pid, pages): KSM's
    /// counters are global, so the KSM figure is then too good.
    pub other_ksm_users: Vec<(u32, u64)>,
    /// KVM's exits and page faults for the guests, summed, after the warm-up (None: the
    /// kernel has no vCPU statistics): what the engine's changes to the mappings cost them.
    pub kvm: Option<vmm::KvmCounters>,
    /// Seconds from the warm-up's end to the last sample: the window of `rounds_per_s` and
    /// `kvm`.
    pub window_s: f64,
    /// Where the vCPU threads' time went per round of guest work, after the warm-up (None:
    /// the kernel keeps no scheduler statistics).
    pub per_round: Option<RoundTime>,
}

/// The vCPU threads' time per round of guest work, in nanoseconds, with the scheduler's
/// account of it.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct RoundTime {
    /// Wall time not in a pacing sleep: what a round of work took, as the guest sees it.
    pub busy_ns: f64,
    /// On a CPU: the guest's own work, and KVM's exits handled in the kernel.
    pub run_ns: f64,
    /// Runnable, waiting for a CPU: contention with other guests and the engine (and the
    /// wait to run again after a pacing sleep, which `busy_ns` leaves out). The rest of
    /// `busy_ns` was spent blocked: faults waiting on a handler thread, mostly.
    pub wait_ns: f64,
}

/// The vCPU threads' scheduler times, pacing sleeps and rounds, summed over guests.
#[derive(Debug, Clone, Copy, Default)]
struct GuestClock {
    sched: vmm::SchedTimes,
    threads: u32,
    slept: Duration,
    rounds: u64,
}

impl GuestClock {
    fn read(controls: &[Arc<Control>]) -> Option<GuestClock> {
        let mut g = GuestClock::default();
        for c in controls {
            let (s, n) = c.vcpu_sched()?;
            g.sched += s;
            g.threads += n;
            g.slept += c.slept();
            g.rounds += c.rounds();
        }
        Some(g)
    }

    /// Per round from `earlier` to this reading, `wall` apart.
    fn per_round(&self, earlier: &GuestClock, wall: Duration) -> Option<RoundTime> {
        let rounds = self.rounds.checked_sub(earlier.rounds).filter(|&r| r > 0)? as f64;
        let s = self.sched.since(earlier.sched);
        let slept = self.slept.saturating_sub(earlier.slept);
        let busy = (wall * self.threads).saturating_sub(slept);
        Some(RoundTime {
            busy_ns: busy.as_nanos() as f64 / rounds,
            run_ns: s.run_ns as f64 / rounds,
            wait_ns: s.wait_ns as f64 / rounds,
        })
    }
}

/// Loads the images of a set.
pub fn load(set: ImageSet) -> Result<Vec<(String, Vec<u8>)>> {
    memimages::memory_images(set)?
        .into_iter()
        .map(|m| Ok((m.name, memimages::read_guest_ram(&m.path)?)))
        .collect()
}

/// Runs one policy on `guests` VMs replaying `images` (in turn). `progress` sees each sample.
pub fn run_one(
    b: &Bench,
    policy: Policy,
    images: &[(String, Vec<u8>)],
    elf: &[u8],
    progress: &mut dyn FnMut(&Run, Option<&pager::Stats>),
) -> Result<Run> {
    if images.is_empty() {
        bail!("no memory images to replay");
    }
    let vms: Vec<Vm> = (0..b.guests)
        .map(|i| {
            let data = &images[i % images.len()].1;
            let vm = Vm::new(vmm::replay_ram_size(data.len() as u64))?;
            let (p, l) = vm.ram_host_range();
            memory::no_huge_pages(p, l);
            let params = ReplayParams {
                seed: b.replay.seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
                ..b.replay
            };
            vm.load_replay(data, &params)?;
            Ok(vm)
        })
        .collect::<Result<_>>()?;
    let rams: Vec<(*mut u8, usize)> = vms.iter().map(Vm::ram_host_range).collect();
    let rss_now = || crate::tmem_cmd::rss_of(std::process::id()).cast_signed();
    let rss0 = rss_now();
    let controls: Vec<Arc<Control>> = vms.iter().map(|_| Arc::new(Control::new())).collect();
    let ksm = match policy {
        Policy::Ksm => {
            let k = Ksm::start(b.ksm.0, b.ksm.1)?;
            for &(p, l) in &rams {
                k.merge(p, l)?;
            }
            Some(k)
        }
        _ => None,
    };
    let pager = match policy {
        Policy::Pager(mode) => {
            let cold = (mode == pager::Mode::Full).then_some(b.compression);
            let pol =
                memory::pager_policy(b.cold_secs, b.cpu_budget, None, cold, b.recompress_after)?;
            let (pg, regions) = memory::pager_for(mode.store_config(), pol, &rams, true)?;
            let cs = controls.clone();
            pg.on_failure(move |why| {
                for c in &cs {
                    c.abort(format!("the pager failed: {why}"));
                }
            });
            Some((pg, regions))
        }
        _ => None,
    };
    let held = |run: &mut Run| {
        let resident: u64 = rams
            .iter()
            .map(|&(p, l)| memory::resident_pages(p, l) * 4096)
            .sum();
        let (store, stats) = match &pager {
            Some((pg, _)) => {
                let st = pg.stats();
                (st.bytes.store + st.bytes.pager_metadata, Some(st))
            }
            None => (0, None),
        };
        let ksm_saved = ksm.as_ref().map_or(0, |k| k.pages_sharing() * 4096);
        run.resident = resident;
        run.store = store;
        run.held = (resident + store).saturating_sub(ksm_saved);
        stats
    };
    let mut run = Run {
        policy: policy.name(),
        pass: 1,
        ..Run::default()
    };
    let results = std::thread::scope(|s| -> Result<Vec<Result<vmm::Exit, vmm::VmError>>> {
        let handles: Vec<_> = vms
            .iter()
            .zip(&controls)
            .map(|(vm, c)| {
                s.spawn(move || {
                    vm.run_image_ctl(elf, 1, std::io::sink(), None, Some(c))
                        .map(|(e, _)| e)
                })
            })
            .collect();
        let t0 = Instant::now();
        let mut warm_rounds = None;
        let mut warm_kvm = None;
        let mut warm_clock = None;
        let mut warm_at = t0;
        let kvm_now = || {
            controls
                .iter()
                .try_fold(vmm::KvmCounters::default(), |mut a, c| {
                    a += c.kvm_counters()?;
                    Some(a)
                })
        };
        let engine_cpu = || {
            pager.as_ref().map_or(0.0, |(pg, _)| pg.stats().cpu_s())
                + ksm.as_ref().map_or(0.0, Ksm::cpu_s)
        };
        let mut half = (t0, 0.0);
        for tick in 1..=b.seconds {
            let due = t0 + Duration::from_secs(tick);
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            if tick == b.warmup.min(b.seconds - 1) {
                warm_rounds = Some(controls.iter().map(|c| c.rounds()).sum::<u64>());
                warm_kvm = kvm_now();
                warm_clock = GuestClock::read(&controls);
                warm_at = Instant::now();
            }
            if tick == b.seconds / 2 {
                half = (Instant::now(), engine_cpu());
            }
            let stats = held(&mut run);
            run.series.push((t0.elapsed().as_secs_f64(), run.held));
            progress(&run, stats.as_ref());
            if controls.iter().any(|c| c.aborted().is_some())
                || handles
                    .iter()
                    .any(std::thread::ScopedJoinHandle::is_finished)
            {
                break;
            }
        }
        let rounds: u64 = controls.iter().map(|c| c.rounds()).sum();
        run.kvm = kvm_now().map(|now| now.since(warm_kvm.unwrap_or_default()));
        run.per_round = warm_clock
            .zip(GuestClock::read(&controls))
            .and_then(|(w, now)| now.per_round(&w, warm_at.elapsed()));
        run.window_s = warm_at.elapsed().as_secs_f64().max(1e-3);
        run.rounds_per_s = (rounds - warm_rounds.unwrap_or(0)) as f64 / run.window_s;
        run.cpu_late_core = (engine_cpu() - half.1) / half.0.elapsed().as_secs_f64().max(1e-3);
        let stats = held(&mut run);
        run.rss_growth = rss_now() - rss0;
        if let Some(st) = stats {
            run.cpu_s = st.cpu_s();
            run.handler_cpu_s = st.handler_cpu_s;
            run.fault_p50_ns = st.refault_latency.p50_ns;
            run.fault_p99_ns = st.refault_latency.p99_ns;
            run.refaults = st.faults.refaults;
            run.write_faults = (st.faults.write_protect, st.write_protect_latency.p50_ns);
            run.recompressed = st.recompressed;
            run.refaults_by_form = st
                .latency
                .iter()
                .filter(|(_, l)| l.count > 0)
                .map(|(f, l)| (f.name().to_owned(), l.count, l.p50_ns))
                .collect();
            run.pages = Some(st.pages);
        }
        if let Some(k) = &ksm {
            run.cpu_s = k.cpu_s();
            run.ksm_pages_sharing = k.pages_sharing();
            run.ksm_general_profit = k.general_profit();
            run.other_ksm_users = memory::other_ksm_users();
        }
        for c in &controls {
            c.request_stop();
        }
        Ok(handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(vmm::VmError::Aborted("a VM thread panicked".into())))
            })
            .collect())
    })?;
    if let Some((pg, regions)) = &pager {
        if let Some(f) = pg.failure() {
            bail!("the pager failed during the {} run: {f}", policy.name());
        }
        // The guests are over and their memory is about to go: nothing to give back.
        for r in regions {
            pg.forget(r)?;
        }
    }
    drop(pager);
    drop(ksm);
    for (i, r) in results.into_iter().enumerate() {
        match r.with_context(|| format!("guest {i} under {}", policy.name()))? {
            vmm::Exit::Status(0) => {}
            e => bail!("guest {i} under {} ended with {e:?}", policy.name()),
        }
    }
    Ok(run)
}

/// Bytes in MiB.
pub(crate) fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

/// A latency in microseconds ("7.9"), or "-" where no fault was served to time.
pub(crate) fn latency_us(ns: u64, served: bool) -> String {
    if served {
        format!("{:.1}", ns as f64 / 1000.0)
    } else {
        "-".into()
    }
}

/// `held` as the saving against `base` ("81%") and as a ratio to `ksm` ("0.497"), each "-"
/// without its run.
pub(crate) fn saved_and_vs_ksm(held: u64, base: Option<u64>, ksm: Option<u64>) -> (String, String) {
    let saved = base.map_or(String::from("-"), |x| {
        format!("{:.0}%", 100.0 * (1.0 - held as f64 / x.max(1) as f64))
    });
    let vs_ksm = ksm.map_or(String::from("-"), |k| {
        format!("{:.3}", held as f64 / k.max(1) as f64)
    });
    (saved, vs_ksm)
}

/// The table comparing runs.
pub fn table(b: &Bench, runs: &[Run]) -> String {
    // Savings and ratios within a pass; the slowdowns are the runs' own (`compare_with_none`).
    let of_pass = |name: &str, pass: usize| {
        runs.iter()
            .find(|r| r.policy == name && r.pass == pass)
            .or_else(|| runs.iter().find(|r| r.policy == name))
    };
    let ksm = runs.iter().find(|r| r.policy == "ksm");
    let mut o = format!(
        "{} guests replaying the {} images for {} s each (hot {}%, warm {}%, duty {}%); \
         KSM pages_to_scan={} sleep_millisecs={}; pager cold after {} s, CPU budget {} core\n",
        b.guests,
        b.set.name(),
        b.seconds,
        b.replay.hot_pct,
        b.replay.warm_pct,
        b.replay.duty_pct,
        b.ksm.0,
        b.ksm.1,
        b.cold_secs,
        b.cpu_budget
    );
    o += &format!(
        "{:<12} {:>4} {:>10} {:>8} {:>9} {:>8} {:>10} {:>9} {:>9} {:>9} {:>10}\n",
        "policy",
        "pass",
        "held MiB",
        "saved",
        "/ KSM",
        "CPU s",
        "late core",
        "p50 us",
        "p99 us",
        "slowdown",
        "RSS+ MiB"
    );
    for r in runs {
        let (saved, vs_ksm) = saved_and_vs_ksm(
            r.held,
            of_pass("none", r.pass).map(|x| x.held),
            of_pass("ksm", r.pass).map(|k| k.held),
        );
        let slow = r
            .slowdown
            .map_or(String::from("-"), |x| format!("{:+.1}%", 100.0 * x));
        let lat = |ns: u64| latency_us(ns, r.refaults > 0);
        o += &format!(
            "{:<12} {:>4} {:>10.1} {:>8} {:>9} {:>8.2} {:>9.1}% {:>9} {:>9} {:>9} {:>10.1}\n",
            r.policy,
            r.pass,
            mib(r.held),
            saved,
            vs_ksm,
            r.cpu_s,
            100.0 * r.cpu_late_core,
            lat(r.fault_p50_ns),
            lat(r.fault_p99_ns),
            slow,
            r.rss_growth as f64 / (1 << 20) as f64
        );
    }
    if let Some(k) = runs
        .iter()
        .find(|r| r.policy == "ksm" && !r.other_ksm_users.is_empty())
    {
        o += &format!(
            "WARNING: other processes had pages merged by KSM during its run ({:?}, pid and \
             pages): KSM's global counters include them, so its figure is too good\n",
            k.other_ksm_users
        );
    }
    if let Some(k) = ksm {
        o += &format!(
            "KSM: pages_sharing {} ({:.1} MiB saved), general_profit {:.1} MiB\n",
            k.ksm_pages_sharing,
            mib(k.ksm_pages_sharing * 4096),
            k.ksm_general_profit as f64 / (1 << 20) as f64
        );
    }
    // With several passes, the lines below name each run's pass too, as the table does.
    let passes = runs.iter().any(|r| r.pass > 1);
    let name = |r: &Run| {
        if passes {
            format!("{} (pass {})", r.policy, r.pass)
        } else {
            r.policy.to_string()
        }
    };
    let kvm: Vec<String> = runs
        .iter()
        .filter_map(|r| {
            let k = r.kvm?;
            let per_s = |n: u64| n as f64 / r.window_s;
            Some(format!(
                "{} {:.0} exits/s, {:.0} page faults/s",
                name(r),
                per_s(k.exits),
                per_s(k.pf_taken)
            ))
        })
        .collect();
    if !kvm.is_empty() {
        o += &format!("KVM, all guests, after the warm-up: {}\n", kvm.join("; "));
    }
    let rounds: Vec<String> = runs
        .iter()
        .filter_map(|r| {
            let t = r.per_round?;
            let vs = r
                .busy_slowdown
                .map_or(String::new(), |x| format!(" ({:+.1}%)", 100.0 * x));
            Some(format!(
                "{} {:.1}{vs} (run {:.1}, runnable {:.1})",
                name(r),
                t.busy_ns / 1e3,
                t.run_ns / 1e3,
                t.wait_ns / 1e3,
            ))
        })
        .collect();
    if !rounds.is_empty() {
        o += &format!(
            "vCPU busy time per round, us, after the warm-up: {}\n",
            rounds.join("; ")
        );
    }
    for r in runs {
        if let Some(p) = &r.pages {
            o += &format!(
                "{}: pages resident {}, zero {}, shared {}, patched {}, compressed {}, raw {}; \
                 {} recompressed; {} refaults",
                name(r),
                p.resident,
                p.zero,
                p.shared,
                p.patched,
                p.compressed,
                p.raw,
                r.recompressed,
                r.refaults
            );
            let by: Vec<String> = r
                .refaults_by_form
                .iter()
                .map(|(f, n, p50)| format!("{f} {n} (p50 {:.1} us)", *p50 as f64 / 1e3))
                .collect();
            if !by.is_empty() {
                o += &format!(": {}", by.join(", "));
            }
            o += &format!(
                "; {} write-protect faults (p50 {:.1} us); CPU s: scanner {:.2}, fault handlers \
                 {:.2}\n",
                r.write_faults.0,
                r.write_faults.1 as f64 / 1e3,
                r.cpu_s - r.handler_cpu_s,
                r.handler_cpu_s
            );
        }
    }
    o
}

/// Memory held over time, one line per policy, as an SVG.
pub fn svg(title: &str, runs: &[Run]) -> String {
    let (w, h, m) = (720.0, 400.0, 60.0);
    let tmax = runs
        .iter()
        .flat_map(|r| r.series.iter().map(|p| p.0))
        .fold(1.0f64, f64::max);
    let ymax = runs
        .iter()
        .flat_map(|r| r.series.iter().map(|p| mib(p.1)))
        .fold(1.0f64, f64::max)
        * 1.1;
    let colors = ["#444", "#d62728", "#1f77b4", "#2ca02c", "#9467bd"];
    let mut o = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-family='sans-serif' font-size='12'>\n\
         <rect width='100%' height='100%' fill='white'/>\n\
         <text x='{m}' y='20' font-size='14'>{title}</text>\n\
         <line x1='{m}' y1='{}' x2='{}' y2='{}' stroke='black'/>\n\
         <line x1='{m}' y1='{m}' x2='{m}' y2='{}' stroke='black'/>\n\
         <text x='{}' y='{}'>seconds</text>\n<text x='5' y='{}'>MiB held</text>\n",
        h - m,
        w - m,
        h - m,
        h - m,
        w / 2.0,
        h - 20.0,
        m - 10.0
    );
    for i in 0..=4 {
        let v = ymax * f64::from(i) / 4.0;
        let y = h - m - (h - 2.0 * m) * f64::from(i) / 4.0;
        o += &format!("<text x='5' y='{y:.0}'>{v:.0}</text>\n");
        let t = tmax * f64::from(i) / 4.0;
        let x = m + (w - 2.0 * m) * f64::from(i) / 4.0;
        o += &format!("<text x='{x:.0}' y='{:.0}'>{t:.0}</text>\n", h - m + 15.0);
    }
    for (i, r) in runs.iter().enumerate() {
        let c = colors[i % colors.len()];
        let pts: Vec<String> = r
            .series
            .iter()
            .map(|&(t, b)| {
                format!(
                    "{:.1},{:.1}",
                    m + (w - 2.0 * m) * t / tmax,
                    h - m - (h - 2.0 * m) * mib(b) / ymax
                )
            })
            .collect();
        o += &format!(
            "<polyline fill='none' stroke='{c}' stroke-width='2' points='{}'/>\n\
             <text x='{}' y='{}' fill='{c}'>{}</text>\n",
            pts.join(" "),
            w - m + 5.0,
            m + 15.0 * i as f64,
            r.policy
        );
    }
    o + "</svg>\n"
}

/// The whole experiment on one set; prints as it goes. With `none` among the policies, one
/// more `none` run closes it, so that (with `none` first) every run has one on each side: the machine's
/// speed drifts by several percent over minutes, and the mean of the two neighbours follows
/// that drift where the first `none` run alone does not.
pub fn run(b: &Bench) -> Result<Vec<Run>> {
    let images = load(b.set)?;
    let elf = std::fs::read(vmm::kit::build("replay", &vmm::kit::target_dir())?)
        .context("reading the replay guest")?;
    let mut order: Vec<(usize, Policy)> = (1..=b.repeat.max(1))
        .flat_map(|pass| b.policies.iter().map(move |&p| (pass, p)))
        .collect();
    if b.policies.len() > 1 && b.policies.contains(&Policy::None) {
        order.push((b.repeat.max(1), Policy::None));
    }
    let mut runs = Vec::new();
    for (pass, p) in order {
        eprintln!(
            "memvisor: {} guests, policy {}, pass {pass} of {} ...",
            b.guests,
            p.name(),
            b.repeat.max(1)
        );
        let verbose = b.verbose;
        let mut r = run_one(b, p, &images, &elf, &mut |r, _| {
            if verbose {
                let (t, held) = r.series.last().copied().unwrap_or((0.0, 0));
                eprintln!("  {t:5.1} s  held {:8.1} MiB", mib(held));
            }
        })?;
        r.pass = pass;
        runs.push(r);
    }
    compare_with_none(&mut runs);
    Ok(runs)
}

/// Sets each run's slowdowns against the mean of the nearest `none` runs before and after it.
fn compare_with_none(runs: &mut [Run]) {
    for i in 0..runs.len() {
        let rps = bracket(runs, i, |r| Some(r.rounds_per_s));
        let busy = bracket(runs, i, |r| r.per_round.map(|t| t.busy_ns));
        let r = &mut runs[i];
        r.slowdown = rps.map(|b| 1.0 - r.rounds_per_s / b.max(1e-9));
        r.busy_slowdown = busy
            .zip(r.per_round)
            .map(|(b, t)| t.busy_ns / b.max(1e-9) - 1.0);
    }
}

/// The mean of `f` over the nearest `none` run before run `i` and the nearest after it (one
/// of them where there is only one; None where there is neither).
fn bracket(runs: &[Run], i: usize, f: impl Fn(&Run) -> Option<f64>) -> Option<f64> {
    let none = |r: &&Run| r.policy == Policy::None.name();
    let before = runs[..i].iter().rev().find(none).and_then(&f);
    let after = runs[i + 1..].iter().find(none).and_then(&f);
    match (before, after) {
        (Some(a), Some(b)) => Some((a + b) / 2.0),
        (a, b) => a.or(b),
    }
}

/// The median of `xs` (the mean of the middle two for an even count); None if empty.
fn median(mut xs: Vec<f64>) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    Some(if n % 2 == 1 {
        xs[n / 2]
    } else {
        f64::midpoint(xs[n / 2 - 1], xs[n / 2])
    })
}

/// Each policy's medians over the passes (several runs of a policy only).
pub fn medians(runs: &[Run]) -> String {
    let mut names: Vec<&str> = Vec::new();
    for r in runs {
        if !names.contains(&r.policy) {
            names.push(r.policy);
        }
    }
    let of = |name: &str, f: &dyn Fn(&Run) -> Option<f64>| {
        median(
            runs.iter()
                .filter(|r| r.policy == name)
                .filter_map(f)
                .collect(),
        )
    };
    let ksm_held = of("ksm", &|r| Some(r.held as f64));
    let mut o = format!(
        "medians over the passes:\n{:<12} {:>5} {:>10} {:>9} {:>8} {:>9} {:>9} {:>9} {:>11}\n",
        "policy",
        "runs",
        "held MiB",
        "/ KSM",
        "CPU s",
        "p50 us",
        "p99 us",
        "slowdown",
        "busy/round"
    );
    let pct = |x: Option<f64>| x.map_or(String::from("-"), |v| format!("{:+.1}%", 100.0 * v));
    for name in names {
        let n = runs.iter().filter(|r| r.policy == name).count();
        let held = of(name, &|r| Some(r.held as f64)).unwrap_or(0.0);
        let vs_ksm = ksm_held.map_or(String::from("-"), |k| format!("{:.3}", held / k.max(1.0)));
        let us = |f: &dyn Fn(&Run) -> Option<f64>| {
            of(name, f).map_or(String::from("-"), |v| format!("{:.1}", v / 1e3))
        };
        let faulted = |r: &Run| r.refaults > 0;
        o += &format!(
            "{:<12} {:>5} {:>10.1} {:>9} {:>8.2} {:>9} {:>9} {:>9} {:>11}\n",
            name,
            n,
            held / f64::from(1 << 20),
            vs_ksm,
            of(name, &|r| Some(r.cpu_s)).unwrap_or(0.0),
            us(&|r| faulted(r).then_some(r.fault_p50_ns as f64)),
            us(&|r| faulted(r).then_some(r.fault_p99_ns as f64)),
            pct(of(name, &|r| r.slowdown)),
            pct(of(name, &|r| r.busy_slowdown)),
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(policy: &'static str, rounds_per_s: f64, busy_ns: f64) -> Run {
        Run {
            policy,
            rounds_per_s,
            per_round: Some(RoundTime {
                busy_ns,
                ..RoundTime::default()
            }),
            ..Run::default()
        }
    }

    #[test]
    fn each_run_is_compared_with_the_none_runs_on_either_side() {
        let mut runs = vec![
            run("none", 100.0, 400.0),
            run("full", 90.0, 440.0),
            run("none", 80.0, 480.0),
            run("ksm", 80.0, 480.0),
        ];
        compare_with_none(&mut runs);
        // full: between 100 and 80, against 90: no slowdown; busy 440 against 440.
        assert!(runs[1].slowdown.unwrap().abs() < 1e-9);
        assert!(runs[1].busy_slowdown.unwrap().abs() < 1e-9);
        // ksm: only a none before it.
        assert!(runs[3].slowdown.unwrap().abs() < 1e-9);
        // A none run against its none neighbours: the noise floor.
        assert!((runs[0].slowdown.unwrap() + 0.25).abs() < 1e-9);
        assert!((runs[2].slowdown.unwrap() - 0.2).abs() < 1e-9);
        let mut alone = vec![run("full", 1.0, 1.0)];
        compare_with_none(&mut alone);
        assert_eq!(alone[0].slowdown, None);
    }

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        let mut runs = vec![
            run("none", 100.0, 400.0),
            run("full", 95.0, 420.0),
            run("none", 100.0, 400.0),
            run("full", 90.0, 440.0),
            run("none", 100.0, 400.0),
        ];
        compare_with_none(&mut runs);
        let t = medians(&runs);
        assert!(t.contains("+7.5%"), "{t}");
        let full = t.lines().find(|l| l.starts_with("full")).unwrap();
        assert!(full.split_whitespace().nth(1) == Some("2"), "{t}");
    }

    #[test]
    fn the_lines_under_the_table_name_each_runs_pass() {
        let b = Bench {
            set: ImageSet::Mixed,
            guests: 4,
            seconds: 40,
            warmup: 5,
            policies: vec![Policy::None, Policy::Pager(pager::Mode::Full)],
            repeat: 2,
            replay: ReplayParams::default(),
            ksm: (1000, 10),
            cold_secs: 5.0,
            cpu_budget: 0.5,
            compression: pagestore::Compression::Lz4,
            recompress_after: 5.0,
            verbose: false,
        };
        let mut runs: Vec<Run> = (1..=2)
            .flat_map(|pass| {
                [("none", 100.0), ("full", 95.0)].map(|(p, r)| Run {
                    pass,
                    ..run(p, r, 400.0)
                })
            })
            .collect();
        compare_with_none(&mut runs);
        let t = table(&b, &runs);
        let line = t.lines().find(|l| l.starts_with("vCPU busy")).unwrap();
        assert!(
            line.contains("full (pass 1)") && line.contains("full (pass 2)"),
            "{t}"
        );
        // One pass: the policy alone, as before.
        let t = table(&b, &runs[..2]);
        let line = t.lines().find(|l| l.starts_with("vCPU busy")).unwrap();
        assert!(
            line.contains("; full 0.4 ") && !line.contains("pass"),
            "{t}"
        );
    }
}
