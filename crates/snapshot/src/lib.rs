//! `snapshot`: VM memory snapshots.
//!
//! - [`store`]: the on-disk snapshot store. Pages are content-addressed and kept in the
//!   pagestore's forms (once for every snapshot that holds them, as a patch against a similar
//!   page, or compressed); a snapshot is a manifest from guest page to stored page.
#![warn(missing_docs)]

pub mod store;
