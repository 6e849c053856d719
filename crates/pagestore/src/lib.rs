//! `pagestore`: the Difference Engine core of memvisor.
//!
//! A store of 4 KiB pages that keeps each page in the cheapest form that gives back its exact
//! bytes: not at all (zero), once for many owners (shared, after a full byte compare), as a
//! small patch against a similar page (found by a similarity index of 64-byte block hashes),
//! compressed (LZ4 or zstd), or raw. It knows nothing of KVM, userfaultfd or files; the pager,
//! snapshots and tmem pools all hold pages through it.
//!
//! Every byte it holds is accounted for in [`Stats`], payload and metadata apart.
#![warn(missing_docs)]

mod arena;
mod compress;
mod config;
mod contention;
pub mod delta;
mod page;
mod similarity;
mod store;

pub use compress::{CompressError, Compression, MAX_COMPRESSED};
pub use config::{Config, ConfigError, PatchConfig};
pub use contention::ContentionHook;
pub use delta::{DecodeError, DeltaCodec};
pub use page::{PAGE_SIZE, Page, is_zero};
pub use similarity::{Keys, Loc, MAX_LOC, SimilarityConfig, SimilarityIndex};
pub use store::{Class, FormStats, Outcome, PageId, PageStore, Reencode, Stats, StoreError};
