//! The tmem semantics suite: every promise of docs/tmem.md, driven through [`Tmem`] over each
//! backend: local (the pagestore), memcached and Redis, the last two real servers.

mod common;

use std::sync::Arc;

use common::{page, stamp};
use tmem::{
    Backend, Kind, Limits, LocalBackend, MemcachedBackend, Oid, Page, PoolFlags, RedisBackend,
    Tmem, TmemError,
};

const EPH_PRIVATE: PoolFlags = PoolFlags {
    kind: Kind::Ephemeral,
    shared: false,
};
const EPH_SHARED: PoolFlags = PoolFlags {
    kind: Kind::Ephemeral,
    shared: true,
};
const PERS_PRIVATE: PoolFlags = PoolFlags {
    kind: Kind::Persistent,
    shared: false,
};
const PERS_SHARED: PoolFlags = PoolFlags {
    kind: Kind::Persistent,
    shared: true,
};

fn oid(n: u64) -> Oid {
    Oid([n, !n, 0x7e3])
}

fn local(eph_cap: usize, pers_cap: usize) -> Arc<dyn Backend> {
    let store = pagestore::PageStore::new(pagestore::Config::default()).unwrap();
    Arc::new(LocalBackend::new(store, eph_cap, pers_cap))
}

/// A local backend whose puts are answered raw and encoded later by its maintenance thread.
fn local_write_back(eph_cap: usize, pers_cap: usize) -> Arc<dyn Backend> {
    let store = pagestore::PageStore::new(pagestore::Config::default()).unwrap();
    Arc::new(LocalBackend::new(store, eph_cap, pers_cap).with_write_back(1 << 20))
}

// ---- the promises, for any backend ----

/// Persistent: an accepted put comes back on every get until flushed; a second put replaces
/// the first; flush_page and flush_object remove; destroying the pool removes everything.
fn persistent_promises(t: &Tmem) {
    let c = t.connect("a").unwrap();
    let p = t.new_pool(c, PERS_PRIVATE, 1).unwrap();
    let mut out = [0u8; 4096];
    for i in 0..32 {
        assert!(t.put(c, p, oid(1), i, &page(1, i, 0)).unwrap());
    }
    for _ in 0..2 {
        for i in 0..32 {
            assert!(t.get(c, p, oid(1), i, &mut out).unwrap(), "page {i}");
            assert_eq!(stamp(&out), (1, i, 0));
        }
    }
    // put-put-get: the newer page, never the older.
    assert!(t.put(c, p, oid(1), 5, &page(1, 5, 1)).unwrap());
    assert!(t.get(c, p, oid(1), 5, &mut out).unwrap());
    assert_eq!(out, page(1, 5, 1));
    // flush_page: gone, and stays gone.
    assert!(t.flush_page(c, p, oid(1), 7).unwrap());
    assert!(!t.flush_page(c, p, oid(1), 7).unwrap());
    assert!(!t.get(c, p, oid(1), 7, &mut out).unwrap());
    // flush_object: every index of that object, no other object.
    assert!(t.put(c, p, oid(2), 0, &page(2, 0, 0)).unwrap());
    t.flush_object(c, p, oid(1)).unwrap();
    for i in 0..32 {
        assert!(!t.get(c, p, oid(1), i, &mut out).unwrap());
    }
    assert!(t.get(c, p, oid(2), 0, &mut out).unwrap());
    assert_eq!(out, page(2, 0, 0));
    // A zero page is a page like any other.
    assert!(t.put(c, p, oid(3), 0, &[0u8; 4096]).unwrap());
    assert!(t.get(c, p, oid(3), 0, &mut out).unwrap());
    assert_eq!(out, [0u8; 4096]);
    // Destroy: a new pool with the same UUID starts empty.
    t.destroy_pool(c, p).unwrap();
    let p = t.new_pool(c, PERS_PRIVATE, 1).unwrap();
    assert!(!t.get(c, p, oid(2), 0, &mut out).unwrap());
    t.destroy_pool(c, p).unwrap();
    t.disconnect(c).unwrap();
}

/// A persistent pool outlives its client's connection: the same name and UUID find its pages.
fn persistent_pool_outlives_its_connection(t: &Tmem) {
    let c = t.connect("swapper").unwrap();
    let p = t.new_pool(c, PERS_PRIVATE, 42).unwrap();
    assert!(t.put(c, p, oid(9), 3, &page(9, 3, 0)).unwrap());
    t.disconnect(c).unwrap();
    let c = t.connect("swapper").unwrap();
    let p = t.new_pool(c, PERS_PRIVATE, 42).unwrap();
    let mut out = [0u8; 4096];
    assert!(t.get(c, p, oid(9), 3, &mut out).unwrap());
    assert_eq!(out, page(9, 3, 0));
    // Another client with the same UUID has a pool of its own.
    let d = t.connect("other").unwrap();
    let q = t.new_pool(d, PERS_PRIVATE, 42).unwrap();
    assert!(!t.get(d, q, oid(9), 3, &mut out).unwrap());
    t.destroy_pool(d, q).unwrap();
    t.destroy_pool(c, p).unwrap();
}

/// A put refused for a client's quota leaves nothing under the key, not the older page.
fn refused_persistent_put_leaves_no_old_page(backend: Arc<dyn Backend>) {
    let t = Tmem::with_backend(
        backend,
        Limits {
            persistent_pages_per_client: 4,
            ..Limits::default()
        },
    );
    let c = t.connect("q").unwrap();
    let p = t.new_pool(c, PERS_PRIVATE, 7).unwrap();
    for i in 0..4 {
        assert!(t.put(c, p, oid(1), i, &page(1, i, 0)).unwrap());
    }
    assert!(
        !t.put(c, p, oid(1), 4, &page(1, 4, 0)).unwrap(),
        "over quota"
    );
    // At the quota a put over an existing key is refused too, and the old page goes.
    assert!(!t.put(c, p, oid(1), 2, &page(1, 2, 1)).unwrap());
    let mut out = [0u8; 4096];
    assert!(!t.get(c, p, oid(1), 2, &mut out).unwrap(), "no old page");
    // That freed a place: the next put is accepted.
    assert!(t.put(c, p, oid(1), 4, &page(1, 4, 0)).unwrap());
    assert!(t.stats().unwrap().puts_refused >= 2);
    t.destroy_pool(c, p).unwrap();
}

/// The quota counts pages of closed pools too: closing a pool and filling another does not
/// get round it; destroying one gives its pages' quota back.
fn quota_counts_closed_pools(backend: Arc<dyn Backend>) {
    let t = Tmem::with_backend(
        backend,
        Limits {
            persistent_pages_per_client: 3,
            ..Limits::default()
        },
    );
    let c = t.connect("q2").unwrap();
    let p = t.new_pool(c, PERS_PRIVATE, 1).unwrap();
    for i in 0..3 {
        assert!(t.put(c, p, oid(1), i, &page(1, i, 0)).unwrap());
    }
    t.disconnect(c).unwrap();
    let c = t.connect("q2").unwrap();
    let q = t.new_pool(c, PERS_PRIVATE, 2).unwrap();
    assert!(
        !t.put(c, q, oid(1), 0, &page(2, 0, 0)).unwrap(),
        "quota bypassed"
    );
    let p = t.new_pool(c, PERS_PRIVATE, 1).unwrap();
    t.destroy_pool(c, p).unwrap();
    assert!(t.put(c, q, oid(1), 0, &page(2, 0, 0)).unwrap());
    t.destroy_pool(c, q).unwrap();
}

/// Destroying a shared persistent pool while another client reopens it and puts: every put
/// acknowledged after the reopen is found (the destroy's flush never catches it).
fn destroy_and_reopen_race(t: &Tmem) {
    for round in 0..30u64 {
        let a = t.connect("a").unwrap();
        let b = t.connect("b").unwrap();
        let pa = t.new_pool(a, PERS_SHARED, 0x5a5a).unwrap();
        assert!(t.put(a, pa, oid(round), 0, &page(round, 0, 0)).unwrap());
        std::thread::scope(|s| {
            s.spawn(|| t.destroy_pool(a, pa).unwrap());
            s.spawn(|| {
                let pb = t.new_pool(b, PERS_SHARED, 0x5a5a).unwrap();
                assert!(t.put(b, pb, oid(round), 1, &page(round, 1, 0)).unwrap());
                let mut out = [0u8; 4096];
                assert!(
                    t.get(b, pb, oid(round), 1, &mut out).unwrap(),
                    "round {round}: an acknowledged page was flushed"
                );
                t.destroy_pool(b, pb).unwrap();
            });
        });
        t.disconnect(a).unwrap();
        t.disconnect(b).unwrap();
    }
}

/// Ephemeral private: a get returns the page and removes it (exclusive); put-put-get.
fn ephemeral_private_promises(t: &Tmem) {
    let c = t.connect("cache").unwrap();
    let p = t.new_pool(c, EPH_PRIVATE, 0).unwrap();
    let mut out = [0u8; 4096];
    assert!(t.put(c, p, oid(1), 0, &page(1, 0, 0)).unwrap());
    assert!(t.put(c, p, oid(1), 0, &page(1, 0, 1)).unwrap());
    assert!(t.get(c, p, oid(1), 0, &mut out).unwrap());
    assert_eq!(out, page(1, 0, 1), "the newer page");
    assert!(!t.get(c, p, oid(1), 0, &mut out).unwrap(), "exclusive get");
    // flush_object and flush_page.
    for i in 0..8 {
        assert!(t.put(c, p, oid(2), i, &page(2, i, 0)).unwrap());
    }
    t.flush_page(c, p, oid(2), 0).unwrap();
    assert!(!t.get(c, p, oid(2), 0, &mut out).unwrap());
    t.flush_object(c, p, oid(2)).unwrap();
    for i in 0..8 {
        assert!(!t.get(c, p, oid(2), i, &mut out).unwrap());
    }
    // A page put after a flush is found.
    assert!(t.put(c, p, oid(2), 3, &page(2, 3, 5)).unwrap());
    assert!(t.get(c, p, oid(2), 3, &mut out).unwrap());
    assert_eq!(out, page(2, 3, 5));
    t.destroy_pool(c, p).unwrap();
    t.disconnect(c).unwrap();
}

/// Shared pools: joined by UUID; a get leaves the page for the others; a put by one is seen
/// by all; other UUIDs and other kinds are other pools.
fn shared_pools(t: &Tmem, flags: PoolFlags) {
    let a = t.connect("a").unwrap();
    let b = t.connect("b").unwrap();
    let pa = t.new_pool(a, flags, 0xfeed).unwrap();
    let pb = t.new_pool(b, flags, 0xfeed).unwrap();
    let other = t.new_pool(b, flags, 0xbeef).unwrap();
    let mut out = [0u8; 4096];
    assert!(t.put(a, pa, oid(1), 1, &page(1, 1, 0)).unwrap());
    for _ in 0..2 {
        assert!(t.get(b, pb, oid(1), 1, &mut out).unwrap(), "non-exclusive");
        assert_eq!(out, page(1, 1, 0));
    }
    assert!(!t.get(b, other, oid(1), 1, &mut out).unwrap());
    assert!(t.put(b, pb, oid(1), 1, &page(1, 1, 1)).unwrap());
    assert!(t.get(a, pa, oid(1), 1, &mut out).unwrap());
    assert_eq!(out, page(1, 1, 1));
    // One member leaving does not take the pool's pages with it.
    t.destroy_pool(a, pa).unwrap();
    assert!(t.get(b, pb, oid(1), 1, &mut out).unwrap());
    t.destroy_pool(b, pb).unwrap();
    t.destroy_pool(b, other).unwrap();
}

/// A client cannot use a pool it is not in, nor a pool that does not exist.
fn foreign_and_unknown_pools_are_refused(t: &Tmem, flags: PoolFlags) {
    let a = t.connect("a").unwrap();
    let b = t.connect("b").unwrap();
    let pa = t.new_pool(a, flags, 5).unwrap();
    let mut out = [0u8; 4096];
    assert!(t.put(a, pa, oid(1), 0, &page(1, 0, 0)).unwrap());
    assert!(matches!(
        t.get(b, pa, oid(1), 0, &mut out),
        Err(TmemError::NoPool(_))
    ));
    assert!(matches!(
        t.put(b, pa, oid(1), 0, &page(6, 6, 6)),
        Err(TmemError::NoPool(_))
    ));
    assert!(matches!(
        t.flush_object(b, tmem::PoolId(9999), oid(1)),
        Err(TmemError::NoPool(9999))
    ));
    // b's attempts changed nothing of a's.
    assert!(t.get(a, pa, oid(1), 0, &mut out).unwrap());
    assert_eq!(out, page(1, 0, 0));
    t.destroy_pool(a, pa).unwrap();
}

/// After evictions: every get returns the latest page put under its key or misses, and once
/// a key has missed it misses until a new put (get-get coherency). Shared pool, so gets do
/// not remove.
fn coherent_through_evictions(t: &Tmem, pages: u32) {
    let c = t.connect("churn").unwrap();
    let p = t.new_pool(c, EPH_SHARED, 77).unwrap();
    let mut out = [0u8; 4096];
    for i in 0..pages {
        t.put(c, p, oid(u64::from(i % 16)), i, &page(1, i, 1))
            .unwrap();
    }
    let mut missed = Vec::new();
    for i in 0..pages {
        if t.get(c, p, oid(u64::from(i % 16)), i, &mut out).unwrap() {
            assert_eq!(stamp(&out), (1, i, 1), "stale or torn page");
        } else {
            missed.push(i);
        }
    }
    assert!(!missed.is_empty(), "the backend was meant to evict");
    for &i in &missed {
        assert!(!t.get(c, p, oid(u64::from(i % 16)), i, &mut out).unwrap());
    }
    // And a new put is found again.
    let i = missed[0];
    assert!(
        t.put(c, p, oid(u64::from(i % 16)), i, &page(1, i, 2))
            .unwrap()
    );
    assert!(t.get(c, p, oid(u64::from(i % 16)), i, &mut out).unwrap());
    assert_eq!(stamp(&out), (1, i, 2));
    t.destroy_pool(c, p).unwrap();
}

/// Several clients at once, each checking its own pages while the others churn: every get
/// returns exactly the page last put under that key.
fn concurrent_clients(t: &Tmem, flags: PoolFlags) {
    let clients = 4u64;
    std::thread::scope(|s| {
        for n in 0..clients {
            s.spawn(move || {
                let c = t.connect(&format!("worker{n}")).unwrap();
                let p = t.new_pool(c, flags, 1000 + u128::from(n)).unwrap();
                let mut out = [0u8; 4096];
                let mut version = [0u64; 64];
                for round in 1..=20u64 {
                    for i in 0..64u32 {
                        if (i as u64 + round + n).is_multiple_of(3) {
                            version[i as usize] = round;
                            assert!(t.put(c, p, oid(n), i, &page(n, i, round)).unwrap());
                        }
                    }
                    for i in 0..64u32 {
                        let v = version[i as usize];
                        let hit = t.get(c, p, oid(n), i, &mut out).unwrap();
                        if v == 0 {
                            assert!(!hit);
                        } else if hit {
                            assert_eq!(stamp(&out), (n, i, v));
                        } else {
                            assert!(
                                flags.kind == Kind::Ephemeral,
                                "persistent page {i} of client {n} lost"
                            );
                        }
                        if hit && flags.kind == Kind::Ephemeral && !flags.shared {
                            version[i as usize] = 0; // an exclusive get took it
                        }
                    }
                }
                t.destroy_pool(c, p).unwrap();
                t.disconnect(c).unwrap();
            });
        }
    });
}

/// Every persistent promise, on backends that `make(ephemeral_cap, persistent_cap)` builds.
fn persistent_suite(make: fn(usize, usize) -> Arc<dyn Backend>) {
    let t = || Tmem::with_backend(make(100_000, 100_000), Limits::default());
    persistent_promises(&t());
    persistent_pool_outlives_its_connection(&t());
    refused_persistent_put_leaves_no_old_page(make(100, 100));
    quota_counts_closed_pools(make(100, 100));
    destroy_and_reopen_race(&t());
}

// ---- each backend ----

mod local_backend {
    use super::*;

    fn t() -> Tmem {
        Tmem::with_backend(local(100_000, 100_000), Limits::default())
    }

    #[test]
    fn persistent() {
        persistent_suite(local);
    }

    #[test]
    fn persistent_capacity_refuses_new_keys_only() {
        let t = Tmem::with_backend(local(10, 3), Limits::default());
        let c = t.connect("x").unwrap();
        let p = t.new_pool(c, PERS_PRIVATE, 1).unwrap();
        for i in 0..3 {
            assert!(t.put(c, p, oid(1), i, &page(1, i, 0)).unwrap());
        }
        assert!(!t.put(c, p, oid(1), 3, &page(1, 3, 0)).unwrap());
        assert!(
            t.put(c, p, oid(1), 0, &page(1, 0, 1)).unwrap(),
            "replacing fits"
        );
        let mut out = [0u8; 4096];
        assert!(t.get(c, p, oid(1), 0, &mut out).unwrap());
        assert_eq!(out, page(1, 0, 1));
    }

    #[test]
    fn ephemeral() {
        ephemeral_private_promises(&t());
        shared_pools(&t(), EPH_SHARED);
        shared_pools(&t(), PERS_SHARED);
        foreign_and_unknown_pools_are_refused(&t(), EPH_PRIVATE);
    }

    #[test]
    fn evictions_are_lru_across_clients_and_coherent() {
        let t = Tmem::with_backend(local(256, 10), Limits::default());
        coherent_through_evictions(&t, 1000);
        assert!(t.stats().unwrap().ephemeral.evictions >= 744);
        // LRU across clients: a's page, read recently, survives b's flood; b's oldest do not.
        let a = t.connect("a").unwrap();
        let b = t.connect("b").unwrap();
        let pa = t.new_pool(a, EPH_SHARED, 1).unwrap();
        let pb = t.new_pool(b, EPH_SHARED, 2).unwrap();
        let mut out = [0u8; 4096];
        assert!(t.put(a, pa, oid(1), 0, &page(1, 0, 0)).unwrap());
        for i in 0..1000 {
            assert!(t.put(b, pb, oid(2), i, &page(2, i, 0)).unwrap());
            if i % 100 == 0 {
                assert!(
                    t.get(a, pa, oid(1), 0, &mut out).unwrap(),
                    "hot page evicted"
                );
            }
        }
        assert!(!t.get(b, pb, oid(2), 0, &mut out).unwrap());
        assert!(t.get(b, pb, oid(2), 999, &mut out).unwrap());
    }

    #[test]
    fn concurrent() {
        let t = t();
        concurrent_clients(&t, PERS_PRIVATE);
        concurrent_clients(&t, EPH_PRIVATE);
        let small = Tmem::with_backend(local(100, 10), Limits::default());
        concurrent_clients(&small, EPH_SHARED);
        // Everything flushed and destroyed: the store is empty again.
        let s = t.stats().unwrap();
        assert_eq!(s.persistent.pages, 0);
    }

    #[test]
    fn limits_per_client() {
        let t = Tmem::with_backend(
            local(10, 10),
            Limits {
                clients: 2,
                pools_per_client: 2,
                ..Limits::default()
            },
        );
        let a = t.connect("a").unwrap();
        t.new_pool(a, EPH_PRIVATE, 0).unwrap();
        t.new_pool(a, EPH_PRIVATE, 0).unwrap();
        assert!(matches!(
            t.new_pool(a, EPH_PRIVATE, 0),
            Err(TmemError::Limit(_))
        ));
        let _b = t.connect("b").unwrap();
        assert!(matches!(t.connect("c"), Err(TmemError::Limit(_))));
    }
}

/// The same promises with write-back on: every put is answered before it is encoded, and
/// the maintenance thread encodes and compacts while the clients go on.
mod local_write_back {
    use super::*;

    fn t() -> Tmem {
        Tmem::with_backend(local_write_back(100_000, 100_000), Limits::default())
    }

    #[test]
    fn persistent() {
        persistent_suite(local_write_back);
    }

    #[test]
    fn ephemeral() {
        ephemeral_private_promises(&t());
        shared_pools(&t(), EPH_SHARED);
        foreign_and_unknown_pools_are_refused(&t(), EPH_PRIVATE);
        coherent_through_evictions(
            &Tmem::with_backend(local_write_back(256, 10), Limits::default()),
            1000,
        );
    }

    #[test]
    fn concurrent() {
        let t = t();
        concurrent_clients(&t, PERS_PRIVATE);
        concurrent_clients(&t, EPH_PRIVATE);
        assert_eq!(t.stats().unwrap().persistent.pages, 0);
    }

    /// Pages answered raw are encoded once the puts stop: the bytes held fall to what
    /// inline encoding holds, and every page reads back the same before and after.
    #[test]
    fn pages_settle_after_a_burst_and_read_back_the_same() {
        let inline = Tmem::with_backend(local(100_000, 100_000), Limits::default());
        let wb = t();
        let mut held = Vec::new();
        for t in [&inline, &wb] {
            let c = t.connect("a").unwrap();
            let p = t.new_pool(c, PERS_PRIVATE, 1).unwrap();
            for i in 0..4000 {
                assert!(
                    t.put(
                        c,
                        p,
                        oid(u64::from(i % 7)),
                        i,
                        &page(u64::from(i % 50), i, 0)
                    )
                    .unwrap()
                );
            }
            let raw = t.stats().unwrap().persistent;
            let start = std::time::Instant::now();
            while t.stats().unwrap().persistent.pending > 0 {
                assert!(start.elapsed().as_secs() < 30, "never settled");
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            let settled = t.stats().unwrap().persistent;
            let mut out = [0u8; 4096];
            for i in 0..4000 {
                assert!(t.get(c, p, oid(u64::from(i % 7)), i, &mut out).unwrap());
                assert_eq!(out, page(u64::from(i % 50), i, 0), "page {i}");
            }
            held.push((raw.bytes, settled.bytes));
        }
        // (How many pages were still raw when the puts ended depends on how much of a core
        // the maintenance thread found meanwhile.)
        let ((_, inline_bytes), (wb_raw, wb_settled)) = (held[0], held[1]);
        assert!(wb_raw >= wb_settled, "{held:?}");
        assert!(
            wb_settled as f64 <= 1.1 * inline_bytes as f64,
            "settled and compacted, write-back holds what inline does: {held:?}"
        );
    }
}

mod memcached_backend {
    use super::*;

    fn t(server: &common::Server) -> Tmem {
        let mc: Arc<dyn Backend> = Arc::new(MemcachedBackend::connect(&server.addr).unwrap());
        Tmem::with_backend(mc, Limits::default())
    }

    #[test]
    fn ephemeral() {
        let server = common::memcached(64);
        ephemeral_private_promises(&t(&server));
        shared_pools(&t(&server), EPH_SHARED);
        foreign_and_unknown_pools_are_refused(&t(&server), EPH_PRIVATE);
    }

    #[test]
    fn persistent_pools_are_refused() {
        let server = common::memcached(16);
        let t = t(&server);
        let c = t.connect("a").unwrap();
        let e = t.new_pool(c, PERS_PRIVATE, 1).unwrap_err();
        assert!(matches!(e, TmemError::Unsupported { .. }), "{e}");
        assert!(e.to_string().contains("memcached"), "{e}");
    }

    #[test]
    fn evictions_are_coherent() {
        // 16 MiB of memcached, 40 MiB of pages: memcached evicts.
        let server = common::memcached(16);
        let t = t(&server);
        coherent_through_evictions(&t, 10_000);
        assert!(t.stats().unwrap().ephemeral.evictions > 0);
    }

    #[test]
    fn concurrent() {
        let server = common::memcached(64);
        let t = t(&server);
        concurrent_clients(&t, EPH_PRIVATE);
        concurrent_clients(&t, EPH_SHARED);
    }

    #[test]
    fn a_dead_server_is_an_error_not_a_panic() {
        let server = common::memcached(16);
        let t = t(&server);
        let c = t.connect("a").unwrap();
        let p = t.new_pool(c, EPH_PRIVATE, 0).unwrap();
        drop(server);
        let e = t.put(c, p, oid(1), 0, &page(1, 0, 0)).unwrap_err();
        assert!(e.to_string().contains("memcached"), "{e}");
        assert!(MemcachedBackend::connect("unix:/nonexistent/socket").is_err());
    }
}

mod redis_backend {
    use super::*;

    fn t(server: &common::Server) -> Tmem {
        let r: Arc<dyn Backend> = Arc::new(RedisBackend::connect(&server.addr).unwrap());
        Tmem::with_backend(r, Limits::default())
    }

    #[test]
    fn persistent() {
        let server = common::redis();
        persistent_promises(&t(&server));
        persistent_pool_outlives_its_connection(&t(&server));
        let r: Arc<dyn Backend> = Arc::new(RedisBackend::connect(&server.addr).unwrap());
        refused_persistent_put_leaves_no_old_page(r);
        let r: Arc<dyn Backend> = Arc::new(RedisBackend::connect(&server.addr).unwrap());
        quota_counts_closed_pools(r);
        destroy_and_reopen_race(&t(&server));
        shared_pools(&t(&server), PERS_SHARED);
        foreign_and_unknown_pools_are_refused(&t(&server), PERS_PRIVATE);
    }

    #[test]
    fn durability_is_stated() {
        let server = common::redis();
        let r = RedisBackend::connect(&server.addr).unwrap();
        assert_eq!(r.durability(), "appendonly yes, appendfsync always");
        assert!(r.name().contains("appendfsync always"));
    }

    #[test]
    fn ephemeral() {
        let server = common::redis();
        ephemeral_private_promises(&t(&server));
        shared_pools(&t(&server), EPH_SHARED);
    }

    #[test]
    fn concurrent() {
        let server = common::redis();
        let t = t(&server);
        concurrent_clients(&t, PERS_PRIVATE);
        concurrent_clients(&t, PERS_SHARED);
    }

    #[test]
    fn a_persistent_pool_survives_a_new_tmem_on_the_same_redis() {
        let server = common::redis();
        {
            let t = t(&server);
            let c = t.connect("vm1").unwrap();
            let p = t.new_pool(c, PERS_PRIVATE, 3).unwrap();
            for i in 0..10 {
                assert!(t.put(c, p, oid(4), i, &page(4, i, 0)).unwrap());
            }
        }
        let t = t(&server);
        let c = t.connect("vm1").unwrap();
        let p = t.new_pool(c, PERS_PRIVATE, 3).unwrap();
        let mut out: Page = [0u8; 4096];
        for i in 0..10 {
            assert!(t.get(c, p, oid(4), i, &mut out).unwrap());
            assert_eq!(out, page(4, i, 0));
        }
    }
}
