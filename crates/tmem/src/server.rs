//! The tmem server: [`Tmem`] over Unix sockets and TCP, one thread per connection.
//!
//! A thread per connection, not an event loop: measured side by side (`memvisor bench tmem`,
//! 4 clients, 2 cores), an epoll loop with a worker per core served 0.89-0.94x memcached's
//! gets where these threads serve 1.2-1.4x, and no more puts. A client that stops reading
//! its replies blocks only its own thread (the socket's buffer fills), not the server's
//! memory.
//!
//! Everything a client sends is untrusted: a frame that breaks the protocol gets an error
//! reply and its connection closed; a request that fails (unknown pool, a limit) gets an error
//! reply and the connection goes on. A client that disconnects, cleanly or mid-request, is
//! disconnected from its pools; other clients' pages are untouched.

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::proto::{self, Op, Status};
use crate::{ClientId, Kind, PAGE_SIZE, PoolFlags, PoolId, Tmem, TmemError};

/// How long a new connection has to say HELLO before it is closed.
const HELLO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Connections open at once beyond the client limit (those still to say HELLO): more are
/// closed at accept, so idle connections cannot pile up threads.
const CONNECTION_SLACK: usize = 64;

/// A stream the server can serve: readable and writable halves and a read timeout.
trait Conn: Read + Write + Send + Sized + 'static {
    fn halves(&self) -> std::io::Result<Self>;
    fn set_timeout(&self, t: Option<std::time::Duration>) -> std::io::Result<()>;
}

impl Conn for std::os::unix::net::UnixStream {
    fn halves(&self) -> std::io::Result<Self> {
        self.try_clone()
    }
    fn set_timeout(&self, t: Option<std::time::Duration>) -> std::io::Result<()> {
        self.set_read_timeout(t)
    }
}

impl Conn for std::net::TcpStream {
    fn halves(&self) -> std::io::Result<Self> {
        self.try_clone()
    }
    fn set_timeout(&self, t: Option<std::time::Duration>) -> std::io::Result<()> {
        self.set_read_timeout(t)
    }
}

/// The peer's user id on a Unix socket (SO_PEERCRED).
fn peer_uid(s: &std::os::unix::net::UnixStream) -> Option<u32> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::ucred>()).ok()?;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, which is that large and
    // lives for the call; the fd is the stream's own, open for the call.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &raw mut len,
        )
    };
    (r == 0).then_some(cred.uid)
}

/// Starts a thread serving `conn`, unless `active` connections are already open.
fn spawn_conn<C: Conn>(tmem: &Arc<Tmem>, active: &Arc<AtomicUsize>, conn: C, who: String) {
    let max = tmem.limits().clients.saturating_add(CONNECTION_SLACK);
    if active.fetch_add(1, Ordering::AcqRel) >= max {
        active.fetch_sub(1, Ordering::AcqRel);
        return; // dropped: closed
    }
    let (tmem, mine) = (Arc::clone(tmem), Arc::clone(active));
    let spawned = std::thread::Builder::new()
        .name("tmem-conn".into())
        .spawn(move || {
            if let (Ok(r), Ok(w)) = (conn.halves(), conn.halves())
                && conn.set_timeout(Some(HELLO_TIMEOUT)).is_ok()
            {
                serve_conn(&tmem, r, w, &who, || {
                    let _ = conn.set_timeout(None);
                });
            }
            mine.fetch_sub(1, Ordering::AcqRel);
        });
    if spawned.is_err() {
        // The thread (and the connection in it) never started.
        active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Serves `tmem` on a Unix socket at `path` until the process ends (a stale socket file is
/// replaced). Returns once listening; connections are served on threads of their own.
/// Client names are qualified by the peer's user id, so one user cannot open another's
/// private pools.
pub fn serve_unix(tmem: Arc<Tmem>, path: &std::path::Path) -> Result<(), TmemError> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    let active = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("tmem-unix".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                let who = peer_uid(&conn).map_or_else(|| "uid?".into(), |u| format!("uid{u}"));
                spawn_conn(&tmem, &active, conn, who);
            }
        })?;
    Ok(())
}

/// Serves `tmem` on TCP at `addr`; returns the bound address once listening. TCP peers are
/// not authenticated: their client names are only qualified as `tcp`, so serve TCP on a
/// network whose hosts are trusted.
pub fn serve_tcp(tmem: Arc<Tmem>, addr: &str) -> Result<std::net::SocketAddr, TmemError> {
    let listener = TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    let active = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("tmem-tcp".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                let _ = conn.set_nodelay(true);
                keepalive(&conn);
                spawn_conn(&tmem, &active, conn, "tcp".into());
            }
        })?;
    Ok(local)
}

/// TCP keepalive, so a peer that vanished (no FIN) is found out and leaves its pools.
fn keepalive(s: &std::net::TcpStream) {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: setsockopt reads an int from `on`, which lives for the call; the fd is open.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_KEEPALIVE,
            (&raw const on).cast(),
            libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).unwrap_or(4),
        );
    }
}

/// Serves one connection until it closes, breaks the protocol or is silent before HELLO;
/// then the client leaves. `who` qualifies the client's name; `said_hello` runs once HELLO
/// is accepted.
fn serve_conn(tmem: &Tmem, r: impl Read, w: impl Write, who: &str, mut said_hello: impl FnMut()) {
    let mut r = BufReader::with_capacity(2 * PAGE_SIZE, r);
    let mut w = BufWriter::with_capacity(2 * PAGE_SIZE, w);
    let mut body = Vec::with_capacity(PAGE_SIZE + 64);
    let mut out = Vec::with_capacity(PAGE_SIZE + 64);
    let mut wire = Vec::with_capacity(PAGE_SIZE + 64);
    let mut client: Option<ClientId> = None;
    loop {
        let op = match proto::read_frame(&mut r, &mut body) {
            Ok(Some(op)) => op,
            Ok(None) => break,
            Err(TmemError::Io(_)) => break, // gone mid-frame, or silent before HELLO
            Err(e) => {
                let _ = reply_err(&mut w, &e.to_string(), &mut wire);
                break;
            }
        };
        let had_client = client.is_some();
        let result = handle(tmem, who, &mut client, op, &body, &mut out);
        if !had_client && client.is_some() {
            said_hello();
        }
        let sent = match result {
            Ok(status) => proto::write_frame(&mut w, status as u8, &[&out], &mut wire),
            Err(Fatal(msg)) => {
                let _ = reply_err(&mut w, &msg, &mut wire);
                break;
            }
        }
        .and_then(|()| w.flush().map_err(TmemError::from));
        if sent.is_err() {
            break;
        }
    }
    if let Some(c) = client {
        let _ = tmem.disconnect(c);
    }
}

/// A request that ends its connection.
struct Fatal(String);

fn reply_err(w: &mut impl Write, msg: &str, wire: &mut Vec<u8>) -> Result<(), TmemError> {
    let msg = &msg.as_bytes()[..msg.len().min(1024)];
    proto::write_frame(w, Status::Error as u8, &[msg], wire)?;
    w.flush()?;
    Ok(())
}

/// Handles one request; fills `out` with the reply body and returns its status.
fn handle(
    tmem: &Tmem,
    who: &str,
    client: &mut Option<ClientId>,
    op: u8,
    body: &[u8],
    out: &mut Vec<u8>,
) -> Result<Status, Fatal> {
    out.clear();
    let op = Op::from_u8(op).ok_or_else(|| Fatal(format!("unknown op {op}")))?;
    if let Some(len) = proto::body_len(op)
        && body.len() != len
    {
        return Err(Fatal(format!(
            "{op:?} takes a body of {len} bytes, not {}",
            body.len()
        )));
    }
    let c = match (op, *client) {
        (Op::Hello, None) => {
            let name = std::str::from_utf8(body)
                .ok()
                .filter(|n| (1..=256).contains(&n.len()))
                .ok_or_else(|| Fatal("HELLO needs a UTF-8 name of 1 to 256 bytes".into()))?;
            // A refused HELLO (too many clients) ends the connection.
            let id = tmem
                .connect(&format!("{who}:{name}"))
                .map_err(|e| Fatal(e.to_string()))?;
            *client = Some(id);
            out.extend_from_slice(&id.0.to_le_bytes());
            return Ok(Status::Ok);
        }
        (Op::Hello, Some(_)) => return Err(Fatal("HELLO twice".into())),
        (_, None) => return Err(Fatal("HELLO first".into())),
        (_, Some(c)) => c,
    };
    let result = match op {
        Op::Hello => unreachable!("handled above"),
        Op::NewPool => {
            let flags = PoolFlags {
                kind: if body[0] & 1 != 0 {
                    Kind::Persistent
                } else {
                    Kind::Ephemeral
                },
                shared: body[0] & 2 != 0,
            };
            let uuid = u128::from_le_bytes(body[1..17].try_into().expect("16 bytes"));
            tmem.new_pool(c, flags, uuid).map(|p| {
                out.extend_from_slice(&p.0.to_le_bytes());
                true
            })
        }
        Op::DestroyPool => {
            let pool = u32::from_le_bytes(body[..4].try_into().expect("4 bytes"));
            tmem.destroy_pool(c, PoolId(pool)).map(|()| true)
        }
        Op::Put => {
            let (pool, oid, index) = proto::decode_key(body);
            let page = body[proto::KEY_LEN..].try_into().expect("a page");
            tmem.put(c, PoolId(pool), oid, index, page)
        }
        Op::Get => {
            let (pool, oid, index) = proto::decode_key(body);
            let mut page = [0u8; PAGE_SIZE];
            tmem.get(c, PoolId(pool), oid, index, &mut page)
                .inspect(|&hit| {
                    if hit {
                        out.extend_from_slice(&page);
                    }
                })
        }
        Op::FlushPage => {
            let (pool, oid, index) = proto::decode_key(body);
            tmem.flush_page(c, PoolId(pool), oid, index)
        }
        Op::FlushObject => {
            let (pool, oid, _) = proto::decode_key(&[body, &[0; 4]].concat());
            tmem.flush_object(c, PoolId(pool), oid).map(|()| true)
        }
        Op::Stats => tmem.stats().map(|s| {
            for v in [
                s.clients,
                s.pools,
                s.puts,
                s.puts_refused,
                s.gets,
                s.hits,
                s.flushes,
                s.ephemeral.pages,
                s.ephemeral.bytes,
                s.ephemeral.evictions,
                s.persistent.pages,
                s.persistent.bytes,
                s.persistent.evictions,
                s.ephemeral.pending,
                s.persistent.pending,
            ] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            true
        }),
    };
    Ok(match result {
        Ok(true) => Status::Ok,
        Ok(false) => Status::No,
        Err(e) => {
            out.clear();
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(": ");
                msg.push_str(&s.to_string());
                src = s.source();
            }
            out.extend_from_slice(msg.as_bytes());
            Status::Error
        }
    })
}
