//! The nested harness: memvisor booting unmodified Linux on hardware-style KVM, here.
//!
//! /dev/kvm on these machines is KVM's PVM backend, under which a Linux kernel cannot finish
//! booting (docs/vmm.md). QEMU's TCG emulator with `-cpu max` emulates AMD SVM with nested
//! paging, so a Debian kernel inside QEMU loads kvm-amd and gets a hardware-style /dev/kvm.
//! The harness builds an outer initramfs (busybox, the KVM modules, this very memvisor
//! binary with its shared libraries, and the inner guest: Debian's kernel and the busybox
//! initramfs), boots it in QEMU, and has the outer guest run `memvisor run` on the inner
//! Linux; it returns memvisor's exit status. [`boot`] runs any other job script in the same
//! outer guest (`memvisor bench nested-memory`).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::images::{self, Cpio, KVM_MODULES};

/// What the outer guest runs.
#[derive(Debug, Clone)]
pub struct Nested {
    /// The inner guest's vCPUs.
    pub vcpus: u8,
    /// The inner guest's RAM, as `memvisor run --memory` takes it.
    pub memory: String,
    /// The outer guest's RAM in MiB.
    pub outer_mib: u32,
    /// The outer guest's CPUs (QEMU TCG threads).
    pub outer_cpus: u8,
    /// Give up after this long.
    pub timeout: Duration,
    /// The command the inner guest runs (after `--` on its kernel command line). With none,
    /// the inner guest starts a shell, and this process's stdin is its keyboard (through
    /// QEMU's serial line, the outer console and memvisor's console input).
    pub command: Vec<String>,
    /// Boot the ELF vmlinux instead of the bzImage.
    pub elf: bool,
    /// Copy the console to stdout as it arrives.
    pub echo: bool,
}

/// How a nested run ended.
#[derive(Debug)]
pub struct Outcome {
    /// memvisor's exit status inside the outer guest; None if it never reported one.
    pub status: Option<i32>,
    /// Wall time of the whole QEMU run.
    pub elapsed: Duration,
}

/// The line the outer init prints after memvisor exits.
const STATUS_MARK: &str = "memvisor-nested: exit ";

/// The outer guest's /init: the KVM modules, then the job (`/job`, sourced) once /dev/kvm is
/// up, then power off.
const OUTER_INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in MODULES; do
    insmod /modules/$m.ko || echo "memvisor-nested: insmod $m failed"
done
if [ -e /dev/kvm ]; then
    echo "memvisor-nested: /dev/kvm is up: $(grep -o -w -m1 -e svm -e npt /proc/cpuinfo | tr '\n' ' ')"
    . /job
else
    echo "memvisor-nested: the outer guest has no /dev/kvm"
fi
poweroff -f
"#;

/// The outer QEMU machine.
#[derive(Debug, Clone)]
pub struct Outer {
    /// RAM in MiB.
    pub mib: u32,
    /// CPUs (QEMU TCG threads).
    pub cpus: u8,
    /// Give up after this long.
    pub timeout: Duration,
    /// More outer kernel command line.
    pub append: &'static str,
    /// Kill QEMU once its console has been silent this long, and say it stalled (for a job
    /// that prints a heartbeat).
    pub quiet_limit: Option<Duration>,
    /// This process's stdin is the outer console's keyboard (else QEMU reads nothing).
    pub keyboard: bool,
}

/// What the outer guest runs once /dev/kvm is up.
#[derive(Debug, Clone)]
pub struct OuterJob {
    /// A shell script the outer init sources; memvisor is `/memvisor`, the inner kernel
    /// `/inner/kernel` and its initramfs `/inner/initrd.cpio`.
    pub script: String,
    /// The inner kernel (bzImage or ELF vmlinux).
    pub kernel: PathBuf,
    /// The inner initramfs.
    pub initrd: Vec<u8>,
}

/// A whole outer run: its console (carriage returns kept) and wall time.
#[derive(Debug)]
pub struct Console {
    /// Everything QEMU's serial line printed.
    pub text: String,
    /// Wall time of the whole QEMU run.
    pub elapsed: Duration,
    /// QEMU was killed because its console was silent past [`Outer::quiet_limit`].
    pub stalled: bool,
}

/// Quotes `s` for the outer guest's shell.
pub(crate) fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The shared libraries `exe` loads, with the dynamic loader, as absolute paths.
fn shared_libraries(exe: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(exe)
        .output()
        .context("running ldd (from libc-bin) to find memvisor's libraries")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("not a dynamic executable") || text.contains("statically linked") {
        return Ok(Vec::new());
    }
    let libs: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect();
    if libs.is_empty() {
        bail!("ldd found no libraries for {}: {text}", exe.display());
    }
    Ok(libs)
}

/// The outer initramfs for `job`.
fn outer_initramfs(deb: &images::Debian, job: &OuterJob) -> Result<Vec<u8>> {
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let mut c = Cpio::default();
    for d in ["bin", "dev", "proc", "sys", "tmp", "modules", "inner"] {
        c.dir(d);
    }
    c.file("bin/busybox", 0o755, &read(&deb.busybox)?);
    for (name, path) in KVM_MODULES.iter().zip(&deb.modules) {
        c.file(&format!("modules/{name}.ko"), 0o644, &read(path)?);
    }
    let exe = std::env::current_exe().context("finding memvisor's own binary")?;
    c.file("memvisor", 0o755, &read(&exe)?);
    for lib in shared_libraries(&exe)? {
        // The loader's path is often a symlink (/lib64/ld-linux-x86-64.so.2): the file's
        // contents go under the path the binary names.
        let rel = lib.to_string_lossy().trim_start_matches('/').to_owned();
        c.file_with_parents(&rel, 0o755, &read(&lib)?);
    }
    c.file("inner/kernel", 0o644, &read(&job.kernel)?);
    c.file("inner/initrd.cpio", 0o644, &job.initrd);
    c.file("job", 0o644, job.script.as_bytes());
    c.file(
        "init",
        0o755,
        OUTER_INIT
            .replace("MODULES", &KVM_MODULES.join(" "))
            .as_bytes(),
    );
    Ok(c.finish())
}

/// The job of `memvisor nested`: `memvisor run` on the inner Linux, its status printed.
fn run_job(deb: &images::Debian, job: &Nested) -> Result<OuterJob> {
    let mut args = vec![
        "run".to_owned(),
        "--kernel".into(),
        "/inner/kernel".into(),
        "--initrd".into(),
        "/inner/initrd.cpio".into(),
        "--vcpus".into(),
        job.vcpus.to_string(),
        "--memory".into(),
        job.memory.clone(),
    ];
    if !job.command.is_empty() {
        args.push("--".into());
        args.extend(job.command.iter().cloned());
    }
    let quoted: Vec<String> = args.iter().map(|a| sh_quote(a)).collect();
    let initrd =
        std::fs::read(&deb.initrd).with_context(|| format!("reading {}", deb.initrd.display()))?;
    Ok(OuterJob {
        script: format!(
            "set -- {}\n/memvisor \"$@\"\necho \"{STATUS_MARK}$?\"\n",
            quoted.join(" ")
        ),
        kernel: (if job.elf { &deb.vmlinux } else { &deb.vmlinuz }).clone(),
        initrd,
    })
}

/// Runs `job` in QEMU and returns how it ended.
pub fn run(job: &Nested) -> Result<Outcome> {
    let deb = images::debian()?;
    let outer = Outer {
        mib: job.outer_mib,
        cpus: job.outer_cpus,
        timeout: job.timeout,
        keyboard: job.command.is_empty(),
        append: "",
        quiet_limit: None,
    };
    let echo = job.echo;
    let console = boot(&outer, &run_job(&deb, job)?, move |line| {
        if echo {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(line.as_bytes());
            let _ = out.flush();
        }
    })?;
    let status = console
        .text
        .lines()
        .filter_map(|l| l.trim().strip_prefix(STATUS_MARK))
        .next_back()
        .and_then(|s| s.trim().parse().ok());
    Ok(Outcome {
        status,
        elapsed: console.elapsed,
    })
}

/// Boots the outer guest on `job` and returns its console once QEMU exits (the job's end
/// powers it off). `on_line` sees each console line as it arrives, its newline included.
pub fn boot(
    outer: &Outer,
    job: &OuterJob,
    mut on_line: impl FnMut(&str) + Send + 'static,
) -> Result<Console> {
    let deb = images::debian()?;
    let cpio = outer_initramfs(&deb, job)?;
    let dir = images::cache_dir().join("nested");
    std::fs::create_dir_all(&dir)?;
    // Named by pid and a counter: a bench boots several outer guests, one after another.
    static BOOTS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = BOOTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let initrd = dir.join(format!("outer-{}-{n}.cpio", std::process::id()));
    std::fs::write(&initrd, cpio)?;
    let monitor = std::env::var("MEMVISOR_QEMU_MONITOR")
        .map_or_else(|_| "none".to_owned(), |p| format!("unix:{p},server,nowait"));
    let start = Instant::now();
    let mut qemu = Command::new("qemu-system-x86_64");
    // SAFETY: the closure runs in the child between fork and exec and only calls prctl,
    // which is async-signal-safe.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut qemu, || {
            // A QEMU whose memvisor was killed would otherwise run on to its own timeout,
            // taking a core from whatever runs next.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = qemu
        // mem-merge=off: this QEMU's RAM is never KSM's business, and KSM's counters are global,
        // so a KSM experiment running beside it must not count its pages.
        .args([
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-machine",
            "q35,mem-merge=off",
        ])
        .args(["-m", &outer.mib.to_string()])
        .args(["-smp", &outer.cpus.to_string()])
        .args(["-nodefaults", "-display", "none", "-serial", "stdio"])
        // A monitor socket only when asked, to look inside an outer guest that stalls.
        .args(["-monitor", &monitor, "-no-reboot"])
        .arg("-kernel")
        .arg(&deb.vmlinuz)
        .arg("-initrd")
        .arg(&initrd)
        .arg("-append")
        .arg(format!("console=ttyS0 panic=-1 quiet {}", outer.append).trim_end())
        .stdin(if outer.keyboard {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            let _ = std::fs::remove_file(&initrd);
            return Err(e).context(
                "starting qemu-system-x86_64: install it with `apt-get install qemu-system-x86`",
            );
        }
    };
    let stdout = child.stdout.take().expect("piped");
    // QEMU's stderr is drained as it comes, so a chatty QEMU cannot stall on a full pipe.
    let mut err_pipe = child.stderr.take().expect("piped");
    let errors = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut err_pipe, &mut s);
        s
    });
    // Milliseconds from the start to the console's latest line.
    let last_line = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let last = std::sync::Arc::clone(&last_line);
    let reader = std::thread::spawn(move || {
        let mut console = String::new();
        let mut lines = BufReader::new(stdout);
        let mut line = Vec::new();
        while lines.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
            let ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
            last.store(ms, Ordering::Relaxed);
            let text = String::from_utf8_lossy(&line);
            on_line(&text);
            console.push_str(&text);
            line.clear();
        }
        console
    });
    let mut stalled = false;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break Some(s);
        }
        let quiet = start
            .elapsed()
            .saturating_sub(Duration::from_millis(last_line.load(Ordering::Relaxed)));
        stalled = outer.quiet_limit.is_some_and(|q| quiet > q);
        if stalled || start.elapsed() > outer.timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let console = reader.join().unwrap_or_default();
    let stderr = errors.join().unwrap_or_default();
    let _ = std::fs::remove_file(&initrd);
    let elapsed = start.elapsed();
    if stalled {
        return Ok(Console {
            text: console,
            elapsed,
            stalled,
        });
    }
    let Some(qemu) = status else {
        bail!(
            "the nested run took longer than {} s; its console:\n{console}",
            outer.timeout.as_secs()
        );
    };
    if !qemu.success() {
        bail!(
            "QEMU failed ({qemu}): {}\nconsole:\n{console}",
            stderr.trim()
        );
    }
    Ok(Console {
        text: console,
        elapsed,
        stalled,
    })
}
