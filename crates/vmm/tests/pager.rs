//! Guest RAM under the pager on /dev/kvm: the memtest guest writes and reads back all of its
//! RAM while the pager reclaims pages as fast as it can; not one word may come back wrong.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use pager::{Mode, Pager, Policy};
use vmm::{Control, Exit, Vm};

fn memtest() -> Vec<u8> {
    let path = vmm::kit::build("memtest", &vmm::kit::target_dir()).expect("guest kit builds");
    std::fs::read(path).expect("memtest image")
}

fn run_under_reclaim(vcpus: u8, mode: Mode) {
    let vm = Vm::new(256 << 20).unwrap();
    let (ram, len) = vm.ram_host_range();
    let pager = Pager::with_config(
        mode.store_config(),
        Policy {
            handlers: 2,
            ..Policy::default()
        },
        false,
    )
    .expect("userfaultfd (run as root)");
    // SAFETY: guest RAM stays mapped while `vm` lives, and the pager forgets it first.
    let region = unsafe { pager.attach(ram, len, "memtest") }.unwrap();
    let control = Arc::new(Control::new());
    let c = Arc::clone(&control);
    pager.on_failure(move |why| c.abort(why.to_owned()));
    let done = AtomicBool::new(false);
    let image = memtest();
    let (exit, console, rounds) = std::thread::scope(|s| {
        let reclaimer = s.spawn(|| {
            let mut rounds = 0u64;
            while !done.load(Ordering::Relaxed) {
                // A rotating eighth of guest RAM at a time, back to back.
                let phase = usize::try_from(rounds).unwrap_or(0);
                pager.reclaim(&region, |ix| (ix / 64 + phase).is_multiple_of(8));
                rounds += 1;
            }
            rounds
        });
        let r = vm.run_image_ctl(&image, vcpus, Vec::new(), None, Some(&control));
        done.store(true, Ordering::Relaxed);
        let rounds = reclaimer.join().unwrap();
        let (exit, console) = r.unwrap();
        (exit, String::from_utf8(console).unwrap(), rounds)
    });
    let st = pager.stats();
    eprintln!(
        "{vcpus} vCPUs: {rounds} reclaim rounds, {} pages reclaimed, {} refaults (p50 {} ns, \
         p99 {} ns), {} writes waited for reclaim",
        st.reclaimed,
        st.faults.refaults,
        st.refault_latency.p50_ns,
        st.refault_latency.p99_ns,
        st.faults.deferred
    );
    assert_eq!(exit, Exit::Status(0), "console:\n{console}");
    assert!(console.contains("memtest: ok"), "{console}");
    assert_eq!(st.failure, None);
    assert_eq!(st.faults.anomalies, 0);
    assert!(
        st.reclaimed > 10_000,
        "reclaim raced with the guest: {st:?}"
    );
    assert!(st.faults.refaults > 1_000, "{st:?}");
    pager.forget(&region).unwrap();
    std::thread::sleep(Duration::from_millis(1));
}

#[test]
fn memtest_under_full_speed_reclaim_finds_no_lost_write() {
    run_under_reclaim(1, Mode::Full);
}

#[test]
fn memtest_on_two_vcpus_under_full_speed_reclaim() {
    run_under_reclaim(2, Mode::SharePatch);
}
