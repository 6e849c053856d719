//! Garbage collection, safe against a crash at any point.
//!
//! Under the store's lock, held exclusively (no writer, remove or clone runs meanwhile):
//!
//! 1. empty `tmp/`: the leftovers of interrupted writers and gcs;
//! 2. read every manifest (one that cannot be read stops the gc before anything is deleted)
//!    and mark the records they name live;
//! 3. copy the live records of every pack with enough dead bytes into new packs, make them
//!    durable and link them into `packs/`, fsync `packs/`;
//! 4. rewrite each manifest that points into a copied pack (a durable temporary, renamed over
//!    the old one), fsync `manifests/`;
//! 5. only then delete the packs no manifest names any more, fsync `packs/`.
//!
//! A crash before 3 ends changes nothing visible; between 3 and 5 some manifests point into
//! the new packs and some into the old, all of which still exist; during 5 some unreferenced
//! packs remain. In every case the next gc finishes the job: unreferenced packs are deleted.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::Serialize;

use super::Shared;
use super::error::{IoContext, StoreError};
use super::format::{IndexEntry, MAX_RECORD};
use super::fsutil::{LockMode, crash_point, sync_dir, write_durable};
use super::manifest::{self, Kind, Manifest, ObjEntry, Parts};
use super::pack::{PackBuilder, list_packs, read_index, read_record};

/// What a [`crate::store::Store::gc`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct GcReport {
    /// Files of interrupted writers and gcs removed from `tmp/`.
    pub leftovers_removed: u64,
    /// Packs deleted because no manifest named any of their records.
    pub packs_deleted: u64,
    /// Packs whose live records were copied into new packs, then deleted.
    pub packs_repacked: u64,
    /// New packs written by the copy.
    pub packs_written: u64,
    /// Records copied.
    pub records_copied: u64,
    /// Manifests rewritten to point into the new packs.
    pub manifests_rewritten: u64,
    /// Packs with some dead records, left alone because the dead part was below the
    /// repack threshold.
    pub packs_kept_with_garbage: u64,
    /// Bytes of packs, manifests and leftovers before.
    pub bytes_before: u64,
    /// Bytes of packs and manifests after.
    pub bytes_after: u64,
}

fn dir_bytes(dir: &Path) -> Result<u64, StoreError> {
    let mut n = 0;
    for e in std::fs::read_dir(dir).ctx("list", dir)? {
        if let Ok(m) = e.and_then(|e| e.metadata()) {
            n += m.len();
        }
    }
    Ok(n)
}

fn store_bytes(s: &Shared) -> Result<u64, StoreError> {
    Ok(dir_bytes(&s.packs)? + dir_bytes(&s.manifests)? + dir_bytes(&s.tmp)?)
}

pub(crate) fn run(s: &Shared) -> Result<GcReport, StoreError> {
    let _lock = s.lock(LockMode::Exclusive)?;
    let mut report = GcReport {
        bytes_before: store_bytes(s)?,
        ..GcReport::default()
    };

    // 1. Leftovers. No writer runs (the lock), so nothing in tmp/ is in use.
    for e in std::fs::read_dir(&s.tmp).ctx("list", &s.tmp)? {
        let e = e.ctx("list", &s.tmp)?;
        let path = e.path();
        let r = if e.file_type().is_ok_and(|t| t.is_dir()) {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        r.ctx("remove leftover", &path)?;
        report.leftovers_removed += 1;
    }
    crash_point("gc-leftovers-removed");

    // 2. What is live: (pack id, offset) -> length, from every manifest.
    let mut manifests: Vec<(String, Manifest)> = Vec::new();
    let mut live: HashMap<u64, HashMap<u64, u32>> = HashMap::new();
    let (names, strays) = s.manifest_entries()?;
    if let Some(stray) = strays.first() {
        // It might be a snapshot renamed by hand: what it refers to cannot be collected.
        return Err(StoreError::corrupt(
            stray,
            "a file in manifests/ whose name is not a snapshot name; gc will not run while it is there (rename it to a valid name or move it out)",
        ));
    }
    for name in names {
        let m = s.read_manifest(&name)?;
        if m.kind == Kind::Snapshot {
            let ids = m.pack_ids();
            for i in 0..m.n_objects() {
                let o = m.object(i).ok_or_else(|| {
                    StoreError::corrupt(
                        s.manifest_path(&name),
                        format!("object {i} has a bad form"),
                    )
                })?;
                let id = *ids.get(usize::from(o.pack)).ok_or_else(|| {
                    StoreError::corrupt(s.manifest_path(&name), format!("object {i} names no pack"))
                })?;
                live.entry(id)
                    .or_default()
                    .insert(u64::from(o.offset), o.len);
            }
        }
        manifests.push((name, m));
    }

    // 3. Each pack: keep, delete, or copy its live records.
    let mut delete = Vec::new();
    let mut repack: Vec<(u64, File, Vec<IndexEntry>)> = Vec::new();
    for id in list_packs(&s.packs)? {
        let path = s.pack_path(id);
        let Some(refs) = live.get(&id) else {
            delete.push(id);
            continue;
        };
        let file = File::open(&path).ctx("open", &path)?;
        let ix = read_index(&file, &path, id)?;
        let entries: HashMap<u64, &IndexEntry> = ix.entries.iter().map(|e| (e.offset, e)).collect();
        for (&off, &len) in refs {
            if entries.get(&off).is_none_or(|e| e.len != len) {
                return Err(StoreError::corrupt(
                    &path,
                    format!(
                        "a manifest names a record at {off} of {len} bytes that the pack does not hold"
                    ),
                ));
            }
        }
        let total: u64 = ix.entries.iter().map(|e| u64::from(e.len)).sum();
        let live_bytes: u64 = refs.values().map(|&l| u64::from(l)).sum();
        let dead = total - live_bytes.min(total);
        if dead == 0 {
            continue;
        }
        if dead * 100 < total * u64::from(s.opts.repack_percent) {
            report.packs_kept_with_garbage += 1;
            continue;
        }
        let keep = ix
            .entries
            .into_iter()
            .filter(|e| refs.contains_key(&e.offset))
            .collect();
        repack.push((id, file, keep));
    }
    // Packs no manifest names are deleted even if they cannot be read.
    for (name, m) in &manifests {
        if m.kind == Kind::Snapshot {
            for id in m.pack_ids() {
                if !s.pack_path(id).exists() {
                    return Err(StoreError::corrupt(
                        s.manifest_path(name),
                        format!("it names pack {id:016x}, which does not exist"),
                    ));
                }
            }
        }
    }

    // 3b. Copy live records into new packs: (old pack, old offset) -> (new pack, new offset).
    let mut moved: HashMap<(u64, u64), (u64, u64)> = HashMap::new();
    if !repack.is_empty() {
        let mut out: Vec<PackBuilder> = Vec::new();
        let r = copy_live(s, &repack, &mut out, &mut moved, &mut report);
        let r = r.and_then(|()| {
            let mut done = Vec::new();
            for b in out.drain(..) {
                done.push(
                    b.finish(&s.packs, ["gc-pack-written", "gc-pack-linked"])?
                        .id,
                );
            }
            Ok(done)
        });
        match r {
            Ok(done) => report.packs_written = done.len() as u64,
            Err(e) => {
                for b in out {
                    let _ = std::fs::remove_file(&b.tmp);
                }
                return Err(e);
            }
        }
        sync_dir(&s.packs)?;
    }

    // 4. Point the manifests at the copies.
    let repacked: HashSet<u64> = repack.iter().map(|(id, _, _)| *id).collect();
    for (name, m) in &manifests {
        if m.kind != Kind::Snapshot || !m.pack_ids().iter().any(|id| repacked.contains(id)) {
            continue;
        }
        let bytes =
            rewrite(m, &moved).map_err(|w| StoreError::corrupt(s.manifest_path(name), w))?;
        let tmp = s
            .tmp
            .join(format!("{name}.{:016x}.gc", super::fsutil::fresh_id()));
        write_durable(&tmp, &bytes)?;
        let to = s.manifest_path(name);
        std::fs::rename(&tmp, &to).ctx("rename into place", &to)?;
        report.manifests_rewritten += 1;
        crash_point("gc-manifest-rewritten");
    }
    if report.manifests_rewritten > 0 {
        sync_dir(&s.manifests)?;
    }

    // 5. Delete what nothing names now.
    for id in delete.iter().chain(&repacked) {
        let path = s.pack_path(*id);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(StoreError::io("remove", &path, e));
            }
            _ => crash_point("gc-pack-deleted"),
        }
    }
    report.packs_deleted = delete.len() as u64;
    report.packs_repacked = repacked.len() as u64;
    if !delete.is_empty() || !repacked.is_empty() {
        sync_dir(&s.packs)?;
    }
    // Writers of this process must not dedup against deleted packs: the next builds anew.
    *s.index.lock() = None;
    report.bytes_after = store_bytes(s)?;
    Ok(report)
}

fn copy_live(
    s: &Shared,
    repack: &[(u64, File, Vec<IndexEntry>)],
    out: &mut Vec<PackBuilder>,
    moved: &mut HashMap<(u64, u64), (u64, u64)>,
    report: &mut GcReport,
) -> Result<(), StoreError> {
    let mut buf = [0u8; MAX_RECORD];
    for (id, file, entries) in repack {
        let path = s.pack_path(*id);
        for e in entries {
            // Each record is checked before it is copied: gc never spreads damage silently.
            let rec = read_record(file, &path, e.offset, e.len, &mut buf)?;
            if rec.id != e.id || rec.form != e.form {
                return Err(StoreError::corrupt(
                    &path,
                    format!("record at {} disagrees with the pack's index", e.offset),
                ));
            }
            if out
                .last()
                .is_none_or(|b| b.next + u64::from(e.len) > s.opts.pack_limit)
            {
                out.push(PackBuilder::create(&s.tmp)?);
            }
            let b = out.last_mut().expect("just pushed");
            let at = b.reserve(*e);
            let n = e.len as usize;
            b.file.write_all_at(&buf[..n], at).ctx("write", &b.tmp)?;
            moved.insert((*id, e.offset), (b.id, at));
            report.records_copied += 1;
        }
    }
    Ok(())
}

/// The manifest `m` with its objects moved as `moved` says and a new pack table.
fn rewrite(m: &Manifest, moved: &HashMap<(u64, u64), (u64, u64)>) -> Result<Vec<u8>, String> {
    let old_ids = m.pack_ids();
    let mut ids: Vec<u64> = Vec::new();
    let mut table: HashMap<u64, u16> = HashMap::new();
    let mut objects = Vec::with_capacity(m.n_objects() as usize * manifest::OBJECT_ENTRY);
    for i in 0..m.n_objects() {
        let mut o: ObjEntry = m.object(i).ok_or("an object with a bad form")?;
        let old = *old_ids
            .get(usize::from(o.pack))
            .ok_or("an object names no pack")?;
        let (id, off) = moved
            .get(&(old, u64::from(o.offset)))
            .copied()
            .unwrap_or((old, u64::from(o.offset)));
        o.offset = u32::try_from(off).map_err(|_| "offset past 4 GiB")?;
        o.pack = match table.get(&id) {
            Some(&p) => p,
            None => {
                let p = u16::try_from(ids.len()).map_err(|_| "more than 65,536 packs")?;
                ids.push(id);
                table.insert(id, p);
                p
            }
        };
        o.encode(&mut objects);
    }
    manifest::encode(&Parts {
        kind: Kind::Snapshot,
        created: m.created,
        ram_size: m.ram_size,
        nonzero: m.nonzero,
        packs: &ids,
        objects: &objects,
        pages: m.pages_bytes(),
        order: m.order_bytes(),
        state: m.state(),
        base: "",
    })
}
