//! The on-disk snapshot store: the guest memory of many VM snapshots in one directory.
//!
//! Pages are content-addressed by BLAKE3-256 and each distinct page is stored once across
//! every snapshot and VM, in the cheapest of the page store's forms: zero (not stored), a
//! patch against a similar whole page already in the store, zstd-compressed, or raw. A
//! snapshot is a manifest from guest page index to stored object, an opaque VM-state blob and
//! a first-touch order. docs/snapshots.md has the layout, the formats, the crash-safety
//! protocol and the measured figures.
//!
//! ```text
//! <dir>/STORE              "memvisor snapshot store", version
//! <dir>/lock               flock: writers, remove, clone, fsck shared; gc exclusive
//! <dir>/names.lock         flock: the short sections that create or remove a name
//! <dir>/packs/<id>.pack    records of pages; immutable once linked here
//! <dir>/manifests/<name>   one per snapshot (or clone); visible once renamed here
//! <dir>/tmp/               packs and manifests being written; gc empties it
//! ```
//!
//! ```no_run
//! # fn main() -> Result<(), snapshot::store::StoreError> {
//! use snapshot::store::Store;
//! let store = Store::open(std::path::Path::new("/var/lib/memvisor/snapshots"))?;
//! let w = store.writer("vm1-boot", 1 << 30)?;
//! w.put_page(0, &[1u8; 4096])?;          // from any thread, any order
//! w.set_state(b"vcpu and device state".to_vec());
//! w.finish()?;                           // durable and visible
//! let snap = store.open_snapshot("vm1-boot")?;
//! let mut page = [0u8; 4096];
//! snap.read_page(0, &mut page)?;
//! # Ok(()) }
//! ```

mod error;
mod format;
mod fsck;
mod fsutil;
mod gc;
mod index;
mod manifest;
mod pack;
mod reader;
mod writer;

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{ErrorKind, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use pagestore::Compression;
use parking_lot::Mutex;
use serde::Serialize;

pub use error::StoreError;
pub use fsck::{FsckReport, Problem};
pub use gc::GcReport;
pub use reader::Snapshot;
pub use writer::SnapshotWriter;

use error::IoContext;
use format::{FORMAT_VERSION, Form};
use fsutil::{
    LockMode, crash_point, lock, lock_blocking, publish_no_clobber, sync_dir, write_durable,
};
use index::GlobalIndex;
use manifest::{Kind, MANIFEST_HEADER, Manifest, Parts};
use pack::{list_packs, pack_path, read_index};

/// The first line of a store's STORE file.
const STORE_MAGIC: &str = "memvisor snapshot store";

/// Knobs of a store; [`StoreOptions::default`] is what docs/snapshots.md measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreOptions {
    /// The compressor for whole pages. Default zstd level 3 (a zstd level is clamped to
    /// 1..=19); LZ4 reads back about twice as fast for about a third more bytes. Each record
    /// names its compressor, so one store holds both. See docs/snapshots.md.
    pub compression: Compression,
    /// How long a writer, remove, clone, fsck or gc waits for the store's lock before it
    /// fails with [`StoreError::Busy`]. Default 0: fail at once.
    pub busy_timeout: Duration,
    /// A writer starts a new pack when the current one would pass this many bytes (clamped
    /// to 64 KiB..4 GiB - 64 KiB; manifests hold 32-bit offsets). Default 256 MiB.
    pub pack_limit: u64,
    /// gc rewrites a pack whose unreferenced records are at least this per cent of its
    /// record bytes (a pack with no live record is always deleted). Default 20.
    pub repack_percent: u8,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            compression: Compression::Zstd { level: 3 },
            busy_timeout: Duration::ZERO,
            pack_limit: 256 << 20,
            repack_percent: 20,
        }
    }
}

impl StoreOptions {
    fn clamped(mut self) -> Self {
        if let Compression::Zstd { level } = &mut self.compression {
            *level = (*level).clamp(1, 19);
        }
        self.pack_limit = self
            .pack_limit
            .clamp(64 << 10, u64::from(u32::MAX) - (64 << 10));
        self.repack_percent = self.repack_percent.min(100);
        self
    }
}

/// One snapshot as [`Store::list`] (or [`SnapshotWriter::finish`]) describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotInfo {
    /// Its name.
    pub name: String,
    /// When it was finished (a clone: when it was cloned), Unix seconds.
    pub created: u64,
    /// Guest RAM bytes.
    pub ram_bytes: u64,
    /// Pages that are not zero.
    pub pages_nonzero: u64,
    /// Bytes of those pages as the guest sees them (`pages_nonzero * 4096`).
    pub logical_bytes: u64,
    /// Bytes of the distinct stored objects it refers to: what it costs alone.
    pub stored_bytes: u64,
    /// Bytes that only it refers to: what removing it (and a gc) frees.
    pub unique_bytes: u64,
    /// For a clone, the snapshot whose pages it shares.
    pub base: Option<String>,
}

/// Objects of one form and the bytes their records take.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct FormUsage {
    /// Stored objects.
    pub objects: u64,
    /// Record bytes (48-byte header and payload).
    pub bytes: u64,
}

/// What a store holds on disk ([`Store::du`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct StoreUsage {
    /// Bytes of packs and manifests: the store's size.
    pub total_bytes: u64,
    /// Bytes of pack files (records, indexes, headers).
    pub pack_bytes: u64,
    /// Bytes of manifests.
    pub manifest_bytes: u64,
    /// Bytes of leftovers of interrupted writers or gcs in `tmp/` (the next gc removes them;
    /// not counted in `total_bytes`).
    pub leftover_bytes: u64,
    /// Pack files.
    pub packs: u64,
    /// Manifests (snapshots and clones).
    pub snapshots: u64,
    /// Raw pages.
    pub raw: FormUsage,
    /// zstd-compressed pages.
    pub compressed: FormUsage,
    /// Patches against a similar page.
    pub delta: FormUsage,
    /// Packs whose index could not be read (fsck says why); their bytes are in `pack_bytes`.
    pub unreadable_packs: u64,
}

/// Everything the parts of the store share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) dir: PathBuf,
    pub(crate) packs: PathBuf,
    pub(crate) manifests: PathBuf,
    pub(crate) tmp: PathBuf,
    pub(crate) lock: PathBuf,
    pub(crate) names_lock: PathBuf,
    pub(crate) opts: StoreOptions,
    /// The writers' index of finished packs, built when the first writer starts.
    pub(crate) index: Mutex<Option<Arc<GlobalIndex>>>,
    /// Names of snapshots being written by this process.
    pub(crate) writing: Mutex<HashSet<String>>,
}

impl Shared {
    pub(crate) fn manifest_path(&self, name: &str) -> PathBuf {
        self.manifests.join(name)
    }

    pub(crate) fn pack_path(&self, id: u64) -> PathBuf {
        pack_path(&self.packs, id)
    }

    pub(crate) fn lock(&self, mode: LockMode) -> Result<fsutil::Lock, StoreError> {
        lock(&self.lock, mode, self.opts.busy_timeout, &self.dir)
    }

    /// The index for a new writer: the store's, brought up to date with `packs/`.
    pub(crate) fn index(&self) -> Result<Arc<GlobalIndex>, StoreError> {
        let mut g = self.index.lock();
        if let Some(ix) = g.as_ref()
            && ix.refresh(&self.packs)?
        {
            return Ok(ix.clone());
        }
        let ix = Arc::new(index::build(&self.packs)?);
        *g = Some(ix.clone());
        Ok(ix)
    }

    /// Reads a manifest; `NoSuchSnapshot` if it is not there.
    pub(crate) fn read_manifest(&self, name: &str) -> Result<Manifest, StoreError> {
        let path = self.manifest_path(name);
        let buf = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(StoreError::NoSuchSnapshot {
                    name: name.to_string(),
                    dir: self.dir.clone(),
                });
            }
            Err(e) => return Err(StoreError::io("read", &path, e)),
        };
        Manifest::parse(buf).map_err(|b| b.into_error(&path))
    }

    /// Reads only a manifest's header (and a clone's base name): cheap for any snapshot size.
    pub(crate) fn read_manifest_head(
        &self,
        name: &str,
    ) -> Result<(Kind, Option<String>, [u8; MANIFEST_HEADER]), StoreError> {
        let path = self.manifest_path(name);
        let mut f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(StoreError::NoSuchSnapshot {
                    name: name.to_string(),
                    dir: self.dir.clone(),
                });
            }
            Err(e) => return Err(StoreError::io("open", &path, e)),
        };
        let mut h = [0u8; MANIFEST_HEADER];
        f.read_exact(&mut h).map_err(|e| {
            if e.kind() == ErrorKind::UnexpectedEof {
                StoreError::corrupt(&path, "shorter than a manifest header")
            } else {
                StoreError::io("read", &path, e)
            }
        })?;
        manifest::check_header(&h).map_err(|b| b.into_error(&path))?;
        if format::u32_at(&h, 12) == Kind::Clone as u32 {
            // A clone is a header and a name: read and check the whole (small) file.
            drop(f);
            let m = self.read_manifest(name)?;
            let base = m.base().map(str::to_string);
            return Ok((Kind::Clone, base, h));
        }
        Ok((Kind::Snapshot, None, h))
    }

    /// Names of every manifest, sorted (files with names that are not snapshot names are not
    /// manifests and are ignored).
    pub(crate) fn manifest_names(&self) -> Result<Vec<String>, StoreError> {
        Ok(self.manifest_entries()?.0)
    }

    /// Names of every manifest, sorted, and the paths of any other files in `manifests/`
    /// (which the store never makes: gc refuses to run while they are there, fsck names them).
    pub(crate) fn manifest_entries(&self) -> Result<(Vec<String>, Vec<PathBuf>), StoreError> {
        let mut names = Vec::new();
        let mut strays = Vec::new();
        for e in std::fs::read_dir(&self.manifests).ctx("list", &self.manifests)? {
            let e = e.ctx("list", &self.manifests)?;
            match e.file_name().to_str() {
                Some(n) if valid_name(n).is_ok() => names.push(n.to_string()),
                _ => strays.push(e.path()),
            }
        }
        names.sort();
        strays.sort();
        Ok((names, strays))
    }

    /// Writes a manifest under `tmp/` and makes it durable; returns its temporary path.
    pub(crate) fn write_tmp_manifest(
        &self,
        name: &str,
        bytes: &[u8],
    ) -> Result<PathBuf, StoreError> {
        let tmp = self
            .tmp
            .join(format!("{name}.{:016x}.manifest", fsutil::fresh_id()));
        write_durable(&tmp, bytes)?;
        Ok(tmp)
    }

    /// Gives a durable temporary manifest its name, unless the name is taken; then makes the
    /// name durable. Runs under the names lock.
    pub(crate) fn publish_manifest(&self, tmp: &Path, name: &str) -> Result<(), StoreError> {
        let to = self.manifest_path(name);
        crash_point("manifest-written");
        let r = {
            let _names = lock_blocking(&self.names_lock)?;
            publish_no_clobber(tmp, &to)
        };
        match r {
            Ok(()) => {
                crash_point("manifest-linked");
                sync_dir(&self.manifests)
            }
            Err(e) => {
                let _ = std::fs::remove_file(tmp);
                if e.kind() == ErrorKind::AlreadyExists {
                    Err(StoreError::NameTaken {
                        name: name.to_string(),
                        dir: self.dir.clone(),
                    })
                } else {
                    Err(StoreError::io("link manifest into place as", &to, e))
                }
            }
        }
    }
}

/// Checks a snapshot name: 1 to 200 of `[A-Za-z0-9._-]`, not starting with a dot.
pub(crate) fn valid_name(name: &str) -> Result<(), StoreError> {
    let why = if name.is_empty() {
        Some("empty")
    } else if name.len() > 200 {
        Some("longer than 200 bytes")
    } else if name.starts_with('.') {
        Some("starts with '.'")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
    {
        Some("has a character outside A-Z a-z 0-9 . _ -")
    } else {
        None
    };
    match why {
        Some(why) => Err(StoreError::BadName {
            name: name.to_string(),
            why,
        }),
        None => Ok(()),
    }
}

/// An open store directory. Cheap to share: every call takes `&self`, and it may be used from
/// any number of threads and processes at once (the locks in the directory keep a gc apart
/// from writers).
#[derive(Debug, Clone)]
pub struct Store {
    shared: Arc<Shared>,
}

impl Store {
    /// Opens the store in `dir` with default options, creating an empty one if `dir` is
    /// missing or empty. Refuses a non-empty directory that is not a store.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        Store::open_with(dir, StoreOptions::default())
    }

    /// [`Store::open`] with options.
    pub fn open_with(dir: &Path, opts: StoreOptions) -> Result<Store, StoreError> {
        let marker = dir.join("STORE");
        match std::fs::read_to_string(&marker) {
            Ok(text) => check_marker(&marker, &text)?,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                match std::fs::read_dir(dir) {
                    Ok(entries) => {
                        // Empty, or only what an interrupted `init` left: its temporary marker.
                        for e in entries {
                            let e = e.ctx("list", dir)?;
                            let name = e.file_name();
                            if !name.to_string_lossy().starts_with(".STORE.") {
                                return Err(StoreError::NotAStore {
                                    path: dir.to_path_buf(),
                                });
                            }
                            let _ = std::fs::remove_file(e.path());
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::NotFound => {
                        std::fs::create_dir_all(dir).ctx("create directory", dir)?;
                    }
                    Err(e) => return Err(StoreError::io("list", dir, e)),
                }
                init(dir, &marker)?;
            }
            Err(e) if e.kind() == ErrorKind::InvalidData => {
                return Err(StoreError::corrupt(&marker, "not text"));
            }
            Err(e) => return Err(StoreError::io("read", &marker, e)),
        }
        let shared = Shared {
            dir: dir.to_path_buf(),
            packs: dir.join("packs"),
            manifests: dir.join("manifests"),
            tmp: dir.join("tmp"),
            lock: dir.join("lock"),
            names_lock: dir.join("names.lock"),
            opts: opts.clamped(),
            index: Mutex::new(None),
            writing: Mutex::new(HashSet::new()),
        };
        for d in [&shared.packs, &shared.manifests, &shared.tmp] {
            std::fs::create_dir_all(d).ctx("create directory", d)?;
        }
        Ok(Store {
            shared: Arc::new(shared),
        })
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// The options in force (after clamping).
    pub fn options(&self) -> StoreOptions {
        self.shared.opts
    }

    /// Starts a snapshot of `ram_size` bytes of guest RAM (a positive multiple of 4096, at most
    /// 4 TiB) named `name` (1 to 200 of `[A-Za-z0-9._-]`, not starting with '.', not taken).
    /// The writer holds the store's lock shared until it is finished or dropped, so no gc runs
    /// meanwhile.
    pub fn writer(&self, name: &str, ram_size: u64) -> Result<SnapshotWriter, StoreError> {
        SnapshotWriter::new(self.shared.clone(), name, ram_size)
    }

    /// Opens a snapshot (or clone) for reading: one read and checksum of its manifest, and an
    /// open file for each pack it uses, so that a later gc that deletes one does not disturb it.
    pub fn open_snapshot(&self, name: &str) -> Result<Snapshot, StoreError> {
        Snapshot::open(&self.shared, name)
    }

    /// Every snapshot and clone, oldest first, with what each costs alone and what only it
    /// holds. Reads every manifest.
    pub fn list(&self) -> Result<Vec<SnapshotInfo>, StoreError> {
        let mut loaded = Vec::new();
        for name in self.shared.manifest_names()? {
            match self.shared.read_manifest(&name) {
                Ok(m) => loaded.push((name, m)),
                // Removed between the listing and the read.
                Err(StoreError::NoSuchSnapshot { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        // Who refers to each object: a clone counts as a second holder of its base's objects.
        let by_name: HashMap<&str, &Manifest> =
            loaded.iter().map(|(n, m)| (n.as_str(), m)).collect();
        let mut holders: HashMap<(u64, u32), u32> = HashMap::new();
        let objects_of = |m: &Manifest| -> Vec<((u64, u32), u32)> {
            let ids = m.pack_ids();
            (0..m.n_objects())
                .filter_map(|i| m.object(i))
                .filter_map(|o| Some(((*ids.get(usize::from(o.pack))?, o.offset), o.len)))
                .collect()
        };
        let mut per: Vec<Vec<((u64, u32), u32)>> = Vec::new();
        for (_, m) in &loaded {
            let src = match m.kind {
                Kind::Snapshot => Some(m),
                Kind::Clone => m.base().and_then(|b| by_name.get(b).copied()),
            };
            let objs = src.map(objects_of).unwrap_or_default();
            for (k, _) in &objs {
                *holders.entry(*k).or_default() += 1;
            }
            per.push(objs);
        }
        let mut out = Vec::new();
        for ((name, m), objs) in loaded.iter().zip(per) {
            let stored: u64 = objs.iter().map(|(_, l)| u64::from(*l)).sum();
            let unique: u64 = objs
                .iter()
                .filter(|(k, _)| holders.get(k) == Some(&1))
                .map(|(_, l)| u64::from(*l))
                .sum();
            let (ram, nonzero) = match m.kind {
                Kind::Snapshot => (m.ram_size, m.nonzero),
                Kind::Clone => m
                    .base()
                    .and_then(|b| by_name.get(b))
                    .map_or((m.ram_size, m.nonzero), |b| (b.ram_size, b.nonzero)),
            };
            out.push(SnapshotInfo {
                name: name.clone(),
                created: m.created,
                ram_bytes: ram,
                pages_nonzero: nonzero,
                logical_bytes: nonzero.saturating_mul(4096),
                stored_bytes: stored,
                unique_bytes: unique,
                base: m.base().map(str::to_string),
            });
        }
        out.sort_by(|a, b| (a.created, &a.name).cmp(&(b.created, &b.name)));
        Ok(out)
    }

    /// What the store holds on disk: bytes of packs and manifests, objects and bytes by form
    /// (from the packs' indexes; records are not read).
    pub fn du(&self) -> Result<StoreUsage, StoreError> {
        let s = &self.shared;
        let mut u = StoreUsage::default();
        for id in list_packs(&s.packs)? {
            let path = s.pack_path(id);
            let Ok(file) = File::open(&path) else {
                continue; // deleted by a gc meanwhile
            };
            u.packs += 1;
            u.pack_bytes += file.metadata().ctx("stat", &path)?.len();
            match read_index(&file, &path, id) {
                Ok(ix) => {
                    for e in ix.entries {
                        let f = match e.form {
                            Form::Raw => &mut u.raw,
                            Form::Compressed => &mut u.compressed,
                            Form::Delta => &mut u.delta,
                        };
                        f.objects += 1;
                        f.bytes += u64::from(e.len);
                    }
                }
                Err(_) => u.unreadable_packs += 1,
            }
        }
        for name in s.manifest_names()? {
            if let Ok(m) = std::fs::metadata(s.manifest_path(&name)) {
                u.snapshots += 1;
                u.manifest_bytes += m.len();
            }
        }
        for e in std::fs::read_dir(&s.tmp).ctx("list", &s.tmp)? {
            if let Ok(m) = e.and_then(|e| e.metadata()) {
                u.leftover_bytes += m.len();
            }
        }
        u.total_bytes = u.pack_bytes + u.manifest_bytes;
        Ok(u)
    }

    /// Removes a snapshot, unless clones name it as their base (they are named in the
    /// error). Its pages stay on disk until a gc. Readers that have it open keep reading it.
    pub fn remove(&self, name: &str) -> Result<(), StoreError> {
        valid_name(name)?;
        let s = &self.shared;
        let _lock = s.lock(LockMode::Shared)?;
        let _names = lock_blocking(&s.names_lock)?;
        // Only its existence is checked: a damaged manifest can be removed too.
        let path = s.manifest_path(name);
        match std::fs::symlink_metadata(&path) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(StoreError::NoSuchSnapshot {
                    name: name.to_string(),
                    dir: s.dir.clone(),
                });
            }
            Err(e) => return Err(StoreError::io("stat", &path, e)),
        }
        let mut clones = Vec::new();
        for other in s.manifest_names()? {
            if other == name {
                continue;
            }
            match s.read_manifest_head(&other) {
                Ok((Kind::Clone, Some(base), _)) if base == name => clones.push(other),
                _ => {}
            }
        }
        if !clones.is_empty() {
            return Err(StoreError::HasClones {
                name: name.to_string(),
                clones,
            });
        }
        std::fs::remove_file(&path).ctx("remove", &path)?;
        crash_point("remove-unlinked");
        sync_dir(&s.manifests)
    }

    /// Makes `new` a clone of `from`: a manifest that names its base, so the time and bytes
    /// it takes do not depend on the snapshot's size. A clone of a clone names the first
    /// clone's base. The base cannot be removed while the clone exists.
    pub fn clone_snapshot(&self, from: &str, new: &str) -> Result<(), StoreError> {
        valid_name(from)?;
        valid_name(new)?;
        let s = &self.shared;
        let _lock = s.lock(LockMode::Shared)?;
        let (kind, base, head) = {
            let _names = lock_blocking(&s.names_lock)?;
            s.read_manifest_head(from)?
        };
        let base = match kind {
            Kind::Snapshot => from.to_string(),
            Kind::Clone => base.ok_or_else(|| {
                StoreError::corrupt(s.manifest_path(from), "a clone without a valid base name")
            })?,
        };
        let bytes = manifest::encode(&Parts {
            kind: Kind::Clone,
            created: fsutil::now(),
            ram_size: format::u64_at(&head, 24),
            nonzero: format::u64_at(&head, 72),
            packs: &[],
            objects: &[],
            pages: &[],
            order: &[],
            state: &[],
            base: &base,
        })
        .map_err(|what| StoreError::corrupt(s.manifest_path(from), what))?;
        let tmp = s.write_tmp_manifest(new, &bytes)?;
        crash_point("manifest-written");
        // The base must still be there when the clone appears: checked again under the lock.
        let r = {
            let _names = lock_blocking(&s.names_lock)?;
            match s.read_manifest_head(&base) {
                Ok((Kind::Snapshot, _, _)) => publish_no_clobber(&tmp, &s.manifest_path(new))
                    .map_err(|e| {
                        if e.kind() == ErrorKind::AlreadyExists {
                            StoreError::NameTaken {
                                name: new.to_string(),
                                dir: s.dir.clone(),
                            }
                        } else {
                            StoreError::io("link manifest into place as", s.manifest_path(new), e)
                        }
                    }),
                Ok(_) => Err(StoreError::corrupt(
                    s.manifest_path(&base),
                    "a clone's base is itself a clone",
                )),
                Err(e) => Err(e),
            }
        };
        if r.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        r?;
        crash_point("manifest-linked");
        sync_dir(&s.manifests)
    }

    /// Collects what no manifest refers to, safely against a crash at any point: see
    /// [`GcReport`] and docs/snapshots.md. Takes the store's lock exclusively, so it fails
    /// with [`StoreError::Busy`] while a writer, remove, clone or fsck runs (and they fail
    /// while it runs). Refuses to collect anything if a manifest cannot be read.
    pub fn gc(&self) -> Result<GcReport, StoreError> {
        gc::run(&self.shared)
    }

    /// Checks the whole store and lists every problem found (it does not stop at the first):
    /// every pack is well-formed and every record in it decodes to a page that hashes to its
    /// id; every manifest is well-formed and every page it names is such a record.
    pub fn fsck(&self) -> Result<FsckReport, StoreError> {
        fsck::run(&self.shared)
    }
}

fn check_marker(path: &Path, text: &str) -> Result<(), StoreError> {
    let mut lines = text.lines();
    if lines.next() != Some(STORE_MAGIC) {
        return Err(StoreError::corrupt(
            path,
            "not a snapshot store's STORE file",
        ));
    }
    let version = lines
        .next()
        .and_then(|l| l.strip_prefix("version "))
        .and_then(|v| v.trim().parse::<u32>().ok())
        .ok_or_else(|| StoreError::corrupt(path, "no version line"))?;
    if version > FORMAT_VERSION {
        return Err(StoreError::NewerVersion {
            path: path.to_path_buf(),
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    Ok(())
}

/// Makes `dir` a store: the marker first (so that a crash never leaves a directory that is
/// neither empty nor a store), then `open` creates the subdirectories.
fn init(dir: &Path, marker: &Path) -> Result<(), StoreError> {
    let tmp = dir.join(format!(".STORE.{:016x}", fsutil::fresh_id()));
    write_durable(
        &tmp,
        format!("{STORE_MAGIC}\nversion {FORMAT_VERSION}\n").as_bytes(),
    )?;
    std::fs::rename(&tmp, marker).ctx("rename into place", marker)?;
    sync_dir(dir)
}

/// A writer is where a live snapshot's copier puts pages.
impl crate::PageSink for SnapshotWriter {
    fn put_page(&self, index: u64, page: &[u8; crate::PAGE]) -> Result<(), crate::BoxError> {
        Ok(SnapshotWriter::put_page(self, index, page)?)
    }

    fn put_zero(&self, index: u64) -> Result<(), crate::BoxError> {
        Ok(SnapshotWriter::put_zero(self, index)?)
    }
}

/// An open snapshot is what a restore's page server reads.
impl crate::PageSource for Snapshot {
    fn pages(&self) -> u64 {
        Snapshot::pages(self)
    }

    fn is_zero(&self, index: u64) -> bool {
        Snapshot::is_zero(self, index)
    }

    fn read_page(&self, index: u64, out: &mut [u8; crate::PAGE]) -> Result<(), crate::BoxError> {
        Ok(Snapshot::read_page(self, index, out)?)
    }

    fn order(&self) -> &[u32] {
        Snapshot::order(self)
    }
}
