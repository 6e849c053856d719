//! `memvisor bench snapshot`: live snapshots of guests replaying real memory images, side by
//! side in one run with what a user keeps today (a flat memory file per snapshot, as
//! Firecracker and Cloud Hypervisor write them, and those files compressed with zstd), then
//! lazy restores from the store; and a 1 GiB memtest guest snapshotted mid-run, restored, and
//! checked.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use vmm::{Control, ReplayParams, Vm};

use crate::bench_memory::mib;
use crate::memimages::ImageSet;
use crate::snap::{self, PageServer, TakeReport, TakeRequest, VmHandle};

/// What to run.
#[derive(Debug, Clone)]
pub struct Bench {
    /// snapshots of replay guests (one guest each)
    pub guests: usize,
    /// which images they replay
    pub set: ImageSet,
    /// how long each guest runs before its snapshot
    pub warmup: Duration,
    /// how long each restored guest runs
    pub run_after: Duration,
    /// restores timed (of the first snapshots)
    pub restores: usize,
    /// RAM of the memtest guest (0: skip it)
    pub big_ram: u64,
    /// zstd level of the baseline (3 is the `zstd` tool's default)
    pub zstd_level: i32,
    /// where the store and the flat files go (a fresh directory, removed after)
    pub dir: PathBuf,
}

/// The figures.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Report {
    /// snapshots taken
    pub snapshots: usize,
    /// guest RAM of each
    pub ram_bytes: u64,
    /// ten flat memory files: their bytes
    pub flat_bytes: u64,
    /// the same files compressed with zstd
    pub zstd_bytes: u64,
    /// zstd's CPU time on them
    pub zstd_s: f64,
    /// the snapshot store's bytes on disk for the same snapshots
    pub store_bytes: u64,
    /// each snapshot as taken
    pub takes: Vec<TakeReport>,
    /// restores: time to the first instruction, ms
    pub restore_ms: Vec<f64>,
    /// fault service from the store on restore, p50 and p99 over the restores (max), us
    pub restore_fault_p50_us: f64,
    /// see `restore_fault_p50_us`
    pub restore_fault_p99_us: f64,
    /// the memtest guest's snapshot, if run
    pub big: Option<Big>,
}

/// The big memtest guest's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Big {
    /// its RAM
    pub ram_bytes: u64,
    /// its snapshot
    pub take: TakeReport,
    /// restore to the first instruction, ms
    pub restore_ms: f64,
    /// faults served during the restored run
    pub faults: u64,
    /// p50/p99 of their service, us
    pub fault_p50_us: f64,
    /// see `fault_p50_us`
    pub fault_p99_us: f64,
    /// whether the restored memtest finished without a mismatch
    pub memtest_ok: bool,
}

/// Runs `elf` in `vm` on a thread; `during` runs meanwhile and its value is returned with the
/// guest's console once it ends (after `during`, the guest is asked to stop).
fn with_running<T>(
    vm: &Vm,
    elf: &[u8],
    control: &Arc<Control>,
    during: impl FnOnce() -> Result<T>,
) -> Result<(T, String)> {
    std::thread::scope(|s| {
        let h = s.spawn(|| vm.run_image_ctl(elf, 1, Vec::new(), None, Some(control)));
        // Wait for the guest to be in the guest.
        let t = Instant::now();
        while control.first_entry().is_none() && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(1));
        }
        let r = during();
        control.request_stop();
        let (exit, console) = h
            .join()
            .map_err(|_| anyhow::anyhow!("the guest's thread panicked"))??;
        let console = String::from_utf8_lossy(&console).into_owned();
        if exit != vmm::Exit::Status(0) {
            bail!("the guest ended with {exit:?}: {console}");
        }
        Ok((r?, console))
    })
}

fn take(vm: &Vm, control: &Arc<Control>, store: &Path, name: &str) -> Result<TakeReport> {
    let (ram, len) = vm.ram_host_range();
    let handle = VmHandle {
        ram,
        len,
        control: Arc::clone(control),
        busy: None,
        no_live: None,
    };
    snap::take(
        &handle,
        &TakeRequest {
            store: store.to_owned(),
            name: name.to_owned(),
            paused: false,
            reference: None,
        },
    )
}

/// Writes snapshot `name` as a flat memory file at `path` (every page, zeros too, as a VMM
/// writes guest RAM) and returns its bytes and its zstd-compressed bytes, with zstd's time.
fn flat_and_zstd(store: &Path, name: &str, path: &Path, level: i32) -> Result<(u64, u64, f64)> {
    let st = snap::open_store(store)?;
    let s = st.open_snapshot(name)?;
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
    );
    let mut page = [0u8; 4096];
    for i in 0..s.pages() {
        s.read_page(i, &mut page)?;
        f.write_all(&page)?;
    }
    f.into_inner()
        .map_err(|e| anyhow::anyhow!("writing {}: {}", path.display(), e.error()))?
        .sync_all()?;
    let flat = std::fs::metadata(path)?.len();
    let t = crate::tmem_cmd::cpu_of(std::process::id());
    let zpath = path.with_extension("mem.zst");
    let mut enc = zstd::stream::Encoder::new(std::fs::File::create(&zpath)?, level)?;
    std::io::copy(&mut std::fs::File::open(path)?, &mut enc)?;
    enc.finish()?.sync_all()?;
    let zs = crate::tmem_cmd::cpu_of(std::process::id()) - t;
    let z = std::fs::metadata(&zpath)?.len();
    std::fs::remove_file(path)?;
    Ok((flat, z, zs))
}

/// Restores `name`, runs it for `run`, and returns the report and the console.
fn restore(
    store: &Path,
    name: &str,
    run: Option<Duration>,
) -> Result<(snap::RestoreReport, String, vmm::Exit)> {
    let control = Arc::new(Control::new());
    std::thread::scope(|s| {
        if let Some(run) = run {
            let c = Arc::clone(&control);
            s.spawn(move || {
                std::thread::sleep(run);
                c.request_stop();
            });
        }
        let (exit, console, rep) = snap::restore(
            store,
            name,
            &PageServer::InProcess,
            Vec::new(),
            &control,
            None,
        )?;
        Ok((rep, String::from_utf8_lossy(&console).into_owned(), exit))
    })
}

/// Runs the whole benchmark; `progress` gets a line per step.
pub fn run(b: &Bench, progress: &mut dyn FnMut(&str)) -> Result<Report> {
    let _ = std::fs::remove_dir_all(&b.dir);
    std::fs::create_dir_all(&b.dir).with_context(|| format!("creating {}", b.dir.display()))?;
    let store = b.dir.join("store");
    let flat_dir = b.dir.join("flat");
    std::fs::create_dir_all(&flat_dir)?;
    let images = crate::bench_memory::load(b.set)?;
    let replay = vmm::kit::build("replay", &vmm::kit::target_dir())?;
    let elf = std::fs::read(&replay)?;
    let mut rep = Report::default();
    for i in 0..b.guests {
        let (img, data) = &images[i % images.len()];
        let vm = Vm::new(vmm::replay_ram_size(data.len() as u64))?;
        let params = ReplayParams {
            hot_pct: 2,
            warm_pct: 4,
            duty_pct: 25,
            seed: 0x5eed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
            ..ReplayParams::default()
        };
        vm.load_replay(data, &params)?;
        rep.ram_bytes = vm.ram_size();
        let control = Arc::new(Control::new());
        let name = format!("guest{i}");
        let (t, _) = with_running(&vm, &elf, &control, || {
            std::thread::sleep(b.warmup);
            take(&vm, &control, &store, &name)
        })?;
        progress(&format!(
            "{name} ({img}): live snapshot in {} ms, guest paused {} us (arming {} us), {} \
             pages copied on write, +{:.1} MiB in the store",
            t.total_ms,
            t.pause_us,
            t.arm_us,
            t.copied_on_write,
            mib(t.added_bytes)
        ));
        rep.takes.push(t);
        let (flat, z, zs) = flat_and_zstd(
            &store,
            &name,
            &flat_dir.join(format!("{name}.mem")),
            b.zstd_level,
        )?;
        rep.flat_bytes += flat;
        rep.zstd_bytes += z;
        rep.zstd_s += zs;
    }
    rep.snapshots = b.guests;
    rep.store_bytes = snap::open_store(&store)?.du()?.total_bytes;
    let (mut p50, mut p99) = (0f64, 0f64);
    for i in 0..b.restores.min(b.guests) {
        let name = format!("guest{i}");
        let (r, console, exit) = restore(&store, &name, Some(b.run_after))?;
        if exit != vmm::Exit::Status(0) {
            bail!("restored {name} ended with {exit:?}: {console}");
        }
        let ms = r.first_instruction.as_secs_f64() * 1e3;
        progress(&format!("restore {}", snap::describe_restore(&r)));
        rep.restore_ms.push(ms);
        p50 = p50.max(r.served.fault.p50_ns as f64 / 1e3);
        p99 = p99.max(r.served.fault.p99_ns as f64 / 1e3);
    }
    rep.restore_fault_p50_us = p50;
    rep.restore_fault_p99_us = p99;
    if b.big_ram > 0 {
        rep.big = Some(big(b, &store, progress)?);
    }
    let _ = std::fs::remove_dir_all(&b.dir);
    Ok(rep)
}

/// The memtest guest: snapshot mid-run, restore, and let it finish its check.
fn big(b: &Bench, store: &Path, progress: &mut dyn FnMut(&str)) -> Result<Big> {
    let memtest = std::fs::read(vmm::kit::build("memtest", &vmm::kit::target_dir())?)?;
    let vm = Vm::new(b.big_ram)?;
    let control = Arc::new(Control::new());
    let (t, console) = with_running(&vm, &memtest, &control, || {
        // Let it fill part of its RAM first.
        std::thread::sleep(Duration::from_millis(300));
        take(&vm, &control, store, "memtest")
    })?;
    if !console.contains("memtest: ok") {
        bail!("memtest failed while being snapshotted: {console}");
    }
    progress(&format!(
        "memtest {} MiB: live snapshot in {} ms, guest paused {} us (arming {} us), {} pages \
         copied on write",
        b.big_ram >> 20,
        t.total_ms,
        t.pause_us,
        t.arm_us,
        t.copied_on_write
    ));
    drop(vm);
    let (r, console, exit) = restore(store, "memtest", None)?;
    let ok = exit == vmm::Exit::Status(0) && console.contains("memtest: ok");
    progress(&format!(
        "memtest restored: {}; the guest says: {}",
        snap::describe_restore(&r),
        console.lines().last().unwrap_or("")
    ));
    Ok(Big {
        ram_bytes: b.big_ram,
        take: t,
        restore_ms: r.first_instruction.as_secs_f64() * 1e3,
        faults: r.served.faults,
        fault_p50_us: r.served.fault.p50_ns as f64 / 1e3,
        fault_p99_us: r.served.fault.p99_ns as f64 / 1e3,
        memtest_ok: ok,
    })
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// The table.
pub fn table(b: &Bench, r: &Report) -> String {
    let mut o = String::new();
    let n = r.snapshots;
    let pct = |x: u64, of: u64| 100.0 * x as f64 / of.max(1) as f64;
    o += &format!(
        "\n{n} live snapshots of guests replaying the {} images ({:.0} MiB of RAM each)\n\n",
        b.set.name(),
        mib(r.ram_bytes)
    );
    o += &format!("{:<40} {:>12} {:>10}\n", "kept as", "MiB", "vs flat");
    o += &format!(
        "{:<40} {:>12.1} {:>9.1}%\n",
        "flat memory files (what VMMs write)",
        mib(r.flat_bytes),
        100.0
    );
    o += &format!(
        "{:<40} {:>12.1} {:>9.1}%   zstd -{} took {:.1} CPU s\n",
        format!("the same, zstd -{}", b.zstd_level),
        mib(r.zstd_bytes),
        pct(r.zstd_bytes, r.flat_bytes),
        b.zstd_level,
        r.zstd_s
    );
    o += &format!(
        "{:<40} {:>12.1} {:>9.1}%   {:.2}x the zstd files' bytes\n",
        "memvisor snapshot store",
        mib(r.store_bytes),
        pct(r.store_bytes, r.flat_bytes),
        r.store_bytes as f64 / r.zstd_bytes.max(1) as f64
    );
    let mut pause: Vec<f64> = r.takes.iter().map(|t| t.pause_us as f64).collect();
    let mut total: Vec<f64> = r.takes.iter().map(|t| t.total_ms as f64).collect();
    let max_pause = pause.iter().copied().fold(0.0, f64::max);
    o += &format!(
        "\nsnapshot: guest paused p50 {:.0} us (max {:.0} us); whole snapshot p50 {:.0} ms\n",
        median(&mut pause),
        max_pause,
        median(&mut total)
    );
    let mut rs = r.restore_ms.clone();
    if !rs.is_empty() {
        o += &format!(
            "restore: first instruction p50 {:.2} ms (max {:.2} ms) over {} restores; faults \
             from the store p50 {:.1} us, p99 {:.1} us\n",
            median(&mut rs),
            rs.iter().copied().fold(0.0, f64::max),
            rs.len(),
            r.restore_fault_p50_us,
            r.restore_fault_p99_us
        );
    }
    if let Some(big) = &r.big {
        o += &format!(
            "memtest, {:.0} MiB of RAM, snapshotted mid-run: paused {} us (arming {} us), \
             snapshot {} ms, {} pages copied on write; restored to the first instruction in \
             {:.2} ms, {} faults (p50 {:.1} us, p99 {:.1} us); memtest after restore: {}\n",
            mib(big.ram_bytes),
            big.take.pause_us,
            big.take.arm_us,
            big.take.total_ms,
            big.take.copied_on_write,
            big.restore_ms,
            big.faults,
            big.fault_p50_us,
            big.fault_p99_us,
            if big.memtest_ok {
                "ok, no mismatch"
            } else {
                "FAILED"
            }
        );
    }
    o
}
