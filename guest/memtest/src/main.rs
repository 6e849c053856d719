//! memtest: fills all free guest RAM with a pattern that differs per word and per pass, reads
//! it back, and exits 0 when every word held (1 on the first mismatch, printed). It proves
//! that guest memory is real memory: whatever the VMM does with it (reclaim, share, restore),
//! the guest must read back what it wrote.
#![no_std]
#![no_main]

const MIB: u64 = 1 << 20;
/// Kept free below the top of RAM for the stack.
const STACK: u64 = MIB;
const PASSES: u64 = 2;

kit::entry!(main);

fn pattern(addr: u64, pass: u64) -> u64 {
    (addr ^ 0x9e37_79b9_7f4a_7c15)
        .wrapping_mul(pass * 2 + 1)
        .rotate_left(pass as u32 * 7)
}

fn main(boot: kit::Boot) -> u8 {
    let start = boot.image_end.div_ceil(2 * MIB) * (2 * MIB);
    let end = boot.ram - STACK;
    kit::print("memtest: ");
    kit::print_u64((end - start) / MIB);
    kit::print(" MiB\n");
    for pass in 0..PASSES {
        let mut a = start;
        while a < end {
            // SAFETY: [start, end) is guest RAM that nothing else uses: above the image and
            // below the stack, identity-mapped and writable by the boot protocol.
            unsafe { (a as *mut u64).write_volatile(pattern(a, pass)) };
            a += 8;
        }
        let mut a = start;
        while a < end {
            // SAFETY: as above.
            let got = unsafe { (a as *const u64).read_volatile() };
            if got != pattern(a, pass) {
                kit::print("memtest: mismatch at ");
                kit::print_hex(a);
                kit::print("\n");
                return 1;
            }
            a += 8;
        }
    }
    kit::print("memtest: ok\n");
    0
}
