//! `sluice`: Knative's data plane on Envoy. `sluice up DIR` runs the xds-server and an Envoy gateway
//! from a folder of Knative YAML; `sluice status` shows what it serves.

mod broker_cmd;
mod envoy;
mod envoy_supervisor;
mod eventing;
mod http;
mod launch;
mod logs_cmd;
mod metrics;
mod runtime_choice;
mod serving;
mod state_file;
mod status_cmd;
mod up;
mod xds_cmd;
mod xds_replicas;

use clap::{Parser, Subcommand};

// mimalloc rather than glibc malloc: the broker allocates and frees per event on every worker thread,
// and glibc's arenas (malloc, free, consolidation, arena locks) were about 30% of its CPU (perf).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "Knative's serving and eventing data plane on Envoy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the stack from a folder of Knative YAML, applying changes to the folder while running.
    Up(up::UpArgs),
    /// Show the Ingresses `sluice up` serves, their status, and problems with the folder's files.
    Status(status_cmd::StatusArgs),
    /// Run only the xds-server (for a cluster: Envoy gateways connect to it over ADS). With --kube,
    /// several replicas may run: all serve ADS, the holder of a Lease writes status. Stops cleanly on
    /// SIGTERM (releases the Lease, closes ADS streams, exits 0).
    Xds(xds_cmd::XdsArgs),
    /// Print the Envoy bootstrap (JSON) for a gateway that gets everything from `sluice xds` over ADS
    /// (with --xds-client-cert/-key/--xds-ca: over mTLS, written with its SDS files to --output-dir).
    Bootstrap(envoy::BootstrapArgs),
    /// Print the output of a Knative Service's instances.
    Logs(logs_cmd::LogsArgs),
    /// Run only the eventing broker from a folder of Knative Eventing YAML.
    Broker(broker_cmd::BrokerArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match cli.command {
            Command::Up(args) => up::run(args).await,
            Command::Status(args) => status_cmd::run(args).await,
            Command::Xds(args) => xds_cmd::run(args).await,
            Command::Broker(args) => broker_cmd::run(args).await,
            Command::Logs(args) => logs_cmd::run(args).await,
            Command::Bootstrap(args) => args.run(),
        }
    })
}
