//! Guests of the kit booted on /dev/kvm.

use std::path::PathBuf;
use std::sync::OnceLock;

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
