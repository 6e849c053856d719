//! hostile: what a guest that means harm writes to the VMM's control ports, for the tests to
//! see that the VMM takes it: progress of u32::MAX (three times) and a byte-wide 7, so the
//! host's count must be exactly 3 × (2^32 − 1) + 7; reads of write-only ports and a
//! `rep insd` of the clock; then, until the host asks it to stop, sleep requests of 2^32 − 1
//! microseconds (71 minutes), which the VMM must cap at 100 ms. Exits 0 when stopped.
#![no_std]
#![no_main]

use core::arch::asm;

kit::entry!(main);

fn main(_: kit::Boot) -> u8 {
    for _ in 0..3 {
        kit::report_rounds(u32::MAX);
    }
    kit::outb(kit::PROGRESS_PORT, 7);
    let _ = kit::inl(kit::PROGRESS_PORT);
    let _ = kit::inl(kit::PACE_PORT);
    let mut buf = [0u32; 4];
    // SAFETY: `rep insd` writes `rcx` (4) dwords at `rdi`, which points at `buf`, 16 bytes;
    // the direction flag is clear (the ABI's promise at every call).
    unsafe {
        asm!("rep insd", in("dx") kit::CLOCK_PORT, inout("rdi") buf.as_mut_ptr() => _,
             inout("rcx") 4u64 => _, options(nostack));
    }
    core::hint::black_box(buf);
    kit::print("hostile: sleeping\n");
    loop {
        kit::pause_us(u32::MAX);
        if kit::stop_requested() {
            kit::print("hostile: stopped\n");
            return 0;
        }
    }
}
