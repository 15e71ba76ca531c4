//! `fulcrum`: parses arguments and starts the controller, the shell or the package tools.

mod pkg;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// Big objects are copied and freed whole once per commit batch (a 5,000-server pool is tens of
/// thousands of small allocations); mimalloc does that two to three times faster than glibc's
/// malloc, which also grows its per-thread heaps a page at a time with a system call each.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "fulcrum", version, about = "A controller for load-balancer fleets, compatible with the Avi REST API")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller on its embedded store.
    Serve {
        /// Address to listen on (port 0 picks a free one; the chosen address is printed).
        #[arg(long, default_value = "127.0.0.1:9443")]
        listen: SocketAddr,
        /// Where the store, the TLS certificate and the initial admin password live.
        #[arg(long, default_value = "./fulcrum-data")]
        data_dir: PathBuf,
        /// Serve plain HTTP instead of HTTPS.
        #[arg(long)]
        plain_http: bool,
        /// Log as JSON lines instead of text.
        #[arg(long)]
        log_json: bool,
        /// A public key whose package signatures are trusted (repeatable; DATA/trusted-keys/*.pub
        /// are trusted too).
        #[arg(long = "trusted-key")]
        trusted_keys: Vec<PathBuf>,
        /// Seconds between an SE agent's heartbeats.
        #[arg(long, default_value = "10", value_parser = seconds)]
        se_heartbeat_interval: Duration,
        /// Seconds without a heartbeat after which an SE is marked down.
        #[arg(long, default_value = "30", value_parser = seconds)]
        se_down_after: Duration,
        /// Seconds a newly installed SE slot has to come up healthy before the agent switches back.
        #[arg(long, default_value = "120", value_parser = seconds)]
        se_health_timeout: Duration,
        /// Seconds a client has to send a request's headers (and, under HTTPS, its handshake).
        #[arg(long, default_value = "10", value_parser = seconds)]
        header_timeout: Duration,
        /// Seconds a connection may sit idle (no request, no traffic) before it is closed.
        #[arg(long, default_value = "120", value_parser = seconds)]
        idle_timeout: Duration,
        /// Seconds a request body may go without a byte arriving (then it must also average 1 KiB/s).
        #[arg(long, default_value = "30", value_parser = seconds)]
        body_timeout: Duration,
        /// Connections served at once; more are answered 503 (lowered to fit the open-files limit).
        #[arg(long, default_value = "4096")]
        max_connections: usize,
        /// Connections one client address may hold at once.
        #[arg(long, default_value = "1024")]
        max_connections_per_client: usize,
        /// Keep the store in this etcd cluster (comma-separated client URLs) instead of the data
        /// dir, as one controller of a cluster. The etcd members need --max-txn-ops 4096.
        #[arg(long, value_delimiter = ',')]
        etcd: Vec<String>,
        /// This controller's name in the cluster (default: the host name).
        #[arg(long)]
        node_name: Option<String>,
        /// The URL other nodes and clients reach this controller at (default: from --listen).
        #[arg(long)]
        advertise: Option<String>,
        /// Seconds the leader's lease lasts without renewal: how soon a lost leader is replaced.
        #[arg(long, default_value = "2", value_parser = seconds)]
        lease_ttl: Duration,
    },
    /// An interactive shell against a controller, like the controller's own CLI.
    Shell {
        /// The controller's URL, for example https://127.0.0.1:9443.
        #[arg(long, default_value = "https://127.0.0.1:9443")]
        controller: String,
        #[arg(long, default_value = "admin")]
        user: String,
        /// The password (asked for, without echo, when neither this nor FULCRUM_PASSWORD is set).
        #[arg(long, env = "FULCRUM_PASSWORD", hide_env_values = true)]
        password: Option<String>,
        /// Tenant to work in.
        #[arg(long, default_value = "admin")]
        tenant: String,
        /// Verify the controller's certificate against this CA file (by default the
        /// controller's self-signed certificate is accepted, like `curl -k`).
        #[arg(long)]
        ca_cert: Option<PathBuf>,
        /// Run one command and exit.
        #[arg(short = 'c', long = "command")]
        command: Option<String>,
    },
    /// Run a service engine agent: join a controller, heartbeat, serve, install images.
    SeAgent {
        /// The controller's URL, or every node of a cluster (`URL,URL,...`); more are learned at join.
        #[arg(long)]
        controller: String,
        /// A join token of the SE group to join (needed the first time only).
        #[arg(long, env = "FULCRUM_JOIN_TOKEN")]
        join_token: Option<String>,
        /// Where the agent keeps its identity, state and image slots.
        #[arg(long)]
        data_dir: PathBuf,
        /// The SE's name (default: the host name; with --simulate, a prefix).
        #[arg(long)]
        name: Option<String>,
        /// Verify the controller's certificate against this CA file (by default the join token's
        /// certificate fingerprint is checked).
        #[arg(long)]
        ca_cert: Option<PathBuf>,
        /// Accept any controller certificate (labs only: an impostor could take the join token).
        #[arg(long)]
        insecure: bool,
        /// Cores to report (default: this machine's; 1 per simulated SE).
        #[arg(long)]
        cores: Option<u32>,
        /// Run this many SEs in one process, each with its own data dir under --data-dir (they
        /// record what is placed on them but carry no traffic).
        #[arg(long)]
        simulate: Option<usize>,
        /// Serve the data plane's Prometheus metrics (`GET /metrics`) on this address.
        #[arg(long)]
        metrics_listen: Option<std::net::SocketAddr>,
        #[arg(long)]
        log_json: bool,
    },
    /// Make and check software packages.
    #[command(subcommand)]
    Pkg(pkg::PkgCommand),
    /// Repair a stopped controller's data directory from its host.
    #[command(subcommand)]
    Admin(AdminCommand),
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Give a user a new password and full administrative rights again (run with the
    /// controller stopped; the way back in when no administrator can log in).
    ResetPassword {
        #[arg(long, default_value = "./fulcrum-data")]
        data_dir: PathBuf,
        #[arg(long, default_value = "admin")]
        user: String,
        /// The new password (else FULCRUM_ADMIN_PASSWORD; else one is generated and printed).
        #[arg(long, env = "FULCRUM_ADMIN_PASSWORD", hide_env_values = true)]
        password: Option<String>,
    },
}

/// A duration in (possibly fractional) seconds.
fn seconds(text: &str) -> Result<Duration, String> {
    match text.parse::<f64>() {
        Ok(s) if s > 0.0 && s < 1e9 => Ok(Duration::from_secs_f64(s)),
        _ => Err(format!("'{text}' is not a positive number of seconds")),
    }
}

fn init_logs(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FULCRUM_LOG").unwrap_or_else(|_| "info".into());
    // Colour codes only for a person at a terminal: a log file or journal must stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    if json { builder.json().init() } else { builder.init() }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
    tracing::info!("signal received");
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Serve {
            listen,
            data_dir,
            plain_http,
            log_json,
            trusted_keys,
            se_heartbeat_interval,
            se_down_after,
            se_health_timeout,
            header_timeout,
            idle_timeout,
            body_timeout,
            max_connections,
            max_connections_per_client,
            etcd,
            node_name,
            advertise,
            lease_ttl,
        } => {
            init_logs(log_json);
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
            let engines = fulcrum_api::engines::EngineSettings {
                heartbeat_interval: se_heartbeat_interval,
                down_after: se_down_after,
                health_timeout: se_health_timeout,
            };
            let limits = fulcrum_api::connections::Limits {
                header_timeout,
                idle_timeout,
                body_timeout,
                max_connections,
                max_connections_per_client,
            };
            let cluster = (!etcd.is_empty()).then(|| fulcrum_api::ClusterConfig {
                etcd,
                node_name: node_name.unwrap_or_else(|| {
                    std::fs::read_to_string("/etc/hostname")
                        .map(|h| h.trim().to_string())
                        .unwrap_or_else(|_| "fulcrum".into())
                }),
                advertise,
                lease_ttl,
            });
            let config =
                fulcrum_api::ServeConfig { listen, data_dir, plain_http, trusted_keys, engines, limits, cluster };
            match runtime.block_on(fulcrum_api::serve(config, shutdown_signal())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("fulcrum: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::SeAgent {
            controller,
            join_token,
            data_dir,
            name,
            ca_cert,
            insecure,
            cores,
            simulate,
            metrics_listen,
            log_json,
        } => {
            init_logs(log_json);
            let options = fulcrum_agent::Options {
                controller,
                join_token,
                data_dir,
                name,
                ca_file: ca_cert,
                insecure,
                cores,
                metrics_listen,
                base_version: fulcrum_api::version::VERSION.into(),
                base_build: fulcrum_api::version::BUILD,
            };
            let outcome = match simulate {
                Some(n) => fulcrum_agent::simulate(options, n),
                None => fulcrum_agent::run(options),
            };
            match outcome {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("fulcrum se-agent: {e}");
                    ExitCode::from(3)
                }
            }
        }
        Command::Admin(AdminCommand::ResetPassword { data_dir, user, password }) => {
            let generated = password.is_none();
            let password = password.unwrap_or_else(|| fulcrum_api::auth::random_token(16));
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
            match runtime.block_on(fulcrum_api::server::reset_password(&data_dir, &user, &password)) {
                Ok(()) => {
                    if generated {
                        println!("New password for {user}: {password}");
                    } else {
                        println!("Password for {user} set.");
                    }
                    println!("{user} has System-Admin in all tenants again; start the controller and log in.");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("fulcrum admin reset-password: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Pkg(command) => match pkg::run(command) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("fulcrum pkg: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Shell { controller, user, password, tenant, ca_cert, command } => {
            let password = match password
                .map_or_else(|| fulcrum_shell::terminal::read_password(&format!("Password for {user}: ")), Ok)
            {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("fulcrum shell: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let options = fulcrum_shell::Options { controller, user, password, tenant, ca_file: ca_cert };
            match fulcrum_shell::run(options, command.as_deref()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("fulcrum shell: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
