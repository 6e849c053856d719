//! idle: prints one line, then spins for ever, never reading its console. It shows that the
//! VMM's own controls (Ctrl-A x) end a guest that ignores its input.
#![no_std]
#![no_main]

kit::entry!(main);

fn main(_: kit::Boot) -> u8 {
    kit::print("idle: up\n");
    kit::park()
}
