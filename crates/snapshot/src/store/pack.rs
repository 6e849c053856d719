//! Packs: append-only files of page records, closed by an index and a footer.
//!
//! ```text
//! header (64)  record  record  ...  index (96 per record)  footer (40)
//! ```
//!
//! A pack is written under `tmp/`, finished (index, footer, fsync) and only then linked into
//! `packs/`; once there it never changes. gc replaces a pack by writing a new one.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use xxhash_rust::xxh3::xxh3_64;

use super::error::{IoContext, StoreError};
use super::format::{
    Bad, FOOTER, Footer, INDEX_ENTRY, IndexEntry, MAX_RECORD, PACK_HEADER, PackHeader, Record,
    check_record, decode_footer, decode_pack_header, encode_footer, encode_pack_header, to_usize,
};
use super::fsutil::{crash_point, fresh_id, now, publish_no_clobber};

/// `packs/<id as 16 hex digits>.pack`.
pub(crate) fn pack_path(packs: &Path, id: u64) -> PathBuf {
    packs.join(format!("{id:016x}.pack"))
}

/// The id of a pack file's name, if it is one.
pub(crate) fn pack_id_of(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(".pack")?;
    if hex.len() != 16 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// Every pack in `packs/`, by id, sorted.
pub(crate) fn list_packs(packs: &Path) -> Result<Vec<u64>, StoreError> {
    let mut ids = Vec::new();
    for e in std::fs::read_dir(packs).ctx("list", packs)? {
        let e = e.ctx("list", packs)?;
        if let Some(id) = e.file_name().to_str().and_then(pack_id_of) {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

/// A pack being written: records go at reserved offsets (from any thread, with `pwrite`), the
/// index is kept in memory until [`PackBuilder::finish`].
#[derive(Debug)]
pub(crate) struct PackBuilder {
    pub(crate) id: u64,
    pub(crate) file: Arc<File>,
    pub(crate) tmp: PathBuf,
    /// Where the next record goes.
    pub(crate) next: u64,
    pub(crate) entries: Vec<IndexEntry>,
}

/// A finished pack, linked into `packs/` (its directory not yet fsynced).
#[derive(Debug)]
pub(crate) struct Finished {
    pub(crate) id: u64,
    pub(crate) file: Arc<File>,
    pub(crate) entries: Vec<IndexEntry>,
}

impl PackBuilder {
    /// A new, empty pack under `tmp/`.
    pub(crate) fn create(tmp_dir: &Path) -> Result<PackBuilder, StoreError> {
        let id = fresh_id();
        let tmp = tmp_dir.join(format!("{id:016x}.pack"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)
            .ctx("create pack", &tmp)?;
        file.write_all_at(&encode_pack_header(id, now()), 0)
            .ctx("write", &tmp)?;
        Ok(PackBuilder {
            id,
            file: Arc::new(file),
            tmp,
            next: PACK_HEADER as u64,
            entries: Vec::new(),
        })
    }

    /// Reserves room for a record described by `entry` (its offset is set here) and returns
    /// the offset; the caller writes the record there.
    pub(crate) fn reserve(&mut self, mut entry: IndexEntry) -> u64 {
        entry.offset = self.next;
        self.next += u64::from(entry.len);
        self.entries.push(entry);
        entry.offset
    }

    /// Writes the index and footer, makes the pack durable and links it into `packs/`. The
    /// caller fsyncs `packs/` once for all the packs it finishes. `steps` names the two
    /// failpoints (written, linked) for the crash tests.
    pub(crate) fn finish(self, packs: &Path, steps: [&str; 2]) -> Result<Finished, StoreError> {
        let mut index = Vec::with_capacity(self.entries.len() * INDEX_ENTRY + FOOTER);
        for e in &self.entries {
            e.encode(&mut index);
        }
        let sum = xxh3_64(&index);
        index.extend_from_slice(&encode_footer(self.next, self.entries.len() as u64, sum));
        self.file
            .write_all_at(&index, self.next)
            .ctx("write", &self.tmp)?;
        crash_point(steps[0]);
        self.file.sync_all().ctx("fsync", &self.tmp)?;
        let to = pack_path(packs, self.id);
        publish_no_clobber(&self.tmp, &to).ctx("link pack into place as", &to)?;
        crash_point(steps[1]);
        Ok(Finished {
            id: self.id,
            file: self.file,
            entries: self.entries,
        })
    }
}

/// A pack's index, as read and checked from its file.
#[derive(Debug)]
pub(crate) struct PackIndex {
    pub(crate) header: PackHeader,
    pub(crate) footer: Footer,
    pub(crate) entries: Vec<IndexEntry>,
}

/// Reads and checks a pack's header.
pub(crate) fn read_header(file: &File, path: &Path) -> Result<PackHeader, StoreError> {
    let mut h = [0u8; PACK_HEADER];
    file.read_exact_at(&mut h, 0).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            StoreError::corrupt(path, "shorter than a pack header")
        } else {
            StoreError::io("read", path, e)
        }
    })?;
    decode_pack_header(&h).map_err(|b| b.into_error(path))
}

/// Reads and checks a pack's header, footer and index. Each entry is checked to lie between
/// the header and the index and to be no longer than a record can be; that records tile the
/// pack exactly is fsck's check.
pub(crate) fn read_index(file: &File, path: &Path, id: u64) -> Result<PackIndex, StoreError> {
    let header = read_header(file, path)?;
    if header.id != id {
        return Err(StoreError::corrupt(
            path,
            format!("its header names pack {:016x}", header.id),
        ));
    }
    let len = file.metadata().ctx("stat", path)?.len();
    if len < (PACK_HEADER + FOOTER) as u64 {
        return Err(StoreError::corrupt(
            path,
            "shorter than a header and a footer",
        ));
    }
    let mut f = [0u8; FOOTER];
    file.read_exact_at(&mut f, len - FOOTER as u64)
        .ctx("read", path)?;
    let footer = decode_footer(&f, len).map_err(|b| b.into_error(path))?;
    let mut index = vec![0u8; to_usize(len - FOOTER as u64 - footer.index_offset)];
    file.read_exact_at(&mut index, footer.index_offset)
        .ctx("read", path)?;
    if xxh3_64(&index) != footer.index_sum {
        return Err(StoreError::corrupt(path, "pack index checksum mismatch"));
    }
    let mut entries = Vec::with_capacity(index.len() / INDEX_ENTRY);
    for (i, b) in index.chunks_exact(INDEX_ENTRY).enumerate() {
        let e = IndexEntry::decode(b).map_err(|b| b.into_error(path))?;
        let end = e.offset.checked_add(u64::from(e.len));
        if e.offset < PACK_HEADER as u64
            || end.is_none_or(|end| end > footer.index_offset)
            || to_usize(u64::from(e.len)) > MAX_RECORD
        {
            return Err(StoreError::corrupt(
                path,
                format!("index entry {i} points outside the records"),
            ));
        }
        entries.push(e);
    }
    Ok(PackIndex {
        header,
        footer,
        entries,
    })
}

/// Reads the record at `offset`, `len` bytes long, into `buf` and checks it.
pub(crate) fn read_record<'a>(
    file: &File,
    path: &Path,
    offset: u64,
    len: u32,
    buf: &'a mut [u8; MAX_RECORD],
) -> Result<Record<'a>, StoreError> {
    let n = to_usize(u64::from(len));
    let Some(b) = buf.get_mut(..n) else {
        return Err(StoreError::corrupt(
            path,
            format!("a record of {len} bytes at {offset} is longer than any record"),
        ));
    };
    file.read_exact_at(b, offset).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            StoreError::corrupt(path, format!("record at {offset} runs past the end"))
        } else {
            StoreError::io("read", path, e)
        }
    })?;
    check_record(&buf[..n]).map_err(|b| match b {
        Bad::Corrupt(w) => StoreError::corrupt(path, format!("record at {offset}: {w}")),
        other => other.into_error(path),
    })
}
