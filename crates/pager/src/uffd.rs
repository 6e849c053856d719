//! The project's one userfaultfd layer: open, feature handshake, register, copy, zero-page,
//! write-protect, wake, and reading fault and event messages.
//!
//! Written here on libc rather than taken from the `userfaultfd` crate: that crate needs
//! libclang for bindgen at build time, its `linux5_13` feature does not enable write-protect,
//! and it reports a copy that failed with EAGAIN as a huge partial copy (an open upstream
//! bug). The kernel ABI it wraps is small and stable (include/uapi/linux/userfaultfd.h).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Why a userfaultfd call failed.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// Neither /dev/userfaultfd nor the system call would give a userfaultfd.
    #[error(
        "cannot create a userfaultfd: permission denied (run as root, give this user read and \
         write access to /dev/userfaultfd, or set the sysctl vm.unprivileged_userfaultfd=1)"
    )]
    Permission(#[source] std::io::Error),
    /// The kernel has no userfaultfd at all.
    #[error("this kernel has no userfaultfd (CONFIG_USERFAULTFD); the pager cannot run here")]
    Unsupported(#[source] std::io::Error),
    /// The kernel lacks a feature the pager needs.
    #[error("this kernel's userfaultfd lacks {0} (a Linux 5.19 or later kernel has it)")]
    Feature(&'static str),
    /// An ioctl failed.
    #[error("userfaultfd {op} failed")]
    Ioctl {
        /// which operation
        op: &'static str,
        /// what the kernel said
        #[source]
        source: std::io::Error,
    },
}

const UFFD_API: u64 = 0xaa;
const UFFDIO: u64 = 0xaa;

const fn iowr(nr: u64, size: usize) -> u64 {
    (3 << 30) | ((size as u64) << 16) | (UFFDIO << 8) | nr
}
const fn ior(nr: u64, size: usize) -> u64 {
    (2 << 30) | ((size as u64) << 16) | (UFFDIO << 8) | nr
}

#[repr(C)]
#[derive(Default)]
struct Api {
    api: u64,
    features: u64,
    ioctls: u64,
}
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct Range {
    start: u64,
    len: u64,
}
#[repr(C)]
#[derive(Default)]
struct Register {
    range: Range,
    mode: u64,
    ioctls: u64,
}
#[repr(C)]
#[derive(Default)]
struct Copy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}
#[repr(C)]
#[derive(Default)]
struct ZeroPage {
    range: Range,
    mode: u64,
    zeropage: i64,
}
#[repr(C)]
#[derive(Default)]
struct WriteProtect {
    range: Range,
    mode: u64,
}

const UFFDIO_API: u64 = iowr(0x3f, size_of::<Api>());
const UFFDIO_REGISTER: u64 = iowr(0x00, size_of::<Register>());
const UFFDIO_UNREGISTER: u64 = ior(0x01, size_of::<Range>());
const UFFDIO_WAKE: u64 = ior(0x02, size_of::<Range>());
const UFFDIO_COPY: u64 = iowr(0x03, size_of::<Copy>());
const UFFDIO_ZEROPAGE: u64 = iowr(0x04, size_of::<ZeroPage>());
const UFFDIO_WRITEPROTECT: u64 = iowr(0x06, size_of::<WriteProtect>());
/// /dev/userfaultfd's one ioctl: a new userfaultfd, as the system call would make.
const USERFAULTFD_IOC_NEW: u64 = UFFDIO << 8;

const REGISTER_MODE_MISSING: u64 = 1;
const REGISTER_MODE_WP: u64 = 2;
const COPY_MODE_DONTWAKE: u64 = 1;
const ZEROPAGE_MODE_DONTWAKE: u64 = 1;
const WP_MODE_WP: u64 = 1;

/// Write-protect faults are reported with a flag.
const FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
/// MADV_DONTNEED / MADV_REMOVE on a registered range is reported.
const FEATURE_EVENT_REMOVE: u64 = 1 << 3;

const EVENT_PAGEFAULT: u8 = 0x12;
const EVENT_REMOVE: u8 = 0x15;
const PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
const PAGEFAULT_FLAG_WP: u64 = 1 << 1;

/// One message read from a userfaultfd (struct uffd_msg, 32 bytes).
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct RawMsg {
    event: u8,
    _reserved1: u8,
    _reserved2: u16,
    _reserved3: u32,
    arg: [u64; 3],
}

/// What a userfaultfd reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A thread touched a missing page (`write`: it was a write) and waits.
    Missing {
        /// the faulting address, page-aligned
        addr: u64,
        /// whether the access was a write
        write: bool,
    },
    /// A thread wrote to a write-protected page and waits.
    WriteProtect {
        /// the faulting address, page-aligned
        addr: u64,
    },
    /// [start, end) was dropped by MADV_DONTNEED or MADV_REMOVE; it reads as zero from now on.
    Remove {
        /// first byte
        start: u64,
        /// one past the last byte
        end: u64,
    },
    /// An event the pager did not ask for (ignored).
    Other(u8),
}

/// Which kinds of fault a range is registered for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Modes {
    /// Report touches of missing pages.
    pub missing: bool,
    /// Report writes to write-protected pages.
    pub write_protect: bool,
}

/// The outcome of resolving a fault by copy or zero-page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolved {
    /// The page is in place.
    Done,
    /// Something already mapped the page (another fault for it was served first): wake the
    /// waiters and carry on.
    Exists,
    /// The address space is changing (an unread remove event): read events, then retry.
    Again,
}

/// A userfaultfd, non-blocking, with the features the pager needs.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    write_protect: bool,
}

fn last_error() -> std::io::Error {
    std::io::Error::last_os_error()
}

impl Uffd {
    /// A userfaultfd that reports missing faults, write-protect faults (where the kernel has
    /// them) and remove events; faults from kernel mode (KVM's own accesses to guest RAM)
    /// included, which is why it needs privilege.
    pub fn new() -> Result<Uffd, UffdError> {
        let fd = Self::open()?;
        let mut api = Api {
            api: UFFD_API,
            features: FEATURE_PAGEFAULT_FLAG_WP | FEATURE_EVENT_REMOVE,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes one `Api`, which lives for the call.
        if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, &raw mut api) } != 0 {
            let e = last_error();
            // An older kernel refuses the WP flag feature: ask again without it.
            let fd = Self::open()?;
            let mut api = Api {
                api: UFFD_API,
                features: FEATURE_EVENT_REMOVE,
                ioctls: 0,
            };
            // SAFETY: as above.
            if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, &raw mut api) } != 0 {
                return Err(UffdError::Ioctl {
                    op: "API handshake",
                    source: e,
                });
            }
            return Ok(Uffd {
                fd,
                write_protect: false,
            });
        }
        Ok(Uffd {
            fd,
            write_protect: api.features & FEATURE_PAGEFAULT_FLAG_WP != 0,
        })
    }

    fn open() -> Result<OwnedFd, UffdError> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        // /dev/userfaultfd first: access to it is how an unprivileged user may be allowed
        // kernel-mode faults; the system call then needs CAP_SYS_PTRACE or the sysctl.
        let dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/userfaultfd");
        if let Ok(dev) = dev {
            // SAFETY: USERFAULTFD_IOC_NEW takes its flags by value and returns a new fd.
            let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW, flags) };
            if fd >= 0 {
                // SAFETY: the kernel just gave us this fd; nothing else owns it.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
        // SAFETY: the system call takes flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        if fd < 0 {
            let e = last_error();
            return Err(match e.raw_os_error() {
                Some(libc::ENOSYS) => UffdError::Unsupported(e),
                _ => UffdError::Permission(e),
            });
        }
        let fd = RawFd::try_from(fd).map_err(|_| UffdError::Unsupported(last_error()))?;
        // SAFETY: as above.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// A userfaultfd made by another process (a VMM that hands its guest RAM's userfaultfd to
    /// a page server over SCM_RIGHTS): its features were agreed by its maker, so write-protect
    /// is not assumed. The fd is made non-blocking, as every reader here expects.
    pub fn from_fd(fd: OwnedFd) -> Result<Uffd, UffdError> {
        // SAFETY: F_GETFL/F_SETFL on an fd we own; no memory is passed.
        let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
        let set = if flags < 0 {
            -1
        } else {
            // SAFETY: as above.
            unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) }
        };
        if set < 0 {
            return Err(UffdError::Ioctl {
                op: "fcntl O_NONBLOCK",
                source: last_error(),
            });
        }
        Ok(Uffd {
            fd,
            write_protect: false,
        })
    }

    /// Whether write-protect faults are available.
    pub fn has_write_protect(&self) -> bool {
        self.write_protect
    }

    fn ioctl<T>(&self, op: &'static str, req: u64, arg: &mut T) -> Result<(), UffdError> {
        // SAFETY: every caller passes the struct `req` is defined with, live for the call.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), req, std::ptr::from_mut(arg)) } == 0 {
            Ok(())
        } else {
            Err(UffdError::Ioctl {
                op,
                source: last_error(),
            })
        }
    }

    /// Registers [start, start+len) (page-aligned, inside a private anonymous mapping).
    pub fn register(&self, start: u64, len: u64, modes: Modes) -> Result<(), UffdError> {
        if modes.write_protect && !self.write_protect {
            return Err(UffdError::Feature("write-protect faults"));
        }
        let mut reg = Register {
            range: Range { start, len },
            mode: if modes.missing {
                REGISTER_MODE_MISSING
            } else {
                0
            } | if modes.write_protect {
                REGISTER_MODE_WP
            } else {
                0
            },
            ioctls: 0,
        };
        self.ioctl("register", UFFDIO_REGISTER, &mut reg)
    }

    /// Unregisters a range; threads waiting on faults in it are woken and retry without us.
    pub fn unregister(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut r = Range { start, len };
        self.ioctl("unregister", UFFDIO_UNREGISTER, &mut r)
    }

    /// Wakes threads waiting on faults in [start, start+len).
    pub fn wake(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut r = Range { start, len };
        self.ioctl("wake", UFFDIO_WAKE, &mut r)
    }

    fn resolved(op: &'static str, r: Result<(), UffdError>) -> Result<Resolved, UffdError> {
        match r {
            Ok(()) => Ok(Resolved::Done),
            Err(UffdError::Ioctl { source, .. }) if source.raw_os_error() == Some(libc::EEXIST) => {
                Ok(Resolved::Exists)
            }
            Err(UffdError::Ioctl { source, .. }) if source.raw_os_error() == Some(libc::EAGAIN) => {
                Ok(Resolved::Again)
            }
            Err(UffdError::Ioctl { source, .. }) => Err(UffdError::Ioctl { op, source }),
            Err(e) => Err(e),
        }
    }

    /// Maps a copy of `src` (one page) at `dst` and wakes its waiters (unless `wake` is
    /// false). The kernel's partial-copy count is never trusted: one page either lands or not.
    pub fn copy(&self, dst: u64, src: &[u8; 4096], wake: bool) -> Result<Resolved, UffdError> {
        let mut c = Copy {
            dst,
            src: src.as_ptr() as u64,
            len: 4096,
            mode: if wake { 0 } else { COPY_MODE_DONTWAKE },
            copy: 0,
        };
        Self::resolved("copy", self.ioctl("copy", UFFDIO_COPY, &mut c))
    }

    /// Maps the shared zero page at `dst` and wakes its waiters (unless `wake` is false).
    pub fn zeropage(&self, dst: u64, wake: bool) -> Result<Resolved, UffdError> {
        let mut z = ZeroPage {
            range: Range {
                start: dst,
                len: 4096,
            },
            mode: if wake { 0 } else { ZEROPAGE_MODE_DONTWAKE },
            zeropage: 0,
        };
        Self::resolved(
            "zero-page",
            self.ioctl("zero-page", UFFDIO_ZEROPAGE, &mut z),
        )
    }

    /// Write-protects [start, start+len) (`protect`), or lifts the protection and wakes
    /// writers waiting on it. When this returns `Done`, no thread can write a protected page
    /// until the protection is lifted: the kernel has flushed the TLBs and KVM's mappings.
    /// `Again` means an unread remove event holds the address space: read it, then retry.
    pub fn write_protect(
        &self,
        start: u64,
        len: u64,
        protect: bool,
    ) -> Result<Resolved, UffdError> {
        let mut w = WriteProtect {
            range: Range { start, len },
            mode: if protect { WP_MODE_WP } else { 0 },
        };
        Self::resolved(
            "write-protect",
            self.ioctl("write-protect", UFFDIO_WRITEPROTECT, &mut w),
        )
    }

    /// Reads up to `out.len()` messages without blocking; returns how many.
    pub fn read(&self, out: &mut [Event]) -> Result<usize, UffdError> {
        let mut raw = [RawMsg::default(); 16];
        let want = raw.len().min(out.len());
        // SAFETY: reads whole messages into `raw`, which holds `want` of them.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                raw.as_mut_ptr().cast(),
                want * size_of::<RawMsg>(),
            )
        };
        let Ok(n) = usize::try_from(n) else {
            let e = last_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN | libc::EINTR) => Ok(0),
                _ => Err(UffdError::Ioctl {
                    op: "read",
                    source: e,
                }),
            };
        };
        let count = n / size_of::<RawMsg>();
        for (o, m) in out.iter_mut().zip(&raw[..count]) {
            *o = match m.event {
                EVENT_PAGEFAULT => {
                    let (flags, addr) = (m.arg[0], m.arg[1] & !4095);
                    if flags & PAGEFAULT_FLAG_WP != 0 {
                        Event::WriteProtect { addr }
                    } else {
                        Event::Missing {
                            addr,
                            write: flags & PAGEFAULT_FLAG_WRITE != 0,
                        }
                    }
                }
                EVENT_REMOVE => Event::Remove {
                    start: m.arg[0],
                    end: m.arg[1],
                },
                other => Event::Other(other),
            };
        }
        Ok(count)
    }

    /// The fd, for poll and for handing to a page server.
    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.fd.as_fd()
    }

    /// The fd, for poll.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
