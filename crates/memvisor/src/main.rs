//! memvisor: a memory-efficient hosted hypervisor on Linux KVM.
//!
//! This binary is thin: argument parsing, progress and tables for people, JSON for programs.

mod alloc;
mod analyze;
mod bench;
mod demo;
mod input;
mod zram;

use std::io::IsTerminal;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use pagestore::{Compression, Config, DeltaCodec, PatchConfig, SimilarityConfig};

use crate::input::Input;

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
    /// Boots a guest on /dev/kvm: an image of the guest kit (see guest/) or a static ELF64
    /// executable, its console on stdout; exits with the guest's status.
    Run {
        /// Guest RAM, in bytes or with a K, M or G suffix.
        #[arg(long, default_value = "256M")]
        memory: String,
        /// vCPUs, each on a thread of its own (1 to 16).
        #[arg(long, default_value_t = 1)]
        vcpus: u8,
        /// A program of the guest kit (memtest, fault), built on first use.
        #[arg(long, conflicts_with = "image")]
        guest: Option<String>,
        /// A guest image file.
        #[arg(required_unless_present = "guest")]
        image: Option<std::path::PathBuf>,
    },
    /// The main job: real programs' memory analyzed and benchmarked, nothing to configure.
    Demo {
        /// Pages for the benchmark part (fewer is quicker).
        #[arg(long, default_value_t = 32768)]
        bench_pages: usize,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
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

/// Boots one guest and returns its exit status (the VM's own, or 0 for a reset or halt).
fn run_guest(
    memory: &str,
    vcpus: u8,
    guest: Option<&str>,
    image: Option<&std::path::Path>,
) -> Result<u8> {
    let path = match (guest, image) {
        (Some(name), _) => vmm::kit::build(name, &vmm::kit::target_dir())?,
        (None, Some(p)) => p.to_path_buf(),
        (None, None) => bail!("name an image or --guest NAME"),
    };
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let vm = vmm::Vm::new(parse_size(memory)?)?;
    let start = std::time::Instant::now();
    let (exit, _) = vm.run_image(&bytes, vcpus, std::io::stdout())?;
    eprintln!(
        "memvisor: guest {} after {:.3} s: {exit:?}",
        path.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(match exit {
        vmm::Exit::Status(s) => s,
        vmm::Exit::Reset | vmm::Exit::Halt => 0,
    })
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
        Cmd::Demo { bench_pages } => demo::run(bench_pages)?,
        Cmd::Run {
            memory,
            vcpus,
            guest,
            image,
        } => {
            let status = run_guest(&memory, vcpus, guest.as_deref(), image.as_deref())?;
            std::process::exit(i32::from(status));
        }
    }
    Ok(())
}
