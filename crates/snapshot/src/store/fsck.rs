//! fsck: the whole store checked, every problem listed.
//!
//! Packs first: header, footer, index checksum, records tiling the space between header and
//! index exactly, and every record read, checked, decoded (a patch against its base) and
//! hashed back to its id. Then manifests: header and body checksums, every pack they name
//! present and sound, every object a record of that pack with the same length and form,
//! every patch's base the whole page it was made against, every page naming an object, the
//! first-touch order inside RAM, a clone's base a snapshot.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use pagestore::PAGE_SIZE;
use serde::Serialize;

use super::Shared;
use super::error::{IoContext, StoreError};
use super::format::{
    Form, Id, IndexEntry, MAX_RECORD, PACK_HEADER, apply_delta, decode_whole, delta_base,
};
use super::fsutil::LockMode;
use super::manifest::{Kind, Manifest};
use super::pack::{list_packs, read_index, read_record};

/// Problems listed per file before the rest are only counted.
const MAX_PER_FILE: usize = 20;

/// One thing fsck found wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// The file.
    pub path: PathBuf,
    /// What is wrong with it.
    pub what: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.what)
    }
}

/// What [`crate::store::Store::fsck`] checked and found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FsckReport {
    /// Snapshot manifests checked.
    pub snapshots: u64,
    /// Clone manifests checked.
    pub clones: u64,
    /// Pack files checked.
    pub packs: u64,
    /// Records read, decoded and hashed back to their ids.
    pub records: u64,
    /// Non-zero pages of snapshots whose objects were checked.
    pub pages: u64,
    /// Sound packs that no manifest names (an interrupted writer or gc; the next gc
    /// removes them). Not a problem.
    pub unreferenced_packs: u64,
    /// Files in `tmp/` (an interrupted writer or gc; the next gc removes them). Not a
    /// problem.
    pub leftovers: Vec<PathBuf>,
    /// Everything wrong, in the order found.
    pub problems: Vec<Problem>,
}

impl FsckReport {
    /// True when nothing is wrong.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Collects problems, at most [`MAX_PER_FILE`] spelled out per file.
struct Problems<'a> {
    report: &'a mut Vec<Problem>,
    path: PathBuf,
    n: usize,
}

impl<'a> Problems<'a> {
    fn new(report: &'a mut Vec<Problem>, path: &Path) -> Self {
        Problems {
            report,
            path: path.to_path_buf(),
            n: 0,
        }
    }

    fn add(&mut self, what: impl Into<String>) {
        self.n += 1;
        if self.n <= MAX_PER_FILE {
            self.report.push(Problem {
                path: self.path.clone(),
                what: what.into(),
            });
        }
    }

    fn error(&mut self, e: &StoreError) {
        let what = match e {
            StoreError::Corrupt { what, .. } => what.clone(),
            other => other.to_string(),
        };
        self.add(what);
    }

    fn close(self) -> usize {
        if self.n > MAX_PER_FILE {
            self.report.push(Problem {
                path: self.path,
                what: format!("and {} more problems", self.n - MAX_PER_FILE),
            });
        }
        self.n
    }
}

struct PackCheck {
    file: File,
    path: PathBuf,
    entries: HashMap<u64, IndexEntry>,
    /// Offsets of records that decode and hash to their ids.
    good: HashSet<u64>,
}

pub(crate) fn run(s: &Shared) -> Result<FsckReport, StoreError> {
    // Shared: writers may finish meanwhile (never a gc). A snapshot finished between the
    // listing of packs and the reading of its manifest names a pack the listing missed; the
    // check then starts again, which sees both.
    let _lock = s.lock(LockMode::Shared)?;
    let mut tries = 0;
    loop {
        let (report, raced) = run_once(s)?;
        tries += 1;
        if !raced || tries == 3 {
            return Ok(report);
        }
    }
}

fn run_once(s: &Shared) -> Result<(FsckReport, bool), StoreError> {
    let mut r = FsckReport::default();
    for e in std::fs::read_dir(&s.tmp).ctx("list", &s.tmp)? {
        r.leftovers.push(e.ctx("list", &s.tmp)?.path());
    }
    r.leftovers.sort();

    // Packs: structure first, then every record (a patch needs its base from any pack).
    let mut packs: HashMap<u64, PackCheck> = HashMap::new();
    let mut whole: HashMap<Id, (u64, u64)> = HashMap::new();
    let listed: HashSet<u64> = list_packs(&s.packs)?.into_iter().collect();
    let mut sorted_ids: Vec<u64> = listed.iter().copied().collect();
    sorted_ids.sort_unstable();
    for id in sorted_ids {
        r.packs += 1;
        let path = s.pack_path(id);
        let mut p = Problems::new(&mut r.problems, &path);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                p.add(format!("cannot open: {e}"));
                p.close();
                continue;
            }
        };
        let ix = match read_index(&file, &path, id) {
            Ok(ix) => ix,
            Err(e) => {
                p.error(&e);
                p.close();
                continue;
            }
        };
        let mut sorted: Vec<&IndexEntry> = ix.entries.iter().collect();
        sorted.sort_by_key(|e| e.offset);
        let mut at = PACK_HEADER as u64;
        for e in &sorted {
            if e.offset != at {
                p.add(format!(
                    "records do not tile the pack: expected one at {at}, found {}",
                    e.offset
                ));
            }
            at = e.offset + u64::from(e.len);
        }
        if at != ix.footer.index_offset {
            p.add(format!(
                "the records end at {at}, the index starts at {}",
                ix.footer.index_offset
            ));
        }
        p.close();
        for e in &ix.entries {
            if e.form != Form::Delta {
                whole.entry(e.id).or_insert((id, e.offset));
            }
        }
        packs.insert(
            id,
            PackCheck {
                file,
                path,
                entries: ix.entries.iter().map(|e| (e.offset, *e)).collect(),
                good: HashSet::new(),
            },
        );
    }
    let mut ids: Vec<u64> = packs.keys().copied().collect();
    ids.sort_unstable();
    let mut buf = [0u8; MAX_RECORD];
    let mut base_buf = [0u8; MAX_RECORD];
    for id in &ids {
        let mut good = HashSet::new();
        {
            let pc = &packs[id];
            let mut p = Problems::new(&mut r.problems, &pc.path);
            let mut entries: Vec<&IndexEntry> = pc.entries.values().collect();
            entries.sort_by_key(|e| e.offset);
            for e in entries {
                r.records += 1;
                match check_one(&packs, &whole, pc, e, &mut buf, &mut base_buf) {
                    Ok(()) => {
                        good.insert(e.offset);
                    }
                    Err(what) => p.add(what),
                }
            }
            p.close();
        }
        if let Some(pc) = packs.get_mut(id) {
            pc.good = good;
        }
    }

    // Manifests.
    let (names, strays) = s.manifest_entries()?;
    for stray in strays {
        r.problems.push(Problem {
            path: stray,
            what: "not a snapshot name: the store never makes this file, and gc will not run while it is there".into(),
        });
    }
    let mut kinds: HashMap<String, Kind> = HashMap::new();
    let mut clones: Vec<(String, Option<String>)> = Vec::new();
    let mut named: HashSet<u64> = HashSet::new();
    let mut raced = false;
    for name in &names {
        let path = s.manifest_path(name);
        let mut p = Problems::new(&mut r.problems, &path);
        let m = match s.read_manifest(name) {
            Ok(m) => m,
            Err(StoreError::NoSuchSnapshot { .. }) => continue,
            Err(e) => {
                p.error(&e);
                p.close();
                continue;
            }
        };
        kinds.insert(name.clone(), m.kind);
        match m.kind {
            Kind::Clone => {
                r.clones += 1;
                clones.push((name.clone(), m.base().map(str::to_string)));
            }
            Kind::Snapshot => {
                r.snapshots += 1;
                named.extend(m.pack_ids());
                raced |= m
                    .pack_ids()
                    .iter()
                    .any(|id| !listed.contains(id) && s.pack_path(*id).exists());
                r.pages += check_manifest(&m, &packs, s, &mut p);
            }
        }
        p.close();
    }
    for (name, base) in clones {
        let path = s.manifest_path(&name);
        match base.as_deref().map(|b| (b, kinds.get(b))) {
            Some((_, Some(Kind::Snapshot))) => {}
            Some((b, Some(Kind::Clone))) => r.problems.push(Problem {
                path,
                what: format!("its base {b:?} is a clone, not a snapshot"),
            }),
            Some((b, None)) => r.problems.push(Problem {
                path,
                what: format!("its base {b:?} does not exist or cannot be read"),
            }),
            None => r.problems.push(Problem {
                path,
                what: "it names no valid base".into(),
            }),
        }
    }
    r.unreferenced_packs = packs.keys().filter(|id| !named.contains(id)).count() as u64;
    Ok((r, raced))
}

/// Reads, checks, decodes and hashes one record (a patch against its base).
fn check_one(
    packs: &HashMap<u64, PackCheck>,
    whole: &HashMap<Id, (u64, u64)>,
    pc: &PackCheck,
    e: &IndexEntry,
    buf: &mut [u8; MAX_RECORD],
    base_buf: &mut [u8; MAX_RECORD],
) -> Result<(), String> {
    // read_record's complaints name the record's offset already.
    let rec = read_record(&pc.file, &pc.path, e.offset, e.len, buf).map_err(|e| match e {
        StoreError::Corrupt { what, .. } => what,
        other => other.to_string(),
    })?;
    check_decoded(packs, whole, e, &rec, base_buf)
        .map_err(|w| format!("record at {}: {w}", e.offset))
}

fn check_decoded(
    packs: &HashMap<u64, PackCheck>,
    whole: &HashMap<Id, (u64, u64)>,
    e: &IndexEntry,
    rec: &super::format::Record<'_>,
    base_buf: &mut [u8; MAX_RECORD],
) -> Result<(), String> {
    if rec.id != e.id || rec.form != e.form || rec.codec != e.codec {
        return Err("its header disagrees with the pack's index".into());
    }
    let mut page = [0u8; PAGE_SIZE];
    if rec.form == Form::Delta {
        let base_id = delta_base(rec).map_err(|_| "a patch shorter than its base id")?;
        if base_id != e.base {
            return Err("its base id disagrees with the pack's index".into());
        }
        let &(bp, boff) = whole
            .get(&base_id)
            .ok_or("its base is in no pack of the store")?;
        let b = &packs[&bp];
        let be = b.entries[&boff];
        let base = read_record(&b.file, &b.path, boff, be.len, base_buf)
            .map_err(|e| format!("its base cannot be read: {e}"))?;
        decode_whole(&base, &mut page).map_err(|_| "its base does not decode")?;
        apply_delta(rec, &mut page).map_err(|_| "the patch does not apply to its base")?;
    } else {
        decode_whole(rec, &mut page).map_err(|_| "the page does not decode")?;
    }
    if *blake3::hash(&page).as_bytes() != rec.id {
        return Err("the page does not hash to its id".into());
    }
    Ok(())
}

/// Checks a snapshot's manifest against the packs; returns its non-zero pages.
fn check_manifest(
    m: &Manifest,
    packs: &HashMap<u64, PackCheck>,
    s: &Shared,
    p: &mut Problems<'_>,
) -> u64 {
    let ids = m.pack_ids();
    for id in &ids {
        if !packs.contains_key(id) {
            p.add(format!(
                "it names pack {}, which is missing or unreadable",
                s.pack_path(*id).display()
            ));
        }
    }
    // Per object: is it a good record of the form and length the manifest says?
    let n = m.n_objects();
    let mut ok = vec![false; n as usize];
    let entry_of = |i: u32| -> Result<(IndexEntry, Form), String> {
        let o = m.object(i).ok_or(format!("object {i} has a bad form"))?;
        let id = ids.get(usize::from(o.pack)).ok_or(format!(
            "object {i} names pack {} of {}",
            o.pack,
            ids.len()
        ))?;
        let pc = packs
            .get(id)
            .ok_or(format!("object {i} is in a missing pack"))?;
        let e = pc.entries.get(&u64::from(o.offset)).ok_or(format!(
            "object {i} names no record of its pack (offset {})",
            o.offset
        ))?;
        if e.len != o.len || e.form != o.form {
            return Err(format!(
                "object {i} disagrees with its record's length or form"
            ));
        }
        if !pc.good.contains(&e.offset) {
            return Err(format!("object {i} is a damaged record"));
        }
        Ok((*e, o.form))
    };
    for i in 0..n {
        let r = entry_of(i).and_then(|(e, form)| {
            if form != Form::Delta {
                return Ok(());
            }
            let o = m.object(i).ok_or("bad form")?;
            let b = o
                .base
                .checked_sub(1)
                .filter(|&b| b < n)
                .ok_or(format!("delta object {i} names no base"))?;
            let (be, bform) = entry_of(b)?;
            if bform == Form::Delta {
                return Err(format!("delta object {i} has a delta as its base"));
            }
            if be.id != e.base {
                return Err(format!(
                    "delta object {i} names a base it was not made against"
                ));
            }
            Ok(())
        });
        match r {
            Ok(()) => ok[i as usize] = true,
            Err(w) => p.add(w),
        }
    }
    let mut nonzero = 0u64;
    let mut bad_pages = 0u64;
    for index in 0..m.pages() {
        match m.page(index) {
            Some(0) => {}
            Some(v) if v <= n => {
                nonzero += 1;
                if !ok[(v - 1) as usize] {
                    bad_pages += 1;
                }
            }
            _ => {
                nonzero += 1;
                bad_pages += 1;
                p.add(format!(
                    "page {index} names object {:?} of {n}",
                    m.page(index)
                ));
            }
        }
    }
    if bad_pages > 0 {
        p.add(format!("{bad_pages} pages cannot be read back"));
    }
    if nonzero != m.nonzero {
        p.add(format!(
            "the header counts {} non-zero pages, the table {nonzero}",
            m.nonzero
        ));
    }
    if let Some(bad) = m.order().iter().find(|&&x| u64::from(x) >= m.pages()) {
        p.add(format!(
            "the first-touch order names page {bad}, beyond {} pages",
            m.pages()
        ));
    }
    nonzero
}
