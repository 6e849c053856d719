//! What every guest of the kit shares.
//!
//! The boot protocol (memvisor's vmm crate sets it up): the guest starts in 64-bit ring 3 with
//! IOPL 3, paging on and the first GiBs identity-mapped, interrupts off; `rdi` holds the guest
//! RAM size in bytes, `rsi` the end of the loaded image, `rdx` this vCPU's index and `rcx` the
//! vCPU count; each vCPU's 64 KiB stack hangs below the top of RAM (vCPU 0's highest). Every
//! vCPU starts at the entry point at once. A guest
//! talks to the world with port I/O only: bytes to COM1 (0x3f8) are its console, a byte to
//! port 0xf4 ends the VM with that byte as the exit status.
//!
//! The VMM's control ports (memvisor's `vmm::control`), through which the host follows and
//! stops a guest:
//!
//! | port | access | what |
//! |------|--------|------|
//! | 0xf5 | `out` 32-bit | progress: this many more rounds of work done ([`report_rounds`]) |
//! | 0xf6 | `in` | 1 once the host asked the guest to stop, else 0 ([`stop_requested`]); the guest then exits 0 |
//! | 0xf7 | `out` 32-bit | pacing: sleep this many microseconds, at most 100 ms ([`pause_us`]) |
//! | 0xf8 | `in` 32-bit | the host's clock: microseconds since the run started, wrapping ([`clock_us`]) |
//!
//! The control ports are served on the vCPU's own thread, so one vCPU's sleep holds up no
//! other. Without a host control attached, progress goes nowhere and no stop ever comes.
#![no_std]

use core::arch::asm;

/// COM1's data register.
const COM1: u16 = 0x3f8;
/// The VMM's exit port.
const EXIT_PORT: u16 = 0xf4;
/// Progress reports: `out` 32-bit, rounds done since the last report.
pub const PROGRESS_PORT: u16 = 0xf5;
/// Stop requests: `in`, 1 when the host asked the guest to stop.
pub const STOP_PORT: u16 = 0xf6;
/// Pacing: `out` 32-bit, microseconds to sleep (the VMM caps one sleep at 100 ms).
pub const PACE_PORT: u16 = 0xf7;
/// The host's clock: `in` 32-bit, microseconds since the run started, wrapping.
pub const CLOCK_PORT: u16 = 0xf8;

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

/// Writes a byte to `port`.
pub fn outb(port: u16, value: u8) {
    // SAFETY: `out` only reaches the VMM (IOPL 3 makes it legal in ring 3); no memory effect.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack)) }
}

/// Reads a byte from `port`.
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: `in` only reaches the VMM (IOPL 3 makes it legal in ring 3); no memory effect.
    unsafe { asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack)) }
    value
}

/// Writes a 32-bit `value` to `port`.
pub fn outl(port: u16, value: u32) {
    // SAFETY: `out` only reaches the VMM (IOPL 3 makes it legal in ring 3); no memory effect.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack)) }
}

/// Reads a 32-bit value from `port`.
pub fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: `in` only reaches the VMM (IOPL 3 makes it legal in ring 3); no memory effect.
    unsafe { asm!("in eax, dx", in("dx") port, out("eax") value, options(nomem, nostack)) }
    value
}

/// Tells the host `rounds` more rounds of work are done.
pub fn report_rounds(rounds: u32) {
    outl(PROGRESS_PORT, rounds);
}

/// Whether the host asked this guest to stop.
pub fn stop_requested() -> bool {
    inl(STOP_PORT) & 1 != 0
}

/// Asks the VMM to sleep `us` microseconds (it caps one sleep at 100 ms, and cuts it short
/// when the VM is ending).
pub fn pause_us(us: u32) {
    outl(PACE_PORT, us);
}

/// The host's clock in microseconds since the run started; it wraps at 2^32, so take
/// differences with `wrapping_sub`.
pub fn clock_us() -> u32 {
    inl(CLOCK_PORT)
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
