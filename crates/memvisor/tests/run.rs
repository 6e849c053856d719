//! `memvisor run`: guests of the kit booted on /dev/kvm from the command line.

use std::process::Command;

fn memvisor(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_memvisor"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn memtest_runs_and_its_status_is_the_exit_code() {
    let out = memvisor(&["run", "--guest", "memtest", "--memory", "32M"]);
    let console = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{console}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        console.contains("memtest: 27 MiB") && console.contains("memtest: ok"),
        "{console}"
    );
    let out = memvisor(&[
        "run", "--guest", "memtest", "--memory", "32M", "--vcpus", "2",
    ]);
    let console = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && console.contains("on 2 vCPUs"),
        "{console}"
    );
}

#[test]
fn a_crashing_guest_fails_the_run_with_its_registers() {
    let out = memvisor(&["run", "--guest", "fault", "--memory", "8M"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err.contains("triple fault") && err.contains("rip="),
        "{err}"
    );
}

#[test]
fn bad_run_options_get_clear_errors() {
    for (args, needle) in [
        (
            vec!["run", "--guest", "memtest", "--memory", "1K"],
            "from 2 MiB to 4 GiB",
        ),
        (
            vec!["run", "--guest", "memtest", "--memory", "lots"],
            "write a size such as 256M",
        ),
        (vec!["run", "--guest", "nosuch"], "has no program"),
        (vec!["run", "/etc/hostname"], "not a guest image"),
    ] {
        let out = memvisor(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(needle),
            "{args:?}: {err}"
        );
    }
}
