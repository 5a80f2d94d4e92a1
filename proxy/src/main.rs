//! The `breakwater` command: parses arguments, sets up logging, and calls the
//! library.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "breakwater",
    version,
    about = "A rate-limiting reverse proxy for the Kubernetes API server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start-up; the size of the enum does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the proxy in front of an apiserver.
    Run(breakwater::config::RunOptions),
    /// Run kube-sim behind the proxy on loopback, with ready-made kubeconfigs.
    #[cfg(feature = "demo")]
    Demo {
        /// Directory for certificates and kubeconfigs.
        #[arg(long, default_value = "./breakwater-demo")]
        dir: std::path::PathBuf,
        /// The proxy's port on 127.0.0.1 (0 = any free port).
        #[arg(long, default_value_t = 0)]
        port: u16,
        /// kube-sim's port on 127.0.0.1 (0 = any free port).
        #[arg(long, default_value_t = 0)]
        sim_port: u16,
        /// The admin listener's port on 127.0.0.1 (0 = any free port).
        #[arg(long, default_value_t = 0)]
        admin_port: u16,
    },
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("BREAKWATER_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,breakwater::access=info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(opts) => {
            init_tracing();
            let cfg = opts.resolve()?;
            let handle = breakwater::server::start(cfg).await?;
            // Scripts (and the loadtest crate) read these two lines.
            println!("breakwater: listening on https://{}", handle.addr());
            println!("breakwater: admin on http://{}", handle.admin_addr());
            shutdown_signal().await;
            tracing::info!("shutdown signal received");
            handle.shutdown().await;
        }
        #[cfg(feature = "demo")]
        Command::Demo {
            dir,
            port,
            sim_port,
            admin_port,
        } => {
            init_tracing();
            let opts = breakwater::demo::DemoOptions {
                dir,
                port,
                sim_port,
                admin_port,
            };
            breakwater::demo::run(opts, shutdown_signal()).await?;
        }
    }
    Ok(())
}
