//! The gateway under supervision: an Envoy that exits is started again, with backoff, and the rest of
//! `sluice up` (apps, broker, controller) does not notice beyond the gateway's outage.
//!
//! A restarted Envoy opens a new ADS stream, and the xds-server serves a new stream the current snapshot
//! from scratch (delta and SotW alike), so it comes back with today's routes and endpoints. Hot restart
//! is off (see [`EnvoyProcess::start`]): the new Envoy binds the dead one's ports afresh.
//!
//! [`CrashLoop`] decides (pure, time passed in): restart after a delay, or give up once Envoy has exited
//! [`CrashPolicy::max_exits`] times within [`CrashPolicy::window`]. Giving up ends `sluice up` with an
//! error quoting Envoy's last log lines; the log file stays in the state dir.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::envoy::{EnvoyOptions, EnvoyProcess, log_tail};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CrashPolicy {
    /// This many exits within `window` and Envoy is not started again.
    pub max_exits: usize,
    pub window: Duration,
    /// Delay before the second consecutive restart (the first is immediate); it doubles up to `max_delay`.
    pub initial_delay: Duration,
    pub max_delay: Duration,
}

impl Default for CrashPolicy {
    fn default() -> Self {
        CrashPolicy {
            max_exits: 5,
            window: Duration::from_secs(60),
            initial_delay: Duration::from_millis(250),
            max_delay: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Start Envoy again after this delay.
    Restart(Duration),
    /// It exited `max_exits` times within the window: stop trying.
    GiveUp,
}

/// Envoy's recent exits.
#[derive(Debug, Default)]
pub struct CrashLoop {
    exits: VecDeque<Instant>,
    consecutive: u32,
}

impl CrashLoop {
    /// Records an exit at `now` of an Envoy that ran `ran_for`.
    pub fn on_exit(&mut self, policy: &CrashPolicy, now: Instant, ran_for: Duration) -> Verdict {
        self.exits.push_back(now);
        while self
            .exits
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) > policy.window)
        {
            self.exits.pop_front();
        }
        if self.exits.len() >= policy.max_exits {
            return Verdict::GiveUp;
        }
        // An Envoy that stayed up a whole window was healthy: its exit starts a new series.
        if ran_for >= policy.window {
            self.consecutive = 0;
        }
        let delay = match self.consecutive {
            0 => Duration::ZERO,
            n => policy
                .initial_delay
                .saturating_mul(2u32.saturating_pow((n - 1).min(31)))
                .min(policy.max_delay),
        };
        self.consecutive = self.consecutive.saturating_add(1);
        Verdict::Restart(delay)
    }

    /// Exits within the window, as of the last [`CrashLoop::on_exit`].
    pub fn recent_exits(&self) -> usize {
        self.exits.len()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Control {
    Run,
    /// SIGTERM, SIGKILL after the grace period.
    Stop(Duration),
    /// SIGKILL now.
    Kill,
}

/// Kills the supervised Envoy at once from anywhere (a second Ctrl-C).
#[derive(Clone)]
pub struct EnvoyKiller(Arc<watch::Sender<Control>>);

impl EnvoyKiller {
    pub fn kill(&self) {
        self.0.send_replace(Control::Kill);
    }
}

/// The supervisor task and its controls.
pub struct SupervisedEnvoy {
    control: Arc<watch::Sender<Control>>,
    live: watch::Receiver<bool>,
    task: Option<JoinHandle<Result<()>>>,
}

impl SupervisedEnvoy {
    /// Starts Envoy (and again whenever it exits, per `policy`). Its log starts empty for this run.
    pub fn start(opts: EnvoyOptions, policy: CrashPolicy) -> Result<SupervisedEnvoy> {
        std::fs::write(&opts.log_path, b"")
            .map_err(|e| anyhow!("creating {}: {e}", opts.log_path.display()))?;
        let (control, control_rx) = watch::channel(Control::Run);
        let (live_tx, live) = watch::channel(false);
        let task = tokio::spawn(supervise(opts, policy, control_rx, live_tx));
        Ok(SupervisedEnvoy {
            control: Arc::new(control),
            live,
            task: Some(task),
        })
    }

    /// True while Envoy's admin endpoint answers `/ready` (LIVE): the gateway can take traffic.
    pub fn live(&self) -> watch::Receiver<bool> {
        self.live.clone()
    }

    pub fn killer(&self) -> EnvoyKiller {
        EnvoyKiller(self.control.clone())
    }

    /// Completes only when the supervisor gave up (or failed): the reason, for `sluice up` to exit with.
    pub async fn failed(&mut self) -> anyhow::Error {
        let Some(task) = self.task.as_mut() else {
            return std::future::pending().await;
        };
        let out = task.await;
        self.task = None;
        match out {
            Ok(Err(e)) => e,
            Ok(Ok(())) => anyhow!("the Envoy supervisor stopped"),
            Err(e) => anyhow!("the Envoy supervisor panicked: {e}"),
        }
    }

    /// Stops Envoy (SIGTERM, SIGKILL after `grace`, or at once after [`EnvoyKiller::kill`]) and waits.
    pub async fn stop(&mut self, grace: Duration) {
        self.control.send_if_modified(|c| {
            if *c == Control::Run {
                *c = Control::Stop(grace);
                true
            } else {
                false
            }
        });
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

async fn supervise(
    opts: EnvoyOptions,
    policy: CrashPolicy,
    mut control: watch::Receiver<Control>,
    live: watch::Sender<bool>,
) -> Result<()> {
    let mut crashes = CrashLoop::default();
    loop {
        if *control.borrow_and_update() != Control::Run {
            return Ok(());
        }
        // A spawn error (missing binary, no permission) will not heal by itself: no retry.
        let mut envoy = EnvoyProcess::start(&opts)?;
        let started = Instant::now();
        tracing::info!(pid = ?envoy.pid(), log = %opts.log_path.display(), "Envoy started");
        let readiness = watch_ready(opts.admin, &live);
        tokio::pin!(readiness);
        let status = loop {
            tokio::select! {
                status = envoy.wait() => break status,
                () = &mut readiness => {}
                changed = control.changed() => {
                    let cmd = if changed.is_ok() { *control.borrow_and_update() } else { Control::Kill };
                    match cmd {
                        Control::Run => continue,
                        Control::Stop(grace) => {
                            let killed = tokio::select! {
                                () = envoy.stop(grace) => false,
                                r = control.wait_for(|c| *c == Control::Kill) => r.is_ok(),
                            };
                            if killed {
                                envoy.kill();
                                let _ = envoy.wait().await;
                            }
                        }
                        Control::Kill => {
                            envoy.kill();
                            let _ = envoy.wait().await;
                        }
                    }
                    live.send_replace(false);
                    return Ok(());
                }
            }
        };
        live.send_replace(false);
        let how = status.map_or_else(|e| e.to_string(), |s| s.to_string());
        let ran_for = started.elapsed();
        match crashes.on_exit(&policy, Instant::now(), ran_for) {
            Verdict::Restart(delay) => {
                tracing::warn!(
                    exit = %how,
                    ?ran_for,
                    restart_in = ?delay,
                    exits_in_window = crashes.recent_exits(),
                    log = %opts.log_path.display(),
                    "Envoy exited; starting it again (apps keep running)"
                );
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    _ = control.wait_for(|c| *c != Control::Run) => return Ok(()),
                }
            }
            Verdict::GiveUp => bail!(
                "Envoy exited {} times within {:?} (last: {how}); not starting it again. Last lines \
                 of its log {}:\n{}",
                crashes.recent_exits(),
                policy.window,
                opts.log_path.display(),
                log_tail(&opts.log_path, 20)
            ),
        }
    }
}

/// Failed `/ready` checks in a row before a live Envoy counts as not live (one slow answer under load
/// is not an outage; an exit is reported by the supervisor at once).
const NOT_LIVE_AFTER: u32 = 3;

/// Keeps `live` in step with Envoy's admin `/ready`; never returns.
async fn watch_ready(admin: SocketAddr, live: &watch::Sender<bool>) {
    let mut failures = 0u32;
    loop {
        let ok = matches!(
            tokio::time::timeout(Duration::from_secs(2), crate::http::get(admin, "/ready")).await,
            Ok(Ok((200, _)))
        );
        failures = if ok { 0 } else { failures + 1 };
        let was = *live.borrow();
        let now = ok || (was && failures < NOT_LIVE_AFTER);
        if now != was {
            live.send_replace(now);
            if now {
                tracing::info!("Envoy is live");
            } else {
                tracing::warn!("Envoy's admin endpoint {admin} stopped answering ready");
            }
        }
        let pause = if now {
            Duration::from_secs(1)
        } else {
            Duration::from_millis(20)
        };
        tokio::time::sleep(pause).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHORT: Duration = Duration::from_millis(10);

    fn policy() -> CrashPolicy {
        CrashPolicy::default()
    }

    #[test]
    fn restarts_at_once_then_backs_off_doubling_to_the_cap() {
        let p = CrashPolicy {
            max_exits: 100,
            ..policy()
        };
        let mut c = CrashLoop::default();
        let t0 = Instant::now();
        let got: Vec<Verdict> = (0..7)
            .map(|i| c.on_exit(&p, t0 + Duration::from_millis(i), SHORT))
            .collect();
        let ms = |n| Verdict::Restart(Duration::from_millis(n));
        assert_eq!(
            got,
            vec![
                ms(0),
                ms(250),
                ms(500),
                ms(1000),
                ms(2000),
                ms(4000),
                ms(5000)
            ]
        );
    }

    #[test]
    fn five_exits_within_the_window_give_up() {
        let mut c = CrashLoop::default();
        let t0 = Instant::now();
        for i in 0..4 {
            assert!(matches!(
                c.on_exit(&policy(), t0 + Duration::from_secs(i), SHORT),
                Verdict::Restart(_)
            ));
        }
        assert_eq!(
            c.on_exit(&policy(), t0 + Duration::from_secs(4), SHORT),
            Verdict::GiveUp
        );
        assert_eq!(c.recent_exits(), 5);
    }

    #[test]
    fn exits_spread_beyond_the_window_keep_restarting() {
        let mut c = CrashLoop::default();
        let t0 = Instant::now();
        for i in 0..20 {
            let v = c.on_exit(&policy(), t0 + Duration::from_secs(20 * i), SHORT);
            assert!(matches!(v, Verdict::Restart(_)), "exit {i}: {v:?}");
        }
        assert!(c.recent_exits() <= 4);
    }

    #[test]
    fn a_long_healthy_run_resets_the_backoff() {
        let mut c = CrashLoop::default();
        let t0 = Instant::now();
        c.on_exit(&policy(), t0, SHORT);
        c.on_exit(&policy(), t0 + Duration::from_secs(1), SHORT);
        assert_eq!(
            c.on_exit(&policy(), t0 + Duration::from_secs(200), policy().window),
            Verdict::Restart(Duration::ZERO)
        );
    }
}
