//! HTTP/1.1 load for data-path benchmarks, over keep-alive connections (hyper's client).
//!
//! - [`open_loop`]: requests at a fixed rate on an intended schedule, wrk2-style. Connection `c` of `C`
//!   sends its `i`-th request at `start + (i * C + c) / rate`, so the whole schedule is uniform at `rate`.
//!   Latency is measured from that intended time, not from when the request left: a response that comes
//!   late delays the next requests on its connection, and their wait counts (no coordinated omission).
//!   Each connection has its own thread that sleeps to the nanosecond (timer slack 1 ns) and drives its
//!   connection on a current-thread runtime: tokio's timers tick in milliseconds, which would add up
//!   to 1 ms of send jitter to every figure.
//! - [`closed_loop`]: N connections, each sending its next request as soon as the last one answered
//!   (saturation throughput).
//!
//! Both call a sampler at the start and at the end of the measured window (after a warm-up) and count
//! what completed inside it, so the caller can divide a process's CPU time by requests served.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

/// Where requests go: a listener, and the Host header a gateway routes on.
#[derive(Clone, Debug)]
pub struct Target {
    pub addr: SocketAddr,
    pub host: String,
}

impl Target {
    fn request(&self) -> http::Request<Empty<Bytes>> {
        http::Request::get("/")
            .header(http::header::HOST, &self.host)
            .body(Empty::new())
            .expect("a valid request")
    }
}

/// A keep-alive connection; its driver runs on the runtime that made it.
struct Conn {
    sender: SendRequest<Empty<Bytes>>,
}

impl Conn {
    async fn open(target: &Target) -> Result<Conn> {
        let stream = tokio::net::TcpStream::connect(target.addr)
            .await
            .with_context(|| format!("connecting to {}", target.addr))?;
        stream.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn { sender })
    }

    /// One request; an error for a failed exchange or a status other than 2xx.
    async fn get(&mut self, target: &Target) -> Result<()> {
        self.sender.ready().await?;
        let resp = self.sender.send_request(target.request()).await?;
        let status = resp.status();
        resp.into_body().collect().await?;
        if !status.is_success() {
            bail!("status {status}");
        }
        Ok(())
    }
}

/// One GET on a fresh connection: its status (readiness checks).
pub fn get_status(target: &Target, timeout: Duration) -> Result<u16> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        tokio::time::timeout(timeout, async {
            let mut conn = Conn::open(target).await?;
            conn.sender.ready().await?;
            let resp = conn.sender.send_request(target.request()).await?;
            let status = resp.status().as_u16();
            resp.into_body().collect().await?;
            Ok::<_, anyhow::Error>(status)
        })
        .await
        .context("timed out")?
    })
}

/// What a measured window gave.
#[derive(Debug, Default)]
pub struct Window {
    /// Requests completed inside the window.
    pub completed: u64,
    /// Failed requests (any time in the run; a failed request is not counted as completed).
    pub errors: u64,
    /// Open loop: latencies in microseconds of the requests scheduled inside the window, sorted.
    pub latencies_us: Vec<f64>,
    /// The sampler's value at the end of the window minus the one at its start.
    pub sampled: u64,
    /// The window's actual length.
    pub elapsed: Duration,
}

impl Window {
    /// The p-th quantile (0..=1) of the latencies, in microseconds.
    pub fn latency_us(&self, p: f64) -> f64 {
        let l = &self.latencies_us;
        if l.is_empty() {
            return f64::NAN;
        }
        l[((l.len() - 1) as f64 * p).round() as usize]
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    pub warmup: Duration,
    pub window: Duration,
}

/// Requests at `rate` per second over `connections`, `schedule.warmup` then `schedule.window`;
/// `sample` is called at the window's start and end.
pub fn open_loop(
    target: &Target,
    rate: f64,
    connections: usize,
    schedule: Schedule,
    sample: &dyn Fn() -> Result<u64>,
) -> Result<Window> {
    struct Thread {
        completed: u64,
        errors: u64,
        latencies_us: Vec<f64>,
    }
    // Connect first, so connection set-up is outside the schedule.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (start_tx, start_rx) = std::sync::mpsc::channel::<Instant>();
    let start_rx = Arc::new(std::sync::Mutex::new(start_rx));
    let interval = Duration::from_secs_f64(connections as f64 / rate);
    let mut handles = Vec::new();
    for c in 0..connections {
        let target = target.clone();
        let ready_tx = ready_tx.clone();
        let start_rx = start_rx.clone();
        handles.push(std::thread::spawn(move || -> Result<Thread> {
            set_timer_slack_ns(1);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let mut conn = match rt.block_on(Conn::open(&target)) {
                Ok(conn) => {
                    let _ = ready_tx.send(Ok(()));
                    Some(conn)
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("{e:#}")));
                    return Err(e);
                }
            };
            let start = start_rx.lock().expect("start").recv()?;
            let window_start = start + schedule.warmup;
            let end = window_start + schedule.window;
            let first = start + interval.mul_f64(c as f64 / connections as f64);
            let mut out = Thread {
                completed: 0,
                errors: 0,
                latencies_us: Vec::new(),
            };
            for i in 0.. {
                let intended = first + interval * i;
                if intended >= end {
                    break;
                }
                let now = Instant::now();
                if intended > now {
                    std::thread::sleep(intended - now);
                }
                let result = rt.block_on(async {
                    if conn.is_none() {
                        conn = Some(Conn::open(&target).await?);
                    }
                    conn.as_mut().expect("open").get(&target).await
                });
                let done = Instant::now();
                match result {
                    Ok(()) => {
                        if intended >= window_start {
                            out.latencies_us.push((done - intended).as_secs_f64() * 1e6);
                        }
                        if done >= window_start && done < end {
                            out.completed += 1;
                        }
                    }
                    Err(_) => {
                        out.errors += 1;
                        conn = None;
                    }
                }
            }
            Ok(out)
        }));
    }
    drop(ready_tx);
    for r in ready_rx.iter().take(connections) {
        if let Err(e) = r {
            bail!("{e}");
        }
    }
    // A little ahead, so every thread is asleep on its first send time when it comes.
    let start = Instant::now() + Duration::from_millis(20);
    for _ in 0..connections {
        start_tx.send(start)?;
    }
    let (sampled, elapsed) = sample_window(start, schedule, sample)?;
    let mut window = Window {
        sampled,
        elapsed,
        ..Window::default()
    };
    for h in handles {
        let t = h
            .join()
            .map_err(|_| anyhow::anyhow!("a load thread panicked"))??;
        window.completed += t.completed;
        window.errors += t.errors;
        window.latencies_us.extend(t.latencies_us);
    }
    window.latencies_us.sort_by(f64::total_cmp);
    Ok(window)
}

/// Sleeps to the window's start and end, sampling at each.
fn sample_window(
    start: Instant,
    schedule: Schedule,
    sample: &dyn Fn() -> Result<u64>,
) -> Result<(u64, Duration)> {
    set_timer_slack_ns(1);
    let window_start = start + schedule.warmup;
    sleep_until(window_start);
    let (t0, s0) = (Instant::now(), sample()?);
    sleep_until(window_start + schedule.window);
    let (t1, s1) = (Instant::now(), sample()?);
    Ok((s1.saturating_sub(s0), t1 - t0))
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

/// `connections` closed loops on one thread, `schedule.warmup` then `schedule.window`.
pub fn closed_loop(
    target: &Target,
    connections: usize,
    schedule: Schedule,
    sample: &dyn Fn() -> Result<u64>,
) -> Result<Window> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut conns = Vec::new();
        for _ in 0..connections {
            conns.push(Conn::open(target).await?);
        }
        let start = Instant::now();
        let window_start = start + schedule.warmup;
        let end = window_start + schedule.window;
        let mut tasks = tokio::task::JoinSet::new();
        for mut conn in conns {
            let target = target.clone();
            tasks.spawn(async move {
                let (mut completed, mut errors) = (0u64, 0u64);
                while Instant::now() < end {
                    match conn.get(&target).await {
                        Ok(()) => {
                            let done = Instant::now();
                            if done >= window_start && done < end {
                                completed += 1;
                            }
                        }
                        Err(_) => {
                            errors += 1;
                            match Conn::open(&target).await {
                                Ok(c) => conn = c,
                                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                            }
                        }
                    }
                }
                (completed, errors)
            });
        }
        tokio::time::sleep_until(window_start.into()).await;
        let (t0, s0) = (Instant::now(), sample()?);
        tokio::time::sleep_until(end.into()).await;
        let (t1, s1) = (Instant::now(), sample()?);
        let mut window = Window {
            sampled: s1.saturating_sub(s0),
            elapsed: t1 - t0,
            ..Window::default()
        };
        while let Some(r) = tasks.join_next().await {
            let (completed, errors) = r?;
            window.completed += completed;
            window.errors += errors;
        }
        Ok(window)
    })
}

/// The calling thread's timer slack: the kernel may delay its sleeps by this much to batch
/// wake-ups (50 us by default, as much as the latencies measured).
fn set_timer_slack_ns(ns: libc::c_ulong) {
    // SAFETY: prctl(PR_SET_TIMERSLACK) only sets a value on the calling thread.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, ns, 0, 0, 0);
    }
}
