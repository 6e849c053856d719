//! `memvisor tmem serve` and `memvisor bench tmem`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use pagestore::{Config, Page, PageStore};
use serde::Serialize;
use tmem::client::Client;
use tmem::{Backend, Kind, Limits, LocalBackend, MemcachedBackend, Oid, PoolFlags, RedisBackend};

/// Where a kind of pool is held: `local`, `memcached=ADDR` or `redis=URL`.
pub fn backend(
    spec: &str,
    cfg: &Config,
    cap_pages: usize,
    write_back: usize,
) -> Result<Arc<dyn Backend>> {
    Ok(match spec.split_once('=') {
        None if spec == "local" => Arc::new(
            LocalBackend::new(PageStore::new(*cfg)?, cap_pages, cap_pages)
                .with_write_back(write_back),
        ),
        Some(("memcached", addr)) => Arc::new(MemcachedBackend::connect(addr)?),
        Some(("redis", url)) => Arc::new(RedisBackend::connect(url)?),
        _ => bail!(
            "backend {spec:?}: use local, memcached=unix:PATH or memcached=HOST:PORT, or redis=redis://HOST:PORT/ or redis=redis+unix:///PATH"
        ),
    })
}

/// The serve command's settings.
pub struct Serve {
    pub unix: Option<PathBuf>,
    pub tcp: Option<String>,
    pub ephemeral: String,
    pub persistent: String,
    pub pages: usize,
    /// Pages the local backend may hold raw before encoding them (0: encode inline).
    pub write_back: usize,
    pub limits: Limits,
}

/// Serves until the process is killed.
pub fn serve(s: &Serve, cfg: &Config) -> Result<()> {
    if s.unix.is_none() && s.tcp.is_none() {
        bail!("give --unix PATH, --tcp ADDR, or both");
    }
    // One local backend holds both kinds when both are local, so one LRU and one store.
    let eph = backend(&s.ephemeral, cfg, s.pages, s.write_back)?;
    let pers = if s.persistent == s.ephemeral && s.ephemeral == "local" {
        Arc::clone(&eph)
    } else {
        backend(&s.persistent, cfg, s.pages, s.write_back)?
    };
    if !eph.supports(Kind::Ephemeral) {
        bail!("{} cannot hold ephemeral pools", eph.name());
    }
    if !pers.supports(Kind::Persistent) {
        bail!(
            "{} cannot hold persistent pools (memcached may evict): use local or redis=URL",
            pers.name()
        );
    }
    eprintln!(
        "memvisor tmem: ephemeral pools on {}, persistent pools on {}",
        eph.name(),
        pers.name()
    );
    let t = Arc::new(tmem::Tmem::new(eph, pers, s.limits));
    if let Some(p) = &s.unix {
        tmem::server::serve_unix(Arc::clone(&t), p)
            .with_context(|| format!("listening on {}", p.display()))?;
        eprintln!("memvisor tmem: listening on unix:{}", p.display());
    }
    if let Some(a) = &s.tcp {
        let bound = tmem::server::serve_tcp(Arc::clone(&t), a)
            .with_context(|| format!("listening on {a}"))?;
        eprintln!("memvisor tmem: listening on {bound}");
    }
    loop {
        std::thread::park();
    }
}

/// Prints a server's statistics.
pub fn stats(addr: &str) -> Result<()> {
    let mut c =
        Client::connect(addr, "memvisor-stats").with_context(|| format!("connecting to {addr}"))?;
    for (k, v) in c.stats()? {
        println!("{k:<22} {v}");
    }
    Ok(())
}

// ---- the benchmark ----

/// A server process the bench started; killed on drop.
struct Proc {
    child: Child,
    dir: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// User plus system CPU seconds of every thread of process `pid` so far.
pub(crate) fn cpu_of(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // The fields after the command name (which may hold spaces) in its parentheses.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    (ticks(11) + ticks(12)) / hz
}

/// Resident set of process `pid`, bytes.
pub(crate) fn rss_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Waits until a server accepts connections on `p` (its socket file appears at bind(), a
/// moment before listen(), and a connect in between is refused).
fn wait_socket(p: &Path, what: &str) -> Result<()> {
    let start = Instant::now();
    while std::os::unix::net::UnixStream::connect(p).is_err() {
        if start.elapsed() > Duration::from_secs(10) {
            bail!("{what} did not come up at {}", p.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

fn start(what: &str, dir: PathBuf, cmd: &mut Command, sock: &Path) -> Result<Proc> {
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {what} (apt-get install memcached redis-server)"))?;
    let p = Proc { child, dir };
    wait_socket(sock, what)?;
    Ok(p)
}

fn tempdir(tag: &str) -> Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("memvisor-bench-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

/// One client's connection to a target.
trait Conn: Send {
    fn put(&mut self, i: u32, p: &Page) -> Result<()>;
    fn get(&mut self, i: u32, out: &mut Page) -> Result<bool>;
    fn flush(&mut self, i: u32) -> Result<()>;
}

struct TmemConn {
    c: Client,
    pool: tmem::PoolId,
}

impl Conn for TmemConn {
    fn put(&mut self, i: u32, p: &Page) -> Result<()> {
        if !self.c.put(self.pool, Oid::default(), i, p)? {
            bail!("the tmem server refused a put");
        }
        Ok(())
    }
    fn get(&mut self, i: u32, out: &mut Page) -> Result<bool> {
        Ok(self.c.get(self.pool, Oid::default(), i, out)?)
    }
    fn flush(&mut self, i: u32) -> Result<()> {
        self.c.flush_page(self.pool, Oid::default(), i)?;
        Ok(())
    }
}

/// memcached straight: set, get and delete of the same pages over its text protocol.
struct McConn {
    b: MemcachedBackend,
    ns: u128,
}

impl McConn {
    fn key(&self, i: u32) -> tmem::Key {
        tmem::Key {
            ns: self.ns,
            kind: Kind::Ephemeral,
            oid: Oid::default(),
            index: i,
        }
    }
}

impl Conn for McConn {
    fn put(&mut self, i: u32, p: &Page) -> Result<()> {
        if self.b.put(&self.key(i), p)? == tmem::Put::Refused {
            bail!("memcached refused a set");
        }
        Ok(())
    }
    fn get(&mut self, i: u32, out: &mut Page) -> Result<bool> {
        Ok(self.b.get(&self.key(i), out, false)?)
    }
    fn flush(&mut self, i: u32) -> Result<()> {
        self.b.flush_page(&self.key(i))?;
        Ok(())
    }
}

/// Redis straight: SET, GET and DEL of the same pages.
struct RedisConn {
    c: redis::Connection,
    prefix: String,
}

impl Conn for RedisConn {
    fn put(&mut self, i: u32, p: &Page) -> Result<()> {
        redis::cmd("SET")
            .arg(format!("{}{i}", self.prefix))
            .arg(&p[..])
            .query::<()>(&mut self.c)?;
        Ok(())
    }
    fn get(&mut self, i: u32, out: &mut Page) -> Result<bool> {
        let v: Option<Vec<u8>> = redis::cmd("GET")
            .arg(format!("{}{i}", self.prefix))
            .query(&mut self.c)?;
        match v {
            Some(v) if v.len() == out.len() => {
                out.copy_from_slice(&v);
                Ok(true)
            }
            Some(_) => bail!("Redis returned a page of the wrong size"),
            None => Ok(false),
        }
    }
    fn flush(&mut self, i: u32) -> Result<()> {
        redis::cmd("DEL")
            .arg(format!("{}{i}", self.prefix))
            .query::<()>(&mut self.c)?;
        Ok(())
    }
}

/// One operation's figures over all clients.
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct OpFigures {
    /// Operations per second, all clients together.
    pub ops_per_s: f64,
    /// Median latency, microseconds.
    pub p50_us: f64,
    /// 99th percentile latency, microseconds.
    pub p99_us: f64,
    /// The server process's CPU time per operation, microseconds (all its threads, user and
    /// system; 10 ms clock ticks, so a rough figure on short phases).
    pub server_cpu_us: f64,
}

/// One target's figures (medians over the runs).
#[derive(Debug, Clone, Serialize)]
pub struct TargetFigures {
    /// What was measured.
    pub name: String,
    /// 4 KiB puts.
    pub put: OpFigures,
    /// 4 KiB gets (each checked byte for byte).
    pub get: OpFigures,
    /// Flushes of one page.
    pub flush: OpFigures,
    /// Bytes the server says it holds for the pages, when every page is in.
    pub held_bytes: u64,
    /// Growth of the server process's resident set over the same time.
    pub rss_growth_bytes: u64,
    /// Milliseconds from the last put's answer until the server had encoded every page it
    /// took raw (write-back); 0 for a server that encodes before it answers.
    pub settle_ms: f64,
    /// Puts per second over the runs: min and max.
    pub put_spread: (f64, f64),
    /// Gets per second over the runs: min and max.
    pub get_spread: (f64, f64),
}

/// The whole bench.
#[derive(Debug, Serialize)]
pub struct TmemBench {
    /// Pages used.
    pub pages: usize,
    /// Where they came from.
    pub sources: Vec<String>,
    /// Clients at once.
    pub clients: usize,
    /// Runs per target.
    pub runs: usize,
    /// The tmem server's write-back limit, in pages (0: it encodes before it answers).
    pub write_back: usize,
    /// The targets.
    pub targets: Vec<TargetFigures>,
    /// Redis's durability setting during the bench.
    pub redis_durability: String,
}

fn percentile(sorted: &[f64], per_mille: usize) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[(sorted.len() - 1) * per_mille / 1000]
}

/// One operation of a phase: on a connection, page number, its contents, a buffer.
type PhaseOp = dyn Fn(&mut dyn Conn, u32, &Page, &mut Page) -> Result<()> + Sync;

/// Runs one phase on every client at once; returns the op's figures.
fn phase(
    conns: &mut [Box<dyn Conn>],
    pages: &[Page],
    server_pid: u32,
    op: &PhaseOp,
) -> Result<OpFigures> {
    let n = conns.len();
    let cpu0 = cpu_of(server_pid);
    let start = Instant::now();
    let lat: Vec<Vec<f64>> = std::thread::scope(|s| {
        let handles: Vec<_> = conns
            .iter_mut()
            .enumerate()
            .map(|(c, conn)| {
                s.spawn(move || -> Result<Vec<f64>> {
                    let mut out = [0u8; 4096];
                    let mut l = Vec::with_capacity(pages.len() / n + 1);
                    for (i, p) in pages.iter().enumerate().skip(c).step_by(n) {
                        let t = Instant::now();
                        op(
                            &mut **conn,
                            u32::try_from(i).expect("few pages"),
                            p,
                            &mut out,
                        )?;
                        l.push(t.elapsed().as_secs_f64() * 1e6);
                    }
                    Ok(l)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("bench client thread"))
            .collect::<Result<Vec<_>>>()
    })?;
    let secs = start.elapsed().as_secs_f64();
    let cpu = cpu_of(server_pid) - cpu0;
    let mut all: Vec<f64> = lat.into_iter().flatten().collect();
    all.sort_by(f64::total_cmp);
    Ok(OpFigures {
        server_cpu_us: cpu * 1e6 / all.len().max(1) as f64,
        ops_per_s: all.len() as f64 / secs,
        p50_us: percentile(&all, 500),
        p99_us: percentile(&all, 990),
    })
}

fn median_by(v: &mut [OpFigures], f: fn(&OpFigures) -> f64) -> OpFigures {
    v.sort_by(|a, b| f(a).total_cmp(&f(b)));
    v[v.len() / 2]
}

/// Makes client `c`'s connection for run `r`.
type Connect = Box<dyn Fn(usize, usize) -> Result<Box<dyn Conn>>>;

/// One thing measured: a server, how to connect to it, how to ask what it holds, and the
/// figures of each run.
struct Target {
    name: String,
    pid: u32,
    connect: Connect,
    held: Box<dyn FnMut() -> Result<u64>>,
    /// Pages the server took raw and has not encoded yet, for one that defers (write-back).
    pending: Option<Box<dyn FnMut() -> Result<u64>>>,
    /// What the server held and its RSS before the first run: a server that keeps freed
    /// memory for reuse (memcached's slabs) then shows the same figure on every run.
    base: (u64, u64),
    puts: Vec<OpFigures>,
    gets: Vec<OpFigures>,
    flushes: Vec<OpFigures>,
    held_bytes: Vec<u64>,
    rss_growth: Vec<u64>,
    settle_ms: Vec<f64>,
}

impl Target {
    fn new(
        name: &str,
        pid: u32,
        connect: Connect,
        mut held: Box<dyn FnMut() -> Result<u64>>,
    ) -> Result<Target> {
        let base = (held()?, rss_of(pid));
        Ok(Target {
            name: name.to_owned(),
            pid,
            connect,
            held,
            pending: None,
            base,
            puts: Vec::new(),
            gets: Vec::new(),
            flushes: Vec::new(),
            held_bytes: Vec::new(),
            rss_growth: Vec::new(),
            settle_ms: Vec::new(),
        })
    }

    /// Waits (up to a minute) until the server has encoded every page it took raw; returns
    /// the seconds waited and the server's CPU seconds meanwhile.
    fn settle(&mut self) -> Result<(f64, f64)> {
        let Some(pending) = &mut self.pending else {
            return Ok((0.0, 0.0));
        };
        let (start, cpu0) = (Instant::now(), cpu_of(self.pid));
        while pending()? > 0 {
            if start.elapsed() > Duration::from_secs(60) {
                bail!("the server still had pages to encode a minute after the puts");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok((start.elapsed().as_secs_f64(), cpu_of(self.pid) - cpu0))
    }

    /// One run: every page put, got back (checked byte for byte) and flushed.
    fn run(&mut self, pages: &[Page], clients: usize, r: usize) -> Result<()> {
        let mut conns = (0..clients)
            .map(|c| (self.connect)(c, r))
            .collect::<Result<Vec<_>>>()?;
        let pid = self.pid;
        let mut put = phase(&mut conns, pages, pid, &|c, i, p, _| c.put(i, p))?;
        // Work deferred past the answer is still the put's: wait for it, and charge its CPU
        // to the puts. The bytes held are taken once it is done.
        let (secs, cpu) = self.settle()?;
        put.server_cpu_us += cpu * 1e6 / pages.len().max(1) as f64;
        self.settle_ms.push(secs * 1e3);
        self.puts.push(put);
        self.rss_growth
            .push(rss_of(pid).saturating_sub(self.base.1));
        self.held_bytes
            .push((self.held)()?.saturating_sub(self.base.0));
        self.gets
            .push(phase(&mut conns, pages, pid, &|c, i, p, out| {
                if !c.get(i, out)? {
                    bail!("page {i} is missing");
                }
                if out != p {
                    bail!("page {i} came back different");
                }
                Ok(())
            })?);
        self.flushes
            .push(phase(&mut conns, pages, pid, &|c, i, _, _| c.flush(i))?);
        Ok(())
    }

    fn figures(mut self) -> TargetFigures {
        let spread = |v: &[OpFigures]| {
            let ops = v.iter().map(|f| f.ops_per_s);
            (
                ops.clone().fold(f64::INFINITY, f64::min),
                ops.fold(0.0, f64::max),
            )
        };
        self.held_bytes.sort_unstable();
        self.rss_growth.sort_unstable();
        self.settle_ms.sort_by(f64::total_cmp);
        TargetFigures {
            put_spread: spread(&self.puts),
            get_spread: spread(&self.gets),
            put: median_by(&mut self.puts, |f| f.ops_per_s),
            get: median_by(&mut self.gets, |f| f.ops_per_s),
            flush: median_by(&mut self.flushes, |f| f.ops_per_s),
            held_bytes: self.held_bytes[self.held_bytes.len() / 2],
            rss_growth_bytes: self.rss_growth[self.rss_growth.len() / 2],
            settle_ms: self.settle_ms[self.settle_ms.len() / 2],
            name: self.name,
        }
    }
}

fn stat(c: &mut Client, name: &str) -> Result<u64> {
    Ok(c.stats()?
        .into_iter()
        .find(|(k, _)| *k == name)
        .map_or(0, |(_, v)| v))
}

/// Runs the bench on `pages` with `clients` clients, `runs` runs per target. Every server is
/// up for the whole bench and the runs go round the targets in turn, so a slow moment of
/// the machine falls on all of them alike.
pub fn bench(
    pages: &[Page],
    sources: Vec<String>,
    clients: usize,
    runs: usize,
    write_back: usize,
    store_args: &[String],
) -> Result<TmemBench> {
    let mut targets = Vec::new();
    let mut procs = Vec::new();
    let mib = (pages.len() * 4096 * 3 / 2 / (1 << 20)).max(64);

    // memcached, with room for every page (nothing evicted), on a Unix socket.
    let dir = tempdir("memcached")?;
    let mc_sock = dir.join("mc.sock");
    let mc = start(
        "memcached",
        dir,
        Command::new("memcached").arg("-s").arg(&mc_sock).args([
            "-m",
            &mib.to_string(),
            "-t",
            "2",
            "-u",
            "root",
            "-c",
            "1024",
        ]),
        &mc_sock,
    )?;
    let mc_addr = format!("unix:{}", mc_sock.display());
    let mc_stats = MemcachedBackend::connect(&mc_addr)?;
    let addr = mc_addr.clone();
    targets.push(Target::new(
        "memcached, straight (set/get/delete)",
        mc.child.id(),
        Box::new(move |c, r| {
            Ok(Box::new(McConn {
                b: MemcachedBackend::connect(&addr)?,
                ns: u128::try_from(c + 1000 * r).expect("small"),
            }) as Box<dyn Conn>)
        }),
        Box::new(move || Ok(mc_stats.usage()?.bytes)),
    )?);
    procs.push(mc);

    // Redis, in memory (no persistence: its fastest), on a Unix socket.
    let dir = tempdir("redis")?;
    let r_sock = dir.join("redis.sock");
    let rd = start(
        "redis-server",
        dir.clone(),
        Command::new("redis-server")
            .args(["--port", "0", "--unixsocket"])
            .arg(&r_sock)
            .arg("--dir")
            .arg(&dir)
            .args(["--save", "", "--appendonly", "no"]),
        &r_sock,
    )?;
    let r_url = format!("redis+unix://{}", r_sock.display());
    let r_stats = RedisBackend::connect(&r_url)?;
    let redis_durability = r_stats.durability().to_owned();
    let url = r_url.clone();
    targets.push(Target::new(
        "Redis, straight (SET/GET/DEL)",
        rd.child.id(),
        Box::new(move |c, r| {
            let client = redis::Client::open(url.as_str())?;
            Ok(Box::new(RedisConn {
                c: client.get_connection()?,
                prefix: format!("b{r}:{c}:"),
            }) as Box<dyn Conn>)
        }),
        Box::new(move || Ok(r_stats.usage()?.bytes)),
    )?);
    procs.push(rd);

    // The tmem server, as a process of its own like the others, on each backend.
    let exe = std::env::current_exe()?;
    let persistent = PoolFlags {
        kind: Kind::Persistent,
        shared: false,
    };
    let configs = [
        (
            "tmem server, local pagestore (persistent pool)",
            "local".to_owned(),
            "local".to_owned(),
            persistent,
        ),
        (
            "tmem server -> memcached (shared ephemeral pool)",
            format!("memcached={mc_addr}"),
            "local".to_owned(),
            PoolFlags {
                kind: Kind::Ephemeral,
                shared: true,
            },
        ),
        (
            "tmem server -> Redis (persistent pool)",
            "local".to_owned(),
            format!("redis={r_url}"),
            persistent,
        ),
    ];
    for (name, eph, pers, flags) in configs {
        let dir = tempdir(&format!("tmem{}", targets.len()))?;
        let sock = dir.join("tmem.sock");
        let server = start(
            "memvisor tmem serve",
            dir,
            Command::new(&exe)
                .args(["tmem", "serve", "--unix"])
                .arg(&sock)
                .args(["--ephemeral", &eph, "--persistent", &pers])
                .args(["--pages", &(pages.len() * 2).to_string()])
                .args(["--write-back", &write_back.to_string()])
                .args(store_args),
            &sock,
        )?;
        let mut admin = Client::unix(&sock, "bench-admin")?;
        let mut watcher = Client::unix(&sock, "bench-settle")?;
        let field = if flags.kind == Kind::Persistent {
            "persistent_bytes"
        } else {
            "ephemeral_bytes"
        };
        // Behind a remote backend the pages sit in memcached or Redis as they are (their
        // own rows say what that costs); the tmem server's RSS growth is its own overhead.
        let remote = eph != "local" || pers != "local";
        targets.push(Target::new(
            name,
            server.child.id(),
            Box::new(move |c, r| {
                let mut cl = Client::unix(&sock, &format!("bench{c}"))?;
                let pool = cl.new_pool(flags, u128::try_from(c + 1000 * r).expect("small"))?;
                Ok(Box::new(TmemConn { c: cl, pool }) as Box<dyn Conn>)
            }),
            Box::new(move || {
                if remote {
                    Ok(0)
                } else {
                    stat(&mut admin, field)
                }
            }),
        )?);
        if let Some(t) = targets.last_mut() {
            t.pending = Some(Box::new(move || {
                let s = watcher.stats()?;
                Ok(s.iter()
                    .filter(|(k, _)| k.ends_with("_pending"))
                    .map(|(_, v)| v)
                    .sum())
            }));
        }
        procs.push(server);
    }
    for r in 0..runs {
        for t in &mut targets {
            t.run(pages, clients, r)
                .with_context(|| format!("measuring {}", t.name))?;
        }
    }
    drop(procs);
    Ok(TmemBench {
        pages: pages.len(),
        sources,
        clients,
        runs,
        write_back,
        targets: targets.into_iter().map(Target::figures).collect(),
        redis_durability,
    })
}

/// The bench as a table, with the ratios the issue asks for.
pub fn render(b: &TmemBench) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "pages: {} ({:.1} MiB) from {} source(s); {} clients at once; median of {} runs, taken in turn",
        b.pages,
        b.pages as f64 * 4096.0 / (1 << 20) as f64,
        b.sources.len(),
        b.clients,
        b.runs
    );
    let _ = writeln!(
        s,
        "\n{:<50} {:>16} {:>16} {:>11} {:>16} {:>16} {:>18}",
        "target (all on Unix sockets)",
        "put/s",
        "get/s",
        "flush/s",
        "put p50/p99 us",
        "get p50/p99 us",
        "srv cpu us/put,get"
    );
    for t in &b.targets {
        let _ = writeln!(
            s,
            "{:<50} {:>16} {:>16} {:>11.0} {:>16} {:>16} {:>18}",
            t.name,
            format!(
                "{:.0} ({:.0}-{:.0})",
                t.put.ops_per_s, t.put_spread.0, t.put_spread.1
            ),
            format!(
                "{:.0} ({:.0}-{:.0})",
                t.get.ops_per_s, t.get_spread.0, t.get_spread.1
            ),
            t.flush.ops_per_s,
            format!("{:.1}/{:.1}", t.put.p50_us, t.put.p99_us),
            format!("{:.1}/{:.1}", t.get.p50_us, t.get.p99_us),
            format!("{:.1}, {:.1}", t.put.server_cpu_us, t.get.server_cpu_us),
        );
    }
    let _ = writeln!(
        s,
        "\n{:<50} {:>14} {:>18}",
        "bytes held for the pages", "server's count", "server RSS growth"
    );
    for t in &b.targets {
        let held = if t.held_bytes == 0 {
            "(remote)".to_owned()
        } else {
            format!("{:.1} MiB", t.held_bytes as f64 / (1 << 20) as f64)
        };
        let _ = writeln!(
            s,
            "{:<50} {:>14} {:>14.1} MiB",
            t.name,
            held,
            t.rss_growth_bytes as f64 / (1 << 20) as f64
        );
    }
    let mc = b.targets.iter().find(|t| t.name.starts_with("memcached"));
    let tm = b
        .targets
        .iter()
        .find(|t| t.name.contains("local pagestore"));
    if let Some(tm) = tm
        && b.write_back > 0
    {
        let _ = writeln!(
            s,
            "\nthe tmem server takes up to {} pages raw and encodes them on an idle core: every page was encoded {:.0} ms after the last put (its CPU is in srv cpu us/put), before the bytes were counted",
            b.write_back, tm.settle_ms
        );
    }
    if let (Some(mc), Some(tm)) = (mc, tm) {
        let _ = writeln!(
            s,
            "\ntmem server (local) / memcached straight: puts {:.2}x, gets {:.2}x, bytes held {:.3} (RSS growth {:.3})",
            tm.put.ops_per_s / mc.put.ops_per_s,
            tm.get.ops_per_s / mc.get.ops_per_s,
            tm.held_bytes as f64 / mc.held_bytes.max(1) as f64,
            tm.rss_growth_bytes as f64 / mc.rss_growth_bytes.max(1) as f64,
        );
    }
    let _ = writeln!(
        s,
        "(Redis ran with {}; memcached's bytes are its slab memory, total_malloced)",
        b.redis_durability
    );
    s
}
