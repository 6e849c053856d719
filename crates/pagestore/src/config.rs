//! How a store decides what form to keep a page in.

use serde::{Deserialize, Serialize};

use crate::compress::Compression;
use crate::delta::DeltaCodec;
use crate::page::PAGE_SIZE;
use crate::similarity::{MAX_BLOCKS, MAX_INDICES, SimilarityConfig};

/// The knobs of a [`crate::PageStore`]. The defaults are what docs/pagestore.md measured best.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// Whole-page compressor.
    pub compression: Compression,
    /// Keep a compressed page only when it is at most this many bytes; else keep it raw
    /// (a page that barely compresses costs a decompression on every read for little gain).
    pub max_compressed: usize,
    /// Sub-page patching; `None` turns patching off.
    pub patch: Option<PatchConfig>,
}

/// Sub-page patching.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatchConfig {
    /// The delta encoding.
    pub codec: DeltaCodec,
    /// Keep a patch only when it is at most this many bytes (Difference Engine: 2 KiB).
    pub max_patch: usize,
    /// How reference pages are found.
    pub similarity: SimilarityConfig,
}

impl Default for PatchConfig {
    fn default() -> Self {
        PatchConfig {
            codec: DeltaCodec::default(),
            max_patch: 2048,
            similarity: SimilarityConfig::default(),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            compression: Compression::Lz4,
            max_compressed: PAGE_SIZE * 3 / 4,
            patch: Some(PatchConfig::default()),
        }
    }
}

/// A configuration that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// similarity indices out of range
    #[error("similarity indices must be 1 to {MAX_INDICES}, not {0}")]
    Indices(usize),
    /// blocks per index out of range
    #[error("blocks per similarity index must be 1 to {MAX_BLOCKS}, not {0}")]
    Blocks(usize),
    /// a size bound above a page
    #[error("{what} must be at most {PAGE_SIZE} bytes, not {value}")]
    TooLarge {
        /// which bound
        what: &'static str,
        /// the value given
        value: usize,
    },
    /// zstd level out of range
    #[error("zstd level must be 1 to 19, not {0}")]
    ZstdLevel(i32),
}

impl Config {
    /// Sharing only, as KSM does: no patching, no compression.
    pub fn sharing_only() -> Self {
        Config {
            max_compressed: 0,
            patch: None,
            ..Config::default()
        }
    }

    /// Checks that the store can run with this configuration.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_compressed > PAGE_SIZE {
            return Err(ConfigError::TooLarge {
                what: "max_compressed",
                value: self.max_compressed,
            });
        }
        if let Compression::Zstd { level } = self.compression
            && !(1..=19).contains(&level)
        {
            return Err(ConfigError::ZstdLevel(level));
        }
        if let Some(p) = &self.patch {
            if !(1..=MAX_INDICES).contains(&p.similarity.indices) {
                return Err(ConfigError::Indices(p.similarity.indices));
            }
            if !(1..=MAX_BLOCKS).contains(&p.similarity.blocks_per_index) {
                return Err(ConfigError::Blocks(p.similarity.blocks_per_index));
            }
            if p.max_patch > PAGE_SIZE {
                return Err(ConfigError::TooLarge {
                    what: "max_patch",
                    value: p.max_patch,
                });
            }
        }
        Ok(())
    }
}
