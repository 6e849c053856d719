//! A VM on /dev/kvm: its guest RAM, its vCPU, and the loop that serves the vCPU's exits.

use std::cell::Cell;
use std::io::Write;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::control::{self, Control};
use crate::devices::{IrqLine, PortAction, Ports};
use crate::linux::{self, LinuxBoot, LinuxError};
use crate::loader::{self, LoadError};
use crate::replay::ReplayError;
use crate::state::{self, Capture, DeviceState, VcpuState, VmState};
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
    /// a bad vCPU count
    #[error("a guest-kit VM has 1 to {MAX_VCPUS} vCPUs, not {0}")]
    Vcpus(u8),
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
    /// the Linux kernel could not be set up
    #[error("setting up the Linux boot")]
    Linux(#[from] LinuxError),
    /// KVM would not set an MSR
    #[error("KVM refused to set MSR {0:#x}")]
    Msr(u32),
    /// the console's interrupt could not be wired
    #[error("wiring the serial console's interrupt")]
    SerialIrq(#[source] std::io::Error),
    /// the host ended the run with [`Control::abort`]
    #[error("VM aborted by the host: {0}")]
    Aborted(String),
    /// a memory image could not be set up for the replay guest
    #[error("setting up the replay guest's memory image")]
    Replay(#[from] ReplayError),
    /// [`Control::pause`] with no run under the control (not started, or over)
    #[error("no VM is running under this control")]
    NotRunning,
    /// [`Control::pause`] while an earlier pause has not been resumed
    #[error("the VM is already paused (resume or drop the first pause)")]
    AlreadyPaused,
    /// a pause whose vCPUs did not all park in time; the VM runs on
    #[error(
        "pausing timed out after {waited:?} with {parked} of {vcpus} vCPUs parked; the VM runs on"
    )]
    PauseTimeout {
        /// how long the pause waited
        waited: Duration,
        /// vCPUs that had parked
        parked: usize,
        /// vCPUs in the VM
        vcpus: usize,
    },
    /// the VM ended while it was being paused
    #[error("the VM ended before all its vCPUs paused")]
    PauseEnded,
    /// KVM refused to read or set part of a vCPU's state
    #[error("vCPU {vcpu}: KVM refused {what}")]
    VcpuState {
        /// which vCPU
        vcpu: u64,
        /// what was refused
        what: &'static str,
        /// KVM's error
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM's list of MSRs to save could not be read when the run started
    #[error("cannot save MSRs: KVM's MSR index list could not be read at the start of the run")]
    MsrList(#[source] kvm_ioctls::Error),
    /// KVM read fewer MSRs than it read at the start of the run
    #[error("vCPU {vcpu}: KVM read {read} of the {listed} MSRs it read at the start of the run")]
    MsrsRead {
        /// which vCPU
        vcpu: u64,
        /// MSRs read
        read: usize,
        /// MSRs asked for
        listed: usize,
    },
    /// a saved state for a VM of another RAM size
    #[error("the saved state is of a VM with {saved} bytes of RAM; this VM has {vm}")]
    RestoreRam {
        /// the state's RAM size
        saved: u64,
        /// this VM's
        vm: u64,
    },
    /// a saved state with no vCPUs or too many
    #[error("a saved state has 1 to {MAX_VCPUS} vCPUs, not {0}")]
    RestoreVcpus(usize),
    /// a saved vCPU out of place
    #[error("saved vCPU {index} has id {id}; a state lists vCPUs 0 to N-1 in order")]
    RestoreVcpuId {
        /// its place in the state
        index: usize,
        /// the id it says it has
        id: u64,
    },
    /// a saved CPUID KVM cannot take
    #[error("saved vCPU {vcpu} has {entries} CPUID entries, more than KVM takes")]
    RestoreCpuid {
        /// which vCPU
        vcpu: u64,
        /// how many entries
        entries: usize,
    },
    /// saved MSRs KVM cannot take in one call
    #[error("saved vCPU {vcpu} has {count} MSRs, more than KVM takes")]
    RestoreMsrs {
        /// which vCPU
        vcpu: u64,
        /// how many MSRs
        count: usize,
    },
    /// a saved XSAVE area of a size KVM does not take
    #[error("saved vCPU {vcpu} has an XSAVE area of {saved} bytes; KVM here takes 4096 to {kvm}")]
    RestoreXsave {
        /// which vCPU
        vcpu: u64,
        /// the saved area's size
        saved: usize,
        /// the most KVM takes here
        kvm: usize,
    },
    /// the saved serial port could not be rebuilt
    #[error("restoring the serial port")]
    RestoreSerial(#[source] vm_superio::serial::Error<std::io::Error>),
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
    /// Linux panicked (its console said so) and then reset.
    Panic,
    /// The person at the console typed Ctrl-A x.
    Quit,
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
        // The interrupt controllers and timer live in the kernel (PIC, IOAPIC, LAPICs, PIT),
        // as Linux guests expect; the guest kit runs with interrupts off and never sees them.
        fd.create_irq_chip()
            .map_err(kvm("creating the in-kernel irqchip"))?;
        let pit = kvm_bindings::kvm_pit_config {
            flags: kvm_bindings::KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit)
            .map_err(kvm("creating the in-kernel PIT"))?;
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

    /// Guest RAM's host mapping: its first byte (guest physical 0) and its length in bytes.
    /// The mapping lives as long as this VM; guest physical address `a` is at `start + a`.
    pub fn ram_host_range(&self) -> (*mut u8, usize) {
        let start = self
            .mem
            .get_host_address(GuestAddress(0))
            .expect("guest RAM starts at guest physical 0");
        let len = usize::try_from(self.ram).expect("RAM size checked against usize in Vm::new");
        (start, len)
    }

    /// Guest RAM's size in bytes.
    pub fn ram_size(&self) -> u64 {
        self.ram
    }

    /// Boots a guest-kit image (a static ELF64 executable) in ring 3 on `vcpus` vCPUs (1 to
    /// 16), each on a thread of its own, with the console written to `console`, and runs it
    /// until one vCPU ends the VM; the others are then stopped.
    pub fn run_image<W: Write + Send>(
        &self,
        image: &[u8],
        vcpus: u8,
        console: W,
    ) -> Result<(Exit, W), VmError> {
        self.run_image_with_input(image, vcpus, console, None)
    }

    /// [`Vm::run_image`] with console input read from `input` (see [`Vm::run_linux`]).
    pub fn run_image_with_input<W: Write + Send>(
        &self,
        image: &[u8],
        vcpus: u8,
        console: W,
        input: Option<BorrowedFd<'_>>,
    ) -> Result<(Exit, W), VmError> {
        self.run_image_ctl(image, vcpus, console, input, None)
    }

    /// [`Vm::run_image_with_input`] under the host's `control`: the guest's progress reports
    /// and pacing sleeps go there, and through it the host asks the guest to stop or aborts
    /// the run (then `Err(VmError::Aborted)`). Without one, progress goes nowhere and the
    /// guest is never asked to stop; pacing sleeps still happen.
    pub fn run_image_ctl<W: Write + Send>(
        &self,
        image: &[u8],
        vcpus: u8,
        console: W,
        input: Option<BorrowedFd<'_>>,
        control: Option<&Arc<Control>>,
    ) -> Result<(Exit, W), VmError> {
        check_vcpus(vcpus)?;
        x86::write_tables(&self.mem, self.ram).map_err(VmError::Tables)?;
        let (entry, image_end) = loader::load(&self.mem, self.ram, image)?;
        let cpuid = self.supported_cpuid()?;
        let fds = (0..vcpus)
            .map(|i| {
                let vcpu = self
                    .fd
                    .create_vcpu(u64::from(i))
                    .map_err(kvm("creating a vCPU"))?;
                vcpu.set_cpuid2(&cpuid).map_err(kvm("setting CPUID"))?;
                let mut sregs = vcpu.get_sregs().map_err(kvm("reading special registers"))?;
                x86::ring3_sregs(&mut sregs);
                vcpu.set_sregs(&sregs).map_err(kvm("setting long mode"))?;
                vcpu.set_fpu(&x86::initial_fpu())
                    .map_err(kvm("setting the FPU"))?;
                // With the in-kernel LAPIC, every vCPU but the first waits for INIT and SIPI;
                // the guest kit has no code to send them, so all start runnable at the entry.
                let runnable = kvm_bindings::kvm_mp_state {
                    mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
                };
                vcpu.set_mp_state(runnable)
                    .map_err(kvm("making a vCPU runnable"))?;
                let regs = x86::entry_regs(entry, self.ram, image_end, i, vcpus);
                vcpu.set_regs(&regs).map_err(kvm("setting registers"))?;
                Ok(vcpu)
            })
            .collect::<Result<Vec<VcpuFd>, VmError>>()?;
        self.run_vcpus(fds, console, input, control, None)
    }

    /// Resumes a paused guest-kit VM on this (new) VM: the counterpart of
    /// [`Vm::run_image_ctl`] for a [`VmState`] that [`Control::pause`] captured. Guest RAM is
    /// the caller's: copied in before, or brought in lazily (userfaultfd) while the guest
    /// runs. The state's RAM size must be this VM's and its vCPUs 1 to 16, numbered in
    /// order. The VM-level state (PICs, IOAPIC, PIT, clock) is set first, then each vCPU's
    /// (CPUID, special registers, registers, FPU, XSAVE, XCRs, debug registers, LAPIC, MSRs,
    /// events, MP state), then the devices are rebuilt from theirs, and the vCPUs run as in
    /// a fresh run until one ends the VM. [`Control::first_entry`] says when the first vCPU
    /// entered the guest.
    pub fn restore_image_ctl<W: Write + Send>(
        &self,
        state: &VmState,
        console: W,
        input: Option<BorrowedFd<'_>>,
        control: Option<&Arc<Control>>,
    ) -> Result<(Exit, W), VmError> {
        if state.ram != self.ram {
            return Err(VmError::RestoreRam {
                saved: state.ram,
                vm: self.ram,
            });
        }
        let n = state.vcpus.len();
        if !(1..=usize::from(MAX_VCPUS)).contains(&n) {
            return Err(VmError::RestoreVcpus(n));
        }
        if let Some((index, v)) = state
            .vcpus
            .iter()
            .enumerate()
            .find(|(i, v)| v.id != *i as u64)
        {
            return Err(VmError::RestoreVcpuId { index, id: v.id });
        }
        state::apply_vm(&self.fd, state)?;
        let xsave_words = state::xsave_words(&self.fd);
        let fds = state
            .vcpus
            .iter()
            .map(|v| {
                let vcpu = self.fd.create_vcpu(v.id).map_err(kvm("creating a vCPU"))?;
                state::apply_vcpu(&vcpu, v, xsave_words)?;
                Ok(vcpu)
            })
            .collect::<Result<Vec<VcpuFd>, VmError>>()?;
        self.run_vcpus(fds, console, input, control, Some(&state.devices))
    }

    /// Boots Linux (a bzImage or ELF vmlinux, an initrd, a command line) on `vcpus` vCPUs (1
    /// to 16) with the 64-bit boot protocol and an MP table, and runs it until it resets,
    /// panics or a vCPU fails. The console (16550 on COM1, IRQ 4) is written to `console`;
    /// bytes read from `input`, when given, are typed into it, and Ctrl-A x there ends the VM.
    pub fn run_linux<W: Write + Send>(
        &self,
        boot: &LinuxBoot,
        vcpus: u8,
        console: W,
        input: Option<BorrowedFd<'_>>,
    ) -> Result<(Exit, W), VmError> {
        self.run_linux_ctl(boot, vcpus, console, input, None)
    }

    /// [`Vm::run_linux`] under a host [`Control`] (which can abort it).
    pub fn run_linux_ctl<W: Write + Send>(
        &self,
        boot: &LinuxBoot,
        vcpus: u8,
        console: W,
        input: Option<BorrowedFd<'_>>,
        control: Option<&Arc<Control>>,
    ) -> Result<(Exit, W), VmError> {
        check_vcpus(vcpus)?;
        let loaded = linux::load(&self.mem, self.ram, boot, vcpus)?;
        let base = self.supported_cpuid()?;
        let msrs = linux::msrs();
        let fds = (0..vcpus)
            .map(|i| {
                let vcpu = self
                    .fd
                    .create_vcpu(u64::from(i))
                    .map_err(kvm("creating a vCPU"))?;
                vcpu.set_cpuid2(&linux::cpuid_for(&base, i, vcpus))
                    .map_err(kvm("setting CPUID"))?;
                let set = vcpu.set_msrs(&msrs).map_err(kvm("setting MSRs"))?;
                if let Some(refused) = msrs.as_slice().get(set) {
                    return Err(VmError::Msr(refused.index));
                }
                let lapic = vcpu.get_lapic().map_err(kvm("reading the LAPIC"))?;
                vcpu.set_lapic(&linux::lapic(lapic))
                    .map_err(kvm("setting the LAPIC"))?;
                vcpu.set_fpu(&x86::initial_fpu())
                    .map_err(kvm("setting the FPU"))?;
                // The others wait in the in-kernel LAPIC for the boot CPU's INIT and SIPI.
                if i == 0 {
                    let mut sregs = vcpu.get_sregs().map_err(kvm("reading special registers"))?;
                    linux::sregs(&mut sregs);
                    vcpu.set_sregs(&sregs).map_err(kvm("setting long mode"))?;
                    vcpu.set_regs(&linux::regs(loaded))
                        .map_err(kvm("setting registers"))?;
                }
                Ok(vcpu)
            })
            .collect::<Result<Vec<VcpuFd>, VmError>>()?;
        self.run_vcpus(fds, console, input, control, None)
    }

    /// The CPUID KVM can give a guest on this host.
    fn supported_cpuid(&self) -> Result<kvm_bindings::CpuId, VmError> {
        self.kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm("reporting supported CPUID"))
    }

    /// Runs `fds`, each on a thread, until one ends the VM (or `control` aborts it), then
    /// stops the rest. `devices` is a restored VM's saved device state; without it the
    /// devices start fresh.
    fn run_vcpus<W: Write + Send>(
        &self,
        fds: Vec<VcpuFd>,
        console: W,
        input: Option<BorrowedFd<'_>>,
        control: Option<&Arc<Control>>,
        devices: Option<&DeviceState>,
    ) -> Result<(Exit, W), VmError> {
        register_kick_signal();
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::SerialIrq)?;
        self.fd
            .register_irqfd(&irq, SERIAL_IRQ)
            .map_err(kvm("wiring the serial IRQ"))?;
        let result = self.run_wired(fds, console, input, control, devices, &irq);
        // The VM is over; a failure to unwire is harmless (the VM's fd closes with it).
        let _ = self.fd.unregister_irqfd(&irq, SERIAL_IRQ);
        result
    }

    /// [`Vm::run_vcpus`] once the serial interrupt is wired to `irq`.
    fn run_wired<W: Write + Send>(
        &self,
        fds: Vec<VcpuFd>,
        console: W,
        input: Option<BorrowedFd<'_>>,
        control: Option<&Arc<Control>>,
        devices: Option<&DeviceState>,
        irq: &EventFd,
    ) -> Result<(Exit, W), VmError> {
        let line = IrqLine::new(Some(irq.try_clone().map_err(VmError::SerialIrq)?));
        let (ports, started) = match devices {
            None => (Ports::new(console, line), Instant::now()),
            Some(d) => {
                let ports = Ports::from_state(console, line, d).map_err(VmError::RestoreSerial)?;
                // The clock port goes on from where the paused run's was.
                let now = Instant::now();
                let started = now
                    .checked_sub(Duration::from_micros(d.clock_us))
                    .unwrap_or(now);
                (ports, started)
            }
        };
        let ports = Mutex::new(ports);
        let capture = match fds.first() {
            Some(vcpu) => Capture::probe(&self.kvm, &self.fd, vcpu),
            None => return Err(VmError::Vcpus(0)),
        };
        let stop = Arc::new(Stop::new(fds.len()));
        let control = control.map_or_else(|| Arc::new(Control::new()), Arc::clone);
        for vcpu in &fds {
            // Counters only: a kernel without the file runs the guest all the same.
            if let Ok(st) = crate::kvmstats::VcpuStats::open(vcpu) {
                control.add_kvm_stats(st);
            }
        }
        control.attach(&stop);
        let run = Run {
            stop: &stop,
            control: &control,
            started,
            vm: &self.fd,
            ram: self.ram,
            capture: &capture,
        };
        std::thread::scope(|s| {
            if let Some(fd) = input {
                let (ports, stop) = (&ports, &*stop);
                s.spawn(move || forward_input(fd, ports, stop));
            }
            for (i, mut vcpu) in fds.into_iter().enumerate() {
                let (ports, run) = (&ports, &run);
                s.spawn(move || {
                    run.control.add_vcpu_thread();
                    run.stop.enter(i);
                    let id = i as u64;
                    let ended = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        run_vcpu(&mut vcpu, id, ports, run)
                    }))
                    .unwrap_or_else(|_| {
                        Some(Err(VmError::Guest {
                            what: "the vCPU thread panicked".into(),
                            vcpu: id,
                            regs: String::new(),
                        }))
                    });
                    run.stop.leave(i, ended);
                });
            }
            stop.kick_until_all_left();
        });
        control.detach();
        let exit = stop.outcome()?;
        let ports = ports
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let exit = match exit {
            Exit::Reset if ports.panicked() => Exit::Panic,
            e => e,
        };
        Ok((exit, ports.take_console()))
    }
}

/// Locks `m` even if a vCPU thread panicked while holding it: the state it guards (console,
/// thread list, outcome) stays meaningful, and the panic is reported as the VM's error.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The most vCPUs a VM has: the kit's stacks are 64 KiB each in the top MiB of RAM.
pub const MAX_VCPUS: u8 = 16;

fn check_vcpus(vcpus: u8) -> Result<(), VmError> {
    if (1..=MAX_VCPUS).contains(&vcpus) {
        Ok(())
    } else {
        Err(VmError::Vcpus(vcpus))
    }
}

/// COM1's ISA interrupt.
const SERIAL_IRQ: u32 = 4;

/// Typed bytes held for a guest that is not reading its console; beyond it new bytes are
/// dropped, as a real UART overruns, but input is still read, so Ctrl-A x always works.
const INPUT_BACKLOG: usize = 4096;

/// Types what `fd` gives into the console, until the VM stops or `fd` ends. Ctrl-A x ends
/// the VM (as in QEMU); Ctrl-A Ctrl-A types one Ctrl-A.
fn forward_input<W: Write>(fd: BorrowedFd<'_>, ports: &Mutex<Ports<W>>, stop: &Stop) {
    const CTRL_A: u8 = 1;
    let mut escaped = false;
    let mut open = true;
    let mut pending = std::collections::VecDeque::with_capacity(INPUT_BACKLOG);
    let mut buf = [0u8; 256];
    while !stop.stopping() && (open || !pending.is_empty()) {
        // Into the UART's FIFO, as much as it takes.
        if !pending.is_empty() {
            let n = lock(ports).input(pending.as_slices().0);
            pending.drain(..n);
        }
        if !open {
            std::thread::sleep(std::time::Duration::from_millis(5));
            continue;
        }
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // A short wait while bytes wait for the guest, a longer one otherwise; either way the
        // thread sees the VM stop.
        let wait = if pending.is_empty() { 50 } else { 5 };
        // SAFETY: one valid pollfd, for the length given.
        if unsafe { libc::poll(&raw mut pfd, 1, wait) } <= 0 {
            continue;
        }
        // SAFETY: reads into `buf`, which is writable for its whole length.
        let got = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        let Ok(got @ 1..) = usize::try_from(got) else {
            open = false; // end of input, or an error: what is queued still goes in
            continue;
        };
        for &b in &buf[..got] {
            let typed = match (escaped, b) {
                (false, CTRL_A) => {
                    escaped = true;
                    continue;
                }
                (true, b'x') => {
                    stop.end(Ok(Exit::Quit));
                    return;
                }
                (true, _) => {
                    escaped = false;
                    b
                }
                (false, _) => b,
            };
            if pending.len() < INPUT_BACKLOG {
                pending.push_back(typed);
            }
        }
    }
}

thread_local! {
    /// This thread's vCPU's `kvm_run.immediate_exit` byte, while the thread runs the vCPU
    /// (null otherwise): the kick signal's handler sets it.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

/// The kick's handler: it sets the interrupted thread's `immediate_exit`, as KVM's API
/// advises, so that a kick landing just before KVM_RUN still makes it return at once
/// (EINTR) rather than being lost.
extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    set_immediate_exit(1);
}

/// Sets this thread's vCPU's `immediate_exit` (nothing if the thread runs no vCPU).
fn set_immediate_exit(value: u8) {
    // A const-initialised thread-local without a destructor: reading it allocates nothing and
    // cannot fail, so it is safe in a signal handler.
    let Ok(p) = IMMEDIATE_EXIT.try_with(Cell::get) else {
        return;
    };
    if !p.is_null() {
        // SAFETY: `p` points at the `immediate_exit` byte of this thread's vCPU's kvm_run
        // page, mapped for as long as the vCPU's fd lives; `ImmediateExit` clears the pointer
        // before that fd can go. Only this thread (and its signal handler) writes the byte
        // from user space, always atomically; the kernel reads it at KVM_RUN's start.
        unsafe { AtomicU8::from_ptr(p) }.store(value, Ordering::SeqCst);
    }
}

/// Publishes a vCPU's `immediate_exit` byte to this thread's kick handler while it lives.
struct ImmediateExit;

impl ImmediateExit {
    fn arm(vcpu: &mut VcpuFd) -> ImmediateExit {
        let p = &raw mut vcpu.get_kvm_run().immediate_exit;
        IMMEDIATE_EXIT.set(p);
        ImmediateExit
    }
}

impl Drop for ImmediateExit {
    fn drop(&mut self) {
        IMMEDIATE_EXIT.set(std::ptr::null_mut());
    }
}

/// The signal that interrupts a vCPU thread's KVM_RUN: a real-time one, which the C runtime
/// does not use, with a handler that only sets the thread's `immediate_exit` (the
/// interrupted ioctl returns EINTR).
fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

fn register_kick_signal() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
            .expect("a real-time signal can take a handler");
    });
}

/// How the vCPU threads of one run agree to stop: the first to end the VM records how, and
/// the others are kicked out of KVM_RUN (and out of pacing sleeps) until they have all left.
/// It also pauses them: see [`Stop::pause`].
pub(crate) struct Stop {
    /// Each vCPU thread's state; only a running one is ever signalled (never one that may
    /// have exited).
    threads: Mutex<Vec<Thread>>,
    ended: Mutex<Option<Result<Exit, VmError>>>,
    flag: AtomicBool,
    changed: Condvar,
    /// Pacing sleeps wait here, so that stopping or pausing the VM wakes them.
    sleepers: Mutex<()>,
    woken: Condvar,
    /// Set while a pause is asked for: each vCPU completes its pending I/O, captures its
    /// state and parks.
    pausing: AtomicBool,
    park: Mutex<Park>,
    /// Parked vCPUs wait here to be resumed, the pausing thread for them to park.
    parked: Condvar,
}

/// One pause's books, under [`Stop::park`].
#[derive(Debug)]
struct Park {
    /// A pause is asked for and not resumed or given up.
    requested: bool,
    /// The number of the latest pause; vCPUs parked for pause `e` go on once `resumed >= e`.
    epoch: u64,
    resumed: u64,
    /// Which vCPUs have parked for this pause, and how many.
    is_parked: Vec<bool>,
    parked: usize,
    /// Each parked vCPU's captured state, until the last to park gathers them.
    states: Vec<Option<Result<VcpuState, VmError>>>,
    /// The whole state, once the last vCPU has parked and captured the VM's.
    done: Option<Result<VmState, VmError>>,
    /// When the latest pause was asked for.
    asked: Option<Instant>,
}

impl std::fmt::Debug for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stop")
            .field("stopping", &self.stopping())
            .field("pausing", &self.pausing())
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Thread {
    Starting,
    Running(libc::pthread_t),
    Left,
}

impl Stop {
    fn new(n: usize) -> Self {
        Stop {
            threads: Mutex::new(vec![Thread::Starting; n]),
            ended: Mutex::new(None),
            flag: AtomicBool::new(false),
            changed: Condvar::new(),
            sleepers: Mutex::new(()),
            woken: Condvar::new(),
            pausing: AtomicBool::new(false),
            park: Mutex::new(Park {
                requested: false,
                epoch: 0,
                resumed: 0,
                is_parked: vec![false; n],
                parked: 0,
                states: (0..n).map(|_| None).collect(),
                done: None,
                asked: None,
            }),
            parked: Condvar::new(),
        }
    }

    fn stopping(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    fn pausing(&self) -> bool {
        self.pausing.load(Ordering::SeqCst)
    }

    fn enter(&self, i: usize) {
        // SAFETY: pthread_self has no preconditions.
        lock(&self.threads)[i] = Thread::Running(unsafe { libc::pthread_self() });
    }

    /// Ends the VM from outside the vCPUs (the console's Ctrl-A x, [`Control::abort`]),
    /// unless it has ended.
    pub(crate) fn end(&self, how: Result<Exit, VmError>) {
        {
            let mut slot = lock(&self.ended);
            if slot.is_none() {
                *slot = Some(how);
            }
        }
        {
            let _threads = lock(&self.threads);
            self.flag.store(true, Ordering::SeqCst);
            self.changed.notify_all();
        }
        self.wake_sleepers();
    }

    /// Wakes the vCPUs in a pacing sleep or parked, and a thread waiting for them to park,
    /// once the stop or pause flag is set: each checks the flags under its lock, so taking
    /// the locks here means none can miss the news.
    fn wake_sleepers(&self) {
        drop(lock(&self.sleepers));
        self.woken.notify_all();
        drop(lock(&self.park));
        self.parked.notify_all();
    }

    /// Sleeps `d`, or less if the VM stops or is paused meanwhile; returns what is left of
    /// it (zero when it is over or the VM stops).
    fn sleep(&self, d: Duration) -> Duration {
        let deadline = Instant::now() + d;
        let mut guard = lock(&self.sleepers);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.stopping() {
                return Duration::ZERO;
            }
            if self.pausing() {
                return left;
            }
            guard = self
                .woken
                .wait_timeout(guard, left)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    /// Called by a vCPU thread as it leaves: `ended` is how it ended the VM, or None when it
    /// was stopped because another vCPU ended it.
    fn leave(&self, i: usize, ended: Option<Result<Exit, VmError>>) {
        if let Some(e) = ended {
            let mut slot = lock(&self.ended);
            if slot.is_none() {
                *slot = Some(e);
            }
        }
        {
            let mut threads = lock(&self.threads);
            threads[i] = Thread::Left;
            self.flag.store(true, Ordering::SeqCst);
            self.changed.notify_all();
        }
        self.wake_sleepers();
    }

    /// Signals each running vCPU thread for which `want` holds.
    fn kick(&self, threads: &[Thread], want: impl Fn(usize) -> bool) {
        for (i, t) in threads.iter().enumerate() {
            if let Thread::Running(t) = t
                && want(i)
            {
                // SAFETY: the thread is alive: it marks itself Left, under the lock that the
                // caller holds, before it exits; the signal has a handler, which only sets
                // the thread's immediate_exit, so it interrupts nothing but KVM_RUN.
                unsafe { libc::pthread_kill(*t, kick_signal()) };
            }
        }
    }

    /// Waits for the first vCPU to end the VM, then signals the others until all have left.
    fn kick_until_all_left(&self) {
        let mut threads = lock(&self.threads);
        while threads.iter().any(|t| *t != Thread::Left) {
            if !self.stopping() {
                threads = self
                    .changed
                    .wait(threads)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                continue;
            }
            self.kick(&threads, |_| true);
            // A thread between its checks and KVM_RUN returns at once (its immediate_exit
            // is set); one busy elsewhere (a port write, a sleep) sees the flag when done.
            // Kick again after a moment all the same.
            threads = self
                .changed
                .wait_timeout(threads, Duration::from_millis(1))
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    fn outcome(&self) -> Result<Exit, VmError> {
        lock(&self.ended).take().unwrap_or(Ok(Exit::Halt))
    }

    /// Pauses the VM: every vCPU leaves KVM_RUN (kicked, or woken from a pacing sleep),
    /// completes the I/O it exited for (one KVM_RUN with immediate_exit set), captures its
    /// own state and parks; the last to park captures the VM's and the devices'. Returns the
    /// whole state once all have parked, and the pause's number for [`Stop::resume`]. On a
    /// timeout, a failed capture or the VM's end the pause is given up (the vCPUs go on) and
    /// the error returned.
    pub(crate) fn pause(&self, timeout: Duration) -> Result<(VmState, u64), VmError> {
        let t0 = Instant::now();
        let deadline = t0 + timeout;
        let n = {
            let mut p = lock(&self.park);
            if p.requested {
                return Err(VmError::AlreadyPaused);
            }
            if self.stopping() {
                return Err(VmError::NotRunning);
            }
            p.requested = true;
            p.epoch += 1;
            p.parked = 0;
            p.done = None;
            p.asked = Some(t0);
            p.is_parked.fill(false);
            p.states.iter_mut().for_each(|v| *v = None);
            self.pausing.store(true, Ordering::SeqCst);
            p.is_parked.len()
        };
        self.wake_sleepers();
        let mut seen = vec![false; n];
        loop {
            self.kick(&lock(&self.threads), |i| !seen[i]);
            let mut p = lock(&self.park);
            // Wait for the vCPUs; kick the missing ones again every millisecond.
            let until = deadline.min(Instant::now() + Duration::from_millis(1));
            while p.done.is_none() && !self.stopping() {
                let Some(left) = until.checked_duration_since(Instant::now()) else {
                    break;
                };
                p = self
                    .parked
                    .wait_timeout(p, left)
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .0;
            }
            if let Some(done) = p.done.take() {
                if done.is_err() {
                    self.give_up(&mut p);
                }
                return done.map(|s| (s, p.epoch));
            }
            if self.stopping() {
                self.give_up(&mut p);
                return Err(VmError::PauseEnded);
            }
            if Instant::now() >= deadline {
                let parked = p.parked;
                self.give_up(&mut p);
                return Err(VmError::PauseTimeout {
                    waited: t0.elapsed(),
                    parked,
                    vcpus: n,
                });
            }
            seen.copy_from_slice(&p.is_parked);
        }
    }

    /// Ends pause `epoch`, if it is still in force: the parked vCPUs go on.
    pub(crate) fn resume(&self, epoch: u64) {
        let mut p = lock(&self.park);
        if p.requested && p.epoch == epoch {
            self.give_up(&mut p);
        }
    }

    fn give_up(&self, p: &mut Park) {
        if p.requested {
            p.requested = false;
            p.resumed = p.epoch;
            p.done = None;
            p.states.iter_mut().for_each(|v| *v = None);
        }
        self.pausing.store(false, Ordering::SeqCst);
        self.parked.notify_all();
    }

    /// A vCPU thread parks for the pause asked for, with its captured state; `vm` captures
    /// the VM's state (called by the last vCPU to park). Returns once the pause is resumed or
    /// given up, or the VM stops, with the time the pause was asked for (None if the vCPU
    /// did not park: no pause in force).
    fn park_vcpu(
        &self,
        i: usize,
        state: Result<VcpuState, VmError>,
        vm: impl FnOnce(Vec<VcpuState>) -> Result<VmState, VmError>,
    ) -> Option<Instant> {
        let mut p = lock(&self.park);
        if !p.requested || p.is_parked[i] {
            return None;
        }
        let (epoch, asked) = (p.epoch, p.asked);
        p.states[i] = Some(state);
        p.is_parked[i] = true;
        p.parked += 1;
        if p.parked == p.is_parked.len() {
            // The last to park: gather the vCPUs' states and capture the VM's, outside the
            // lock (that takes the devices' lock).
            let vcpus: Result<Vec<VcpuState>, VmError> = p
                .states
                .iter_mut()
                .map(|v| v.take().unwrap_or(Err(VmError::PauseEnded)))
                .collect();
            drop(p);
            let done = vcpus.and_then(vm);
            p = lock(&self.park);
            if p.requested && p.epoch == epoch {
                p.done = Some(done);
                self.parked.notify_all();
            }
        }
        while p.resumed < epoch && !self.stopping() {
            p = self
                .parked
                .wait(p)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        asked
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

/// What the vCPU threads of one run share besides the devices.
struct Run<'a> {
    stop: &'a Stop,
    control: &'a Control,
    /// When the run started: the clock port counts from here.
    started: Instant,
    /// The VM, for the VM-level state a pause captures.
    vm: &'a VmFd,
    /// Guest RAM's size, for the captured state.
    ram: u64,
    /// What to capture of each vCPU.
    capture: &'a Capture,
}

/// A pacing sleep under way: what the guest asked for, what is left, what it took so far.
struct Pacing {
    asked: Duration,
    left: Duration,
    slept: Duration,
}

/// Runs one vCPU until it ends the VM (`Some`) or is stopped because another did (`None`).
///
/// A pause is served here, between KVM_RUNs: once it is asked for, the next KVM_RUN runs with
/// `immediate_exit` set, so KVM completes the I/O the vCPU last exited for (the instruction
/// is only finished by the next KVM_RUN) and returns EINTR without running the guest; after
/// an EINTR, and only then, the vCPU's state is whole, and the thread captures it and parks.
fn run_vcpu<W: Write>(
    vcpu: &mut VcpuFd,
    id: u64,
    ports: &Mutex<Ports<W>>,
    run: &Run<'_>,
) -> Option<Result<Exit, VmError>> {
    let _kick = ImmediateExit::arm(vcpu);
    let lock_ports = || lock(ports);
    let mut pacing: Option<Pacing> = None;
    run.control.entering();
    loop {
        if run.stop.stopping() {
            return None;
        }
        if let Some(p) = pacing.as_mut()
            && !run.stop.pausing()
        {
            let t = Instant::now();
            p.left = run.stop.sleep(p.left);
            p.slept += t.elapsed();
            if p.left.is_zero() {
                run.control.count_sleep(p.asked, p.slept);
                pacing = None;
            }
            continue;
        }
        if run.stop.pausing() {
            set_immediate_exit(1);
        }
        let what = match vcpu.run() {
            Err(e) if e.errno() == libc::EINTR => {
                set_immediate_exit(0);
                if run.stop.pausing() {
                    park(vcpu, id, ports, run);
                }
                continue;
            }
            Err(e) if e.errno() == libc::EAGAIN => continue,
            Err(e) => return Some(Err(VmError::Kvm("running a vCPU", e))),
            // The control ports are served here, without the devices' lock: a pacing sleep
            // must not hold up the other vCPUs' console or exit.
            Ok(VcpuExit::IoOut(control::PACE_PORT, data)) => {
                let d = control::pace(data);
                if !d.is_zero() {
                    pacing = Some(Pacing {
                        asked: d,
                        left: d,
                        slept: Duration::ZERO,
                    });
                }
                continue;
            }
            Ok(VcpuExit::IoOut(control::PROGRESS_PORT, data)) => {
                run.control.report(data);
                continue;
            }
            Ok(VcpuExit::IoIn(control::STOP_PORT, data)) => {
                control::port_answer(data, u32::from(run.control.stop_requested()));
                continue;
            }
            Ok(VcpuExit::IoIn(control::CLOCK_PORT, data)) => {
                control::port_answer(data, control::clock(run.started.elapsed()));
                continue;
            }
            Ok(VcpuExit::IoOut(port, data)) => match lock_ports().write(port, data) {
                PortAction::None => continue,
                PortAction::Exit(status) => return Some(Ok(Exit::Status(status))),
                PortAction::Reset => return Some(Ok(Exit::Reset)),
            },
            Ok(VcpuExit::IoIn(port, data)) => {
                lock_ports().read(port, data);
                continue;
            }
            // No MMIO device yet: writes go nowhere, reads float high.
            Ok(VcpuExit::MmioWrite(..)) => continue,
            Ok(VcpuExit::MmioRead(_, data)) => {
                data.fill(0xff);
                continue;
            }
            Ok(VcpuExit::Hlt) => return Some(Ok(Exit::Halt)),
            Ok(VcpuExit::Shutdown) => "triple fault (KVM_EXIT_SHUTDOWN)".to_string(),
            Ok(VcpuExit::InternalError) => {
                "KVM internal error (an instruction KVM could not emulate?)".to_string()
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                format!("VM entry failed: hardware reason {reason:#x} on host CPU {cpu}")
            }
            Ok(other) => format!("unexpected exit {other:?}"),
        };
        return Some(Err(VmError::Guest {
            what,
            vcpu: id,
            regs: regs(vcpu),
        }));
    }
}

/// Captures this vCPU's state (its last KVM_RUN returned EINTR, so it is whole) and parks the
/// thread until the pause is over; the last vCPU to park also captures the VM's state.
fn park<W: Write>(vcpu: &VcpuFd, id: u64, ports: &Mutex<Ports<W>>, run: &Run<'_>) {
    let state = state::capture_vcpu(vcpu, id, run.capture);
    let i = usize::try_from(id).expect("a vCPU index");
    let asked = run.stop.park_vcpu(i, state, |vcpus| {
        let (irqchip, pit, clock) = state::capture_vm(run.vm)?;
        let mut devices = lock(ports).state();
        devices.clock_us = u64::try_from(run.started.elapsed().as_micros()).unwrap_or(u64::MAX);
        Ok(VmState {
            ram: run.ram,
            vcpus,
            irqchip,
            pit,
            clock,
            devices,
        })
    });
    if let Some(asked) = asked {
        run.control.count_park(asked.elapsed());
    }
}
