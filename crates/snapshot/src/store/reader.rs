//! Reading a snapshot: open is one read and one checksum of the manifest plus an open file per
//! pack; a page is one or two `pread`s, an XXH3 per record and a decode.

use std::fs::File;
use std::path::PathBuf;

use pagestore::{PAGE_SIZE, Page};

use super::error::StoreError;
use super::format::{Form, MAX_RECORD, apply_delta, decode_whole, delta_base};
use super::manifest::{Kind, Manifest};
use super::pack::{read_header, read_record};
use super::{Shared, valid_name};

/// How often `open` starts again when a gc replaced a pack between reading the manifest and
/// opening the pack (gc rewrites the manifest before it deletes the pack, so a second try
/// normally sees the new one).
const OPEN_TRIES: usize = 8;

/// An open snapshot: `Send + Sync`, every read takes `&self`. It keeps every pack it needs
/// open, so a gc that deletes (after repacking) one of them does not disturb it.
#[derive(Debug)]
pub struct Snapshot {
    name: String,
    base: Option<String>,
    created: u64,
    manifest: Manifest,
    order: Vec<u32>,
    packs: Vec<(File, PathBuf)>,
}

enum OpenFail {
    /// A pack named by the manifest is gone: a gc replaced it; read the manifest again.
    Gone(PathBuf),
    Err(StoreError),
}

impl Snapshot {
    pub(crate) fn open(shared: &Shared, name: &str) -> Result<Snapshot, StoreError> {
        valid_name(name)?;
        let mut gone = None;
        for _ in 0..OPEN_TRIES {
            let m = shared.read_manifest(name)?;
            let (m, base, created) = match m.kind {
                Kind::Snapshot => {
                    let c = m.created;
                    (m, None, c)
                }
                Kind::Clone => {
                    let base = m
                        .base()
                        .ok_or_else(|| {
                            StoreError::corrupt(
                                shared.manifest_path(name),
                                "a clone without a base",
                            )
                        })?
                        .to_string();
                    let b = shared.read_manifest(&base)?;
                    if b.kind != Kind::Snapshot {
                        return Err(StoreError::corrupt(
                            shared.manifest_path(&base),
                            "a clone's base is itself a clone",
                        ));
                    }
                    (b, Some(base), m.created)
                }
            };
            match open_packs(shared, &m) {
                Ok(packs) => {
                    return Ok(Snapshot {
                        name: name.to_string(),
                        base,
                        created,
                        order: m.order(),
                        manifest: m,
                        packs,
                    });
                }
                Err(OpenFail::Gone(p)) => gone = Some(p),
                Err(OpenFail::Err(e)) => return Err(e),
            }
        }
        Err(StoreError::corrupt(
            gone.unwrap_or_default(),
            format!("snapshot {name:?} names this pack, which does not exist"),
        ))
    }

    /// The snapshot's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// For a clone, the snapshot whose pages it reads.
    pub fn base(&self) -> Option<&str> {
        self.base.as_deref()
    }

    /// When it was finished (a clone: cloned), Unix seconds.
    pub fn created(&self) -> u64 {
        self.created
    }

    /// Guest RAM bytes.
    pub fn ram_size(&self) -> u64 {
        self.manifest.ram_size
    }

    /// Guest RAM pages.
    pub fn pages(&self) -> u64 {
        self.manifest.pages()
    }

    /// Pages that are not zero.
    pub fn pages_nonzero(&self) -> u64 {
        self.manifest.nonzero
    }

    /// The VM-state blob given to the writer.
    pub fn state(&self) -> &[u8] {
        self.manifest.state()
    }

    /// The first-touch order given to the writer.
    pub fn order(&self) -> &[u32] {
        &self.order
    }

    /// True if page `index` is zero (or past the end).
    pub fn is_zero(&self, index: u64) -> bool {
        self.manifest.page(index).is_none_or(|v| v == 0)
    }

    fn corrupt(&self, what: impl Into<String>) -> StoreError {
        StoreError::corrupt(PathBuf::from(format!("snapshot {}", self.name)), what)
    }

    /// Reads page `index` into `out`. Thread-safe (`pread`s on files opened at open time).
    /// Checks each record's XXH3 checksum and, for a patch, that its base is the page it was
    /// made against: a damaged file gives an error, never wrong bytes.
    pub fn read_page(&self, index: u64, out: &mut [u8; PAGE_SIZE]) -> Result<(), StoreError> {
        let Some(v) = self.manifest.page(index) else {
            return Err(StoreError::PageOutOfRange {
                index,
                pages: self.pages(),
            });
        };
        if v == 0 {
            out.fill(0);
            return Ok(());
        }
        let o = self
            .manifest
            .object(v - 1)
            .ok_or_else(|| self.corrupt(format!("page {index} names a missing object")))?;
        let mut buf = [0u8; MAX_RECORD];
        if o.form != Form::Delta {
            return self
                .read_whole(o.pack, o.offset, o.len, o.form, &mut buf, out)
                .map(|_| ());
        }
        let b = o
            .base
            .checked_sub(1)
            .and_then(|b| self.manifest.object(b))
            .filter(|b| b.form != Form::Delta)
            .ok_or_else(|| self.corrupt(format!("page {index}: a patch without a whole base")))?;
        let base_id = self.read_whole(b.pack, b.offset, b.len, b.form, &mut buf, out)?;
        let (file, path) = self.pack(o.pack)?;
        let rec = read_record(file, path, u64::from(o.offset), o.len, &mut buf)?;
        let made_against = delta_base(&rec).map_err(|b| b.into_error(path))?;
        if rec.form != Form::Delta || made_against != base_id {
            return Err(StoreError::corrupt(
                path,
                format!("record at {} is not the patch page {index} names", o.offset),
            ));
        }
        apply_delta(&rec, out).map_err(|b| b.into_error(path))
    }

    fn pack(&self, p: u16) -> Result<(&File, &PathBuf), StoreError> {
        self.packs
            .get(usize::from(p))
            .map(|(f, p)| (f, p))
            .ok_or_else(|| self.corrupt(format!("an object names pack {p}, not in its table")))
    }

    /// Reads a whole page's record and decodes it into `out`; returns its id.
    fn read_whole(
        &self,
        pack: u16,
        offset: u32,
        len: u32,
        form: Form,
        buf: &mut [u8; MAX_RECORD],
        out: &mut Page,
    ) -> Result<[u8; 32], StoreError> {
        let (file, path) = self.pack(pack)?;
        let rec = read_record(file, path, u64::from(offset), len, buf)?;
        if rec.form != form {
            return Err(StoreError::corrupt(
                path,
                format!(
                    "record at {offset} is {}, the manifest says {}",
                    rec.form.name(),
                    form.name()
                ),
            ));
        }
        decode_whole(&rec, out).map_err(|b| b.into_error(path))?;
        Ok(rec.id)
    }
}

fn open_packs(shared: &Shared, m: &Manifest) -> Result<Vec<(File, PathBuf)>, OpenFail> {
    let mut packs = Vec::with_capacity(m.n_packs());
    for id in m.pack_ids() {
        let path = shared.pack_path(id);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(OpenFail::Gone(path)),
            Err(e) => return Err(OpenFail::Err(StoreError::io("open", &path, e))),
        };
        let h = read_header(&file, &path).map_err(OpenFail::Err)?;
        if h.id != id {
            return Err(OpenFail::Err(StoreError::corrupt(
                &path,
                format!("its header names pack {:016x}", h.id),
            )));
        }
        packs.push((file, path));
    }
    Ok(packs)
}
