//! Unmodified Linux (Debian's kernel) booted by memvisor on hardware-style KVM: the nested
//! harness (`memvisor nested`) runs QEMU's TCG emulator with emulated AMD SVM, loads kvm-amd
//! in it, and runs `memvisor run` on Debian's kernel with a busybox initramfs there. Each test
//! is one whole QEMU run, some 20 to 40 s.

use std::process::Command;

/// Runs `memvisor nested` and returns its exit status and console, carriage returns taken
/// out (both the inner and the outer guest's tty turn LF into CR LF, so lines end in CR CR LF).
fn nested(vcpus: u8, elf: bool, command: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_memvisor"))
        .args(["nested", "--vcpus", &vcpus.to_string(), "--timeout", "340"])
        .args(elf.then_some("--elf"))
        .arg("--")
        .args(command)
        .output()
        .unwrap();
    let console = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
    .replace('\r', "");
    (out.status.code(), console)
}

#[test]
fn linux_boots_from_its_elf_vmlinux_to_a_shell_command_on_one_vcpu_and_powers_off() {
    let (status, console) = nested(1, true, &["uname", "-sr"]);
    assert_eq!(status, Some(0), "{console}");
    assert!(
        console.contains("memvisor-nested: /dev/kvm is up"),
        "{console}"
    );
    // The inner kernel saw memvisor's boot structures: its e820 map and command line.
    assert!(
        console.contains("BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable"),
        "{console}"
    );
    assert!(console.contains("Command line: console=ttyS0"), "{console}");
    assert!(console.contains("memvisor-guest: up, 1 CPUs"), "{console}");
    // The command ran in the inner guest's userspace and its output came out of the console.
    assert!(console.contains("\nLinux 6.1."), "{console}");
    assert!(console.contains("memvisor-guest: exit 0"), "{console}");
    assert!(console.contains("memvisor-nested: exit 0"), "{console}");
}

/// The bzImage path, with its own decompressor, on two vCPUs.
#[test]
fn linux_brings_up_a_second_vcpu_from_the_mp_table() {
    let (status, console) = nested(2, false, &["grep", "-c", "^processor", "/proc/cpuinfo"]);
    assert_eq!(status, Some(0), "{console}");
    assert!(console.contains("MPTABLE: OEM ID: MEMVISOR"), "{console}");
    assert!(
        console.contains("smp: Brought up 1 node, 2 CPUs"),
        "{console}"
    );
    assert!(console.contains("memvisor-guest: up, 2 CPUs"), "{console}");
    assert!(console.contains("\n2\n"), "{console}");
}

#[test]
fn the_guest_commands_status_and_a_kernel_panic_reach_the_caller() {
    let (status, console) = nested(1, false, &["sh", "-c", "exit 7"]);
    assert_eq!(status, Some(7), "{console}");
    assert!(console.contains("memvisor-guest: exit 7"), "{console}");

    let (status, console) = nested(1, false, &["sh", "-c", "echo c > /proc/sysrq-trigger"]);
    assert_eq!(status, Some(1), "{console}");
    assert!(console.contains("Kernel panic - not syncing"), "{console}");
    assert!(
        console.contains("error: the guest kernel panicked"),
        "{console}"
    );
}

/// With no command the inner guest starts a busybox shell on its console, and what is typed
/// into `memvisor nested` reaches it: through QEMU's serial line, the outer guest's console,
/// and memvisor's console input into the inner guest's 16550.
#[test]
fn linux_boots_to_a_busybox_shell_that_takes_typed_commands() {
    use std::io::{Read, Write};
    use std::sync::{Arc, Mutex};

    let mut child = Command::new(env!("CARGO_BIN_EXE_memvisor"))
        .args(["nested", "--timeout", "340"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let console = Arc::new(Mutex::new(String::new()));
    let reader = {
        let console = Arc::clone(&console);
        let mut out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = out.read(&mut buf) {
                console
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    };
    let wait_for = |what: &str| {
        let start = std::time::Instant::now();
        while !console.lock().unwrap().contains(what) {
            assert!(
                start.elapsed().as_secs() < 340,
                "no {what:?} on the console:\n{}",
                console.lock().unwrap()
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    };
    wait_for("a shell on the console");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"echo shell-$((6*7))\n").unwrap();
    wait_for("shell-42");
    stdin.write_all(b"reboot -f\n").unwrap();
    let status = child.wait().unwrap();
    reader.join().unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let console = console.lock().unwrap().clone();
    assert_eq!(status.code(), Some(0), "{console}\n{stderr}");
    assert!(console.contains(": Reset"), "{console}");
}
