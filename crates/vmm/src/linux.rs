//! The Linux boot path: a bzImage or an ELF vmlinux started at its 64-bit entry point with
//! the x86 64-bit boot protocol (Documentation/arch/x86/boot.rst), with an MP table for SMP.
//!
//! The kernel and its setup header are loaded by linux-loader; the rest of the boot state
//! (boot_params with the e820 map, command line and initrd, the GDT, identity page tables,
//! the MP table, per-vCPU CPUID, MSRs and LAPIC) is written here. What the guest RAM looks
//! like when the kernel starts:
//!
//! | address          | what                                        |
//! |------------------|---------------------------------------------|
//! | 0x0500           | GDT: code 0x10, data 0x18, TSS 0x20         |
//! | 0x7000           | boot_params ("zero page")                   |
//! | 0x8ff0           | boot stack (grows down)                     |
//! | 0x9000..0xf000   | identity page tables, 2 MiB pages           |
//! | 0x2_0000         | command line                                |
//! | 0x9_fc00         | MP floating pointer and table (reserved)    |
//! | 0x10_0000        | bzImage's protected-mode kernel (or vmlinux at its own addresses) |
//! | top of RAM       | initrd, page-aligned                        |

use std::fs::File;
use std::path::Path;

use kvm_bindings::{CpuId, Msrs, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{BzImage, Cmdline, Elf, KernelLoader, load_cmdline};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::x86;

/// Why a Linux kernel could not be set up to boot.
#[derive(Debug, thiserror::Error)]
pub enum LinuxError {
    /// a file could not be read
    #[error("cannot read {path}")]
    Read {
        /// the file
        path: String,
        /// why
        #[source]
        source: std::io::Error,
    },
    /// linux-loader refused the kernel
    #[error("{path} is not a kernel this VMM boots (an x86-64 bzImage or ELF vmlinux)")]
    Kernel {
        /// the file
        path: String,
        /// linux-loader's reason
        #[source]
        source: linux_loader::loader::Error,
    },
    /// a bzImage without the 64-bit entry point
    #[error("{0} has no 64-bit entry point (boot protocol 2.12+ with XLF_KERNEL_64 is needed)")]
    Not64(String),
    /// the command line is not one Linux takes
    #[error("kernel command line: {0}")]
    Cmdline(String),
    /// the initrd does not fit
    #[error(
        "the initrd ({size} bytes) does not fit in guest RAM above the kernel (ends at {kernel_end:#x}); give the guest more --memory"
    )]
    InitrdTooBig {
        /// its size
        size: u64,
        /// where the kernel ends
        kernel_end: u64,
    },
    /// too much RAM for the layout
    #[error(
        "a Linux guest takes 64 MiB to 3 GiB of RAM (the 32-bit MMIO hole starts at 3 GiB), not {0} bytes"
    )]
    Ram(u64),
    /// writing the boot structures failed
    #[error("writing the boot structures into guest RAM")]
    Memory(#[source] vm_memory::GuestMemoryError),
}

/// What to boot: a kernel, an optional initrd, and a command line.
#[derive(Debug, Clone)]
pub struct LinuxBoot {
    /// A bzImage or an ELF vmlinux.
    pub kernel: std::path::PathBuf,
    /// An initramfs (cpio, optionally compressed) loaded at the top of RAM.
    pub initrd: Option<std::path::PathBuf>,
    /// The command line.
    pub cmdline: String,
}

/// The command line a guest gets unless told otherwise: console on the 16550, reboot through
/// the i8042 (which ends the VM), a panic reboots at once (the VMM reports it as a panic), no
/// PCI or PS/2 probing (there is no such hardware), no ACPI (the MP table describes the CPUs).
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off acpi=off \
    i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";

const GDT_ADDR: u64 = 0x500;
const ZERO_PAGE: u64 = 0x7000;
const BOOT_STACK: u64 = 0x8ff0;
const CMDLINE_ADDR: u64 = 0x2_0000;
/// x86's COMMAND_LINE_SIZE.
const CMDLINE_MAX: usize = 2048;
/// The MP table sits in the last KiB of base memory, where Linux looks for it (the EBDA).
const MPTABLE_ADDR: u64 = 0x9_fc00;
const HIMEM: u64 = 0x10_0000;
/// Where the 32-bit MMIO hole (IOAPIC, LAPIC) starts: RAM must end below it.
pub const MAX_RAM: u64 = 3 << 30;

const BOOT_CS: u16 = 0x10;
const BOOT_DS: u16 = 0x18;
const BOOT_TSS: u16 = 0x20;

/// Where the loaded kernel starts and where its boot_params are.
#[derive(Debug, Clone, Copy)]
pub struct Loaded {
    /// The 64-bit entry point.
    pub entry: u64,
    /// boot_params, passed in `rsi`.
    pub boot_params: u64,
}

fn read_err(path: &Path) -> impl FnOnce(std::io::Error) -> LinuxError + '_ {
    move |source| LinuxError::Read {
        path: path.display().to_string(),
        source,
    }
}

/// Loads `boot` into `mem` (`ram` bytes) and writes every boot structure for `vcpus` vCPUs.
pub fn load(
    mem: &GuestMemoryMmap,
    ram: u64,
    boot: &LinuxBoot,
    vcpus: u8,
) -> Result<Loaded, LinuxError> {
    if !(64 << 20..=MAX_RAM).contains(&ram) {
        return Err(LinuxError::Ram(ram));
    }
    let name = boot.kernel.display().to_string();
    let mut file = File::open(&boot.kernel).map_err(read_err(&boot.kernel))?;
    let mut magic = [0u8; 4];
    std::io::Read::read_exact(&mut file, &mut magic).map_err(read_err(&boot.kernel))?;
    let kernel_err = |source| LinuxError::Kernel {
        path: name.clone(),
        source,
    };
    let mut params = boot_params::default();
    let entry;
    let kernel_end;
    if magic == *b"\x7fELF" {
        let r = Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM))).map_err(kernel_err)?;
        entry = r.kernel_load.0;
        kernel_end = r.kernel_end;
        params.hdr.boot_flag = 0xaa55;
        params.hdr.header = 0x5372_6448; // "HdrS"
        params.hdr.kernel_alignment = 0x100_0000;
    } else {
        let r =
            BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM))).map_err(kernel_err)?;
        let hdr = r.setup_header.expect("a bzImage has a setup header");
        // XLF_KERNEL_64: the kernel has the 64-bit entry point 0x200 bytes into it.
        if hdr.version < 0x020c || hdr.xloadflags & 1 == 0 {
            return Err(LinuxError::Not64(name));
        }
        params.hdr = hdr;
        entry = r.kernel_load.0 + 0x200;
        kernel_end = r.kernel_end;
    }
    params.hdr.type_of_loader = 0xff; // "undefined": not a registered boot loader

    let mut cmdline = Cmdline::new(CMDLINE_MAX).map_err(|e| LinuxError::Cmdline(e.to_string()))?;
    cmdline
        .insert_str(&boot.cmdline)
        .map_err(|e| LinuxError::Cmdline(format!("{e} (in {:?})", boot.cmdline)))?;
    load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &cmdline)
        .map_err(|e| LinuxError::Cmdline(e.to_string()))?;
    params.hdr.cmd_line_ptr = u32::try_from(CMDLINE_ADDR).expect("low");
    params.hdr.cmdline_size = u32::try_from(boot.cmdline.len() + 1).expect("at most 2048");

    if let Some(path) = &boot.initrd {
        let data = std::fs::read(path).map_err(read_err(path))?;
        let size = data.len() as u64;
        // Below the kernel's own limit (initrd_addr_max, or 2^31 - 1 for old headers).
        let max = match params.hdr.initrd_addr_max {
            0 => 0x37ff_ffff,
            m => u64::from(m),
        };
        let top = ram.min(max + 1);
        // Above the kernel as loaded, and above where a bzImage decompresses itself: from
        // its preferred address (or where it was loaded, if higher) for init_size bytes.
        let kernel_end = kernel_end.max(
            params
                .hdr
                .pref_address
                .max(HIMEM)
                .saturating_add(u64::from(params.hdr.init_size)),
        );
        let at = top
            .checked_sub(size)
            .map(|a| a & !0xfff)
            .filter(|&a| a >= kernel_end)
            .ok_or(LinuxError::InitrdTooBig { size, kernel_end })?;
        mem.write_slice(&data, GuestAddress(at))
            .map_err(LinuxError::Memory)?;
        params.hdr.ramdisk_image = u32::try_from(at).expect("below 3 GiB");
        params.hdr.ramdisk_size = u32::try_from(size).expect("below 3 GiB");
    }

    let e820 = [
        (0, MPTABLE_ADDR, E820_RAM),
        (MPTABLE_ADDR, HIMEM - MPTABLE_ADDR, E820_RESERVED),
        (HIMEM, ram - HIMEM, E820_RAM),
    ];
    for (i, (addr, size, kind)) in e820.into_iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr,
            size,
            r#type: kind,
        };
    }
    params.e820_entries = u8::try_from(e820.len()).expect("three");
    mem.write_obj(params, GuestAddress(ZERO_PAGE))
        .map_err(LinuxError::Memory)?;

    write_gdt(mem).map_err(LinuxError::Memory)?;
    x86::write_identity_map(mem, ram, false).map_err(LinuxError::Memory)?;
    mptable::write(mem, GuestAddress(MPTABLE_ADDR), vcpus).map_err(LinuxError::Memory)?;
    Ok(Loaded {
        entry,
        boot_params: ZERO_PAGE,
    })
}

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

fn write_gdt(mem: &GuestMemoryMmap) -> Result<(), vm_memory::GuestMemoryError> {
    let gdt: [u64; 6] = [
        0,
        0,
        0x00af_9b00_0000_ffff, // 0x10 code, 64-bit, DPL 0
        0x00cf_9300_0000_ffff, // 0x18 data
        0x0000_8b00_0000_0067, // 0x20 TSS (busy; only there because VM entry wants a TR)
        0,                     // its upper half
    ];
    for (i, d) in gdt.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(GDT_ADDR + 8 * i as u64))?;
    }
    Ok(())
}

fn segment(selector: u16, type_: u8, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        ..Default::default()
    }
}

/// Long mode, paging on, ring 0, the boot GDT's selectors: what the 64-bit boot protocol asks.
pub fn sregs(sregs: &mut kvm_sregs) {
    sregs.cs = segment(BOOT_CS, 0xb, true);
    let data = segment(BOOT_DS, 0x3, false);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = kvm_segment {
        base: 0,
        limit: 0x67,
        selector: BOOT_TSS,
        type_: 0xb,
        present: 1,
        ..Default::default()
    };
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = 6 * 8 - 1;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = 0x8000_0011; // PG, ET, PE
    sregs.cr3 = x86::PML4_ADDR;
    sregs.cr4 = 0x20; // PAE
    sregs.efer = 0x500; // LME, LMA
}

/// The boot vCPU's registers at the kernel's entry.
pub fn regs(loaded: Loaded) -> kvm_regs {
    kvm_regs {
        rip: loaded.entry,
        rsi: loaded.boot_params,
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        rflags: 0x2,
        ..Default::default()
    }
}

/// CPUID for vCPU `id` of `count`: the host's supported set, with this vCPU's APIC id where
/// Linux reads it (leaf 1 EBX, leaves 0xB and 0x1F EDX) and the hypervisor bit set.
pub fn cpuid_for(base: &CpuId, id: u8, count: u8) -> CpuId {
    let mut c = base.clone();
    for e in c.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (u32::from(id) << 24) | (u32::from(count) << 16) | (e.ebx & 0xffff);
                e.ecx |= 1 << 31;
            }
            0xb | 0x1f => e.edx = u32::from(id),
            _ => {}
        }
    }
    c
}

/// The MSRs Linux expects a firmware to have set: fast strings on, MTRRs on with
/// write-back as the default type, and the syscall MSRs cleared.
pub fn msrs() -> Msrs {
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    Msrs::from_entries(&[
        entry(0x1a0, 1),       // IA32_MISC_ENABLE: fast strings
        entry(0x2ff, 0xc06),   // MTRRdefType: enabled, fixed enabled, write-back
        entry(0x174, 0),       // SYSENTER_CS
        entry(0x175, 0),       // SYSENTER_ESP
        entry(0x176, 0),       // SYSENTER_EIP
        entry(0xc000_0081, 0), // STAR
        entry(0xc000_0082, 0), // LSTAR
        entry(0xc000_0083, 0), // CSTAR
        entry(0xc000_0084, 0), // SFMASK
        entry(0xc000_0102, 0), // KERNEL_GS_BASE
        entry(0x10, 0),        // TSC
    ])
    .expect("eleven entries fit")
}

/// LINT0 as ExtINT (the PIC's output) and LINT1 as NMI, as a BIOS leaves them.
pub fn lapic(mut state: kvm_lapic_state) -> kvm_lapic_state {
    let set = |regs: &mut [libc::c_char; 1024], offset: usize, mode: u32| {
        let mut b = [0u8; 4];
        for (i, r) in regs[offset..offset + 4].iter().enumerate() {
            b[i] = r.to_ne_bytes()[0];
        }
        let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
        for (r, byte) in regs[offset..offset + 4].iter_mut().zip(v.to_le_bytes()) {
            *r = libc::c_char::from_ne_bytes([byte]);
        }
    };
    set(&mut state.regs, 0x350, 7); // LVT LINT0: ExtINT
    set(&mut state.regs, 0x360, 4); // LVT LINT1: NMI
    state
}

/// The Intel MultiProcessor Specification 1.4 table, which tells Linux (booted without ACPI)
/// about the CPUs, the IOAPIC and how the ISA interrupts reach it. No crate of the rust-vmm
/// family publishes one (Firecracker's and Cloud Hypervisor's are internal), and it is a
/// hundred lines of fixed layout.
pub mod mptable {
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    /// The local APICs' address, as every x86 has it.
    pub const APIC_ADDR: u32 = 0xfee0_0000;
    /// The IOAPIC's address.
    pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
    const APIC_VERSION: u8 = 0x14;
    const IOAPIC_VERSION: u8 = 0x11;
    /// ISA interrupts 0-15 are routed; KVM's IOAPIC has 24 pins.
    const ISA_IRQS: u8 = 16;

    fn checksum(bytes: &[u8]) -> u8 {
        0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
    }

    /// The table's bytes for `cpus` CPUs, placed at `at`: the floating pointer, then the
    /// configuration table.
    pub fn build(at: u32, cpus: u8) -> Vec<u8> {
        let ioapic_id = cpus; // the first id after the CPUs'
        let mut entries = Vec::new();
        let mut count = 0u16;
        for id in 0..cpus {
            // Processor: type 0, APIC id, version, flags (enabled, BSP), signature, features.
            entries.extend_from_slice(&[0, id, APIC_VERSION, 1 | if id == 0 { 2 } else { 0 }]);
            entries.extend_from_slice(&0x600u32.to_le_bytes()); // family 6
            entries.extend_from_slice(&0x201u32.to_le_bytes()); // FPU, APIC
            entries.extend_from_slice(&[0; 8]);
            count += 1;
        }
        // Bus 0, ISA.
        entries.extend_from_slice(&[1, 0]);
        entries.extend_from_slice(b"ISA   ");
        count += 1;
        // The IOAPIC, enabled.
        entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
        entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
        count += 1;
        // ISA IRQ n to IOAPIC pin n, conforming polarity and trigger.
        for irq in 0..ISA_IRQS {
            entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
            count += 1;
        }
        // Local interrupts: ExtINT to LINT0 and NMI to LINT1 of every CPU (0xff).
        entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
        entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
        count += 2;

        let table_at = at + 16;
        let length = u16::try_from(44 + entries.len()).expect("small table");
        let mut table = Vec::with_capacity(usize::from(length));
        table.extend_from_slice(b"PCMP");
        table.extend_from_slice(&length.to_le_bytes());
        table.push(4); // spec revision 1.4
        table.push(0); // checksum, below
        table.extend_from_slice(b"MEMVISOR");
        table.extend_from_slice(b"KVM VM      ");
        table.extend_from_slice(&[0; 4]); // OEM table pointer
        table.extend_from_slice(&[0; 2]); // OEM table size
        table.extend_from_slice(&count.to_le_bytes());
        table.extend_from_slice(&APIC_ADDR.to_le_bytes());
        table.extend_from_slice(&[0; 4]); // extended length, checksum, reserved
        table.extend_from_slice(&entries);
        table[7] = checksum(&table);

        let mut fp = Vec::with_capacity(16);
        fp.extend_from_slice(b"_MP_");
        fp.extend_from_slice(&table_at.to_le_bytes());
        fp.push(1); // length in 16-byte units
        fp.push(4); // spec revision 1.4
        fp.push(0); // checksum, below
        fp.extend_from_slice(&[0; 5]); // feature bytes: a configuration table follows
        fp[10] = checksum(&fp);
        fp.extend_from_slice(&table);
        fp
    }

    /// Writes the table for `cpus` CPUs at `at` (which must hold 16 + 44 + 20 per CPU + 160
    /// bytes below 1 MiB).
    pub fn write(
        mem: &GuestMemoryMmap,
        at: GuestAddress,
        cpus: u8,
    ) -> Result<(), vm_memory::GuestMemoryError> {
        let at32 = u32::try_from(at.0).expect("the MP table lives below 1 MiB");
        mem.write_slice(&build(at32, cpus), at)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn both_checksums_hold_and_every_cpu_is_listed() {
            let t = build(0x9fc00, 4);
            let sum = |b: &[u8]| b.iter().fold(0u8, |a, x| a.wrapping_add(*x));
            assert_eq!(&t[..4], b"_MP_");
            assert_eq!(sum(&t[..16]), 0);
            let len = usize::from(u16::from_le_bytes([t[20], t[21]]));
            assert_eq!(&t[16..20], b"PCMP");
            assert_eq!(len, t.len() - 16);
            assert_eq!(sum(&t[16..]), 0);
            let count = u16::from_le_bytes([t[16 + 34], t[16 + 35]]);
            assert_eq!(count, 4 + 1 + 1 + 16 + 2);
            let pointer = u32::from_le_bytes([t[4], t[5], t[6], t[7]]);
            assert_eq!(pointer, 0x9fc10);
            // The 16 + 44 + 20*16 + 8 + 8 + 16*8 + 16 bytes of a 16-CPU table fit below 1 MiB.
            assert!(0x9fc00 + build(0x9fc00, 16).len() <= 0xa0000);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lapic_lint_pins() {
        let s = lapic(kvm_lapic_state::default());
        let reg =
            |o: usize| u32::from_le_bytes([0, 1, 2, 3].map(|i| s.regs[o + i].to_ne_bytes()[0]));
        assert_eq!(reg(0x350), 7 << 8);
        assert_eq!(reg(0x360), 4 << 8);
    }

    #[test]
    fn a_file_that_is_no_kernel_is_refused_by_name() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let dir = std::env::temp_dir().join(format!("memvisor-linux-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("junk");
        std::fs::write(&junk, vec![0x55u8; 8192]).unwrap();
        let boot = LinuxBoot {
            kernel: junk,
            initrd: None,
            cmdline: DEFAULT_CMDLINE.into(),
        };
        let e = load(&mem, 64 << 20, &boot, 1).unwrap_err();
        assert!(matches!(e, LinuxError::Kernel { .. }), "{e}");
        assert!(e.to_string().contains("junk"), "{e}");
        let e = load(&mem, 32 << 20, &boot, 1).unwrap_err();
        assert!(matches!(e, LinuxError::Ram(_)), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
