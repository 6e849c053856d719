//! The x86-64 state a guest of the guest kit starts in: long mode, identity-mapped, in ring 3.
//!
//! Why ring 3: /dev/kvm on these machines is KVM's PVM backend, which runs guest ring-3 code
//! natively and emulates ring-0 code some 7,500 times slower (docs/vmm.md). So the vCPU starts
//! directly in user mode: page tables with the user bit, ring-3 code and data segments.
//!
//! Port I/O from ring 3: PVM runs guest user code in host user mode, where `in`/`out` fault;
//! it then emulates the instruction, and the emulator's permission check reads the guest's
//! RFLAGS.IOPL as the hardware left it (0), so IOPL 3 alone is not enough (measured: a triple
//! fault on the first `out`). The TSS therefore carries an I/O permission bitmap that allows
//! every port, which the emulator honours. IOPL is set to 3 as well, for hardware KVM.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Where the boot structures live in guest physical memory (all below 1 MiB).
pub const GDT_ADDR: u64 = 0x1000;
/// The TSS (needed for VM entry; its stack pointers are never used: there is no IDT), with
/// its I/O permission bitmap.
pub const TSS_ADDR: u64 = 0x3000;
/// Where the I/O bitmap starts inside the TSS: right after the 104-byte TSS proper.
const IOMAP_BASE: u64 = 104;
/// The TSS limit: the 8 KiB bitmap (all ports allowed) and its closing 0xff byte.
const TSS_LIMIT: u64 = IOMAP_BASE + 8192;
/// Top-level page table.
pub const PML4_ADDR: u64 = 0x9000;
const PDPT_ADDR: u64 = 0xa000;
/// Four page directories of 2 MiB pages: an identity map of the first 4 GiB.
const PD_ADDR: u64 = 0xb000;
/// The lowest address a guest image may load at: the tables above sit beneath it.
pub const IMAGE_MIN: u64 = 0x10_0000;
/// The most guest RAM the identity map covers.
pub const MAX_RAM: u64 = 4 << 30;

const USER_DS: u16 = 0x18 | 3;
const USER_CS: u16 = 0x20 | 3;
const TSS_SEL: u16 = 0x28;

// Page-table entry bits.
const P: u64 = 1;
const RW: u64 = 1 << 1;
const US: u64 = 1 << 2;
const PS: u64 = 1 << 7;

/// Writes the GDT, TSS and identity page tables for `ram` bytes of guest memory.
pub fn write_tables(mem: &GuestMemoryMmap, ram: u64) -> Result<(), vm_memory::GuestMemoryError> {
    let gdt: [u64; 7] = [
        0,
        0x00af_9b00_0000_ffff, // 0x08 kernel code, 64-bit
        0x00cf_9300_0000_ffff, // 0x10 kernel data
        0x00cf_f300_0000_ffff, // 0x18 user data, DPL 3
        0x00af_fb00_0000_ffff, // 0x20 user code, 64-bit, DPL 3
        tss_low(TSS_ADDR, TSS_LIMIT),
        TSS_ADDR >> 32,
    ];
    for (i, d) in gdt.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(GDT_ADDR + 8 * i as u64))?;
    }
    // The bitmap's bytes are zero (every port allowed) in fresh guest RAM; write them anyway,
    // since the RAM may not be fresh (a reboot, a restore).
    mem.write_obj(
        u16::try_from(IOMAP_BASE).expect("small"),
        GuestAddress(TSS_ADDR + 102),
    )?;
    mem.write_slice(&[0u8; 8192], GuestAddress(TSS_ADDR + IOMAP_BASE))?;
    mem.write_obj(0xffu8, GuestAddress(TSS_ADDR + TSS_LIMIT))?;
    write_identity_map(mem, ram, true)
}

/// Writes identity page tables for the first `ram` bytes (at most 4 GiB) with 2 MiB pages,
/// user-accessible when `user` (the guest kit runs in ring 3) or not (a kernel).
pub fn write_identity_map(
    mem: &GuestMemoryMmap,
    ram: u64,
    user: bool,
) -> Result<(), vm_memory::GuestMemoryError> {
    let us = if user { US } else { 0 };
    mem.write_obj(PDPT_ADDR | P | RW | us, GuestAddress(PML4_ADDR))?;
    let gibs = ram.div_ceil(1 << 30).min(MAX_RAM >> 30);
    for g in 0..gibs {
        let pd = PD_ADDR + g * 0x1000;
        mem.write_obj(pd | P | RW | us, GuestAddress(PDPT_ADDR + 8 * g))?;
        for i in 0..512u64 {
            let page = (g << 30) | (i << 21);
            mem.write_obj(page | P | RW | us | PS, GuestAddress(pd + 8 * i))?;
        }
    }
    Ok(())
}

/// The low 8 bytes of a 64-bit available-TSS descriptor.
fn tss_low(base: u64, limit: u64) -> u64 {
    (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (0x89 << 40) // present, type 9: available 64-bit TSS
        | (((limit >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56)
}

fn segment(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl: 3,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        ..Default::default()
    }
}

/// Turns `sregs` (as KVM reported them) into long mode, paging on, ring 3.
pub fn ring3_sregs(sregs: &mut kvm_sregs) {
    sregs.cs = segment(USER_CS, true);
    let data = segment(USER_DS, false);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = kvm_segment {
        base: TSS_ADDR,
        limit: u32::try_from(TSS_LIMIT).expect("small"),
        selector: TSS_SEL,
        type_: 0xb, // busy 64-bit TSS, as VM entry requires
        present: 1,
        ..Default::default()
    };
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = 7 * 8 - 1;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    // PE, MP, ET, NE, WP, PG: paging on; MP and NE, EM clear, so SSE code runs.
    sregs.cr0 = 0x8001_0033;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = 0x620; // PAE, OSFXSR, OSXMMEXCPT
    sregs.efer = 0x500; // LME, LMA
}

/// Registers at the entry point of vCPU `cpu` of `cpus`: the guest kit's boot protocol passes
/// the RAM size in `rdi`, the end of the image in `rsi`, the vCPU's index in `rdx` and the
/// vCPU count in `rcx`; each vCPU's 64 KiB stack hangs below the top of RAM; IOPL 3,
/// interrupts off.
pub fn entry_regs(entry: u64, ram: u64, image_end: u64, cpu: u8, cpus: u8) -> kvm_regs {
    let stack_top = (ram & !0xf) - u64::from(cpu) * VCPU_STACK;
    kvm_regs {
        rip: entry,
        rdi: ram,
        rsi: image_end,
        rdx: u64::from(cpu),
        rcx: u64::from(cpus),
        // The System V ABI wants rsp + 8 16-byte aligned at a function's entry.
        rsp: stack_top - 8,
        rflags: 0x2 | (3 << 12),
        ..Default::default()
    }
}

/// Stack bytes per vCPU of a guest-kit VM.
pub const VCPU_STACK: u64 = 64 << 10;

/// The FPU as after FNINIT, with SSE exceptions masked.
pub fn initial_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tss_descriptor_fields() {
        let d = tss_low(0x1234_5678, 0x67);
        assert_eq!(d & 0xffff, 0x67);
        assert_eq!((d >> 16) & 0xff_ffff, 0x34_5678);
        assert_eq!((d >> 56) & 0xff, 0x12);
        assert_eq!((d >> 40) & 0xff, 0x89);
    }

    #[test]
    fn identity_map_covers_ram_with_user_pages() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
        write_tables(&mem, 8 << 20).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        assert_eq!(pml4 & !0xfff, PDPT_ADDR);
        let pde: u64 = mem.read_obj(GuestAddress(PD_ADDR + 8 * 3)).unwrap();
        assert_eq!(pde, (3 << 21) | P | RW | US | PS);
    }
}
