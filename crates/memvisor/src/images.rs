//! Guest images from Debian's packages, built once and cached: Debian's kernel (the bzImage
//! of linux-image-amd64, and the KVM modules for the nested harness) and busybox-static.
//!
//! Everything comes from `apt-get download` and `dpkg-deb -x`, so it needs Debian's package
//! lists (`apt-get update`) but no root file system and no network beyond the mirror.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, ensure};

/// The KVM modules the nested harness loads, in load order (kvm needs irqbypass; kvm-amd
/// needs kvm and ccp).
pub const KVM_MODULES: [&str; 4] = ["irqbypass", "kvm", "ccp", "kvm-amd"];

const MODULE_PATHS: [&str; 4] = [
    "kernel/virt/lib/irqbypass.ko",
    "kernel/arch/x86/kvm/kvm.ko",
    "kernel/drivers/crypto/ccp/ccp.ko",
    "kernel/arch/x86/kvm/kvm-amd.ko",
];

/// Where images are cached: `$MEMVISOR_CACHE`, else `$XDG_CACHE_HOME/memvisor`, else
/// `~/.cache/memvisor`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("MEMVISOR_CACHE") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("memvisor");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into());
    PathBuf::from(home).join(".cache/memvisor")
}

/// Debian's kernel and busybox, unpacked into the cache.
#[derive(Debug, Clone)]
pub struct Debian {
    /// The kernel package's version, e.g. 6.1.0-56-amd64.
    pub kernel_version: String,
    /// The bzImage.
    pub vmlinuz: PathBuf,
    /// The ELF vmlinux inside it, unpacked so a VMM can skip the bzImage's decompressor.
    pub vmlinux: PathBuf,
    /// The KVM modules, in [`KVM_MODULES`] order.
    pub modules: Vec<PathBuf>,
    /// busybox, statically linked.
    pub busybox: PathBuf,
    /// A busybox initramfs whose /init runs the command given after `--` on the kernel
    /// command line, writes its status to the VMM's exit port and reboots; with no command it
    /// starts a shell on the console.
    pub initrd: PathBuf,
}

/// Runs `cmd`; its stdout, or an error with its stderr.
pub(crate) fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("running {:?} (is it installed?)", cmd.get_program()))?;
    ensure!(
        out.status.success(),
        "{:?} failed ({}): {}",
        cmd,
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The concrete kernel package that linux-image-amd64 depends on.
fn kernel_package() -> Result<String> {
    let deps = run(Command::new("apt-cache").args(["depends", "linux-image-amd64"])).context(
        "Debian's package lists do not know linux-image-amd64: run `apt-get update` first",
    )?;
    deps.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-") && p.ends_with("-amd64"))
        .map(str::to_owned)
        .context("linux-image-amd64 depends on no linux-image-*-amd64 package")
}

/// Debian's kernel and busybox, downloaded and unpacked on first use (a few seconds and
/// about 70 MB of downloads), then read from the cache. Safe to call from several processes
/// at once: the first builds, the others wait for it.
pub fn debian() -> Result<Debian> {
    let root = cache_dir().join("debian");
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let lock = File::create(root.join(".lock"))?;
    lock.lock().context("locking the image cache")?;
    let ready = root.join("ready");
    let kernel_version = match std::fs::read_to_string(&ready) {
        Ok(v) => v.trim().to_owned(),
        Err(_) => {
            let v = build_debian(&root)?;
            std::fs::write(&ready, &v)?;
            v
        }
    };
    let dir = root.join(&kernel_version);
    let d = Debian {
        vmlinuz: dir.join("vmlinuz"),
        vmlinux: dir.join("vmlinux"),
        modules: KVM_MODULES
            .iter()
            .map(|m| dir.join(format!("{m}.ko")))
            .collect(),
        busybox: dir.join("busybox"),
        // Named by its /init, so a changed init script makes a new initramfs.
        initrd: dir.join(format!(
            "initrd-{:016x}.cpio",
            xxhash_rust::xxh3::xxh3_64(GUEST_INIT.as_bytes())
        )),
        kernel_version,
    };
    if !d.vmlinux.exists() {
        let elf = extract_vmlinux(&std::fs::read(&d.vmlinuz)?)?;
        let part = d.vmlinux.with_extension("part");
        std::fs::write(&part, elf)?;
        std::fs::rename(part, &d.vmlinux)?;
    }
    if !d.initrd.exists() {
        // Written whole, then renamed: a run killed half-way leaves no truncated initramfs.
        let cpio = guest_initramfs(&std::fs::read(&d.busybox)?)?;
        let part = d.initrd.with_extension("part");
        std::fs::write(&part, cpio)?;
        std::fs::rename(part, &d.initrd)?;
    }
    Ok(d)
}

fn build_debian(root: &Path) -> Result<String> {
    let package = kernel_package()?;
    let version = package.trim_start_matches("linux-image-").to_owned();
    eprintln!("memvisor: fetching {package} and busybox-static from Debian's packages");
    let work = root.join(".work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    run(Command::new("apt-get")
        .args(["download", "-q", &package, "busybox-static"])
        .current_dir(&work))
    .context("downloading Debian's packages (is the mirror reachable?)")?;
    let x = work.join("x");
    for deb in std::fs::read_dir(&work)? {
        let deb = deb?.path();
        if deb.extension().is_some_and(|e| e == "deb") {
            run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&x))?;
        }
    }
    let dir = root.join(&version);
    std::fs::create_dir_all(&dir)?;
    let copy = |from: PathBuf, to: &str| -> Result<()> {
        std::fs::copy(&from, dir.join(to))
            .with_context(|| format!("{} is not in the package", from.display()))?;
        Ok(())
    };
    copy(x.join(format!("boot/vmlinuz-{version}")), "vmlinuz")?;
    let modules = x.join(format!("lib/modules/{version}"));
    for (name, path) in KVM_MODULES.iter().zip(MODULE_PATHS) {
        copy(modules.join(path), &format!("{name}.ko"))?;
    }
    copy(x.join("bin/busybox"), "busybox")?;
    std::fs::remove_dir_all(&work)?;
    Ok(version)
}

/// The ELF vmlinux inside a bzImage whose payload is XZ-compressed (Debian's is): the XZ
/// stream from its magic, through `xz`. The kernel's own decompressor does the same at boot,
/// in the guest; under PVM it does not finish in minutes, so a VMM there loads the ELF.
pub fn extract_vmlinux(bzimage: &[u8]) -> Result<Vec<u8>> {
    const XZ_MAGIC: &[u8] = b"\xfd7zXZ\0";
    let at = bzimage
        .windows(XZ_MAGIC.len())
        .position(|w| w == XZ_MAGIC)
        .context("the bzImage holds no XZ stream (is its payload compressed otherwise?)")?;
    let mut child = Command::new("xz")
        .args(["--decompress", "--stdout", "--single-stream"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running xz (from xz-utils)")?;
    let mut stdin = child.stdin.take().expect("piped");
    let payload = bzimage[at..].to_vec();
    // Written from a thread: xz's output pipe must be drained at the same time.
    let writer = std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &payload));
    let out = child.wait_with_output()?;
    // xz stops reading after its one stream; the bytes after it may meet a closed pipe.
    let _ = writer.join();
    ensure!(
        out.status.success(),
        "xz could not unpack the bzImage's payload"
    );
    ensure!(
        out.stdout.starts_with(b"\x7fELF"),
        "the bzImage's payload is not an ELF vmlinux"
    );
    Ok(out.stdout)
}

/// The inner guest's /init. The command after `--` on the kernel command line reaches init
/// as its arguments; its status goes to the VMM's exit port (0xf4) through /dev/port.
const GUEST_INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "memvisor-guest: up, $(grep -c ^processor /proc/cpuinfo) CPUs, $(awk '/MemTotal/ {print $2}' /proc/meminfo) kB"
if [ $# -gt 0 ]; then
    "$@"
    status=$?
    echo "memvisor-guest: exit $status"
    printf "\\$(printf %03o $status)" | dd of=/dev/port bs=1 seek=244 count=1 2>/dev/null
    reboot -f
fi
echo "memvisor-guest: a shell on the console; 'reboot -f' (or Ctrl-A x) ends the VM"
setsid cttyhack sh
reboot -f
"#;

/// A busybox initramfs that runs [`GUEST_INIT`].
pub fn guest_initramfs(busybox: &[u8]) -> Result<Vec<u8>> {
    Ok(guest_cpio(busybox).finish())
}

/// The members of [`guest_initramfs`], for a caller to add its own files to before `finish`.
pub fn guest_cpio(busybox: &[u8]) -> Cpio {
    let mut c = Cpio::default();
    for d in ["bin", "dev", "proc", "sys", "tmp", "root"] {
        c.dir(d);
    }
    c.file("bin/busybox", 0o755, busybox);
    c.file("init", 0o755, GUEST_INIT.as_bytes());
    c
}

/// An initramfs in the kernel's "newc" cpio format (Documentation/driver-api/early-userspace/
/// buffer-format.rst), uncompressed. Written here because it is forty lines and the cpio
/// tool is not on a fresh machine.
#[derive(Debug, Default)]
pub struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.ino += 1;
        let size = u32::try_from(data.len()).expect("cpio members are under 4 GiB");
        let namesize = u32::try_from(name.len() + 1).expect("short name");
        let fields = [self.ino, mode, 0, 0, 1, 0, size, 0, 0, 0, 0, namesize, 0];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    /// A directory (parents must be added first).
    pub fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, &[]);
    }

    /// A regular file with permission bits `perm`.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100_000 | perm, data);
    }

    /// Every directory on the way to `path` (a relative path), then `path` as a file.
    pub fn file_with_parents(&mut self, path: &str, perm: u32, data: &[u8]) {
        let mut at = String::new();
        for part in path
            .split('/')
            .collect::<Vec<_>>()
            .split_last()
            .expect("a name")
            .1
        {
            if !at.is_empty() {
                at.push('/');
            }
            at.push_str(part);
            self.dir(&at);
        }
        self.file(path, perm, data);
    }

    /// The archive, with its trailer.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        // The kernel reads the archive in 512-byte blocks in some paths; pad like cpio does.
        while !self.out.len().is_multiple_of(512) {
            self.out.push(0);
        }
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_newc_layout() {
        let mut c = Cpio::default();
        c.file_with_parents("a/b/c", 0o644, b"hello");
        let out = c.finish();
        assert_eq!(&out[..6], b"070701");
        assert_eq!(out.len() % 512, 0);
        // Entries: a, a/b, a/b/c, the trailer; each header is 4-byte aligned.
        let text = String::from_utf8_lossy(&out);
        assert_eq!(text.matches("070701").count(), 4);
        assert!(text.contains("a/b/c\0"));
        assert!(text.contains("hello"));
        assert!(text.contains("TRAILER!!!"));
        let third = text.match_indices("070701").nth(2).unwrap().0;
        assert_eq!(third % 4, 0);
        // The file's size field (the 7th) says 5 bytes.
        assert_eq!(&text[third + 6 + 6 * 8..third + 6 + 7 * 8], "00000005");
    }
}
