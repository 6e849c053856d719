//! Port I/O devices. Every value comes from the guest and is treated as hostile: any port,
//! any width, any value is answered or ignored, never trusted.

use std::io::Write;

use vm_superio::{Serial, Trigger};

/// COM1, the guest's console: a 16550 UART (vm-superio) at 0x3f8, IRQ 4.
pub const COM1: u16 = 0x3f8;
/// The exit port: a byte written here ends the VM with that byte as its status (the guest
/// kit's `exit`; QEMU calls the same idea isa-debug-exit).
pub const EXIT_PORT: u16 = 0xf4;
/// The i8042 command port: 0xfe written here is the keyboard controller's CPU reset, which
/// Linux uses with `reboot=k`.
pub const I8042_CMD: u16 = 0x64;

/// The serial line's interrupt, not wired yet: the guest kit polls the line status.
#[derive(Debug)]
pub struct NoIrq;

impl Trigger for NoIrq {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        Ok(())
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
    serial: Serial<NoIrq, vm_superio::serial::NoEvents, W>,
}

impl<W: Write> std::fmt::Debug for Ports<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ports").finish_non_exhaustive()
    }
}

impl<W: Write> Ports<W> {
    /// Devices whose console output goes to `console`.
    pub fn new(console: W) -> Self {
        Ports {
            serial: Serial::new(NoIrq, console),
        }
    }

    /// The console's writer.
    pub fn console(&self) -> &W {
        self.serial.writer()
    }

    /// Gives the console's writer back.
    pub fn take_console(self) -> W {
        self.serial.into_writer()
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
            // No device: the bus floats high.
            _ => 0xff,
        };
        data.fill(value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_port_traffic_is_answered_or_ignored() {
        let mut p = Ports::new(Vec::new());
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
    }
}
