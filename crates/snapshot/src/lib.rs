//! `snapshot`: VM memory snapshots.
//!
//! - [`store`]: the on-disk snapshot store. Pages are content-addressed (BLAKE3) and kept in
//!   the pagestore's forms (once for every snapshot that holds them, as a patch against a
//!   similar page, or compressed); a snapshot is a manifest from guest page to stored page that
//!   opens in one read. Safe against a crash at any point; gc collects, fsck checks
//!   (docs/snapshots.md).
//! - [`live`]: live snapshots of running guest RAM, copy-on-write through userfaultfd write
//!   protection; the guest pauses only to arm it.
//! - [`server`]: the page server that restores a snapshot lazily through userfaultfd, with
//!   Firecracker's handshake, for our VMM and for others.
#![warn(missing_docs)]

pub mod live;
pub mod server;
pub mod store;

/// The page size every snapshot is kept in.
pub const PAGE: usize = 4096;

/// An error from the other side of a trait (a store, a VMM): kept whole as a source.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Where a snapshot's pages go as they are copied: several threads put at once, each page
/// index at most once.
pub trait PageSink: Sync {
    /// Page `index` holds these bytes.
    fn put_page(&self, index: u64, page: &[u8; PAGE]) -> Result<(), BoxError>;
    /// Page `index` is zero.
    fn put_zero(&self, index: u64) -> Result<(), BoxError>;
}

/// Where a restore's pages come from.
pub trait PageSource: Send + Sync {
    /// How many pages the snapshot has.
    fn pages(&self) -> u64;
    /// Whether page `index` is zero (cheap: no read).
    fn is_zero(&self, index: u64) -> bool;
    /// Page `index`'s bytes.
    fn read_page(&self, index: u64, out: &mut [u8; PAGE]) -> Result<(), BoxError>;
    /// The pages the guest touched first last time, to prefetch in this order.
    fn order(&self) -> &[u32];
}
