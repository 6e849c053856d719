//! The page server on plain mappings: the handshake, lazy fault service, zero pages, remove
//! events, prefetch, hostile messages, and a VMM in another process that exits.

#![allow(clippy::cast_possible_truncation)] // page counts in tests are small

use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};

mod common;

use common::map;
use pager::uffd::{Modes, Uffd};
use snapshot::server::{self, Mapping, ServerError};
use snapshot::{BoxError, PAGE, PageSource};

/// A snapshot in memory: page i holds a pattern of i, every 5th page is zero.
struct Pattern {
    pages: u64,
    order: Vec<u32>,
}

fn pattern(i: u64, out: &mut [u8; PAGE]) {
    if i.is_multiple_of(5) {
        out.fill(0);
        return;
    }
    for (k, w) in out.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&(i * 1_000_003 + k as u64).to_le_bytes());
    }
}

impl PageSource for Pattern {
    fn pages(&self) -> u64 {
        self.pages
    }
    fn is_zero(&self, index: u64) -> bool {
        index.is_multiple_of(5)
    }
    fn read_page(&self, index: u64, out: &mut [u8; PAGE]) -> Result<(), BoxError> {
        pattern(index, out);
        Ok(())
    }
    fn order(&self) -> &[u32] {
        &self.order
    }
}

/// The VMM's side: a mapping registered for missing faults, handed over on `conn`.
fn vmm_side(conn: &UnixStream, pages: u64, offset_pages: u64) -> (*mut u8, Uffd) {
    let len = (pages * PAGE as u64) as usize;
    let ram = map(len);
    let uffd = Uffd::new().expect("userfaultfd");
    let modes = Modes {
        missing: true,
        write_protect: false,
    };
    uffd.register(ram as u64, len as u64, modes)
        .expect("register");
    let m = Mapping {
        base_host_virt_addr: ram as u64,
        size: len as u64,
        offset: offset_pages * PAGE as u64,
        page_size: PAGE as u64,
        page_size_kib: Some(PAGE as u64),
    };
    server::send_handshake(conn, &[m], uffd.as_fd()).expect("handshake");
    (ram, uffd)
}

fn check_page(ram: *mut u8, k: u64, snap_idx: u64) {
    let mut want = [0u8; PAGE];
    pattern(snap_idx, &mut want);
    // SAFETY: inside the mapping; the read faults into the server.
    let got = unsafe { std::slice::from_raw_parts(ram.add((k * PAGE as u64) as usize), PAGE) };
    assert!(
        got == &want[..],
        "page {k} (snapshot page {snap_idx}) differs"
    );
}

#[test]
fn faults_are_served_from_the_snapshot_with_prefetch_and_remove_events() {
    let pages = 4096u64;
    let source = Pattern {
        pages: pages + 16,
        order: (0..512).rev().collect(),
    };
    let (a, b) = UnixStream::pair().unwrap();
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let srv = s.spawn(|| server::serve(&source, &b, &stop));
        // The region starts 16 pages into the snapshot.
        let (ram, _uffd) = vmm_side(&a, pages, 16);
        let readers: Vec<_> = (0..2u64)
            .map(|t| {
                let ram = ram as usize;
                s.spawn(move || {
                    for k in (t..pages).step_by(2) {
                        check_page(ram as *mut u8, k, k + 16);
                    }
                })
            })
            .collect();
        for r in readers {
            r.join().unwrap();
        }
        // Drop some pages: from now on they read as zero.
        // SAFETY: inside the mapping.
        let r =
            unsafe { libc::madvise(ram.add(PAGE * 100).cast(), PAGE * 10, libc::MADV_DONTNEED) };
        assert_eq!(r, 0);
        for k in 100..110 {
            // SAFETY: inside the mapping.
            let v = unsafe { std::ptr::read_volatile(ram.add(k * PAGE + 8)) };
            assert_eq!(v, 0, "page {k} was dropped and must read zero");
        }
        // Writes land and stay.
        // SAFETY: inside the mapping.
        unsafe { std::ptr::write_volatile(ram.add(200 * PAGE), 0xab) };
        // SAFETY: as above.
        let back = unsafe { std::ptr::read_volatile(ram.add(200 * PAGE)) };
        assert_eq!(back, 0xab);
        stop.store(true, Ordering::Release);
        let report = srv.join().unwrap().expect("served");
        eprintln!("{report:?}");
        assert_eq!(report.removed, 10);
        assert!(report.faults + report.prefetched >= pages, "{report:?}");
        assert!(report.zero_faults > 0);
    });
}

#[test]
fn hostile_handshakes_get_errors_not_panics() {
    let source = Pattern {
        pages: 64,
        order: vec![],
    };
    let stop = AtomicBool::new(false);
    let try_msg = |json: &[u8], with_fd: bool| {
        let (a, b) = UnixStream::pair().unwrap();
        use vmm_sys_util::sock_ctrl_msg::ScmSocket;
        let uffd = Uffd::new().unwrap();
        if with_fd {
            a.send_with_fd(json, uffd.raw_fd()).unwrap();
        } else {
            use std::io::Write;
            (&a).write_all(json).unwrap();
        }
        server::serve(&source, &b, &stop).unwrap_err()
    };
    let e = try_msg(b"not json", true);
    assert!(matches!(e, ServerError::Json(_)), "{e}");
    let e = try_msg(b"[]", true);
    assert!(matches!(e, ServerError::Region { .. }), "{e}");
    let past = br#"[{"base_host_virt_addr":4096,"size":1048576,"offset":0,"page_size":4096}]"#;
    let e = try_msg(past, true);
    assert!(e.to_string().contains("runs past"), "{e}");
    let huge = br#"[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":2097152}]"#;
    assert!(try_msg(huge, true).to_string().contains("page_size"));
    // Only Firecracker's older field, with a huge page: still refused, by that field.
    let kib = br#"[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size_kib":2097152}]"#;
    assert!(try_msg(kib, true).to_string().contains("2097152"));
    let overlap = br#"[{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size":4096},{"base_host_virt_addr":8192,"size":4096,"offset":0,"page_size":4096}]"#;
    assert!(try_msg(overlap, true).to_string().contains("overlaps"));
    let wrap = br#"[{"base_host_virt_addr":18446744073709547520,"size":8192,"offset":0,"page_size":4096}]"#;
    assert!(matches!(try_msg(wrap, true), ServerError::Region { .. }));
    let e = try_msg(
        br#"[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":4096}]"#,
        false,
    );
    assert!(matches!(e, ServerError::NoFd), "{e}");
}

/// Runs as the VMM in a child process when the environment says so: connects, hands over
/// its RAM, reads every page, checks it and exits without saying goodbye.
#[test]
fn child_vmm() {
    let Ok(path) = std::env::var("MEMVISOR_TEST_PAGE_SERVER") else {
        return;
    };
    let conn = UnixStream::connect(path).unwrap();
    let (ram, _uffd) = vmm_side(&conn, 1024, 0);
    drop(conn); // as Firecracker does: the socket closes, the VM lives on
    for k in 0..1024 {
        check_page(ram, k, k);
    }
    std::process::exit(0);
}

#[test]
fn the_server_serves_a_vmm_in_another_process_until_it_exits() {
    let dir = std::env::temp_dir().join(format!("mv-ps-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("sock");
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_vmm", "--nocapture"])
        .env("MEMVISOR_TEST_PAGE_SERVER", &path)
        .spawn()
        .unwrap();
    let (conn, _) = listener.accept().unwrap();
    let source = Pattern {
        pages: 1024,
        order: vec![],
    };
    let stop = AtomicBool::new(false);
    let report = server::serve(&source, &conn, &stop).expect("served until the VMM exited");
    let status = child.wait().unwrap();
    assert!(status.success(), "the child VMM saw a wrong page: {status}");
    assert_eq!(report.faults, 1024, "{report:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
