//! The page server: a snapshot's memory served lazily through a VMM's userfaultfd.
//!
//! The handshake is Firecracker's (docs/snapshotting/handling-page-faults-on-snapshot-resume
//! in its repository): the VMM connects to a Unix socket and sends one message, a JSON array
//! of its guest memory regions, each `{"base_host_virt_addr", "size", "offset", "page_size"}`
//! (`offset` is where the region starts in the snapshot's memory; Firecracker also sends
//! `page_size_kib`, in bytes despite its name), with the userfaultfd of those regions attached
//! as SCM_RIGHTS. From then on the server resolves every missing fault in the regions with the
//! snapshot's page, and zero-page for a zero page or one the VMM dropped (a remove event).
//! The pages the guest touched first when the snapshot was taken are copied in ahead of its
//! faults, in the gaps between them.
//!
//! The VMM is another process and may be hostile or buggy: its JSON is checked against the
//! snapshot (whole pages, inside it, no overlaps) and a bad one gets an error naming the
//! field, never a panic. The server serves until the VMM process exits (found with a pidfd on
//! the peer's pid, since Firecracker closes the socket right after the handshake) or until
//! its owner stops it; then it lets go of the userfaultfd, and the VM's pages with it.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pager::stats::{Histogram, Latency};
use pager::uffd::{Event, Resolved, Uffd};
use serde::{Deserialize, Serialize};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::{BoxError, PAGE, PageSource};

/// Why a page server stopped serving a VM.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// the socket failed
    #[error("page-server socket")]
    Socket(#[source] std::io::Error),
    /// the VMM sent no userfaultfd with its message
    #[error("the VMM's message carried no userfaultfd (send it as SCM_RIGHTS with the JSON)")]
    NoFd,
    /// the VMM's message was not the JSON the handshake expects
    #[error("the VMM's memory-region message is not valid JSON: {0}")]
    Json(String),
    /// a region the VMM described does not fit the snapshot
    #[error("the VMM's region {index} is unusable: {why}")]
    Region {
        /// which region (0-based)
        index: usize,
        /// what is wrong with it
        why: String,
    },
    /// userfaultfd refused an operation
    #[error("userfaultfd")]
    Uffd(#[from] pager::UffdError),
    /// the snapshot could not give a page
    #[error("reading page {0} of the snapshot")]
    Source(u64, #[source] BoxError),
}

/// One guest memory region, as Firecracker describes it to its page server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mapping {
    /// where the region starts in the VMM's address space
    pub base_host_virt_addr: u64,
    /// its length in bytes
    pub size: u64,
    /// where it starts in the snapshot's memory
    pub offset: u64,
    /// its page size in bytes (4096: huge pages are not served); a message with only
    /// `page_size_kib` is taken by that
    #[serde(default)]
    pub page_size: u64,
    /// Firecracker's older name for the page size (in bytes)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_size_kib: Option<u64>,
}

/// The most regions one VMM may describe.
const MAX_REGIONS: usize = 64;
/// The longest handshake message taken.
const MAX_MESSAGE: usize = 64 << 10;

/// What serving one VM did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ServeReport {
    /// missing faults resolved
    pub faults: u64,
    /// of which with a zero page
    pub zero_faults: u64,
    /// pages copied in ahead of a fault
    pub prefetched: u64,
    /// pages the VMM dropped (remove events)
    pub removed: u64,
    /// resolutions retried after EAGAIN
    pub retries: u64,
    /// fault service time, read to wake
    pub fault: Latency,
    /// when the first fault arrived, after the handshake
    pub first_fault: Option<Duration>,
}

/// The VMM's side of the handshake: sends `mappings` and `uffd` on `conn`.
pub fn send_handshake(
    conn: &UnixStream,
    mappings: &[Mapping],
    uffd: BorrowedFd<'_>,
) -> Result<(), ServerError> {
    let json = serde_json::to_vec(mappings).map_err(|e| ServerError::Json(e.to_string()))?;
    conn.send_with_fd(&json[..], uffd.as_raw_fd())
        .map_err(|e| ServerError::Socket(std::io::Error::from_raw_os_error(e.errno())))?;
    Ok(())
}

/// The server's side of the handshake: the VMM's regions and its userfaultfd.
pub fn recv_handshake(conn: &UnixStream) -> Result<(Vec<Mapping>, OwnedFd), ServerError> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let (n, file) = conn
        .recv_with_fd(&mut buf)
        .map_err(|e| ServerError::Socket(std::io::Error::from_raw_os_error(e.errno())))?;
    let fd = OwnedFd::from(file.ok_or(ServerError::NoFd)?);
    let mappings: Vec<Mapping> =
        serde_json::from_slice(&buf[..n]).map_err(|e| ServerError::Json(e.to_string()))?;
    Ok((mappings, fd))
}

/// Checks the VMM's regions against a snapshot of `pages` pages.
pub fn check_mappings(mappings: &[Mapping], pages: u64) -> Result<(), ServerError> {
    let bad = |index, why: &str| {
        Err(ServerError::Region {
            index,
            why: why.to_string(),
        })
    };
    if mappings.is_empty() || mappings.len() > MAX_REGIONS {
        return bad(
            0,
            &format!(
                "there must be 1 to {MAX_REGIONS} regions, not {}",
                mappings.len()
            ),
        );
    }
    let page = PAGE as u64;
    for (i, m) in mappings.iter().enumerate() {
        let size = if m.page_size == 0 {
            m.page_size_kib.unwrap_or(0)
        } else {
            m.page_size
        };
        if size != page {
            return bad(
                i,
                &format!("page_size is {size}; only 4096-byte pages are served"),
            );
        }
        if m.size == 0 || !m.size.is_multiple_of(page) {
            return bad(i, "size is not a whole number of pages");
        }
        if !m.base_host_virt_addr.is_multiple_of(page) || !m.offset.is_multiple_of(page) {
            return bad(i, "base_host_virt_addr or offset is not page-aligned");
        }
        let end = m.offset.checked_add(m.size);
        if end.is_none_or(|e| e > pages * page) {
            return bad(
                i,
                &format!(
                    "offset {:#x} + size {:#x} runs past the snapshot's {} bytes",
                    m.offset,
                    m.size,
                    pages * page
                ),
            );
        }
        if m.base_host_virt_addr.checked_add(m.size).is_none() {
            return bad(i, "base_host_virt_addr + size overflows");
        }
        for (j, o) in mappings[..i].iter().enumerate() {
            let overlap = m.base_host_virt_addr < o.base_host_virt_addr + o.size
                && o.base_host_virt_addr < m.base_host_virt_addr + m.size;
            if overlap {
                return bad(
                    i,
                    &format!("it overlaps region {j} in the VMM's address space"),
                );
            }
        }
    }
    Ok(())
}

/// Per host page of a region: served (mapped by us) or dropped by the VMM.
const SERVED: u8 = 1;
const REMOVED: u8 = 2;

struct Region {
    m: Mapping,
    flags: Vec<u8>,
}

struct Server<'a> {
    uffd: Uffd,
    source: &'a dyn PageSource,
    regions: Vec<Region>,
    page: Box<[u8; PAGE]>,
    report: ServeReport,
    hist: Histogram,
    start: Instant,
}

/// Serves one VM: takes the handshake on `conn`, then resolves faults from `source` until
/// the VMM process exits or `stop` is set.
pub fn serve(
    source: &dyn PageSource,
    conn: &UnixStream,
    stop: &AtomicBool,
) -> Result<ServeReport, ServerError> {
    // A VMM that connects and says nothing must not hold a server thread for ever.
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(ServerError::Socket)?;
    let (mappings, fd) = recv_handshake(conn)?;
    check_mappings(&mappings, source.pages())?;
    let peer = peer_pidfd(conn)?;
    let uffd = Uffd::from_fd(fd)?;
    let mut s = Server {
        uffd,
        source,
        regions: mappings
            .iter()
            .map(|&m| Region {
                m,
                flags: vec![0; usize::try_from(m.size / PAGE as u64).unwrap_or(0)],
            })
            .collect(),
        page: Box::new([0; PAGE]),
        report: ServeReport::default(),
        hist: Histogram::default(),
        start: Instant::now(),
    };
    match s.run(peer.as_ref(), stop) {
        // The VM's memory went away under a copy (the VMM exited or unmapped it): its end,
        // not a failure of the session.
        Err(ServerError::Uffd(pager::UffdError::Ioctl { source, .. }))
            if matches!(source.raw_os_error(), Some(libc::ESRCH | libc::ENOENT)) => {}
        r => r?,
    }
    s.report.fault = s.hist.summary();
    Ok(s.report)
}

/// A pidfd for the process at the other end of `conn`, unless that is this process (an
/// in-process VMM, which stops the server itself).
fn peer_pidfd(conn: &UnixStream) -> Result<Option<OwnedFd>, ServerError> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = libc::socklen_t::try_from(size_of::<libc::ucred>()).expect("a ucred is 12 bytes");
    // SAFETY: SO_PEERCRED writes one ucred into `cred`, whose size is passed.
    let r = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &raw mut len,
        )
    };
    if r != 0 {
        return Err(ServerError::Socket(std::io::Error::last_os_error()));
    }
    if cred.pid == 0 || u32::try_from(cred.pid).ok() == Some(std::process::id()) {
        return Ok(None);
    }
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, cred.pid, 0) };
    if fd < 0 {
        return Err(ServerError::Socket(std::io::Error::last_os_error()));
    }
    let fd = i32::try_from(fd).map_err(|_| ServerError::Socket(std::io::Error::last_os_error()))?;
    // SAFETY: the kernel just gave us this fd; nothing else owns it.
    Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) }))
}

impl Server<'_> {
    fn run(&mut self, peer: Option<&OwnedFd>, stop: &AtomicBool) -> Result<(), ServerError> {
        let mut events = [Event::Other(0); 16];
        let mut retry: Vec<(u64, bool)> = Vec::new();
        let order: Vec<u32> = self.source.order().to_vec();
        let mut next = 0;
        loop {
            if stop.load(Ordering::Acquire) {
                return Ok(());
            }
            let idle = next >= order.len() && retry.is_empty();
            let mut fds = [
                libc::pollfd {
                    fd: self.uffd.raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: peer.map_or(-1, AsRawFd::as_raw_fd),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // Block only when there is nothing to prefetch or retry; wake now and then to
            // see `stop`.
            let wait = if idle { 50 } else { 0 };
            // SAFETY: two valid pollfds (a negative fd is ignored), for the length given.
            let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, wait) };
            if ready > 0 && fds[1].revents != 0 {
                return Ok(()); // the VMM has exited
            }
            let n = self.uffd.read(&mut events)?;
            for ev in &events[..n] {
                match *ev {
                    Event::Missing { addr, .. } => {
                        let t = Instant::now();
                        if self.report.first_fault.is_none() {
                            self.report.first_fault = Some(self.start.elapsed());
                        }
                        if self.resolve(addr, true)? {
                            self.report.faults += 1;
                            self.hist
                                .record(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX));
                        } else {
                            retry.push((addr, true));
                        }
                    }
                    Event::Remove { start, end } => self.remove(start, end),
                    // Not registered for them; wake whoever waits so nothing hangs.
                    Event::WriteProtect { addr } => {
                        let _ = self.uffd.wake(addr, PAGE as u64);
                    }
                    Event::Other(_) => {}
                }
            }
            if n > 0 {
                continue; // faults first: prefetch only in the gaps
            }
            // Resolutions that met EAGAIN, now that the events are read.
            for (addr, fault) in std::mem::take(&mut retry) {
                self.report.retries += 1;
                if self.resolve(addr, fault)? {
                    self.report.faults += u64::from(fault);
                } else {
                    retry.push((addr, fault));
                }
            }
            // Prefetch a few pages the guest touched first last time.
            let mut budget = 32;
            while budget > 0 && next < order.len() {
                let idx = u64::from(order[next]);
                next += 1;
                for addr in self.addrs_of(idx) {
                    budget -= 1;
                    if !self.resolve(addr, false)? {
                        retry.push((addr, false));
                    }
                }
            }
        }
    }

    /// The VMM addresses that hold snapshot page `idx` (one per region mapping it) and are
    /// neither served nor dropped.
    fn addrs_of(&self, idx: u64) -> Vec<u64> {
        let off = idx * PAGE as u64;
        self.regions
            .iter()
            .filter(|r| off >= r.m.offset && off < r.m.offset + r.m.size)
            .filter_map(|r| {
                let k = usize::try_from((off - r.m.offset) / PAGE as u64).ok()?;
                (r.flags[k] == 0).then_some(r.m.base_host_virt_addr + (off - r.m.offset))
            })
            .collect()
    }

    fn locate(&self, addr: u64) -> Option<(usize, usize)> {
        self.regions.iter().enumerate().find_map(|(i, r)| {
            let rel = addr.checked_sub(r.m.base_host_virt_addr)?;
            (rel < r.m.size).then(|| (i, usize::try_from(rel / PAGE as u64).unwrap_or(0)))
        })
    }

    /// Maps the page at `addr` and wakes its waiters. False: EAGAIN, retry after reading
    /// events. A fault outside every region is only woken (the VMM's business).
    fn resolve(&mut self, addr: u64, fault: bool) -> Result<bool, ServerError> {
        let Some((r, k)) = self.locate(addr) else {
            let _ = self.uffd.wake(addr, PAGE as u64);
            return Ok(true);
        };
        let region = &self.regions[r];
        if !fault && region.flags[k] != 0 {
            return Ok(true); // served or dropped meanwhile
        }
        let idx = (region.m.offset + (k * PAGE) as u64) / PAGE as u64;
        let zero = region.flags[k] & REMOVED != 0 || self.source.is_zero(idx);
        let got = if zero {
            self.uffd.zeropage(addr, true)?
        } else {
            self.source
                .read_page(idx, &mut self.page)
                .map_err(|e| ServerError::Source(idx, e))?;
            self.uffd.copy(addr, &self.page, true)?
        };
        match got {
            Resolved::Again => return Ok(false),
            // Mapped already (a prefetch raced a fault): wake the waiters.
            Resolved::Exists => {
                let _ = self.uffd.wake(addr, PAGE as u64);
            }
            Resolved::Done => {}
        }
        if fault && zero {
            self.report.zero_faults += 1;
        }
        if !fault && got == Resolved::Done {
            self.report.prefetched += 1;
        }
        self.regions[r].flags[k] = SERVED;
        Ok(true)
    }

    /// The VMM dropped [start, end): those pages read as zero from now on.
    fn remove(&mut self, start: u64, end: u64) {
        for r in &mut self.regions {
            let (b, e) = (r.m.base_host_virt_addr, r.m.base_host_virt_addr + r.m.size);
            let (s, t) = (start.max(b), end.min(e));
            let mut a = s;
            while a < t {
                if let Ok(k) = usize::try_from((a - b) / PAGE as u64) {
                    r.flags[k] = REMOVED;
                    self.report.removed += 1;
                }
                a += PAGE as u64;
            }
        }
    }
}
