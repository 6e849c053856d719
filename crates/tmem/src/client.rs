//! A client of `memvisor tmem serve`: one connection, requests one at a time.

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;

use crate::proto::{self, Op, STATS_FIELDS, STATS_FIELDS_V1, Status};
use crate::{Kind, Oid, PAGE_SIZE, Page, PoolFlags, PoolId, TmemError};

/// A connection to a tmem server.
pub struct Client {
    r: BufReader<Box<dyn Read + Send>>,
    w: BufWriter<Box<dyn Write + Send>>,
    body: Vec<u8>,
    wire: Vec<u8>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").finish_non_exhaustive()
    }
}

impl Client {
    /// Connects over a Unix socket and says hello as `name`.
    pub fn unix(path: &std::path::Path, name: &str) -> Result<Client, TmemError> {
        let s = UnixStream::connect(path)?;
        let r = s.try_clone()?;
        Client::start(Box::new(r), Box::new(s), name)
    }

    /// Connects over TCP and says hello as `name`.
    pub fn tcp(addr: &str, name: &str) -> Result<Client, TmemError> {
        let s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        let r = s.try_clone()?;
        Client::start(Box::new(r), Box::new(s), name)
    }

    /// Connects over `addr`: `unix:PATH` or `HOST:PORT`.
    pub fn connect(addr: &str, name: &str) -> Result<Client, TmemError> {
        match addr.strip_prefix("unix:") {
            Some(p) => Client::unix(std::path::Path::new(p), name),
            None => Client::tcp(addr, name),
        }
    }

    fn start(
        r: Box<dyn Read + Send>,
        w: Box<dyn Write + Send>,
        name: &str,
    ) -> Result<Client, TmemError> {
        let mut c = Client {
            r: BufReader::with_capacity(2 * PAGE_SIZE, r),
            w: BufWriter::with_capacity(2 * PAGE_SIZE, w),
            body: Vec::with_capacity(PAGE_SIZE),
            wire: Vec::with_capacity(PAGE_SIZE + 64),
        };
        c.call(Op::Hello, &[name.as_bytes()])?;
        Ok(c)
    }

    /// Sends one request; returns Ok(true) for OK, Ok(false) for NO, with the body in
    /// `self.body`.
    fn call(&mut self, op: Op, parts: &[&[u8]]) -> Result<bool, TmemError> {
        proto::write_frame(&mut self.w, op as u8, parts, &mut self.wire)?;
        self.w.flush()?;
        let status = proto::read_frame(&mut self.r, &mut self.body)?
            .ok_or_else(|| TmemError::Protocol("the server closed the connection".into()))?;
        match status {
            s if s == Status::Ok as u8 => Ok(true),
            s if s == Status::No as u8 => Ok(false),
            s if s == Status::Error as u8 => Err(TmemError::Protocol(format!(
                "server: {}",
                String::from_utf8_lossy(&self.body)
            ))),
            s => Err(TmemError::Protocol(format!("reply status {s}"))),
        }
    }

    fn u32_body(&self) -> Result<u32, TmemError> {
        self.body
            .get(..4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
            .ok_or_else(|| TmemError::Protocol("a short reply".into()))
    }

    /// Creates (or joins, or reopens) a pool.
    pub fn new_pool(&mut self, flags: PoolFlags, uuid: u128) -> Result<PoolId, TmemError> {
        let f = u8::from(flags.kind == Kind::Persistent) | (u8::from(flags.shared) << 1);
        self.call(Op::NewPool, &[&[f], &uuid.to_le_bytes()])?;
        Ok(PoolId(self.u32_body()?))
    }

    /// Destroys (or leaves) a pool.
    pub fn destroy_pool(&mut self, pool: PoolId) -> Result<(), TmemError> {
        self.call(Op::DestroyPool, &[&pool.0.to_le_bytes()])
            .map(|_| ())
    }

    /// Puts a page; false if refused.
    pub fn put(
        &mut self,
        pool: PoolId,
        oid: Oid,
        index: u32,
        page: &Page,
    ) -> Result<bool, TmemError> {
        let key = proto::encode_key(pool.0, &oid, index);
        self.call(Op::Put, &[&key, page])
    }

    /// Gets a page into `out`; false on a miss.
    pub fn get(
        &mut self,
        pool: PoolId,
        oid: Oid,
        index: u32,
        out: &mut Page,
    ) -> Result<bool, TmemError> {
        let key = proto::encode_key(pool.0, &oid, index);
        if !self.call(Op::Get, &[&key])? {
            return Ok(false);
        }
        if self.body.len() != PAGE_SIZE {
            return Err(TmemError::Protocol(format!(
                "a page of {} bytes",
                self.body.len()
            )));
        }
        out.copy_from_slice(&self.body);
        Ok(true)
    }

    /// Flushes a page; false if there was none.
    pub fn flush_page(&mut self, pool: PoolId, oid: Oid, index: u32) -> Result<bool, TmemError> {
        let key = proto::encode_key(pool.0, &oid, index);
        self.call(Op::FlushPage, &[&key])
    }

    /// Flushes an object.
    pub fn flush_object(&mut self, pool: PoolId, oid: Oid) -> Result<(), TmemError> {
        let key = proto::encode_key(pool.0, &oid, 0);
        self.call(Op::FlushObject, &[&key[..28]]).map(|_| ())
    }

    /// The server's statistics, by name (see [`STATS_FIELDS`]).
    pub fn stats(&mut self) -> Result<Vec<(&'static str, u64)>, TmemError> {
        self.call(Op::Stats, &[])?;
        if !self.body.len().is_multiple_of(8) || self.body.len() < 8 * STATS_FIELDS_V1 {
            return Err(TmemError::Protocol("a short STATS reply".into()));
        }
        Ok(STATS_FIELDS
            .iter()
            .zip(self.body.chunks_exact(8))
            .map(|(n, b)| (*n, u64::from_le_bytes(b.try_into().expect("8 bytes"))))
            .collect())
    }
}
