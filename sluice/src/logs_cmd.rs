//! `sluice logs SERVICE`: the output of a Knative Service's instances, as kept by `sluice up`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, bail};
use sluice_runtime::{LogFollower, LogQuery, read_logs};

/// Where `sluice up` keeps run-time files unless told otherwise (relative to where it runs).
pub const DEFAULT_STATE_DIR: &str = ".sluice";

#[derive(clap::Args)]
pub struct LogsArgs {
    /// The Knative Service (or, with --revision, the Revision).
    name: String,
    #[arg(short, long, default_value = "default")]
    namespace: String,
    /// NAME is a Revision, not a Service.
    #[arg(long)]
    revision: bool,
    /// Keep printing new lines.
    #[arg(short, long)]
    follow: bool,
    /// The state folder `sluice up` was given.
    #[arg(long, default_value = DEFAULT_STATE_DIR, env = "SLUICE_STATE_DIR")]
    state_dir: PathBuf,
}

pub async fn run(args: LogsArgs) -> Result<()> {
    let query = if args.revision {
        LogQuery::revision(&args.namespace, &args.name)
    } else {
        LogQuery::service(&args.namespace, &args.name)
    };
    if args.follow {
        let mut follower = LogFollower::new(&args.state_dir, query);
        loop {
            for line in follower.poll()? {
                println!("{line}");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    let lines = read_logs(&args.state_dir, &query)?;
    if lines.is_empty() {
        bail!(
            "no logs for {} {}/{} under {} (is it the state folder `sluice up` used?)",
            if args.revision { "revision" } else { "service" },
            args.namespace,
            args.name,
            args.state_dir.display()
        );
    }
    for line in lines {
        println!("{line}");
    }
    Ok(())
}
