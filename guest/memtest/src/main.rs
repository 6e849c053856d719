//! memtest: fills all free guest RAM with a pattern that differs per word and per pass, reads
//! it back, and exits 0 when every word held (1 on a mismatch, printed). Every vCPU tests its
//! own slice at once; vCPU 0 waits for the others and reports. It proves that guest memory is
//! real memory: whatever the VMM does with it (reclaim, share, restore), the guest must read
//! back what it wrote.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU64, Ordering};

const MIB: u64 = 1 << 20;
/// Kept free below the top of RAM for the vCPUs' stacks.
const STACK: u64 = MIB;
const PASSES: u64 = 2;

/// vCPUs done with their slice.
static DONE: AtomicU64 = AtomicU64::new(0);
/// The first bad address any vCPU found, or 0.
static BAD: AtomicU64 = AtomicU64::new(0);

kit::entry!(main);

fn pattern(addr: u64, pass: u64) -> u64 {
    (addr ^ 0x9e37_79b9_7f4a_7c15)
        .wrapping_mul(pass * 2 + 1)
        .rotate_left(pass as u32 * 7)
}

/// Tests [start, end); returns the first bad address.
fn test(start: u64, end: u64) -> Option<u64> {
    for pass in 0..PASSES {
        let mut a = start;
        while a < end {
            // SAFETY: [start, end) is this vCPU's slice of guest RAM that nothing else uses:
            // above the image, below the stacks, identity-mapped and writable.
            unsafe { (a as *mut u64).write_volatile(pattern(a, pass)) };
            a += 8;
        }
        let mut a = start;
        while a < end {
            // SAFETY: as above.
            if unsafe { (a as *const u64).read_volatile() } != pattern(a, pass) {
                return Some(a);
            }
            a += 8;
        }
    }
    None
}

fn main(boot: kit::Boot) -> u8 {
    let start = boot.image_end.div_ceil(2 * MIB) * (2 * MIB);
    let end = boot.ram - STACK;
    let slice = (end - start) / boot.cpus / 8 * 8;
    let lo = start + boot.cpu * slice;
    let hi = if boot.cpu + 1 == boot.cpus {
        end
    } else {
        lo + slice
    };
    if let Some(bad) = test(lo, hi) {
        let _ = BAD.compare_exchange(0, bad, Ordering::SeqCst, Ordering::SeqCst);
    }
    DONE.fetch_add(1, Ordering::SeqCst);
    if boot.cpu != 0 {
        kit::park();
    }
    while DONE.load(Ordering::SeqCst) < boot.cpus {
        core::hint::spin_loop();
    }
    kit::print("memtest: ");
    kit::print_u64((end - start) / MIB);
    kit::print(" MiB on ");
    kit::print_u64(boot.cpus);
    kit::print(" vCPUs\n");
    match BAD.load(Ordering::SeqCst) {
        0 => {
            kit::print("memtest: ok\n");
            0
        }
        bad => {
            kit::print("memtest: mismatch at ");
            kit::print_hex(bad);
            kit::print("\n");
            1
        }
    }
}
