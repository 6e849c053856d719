//! The host's hold on a running guest-kit VM, and the guest's ports to it.
//!
//! A [`Control`] is shared (as `Arc<Control>`) between the host and one run of a VM
//! ([`crate::Vm::run_image_ctl`]). The guest reports progress and asks for pacing sleeps
//! through ports of its own, served on the vCPU's thread without the devices' lock:
//!
//! | port | access | what |
//! |------|--------|------|
//! | 0xf5 [`PROGRESS_PORT`] | `out` 32-bit | adds the value to [`Control::rounds`] (the guest's rounds of work done) |
//! | 0xf6 [`STOP_PORT`] | `in` | 1 once the host called [`Control::request_stop`], else 0 |
//! | 0xf7 [`PACE_PORT`] | `out` 32-bit | sleep this many microseconds, at most [`MAX_PACE`]; ends early if the VM stops |
//! | 0xf8 [`CLOCK_PORT`] | `in` 32-bit | microseconds since the run started (the host's monotonic clock), wrapping |
//!
//! Every value is the guest's, so hostile: any width is taken (the first 4 bytes, little
//! endian, missing bytes zero), sleeps are capped, counts wrap rather than overflow. Reads of
//! more than 4 bytes (a `rep ins`) get the value in the first 4 and zeros after.
//!
//! [`Control::abort`] ends the run at once with [`crate::VmError::Aborted`], whatever the guest
//! does: the vCPUs are kicked out of KVM_RUN and out of pacing sleeps.
//!
//! [`Control::pause`] stops every vCPU between two guest instructions, with its I/O complete,
//! and hands back the whole VM's state (a [`VmState`]) in a [`Paused`]; the vCPUs go on when
//! it is resumed or dropped.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::state::VmState;
use crate::vm::{Stop, VmError};

/// `out` (32-bit): the guest finished this many rounds of work since its last report.
pub const PROGRESS_PORT: u16 = 0xf5;
/// `in`: 1 when the host asked the guest to stop (it should then exit 0 through 0xf4), else 0.
pub const STOP_PORT: u16 = 0xf6;
/// `out` (32-bit): sleep this many microseconds (capped at [`MAX_PACE`]) before resuming.
pub const PACE_PORT: u16 = 0xf7;
/// `in` (32-bit): microseconds since the run started, wrapping at 2^32 (71 minutes).
pub const CLOCK_PORT: u16 = 0xf8;

/// The longest pacing sleep one request gets, whatever the guest asks for.
pub const MAX_PACE: Duration = Duration::from_millis(100);

/// A running VM's controls and counters, shared between the host and the VM's run.
///
/// One `Control` serves one run: a stop request or an abort stays in force, so a second run
/// with the same `Control` stops (or aborts) at once.
#[derive(Debug, Default)]
pub struct Control {
    rounds: AtomicU64,
    stop: AtomicBool,
    sleeps: AtomicU64,
    slept_ns: AtomicU64,
    asked_ns: AtomicU64,
    /// When the first vCPU entered KVM_RUN.
    first_entry: OnceLock<Instant>,
    parks: AtomicU64,
    parked_ns: AtomicU64,
    /// The abort reason and the run to end, under one lock so that an abort and the start of
    /// a run cannot miss each other.
    state: Mutex<State>,
    /// KVM's statistics files of the run's vCPUs (none where the kernel has no such file).
    kvm: Mutex<Vec<crate::kvmstats::VcpuStats>>,
    /// Thread ids of the run's vCPU threads, for their scheduler statistics.
    vcpu_threads: Mutex<Vec<i32>>,
}

#[derive(Debug, Default)]
struct State {
    aborted: Option<String>,
    run: Option<Arc<Stop>>,
}

impl Control {
    /// Controls for one run: no rounds, no stop request.
    pub fn new() -> Self {
        Self::default()
    }

    /// Rounds of work the guest has reported (summed over its vCPUs; wraps at 2^64).
    pub fn rounds(&self) -> u64 {
        self.rounds.load(Ordering::Relaxed)
    }

    /// Asks the guest to stop: it sees the request at its next poll of [`STOP_PORT`] and exits
    /// with status 0. A guest that never polls runs on; [`Control::abort`] ends that one.
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::Release);
    }

    /// Whether [`Control::request_stop`] was called.
    pub fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Ends the VM now, whatever its guest is doing (even one that never polls, or sleeps):
    /// the run returns [`VmError::Aborted`] with `reason` (the first reason, if called more
    /// than once). Called before the run starts, the run ends as soon as it starts; called
    /// after it ended, it changes nothing of that run.
    pub fn abort(&self, reason: String) {
        let ended = {
            let mut state = lock(&self.state);
            let reason = state.aborted.get_or_insert(reason).clone();
            state.run.clone().map(|run| (run, reason))
        };
        if let Some((run, reason)) = ended {
            run.end(Err(VmError::Aborted(reason)));
        }
    }

    /// The reason given to [`Control::abort`], if it was called.
    pub fn aborted(&self) -> Option<String> {
        lock(&self.state).aborted.clone()
    }

    /// How many pacing sleeps the guest asked for (non-zero ones).
    pub fn sleeps(&self) -> u64 {
        self.sleeps.load(Ordering::Relaxed)
    }

    /// How long the guest's vCPUs spent in pacing sleeps, summed over them: what they
    /// asked for, and whatever it took a busy host to run them again.
    pub fn slept(&self) -> Duration {
        Duration::from_nanos(self.slept_ns.load(Ordering::Relaxed))
    }

    /// The pacing sleeps the guest asked for (each capped at [`MAX_PACE`]), summed over its
    /// vCPUs. Against [`Control::slept`] it shows how late a busy host woke them; against
    /// the time not slept, the guest's duty cycle.
    pub fn asked(&self) -> Duration {
        Duration::from_nanos(self.asked_ns.load(Ordering::Relaxed))
    }

    /// When the run's first vCPU first entered KVM_RUN (None before): for a restored VM, the
    /// moment the guest's first instruction could run.
    pub fn first_entry(&self) -> Option<Instant> {
        self.first_entry.get().copied()
    }

    /// Pauses the running VM: every vCPU leaves the guest (kicked out of KVM_RUN, or woken
    /// from a pacing sleep), completes the I/O it last exited for, captures its own state and
    /// parks; the last to park captures the VM's (interrupt controllers, PIT, clock, devices).
    /// Returns once all have parked, with the state; the vCPUs go on when the [`Paused`] is
    /// resumed or dropped. Errors, with the VM left running (or ended): no run under this
    /// control ([`VmError::NotRunning`]), a pause already in force, the VM ending meanwhile
    /// ([`VmError::PauseEnded`]), a vCPU not parked within `timeout` (one blocked in a
    /// console write, say: [`VmError::PauseTimeout`]), or KVM refusing to give some state.
    pub fn pause(&self, timeout: Duration) -> Result<Paused, VmError> {
        let t0 = Instant::now();
        let run = lock(&self.state).run.clone().ok_or(VmError::NotRunning)?;
        let (state, epoch) = run.pause(timeout)?;
        Ok(Paused {
            run,
            epoch,
            state: Some(state),
            asked: t0,
            took: t0.elapsed(),
        })
    }

    /// How many times a vCPU parked for a pause (summed over vCPUs).
    pub fn parks(&self) -> u64 {
        self.parks.load(Ordering::Relaxed)
    }

    /// How long vCPUs were kept from the guest by pauses, summed over them: each from the
    /// [`Control::pause`] call until it went back towards KVM_RUN after the resume. Over
    /// [`Control::parks`], what a pause costs the guest.
    pub fn parked(&self) -> Duration {
        Duration::from_nanos(self.parked_ns.load(Ordering::Relaxed))
    }

    /// Counts a vCPU's park that kept it `d` from the guest.
    pub(crate) fn count_park(&self, d: Duration) {
        self.parks.fetch_add(1, Ordering::Relaxed);
        self.parked_ns.fetch_add(
            u64::try_from(d.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// A vCPU thread is about to enter KVM_RUN.
    pub(crate) fn entering(&self) {
        self.first_entry.get_or_init(Instant::now);
    }

    /// A guest's progress report: `data` is the port write, any width.
    pub(crate) fn report(&self, data: &[u8]) {
        self.rounds
            .fetch_add(u64::from(port_value(data)), Ordering::Relaxed);
    }

    /// Counts a pacing sleep of `asked` that took `slept`.
    pub(crate) fn count_sleep(&self, asked: Duration, slept: Duration) {
        let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sleeps.fetch_add(1, Ordering::Relaxed);
        self.asked_ns.fetch_add(ns(asked), Ordering::Relaxed);
        self.slept_ns.fetch_add(ns(slept), Ordering::Relaxed);
    }

    /// Ties this control to a starting run, which ends at once if the control was aborted.
    pub(crate) fn attach(&self, run: &Arc<Stop>) {
        let aborted = {
            let mut state = lock(&self.state);
            state.run = Some(Arc::clone(run));
            state.aborted.clone()
        };
        if let Some(reason) = aborted {
            run.end(Err(VmError::Aborted(reason)));
        }
    }

    /// Unties the run, once it is over.
    pub(crate) fn detach(&self) {
        lock(&self.state).run = None;
    }

    /// Keeps a vCPU's statistics file for [`Control::kvm_counters`].
    pub(crate) fn add_kvm_stats(&self, s: crate::kvmstats::VcpuStats) {
        lock(&self.kvm).push(s);
    }

    /// KVM's exits and page faults for the run's vCPUs, summed; readable during the run and
    /// after it. None if the kernel gave no statistics file (before Linux 5.14).
    pub fn kvm_counters(&self) -> Option<crate::kvmstats::KvmCounters> {
        let files = lock(&self.kvm);
        if files.is_empty() {
            return None;
        }
        let mut sum = crate::kvmstats::KvmCounters::default();
        for f in files.iter() {
            sum += f.read().ok()?;
        }
        Some(sum)
    }

    /// Records the calling thread as one of the run's vCPU threads.
    pub(crate) fn add_vcpu_thread(&self) {
        lock(&self.vcpu_threads).push(crate::schedstat::current_tid());
    }

    /// The scheduler's times of the run's vCPU threads, summed, and how many threads: readable
    /// while the run lasts (a thread that has ended counts no more). None before the run or
    /// where the kernel keeps no such account.
    pub fn vcpu_sched(&self) -> Option<(crate::SchedTimes, u32)> {
        let tids = lock(&self.vcpu_threads);
        let mut sum = crate::SchedTimes::default();
        let mut n = 0;
        for &t in tids.iter() {
            if let Some(s) = crate::SchedTimes::of_thread(t) {
                sum += s;
                n += 1;
            }
        }
        (n > 0).then_some((sum, n))
    }
}

/// A paused VM: its vCPUs are parked outside the guest until [`Paused::resume`] (or drop).
///
/// Guest RAM does not change while it lives (no vCPU runs); the devices take console input
/// meanwhile, which the captured state does not hold.
#[derive(Debug)]
pub struct Paused {
    run: Arc<Stop>,
    /// Which pause of the run this is.
    epoch: u64,
    /// The state; taken by [`Paused::resume`], after which drop resumes nothing.
    state: Option<VmState>,
    asked: Instant,
    took: Duration,
}

impl Paused {
    /// The VM's state as captured when the last vCPU parked.
    pub fn state(&self) -> &VmState {
        self.state
            .as_ref()
            .expect("only resume takes the state, and it takes self")
    }

    /// How long [`Control::pause`] took: from the call until every vCPU had parked and the
    /// state was whole.
    pub fn took(&self) -> Duration {
        self.took
    }

    /// How long the VM has been paused so far, counted from the [`Control::pause`] call.
    pub fn elapsed(&self) -> Duration {
        self.asked.elapsed()
    }

    /// Lets the vCPUs go on; returns how long the VM was paused, from the [`Control::pause`]
    /// call to now, and the state.
    pub fn resume(mut self) -> (Duration, VmState) {
        self.run.resume(self.epoch);
        let paused = self.asked.elapsed();
        let state = self.state.take().expect("taken only here");
        (paused, state)
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        if self.state.is_some() {
            self.run.resume(self.epoch);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The value of a guest's port write of any width: its first 4 bytes, little endian, missing
/// bytes zero.
pub(crate) fn port_value(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    let n = data.len().min(4);
    b[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(b)
}

/// Answers a guest's port read with `value`: its little-endian bytes in the first 4 bytes of
/// `data`, zeros after.
pub(crate) fn port_answer(data: &mut [u8], value: u32) {
    let b = value.to_le_bytes();
    let n = data.len().min(4);
    data[..n].copy_from_slice(&b[..n]);
    data[n..].fill(0);
}

/// The sleep a pacing request of `data` gets: that many microseconds, at most [`MAX_PACE`].
pub(crate) fn pace(data: &[u8]) -> Duration {
    Duration::from_micros(u64::from(port_value(data))).min(MAX_PACE)
}

/// The clock port's reading `elapsed` into the run: microseconds, wrapping at 2^32.
pub(crate) fn clock(elapsed: Duration) -> u32 {
    let low = elapsed.as_micros() & u128::from(u32::MAX);
    u32::try_from(low).expect("masked to 32 bits")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_values_are_taken_at_any_width_and_capped() {
        assert_eq!(port_value(&[]), 0);
        assert_eq!(port_value(&[7]), 7);
        assert_eq!(port_value(&[1, 2]), 0x0201);
        assert_eq!(port_value(&[1, 2, 3, 4, 5, 6, 7, 8]), 0x0403_0201);
        assert_eq!(pace(&[0xff; 4]), MAX_PACE);
        assert_eq!(pace(&[0xff; 64]), MAX_PACE);
        assert_eq!(pace(&[0x10, 0x27]), Duration::from_millis(10));
        let mut d = [0xaa; 8];
        port_answer(&mut d, 0x0403_0201);
        assert_eq!(d, [1, 2, 3, 4, 0, 0, 0, 0]);
        let mut d = [0xaa; 1];
        port_answer(&mut d, 0x0403_0201);
        assert_eq!(d, [1]);
        assert_eq!(clock(Duration::from_micros((1 << 32) + 5)), 5);
    }

    #[test]
    fn rounds_wrap_rather_than_overflow() {
        let c = Control::new();
        c.rounds.store(u64::MAX - 1, Ordering::Relaxed);
        c.report(&[3, 0, 0, 0]);
        assert_eq!(c.rounds(), 1);
        c.report(&[0xff; 4]);
        assert_eq!(c.rounds(), 1 + u64::from(u32::MAX));
    }

    #[test]
    fn the_first_abort_reason_is_kept() {
        let c = Control::new();
        assert_eq!(c.aborted(), None);
        c.abort("first".into());
        c.abort("second".into());
        assert_eq!(c.aborted().as_deref(), Some("first"));
    }
}
