//! fault: prints a line, then executes `ud2`. With no IDT the fault cannot be delivered, so the
//! vCPU triple-faults: the VMM must stop with a clear error and the registers, not hang.
#![no_std]
#![no_main]

kit::entry!(main);

fn main(_: kit::Boot) -> u8 {
    kit::print("fault: about to execute ud2\n");
    // SAFETY: ud2 raises #UD and nothing else; it is the point of this guest.
    unsafe { core::arch::asm!("ud2") };
    0
}
