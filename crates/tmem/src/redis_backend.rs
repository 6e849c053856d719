//! Persistent (and ephemeral) pools on a real Redis server, through the `redis` crate.
//!
//! Layout: each object is one Redis hash, `tm:NS:OID`, field = the page's index, value = the
//! page; each pool keeps the set `tm:NS:objs` of its objects, for flush_pool and counting.
//! Every update of a page and its object set is one MULTI/EXEC transaction. How durable an
//! acknowledged put is, is the server's setting (appendonly, appendfsync), which
//! [`RedisBackend::durability`] reads from the live server and [`Backend::name`] states.

use parking_lot::Mutex;
use redis::{Commands, Connection};

use crate::{Backend, Key, Kind, Oid, PAGE_SIZE, Page, Put, TmemError, Usage};

/// A Redis server as a backend.
pub struct RedisBackend {
    url: String,
    client: redis::Client,
    idle: Mutex<Vec<Connection>>,
    durability: String,
    /// The page count scans every tmem key: it is taken at most once per
    /// [`PAGES_CACHE`], so STATS from any client cannot keep Redis busy.
    pages: Mutex<Option<(std::time::Instant, u64)>>,
}

/// How long a page count is reused.
const PAGES_CACHE: std::time::Duration = std::time::Duration::from_secs(5);

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

fn object_key(ns: u128, oid: &Oid) -> String {
    let [a, b, c] = oid.0;
    format!("tm:{ns:032x}:{a:x}.{b:x}.{c:x}")
}

fn objects_key(ns: u128) -> String {
    format!("tm:{ns:032x}:objs")
}

fn oid_field(oid: &Oid) -> String {
    let [a, b, c] = oid.0;
    format!("{a:x}.{b:x}.{c:x}")
}

impl RedisBackend {
    /// A backend on the Redis at `url` (`redis://host:port/` or `redis+unix:///path`).
    /// Connects once, and reads the server's durability settings.
    pub fn connect(url: &str) -> Result<Self, TmemError> {
        let client = redis::Client::open(url).map_err(|e| remote(url, "bad URL", e))?;
        let mut c = client
            .get_connection()
            .map_err(|e| remote(url, "cannot connect (is Redis running there?)", e))?;
        let get = |c: &mut Connection, name: &str| -> String {
            redis::cmd("CONFIG")
                .arg("GET")
                .arg(name)
                .query::<Vec<String>>(c)
                .ok()
                .and_then(|v| v.get(1).cloned())
                .unwrap_or_else(|| "?".into())
        };
        let durability = format!(
            "appendonly {}, appendfsync {}",
            get(&mut c, "appendonly"),
            get(&mut c, "appendfsync")
        );
        Ok(RedisBackend {
            url: url.to_owned(),
            client,
            idle: Mutex::new(vec![c]),
            durability,
            pages: Mutex::new(None),
        })
    }

    /// The server's durability settings, as it reported them.
    pub fn durability(&self) -> &str {
        &self.durability
    }

    /// A pooled connection, or a new one.
    fn conn(&self) -> Result<Connection, TmemError> {
        match self.idle.lock().pop() {
            Some(c) => Ok(c),
            None => self
                .client
                .get_connection()
                .map_err(|e| remote(&self.url, "cannot connect", e)),
        }
    }

    fn with_conn<T>(
        &self,
        what: &str,
        f: impl FnOnce(&mut Connection) -> redis::RedisResult<T>,
    ) -> Result<T, TmemError> {
        let mut c = self.conn()?;
        match f(&mut c) {
            Ok(v) => {
                self.idle.lock().push(c);
                Ok(v)
            }
            // A failed connection is dropped rather than pooled again.
            Err(e) => Err(remote(&self.url, what, e)),
        }
    }
}

fn remote(url: &str, what: &str, e: redis::RedisError) -> TmemError {
    TmemError::Remote {
        backend: "redis",
        addr: url.to_owned(),
        what: what.to_owned(),
        source: Some(Box::new(e)),
    }
}

fn check_page(url: &str, v: &[u8]) -> Result<(), TmemError> {
    if v.len() == PAGE_SIZE {
        Ok(())
    } else {
        Err(TmemError::Remote {
            backend: "redis",
            addr: url.to_owned(),
            what: format!("a stored page of {} bytes, not {PAGE_SIZE}", v.len()),
            source: None,
        })
    }
}

impl Backend for RedisBackend {
    fn name(&self) -> String {
        format!("redis ({}; {})", self.url, self.durability)
    }

    fn supports(&self, _: Kind) -> bool {
        true
    }

    fn put(&self, key: &Key, page: &Page) -> Result<Put, TmemError> {
        let obj = object_key(key.ns, &key.oid);
        let objs = objects_key(key.ns);
        let r = {
            let mut c = self.conn()?;
            let r: redis::RedisResult<(i64, i64)> = redis::pipe()
                .atomic()
                .hset(&obj, key.index, &page[..])
                .sadd(&objs, oid_field(&key.oid))
                .query(&mut c);
            match &r {
                Err(e) if e.code() == Some("OOM") => {
                    // Refused for memory (maxmemory with noeviction): the key must not keep
                    // an older page.
                    let _: redis::RedisResult<i64> = c.hdel(&obj, key.index);
                    self.idle.lock().push(c);
                    return Ok(Put::Refused);
                }
                Err(_) => {}
                Ok(_) => self.idle.lock().push(c),
            }
            r
        };
        let (added, _) = r.map_err(|e| remote(&self.url, "HSET", e))?;
        Ok(Put::Stored { new: added == 1 })
    }

    fn get(&self, key: &Key, out: &mut Page, take: bool) -> Result<bool, TmemError> {
        let obj = object_key(key.ns, &key.oid);
        let v: Option<Vec<u8>> = if take {
            self.with_conn("HGET and HDEL", |c| {
                let (v, _): (Option<Vec<u8>>, i64) = redis::pipe()
                    .atomic()
                    .hget(&obj, key.index)
                    .hdel(&obj, key.index)
                    .query(c)?;
                Ok(v)
            })?
        } else {
            self.with_conn("HGET", |c| c.hget(&obj, key.index))?
        };
        let Some(v) = v else {
            return Ok(false);
        };
        check_page(&self.url, &v)?;
        out.copy_from_slice(&v);
        Ok(true)
    }

    fn flush_page(&self, key: &Key) -> Result<bool, TmemError> {
        let obj = object_key(key.ns, &key.oid);
        let n: i64 = self.with_conn("HDEL", |c| c.hdel(&obj, key.index))?;
        Ok(n == 1)
    }

    fn flush_object(&self, ns: u128, _: Kind, oid: &Oid) -> Result<Option<u64>, TmemError> {
        let obj = object_key(ns, oid);
        let (n, _, _): (u64, i64, i64) = self.with_conn("flushing an object", |c| {
            redis::pipe()
                .atomic()
                .hlen(&obj)
                .del(&obj)
                .srem(objects_key(ns), oid_field(oid))
                .query(c)
        })?;
        Ok(Some(n))
    }

    fn flush_pool(&self, ns: u128, _: Kind, _: bool) -> Result<(), TmemError> {
        let objs = objects_key(ns);
        let members: Vec<String> = self.with_conn("SMEMBERS", |c| c.smembers(&objs))?;
        self.with_conn("flushing a pool", |c| {
            let mut p = redis::pipe();
            p.atomic();
            for m in &members {
                p.del(format!("tm:{ns:032x}:{m}"));
            }
            p.del(&objs);
            p.query::<()>(c)
        })
    }

    fn pool_pages(&self, ns: u128, _: Kind) -> Result<u64, TmemError> {
        let members: Vec<String> = self.with_conn("SMEMBERS", |c| c.smembers(objects_key(ns)))?;
        let mut n = 0;
        for m in members {
            let len: u64 = self.with_conn("HLEN", |c| c.hlen(format!("tm:{ns:032x}:{m}")))?;
            n += len;
        }
        Ok(n)
    }

    fn usage(&self) -> Result<Usage, TmemError> {
        let info: String = self.with_conn("INFO", |c| redis::cmd("INFO").arg("memory").query(c))?;
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':')?.trim().parse().ok())
                .unwrap_or(0)
        };
        let cached = *self.pages.lock();
        if let Some((at, pages)) = cached
            && at.elapsed() < PAGES_CACHE
        {
            return Ok(Usage {
                pages,
                bytes: field("used_memory"),
                evictions: 0,
                pending: 0,
            });
        }
        // Pages: the sum of every tmem object's length.
        let keys: Vec<String> = self.with_conn("SCAN", |c| {
            let it: redis::Iter<String> = c.scan_match("tm:*:objs")?;
            it.collect()
        })?;
        let mut pages = 0;
        for k in keys {
            let ns = k.trim_start_matches("tm:").trim_end_matches(":objs");
            let members: Vec<String> = self.with_conn("SMEMBERS", |c| c.smembers(&k))?;
            for m in members {
                let len: u64 = self.with_conn("HLEN", |c| c.hlen(format!("tm:{ns}:{m}")))?;
                pages += len;
            }
        }
        *self.pages.lock() = Some((std::time::Instant::now(), pages));
        Ok(Usage {
            pages,
            // What the server took from its allocator, as it reports it (used_memory_rss
            // would add fragmentation).
            bytes: field("used_memory"),
            evictions: 0,
            pending: 0,
        })
    }
}
