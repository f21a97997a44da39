//! Serving threads pinned to CPUs (`--pin-workers`): thread i of each proxy listener runs only
//! on the i-th CPU the process may use (in turn when there are more threads than CPUs), as
//! nginx's `worker_cpu_affinity auto` does. A pinned event loop keeps its caches, and the
//! kernel cannot stack two of them on one CPU while another idles, which on two shared cores
//! decided whole benchmark runs (docs/BENCHMARKS.md); the cost is that a thread cannot flee a
//! CPU something else keeps busy.

use std::io;

use rustix::thread::{CpuSet, sched_getaffinity, sched_setaffinity};

/// Whether serving threads are pinned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pinning {
    /// Pinned when there is one serving thread per CPU the process may use.
    Auto,
    On,
    Off,
}

/// The CPUs the serving threads take in turn (empty: not pinned), from the CPUs the process
/// may use. `Auto` pins only with one thread per CPU, as on a host or cpuset given to the
/// agent: under a CPU quota the process may use more CPUs than it has threads, and pinning
/// would put every agent on a node on the same first few.
pub fn plan(pinning: Pinning, workers: usize, allowed: Vec<usize>) -> Vec<usize> {
    match pinning {
        Pinning::On => allowed,
        Pinning::Auto if workers == allowed.len() => allowed,
        Pinning::Auto | Pinning::Off => Vec::new(),
    }
}

/// The CPUs this process may run on, in order: its affinity mask, which `taskset` and
/// cpusets narrow.
pub fn allowed() -> io::Result<Vec<usize>> {
    let set = sched_getaffinity(None)?;
    Ok((0..CpuSet::MAX_CPU)
        .filter(|&cpu| set.is_set(cpu))
        .collect())
}

/// The CPU serving thread `thread` is pinned to, or None when nothing is pinned.
pub fn cpu_for(cpus: &[usize], thread: usize) -> Option<usize> {
    cpus.get(thread.checked_rem(cpus.len())?).copied()
}

/// Runs the calling thread on `cpu` only.
pub fn pin_current(cpu: usize) -> io::Result<()> {
    let mut set = CpuSet::new();
    set.set(cpu);
    Ok(sched_setaffinity(None, &set)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_take_the_allowed_cpus_in_turn() {
        let cpus = [2, 5, 7];
        let got: Vec<_> = (0..5).map(|t| cpu_for(&cpus, t)).collect();
        assert_eq!(got, [Some(2), Some(5), Some(7), Some(2), Some(5)]);
        assert_eq!(cpu_for(&[], 0), None);
    }

    #[test]
    fn auto_pins_only_with_one_thread_per_cpu() {
        let cpus = || vec![0, 1, 2, 3];
        assert_eq!(plan(Pinning::Auto, 4, cpus()), [0, 1, 2, 3]);
        // A quota of two CPUs on a four-CPU host: not pinned, or every agent would share 0-1.
        assert!(plan(Pinning::Auto, 2, cpus()).is_empty());
        assert!(plan(Pinning::Auto, 8, cpus()).is_empty());
        assert_eq!(plan(Pinning::On, 2, cpus()), [0, 1, 2, 3]);
        assert!(plan(Pinning::Off, 4, cpus()).is_empty());
    }

    #[test]
    fn a_pinned_thread_runs_only_on_its_cpu() {
        let cpus = allowed().expect("the process's CPUs");
        let last = *cpus.last().expect("at least one CPU");
        let on = std::thread::spawn(move || {
            pin_current(last).expect("pin");
            allowed().expect("the thread's CPUs")
        })
        .join()
        .expect("thread");
        assert_eq!(on, [last]);
        // Only that thread: the test's own thread keeps every CPU.
        assert_eq!(allowed().expect("CPUs"), cpus);
    }
}
