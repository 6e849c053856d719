//! The tmem wire protocol, version 1: one request, one reply, in order, on a stream (a Unix
//! socket or TCP). All integers little-endian.
//!
//! ```text
//! request:  magic "TM" (2) | version 1 (1) | op (1)     | body length u32 | body
//! reply:    magic "TM" (2) | version 1 (1) | status (1) | body length u32 | body
//! ```
//!
//! | op | name         | request body                                  | OK reply body  |
//! |----|--------------|-----------------------------------------------|----------------|
//! | 1  | HELLO        | client name (UTF-8, 1..=256 bytes)            | client id u32  |
//! | 2  | NEW_POOL     | flags u8 (1 persistent, 2 shared), uuid u128  | pool u32       |
//! | 3  | DESTROY_POOL | pool u32                                      |                |
//! | 4  | PUT          | pool u32, oid 3 x u64, index u32, page (4096) |                |
//! | 5  | GET          | pool u32, oid 3 x u64, index u32              | page (4096)    |
//! | 6  | FLUSH_PAGE   | pool u32, oid 3 x u64, index u32              |                |
//! | 7  | FLUSH_OBJECT | pool u32, oid 3 x u64                         |                |
//! | 8  | STATS        |                                               | 13 x u64       |
//!
//! Status 0 is OK; 1 is NO: a put refused, a get that missed, a flush of nothing; 2 is an
//! error, with a UTF-8 message as the body. HELLO comes first on a connection. A frame that
//! breaks the protocol (bad magic or version, unknown op, a body of the wrong length or over
//! [`MAX_BODY`]) gets an error reply and the connection is closed; nothing else is touched.

use std::io::{Read, Write};

use crate::{Oid, PAGE_SIZE, TmemError};

/// The frame magic.
pub const MAGIC: [u8; 2] = *b"TM";
/// This protocol's version.
pub const VERSION: u8 = 1;
/// The largest body either side accepts.
pub const MAX_BODY: u32 = 8192;

/// Request operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
#[allow(missing_docs)]
pub enum Op {
    Hello = 1,
    NewPool = 2,
    DestroyPool = 3,
    Put = 4,
    Get = 5,
    FlushPage = 6,
    FlushObject = 7,
    Stats = 8,
}

impl Op {
    /// The op with this code.
    pub fn from_u8(v: u8) -> Option<Op> {
        Some(match v {
            1 => Op::Hello,
            2 => Op::NewPool,
            3 => Op::DestroyPool,
            4 => Op::Put,
            5 => Op::Get,
            6 => Op::FlushPage,
            7 => Op::FlushObject,
            8 => Op::Stats,
            _ => return None,
        })
    }
}

/// Reply statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    /// Done.
    Ok = 0,
    /// Refused, missed, or nothing to flush.
    No = 1,
    /// Failed; the body says why.
    Error = 2,
}

/// Reads one frame; `Ok(None)` at a clean end of stream (before a frame starts).
pub fn read_frame(r: &mut impl Read, body: &mut Vec<u8>) -> Result<Option<u8>, TmemError> {
    let mut head = [0u8; 8];
    // The first byte separately: EOF there is a clean close, later it is a torn frame.
    match r.read(&mut head[..1]) {
        Ok(0) => return Ok(None),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {
            return read_frame(r, body);
        }
        Err(e) => return Err(e.into()),
    }
    r.read_exact(&mut head[1..])?;
    if head[..2] != MAGIC {
        return Err(TmemError::Protocol(format!(
            "bad magic {:02x}{:02x}",
            head[0], head[1]
        )));
    }
    if head[2] != VERSION {
        return Err(TmemError::Protocol(format!(
            "version {} is not spoken here (this is version {VERSION})",
            head[2]
        )));
    }
    let len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    if len > MAX_BODY {
        return Err(TmemError::Protocol(format!(
            "a body of {len} bytes (at most {MAX_BODY})"
        )));
    }
    body.clear();
    body.resize(len as usize, 0);
    r.read_exact(body)?;
    Ok(Some(head[3]))
}

/// Writes one frame (header and body in one write).
pub fn write_frame(
    w: &mut impl Write,
    code: u8,
    parts: &[&[u8]],
    buf: &mut Vec<u8>,
) -> Result<(), TmemError> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let len = u32::try_from(len)
        .ok()
        .filter(|l| *l <= MAX_BODY)
        .ok_or_else(|| TmemError::Protocol(format!("a body of {len} bytes")))?;
    buf.clear();
    buf.extend_from_slice(&MAGIC);
    buf.push(VERSION);
    buf.push(code);
    buf.extend_from_slice(&len.to_le_bytes());
    for p in parts {
        buf.extend_from_slice(p);
    }
    w.write_all(buf)?;
    Ok(())
}

/// Bytes of a page key in a body: pool, oid, index.
pub const KEY_LEN: usize = 4 + 24 + 4;

/// Encodes (pool, oid, index).
pub fn encode_key(pool: u32, oid: &Oid, index: u32) -> [u8; KEY_LEN] {
    let mut k = [0u8; KEY_LEN];
    k[..4].copy_from_slice(&pool.to_le_bytes());
    for (i, w) in oid.0.iter().enumerate() {
        k[4 + 8 * i..12 + 8 * i].copy_from_slice(&w.to_le_bytes());
    }
    k[28..].copy_from_slice(&index.to_le_bytes());
    k
}

/// Decodes (pool, oid, index) from the start of `b`, which must hold [`KEY_LEN`] bytes.
pub fn decode_key(b: &[u8]) -> (u32, Oid, u32) {
    let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
    let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
    (
        u32_at(0),
        Oid([u64_at(4), u64_at(12), u64_at(20)]),
        u32_at(28),
    )
}

/// The body length each op must have (HELLO's is checked on its own).
pub fn body_len(op: Op) -> Option<usize> {
    Some(match op {
        Op::Hello => return None,
        Op::NewPool => 1 + 16,
        Op::DestroyPool => 4,
        Op::Put => KEY_LEN + PAGE_SIZE,
        Op::Get | Op::FlushPage => KEY_LEN,
        Op::FlushObject => 4 + 24,
        Op::Stats => 0,
    })
}

/// The order of the STATS reply's 15 numbers (the first 13 in servers before write-back).
pub const STATS_FIELDS: [&str; 15] = [
    "clients",
    "pools",
    "puts",
    "puts_refused",
    "gets",
    "hits",
    "flushes",
    "ephemeral_pages",
    "ephemeral_bytes",
    "ephemeral_evictions",
    "persistent_pages",
    "persistent_bytes",
    "persistent_evictions",
    "ephemeral_pending",
    "persistent_pending",
];

/// Fields a server of protocol version 1 sent before `ephemeral_pending` was added; a
/// client takes any reply with at least these, and names what it has.
pub const STATS_FIELDS_V1: usize = 13;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_bad_ones_are_named() {
        let mut buf = Vec::new();
        let mut wire = Vec::new();
        write_frame(&mut wire, 5, &[b"abc", b"de"], &mut buf).unwrap();
        let mut body = Vec::new();
        let code = read_frame(&mut &wire[..], &mut body).unwrap();
        assert_eq!((code, &body[..]), (Some(5), &b"abcde"[..]));
        assert!(read_frame(&mut &b""[..], &mut body).unwrap().is_none());
        let mut bad = wire.clone();
        bad[2] = 9;
        let e = read_frame(&mut &bad[..], &mut body).unwrap_err();
        assert!(e.to_string().contains("version 9"), "{e}");
        let mut huge = wire.clone();
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(read_frame(&mut &huge[..], &mut body).is_err());
        // A torn frame is an error, not a clean end.
        assert!(read_frame(&mut &wire[..5], &mut body).is_err());
        let k = encode_key(7, &Oid([1, 2, 3]), 9);
        assert_eq!(decode_key(&k), (7, Oid([1, 2, 3]), 9));
    }
}
