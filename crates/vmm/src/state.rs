//! A paused VM's state: everything besides guest RAM that a guest-kit VM needs to go on
//! running on a fresh VM, and its versioned byte format.
//!
//! [`crate::Control::pause`] captures a [`VmState`]; [`crate::Vm::restore_image_ctl`] applies
//! one to a new VM whose guest RAM the caller has filled (or will fill lazily). Per vCPU: the
//! registers, special registers, FPU, LAPIC, MP state, pending events, XCRs, debug registers,
//! XSAVE area, the MSRs KVM lists as saveable, and the CPUID it was given. Per VM: the PICs and
//! the IOAPIC, the PIT, the KVM clock, and the port devices (the 16550 UART, the CMOS index,
//! the console's panic watcher, the clock port's time).
//!
//! The byte format ([`VmState::to_bytes`], [`VmState::from_bytes`]), all integers little
//! endian:
//!
//! | offset | size | what |
//! |--------|------|------|
//! | 0 | 8 | magic `b"MVSTATE\0"` |
//! | 8 | 4 | version, 1 ([`STATE_VERSION`]) |
//! | 12 | 8 | body length in bytes |
//! | 20 | 8 | XXH3-64 of the body |
//! | 28 | length | the body: the `VmState` in postcard |
//!
//! Any bytes may be handed to `from_bytes`: it checks the header, the length and the checksum
//! before it decodes, and decoding itself only fails, never panics. A decoded state is still
//! the file's word, not KVM's: restoring checks its sizes and counts, and KVM refuses what it
//! cannot take.

use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES, Msrs,
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state,
    kvm_mp_state, kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use crate::vm::VmError;

/// The first 8 bytes of a VM state.
pub const STATE_MAGIC: [u8; 8] = *b"MVSTATE\0";
/// The byte format this build writes, and the only one it reads.
pub const STATE_VERSION: u32 = 1;
/// Magic, version, length and checksum.
const HEADER_LEN: usize = 8 + 4 + 8 + 8;

/// Why bytes are not a VM state this build can read.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// the bytes do not start with [`STATE_MAGIC`]
    #[error("not a memvisor VM state: it starts with {found:02x?}, not \"MVSTATE\\0\"")]
    BadMagic {
        /// the first bytes found (up to 8)
        found: Vec<u8>,
    },
    /// a version this build does not read
    #[error("unsupported VM state version {0} (this build reads version {STATE_VERSION})")]
    Version(u32),
    /// fewer bytes than the header or its length field says
    #[error("VM state truncated: {needed} bytes needed, {got} present")]
    Truncated {
        /// bytes the header (or its length field) needs
        needed: u64,
        /// bytes given
        got: u64,
    },
    /// more bytes than the length field says
    #[error("VM state has {0} bytes of garbage after its body")]
    Trailing(u64),
    /// the body is not what was written
    #[error(
        "VM state checksum mismatch: the header says {expected:#018x}, the body hashes to {actual:#018x}"
    )]
    Checksum {
        /// the header's XXH3-64
        expected: u64,
        /// the body's
        actual: u64,
    },
    /// the body is not a postcard-encoded state
    #[error("decoding the VM state's body")]
    Decode(#[source] postcard::Error),
    /// the body decoded but left bytes over
    #[error("the VM state's body has {0} bytes left over after decoding")]
    Leftover(usize),
}

/// A paused VM: all of its state but guest RAM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    /// Guest RAM in bytes (the VM to restore into must have the same).
    pub ram: u64,
    /// Each vCPU, in index order (vCPU `i` has id `i`).
    pub vcpus: Vec<VcpuState>,
    /// The PICs and the IOAPIC.
    pub irqchip: Irqchip,
    /// The in-kernel PIT.
    pub pit: kvm_pit_state2,
    /// The KVM clock (kvmclock's time base).
    pub clock: kvm_clock_data,
    /// The port devices.
    pub devices: DeviceState,
}

/// One vCPU's state. What KVM would not give at capture is `None` and is not set on restore;
/// what was captured is always set, or the restore fails.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VcpuState {
    /// The vCPU's id (its index).
    pub id: u64,
    /// The CPUID it was given (KVM_GET_CPUID2).
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER, APIC base.
    pub sregs: kvm_sregs,
    /// The x87/SSE state (superseded by `xsave` where that was captured).
    pub fpu: Option<Fpu>,
    /// The local APIC's registers.
    pub lapic: kvm_lapic_state,
    /// Runnable, halted, waiting for INIT/SIPI...
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts, NMIs, SMM, interrupt shadow.
    pub events: Option<kvm_vcpu_events>,
    /// Extended control registers (XCR0).
    pub xcrs: Option<kvm_xcrs>,
    /// Debug registers.
    pub debugregs: Option<kvm_debugregs>,
    /// The XSAVE area as KVM gives it: 4 KiB, or more where KVM_CAP_XSAVE2 says so.
    pub xsave: Option<Vec<u32>>,
    /// Every MSR in KVM's index list that KVM would read on this host.
    pub msrs: Vec<kvm_msr_entry>,
}

impl VcpuState {
    /// The parts KVM would not give at capture (and a restore will not set).
    pub fn missing(&self) -> Vec<&'static str> {
        let mut m = Vec::new();
        for (absent, name) in [
            (self.fpu.is_none(), "fpu"),
            (self.events.is_none(), "vcpu_events"),
            (self.xcrs.is_none(), "xcrs"),
            (self.debugregs.is_none(), "debugregs"),
            (self.xsave.is_none(), "xsave"),
        ] {
            if absent {
                m.push(name);
            }
        }
        m
    }
}

/// `kvm_fpu` (which kvm-bindings does not serialize), field by field.
#[allow(missing_docs)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fpu {
    pub fpr: [[u8; 16]; 8],
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: [[u8; 16]; 16],
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for Fpu {
    fn from(f: &kvm_fpu) -> Self {
        Fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&Fpu> for kvm_fpu {
    fn from(f: &Fpu) -> Self {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// The in-kernel interrupt controllers (KVM_GET_IRQCHIP of each chip).
#[derive(Clone, Copy, Serialize, Deserialize)]
pub struct Irqchip {
    /// The master 8259 PIC.
    pub pic_master: kvm_irqchip,
    /// The slave 8259 PIC.
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC.
    pub ioapic: kvm_irqchip,
}

impl std::fmt::Debug for Irqchip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Irqchip")
            .field(
                "chips",
                &[
                    self.pic_master.chip_id,
                    self.pic_slave.chip_id,
                    self.ioapic.chip_id,
                ],
            )
            .finish_non_exhaustive()
    }
}

/// The port devices' state (`devices.rs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    /// The 16550 UART on COM1.
    pub serial: SerialState,
    /// The CMOS index register.
    pub cmos_index: u8,
    /// How much of Linux's panic line the console has matched so far.
    pub console_matched: u32,
    /// Whether the console has shown a Linux panic.
    pub console_panicked: bool,
    /// The clock port's time when captured: microseconds since the run started. A restored
    /// run's clock goes on from here, so a guest's time differences stay small.
    pub clock_us: u64,
}

/// vm-superio's `SerialState`, which has no serde of its own.
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    /// Received bytes the guest has not read yet (at most the FIFO's 64).
    pub in_buffer: Vec<u8>,
}

impl From<vm_superio::serial::SerialState> for SerialState {
    fn from(s: vm_superio::serial::SerialState) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialState> for vm_superio::serial::SerialState {
    fn from(s: &SerialState) -> Self {
        vm_superio::serial::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

impl VmState {
    /// The state in the versioned byte format (header, then the postcard body).
    pub fn to_bytes(&self) -> Vec<u8> {
        let body = postcard::to_stdvec(self).expect("a VmState always serializes");
        let mut out = Vec::with_capacity(HEADER_LEN + body.len());
        out.extend_from_slice(&STATE_MAGIC);
        out.extend_from_slice(&STATE_VERSION.to_le_bytes());
        out.extend_from_slice(&(body.len() as u64).to_le_bytes());
        out.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(&body).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Reads a state written by [`VmState::to_bytes`]. Any bytes may come in; what is not
    /// such a state is an error, never a panic.
    pub fn from_bytes(bytes: &[u8]) -> Result<VmState, StateError> {
        let magic_seen = &bytes[..bytes.len().min(8)];
        if magic_seen != &STATE_MAGIC[..magic_seen.len()] {
            return Err(StateError::BadMagic {
                found: magic_seen.to_vec(),
            });
        }
        let Some(header) = bytes.get(..HEADER_LEN) else {
            return Err(StateError::Truncated {
                needed: HEADER_LEN as u64,
                got: bytes.len() as u64,
            });
        };
        let word = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().expect("8"));
        let version = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
        if version != STATE_VERSION {
            return Err(StateError::Version(version));
        }
        let (len, sum) = (word(12), word(20));
        let body = &bytes[HEADER_LEN..];
        let got = body.len() as u64;
        if got < len {
            return Err(StateError::Truncated {
                needed: (HEADER_LEN as u64).saturating_add(len),
                got: bytes.len() as u64,
            });
        }
        if got > len {
            return Err(StateError::Trailing(got - len));
        }
        let actual = xxhash_rust::xxh3::xxh3_64(body);
        if actual != sum {
            return Err(StateError::Checksum {
                expected: sum,
                actual,
            });
        }
        let (state, rest) = postcard::take_from_bytes(body).map_err(StateError::Decode)?;
        if !rest.is_empty() {
            return Err(StateError::Leftover(rest.len()));
        }
        Ok(state)
    }
}

/// What a run learns once, at its start, so that capturing state while paused is quick: the
/// MSRs to save and the size of the XSAVE area.
#[derive(Debug)]
pub(crate) struct Capture {
    /// The MSRs in KVM's index list that KVM reads on this host, or why there is no list.
    msrs: Result<Vec<u32>, kvm_ioctls::Error>,
    /// The XSAVE area's size in 32-bit words: 1024 (4 KiB) unless KVM_CAP_XSAVE2 says more.
    xsave_words: usize,
}

impl Capture {
    /// Probes KVM (through a vCPU of the run, before it runs).
    pub(crate) fn probe(kvm: &Kvm, vm: &VmFd, vcpu: &VcpuFd) -> Capture {
        Capture {
            msrs: saveable_msrs(kvm, vcpu),
            xsave_words: xsave_words(vm),
        }
    }
}

/// The XSAVE area's size in 32-bit words.
pub(crate) fn xsave_words(vm: &VmFd) -> usize {
    let bytes = usize::try_from(vm.check_extension_int(Cap::Xsave2)).unwrap_or(0);
    bytes.max(size_of::<kvm_xsave>()).div_ceil(4)
}

/// KVM's MSR index list, less the MSRs KVM_GET_MSRS will not read here (it stops at the first
/// it refuses: drop that one and ask again).
fn saveable_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>, kvm_ioctls::Error> {
    let mut list = kvm.get_msr_index_list()?.as_slice().to_vec();
    while !list.is_empty() {
        let mut msrs = msr_entries(&list)?;
        let read = vcpu.get_msrs(&mut msrs)?;
        if read >= list.len() {
            break;
        }
        list.remove(read);
    }
    Ok(list)
}

fn msr_entries(indices: &[u32]) -> Result<Msrs, kvm_ioctls::Error> {
    let entries: Vec<kvm_msr_entry> = indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    Msrs::from_entries(&entries).map_err(|_| kvm_ioctls::Error::new(libc::E2BIG))
}

/// Captures one vCPU's state. It must not be in KVM_RUN, and its last KVM_RUN must have
/// returned EINTR (so any I/O it exited for is complete).
pub(crate) fn capture_vcpu(vcpu: &VcpuFd, id: u64, cap: &Capture) -> Result<VcpuState, VmError> {
    let err = |what: &'static str| {
        move |source| VmError::VcpuState {
            vcpu: id,
            what,
            source,
        }
    };
    let indices = cap.msrs.as_ref().map_err(|e| VmError::MsrList(*e))?;
    let mut msrs = msr_entries(indices).map_err(err("reading MSRs"))?;
    let read = vcpu.get_msrs(&mut msrs).map_err(err("reading MSRs"))?;
    if read != indices.len() {
        return Err(VmError::MsrsRead {
            vcpu: id,
            read,
            listed: indices.len(),
        });
    }
    Ok(VcpuState {
        id,
        cpuid: vcpu
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(err("reading CPUID"))?
            .as_slice()
            .to_vec(),
        regs: vcpu.get_regs().map_err(err("reading registers"))?,
        sregs: vcpu.get_sregs().map_err(err("reading special registers"))?,
        fpu: vcpu.get_fpu().ok().as_ref().map(Fpu::from),
        lapic: vcpu.get_lapic().map_err(err("reading the LAPIC"))?,
        mp_state: vcpu.get_mp_state().map_err(err("reading the MP state"))?,
        events: vcpu.get_vcpu_events().ok(),
        xcrs: vcpu.get_xcrs().ok(),
        debugregs: vcpu.get_debug_regs().ok(),
        xsave: get_xsave(vcpu, cap.xsave_words),
        msrs: msrs.as_slice().to_vec(),
    })
}

/// The XSAVE area, if KVM gives it.
fn get_xsave(vcpu: &VcpuFd, words: usize) -> Option<Vec<u32>> {
    if words <= 1024 {
        let x = vcpu.get_xsave().ok()?;
        return Some(x.region.to_vec());
    }
    let mut x = kvm_bindings::Xsave::new(words - 1024).ok()?;
    // SAFETY: `x` holds `words` 32-bit words, the size KVM_CAP_XSAVE2 gave for this VM, so
    // KVM writes inside it; no XSTATE feature is enabled after that size was read.
    unsafe { vcpu.get_xsave2(&mut x) }.ok()?;
    let mut region = x.as_fam_struct_ref().xsave.region.to_vec();
    region.extend_from_slice(x.as_slice());
    Some(region)
}

/// Applies a saved vCPU state to a new vCPU, in the order KVM needs: CPUID first, special
/// registers before registers, LAPIC before MSRs, events, and the MP state last.
pub(crate) fn apply_vcpu(vcpu: &VcpuFd, s: &VcpuState, xsave_words: usize) -> Result<(), VmError> {
    let id = s.id;
    let err = |what: &'static str| {
        move |source| VmError::VcpuState {
            vcpu: id,
            what,
            source,
        }
    };
    let cpuid = kvm_bindings::CpuId::from_entries(&s.cpuid).map_err(|_| VmError::RestoreCpuid {
        vcpu: id,
        entries: s.cpuid.len(),
    })?;
    vcpu.set_cpuid2(&cpuid).map_err(err("setting CPUID"))?;
    vcpu.set_sregs(&s.sregs)
        .map_err(err("setting special registers"))?;
    vcpu.set_regs(&s.regs).map_err(err("setting registers"))?;
    if let Some(fpu) = &s.fpu {
        vcpu.set_fpu(&fpu.into()).map_err(err("setting the FPU"))?;
    }
    if let Some(xsave) = &s.xsave {
        set_xsave(vcpu, id, xsave, xsave_words)?;
    }
    if let Some(xcrs) = &s.xcrs {
        vcpu.set_xcrs(xcrs).map_err(err("setting the XCRs"))?;
    }
    if let Some(d) = &s.debugregs {
        vcpu.set_debug_regs(d)
            .map_err(err("setting the debug registers"))?;
    }
    vcpu.set_lapic(&s.lapic).map_err(err("setting the LAPIC"))?;
    let msrs = Msrs::from_entries(&s.msrs).map_err(|_| VmError::RestoreMsrs {
        vcpu: id,
        count: s.msrs.len(),
    })?;
    let set = vcpu.set_msrs(&msrs).map_err(err("setting MSRs"))?;
    if let Some(refused) = s.msrs.get(set) {
        return Err(VmError::Msr(refused.index));
    }
    if let Some(e) = &s.events {
        vcpu.set_vcpu_events(e)
            .map_err(err("setting pending events"))?;
    }
    vcpu.set_mp_state(s.mp_state)
        .map_err(err("setting the MP state"))
}

fn set_xsave(vcpu: &VcpuFd, id: u64, saved: &[u32], words: usize) -> Result<(), VmError> {
    if saved.len() < 1024 || saved.len() > words {
        return Err(VmError::RestoreXsave {
            vcpu: id,
            saved: saved.len() * 4,
            kvm: words * 4,
        });
    }
    let mut x = kvm_bindings::Xsave::new(words - 1024).map_err(|_| VmError::RestoreXsave {
        vcpu: id,
        saved: saved.len() * 4,
        kvm: words * 4,
    })?;
    let (fixed, extra) = saved.split_at(1024);
    // SAFETY: only the fixed 4 KiB region is written; the length field, which the wrapper's
    // safety rests on, is left as `Xsave::new` set it.
    unsafe { x.as_mut_fam_struct() }
        .xsave
        .region
        .copy_from_slice(fixed);
    x.as_mut_slice()[..extra.len()].copy_from_slice(extra);
    // SAFETY: `x` holds `words` 32-bit words, at least the size KVM_CAP_XSAVE2 gave for this
    // VM (and at least the 4 KiB of the legacy call), so KVM reads only inside it.
    unsafe { vcpu.set_xsave2(&x) }.map_err(|source| VmError::VcpuState {
        vcpu: id,
        what: "setting the XSAVE area",
        source,
    })
}

/// The VM-level state: the interrupt controllers, the PIT and the clock.
pub(crate) fn capture_vm(fd: &VmFd) -> Result<(Irqchip, kvm_pit_state2, kvm_clock_data), VmError> {
    let chip = |chip_id| {
        let mut c = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        fd.get_irqchip(&mut c)
            .map(|()| c)
            .map_err(|e| VmError::Kvm("reading the interrupt controllers", e))
    };
    let irqchip = Irqchip {
        pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
    };
    let pit = fd
        .get_pit2()
        .map_err(|e| VmError::Kvm("reading the PIT", e))?;
    let clock = fd
        .get_clock()
        .map_err(|e| VmError::Kvm("reading the KVM clock", e))?;
    Ok((irqchip, pit, clock))
}

/// Applies the VM-level state to a new VM, before its vCPUs run.
pub(crate) fn apply_vm(fd: &VmFd, s: &VmState) -> Result<(), VmError> {
    let set_chip = |c: &kvm_irqchip, want: u32| {
        // A saved chip says which it is; a hostile file must not move one onto another.
        let mut c = *c;
        c.chip_id = want;
        fd.set_irqchip(&c)
            .map_err(|e| VmError::Kvm("setting the interrupt controllers", e))
    };
    set_chip(&s.irqchip.pic_master, KVM_IRQCHIP_PIC_MASTER)?;
    set_chip(&s.irqchip.pic_slave, KVM_IRQCHIP_PIC_SLAVE)?;
    set_chip(&s.irqchip.ioapic, KVM_IRQCHIP_IOAPIC)?;
    fd.set_pit2(&s.pit)
        .map_err(|e| VmError::Kvm("setting the PIT", e))?;
    // The clock's value only: the flags say how it was read (TSC-stable, with a realtime
    // stamp), which setting it back must not take as a request.
    let clock = kvm_clock_data {
        clock: s.clock.clock,
        ..Default::default()
    };
    fd.set_clock(&clock)
        .map_err(|e| VmError::Kvm("setting the KVM clock", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VmState {
        let vcpu = |id: u64| VcpuState {
            id,
            cpuid: vec![
                kvm_cpuid_entry2 {
                    function: 1,
                    eax: 0x806f8,
                    ..Default::default()
                };
                3
            ],
            regs: kvm_regs {
                rip: 0x20_1234 + id,
                rsp: 0xffe0,
                rflags: 0x3002,
                ..Default::default()
            },
            sregs: kvm_sregs {
                cr0: 0x8001_0033,
                efer: 0x500,
                ..Default::default()
            },
            fpu: Some(Fpu::from(&kvm_fpu {
                fcw: 0x37f,
                mxcsr: 0x1f80,
                ..Default::default()
            })),
            lapic: kvm_lapic_state { regs: [3; 1024] },
            mp_state: kvm_mp_state { mp_state: 0 },
            events: Some(kvm_vcpu_events::default()),
            xcrs: None,
            debugregs: Some(kvm_debugregs::default()),
            xsave: Some((0..1024).collect()),
            msrs: vec![
                kvm_msr_entry {
                    index: 0x10,
                    data: 12345,
                    ..Default::default()
                };
                5
            ],
        };
        let chip = |chip_id| kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        VmState {
            ram: 64 << 20,
            vcpus: vec![vcpu(0), vcpu(1)],
            irqchip: Irqchip {
                pic_master: chip(0),
                pic_slave: chip(1),
                ioapic: chip(2),
            },
            pit: kvm_pit_state2::default(),
            clock: kvm_clock_data {
                clock: 987_654_321,
                ..Default::default()
            },
            devices: DeviceState {
                serial: vm_superio::serial::SerialState::default().into(),
                cmos_index: 7,
                console_matched: 3,
                console_panicked: false,
                clock_us: 1_000_000,
            },
        }
    }

    #[test]
    fn state_round_trips_through_bytes() {
        let s = sample();
        let bytes = s.to_bytes();
        assert_eq!(&bytes[..8], b"MVSTATE\0");
        assert_eq!(bytes[8..12], 1u32.to_le_bytes());
        let back = VmState::from_bytes(&bytes).unwrap();
        assert_eq!(back.to_bytes(), bytes);
        assert_eq!(back.vcpus[1].regs.rip, 0x20_1235);
        assert_eq!(back.vcpus[0].lapic.regs[1023], 3);
        assert_eq!(back.vcpus[0].missing(), ["xcrs"]);
        assert_eq!(back.devices, s.devices);
    }

    #[test]
    fn hostile_bytes_are_errors_never_panics() {
        let bytes = sample().to_bytes();
        // Every truncation.
        for n in 0..bytes.len() {
            let e = VmState::from_bytes(&bytes[..n]).unwrap_err();
            assert!(matches!(e, StateError::Truncated { .. }), "{n}: {e}");
        }
        // Bit flips: every bit of the header, and one bit in each of many body bytes; the
        // header's fields or the checksum catch each one.
        let flips = (0..HEADER_LEN * 8).chain((HEADER_LEN * 8..bytes.len() * 8).step_by(61));
        for bit in flips {
            let mut b = bytes.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            assert!(VmState::from_bytes(&b).is_err(), "bit {bit}");
        }
        // Trailing garbage, a future version, another file.
        let mut b = bytes.clone();
        b.push(0);
        assert!(matches!(
            VmState::from_bytes(&b),
            Err(StateError::Trailing(1))
        ));
        let mut b = bytes.clone();
        b[8..12].copy_from_slice(&2u32.to_le_bytes());
        let e = VmState::from_bytes(&b).unwrap_err();
        assert!(
            e.to_string()
                .contains("version 2 (this build reads version 1)"),
            "{e}"
        );
        let e = VmState::from_bytes(b"\x7fELF\x02\x01\x01\0rest").unwrap_err();
        assert!(matches!(e, StateError::BadMagic { .. }), "{e}");
        // A length field beyond any real size.
        let mut b = bytes.clone();
        b[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            VmState::from_bytes(&b),
            Err(StateError::Truncated { .. })
        ));
        // Garbage bodies with a right checksum reach the decoder: errors, not panics.
        let mut seed = 0x1234_5678_9abc_def0u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for len in [0usize, 1, 7, 64, 300, 5000] {
            for round in 0u8..50 {
                let mut body: Vec<u8> = (0..len).map(|_| next().to_le_bytes()[0]).collect();
                if round % 2 == 1 {
                    // Take a real body and corrupt a few bytes.
                    body = bytes[HEADER_LEN..].to_vec();
                    for _ in 0..3 {
                        let at = usize::try_from(next() % body.len() as u64).unwrap();
                        body[at] = body[at].wrapping_add(1 + round);
                    }
                }
                let mut b = bytes[..8].to_vec();
                b.extend_from_slice(&1u32.to_le_bytes());
                b.extend_from_slice(&(body.len() as u64).to_le_bytes());
                b.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(&body).to_le_bytes());
                b.extend_from_slice(&body);
                // Either an error or a state that serializes again: never a panic.
                if let Ok(s) = VmState::from_bytes(&b) {
                    let _ = s.to_bytes();
                }
            }
        }
    }
}
