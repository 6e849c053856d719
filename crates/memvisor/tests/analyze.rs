//! `memvisor analyze` on real programs: live processes, their gcore dumps and a raw image,
//! checked against counts made here by other means (readelf for the cores, a HashSet of whole
//! page bytes for duplicates).
#![allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap)] // pids and offsets of this 64-bit host

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use serde_json::Value;

const PAGE: usize = 4096;

struct Workload(Child);

impl Drop for Workload {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One run of the real workload (CPython building records), stopped so its memory holds still.
fn workload(seed: u32) -> Workload {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/src/workload.py");
    let mut c = Command::new("python3")
        .args([script, &seed.to_string(), "20000"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 is installed (.ci/run installs it)");
    let mut line = String::new();
    BufReader::new(c.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    // SAFETY: kill(2) with a pid we own and a valid signal number has no memory effects.
    assert_eq!(unsafe { libc::kill(c.id() as i32, libc::SIGSTOP) }, 0);
    Workload(c)
}

fn memvisor(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_memvisor"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap()
}

fn analyze_json(args: &[&str]) -> Value {
    let mut all = vec!["analyze", "--json"];
    all.extend_from_slice(args);
    let out = memvisor(&all);
    assert!(
        out.status.success(),
        "memvisor {all:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// pages, zero, duplicate (exact bytes seen earlier in this or an earlier input).
#[derive(Debug, PartialEq, Eq, Default, Clone, Copy)]
struct Counts {
    pages: u64,
    zero: u64,
    duplicate: u64,
}

fn count(pages: &[Vec<u8>], seen: &mut HashSet<Vec<u8>>) -> Counts {
    let mut c = Counts::default();
    for p in pages {
        c.pages += 1;
        if p.iter().all(|&b| b == 0) {
            c.zero += 1;
        } else if !seen.insert(p.clone()) {
            c.duplicate += 1;
        }
    }
    c
}

fn counts_of(v: &Value) -> Counts {
    Counts {
        pages: v["pages"].as_u64().unwrap(),
        zero: v["zero"].as_u64().unwrap(),
        duplicate: v["duplicate"].as_u64().unwrap(),
    }
}

/// Resident (present or swapped) pages of a stopped process, read independently of memvisor.
fn process_pages(pid: u32) -> Vec<Vec<u8>> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap")).unwrap();
    let mut pages = Vec::new();
    for line in maps.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let name = f.get(5).copied().unwrap_or("");
        if !f[1].starts_with('r') || name.starts_with("[vvar") || name == "[vsyscall]" {
            continue;
        }
        let (lo, hi) = f[0].split_once('-').unwrap();
        let (lo, hi) = (
            u64::from_str_radix(lo, 16).unwrap(),
            u64::from_str_radix(hi, 16).unwrap(),
        );
        for addr in (lo..hi).step_by(PAGE) {
            let mut e = [0u8; 8];
            pagemap
                .read_exact_at(&mut e, addr / PAGE as u64 * 8)
                .unwrap();
            if u64::from_le_bytes(e) >> 62 == 0 {
                continue;
            }
            let mut p = vec![0u8; PAGE];
            if mem.read_exact_at(&mut p, addr).is_ok() {
                pages.push(p);
            }
        }
    }
    pages
}

/// The PT_LOAD file ranges of a core, as binutils' readelf reports them.
fn readelf_loads(core: &Path) -> Vec<(u64, u64)> {
    let out = Command::new("readelf")
        .arg("-lW")
        .arg(core)
        .output()
        .expect("readelf (binutils) is installed");
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter(|l| l.trim_start().starts_with("LOAD"))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap();
            (hex(f[1]), hex(f[4])) // Offset, FileSiz
        })
        .filter(|&(_, size)| size > 0)
        .collect()
}

fn core_pages(core: &Path) -> Vec<Vec<u8>> {
    let bytes = std::fs::read(core).unwrap();
    let mut pages = Vec::new();
    for (off, size) in readelf_loads(core) {
        let seg = &bytes[off as usize..(off + size) as usize];
        for chunk in seg.chunks(PAGE) {
            let mut p = chunk.to_vec();
            p.resize(PAGE, 0);
            pages.push(p);
        }
    }
    pages
}

fn gcore(pid: u32, dir: &Path) -> PathBuf {
    let prefix = dir.join("core");
    let out = Command::new("gcore")
        .arg("-o")
        .arg(&prefix)
        .arg(pid.to_string())
        .output()
        .expect("gdb's gcore is installed (.ci/run installs gdb)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(format!("{}.{pid}", prefix.display()))
}

fn held(v: &Value, what: &str) -> u64 {
    v["total"]["held"][what].as_u64().unwrap()
}

#[test]
fn live_processes_cores_and_raw_images_agree_with_independent_counts() {
    let dir = std::env::temp_dir().join(format!("memvisor-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (a, b) = (workload(1), workload(2));
    let (pa, pb) = (a.0.id(), b.0.id());

    // Live processes.
    let v = analyze_json(&[&format!("pid:{pa}"), &format!("pid:{pb}")]);
    let mut seen = HashSet::new();
    let ca = count(&process_pages(pa), &mut seen);
    let cb = count(&process_pages(pb), &mut seen);
    assert_eq!(counts_of(&v["inputs"][0]), ca);
    assert_eq!(counts_of(&v["inputs"][1]), cb);
    assert!(
        cb.duplicate > 100,
        "the second run shares its interpreter pages: {cb:?}"
    );
    assert!(
        v["total"]["patched"].as_u64().unwrap() > 0,
        "two runs with different data have similar pages"
    );
    // The point of memvisor: smaller than sharing alone and than compression alone.
    let m = held(&v, "memvisor");
    assert!(m < held(&v, "sharing_only"), "{}", v["total"]);
    assert!(m < held(&v, "lz4_only"), "{}", v["total"]);
    let st = &v["store"];
    let overheads = st["metadata_bytes"].as_u64().unwrap() + st["slack_bytes"].as_u64().unwrap();
    assert_eq!(m, overheads + payload(st));

    // Their core dumps.
    let (core_a, core_b) = (gcore(pa, &dir), gcore(pb, &dir));
    let v = analyze_json(&[core_a.to_str().unwrap(), core_b.to_str().unwrap()]);
    let mut seen = HashSet::new();
    let (pages_a, pages_b) = (core_pages(&core_a), core_pages(&core_b));
    let ka = count(&pages_a, &mut seen);
    let kb = count(&pages_b, &mut seen);
    assert_eq!(counts_of(&v["inputs"][0]), ka);
    assert_eq!(counts_of(&v["inputs"][1]), kb);
    assert_eq!(
        counts_of(&v["total"]),
        Counts {
            pages: ka.pages + kb.pages,
            zero: ka.zero + kb.zero,
            duplicate: ka.duplicate + kb.duplicate
        }
    );

    // A raw image of the first core's memory gives the same counts as the core itself.
    let raw = dir.join("a.raw");
    std::fs::write(&raw, pages_a.concat()).unwrap();
    let v = analyze_json(&[&format!("raw:{}", raw.display())]);
    assert_eq!(
        counts_of(&v["inputs"][0]),
        count(&pages_a, &mut HashSet::new())
    );

    std::fs::remove_dir_all(&dir).unwrap();
}

fn payload(store: &Value) -> u64 {
    ["patched", "compressed", "raw"]
        .iter()
        .map(|f| store[f]["payload_bytes"].as_u64().unwrap())
        .sum()
}

/// An ELF64 core header with one PT_LOAD segment of `filesz` bytes at offset 4096, and nothing
/// after the headers: a core cut short.
fn core_header(filesz: u64) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(b"\x7fELF\x02\x01\x01\x00");
    h.extend_from_slice(&[0; 8]);
    h.extend_from_slice(&4u16.to_le_bytes()); // e_type ET_CORE
    h.extend_from_slice(&62u16.to_le_bytes()); // e_machine x86-64
    h.extend_from_slice(&1u32.to_le_bytes()); // e_version
    h.extend_from_slice(&0u64.to_le_bytes()); // e_entry
    h.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    h.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    h.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    for v in [64u16, 56, 1, 64, 0, 0] {
        h.extend_from_slice(&v.to_le_bytes()); // ehsize, phentsize, phnum, shentsize, shnum, shstrndx
    }
    h.extend_from_slice(&1u32.to_le_bytes()); // p_type PT_LOAD
    h.extend_from_slice(&6u32.to_le_bytes()); // p_flags RW
    for v in [4096u64, 0x10000, 0, filesz, filesz, 4096] {
        h.extend_from_slice(&v.to_le_bytes()); // offset, vaddr, paddr, filesz, memsz, align
    }
    h
}

fn fails_with(args: &[&str], needle: &str) {
    let out = memvisor(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} should fail");
    assert!(
        err.contains(needle),
        "{args:?}: expected {needle:?} in {err}"
    );
}

#[test]
fn bad_inputs_get_clear_errors() {
    let dir = std::env::temp_dir().join(format!("memvisor-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let text = dir.join("notes.txt");
    std::fs::write(&text, "not memory\n").unwrap();
    let empty = dir.join("empty.img");
    std::fs::write(&empty, "").unwrap();

    fails_with(&["analyze", "/no/such/image"], "no such file");
    fails_with(
        &["analyze", text.to_str().unwrap()],
        "not a whole number of 4096-byte pages",
    );
    fails_with(&["analyze", empty.to_str().unwrap()], "not a memory image");
    fails_with(&["analyze", "/bin/sh"], "not a core dump");
    let cut = dir.join("cut.core");
    std::fs::write(&cut, core_header(1 << 20)).unwrap();
    fails_with(&["analyze", cut.to_str().unwrap()], "truncated core");
    fails_with(&["analyze", "pid:abc"], "not a process id");
    // A process that has exited.
    let mut c = Command::new("true").spawn().unwrap();
    let gone = c.id();
    c.wait().unwrap();
    fails_with(&["analyze", &format!("pid:{gone}")], "does not exist");
    // A zombie (exited, not yet waited for) has no user memory left.
    let mut z = Command::new("true").spawn().unwrap();
    let zombie = z.id();
    while !std::fs::read_to_string(format!("/proc/{zombie}/stat"))
        .unwrap()
        .contains(") Z ")
    {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    fails_with(
        &["analyze", &format!("pid:{zombie}")],
        "no readable user memory",
    );
    z.wait().unwrap();
    fails_with(
        &["analyze", "--compression", "brotli", "pid:1"],
        "use lz4, zstd or zstd:LEVEL",
    );
    fails_with(
        &["analyze", "--similarity", "9,1", "pid:1"],
        "similarity indices must be 1 to 8",
    );
    // Another user's process, read by an unprivileged user: a copy of the binary in a
    // directory that user can reach, run as nobody against this (root's) test process.
    let bin = dir.join("memvisor");
    std::fs::copy(env!("CARGO_BIN_EXE_memvisor"), &bin).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&bin)
        .args(["analyze", &format!("pid:{}", std::process::id())])
        .output()
        .expect("setpriv (util-linux) is installed");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("cannot read the memory of process"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn long_non_ascii_names_are_shortened_on_character_boundaries() {
    let dir = std::env::temp_dir().join(format!("memvisor-näme-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join(format!("{}.img", "é".repeat(40)));
    let exe = std::fs::read(env!("CARGO_BIN_EXE_memvisor")).unwrap();
    std::fs::write(&img, &exe[..8 * PAGE]).unwrap();
    let out = memvisor(&["analyze", &format!("raw:{}", img.display())]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8(out.stdout).unwrap().contains("…éé"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn table_output_names_every_strategy() {
    let w = workload(3);
    let out = memvisor(&["analyze", &format!("pid:{}", w.0.id())]);
    assert!(out.status.success());
    let s = String::from_utf8(out.stdout).unwrap();
    for want in [
        "sharing only (KSM)",
        "LZ4 only (zram/zswap)",
        "sharing + LZ4",
        "memvisor (share+patch+compress)",
        "B per stored page",
    ] {
        assert!(s.contains(want), "missing {want:?} in\n{s}");
    }
}
