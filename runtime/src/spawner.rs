//! Children that die with this process, even when it is killed with SIGKILL.
//!
//! `PR_SET_PDEATHSIG` asks the kernel to signal a child when its parent dies, but "parent" is the
//! *thread* that forked it: a child forked from a Tokio blocking thread (which exits when idle) or from
//! a worker that a `block_in_place` retired would be killed at a random moment. So every tied child is
//! forked from one thread that is never joined and lives as long as the process.
//!
//! The signal reaches the child only, not the processes it forks: those (a shell's, say) are reaped by
//! the next `sluice up` on the same state dir (see [`crate::leftovers`]).

use std::io;
use std::sync::OnceLock;
use std::sync::mpsc;

use tokio::process::{Child, Command};

struct Request {
    cmd: Command,
    handle: tokio::runtime::Handle,
    reply: mpsc::SyncSender<io::Result<Child>>,
}

/// The spawner thread's inbox; the thread runs until the process exits.
fn inbox() -> &'static mpsc::Sender<Request> {
    static INBOX: OnceLock<mpsc::Sender<Request>> = OnceLock::new();
    INBOX.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("sluice-spawner".into())
            .spawn(move || {
                for Request {
                    mut cmd,
                    handle,
                    reply,
                } in rx
                {
                    // The child is registered with the caller's runtime (its reaper and SIGCHLD
                    // driver), only the fork happens here.
                    let _guard = handle.enter();
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("starting the spawner thread");
        tx
    })
}

/// Spawns `cmd` so that the kernel sends it `signal` (e.g. `libc::SIGKILL`) when this process dies.
/// Call it inside a Tokio runtime; it blocks only for the fork and exec, as `Command::spawn` does.
pub fn spawn_tied(mut cmd: Command, signal: libc::c_int) -> io::Result<Child> {
    let handle = tokio::runtime::Handle::try_current().map_err(io::Error::other)?;
    let parent = std::process::id();
    // SAFETY: only async-signal-safe calls (prctl, getppid) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent died between fork and prctl: the signal will never come, so do not start.
            if libc::getppid() as u32 != parent {
                return Err(io::Error::other("the parent process exited"));
            }
            Ok(())
        });
    }
    let (reply, answer) = mpsc::sync_channel(1);
    inbox()
        .send(Request { cmd, handle, reply })
        .map_err(|_| io::Error::other("the spawner thread is gone"))?;
    answer
        .recv()
        .map_err(|_| io::Error::other("the spawner thread is gone"))?
}
