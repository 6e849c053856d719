//! Guests of the kit booted on /dev/kvm.

mod common;

use std::path::PathBuf;
use std::sync::OnceLock;

use common::Shared;
use vmm::{Exit, Vm, VmError};

/// The kit, built once per test run into the workspace's target directory.
fn image(name: &str) -> Vec<u8> {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let target = vmm::kit::target_dir();
        vmm::kit::build("memtest", &target).expect("guest kit builds");
        target
    });
    std::fs::read(dir.join("release").join(name)).expect("guest image")
}

#[test]
fn memtest_fills_and_verifies_all_guest_ram() {
    let vm = Vm::new(64 << 20).unwrap();
    let (exit, console) = vm.run_image(&image("memtest"), 1, Vec::new()).unwrap();
    let console = String::from_utf8(console).unwrap();
    assert_eq!(exit, Exit::Status(0), "console:\n{console}");
    // RAM from the first 2 MiB boundary above the image (4 MiB) to the stack (1 MiB below the top).
    assert!(
        console.contains("memtest: 59 MiB") && console.contains("memtest: ok"),
        "{console}"
    );
}

#[test]
fn memtest_on_every_vcpu_at_once() {
    for vcpus in [2u8, 4] {
        let vm = Vm::new(64 << 20).unwrap();
        let (exit, console) = vm.run_image(&image("memtest"), vcpus, Vec::new()).unwrap();
        let console = String::from_utf8(console).unwrap();
        assert_eq!(exit, Exit::Status(0), "console:\n{console}");
        assert!(
            console.contains(&format!("on {vcpus} vCPUs")) && console.contains("memtest: ok"),
            "{console}"
        );
    }
    let vm = Vm::new(8 << 20).unwrap();
    assert!(matches!(
        vm.run_image(&image("memtest"), 17, Vec::new()),
        Err(VmError::Vcpus(17))
    ));
}

#[test]
fn a_crashing_guest_stops_the_vm_with_its_registers() {
    let vm = Vm::new(8 << 20).unwrap();
    match vm.run_image(&image("fault"), 1, Vec::new()) {
        Err(VmError::Guest { what, regs, .. }) => {
            assert!(what.contains("triple fault"), "{what}");
            assert!(
                regs.contains("rip=0x20") && regs.contains("cs=0x23"),
                "{regs}"
            );
        }
        other => panic!("expected a guest error, got {other:?}"),
    }
}

#[test]
fn bad_images_and_sizes_are_refused_clearly() {
    assert!(matches!(Vm::new(1 << 20), Err(VmError::RamSize(_))));
    assert!(matches!(Vm::new((64 << 20) + 1), Err(VmError::RamSize(_))));
    let vm = Vm::new(4 << 20).unwrap();
    // Not an ELF file.
    let e = vm.run_image(b"not an image", 1, Vec::new()).unwrap_err();
    assert!(e.to_string().contains("loading the guest image"), "{e}");
    // An image that does not fit: memtest is linked at 2 MiB, so 2 MiB of RAM is too little.
    let vm = Vm::new(2 << 20).unwrap();
    let e = vm.run_image(&image("memtest"), 1, Vec::new()).unwrap_err();
    assert!(
        matches!(e, VmError::Load(vmm::loader::LoadError::OutOfRange { .. })),
        "{e}"
    );
}

#[test]
fn console_input_reaches_the_guest_and_ctrl_a_x_quits() {
    use std::io::Write;
    use std::os::fd::AsFd;

    let (reader, mut writer) = std::io::pipe().unwrap();
    // More than the UART's 64-byte FIFO: the rest must wait for the guest to read, not drop.
    let long = "x".repeat(100);
    let typed = format!("hello\n{long}\nworld\n\x04");
    writer.write_all(typed.as_bytes()).unwrap();
    let vm = Vm::new(8 << 20).unwrap();
    let (exit, console) = vm
        .run_image_with_input(&image("echo"), 1, Vec::new(), Some(reader.as_fd()))
        .unwrap();
    let console = String::from_utf8(console).unwrap();
    assert_eq!(exit, Exit::Status(3), "console:\n{console}");
    assert!(
        console.contains("echo: hello\n")
            && console.contains(&format!("echo: {long}\n"))
            && console.contains("echo: world\n"),
        "{console}"
    );

    // Ctrl-A x ends a guest that would otherwise wait for input for ever; Ctrl-A Ctrl-A types
    // one Ctrl-A, which the guest echoes. The quit is typed once the echo is seen.
    writer.write_all(b"a\x01\x01b\n").unwrap();
    let seen = Shared::default();
    let vm = Vm::new(8 << 20).unwrap();
    let exit = std::thread::scope(|s| {
        s.spawn(|| {
            while !seen.text().contains("echo: a\u{1}b\n") {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            writer.write_all(b"\x01x").unwrap();
        });
        vm.run_image_with_input(&image("echo"), 1, seen.clone(), Some(reader.as_fd()))
            .unwrap()
            .0
    });
    assert_eq!(exit, Exit::Quit, "{}", seen.text());
}

#[test]
fn ctrl_a_x_ends_a_guest_that_never_reads_its_console() {
    use std::io::Write;
    use std::os::fd::AsFd;

    let (reader, mut writer) = std::io::pipe().unwrap();
    // Far more than the UART's FIFO and the VMM's backlog, which the guest never reads; the
    // escape at the end must still be seen.
    writer.write_all(&vec![b'y'; 20_000]).unwrap_or(());
    let seen = Shared::default();
    let vm = Vm::new(8 << 20).unwrap();
    let exit = std::thread::scope(|s| {
        s.spawn(|| {
            while !seen.text().contains("idle: up") {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            writer.write_all(b"\x01x").unwrap();
        });
        vm.run_image_with_input(&image("idle"), 1, seen.clone(), Some(reader.as_fd()))
            .unwrap()
            .0
    });
    assert_eq!(exit, Exit::Quit);
}
