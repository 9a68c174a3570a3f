//! A child process in its own process group, stopped (group-wide) when the guard drops, even on panic,
//! and by a watchdog when the test process itself dies (killed from outside, where no Drop runs).

use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// Owns a child started as the leader of a new process group. Drop sends SIGTERM to the whole group,
/// waits up to the grace period, then SIGKILLs the group and any remembered descendant that left it.
pub struct ProcessGuard {
    child: Child,
    grace: Duration,
    stopped: Option<ExitStatus>,
    /// Descendants seen so far: children that moved to a group of their own (sluice starts Envoy so)
    /// are not reached by the group signal, and once their parent is gone /proc no longer links them.
    known_descendants: Vec<ProcStart>,
    /// A `sh` (in a group of its own) blocked reading a pipe whose only writer is this process: when
    /// the test process exits however it exits, the pipe sees EOF and the watchdog stops the group
    /// (SIGTERM, SIGKILL after the grace period). A pipe, not polling a pid: no delay, no pid reuse.
    watchdog: Option<Child>,
}

impl ProcessGuard {
    /// Spawns `cmd` as the leader of a new process group.
    pub fn spawn(mut cmd: Command, grace: Duration) -> Result<Self> {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
        let child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
        let watchdog = spawn_watchdog(child.id(), grace);
        Ok(ProcessGuard {
            child,
            grace,
            stopped: None,
            known_descendants: Vec::new(),
            watchdog,
        })
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the process already exited (without waiting).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.stopped.is_none() {
            self.stopped = self.child.try_wait().ok().flatten();
        }
        self.stopped
    }

    /// Notes the process's current descendants, to be killed on stop if they outlive it.
    pub fn remember_descendants(&mut self) {
        if self.try_wait().is_some() {
            return;
        }
        for found in descendants(self.child.id()) {
            if !self.known_descendants.contains(&found) {
                self.known_descendants.push(found);
            }
        }
    }

    /// Sends `signal` to the leader only, without waiting (nothing if it already exited).
    pub fn signal(&mut self, signal: libc::c_int) {
        self.remember_descendants();
        if self.try_wait().is_none()
            && let Ok(pid) = libc::pid_t::try_from(self.child.id())
        {
            // SAFETY: kill(2) on our own child, which has not been reaped yet; no memory is involved.
            unsafe {
                libc::kill(pid, signal);
            }
        }
    }

    /// Sends `signal` to the leader only and waits up to `timeout` for it to exit: for tests of how the
    /// process itself shuts down. Drop still cleans up whatever it leaves behind.
    pub fn signal_and_wait(
        &mut self,
        signal: libc::c_int,
        timeout: Duration,
    ) -> Option<ExitStatus> {
        self.remember_descendants();
        if self.try_wait().is_none()
            && let Ok(pid) = libc::pid_t::try_from(self.child.id())
        {
            // SAFETY: kill(2) on our own child, which has not been reaped yet; no memory is involved.
            unsafe {
                libc::kill(pid, signal);
            }
        }
        let deadline = Instant::now() + timeout;
        while self.try_wait().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stopped
    }

    /// SIGTERM to the group, then SIGKILL after the grace period; then SIGKILL to remembered
    /// descendants still running. Idempotent.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let pgid = self.child.id();
        if self.try_wait().is_none() {
            self.remember_descendants();
            signal_group(pgid, libc::SIGTERM);
            let deadline = Instant::now() + self.grace;
            while self.try_wait().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // Whatever is left of the group (the leader if it ignored SIGTERM, or its children) goes now.
        signal_group(pgid, libc::SIGKILL);
        if self.stopped.is_none() {
            self.stopped = self.child.wait().ok();
        }
        for process in &self.known_descendants {
            process.kill_if_still_running();
        }
        // Stopped here: the watchdog goes before its pipe closes (it must not signal a group id that
        // could be reused by then).
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
        self.stopped
    }
}

/// Starts the watchdog of process group `pgid` (see [`ProcessGuard`]); None if `sh` cannot start
/// (the guard still stops the group on Drop).
fn spawn_watchdog(pgid: u32, grace: Duration) -> Option<Child> {
    use std::os::unix::process::CommandExt;
    let secs = grace.as_secs().max(1);
    let script = format!(
        "read _ ; kill -TERM -{pgid} 2>/dev/null; i=0; \
         while kill -0 -{pgid} 2>/dev/null && [ $i -lt {secs} ]; do sleep 1; i=$((i+1)); done; \
         kill -KILL -{pgid} 2>/dev/null"
    );
    let mut cmd = Command::new("sh");
    cmd.args(["-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0);
    cmd.spawn().ok()
}

fn signal_group(pgid: u32, signal: libc::c_int) {
    let Ok(pgid) = libc::pid_t::try_from(pgid) else {
        return;
    };
    // SAFETY: kill(2) with a negative pid signals that process group; no memory is involved.
    unsafe {
        libc::kill(-pgid, signal);
    }
}

impl Drop for ProcessGuard {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A process seen in /proc, identified by pid AND start time so a recycled pid is never signalled.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ProcStart {
    pid: i32,
    start_time: u64,
}

impl ProcStart {
    fn kill_if_still_running(&self) {
        if proc_stat(self.pid).is_some_and(|(_, start)| start == self.start_time) {
            // SAFETY: kill(2) on a pid we just saw is ours (same start time); no memory is involved.
            unsafe {
                libc::kill(self.pid, libc::SIGKILL);
            }
        }
    }
}

/// (parent pid, start time) of a running process, from /proc/PID/stat.
fn proc_stat(pid: i32) -> Option<(i32, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may itself hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // fields[0] is the state (field 3 of stat), so field N is fields[N - 3].
    if fields.first() == Some(&"Z") {
        return None;
    }
    Some((fields.get(1)?.parse().ok()?, fields.get(19)?.parse().ok()?))
}

/// Whether `pid` is a live process (a zombie is not).
pub fn alive(pid: u32) -> bool {
    i32::try_from(pid).is_ok_and(|pid| proc_stat(pid).is_some())
}

/// The direct children of `parent` whose command name (/proc/PID/comm) is `name`.
pub fn children_named(parent: u32, name: &str) -> Vec<u32> {
    let Ok(parent) = i32::try_from(parent) else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| proc_stat(*pid).is_some_and(|(ppid, _)| ppid == parent))
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == name)
        })
        .map(|pid| pid as u32)
        .collect()
}

/// Every process below `root`, found through the parent pids in /proc.
fn descendants(root: u32) -> Vec<ProcStart> {
    let Ok(root) = i32::try_from(root) else {
        return Vec::new();
    };
    let mut all = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok())
            else {
                continue;
            };
            if let Some((ppid, start_time)) = proc_stat(pid) {
                all.push((pid, ppid, start_time));
            }
        }
    }
    let mut found = Vec::new();
    let mut frontier = vec![root];
    while let Some(parent) = frontier.pop() {
        for &(pid, ppid, start_time) in &all {
            if ppid == parent {
                found.push(ProcStart { pid, start_time });
                frontier.push(pid);
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader};

    use super::*;

    const CHILD_ENV: &str = "SLUICE_E2E_WATCHDOG_OWNER";

    /// Run as its own process by the test below: guards a `sleep`, prints its pid, then waits to be
    /// killed (so the guard's Drop never runs).
    #[test]
    fn watchdog_owner() {
        if std::env::var_os(CHILD_ENV).is_none() {
            return;
        }
        let mut sleep = Command::new("sleep");
        sleep.arg("600");
        let guard = ProcessGuard::spawn(sleep, Duration::from_secs(1)).unwrap();
        println!("guarded {}", guard.id());
        std::thread::sleep(Duration::from_secs(600));
    }

    #[test]
    fn the_group_is_stopped_when_the_test_process_is_killed() {
        let mut owner = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "process::tests::watchdog_owner", "--nocapture"])
            .env(CHILD_ENV, "1")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(owner.stdout.take().unwrap()).lines();
        let pid: u32 = loop {
            let line = lines.next().expect("the owner's output").unwrap();
            if let Some(pid) = line.strip_prefix("guarded ") {
                break pid.trim().parse().unwrap();
            }
        };
        assert!(alive(pid));
        owner.kill().unwrap();
        owner.wait().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while alive(pid) {
            assert!(
                Instant::now() < deadline,
                "the guarded process outlived its owner"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
