//! Real memcached and Redis servers for the tests, started on Unix sockets in a temporary
//! directory and killed when the guard drops.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A server process and its directory; killed and removed on drop.
pub struct Server {
    child: Child,
    dir: PathBuf,
    /// How to reach it: `unix:PATH` for memcached, a redis+unix URL for Redis.
    pub addr: String,
    /// The socket's path.
    pub socket: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn tempdir(tag: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "tmem-test-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Waits until the server accepts connections on `path`: the socket file appears at bind(),
/// a moment before listen(), and a connect in between is refused.
fn wait_for(path: &std::path::Path, what: &str) {
    let start = Instant::now();
    while std::os::unix::net::UnixStream::connect(path).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{what} did not listen on {}; is it installed (see .ci/run)?",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// memcached with `mib` MiB of item memory on a Unix socket.
pub fn memcached(mib: u32) -> Server {
    let dir = tempdir("memcached");
    let socket = dir.join("mc.sock");
    let child = Command::new("memcached")
        .arg("-s")
        .arg(&socket)
        .args(["-m", &mib.to_string(), "-t", "2", "-u", "root"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("memcached runs (apt-get install memcached; .ci/run does)");
    wait_for(&socket, "memcached");
    Server {
        child,
        addr: format!("unix:{}", socket.display()),
        socket,
        dir,
    }
}

/// redis-server on a Unix socket, its append-only file fsynced on every write, so an
/// acknowledged write survives even the server's own crash; `dir` keeps its files (None: a
/// fresh temporary directory).
pub fn redis_in(dir: Option<PathBuf>) -> Server {
    let dir = dir.unwrap_or_else(|| tempdir("redis"));
    let socket = dir.join("redis.sock");
    let _ = std::fs::remove_file(&socket);
    let child = Command::new("redis-server")
        .args(["--port", "0", "--unixsocket"])
        .arg(&socket)
        .args(["--dir"])
        .arg(&dir)
        .args([
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server runs (apt-get install redis-server; .ci/run does)");
    wait_for(&socket, "redis-server");
    Server {
        child,
        addr: format!("redis+unix://{}", socket.display()),
        socket,
        dir,
    }
}

/// redis-server in a fresh directory.
pub fn redis() -> Server {
    redis_in(None)
}

/// A page that says which key and version it is, so a stale or torn page is caught.
pub fn page(tag: u64, index: u32, version: u64) -> tmem::Page {
    let mut p = [0u8; tmem::PAGE_SIZE];
    let mut x = tag ^ (u64::from(index) << 32) ^ version.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for (i, chunk) in p.chunks_exact_mut(8).enumerate() {
        // Mostly compressible, not all zero: a header and a pattern.
        let v = if i < 3 {
            [tag, u64::from(index), version][i]
        } else if i % 16 == 0 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        } else {
            i as u64
        };
        chunk.copy_from_slice(&v.to_le_bytes());
    }
    p
}

/// The (tag, index, version) a page from [`page`] carries.
pub fn stamp(p: &tmem::Page) -> (u64, u32, u64) {
    let w = |i: usize| u64::from_le_bytes(p[i * 8..i * 8 + 8].try_into().unwrap());
    (w(0), u32::try_from(w(1)).unwrap(), w(2))
}
