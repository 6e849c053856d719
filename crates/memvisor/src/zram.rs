//! A measured baseline: the same pages written to a real zram device, and what the kernel
//! says it spends on them (`mm_stat`'s mem_used_total: compressed data plus zsmalloc's own
//! overhead). The "LZ4 only" figure elsewhere is computed; this one is the kernel's.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use pagestore::{PAGE_SIZE, Page};

const CONTROL: &str = "/sys/class/zram-control";

/// Why zram could not be measured.
#[derive(Debug, thiserror::Error)]
pub enum ZramError {
    /// no zram-control: the module is not loaded or /sys is not the host's
    #[error("zram is not available here ({CONTROL} is missing: load the zram module)")]
    Unavailable,
    /// a sysfs or device operation failed
    #[error("zram: {what}")]
    Io {
        /// what was being done
        what: String,
        /// what the OS said
        #[source]
        source: std::io::Error,
    },
    /// the kernel does not offer the algorithm
    #[error("zram does not offer {0} here (see comp_algorithm)")]
    Algorithm(String),
    /// mm_stat could not be parsed
    #[error("zram: unexpected mm_stat {0:?}")]
    Stat(String),
}

/// What zram holds for the pages written to it.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct ZramStats {
    /// Bytes written (pages that are not same-filled).
    pub orig_data_bytes: u64,
    /// Compressed bytes.
    pub compr_data_bytes: u64,
    /// Memory zram really uses: compressed data plus allocator overhead.
    pub mem_used_bytes: u64,
    /// Same-filled pages (zero pages among them), stored as a word.
    pub same_pages: u64,
    /// Pages kept uncompressed.
    pub huge_pages: u64,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ZramError {
    let what = what.into();
    move |source| ZramError::Io { what, source }
}

/// A zram device of our own, reset and removed when dropped.
struct Device {
    id: u32,
}

impl Device {
    fn sys(&self, file: &str) -> PathBuf {
        PathBuf::from(format!("/sys/block/zram{}/{file}", self.id))
    }

    fn set(&self, file: &str, value: &str) -> Result<(), ZramError> {
        fs::write(self.sys(file), value)
            .map_err(io(format!("writing {value} to zram{}/{file}", self.id)))
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        let _ = fs::write(self.sys("reset"), "1");
        let _ = fs::write(format!("{CONTROL}/hot_remove"), self.id.to_string());
    }
}

/// Writes `pages` to a fresh zram device compressing with `algorithm` and reads its stats.
pub fn measure(pages: &[Page], algorithm: &str) -> Result<ZramStats, ZramError> {
    if !std::path::Path::new(CONTROL).exists() {
        return Err(ZramError::Unavailable);
    }
    let id =
        fs::read_to_string(format!("{CONTROL}/hot_add")).map_err(io("adding a zram device"))?;
    let dev = Device {
        id: id.trim().parse().map_err(|_| ZramError::Stat(id.clone()))?,
    };
    let offered =
        fs::read_to_string(dev.sys("comp_algorithm")).map_err(io("reading comp_algorithm"))?;
    if !offered
        .split_whitespace()
        .any(|a| a.trim_matches(|c| c == '[' || c == ']') == algorithm)
    {
        return Err(ZramError::Algorithm(algorithm.into()));
    }
    dev.set("comp_algorithm", algorithm)?;
    dev.set("disksize", &(pages.len() * PAGE_SIZE).to_string())?;
    let node = format!("/dev/zram{}", dev.id);
    // devtmpfs makes the node; give it a moment on a slow machine.
    let start = Instant::now();
    let mut f = loop {
        match OpenOptions::new().write(true).open(&node) {
            Ok(f) => break f,
            Err(_) if start.elapsed() < Duration::from_secs(2) => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(io(format!("opening {node}"))(e)),
        }
    };
    for chunk in pages.chunks(256) {
        f.write_all(chunk.as_flattened())
            .map_err(io(format!("writing {node}")))?;
    }
    f.sync_all().map_err(io(format!("syncing {node}")))?;
    drop(f);
    let stat = fs::read_to_string(dev.sys("mm_stat")).map_err(io("reading mm_stat"))?;
    let v: Vec<u64> = stat
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 7 {
        return Err(ZramError::Stat(stat));
    }
    Ok(ZramStats {
        orig_data_bytes: v[0],
        compr_data_bytes: v[1],
        mem_used_bytes: v[2],
        same_pages: v[5],
        huge_pages: v.get(7).copied().unwrap_or(0),
    })
}
