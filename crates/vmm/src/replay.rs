//! Setting up the replay guest (`guest/replay`): a real memory image in guest RAM and the
//! parameter block that tells the guest how to walk it.
//!
//! Guest physical layout (the kit's image sits at 2 MiB, its tables below 1 MiB):
//!
//! | guest physical | what |
//! |---|---|
//! | [`PARAMS_ADDR`] (0x8_0000) | the parameter block, below |
//! | [`DATA_BASE`] (16 MiB) | the image's pages, page `i` at `DATA_BASE + 4096 * i`; all-zero pages are never written |
//! | right after the data, page-aligned | the content map: bit `i % 8` of byte `i / 8` is set when page `i` is not all zeros |
//! | the top 1 MiB of RAM | the vCPUs' stacks |
//!
//! The parameter block, little-endian `u64`s:
//!
//! | offset | field |
//! |---|---|
//! | 0 | magic [`PARAMS_MAGIC`] (`"MVREPLAY"`) |
//! | 8 | version [`PARAMS_VERSION`] |
//! | 16 | data base (guest physical) |
//! | 24 | data pages |
//! | 32 | content map base (guest physical) |
//! | 40 | hot percent |
//! | 48 | warm percent |
//! | 56 | warm slices (1/N of the warm pages are read per round) |
//! | 64 | reads per touched page |
//! | 72 | duty percent |
//! | 80 | seed |
//! | 88 | batch microseconds |
//!
//! The guest sorts each page with content into hot, warm or cold by a seeded hash of its
//! index; all-zero pages (free memory in the guest the image came from) are never touched, so
//! they stay unallocated on the host.

use vm_memory::{Bytes, GuestAddress};

use crate::vm::{Vm, VmError};
use crate::x86::VCPU_STACK;

/// Where the parameter block lives: free guest RAM below 1 MiB (above the kit's page tables).
pub const PARAMS_ADDR: u64 = 0x8_0000;
/// The block's magic: "MVREPLAY", little endian.
pub const PARAMS_MAGIC: u64 = u64::from_le_bytes(*b"MVREPLAY");
/// The block's layout version.
pub const PARAMS_VERSION: u64 = 1;
/// Where the image's first page goes: 2 MiB-aligned, well above the kit's image.
pub const DATA_BASE: u64 = 16 << 20;
/// A page.
pub const PAGE: u64 = 4096;
/// Kept free at the top of RAM for the vCPUs' stacks (16 vCPUs of 64 KiB).
const STACKS: u64 = crate::vm::MAX_VCPUS as u64 * VCPU_STACK;

/// How the replay guest walks its image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayParams {
    /// Percent of the pages with content that are hot: every round reads several words of
    /// each and increments one, so each stays modified.
    pub hot_pct: u8,
    /// Percent of the pages with content that are warm: read only, a slice per round.
    pub warm_pct: u8,
    /// Each round reads 1/`warm_slices` of the warm pages, the next slice the next round.
    pub warm_slices: u32,
    /// Words read per touched page, spread over it (1 to 512).
    pub reads_per_page: u32,
    /// Busy percent of the time (1 to 100): after each round's work the guest asks for a
    /// sleep of its measured busy time × (100 − duty) / duty, so that with nothing slowing it
    /// down it is busy `duty_pct`% of the time, and whatever slows its work (faults, CPU
    /// contention) lengthens the sleep too and shows as fewer rounds per second. 100: never
    /// sleeps.
    pub duty_pct: u8,
    /// Seeds the hash that sorts pages into hot, warm and cold.
    pub seed: u64,
    /// The guest works in batches of rounds that last from this to 4 times this (100 µs to
    /// 1 s), reporting, polling and pacing between batches: every port access is a VM exit
    /// (some 17 µs under PVM), and every sleep costs the CPU caches' contents.
    pub batch_us: u32,
}

impl Default for ReplayParams {
    /// Hot 10%, warm 20% (1/32 of them per round), 8 reads a page, busy half the time,
    /// batches of 5 to 20 ms.
    fn default() -> Self {
        ReplayParams {
            hot_pct: 10,
            warm_pct: 20,
            warm_slices: 32,
            reads_per_page: 8,
            duty_pct: 50,
            seed: 0x6d65_6d76_6973_6f72,
            batch_us: 5_000,
        }
    }
}

/// Why an image could not be set up for the replay guest.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// the parameters are out of range
    #[error("bad replay parameters: {0}")]
    Params(&'static str),
    /// the image is empty
    #[error("the memory image is empty")]
    Empty,
    /// the VM is too small for the image
    #[error(
        "a {image}-byte image needs {need} bytes of guest RAM (replay_ram_size), the VM has {ram}"
    )]
    RamTooSmall {
        /// image bytes
        image: u64,
        /// RAM the image needs
        need: u64,
        /// RAM the VM has
        ram: u64,
    },
    /// writing guest memory failed
    #[error("writing the image into guest memory")]
    Memory(#[source] vm_memory::GuestMemoryError),
}

impl ReplayParams {
    fn check(&self) -> Result<(), ReplayError> {
        if u16::from(self.hot_pct) + u16::from(self.warm_pct) > 100 {
            return Err(ReplayError::Params("hot + warm percent above 100"));
        }
        if self.warm_slices == 0 {
            return Err(ReplayError::Params("warm slices must be at least 1"));
        }
        if !(1..=512).contains(&self.reads_per_page) {
            return Err(ReplayError::Params("reads per page must be 1 to 512"));
        }
        if !(1..=100).contains(&self.duty_pct) {
            return Err(ReplayError::Params("duty must be 1 to 100 percent"));
        }
        if !(100..=1_000_000).contains(&self.batch_us) {
            return Err(ReplayError::Params("batch must be 100 µs to 1 s"));
        }
        Ok(())
    }
}

/// The pages a `len`-byte image takes (a partial last page counts, padded with zeros).
fn pages(len: u64) -> u64 {
    len.div_ceil(PAGE)
}

/// Bytes of the content map for `pages` pages, page-aligned.
fn map_bytes(pages: u64) -> u64 {
    pages.div_ceil(8).div_ceil(PAGE) * PAGE
}

/// The guest RAM a VM needs to replay a `data_len`-byte image: the kit below 16 MiB, the
/// image, its content map and the stacks, rounded up to 2 MiB. (Give it to [`Vm::new`], which
/// refuses more than 4 GiB.)
pub fn replay_ram_size(data_len: u64) -> u64 {
    let p = pages(data_len);
    let need = DATA_BASE
        .saturating_add(p.saturating_mul(PAGE))
        .saturating_add(map_bytes(p))
        .saturating_add(STACKS);
    need.div_ceil(2 << 20).saturating_mul(2 << 20)
}

impl Vm {
    /// Puts a memory image (`data`: guest-physical RAM of some guest, as QEMU dumps it) and
    /// the replay guest's parameter block into this VM's RAM, which must be fresh (never run)
    /// and at least [`replay_ram_size`] bytes. All-zero pages are skipped: never written, so
    /// they stay unallocated on the host. Returns how many pages were written (those with
    /// content). Then boot `guest/replay` with [`Vm::run_image_ctl`].
    pub fn load_replay(&self, data: &[u8], params: &ReplayParams) -> Result<u64, VmError> {
        params.check()?;
        if data.is_empty() {
            return Err(ReplayError::Empty.into());
        }
        let image = data.len() as u64;
        let need = replay_ram_size(image);
        if need > self.ram_size() {
            return Err(ReplayError::RamTooSmall {
                image,
                need,
                ram: self.ram_size(),
            }
            .into());
        }
        let mem = self.memory();
        let write = |bytes: &[u8], at: u64| {
            mem.write_slice(bytes, GuestAddress(at))
                .map_err(ReplayError::Memory)
        };
        let n = pages(image);
        let map_base = DATA_BASE + n * PAGE;
        let page = usize::try_from(PAGE).expect("small");
        let mut map = vec![0u8; usize::try_from(n.div_ceil(8)).expect("RAM fits usize")];
        let mut written = 0;
        for (i, chunk) in data.chunks(page).enumerate() {
            if chunk.iter().all(|&b| b == 0) {
                continue;
            }
            write(chunk, DATA_BASE + i as u64 * PAGE)?;
            map[i / 8] |= 1 << (i % 8);
            written += 1;
        }
        write(&map, map_base)?;
        let block = [
            PARAMS_MAGIC,
            PARAMS_VERSION,
            DATA_BASE,
            n,
            map_base,
            u64::from(params.hot_pct),
            u64::from(params.warm_pct),
            u64::from(params.warm_slices),
            u64::from(params.reads_per_page),
            u64::from(params.duty_pct),
            params.seed,
            u64::from(params.batch_us),
        ];
        let bytes: Vec<u8> = block.iter().flat_map(|v| v.to_le_bytes()).collect();
        write(&bytes, PARAMS_ADDR)?;
        Ok(written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_size_covers_image_map_and_stacks() {
        assert_eq!(replay_ram_size(64 << 20), 82 << 20);
        assert_eq!(replay_ram_size(1), 18 << 20);
        assert!(replay_ram_size(u64::MAX) > 4 << 30);
    }

    #[test]
    fn bad_params_are_refused() {
        let ok = ReplayParams::default();
        assert!(ok.check().is_ok());
        for bad in [
            ReplayParams {
                hot_pct: 90,
                warm_pct: 11,
                ..ok
            },
            ReplayParams {
                warm_slices: 0,
                ..ok
            },
            ReplayParams {
                reads_per_page: 0,
                ..ok
            },
            ReplayParams {
                reads_per_page: 513,
                ..ok
            },
            ReplayParams { duty_pct: 0, ..ok },
            ReplayParams {
                duty_pct: 101,
                ..ok
            },
        ] {
            assert!(bad.check().is_err(), "{bad:?}");
        }
    }
}
