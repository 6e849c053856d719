//! The replay guest on real memory images, and the host's controls over a running guest
//! (progress, stop, pacing, abort), booted on /dev/kvm.

mod common;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use common::Shared;
use vmm::{Control, Exit, ReplayParams, Vm, VmError, replay_ram_size};

const PAGE: usize = 4096;

/// The kit, built once per test run into the workspace's target directory.
fn image(name: &str) -> Vec<u8> {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let target = vmm::kit::target_dir();
        vmm::kit::build("replay", &target).expect("guest kit builds");
        target
    });
    std::fs::read(dir.join("release").join(name)).expect("guest image")
}

/// A real memory image of `len` bytes: this test process's own memory, every readable mapping
/// in address order as /proc/self/mem gives it (code, data, heap, stacks: content and zero
/// pages as a live process has them), then, if that is short, the test binary's file bytes,
/// then zeros.
fn real_image(len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut out = Vec::with_capacity(len);
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let mem = std::fs::File::open("/proc/self/mem").unwrap();
    let mut buf = vec![0u8; 1 << 20];
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms)) = (f.next(), f.next()) else {
            continue;
        };
        if !perms.starts_with('r') || line.ends_with("[vvar]") || line.ends_with("[vsyscall]") {
            continue;
        }
        let (a, b) = range.split_once('-').unwrap();
        let (mut a, b) = (
            u64::from_str_radix(a, 16).unwrap(),
            u64::from_str_radix(b, 16).unwrap(),
        );
        while a < b && out.len() < len {
            let n = usize::try_from(b - a).unwrap_or(usize::MAX).min(buf.len());
            let n = n.min(len - out.len());
            match mem.read_at(&mut buf[..n], a) {
                Ok(got) if got > 0 => {
                    let got = got / PAGE * PAGE;
                    if got == 0 {
                        break;
                    }
                    out.extend_from_slice(&buf[..got]);
                    a += got as u64;
                }
                _ => break,
            }
        }
    }
    if out.len() < len {
        let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let take = (len - out.len()).min(exe.len() / PAGE * PAGE);
        out.extend_from_slice(&exe[..take]);
    }
    out.resize(len, 0);
    out
}

fn zero(page: &[u8]) -> bool {
    page.iter().all(|&b| b == 0)
}

/// Which pages of `len` bytes at `start` (page-aligned) are resident on the host.
fn resident(start: *mut u8, len: usize) -> Vec<bool> {
    let mut vec = vec![0u8; len.div_ceil(PAGE)];
    // SAFETY: `start..start + len` is guest RAM, mapped for as long as the VM lives (the
    // caller holds it); mincore only reports on it, into `vec`, one byte per page.
    let r = unsafe { libc::mincore(start.cast(), len, vec.as_mut_ptr()) };
    assert_eq!(r, 0, "mincore: {}", std::io::Error::last_os_error());
    vec.iter().map(|v| v & 1 != 0).collect()
}

/// Waits up to 20 s for `done`; aborts the VM (so the test fails, not hangs) if it never is.
fn wait_for(control: &Control, what: &str, done: impl Fn() -> bool) {
    let t = Instant::now();
    while !done() {
        if t.elapsed() > Duration::from_secs(20) {
            control.abort(format!("test timed out waiting for {what}"));
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn replay_walks_a_real_image_and_stops_on_request() {
    let data = real_image(8 << 20);
    let content = data.chunks(PAGE).filter(|p| !zero(p)).count();
    let zeros = data.len() / PAGE - content;
    assert!(content > 100 && zeros > 0, "{content} pages with content");

    let vm = Vm::new(replay_ram_size(data.len() as u64)).unwrap();
    let (ram, ram_len) = vm.ram_host_range();
    assert_eq!(ram_len as u64, replay_ram_size(data.len() as u64));
    let base = usize::try_from(vmm::replay::DATA_BASE).unwrap();
    // SAFETY: the data range lies inside guest RAM (checked just above), mapped for the VM's
    // life; `ram + base` stays inside that mapping.
    let data_host = unsafe { ram.add(base) };
    // No transparent huge pages here: one written page must not bring in its neighbours.
    // SAFETY: advice on guest RAM's own mapping, which stays valid; it changes no content.
    let r = unsafe { libc::madvise(ram.cast(), ram_len, libc::MADV_NOHUGEPAGE) };
    assert_eq!(r, 0);
    let params = ReplayParams {
        duty_pct: 100,
        ..ReplayParams::default()
    };
    let written = vm.load_replay(&data, &params).unwrap();
    assert_eq!(written, content as u64);
    let is_zero: Vec<bool> = data.chunks(PAGE).map(zero).collect();
    let before = resident(data_host, data.len());
    for (i, z) in is_zero.iter().enumerate() {
        assert_eq!(
            before[i], !z,
            "page {i}: only pages with content are written"
        );
    }

    let control = Arc::new(Control::new());
    let console = Shared::default();
    let t = Instant::now();
    let out = std::thread::scope(|s| {
        s.spawn(|| {
            wait_for(&control, "10 rounds", || control.rounds() >= 10);
            control.request_stop();
        });
        vm.run_image_ctl(&image("replay"), 1, console.clone(), None, Some(&control))
    });
    let text = console.text();
    let (exit, _) = out.unwrap_or_else(|e| panic!("{e}\n{text}"));
    let rounds = control.rounds();
    assert_eq!(exit, Exit::Status(0), "{text}");
    assert!(rounds >= 10, "{rounds} rounds\n{text}");
    assert!(
        text.contains(&format!("{content} with content")) && text.contains("stopped after"),
        "{text}"
    );
    eprintln!(
        "replay: {content} of {} pages with content, {rounds} rounds in {:?}",
        data.len() / PAGE,
        t.elapsed()
    );
    // KVM's own counters of the run, read after it: the guest exited (its port I/O at least
    // once a round), and KVM mapped the pages it touched, each on a page fault of its own.
    let kvm = control
        .kvm_counters()
        .expect("this kernel has vCPU statistics");
    assert!(kvm.exits >= rounds, "{kvm:?}");
    assert!(kvm.pf_taken > 0 && kvm.pf_fixed > 0, "{kvm:?}");
    assert!(kvm.pf_fixed <= kvm.pf_taken, "{kvm:?}");
    assert_eq!(
        control.kvm_counters(),
        Some(kvm),
        "the run is over: nothing moves"
    );

    // The guest never touched a zero page (none was brought in), and changed only hot pages,
    // each in one word, by one per round: about 10% of the pages with content.
    let after = resident(data_host, data.len());
    let mut modified = 0;
    for (i, page) in data.chunks(PAGE).enumerate() {
        if is_zero[i] {
            assert!(!after[i], "zero page {i} was touched");
            continue;
        }
        // SAFETY: page `i` of the data range, inside guest RAM; the VM is not running.
        let now = unsafe { std::slice::from_raw_parts(data_host.add(i * PAGE), PAGE) };
        let differ: Vec<usize> = (0..PAGE / 8)
            .filter(|w| now[w * 8..w * 8 + 8] != page[w * 8..w * 8 + 8])
            .collect();
        assert!(differ.len() <= 1, "page {i}: words {differ:?} changed");
        if let [w] = differ[..] {
            let was = u64::from_le_bytes(page[w * 8..w * 8 + 8].try_into().unwrap());
            let is = u64::from_le_bytes(now[w * 8..w * 8 + 8].try_into().unwrap());
            assert_eq!(is, was.wrapping_add(rounds), "page {i} word {w}");
            modified += 1;
        }
    }
    let share = modified as f64 / content as f64;
    assert!((0.07..0.13).contains(&share), "{modified} of {content} hot");
}

#[test]
fn replay_on_several_vcpus_stops_on_request() {
    let data = real_image(8 << 20);
    let vm = Vm::new(replay_ram_size(data.len() as u64)).unwrap();
    vm.load_replay(&data, &ReplayParams::default()).unwrap();
    let control = Arc::new(Control::new());
    let console = Shared::default();
    let out = std::thread::scope(|s| {
        s.spawn(|| {
            wait_for(&control, "100 rounds", || control.rounds() >= 100);
            control.request_stop();
        });
        vm.run_image_ctl(&image("replay"), 3, console.clone(), None, Some(&control))
    });
    let text = console.text();
    let (exit, _) = out.unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(exit, Exit::Status(0), "{text}");
    assert!(
        text.contains("3 vCPUs") && text.contains("stopped after"),
        "{text}"
    );
}

/// One replay guest's pacing, measured over a window.
#[derive(Debug, Clone, Copy, Default)]
struct Rate {
    /// Rounds per second.
    rounds: f64,
    /// The share of the time it slept (as long as the host took to run it again).
    asleep: f64,
    /// The sleep it asked for over the time it did not sleep: (100 − duty) / duty.
    asked_per_busy: f64,
}

/// Runs one replay guest on `data` for each of `duties`, all at once (so that whatever else
/// loads the host's CPUs meanwhile falls on all alike), and measures them over the same
/// window: at least `secs` after a warm-up, and at least 50 work-and-sleep cycles of each
/// paced guest, so that a cycle cut by the window's ends counts little.
fn rates(data: &[u8], duties: &[u8], secs: f64) -> Vec<Rate> {
    let vms: Vec<(Vm, Arc<Control>, Shared)> = duties
        .iter()
        .map(|&duty| {
            let vm = Vm::new(replay_ram_size(data.len() as u64)).unwrap();
            let params = ReplayParams {
                duty_pct: duty,
                ..ReplayParams::default()
            };
            vm.load_replay(data, &params).unwrap();
            (vm, Arc::new(Control::new()), Shared::default())
        })
        .collect();
    let controls: Vec<&Control> = vms.iter().map(|(_, c, _)| &**c).collect();
    let image = image("replay");
    std::thread::scope(|s| {
        for (vm, control, console) in &vms {
            let image = &image;
            s.spawn(move || {
                let (exit, _) = vm
                    .run_image_ctl(image, 1, console.clone(), None, Some(control))
                    .unwrap_or_else(|e| panic!("{e}\n{}", console.text()));
                assert_eq!(exit, Exit::Status(0), "{}", console.text());
            });
        }
        // Warm up: the first rounds fault guest RAM into KVM's page tables, the warm pages a
        // slice a round, so twice through all the slices.
        let warm_up = 2 * u64::from(ReplayParams::default().warm_slices);
        for c in &controls {
            wait_for(c, "the warm-up", || c.rounds() >= warm_up);
        }
        std::thread::sleep(Duration::from_millis(50));
        let sample = |c: &Control| (c.rounds(), c.slept(), c.asked(), c.sleeps());
        let before: Vec<_> = controls.iter().map(|c| sample(c)).collect();
        let t0 = Instant::now();
        let paced = |i: usize| duties[i] < 100;
        while t0.elapsed().as_secs_f64() < secs
            || (t0.elapsed() < Duration::from_secs(20)
                && (0..controls.len()).any(|i| paced(i) && controls[i].sleeps() - before[i].3 < 50))
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        let t = t0.elapsed().as_secs_f64();
        let after: Vec<_> = controls.iter().map(|c| sample(c)).collect();
        for c in &controls {
            c.request_stop();
        }
        before
            .iter()
            .zip(&after)
            .map(|(b, a)| {
                let slept = (a.1 - b.1).as_secs_f64();
                Rate {
                    rounds: (a.0 - b.0) as f64 / t,
                    asleep: slept / t,
                    asked_per_busy: (a.2 - b.2).as_secs_f64() / (t - slept),
                }
            })
            .collect()
    })
}

#[test]
fn pacing_at_half_duty_halves_the_rounds() {
    let data = real_image(64 << 20);
    let r = rates(&data, &[100, 50], 1.5);
    let (full, half) = (r[0], r[1]);
    eprintln!(
        "replay, {} MiB image ({} pages with content), two guests at once: {:.0} rounds/s at \
         duty 100%, {:.0} at duty 50% (asleep {:.0}% of the time, asked {:.2} s of sleep per \
         busy s)",
        data.len() >> 20,
        data.chunks(PAGE).filter(|p| !zero(p)).count(),
        full.rounds,
        half.rounds,
        half.asleep * 100.0,
        half.asked_per_busy,
    );
    assert_eq!(full.asleep, 0.0, "duty 100% never sleeps");
    // Busy half the time: it asks for as much sleep as it worked, whatever slowed the work.
    assert!(
        (0.8..1.25).contains(&half.asked_per_busy),
        "{}",
        half.asked_per_busy
    );
    // So asleep about half the time (more when a loaded host wakes it late), and about half
    // the rounds, or fewer: a round of memory-bound work took 20 to 35% longer when the vCPU
    // idles half the time (measured one guest at a time on a quieter host: 0.31 to 0.47 of
    // the rounds, and 0.49 on a one-page image, whose work fits the caches; the two at once
    // on a host loaded by other work: 0.25 to 0.39).
    assert!((0.4..0.8).contains(&half.asleep), "asleep {}", half.asleep);
    // The rounds depend on everything else the host runs, so this is only a sanity check; the
    // pacing itself is checked above.
    let ratio = half.rounds / full.rounds;
    assert!(
        (0.1..0.75).contains(&ratio),
        "{} / {} rounds/s",
        half.rounds,
        full.rounds
    );
}

#[test]
fn abort_ends_a_guest_that_never_polls() {
    // Two vCPUs, both spinning inside KVM_RUN, never reading a port.
    let vm = Vm::new(8 << 20).unwrap();
    let control = Arc::new(Control::new());
    let console = Shared::default();
    let reason = "fault service failed: test".to_string();
    let (out, since_abort) = std::thread::scope(|s| {
        let aborted = s.spawn(|| {
            // Both vCPUs print their line (at once, so the two may interleave).
            wait_for(&control, "idle: up", || {
                console.text().matches('\n').count() == 2
            });
            std::thread::sleep(Duration::from_millis(50));
            control.abort(reason.clone());
            Instant::now()
        });
        let out = vm.run_image_ctl(&image("idle"), 2, console.clone(), None, Some(&control));
        (out, aborted.join().unwrap().elapsed())
    });
    match out {
        Err(VmError::Aborted(r)) => {
            assert_eq!(r, reason);
            let e = VmError::Aborted(r).to_string();
            assert!(e.contains("aborted") && e.contains(&reason), "{e}");
        }
        other => panic!("expected an abort, got {other:?}"),
    }
    eprintln!("abort: the run returned {since_abort:?} after the call");
    assert!(since_abort < Duration::from_secs(1), "{since_abort:?}");

    // Aborted before it starts: the run ends at once.
    let vm = Vm::new(8 << 20).unwrap();
    let control = Arc::new(Control::new());
    control.abort("never mind".into());
    let out = vm.run_image_ctl(&image("idle"), 1, Vec::new(), None, Some(&control));
    assert!(matches!(out, Err(VmError::Aborted(r)) if r == "never mind"));
}

#[test]
fn hostile_control_port_values_are_capped() {
    let vm = Vm::new(8 << 20).unwrap();
    let control = Arc::new(Control::new());
    let console = Shared::default();
    let (out, since_stop) = std::thread::scope(|s| {
        let stopped = s.spawn(|| {
            wait_for(&control, "hostile: sleeping", || {
                console.text().contains("hostile: sleeping")
            });
            // Sleep requests of 71 minutes each, capped at 100 ms: a few go by.
            std::thread::sleep(Duration::from_millis(350));
            control.request_stop();
            Instant::now()
        });
        let out = vm.run_image_ctl(&image("hostile"), 1, console.clone(), None, Some(&control));
        (out, stopped.join().unwrap().elapsed())
    });
    let (exit, _) = out.unwrap_or_else(|e| panic!("{e}\n{}", console.text()));
    assert_eq!(exit, Exit::Status(0), "{}", console.text());
    assert_eq!(control.rounds(), 3 * u64::from(u32::MAX) + 7);
    let (sleeps, slept) = (control.sleeps(), control.slept());
    assert!(sleeps >= 2, "{sleeps} sleeps");
    // 100 ms each, not 71 minutes: with room for a busy host to wake the thread late.
    let most = (vmm::control::MAX_PACE * 2) * u32::try_from(sleeps).unwrap();
    eprintln!(
        "hostile: {sleeps} sleeps of 2^32-1 µs took {slept:?}, stop seen after {since_stop:?}"
    );
    assert!(slept <= most, "{sleeps} sleeps took {slept:?}");
    // The stop is seen after at most one capped sleep.
    assert!(since_stop < Duration::from_secs(1), "{since_stop:?}");
}

#[test]
fn replay_setup_errors_are_clear() {
    let data = real_image(4 << 20);
    let vm = Vm::new(16 << 20).unwrap();
    let e = vm.load_replay(&data, &ReplayParams::default()).unwrap_err();
    assert!(
        matches!(e, VmError::Replay(vmm::ReplayError::RamTooSmall { .. })),
        "{e}"
    );
    let msg = format!("{e}: {}", std::error::Error::source(&e).unwrap());
    assert!(msg.contains("replay_ram_size"), "{msg}");

    let vm = Vm::new(replay_ram_size(data.len() as u64)).unwrap();
    let bad = ReplayParams {
        hot_pct: 80,
        warm_pct: 30,
        ..ReplayParams::default()
    };
    assert!(vm.load_replay(&data, &bad).is_err());
    assert!(vm.load_replay(&[], &ReplayParams::default()).is_err());

    // The guest without a parameter block says so and exits 2.
    let (exit, console) = vm.run_image(&image("replay"), 1, Vec::new()).unwrap();
    let console = String::from_utf8(console).unwrap();
    assert_eq!(exit, Exit::Status(2), "{console}");
    assert!(console.contains("no parameter block"), "{console}");
}
