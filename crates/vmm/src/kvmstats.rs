//! KVM's own counters of a vCPU: exits and the page faults KVM took for the guest.
//!
//! A memory engine's cost to a guest is more than its faults: each time the host changes a
//! mapping of guest RAM (write protection, `MADV_DONTNEED`, KSM's merge), KVM drops its own
//! translations of that range and the guest exits to KVM on its next touch of each page.
//! These counters show that cost where it is paid. They come from the vCPU's binary
//! statistics file (`KVM_GET_STATS_FD`, Linux 5.14), read by name from the descriptors the
//! kernel publishes, so nothing here depends on their order. kvm-ioctls 0.25 has no call for
//! that file, hence the ioctl here.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

use kvm_bindings::{kvm_stats_desc, kvm_stats_header};
use kvm_ioctls::VcpuFd;

/// `KVM_GET_STATS_FD`: `_IO(KVMIO, 0xce)`.
const KVM_GET_STATS_FD: libc::c_ulong = 0xAE << 8 | 0xce;

/// Why a vCPU's statistics could not be read.
#[derive(Debug, thiserror::Error)]
pub enum KvmStatsError {
    /// The kernel has no statistics file (before Linux 5.14) or refused it.
    #[error("KVM_GET_STATS_FD failed (Linux 5.14 or later has it)")]
    Open(#[source] std::io::Error),
    /// Reading the file failed.
    #[error("reading KVM's statistics file")]
    Read(#[source] std::io::Error),
    /// The file's header or descriptors do not describe a file of its size.
    #[error("KVM's statistics file is malformed: {0}")]
    Malformed(&'static str),
}

/// The counters summed over vCPUs: what KVM did for the guest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KvmCounters {
    /// Exits from the guest to KVM, for any reason.
    pub exits: u64,
    /// Page faults KVM handled (its translation of a guest page was missing or stale).
    pub pf_taken: u64,
    /// Of those, fixed by installing a translation.
    pub pf_fixed: u64,
    /// Faults KVM passed on to the guest's own kernel.
    pub pf_guest: u64,
}

impl std::ops::AddAssign for KvmCounters {
    fn add_assign(&mut self, o: KvmCounters) {
        self.exits += o.exits;
        self.pf_taken += o.pf_taken;
        self.pf_fixed += o.pf_fixed;
        self.pf_guest += o.pf_guest;
    }
}

impl KvmCounters {
    /// What happened since `earlier`, a reading of the same vCPUs (counters only grow).
    pub fn since(self, earlier: KvmCounters) -> KvmCounters {
        KvmCounters {
            exits: self.exits.saturating_sub(earlier.exits),
            pf_taken: self.pf_taken.saturating_sub(earlier.pf_taken),
            pf_fixed: self.pf_fixed.saturating_sub(earlier.pf_fixed),
            pf_guest: self.pf_guest.saturating_sub(earlier.pf_guest),
        }
    }
}

/// One vCPU's statistics file, with where each counter of [`KvmCounters`] lies in it.
#[derive(Debug)]
pub struct VcpuStats {
    file: File,
    /// File offsets of exits, pf_taken, pf_fixed and pf_guest (None: this kernel lacks it).
    at: [Option<u64>; 4],
}

const NAMES: [&str; 4] = ["exits", "pf_taken", "pf_fixed", "pf_guest"];

impl VcpuStats {
    /// Opens `vcpu`'s statistics file. It stays readable after the vCPU's fd is closed (it
    /// holds the VM), so a run's counters can be read once the run is over.
    pub fn open(vcpu: &VcpuFd) -> Result<VcpuStats, KvmStatsError> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new fd or -1.
        let fd = unsafe { libc::ioctl(vcpu.as_raw_fd(), KVM_GET_STATS_FD) };
        if fd < 0 {
            return Err(KvmStatsError::Open(std::io::Error::last_os_error()));
        }
        // SAFETY: the ioctl returned a new fd that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        let at = Self::layout(&file)?;
        Ok(VcpuStats { file, at })
    }

    /// Finds the counters of [`NAMES`] among the file's descriptors.
    fn layout(file: &File) -> Result<[Option<u64>; 4], KvmStatsError> {
        let mut h = [0u8; size_of::<kvm_stats_header>()];
        file.read_exact_at(&mut h, 0).map_err(KvmStatsError::Read)?;
        let word = |b: &[u8], i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        // struct kvm_stats_header: flags, name_size, num_desc, id_offset, desc_offset,
        // data_offset, all u32.
        let (name_size, num_desc) = (word(&h, 4) as usize, word(&h, 8) as usize);
        let (desc_offset, data_offset) = (u64::from(word(&h, 16)), u64::from(word(&h, 20)));
        // A descriptor is struct kvm_stats_desc (flags u32, exponent i16, size u16, offset u32,
        // bucket_size u32) followed by its name in name_size bytes.
        let desc = size_of::<kvm_stats_desc>() + name_size;
        if name_size == 0 || name_size > 4096 || num_desc > 4096 {
            return Err(KvmStatsError::Malformed("implausible header"));
        }
        let mut all = vec![0u8; desc * num_desc];
        file.read_exact_at(&mut all, desc_offset)
            .map_err(KvmStatsError::Read)?;
        let mut at = [None; 4];
        for d in all.chunks_exact(desc) {
            let name = &d[size_of::<kvm_stats_desc>()..];
            let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
            if let Some(i) = NAMES.iter().position(|n| n.as_bytes() == name) {
                at[i] = Some(data_offset + u64::from(word(d, 8)));
            }
        }
        Ok(at)
    }

    /// The counters now.
    pub fn read(&self) -> Result<KvmCounters, KvmStatsError> {
        let mut v = [0u64; 4];
        for (slot, at) in v.iter_mut().zip(self.at) {
            if let Some(at) = at {
                let mut b = [0u8; 8];
                self.file
                    .read_exact_at(&mut b, at)
                    .map_err(KvmStatsError::Read)?;
                *slot = u64::from_ne_bytes(b);
            }
        }
        Ok(KvmCounters {
            exits: v[0],
            pf_taken: v[1],
            pf_fixed: v[2],
            pf_guest: v[3],
        })
    }
}
