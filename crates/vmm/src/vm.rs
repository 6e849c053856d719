//! A VM on /dev/kvm: its guest RAM, its vCPU, and the loop that serves the vCPU's exits.

use std::io::Write;

use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::devices::{PortAction, Ports};
use crate::loader::{self, LoadError};
use crate::x86;

/// Why a VM could not be made or run.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm could not be opened
    #[error("cannot open /dev/kvm (is KVM loaded, and may this user open it?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// a KVM ioctl failed
    #[error("KVM refused {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// a bad RAM size
    #[error("guest RAM must be a whole number of 4 KiB pages from 2 MiB to 4 GiB, not {0} bytes")]
    RamSize(u64),
    /// guest RAM could not be mapped
    #[error("cannot map {0} bytes of guest RAM")]
    Map(u64, #[source] vm_memory::mmap::FromRangesError),
    /// the boot structures could not be written
    #[error("writing the boot page tables and GDT")]
    Tables(#[source] vm_memory::GuestMemoryError),
    /// the guest image could not be loaded
    #[error("loading the guest image")]
    Load(#[from] LoadError),
    /// the guest stopped in a way that is not an exit
    #[error("guest stopped: {what} (vCPU {vcpu}; {regs})")]
    Guest {
        /// what happened
        what: String,
        /// which vCPU
        vcpu: u64,
        /// its registers, for the person reading the error
        regs: String,
    },
}

/// How a guest ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// It wrote this status to the exit port.
    Status(u8),
    /// It asked for a reset (i8042 0xfe).
    Reset,
    /// It halted with nothing to wake it.
    Halt,
}

/// A VM: guest RAM mapped into KVM, ready to boot an image.
#[derive(Debug)]
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    mem: GuestMemoryMmap,
    ram: u64,
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |e| VmError::Kvm(what, e)
}

impl Vm {
    /// A VM with `ram` bytes of anonymous guest RAM at guest physical address 0.
    pub fn new(ram: u64) -> Result<Vm, VmError> {
        if !(2 << 20..=x86::MAX_RAM).contains(&ram) || !ram.is_multiple_of(4096) {
            return Err(VmError::RamSize(ram));
        }
        let kvm_sys = Kvm::new().map_err(VmError::OpenKvm)?;
        let fd = kvm_sys.create_vm().map_err(kvm("creating a VM"))?;
        let len = usize::try_from(ram).map_err(|_| VmError::RamSize(ram))?;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), len)])
            .map_err(|e| VmError::Map(ram, e))?;
        for (slot, region) in mem.iter().enumerate() {
            let host = mem
                .get_host_address(region.start_addr())
                .map_err(VmError::Tables)?;
            let region = kvm_userspace_memory_region {
                slot: u32::try_from(slot).expect("one region"),
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region describes memory that `mem` maps and keeps mapped for as long
            // as this VM (which owns `mem`) lives; KVM only reads and writes inside it.
            unsafe { fd.set_user_memory_region(region) }.map_err(kvm("registering guest RAM"))?;
        }
        Ok(Vm {
            kvm: kvm_sys,
            fd,
            mem,
            ram,
        })
    }

    /// Guest RAM, for the layers that manage it (the pager, snapshots).
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Boots a guest-kit image (a static ELF64 executable) in ring 3 on one vCPU, with its
    /// console written to `console`, and runs it until it exits.
    pub fn run_image<W: Write + Send>(
        &self,
        image: &[u8],
        console: W,
    ) -> Result<(Exit, W), VmError> {
        x86::write_tables(&self.mem, self.ram).map_err(VmError::Tables)?;
        let (entry, image_end) = loader::load(&self.mem, self.ram, image)?;
        let mut vcpu = self.fd.create_vcpu(0).map_err(kvm("creating vCPU 0"))?;
        let cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm("reporting supported CPUID"))?;
        vcpu.set_cpuid2(&cpuid).map_err(kvm("setting CPUID"))?;
        let mut sregs = vcpu.get_sregs().map_err(kvm("reading special registers"))?;
        x86::ring3_sregs(&mut sregs);
        vcpu.set_sregs(&sregs).map_err(kvm("setting long mode"))?;
        vcpu.set_fpu(&x86::initial_fpu())
            .map_err(kvm("setting the FPU"))?;
        vcpu.set_regs(&x86::entry_regs(entry, self.ram, image_end))
            .map_err(kvm("setting registers"))?;
        let mut ports = Ports::new(console);
        // Each vCPU runs on a thread of its own.
        let exit = std::thread::scope(|s| s.spawn(|| run_vcpu(&mut vcpu, 0, &mut ports)).join())
            .unwrap_or_else(|_| {
                Err(VmError::Guest {
                    what: "the vCPU thread panicked".into(),
                    vcpu: 0,
                    regs: String::new(),
                })
            })?;
        Ok((exit, ports.into_console()))
    }
}

impl<W: Write> Ports<W> {
    fn into_console(self) -> W {
        self.take_console()
    }
}

fn regs(vcpu: &VcpuFd) -> String {
    match (vcpu.get_regs(), vcpu.get_sregs()) {
        (Ok(r), Ok(s)) => format!(
            "rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} \
             cs={:#x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
            r.rip,
            r.rsp,
            r.rflags,
            r.rax,
            r.rbx,
            r.rcx,
            r.rdx,
            s.cs.selector,
            s.cr0,
            s.cr2,
            s.cr3,
            s.cr4,
            s.efer
        ),
        (Err(e), _) | (_, Err(e)) => format!("registers unreadable: {e}"),
    }
}

fn run_vcpu<W: Write>(vcpu: &mut VcpuFd, id: u64, ports: &mut Ports<W>) -> Result<Exit, VmError> {
    loop {
        let what = match vcpu.run() {
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => return Err(VmError::Kvm("running a vCPU", e)),
            Ok(VcpuExit::IoOut(port, data)) => match ports.write(port, data) {
                PortAction::None => continue,
                PortAction::Exit(status) => return Ok(Exit::Status(status)),
                PortAction::Reset => return Ok(Exit::Reset),
            },
            Ok(VcpuExit::IoIn(port, data)) => {
                ports.read(port, data);
                continue;
            }
            // No MMIO device yet: writes go nowhere, reads float high.
            Ok(VcpuExit::MmioWrite(..)) => continue,
            Ok(VcpuExit::MmioRead(_, data)) => {
                data.fill(0xff);
                continue;
            }
            Ok(VcpuExit::Hlt) => return Ok(Exit::Halt),
            Ok(VcpuExit::Shutdown) => "triple fault (KVM_EXIT_SHUTDOWN)".to_string(),
            Ok(VcpuExit::InternalError) => {
                "KVM internal error (an instruction KVM could not emulate?)".to_string()
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                format!("VM entry failed: hardware reason {reason:#x} on host CPU {cpu}")
            }
            Ok(other) => format!("unexpected exit {other:?}"),
        };
        return Err(VmError::Guest {
            what,
            vcpu: id,
            regs: regs(vcpu),
        });
    }
}
