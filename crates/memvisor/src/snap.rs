//! Snapshots from the command line: taking one of a running VM (through its control socket),
//! restoring one lazily through a page server (in-process or another process), the page
//! server itself, and the store's housekeeping (ls, du, rm, gc, fsck, clone).

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use snapshot::live;
use snapshot::server::{self, Mapping};
use snapshot::store::Store;

/// How long a pause may take before the snapshot gives up (the VM runs on).
const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);

/// The store used when none is named: $MEMVISOR_STORE, else /var/lib/memvisor/snapshots for
/// root, else $XDG_DATA_HOME (or ~/.local/share)/memvisor/snapshots.
pub fn default_store() -> PathBuf {
    if let Some(p) = std::env::var_os("MEMVISOR_STORE") {
        return PathBuf::from(p);
    }
    // SAFETY: geteuid has no memory effects.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/lib/memvisor/snapshots");
    }
    let data = std::env::var_os("XDG_DATA_HOME").map_or_else(
        || {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into()))
                .join(".local/share")
        },
        PathBuf::from,
    );
    data.join("memvisor/snapshots")
}

/// Opens (creating if new) the store at `dir`.
pub fn open_store(dir: &Path) -> Result<Store> {
    Store::open(dir).with_context(|| format!("opening the snapshot store {}", dir.display()))
}

/// What a running VM offers its control socket: guest RAM and its control.
pub struct VmHandle {
    /// guest RAM's host mapping
    pub ram: *mut u8,
    /// its length
    pub len: usize,
    /// the run's control (pause)
    pub control: Arc<vmm::Control>,
    /// why snapshots cannot be taken of this VM (a pager or a page server owns guest RAM's
    /// userfaultfd), if so
    pub busy: Option<String>,
    /// why only a paused snapshot can be taken of this VM, if so
    pub no_live: Option<String>,
}

// SAFETY: the pointer is guest RAM, mapped for as long as the VM (which outlives the control
// socket that holds this) lives; it is only read through the live snapshot's protocol.
unsafe impl Send for VmHandle {}
// SAFETY: as above.
unsafe impl Sync for VmHandle {}

/// A snapshot request, as the control socket takes it.
#[derive(Debug, serde::Deserialize, Serialize)]
pub struct TakeRequest {
    /// the store directory
    pub store: PathBuf,
    /// the snapshot's name
    pub name: String,
    /// pause the VM for the whole copy instead of copying live
    #[serde(default)]
    pub paused: bool,
    /// also take a pause-and-copy snapshot of the same instant, under this name (a check)
    #[serde(default)]
    pub reference: Option<String>,
}

/// What taking a snapshot did.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct TakeReport {
    /// its name
    pub name: String,
    /// "live" or "paused"
    pub mode: String,
    /// how long the guest was paused, microseconds
    pub pause_us: u64,
    /// of which arming write protection, microseconds
    pub arm_us: u64,
    /// from the request to the snapshot being durable, milliseconds
    pub total_ms: u64,
    /// guest RAM pages
    pub pages: u64,
    /// pages copied because the guest wrote them first
    pub copied_on_write: u64,
    /// zero pages
    pub zero: u64,
    /// guest write faults' service time, p50 and p99, nanoseconds
    pub fault_p50_ns: u64,
    /// see `fault_p50_ns`
    pub fault_p99_ns: u64,
    /// bytes this snapshot added to the store
    pub added_bytes: u64,
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Takes a snapshot of the running VM `vm` (from its control socket's thread).
pub fn take(vm: &VmHandle, req: &TakeRequest) -> Result<TakeReport> {
    let t0 = Instant::now();
    if let Some(why) = &vm.busy {
        bail!("cannot snapshot this VM: {why}");
    }
    if let (false, Some(why)) = (req.paused, &vm.no_live) {
        bail!("cannot snapshot this VM live: {why}; take a paused snapshot (--paused)");
    }
    let store = open_store(&req.store)?;
    let before = store.du()?.total_bytes;
    let ram_size = vm.len as u64;
    let writer = store.writer(&req.name, ram_size)?;
    let reference = req
        .reference
        .as_deref()
        .map(|r| store.writer(r, ram_size))
        .transpose()?;
    let (state, pause, report) = if req.paused {
        let paused = vm.control.pause(PAUSE_TIMEOUT)?;
        // SAFETY: guest RAM is mapped while the VM lives; paused, nothing writes it.
        unsafe { live::copy_paused(vm.ram, vm.len, &writer) }?;
        if let Some(r) = &reference {
            // SAFETY: as above.
            unsafe { live::copy_paused(vm.ram, vm.len, r) }?;
        }
        let (pause, state) = paused.resume();
        (state, pause, live::LiveReport::default())
    } else {
        // SAFETY: guest RAM is a private anonymous mapping that lives as long as the VM; no
        // pager has it (checked above), so no other userfaultfd does.
        let ((state, pause), report) = unsafe {
            live::take(vm.ram, vm.len, &writer, |arm| {
                let paused = vm.control.pause(PAUSE_TIMEOUT)?;
                arm()?;
                if let Some(r) = &reference {
                    live::copy_paused(vm.ram, vm.len, r)?;
                }
                let (pause, state) = paused.resume();
                Ok((state, pause))
            })
        }?;
        (state, pause, report)
    };
    let bytes = state.to_bytes();
    if let Some(r) = reference {
        r.set_state(bytes.clone());
        r.finish()?;
    }
    writer.set_state(bytes);
    writer.set_order(report.order.clone());
    let info = writer.finish()?;
    let after = store.du()?.total_bytes;
    Ok(TakeReport {
        name: info.name,
        mode: if req.paused { "paused" } else { "live" }.into(),
        pause_us: micros(pause),
        arm_us: micros(report.arm),
        total_ms: u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX),
        pages: ram_size / 4096,
        copied_on_write: report.copied_on_write,
        zero: report.zero,
        fault_p50_ns: report.fault.p50_ns,
        fault_p99_ns: report.fault.p99_ns,
        added_bytes: after.saturating_sub(before),
    })
}

/// How a restore went.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RestoreReport {
    /// from the restore's start to the guest's first instruction
    pub first_instruction: Duration,
    /// what the page server did
    pub served: server::ServeReport,
}

/// Where a restore's memory comes from.
pub enum PageServer<'a> {
    /// a page-server thread of this process
    InProcess,
    /// `memvisor page-server` (or another) listening on this socket
    Socket(&'a Path),
}

/// Restores snapshot `name` of `store` into a new VM and runs it to its end, its memory
/// served lazily through the page-server handshake; `console` gets the guest's console.
pub fn restore<W: std::io::Write + Send>(
    store_dir: &Path,
    name: &str,
    source: &PageServer<'_>,
    console: W,
    control: &Arc<vmm::Control>,
    control_socket: Option<&Path>,
) -> Result<(vmm::Exit, W, RestoreReport)> {
    let t0 = Instant::now();
    let store = open_store(store_dir)?;
    let snap = store
        .open_snapshot(name)
        .with_context(|| format!("opening snapshot {name}"))?;
    let state = vmm::VmState::from_bytes(snap.state())
        .with_context(|| format!("reading snapshot {name}'s VM state"))?;
    let vm = vmm::Vm::new(snap.ram_size())?;
    let (ram, len) = vm.ram_host_range();
    let uffd = pager::uffd::Uffd::new()?;
    let missing = pager::uffd::Modes {
        missing: true,
        write_protect: false,
    };
    uffd.register(ram as u64, len as u64, missing)?;
    let _control_server = control_socket
        .map(|path| {
            let handle = VmHandle {
                ram,
                len,
                control: Arc::clone(control),
                busy: Some(
                    "its memory is still served lazily by a page server (snapshot it before \
                     restoring, or restore its snapshot's clone)"
                        .into(),
                ),
                no_live: None,
            };
            crate::memory::ControlServer::start(path, move |req| {
                crate::control_answer(req, &handle, None, None)
            })
        })
        .transpose()?;
    let mapping = Mapping {
        base_host_virt_addr: ram as u64,
        size: len as u64,
        offset: 0,
        page_size: 4096,
        page_size_kib: Some(4096),
    };
    let stop = AtomicBool::new(false);
    let watch_stop = AtomicBool::new(false);
    let (conn, theirs) = match source {
        PageServer::InProcess => {
            let (a, b) = UnixStream::pair().context("a socket pair for the page server")?;
            (a, Some(b))
        }
        PageServer::Socket(p) => (
            UnixStream::connect(p).with_context(|| {
                format!(
                    "connecting to the page server at {} (is `memvisor page-server` running?)",
                    p.display()
                )
            })?,
            None,
        ),
    };
    std::thread::scope(|s| {
        let served = theirs.map(|b| {
            let (snap, stop, control) = (&snap, &stop, Arc::clone(control));
            s.spawn(move || {
                // Nothing else serves this VM's memory: however the server ends early (an
                // error, a panic), the VM must end too, or its next fault waits forever.
                struct AbortOnDrop(Arc<vmm::Control>, Option<String>);
                impl Drop for AbortOnDrop {
                    fn drop(&mut self) {
                        if let Some(why) = self.1.take() {
                            self.0.abort(why);
                        }
                    }
                }
                let mut guard = AbortOnDrop(control, Some("the page server panicked".into()));
                let r = server::serve(snap, &b, stop);
                guard.1 = r
                    .as_ref()
                    .err()
                    .map(|e| format!("the page server failed: {e}"));
                r
            })
        });
        server::send_handshake(&conn, &[mapping], uffd.as_fd())?;
        // An external server that goes away leaves the guest's faults unserved: end the VM
        // with the reason rather than let it hang.
        if served.is_none() {
            let (conn, c, watch_stop) = (&conn, Arc::clone(control), &watch_stop);
            s.spawn(move || watch_server(conn, &c, watch_stop));
        }
        let ran = vm.restore_image_ctl(&state, console, None, Some(control));
        watch_stop.store(true, std::sync::atomic::Ordering::Release);
        stop.store(true, std::sync::atomic::Ordering::Release);
        let served = match served {
            Some(h) => h
                .join()
                .map_err(|_| anyhow::anyhow!("the page-server thread panicked"))??,
            None => server::ServeReport::default(),
        };
        let (exit, console) = ran?;
        let first = control
            .first_entry()
            .map_or(Duration::ZERO, |t| t.saturating_duration_since(t0));
        Ok((
            exit,
            console,
            RestoreReport {
                first_instruction: first,
                served,
            },
        ))
    })
}

/// Ends the VM if the external page server's connection closes.
fn watch_server(conn: &UnixStream, control: &vmm::Control, stop: &AtomicBool) {
    use std::os::fd::AsRawFd;
    while !stop.load(std::sync::atomic::Ordering::Acquire) {
        let mut pfd = libc::pollfd {
            fd: conn.as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one valid pollfd, for the length given.
        let r = unsafe { libc::poll(&raw mut pfd, 1, 50) };
        if r > 0 && pfd.revents & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR) != 0 {
            control.abort("the page server went away; guest memory can no longer be served".into());
            return;
        }
    }
}

/// `memvisor page-server`: serves snapshot `name` to every VMM that connects to `socket`
/// (Firecracker's handshake), each on a thread, until killed, or after the first with `once`.
pub fn page_server(store_dir: &Path, name: &str, socket: &Path, once: bool) -> Result<()> {
    let store = open_store(store_dir)?;
    let snap = Arc::new(
        store
            .open_snapshot(name)
            .with_context(|| format!("opening snapshot {name}"))?,
    );
    let _ = std::fs::remove_file(socket);
    let listener = std::os::unix::net::UnixListener::bind(socket)
        .with_context(|| format!("listening on {}", socket.display()))?;
    eprintln!(
        "memvisor: serving snapshot {name} ({} MiB) on {}",
        snap.ram_size() >> 20,
        socket.display()
    );
    std::thread::scope(|s| {
        for conn in listener.incoming() {
            let conn = conn.context("accepting a VMM")?;
            let snap = Arc::clone(&snap);
            let h = s.spawn(move || {
                let stop = AtomicBool::new(false);
                let r = server::serve(&*snap, &conn, &stop);
                match &r {
                    Ok(rep) => eprintln!(
                        "memvisor: VM gone; {} faults served (p50 {:.1} us, p99 {:.1} us), {} \
                         prefetched, {} zero, {} dropped by the VMM",
                        rep.faults,
                        rep.fault.p50_ns as f64 / 1e3,
                        rep.fault.p99_ns as f64 / 1e3,
                        rep.prefetched,
                        rep.zero_faults,
                        rep.removed
                    ),
                    Err(e) => eprintln!("memvisor: a VMM's session failed: {e:#}"),
                }
                r
            });
            if once {
                let r = h
                    .join()
                    .map_err(|_| anyhow::anyhow!("the serving thread panicked"))?;
                r?;
                break;
            }
        }
        Ok(())
    })
}

/// Sends a control request to a running VM and returns its JSON answer.
pub fn request(target: Option<&str>, req: &serde_json::Value) -> Result<serde_json::Value> {
    crate::memory::control_request(target, req)
}

/// Prints the page server's side of a restore.
pub fn describe_restore(r: &RestoreReport) -> String {
    format!(
        "restored to the first instruction in {:.2} ms; {} faults served from the store (p50 \
         {:.1} us, p99 {:.1} us), {} pages prefetched, {} zero",
        r.first_instruction.as_secs_f64() * 1e3,
        r.served.faults,
        r.served.fault.p50_ns as f64 / 1e3,
        r.served.fault.p99_ns as f64 / 1e3,
        r.served.prefetched,
        r.served.zero_faults
    )
}

fn mib(b: u64) -> f64 {
    b as f64 / f64::from(1u32 << 20)
}

/// One line about a snapshot just taken.
pub fn describe_take(r: &TakeReport) -> String {
    format!(
        "{}: {} snapshot of {:.0} MiB in {} ms; guest paused {} us (arming write protection \
         {} us); {} pages copied before the guest's write, {} zero; the store grew {:.1} MiB",
        r.name,
        r.mode,
        mib(r.pages * 4096),
        r.total_ms,
        r.pause_us,
        r.arm_us,
        r.copied_on_write,
        r.zero,
        mib(r.added_bytes)
    )
}

/// `snapshot ls` as a table.
pub fn render_list(list: &[snapshot::store::SnapshotInfo]) -> String {
    let mut o = format!(
        "{:<24} {:>10} {:>12} {:>12} {:>12}  {}\n",
        "NAME", "RAM MiB", "LOGICAL MiB", "STORED MiB", "UNIQUE MiB", "BASE"
    );
    for s in list {
        o += &format!(
            "{:<24} {:>10.0} {:>12.1} {:>12.1} {:>12.1}  {}\n",
            s.name,
            mib(s.ram_bytes),
            mib(s.logical_bytes),
            mib(s.stored_bytes),
            mib(s.unique_bytes),
            s.base.as_deref().unwrap_or("-")
        );
    }
    o
}

/// `snapshot du` as a table.
pub fn render_du(u: &snapshot::store::StoreUsage) -> String {
    format!(
        "{} snapshots in {} packs: {:.1} MiB on disk (packs {:.1} MiB, manifests {:.1} MiB)\n\
         {:<12} {:>10} {:>12}\n{:<12} {:>10} {:>12.1}\n{:<12} {:>10} {:>12.1}\n{:<12} {:>10} \
         {:>12.1}\n",
        u.snapshots,
        u.packs,
        mib(u.total_bytes),
        mib(u.pack_bytes),
        mib(u.manifest_bytes),
        "FORM",
        "PAGES",
        "MiB",
        "patched",
        u.delta.objects,
        mib(u.delta.bytes),
        "compressed",
        u.compressed.objects,
        mib(u.compressed.bytes),
        "raw",
        u.raw.objects,
        mib(u.raw.bytes)
    )
}

/// One line about a collection.
pub fn describe_gc(g: &snapshot::store::GcReport) -> String {
    format!(
        "gc: {:.1} MiB -> {:.1} MiB; {} packs deleted, {} repacked ({} records copied, {} \
         manifests rewritten), {} leftovers removed",
        mib(g.bytes_before),
        mib(g.bytes_after),
        g.packs_deleted,
        g.packs_repacked,
        g.records_copied,
        g.manifests_rewritten,
        g.leftovers_removed
    )
}

/// `snapshot fsck`'s findings.
pub fn describe_fsck(r: &snapshot::store::FsckReport) -> String {
    let mut o = format!(
        "fsck: {} snapshots, {} clones, {} packs, {} records decoded and hashed: {}",
        r.snapshots,
        r.clones,
        r.packs,
        r.records,
        if r.is_clean() {
            "clean".to_string()
        } else {
            format!("{} problems", r.problems.len())
        }
    );
    for p in &r.problems {
        o += &format!("\n  {p}");
    }
    o
}
