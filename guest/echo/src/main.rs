//! echo: prints each line typed on the console back as "echo: LINE", and on Ctrl-D (end of
//! transmission) exits with the number of lines as its status. It proves console input
//! reaches the guest through the 16550's receive FIFO.
#![no_std]
#![no_main]

kit::entry!(main);

fn main(_: kit::Boot) -> u8 {
    kit::print("echo: ready\n");
    let mut lines: u8 = 0;
    let mut line = [0u8; 128];
    let mut len = 0;
    loop {
        match kit::read_byte() {
            0x04 => return lines,
            b'\n' | b'\r' => {
                kit::print("echo: ");
                for &b in &line[..len] {
                    kit::print_byte(b);
                }
                kit::print("\n");
                lines = lines.wrapping_add(1);
                len = 0;
            }
            b if len < line.len() => {
                line[len] = b;
                len += 1;
            }
            _ => {}
        }
    }
}
