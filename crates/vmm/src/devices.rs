//! Port I/O devices. Every value comes from the guest and is treated as hostile: any port,
//! any width, any value is answered or ignored, never trusted.

use std::io::Write;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::state::DeviceState;

/// COM1, the guest's console: a 16550 UART (vm-superio) at 0x3f8, IRQ 4.
pub const COM1: u16 = 0x3f8;
/// The exit port: a byte written here ends the VM with that byte as its status (the guest
/// kit's `exit`; QEMU calls the same idea isa-debug-exit).
pub const EXIT_PORT: u16 = 0xf4;
/// The i8042 command port: 0xfe written here is the keyboard controller's CPU reset, which
/// Linux uses with `reboot=k`.
pub const I8042_CMD: u16 = 0x64;
/// The CMOS RTC's index and data ports.
pub const CMOS_INDEX: u16 = 0x70;
const CMOS_DATA: u16 = 0x71;

/// The serial line's interrupt: an eventfd that KVM turns into IRQ 4 (an irqfd), so raising
/// it from any thread never takes the vCPU's locks.
#[derive(Debug)]
pub struct IrqLine(Option<EventFd>);

impl IrqLine {
    /// A line that raises `evt`; `None` is a line wired to nothing (a unit test's UART).
    pub fn new(evt: Option<EventFd>) -> Self {
        IrqLine(evt)
    }
}

impl Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> Result<(), Self::E> {
        match &self.0 {
            Some(e) => e.write(1),
            None => Ok(()),
        }
    }
}

/// What Linux prints when it panics; the console is watched for it so that a panic (after
/// which `panic=-1` resets the guest) ends the VM as a failure, not as a reboot. A guest that
/// prints it on purpose only fails itself.
const PANIC_LINE: &[u8] = b"Kernel panic - not syncing";

/// The console's writer, watching for [`PANIC_LINE`] as the bytes go by.
#[derive(Debug)]
pub struct Console<W> {
    out: W,
    matched: usize,
    panicked: bool,
}

impl<W: Write> Write for Console<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for &b in buf {
            // The pattern's first byte appears nowhere else in it, so a mismatch restarts
            // the match at this byte.
            self.matched = if b == PANIC_LINE[self.matched] {
                self.matched + 1
            } else {
                usize::from(b == PANIC_LINE[0])
            };
            if self.matched == PANIC_LINE.len() {
                self.panicked = true;
                self.matched = 0;
            }
        }
        self.out.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// What a port write asked of the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortAction {
    /// Nothing: run on.
    None,
    /// Stop with this status.
    Exit(u8),
    /// Reset (the guest asked to reboot).
    Reset,
}

/// The VM's port I/O devices.
pub struct Ports<W: Write> {
    serial: Serial<IrqLine, NoEvents, Console<W>>,
    cmos_index: u8,
}

impl<W: Write> std::fmt::Debug for Ports<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ports").finish_non_exhaustive()
    }
}

impl<W: Write> Ports<W> {
    /// Devices whose console output goes to `console`, the UART's interrupt to `irq`.
    pub fn new(console: W, irq: IrqLine) -> Self {
        let console = Console {
            out: console,
            matched: 0,
            panicked: false,
        };
        Ports {
            serial: Serial::new(irq, console),
            cmos_index: 0,
        }
    }

    /// Devices as saved in `state` (a paused VM's), writing to `console`, the UART's
    /// interrupt to `irq`. The state may come from a file: a UART FIFO beyond the 16550's 64
    /// bytes is refused, a panic-watcher position out of range starts over.
    pub fn from_state(
        console: W,
        irq: IrqLine,
        state: &DeviceState,
    ) -> Result<Self, vm_superio::serial::Error<std::io::Error>> {
        let matched = usize::try_from(state.console_matched)
            .ok()
            .filter(|&m| m < PANIC_LINE.len())
            .unwrap_or(0);
        let console = Console {
            out: console,
            matched,
            panicked: state.console_panicked,
        };
        let serial = Serial::from_state(&(&state.serial).into(), irq, NoEvents, console)?;
        Ok(Ports {
            serial,
            cmos_index: state.cmos_index & 0x7f,
        })
    }

    /// The devices' state, for a paused VM's [`DeviceState`] (`clock_us` is the run's, so
    /// left 0 here).
    pub fn state(&self) -> DeviceState {
        let console = self.serial.writer();
        DeviceState {
            serial: self.serial.state().into(),
            cmos_index: self.cmos_index,
            console_matched: u32::try_from(console.matched).unwrap_or(0),
            console_panicked: console.panicked,
            clock_us: 0,
        }
    }

    /// The console's writer.
    pub fn console(&self) -> &W {
        &self.serial.writer().out
    }

    /// Whether the console has shown a Linux panic.
    pub fn panicked(&self) -> bool {
        self.serial.writer().panicked
    }

    /// Gives the console's writer back.
    pub fn take_console(self) -> W {
        self.serial.into_writer().out
    }

    /// Queues console input for the guest; returns how many bytes the UART's FIFO took (the
    /// rest waits for the guest to read).
    pub fn input(&mut self, bytes: &[u8]) -> usize {
        let room = self.serial.fifo_capacity().min(bytes.len());
        if room == 0 {
            return 0;
        }
        // A failed interrupt (the eventfd's counter full) still leaves the bytes queued and
        // the line-status bit set, which the guest's driver also polls.
        match self.serial.enqueue_raw_bytes(&bytes[..room]) {
            Ok(n) => n,
            Err(_) => room,
        }
    }

    /// A guest `out` of `data` (1, 2 or 4 bytes, or anything a hostile guest manages) to `port`.
    pub fn write(&mut self, port: u16, data: &[u8]) -> PortAction {
        let Some(&byte) = data.first() else {
            return PortAction::None;
        };
        match port {
            COM1..=0x3ff => {
                // Console output that cannot be written (a closed pipe) is dropped: the
                // guest must not stop because nobody reads its console.
                let offset = u8::try_from(port - COM1).expect("COM1 has 8 ports");
                let _ = self.serial.write(offset, byte);
                PortAction::None
            }
            EXIT_PORT => PortAction::Exit(byte),
            CMOS_INDEX => {
                // Bit 7 is the NMI mask; the index is the low seven bits.
                self.cmos_index = byte & 0x7f;
                PortAction::None
            }
            I8042_CMD if byte == 0xfe => PortAction::Reset,
            _ => PortAction::None,
        }
    }

    /// A guest `in` from `port` into `data`.
    pub fn read(&mut self, port: u16, data: &mut [u8]) {
        let value = match port {
            COM1..=0x3ff => self
                .serial
                .read(u8::try_from(port - COM1).expect("COM1 has 8 ports")),
            // Linux polls the i8042 status: nothing pending, input buffer empty.
            I8042_CMD => 0,
            CMOS_DATA => cmos(self.cmos_index),
            // No device: the bus floats high.
            _ => 0xff,
        };
        data.fill(value);
    }
}

/// A CMOS RTC that reads the host's clock (UTC, BCD, 24-hour), never mid-update, so a Linux
/// guest starts with the right date. Its alarm and interrupt are not there; Linux's clock
/// runs on the PIT, the LAPIC timer and kvmclock once booted.
fn cmos(index: u8) -> u8 {
    let bcd = |v: i32| {
        let v = u8::try_from(v.rem_euclid(100)).expect("below 100");
        (v / 10) << 4 | (v % 10)
    };
    let mut tm = std::mem::MaybeUninit::<libc::tm>::zeroed();
    // SAFETY: time(NULL) has no preconditions; gmtime_r writes only into the `tm` it is given,
    // which lives for the call; on failure it leaves the zeroed struct (the epoch's fields).
    let tm = unsafe {
        let now = libc::time(std::ptr::null_mut());
        libc::gmtime_r(&raw const now, tm.as_mut_ptr());
        tm.assume_init()
    };
    match index {
        0x00 => bcd(tm.tm_sec),
        0x02 => bcd(tm.tm_min),
        0x04 => bcd(tm.tm_hour),
        0x06 => bcd(tm.tm_wday + 1),
        0x07 => bcd(tm.tm_mday),
        0x08 => bcd(tm.tm_mon + 1),
        0x09 => bcd(tm.tm_year),
        0x32 => bcd(1900 / 100 + tm.tm_year / 100),
        0x0a => 0x26, // 32.768 kHz time base, 1024 Hz rate, no update in progress
        0x0b => 0x02, // 24-hour, BCD, no interrupts
        0x0d => 0x80, // the battery is good
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_port_traffic_is_answered_or_ignored() {
        let mut p = Ports::new(Vec::new(), IrqLine::new(None));
        for port in [0u16, 0x80, COM1 + 7, 0xffff, I8042_CMD] {
            assert_eq!(p.write(port, &[1, 2, 3, 4, 5, 6, 7, 8]), PortAction::None);
            assert_eq!(p.write(port, &[]), PortAction::None);
            let mut d = [0u8; 8];
            p.read(port, &mut d);
        }
        assert_eq!(p.write(EXIT_PORT, &[3]), PortAction::Exit(3));
        assert_eq!(p.write(I8042_CMD, &[0xfe]), PortAction::Reset);
        p.write(COM1, b"h");
        assert_eq!(p.console(), b"h");
        // A flood of input fills the FIFO and stops there.
        let taken = p.input(&[b'x'; 1000]);
        assert!(taken > 0 && taken < 1000);
        assert_eq!(p.input(b"more"), 0);
        let mut d = [0u8; 1];
        p.read(COM1, &mut d);
        assert_eq!(d[0], b'x');
    }

    #[test]
    fn a_panic_on_the_console_is_seen_across_writes() {
        let mut p = Ports::new(Vec::new(), IrqLine::new(None));
        for b in b"[ 1.0] KKernel panic - not sync" {
            p.write(COM1, &[*b]);
        }
        assert!(!p.panicked());
        for b in b"ing: VFS" {
            p.write(COM1, &[*b]);
        }
        assert!(p.panicked());
    }

    #[test]
    fn the_rtc_reads_the_hosts_date_in_bcd() {
        let mut p = Ports::new(Vec::new(), IrqLine::new(None));
        let mut read = |i: u8| {
            p.write(CMOS_INDEX, &[i | 0x80]);
            let mut d = [0u8];
            p.read(CMOS_DATA, &mut d);
            d[0]
        };
        assert_eq!(read(0x32), 0x20, "the 21st century");
        let month = read(0x08);
        assert!(
            (0x01..=0x12).contains(&month) && month & 0xf <= 9,
            "{month:#x}"
        );
        assert_eq!(read(0x0a) & 0x80, 0, "never mid-update");
    }
}
