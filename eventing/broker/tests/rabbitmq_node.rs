//! The RabbitMQ test harness's own tests (tests/support/rabbitmq.rs): a private node starts, speaks
//! AMQP, answers rabbitmqctl, stops and restarts, and leaves nothing behind, neither when dropped
//! nor when its test process is killed.

#[path = "support/rabbitmq.rs"]
mod rabbitmq;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rabbitmq::RabbitNode;

/// Set in the child process of `watchdog_cleans_up_after_a_killed_test_process`.
const CHILD_ENV: &str = "SLUICE_RABBITMQ_WATCHDOG_CHILD";

/// Connects, sends the AMQP 0-9-1 protocol header and checks that the server answers with a
/// Connection.Start method frame (type 1, channel 0, class 10, method 10).
fn assert_speaks_amqp(port: u16) {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connecting to the AMQP port {port}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(b"AMQP\x00\x00\x09\x01").unwrap();
    let mut head = [0u8; 11];
    stream
        .read_exact(&mut head)
        .unwrap_or_else(|e| panic!("reading the server's first frame: {e}"));
    assert_eq!(head[0], 1, "a method frame, got {head:?}");
    assert_eq!(&head[1..3], &[0, 0], "on channel 0, got {head:?}");
    assert_eq!(
        &head[7..11],
        &[0, 10, 0, 10],
        "Connection.Start, got {head:?}"
    );
}

fn refuses(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err()
}

/// The processes whose command line mentions `pattern` (`pgrep -f`).
fn processes_matching(pattern: &str) -> String {
    let output = Command::new("pgrep")
        .args(["-a", "-f", pattern])
        .output()
        .expect("running pgrep");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Polls until nothing of the node is left: no process mentions its name, its folder is gone.
fn wait_until_gone(node_name: &str, dir: &Path, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let left = processes_matching(node_name);
        if left.is_empty() && !dir.exists() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "after {within:?}, left behind: processes {left:?}, folder exists: {}",
            dir.exists()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_node_starts_speaks_amqp_stops_restarts_and_is_cleaned_up() {
    let started = Instant::now();
    let node = RabbitNode::start("harness");
    eprintln!("{} started in {:?}", node.node_name(), started.elapsed());
    let port = node.amqp_port();
    assert_eq!(
        node.amqp_url(),
        format!("amqp://guest:guest@127.0.0.1:{port}/%2f")
    );
    assert!(
        !processes_matching(node.node_name()).is_empty(),
        "pgrep -f finds the running node"
    );
    assert_speaks_amqp(port);

    let queues = node.rabbitmqctl(&["list_queues"]);
    assert!(
        queues.contains("Listing queues"),
        "list_queues answered {queues:?}"
    );
    let silent = node.rabbitmqctl(&["--silent", "list_queues", "name", "messages"]);
    assert_eq!(silent.trim(), "", "a new node has no queues");

    let stopping = Instant::now();
    node.stop();
    eprintln!("stopped in {:?}", stopping.elapsed());
    assert!(refuses(port), "the AMQP port refuses after stop()");
    node.stop(); // a second stop does nothing

    let restarting = Instant::now();
    node.restart();
    eprintln!("restarted in {:?}", restarting.elapsed());
    assert_eq!(node.amqp_port(), port, "the same port after restart()");
    assert_speaks_amqp(port);
    node.rabbitmqctl(&["list_queues"]);

    let name = node.node_name().to_owned();
    let dir = node.dir().to_owned();
    assert!(dir.join("mnesia").is_dir());
    let dropping = Instant::now();
    drop(node);
    eprintln!("dropped in {:?}", dropping.elapsed());
    assert_eq!(
        processes_matching(&name),
        "",
        "no process of {name} after drop"
    );
    assert!(!dir.exists(), "{} removed by drop", dir.display());
    assert!(refuses(port));
}

#[test]
#[should_panic(expected = "failed")]
fn rabbitmqctl_panics_with_stderr_on_failure() {
    RabbitNode::shared().rabbitmqctl(&["no_such_command"]);
}

/// Tests may call rabbitmqctl in parallel: more calls at once than the 11 ports of rabbitmqctl's
/// default distribution port range (35672-35682), which fail with `nodistribution` beyond that.
/// Each call here holds its CLI node for 8 s so that they all overlap.
#[test]
fn rabbitmqctl_runs_concurrently() {
    let node = RabbitNode::shared();
    std::thread::scope(|scope| {
        let calls: Vec<_> = (0..16)
            .map(|_| scope.spawn(|| node.rabbitmqctl(&["eval", "timer:sleep(8000)."])))
            .collect();
        for call in calls {
            call.join().expect("rabbitmqctl succeeds");
        }
    });
}

/// The child side of `watchdog_cleans_up_after_a_killed_test_process`: starts the shared node,
/// reports it and waits to be killed. Does nothing when run on its own.
#[test]
#[ignore = "run as a child process by watchdog_cleans_up_after_a_killed_test_process"]
fn watchdog_child() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let node = RabbitNode::shared();
    println!("NODE {} {}", node.node_name(), node.dir().display());
    std::io::stdout().flush().unwrap();
    // Until the parent kills this process (or closes stdin).
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
}

#[test]
fn watchdog_cleans_up_after_a_killed_test_process() {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "watchdog_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("running this test binary again");
    let stdout = BufReader::new(child.stdout.take().unwrap());
    // libtest prints "test watchdog_child ... " before the test's own output, on the same line.
    let line = stdout
        .lines()
        .map_while(Result::ok)
        .find_map(|line| line.split_once("NODE ").map(|(_, node)| node.to_owned()))
        .unwrap_or_else(|| panic!("the child did not report its node: {:?}", child.wait()));
    let mut words = line.split_whitespace();
    let (name, dir) = (
        words.next().unwrap().to_owned(),
        words.next().unwrap().to_owned(),
    );
    assert!(
        !processes_matching(&name).is_empty(),
        "{name} runs in the child"
    );

    // SIGKILL: no unwinding, no Drop; only the watchdog can clean up.
    child.kill().unwrap();
    child.wait().unwrap();
    let killed = Instant::now();
    wait_until_gone(&name, Path::new(&dir), Duration::from_secs(60));
    eprintln!("the watchdog cleaned up {name} in {:?}", killed.elapsed());
}
