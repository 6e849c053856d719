//! What every guest of the kit shares.
//!
//! The boot protocol (memvisor's vmm crate sets it up): the guest starts in 64-bit ring 3 with
//! IOPL 3, paging on and the first GiBs identity-mapped, interrupts off; `rdi` holds the guest
//! RAM size in bytes, `rsi` the end of the loaded image, `rdx` this vCPU's index and `rcx` the
//! vCPU count; each vCPU's 64 KiB stack hangs below the top of RAM (vCPU 0's highest). Every
//! vCPU starts at the entry point at once. A guest
//! talks to the world with port I/O only: bytes to COM1 (0x3f8) are its console, a byte to
//! port 0xf4 ends the VM with that byte as the exit status.
#![no_std]

use core::arch::asm;

/// COM1's data register.
const COM1: u16 = 0x3f8;
/// The VMM's exit port.
const EXIT_PORT: u16 = 0xf4;

/// What the VMM told the guest at entry.
#[derive(Debug, Clone, Copy)]
pub struct Boot {
    /// Guest RAM in bytes.
    pub ram: u64,
    /// First byte after the loaded image.
    pub image_end: u64,
    /// This vCPU's index, from 0.
    pub cpu: u64,
    /// How many vCPUs run the guest.
    pub cpus: u64,
}

fn outb(port: u16, value: u8) {
    // SAFETY: `out` only reaches the VMM (IOPL 3 makes it legal in ring 3); no memory effect.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack)) }
}

fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: `in` only reaches the VMM (IOPL 3 makes it legal in ring 3); no memory effect.
    unsafe { asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack)) }
    value
}

/// Waits for a byte typed on the console and returns it (polls the UART's line status:
/// interrupts are off in the kit).
pub fn read_byte() -> u8 {
    // Line status register, bit 0: data ready.
    while inb(COM1 + 5) & 1 == 0 {
        core::hint::spin_loop();
    }
    inb(COM1)
}

/// Writes `s` to the console.
pub fn print(s: &str) {
    for b in s.bytes() {
        outb(COM1, b);
    }
}

/// Writes one byte to the console.
pub fn print_byte(b: u8) {
    outb(COM1, b);
}

/// Writes `v` in decimal to the console.
pub fn print_u64(mut v: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    for &b in &buf[i..] {
        outb(COM1, b);
    }
}

/// Writes `v` in hexadecimal to the console.
pub fn print_hex(v: u64) {
    print("0x");
    for shift in (0..16).rev() {
        let d = ((v >> (shift * 4)) & 0xf) as u8;
        outb(COM1, if d < 10 { b'0' + d } else { b'a' + d - 10 });
    }
}

/// Ends the VM with `status`.
pub fn exit(status: u8) -> ! {
    outb(EXIT_PORT, status);
    // The VMM never resumes a guest after an exit write.
    loop {
        core::hint::spin_loop();
    }
}

/// Waits forever without exiting: for vCPUs whose work is done while another decides the end.
pub fn park() -> ! {
    loop {
        core::hint::spin_loop();
    }
}

/// Defines the guest's entry point: `$main(Boot) -> u8`, whose result is the exit status.
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        #[unsafe(no_mangle)]
        pub extern "C" fn _start(ram: u64, image_end: u64, cpu: u64, cpus: u64) -> ! {
            let status = $main($crate::Boot {
                ram,
                image_end,
                cpu,
                cpus,
            });
            $crate::exit(status)
        }

        #[panic_handler]
        fn panic(_: &core::panic::PanicInfo) -> ! {
            $crate::print("panic\n");
            $crate::exit(101)
        }
    };
}

/// The precompiled libcore of the host target names an unwinding personality routine; with
/// panic = "abort" nothing unwinds, so nothing ever calls it.
#[unsafe(no_mangle)]
pub extern "C" fn rust_eh_personality() {}

// Freestanding code has no libc: these are the memory functions the compiler calls. Volatile
// byte accesses keep the compiler from turning the loops back into calls to themselves.

/// # Safety
/// As C's memcpy: `n` bytes readable at `src`, writable at `dst`, not overlapping.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    for i in 0..n {
        // SAFETY: the caller promises both ranges are valid for `n` bytes.
        unsafe { dst.add(i).write_volatile(src.add(i).read_volatile()) };
    }
    dst
}

/// # Safety
/// As C's memmove: `n` bytes readable at `src` and writable at `dst`, overlap allowed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) < (src as usize) {
        // SAFETY: forwards copy is safe when the destination starts below the source.
        unsafe { memcpy(dst, src, n) }
    } else {
        for i in (0..n).rev() {
            // SAFETY: the caller promises both ranges are valid for `n` bytes.
            unsafe { dst.add(i).write_volatile(src.add(i).read_volatile()) };
        }
        dst
    }
}

/// # Safety
/// As C's memset: `n` bytes writable at `dst`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memset(dst: *mut u8, value: i32, n: usize) -> *mut u8 {
    for i in 0..n {
        // SAFETY: the caller promises the range is valid for `n` bytes.
        unsafe { dst.add(i).write_volatile(value as u8) };
    }
    dst
}

/// # Safety
/// As C's memcmp: `n` bytes readable at both.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: the caller promises both ranges are valid for `n` bytes.
        let (x, y) = unsafe { (a.add(i).read_volatile(), b.add(i).read_volatile()) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
    }
    0
}

/// # Safety
/// As C's bcmp.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}
