//! memvisor: a memory-efficient hosted hypervisor on Linux KVM.
//!
//! This binary is thin: argument parsing, progress and tables for people, JSON for programs.

mod alloc;
mod analyze;
mod bench;
mod bench_memory;
mod bench_nested;
mod bench_snapshot;
mod demo;
mod images;
mod input;
mod memimages;
mod memory;
mod nested;
mod snap;
mod tmem_cmd;
mod zram;

use std::io::IsTerminal;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use pagestore::{Compression, Config, DeltaCodec, PatchConfig, SimilarityConfig};

use crate::input::Input;
use crate::memimages::ImageSet;

#[global_allocator]
static ALLOC: alloc::Counting = alloc::Counting;

#[derive(Parser)]
#[command(
    name = "memvisor",
    version,
    about = "A memory-efficient hosted hypervisor on Linux KVM"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// What sharing, patching and compression would save on memory images and live processes.
    Analyze {
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        store: StoreArgs,
        /// Raw memory images, ELF core files (gcore, QEMU dump-guest-memory), pid:N, or raw:PATH
        /// to read a file as a raw image even if it begins with an ELF header.
        #[arg(required = true, value_name = "INPUT")]
        inputs: Vec<String>,
    },
    /// Benchmarks, each against a baseline measured in the same run.
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
    /// Boots a guest on /dev/kvm: a program of the guest kit (see guest/), a static ELF64
    /// executable, or Linux (a bzImage or vmlinux); its console on stdout and, when stdin is
    /// a terminal, typed from it (Ctrl-A x quits); exits with the guest's status.
    Run {
        /// Guest RAM, in bytes or with a K, M or G suffix.
        #[arg(long, default_value = "256M")]
        memory: String,
        /// vCPUs, each on a thread of its own (1 to 16).
        #[arg(long, default_value_t = 1)]
        vcpus: u8,
        /// A program of the guest kit (memtest, fault), built on first use.
        #[arg(long, conflicts_with_all = ["image", "kernel", "linux"])]
        guest: Option<String>,
        /// A Linux kernel: a bzImage or an ELF vmlinux.
        #[arg(long, conflicts_with_all = ["image", "linux"])]
        kernel: Option<std::path::PathBuf>,
        /// The initramfs for --kernel.
        #[arg(long, requires = "kernel")]
        initrd: Option<std::path::PathBuf>,
        /// Debian's kernel with a busybox initramfs, from Debian's packages (fetched and cached
        /// on first use; see `memvisor images`).
        #[arg(long, conflicts_with = "image")]
        linux: bool,
        /// With --linux: boot the ELF vmlinux unpacked from Debian's bzImage.
        #[arg(long, requires = "linux")]
        elf: bool,
        /// The kernel command line, replacing the default (see docs/vmm.md).
        #[arg(long)]
        cmdline: Option<String>,
        /// More kernel command line, after the default.
        #[arg(long)]
        append: Option<String>,
        /// A guest image file (a static ELF64 executable).
        #[arg(required_unless_present_any = ["guest", "kernel", "linux"])]
        image: Option<std::path::PathBuf>,
        /// Who manages guest RAM: none, ksm, share, share+patch or full (docs/pager.md).
        #[arg(long, default_value = "none")]
        policy: String,
        /// Pager: seconds untouched before a page is cold and goes to the store.
        #[arg(long, default_value_t = 8.0)]
        cold: f64,
        /// Pager: CPU budget of its scanner, as a fraction of one core.
        #[arg(long, default_value_t = 0.25)]
        cpu_budget: f64,
        /// Pager: keep resident guest RAM under this size (e.g. 64M), reclaiming the pages
        /// idle longest first.
        #[arg(long)]
        target: Option<String>,
        /// KSM (--policy ksm): ksmd's pages_to_scan (KSM's default rate is 100 pages per
        /// 20 ms; the setting is global and stays until this VM exits).
        #[arg(long, default_value_t = 100)]
        ksm_pages: u64,
        /// KSM (--policy ksm): ksmd's sleep_millisecs.
        #[arg(long, default_value_t = 20)]
        ksm_sleep: u64,
        /// Where the VM answers `memvisor stats` and `memvisor snapshot take` (default
        /// /run/memvisor/PID.sock).
        #[arg(long, alias = "stats-socket")]
        control_socket: Option<std::path::PathBuf>,
        /// Start with the memory engine off (the pager's scanner, or ksmd; the pager's fault
        /// service runs regardless); `memvisor engine TARGET on` turns it on.
        #[arg(long)]
        engine_off: bool,
        /// Boot this many copies of the guest in this one process, their guest RAM under one
        /// pager (one store: a page the copies have in common is kept once) or one KSM; each
        /// copy's console goes to DIR/guest-I.log (--console-dir), I from 1.
        #[arg(long, default_value_t = 1)]
        copies: usize,
        /// With --copies: the directory for the consoles (made if missing).
        #[arg(long)]
        console_dir: Option<std::path::PathBuf>,
        /// With --copies: start copy I (from 0) I times this many seconds after the first, so
        /// that their boots do not all fall together.
        #[arg(long, default_value_t = 0.0)]
        stagger: f64,
        /// For Linux: a command that the busybox initramfs runs in place of a shell (it goes
        /// after `--` on the kernel command line); its status becomes memvisor's.
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Turns a running VM's memory engine on or off: the pager's scanner (its fault service
    /// runs regardless), or ksmd (KSM has one switch for the whole host).
    Engine {
        /// The VM: its pid or its control socket; by default the only one running.
        target: Option<String>,
        /// on or off.
        #[arg(long, value_parser = ["on", "off"])]
        set: String,
    },
    /// Live memory stats of a VM started with `memvisor run --policy ...`.
    Stats {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// The VM: its pid or its stats socket; by default the only one running.
        target: Option<String>,
    },
    /// Guest images from Debian's packages: fetch, unpack and cache them, and print where;
    /// then the guest memory images for the replay benchmark, built in QEMU on first use
    /// (docs/memimages.md).
    Images {
        /// Skip the memory images (their first build takes a minute or two).
        #[arg(long)]
        no_memory: bool,
    },
    /// Transcendent memory: page pools served to any program (docs/tmem.md).
    Tmem {
        #[command(subcommand)]
        what: TmemCmd,
    },
    /// Linux under memvisor on hardware-style KVM: boots QEMU's TCG emulator with emulated
    /// AMD SVM, loads kvm-amd in it, and runs `memvisor run` on Debian's kernel there.
    Nested {
        /// The inner guest's vCPUs.
        #[arg(long, default_value_t = 1)]
        vcpus: u8,
        /// The inner guest's RAM.
        #[arg(long, default_value = "256M")]
        memory: String,
        /// Boot the ELF vmlinux unpacked from Debian's bzImage, not the bzImage.
        #[arg(long)]
        elf: bool,
        /// The outer (QEMU) guest's RAM, in MiB.
        #[arg(long, default_value_t = 1536)]
        outer_memory: u32,
        /// The outer (QEMU) guest's CPUs. One is the default: with two (QEMU's multi-threaded
        /// TCG), an inner vCPU triple-faulted mid-boot in one run of 18 (docs/vmm.md).
        #[arg(long, default_value_t = 1)]
        outer_cpus: u8,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// The command the inner Linux runs.
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Snapshots of running VMs and the store that keeps them (docs/snapshots.md).
    Snapshot {
        #[command(subcommand)]
        what: SnapshotCmd,
    },
    /// Starts a VM from a snapshot at once, its memory served lazily from the store.
    Restore {
        /// The snapshot.
        name: String,
        /// The snapshot store (default $MEMVISOR_STORE, or /var/lib/memvisor/snapshots).
        #[arg(long)]
        store: Option<std::path::PathBuf>,
        /// Take memory from this page server (`memvisor page-server`, Firecracker's
        /// handshake) instead of a page-server thread of this process.
        #[arg(long)]
        page_server: Option<std::path::PathBuf>,
        /// Where the restored VM answers requests (default /run/memvisor/PID.sock).
        #[arg(long)]
        control_socket: Option<std::path::PathBuf>,
    },
    /// A new snapshot that shares every page of another, in O(1).
    Clone {
        /// The snapshot to clone.
        from: String,
        /// The new snapshot's name.
        new: String,
        /// The snapshot store (default $MEMVISOR_STORE, or /var/lib/memvisor/snapshots).
        #[arg(long)]
        store: Option<std::path::PathBuf>,
    },
    /// Serves a snapshot's memory to VMMs that speak Firecracker's userfaultfd handshake
    /// (memvisor restore --page-server, Firecracker's Uffd memory backend).
    PageServer {
        /// The snapshot.
        name: String,
        /// The Unix socket to listen on.
        #[arg(long)]
        socket: std::path::PathBuf,
        /// The snapshot store (default $MEMVISOR_STORE, or /var/lib/memvisor/snapshots).
        #[arg(long)]
        store: Option<std::path::PathBuf>,
        /// Exit when the first VM served ends.
        #[arg(long)]
        once: bool,
    },
    /// The main job, nothing to configure: four guests replaying real Linux memory under
    /// memvisor's pager, live; live snapshots of eight more and a lazy restore; then real
    /// programs' memory analyzed and benchmarked.
    Demo {
        /// Pages for the benchmark part (fewer is quicker).
        #[arg(long, default_value_t = 32768)]
        bench_pages: usize,
        /// Seconds the guests run.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
    },
}

#[derive(Subcommand)]
enum SnapshotCmd {
    /// Snapshots a running VM (started with `memvisor run`), live: the guest pauses only to
    /// save its vCPUs and arm write protection.
    Take {
        /// The snapshot's name.
        name: String,
        /// The VM: its pid or control socket; by default the only one running.
        #[arg(long)]
        vm: Option<String>,
        /// The snapshot store (default $MEMVISOR_STORE, or /var/lib/memvisor/snapshots).
        #[arg(long)]
        store: Option<std::path::PathBuf>,
        /// Pause the VM for the whole copy (the plain pause-and-copy snapshot).
        #[arg(long)]
        paused: bool,
        /// Also take a pause-and-copy snapshot of the same instant under this name, to check
        /// the live one against (it lengthens the pause by a full copy).
        #[arg(long)]
        reference: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Lists snapshots: logical size, and the bytes only each holds.
    Ls {
        #[arg(long)]
        store: Option<std::path::PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Bytes the store takes on disk, by the form pages are kept in.
    Du {
        #[arg(long)]
        store: Option<std::path::PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Removes a snapshot (its pages go at the next gc).
    Rm {
        /// The snapshot.
        name: String,
        #[arg(long)]
        store: Option<std::path::PathBuf>,
        /// Collect its pages now.
        #[arg(long)]
        gc: bool,
    },
    /// Frees the pages no snapshot holds; safe against a crash at any point.
    Gc {
        #[arg(long)]
        store: Option<std::path::PathBuf>,
    },
    /// Checks that every page of every snapshot reads back to its content address.
    Fsck {
        #[arg(long)]
        store: Option<std::path::PathBuf>,
    },
}

#[derive(Subcommand)]
enum TmemCmd {
    /// Serves tmem pools over a Unix socket and/or TCP until killed.
    Serve {
        /// A Unix socket to listen on.
        #[arg(long)]
        unix: Option<std::path::PathBuf>,
        /// A TCP address to listen on, such as 127.0.0.1:7070.
        #[arg(long)]
        tcp: Option<String>,
        /// Where ephemeral pools live: local, or memcached=unix:PATH or memcached=HOST:PORT.
        #[arg(long, default_value = "local")]
        ephemeral: String,
        /// Where persistent pools live: local, or redis=redis://HOST:PORT/ or
        /// redis=redis+unix:///PATH.
        #[arg(long, default_value = "local")]
        persistent: String,
        /// Pages the local backend holds of each kind (ephemeral ones are then evicted,
        /// least recently used first; persistent puts are refused).
        #[arg(long, default_value_t = 262_144)]
        pages: usize,
        /// Pages the local backend may hold raw, answered at the cost of a copy, until an
        /// idle core patches and compresses them (0: every put encodes before it is
        /// answered). 16,384 pages is 64 MiB at most, for a burst of puts.
        #[arg(long, default_value_t = 16_384)]
        write_back: usize,
        /// Clients at once.
        #[arg(long, default_value_t = 1024)]
        max_clients: usize,
        /// Pools per client.
        #[arg(long, default_value_t = 64)]
        max_pools: usize,
        /// Persistent pages per client.
        #[arg(long, default_value_t = 1 << 20)]
        max_persistent_pages: u64,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Prints a tmem server's statistics (ADDR: unix:PATH or HOST:PORT).
    Stats {
        /// The server.
        addr: String,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Guests replaying real Linux memory images under each memory policy in turn (none,
    /// KSM, and the pager's share, share+patch and full): host memory held, CPU, fault
    /// latency and guest slowdown, side by side (docs/pager.md).
    Memory {
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
        /// Image set: homogeneous (four boots of one workload), mixed, or both.
        #[arg(long, default_value = "both")]
        set: String,
        /// Guests per run.
        #[arg(long, default_value_t = 4)]
        guests: usize,
        /// Seconds each policy runs.
        #[arg(long, default_value_t = 40)]
        seconds: u64,
        /// Seconds at the start left out of the guests' throughput.
        #[arg(long, default_value_t = 5)]
        warmup: u64,
        /// Policies to run, comma-separated. With `none` among them, one more `none` run
        /// closes the bench, and each run's slowdown is against the `none` runs on either
        /// side of it.
        #[arg(long, default_value = "none,ksm,share,share+patch,full")]
        policies: String,
        /// Passes over the policies: single runs differ by several percent in throughput,
        /// so the slowdown wants medians. Each run is printed, then each policy's medians.
        #[arg(long, default_value_t = 1)]
        repeat: usize,
        /// Percent of each image's non-zero pages the guest writes every round.
        #[arg(long, default_value_t = 2)]
        hot: u8,
        /// Percent it reads now and then.
        #[arg(long, default_value_t = 4)]
        warm: u8,
        /// Percent of the time each guest works (the rest it sleeps).
        #[arg(long, default_value_t = 25)]
        duty: u8,
        /// KSM's pages_to_scan during the KSM run.
        #[arg(long, default_value_t = 1000)]
        ksm_pages: u64,
        /// KSM's sleep_millisecs during the KSM run.
        #[arg(long, default_value_t = 10)]
        ksm_sleep: u64,
        /// Pager: seconds untouched before a page is cold.
        #[arg(long, default_value_t = 5.0)]
        cold: f64,
        /// Pager: CPU budget of its scanner, as a fraction of one core.
        #[arg(long, default_value_t = 0.5)]
        cpu_budget: f64,
        /// The full policy's compressor for pages that stay away: zstd:LEVEL, zstd (level 3)
        /// or lz4. Pages are compressed with LZ4 at reclaim.
        #[arg(long, default_value = "zstd:1")]
        compression: String,
        /// The full policy: seconds a page stays in the store before it is recompressed
        /// with --compression (0: at its first reclaim, if it never came back before).
        #[arg(long, default_value_t = memory::RECOMPRESS_AFTER)]
        recompress_after: f64,
        /// Also draw memory held over time as an SVG (one file per set: NAME-SET.svg).
        #[arg(long, value_name = "FILE.svg")]
        plot: Option<std::path::PathBuf>,
        /// A line per second per run.
        #[arg(long)]
        verbose: bool,
    },
    /// The homogeneous case of `bench memory` on live Linux guests, in the nested harness
    /// (QEMU TCG with emulated SVM): N guests of Debian's kernel doing the same workload, each
    /// a `memvisor run` of its own, under each policy in turn, one fresh outer guest per
    /// policy, KSM inside the same outer guest as the baseline (docs/nested-memory.md).
    NestedMemory {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Inner guests per policy.
        #[arg(long, default_value_t = 3)]
        guests: usize,
        /// Each inner guest's RAM.
        #[arg(long, default_value = "256M")]
        memory: String,
        /// Seconds the pager or ksmd gets after the last guest has done its workload.
        #[arg(long, default_value_t = 40)]
        seconds: u64,
        /// Policies to run, comma-separated (none, ksm, share, share+patch, full).
        #[arg(long, default_value = "ksm,full")]
        policies: String,
        /// KSM's pages_to_scan during the KSM run.
        #[arg(long, default_value_t = 1000)]
        ksm_pages: u64,
        /// KSM's sleep_millisecs during the KSM run.
        #[arg(long, default_value_t = 10)]
        ksm_sleep: u64,
        /// Pager: seconds untouched before a page is cold (counted from when the engines
        /// start, once every guest is ready).
        #[arg(long, default_value_t = 5.0)]
        cold: f64,
        /// Pager: CPU budget of each guest's scanner, as a fraction of one core.
        #[arg(long, default_value_t = 1.0)]
        cpu_budget: f64,
        /// The outer guest's RAM in MiB (default: the guests' RAM plus 768 MiB, at least
        /// 1536).
        #[arg(long)]
        outer_memory: Option<u32>,
        /// Give up on one policy's outer run after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// Run all guests in one `memvisor run --copies N`, under one pager with one store
        /// (as `bench memory` does), instead of a process per guest.
        #[arg(long)]
        one_process: bool,
        /// Copy the outer guest's console to stderr.
        #[arg(long)]
        verbose: bool,
    },
    /// tmem: puts, gets and flushes of real pages through the tmem server (local, memcached
    /// and Redis backends) against the same pages straight to memcached and Redis.
    Tmem {
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
        /// Clients at once, each on a connection of its own.
        #[arg(long, default_value_t = 4)]
        clients: usize,
        /// Runs to take the median of.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Most pages to read from the inputs.
        #[arg(long, default_value_t = 16384)]
        max_pages: usize,
        /// The tmem server's write-back limit in pages, as `tmem serve --write-back` (0:
        /// every put encodes before it is answered).
        #[arg(long, default_value_t = 16_384)]
        write_back: usize,
        /// The tmem server's page store.
        #[command(flatten)]
        store: StoreArgs,
        /// Inputs as for analyze; by default this machine's own processes.
        #[arg(value_name = "INPUT")]
        inputs: Vec<String>,
    },
    /// Live snapshots of guests replaying real memory images: store bytes against flat
    /// memory files and those files under zstd, guest pause, restore time and fault latency;
    /// and a 1 GiB memtest guest snapshotted mid-run and restored.
    Snapshot {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Snapshots (one guest each).
        #[arg(long, default_value_t = 10)]
        guests: usize,
        /// Image set: homogeneous (four boots of one workload) or mixed.
        #[arg(long, default_value = "homogeneous")]
        set: String,
        /// Seconds each guest runs before its snapshot.
        #[arg(long, default_value_t = 1.0)]
        warmup: f64,
        /// Restores timed.
        #[arg(long, default_value_t = 3)]
        restores: usize,
        /// RAM of the memtest guest (0 skips it).
        #[arg(long, default_value = "1G")]
        big: String,
        /// zstd level of the baseline (3 is the zstd tool's default).
        #[arg(long, default_value_t = 3)]
        zstd_level: i32,
        /// Working directory (made fresh, removed after).
        #[arg(long, default_value = "/var/tmp/memvisor-bench-snapshot")]
        dir: std::path::PathBuf,
    },
    /// The page store on real pages: classify, insert and read per class, against memcpy and
    /// lz4_flex; footprint against sharing only and LZ4 only; the delta codecs compared.
    Pagestore {
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
        /// Runs to take the median of.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Most pages to read from the inputs.
        #[arg(long, default_value_t = 65536)]
        max_pages: usize,
        #[command(flatten)]
        store: StoreArgs,
        /// Inputs as for analyze; by default this machine's own processes.
        #[arg(value_name = "INPUT")]
        inputs: Vec<String>,
    },
}

/// How the page store is configured.
#[derive(Args, Clone)]
struct StoreArgs {
    /// Compressor: lz4, or zstd or zstd:LEVEL (1-19).
    #[arg(long, default_value = "lz4")]
    compression: String,
    /// Turn sub-page patching off.
    #[arg(long)]
    no_patch: bool,
    /// Delta codec for patches: xor-rle, xor-lz4 or copy-insert.
    #[arg(long, default_value = "xor-rle")]
    codec: String,
    /// Largest patch kept, in bytes.
    #[arg(long, default_value_t = 2048)]
    max_patch: usize,
    /// Similarity index shape K,S: K keys per page, each over S 64-byte blocks.
    #[arg(long, default_value = "2,1")]
    similarity: String,
}

impl StoreArgs {
    /// The same options as command-line arguments, for a server the bench starts.
    fn to_args(&self) -> Vec<String> {
        let mut a = vec![
            format!("--compression={}", self.compression),
            format!("--codec={}", self.codec),
            format!("--max-patch={}", self.max_patch),
            format!("--similarity={}", self.similarity),
        ];
        if self.no_patch {
            a.push("--no-patch".into());
        }
        a
    }

    fn config(&self) -> Result<Config> {
        let compression = match self.compression.split_once(':') {
            None if self.compression == "lz4" => Compression::Lz4,
            None if self.compression == "zstd" => Compression::Zstd { level: 3 },
            Some(("zstd", l)) => Compression::Zstd {
                level: l.parse().with_context(|| {
                    format!("--compression {}: level must be a number", self.compression)
                })?,
            },
            _ => bail!(
                "--compression {}: use lz4, zstd or zstd:LEVEL",
                self.compression
            ),
        };
        let Some(codec) = DeltaCodec::ALL.into_iter().find(|c| c.name() == self.codec) else {
            bail!(
                "--codec {}: use xor-rle, xor-lz4 or copy-insert",
                self.codec
            );
        };
        let sim = self
            .similarity
            .split_once(',')
            .and_then(|(k, s)| Some((k.trim().parse().ok()?, s.trim().parse().ok()?)))
            .with_context(|| {
                format!(
                    "--similarity {}: write K,S, for example 2,1",
                    self.similarity
                )
            })?;
        let cfg = Config {
            compression,
            patch: (!self.no_patch).then_some(PatchConfig {
                codec,
                max_patch: self.max_patch,
                similarity: SimilarityConfig {
                    indices: sim.0,
                    blocks_per_index: sim.1,
                    ..SimilarityConfig::default()
                },
            }),
            ..Config::default()
        };
        cfg.validate().context("invalid store options")?;
        Ok(cfg)
    }
}

fn parse_inputs(raw: &[String]) -> Result<Vec<Input>> {
    raw.iter()
        .map(|s| Input::parse(s).map_err(Into::into))
        .collect()
}

fn progress_bar(quiet: bool) -> ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(0);
    pb.set_style(
        ProgressStyle::with_template(
            "{spinner} {bytes}/{total_bytes} {bar:40} {bytes_per_sec} eta {eta}",
        )
        .expect("valid template"),
    );
    pb
}

/// Analyzes `inputs` and prints tables (or JSON).
fn run_analyze(inputs: &[Input], cfg: Config, json: bool) -> Result<analyze::Analysis> {
    let pb = progress_bar(json);
    let a = analyze::analyze(inputs, cfg, |total| pb.set_length(total), |n| pb.inc(n))?;
    pb.finish_and_clear();
    if json {
        println!("{}", serde_json::to_string_pretty(&a)?);
    } else {
        print!("{}", analyze::render(&a));
    }
    Ok(a)
}

/// Bytes from "256M", "1G", "4096" and the like.
fn parse_size(s: &str) -> Result<u64> {
    let (num, mult) = match s.trim().to_ascii_uppercase().chars().last() {
        Some('K') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M') => (&s[..s.len() - 1], 1 << 20),
        Some('G') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let n: u64 = num
        .trim()
        .parse()
        .with_context(|| format!("--memory {s}: write a size such as 256M or 1G"))?;
    n.checked_mul(mult)
        .with_context(|| format!("--memory {s}: too large"))
}

/// What `memvisor run` boots.
enum Boot {
    Image(std::path::PathBuf),
    Linux(vmm::LinuxBoot),
}

/// The kernel command line for `memvisor run`: the default or `--cmdline`, then `--append`,
/// then the command after ` -- ` (which Linux hands to init as its arguments).
fn kernel_cmdline(
    cmdline: Option<&str>,
    append: Option<&str>,
    command: &[String],
) -> Result<String> {
    let mut line = cmdline.unwrap_or(vmm::linux::DEFAULT_CMDLINE).to_owned();
    if let Some(a) = append {
        line.push(' ');
        line.push_str(a);
    }
    if !command.is_empty() {
        line.push_str(" --");
        for arg in command {
            if arg.contains('"') || arg.is_empty() {
                bail!(
                    "the guest command's argument {arg:?} cannot be passed on a kernel command line (no double quotes, not empty)"
                );
            }
            if arg.contains(char::is_whitespace) {
                line.push_str(&format!(" \"{arg}\""));
            } else {
                line.push(' ');
                line.push_str(arg);
            }
        }
    }
    Ok(line)
}

/// `memvisor snapshot ...`.
fn run_snapshot(what: SnapshotCmd) -> Result<()> {
    let store_of = |s: Option<std::path::PathBuf>| s.unwrap_or_else(snap::default_store);
    match what {
        SnapshotCmd::Take {
            name,
            vm,
            store,
            paused,
            reference,
            json,
        } => {
            let store = store_of(store);
            std::fs::create_dir_all(&store)
                .with_context(|| format!("creating the snapshot store {}", store.display()))?;
            // The VM opens the store itself: give it a path that means the same there.
            let store = std::fs::canonicalize(&store)?;
            let req = snap::TakeRequest {
                store,
                name,
                paused,
                reference,
            };
            let mut v = serde_json::to_value(&req)?;
            v["op"] = "snapshot".into();
            let answer = snap::request(vm.as_deref(), &v)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&answer)?);
            } else {
                let r: snap::TakeReport = serde_json::from_value(answer)?;
                println!("{}", snap::describe_take(&r));
            }
        }
        SnapshotCmd::Ls { store, json } => {
            let list = snap::open_store(&store_of(store))?.list()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print!("{}", snap::render_list(&list));
            }
        }
        SnapshotCmd::Du { store, json } => {
            let du = snap::open_store(&store_of(store))?.du()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&du)?);
            } else {
                print!("{}", snap::render_du(&du));
            }
        }
        SnapshotCmd::Rm { name, store, gc } => {
            let s = snap::open_store(&store_of(store))?;
            s.remove(&name)?;
            println!("removed {name}");
            if gc {
                println!("{}", snap::describe_gc(&s.gc()?));
            }
        }
        SnapshotCmd::Gc { store } => {
            println!(
                "{}",
                snap::describe_gc(&snap::open_store(&store_of(store))?.gc()?)
            );
        }
        SnapshotCmd::Fsck { store } => {
            let r = snap::open_store(&store_of(store))?.fsck()?;
            println!("{}", snap::describe_fsck(&r));
            if !r.is_clean() {
                bail!("the snapshot store has problems (listed above)");
            }
        }
    }
    Ok(())
}

/// `memvisor restore`: returns the guest's exit status.
fn run_restore(
    store: &std::path::Path,
    name: &str,
    page_server: Option<&std::path::Path>,
    socket: Option<std::path::PathBuf>,
) -> Result<u8> {
    let control = std::sync::Arc::new(vmm::Control::new());
    let source = match page_server {
        Some(p) => snap::PageServer::Socket(p),
        None => snap::PageServer::InProcess,
    };
    let path =
        socket.unwrap_or_else(|| memory::socket_dir().join(format!("{}.sock", std::process::id())));
    let (exit, _, report) = snap::restore(
        store,
        name,
        &source,
        std::io::stdout(),
        &control,
        Some(&path),
    )?;
    eprintln!("memvisor: {}", snap::describe_restore(&report));
    eprintln!("memvisor: restored guest {name}: {exit:?}");
    Ok(match exit {
        vmm::Exit::Status(s) => s,
        vmm::Exit::Reset | vmm::Exit::Halt | vmm::Exit::Quit => 0,
        vmm::Exit::Panic => bail!("the guest kernel panicked (its console above says why)"),
    })
}

/// A running VM's answer to one control-socket request.
pub(crate) fn control_answer(
    req: &serde_json::Value,
    vm: &snap::VmHandle,
    pager: Option<&pager::Pager>,
    ksm: Option<&memory::Ksm>,
) -> serde_json::Value {
    let err = |e: String| serde_json::json!({ "error": e });
    match req.get("op").and_then(serde_json::Value::as_str) {
        Some("engine") => engine_answer(req, pager, ksm),
        Some("stats") => match pager {
            Some(pg) => serde_json::to_value(pg.stats()).unwrap_or_default(),
            // Without a pager, what guest RAM holds resident: the figure `none` and KSM are
            // measured by.
            None => serde_json::to_value(memory::RamStats::of(vm.ram, vm.len)).unwrap_or_default(),
        },
        Some("snapshot") => match serde_json::from_value::<snap::TakeRequest>(req.clone()) {
            Ok(r) => match snap::take(vm, &r) {
                Ok(rep) => serde_json::to_value(rep).unwrap_or_default(),
                Err(e) => err(format!("{e:#}")),
            },
            Err(e) => err(format!("bad snapshot request: {e}")),
        },
        _ => err("unknown request (this memvisor answers stats, engine and snapshot)".into()),
    }
}

/// The answer to `{"op":"engine","on":BOOL}`: the pager's scanner or ksmd on or off.
fn engine_answer(
    req: &serde_json::Value,
    pager: Option<&pager::Pager>,
    ksm: Option<&memory::Ksm>,
) -> serde_json::Value {
    let Some(on) = req.get("on").and_then(serde_json::Value::as_bool) else {
        return serde_json::json!({ "error": "engine: say \"on\": true or false" });
    };
    match (pager, ksm) {
        (Some(pg), _) => pg.set_scanning(on),
        (None, Some(k)) => {
            if let Err(e) = k.set_running(on) {
                return serde_json::json!({ "error": format!("{e:#}") });
            }
        }
        (None, None) => {
            return serde_json::json!({
                "error": "this VM runs with no memory engine (--policy none)"
            });
        }
    }
    serde_json::json!({ "on": on })
}

/// `memvisor run`'s memory policy options.
struct MemoryArgs {
    policy: memory::Policy,
    cold: f64,
    cpu_budget: f64,
    target: Option<u64>,
    /// ksmd's pages_to_scan and sleep_millisecs under --policy ksm.
    ksm_rate: (u64, u64),
    /// Start with the scanner or ksmd off.
    engine_off: bool,
    socket: Option<std::path::PathBuf>,
}

/// Guest RAM `rams` under a pager in `mode`, with `mem`'s settings (its scanner off with
/// --engine-off); a failure of its fault service aborts every VM of `controls`.
fn start_pager(
    mem: &MemoryArgs,
    mode: pager::Mode,
    rams: &[(*mut u8, usize)],
    controls: &[std::sync::Arc<vmm::Control>],
) -> Result<(
    std::sync::Arc<pager::Pager>,
    Vec<std::sync::Arc<pager::Region>>,
)> {
    for &(p, l) in rams {
        memory::no_huge_pages(p, l);
    }
    let cold = (mode == pager::Mode::Full).then_some(memory::COLD_COMPRESSION);
    let policy = memory::pager_policy(
        mem.cold,
        mem.cpu_budget,
        mem.target,
        cold,
        memory::RECOMPRESS_AFTER,
    )?;
    let (pg, regions) = memory::pager_for(mode.store_config(), policy, rams, !mem.engine_off)?;
    let pg = std::sync::Arc::new(pg);
    let cs = controls.to_vec();
    pg.on_failure(move |why| {
        for c in &cs {
            c.abort(format!("the pager's fault service failed: {why}"));
        }
    });
    Ok((pg, regions))
}

/// Boots one guest and returns its exit status (the VM's own, or 0 for a reset or halt).
fn run_guest(memory: &str, vcpus: u8, boot: &Boot, mem: &MemoryArgs) -> Result<u8> {
    use std::os::fd::AsFd;
    use vmm_sys_util::terminal::Terminal;

    /// Puts the terminal back in canonical mode however the run ends.
    struct Raw;
    impl Drop for Raw {
        fn drop(&mut self) {
            let _ = std::io::stdin().lock().set_canon_mode();
        }
    }

    if let memory::Policy::Pager(_) = mem.policy {
        // Before anything else: without userfaultfd the pager cannot run, and the user
        // should hear why first.
        pager::uffd::Uffd::new()?;
    }
    let vm = vmm::Vm::new(parse_size(memory)?)?;
    let (ram, ram_len) = vm.ram_host_range();
    let control = std::sync::Arc::new(vmm::Control::new());
    let ksm = match mem.policy {
        memory::Policy::Ksm => {
            // KSM's own default rate (100 pages per 20 ms) unless told otherwise: what a user
            // who just turns it on gets.
            let k = memory::Ksm::with_run(mem.ksm_rate.0, mem.ksm_rate.1, !mem.engine_off)?;
            k.merge(ram, ram_len)?;
            Some(std::sync::Arc::new(k))
        }
        _ => None,
    };
    let pager = match mem.policy {
        memory::Policy::Pager(mode) => Some(start_pager(
            mem,
            mode,
            &[(ram, ram_len)],
            std::slice::from_ref(&control),
        )?),
        _ => None,
    };
    // Every VM answers on its control socket: stats (with a pager) and snapshots.
    let path = mem
        .socket
        .clone()
        .unwrap_or_else(|| memory::socket_dir().join(format!("{}.sock", std::process::id())));
    let handle = snap::VmHandle {
        ram,
        len: ram_len,
        control: std::sync::Arc::clone(&control),
        busy: pager.is_some().then(|| {
            format!(
                "it runs under the pager (--policy {}), which owns guest RAM's userfaultfd; \
                 snapshots need --policy none or ksm",
                mem.policy.name()
            )
        }),
        // KSM merges pages by replacing them, which need not keep userfaultfd's
        // write-protect bit: a write after the snapshot's instant could slip into it.
        no_live: matches!(mem.policy, memory::Policy::Ksm).then(|| {
            "KSM (--policy ksm) may merge a write-protected page and drop its protection".into()
        }),
    };
    let for_socket = pager.as_ref().map(|(pg, _)| std::sync::Arc::clone(pg));
    let ksm_for_socket = ksm.clone();
    let _control_server = memory::ControlServer::start(&path, move |req| {
        control_answer(
            req,
            &handle,
            for_socket.as_deref(),
            ksm_for_socket.as_deref(),
        )
    })?;
    if pager.is_some() {
        eprintln!(
            "memvisor: pager {} on {} MiB of guest RAM; live stats: memvisor stats {}",
            mem.policy.name(),
            ram_len >> 20,
            path.display()
        );
    }
    let stdin = std::io::stdin();
    // A terminal is put in raw mode, so keys reach the guest as typed, and restored after.
    let tty = stdin.is_terminal() && stdin.lock().set_raw_mode().is_ok();
    let _raw = tty.then_some(Raw);
    let start = std::time::Instant::now();
    let input = tty.then(|| stdin.as_fd());
    let (what, result) = match boot {
        Boot::Image(path) => {
            let bytes =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            let r = vm.run_image_ctl(&bytes, vcpus, std::io::stdout(), input, Some(&control));
            (path.display().to_string(), r)
        }
        Boot::Linux(linux) => {
            let r = vm.run_linux_ctl(linux, vcpus, std::io::stdout(), input, Some(&control));
            (linux.kernel.display().to_string(), r)
        }
    };
    drop(_raw);
    drop(_control_server);
    if let Some((pg, regions)) = &pager {
        eprint!("memvisor: memory at exit\n{}", memory::render(&pg.stats()));
        for r in regions {
            pg.forget(r)?;
        }
    }
    drop(ksm);
    let (exit, _) = result?;
    eprintln!(
        "memvisor: guest {what} after {:.3} s: {exit:?}",
        start.elapsed().as_secs_f64()
    );
    Ok(match exit {
        vmm::Exit::Status(s) => s,
        vmm::Exit::Reset | vmm::Exit::Halt | vmm::Exit::Quit => 0,
        vmm::Exit::Panic => bail!("the guest kernel panicked (its console above says why)"),
    })
}

/// `memvisor run --copies N`: N guests booted alike in this one process, their guest RAM under
/// one pager or one KSM, each console to a file in `dir`; returns the first non-zero status.
fn run_copies(
    memory: &str,
    vcpus: u8,
    boot: &Boot,
    mem: &MemoryArgs,
    copies: usize,
    dir: &std::path::Path,
    stagger: f64,
) -> Result<u8> {
    use std::sync::Arc;

    if !(0.0..=3600.0).contains(&stagger) {
        bail!("--stagger must be 0 to 3600 seconds");
    }
    if let memory::Policy::Pager(_) = mem.policy {
        pager::uffd::Uffd::new()?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let size = parse_size(memory)?;
    let vms: Vec<vmm::Vm> = (0..copies)
        .map(|_| vmm::Vm::new(size))
        .collect::<Result<_, _>>()?;
    let rams: Vec<(*mut u8, usize)> = vms.iter().map(vmm::Vm::ram_host_range).collect();
    let controls: Vec<Arc<vmm::Control>> =
        vms.iter().map(|_| Arc::new(vmm::Control::new())).collect();
    let ksm = match mem.policy {
        memory::Policy::Ksm => {
            let k = memory::Ksm::with_run(mem.ksm_rate.0, mem.ksm_rate.1, !mem.engine_off)?;
            for &(p, l) in &rams {
                k.merge(p, l)?;
            }
            Some(Arc::new(k))
        }
        _ => None,
    };
    let pager = match mem.policy {
        memory::Policy::Pager(mode) => Some(start_pager(mem, mode, &rams, &controls)?),
        _ => None,
    };
    // One socket for all copies: the pager's stats cover every copy; without a pager, the
    // resident guest RAM of all of them. Snapshots are of one VM, so they are refused here.
    let path = mem
        .socket
        .clone()
        .unwrap_or_else(|| memory::socket_dir().join(format!("{}.sock", std::process::id())));
    let handles: Vec<snap::VmHandle> = rams
        .iter()
        .zip(&controls)
        .map(|(&(ram, len), c)| snap::VmHandle {
            ram,
            len,
            control: Arc::clone(c),
            busy: Some("it is one of several copies in one process (--copies)".into()),
            no_live: None,
        })
        .collect();
    let for_socket = pager.as_ref().map(|(pg, _)| Arc::clone(pg));
    let ksm_for_socket = ksm.clone();
    let control_server = memory::ControlServer::start(&path, move |req| {
        match req.get("op").and_then(serde_json::Value::as_str) {
            Some("stats") => {}
            Some("engine") => {
                return engine_answer(req, for_socket.as_deref(), ksm_for_socket.as_deref());
            }
            _ => {
                return serde_json::json!({
                    "error": "this process runs several copies (--copies): it answers stats \
                              and engine only"
                });
            }
        }
        match &for_socket {
            Some(pg) => serde_json::to_value(pg.stats()).unwrap_or_default(),
            None => {
                let all = handles
                    .iter()
                    .map(|h| memory::RamStats::of(h.ram, h.len))
                    .fold(
                        memory::RamStats {
                            ram_bytes: 0,
                            resident_bytes: 0,
                        },
                        |a, b| memory::RamStats {
                            ram_bytes: a.ram_bytes + b.ram_bytes,
                            resident_bytes: a.resident_bytes + b.resident_bytes,
                        },
                    );
                serde_json::to_value(all).unwrap_or_default()
            }
        }
    })?;
    eprintln!(
        "memvisor: {copies} copies under --policy {}, consoles in {}; live stats: memvisor stats \
         {}",
        mem.policy.name(),
        dir.display(),
        path.display()
    );
    let image = match boot {
        Boot::Image(p) => {
            Some(std::fs::read(p).with_context(|| format!("reading {}", p.display()))?)
        }
        Boot::Linux(_) => None,
    };
    let start = std::time::Instant::now();
    let results: Vec<Result<vmm::Exit>> = std::thread::scope(|s| {
        let threads: Vec<_> = vms
            .iter()
            .zip(&controls)
            .enumerate()
            .map(|(i, (vm, control))| {
                let image = image.as_deref();
                s.spawn(move || -> Result<vmm::Exit> {
                    std::thread::sleep(std::time::Duration::from_secs_f64(stagger * i as f64));
                    let log = dir.join(format!("guest-{}.log", i + 1));
                    let console = std::fs::File::create(&log)
                        .with_context(|| format!("creating {}", log.display()))?;
                    let r = match (boot, image) {
                        (Boot::Linux(linux), _) => {
                            vm.run_linux_ctl(linux, vcpus, console, None, Some(control))
                        }
                        (Boot::Image(_), Some(bytes)) => {
                            vm.run_image_ctl(bytes, vcpus, console, None, Some(control))
                        }
                        (Boot::Image(_), None) => unreachable!("read above"),
                    };
                    Ok(r.with_context(|| format!("copy {}", i + 1))?.0)
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| {
                t.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a copy's thread panicked")))
            })
            .collect()
    });
    drop(control_server);
    if let Some((pg, regions)) = &pager {
        eprint!("memvisor: memory at exit\n{}", memory::render(&pg.stats()));
        for r in regions {
            pg.forget(r)?;
        }
    }
    drop(ksm);
    let mut status = 0;
    for (i, r) in results.into_iter().enumerate() {
        let exit = r?;
        eprintln!(
            "memvisor: copy {} after {:.3} s: {exit:?}",
            i + 1,
            start.elapsed().as_secs_f64()
        );
        let s = match exit {
            vmm::Exit::Status(s) => s,
            vmm::Exit::Reset | vmm::Exit::Halt | vmm::Exit::Quit => 0,
            vmm::Exit::Panic => bail!("copy {}'s kernel panicked (its console says why)", i + 1),
        };
        if status == 0 {
            status = s;
        }
    }
    Ok(status)
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The whole chain on one line, without a backtrace: errors here are for people.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Analyze {
            json,
            store,
            inputs,
        } => {
            run_analyze(&parse_inputs(&inputs)?, store.config()?, json)?;
        }
        Cmd::Bench {
            what:
                BenchCmd::Pagestore {
                    json,
                    runs,
                    max_pages,
                    store,
                    inputs,
                },
        } => {
            let s = bench::run(&parse_inputs(&inputs)?, max_pages, runs, store.config()?)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{}", bench::render(&s));
            }
        }
        Cmd::Bench {
            what:
                BenchCmd::Snapshot {
                    json,
                    guests,
                    set,
                    warmup,
                    restores,
                    big,
                    zstd_level,
                    dir,
                },
        } => {
            let set = match set.as_str() {
                "homogeneous" => ImageSet::Homogeneous,
                "mixed" => ImageSet::Mixed,
                s => bail!("--set {s}: choose homogeneous or mixed"),
            };
            if guests == 0 || !(0.1..=60.0).contains(&warmup) {
                bail!("--guests must be at least 1 and --warmup 0.1 to 60 seconds");
            }
            let b = bench_snapshot::Bench {
                guests,
                set,
                warmup: std::time::Duration::from_secs_f64(warmup),
                run_after: std::time::Duration::from_secs(1),
                restores,
                big_ram: parse_size(&big)?,
                zstd_level,
                dir,
            };
            let r = bench_snapshot::run(&b, &mut |line| {
                if !json {
                    eprintln!("{line}");
                }
            })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{}", bench_snapshot::table(&b, &r));
            }
        }
        Cmd::Bench {
            what:
                BenchCmd::Memory {
                    json,
                    set,
                    guests,
                    seconds,
                    warmup,
                    policies,
                    repeat,
                    hot,
                    warm,
                    duty,
                    ksm_pages,
                    ksm_sleep,
                    cold,
                    cpu_budget,
                    compression,
                    recompress_after,
                    plot,
                    verbose,
                },
        } => {
            let compression = StoreArgs {
                compression,
                no_patch: false,
                codec: "xor-rle".into(),
                max_patch: 2048,
                similarity: "2,1".into(),
            }
            .config()?
            .compression;
            let sets = match set.as_str() {
                "both" => ImageSet::ALL.to_vec(),
                "homogeneous" => vec![ImageSet::Homogeneous],
                "mixed" => vec![ImageSet::Mixed],
                s => bail!("--set {s}: choose homogeneous, mixed or both"),
            };
            if guests == 0 || seconds < 2 || warmup >= seconds || repeat == 0 {
                bail!(
                    "--guests and --repeat must be at least 1, --seconds at least 2 and above \
                     --warmup"
                );
            }
            if hot as u16 + warm as u16 > 100 || !(1..=100).contains(&duty) {
                bail!("--hot plus --warm must be at most 100, and --duty 1 to 100");
            }
            let policies = policies
                .split(',')
                .map(str::parse)
                .collect::<Result<Vec<memory::Policy>>>()?;
            let mut all = Vec::new();
            for set in sets {
                let b = bench_memory::Bench {
                    set,
                    guests,
                    seconds,
                    warmup,
                    policies: policies.clone(),
                    repeat,
                    replay: vmm::ReplayParams {
                        hot_pct: hot,
                        warm_pct: warm,
                        duty_pct: duty,
                        ..vmm::ReplayParams::default()
                    },
                    ksm: (ksm_pages, ksm_sleep),
                    cold_secs: cold,
                    cpu_budget,
                    compression,
                    recompress_after,
                    verbose,
                };
                let runs = bench_memory::run(&b)?;
                if !json {
                    print!("{}", bench_memory::table(&b, &runs));
                    if repeat > 1 {
                        print!("{}", bench_memory::medians(&runs));
                    }
                }
                if let Some(path) = &plot {
                    let stem = path.with_extension("");
                    let file = format!("{}-{}.svg", stem.display(), set.name());
                    let title =
                        format!("host memory held, {} guests, {} images", guests, set.name());
                    std::fs::write(&file, bench_memory::svg(&title, &runs))
                        .with_context(|| format!("writing {file}"))?;
                    eprintln!("memvisor: drew {file}");
                }
                all.push(serde_json::json!({"set": set.name(), "runs": runs}));
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            }
        }
        Cmd::Bench {
            what:
                BenchCmd::NestedMemory {
                    json,
                    guests,
                    memory,
                    seconds,
                    policies,
                    ksm_pages,
                    ksm_sleep,
                    cold,
                    cpu_budget,
                    outer_memory,
                    timeout,
                    one_process,
                    verbose,
                },
        } => {
            if guests == 0 || seconds < 2 {
                bail!("--guests must be at least 1 and --seconds at least 2");
            }
            memory::pager_policy(cold, cpu_budget, None, None, 0.0)?;
            let guest_mib = parse_size(&memory)? >> 20;
            // The outer guest holds the guests' RAM at most, plus its own kernel, the
            // initramfs (memvisor, the inner kernel and initramfs) and the pagers' stores.
            let outer_mib = match outer_memory {
                Some(m) => m,
                None => u32::try_from(guest_mib * guests as u64 + 768)
                    .ok()
                    .filter(|&m| m <= 1 << 20)
                    .context("--guests times --memory is too large for the outer guest")?
                    .max(1536),
            };
            let policies = policies
                .split(',')
                .map(str::parse)
                .collect::<Result<Vec<memory::Policy>>>()?;
            let b = bench_nested::Bench {
                guests,
                memory,
                seconds,
                policies,
                ksm: (ksm_pages, ksm_sleep),
                cold_secs: cold,
                cpu_budget,
                outer_mib,
                timeout: std::time::Duration::from_secs(timeout),
                one_process,
                verbose,
            };
            let runs = bench_nested::run(&b)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&runs)?);
            } else {
                print!("{}", bench_nested::table(&b, &runs));
            }
        }
        Cmd::Bench {
            what:
                BenchCmd::Tmem {
                    json,
                    clients,
                    runs,
                    max_pages,
                    write_back,
                    store,
                    inputs,
                },
        } => {
            store.config()?;
            if clients == 0 || runs == 0 {
                bail!("--clients and --runs must be at least 1");
            }
            let (pages, sources) = bench::collect_pages(&parse_inputs(&inputs)?, max_pages)?;
            let b = tmem_cmd::bench(&pages, sources, clients, runs, write_back, &store.to_args())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&b)?);
            } else {
                print!("{}", tmem_cmd::render(&b));
            }
        }
        Cmd::Tmem {
            what:
                TmemCmd::Serve {
                    unix,
                    tcp,
                    ephemeral,
                    persistent,
                    pages,
                    write_back,
                    max_clients,
                    max_pools,
                    max_persistent_pages,
                    store,
                },
        } => tmem_cmd::serve(
            &tmem_cmd::Serve {
                unix,
                tcp,
                ephemeral,
                persistent,
                pages,
                write_back,
                limits: tmem::Limits {
                    clients: max_clients,
                    pools_per_client: max_pools,
                    persistent_pages_per_client: max_persistent_pages,
                },
            },
            &store.config()?,
        )?,
        Cmd::Tmem {
            what: TmemCmd::Stats { addr },
        } => tmem_cmd::stats(&addr)?,
        Cmd::Demo {
            bench_pages,
            seconds,
        } => demo::run(bench_pages, seconds)?,
        Cmd::Run {
            memory,
            vcpus,
            guest,
            kernel,
            initrd,
            linux,
            cmdline,
            append,
            image,
            command,
            elf,
            policy,
            cold,
            cpu_budget,
            target,
            ksm_pages,
            ksm_sleep,
            control_socket,
            copies,
            console_dir,
            stagger,
            engine_off,
        } => {
            let linux_boot = |kernel, initrd| -> Result<Boot> {
                Ok(Boot::Linux(vmm::LinuxBoot {
                    kernel,
                    initrd,
                    cmdline: kernel_cmdline(cmdline.as_deref(), append.as_deref(), &command)?,
                }))
            };
            let boot = match (guest, kernel, linux, image) {
                (Some(name), ..) => Boot::Image(vmm::kit::build(&name, &vmm::kit::target_dir())?),
                (None, Some(k), ..) => linux_boot(k, initrd)?,
                (None, None, true, _) => {
                    let d = images::debian()?;
                    linux_boot(if elf { d.vmlinux } else { d.vmlinuz }, Some(d.initrd))?
                }
                (None, None, false, Some(p)) => Boot::Image(p),
                (None, None, false, None) => {
                    bail!("name an image, --guest NAME, --kernel or --linux")
                }
            };
            if matches!(boot, Boot::Image(_)) && !command.is_empty() {
                bail!("a command after -- is for Linux guests (--kernel or --linux)");
            }
            let mem = MemoryArgs {
                policy: policy.parse()?,
                cold,
                cpu_budget,
                target: target.as_deref().map(parse_size).transpose()?,
                ksm_rate: (ksm_pages, ksm_sleep),
                engine_off,
                socket: control_socket,
            };
            let status = match (copies, console_dir) {
                (0, _) => bail!("--copies must be at least 1"),
                (1, None) => run_guest(&memory, vcpus, &boot, &mem)?,
                (n, Some(dir)) => run_copies(&memory, vcpus, &boot, &mem, n, &dir, stagger)?,
                (_, None) => bail!(
                    "--copies needs --console-dir DIR: each copy's console goes to a file there"
                ),
            };
            std::process::exit(i32::from(status));
        }
        Cmd::Snapshot { what } => run_snapshot(what)?,
        Cmd::Restore {
            name,
            store,
            page_server,
            control_socket,
        } => {
            let store = store.unwrap_or_else(snap::default_store);
            let status = run_restore(&store, &name, page_server.as_deref(), control_socket)?;
            std::process::exit(i32::from(status));
        }
        Cmd::Clone { from, new, store } => {
            let store = store.unwrap_or_else(snap::default_store);
            let t = std::time::Instant::now();
            snap::open_store(&store)?.clone_snapshot(&from, &new)?;
            println!(
                "{new}: a clone of {from}, sharing all its pages ({:.2} ms)",
                t.elapsed().as_secs_f64() * 1e3
            );
        }
        Cmd::PageServer {
            name,
            socket,
            store,
            once,
        } => {
            let store = store.unwrap_or_else(snap::default_store);
            snap::page_server(&store, &name, &socket, once)?;
        }
        Cmd::Engine { target, set } => {
            memory::control_request(
                target.as_deref(),
                &serde_json::json!({ "op": "engine", "on": set == "on" }),
            )?;
        }
        Cmd::Stats { json, target } => {
            let v = memory::fetch_stats(target.as_deref())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else if v.get("resident_bytes").is_some() {
                let r: memory::RamStats = serde_json::from_value(v)
                    .context("the stats socket answered with something else")?;
                print!("{}", r.render());
            } else {
                let st: pager::Stats = serde_json::from_value(v)
                    .context("the stats socket answered with something else")?;
                print!("{}", memory::render(&st));
            }
        }
        Cmd::Images { no_memory } => {
            let d = images::debian()?;
            println!("kernel    {} ({})", d.vmlinuz.display(), d.kernel_version);
            println!("vmlinux   {}", d.vmlinux.display());
            println!("initrd    {}", d.initrd.display());
            println!("busybox   {}", d.busybox.display());
            for m in &d.modules {
                println!("module    {}", m.display());
            }
            if !no_memory {
                memimages::print_all()?;
            }
        }
        Cmd::Nested {
            vcpus,
            memory,
            outer_memory,
            outer_cpus,
            timeout,
            command,
            elf,
        } => {
            let job = nested::Nested {
                elf,
                vcpus,
                memory,
                outer_mib: outer_memory,
                outer_cpus,
                timeout: std::time::Duration::from_secs(timeout),
                command,
                echo: true,
            };
            let out = nested::run(&job)?;
            eprintln!(
                "memvisor: nested run took {:.1} s; memvisor inside exited with {:?}",
                out.elapsed.as_secs_f64(),
                out.status
            );
            let Some(status) = out.status else {
                bail!("memvisor inside the outer guest reported no exit status (console above)");
            };
            std::process::exit(status);
        }
    }
    Ok(())
}
