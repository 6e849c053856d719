//! Snapshots from the command line, on real guests: a live snapshot of memtest mid-run equals
//! its pause-and-copy twin of the same instant, page for page; it restores through an
//! in-process page server, through `memvisor page-server` in another process (Firecracker's
//! handshake), and as an O(1) clone, and memtest finishes each time without a mismatch.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_memvisor"))
}

fn memvisor(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mv-snap-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn wait_for(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !path.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(path.exists(), "{} never appeared", path.display());
}

/// Starts `memvisor run ARGS --control-socket SOCK` and waits for its socket; the console is
/// kept (piped) when `keep` is set.
fn start_vm(args: &[&str], sock: &Path, keep: bool) -> std::process::Child {
    let out = || if keep { Stdio::piped() } else { Stdio::null() };
    let vm = bin()
        .arg("run")
        .args(args)
        .args(["--control-socket", sock.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(out())
        .stderr(out())
        .spawn()
        .unwrap();
    wait_for(sock);
    vm
}

/// `memvisor snapshot take --vm SOCK --store STORE EXTRA... NAME`.
fn take_cmd(sock: &Path, store: &str, extra: &[&str], name: &str) -> Command {
    let mut c = bin();
    c.args([
        "snapshot",
        "take",
        "--vm",
        sock.to_str().unwrap(),
        "--store",
        store,
    ])
    .args(extra)
    .arg(name);
    c
}

fn restored_ok(o: &Output) {
    let t = text(o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("memtest: ok"), "{t}");
    assert!(t.contains("restored to the first instruction"), "{t}");
}

#[test]
fn memtest_snapshotted_live_mid_run_equals_its_twin_and_restores_three_ways() {
    let dir = scratch("memtest");
    let (store, sock) = (dir.join("store"), dir.join("vm.sock"));
    let s = store.to_str().unwrap();
    let vm = start_vm(&["--guest", "memtest", "--memory", "512M"], &sock, true);
    // Let memtest write some of its RAM first (it runs about a second).
    std::thread::sleep(Duration::from_millis(200));
    let take = take_cmd(&sock, s, &["--reference", "twin", "--json"], "live")
        .output()
        .unwrap();
    let out = vm.wait_with_output().unwrap();
    assert!(take.status.success(), "{}", text(&take));
    assert!(text(&out).contains("memtest: ok"), "{}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&take.stdout).unwrap();
    assert_eq!(report["pages"], 131072, "{report}");

    // Page for page, the live snapshot is the paused one of the same instant.
    let st = snapshot::store::Store::open(&store).unwrap();
    let (a, b) = (
        st.open_snapshot("live").unwrap(),
        st.open_snapshot("twin").unwrap(),
    );
    assert_eq!(a.pages(), b.pages());
    let (mut pa, mut pb) = ([0u8; 4096], [0u8; 4096]);
    let mut nonzero = 0;
    for i in 0..a.pages() {
        a.read_page(i, &mut pa).unwrap();
        b.read_page(i, &mut pb).unwrap();
        assert!(
            pa == pb,
            "page {i} differs between the live snapshot and its twin"
        );
        nonzero += u64::from(pa.iter().any(|&x| x != 0));
    }
    assert!(
        nonzero > 1000,
        "the guest had written little: {nonzero} pages"
    );
    assert_eq!(a.state(), b.state(), "one instant, one vCPU state");

    // Restored by this process's page server, memtest picks up mid-pass and finishes.
    restored_ok(&memvisor(&["restore", "--store", s, "live"]));

    // Through `memvisor page-server`, another process, with Firecracker's handshake.
    let ps_sock = dir.join("pages.sock");
    let server = bin()
        .args(["page-server", "live", "--once", "--store", s])
        .args(["--socket", ps_sock.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(&ps_sock);
    let restored = memvisor(&[
        "restore",
        "--store",
        s,
        "--page-server",
        ps_sock.to_str().unwrap(),
        "live",
    ]);
    let served = server.wait_with_output().unwrap();
    restored_ok(&restored);
    assert!(served.status.success(), "{}", text(&served));
    assert!(text(&served).contains("faults served"), "{}", text(&served));

    // An O(1) clone restores the same.
    let c = memvisor(&["clone", "--store", s, "live", "copy"]);
    assert!(c.status.success(), "{}", text(&c));
    restored_ok(&memvisor(&["restore", "--store", s, "copy"]));

    let ls = memvisor(&["snapshot", "ls", "--store", s]);
    assert!(ls.status.success(), "{}", text(&ls));
    let ls = text(&ls);
    assert!(
        ls.contains("live") && ls.contains("twin") && ls.contains("copy"),
        "{ls}"
    );
    // A snapshot a clone stands on stays until the clone goes.
    let rm = memvisor(&["snapshot", "rm", "--store", s, "live"]);
    assert!(
        !rm.status.success() && text(&rm).contains("copy"),
        "{}",
        text(&rm)
    );
    let rm = memvisor(&["snapshot", "rm", "--store", s, "--gc", "twin"]);
    assert!(rm.status.success(), "{}", text(&rm));
    let fsck = memvisor(&["snapshot", "fsck", "--store", s]);
    assert!(
        fsck.status.success() && text(&fsck).contains("clean"),
        "{}",
        text(&fsck)
    );
    let du = memvisor(&["snapshot", "du", "--store", s]);
    assert!(du.status.success(), "{}", text(&du));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn snapshot_commands_fail_with_clear_errors() {
    let dir = scratch("errors");
    let s = dir.join("store");
    let s = s.to_str().unwrap();
    let gone = dir.join("nothing.sock");
    let o = take_cmd(&gone, s, &[], "x").output().unwrap();
    assert!(
        !o.status.success() && text(&o).contains("cannot reach memvisor"),
        "{}",
        text(&o)
    );
    let o = memvisor(&["restore", "--store", s, "nosuch"]);
    assert!(
        !o.status.success() && text(&o).contains("nosuch"),
        "{}",
        text(&o)
    );
    let o = memvisor(&[
        "restore",
        "--store",
        s,
        "--page-server",
        gone.to_str().unwrap(),
        "x",
    ]);
    assert!(!o.status.success(), "{}", text(&o));

    // A VM under the pager cannot be snapshotted: the pager owns its userfaultfd.
    let sock = dir.join("vm.sock");
    let mut vm = start_vm(
        &["--guest", "idle", "--memory", "32M", "--policy", "full"],
        &sock,
        false,
    );
    let o = take_cmd(&sock, s, &[], "x").output().unwrap();
    // A client that trickles its request in never holds the control socket past a second.
    let t0 = Instant::now();
    let mut c = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    for part in [&b"{\"op\""[..], b":", b"\"st", b"ats\""] {
        use std::io::Write;
        let _ = c.write_all(part);
        std::thread::sleep(Duration::from_millis(400));
    }
    let mut answer = String::new();
    use std::io::Read;
    let _ = c.read_to_string(&mut answer);
    assert!(answer.contains("within a second"), "{answer}");
    assert!(t0.elapsed() < Duration::from_secs(3));
    let _ = vm.kill();
    let _ = vm.wait();
    assert!(
        !o.status.success() && text(&o).contains("pager"),
        "{}",
        text(&o)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bench_snapshot_meets_its_bars_on_a_short_run() {
    let dir = scratch("bench");
    let o = memvisor(&[
        "bench",
        "snapshot",
        "--json",
        "--guests",
        "8",
        "--warmup",
        "0.5",
        "--restores",
        "1",
        "--big",
        "256M",
        "--dir",
        dir.join("work").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let f = |k: &str| r[k].as_f64().unwrap();
    assert!(f("store_bytes") <= 0.2 * f("flat_bytes"), "{r}");
    assert!(f("store_bytes") <= 0.5 * f("zstd_bytes"), "{r}");
    assert_eq!(r["big"]["memtest_ok"], true, "{r}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn kill_9_of_a_vm_mid_snapshot_leaves_a_store_that_fsck_passes_and_restores() {
    let dir = scratch("kill");
    let store = dir.join("store");
    let s = store.to_str().unwrap();
    let start = |sock: &Path| start_vm(&["--guest", "memtest", "--memory", "512M"], sock, false);
    let take = |sock: &Path, name: &str| {
        take_cmd(sock, s, &[], name)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    // A whole snapshot first.
    let sock = dir.join("a.sock");
    let mut vm = start(&sock);
    let t = take(&sock, "before").wait_with_output().unwrap();
    assert!(t.status.success(), "{}", text(&t));
    let _ = vm.wait();
    // Then VMs killed at several moments of their snapshots.
    for (i, ms) in [20u64, 80, 200, 400].into_iter().enumerate() {
        let sock = dir.join(format!("k{i}.sock"));
        let mut vm = start(&sock);
        let t = take(&sock, &format!("killed{i}"));
        std::thread::sleep(Duration::from_millis(ms));
        let _ = vm.kill(); // SIGKILL
        let _ = vm.wait();
        let _ = t.wait_with_output();
        let fsck = memvisor(&["snapshot", "fsck", "--store", s]);
        assert!(
            fsck.status.success(),
            "after a kill at {ms} ms: {}",
            text(&fsck)
        );
    }
    let gc = memvisor(&["snapshot", "gc", "--store", s]);
    assert!(gc.status.success(), "{}", text(&gc));
    let fsck = memvisor(&["snapshot", "fsck", "--store", s]);
    assert!(
        fsck.status.success() && text(&fsck).contains("clean"),
        "{}",
        text(&fsck)
    );
    restored_ok(&memvisor(&["restore", "--store", s, "before"]));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_damaged_store_ends_the_restored_vm_with_the_reason_instead_of_hanging() {
    let dir = scratch("damaged");
    let (store, sock) = (dir.join("store"), dir.join("vm.sock"));
    let s = store.to_str().unwrap();
    let vm = start_vm(&["--guest", "memtest", "--memory", "256M"], &sock, false);
    let t = take_cmd(&sock, s, &["--paused"], "snap").output().unwrap();
    let _ = vm.wait_with_output();
    assert!(t.status.success(), "{}", text(&t));
    // Flip a byte in the middle of the records of every pack.
    for e in std::fs::read_dir(store.join("packs")).unwrap() {
        let p = e.unwrap().path();
        let mut bytes = std::fs::read(&p).unwrap();
        let mid = bytes.len() / 3;
        bytes[mid] ^= 0x40;
        std::fs::write(&p, bytes).unwrap();
    }
    let t0 = Instant::now();
    let o = memvisor(&["restore", "--store", s, "snap"]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("corrupt") && text(&o).contains("fsck"),
        "{}",
        text(&o)
    );
    assert!(t0.elapsed() < Duration::from_secs(30));
    let _ = std::fs::remove_dir_all(&dir);
}
