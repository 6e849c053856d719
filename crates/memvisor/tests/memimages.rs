//! The guest memory images (`memvisor images`, docs/memimages.md), checked on their real
//! contents: each is a whole 256 MiB guest RAM with a real amount of data in it; four boots of
//! the same workload share much of it but differ (KASLR, timing, random data); four different
//! workloads share much less. The images are cached: CI builds them (`memvisor images`) before
//! the tests, and each test here only reads them.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

const PAGE: usize = 4096;
const MIB: usize = 1 << 20;

#[derive(Debug)]
struct Image {
    set: String,
    name: String,
    path: PathBuf,
}

/// `memvisor images`, which builds what is missing and prints every memory image as
/// `memimage SET NAME PATH`.
fn images() -> Vec<Image> {
    let out = Command::new(env!("CARGO_BIN_EXE_memvisor"))
        .arg("images")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "memvisor images: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let images: Vec<Image> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            (f.next()? == "memimage").then(|| Image {
                set: f.next().unwrap().to_owned(),
                name: f.next().unwrap().to_owned(),
                path: PathBuf::from(f.next().unwrap()),
            })
        })
        .collect();
    assert_eq!(images.len(), 8, "{images:?}");
    images
}

fn set<'a>(all: &'a [Image], name: &str) -> Vec<&'a Image> {
    let v: Vec<&Image> = all.iter().filter(|i| i.set == name).collect();
    assert_eq!(v.len(), 4, "{all:?}");
    v
}

/// The pages of one dump, read here without memvisor: the non-zero page count and the set of
/// distinct non-zero pages (by a 64-bit hash of all their bytes).
#[derive(Debug)]
struct Pages {
    name: String,
    nonzero: usize,
    distinct: HashSet<u64>,
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn hash(page: &[u8]) -> u64 {
    page.chunks_exact(8).fold(0x243f_6a88_85a3_08d3, |h, w| {
        (h.rotate_left(23) ^ u64::from_le_bytes(w.try_into().unwrap()))
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
    })
}

fn pages(image: &Image) -> Pages {
    let elf = std::fs::read(&image.path).unwrap();
    assert_eq!(&elf[..4], b"\x7fELF");
    assert_eq!(elf[4], 2, "ELF64");
    assert_eq!(u16::from_le_bytes([elf[16], elf[17]]), 4, "a core file");
    let phoff = usize::try_from(u64_at(&elf, 32)).unwrap();
    let phnum = usize::from(u16::from_le_bytes([elf[56], elf[57]]));
    let zero = [0u8; PAGE];
    let (mut ram, mut nonzero, mut distinct) = (0, 0, HashSet::new());
    for i in 0..phnum {
        let ph = &elf[phoff + 56 * i..phoff + 56 * (i + 1)];
        if u32::from_le_bytes(ph[..4].try_into().unwrap()) != 1 {
            continue; // not PT_LOAD
        }
        let offset = usize::try_from(u64_at(ph, 8)).unwrap();
        let paddr = u64_at(ph, 24);
        let filesz = usize::try_from(u64_at(ph, 32)).unwrap();
        assert_eq!(paddr, ram as u64, "RAM is one run from address 0");
        ram += filesz;
        for p in elf[offset..offset + filesz].chunks_exact(PAGE) {
            if p != zero {
                nonzero += 1;
                distinct.insert(hash(p));
            }
        }
    }
    assert_eq!(ram, 256 * MIB, "{}: the whole guest RAM", image.name);
    Pages {
        name: image.name.clone(),
        nonzero,
        distinct,
    }
}

/// Distinct non-zero pages two images have in common, as a share of the smaller one's.
fn shared(a: &Pages, b: &Pages) -> f64 {
    let common = a.distinct.intersection(&b.distinct).count();
    common as f64 / a.distinct.len().min(b.distinct.len()) as f64
}

fn pairs(v: &[Pages]) -> Vec<(&Pages, &Pages)> {
    let mut out = Vec::new();
    for (i, a) in v.iter().enumerate() {
        for b in &v[i + 1..] {
            out.push((a, b));
        }
    }
    out
}

/// The kernel's text address this boot, as the image's /init logged it beside the image.
fn kernel_text(image: &Path) -> String {
    let console = std::fs::read_to_string(image.with_extension("console")).unwrap();
    console
        .lines()
        .find_map(|l| l.strip_prefix("memimage: kernel text at "))
        .unwrap()
        .trim()
        .to_owned()
}

#[test]
fn homogeneous_images_share_many_pages_but_each_boot_is_its_own() {
    let all = images();
    let homo: Vec<Pages> = set(&all, "homogeneous").into_iter().map(pages).collect();
    for p in &homo {
        let mib = p.nonzero * PAGE / MIB;
        assert!((40..=250).contains(&mib), "{}: {mib} MiB non-zero", p.name);
    }
    for (a, b) in pairs(&homo) {
        let s = shared(a, b);
        assert!(s > 0.4, "{} and {} share only {s:.2}", a.name, b.name);
        // Each holds thousands of pages the other does not: 4 MiB of key material alone.
        let only_a = a.distinct.difference(&b.distinct).count();
        let only_b = b.distinct.difference(&a.distinct).count();
        assert!(
            only_a > 1024 && only_b > 1024,
            "{} and {}: {only_a} and {only_b} pages of their own",
            a.name,
            b.name
        );
    }
    // KASLR: four boots of the same kernel do not all put it at the same address (512 slots;
    // all four alike has a chance of about one in 10^8).
    let texts: HashSet<String> = set(&all, "homogeneous")
        .iter()
        .map(|i| kernel_text(&i.path))
        .collect();
    assert!(texts.len() > 1, "{texts:?}");
}

#[test]
fn mixed_images_differ_in_workload() {
    let all = images();
    let mixed: Vec<Pages> = set(&all, "mixed").into_iter().map(pages).collect();
    let names: HashSet<&str> = mixed.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, HashSet::from(["pagecache", "gzip", "text", "mixed"]));
    for p in &mixed {
        let mib = p.nonzero * PAGE / MIB;
        assert!((40..=250).contains(&mib), "{}: {mib} MiB non-zero", p.name);
    }
    let homo: Vec<Pages> = set(&all, "homogeneous")[..2]
        .iter()
        .map(|i| pages(i))
        .collect();
    let same = shared(&homo[0], &homo[1]);
    for (a, b) in pairs(&mixed) {
        // What different workloads have in common is the kernel and busybox.
        let s = shared(a, b);
        assert!(
            s < 0.5 && s < same - 0.1,
            "{} and {} share {s:.2}, two boots of one workload {same:.2}",
            a.name,
            b.name
        );
    }
}

#[test]
fn memvisor_analyze_counts_the_same_pages() {
    let all = images();
    let image = all.iter().find(|i| i.name == "pagecache").unwrap();
    let mine = pages(image);
    let out = Command::new(env!("CARGO_BIN_EXE_memvisor"))
        .args(["analyze", "--json"])
        .arg(&image.path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let input = &v["inputs"][0];
    assert_eq!(input["pages"].as_u64().unwrap(), (256 * MIB / PAGE) as u64);
    let zero = input["zero"].as_u64().unwrap();
    assert_eq!(input["pages"].as_u64().unwrap() - zero, mine.nonzero as u64);
    // Pages identical to an earlier page of the same image, counted both ways.
    assert_eq!(
        input["duplicate"].as_u64().unwrap(),
        (mine.nonzero - mine.distinct.len()) as u64
    );
}
