//! The tmem server over real sockets: its client, and hostile clients that break the protocol.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use common::page;
use tmem::client::Client;
use tmem::proto::{self, MAGIC, VERSION};
use tmem::{Kind, Limits, LocalBackend, Oid, PoolFlags, Tmem};

const PERS: PoolFlags = PoolFlags {
    kind: Kind::Persistent,
    shared: false,
};
const EPH: PoolFlags = PoolFlags {
    kind: Kind::Ephemeral,
    shared: false,
};

fn server(limits: Limits) -> (Arc<Tmem>, std::path::PathBuf, String) {
    let store = pagestore::PageStore::new(pagestore::Config::default()).unwrap();
    let t = Arc::new(Tmem::with_backend(
        Arc::new(LocalBackend::new(store, 10_000, 10_000)),
        limits,
    ));
    let dir = std::env::temp_dir().join(format!("tmem-server-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join(format!("s{}.sock", rand_tag()));
    tmem::server::serve_unix(Arc::clone(&t), &sock).unwrap();
    let tcp = tmem::server::serve_tcp(Arc::clone(&t), "127.0.0.1:0").unwrap();
    (t, sock, tcp.to_string())
}

fn rand_tag() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

#[test]
fn the_client_round_trips_over_unix_and_tcp() {
    let (_t, sock, tcp) = server(Limits::default());
    for mut c in [
        Client::unix(&sock, "u").unwrap(),
        Client::tcp(&tcp, "t").unwrap(),
    ] {
        let p = c.new_pool(PERS, 1).unwrap();
        let e = c.new_pool(EPH, 0).unwrap();
        let mut out = [0u8; 4096];
        for i in 0..50 {
            assert!(c.put(p, Oid([1, 2, 3]), i, &page(1, i, 0)).unwrap());
            assert!(c.put(e, Oid([1, 2, 3]), i, &page(2, i, 0)).unwrap());
        }
        for i in 0..50 {
            assert!(c.get(p, Oid([1, 2, 3]), i, &mut out).unwrap());
            assert_eq!(out, page(1, i, 0));
            assert!(c.get(e, Oid([1, 2, 3]), i, &mut out).unwrap());
            assert_eq!(out, page(2, i, 0));
            assert!(!c.get(e, Oid([1, 2, 3]), i, &mut out).unwrap(), "exclusive");
        }
        assert!(c.flush_page(p, Oid([1, 2, 3]), 0).unwrap());
        assert!(!c.get(p, Oid([1, 2, 3]), 0, &mut out).unwrap());
        c.flush_object(p, Oid([1, 2, 3])).unwrap();
        assert!(!c.get(p, Oid([1, 2, 3]), 1, &mut out).unwrap());
        let stats = c.stats().unwrap();
        let get = |n: &str| stats.iter().find(|(k, _)| *k == n).unwrap().1;
        assert!(get("puts") >= 100 && get("hits") >= 100, "{stats:?}");
        // An error that leaves the connection usable: a pool that is not ours.
        let err = c.destroy_pool(tmem::PoolId(4242)).unwrap_err();
        assert!(err.to_string().contains("no pool 4242"), "{err}");
        c.destroy_pool(p).unwrap();
    }
}

/// Sends raw bytes, returns what the server answered before closing (or timing out).
fn raw(sock: &std::path::Path, bytes: &[u8]) -> Vec<u8> {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    s.write_all(bytes).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

fn frame(op: u8, body: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    proto::write_frame(&mut f, op, &[body], &mut Vec::new()).unwrap();
    f
}

fn error_text(reply: &[u8]) -> String {
    assert!(reply.len() >= 8, "no reply: {reply:?}");
    assert_eq!(reply[3], 2, "an error status: {reply:?}");
    String::from_utf8_lossy(&reply[8..]).into_owned()
}

#[test]
fn hostile_clients_get_errors_and_others_keep_their_pages() {
    let (t, sock, _) = server(Limits::default());
    let mut good = Client::unix(&sock, "good").unwrap();
    let p = good.new_pool(PERS, 9).unwrap();
    assert!(good.put(p, Oid([9, 9, 9]), 1, &page(9, 1, 0)).unwrap());

    // Bad magic, wrong version, a body over the limit: an error reply, then closed.
    assert!(error_text(&raw(&sock, b"XX\x01\x01\0\0\0\0")).contains("magic"));
    let mut v9 = frame(1, b"x");
    v9[2] = 9;
    assert!(error_text(&raw(&sock, &v9)).contains("version 9"));
    let mut huge = frame(1, b"x");
    huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(error_text(&raw(&sock, &huge)).contains("at most"));
    // Anything before HELLO; an unknown op; a short page.
    assert!(error_text(&raw(&sock, &frame(5, &[0; 32]))).contains("HELLO first"));
    let hello = frame(1, b"evil");
    let mut bad = hello.clone();
    bad.extend(frame(99, b""));
    let reply = raw(&sock, &bad);
    assert!(error_text(&reply[12..]).contains("unknown op 99"));
    let mut short = hello.clone();
    short.extend(frame(4, &[0; 100]));
    let reply = raw(&sock, &short);
    assert!(error_text(&reply[12..]).contains("4128 bytes"));
    // An empty or overlong name.
    assert!(error_text(&raw(&sock, &frame(1, b""))).contains("name"));
    // A client that leaves mid-request: half a PUT, then gone.
    let mut torn = hello.clone();
    let mut put = frame(4, &[0u8; 32 + 4096]);
    put.truncate(1000);
    torn.extend(put);
    raw(&sock, &torn);
    // Random garbage.
    let mut x = 0x1234_5678_u64;
    for _ in 0..50 {
        let junk: Vec<u8> = (0..64)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()[0]
            })
            .collect();
        raw(&sock, &[&MAGIC[..], &[VERSION], &junk].concat());
    }
    // The good client's page is intact and its connection still works.
    let mut out = [0u8; 4096];
    assert!(good.get(p, Oid([9, 9, 9]), 1, &mut out).unwrap());
    assert_eq!(out, page(9, 1, 0));
    // The hostile clients were all disconnected: only the good one is left.
    let start = std::time::Instant::now();
    while t.stats().unwrap().clients != 1 {
        assert!(start.elapsed().as_secs() < 5, "{:?}", t.stats().unwrap());
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[test]
fn per_client_limits_hold_over_the_wire() {
    let (_t, sock, _) = server(Limits {
        clients: 2,
        pools_per_client: 1,
        persistent_pages_per_client: 3,
    });
    let mut a = Client::unix(&sock, "a").unwrap();
    let p = a.new_pool(PERS, 1).unwrap();
    let e = a.new_pool(EPH, 0).unwrap_err();
    assert!(e.to_string().contains("too many pools"), "{e}");
    for i in 0..3 {
        assert!(a.put(p, Oid::default(), i, &page(0, i, 0)).unwrap());
    }
    assert!(
        !a.put(p, Oid::default(), 3, &page(0, 3, 0)).unwrap(),
        "quota"
    );
    let _b = Client::unix(&sock, "b").unwrap();
    let e = Client::unix(&sock, "c").unwrap_err();
    assert!(e.to_string().contains("too many clients"), "{e}");
}

#[test]
fn idle_connections_cannot_pile_up() {
    let (_t, sock, _) = server(Limits {
        clients: 2,
        ..Limits::default()
    });
    // Connections that never say HELLO: the client limit plus 64 are let in; the rest are
    // closed at once.
    let conns: Vec<UnixStream> = (0..2 + 64 + 5)
        .map(|_| UnixStream::connect(&sock).unwrap())
        .collect();
    // The acceptor closes the extra ones as it goes; give it a moment (well inside the
    // 10 s that the others have to say HELLO).
    std::thread::sleep(std::time::Duration::from_millis(500));
    let mut closed = 0;
    for mut c in conns {
        c.set_nonblocking(true).unwrap();
        let mut b = [0u8; 1];
        if matches!(c.read(&mut b), Ok(0)) {
            closed += 1;
        }
    }
    assert_eq!(closed, 5);
}
