//! Processes a data-path bench runs and measures: pinned to a core, killed on drop (and when the
//! bench dies), and their CPU time to the nanosecond.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command};

use anyhow::{Context, Result, bail};

/// Pins every thread of `pid` to `core`. Threads it starts later inherit the affinity of the thread
/// that starts them.
pub fn pin_process(pid: u32, core: usize) -> Result<()> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .with_context(|| format!("listing the threads of {pid}"))?;
    for task in tasks {
        let tid: i32 = task?.file_name().to_string_lossy().parse()?;
        // A thread may exit between the listing and the call.
        let _ = pin_thread(tid, core);
    }
    Ok(())
}

/// Pins one thread (0: the calling one) to `core`.
pub fn pin_thread(tid: i32, core: usize) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET only write into it, and
    // sched_setaffinity reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(core, &mut set);
        if libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A child that is SIGKILLed when dropped, and when the bench dies (PR_SET_PDEATHSIG), so no run
/// leaves an Envoy or an upstream behind.
pub struct ChildGuard(pub Child);

impl ChildGuard {
    /// Spawns `cmd` pinned to `core` from its first instruction.
    pub fn spawn_pinned(mut cmd: Command, core: usize) -> Result<ChildGuard> {
        // SAFETY: only async-signal-safe calls (prctl, sched_setaffinity) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
                pin_thread(0, core)
            });
        }
        let program = cmd.get_program().to_string_lossy().into_owned();
        Ok(ChildGuard(
            cmd.spawn().with_context(|| format!("starting {program}"))?,
        ))
    }

    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A process's CPU time (user + system, all threads) through its CPU-time clock: the same quantity
/// as utime + stime in /proc/PID/stat, in nanoseconds rather than 10 ms ticks (a 10 s window at
/// 5,000 req/s is about 100 ticks of Envoy time: 1% per tick).
pub struct ProcessCpu {
    clock: libc::clockid_t,
}

impl ProcessCpu {
    pub fn new(pid: u32) -> Result<ProcessCpu> {
        let mut clock: libc::clockid_t = 0;
        // SAFETY: writes one clockid_t into `clock`.
        let rc = unsafe { libc::clock_getcpuclockid(pid as libc::pid_t, &mut clock) };
        if rc != 0 {
            bail!(
                "no CPU clock for pid {pid}: {}",
                std::io::Error::from_raw_os_error(rc)
            );
        }
        let cpu = ProcessCpu { clock };
        cpu.ns()
            .with_context(|| format!("reading the CPU clock of pid {pid}"))?;
        Ok(cpu)
    }

    pub fn ns(&self) -> Result<u64> {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: writes one timespec.
        if unsafe { libc::clock_gettime(self.clock, &mut ts) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
    }
}

/// The pids of the children of `parent` whose command name is `comm` (e.g. `envoy`).
pub fn children_named(parent: u32, comm: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            // "pid (comm) state ppid ...": comm may hold spaces, so split at the last ')'.
            let Some((head, rest)) = stat.rsplit_once(')') else {
                return false;
            };
            let name = head.split_once('(').map_or("", |(_, n)| n);
            let ppid = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok());
            name == comm && ppid == Some(parent)
        })
        .collect()
}
