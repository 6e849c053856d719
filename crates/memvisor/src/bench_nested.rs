//! `memvisor bench nested-memory`: the homogeneous case of `bench memory` on live Linux guests.
//!
//! The nested harness (nested.rs) boots an outer Debian guest in QEMU's TCG emulator with
//! emulated SVM; inside it, a job script starts N `memvisor run` of Debian's kernel with the
//! same initramfs and the same workload, each its own process under one policy. Once every
//! guest has done its workload, the pager (or ksmd) gets a fixed window; then the figures are
//! read inside the outer guest (`memvisor stats --json` of each VM, KSM's counters, ksmd's
//! CPU) and printed on the outer console as `memvisor-bench: {json}` lines, which this side
//! parses. Each policy gets a fresh outer boot, so KSM's global counters start at zero.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Serialize};

use crate::images::{self, Cpio};
use crate::memimages;
use crate::memory::{Policy, RamStats};
use crate::nested::{self, Outer, OuterJob};

/// The experiment's settings.
#[derive(Debug, Clone)]
pub struct Bench {
    /// Inner guests per policy.
    pub guests: usize,
    /// Each inner guest's RAM, as `memvisor run --memory` takes it.
    pub memory: String,
    /// Seconds the pager or ksmd gets once every guest is ready.
    pub seconds: u64,
    /// The policies, each in a fresh outer guest.
    pub policies: Vec<Policy>,
    /// ksmd's pages_to_scan and sleep_millisecs.
    pub ksm: (u64, u64),
    /// Pager: seconds untouched before a page is cold.
    pub cold_secs: f64,
    /// Pager: its scanner's CPU budget, a fraction of one core.
    pub cpu_budget: f64,
    /// The outer guest's RAM in MiB.
    pub outer_mib: u32,
    /// Give up on one outer run after this long.
    pub timeout: Duration,
    /// All guests in one `memvisor run --copies N` (one pager, one store) instead of a
    /// process each.
    pub one_process: bool,
    /// Copy the outer console to stderr as it comes.
    pub verbose: bool,
}

impl Bench {
    /// The layout's name, as tables and JSON say it.
    pub fn layout(&self) -> &'static str {
        if self.one_process {
            "one process"
        } else {
            "a process per guest"
        }
    }

    /// `memvisor run` processes in the outer guest.
    fn units(&self) -> usize {
        if self.one_process { 1 } else { self.guests }
    }
}

/// Module trees of Debian's kernel package each inner guest carries as its files (a subset of
/// what `memimages::workload_data` unpacks): some 20 MiB, enough to be most of what a small
/// guest holds, little enough that three guests do their workload in a minute under TCG.
const DATA_TREES: [&str; 4] = ["drivers/usb", "lib", "crypto", "block"];

/// Text files of the package, as `memimages::workload_data` names them.
const DATA_FILES: [&str; 3] = ["config", "modules.order", "modules.builtin.modinfo"];

/// What each inner guest runs (`sh /workload`, from the busybox initramfs's /init): a small
/// file server's day, on the same real files in every guest and with no randomness, so the
/// guests differ only as real boots do (KASLR, timing). The files are in the page cache from
/// the initramfs; a mirror in tmpfs, their checksums and a listing are written; a process
/// holds the text results in anonymous memory. Then the ready marker, and the guest holds
/// still (the init would reboot if this returned).
const WORKLOAD: &str = r#"set -e
mount -t tmpfs -o size=90% tmpfs /srv
cp -a /data /srv/mirror
cd /data
find . -type f | sort | xargs md5sum > /srv/MD5SUMS
ls -lR /data /srv/mirror > /srv/index
cd /
awk '{line[NR] = $0} END {printf "" > "/tmp/held"; close("/tmp/held"); system("exec sleep 2147483647")}' /srv/MD5SUMS /srv/index /data/config /data/modules.order &
i=0
while [ ! -e /tmp/held ]; do
    i=$((i + 1))
    [ $i -le 600 ] || { echo "memvisor-bench-failed: the holder did not load its text"; exit 1; }
    usleep 100000
done
free | awk 'NR == 2 {print "memvisor-bench-ready: used " int($3 / 1024) " MiB, shared " int($5 / 1024) " MiB, cache " int($6 / 1024) " MiB"}'
while :; do sleep 3600; done
"#;

/// The outer guest's job: start the guests, wait for their markers, the window, the figures.
/// A unit is one `memvisor run` process (a guest each, or all guests with `--copies`); its
/// control socket is /tmp/vmU.sock and its stderr /tmp/vmU.log. `@NAME@` fields are filled in
/// by [`job_script`], `@LAYOUT@` with [`PROCESSES`] or [`ONE_PROCESS`].
const JOB: &str = r#"
# A heartbeat: an outer guest that stops printing it has stalled (see OUTER_APPEND).
( while :; do echo "@TICK@"; sleep 10; done ) &
mark() { echo "memvisor-bench: $*"; }
now() { cut -d' ' -f1 /proc/uptime; }
secs() { cut -d. -f1 /proc/uptime; }
@LAYOUT@
fail() {
    # What each guest printed last, what its VMM's threads wait in, and its pager's stats.
    for i in $(seq @GUESTS@); do
        tail -n 25 $(log_of $i) 2>/dev/null | tr -d '\r' | sed "s/^/memvisor-bench-log $i: /"
    done
    for u in $units; do
        tail -n 5 /tmp/vm$u.log 2>/dev/null | sed "s/^/memvisor-bench-log unit $u: /"
        for t in /proc/$(cat /tmp/vm$u.pid)/task/*; do
            echo "memvisor-bench-log unit $u: thread $(cat $t/comm) state $(cut -d' ' -f3 $t/stat) in $(cat $t/wchan), utime+stime $(cut -d' ' -f14,15 $t/stat) guest $(cut -d' ' -f43 $t/stat) $(cat $t/stack | tr '\n' ' ')"
        done 2>/dev/null
        /memvisor stats /tmp/vm$u.sock 2>&1 | sed "s/^/memvisor-bench-log unit $u: /"
    done
    echo "memvisor-bench-failed: $*"
    poweroff -f
}
# KSM and the pager both work in 4 KiB pages; a transparent huge page would make one touched
# page cost 2 MiB under none and KSM (the pager turns them off on guest RAM itself).
[ -w /sys/kernel/mm/transparent_hugepage/enabled ] && echo never > /sys/kernel/mm/transparent_hugepage/enabled
ksmd=
for p in /proc/[0-9]*; do
    [ "$(cat $p/comm 2>/dev/null)" = ksmd ] && ksmd=${p#/proc/}
done
# utime + stime, in USER_HZ (100 on x86).
ticks() { if [ -n "$ksmd" ]; then awk '{print $14 + $15}' /proc/$ksmd/stat; else echo null; fi; }
k() { if [ -r /sys/kernel/mm/ksm/$1 ]; then cat /sys/kernel/mm/ksm/$1; else echo null; fi; }
ksm_line() {
    mark "{\"kind\":\"ksm\",\"phase\":\"$1\",\"t\":$(now),\"pages_sharing\":$(k pages_sharing),\"pages_shared\":$(k pages_shared),\"pages_unshared\":$(k pages_unshared),\"full_scans\":$(k full_scans),\"pages_to_scan\":$(k pages_to_scan),\"sleep_millisecs\":$(k sleep_millisecs),\"general_profit\":$(k general_profit),\"ksmd_ticks\":$(ticks)}"
}
readings() {
    for u in $units; do
        s=$(/memvisor stats --json /tmp/vm$u.sock 2>/tmp/err) || fail "memvisor stats of unit $u: $(cat /tmp/err)"
        rss=$(awk '/^RssAnon:/ {print $2}' /proc/$(cat /tmp/vm$u.pid)/status)
        mark "{\"kind\":\"unit\",\"phase\":\"$1\",\"unit\":$u,\"t\":$(now),\"rss_anon_kib\":${rss:-null},\"stats\":$(echo "$s" | tr -d '\n')}"
    done
    ksm_line $1
}
ksm_line start
mark "{\"kind\":\"event\",\"what\":\"start\",\"t\":$(now)}"
start
deadline=$(( $(secs) + @READY_LIMIT@ ))
ready=0
while [ $ready -lt @GUESTS@ ]; do
    sleep 1
    ready=0
    for i in $(seq @GUESTS@); do
        if grep -q memvisor-bench-ready $(log_of $i) 2>/dev/null; then
            ready=$((ready + 1))
            if [ ! -e /tmp/guest$i.ready ]; then
                touch /tmp/guest$i.ready
                mark "{\"kind\":\"event\",\"what\":\"ready\",\"guest\":$i,\"t\":$(now)}"
                next $((i + 1))
            fi
        fi
    done
    for u in $units; do
        [ -e /tmp/vm$u.pid ] || continue
        kill -0 $(cat /tmp/vm$u.pid) 2>/dev/null || fail "memvisor process $u ended before every guest was ready"
    done
    [ $(secs) -lt $deadline ] || fail "not every guest was ready within @READY_LIMIT@ s"
done
mark "{\"kind\":\"event\",\"what\":\"all-ready\",\"t\":$(now)}"
# The engines (pager scanners, or ksmd) start together once every guest is up.
readings on
for u in $units; do
    /memvisor engine /tmp/vm$u.sock --set on 2>/tmp/err || fail "turning on the engine of unit $u: $(cat /tmp/err)"
done
t0=$(secs)
left=$(( t0 + @HALF@ - $(secs) )); [ $left -gt 0 ] && sleep $left
readings mid
left=$(( t0 + @SECONDS@ - $(secs) )); [ $left -gt 0 ] && sleep $left
readings end
for u in $units; do kill $(cat /tmp/vm$u.pid) 2>/dev/null; done
mark "{\"kind\":\"event\",\"what\":\"done\",\"t\":$(now)}"
"#;

/// One `memvisor run` per guest, the layout the issue names: each guest its own process, so
/// each pager its own store. Each guest starts when the one before is ready: with three
/// booting at once the outer guest stalled in three runs of four (docs/nested-memory.md).
const PROCESSES: &str = r#"units=$(seq @GUESTS@)
log_of() { echo /tmp/vm$1.log; }
start_one() {
    /memvisor run @RUN@ --control-socket /tmp/vm$1.sock -- sh /workload < /dev/null > /tmp/vm$1.log 2>&1 &
    echo $! > /tmp/vm$1.pid
}
start() { start_one 1; }
next() { [ $1 -gt @GUESTS@ ] || start_one $1; }"#;

/// All guests in one `memvisor run --copies N`: one pager, one store, as in `bench memory`.
/// Their boots are 40 s apart (a boot takes 25-45 s here): three at once stalled the outer
/// guest in every try.
const ONE_PROCESS: &str = r#"units=1
log_of() { echo /tmp/con/guest-$1.log; }
start() {
    /memvisor run @RUN@ --copies @GUESTS@ --stagger 40 --console-dir /tmp/con --control-socket /tmp/vm1.sock -- sh /workload < /dev/null > /tmp/vm1.log 2>&1 &
    echo $! > /tmp/vm1.pid
}
next() { :; }"#;

/// More inner kernel command line, under every policy. `nox2apic`: the inner kernels use the
/// xAPIC's MMIO page, not the x2APIC's MSRs. With x2APIC, the outer guest stalled in five runs
/// of ten with two or three inner guests: QEMU 7.2's TCG spun on one inner-guest instruction
/// (RCX = 0x838, the x2APIC timer's current count) and the outer kernel never ran again
/// (docs/nested-memory.md).
const INNER_APPEND: &str = "nox2apic";

/// More outer kernel command line. `idle=poll`: the outer kernel never halts its CPU. QEMU
/// 7.2's TCG with nested SVM left a halted outer CPU asleep for good in some runs with several
/// inner guests (QEMU at 0% CPU, the outer guest's clock stopped; docs/nested-memory.md).
const OUTER_APPEND: &str = "idle=poll";

/// The job's heartbeat line, every 10 s.
const TICK: &str = "memvisor-bench-tick";
/// Silence after which an outer guest is taken to have stalled.
const QUIET_LIMIT: Duration = Duration::from_secs(90);
/// Boots of one policy's outer guest before a stall is an error.
const ATTEMPTS: usize = 3;

/// The prefix of the job's figure lines on the outer console.
const MARK: &str = "memvisor-bench: ";
/// The prefix of the job's failure line.
const FAILED: &str = "memvisor-bench-failed: ";

/// The arguments of `memvisor run` for `policy`.
fn policy_args(b: &Bench, policy: Policy) -> String {
    match policy {
        Policy::None => "--policy none".into(),
        Policy::Ksm => format!(
            "--policy ksm --ksm-pages {} --ksm-sleep {}",
            b.ksm.0, b.ksm.1
        ),
        Policy::Pager(_) => format!(
            "--policy {} --cold {} --cpu-budget {}",
            nested::sh_quote(policy.name()),
            b.cold_secs,
            b.cpu_budget
        ),
    }
}

/// The outer guest's job script for `policy`.
fn job_script(b: &Bench, policy: Policy) -> String {
    // The guests' boots and workloads get what the window and the readings leave of the
    // timeout; past it the outer guest says which guest was late, with its console's end.
    let ready_limit = b.timeout.as_secs().saturating_sub(b.seconds + 90).max(60);
    let run = format!(
        "--kernel /inner/kernel --initrd /inner/initrd.cpio --memory {} {} --engine-off \
         --append {}",
        nested::sh_quote(&b.memory),
        policy_args(b, policy),
        nested::sh_quote(INNER_APPEND)
    );
    JOB.replace(
        "@LAYOUT@",
        if b.one_process {
            ONE_PROCESS
        } else {
            PROCESSES
        },
    )
    .replace("@RUN@", &run)
    .replace("@TICK@", TICK)
    .replace("@GUESTS@", &b.guests.to_string())
    .replace("@READY_LIMIT@", &ready_limit.to_string())
    .replace("@HALF@", &(b.seconds / 2).to_string())
    .replace("@SECONDS@", &b.seconds.to_string())
}

/// The inner guests' initramfs: the busybox initramfs, the package's files under /data, and
/// [`WORKLOAD`] as /workload.
fn inner_initramfs(deb: &images::Debian) -> Result<Vec<u8>> {
    let data = memimages::workload_data(deb)?;
    let busybox = std::fs::read(&deb.busybox)
        .with_context(|| format!("reading {}", deb.busybox.display()))?;
    let mut c: Cpio = images::guest_cpio(&busybox);
    for d in [
        "srv",
        "data",
        "data/modules",
        "data/modules/kernel",
        "data/modules/kernel/drivers",
    ] {
        c.dir(d);
    }
    for f in DATA_FILES {
        let p = data.join(f);
        c.file(
            &format!("data/{f}"),
            0o644,
            &std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?,
        );
    }
    for t in DATA_TREES {
        memimages::add_tree(
            &mut c,
            &data.join("modules/kernel").join(t),
            &format!("data/modules/kernel/{t}"),
        )?;
    }
    c.file("workload", 0o644, WORKLOAD.as_bytes());
    Ok(c.finish())
}

/// One line the job prints.
#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
enum Mark {
    Event {
        what: String,
        t: f64,
        guest: Option<usize>,
    },
    Ksm {
        phase: String,
        t: f64,
        #[serde(flatten)]
        counters: KsmCounters,
    },
    Unit {
        phase: String,
        unit: usize,
        rss_anon_kib: Option<u64>,
        stats: serde_json::Value,
    },
}

/// KSM's counters in the outer guest (null where the kernel lacks one).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct KsmCounters {
    /// Mappings served by a merged page beyond the first: pages KSM saved.
    pub pages_sharing: Option<u64>,
    /// Merged pages kept.
    pub pages_shared: Option<u64>,
    /// Pages scanned that found no twin.
    pub pages_unshared: Option<u64>,
    /// Full passes ksmd made over the mergeable memory.
    pub full_scans: Option<u64>,
    /// ksmd's rate: pages per wake-up ...
    pub pages_to_scan: Option<u64>,
    /// ... and its sleep between wake-ups.
    pub sleep_millisecs: Option<u64>,
    /// KSM's own net saving (pages_sharing less its rmap metadata), bytes; from Linux 6.4.
    pub general_profit: Option<i64>,
    /// ksmd's user + system time, in USER_HZ ticks.
    pub ksmd_ticks: Option<u64>,
}

/// One `memvisor run` process's figures at the end (a guest's, or all guests' with
/// `--copies`).
#[derive(Debug, Clone, Serialize)]
pub struct Unit {
    /// Bytes held: the pager's resident + store + tables, or resident guest RAM.
    pub held: u64,
    /// Resident guest RAM.
    pub resident: u64,
    /// The store and the pager's tables.
    pub store: u64,
    /// The pager's CPU seconds (scanner and fault service); 0 without one.
    pub cpu_s: f64,
    /// Its process's anonymous RSS, the cross-check.
    pub rss_anon: u64,
    /// The pager's whole stats, for pager policies.
    pub stats: Option<pager::Stats>,
}

/// One policy's run.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    /// The policy.
    pub policy: &'static str,
    /// Bytes held by all guests at the end (../shared/MEASURING.md).
    pub held: u64,
    /// The same, half-way through the window: how far from steady the end figure is.
    pub held_mid: u64,
    /// The same when the engines were turned on (every guest ready, nothing merged or
    /// reclaimed yet): the footprint without an engine, at the same point of the same run.
    pub held_on: u64,
    /// Resident guest RAM, summed (before KSM's saving).
    pub resident: u64,
    /// The pagers' stores and tables, summed.
    pub store: u64,
    /// The memvisor processes' anonymous RSS, summed: the cross-check of `held` (for KSM it
    /// counts a merged page once per process that maps it).
    pub rss_anon: u64,
    /// The engine's CPU seconds in the window: the pagers' threads, or ksmd.
    pub cpu_s: f64,
    /// The same from the guests' start: for the pager, its fault service during the boots.
    pub cpu_total_s: f64,
    /// Refaults served, all guests.
    pub refaults: u64,
    /// Refault latency p50 (the median of the guests' p50s), ns.
    pub fault_p50_ns: u64,
    /// Refault latency p99 (the highest of the guests'), ns.
    pub fault_p99_ns: u64,
    /// Pages reclaimed, all guests.
    pub reclaimed: u64,
    /// Pages by form at the end, summed, for pager policies.
    pub pages: Option<pager::stats::Pages>,
    /// KSM's counters at the end.
    pub ksm: KsmCounters,
    /// KSM's pages_sharing half-way through the window.
    pub ksm_pages_sharing_mid: Option<u64>,
    /// Outer uptime when the guests were started (the outer guest's boot).
    pub started_at: f64,
    /// Seconds from the guests' start until the last was ready.
    pub ready_s: f64,
    /// Seconds from the last ready to the end reading.
    pub window_s: f64,
    /// Wall seconds of the whole QEMU run.
    pub qemu_s: f64,
    /// Outer uptime when each guest's workload was done.
    pub ready_at: Vec<Option<f64>>,
    /// How the guests ran: a process each, or one process.
    pub layout: &'static str,
    /// Each `memvisor run` process.
    pub units: Vec<Unit>,
}

/// What a guest's stats answer says, reduced to the figures.
struct Reading {
    held: u64,
    resident: u64,
    store: u64,
    stats: Option<pager::Stats>,
}

fn reading(policy: Policy, v: serde_json::Value) -> Result<Reading> {
    Ok(match policy {
        Policy::Pager(_) => {
            let st: pager::Stats = serde_json::from_value(v)
                .context("a guest's stats are not the pager's (was it started with a pager?)")?;
            if let Some(f) = &st.failure {
                bail!("a guest's pager failed: {f}");
            }
            Reading {
                held: st.bytes.held,
                resident: st.bytes.resident,
                store: st.bytes.store + st.bytes.pager_metadata,
                stats: Some(st),
            }
        }
        Policy::None | Policy::Ksm => {
            let r: RamStats = serde_json::from_value(v)
                .context("a guest's stats are not a plain VM's resident count")?;
            Reading {
                held: r.resident_bytes,
                resident: r.resident_bytes,
                store: 0,
                stats: None,
            }
        }
    })
}

/// Sums of `pages`.
fn add_pages(a: &mut pager::stats::Pages, b: &pager::stats::Pages) {
    a.total += b.total;
    a.resident += b.resident;
    a.empty += b.empty;
    a.zero += b.zero;
    a.shared += b.shared;
    a.patched += b.patched;
    a.compressed += b.compressed;
    a.raw += b.raw;
}

/// Reads one policy's run from its outer console.
fn parse(b: &Bench, policy: Policy, console: &str, qemu_s: f64) -> Result<Run> {
    let tail = || {
        let lines: Vec<&str> = console.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    };
    if let Some(why) = console.lines().find_map(|l| l.trim().strip_prefix(FAILED)) {
        bail!(
            "the {} run failed in the outer guest: {why}\nthe console's end:\n{}",
            policy.name(),
            tail()
        );
    }
    let mut events: Vec<(String, f64)> = Vec::new();
    let mut ready: Vec<Option<f64>> = vec![None; b.guests];
    let mut ksm: Vec<(String, f64, KsmCounters)> = Vec::new();
    let mut readings: Vec<(String, usize, Option<u64>, serde_json::Value)> = Vec::new();
    for line in console.lines() {
        let Some(json) = line.trim().strip_prefix(MARK) else {
            continue;
        };
        let m: Mark = serde_json::from_str(json).with_context(|| {
            format!(
                "the outer guest printed a figure line this side cannot read (a kernel message \
                 in the middle?): {json}"
            )
        })?;
        match m {
            Mark::Event { what, t, guest } => {
                if let Some(r) = guest.and_then(|g| ready.get_mut(g.wrapping_sub(1))) {
                    *r = Some(t);
                }
                events.push((what, t));
            }
            Mark::Ksm { phase, t, counters } => ksm.push((phase, t, counters)),
            Mark::Unit {
                phase,
                unit,
                rss_anon_kib,
                stats,
            } => readings.push((phase, unit, rss_anon_kib, stats)),
        }
    }
    let at = |what: &str| {
        events
            .iter()
            .find(|e| e.0 == what)
            .map(|e| e.1)
            .with_context(|| {
                format!(
                    "the {} run's outer guest never reported {what:?}; the console's end:\n{}",
                    policy.name(),
                    tail()
                )
            })
    };
    let (start, all_ready) = (at("start")?, at("all-ready")?);
    let ksm_at = |phase: &str| {
        ksm.iter()
            .find(|k| k.0 == phase)
            .map(|k| (k.1, k.2.clone()))
    };
    let (_, ksm0) = ksm_at("start").context("no KSM reading before the guests started")?;
    let (end_t, ksm_end) = ksm_at("end").with_context(|| {
        format!(
            "the {} run has no end reading; the console's end:\n{}",
            policy.name(),
            tail()
        )
    })?;
    let ksm_mid = ksm_at("mid").map(|k| k.1);

    let mut run = Run {
        policy: policy.name(),
        held: 0,
        held_mid: 0,
        held_on: 0,
        resident: 0,
        store: 0,
        rss_anon: 0,
        cpu_s: 0.0,
        cpu_total_s: 0.0,
        refaults: 0,
        fault_p50_ns: 0,
        fault_p99_ns: 0,
        reclaimed: 0,
        pages: None,
        ksm: ksm_end.clone(),
        ksm_pages_sharing_mid: ksm_mid.as_ref().and_then(|k| k.pages_sharing),
        started_at: start,
        ready_s: all_ready - start,
        window_s: end_t - all_ready,
        qemu_s,
        ready_at: ready,
        layout: b.layout(),
        units: Vec::new(),
    };
    let mut p50s = Vec::new();
    let mut cpu_on = 0.0;
    for phase in ["on", "mid", "end"] {
        for u in 1..=b.units() {
            let (_, _, rss, v) = readings
                .iter()
                .find(|r| r.0 == phase && r.1 == u)
                .with_context(|| format!("no {phase} reading of memvisor process {u}"))?;
            let r = reading(policy, v.clone()).with_context(|| format!("memvisor process {u}"))?;
            match phase {
                "on" => {
                    run.held_on += r.held;
                    cpu_on += r.stats.as_ref().map_or(0.0, pager::Stats::cpu_s);
                    continue;
                }
                "mid" => {
                    run.held_mid += r.held;
                    continue;
                }
                _ => {}
            }
            run.held += r.held;
            run.resident += r.resident;
            run.store += r.store;
            let rss_anon = rss.unwrap_or(0) * 1024;
            run.rss_anon += rss_anon;
            let cpu_s = r.stats.as_ref().map_or(0.0, pager::Stats::cpu_s);
            if let Some(st) = &r.stats {
                run.cpu_total_s += cpu_s;
                run.refaults += st.faults.refaults;
                run.reclaimed += st.reclaimed;
                if st.faults.refaults > 0 {
                    p50s.push(st.refault_latency.p50_ns);
                }
                run.fault_p99_ns = run.fault_p99_ns.max(st.refault_latency.p99_ns);
                add_pages(run.pages.get_or_insert_default(), &st.pages);
            }
            run.units.push(Unit {
                held: r.held,
                resident: r.resident,
                store: r.store,
                cpu_s,
                rss_anon,
                stats: r.stats,
            });
        }
    }
    run.cpu_s = run.cpu_total_s - cpu_on;
    p50s.sort_unstable();
    run.fault_p50_ns = p50s.get(p50s.len() / 2).copied().unwrap_or(0);
    if policy == Policy::Ksm {
        let (Some(sharing), Some(t0), Some(t1)) =
            (ksm_end.pages_sharing, ksm0.ksmd_ticks, ksm_end.ksmd_ticks)
        else {
            bail!(
                "the outer kernel has no KSM (no /sys/kernel/mm/ksm or no ksmd): the ksm \
                 policy needs CONFIG_KSM"
            );
        };
        ensure!(
            ksm_end.pages_to_scan == Some(b.ksm.0) && ksm_end.sleep_millisecs == Some(b.ksm.1),
            "KSM ran at pages_to_scan={:?} sleep_millisecs={:?}, not the {} and {} asked for",
            ksm_end.pages_to_scan,
            ksm_end.sleep_millisecs,
            b.ksm.0,
            b.ksm.1
        );
        // USER_HZ is 100 on x86.
        let ticks_on = ksm_at("on").and_then(|k| k.1.ksmd_ticks).unwrap_or(t0);
        run.cpu_s = t1.saturating_sub(ticks_on) as f64 / 100.0;
        run.cpu_total_s = t1.saturating_sub(t0) as f64 / 100.0;
        run.held = run.held.saturating_sub(sharing * 4096);
        run.held_mid = run
            .held_mid
            .saturating_sub(run.ksm_pages_sharing_mid.unwrap_or(0) * 4096);
    } else if ksm_end.pages_sharing.unwrap_or(0) > 0 {
        bail!(
            "KSM merged {} pages during the {} run, which does not use it: the figures would \
             be wrong",
            ksm_end.pages_sharing.unwrap_or(0),
            policy.name()
        );
    }
    Ok(run)
}

/// The whole experiment: one outer boot per policy; prints progress to stderr.
pub fn run(b: &Bench) -> Result<Vec<Run>> {
    ensure!(b.guests >= 1, "--guests must be at least 1");
    let deb = images::debian()?;
    let initrd = inner_initramfs(&deb)?;
    let mut runs = Vec::new();
    for &policy in &b.policies {
        eprintln!(
            "memvisor: policy {}: {} guests of {} in a fresh outer guest ...",
            policy.name(),
            b.guests,
            b.memory
        );
        let job = OuterJob {
            script: job_script(b, policy),
            kernel: deb.vmlinuz.clone(),
            initrd: initrd.clone(),
        };
        let outer = Outer {
            mib: b.outer_mib,
            cpus: 1,
            timeout: b.timeout,
            keyboard: false,
            append: OUTER_APPEND,
            quiet_limit: Some(QUIET_LIMIT),
        };
        let name = policy.name();
        let mut attempt = 1;
        let console = loop {
            let verbose = b.verbose;
            let c = nested::boot(&outer, &job, move |line| {
                let line = line.trim_end();
                if line.trim() == TICK {
                    // The heartbeat only tells `boot` the outer guest is alive.
                    return;
                }
                if verbose {
                    eprintln!("{line}");
                } else if let Some(json) = line.trim().strip_prefix(MARK) {
                    // Progress for people: the job's events, not its figures.
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(json)
                        && v["kind"] == "event"
                    {
                        let guest = v["guest"]
                            .as_u64()
                            .map_or(String::new(), |g| format!(" (guest {g})"));
                        eprintln!(
                            "memvisor:   {name}: {}{guest} at outer uptime {} s",
                            v["what"].as_str().unwrap_or("?"),
                            v["t"]
                        );
                    }
                }
            })?;
            if !c.stalled {
                break c;
            }
            let tail: Vec<&str> = c.text.lines().collect();
            let tail = tail[tail.len().saturating_sub(30)..].join("\n");
            ensure!(
                attempt < ATTEMPTS,
                "the {name} run's outer guest stalled {ATTEMPTS} times (silent for {} s); the \
                 console's end:\n{tail}",
                QUIET_LIMIT.as_secs()
            );
            eprintln!(
                "memvisor:   {name}: the outer guest went silent for {} s (a stall of QEMU's TCG \
                 with nested SVM, docs/nested-memory.md); booting it again",
                QUIET_LIMIT.as_secs()
            );
            attempt += 1;
        };
        let r = parse(
            b,
            policy,
            &console.text.replace('\r', ""),
            console.elapsed.as_secs_f64(),
        )?;
        runs.push(r);
    }
    Ok(runs)
}

fn mib(b: u64) -> f64 {
    crate::bench_memory::mib(b)
}

/// The table comparing runs.
pub fn table(b: &Bench, runs: &[Run]) -> String {
    let base = runs.iter().find(|r| r.policy == "none");
    let ksm = runs.iter().find(|r| r.policy == "ksm");
    let mut o = format!(
        "{} Linux guests ({} each, the same workload; {}) under memvisor in a QEMU TCG outer \
         guest ({} MiB, 1 CPU), {} s after the last was ready; KSM pages_to_scan={} \
         sleep_millisecs={}; pager cold after {} s, CPU budget {} core per process\n",
        b.guests,
        b.memory,
        b.layout(),
        b.outer_mib,
        b.seconds,
        b.ksm.0,
        b.ksm.1,
        b.cold_secs,
        b.cpu_budget
    );
    o += &format!(
        "{:<12} {:>9} {:>9} {:>9} {:>7} {:>7} {:>7} {:>8} {:>8} {:>10} {:>8} {:>7}\n",
        "policy",
        "ready MiB",
        "held MiB",
        "mid MiB",
        "saved",
        "/ KSM",
        "CPU s",
        "p50 us",
        "p99 us",
        "RssAnon",
        "ready s",
        "QEMU s"
    );
    for r in runs {
        let (saved, vs_ksm) = crate::bench_memory::saved_and_vs_ksm(
            r.held,
            base.map(|x| x.held),
            ksm.map(|k| k.held),
        );
        let lat = |ns: u64| crate::bench_memory::latency_us(ns, r.refaults > 0);
        o += &format!(
            "{:<12} {:>9.1} {:>9.1} {:>9.1} {:>7} {:>7} {:>7.2} {:>8} {:>8} {:>10.1} {:>8.1} {:>7.1}\n",
            r.policy,
            mib(r.held_on),
            mib(r.held),
            mib(r.held_mid),
            saved,
            vs_ksm,
            r.cpu_s,
            lat(r.fault_p50_ns),
            lat(r.fault_p99_ns),
            mib(r.rss_anon),
            r.ready_s,
            r.qemu_s
        );
    }
    for r in runs {
        o += &format!(
            "{}: resident {:.1} MiB, store and tables {:.1} MiB; engine on {:.1} s (from the \
             last guest ready to the end reading), {:.2} CPU s since the guests' start; outer \
             boot {:.1} s",
            r.policy,
            mib(r.resident),
            mib(r.store),
            r.window_s,
            r.cpu_total_s,
            r.started_at
        );
        if let Some(p) = &r.pages {
            o += &format!(
                "; pages resident {}, zero {}, shared {}, patched {}, compressed {}, raw {}; \
                 {} reclaimed, {} refaults",
                p.resident,
                p.zero,
                p.shared,
                p.patched,
                p.compressed,
                p.raw,
                r.reclaimed,
                r.refaults
            );
        }
        if r.policy == "ksm" {
            let k = &r.ksm;
            o += &format!(
                "; KSM pages_sharing {} ({:.1} MiB saved; {} half-way), pages_shared {}, \
                 full scans {}, general_profit {}",
                k.pages_sharing.unwrap_or(0),
                mib(k.pages_sharing.unwrap_or(0) * 4096),
                r.ksm_pages_sharing_mid
                    .map_or("-".into(), |v| v.to_string()),
                k.pages_shared.unwrap_or(0),
                k.full_scans.unwrap_or(0),
                k.general_profit
                    .map_or("- (kernel before 6.4)".into(), |g| {
                        format!("{:.1} MiB", g as f64 / (1 << 20) as f64)
                    })
            );
        }
        o += "\n";
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bench() -> Bench {
        Bench {
            guests: 2,
            memory: "256M".into(),
            seconds: 30,
            policies: vec![Policy::Ksm, Policy::Pager(pager::Mode::Full)],
            ksm: (1000, 10),
            cold_secs: 5.0,
            cpu_budget: 1.0,
            outer_mib: 1536,
            timeout: Duration::from_secs(600),
            one_process: false,
            verbose: false,
        }
    }

    #[test]
    fn the_job_script_has_every_field_filled_in() {
        let b = bench();
        for p in &b.policies {
            let s = job_script(&b, *p);
            assert!(!s.contains('@'), "{s}");
        }
        let s = job_script(&b, Policy::Ksm);
        assert!(
            s.contains("--policy ksm --ksm-pages 1000 --ksm-sleep 10"),
            "{s}"
        );
        let s = job_script(&b, Policy::Pager(pager::Mode::Full));
        assert!(s.contains("--policy 'full' --cold 5 --cpu-budget 1"), "{s}");
        assert!(!s.contains("--copies"), "{s}");
        let one = Bench {
            one_process: true,
            ..b
        };
        let s = job_script(&one, Policy::Pager(pager::Mode::Full));
        assert!(
            s.contains("--copies 2 --stagger 40 --console-dir /tmp/con"),
            "{s}"
        );
        assert!(s.contains(TICK), "the heartbeat: {s}");
        assert!(!s.contains('@'), "{s}");
    }

    /// A console as the job prints it, for `guests` guests.
    fn console(policy: Policy, sharing: u64) -> String {
        let stats = |held: u64, cpu: f64| match policy {
            Policy::Pager(_) => {
                let mut st = pager::Stats::default();
                st.bytes.held = held;
                st.bytes.resident = held / 2;
                st.bytes.store = held / 2;
                st.scanner_cpu_s = cpu;
                st.faults.refaults = 10;
                st.refault_latency.p50_ns = 20_000;
                st.refault_latency.p99_ns = 90_000;
                serde_json::to_string(&st).unwrap()
            }
            _ => serde_json::to_string(&RamStats {
                ram_bytes: 256 << 20,
                resident_bytes: held,
            })
            .unwrap(),
        };
        let mut c = String::from("Linux booting\nmemvisor-nested: /dev/kvm is up: svm npt\n");
        let ksm = |phase: &str, s: u64, ticks: u64| {
            format!(
                "{MARK}{{\"kind\":\"ksm\",\"phase\":\"{phase}\",\"t\":1.0,\"pages_sharing\":{s},\
                 \"pages_shared\":1,\"pages_unshared\":2,\"full_scans\":3,\"pages_to_scan\":1000,\
                 \"sleep_millisecs\":10,\"general_profit\":null,\"ksmd_ticks\":{ticks}}}\n"
            )
        };
        c += &ksm("start", 0, 5);
        c += &format!("{MARK}{{\"kind\":\"event\",\"what\":\"start\",\"t\":10.5}}\n");
        for g in 1..=2 {
            c += &format!(
                "{MARK}{{\"kind\":\"event\",\"what\":\"ready\",\"guest\":{g},\"t\":4{g}.0}}\n"
            );
        }
        c += &format!("{MARK}{{\"kind\":\"event\",\"what\":\"all-ready\",\"t\":42.5}}\n");
        // Engines on at the "on" reading: nothing merged yet, ksmd and the pager idle.
        for (phase, held, cpu, s, ticks) in [
            ("on", 150u64 << 20, 0.5, 0, 105),
            ("mid", 100 << 20, 1.0, sharing, 205),
            ("end", 80 << 20, 1.5, sharing, 305),
        ] {
            for g in 1..=2 {
                c += &format!(
                    "{MARK}{{\"kind\":\"unit\",\"phase\":\"{phase}\",\"unit\":{g},\"t\":50.0,\
                     \"rss_anon_kib\":1024,\"stats\":{}}}\n",
                    stats(held, cpu)
                );
            }
            c += &ksm(phase, s, ticks);
        }
        c += &format!("{MARK}{{\"kind\":\"event\",\"what\":\"done\",\"t\":80.0}}\n");
        c
    }

    #[test]
    fn figures_are_read_from_the_console() {
        let b = bench();
        let r = parse(&b, Policy::Ksm, &console(Policy::Ksm, 1000), 90.0).unwrap();
        assert_eq!(r.resident, 160 << 20);
        assert_eq!(r.held, (160 << 20) - 1000 * 4096);
        assert_eq!(r.held_mid, (200 << 20) - 1000 * 4096);
        assert_eq!(r.held_on, 300 << 20);
        assert!((r.cpu_s - 2.0).abs() < 1e-9, "{}", r.cpu_s);
        assert!((r.cpu_total_s - 3.0).abs() < 1e-9, "{}", r.cpu_total_s);
        assert!((r.ready_s - 32.0).abs() < 1e-9);
        assert_eq!(r.ready_at, vec![Some(41.0), Some(42.0)]);
        assert_eq!(r.rss_anon, 2 << 20);

        let full = Policy::Pager(pager::Mode::Full);
        let r = parse(&b, full, &console(full, 0), 90.0).unwrap();
        assert_eq!(r.held, 160 << 20);
        assert_eq!(r.store, 80 << 20);
        assert!((r.cpu_s - 2.0).abs() < 1e-9, "{}", r.cpu_s);
        assert!((r.cpu_total_s - 3.0).abs() < 1e-9);
        assert_eq!(
            (r.fault_p50_ns, r.fault_p99_ns, r.refaults),
            (20_000, 90_000, 20)
        );
    }

    #[test]
    fn a_failure_or_a_missing_reading_is_an_error_with_the_console() {
        let b = bench();
        let full = Policy::Pager(pager::Mode::Full);
        let c = console(full, 0) + "memvisor-bench-failed: guest 2 ended before its workload\n";
        let e = format!("{:#}", parse(&b, full, &c, 1.0).unwrap_err());
        assert!(e.contains("guest 2 ended"), "{e}");
        let c: String = console(full, 0)
            .lines()
            .filter(|l| !l.contains("\"phase\":\"end\",\"unit\":2"))
            .map(|l| format!("{l}\n"))
            .collect();
        let e = format!("{:#}", parse(&b, full, &c, 1.0).unwrap_err());
        assert!(e.contains("no end reading of memvisor process 2"), "{e}");
        // KSM merging during a run that does not use it makes the figures wrong.
        let e = format!("{:#}", parse(&b, full, &console(full, 5), 1.0).unwrap_err());
        assert!(e.contains("KSM merged 5 pages"), "{e}");
    }
}
