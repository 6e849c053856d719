//! Pause, capture and restore on /dev/kvm: a guest paused mid-run, its RAM copied and its
//! state captured, finishes where it is; a new VM given the copy and the state finishes too,
//! with the same result. This plain pause-and-copy snapshot is the reference that live
//! snapshots are tested against.

mod common;

use std::io::Write;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::Shared;
use vmm::{Control, Exit, StateError, Vm, VmError, VmState};

/// The kit, built once per test run.
fn image(name: &str) -> Vec<u8> {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let target = vmm::kit::target_dir();
        vmm::kit::build("memtest", &target).expect("guest kit builds");
        target
    });
    std::fs::read(dir.join("release").join(name)).expect("guest image")
}

/// A static ELF64's entry point.
fn entry(elf: &[u8]) -> u64 {
    u64::from_le_bytes(elf[24..32].try_into().unwrap())
}

/// A copy of all of guest RAM (the VM's vCPUs must not be running).
fn copy_ram(vm: &Vm) -> Vec<u8> {
    let (start, len) = vm.ram_host_range();
    // SAFETY: guest RAM is mapped for `len` bytes while `vm` lives, and no vCPU writes it
    // while the VM is paused.
    unsafe { std::slice::from_raw_parts(start, len) }.to_vec()
}

/// Writes `data` over all of a new VM's guest RAM (no vCPU runs yet).
fn write_ram(vm: &Vm, data: &[u8]) {
    let (start, len) = vm.ram_host_range();
    assert_eq!(len, data.len());
    // SAFETY: guest RAM is mapped for `len` bytes while `vm` lives; nothing else uses it yet.
    unsafe { std::slice::from_raw_parts_mut(start, len) }.copy_from_slice(data);
}

/// Waits until the run under `control` has entered the guest.
fn wait_for_entry(control: &Control) {
    let t = Instant::now();
    while control.first_entry().is_none() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the guest never started"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Waits until both vCPUs of an idle guest have printed their line (maybe interleaved).
fn wait_for_two_lines(console: &Shared) {
    let t = Instant::now();
    while console.text().matches('\n').count() < 2 {
        assert!(t.elapsed() < Duration::from_secs(30), "{}", console.text());
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn wait_for_text(console: &Shared, text: &str) {
    let t = Instant::now();
    while !console.text().contains(text) {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no {text:?} on the console: {}",
            console.text()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

const MEMTEST_RAM: u64 = 256 << 20;

/// memtest paused mid-run: state captured and RAM copied (the plain pause-and-copy snapshot),
/// then resumed; it must pass, and so must a new VM restored from the copy and the state.
fn memtest_pause_copy_restore(vcpus: u8) {
    let memtest = image("memtest");
    let vm = Vm::new(MEMTEST_RAM).unwrap();
    let control = Arc::new(Control::new());
    let console = Shared::default();
    let (out, snap) = std::thread::scope(|s| {
        let snapper = s.spawn(|| {
            wait_for_entry(&control);
            // memtest takes about 0.8 s on one vCPU and 0.4 s on two here, longer on a busy
            // host: 100 ms in, it is filling or checking.
            std::thread::sleep(Duration::from_millis(100));
            let paused = control.pause(Duration::from_secs(5)).expect("pause");
            let before = console.text();
            let ram = copy_ram(&vm);
            let copied = paused.elapsed();
            let (total, state) = paused.resume();
            (state, ram, before, copied, total)
        });
        let out = vm.run_image_ctl(&memtest, vcpus, console.clone(), None, Some(&control));
        (out, snapper.join().unwrap())
    });
    let (state, ram, before, copied, total) = snap;
    let (exit, _) = out.unwrap();
    assert_eq!(exit, Exit::Status(0), "{}", console.text());
    assert!(console.text().contains("memtest: ok"), "{}", console.text());
    assert!(
        !before.contains("memtest:"),
        "paused too late, memtest had finished: {before}"
    );
    eprintln!(
        "memtest on {vcpus} vCPUs: paused, copied {} MiB in {copied:?}, resumed after {total:?}; \
         KVM gave no {:?}",
        ram.len() >> 20,
        state.vcpus[0].missing()
    );
    assert_eq!(state.vcpus.len(), usize::from(vcpus));
    assert_eq!(state.ram, MEMTEST_RAM);
    assert!(
        state.vcpus.iter().all(|v| v.regs.rip != entry(&memtest)),
        "captured mid-run, not at the entry"
    );

    // Through the byte format, onto a new VM with the copied RAM.
    let state = VmState::from_bytes(&state.to_bytes()).unwrap();
    let restored = Vm::new(MEMTEST_RAM).unwrap();
    write_ram(&restored, &ram);
    let control = Arc::new(Control::new());
    let t = Instant::now();
    let (exit, text) = restored
        .restore_image_ctl(&state, Vec::new(), None, Some(&control))
        .unwrap();
    let text = String::from_utf8(text).unwrap();
    let first = control.first_entry().expect("the restored guest ran");
    eprintln!(
        "memtest on {vcpus} vCPUs: restored, first guest entry {:?} after the restore call, \
         finished in {:?}",
        first - t,
        t.elapsed()
    );
    assert_eq!(exit, Exit::Status(0), "restored console:\n{text}");
    assert!(
        text.contains("memtest: ok") && text.contains(&format!("on {vcpus} vCPUs")),
        "{text}"
    );

    // The restored guest checks what it wrote before the pause: with one word of the copy
    // spoiled in every MiB of the tested RAM, it finds a mismatch (some spoiled word always
    // lies where it has written and not yet read back).
    let restored = Vm::new(MEMTEST_RAM).unwrap();
    let mut spoiled = ram;
    for mib in 4..(MEMTEST_RAM >> 20) - 1 {
        let at = usize::try_from((mib << 20) + 4096 * (mib % 256)).unwrap();
        spoiled[at] ^= 0x5a;
    }
    write_ram(&restored, &spoiled);
    let (exit, text) = restored
        .restore_image_ctl(&state, Vec::new(), None, None)
        .unwrap();
    let text = String::from_utf8(text).unwrap();
    assert_eq!(
        exit,
        Exit::Status(1),
        "spoiled copy, restored console:\n{text}"
    );
    assert!(text.contains("memtest: mismatch at"), "{text}");
}

#[test]
fn memtest_paused_copied_and_restored_on_one_vcpu() {
    memtest_pause_copy_restore(1);
}

#[test]
fn memtest_paused_copied_and_restored_on_two_vcpus() {
    memtest_pause_copy_restore(2);
}

#[test]
fn restore_checks_the_state_against_the_vm() {
    // A real state, from an idle guest.
    let vm = Vm::new(8 << 20).unwrap();
    let control = Arc::new(Control::new());
    let console = Shared::default();
    let (out, state) = std::thread::scope(|s| {
        let pauser = s.spawn(|| {
            wait_for_text(&console, "idle: up");
            let state = control.pause(Duration::from_secs(5)).unwrap().resume().1;
            control.abort("done".into());
            state
        });
        let out = vm.run_image_ctl(&image("idle"), 1, console.clone(), None, Some(&control));
        (out, pauser.join().unwrap())
    });
    assert!(matches!(out, Err(VmError::Aborted(_))), "{out:?}");
    // Once the run is over there is nothing to pause.
    assert!(matches!(
        control.pause(Duration::from_secs(1)),
        Err(VmError::NotRunning)
    ));

    let other = Vm::new(16 << 20).unwrap();
    let e = other
        .restore_image_ctl(&state, Vec::new(), None, None)
        .unwrap_err();
    assert!(matches!(e, VmError::RestoreRam { .. }), "{e}");
    assert!(e.to_string().contains("8388608 bytes of RAM"), "{e}");
    let mut none = state.clone();
    none.vcpus.clear();
    let e = Vm::new(8 << 20)
        .unwrap()
        .restore_image_ctl(&none, Vec::new(), None, None)
        .unwrap_err();
    assert!(matches!(e, VmError::RestoreVcpus(0)), "{e}");
    let mut misnumbered = state.clone();
    misnumbered.vcpus[0].id = 3;
    let e = Vm::new(8 << 20)
        .unwrap()
        .restore_image_ctl(&misnumbered, Vec::new(), None, None)
        .unwrap_err();
    assert!(
        matches!(e, VmError::RestoreVcpuId { index: 0, id: 3 }),
        "{e}"
    );
    let mut fifo = state.clone();
    fifo.devices.serial.in_buffer = vec![b'x'; 65];
    let e = Vm::new(8 << 20)
        .unwrap()
        .restore_image_ctl(&fifo, Vec::new(), None, None)
        .unwrap_err();
    assert!(matches!(e, VmError::RestoreSerial(_)), "{e}");

    // The state alone is not the VM: restored over zeroed RAM (no page tables, no code), the
    // guest crashes at once, as it must.
    let e = Vm::new(8 << 20)
        .unwrap()
        .restore_image_ctl(&state, Vec::new(), None, None)
        .unwrap_err();
    assert!(matches!(e, VmError::Guest { .. }), "{e}");
}

#[test]
fn pause_and_resume_twenty_times_is_quick() {
    // Two vCPUs spinning in the guest, never exiting on their own.
    let vm = Vm::new(8 << 20).unwrap();
    let control = Arc::new(Control::new());
    let console = Shared::default();
    let (out, (took, total)) = std::thread::scope(|s| {
        let pauser = s.spawn(|| {
            wait_for_two_lines(&console);
            let (mut took, mut total) = (Vec::new(), Vec::new());
            for _ in 0..20 {
                std::thread::sleep(Duration::from_millis(5));
                let paused = control.pause(Duration::from_secs(5)).expect("pause");
                took.push(paused.took());
                assert_eq!(paused.state().vcpus.len(), 2);
                total.push(paused.resume().0);
            }
            control.abort("done".into());
            (took, total)
        });
        let out = vm.run_image_ctl(&image("idle"), 2, console.clone(), None, Some(&control));
        (out, pauser.join().unwrap())
    });
    assert!(matches!(out, Err(VmError::Aborted(_))), "{out:?}");
    assert_eq!(control.parks(), 40);
    let downtime = control.parked() / 40;
    let median = |mut v: Vec<Duration>| {
        v.sort();
        (v[v.len() / 2], v[v.len() - 1])
    };
    let ((took_med, took_max), (total_med, total_max)) = (median(took), median(total));
    eprintln!(
        "pause of 2 spinning vCPUs, 20 times: pause median {took_med:?} (max {took_max:?}), \
         pause+resume median {total_med:?} (max {total_max:?}); each vCPU kept from the \
         guest {downtime:?} a pause on average (pause call to its return to KVM_RUN)"
    );
    assert!(total_med < Duration::from_millis(50), "{total_med:?}");
}

#[test]
fn a_vcpu_in_a_pacing_sleep_parks_at_once() {
    // The hostile guest sleeps 100 ms at a time; a pause must not wait for the sleep to end.
    let vm = Vm::new(8 << 20).unwrap();
    let control = Arc::new(Control::new());
    let console = Shared::default();
    let (out, took) = std::thread::scope(|s| {
        let pauser = s.spawn(|| {
            wait_for_text(&console, "hostile: sleeping");
            let mut took = Vec::new();
            for _ in 0..5 {
                std::thread::sleep(Duration::from_millis(30));
                let paused = control.pause(Duration::from_secs(5)).expect("pause");
                took.push(paused.took());
                drop(paused); // resumes
            }
            control.request_stop();
            took
        });
        let out = vm.run_image_ctl(&image("hostile"), 1, console.clone(), None, Some(&control));
        (out, pauser.join().unwrap())
    });
    let (exit, _) = out.unwrap();
    assert_eq!(exit, Exit::Status(0), "{}", console.text());
    eprintln!("pauses of a sleeping vCPU took {took:?}");
    assert!(
        took.iter().all(|t| *t < Duration::from_millis(50)),
        "{took:?}"
    );
}

#[test]
fn echo_restored_keeps_its_lines_and_console() {
    // The echo guest counts the lines it echoed in guest memory; the restored copy goes on
    // counting from there, and reads its console through the restored UART.
    let (reader, mut writer) = std::io::pipe().unwrap();
    writer.write_all(b"hello\n").unwrap();
    let vm = Vm::new(8 << 20).unwrap();
    let control = Arc::new(Control::new());
    let console = Shared::default();
    let (out, (state, ram)) = std::thread::scope(|s| {
        let snapper = s.spawn(|| {
            wait_for_text(&console, "echo: hello\n");
            let paused = control.pause(Duration::from_secs(5)).expect("pause");
            let ram = copy_ram(&vm);
            let state = paused.resume().1;
            writer.write_all(b"\x04").unwrap();
            (state, ram)
        });
        let out = vm.run_image_ctl(
            &image("echo"),
            1,
            console.clone(),
            Some(reader.as_fd()),
            Some(&control),
        );
        (out, snapper.join().unwrap())
    });
    assert_eq!(out.unwrap().0, Exit::Status(1), "{}", console.text());

    let bytes = state.to_bytes();
    let state = VmState::from_bytes(&bytes).unwrap();
    let restored = Vm::new(8 << 20).unwrap();
    write_ram(&restored, &ram);
    let (reader, mut writer) = std::io::pipe().unwrap();
    writer.write_all(b"world\n\x04").unwrap();
    let (exit, text) = restored
        .restore_image_ctl(&state, Vec::new(), Some(reader.as_fd()), None)
        .unwrap();
    let text = String::from_utf8(text).unwrap();
    assert_eq!(exit, Exit::Status(2), "restored console:\n{text}");
    assert_eq!(text, "echo: world\n");
}

/// A console writer that blocks while its gate is shut.
#[derive(Debug, Clone)]
struct Gate {
    shut: Arc<(Mutex<bool>, Condvar)>,
    out: Shared,
}

impl Gate {
    fn new() -> Gate {
        Gate {
            shut: Arc::new((Mutex::new(true), Condvar::new())),
            out: Shared::default(),
        }
    }
    fn open(&self) {
        *self.shut.0.lock().unwrap() = false;
        self.shut.1.notify_all();
    }
}

impl Write for Gate {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut shut = self.shut.0.lock().unwrap();
        while *shut {
            shut = self.shut.1.wait(shut).unwrap();
        }
        self.out.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_pause_that_cannot_finish_gives_up_and_the_vm_runs_on() {
    // The guest's first console write blocks (the gate is shut), so its vCPU cannot park.
    let (reader, mut writer) = std::io::pipe().unwrap();
    let vm = Vm::new(8 << 20).unwrap();
    let control = Arc::new(Control::new());
    let gate = Gate::new();
    let out = std::thread::scope(|s| {
        s.spawn(|| {
            wait_for_entry(&control);
            std::thread::sleep(Duration::from_millis(20));
            let t = Instant::now();
            let e = control.pause(Duration::from_millis(50)).unwrap_err();
            assert!(
                matches!(
                    e,
                    VmError::PauseTimeout {
                        parked: 0,
                        vcpus: 1,
                        ..
                    }
                ),
                "{e}"
            );
            assert!(e.to_string().contains("the VM runs on"), "{e}");
            assert!(t.elapsed() < Duration::from_secs(2));
            // The VM runs on: open the gate, and it answers its console.
            gate.open();
            writer.write_all(b"one\n").unwrap();
            wait_for_text(&gate.out, "echo: one\n");
            // And pauses twice in a row, sequentially.
            for _ in 0..2 {
                let p = control.pause(Duration::from_secs(5)).unwrap();
                assert!(matches!(
                    control.pause(Duration::from_secs(1)),
                    Err(VmError::AlreadyPaused)
                ));
                drop(p);
            }
            writer.write_all(b"\x04").unwrap();
        });
        vm.run_image_ctl(
            &image("echo"),
            1,
            gate.clone(),
            Some(reader.as_fd()),
            Some(&control),
        )
    });
    assert_eq!(out.unwrap().0, Exit::Status(1), "{}", gate.out.text());

    // A VM that ends while it is being paused: the pause says so, and nothing hangs.
    let vm = Vm::new(8 << 20).unwrap();
    let control = Arc::new(Control::new());
    let gate = Gate::new();
    let pausing = std::sync::atomic::AtomicBool::new(false);
    let out = std::thread::scope(|s| {
        let pauser = s.spawn(|| {
            wait_for_entry(&control);
            std::thread::sleep(Duration::from_millis(20));
            pausing.store(true, std::sync::atomic::Ordering::SeqCst);
            let t = Instant::now();
            (control.pause(Duration::from_secs(30)), t)
        });
        s.spawn(|| {
            while !pausing.load(std::sync::atomic::Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
            }
            std::thread::sleep(Duration::from_millis(50));
            control.abort("ended while pausing".into());
            let (e, t) = pauser.join().unwrap();
            let e = e.unwrap_err();
            assert!(matches!(e, VmError::PauseEnded), "{e}");
            assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
            gate.open();
        });
        vm.run_image_ctl(&image("echo"), 1, gate.clone(), None, Some(&control))
    });
    assert!(matches!(out, Err(VmError::Aborted(_))), "{out:?}");
}

#[test]
fn a_captured_state_survives_its_byte_format_and_hostile_copies_do_not() {
    let vm = Vm::new(8 << 20).unwrap();
    let control = Arc::new(Control::new());
    let console = Shared::default();
    let (_, state) = std::thread::scope(|s| {
        let pauser = s.spawn(|| {
            wait_for_two_lines(&console);
            let state = control.pause(Duration::from_secs(5)).unwrap().resume().1;
            control.abort("done".into());
            state
        });
        let out = vm.run_image_ctl(&image("idle"), 2, console.clone(), None, Some(&control));
        (out, pauser.join().unwrap())
    });
    let bytes = state.to_bytes();
    eprintln!("a 2-vCPU state is {} bytes", bytes.len());
    let back = VmState::from_bytes(&bytes).unwrap();
    assert_eq!(back.to_bytes(), bytes);
    assert_eq!(back.vcpus[1].regs, state.vcpus[1].regs);
    assert_eq!(back.vcpus[1].sregs, state.vcpus[1].sregs);
    assert_eq!(back.vcpus[0].msrs, state.vcpus[0].msrs);
    assert_eq!(back.devices, state.devices);
    assert!(!state.vcpus[0].msrs.is_empty());
    // Truncations and bit flips all over: errors, named, never a panic.
    for n in (0..bytes.len()).step_by(7) {
        assert!(VmState::from_bytes(&bytes[..n]).is_err());
    }
    for i in (0..bytes.len()).step_by(3) {
        let mut b = bytes.clone();
        b[i] ^= 0x40;
        assert!(VmState::from_bytes(&b).is_err(), "flip at {i}");
    }
    let mut b = bytes.clone();
    let last = b.len() - 1;
    b[last] ^= 1;
    assert!(matches!(
        VmState::from_bytes(&b),
        Err(StateError::Checksum { .. })
    ));
}
