//! One `sluice up` per state dir: an exclusive `flock` on `<state_dir>/up.lock`, held for the run's
//! life and released by the kernel when the process dies however it dies. The file records the holder
//! (pid and start time), for the message a second run gets and to say whose leftovers were reaped.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// The file a running `sluice up` holds locked.
pub const LOCK_FILE: &str = "up.lock";

/// The `sluice up` recorded in the lock file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    /// Clock ticks since boot (/proc/PID/stat field 22): with the pid, one process.
    pub start_time: u64,
}

impl Holder {
    fn parse(text: &str) -> Option<Holder> {
        let mut words = text.split_whitespace();
        Some(Holder {
            pid: words.next()?.parse().ok()?,
            start_time: words.next()?.parse().ok()?,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "state dir {dir} is in use by another `sluice up`{holder}: stop it first, or give this one \
         its own --state-dir"
    )]
    Busy { dir: PathBuf, holder: String },
    #[error("state dir lock {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The held lock; released when dropped (or when the process dies).
#[derive(Debug)]
pub struct StateLock {
    _file: File,
    /// The run that held the lock before, if it recorded itself: it ended without releasing its
    /// state dir's resources when leftovers are found.
    pub previous: Option<Holder>,
}

impl StateLock {
    /// Takes the state dir's lock without waiting, and records this process in it.
    pub fn acquire(state_dir: &Path) -> Result<StateLock, LockError> {
        let path = state_dir.join(LOCK_FILE);
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(state_dir).map_err(io)?;
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        let mut text = String::new();
        // SAFETY: flock(2) on a descriptor we own.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let _ = file.read_to_string(&mut text);
                let holder = Holder::parse(&text)
                    .map(|h| format!(" (pid {})", h.pid))
                    .unwrap_or_default();
                return Err(LockError::Busy {
                    dir: state_dir.to_path_buf(),
                    holder,
                });
            }
            return Err(io(err));
        }
        file.read_to_string(&mut text).map_err(io)?;
        let previous = Holder::parse(&text);
        let me = std::process::id();
        let start_time = own_start_time().unwrap_or(0);
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        file.write_all(format!("{me} {start_time}\n").as_bytes())
            .map_err(io)?;
        Ok(StateLock {
            _file: file,
            previous,
        })
    }
}

fn own_start_time() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_dir_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let first = StateLock::acquire(dir.path()).unwrap();
        assert_eq!(first.previous, None);
        // flock locks belong to the open file: a second open in the same process conflicts too.
        let err = StateLock::acquire(dir.path()).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("in use by another `sluice up`")
                && text.contains(&format!("pid {}", std::process::id())),
            "{text}"
        );
        drop(first);
        let again = StateLock::acquire(dir.path()).unwrap();
        assert_eq!(again.previous.map(|h| h.pid), Some(std::process::id()));
    }

    #[test]
    fn holders_parse_from_the_recorded_line() {
        assert_eq!(
            Holder::parse("12 345\n"),
            Some(Holder {
                pid: 12,
                start_time: 345
            })
        );
        assert_eq!(Holder::parse("garbage"), None);
    }
}
