//! Real Linux guest memory images, for the pager's replay benchmark (docs/memimages.md).
//!
//! Each image is the RAM of a real VM: Debian's kernel (the bzImage, KASLR on) booted in QEMU's
//! TCG emulator with a busybox initramfs whose /init runs one workload on real data (kernel
//! modules and text from Debian's kernel package), then holds still. The host waits for the
//! init's marker on the console and has QEMU write the guest's RAM as an ELF core through its
//! monitor (`dump-guest-memory`). Images are cached under a key that hashes everything that
//! decides their contents, and built two QEMUs at a time.

use std::collections::{HashSet, VecDeque};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use object::read::elf::{ElfFile64, FileHeader, ProgramHeader};
use object::{Endianness, ReadCache};

use crate::images::{self, Cpio, Debian};

/// Guest RAM in MiB. 256 MiB holds the kernel, a few dozen MiB of data and the workloads'
/// output, and keeps a set of eight images near 2 GiB on disk.
pub const RAM_MIB: u64 = 256;

/// Bumped whenever the way images are made changes in a way the key does not see.
const FORMAT: u32 = 1;

/// QEMUs at once: TCG runs a guest on one host thread, and the machines this runs on have two
/// cores.
const PARALLEL: usize = 2;

/// The whole boot, workload included, normally takes 10 to 40 s; this is for a wedged guest on
/// a loaded host.
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

/// How long a monitor command may take (writing 256 MiB takes well under a second).
const MONITOR_TIMEOUT: Duration = Duration::from_secs(120);

const READY: &str = "memimage-ready";
const FAILED: &str = "memimage-failed";

/// The kernel command line. `quiet` keeps the console to the init's own lines; `panic=-1` with
/// QEMU's `-no-reboot` turns a panic into QEMU exiting, which the host sees at once. KASLR is
/// left on (the default), so every boot puts the kernel somewhere else, as in a real fleet.
const CMDLINE: &str = "console=ttyS0 panic=-1 quiet";

/// The guest's /init: mounts, a tmpfs for the workload's output, the workload (in a subshell
/// with `set -e`, so a failed step fails the image), the marker, then sleeps forever (PID 1
/// must not exit, and the memory must hold still for the dump).
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o size=90% tmpfs /srv
step() { echo "memimage: $* at $(cut -d' ' -f1 /proc/uptime) s"; }
# Waits (at most a minute) for a background holder to say it has loaded its data.
await() {
    for i in $(seq 600); do
        [ -e "$1" ] && return 0
        usleep 100000
    done
    echo "memimage: $1 did not appear"
    return 1
}
echo "memimage: kernel text at $(grep ' _stext$' /proc/kallsyms | cut -d' ' -f1)"
step start
# Not in an `if`: there `set -e` would be ignored inside the subshell.
( set -e -o pipefail; . /workload )
status=$?
if [ $status = 0 ]; then
    step done
    free | awk 'NR == 2 {print "memimage: used " int($3 / 1024) " MiB, shared " int($5 / 1024) " MiB, cache " int($6 / 1024) " MiB, free " int($4 / 1024) " MiB"}'
    echo memimage-ready
else
    echo "memimage-failed: the workload exited with status $status"
fi
while :; do sleep 3600; done
"#;

/// One workload: what it does, the data it reads, and the script /init runs.
#[derive(Debug)]
struct Workload {
    name: &'static str,
    /// Module trees (under the package's lib/modules/VERSION/kernel) it finds under
    /// /data/modules/kernel. None is a prefix of another, so each moves out of the package whole.
    modules: &'static [&'static str],
    /// Roughly how long it takes; the longest are started first.
    cost: u32,
    script: &'static str,
}

/// Text files from the kernel package every initramfs carries under /data: the guest name and
/// the path in the package (`{v}` is the kernel version).
const TEXT_FILES: [(&str, &str); 3] = [
    ("config", "boot/config-{v}"),
    ("modules.order", "lib/modules/{v}/modules.order"),
    (
        "modules.builtin.modinfo",
        "lib/modules/{v}/modules.builtin.modinfo",
    ),
];

/// A file server's page cache: every file read, a mirror copy in tmpfs, checksums, an index.
const PAGECACHE: Workload = Workload {
    name: "pagecache",
    modules: &["fs", "crypto", "lib", "block"],
    cost: 10,
    script: r#"
step read; find /data -type f | xargs cat > /dev/null
step mirror; cp -a /data/modules /srv/mirror
step md5sum; find /data/modules -type f | xargs md5sum > /srv/MD5SUMS
step index; ls -lR /data /srv > /srv/index
"#,
};

/// A backup job: module trees archived with three compressors, one archive verified.
const GZIP: Workload = Workload {
    name: "gzip",
    modules: &["net", "drivers/scsi"],
    cost: 25,
    script: r#"
cd /data/modules
step gzip; tar c kernel/net/netfilter kernel/net/ipv4 kernel/net/ipv6 kernel/net/bridge kernel/net/sched | gzip -1 > /srv/net-core.tar.gz
step bzip2; tar c kernel/net/ipv4 | bzip2 > /srv/ipv4.tar.bz2
step lzop; tar c kernel/net kernel/drivers/scsi | lzop > /srv/net-scsi.tar.lzo
step verify
a=$(gunzip -c /srv/net-core.tar.gz | md5sum)
b=$(tar c kernel/net/netfilter kernel/net/ipv4 kernel/net/ipv6 kernel/net/bridge kernel/net/sched | md5sum)
[ "$a" = "$b" ]
cd /
"#,
};

/// Text processing, and a process holding text in anonymous memory.
const TEXT: Workload = Workload {
    name: "text",
    modules: &["drivers/usb"],
    cost: 30,
    script: r#"
step kallsyms
cat /proc/kallsyms > /srv/kallsyms
sort -k3 /srv/kallsyms > /srv/kallsyms.byname
awk '{n[$2]++} END {for (t in n) print t, n[t]}' /srv/kallsyms | sort > /srv/kallsyms.types
grep -e '=y$' -e '=m$' /data/config | sort -t= -k2 > /srv/config.set
step strings
strings -n 6 $(find /data/modules -name '*.ko') | sort | uniq -c | sort -rn > /srv/strings.count
step log
awk 'BEGIN {
    srand()
    split("GET GET GET GET POST PUT DELETE", m, " ")
    for (i = 0; i < 25000; i++)
        printf "10.%d.%d.%d - - [%d] \"%s /api/v1/item/%d HTTP/1.1\" %d %d\n",
            int(rand() * 256), int(rand() * 256), int(rand() * 256), 1700000000 + i,
            m[1 + int(rand() * 7)], int(rand() * rand() * 5000),
            200 + 100 * int(rand() * rand() * 4), int(rand() * 100000)
}' > /srv/access.log
step report
awk '{hits[$7]++; bytes[$7] += $10} END {for (p in hits) print hits[p], bytes[p], p}' /srv/access.log | sort -rn > /srv/report
step hold
awk '{line[NR] = $0; byip[$1] = byip[$1] " " NR}
     END {print "" > "/tmp/held"; close("/tmp/held"); system("exec sleep 2147483647")}' /srv/access.log /srv/config.set &
await /tmp/held
"#,
};

/// A bit of each: files mirrored, an archive, strings sorted, key material from the kernel's
/// random generator, a log, and a process holding it.
const MIXED: Workload = Workload {
    name: "mixed",
    modules: &["drivers/gpu"],
    cost: 20,
    script: r#"
step mirror; cp -a /data/modules/kernel/drivers/gpu/drm/amd /srv/amd
step gzip; tar c -C /data/modules kernel/drivers/gpu/drm/i915 | gzip -1 > /srv/i915.tar.gz
step strings; strings -n 8 /data/modules/kernel/drivers/gpu/drm/nouveau/*.ko | sort -u > /srv/nouveau.strings
step keys; head -c 4194304 /dev/urandom > /srv/keys
step log
awk 'BEGIN {
    srand()
    for (i = 0; i < 15000; i++)
        printf "%d worker-%d job=%d status=%s ms=%d\n", 1700000000 + i, int(rand() * 8),
            int(rand() * 100000), (rand() < 0.9 ? "ok" : "failed"), int(rand() * rand() * 3000)
}' > /srv/jobs.log
step hold
awk '{line[NR] = $0; byworker[$2] = byworker[$2] " " NR}
     END {print "" > "/tmp/held"; close("/tmp/held"); system("exec sleep 2147483647")}' /srv/jobs.log /data/modules.order &
await /tmp/held
"#,
};

const WORKLOADS: [&Workload; 4] = [&PAGECACHE, &GZIP, &TEXT, &MIXED];

/// A set of four images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageSet {
    /// Four boots of the same workload (`mixed`): what a fleet of similar VMs holds. They
    /// differ by KASLR, timing and random data.
    Homogeneous,
    /// Four different workloads: `pagecache`, `gzip`, `text` and `mixed`, each its own boot.
    Mixed,
}

impl ImageSet {
    /// Both sets.
    pub const ALL: [ImageSet; 2] = [ImageSet::Homogeneous, ImageSet::Mixed];

    /// The set's name, as `memvisor images` prints it.
    pub fn name(self) -> &'static str {
        match self {
            ImageSet::Homogeneous => "homogeneous",
            ImageSet::Mixed => "mixed",
        }
    }

    /// The images: a name (the file's stem, unique across sets) and the workload.
    fn members(self) -> [(&'static str, &'static Workload); 4] {
        match self {
            ImageSet::Homogeneous => [
                ("mixed-1", &MIXED),
                ("mixed-2", &MIXED),
                ("mixed-3", &MIXED),
                ("mixed-4", &MIXED),
            ],
            ImageSet::Mixed => [
                ("pagecache", &PAGECACHE),
                ("gzip", &GZIP),
                ("text", &TEXT),
                ("mixed", &MIXED),
            ],
        }
    }
}

/// One guest memory image: an ELF core whose PT_LOAD segments are the guest's RAM.
#[derive(Debug, Clone)]
pub struct MemImage {
    /// Its name, e.g. `gzip` or `mixed-3`.
    pub name: String,
    /// The ELF core.
    pub path: PathBuf,
}

/// The four images of `set`, built first if missing (a minute or so for a set, on two cores).
pub fn memory_images(set: ImageSet) -> Result<Vec<MemImage>> {
    let dir = ensure(&[set])?;
    Ok(set
        .members()
        .iter()
        .map(|(name, _)| MemImage {
            name: (*name).to_owned(),
            path: image_path(&dir, name),
        })
        .collect())
}

/// `memvisor images`: builds both sets (all eight at once, so both cores stay busy) and prints
/// where they are.
pub fn print_all() -> Result<()> {
    ensure(&ImageSet::ALL)?;
    for set in ImageSet::ALL {
        for image in memory_images(set)? {
            println!(
                "memimage  {:<12}{:<10}{}",
                set.name(),
                image.name,
                image.path.display()
            );
        }
    }
    Ok(())
}

fn image_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.elf"))
}

/// Builds whatever images of `sets` are missing; returns the cache directory.
fn ensure(sets: &[ImageSet]) -> Result<PathBuf> {
    let deb = images::debian()?;
    let dir = images::cache_dir()
        .join("memimages")
        .join(format!("{:016x}", cache_key(&deb)?));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // One builder per key at a time, across processes (tests run in parallel): the others wait
    // and then find the images made.
    let lock = File::create(dir.join(".lock"))?;
    lock.lock().context("locking the memory image cache")?;
    let mut missing: Vec<(&str, &Workload)> = Vec::new();
    for set in sets {
        for (name, w) in set.members() {
            if !image_path(&dir, name).exists() && !missing.iter().any(|m| m.0 == name) {
                missing.push((name, w));
            }
        }
    }
    if !missing.is_empty() {
        let data = workload_data(&deb)?;
        build(&deb, &data, &dir, missing)?;
        prune_stale(&dir);
    }
    Ok(dir)
}

/// Removes the images of other keys (a set is 2 GiB; a new kernel or a changed workload makes
/// a new key), except where another process holds the lock, building or about to read.
fn prune_stale(keep: &Path) {
    let Some(Ok(entries)) = keep.parent().map(std::fs::read_dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let is_key = e
            .file_name()
            .to_str()
            .is_some_and(|n| n.len() == 16 && n.bytes().all(|b| b.is_ascii_hexdigit()));
        if !is_key || path == keep {
            continue;
        }
        let Ok(lock) = File::open(path.join(".lock")) else {
            continue;
        };
        if lock.try_lock().is_ok() && std::fs::remove_dir_all(&path).is_ok() {
            eprintln!("memvisor: removed stale memory images {}", path.display());
        }
    }
}

/// Hashes everything that decides the images' contents: the format, the RAM size, the
/// kernel (version and bzImage bytes, which also pin the package the data comes from),
/// busybox, the init, the kernel command line, QEMU's version and every workload.
fn cache_key(deb: &Debian) -> Result<u64> {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut put = |b: &[u8]| {
        // Length-prefixed, so no two different field lists hash the same bytes.
        h.update(&(b.len() as u64).to_le_bytes());
        h.update(b);
    };
    put(&FORMAT.to_le_bytes());
    put(&RAM_MIB.to_le_bytes());
    put(deb.kernel_version.as_bytes());
    for p in [&deb.vmlinuz, &deb.busybox] {
        put(&std::fs::read(p).with_context(|| format!("reading {}", p.display()))?);
    }
    put(INIT.as_bytes());
    put(CMDLINE.as_bytes());
    // QEMU's firmware and devices are in the RAM too. Without QEMU the version reads as empty:
    // cached images stay usable, and installing QEMU later only means a rebuild.
    let qemu = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .map(|o| o.stdout)
        .unwrap_or_default();
    put(&qemu);
    for (name, path) in TEXT_FILES {
        put(name.as_bytes());
        put(path.as_bytes());
    }
    for w in WORKLOADS {
        put(w.name.as_bytes());
        put(w.script.as_bytes());
        for m in w.modules {
            put(m.as_bytes());
        }
    }
    Ok(h.digest())
}

/// The workloads' data, from Debian's kernel package (the same version as the kernel booted),
/// unpacked once into the cache: the module trees of every workload and [`TEXT_FILES`].
pub(crate) fn workload_data(deb: &Debian) -> Result<PathBuf> {
    let v = &deb.kernel_version;
    let mut trees: Vec<&str> = WORKLOADS.iter().flat_map(|w| w.modules).copied().collect();
    trees.sort_unstable();
    trees.dedup();
    let tag = xxhash_rust::xxh3::xxh3_64(format!("{trees:?}{TEXT_FILES:?}").as_bytes());
    let root = images::cache_dir().join("memimages").join("data");
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let dir = root.join(format!("{v}-{:08x}", tag >> 32));
    let lock = File::create(root.join(".lock"))?;
    lock.lock().context("locking the memory image data")?;
    if dir.join("ready").exists() {
        return Ok(dir);
    }
    let package = format!("linux-image-{v}");
    eprintln!("memvisor: fetching {package} for the memory images' data");
    let work = root.join(".work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    images::run(
        Command::new("apt-get")
            .args(["download", "-q", &package])
            .current_dir(&work),
    )
    .with_context(|| {
        format!(
            "downloading {package} (is the mirror reachable? if Debian has moved on to a newer \
             kernel, remove {} to start over)",
            images::cache_dir().join("debian").display()
        )
    })?;
    let deb_file = std::fs::read_dir(&work)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download left no .deb")?;
    let x = work.join("x");
    images::run(Command::new("dpkg-deb").arg("-x").arg(&deb_file).arg(&x))?;
    let _ = std::fs::remove_dir_all(&dir);
    let kernel = x.join(format!("lib/modules/{v}/kernel"));
    // Renamed out of the unpacked package, not copied: the package is 400 MB unpacked and
    // only some 170 MB of it is kept.
    let take = |from: PathBuf, to: PathBuf| -> Result<()> {
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::rename(&from, &to)
            .with_context(|| format!("{} is not in {package}", from.display()))
    };
    for t in &trees {
        take(kernel.join(t), dir.join("modules/kernel").join(t))?;
    }
    for (name, path) in TEXT_FILES {
        take(x.join(path.replace("{v}", v)), dir.join(name))?;
    }
    std::fs::write(dir.join("ready"), "")?;
    std::fs::remove_dir_all(&work)?;
    Ok(dir)
}

/// The initramfs for `w`: busybox, [`INIT`], the workload as /workload, and its data under
/// /data, uncompressed so the kernel unpacks it in a blink even under TCG (the files are then
/// in the guest's page cache, as a root file system's would be).
fn initramfs(deb: &Debian, data: &Path, w: &Workload) -> Result<Vec<u8>> {
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let mut c = Cpio::default();
    let mut dirs = HashSet::new();
    for d in ["bin", "dev", "proc", "sys", "tmp", "srv", "data"] {
        c.dir(d);
        dirs.insert(d.to_owned());
    }
    c.file("bin/busybox", 0o755, &read(&deb.busybox)?);
    c.file("init", 0o755, INIT.as_bytes());
    c.file("workload", 0o644, w.script.as_bytes());
    for (name, _) in TEXT_FILES {
        c.file(&format!("data/{name}"), 0o644, &read(&data.join(name))?);
    }
    for tree in w.modules {
        let name = format!("data/modules/kernel/{tree}");
        // Each parent once: the cpio's directories are created in order.
        let mut at = String::new();
        for part in name.split('/') {
            if !at.is_empty() {
                at.push('/');
            }
            at.push_str(part);
            if at != name && dirs.insert(at.clone()) {
                c.dir(&at);
            }
        }
        add_tree(&mut c, &data.join("modules/kernel").join(tree), &name)?;
    }
    Ok(c.finish())
}

/// `src` (a directory or file) into the archive as `name`, in sorted order so that the same
/// tree always makes the same archive.
pub(crate) fn add_tree(c: &mut Cpio, src: &Path, name: &str) -> Result<()> {
    let meta =
        std::fs::symlink_metadata(src).with_context(|| format!("reading {}", src.display()))?;
    if meta.is_dir() {
        c.dir(name);
        let mut entries: Vec<_> = std::fs::read_dir(src)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()?;
        entries.sort();
        for e in entries {
            let e = e
                .to_str()
                .with_context(|| format!("a file name in {} is not UTF-8", src.display()))?;
            add_tree(c, &src.join(e), &format!("{name}/{e}"))?;
        }
    } else if meta.is_file() {
        c.file(name, 0o644, &std::fs::read(src)?);
    }
    Ok(())
}

/// Builds `jobs` in QEMU, [`PARALLEL`] at a time, longest first.
fn build(deb: &Debian, data: &Path, dir: &Path, mut jobs: Vec<(&str, &Workload)>) -> Result<()> {
    let start = Instant::now();
    let n = jobs.len();
    eprintln!(
        "memvisor: building {n} guest memory images in QEMU (TCG, {RAM_MIB} MiB each), \
         {PARALLEL} at a time"
    );
    jobs.sort_by_key(|(_, w)| std::cmp::Reverse(w.cost));
    let queue = Mutex::new(VecDeque::from(jobs));
    let failed = AtomicBool::new(false);
    let worker = || -> Result<()> {
        // After a failure the other worker finishes its image but starts no new one.
        while !failed.load(Ordering::Relaxed) {
            let Some((name, w)) = queue
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop_front()
            else {
                break;
            };
            if let Err(e) = build_one(deb, data, dir, name, w) {
                failed.store(true, Ordering::Relaxed);
                return Err(e.context(format!("building memory image {name}")));
            }
        }
        Ok(())
    };
    let results: Vec<Result<()>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..PARALLEL.min(n)).map(|_| s.spawn(worker)).collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a builder thread panicked")))
            })
            .collect()
    });
    for r in results {
        r?;
    }
    eprintln!(
        "memvisor: {n} memory images built in {:.1} s, in {}",
        start.elapsed().as_secs_f64(),
        dir.display()
    );
    Ok(())
}

/// Boots one guest, dumps it, checks the dump, and moves it into place with its console log.
fn build_one(deb: &Debian, data: &Path, dir: &Path, name: &str, w: &Workload) -> Result<()> {
    let start = Instant::now();
    let initrd = dir.join(format!(".{name}.cpio"));
    std::fs::write(&initrd, initramfs(deb, data, w)?)
        .with_context(|| format!("writing {}", initrd.display()))?;
    let part = dir.join(format!(".{name}.elf.part"));
    let _ = std::fs::remove_file(&part);
    // Unix socket paths are limited to 108 bytes, which a cache path may exceed.
    let sock = std::env::temp_dir().join(format!(
        "memvisor-memimage-{}-{name}.sock",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&sock);
    let run = boot_and_dump(deb, &initrd, &sock, &part);
    let _ = std::fs::remove_file(&initrd);
    let _ = std::fs::remove_file(&sock);
    let done = run.and_then(|console| {
        // The dump is read back whole, as the benchmark will read it, before it counts as made.
        let ram = read_guest_ram(&part)?;
        ensure!(
            ram.len() as u64 == RAM_MIB << 20,
            "the dump holds {} bytes of RAM, not {RAM_MIB} MiB",
            ram.len()
        );
        let nonzero = ram
            .chunks_exact(4096)
            .filter(|p| p.iter().any(|&b| b != 0))
            .count();
        std::fs::write(dir.join(format!("{name}.console")), &console)?;
        // QEMU makes its dumps readable by their owner only; these are no secret.
        std::fs::set_permissions(&part, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
        std::fs::rename(&part, image_path(dir, name))?;
        Ok(nonzero)
    });
    let nonzero = done.inspect_err(|_| {
        let _ = std::fs::remove_file(&part);
    })?;
    eprintln!(
        "memvisor: memory image {name}: {} MiB non-zero, {:.1} s",
        (nonzero * 4096) >> 20,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Kills QEMU if the build ends early, whatever the reason.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// The last lines of a console, for error messages.
fn tail(console: &str) -> String {
    let lines: Vec<&str> = console.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Boots QEMU on `initrd`, waits for the marker, dumps RAM to `out`, quits; returns the
/// console.
fn boot_and_dump(deb: &Debian, initrd: &Path, sock: &Path, out: &Path) -> Result<String> {
    let mut monitor = std::ffi::OsString::from("unix:");
    monitor.push(sock);
    monitor.push(",server=on,wait=off");
    // -nodefaults: no VGA and no network card, whose video RAM and option ROM would otherwise
    // be in the dump (and slow the boot); the serial line is the console.
    let mut cmd = Command::new("qemu-system-x86_64");
    // A guest that is done sleeps forever, so a QEMU whose memvisor was killed would too: the
    // kernel kills it when the thread that started it ends (here only after QEMU has quit).
    // SAFETY: between fork and exec the child only calls prctl(2), which is async-signal-safe
    // and touches no memory of the parent's.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .args(["-accel", "tcg", "-m", &RAM_MIB.to_string(), "-smp", "1"])
        .args(["-nodefaults", "-display", "none", "-serial", "stdio"])
        // Not KSM-mergeable: KSM's counters are global, and a benchmark may run beside this.
        .args(["-machine", "mem-merge=off"])
        .args(["-no-reboot", "-monitor"])
        .arg(&monitor)
        .arg("-kernel")
        .arg(&deb.vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", CMDLINE])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context(
            "starting qemu-system-x86_64: install it with `apt-get install qemu-system-x86`",
        )?;
    let mut qemu = Qemu(child);
    let stdout = qemu.0.stdout.take().context("QEMU's stdout")?;
    let mut err_pipe = qemu.0.stderr.take().context("QEMU's stderr")?;
    // Both pipes are drained as they come, so a chatty QEMU never stalls on a full pipe.
    let errors = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err_pipe.read_to_string(&mut s);
        s
    });
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut line = Vec::new();
        while r.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
            if tx
                .send(String::from_utf8_lossy(&line).into_owned())
                .is_err()
            {
                break;
            }
            line.clear();
        }
    });
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let mut console = String::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                console.push_str(&line.replace('\r', ""));
                let line = line.trim_end();
                if line.ends_with(READY) {
                    break;
                }
                if line.contains(FAILED) {
                    bail!(
                        "the workload failed; the console's end:\n{}",
                        tail(&console)
                    );
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => bail!(
                "no {READY} within {} s; the console's end:\n{}",
                BOOT_TIMEOUT.as_secs(),
                tail(&console)
            ),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = qemu.0.wait()?;
                let stderr = errors.join().unwrap_or_default();
                bail!(
                    "QEMU ended ({status}) before the workload was done: {}\nthe console's end:\n{}",
                    stderr.trim(),
                    tail(&console)
                );
            }
        }
    }
    let mut m = Monitor::connect(sock)?;
    m.command("stop")?;
    // Without -d the command returns once the file is whole (QEMU 7.2 dumps in its main loop);
    // begin and length keep the dump to RAM, without the BIOS ROM at the top of 4 GiB.
    let path = out
        .to_str()
        .context("the cache path is not UTF-8, which QEMU's monitor cannot take")?;
    m.command(&format!(
        "dump-guest-memory {} 0 {}",
        hmp_quote(path),
        RAM_MIB << 20
    ))?;
    // QEMU closes the monitor as it quits; what the read sees then does not matter.
    let _ = m.command("quit");
    let deadline = Instant::now() + Duration::from_secs(30);
    while qemu.0.try_wait()?.is_none() {
        if Instant::now() > deadline {
            bail!("QEMU did not quit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(console)
}

/// A path as one argument of a monitor command: quoted, with `\` and `"` escaped, when it
/// holds anything the monitor would split on.
fn hmp_quote(s: &str) -> String {
    if !s.is_empty() && !s.contains(|c: char| c.is_whitespace() || c == '"' || c == '\\') {
        return s.to_owned();
    }
    format!("\"{}\"", s.replace('\\', r"\\").replace('"', "\\\""))
}

/// QEMU's human monitor on a Unix socket.
struct Monitor(UnixStream);

impl Monitor {
    const PROMPT: &'static [u8] = b"(qemu) ";

    fn connect(sock: &Path) -> Result<Monitor> {
        let s = UnixStream::connect(sock)
            .with_context(|| format!("connecting to QEMU's monitor at {}", sock.display()))?;
        s.set_read_timeout(Some(MONITOR_TIMEOUT))?;
        let mut m = Monitor(s);
        m.until_prompt()?; // the banner
        Ok(m)
    }

    /// Everything up to the next prompt.
    fn until_prompt(&mut self) -> Result<String> {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        while !buf.ends_with(Self::PROMPT) {
            let n = self.0.read(&mut chunk).context("reading QEMU's monitor")?;
            ensure!(n > 0, "QEMU's monitor closed");
            buf.extend_from_slice(&chunk[..n]);
            ensure!(buf.len() < 1 << 20, "QEMU's monitor says too much");
        }
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    /// Runs one command; the monitor's own error text becomes the error.
    fn command(&mut self, cmd: &str) -> Result<()> {
        self.0.write_all(format!("{cmd}\n").as_bytes())?;
        let reply = self
            .until_prompt()
            .with_context(|| format!("monitor command {cmd:?}"))?;
        // The reply is the echoed command line, then the command's output: an error is a line
        // of that output (not a word of the echo, which holds a path).
        let output = reply.split_once('\n').map_or("", |(_, rest)| rest);
        if let Some(msg) = output.lines().find(|l| l.trim_start().starts_with("Error")) {
            bail!("QEMU's monitor: {cmd:?}: {}", msg.trim());
        }
        Ok(())
    }
}

const FOUR_GIB: u64 = 1 << 32;
const PAGE: u64 = 4096;

/// The file bytes of one PT_LOAD segment that land below 4 GiB.
#[derive(Debug, PartialEq, Eq)]
struct Segment {
    offset: u64,
    paddr: u64,
    /// Bytes in the file (the rest of the segment, up to its memory size, is zero).
    filesz: u64,
    /// Bytes of guest memory, clipped at 4 GiB.
    memsz: u64,
}

/// The guest-physical RAM of a dump (an ELF core, such as QEMU's `dump-guest-memory` writes):
/// PT_LOAD segments placed at their physical addresses (`p_paddr`), in one buffer from address
/// 0 up to the end of the highest segment below 4 GiB, rounded up to a page; holes read as
/// zero. Segments past the end of the file, overlapping or absurdly sized are errors.
///
/// The rule takes every segment below 4 GiB: a dump that also holds device memory (VGA video
/// RAM, the BIOS ROM just below 4 GiB) gives a buffer up to there. The images here are dumped
/// with a filter to RAM alone.
pub fn read_guest_ram(path: &Path) -> Result<Vec<u8>> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let size = file.metadata()?.len();
    let segments = ram_segments(&file, size)
        .with_context(|| format!("{}: not a usable dump", path.display()))?;
    let end = segments
        .iter()
        .map(|s| s.paddr + s.memsz)
        .max()
        .context("no PT_LOAD segment below 4 GiB")?;
    let len = usize::try_from(end.div_ceil(PAGE) * PAGE).context("RAM too large")?;
    // Zeroed allocation: the holes cost nothing until touched.
    let mut ram = vec![0u8; len];
    for s in &segments {
        let at = usize::try_from(s.paddr).context("address")?;
        let n = usize::try_from(s.filesz).context("size")?;
        file.read_exact_at(&mut ram[at..at + n], s.offset)
            .with_context(|| format!("reading {}", path.display()))?;
    }
    Ok(ram)
}

/// The PT_LOAD segments of an ELF64 core that lie (at least partly) below 4 GiB, sorted by
/// address, each checked against the file's size and the others.
fn ram_segments(file: &File, size: u64) -> Result<Vec<Segment>> {
    // ReadCache reads the headers only, not the (large) segments.
    let cache = ReadCache::new(file.try_clone()?);
    let elf = ElfFile64::<Endianness, _>::parse(&cache)
        .context("not a 64-bit ELF file (a dump of a 64-bit guest is one)")?;
    let endian = elf.endian();
    ensure!(
        elf.elf_header().e_type(endian) == object::elf::ET_CORE,
        "an ELF file but not a core dump"
    );
    let mut segments = Vec::new();
    for ph in elf.elf_program_headers() {
        if ph.p_type(endian) != object::elf::PT_LOAD {
            continue;
        }
        let (offset, filesz) = (ph.p_offset(endian), ph.p_filesz(endian));
        let (paddr, memsz) = (ph.p_paddr(endian), ph.p_memsz(endian));
        ensure!(
            offset.checked_add(filesz).is_some_and(|e| e <= size),
            "a segment at file offset {offset} of {filesz} bytes ends past the end of the file \
             ({size} bytes): truncated or corrupt"
        );
        ensure!(
            filesz <= memsz,
            "a segment at {paddr:#x} has {filesz} bytes in the file but only {memsz} in memory"
        );
        let end = paddr
            .checked_add(memsz)
            .with_context(|| format!("a segment at {paddr:#x} of {memsz} bytes wraps around"))?;
        if memsz == 0 || paddr >= FOUR_GIB {
            continue;
        }
        let end = end.min(FOUR_GIB);
        segments.push(Segment {
            offset,
            paddr,
            filesz: filesz.min(end - paddr),
            memsz: end - paddr,
        });
    }
    segments.sort_by_key(|s| s.paddr);
    for w in segments.windows(2) {
        ensure!(
            w[0].paddr + w[0].memsz <= w[1].paddr,
            "segments at {:#x} and {:#x} overlap",
            w[0].paddr,
            w[1].paddr
        );
    }
    Ok(segments)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A little-endian ELF64 core with the given PT_LOAD segments (offset, filesz, paddr,
    /// memsz) and `data` after the headers, written to a file of its own.
    fn core(name: &str, loads: &[(u64, u64, u64, u64)], data: &[u8]) -> PathBuf {
        let mut f = Vec::new();
        f.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
        f.extend_from_slice(&4u16.to_le_bytes()); // ET_CORE
        f.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        f.extend_from_slice(&1u32.to_le_bytes());
        f.extend_from_slice(&0u64.to_le_bytes()); // entry
        f.extend_from_slice(&64u64.to_le_bytes()); // phoff
        f.extend_from_slice(&0u64.to_le_bytes()); // shoff
        f.extend_from_slice(&0u32.to_le_bytes());
        f.extend_from_slice(&64u16.to_le_bytes()); // ehsize
        f.extend_from_slice(&56u16.to_le_bytes()); // phentsize
        f.extend_from_slice(&u16::try_from(loads.len()).unwrap().to_le_bytes());
        f.extend_from_slice(&[0; 6]); // shentsize, shnum, shstrndx
        for &(offset, filesz, paddr, memsz) in loads {
            f.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
            f.extend_from_slice(&0u32.to_le_bytes());
            for v in [offset, 0, paddr, filesz, memsz, 0] {
                f.extend_from_slice(&v.to_le_bytes());
            }
        }
        f.extend_from_slice(data);
        let path = std::env::temp_dir().join(format!(
            "memvisor-memimages-{}-{name}.core",
            std::process::id()
        ));
        std::fs::write(&path, f).unwrap();
        path
    }

    fn headers(n: u64) -> u64 {
        64 + 56 * n
    }

    #[test]
    fn segments_land_at_their_physical_addresses_and_holes_are_zero() {
        let h = headers(2);
        let data: Vec<u8> = (0..3 * 4096u32)
            .map(|i| u8::try_from(i % 251 + 1).unwrap())
            .collect();
        // One page at 0, two pages at 16 KiB of which the second is only in memory.
        let path = core(
            "place",
            &[(h, 4096, 0, 4096), (h + 4096, 4096, 0x4000, 0x2000)],
            &data,
        );
        let ram = read_guest_ram(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(ram.len(), 0x6000);
        assert_eq!(&ram[..4096], &data[..4096]);
        assert!(ram[0x1000..0x4000].iter().all(|&b| b == 0));
        assert_eq!(&ram[0x4000..0x5000], &data[4096..8192]);
        assert!(ram[0x5000..].iter().all(|&b| b == 0));
    }

    #[test]
    fn segments_above_4_gib_are_left_out_and_the_end_is_page_aligned() {
        let h = headers(2);
        let path = core(
            "high",
            &[(h, 10, 0x1000, 10), (h, 10, FOUR_GIB + 0x1000, 10)],
            &[7; 10],
        );
        let ram = read_guest_ram(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(ram.len(), 0x2000);
        assert_eq!(&ram[0x1000..0x100a], &[7; 10]);
    }

    #[test]
    fn hostile_dumps_are_clear_errors() {
        let h = headers(1);
        let err = |name, loads: &[(u64, u64, u64, u64)], data: &[u8]| {
            let path = core(name, loads, data);
            let e = read_guest_ram(&path).unwrap_err();
            std::fs::remove_file(&path).unwrap();
            format!("{e:#}")
        };
        assert!(err("past", &[(h, 8192, 0, 8192)], &[1; 4096]).contains("past the end"));
        assert!(err("wrap", &[(h, 0, u64::MAX - 10, 100)], &[]).contains("wraps"));
        assert!(err("offwrap", &[(u64::MAX, 2, 0, 2)], &[]).contains("past the end"));
        assert!(err("fsz", &[(h, 100, 0, 10)], &[1; 100]).contains("in memory"));
        assert!(err("none", &[], &[]).contains("no PT_LOAD"));
        let h2 = headers(2);
        let e = err(
            "overlap",
            &[(h2, 4096, 0, 4096), (h2, 4096, 0x800, 4096)],
            &[1; 4096],
        );
        assert!(e.contains("overlap"), "{e}");
        // An absurd memory size is capped at 4 GiB (and costs nothing: the rest is zero).
        let path = core("huge", &[(h, 1, 0, u64::MAX / 2)], &[9]);
        let segs = ram_segments(&File::open(&path).unwrap(), h + 1).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(segs[0].memsz, FOUR_GIB);
        // Not an ELF file, and an ELF file that is not a core.
        let path =
            std::env::temp_dir().join(format!("memvisor-memimages-{}-raw", std::process::id()));
        std::fs::write(&path, [0u8; 4096]).unwrap();
        assert!(format!("{:#}", read_guest_ram(&path).unwrap_err()).contains("64-bit ELF"));
        let exe_path = core("exe", &[], &[]);
        let mut exe = std::fs::read(&exe_path).unwrap();
        std::fs::remove_file(&exe_path).unwrap();
        exe[16] = 2; // ET_EXEC
        std::fs::write(&path, exe).unwrap();
        assert!(format!("{:#}", read_guest_ram(&path).unwrap_err()).contains("not a core"));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn monitor_arguments_are_quoted_only_when_needed() {
        assert_eq!(hmp_quote("/a/b.elf"), "/a/b.elf");
        assert_eq!(hmp_quote("/a b/c\"d\\"), r#""/a b/c\"d\\""#);
    }

    #[test]
    fn monitor_errors_come_from_the_output_not_the_echo() {
        let (a, mut qemu) = UnixStream::pair().unwrap();
        let mut m = Monitor(a);
        // Replies as QEMU 7.2 writes them: the echo with terminal escapes, then the output.
        qemu.write_all(b"dump-guest-memory /Error/x\x1b[K\r\n(qemu) ")
            .unwrap();
        m.command("dump-guest-memory /Error/x").unwrap();
        qemu.write_all(
            b"dump-guest-memory /x\x1b[K\r\nError: Could not open '/x': No such file or \
              directory\r\n(qemu) ",
        )
        .unwrap();
        let e = m.command("dump-guest-memory /x").unwrap_err().to_string();
        assert!(e.contains("Could not open '/x'"), "{e}");
        drop(qemu);
        assert!(m.command("quit").is_err(), "a closed monitor is an error");
    }

    #[test]
    fn workloads_are_well_formed() {
        let mut names = HashSet::new();
        for set in ImageSet::ALL {
            for (name, _) in set.members() {
                assert!(names.insert(name), "{name} is in two sets");
            }
        }
        let trees: Vec<&str> = WORKLOADS.iter().flat_map(|w| w.modules).copied().collect();
        for a in &trees {
            assert!(!a.starts_with('/') && !a.contains(".."), "{a}");
            for b in &trees {
                // Trees move out of the package whole, so none may hold another.
                assert!(a == b || !b.starts_with(&format!("{a}/")), "{a} holds {b}");
            }
        }
    }
}
