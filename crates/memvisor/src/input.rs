//! Memory to analyze: raw images, ELF core files, and live processes.

use std::fs::File;
use std::io::ErrorKind;
use std::ops::ControlFlow;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use object::read::elf::{ElfFile64, FileHeader, ProgramHeader};
use object::{Endianness, ReadCache};
use pagestore::{PAGE_SIZE, Page};

/// Why an input could not be read.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// the file does not exist
    #[error("{0}: no such file (an input is a raw memory image, an ELF core file, or pid:N)")]
    NotFound(PathBuf),
    /// the file could not be opened or read
    #[error("{path}: cannot read")]
    Io {
        /// the file
        path: PathBuf,
        /// what the OS said
        #[source]
        source: std::io::Error,
    },
    /// a raw image must be whole pages
    #[error(
        "{path}: not a memory image: {size} bytes is not a whole number of 4096-byte pages \
         (a raw image is a page-aligned dump; an ELF file must be a core dump)"
    )]
    NotMemoryImage {
        /// the file
        path: PathBuf,
        /// its size
        size: u64,
    },
    /// an ELF file that is not a core dump
    #[error(
        "{path}: an ELF file, but not a core dump ({what}); give a core from gdb's gcore, \
         QEMU's dump-guest-memory or the kernel's core dumps, or write raw:{path} if it is a \
         raw image that happens to begin with an ELF header"
    )]
    NotCore {
        /// the file
        path: PathBuf,
        /// what it is instead
        what: String,
    },
    /// the ELF structure is broken
    #[error("{path}: malformed ELF core")]
    BadElf {
        /// the file
        path: PathBuf,
        /// what the parser said
        #[source]
        source: object::Error,
    },
    /// a segment points past the end of the file
    #[error("{path}: truncated core: a segment ends at byte {end}, the file has {size}")]
    Truncated {
        /// the file
        path: PathBuf,
        /// where the segment ends
        end: u64,
        /// the file size
        size: u64,
    },
    /// `pid:` followed by something that is not a number
    #[error("{0:?}: not a process id (write pid:1234)")]
    BadPid(String),
    /// the process does not exist
    #[error("process {0} does not exist (it may have exited)")]
    NoProcess(u32),
    /// the process exists but its memory cannot be read
    #[error(
        "cannot read the memory of process {pid} (run as root or as its owner, and check \
         /proc/sys/kernel/yama/ptrace_scope)"
    )]
    Denied {
        /// the process
        pid: u32,
        /// what the OS said
        #[source]
        source: std::io::Error,
    },
    /// the process has no user memory to read
    #[error("process {0} has no readable user memory (a kernel thread, or a zombie)")]
    NoMemory(u32),
}

/// One input named on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A file: raw image or ELF core, told apart by its first bytes.
    File(PathBuf),
    /// A file read as a raw image whatever it begins with (`raw:PATH`): a dump of process
    /// memory often begins with the program's own ELF header.
    Raw(PathBuf),
    /// A live process.
    Pid(u32),
}

impl Input {
    /// `pid:N` or a path.
    pub fn parse(s: &str) -> Result<Input, InputError> {
        if let Some(n) = s.strip_prefix("pid:") {
            return n
                .parse()
                .map(Input::Pid)
                .map_err(|_| InputError::BadPid(s.to_string()));
        }
        Ok(match s.strip_prefix("raw:") {
            Some(p) => Input::Raw(PathBuf::from(p)),
            None => Input::File(PathBuf::from(s)),
        })
    }

    /// Opens the input and finds its memory, without reading the pages yet.
    pub fn open(&self) -> Result<Source, InputError> {
        match self {
            Input::File(p) => open_file(p, false),
            Input::Raw(p) => open_file(p, true),
            Input::Pid(pid) => open_pid(*pid),
        }
    }
}

/// The kind of an opened input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// A flat, page-aligned dump.
    Raw,
    /// The PT_LOAD segments of an ELF core.
    Core,
    /// A live process's resident pages.
    Process,
}

/// A byte range of the input that holds memory.
#[derive(Debug, Clone, Copy)]
struct Region {
    /// File offset, or virtual address for a process.
    start: u64,
    len: u64,
}

/// An opened input, ready to be read page by page.
#[derive(Debug)]
pub struct Source {
    /// How the input was named.
    pub name: String,
    /// What it is.
    pub kind: Kind,
    file: File,
    regions: Vec<Region>,
    pagemap: Option<File>,
}

/// What reading a source skipped.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Skipped {
    /// Mapped pages of a process that are neither resident nor swapped: they cost the host
    /// nothing, so they are not counted.
    pub not_resident: u64,
    /// Pages the kernel refused to read (device mappings and the like).
    pub unreadable: u64,
}

impl Skipped {
    /// Adds another source's skips to these.
    pub fn add(&mut self, o: Skipped) {
        self.not_resident += o.not_resident;
        self.unreadable += o.unreadable;
    }
}

const CHUNK_PAGES: usize = 256;

impl Source {
    /// Bytes of memory the source maps (an upper bound for progress bars).
    pub fn mapped_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.len).sum()
    }

    /// Calls `f` with every page, in order, until it says to stop; a partial last page of a
    /// region is zero-padded. `progress` gets the bytes of each chunk consumed.
    pub fn for_each_page(
        &self,
        mut f: impl FnMut(&Page) -> ControlFlow<()>,
        mut progress: impl FnMut(u64),
    ) -> Result<Skipped, InputError> {
        let mut skipped = Skipped::default();
        let mut buf = vec![0u8; CHUNK_PAGES * PAGE_SIZE];
        let mut present = vec![true; CHUNK_PAGES];
        for r in &self.regions {
            let mut off = 0u64;
            while off < r.len {
                let n =
                    usize::try_from((r.len - off).min(buf.len() as u64)).expect("at most a chunk");
                let pages = n.div_ceil(PAGE_SIZE);
                let at = r.start + off;
                if let Some(pm) = &self.pagemap {
                    self.residency(pm, at, &mut present[..pages])?;
                }
                for run in runs(&present[..pages]) {
                    let (lo, hi) = (run.0 * PAGE_SIZE, (run.1 * PAGE_SIZE).min(n));
                    let chunk = &mut buf[lo..run.1 * PAGE_SIZE];
                    chunk[hi - lo..].fill(0); // a region's partial last page reads as zero-padded
                    match self
                        .file
                        .read_exact_at(&mut chunk[..hi - lo], at + lo as u64)
                    {
                        Ok(()) => {
                            for p in chunk.chunks_exact(PAGE_SIZE) {
                                if f(p.try_into().expect("a page")).is_break() {
                                    return Ok(skipped);
                                }
                            }
                        }
                        // The kernel refuses some mappings of a live process (EIO).
                        Err(e)
                            if self.kind == Kind::Process
                                && e.raw_os_error() == Some(libc::EIO) =>
                        {
                            skipped.unreadable += (run.1 - run.0) as u64;
                        }
                        Err(source) => {
                            return Err(InputError::Io {
                                path: self.name.clone().into(),
                                source,
                            });
                        }
                    }
                }
                skipped.not_resident += present[..pages].iter().filter(|p| !**p).count() as u64;
                off += n as u64;
                progress(n as u64);
            }
        }
        Ok(skipped)
    }

    /// Marks which pages at `addr` are resident or swapped, from /proc/PID/pagemap.
    fn residency(&self, pm: &File, addr: u64, out: &mut [bool]) -> Result<(), InputError> {
        let mut raw = vec![0u8; out.len() * 8];
        pm.read_exact_at(&mut raw, addr / PAGE_SIZE as u64 * 8)
            .map_err(|source| InputError::Io {
                path: format!("{}/pagemap", self.name).into(),
                source,
            })?;
        for (o, e) in out.iter_mut().zip(raw.chunks_exact(8)) {
            let e = u64::from_le_bytes(e.try_into().expect("8 bytes"));
            *o = e & (3 << 62) != 0; // bit 63 present, bit 62 swapped
        }
        Ok(())
    }
}

/// Maximal runs of `true` as half-open index ranges.
fn runs(v: &[bool]) -> impl Iterator<Item = (usize, usize)> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        while i < v.len() && !v[i] {
            i += 1;
        }
        if i == v.len() {
            return None;
        }
        let s = i;
        while i < v.len() && v[i] {
            i += 1;
        }
        Some((s, i))
    })
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> InputError + '_ {
    move |source| {
        if source.kind() == ErrorKind::NotFound {
            InputError::NotFound(path.to_path_buf())
        } else {
            InputError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    }
}

fn open_file(path: &Path, force_raw: bool) -> Result<Source, InputError> {
    let file = File::open(path).map_err(io_err(path))?;
    let size = file.metadata().map_err(io_err(path))?.len();
    let mut magic = [0u8; 4];
    let is_elf = !force_raw && file.read_exact_at(&mut magic, 0).is_ok() && magic == *b"\x7fELF";
    let name = path.display().to_string();
    if !is_elf {
        if size == 0 || size % PAGE_SIZE as u64 != 0 {
            return Err(InputError::NotMemoryImage {
                path: path.into(),
                size,
            });
        }
        return Ok(Source {
            name,
            kind: Kind::Raw,
            file,
            regions: vec![Region {
                start: 0,
                len: size,
            }],
            pagemap: None,
        });
    }
    let regions = core_segments(path, &file, size)?;
    Ok(Source {
        name,
        kind: Kind::Core,
        file,
        regions,
        pagemap: None,
    })
}

/// The file ranges of an ELF core's PT_LOAD segments.
fn core_segments(path: &Path, file: &File, size: u64) -> Result<Vec<Region>, InputError> {
    let mut class = [0u8; 1];
    file.read_exact_at(&mut class, 4).map_err(io_err(path))?;
    if class[0] != 2 {
        // EI_CLASS: 1 is ELFCLASS32, 2 is ELFCLASS64.
        return Err(InputError::NotCore {
            path: path.into(),
            what: "a 32-bit ELF file; only 64-bit cores are read".into(),
        });
    }
    let bad = |source| InputError::BadElf {
        path: path.into(),
        source,
    };
    // ReadCache reads only the header and program headers, not the whole (large) core.
    let cache = ReadCache::new(file.try_clone().map_err(io_err(path))?);
    let elf = ElfFile64::<Endianness, _>::parse(&cache).map_err(bad)?;
    let endian = elf.endian();
    let e_type = elf.elf_header().e_type(endian);
    if e_type != object::elf::ET_CORE {
        let what = match e_type {
            object::elf::ET_EXEC => "an executable".to_string(),
            object::elf::ET_DYN => "a shared object or PIE executable".to_string(),
            object::elf::ET_REL => "an object file".to_string(),
            t => format!("ELF type {t}"),
        };
        return Err(InputError::NotCore {
            path: path.into(),
            what,
        });
    }
    let mut regions = Vec::new();
    for ph in elf.elf_program_headers() {
        if ph.p_type(endian) != object::elf::PT_LOAD || ph.p_filesz(endian) == 0 {
            continue;
        }
        let (start, len) = (ph.p_offset(endian), ph.p_filesz(endian));
        let end = start.saturating_add(len);
        if end > size {
            return Err(InputError::Truncated {
                path: path.into(),
                end,
                size,
            });
        }
        regions.push(Region { start, len });
    }
    Ok(regions)
}

fn open_pid(pid: u32) -> Result<Source, InputError> {
    let dir = PathBuf::from(format!("/proc/{pid}"));
    let read_err = |source: std::io::Error| match source.kind() {
        // A kernel thread or a zombie has a /proc entry but no memory to show.
        _ if source.raw_os_error() == Some(libc::ESRCH) && dir.join("stat").exists() => {
            InputError::NoMemory(pid)
        }
        _ if source.raw_os_error() == Some(libc::ESRCH) => InputError::NoProcess(pid),
        ErrorKind::NotFound => InputError::NoProcess(pid),
        ErrorKind::PermissionDenied => InputError::Denied { pid, source },
        _ => InputError::Io {
            path: dir.clone(),
            source,
        },
    };
    let maps = std::fs::read_to_string(dir.join("maps")).map_err(read_err)?;
    let file = File::open(dir.join("mem")).map_err(read_err)?;
    let pagemap = File::open(dir.join("pagemap")).map_err(read_err)?;
    let mut regions = Vec::new();
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms)) = (f.next(), f.next()) else {
            continue;
        };
        let name = f.nth(3).unwrap_or("");
        // vvar and friends are kernel pages that /proc/PID/mem refuses; vsyscall is not memory.
        if !perms.starts_with('r') || name.starts_with("[vvar") || name == "[vsyscall]" {
            continue;
        }
        let Some((lo, hi)) = range.split_once('-') else {
            continue;
        };
        let (Ok(lo), Ok(hi)) = (u64::from_str_radix(lo, 16), u64::from_str_radix(hi, 16)) else {
            continue;
        };
        if hi > lo {
            regions.push(Region {
                start: lo,
                len: hi - lo,
            });
        }
    }
    if regions.is_empty() {
        return Err(InputError::NoMemory(pid));
    }
    // Reading the first page tells apart "not allowed" from "allowed" before any work.
    let mut probe = [0u8; 1];
    if let Err(e) = file.read_exact_at(&mut probe, regions[0].start)
        && (e.kind() == ErrorKind::PermissionDenied || e.raw_os_error() == Some(libc::EPERM))
    {
        return Err(InputError::Denied { pid, source: e });
    }
    Ok(Source {
        name: format!("pid:{pid}"),
        kind: Kind::Process,
        file,
        regions,
        pagemap: Some(pagemap),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_maximal() {
        let v = [false, true, true, false, true, false, false, true];
        assert_eq!(runs(&v).collect::<Vec<_>>(), vec![(1, 3), (4, 5), (7, 8)]);
        assert_eq!(runs(&[]).count(), 0);
    }

    #[test]
    fn parses_inputs() {
        assert_eq!(Input::parse("pid:12").unwrap(), Input::Pid(12));
        assert!(matches!(Input::parse("pid:x"), Err(InputError::BadPid(_))));
        assert_eq!(
            Input::parse("a.core").unwrap(),
            Input::File("a.core".into())
        );
        assert_eq!(
            Input::parse("raw:a.img").unwrap(),
            Input::Raw("a.img".into())
        );
    }
}
