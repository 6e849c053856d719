//! Memory policies from the command line: `memvisor run --policy`, `memvisor stats`, and a
//! short `memvisor bench memory` on the real memory images.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_memvisor"))
}

fn memvisor(args: &[&str]) -> std::process::Output {
    bin().args(args).output().unwrap()
}

#[test]
fn memtest_passes_under_the_full_policy_and_reports_at_exit() {
    let sock = std::env::temp_dir().join(format!("mv-memtest-{}.sock", std::process::id()));
    let out = memvisor(&[
        "run",
        "--guest",
        "memtest",
        "--memory",
        "64M",
        "--policy",
        "full",
        "--stats-socket",
        sock.to_str().unwrap(),
    ]);
    let (console, err) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{console}{err}");
    assert!(console.contains("memtest: ok"), "{console}");
    assert!(
        err.contains("memory at exit") && err.contains("first touches"),
        "{err}"
    );
    assert!(!sock.exists(), "the stats socket is removed at exit");
}

#[test]
fn stats_of_a_running_vm_then_a_clear_error_once_it_is_gone() {
    let sock = std::env::temp_dir().join(format!("mv-idle-{}.sock", std::process::id()));
    let mut vm = bin()
        .args([
            "run", "--guest", "idle", "--memory", "32M", "--policy", "full",
        ])
        .args(["--cold", "1", "--stats-socket", sock.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sock.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    // Let the scanner see the idle guest's pages go cold and reclaim them.
    std::thread::sleep(Duration::from_secs(4));
    let json = memvisor(&["stats", "--json", sock.to_str().unwrap()]);
    let table = memvisor(&["stats", sock.to_str().unwrap()]);
    let _ = vm.kill();
    let _ = vm.wait();
    assert!(
        json.status.success(),
        "{}",
        String::from_utf8_lossy(&json.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["pages"]["total"], 8192, "{v}");
    assert!(
        v["reclaimed"].as_u64().unwrap() > 0,
        "cold pages were reclaimed: {v}"
    );
    // An idle guest touches a few dozen pages; they went to the store.
    assert!(
        v["bytes"]["resident"].as_u64().unwrap() < v["bytes"]["without_pager"].as_u64().unwrap(),
        "{v}"
    );
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("host memory held") && table.contains("NRU"),
        "{table}"
    );
    // The VM was killed: its socket file may remain, but nothing answers.
    let gone = memvisor(&["stats", sock.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&gone.stderr);
    assert!(!gone.status.success());
    assert!(
        err.contains("cannot reach memvisor") && err.contains("exited"),
        "{err}"
    );
    let _ = std::fs::remove_file(&sock);
}

#[test]
fn bad_policy_names_and_missing_userfaultfd_permission_are_clear() {
    let out = memvisor(&["run", "--guest", "memtest", "--policy", "dedup"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("no memory policy \"dedup\"") && err.contains("share+patch"),
        "{err}"
    );
    // An unprivileged user may not create a userfaultfd that sees KVM's faults.
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_memvisor"))
        // Any image path: the userfaultfd check comes before the image is read.
        .args(["run", "--policy", "full", "/nonexistent-image"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("userfaultfd") && err.contains("/dev/userfaultfd"),
        "{err}"
    );
}

#[test]
fn bench_memory_compares_policies_on_real_images() {
    let out = memvisor(&[
        "bench",
        "memory",
        "--set",
        "mixed",
        "--guests",
        "2",
        "--seconds",
        "10",
        "--warmup",
        "2",
        "--cold",
        "2",
        "--policies",
        "none,ksm,full",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let runs = v[0]["runs"].as_array().unwrap();
    let held = |name: &str| {
        runs.iter().find(|r| r["policy"] == name).unwrap()["held"]
            .as_u64()
            .unwrap()
    };
    let (none, ksm, full) = (held("none"), held("ksm"), held("full"));
    let others = &runs.iter().find(|r| r["policy"] == "ksm").unwrap()["other_ksm_users"];
    assert_eq!(
        others.as_array().map(Vec::len),
        Some(0),
        "another KSM user ran: {others}"
    );
    eprintln!("held: none {none}, ksm {ksm}, full {full}");
    // KVM's counters of the guests after the warm-up: they exit every round, and only the
    // engines' changes to the mappings make KVM take page faults then.
    for r in runs {
        let k = &r["kvm"];
        assert!(k["exits"].as_u64().unwrap() > 0, "{r}");
        assert!(
            k["pf_fixed"].as_u64().unwrap() <= k["pf_taken"].as_u64().unwrap(),
            "{r}"
        );
    }
    assert!(none > 100 << 20, "two guests of real images hold memory");
    assert!(
        ksm < none && full < ksm,
        "none {none}, ksm {ksm}, full {full}"
    );
    let full = runs.iter().find(|r| r["policy"] == "full").unwrap();
    assert!(
        full["refaults"].as_u64().unwrap() > 0 || full["pages"]["compressed"].as_u64().unwrap() > 0
    );
    assert!(full["rounds_per_s"].as_f64().unwrap() > 0.0);
}

/// `run --copies`: two memtests in one process under one pager, started with the engine off
/// and turned on from outside; `stats` covers both, and each console has its own file.
#[test]
fn copies_share_one_pager_whose_engine_is_turned_on_from_outside() {
    let dir = std::env::temp_dir().join(format!("mv-copies-{}", std::process::id()));
    let sock = dir.join("vm.sock");
    let _ = std::fs::remove_dir_all(&dir);
    let mut vm = bin()
        .args([
            "run", "--guest", "memtest", "--memory", "256M", "--policy", "full",
        ])
        .args([
            "--cold",
            "1",
            "--engine-off",
            "--copies",
            "2",
            "--console-dir",
        ])
        .arg(&dir)
        .arg("--control-socket")
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sock.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let stats = || -> serde_json::Value {
        let out = memvisor(&["stats", "--json", sock.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    // Engine off: the fault service runs (first touches), the scanner does not.
    let off = stats();
    assert_eq!(off["pages"]["total"], 2 * 65536, "both copies' RAM: {off}");
    assert_eq!(off["scans"], 0, "{off}");
    let on = memvisor(&["engine", sock.to_str().unwrap(), "--set", "on"]);
    assert!(
        on.status.success(),
        "{}",
        String::from_utf8_lossy(&on.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while stats()["scans"].as_u64().unwrap() == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        stats()["scans"].as_u64().unwrap() > 0,
        "the scanner runs once turned on"
    );
    let status = vm.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(vm.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(status.success(), "{err}");
    for i in 1..=2 {
        let console = std::fs::read_to_string(dir.join(format!("guest-{i}.log"))).unwrap();
        assert!(console.contains("memtest: ok"), "copy {i}: {console}");
    }
    assert!(err.contains("2 copies under --policy full"), "{err}");
    // --copies without a directory for the consoles is refused with the fix.
    let out = memvisor(&["run", "--guest", "memtest", "--copies", "2"]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("--console-dir"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
