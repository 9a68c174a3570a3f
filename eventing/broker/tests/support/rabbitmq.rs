//! Private RabbitMQ nodes for tests: each node has its own data folder, its own free loopback ports
//! (AMQP and Erlang distribution) and its own node name, so tests and test binaries never share
//! state with each other or with a system RabbitMQ.
//!
//! Include it with `#[path = "support/rabbitmq.rs"] mod rabbitmq;` (std only, no crates, so any test
//! crate of the workspace can include it by a relative path). Needs the Debian package
//! `rabbitmq-server` (scripts/setup installs it; installing does not start the system node).
//!
//! How a node is started (checked on Debian bookworm, RabbitMQ 3.10, Erlang 25):
//! - The Debian wrappers (/usr/sbin/rabbitmq-server, rabbitmqctl) switch to the `rabbitmq` user
//!   with `su rabbitmq -c ...`. `su` keeps the environment (RABBITMQ_* settings do reach the node)
//!   but `su -c` starts a new session, so the node would not be in the process group we create and
//!   could not be killed as a group. So the wrappers are bypassed: the real scripts in
//!   /usr/lib/rabbitmq/bin are spawned directly, with `Command::uid/gid` (the `rabbitmq` user when
//!   the tests run as root, else the current user), a cleared environment holding only our
//!   settings, and `process_group(0)`. The node's folders belong to that user (else the boot fails
//!   with `failed_to_create_feature_flags_file_directory`).
//! - HOME is that user's home (Debian: /var/lib/rabbitmq), so the node and our `rabbitmqctl` calls
//!   share the Erlang cookie there, and the ordinary `rabbitmqctl -n <node>` of a shell can inspect
//!   a test node too.
//! - RABBITMQ_CONF_ENV_FILE points at an empty file in the node folder and RABBITMQ_CONFIG_FILE /
//!   RABBITMQ_ADVANCED_CONFIG_FILE at files there, so nothing from /etc/rabbitmq applies.
//! - Everything binds to 127.0.0.1: AMQP (RABBITMQ_NODE_IP_ADDRESS), the distribution port
//!   (`-kernel inet_dist_use_interface`), and epmd (ERL_EPMD_ADDRESS) when the first node starts
//!   it. epmd keeps running after the nodes stop; that is fine.
//! - rabbitmqctl runs with RABBITMQ_CTL_DIST_PORT_MIN/MAX=0: its own distribution listener takes an
//!   OS-assigned port instead of the default range 35672-35682 (11 ports, so at most 11 concurrent
//!   calls, and ports our free-port picking might hand to a node).
//!
//! Clean-up: `Drop` stops the node, kills its process group if anything is left and removes the
//! folder. A node that is never dropped (`shared()`) or whose test process aborts is cleaned up by a
//! watchdog spawned with the node: a `sh` in its own process group that blocks reading a pipe whose
//! only writer is the test process. When the test process exits, however it exits, the pipe sees
//! EOF and the watchdog sends SIGTERM to the node's process group (RabbitMQ handles SIGTERM as a
//! graceful stop, like `rabbitmqctl stop`), SIGKILL after 30 s, and removes the folder. A pipe
//! rather than polling `kill -0 <pid>`: no delay and no pid reuse.

use std::fs::{self, File};
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt, chown};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long a start (or restart) may take before it fails.
const START_DEADLINE: Duration = Duration::from_secs(120);
/// How long a stop may take before the node's process group is killed.
const STOP_DEADLINE: Duration = Duration::from_secs(60);
/// Interval between two checks of a condition we wait for.
const POLL: Duration = Duration::from_millis(100);
/// The real scripts of the Debian package (the /usr/sbin ones are wrappers, see the module doc).
const LIB_BIN: &str = "/usr/lib/rabbitmq/bin";
/// Lines of the node's logs shown when it does not come up.
const LOG_TAIL_LINES: usize = 40;

static STARTS: AtomicU32 = AtomicU32::new(0);

/// One private RabbitMQ node (see the module documentation).
pub struct RabbitNode {
    /// `sluice-test-<pid>-<n>-<hint>@localhost`
    name: String,
    amqp_port: u16,
    dist_port: u16,
    /// Node folder: data (mnesia/), logs (log/), config files, `pgid` for the watchdog.
    dir: PathBuf,
    user: RunAs,
    /// The running `rabbitmq-server` script (the leader of the node's process group), if started.
    server: Mutex<Option<Child>>,
    /// The watchdog; its stdin is the pipe whose EOF tells it to clean up.
    watchdog: Mutex<Option<Child>>,
}

/// Whom the node and rabbitmqctl run as.
#[derive(Clone)]
struct RunAs {
    /// uid and gid to switch to (None: the current user).
    ids: Option<(u32, u32)>,
    name: Option<String>,
    home: PathBuf,
}

/// Why a boot failed.
struct BootError {
    message: String,
    /// The node could not bind one of its ports (another process took it after we picked it).
    port_in_use: bool,
}

// Not every test uses every method. On the items, not `#![allow(dead_code)]` at the top: a crate
// that includes this file with `#[allow(dead_code)] mod rabbitmq;` would then trip clippy's
// `duplicated_attributes`.
#[allow(dead_code)]
impl RabbitNode {
    /// Starts a node with its own data dir (temp dir), free loopback ports (AMQP and dist), waits
    /// until it accepts AMQP (await_startup, then a TCP connect), deadline 120 s; panics with the
    /// tail of its log if it does not come up.
    pub fn start(name_hint: &str) -> RabbitNode {
        // Ports are picked by binding port 0 and releasing them, so another process may take one
        // before the node binds it: then one more try with new ports.
        for attempt in 1..=2 {
            let node = RabbitNode::create(name_hint);
            match node.boot() {
                Ok(()) => return node,
                Err(error) if error.port_in_use && attempt == 1 => {
                    eprintln!(
                        "rabbitmq: {} could not bind its ports, retrying with others",
                        node.name
                    );
                }
                // `node` is dropped while unwinding: it is stopped and its folder removed.
                Err(error) => panic!("{}", error.message),
            }
        }
        unreachable!("the second attempt returns or panics")
    }

    /// One node shared by every test of this test binary, started on first use; stopped by its
    /// watchdog when the test process exits (a static is never dropped).
    pub fn shared() -> &'static RabbitNode {
        static SHARED: OnceLock<RabbitNode> = OnceLock::new();
        SHARED.get_or_init(|| RabbitNode::start("shared"))
    }

    pub fn amqp_port(&self) -> u16 {
        self.amqp_port
    }

    /// `amqp://guest:guest@127.0.0.1:PORT/%2f` (guest may log in from loopback).
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.amqp_port)
    }

    /// The Erlang node name, `sluice-test-<pid>-<n>-<hint>@localhost`.
    pub fn node_name(&self) -> &str {
        &self.name
    }

    /// The node's folder (data, logs, config); removed when the node is dropped.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stops the node (its data is kept) and waits until its processes are gone and the AMQP port
    /// no longer accepts. Does nothing when it is not running.
    pub fn stop(&self) {
        let mut server = lock(&self.server);
        if let Err(message) = self.halt(&mut server) {
            panic!("{message}");
        }
    }

    /// Starts the node again on the same folders and ports (stopping it first if it runs) and waits
    /// as `start` does; panics with the tail of its log if it does not come up.
    pub fn restart(&self) {
        self.stop();
        if let Err(error) = self.boot() {
            panic!("{}", error.message);
        }
    }

    /// Runs `rabbitmqctl -n <node> ARGS` and returns its stdout; panics with its stderr if it
    /// fails. Add `--silent` (`-s`) to leave out the informational lines and table headers, e.g.
    /// `rabbitmqctl(&["--silent", "list_queues", "name", "messages"])`.
    pub fn rabbitmqctl(&self, args: &[&str]) -> String {
        let output = self.run_ctl(args);
        if !output.status.success() {
            // On a usage error stdout holds the whole command list: only its start.
            let stdout = String::from_utf8_lossy(&output.stdout);
            let stdout: Vec<&str> = stdout.lines().take(20).collect();
            panic!(
                "`rabbitmqctl -n {} {}` failed ({}):\n{}{}",
                self.name,
                args.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stderr),
                stdout.join("\n"),
            );
        }
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// The node's name, folder, config files and watchdog; the node is not started yet.
    fn create(name_hint: &str) -> RabbitNode {
        let pid = std::process::id();
        let n = STARTS.fetch_add(1, Ordering::Relaxed);
        let hint: String = name_hint
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .take(24)
            .collect();
        let name = if hint.is_empty() {
            format!("sluice-test-{pid}-{n}@localhost")
        } else {
            format!("sluice-test-{pid}-{n}-{hint}@localhost")
        };
        let user = run_as();
        let (amqp_port, dist_port) = free_ports();
        let dir = create_node_dir(&user, pid, n);

        let node = RabbitNode {
            name,
            amqp_port,
            dist_port,
            dir,
            user,
            server: Mutex::new(None),
            watchdog: Mutex::new(None),
        };
        // From here on `node` is dropped (cleaned up) if anything below panics.
        *lock(&node.watchdog) = Some(node.spawn_watchdog());
        for sub in ["mnesia", "log"] {
            let path = node.dir.join(sub);
            fs::create_dir(&path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
            node.give(&path);
        }
        node.write_file("enabled_plugins", "[].\n");
        node.write_file(
            "rabbitmq.conf",
            "# A private test node (eventing/broker/tests/support/rabbitmq.rs).\n\
             loopback_users.guest = true\n\
             log.console = false\n\
             log.file.level = info\n",
        );
        // Empty: keeps /etc/rabbitmq/rabbitmq-env.conf out.
        node.write_file("rabbitmq-env.conf", "");
        node.ensure_cookie();
        node
    }

    /// Spawns the node and waits until it is up. On failure the node may still run (the caller
    /// stops it, or Drop does).
    fn boot(&self) -> Result<(), BootError> {
        let deadline = Instant::now() + START_DEADLINE;
        let mut server = lock(&self.server);
        if server.is_some() {
            return Ok(());
        }
        let child = self.spawn_server();
        let pgid = child.id();
        *server = Some(child);
        // For the watchdog: the group to kill if the test process goes away.
        fs::write(self.dir.join("pgid"), pgid.to_string())
            .unwrap_or_else(|e| panic!("writing {}/pgid: {e}", self.dir.display()));

        // First the cheap check: poll the AMQP port (the listeners start at the end of the boot)
        // while watching that the node did not exit.
        loop {
            let child = server.as_mut().expect("spawned above");
            if let Ok(Some(status)) = child.try_wait() {
                let logs = self.log_tail();
                return Err(BootError {
                    port_in_use: logs.contains("eaddrinuse"),
                    message: format!(
                        "rabbitmq node {} exited during its boot ({status}); its logs:\n{logs}",
                        self.name
                    ),
                });
            }
            if accepts(self.amqp_port) {
                break;
            }
            if Instant::now() >= deadline {
                return Err(self.boot_timeout("its AMQP port does not accept"));
            }
            std::thread::sleep(POLL);
        }
        // Then the authoritative one: the node answers that it has fully started.
        let left = deadline
            .saturating_duration_since(Instant::now())
            .as_secs()
            .max(1);
        let output = self.run_ctl(&["--timeout", &left.to_string(), "await_startup"]);
        if !output.status.success() {
            return Err(self.boot_timeout(&format!(
                "`rabbitmqctl await_startup` failed:\n{}{}",
                String::from_utf8_lossy(&output.stderr),
                String::from_utf8_lossy(&output.stdout)
            )));
        }
        if !accepts(self.amqp_port) {
            return Err(self.boot_timeout("its AMQP port does not accept after await_startup"));
        }
        Ok(())
    }

    fn boot_timeout(&self, what: &str) -> BootError {
        BootError {
            message: format!(
                "rabbitmq node {} did not come up within {START_DEADLINE:?}: {what}\nits logs:\n{}",
                self.name,
                self.log_tail()
            ),
            port_in_use: false,
        }
    }

    fn spawn_server(&self) -> Child {
        let console = self.dir.join("log").join("console.out");
        let out = File::create(&console)
            .unwrap_or_else(|e| panic!("creating {}: {e}", console.display()));
        self.give(&console);
        let err = out.try_clone().expect("cloning a file handle");
        let dir = |sub: &str| self.dir.join(sub).display().to_string();
        let mut command = self.command(&server_bin());
        command
            // RabbitMQ 3.10 names the node at runtime from RABBITMQ_NODENAME, so no process
            // command line would show the name. The script hands its arguments to `erl`, which
            // keeps an unknown `-flag value` as a plain init argument: with this, the script and
            // the beam process show the name, and `pgrep -f <node name>` finds them.
            .arg("-sluice_test_node")
            .arg(&self.name)
            .env("RABBITMQ_NODENAME", &self.name)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.amqp_port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", dir("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir("log"))
            .env("RABBITMQ_PID_FILE", dir("rabbitmq.pid"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir("enabled_plugins"))
            // Without `.conf`.
            .env("RABBITMQ_CONFIG_FILE", dir("rabbitmq"))
            // Does not exist: keeps /etc/rabbitmq/advanced.config out.
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", dir("advanced.config"))
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                // SLUICE_TEST_RABBITMQ_ERL_ARGS: more emulator flags, for a benchmark to try (e.g.
                // `+sbwt none`: schedulers that do not busy-wait on a machine shared with others).
                format!(
                    "-kernel inet_dist_use_interface {{127,0,0,1}} {}",
                    std::env::var("SLUICE_TEST_RABBITMQ_ERL_ARGS").unwrap_or_default()
                ),
            )
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            // Its own process group (pgid = its pid): the beam process is in it, so the node can
            // be killed as a group, and a Ctrl-C of `cargo test` does not reach it.
            .process_group(0);
        command
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", server_bin().display()))
    }

    /// rabbitmqctl against this node, waiting for it to finish.
    fn run_ctl(&self, args: &[&str]) -> Output {
        self.ctl(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", ctl_bin().display()))
    }

    fn ctl(&self, args: &[&str]) -> Command {
        let mut command = self.command(&ctl_bin());
        command
            .env("RABBITMQ_CTL_DIST_PORT_MIN", "0")
            .env("RABBITMQ_CTL_DIST_PORT_MAX", "0")
            .env(
                "RABBITMQ_CTL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}",
            )
            .arg("-n")
            .arg(&self.name)
            .args(args);
        command
    }

    /// A command run as the node's user with a clean environment (see the module doc).
    fn command(&self, program: &Path) -> Command {
        let mut command = Command::new(program);
        command
            .env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into()),
            )
            .env("HOME", &self.user.home)
            .env("LANG", "C.UTF-8")
            .env("LC_ALL", "C.UTF-8")
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_CONF_ENV_FILE", self.dir.join("rabbitmq-env.conf"))
            .current_dir(&self.dir);
        if let Some(name) = &self.user.name {
            command.env("USER", name).env("LOGNAME", name);
        }
        if let Some((uid, gid)) = self.user.ids {
            command.uid(uid).gid(gid);
        }
        command
    }

    /// Stops the node if it runs: `rabbitmqctl stop`, then waits for its process group to end and
    /// the AMQP port to refuse. When rabbitmqctl fails, or the group outlives STOP_DEADLINE, the
    /// group gets SIGTERM, then SIGKILL.
    fn halt(&self, server: &mut MutexGuard<'_, Option<Child>>) -> Result<(), String> {
        let Some(mut child) = server.take() else {
            return Ok(());
        };
        let pgid = child.id();
        let mut gone = move || child_exited(&mut child) && !group_alive(pgid);
        let mut problem = None;
        if !gone() {
            let deadline = Instant::now() + STOP_DEADLINE;
            let stopped = match self
                .ctl(&["stop"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
            {
                Ok(mut ctl) => wait_until_or_kill(&mut ctl, deadline) == Some(true),
                Err(_) => false,
            };
            if stopped {
                if !poll_until(deadline, &mut gone) {
                    problem = Some(format!(
                        "still running {STOP_DEADLINE:?} after `rabbitmqctl stop`"
                    ));
                }
            } else {
                problem = Some("`rabbitmqctl stop` failed".to_owned());
                kill_group(pgid, "TERM");
                poll_until(Instant::now() + Duration::from_secs(10), &mut gone);
            }
            if !gone() {
                kill_group(pgid, "KILL");
                if !poll_until(Instant::now() + Duration::from_secs(10), &mut gone) {
                    return Err(format!(
                        "rabbitmq node {}: its process group {pgid} survives SIGKILL",
                        self.name
                    ));
                }
            }
        }
        let _ = fs::remove_file(self.dir.join("pgid"));
        let port = self.amqp_port;
        if !poll_until(Instant::now() + Duration::from_secs(10), || !accepts(port)) {
            return Err(format!(
                "rabbitmq node {}: its AMQP port {port} still accepts after the stop",
                self.name
            ));
        }
        if let Some(problem) = problem {
            // The node is gone all the same: only worth a note.
            eprintln!(
                "rabbitmq node {}: {problem}; its process group was signalled",
                self.name
            );
        }
        Ok(())
    }

    fn spawn_watchdog(&self) -> Child {
        // $1: the node folder. Blocks on stdin until EOF (the test process closed the pipe, by
        // exiting or by dropping the node). Drop removes the folder before closing the pipe, so an
        // existing folder means nobody cleaned up. `env kill`: dash's builtin cannot signal a
        // process group with a named signal.
        const SCRIPT: &str = r#"trap '' HUP INT
cat >/dev/null 2>&1
[ -d "$1" ] || exit 0
pg=$(cat "$1/pgid" 2>/dev/null)
if [ -n "$pg" ] && env kill -0 -- "-$pg" 2>/dev/null; then
  env kill -s TERM -- "-$pg" 2>/dev/null
  i=0
  while env kill -0 -- "-$pg" 2>/dev/null && [ "$i" -lt 300 ]; do sleep 0.1; i=$((i+1)); done
  env kill -s KILL -- "-$pg" 2>/dev/null
fi
rm -rf "$1"
"#;
        Command::new("sh")
            .arg("-c")
            .arg(SCRIPT)
            .arg("sluice-rabbitmq-watchdog")
            .arg(&self.dir)
            .stdin(Stdio::piped())
            // Not the test's stdout/stderr: a pipe held open by the watchdog would keep e.g.
            // `cargo test | tee` waiting.
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning the rabbitmq watchdog: {e}"))
    }

    fn write_file(&self, name: &str, contents: &str) {
        let path = self.dir.join(name);
        fs::write(&path, contents).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        self.give(&path);
    }

    /// Hands a path to the node's user.
    fn give(&self, path: &Path) {
        if let Some((uid, gid)) = self.user.ids {
            chown(path, Some(uid), Some(gid))
                .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
        }
    }

    /// The Erlang cookie in HOME that the node and rabbitmqctl share. The Debian package creates
    /// it; otherwise the first node would, and two nodes booting at once could race: create it
    /// atomically (a hard link fails if the file exists).
    fn ensure_cookie(&self) {
        let cookie = self.user.home.join(".erlang.cookie");
        if cookie.exists() {
            return;
        }
        let tmp = self.dir.join("erlang.cookie");
        let value: String = {
            let mut seed = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
                ^ (u64::from(std::process::id()) << 32);
            (0..20)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    char::from(b'A' + (seed % 26) as u8)
                })
                .collect()
        };
        fs::write(&tmp, value).unwrap_or_else(|e| panic!("writing {}: {e}", tmp.display()));
        let _ = fs::set_permissions(&tmp, fs::Permissions::from_mode(0o400));
        self.give(&tmp);
        let _ = fs::hard_link(&tmp, &cookie);
        let _ = fs::remove_file(&tmp);
    }

    /// The last lines of the node's log and of its stdout/stderr.
    fn log_tail(&self) -> String {
        let mut tail = String::new();
        let log_dir = self.dir.join("log");
        let node_log = log_dir.join(format!("{}.log", self.name));
        for path in [node_log, log_dir.join("console.out")] {
            let mut text = String::new();
            let _ = File::open(&path).and_then(|mut f| f.read_to_string(&mut text));
            let lines: Vec<&str> = text.lines().collect();
            let from = lines.len().saturating_sub(LOG_TAIL_LINES);
            tail.push_str(&format!(
                "--- {} (last {} lines)\n",
                path.display(),
                lines.len() - from
            ));
            for line in &lines[from..] {
                tail.push_str(line);
                tail.push('\n');
            }
        }
        tail
    }
}

impl Drop for RabbitNode {
    /// Stops the node, kills its process group if still alive, removes the folder. Never panics
    /// (it may run while a failed test unwinds).
    fn drop(&mut self) {
        {
            let mut server = lock(&self.server);
            if let Err(message) = self.halt(&mut server) {
                eprintln!("{message}");
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
        // The folder is gone: the watchdog reads EOF, finds nothing to do and exits.
        if let Some(mut watchdog) = lock(&self.watchdog).take() {
            drop(watchdog.stdin.take());
            let _ = wait_until_or_kill(&mut watchdog, Instant::now() + Duration::from_secs(10));
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A test that panicked while holding the lock must not break the others (shared node).
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Whether 127.0.0.1:port accepts a TCP connection.
fn accepts(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
}

/// Two distinct free loopback ports (AMQP, distribution): bound to port 0 together, then released.
fn free_ports() -> (u16, u16) {
    let bind = || {
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .unwrap_or_else(|e| panic!("binding a free loopback port: {e}"))
    };
    let (a, b) = (bind(), bind());
    let port = |l: &TcpListener| {
        l.local_addr()
            .expect("a bound listener has an address")
            .port()
    };
    (port(&a), port(&b))
}

/// Polls `condition` every POLL until it holds (true) or the deadline passes (false).
fn poll_until(deadline: Instant, mut condition: impl FnMut() -> bool) -> bool {
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(POLL);
    }
}

/// Whether the child has exited (and is reaped).
fn child_exited(child: &mut Child) -> bool {
    !matches!(child.try_wait(), Ok(None))
}

/// Waits for a child until the deadline, then kills it; Some(exited successfully) or None.
fn wait_until_or_kill(child: &mut Child, deadline: Instant) -> Option<bool> {
    let mut status = None;
    poll_until(deadline, || match child.try_wait() {
        Ok(Some(s)) => {
            status = Some(s.success());
            true
        }
        Ok(None) => false,
        Err(_) => true,
    });
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    status
}

/// Whether any live (not zombie) process has process group `pgid`, from /proc/<pid>/stat.
fn group_alive(pgid: u32) -> bool {
    let Ok(entries) = fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|entry| {
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            return false;
        };
        // "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
        let Some(after_comm) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            return false;
        };
        let mut fields = after_comm.split_whitespace();
        let state = fields.next();
        let pgrp = fields.nth(1).and_then(|f| f.parse::<u32>().ok());
        state != Some("Z") && pgrp == Some(pgid)
    })
}

fn kill_group(pgid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args(["-s", signal, "--", &format!("-{pgid}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn server_bin() -> PathBuf {
    rabbitmq_bin("rabbitmq-server")
}

fn ctl_bin() -> PathBuf {
    rabbitmq_bin("rabbitmqctl")
}

/// The real script in /usr/lib/rabbitmq/bin (Debian), else the one on PATH (e.g. a generic-unix
/// install run as its own user).
fn rabbitmq_bin(name: &str) -> PathBuf {
    let lib = Path::new(LIB_BIN).join(name);
    if lib.exists() {
        return lib;
    }
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| p.exists())
    });
    on_path.unwrap_or_else(|| {
        panic!("RabbitMQ is not installed (no {name} in {LIB_BIN} or on PATH): run scripts/setup")
    })
}

/// Root runs the node as the `rabbitmq` user (as the Debian wrappers would); anyone else as
/// themselves.
fn run_as() -> RunAs {
    let euid = fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(u32::MAX);
    if euid == 0
        && let Some(user) = passwd_entry("rabbitmq")
    {
        return user;
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    RunAs {
        ids: None,
        name: None,
        home,
    }
}

/// A user's uid, gid and home from /etc/passwd.
fn passwd_entry(user: &str) -> Option<RunAs> {
    let passwd = fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 6 || fields[0] != user {
            return None;
        }
        Some(RunAs {
            ids: Some((fields[2].parse().ok()?, fields[3].parse().ok()?)),
            name: Some(user.to_owned()),
            home: PathBuf::from(fields[5]),
        })
    })
}

/// A new, unique node folder, owned by the node's user. In the temp dir, or /tmp when the node
/// runs as another user that could not enter the temp dir (e.g. TMPDIR under /root).
fn create_node_dir(user: &RunAs, pid: u32, n: u32) -> PathBuf {
    let mut base = std::env::temp_dir();
    if user.ids.is_some() {
        let others_can_enter = |p: &Path| {
            p.ancestors()
                .filter(|a| !a.as_os_str().is_empty())
                .all(|a| {
                    fs::metadata(a)
                        .map(|m| m.mode() & 0o001 != 0)
                        .unwrap_or(false)
                })
        };
        if !others_can_enter(&base) {
            base = PathBuf::from("/tmp");
        }
    }
    for attempt in 0.. {
        let dir = base.join(format!("sluice-rabbitmq-{pid}-{n}-{attempt}"));
        match fs::create_dir(&dir) {
            Ok(()) => {
                if let Some((uid, gid)) = user.ids {
                    chown(&dir, Some(uid), Some(gid))
                        .unwrap_or_else(|e| panic!("chown {}: {e}", dir.display()));
                }
                return dir;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => panic!("creating {}: {e}", dir.display()),
        }
    }
    unreachable!()
}
