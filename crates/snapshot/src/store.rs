//! The on-disk snapshot store.
