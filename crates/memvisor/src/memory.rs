//! Memory policies for guest RAM: none, Linux KSM, or memvisor's pager in one of its modes;
//! how each one's host footprint is measured (../shared/MEASURING.md); the stats socket of a
//! running VM and `memvisor stats`.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use pager::{Mode, Pager, Policy as PagerPolicy};

/// What the full mode recompresses pages that stay away with.
pub const COLD_COMPRESSION: pagestore::Compression = pagestore::Compression::Zstd { level: 1 };

/// Seconds a page stays in the store, LZ4-compressed, before the full mode recompresses it
/// with [`COLD_COMPRESSION`]: pages read again soon after their reclaim come back from LZ4.
pub const RECOMPRESS_AFTER: f64 = 5.0;

/// What manages guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Nothing: the baseline.
    None,
    /// Linux KSM merges identical pages (MADV_MERGEABLE; ksmd does the work).
    Ksm,
    /// memvisor's pager with its store in this mode.
    Pager(Mode),
}

impl Policy {
    /// All, in the order the benchmark runs them.
    pub const ALL: [Policy; 5] = [
        Policy::None,
        Policy::Ksm,
        Policy::Pager(Mode::Share),
        Policy::Pager(Mode::SharePatch),
        Policy::Pager(Mode::Full),
    ];

    /// Its name on the command line and in tables.
    pub fn name(self) -> &'static str {
        match self {
            Policy::None => "none",
            Policy::Ksm => "ksm",
            Policy::Pager(Mode::Share) => "share",
            Policy::Pager(Mode::SharePatch) => "share+patch",
            Policy::Pager(Mode::Full) => "full",
        }
    }
}

impl std::str::FromStr for Policy {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Policy> {
        Policy::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .with_context(|| {
                format!(
                    "no memory policy {s:?}: choose none, ksm, share, share+patch or full \
                     (docs/pager.md)"
                )
            })
    }
}

/// Resident pages of [ptr, ptr+len) (mincore: the VMM's own count).
pub fn resident_pages(ptr: *mut u8, len: usize) -> u64 {
    let mut v = vec![0u8; len.div_ceil(4096)];
    // SAFETY: mincore reads the page tables of a mapping the caller owns and writes one
    // byte per page into `v`, which has one per page.
    let r = unsafe { libc::mincore(ptr.cast(), len, v.as_mut_ptr()) };
    if r != 0 {
        return 0;
    }
    v.iter().filter(|&&b| b & 1 != 0).count() as u64
}

/// What a VM without a pager answers to `stats`: its guest RAM and how much of it is resident,
/// which is its whole footprint under `none` and KSM's before KSM's own saving
/// (../shared/MEASURING.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RamStats {
    /// Guest RAM's size.
    pub ram_bytes: u64,
    /// Of which resident (mincore); a page KSM merged counts here in every guest that maps it.
    pub resident_bytes: u64,
}

impl RamStats {
    /// The figures of guest RAM at [ptr, ptr+len).
    pub fn of(ptr: *mut u8, len: usize) -> RamStats {
        RamStats {
            ram_bytes: len as u64,
            resident_bytes: resident_pages(ptr, len) * 4096,
        }
    }

    /// As a line for people.
    pub fn render(&self) -> String {
        format!(
            "guest RAM {}, resident {} (no pager: policy none or ksm; what KSM merged is \
             counted for the whole host in /sys/kernel/mm/ksm/pages_sharing)\n",
            mib(self.ram_bytes),
            mib(self.resident_bytes)
        )
    }
}

/// Turns off transparent huge pages for a guest RAM range: the pager and KSM both work in
/// 4 KiB pages, and a huge page would make one touched page cost 2 MiB for every policy.
pub fn no_huge_pages(ptr: *mut u8, len: usize) {
    // SAFETY: advice on a mapping the caller owns; it changes no content.
    unsafe { libc::madvise(ptr.cast(), len, libc::MADV_NOHUGEPAGE) };
}

const KSM: &str = "/sys/kernel/mm/ksm";

fn ksm_read(name: &str) -> Result<u64> {
    let s = std::fs::read_to_string(format!("{KSM}/{name}"))
        .with_context(|| format!("reading {KSM}/{name} (is KSM built into this kernel?)"))?;
    s.trim()
        .parse::<i64>()
        .map(|v| v.max(0).unsigned_abs())
        .with_context(|| format!("{KSM}/{name}: not a number"))
}

fn ksm_write(name: &str, v: u64) -> Result<()> {
    std::fs::write(format!("{KSM}/{name}"), v.to_string())
        .with_context(|| format!("writing {KSM}/{name} (KSM needs root)"))
}

/// KSM switched on at a stated scan rate; put back as it was when dropped.
#[derive(Debug)]
pub struct Ksm {
    saved: [(&'static str, u64); 3],
    ksmd: Option<u32>,
    cpu0: f64,
}

impl Ksm {
    /// Starts ksmd with this rate (KSM's default is 100 pages per 20 ms).
    pub fn start(pages_to_scan: u64, sleep_ms: u64) -> Result<Ksm> {
        Ksm::with_run(pages_to_scan, sleep_ms, true)
    }

    /// Sets the rate and ksmd running or not (`set_running` later).
    pub fn with_run(pages_to_scan: u64, sleep_ms: u64, run: bool) -> Result<Ksm> {
        let saved = [
            ("run", ksm_read("run")?),
            ("pages_to_scan", ksm_read("pages_to_scan")?),
            ("sleep_millisecs", ksm_read("sleep_millisecs")?),
        ];
        ksm_write("pages_to_scan", pages_to_scan)?;
        ksm_write("sleep_millisecs", sleep_ms)?;
        // Stopping (0) keeps what is merged; only `run 2` (at drop) unmerges.
        ksm_write("run", u64::from(run))?;
        let ksmd = find_ksmd();
        let cpu0 = ksmd.map_or(0.0, crate::tmem_cmd::cpu_of);
        Ok(Ksm { saved, ksmd, cpu0 })
    }

    /// Starts or stops ksmd (for the whole host: KSM has one switch).
    pub fn set_running(&self, on: bool) -> Result<()> {
        ksm_write("run", u64::from(on))
    }

    /// Marks guest RAM mergeable.
    pub fn merge(&self, ptr: *mut u8, len: usize) -> Result<()> {
        // SAFETY: advice on a mapping the caller owns; KSM never changes its content.
        if unsafe { libc::madvise(ptr.cast(), len, libc::MADV_MERGEABLE) } != 0 {
            return Err(std::io::Error::last_os_error()).context("MADV_MERGEABLE");
        }
        Ok(())
    }

    /// Pages KSM saved (pages_sharing: mappings served by a shared page beyond the first).
    pub fn pages_sharing(&self) -> u64 {
        ksm_read("pages_sharing").unwrap_or(0)
    }

    /// KSM's own net figure (saved less its metadata), bytes; 0 if the kernel lacks it.
    pub fn general_profit(&self) -> i64 {
        std::fs::read_to_string(format!("{KSM}/general_profit"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// ksmd's CPU seconds since start.
    pub fn cpu_s(&self) -> f64 {
        self.ksmd
            .map_or(0.0, |p| crate::tmem_cmd::cpu_of(p) - self.cpu0)
    }
}

impl Drop for Ksm {
    fn drop(&mut self) {
        // 2 unmerges every page, then the settings go back as they were.
        let _ = ksm_write("run", 2);
        for (name, v) in self.saved {
            let _ = ksm_write(name, v);
        }
    }
}

/// Other processes whose pages KSM has merged: KSM's counters are global, so they would
/// count in this process's figures.
pub fn other_ksm_users() -> Vec<(u32, u64)> {
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let n: u64 = std::fs::read_to_string(format!("/proc/{pid}/ksm_merging_pages"))
                .ok()?
                .trim()
                .parse()
                .ok()?;
            (pid != me && n > 0).then_some((pid, n))
        })
        .collect()
}

fn find_ksmd() -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (comm.trim() == "ksmd").then_some(pid)
    })
}

/// The pager for guest RAM, with defaults that are safe: cold after 8 s, a quarter core.
/// The full mode compresses with LZ4 at reclaim and recompresses with `cold` (zstd level 1
/// by default) the pages that stay away `recompress_after` seconds (0: `cold` at the first
/// reclaim of a page never seen to come back).
pub fn pager_policy(
    cold_secs: f64,
    cpu_budget: f64,
    target: Option<u64>,
    cold: Option<pagestore::Compression>,
    recompress_after: f64,
) -> Result<PagerPolicy> {
    let interval = Duration::from_secs(1);
    if !(cold_secs.is_finite() && cold_secs >= 1.0) {
        bail!("--cold {cold_secs}: pages are called cold after at least 1 second");
    }
    if !(recompress_after.is_finite() && (0.0..=255.0).contains(&recompress_after)) {
        bail!("--recompress-after {recompress_after}: give 0 to 255 seconds");
    }
    // Clamped to 1..=255 first, so the cast is exact.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Ok(PagerPolicy {
        interval,
        cold_scans: (cold_secs / interval.as_secs_f64())
            .round()
            .clamp(1.0, 255.0) as u32,
        cpu_budget,
        target_resident: target,
        handlers: 2,
        cold_compression: cold,
        deep_scans: (recompress_after / interval.as_secs_f64()).round() as u32,
    })
}

/// Where a VM's stats socket lives by default.
pub fn socket_dir() -> PathBuf {
    std::env::var_os("XDG_RUNTIME_DIR")
        .filter(|_| !nix_is_root())
        .map_or_else(
            || PathBuf::from("/run/memvisor"),
            |d| Path::new(&d).join("memvisor"),
        )
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no memory effects.
    unsafe { libc::geteuid() == 0 }
}

/// A running VM's control socket: each connection sends one request, a line of JSON such as
/// `{"op":"stats"}` or `{"op":"snapshot",...}`, and gets one JSON answer (an object with
/// `"error"` when the request failed). Requests are served one at a time, until the guard
/// drops.
pub struct ControlServer {
    path: PathBuf,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The longest request line taken.
const MAX_REQUEST: u64 = 64 << 10;

impl ControlServer {
    /// Listens on `path` (made fresh) and answers each request with `handle(request)`.
    pub fn start(
        path: &Path,
        handle: impl Fn(&serde_json::Value) -> serde_json::Value + Send + 'static,
    ) -> Result<ControlServer> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating {} for the control socket", dir.display()))?;
        }
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)
            .with_context(|| format!("listening on {} for memvisor requests", path.display()))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("control-socket".into())
            .spawn(move || {
                while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((s, _)) => serve_request(s, &handle),
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            })?;
        Ok(ControlServer {
            path: path.to_owned(),
            stop,
            thread: Some(thread),
        })
    }
}

/// One request: a line of JSON in, one JSON answer out. A client that sends nothing within
/// a second, or garbage, gets an error answer; nothing it sends can stop the server.
fn serve_request(mut s: UnixStream, handle: &impl Fn(&serde_json::Value) -> serde_json::Value) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
    // One second for the whole line, however slowly it trickles in.
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    let mut line = Vec::new();
    let mut buf = [0u8; 4096];
    let read = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            break Err("no whole request line within a second".to_string());
        }
        let _ = s.set_read_timeout(Some(left));
        match s.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                line.extend_from_slice(&buf[..n]);
                if line.contains(&b'\n') {
                    break Ok(());
                }
                if line.len() as u64 > MAX_REQUEST {
                    break Err("request longer than 64 KiB".to_string());
                }
            }
            // The timeout: the deadline check above ends it.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => break Err(e.to_string()),
        }
    };
    let answer = match read.and_then(|()| {
        let end = line.iter().position(|&b| b == b'\n').unwrap_or(line.len());
        serde_json::from_slice::<serde_json::Value>(&line[..end]).map_err(|e| e.to_string())
    }) {
        Ok(req) => handle(&req),
        Err(e) => serde_json::json!({ "error": format!("bad request: {e}") }),
    };
    let _ = s.write_all(&serde_json::to_vec(&answer).unwrap_or_default());
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The control socket of a running VM: a socket path, a pid, or the only VM running.
fn control_socket(target: Option<&str>) -> Result<PathBuf> {
    Ok(match target {
        Some(t) if t.chars().all(|c| c.is_ascii_digit()) => socket_dir().join(format!("{t}.sock")),
        Some(t) => PathBuf::from(t),
        None => {
            let dir = socket_dir();
            let socks: Vec<PathBuf> = std::fs::read_dir(&dir)
                .map(|d| {
                    d.flatten()
                        .map(|e| e.path())
                        .filter(|p| p.extension().is_some_and(|e| e == "sock"))
                        .collect()
                })
                .unwrap_or_default();
            match socks.len() {
                0 => bail!(
                    "no running memvisor VM has a control socket in {} (start one with \
                     `memvisor run ...`)",
                    dir.display()
                ),
                1 => socks[0].clone(),
                _ => bail!(
                    "several VMs run ({}); name one by its PID or socket path",
                    socks
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }
        }
    })
}

/// Sends `req` to a running VM's control socket and returns its answer; an answer with
/// `"error"` becomes an error.
pub fn control_request(target: Option<&str>, req: &serde_json::Value) -> Result<serde_json::Value> {
    let path = control_socket(target)?;
    let mut s = UnixStream::connect(&path).map_err(|e| {
        anyhow::anyhow!(
            "cannot reach memvisor at {}: {e} (the VM has exited, or this is not a memvisor \
             control socket)",
            path.display()
        )
    })?;
    // A snapshot of a large VM takes seconds; a VM that answers nothing for minutes is stuck.
    s.set_read_timeout(Some(Duration::from_secs(600)))?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    s.write_all(&line)
        .with_context(|| format!("sending a request to {}", path.display()))?;
    let mut body = Vec::new();
    s.read_to_end(&mut body)
        .with_context(|| format!("reading the answer from {}", path.display()))?;
    let v: serde_json::Value = serde_json::from_slice(&body).with_context(|| {
        format!(
            "{} answered, but not with JSON (is it a memvisor socket?)",
            path.display()
        )
    })?;
    if let Some(e) = v.get("error").and_then(serde_json::Value::as_str) {
        bail!("{e}");
    }
    Ok(v)
}

/// Reads a running VM's stats: from a socket path, a pid, or the only VM running.
pub fn fetch_stats(target: Option<&str>) -> Result<serde_json::Value> {
    control_request(target, &serde_json::json!({ "op": "stats" }))
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", crate::bench_memory::mib(b))
}

fn us(ns: u64) -> String {
    format!("{:.1} us", ns as f64 / 1000.0)
}

/// The pager's stats as a table for people.
pub fn render(st: &pager::Stats) -> String {
    let p = &st.pages;
    let b = &st.bytes;
    let mut o = String::new();
    let saved = b.without_pager.saturating_sub(b.held);
    o += &format!(
        "host memory held  {} of {} the guests would hold without memvisor (saved {}, {:.0}%)\n",
        mib(b.held),
        mib(b.without_pager),
        mib(saved),
        100.0 * saved as f64 / b.without_pager.max(1) as f64
    );
    o += &format!(
        "  resident {}   store {}   pager tables {}\n",
        mib(b.resident),
        mib(b.store),
        mib(b.pager_metadata)
    );
    o += &format!(
        "pages   resident {}  zero {}  shared {}  patched {}  compressed {}  raw {}  untouched {}\n",
        p.resident, p.zero, p.shared, p.patched, p.compressed, p.raw, p.empty
    );
    o += &format!(
        "NRU     C1 modified {}  C2 referenced {}  C3 idle {}  C4 cold {}\n",
        st.nru.modified, st.nru.referenced, st.nru.idle, st.nru.cold
    );
    o += &format!(
        "faults  refaults {} (p50 {}, p99 {})  first touches {}  write-protect {}  deferred {}\n",
        st.faults.refaults,
        us(st.refault_latency.p50_ns),
        us(st.refault_latency.p99_ns),
        st.faults.first_touch,
        st.faults.write_protect,
        st.faults.deferred
    );
    for (form, l) in &st.latency {
        if l.count > 0 {
            o += &format!(
                "        from {:<10} {:>8}  p50 {:>8}  p99 {:>8}\n",
                form.name(),
                l.count,
                us(l.p50_ns),
                us(l.p99_ns)
            );
        }
    }
    o += &format!(
        "engine  reclaimed {}  scans {}  CPU {:.2} s (scanner {:.2}, fault service {:.2})\n",
        st.reclaimed,
        st.scans,
        st.cpu_s(),
        st.scanner_cpu_s,
        st.handler_cpu_s
    );
    if let Some(f) = &st.failure {
        o += &format!("FAILED  {f}\n");
    }
    o
}

/// A pager over guest RAM ranges, and the regions it made of them.
pub fn pager_for(
    config: pagestore::Config,
    policy: PagerPolicy,
    rams: &[(*mut u8, usize)],
    scan: bool,
) -> Result<(Pager, Vec<Arc<pager::Region>>)> {
    // `scan` false: the fault service only, until `set_scanning(true)`; set here, not after,
    // so that not even a first scan runs.
    let pager = Pager::with_config(config, policy, scan).context("starting the pager")?;
    let mut regions = Vec::new();
    for (i, &(ptr, len)) in rams.iter().enumerate() {
        // SAFETY: each range is a VM's guest RAM, which the caller keeps mapped until it
        // calls `forget` or drops the pager (both before the VMs go).
        regions.push(
            unsafe { pager.attach(ptr, len, &format!("vm{i}")) }
                .context("handing guest RAM to the pager")?,
        );
    }
    Ok((pager, regions))
}
