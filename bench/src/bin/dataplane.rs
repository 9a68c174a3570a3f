//! Data-path cost (issue 16): Envoy's CPU time per request and the latency at a fixed rate, for one
//! plain Envoy hop, the same hop with a do-nothing wasm filter and with the queue-proxy filter (cc=0,
//! cc=100), and the whole serving path as `sluice up` runs it (gateway listener, then the instance's
//! queue-proxy listener, then the app; cc=0 and cc=100).
//!
//! Method: every Envoy runs with one worker, pinned to its own core (`--envoy-core`); this driver, the
//! upstream and `sluice up`'s control plane share the other (`--load-core`). All setups start first and
//! stay up; each round measures every setup in turn (idle when not measured), so drift on a shared
//! machine spreads over all of them alike. A measurement is a warm-up then a window of open-loop load
//! at `--rate` (see `sluice_bench::loadgen`); Envoy's CPU time over the window divided by the requests
//! completed in it is the main figure: unlike throughput at saturation, it hardly depends on what else
//! the machine runs. Saturation (closed loop) is a secondary line.
//!
//! Run: `bash scripts/bench-dataplane [--quick]` (builds, then runs this with the release binaries).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use serde_json::{Value, json};
use sluice_bench::loadgen::{self, Schedule, Target, Window};
use sluice_bench::process::{ChildGuard, ProcessCpu, children_named, pin_process, pin_thread};
use sluice_bench::{SluiceGuard, free_port};

#[derive(Parser)]
struct Args {
    /// Requests per second of the open-loop load. Every setup must sustain it well below saturation:
    /// the serving path on one Envoy worker saturates at about 6-7k req/s here.
    #[arg(long, default_value_t = 2000.0)]
    rate: f64,
    /// Keep-alive connections of the open-loop load.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Rounds; each measures every setup once, in turn. Many short rounds rather than a few long
    /// ones: the host's drift then hits every setup alike (see the README).
    #[arg(long, default_value_t = 30)]
    rounds: usize,
    /// Seconds of load before each measured window.
    #[arg(long, default_value_t = 0.5)]
    warmup: f64,
    /// Seconds of each measured window.
    #[arg(long, default_value_t = 1.0)]
    window: f64,
    /// Connections of the closed-loop saturation run.
    #[arg(long, default_value_t = 50)]
    sat_connections: usize,
    /// Seconds of each saturation window, after as long a warm-up up to 1 s (0 skips saturation).
    #[arg(long, default_value_t = 0.5)]
    sat_window: f64,
    /// Short smoke run: 2 rounds, 0.5 s warm-up, 2 s windows, at most 1 s saturation.
    #[arg(long)]
    quick: bool,
    /// Only these setups (plain `envoy` is always measured: the reference).
    #[arg(long, value_delimiter = ',')]
    setups: Vec<String>,
    /// The core every Envoy is pinned to.
    #[arg(long, default_value_t = 1)]
    envoy_core: usize,
    /// The core of this driver, the upstream and `sluice up`'s control plane and apps.
    #[arg(long, default_value_t = 0)]
    load_core: usize,
    /// The Envoy binary (default: ENVOY_BIN, else the real binary in .venv).
    #[arg(long)]
    envoy: Option<PathBuf>,
    #[arg(long, default_value = "target/release/fast-upstream")]
    upstream: PathBuf,
    #[arg(long, default_value = "target/release/sluice")]
    sluice: PathBuf,
    #[arg(
        long,
        default_value = "target/wasm32-wasip1/wasm/sluice_queue_proxy.wasm"
    )]
    queue_proxy_wasm: PathBuf,
    #[arg(
        long,
        default_value = "target/wasm32-wasip1/wasm/sluice_noop_filter.wasm"
    )]
    noop_wasm: PathBuf,
    /// The native build of the queue-proxy filter (an Envoy dynamic module).
    #[arg(long, default_value = "target/release/libsluice_queue_proxy_native.so")]
    queue_proxy_native: PathBuf,
    /// Writes every figure (per round and the summary) as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// A previous run's --json: prints how far each median moved since (the 3% repeatability check).
    #[arg(long)]
    compare_with: Option<PathBuf>,
}

const ALL_SETUPS: [&str; 13] = [
    "direct",
    "envoy",
    "noop-wasm",
    "filter-cc0",
    "filter-cc100",
    "native-cc0",
    "native-cc100",
    "two-hops-tcp",
    "two-hops-internal",
    "serving-cc0",
    "serving-cc100",
    "serving-native-cc0",
    "serving-native-cc100",
];

/// A filter before the router of a one-hop Envoy: the proxy-wasm module or the native dynamic module,
/// with its plugin configuration.
enum Filter {
    Wasm(PathBuf, String),
    Native(PathBuf, String),
}

/// A setup under load: where requests go and whose CPU counts.
struct Setup {
    name: &'static str,
    target: Target,
    cpu: ProcessCpu,
    /// Whose CPU it is, for the table.
    measured: &'static str,
}

/// One setup's figures in one round.
#[derive(Clone, Copy, Default)]
struct Figures {
    cpu_us_per_req: f64,
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
    achieved_rps: f64,
    errors: u64,
    sat_rps: Option<f64>,
    /// Envoy's CPU time over the saturation window divided by its length (1.0: a whole core).
    sat_cpu_share: Option<f64>,
    /// Envoy's CPU time per request at saturation: the work per request with the wake-ups of an
    /// idling core amortized over many requests (see the README on why the fixed-rate figure is
    /// higher).
    sat_cpu_us_per_req: Option<f64>,
}

fn main() -> Result<()> {
    let mut args = Args::parse();
    if args.quick {
        (args.rounds, args.warmup, args.window) = (2, 0.5, 2.0);
        args.sat_window = args.sat_window.min(1.0);
    }
    let wanted: Vec<&'static str> = ALL_SETUPS
        .into_iter()
        .filter(|s| args.setups.is_empty() || *s == "envoy" || args.setups.iter().any(|w| w == s))
        .collect();
    if let Some(unknown) = args
        .setups
        .iter()
        .find(|s| !ALL_SETUPS.contains(&s.as_str()))
    {
        bail!("unknown setup {unknown}; known: {}", ALL_SETUPS.join(", "));
    }
    // Everything this driver starts inherits the load core; Envoys are moved off it.
    pin_thread(0, args.load_core).context("pinning the driver")?;

    let envoy_bin = find_envoy(args.envoy.as_deref())?;
    let upstream_bin = existing(&args.upstream)?;
    let dir = tempfile::tempdir()?;

    let upstream_port = free_port();
    let mut upstream_cmd = Command::new(&upstream_bin);
    upstream_cmd
        .args(["--port", &upstream_port.to_string(), "--threads", "1"])
        .stdin(Stdio::null());
    let upstream = ChildGuard::spawn_pinned(upstream_cmd, args.load_core)?;
    let direct = Target {
        addr: ([127, 0, 0, 1], upstream_port).into(),
        host: "upstream".into(),
    };
    wait_until_200(&direct, Duration::from_secs(10), "the upstream", None)?;

    let mut guards: Vec<ChildGuard> = Vec::new();
    let mut setups: Vec<Setup> = Vec::new();
    let mut sluice: Option<(SluiceGuard, u16)> = None;
    let mut sluice_native: Option<(SluiceGuard, u16)> = None;
    for name in &wanted {
        let name = *name;
        let plugin = |cc: u32| {
            format!(
                r#"{{"namespace":"bench","revision":"bench-00001","instance":"bench-00001-a","containerConcurrency":{cc}}}"#
            )
        };
        let filter = match name {
            "direct" => {
                setups.push(Setup {
                    name,
                    target: direct.clone(),
                    cpu: ProcessCpu::new(upstream.pid())?,
                    measured: "upstream",
                });
                continue;
            }
            "envoy" => None,
            "noop-wasm" => Some(Filter::Wasm(existing(&args.noop_wasm)?, "{}".to_string())),
            "filter-cc0" => Some(Filter::Wasm(existing(&args.queue_proxy_wasm)?, plugin(0))),
            "filter-cc100" => Some(Filter::Wasm(existing(&args.queue_proxy_wasm)?, plugin(100))),
            "native-cc0" => Some(Filter::Native(
                existing(&args.queue_proxy_native)?,
                plugin(0),
            )),
            "native-cc100" => Some(Filter::Native(
                existing(&args.queue_proxy_native)?,
                plugin(100),
            )),
            "two-hops-tcp" | "two-hops-internal" => {
                // sluice up's serving path in one static Envoy: a gateway hop, then the instance hop
                // with the native filter (cc 100), joined by loopback TCP or an internal listener.
                let module = existing(&args.queue_proxy_native)?;
                let internal = name == "two-hops-internal";
                let config = plugin(100);
                let (guard, target) = start_envoy(
                    &envoy_bin,
                    dir.path(),
                    name,
                    |port, admin| {
                        two_hops_bootstrap(port, admin, upstream_port, &module, &config, internal)
                    },
                    args.envoy_core,
                )?;
                setups.push(Setup {
                    name,
                    target,
                    cpu: ProcessCpu::new(guard.pid())?,
                    measured: "envoy",
                });
                guards.push(guard);
                continue;
            }
            "serving-cc0" | "serving-cc100" | "serving-native-cc0" | "serving-native-cc100" => {
                let native = name.starts_with("serving-native");
                let slot = if native {
                    &mut sluice_native
                } else {
                    &mut sluice
                };
                if slot.is_none() {
                    let root = dir.path().join(if native { "native" } else { "wasm" });
                    *slot = Some(start_sluice(
                        &args,
                        &envoy_bin,
                        &upstream_bin,
                        &root,
                        native,
                    )?);
                }
                let (guard, external) = slot.as_ref().expect("started");
                let host = if name.ends_with("-cc0") {
                    "cc0"
                } else {
                    "cc100"
                };
                let envoy_pid = sluice_envoy(guard.child.id(), args.envoy_core)?;
                setups.push(Setup {
                    name,
                    target: Target {
                        addr: ([127, 0, 0, 1], *external).into(),
                        host: format!("{host}.default.localhost"),
                    },
                    cpu: ProcessCpu::new(envoy_pid)?,
                    measured: "envoy",
                });
                continue;
            }
            _ => unreachable!("checked above"),
        };
        let (guard, target) = start_envoy(
            &envoy_bin,
            dir.path(),
            name,
            |port, admin| bootstrap(name, port, admin, upstream_port, filter.as_ref()),
            args.envoy_core,
        )?;
        setups.push(Setup {
            name,
            target,
            cpu: ProcessCpu::new(guard.pid())?,
            measured: "envoy",
        });
        guards.push(guard);
    }

    let schedule = Schedule {
        warmup: Duration::from_secs_f64(args.warmup),
        window: Duration::from_secs_f64(args.window),
    };
    let sat_schedule = Schedule {
        warmup: Duration::from_secs_f64(args.sat_window.min(1.0)),
        window: Duration::from_secs_f64(args.sat_window),
    };
    println!(
        "== data path: open loop {} req/s over {} connections, {:.1} s warm-up + {:.1} s window, {} rounds; \
         Envoy --concurrency 1 on core {}, load + upstream on core {}",
        args.rate,
        args.connections,
        args.warmup,
        args.window,
        args.rounds,
        args.envoy_core,
        args.load_core
    );
    println!("idle CPU of each measured process (ms of CPU per s, over 2 s, before any load):");
    for s in &setups {
        let t0 = (Instant::now(), s.cpu.ns()?);
        std::thread::sleep(Duration::from_secs(2));
        let used = s.cpu.ns()? - t0.1;
        println!(
            "  {:<14} {:>7.2}",
            s.name,
            used as f64 / 1e6 / t0.0.elapsed().as_secs_f64()
        );
    }

    let mut rounds: Vec<BTreeMap<&'static str, Figures>> = Vec::new();
    for round in 1..=args.rounds {
        println!("-- round {round} of {}", args.rounds);
        println!(
            "  {:<14} {:>9} {:>8} {:>8} {:>8} {:>9} {:>6}  (cpu of)",
            "setup", "cpu_us/req", "p50_us", "p99_us", "max_us", "req/s", "errors"
        );
        let mut figures = BTreeMap::new();
        for s in &setups {
            let w = loadgen::open_loop(&s.target, args.rate, args.connections, schedule, &|| {
                s.cpu.ns()
            })
            .with_context(|| format!("{}: open-loop load", s.name))?;
            let f = Figures {
                cpu_us_per_req: w.sampled as f64 / 1e3 / w.completed.max(1) as f64,
                p50_us: w.latency_us(0.5),
                p99_us: w.latency_us(0.99),
                max_us: w.latency_us(1.0),
                achieved_rps: w.completed as f64 / w.elapsed.as_secs_f64(),
                errors: w.errors,
                ..Figures::default()
            };
            println!(
                "  {:<14} {:>9.2} {:>8.0} {:>8.0} {:>8.0} {:>9.0} {:>6}  {}",
                s.name,
                f.cpu_us_per_req,
                f.p50_us,
                f.p99_us,
                f.max_us,
                f.achieved_rps,
                f.errors,
                s.measured
            );
            if f.achieved_rps < 0.97 * args.rate {
                println!(
                    "  WARNING: {} completed {:.0} req/s of {}: it does not sustain the rate",
                    s.name, f.achieved_rps, args.rate
                );
            }
            figures.insert(s.name, f);
        }
        if args.sat_window > 0.0 {
            for s in &setups {
                let w: Window =
                    loadgen::closed_loop(&s.target, args.sat_connections, sat_schedule, &|| {
                        s.cpu.ns()
                    })
                    .with_context(|| format!("{}: saturation", s.name))?;
                let secs = w.elapsed.as_secs_f64();
                let f = figures.get_mut(s.name).expect("measured above");
                f.sat_rps = Some(w.completed as f64 / secs);
                f.sat_cpu_share = Some(w.sampled as f64 / 1e9 / secs);
                f.sat_cpu_us_per_req = Some(w.sampled as f64 / 1e3 / w.completed.max(1) as f64);
                f.errors += w.errors;
            }
            let mut line = format!(
                "  saturation ({} connections, req/s, cpu share):",
                args.sat_connections
            );
            for s in &setups {
                let f = figures[s.name];
                let _ = write!(
                    line,
                    " {} {:.0} ({:.2})",
                    s.name,
                    f.sat_rps.unwrap_or(f64::NAN),
                    f.sat_cpu_share.unwrap_or(f64::NAN)
                );
            }
            println!("{line}");
        }
        rounds.push(figures);
    }

    let summary = summarize(&setups, &rounds);
    if let Some(path) = &args.json {
        let per_round: Vec<Value> = rounds
            .iter()
            .map(|r| {
                r.iter()
                    .map(|(name, f)| (name.to_string(), figures_json(f)))
                    .collect::<serde_json::Map<_, _>>()
                    .into()
            })
            .collect();
        let doc = json!({
            "rate": args.rate,
            "connections": args.connections,
            "warmup_s": args.warmup,
            "window_s": args.window,
            "sat_connections": args.sat_connections,
            "rounds": per_round,
            "summary": summary,
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.compare_with {
        compare(&summary, path)?;
    }
    drop(guards);
    drop(sluice);
    drop(upstream);
    Ok(())
}

/// Prints this run's medians against those of an earlier run's JSON.
fn compare(summary: &Value, earlier: &Path) -> Result<()> {
    let text = std::fs::read_to_string(earlier)
        .with_context(|| format!("reading {}", earlier.display()))?;
    let earlier: Value = serde_json::from_str(&text)?;
    let earlier = &earlier["summary"];
    println!("== medians against the earlier run (this / earlier - 1; * beyond 3%)");
    let figures = [
        "cpu_us_per_req",
        "p50_us",
        "p99_us",
        "sat_rps",
        "sat_cpu_us_per_req",
    ];
    println!(
        "  {:<14} {}",
        "setup",
        figures.map(|f| format!("{f:>19}")).join("")
    );
    let Some(setups) = summary.as_object() else {
        return Ok(());
    };
    for (name, now) in setups.iter().filter(|(n, _)| *n != "versus_envoy") {
        let mut line = format!("  {name:<14}");
        for f in figures {
            let (Some(a), Some(b)) = (now[f].as_f64(), earlier[name][f].as_f64()) else {
                let _ = write!(line, "{:>19}", "-");
                continue;
            };
            let d = (a / b - 1.0) * 100.0;
            let mark = if d.abs() > 3.0 { '*' } else { ' ' };
            let _ = write!(line, "{d:>+17.1}%{mark}");
        }
        println!("{line}");
    }
    println!("  against plain Envoy (ratios: this / earlier - 1; p99 delta: this - earlier):");
    let (now, then) = (&summary["versus_envoy"], &earlier["versus_envoy"]);
    for (name, v) in now.as_object().into_iter().flatten() {
        let rel = |k: &str| -> Option<f64> { Some(v[k].as_f64()? / then[name][k].as_f64()? - 1.0) };
        let p99 = v["p99_delta_ms"]
            .as_f64()
            .zip(then[name]["p99_delta_ms"].as_f64());
        println!(
            "  {name:<14} CPU/request ratio {:+.1}%, saturation ratio {:+.1}%, CPU/request at saturation ratio {:+.1}%, p99 delta {:+.3} ms",
            rel("cpu_ratio").unwrap_or(f64::NAN) * 100.0,
            rel("sat_ratio").unwrap_or(f64::NAN) * 100.0,
            rel("sat_cpu_ratio").unwrap_or(f64::NAN) * 100.0,
            p99.map_or(f64::NAN, |(a, b)| a - b)
        );
    }
    Ok(())
}

fn figures_json(f: &Figures) -> Value {
    json!({
        "cpu_us_per_req": f.cpu_us_per_req,
        "p50_us": f.p50_us,
        "p99_us": f.p99_us,
        "max_us": f.max_us,
        "achieved_rps": f.achieved_rps,
        "errors": f.errors,
        "sat_rps": f.sat_rps,
        "sat_cpu_share": f.sat_cpu_share,
        "sat_cpu_us_per_req": f.sat_cpu_us_per_req,
    })
}

/// min, median, max.
fn spread(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (v[0], median, v[n - 1])
}

/// Prints min/median/max per figure, the ratios against plain Envoy and the issue's targets; returns
/// the medians as JSON.
fn summarize(setups: &[Setup], rounds: &[BTreeMap<&'static str, Figures>]) -> Value {
    let column = |name: &str, get: &dyn Fn(&Figures) -> Option<f64>| {
        spread(rounds.iter().filter_map(|r| get(&r[name])).collect())
    };
    type Getter = fn(&Figures) -> Option<f64>;
    let figures: [(&str, Getter); 6] = [
        ("cpu_us_per_req", |f| Some(f.cpu_us_per_req)),
        ("p50_us", |f| Some(f.p50_us)),
        ("p99_us", |f| Some(f.p99_us)),
        ("max_us", |f| Some(f.max_us)),
        ("sat_rps", |f| f.sat_rps),
        ("sat_cpu_us_per_req", |f| f.sat_cpu_us_per_req),
    ];
    println!(
        "== summary over {} rounds: min / median / max",
        rounds.len()
    );
    let mut medians = serde_json::Map::new();
    for (label, get) in figures {
        println!("{label}:");
        for s in setups {
            let (lo, mid, hi) = column(s.name, &get);
            let prec = if label.starts_with("cpu") || label.starts_with("sat_cpu") {
                2
            } else {
                0
            };
            println!(
                "  {:<14} {:>10.prec$} {:>10.prec$} {:>10.prec$}   ({:+.1}% .. {:+.1}%)",
                s.name,
                lo,
                mid,
                hi,
                (lo / mid - 1.0) * 100.0,
                (hi / mid - 1.0) * 100.0
            );
            medians
                .entry(s.name.to_string())
                .or_insert_with(|| json!({}))
                .as_object_mut()
                .expect("object")
                .insert(label.to_string(), json!(mid));
        }
    }
    let Some(envoy) = setups.iter().find(|s| s.name == "envoy") else {
        return medians.into();
    };
    // Each setup against plain Envoy measured in the same round, then the median over rounds: the
    // host's drift (other VMs on this machine move every figure by 10-20% from minute to minute)
    // cancels within a round far better than across rounds.
    let paired = |name: &str, f: &dyn Fn(&Figures, &Figures) -> Option<f64>| {
        spread(
            rounds
                .iter()
                .filter_map(|r| f(&r[name], &r[envoy.name]))
                .collect(),
        )
    };
    let cpu_ratio = |a: &Figures, e: &Figures| Some(a.cpu_us_per_req / e.cpu_us_per_req);
    let p50_delta = |a: &Figures, e: &Figures| Some((a.p50_us - e.p50_us) / 1e3);
    let p99_delta = |a: &Figures, e: &Figures| Some((a.p99_us - e.p99_us) / 1e3);
    let sat_ratio = |a: &Figures, e: &Figures| Some(a.sat_rps? / e.sat_rps?);
    let sat_cpu_ratio =
        |a: &Figures, e: &Figures| Some(a.sat_cpu_us_per_req? / e.sat_cpu_us_per_req?);
    println!("== against plain Envoy measured in the same round: median over rounds [min .. max]");
    let mut versus = serde_json::Map::new();
    for s in setups
        .iter()
        .filter(|s| s.measured == "envoy" && s.name != "envoy")
    {
        let c = paired(s.name, &cpu_ratio);
        let p50 = paired(s.name, &p50_delta);
        let p99 = paired(s.name, &p99_delta);
        let sat = paired(s.name, &sat_ratio);
        let sat_cpu = paired(s.name, &sat_cpu_ratio);
        println!(
            "  {:<14} CPU/request {:.3}x [{:.3} .. {:.3}]; p50 {:+.3} ms; p99 {:+.3} ms [{:+.3} .. {:+.3}]; \
             saturation {:.2}x [{:.2} .. {:.2}], CPU/request there {:.2}x [{:.2} .. {:.2}]",
            s.name,
            c.1,
            c.0,
            c.2,
            p50.1,
            p99.1,
            p99.0,
            p99.2,
            sat.1,
            sat.0,
            sat.2,
            sat_cpu.1,
            sat_cpu.0,
            sat_cpu.2
        );
        versus.insert(
            s.name.to_string(),
            json!({
                "cpu_ratio": c.1,
                "p50_delta_ms": p50.1,
                "p99_delta_ms": p99.1,
                "sat_ratio": sat.1,
                "sat_cpu_ratio": sat_cpu.1,
            }),
        );
    }
    println!("== issue 16 targets");
    let verdict = |ok: bool| if ok { "PASS" } else { "FAIL" };
    for name in [
        "serving-cc0",
        "serving-cc100",
        "serving-native-cc0",
        "serving-native-cc100",
        "two-hops-tcp",
        "two-hops-internal",
    ] {
        if !setups.iter().any(|s| s.name == name) {
            continue;
        }
        let ratio = paired(name, &cpu_ratio).1;
        println!(
            "{} {name}: Envoy CPU/request {ratio:.2}x of one plain hop (target <= 1.3x; at saturation {:.2}x)",
            verdict(ratio <= 1.3),
            paired(name, &sat_cpu_ratio).1
        );
        let delta = paired(name, &p99_delta).1;
        println!(
            "{} {name}: p99 {delta:+.3} ms over one plain hop (target <= +0.3 ms)",
            verdict(delta <= 0.3)
        );
        let sat = paired(name, &sat_ratio).1;
        if sat.is_finite() {
            println!(
                "{} {name}: saturation {sat:.2}x of one plain hop (target >= 0.7x)",
                verdict(sat >= 0.7)
            );
        }
    }
    for name in ["filter-cc0", "filter-cc100", "native-cc0", "native-cc100"] {
        if !setups.iter().any(|s| s.name == name) {
            continue;
        }
        let ratio = paired(name, &cpu_ratio).1;
        let form = if name.starts_with("native") {
            "native"
        } else {
            "wasm"
        };
        println!(
            "{} {name} ({form}): Envoy CPU/request {:+.1}% over plain Envoy (target within 10%; at saturation {:+.1}%)",
            verdict(ratio <= 1.10),
            (ratio - 1.0) * 100.0,
            (paired(name, &sat_cpu_ratio).1 - 1.0) * 100.0
        );
    }
    medians.insert("versus_envoy".into(), versus.into());
    medians.into()
}

fn existing(path: &Path) -> Result<PathBuf> {
    std::fs::canonicalize(path).with_context(|| format!("{}: build it first", path.display()))
}

/// ENVOY_BIN, else the real binary in .venv (not the Python launcher: its process would be the one
/// measured, and it adds a start-up).
fn find_envoy(given: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = given {
        return existing(p);
    }
    if let Some(p) = std::env::var_os("ENVOY_BIN").filter(|v| !v.is_empty()) {
        return existing(Path::new(&p));
    }
    for lib in std::fs::read_dir(".venv/lib").context(".venv/lib: run scripts/setup")? {
        let bin = lib?.path().join("site-packages/envoy/_bin/envoy");
        if bin.is_file() {
            return existing(&bin);
        }
    }
    bail!("no Envoy in .venv: run scripts/setup, or set ENVOY_BIN")
}

fn wait_until_200(
    target: &Target,
    timeout: Duration,
    what: &str,
    log: Option<&Path>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(200) = loadgen::get_status(target, Duration::from_secs(2)) {
            return Ok(());
        }
        if Instant::now() > deadline {
            let tail = log
                .and_then(|p| std::fs::read_to_string(p).ok())
                .map(|l| {
                    l.lines()
                        .rev()
                        .take(20)
                        .collect::<Vec<_>>()
                        .into_iter()
                        .rev()
                        .collect::<Vec<_>>()
                        .join("\n")
                })
                .unwrap_or_default();
            bail!(
                "{what} did not answer 200 at {} within {timeout:?}\n{tail}",
                target.addr
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Two hops in one Envoy, as `sluice up`'s serving path: the gateway listener routes to the instance
/// stage, whose listener runs the native queue-proxy filter and routes to the upstream. The stages are
/// joined by a loopback TCP connection (what sluice up does today) or by an internal listener
/// (`envoy.bootstrap.internal_listener`: the connection stays in user space).
fn two_hops_bootstrap(
    port: u16,
    admin: u16,
    upstream: u16,
    module: &Path,
    config: &str,
    internal: bool,
) -> String {
    let instance_port = free_port();
    let (extensions, instance_address, instance_endpoint) = if internal {
        (
            r#"bootstrap_extensions:
- name: envoy.bootstrap.internal_listener
  typed_config: {"@type": type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener}
"#
            .to_string(),
            "internal_listener: {}".to_string(),
            "{envoy_internal_address: {server_listener_name: instance}}".to_string(),
        )
    } else {
        (
            String::new(),
            format!(
                "address: {{socket_address: {{address: 127.0.0.1, port_value: {instance_port}}}}}"
            ),
            format!("{{socket_address: {{address: 127.0.0.1, port_value: {instance_port}}}}}"),
        )
    };
    let hcm = |name: &str, cluster: &str, filter: &str| {
        format!(
            r#"
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {name}
          route_config:
            virtual_hosts:
            - {{name: all, domains: ["*"], routes: [{{match: {{prefix: "/"}}, route: {{cluster: {cluster}, timeout: 0s}}}}]}}
          http_filters:{filter}
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}"#
        )
    };
    let filter = format!(
        r#"
          - name: envoy.filters.http.dynamic_modules
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter
              dynamic_module_config: {{module: {{local: {{filename: {module}}}}}, do_not_close: true, metrics_namespace: sluice}}
              filter_name: queue-proxy
              filter_config:
                "@type": type.googleapis.com/google.protobuf.StringValue
                value: '{config}'"#,
        module = module.display()
    );
    format!(
        r#"{extensions}admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}
static_resources:
  listeners:
  - name: gateway
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}{gateway}
  - name: instance
    {instance_address}{instance}
  clusters:
  - name: to_instance
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: to_instance
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {instance_endpoint}}}}}]}}]
  - name: app
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: app
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {upstream}}}}}}}}}]}}]
"#,
        gateway = hcm("gateway", "to_instance", ""),
        instance = hcm("instance", "app", &filter),
    )
}

/// The bootstrap of bench-queue-proxy: one listener routing everything to the upstream, with the
/// filter before the router when given.
fn bootstrap(name: &str, port: u16, admin: u16, upstream: u16, filter: Option<&Filter>) -> String {
    let filter = match filter {
        None => String::new(),
        Some(Filter::Native(module, config)) => format!(
            r#"
          - name: envoy.filters.http.dynamic_modules
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter
              dynamic_module_config: {{module: {{local: {{filename: {module}}}}}, do_not_close: true, metrics_namespace: sluice}}
              filter_name: queue-proxy
              filter_config:
                "@type": type.googleapis.com/google.protobuf.StringValue
                value: '{config}'"#,
            module = module.display()
        ),
        Some(Filter::Wasm(code, config)) => format!(
            r#"
          - name: envoy.filters.http.wasm
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: queue-proxy
                vm_config:
                  vm_id: bench-{name}
                  runtime: envoy.wasm.runtime.v8
                  code: {{local: {{filename: {code}}}}}
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: '{config}'"#,
            code = code.display()
        ),
    };
    format!(
        r#"admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}
static_resources:
  listeners:
  - name: instance
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: instance
          route_config:
            virtual_hosts:
            - {{name: all, domains: ["*"], routes: [{{match: {{prefix: "/"}}, route: {{cluster: instance, timeout: 0s}}}}]}}
          http_filters:{filter}
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
  - name: instance
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: instance
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {upstream}}}}}}}}}]}}]
"#
    )
}

fn start_envoy(
    bin: &Path,
    dir: &Path,
    name: &str,
    render: impl Fn(u16, u16) -> String,
    core: usize,
) -> Result<(ChildGuard, Target)> {
    let (port, admin) = (free_port(), free_port());
    let config = dir.join(format!("{name}.yaml"));
    std::fs::write(&config, render(port, admin))?;
    let log_path = dir.join(format!("{name}.log"));
    let log = std::fs::File::create(&log_path)?;
    let mut cmd = Command::new(bin);
    cmd.arg("-c")
        .arg(&config)
        .args(["--concurrency", "1", "--disable-hot-restart", "-l", "warn"])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let guard = ChildGuard::spawn_pinned(cmd, core)?;
    let target = Target {
        addr: ([127, 0, 0, 1], port).into(),
        host: "bench".into(),
    };
    wait_until_200(
        &target,
        Duration::from_secs(30),
        &format!("Envoy {name}"),
        Some(&log_path),
    )?;
    Ok((guard, target))
}

/// A Knative Service running the fast upstream as its app, always one instance, never behind the
/// activator (target burst capacity 0).
fn service_yaml(name: &str, cc: u32, app: &Path) -> String {
    format!(
        "apiVersion: serving.knative.dev/v1
kind: Service
metadata:
  name: {name}
  namespace: default
spec:
  template:
    metadata:
      annotations:
        autoscaling.knative.dev/min-scale: \"1\"
        autoscaling.knative.dev/max-scale: \"1\"
        autoscaling.knative.dev/target-burst-capacity: \"0\"
    spec:
      containerConcurrency: {cc}
      containers:
      - image: app
        command: [\"{}\"]
",
        app.display()
    )
}

/// `sluice up` with Services cc0 and cc100, its Envoy on one worker; returns once both answer through
/// the gateway in Serve mode (no activator in the path). The control plane and the apps stay on the
/// load core (inherited); its Envoy is moved to the Envoy core by [`sluice_envoy`].
fn start_sluice(
    args: &Args,
    envoy: &Path,
    app: &Path,
    root: &Path,
    native: bool,
) -> Result<(SluiceGuard, u16)> {
    let sluice = existing(&args.sluice)?;
    let wasm = existing(&args.queue_proxy_wasm)?;
    let form = if native { "native" } else { "wasm" };
    let dir = root.join("services");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("cc0.yaml"), service_yaml("cc0", 0, app))?;
    std::fs::write(dir.join("cc100.yaml"), service_yaml("cc100", 100, app))?;
    let (external, control) = (free_port(), free_port());
    let log_path = root.join("sluice.log");
    let log = std::fs::File::create(&log_path)?;
    let mut cmd = Command::new(&sluice);
    if native {
        cmd.env(
            "SLUICE_QUEUE_PROXY_NATIVE",
            existing(&args.queue_proxy_native)?,
        );
    }
    cmd.arg("up")
        .args(["--runtime", "process"])
        .arg(&dir)
        .args(["--envoy-concurrency", "1"])
        .args(["--external-port", &external.to_string()])
        .args(["--internal-port", &free_port().to_string()])
        .args(["--tls-port", &free_port().to_string()])
        .args(["--admin-port", &free_port().to_string()])
        .args(["--xds-port", &free_port().to_string()])
        .args(["--control-port", &control.to_string()])
        .args(["--activator-port", &free_port().to_string()])
        .arg("--state-dir")
        .arg(root.join("state"))
        .env("ENVOY_BIN", envoy)
        .args(["--queue-proxy", form])
        .env("SLUICE_QUEUE_PROXY_WASM", &wasm)
        .env("SLUICE_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: prctl only, between fork and exec.
    unsafe {
        use std::os::unix::process::CommandExt;
        // SIGTERM if this driver dies: `sluice up` then stops its Envoy and apps itself.
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM, 0, 0, 0);
            Ok(())
        });
    }
    let guard = SluiceGuard {
        child: cmd.spawn().context("starting sluice up")?,
        grace: Duration::from_secs(15),
    };
    let status_target = Target {
        addr: ([127, 0, 0, 1], control).into(),
        host: "localhost".into(),
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if serve_mode(&status_target, &["cc0-00001", "cc100-00001"]) {
            break;
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            bail!("sluice up: cc0 and cc100 not in Serve mode within 120 s; its log:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let gateway: SocketAddr = ([127, 0, 0, 1], external).into();
    for host in ["cc0", "cc100"] {
        let target = Target {
            addr: gateway,
            host: format!("{host}.default.localhost"),
        };
        wait_until_200(&target, Duration::from_secs(30), host, Some(&log_path))?;
    }
    // Serve mode is reported when it is decided; give the EDS update time to reach Envoy.
    std::thread::sleep(Duration::from_secs(1));
    Ok((guard, external))
}

/// Whether every named revision is in Serve mode with a ready instance, per `sluice up`'s /status.
fn serve_mode(control: &Target, revisions: &[&str]) -> bool {
    let Ok(status) = get_json(control, "/status") else {
        return false;
    };
    revisions.iter().all(|name| {
        status["revisions"].as_array().is_some_and(|revs| {
            revs.iter().any(|r| {
                r["metadata"]["name"] == *name && r["mode"] == "Serve" && r["readyInstances"] == 1
            })
        })
    })
}

fn get_json(target: &Target, path: &str) -> Result<Value> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        use http_body_util::BodyExt;
        use hyper_util::client::legacy::Client;
        let client: Client<_, http_body_util::Empty<bytes::Bytes>> =
            Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
        let resp = client
            .get(format!("http://{}{path}", target.addr).parse()?)
            .await?;
        let body = resp.into_body().collect().await?.to_bytes();
        Ok(serde_json::from_slice(&body)?)
    })
}

/// The Envoy that `sluice up` (pid `parent`) runs, pinned to `core`; its pid.
fn sluice_envoy(parent: u32, core: usize) -> Result<u32> {
    let envoys = children_named(parent, "envoy");
    let [pid] = envoys[..] else {
        bail!(
            "sluice up (pid {parent}) has {} Envoy children, want 1",
            envoys.len()
        );
    };
    pin_process(pid, core)?;
    Ok(pid)
}
