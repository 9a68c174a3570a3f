//! What an earlier run on the same state dir left behind, and reaping it.
//!
//! Every process the runtime (or `sluice up`, for Envoy) starts carries [`OWNER_ENV`] = the state dir's
//! canonical path in its environment, and its children inherit it. While the state dir's lock is held
//! (see [`crate::StateLock`]), no live `sluice up` owns such a process, so every process marked with our
//! state dir is a leftover: an instance's grandchild that `PR_SET_PDEATHSIG` does not reach, or any
//! child of a run whose parent-death signal could not apply. Members of a leftover's process group are
//! leftovers too (an instance's group is its own, and a group id cannot be reused while a member
//! lives), which catches children that cleared their environment.
//!
//! Containers: when the container backend lands, its containers carry the same owner as a label, and
//! the engine's API lists them by label; reap them where [`reap_leftovers`] is called.
//!
//! [`select_leftovers`] decides (pure, unit-tested); [`scan_processes`] and [`reap_leftovers`] act.

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The environment variable that names the state dir of the `sluice up` that started a process.
pub const OWNER_ENV: &str = "SLUICE_UP_STATE_DIR";

/// One process as /proc shows it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ProcessEntry {
    pub pid: i32,
    pub pgid: i32,
    /// Clock ticks since boot (field 22 of /proc/PID/stat): with the pid, it names one process, so a
    /// recycled pid is never signalled.
    pub start_time: u64,
    /// The value of [`OWNER_ENV`] in its environment, when it has one (and we may read it).
    pub owner: Option<String>,
}

/// The processes to kill: those marked with `owner`, and every member of their process groups. Never
/// `me` nor a member of `my_pgid` (the caller's own group).
pub fn select_leftovers(
    processes: &[ProcessEntry],
    owner: &str,
    me: i32,
    my_pgid: i32,
) -> Vec<ProcessEntry> {
    let marked = |p: &ProcessEntry| p.owner.as_deref() == Some(owner);
    let groups: BTreeSet<i32> = processes
        .iter()
        .filter(|p| marked(p))
        .map(|p| p.pgid)
        .filter(|g| *g > 1 && *g != my_pgid)
        .collect();
    let mut out: Vec<ProcessEntry> = processes
        .iter()
        .filter(|p| p.pid != me && p.pgid != my_pgid && p.pid > 1)
        .filter(|p| marked(p) || groups.contains(&p.pgid))
        .cloned()
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Every live process (zombies excluded) this user may inspect.
pub fn scan_processes() -> io::Result<Vec<ProcessEntry>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Some((pgid, start_time)) = proc_stat(pid) else {
            continue;
        };
        let owner = std::fs::read(format!("/proc/{pid}/environ"))
            .ok()
            .and_then(|env| env_value(&env, OWNER_ENV));
        out.push(ProcessEntry {
            pid,
            pgid,
            start_time,
            owner,
        });
    }
    Ok(out)
}

/// (process group, start time) of a live process, from /proc/PID/stat; None for zombies.
fn proc_stat(pid: i32) -> Option<(i32, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name, which is in parentheses and may itself hold spaces and parentheses.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // fields[0] is field 3 (state), so field N is fields[N - 3].
    if matches!(fields.first(), Some(&"Z") | Some(&"X")) {
        return None;
    }
    Some((fields.get(2)?.parse().ok()?, fields.get(19)?.parse().ok()?))
}

/// `name`'s value in a NUL-separated environment block.
fn env_value(env: &[u8], name: &str) -> Option<String> {
    env.split(|b| *b == 0).find_map(|kv| {
        let rest = kv.strip_prefix(name.as_bytes())?.strip_prefix(b"=")?;
        Some(String::from_utf8_lossy(rest).into_owned())
    })
}

/// SIGKILLs every leftover of `owner` (see [`select_leftovers`]) and waits up to `timeout` for them
/// to be gone. Returns the processes it killed.
pub fn reap_leftovers(owner: &str, timeout: Duration) -> io::Result<Vec<ProcessEntry>> {
    // SAFETY: getpid/getpgrp only read the caller's ids.
    let (me, my_pgid) = unsafe { (libc::getpid(), libc::getpgrp()) };
    let mut killed: Vec<ProcessEntry> = Vec::new();
    let deadline = Instant::now() + timeout;
    loop {
        // Scan again after each round: a leftover may have forked while we killed its siblings.
        let left = select_leftovers(&scan_processes()?, owner, me, my_pgid);
        if left.is_empty() {
            return Ok(killed);
        }
        if Instant::now() > deadline {
            return Err(io::Error::other(format!(
                "{} leftover process(es) of an earlier run still alive after SIGKILL: pids {:?}",
                left.len(),
                left.iter().map(|p| p.pid).collect::<Vec<_>>()
            )));
        }
        for p in &left {
            // Right before the kill, the pid must still be the process we selected.
            if proc_stat(p.pid).is_some_and(|(_, start)| start == p.start_time) {
                // SAFETY: kill(2) on a pid we just identified; no memory is involved.
                unsafe {
                    libc::kill(p.pid, libc::SIGKILL);
                }
            }
            if !killed.iter().any(|k| k.pid == p.pid) {
                killed.push(p.clone());
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The run folders under `<state_dir>/run/` other than `keep`: with the state dir locked, each belongs
/// to an earlier run that did not clean up.
pub fn stale_run_dirs(state_dir: &Path, keep: Option<&Path>) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(state_dir.join("run")) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| Some(p.as_path()) != keep && p.is_dir())
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pid: i32, pgid: i32, owner: Option<&str>) -> ProcessEntry {
        ProcessEntry {
            pid,
            pgid,
            start_time: 1000 + pid as u64,
            owner: owner.map(str::to_string),
        }
    }

    fn pids(v: &[ProcessEntry]) -> Vec<i32> {
        v.iter().map(|p| p.pid).collect()
    }

    #[test]
    fn marked_processes_and_their_groups_are_leftovers() {
        let procs = [
            p(1, 1, None),
            // An instance group: leader gone (parent-death signal), one marked child and one that
            // cleared its environment.
            p(200, 150, Some("/s")),
            p(201, 150, None),
            // Envoy of the earlier run, a group of its own.
            p(300, 300, Some("/s")),
            // Another state dir's instance, and an unrelated process.
            p(400, 400, Some("/other")),
            p(500, 500, None),
        ];
        assert_eq!(
            pids(&select_leftovers(&procs, "/s", 900, 900)),
            vec![200, 201, 300]
        );
    }

    #[test]
    fn never_the_caller_nor_its_group() {
        let procs = [
            p(900, 900, Some("/s")),
            p(901, 900, Some("/s")),
            p(950, 950, Some("/s")),
        ];
        assert_eq!(pids(&select_leftovers(&procs, "/s", 900, 900)), vec![950]);
    }

    #[test]
    fn nothing_marked_means_nothing_to_reap() {
        let procs = [p(10, 10, None), p(11, 10, Some("/other"))];
        assert!(select_leftovers(&procs, "/s", 900, 900).is_empty());
    }

    #[test]
    fn environment_values_are_found_by_exact_name() {
        let env = b"A=1\0SLUICE_UP_STATE_DIRX=no\0SLUICE_UP_STATE_DIR=/x/y\0B=2\0";
        assert_eq!(env_value(env, OWNER_ENV).as_deref(), Some("/x/y"));
        assert_eq!(env_value(b"A=1\0", OWNER_ENV), None);
    }

    #[test]
    fn this_process_is_in_the_scan() {
        let me = std::process::id() as i32;
        let procs = scan_processes().unwrap();
        assert!(procs.iter().any(|p| p.pid == me && p.start_time > 0));
    }
}
