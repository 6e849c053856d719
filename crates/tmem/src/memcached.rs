//! Ephemeral pools on a real memcached server, over its text protocol (a Unix socket or TCP).
//!
//! memcached evicts under memory pressure, which is exactly an ephemeral pool's licence, so it
//! holds ephemeral pools only. It cannot list or delete keys by prefix, so flushing an object
//! or a pool bumps a generation number that is part of every key: the old pages become
//! unreachable at once (a later get misses) and memcached's LRU reclaims them.
//!
//! The client is written here: the protocol needs five commands, and the memcache crates on
//! crates.io either lack Unix sockets or pull in an async runtime.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;

use hashbrown::HashMap;
use parking_lot::Mutex;

use crate::{Backend, Key, Kind, Oid, PAGE_SIZE, Page, Put, TmemError, Usage};

enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => s.flush(),
            Stream::Tcp(s) => s.flush(),
        }
    }
}

/// One connection: reads buffered, writes gathered into one buffer per request.
struct Conn {
    r: BufReader<Stream>,
    out: Vec<u8>,
}

/// A memcached server as an ephemeral backend.
pub struct MemcachedBackend {
    addr: String,
    idle: Mutex<Vec<Conn>>,
    /// Generations of flushed objects and pools; never reset (a reset would make old keys
    /// reachable again).
    gens: Mutex<Gens>,
}

/// Generations of one namespace: its own, and its flushed objects'.
#[derive(Default)]
struct NsGens {
    pool: u64,
    objects: HashMap<Oid, u64>,
}

#[derive(Default)]
struct Gens {
    next: u64,
    by_ns: HashMap<u128, NsGens>,
}

/// The most flushed objects remembered per namespace: past it the whole namespace moves to
/// a new generation (its pages are dropped, as an ephemeral pool may drop anything), so a
/// client flushing random objects cannot grow the server's memory.
const MAX_OBJECT_GENS: usize = 4096;

impl std::fmt::Debug for MemcachedBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemcachedBackend")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl MemcachedBackend {
    /// A backend on the memcached at `addr`: `unix:/path/to/socket` or `host:port`. Connects
    /// once to check the server is there.
    pub fn connect(addr: &str) -> Result<Self, TmemError> {
        let b = MemcachedBackend {
            addr: addr.to_owned(),
            idle: Mutex::new(Vec::new()),
            gens: Mutex::new(Gens::default()),
        };
        let c = b.open()?;
        b.idle.lock().push(c);
        Ok(b)
    }

    fn err(&self, what: impl Into<String>) -> TmemError {
        TmemError::Remote {
            backend: "memcached",
            addr: self.addr.clone(),
            what: what.into(),
            source: None,
        }
    }

    fn io_err(&self, what: &str, e: std::io::Error) -> TmemError {
        TmemError::Remote {
            backend: "memcached",
            addr: self.addr.clone(),
            what: what.to_owned(),
            source: Some(Box::new(e)),
        }
    }

    fn open(&self) -> Result<Conn, TmemError> {
        let stream = match self.addr.strip_prefix("unix:") {
            Some(path) => UnixStream::connect(path).map(Stream::Unix),
            None => TcpStream::connect(&self.addr).map(|s| {
                let _ = s.set_nodelay(true);
                Stream::Tcp(s)
            }),
        }
        .map_err(|e| self.io_err("cannot connect (is memcached running there?)", e))?;
        Ok(Conn {
            r: BufReader::with_capacity(2 * PAGE_SIZE, stream),
            out: Vec::with_capacity(PAGE_SIZE + 256),
        })
    }

    /// Runs `f` on a pooled connection; a connection that failed is dropped, not reused.
    fn with_conn<T>(
        &self,
        f: impl FnOnce(&mut Conn) -> std::io::Result<Result<T, String>>,
    ) -> Result<T, TmemError> {
        let mut c = match self.idle.lock().pop() {
            Some(c) => c,
            None => self.open()?,
        };
        match f(&mut c) {
            Ok(Ok(v)) => {
                self.idle.lock().push(c);
                Ok(v)
            }
            Ok(Err(what)) => Err(self.err(what)),
            Err(e) => Err(self.io_err("connection failed", e)),
        }
    }

    fn key(&self, key: &Key) -> String {
        let g = self.gens.lock();
        let ns = g.by_ns.get(&key.ns);
        let pg = ns.map_or(0, |n| n.pool);
        let og = ns
            .and_then(|n| n.objects.get(&key.oid))
            .copied()
            .unwrap_or(0);
        let [a, b, c] = key.oid.0;
        format!(
            "tm:{:032x}.{pg:x}:{a:x}.{b:x}.{c:x}.{og:x}:{:x}",
            key.ns, key.index
        )
    }
}

fn line(c: &mut Conn) -> std::io::Result<String> {
    let mut s = String::new();
    c.r.read_line(&mut s)?;
    if s.is_empty() {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(s.trim_end().to_owned())
}

fn send(c: &mut Conn) -> std::io::Result<()> {
    c.r.get_mut().write_all(&c.out)?;
    c.out.clear();
    Ok(())
}

fn delete(c: &mut Conn, key: &str) -> std::io::Result<Result<bool, String>> {
    write!(c.out, "delete {key}\r\n")?;
    send(c)?;
    Ok(match line(c)?.as_str() {
        "DELETED" => Ok(true),
        "NOT_FOUND" => Ok(false),
        other => Err(format!("delete answered {other:?}")),
    })
}

impl Backend for MemcachedBackend {
    fn name(&self) -> String {
        format!("memcached ({})", self.addr)
    }

    fn supports(&self, kind: Kind) -> bool {
        kind == Kind::Ephemeral
    }

    fn put(&self, key: &Key, page: &Page) -> Result<Put, TmemError> {
        let k = self.key(key);
        self.with_conn(|c| {
            write!(c.out, "set {k} 0 0 {PAGE_SIZE}\r\n")?;
            c.out.extend_from_slice(page);
            c.out.extend_from_slice(b"\r\n");
            send(c)?;
            let reply = line(c)?;
            if reply == "STORED" {
                return Ok(Ok(Put::Stored { new: true }));
            }
            if reply.starts_with("SERVER_ERROR") {
                // Out of memory (or too large): refused. Whatever the key held goes too, so
                // no older page can be read back.
                return delete(c, &k).map(|r| r.map(|_| Put::Refused));
            }
            Ok(Err(format!("set answered {reply:?}")))
        })
    }

    fn get(&self, key: &Key, out: &mut Page, take: bool) -> Result<bool, TmemError> {
        let k = self.key(key);
        self.with_conn(|c| {
            write!(c.out, "get {k}\r\n")?;
            send(c)?;
            let head = line(c)?;
            if head == "END" {
                return Ok(Ok(false));
            }
            let mut parts = head.split(' ');
            let (Some("VALUE"), Some(name), Some(_flags), Some(len)) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Ok(Err(format!("get answered {head:?}")));
            };
            if name != k || len != PAGE_SIZE.to_string() {
                return Ok(Err(format!("get answered {head:?} for {k}")));
            }
            c.r.read_exact(out)?;
            let mut tail = [0u8; 2];
            c.r.read_exact(&mut tail)?;
            let end = line(c)?;
            if tail != *b"\r\n" || end != "END" {
                return Ok(Err("a value without its END".into()));
            }
            if take {
                return delete(c, &k).map(|r| r.map(|_| true));
            }
            Ok(Ok(true))
        })
    }

    fn flush_page(&self, key: &Key) -> Result<bool, TmemError> {
        let k = self.key(key);
        self.with_conn(|c| delete(c, &k))
    }

    fn flush_object(&self, ns: u128, _: Kind, oid: &Oid) -> Result<Option<u64>, TmemError> {
        let mut g = self.gens.lock();
        g.next += 1;
        let n = g.next;
        let e = g.by_ns.entry(ns).or_default();
        if e.objects.len() >= MAX_OBJECT_GENS {
            e.pool = n;
            e.objects.clear();
        } else {
            e.objects.insert(*oid, n);
        }
        Ok(None)
    }

    fn flush_pool(&self, ns: u128, _: Kind, reused: bool) -> Result<(), TmemError> {
        let mut g = self.gens.lock();
        if !reused {
            // Never used again: its keys are unreachable, nothing to remember.
            g.by_ns.remove(&ns);
            return Ok(());
        }
        g.next += 1;
        let n = g.next;
        let e = g.by_ns.entry(ns).or_default();
        // The pool's generation is in every key, so its objects' generations are moot.
        e.pool = n;
        e.objects.clear();
        Ok(())
    }

    fn pool_pages(&self, _: u128, _: Kind) -> Result<u64, TmemError> {
        Ok(0)
    }

    fn usage(&self) -> Result<Usage, TmemError> {
        let stats = |c: &mut Conn, cmd: &str| -> std::io::Result<HashMap<String, u64>> {
            write!(c.out, "{cmd}\r\n")?;
            send(c)?;
            let mut m = HashMap::new();
            loop {
                let l = line(c)?;
                if l == "END" {
                    return Ok(m);
                }
                let mut p = l.split(' ');
                if let (Some("STAT"), Some(k), Some(v)) = (p.next(), p.next(), p.next())
                    && let Ok(v) = v.parse()
                {
                    m.insert(k.to_owned(), v);
                }
            }
        };
        self.with_conn(|c| {
            let general = stats(c, "stats")?;
            let slabs = stats(c, "stats slabs")?;
            Ok(Ok(Usage {
                pages: general.get("curr_items").copied().unwrap_or(0),
                // Memory memcached took from malloc for its slabs: what it really holds,
                // rounding to slab classes and item headers included.
                bytes: slabs
                    .get("total_malloced")
                    .or(general.get("bytes"))
                    .copied()
                    .unwrap_or(0),
                evictions: general.get("evictions").copied().unwrap_or(0),
                pending: 0,
            }))
        })
    }
}
