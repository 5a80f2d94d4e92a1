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
    /// Validate a limits file offline; with --request, explain which rule applies.
    CheckLimits {
        /// The limits file.
        file: std::path::PathBuf,
        /// A sample request, e.g. "GET /api/v1/pods?watch=1".
        #[arg(long)]
        request: Option<String>,
        /// The caller's user name.
        #[arg(long = "as", default_value = "system:anonymous")]
        user: String,
        /// The caller's groups (repeatable).
        #[arg(long = "group")]
        groups: Vec<String>,
        /// The Pod a bound ServiceAccount token of the caller names
        /// (for rules with `key: pod`).
        #[arg(long)]
        pod: Option<String>,
        /// The node a bound token of the caller names (for `key: node`).
        #[arg(long)]
        node: Option<String>,
    },
    /// Exit 0 when an admin endpoint answers 200 (an exec readiness probe for
    /// images without curl, e.g. a sidecar the kubelet cannot reach on 127.0.0.1).
    Probe {
        /// The endpoint to GET (plain HTTP).
        #[arg(long, default_value = "http://127.0.0.1:9444/readyz")]
        url: String,
        /// Give up after this long.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Who is loading the apiserver now: a terminal UI refreshing every second
    /// from an admin listener's /debug/top (q quits), or one snapshot with --once.
    Top {
        /// The admin listener.
        #[arg(long, default_value = "http://127.0.0.1:9444")]
        admin: String,
        /// Print one plain-text snapshot and exit (for scripts).
        #[arg(long)]
        once: bool,
        /// The column to sort by.
        #[arg(long, value_enum, default_value_t = breakwater::top::render::SortBy::Requests)]
        sort: breakwater::top::render::SortBy,
        /// With --once: how many identities to list.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Block a ServiceAccount, user, rule, Pod, node or request pattern at once
    /// (the emergency brake), through the proxy's admin listener.
    #[command(after_help = breakwater::blockctl::BLOCK_EXAMPLES)]
    Block(breakwater::blockctl::BlockArgs),
    /// List the blocks in force, with how many requests each refused.
    Blocks(breakwater::blockctl::BlocksArgs),
    /// Remove blocks: by id, every one (--all), or those whose time is up
    /// (--all-expired).
    Unblock(breakwater::blockctl::UnblockArgs),
    /// Run kube-sim behind the proxy on loopback, with ready-made kubeconfigs.
    #[cfg(feature = "demo")]
    Demo {
        /// A limits file for the proxy.
        #[arg(long)]
        limits: Option<std::path::PathBuf>,
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
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    // One buffered, ordered sink for every line; access lines batched.
    let sink = breakwater::logsink::install(!ansi);
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(sink)
        .with_ansi(ansi)
        .init();
}

/// SIGHUP re-reads the limits file and the certificates. Never returns
/// (without a handler, SIGHUP is simply not handled).
async fn reload_on_sighup(handle: &breakwater::server::ProxyHandle) {
    #[cfg(unix)]
    if let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading limits and certificates");
            handle.reload();
        }
    }
    std::future::pending::<()>().await;
}

/// Resolves on SIGINT or SIGTERM. The handlers are installed when this is
/// called (not when first polled), so call it before announcing readiness:
/// a SIGTERM right after the readiness lines must drain, not kill.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let int = signal(SignalKind::interrupt());
        let term = signal(SignalKind::terminate());
        async move {
            match (int, term) {
                (Ok(mut int), Ok(mut term)) => {
                    tokio::select! {
                        _ = int.recv() => {}
                        _ = term.recv() => {}
                    }
                }
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// jemalloc: per-request allocations (hyper's and rustls's buffers of
/// 1–8 KiB, a few each) come from its thread caches; glibc's malloc takes
/// its locked bins for anything above 1 KiB. Measured on the unary
/// benchmark: about 15% less CPU per request (docs/benchmarks.md).
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read once when it initialises. One arena instead of
/// four per CPU: an idle watch's few long-lived allocations then share
/// pages with others instead of each arena keeping pages of its own
/// (measured: RSS per idle HTTP/2 watch stream 4.5–5.4 KiB, against
/// 5.9–6.9 with jemalloc's defaults and 4.5 with glibc). Thread caches up
/// to 16 KiB (jemalloc's default is 32): a request's TLS record and HTTP
/// buffers of 1–16 KiB are then taken and freed without the arena's lock
/// (5% fewer instructions per proxied request than with caches up to
/// 1 KiB, at the same RSS per idle watch; docs/benchmarks.md, §1e).
/// Operators can still override it with `_RJEM_MALLOC_CONF`.
// Justification for `unsafe`: exporting a symbol is unsafe only because
// two exports of one name would clash; jemalloc reads this NUL-terminated
// static string, and nothing else in the program defines the symbol.
#[allow(unsafe_code)]
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: &[u8; 27] = b"narenas:1,tcache_max:16384\0";

fn main() -> std::process::ExitCode {
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("breakwater: starting the runtime: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let code = rt.block_on(async_main());
    // Tasks end with the runtime; their access lines are written after.
    drop(rt);
    breakwater::logsink::flush();
    code
}

async fn async_main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli.command).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            // The whole chain, on one line: "starting the proxy: serving
            // TLS: reading tls.crt: No such file or directory (os error 2)".
            let err: &(dyn std::error::Error + 'static) = err.as_ref();
            breakwater::logsink::flush();
            eprintln!("breakwater: {}", breakwater::error::Chain(err));
            std::process::ExitCode::FAILURE
        }
    }
}

/// `block`, `blocks`, `unblock`: on failure, one `error: …` line per
/// problem (kubectl's form) and exit 1.
fn brake_cli(res: Result<(), breakwater::blockctl::CtlError>) {
    if let Err(err) = res {
        use std::io::Write;
        let _ = std::io::stdout().flush();
        for line in err.lines() {
            eprintln!("error: {line}");
        }
        std::process::exit(1);
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run(opts) => {
            init_tracing();
            let cfg = opts.resolve()?;
            let handle = breakwater::server::start(cfg).await?;
            let stop = shutdown_signal();
            // Scripts (and the loadtest crate) read these two lines.
            if let Some(plain) = handle.plain_addr() {
                println!("breakwater: plain HTTP on http://{plain}");
            }
            if let Some(privileged) = handle.privileged_addr() {
                println!("breakwater: privileged TLS on https://{privileged}");
            }
            println!("breakwater: listening on https://{}", handle.addr());
            println!("breakwater: admin on http://{}", handle.admin_addr());
            // SIGHUP is served on this task, beside the wait for SIGTERM:
            // nothing outlives the handle.
            tokio::select! {
                _ = stop => {}
                _ = reload_on_sighup(&handle) => {}
            }
            tracing::info!("shutdown signal received");
            handle.shutdown().await;
        }
        Command::CheckLimits {
            file,
            request,
            user,
            groups,
            pod,
            node,
        } => match breakwater::check::check_limits(
            &file,
            request.as_deref(),
            &breakwater::check::Caller {
                user: &user,
                groups: &groups,
                pod: pod.as_deref(),
                node: node.as_deref(),
            },
        ) {
            Ok(report) => print!("{report}"),
            Err(problems) => {
                eprintln!("{problems}");
                std::process::exit(1);
            }
        },
        Command::Probe { url, timeout } => match breakwater::admin::probe(&url, timeout).await {
            Ok(()) => println!("ok: {url}"),
            Err(err) => {
                eprintln!("not ready: {}", breakwater::error::Chain(&err));
                std::process::exit(1);
            }
        },
        Command::Top {
            admin,
            once,
            sort,
            limit,
        } => {
            if once {
                print!(
                    "{}",
                    breakwater::top::client::once(&admin, sort, limit).await?
                );
            } else {
                breakwater::top::client::interactive(&admin, sort).await?;
            }
        }
        Command::Block(args) => {
            brake_cli(breakwater::blockctl::block(&args, &mut std::io::stdout()).await)
        }
        Command::Blocks(args) => {
            brake_cli(breakwater::blockctl::blocks(&args, &mut std::io::stdout()).await)
        }
        Command::Unblock(args) => {
            brake_cli(breakwater::blockctl::unblock(&args, &mut std::io::stdout()).await)
        }
        #[cfg(feature = "demo")]
        Command::Demo {
            limits,
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
                limits,
            };
            breakwater::demo::run(opts, shutdown_signal()).await?;
        }
    }
    Ok(())
}
