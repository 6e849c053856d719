//! `memvisor tmem serve` as a process: killed with SIGKILL while clients put pages into
//! persistent pools on Redis, restarted, and every acknowledged page is there.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tmem::client::Client;
use tmem::{Kind, Oid, PoolFlags};

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until a server accepts connections on `p` (the file appears a moment before it
/// listens).
fn wait_for(p: &Path) {
    let start = Instant::now();
    while std::os::unix::net::UnixStream::connect(p).is_err() {
        assert!(start.elapsed() < Duration::from_secs(10), "{}", p.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn redis(dir: &Path) -> (Killed, String) {
    let sock = dir.join("redis.sock");
    let child = Command::new("redis-server")
        .args(["--port", "0", "--unixsocket"])
        .arg(&sock)
        .arg("--dir")
        .arg(dir)
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
        .expect("redis-server (apt-get install redis-server; .ci/run does)");
    wait_for(&sock);
    (Killed(child), format!("redis+unix://{}", sock.display()))
}

fn serve(sock: &Path, redis_url: &str) -> Killed {
    let _ = std::fs::remove_file(sock);
    let child = Command::new(env!("CARGO_BIN_EXE_memvisor"))
        .args(["tmem", "serve", "--unix"])
        .arg(sock)
        .args(["--persistent", &format!("redis={redis_url}")])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(sock);
    Killed(child)
}

/// A page that carries (client, index, version) and is otherwise real-looking text.
fn page(client: u64, index: u32, version: u64) -> tmem::Page {
    let mut p = [0u8; 4096];
    let line = format!("client {client} index {index} version {version}\n");
    for (i, b) in p.iter_mut().enumerate() {
        *b = line.as_bytes()[i % line.len()];
    }
    p[..8].copy_from_slice(&client.to_le_bytes());
    p[8..12].copy_from_slice(&index.to_le_bytes());
    p[12..20].copy_from_slice(&version.to_le_bytes());
    p
}

const PERS: PoolFlags = PoolFlags {
    kind: Kind::Persistent,
    shared: false,
};

#[test]
fn a_killed_server_loses_no_acknowledged_persistent_page() {
    let dir: PathBuf =
        std::env::temp_dir().join(format!("memvisor-tmem-kill-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (_redis, url) = redis(&dir);
    let sock = dir.join("tmem.sock");
    let server = Mutex::new(Some(serve(&sock, &url)));
    const CLIENTS: usize = 3;
    const INDICES: u32 = 64;
    // The last version of each page the server acknowledged.
    let acked = Mutex::new(vec![[0u64; INDICES as usize]; CLIENTS]);
    std::thread::scope(|s| {
        for (slot, c) in (0..CLIENTS).zip(0u64..) {
            let (acked, sock) = (&acked, &sock);
            s.spawn(move || {
                let mut cl = Client::unix(sock, &format!("vm{c}")).unwrap();
                let pool = cl.new_pool(PERS, 7).unwrap();
                let mut version = 0;
                'run: loop {
                    version += 1;
                    for i in 0..INDICES {
                        match cl.put(pool, Oid([c, 0, 0]), i, &page(c, i, version)) {
                            Ok(true) => acked.lock().unwrap()[slot][i as usize] = version,
                            Ok(false) => panic!("refused"),
                            Err(_) => break 'run, // the server is gone
                        }
                    }
                }
                assert!(version > 2, "client {c} barely ran");
            });
        }
        // Let them write for a while, then kill the server mid-stream.
        std::thread::sleep(Duration::from_millis(700));
        let mut k = server.lock().unwrap().take().unwrap();
        k.0.kill().unwrap();
        k.0.wait().unwrap();
    });
    let _server = serve(&sock, &url);
    let acked = acked.into_inner().unwrap();
    let mut checked = 0;
    for (slot, c) in (0..CLIENTS).zip(0u64..) {
        let mut cl = Client::unix(&sock, &format!("vm{c}")).unwrap();
        let pool = cl.new_pool(PERS, 7).unwrap();
        let mut out = [0u8; 4096];
        for i in 0..INDICES {
            let v = acked[slot][i as usize];
            assert!(v > 0, "client {c} index {i} was never acknowledged");
            assert!(
                cl.get(pool, Oid([c, 0, 0]), i, &mut out).unwrap(),
                "client {c} index {i} (acknowledged version {v}) lost"
            );
            // The acknowledged version, or the one in flight at the kill (stored, not yet
            // acknowledged): never an older one, never a torn page.
            let got = u64::from_le_bytes(out[12..20].try_into().unwrap());
            assert!(
                got == v || got == v + 1,
                "client {c} index {i}: {got} after {v}"
            );
            assert_eq!(out, page(c, i, got));
            checked += 1;
        }
    }
    assert_eq!(checked, CLIENTS * INDICES as usize);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn serve_refuses_bad_backends_clearly() {
    let out = Command::new(env!("CARGO_BIN_EXE_memvisor"))
        .args([
            "tmem",
            "serve",
            "--unix",
            "/tmp/x.sock",
            "--persistent",
            "nonsense",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("use local, memcached=") && err.contains("redis="),
        "{err}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_memvisor"))
        .args(["tmem", "serve"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("--unix PATH, --tcp ADDR"));
}
