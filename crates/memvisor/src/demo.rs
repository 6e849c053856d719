//! `memvisor demo`: the main job on real memory with nothing to configure.
//!
//! Starts three runs of one real program (CPython building records, `workload.py`) with
//! different data, then analyzes their live memory, their core dumps (when gdb's gcore is
//! installed) and a raw image cut from one core, and benchmarks the store on those pages.

use std::io::{BufRead, BufReader, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result, bail};
use pagestore::Config;

use crate::input::Input;

const WORKLOAD: &str = include_str!("workload.py");

/// Runs of the workload, killed when dropped.
struct Workloads(Vec<Child>);

impl Drop for Workloads {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn start(dir: &Path, seeds: &[u32]) -> Result<Workloads> {
    let script = dir.join("workload.py");
    std::fs::write(&script, WORKLOAD)?;
    let mut w = Workloads(Vec::new());
    for seed in seeds {
        let child = Command::new("python3")
            .arg(&script)
            .arg(seed.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting python3 (install it: apt-get install python3)")?;
        w.0.push(child);
    }
    for c in &mut w.0 {
        let mut line = String::new();
        BufReader::new(c.stdout.as_mut().expect("piped")).read_line(&mut line)?;
        if line.trim() != "ready" {
            bail!("workload did not start: {line:?}");
        }
    }
    Ok(w)
}

fn gcore(pid: u32, dir: &Path) -> Result<Option<PathBuf>> {
    let prefix = dir.join("core");
    let Ok(out) = Command::new("gcore")
        .arg("-o")
        .arg(&prefix)
        .arg(pid.to_string())
        .output()
    else {
        return Ok(None); // gdb not installed: the demo goes on without cores
    };
    let path = PathBuf::from(format!("{}.{pid}", prefix.display()));
    if !out.status.success() || !path.exists() {
        bail!(
            "gcore {pid} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(Some(path))
}

/// A raw image: the bytes of a core's memory segments laid end to end.
fn raw_from_core(core: &Path, out: &Path) -> Result<()> {
    let src = Input::File(core.to_path_buf()).open()?;
    let mut f = std::io::BufWriter::new(std::fs::File::create(out)?);
    let mut err = None;
    src.for_each_page(
        |p| match f.write_all(p) {
            Ok(()) => ControlFlow::Continue(()),
            Err(e) => {
                err = Some(e);
                ControlFlow::Break(())
            }
        },
        |_| {},
    )?;
    if let Some(e) = err {
        return Err(e.into());
    }
    f.flush()?;
    Ok(())
}

fn heading(s: &str) {
    println!("\n== {s}");
}

/// The main part: four guests on KVM replaying real Linux memory under the full policy,
/// shown live, then a summary by class.
fn guests(seconds: u64) -> Result<()> {
    use std::io::IsTerminal;

    use crate::bench_memory::{self, Bench, mib};
    use crate::memimages::ImageSet;
    use crate::memory::Policy;

    heading(&format!(
        "four guests on KVM replaying real Linux memory (QEMU dumps of Debian guests, the \
         homogeneous set), 2% of pages hot, 4% warm, the rest cold; memvisor's pager, \
         policy full, for {seconds} s"
    ));
    println!(
        "$ memvisor bench memory --set homogeneous --policies full --seconds {seconds} --verbose"
    );
    let b = Bench {
        set: ImageSet::Homogeneous,
        guests: 4,
        seconds,
        warmup: 5,
        policies: vec![Policy::Pager(pager::Mode::Full)],
        repeat: 1,
        replay: vmm::ReplayParams {
            hot_pct: 2,
            warm_pct: 4,
            duty_pct: 25,
            ..vmm::ReplayParams::default()
        },
        ksm: (1000, 10),
        cold_secs: 5.0,
        cpu_budget: 0.5,
        compression: crate::memory::COLD_COMPRESSION,
        recompress_after: crate::memory::RECOMPRESS_AFTER,
        verbose: false,
    };
    let images = bench_memory::load(b.set)?;
    let elf = std::fs::read(vmm::kit::build("replay", &vmm::kit::target_dir())?)?;
    let tty = std::io::stdout().is_terminal();
    let mut last: Option<pager::Stats> = None;
    bench_memory::run_one(&b, b.policies[0], &images, &elf, &mut |r, st| {
        let Some(st) = st else { return };
        let (t, held) = r.series.last().copied().unwrap_or_default();
        let line = format!(
            "{t:4.0} s  held {:6.1} MiB of {:6.1} MiB without memvisor  (resident {:5.1}, \
             store {:5.1})  refaults {}",
            mib(held),
            mib(st.bytes.without_pager),
            mib(r.resident),
            mib(r.store),
            st.faults.refaults
        );
        if tty {
            print!("\r{line}");
            let _ = std::io::Write::flush(&mut std::io::stdout());
        } else if r.series.len().is_multiple_of(5) {
            println!("{line}");
        }
        last = Some(st.clone());
    })?;
    if tty {
        println!();
    }
    let st = last.context("the guests ran for less than a second")?;
    let p = &st.pages;
    println!("\n{:<12} {:>9} {:>10}", "class", "pages", "MiB held");
    let store_payload = |f: &pagestore::FormStats| mib(f.payload_bytes + f.metadata_bytes);
    let rows = [
        ("resident", p.resident, mib(p.resident * 4096)),
        ("zero", p.zero, 0.0),
        ("shared", p.shared, 0.0),
        ("patched", p.patched, store_payload(&st.store.patched)),
        (
            "compressed",
            p.compressed,
            store_payload(&st.store.compressed),
        ),
        ("raw", p.raw, store_payload(&st.store.raw)),
    ];
    for (name, n, held) in rows {
        println!("{name:<12} {n:>9} {held:>10.1}");
    }
    println!(
        "{:<12} {:>9} {:>10.1}\n{:<12} {:>9} {:>10.1}",
        "tables",
        "",
        mib(st.store.metadata_bytes + st.store.slack_bytes + st.bytes.pager_metadata),
        "total",
        p.total - p.empty,
        mib(st.bytes.held)
    );
    println!(
        "without memvisor the guests hold {:.1} MiB; with it {:.1} MiB ({:.0}% saved), for \
         {:.2} CPU s; refaults p50 {:.1} us, p99 {:.1} us",
        mib(st.bytes.without_pager),
        mib(st.bytes.held),
        100.0 * (1.0 - st.bytes.held as f64 / st.bytes.without_pager.max(1) as f64),
        st.cpu_s(),
        st.refault_latency.p50_ns as f64 / 1000.0,
        st.refault_latency.p99_ns as f64 / 1000.0
    );
    println!("(side by side with KSM on the same guests: memvisor bench memory; docs/pager.md)");
    Ok(())
}

/// Snapshots: eight replay guests snapshotted live into one store, beside flat memory files
/// and zstd; one restored lazily.
fn snapshots() -> Result<()> {
    use crate::bench_snapshot::{self, Bench};
    heading(
        "live snapshots of eight guests replaying the same real Linux memory, kept in one \
         store beside flat memory files and zstd; one restored lazily",
    );
    let b = Bench {
        guests: 8,
        set: crate::memimages::ImageSet::Homogeneous,
        warmup: std::time::Duration::from_millis(500),
        run_after: std::time::Duration::from_secs(1),
        restores: 1,
        big_ram: 0,
        zstd_level: 3,
        dir: std::env::temp_dir().join(format!("memvisor-demo-snap-{}", std::process::id())),
    };
    let r = bench_snapshot::run(&b, &mut |line| println!("{line}"))?;
    print!("{}", bench_snapshot::table(&b, &r));
    println!("(ten guests and a 1 GiB memtest: memvisor bench snapshot; docs/snapshots.md)");
    Ok(())
}

/// Runs the demo.
pub fn run(bench_pages: usize, seconds: u64) -> Result<()> {
    guests(seconds)?;
    snapshots()?;
    let dir = std::env::temp_dir().join(format!("memvisor-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = run_in(&dir, bench_pages);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run_in(dir: &Path, bench_pages: usize) -> Result<()> {
    heading(
        "starting three runs of one real program (CPython building records) with different data",
    );
    let w = start(dir, &[1, 2, 3])?;
    let pids: Vec<u32> = w.0.iter().map(Child::id).collect();
    let live: Vec<Input> = pids.iter().map(|&p| Input::Pid(p)).collect();
    println!("pids: {pids:?}");

    heading("memvisor analyze on their live memory (resident pages only)");
    println!(
        "$ memvisor analyze {}",
        pids.iter()
            .map(|p| format!("pid:{p}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    crate::run_analyze(&live, Config::default(), false)?;

    let mut files = Vec::new();
    for &pid in &pids[..2] {
        match gcore(pid, dir)? {
            Some(p) => files.push(p),
            None => {
                println!(
                    "\n(gdb's gcore is not installed: skipping core dumps; apt-get install gdb)"
                );
                break;
            }
        }
    }
    if files.len() == 2 {
        let raw = dir.join("image.raw");
        raw_from_core(&files[1], &raw)?;
        files[1] = raw;
        heading("memvisor analyze on a core dump (gcore) and a raw image cut from another");
        println!("$ memvisor analyze core.{} raw:image.raw", pids[0]);
        let inputs = vec![Input::File(files[0].clone()), Input::Raw(files[1].clone())];
        crate::run_analyze(&inputs, Config::default(), false)?;
    }

    heading("memvisor bench pagestore on the same live pages");
    println!("$ memvisor bench pagestore --runs 3 --max-pages {bench_pages} pid:...");
    let s = crate::bench::run(&live, bench_pages, 3, Config::default())?;
    print!("{}", crate::bench::render(&s));

    heading(
        "memvisor bench tmem on the same live pages: the tmem server against memcached and Redis",
    );
    println!("$ memvisor bench tmem --runs 3 --max-pages {bench_pages} pid:...");
    let (pages, sources) = crate::bench::collect_pages(&live, bench_pages)?;
    let b = crate::tmem_cmd::bench(&pages, sources, 4, 3, 16_384, &[])?;
    print!("{}", crate::tmem_cmd::render(&b));
    drop(w);
    Ok(())
}
