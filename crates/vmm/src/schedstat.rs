//! The scheduler's account of a thread: time on a CPU and time runnable but waiting for one
//! (`/proc/self/task/TID/schedstat`, Linux's `CONFIG_SCHED_INFO`).
//!
//! For a vCPU thread, what is neither (of its wall time) was spent blocked: in a pacing sleep,
//! or in the kernel waiting for someone else, such as a userfaultfd handler serving its fault.
//! That split tells a memory engine's cost to a guest apart from the noise of a busy host.

/// One thread's (or several threads', summed) scheduler times.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SchedTimes {
    /// Nanoseconds on a CPU (guest and host mode alike).
    pub run_ns: u64,
    /// Nanoseconds runnable but waiting on a run queue for a CPU.
    pub wait_ns: u64,
}

impl std::ops::AddAssign for SchedTimes {
    fn add_assign(&mut self, o: SchedTimes) {
        self.run_ns += o.run_ns;
        self.wait_ns += o.wait_ns;
    }
}

impl SchedTimes {
    /// What happened since `earlier`, a reading of the same threads.
    pub fn since(self, earlier: SchedTimes) -> SchedTimes {
        SchedTimes {
            run_ns: self.run_ns.saturating_sub(earlier.run_ns),
            wait_ns: self.wait_ns.saturating_sub(earlier.wait_ns),
        }
    }

    /// Reads thread `tid` of this process. None if the thread is gone or the kernel keeps no
    /// such account.
    pub fn of_thread(tid: i32) -> Option<SchedTimes> {
        let text = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).ok()?;
        parse(&text)
    }
}

/// "RUN_NS WAIT_NS TIMESLICES\n".
fn parse(text: &str) -> Option<SchedTimes> {
    let mut it = text.split_ascii_whitespace().map(str::parse::<u64>);
    Some(SchedTimes {
        run_ns: it.next()?.ok()?,
        wait_ns: it.next()?.ok()?,
    })
}

/// The calling thread's id.
pub(crate) fn current_tid() -> i32 {
    // SAFETY: gettid takes no arguments and cannot fail.
    unsafe { libc::gettid() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_thread_and_parses_the_kernel_format() {
        assert_eq!(
            parse("212580 17 1\n"),
            Some(SchedTimes {
                run_ns: 212_580,
                wait_ns: 17
            })
        );
        assert_eq!(parse("12\n"), None);
        assert_eq!(parse("x 1 2"), None);
        let a = SchedTimes::of_thread(current_tid()).expect("this kernel keeps schedstat");
        // Spins until the account shows 10 ms on a CPU: on a busy host that takes longer
        // than 10 ms of wall time, but not forever.
        let t = std::time::Instant::now();
        let b = loop {
            std::hint::black_box((0..1000u64).sum::<u64>());
            let b = SchedTimes::of_thread(current_tid()).expect("still there");
            if b.since(a).run_ns >= 10_000_000 {
                break b;
            }
            assert!(
                t.elapsed().as_secs() < 30,
                "{a:?} then {b:?}: no time on a CPU"
            );
        };
        assert!(b.wait_ns >= a.wait_ns);
        assert_eq!(SchedTimes::of_thread(-1), None);
    }
}
