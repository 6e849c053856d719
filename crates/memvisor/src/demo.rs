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

/// Runs the demo.
pub fn run(bench_pages: usize) -> Result<()> {
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
    let b = crate::tmem_cmd::bench(&pages, sources, 4, 3, &[])?;
    print!("{}", crate::tmem_cmd::render(&b));
    drop(w);
    Ok(())
}
