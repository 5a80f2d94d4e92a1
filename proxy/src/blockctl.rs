//! `breakwater block`, `blocks` and `unblock`: the emergency brake from the
//! command line, in kubectl's manner, over the admin listener's block API
//! (`/admin/v1/blocks`, see [`crate::admin`]).
//!
//! They talk only to the admin listener on the node (plain HTTP, 127.0.0.1
//! by default), never to the apiserver, so they work while it is down or
//! saturated. Errors are one line each (`error: …`, exit 1): what the
//! proxy answered, or that its admin listener cannot be reached.

use std::io::Write;
use std::time::{Duration, SystemTime};

use breakwater_limits::{Block, BlockRespond, BlockStatus, BlockTarget};
use serde_json::json;

use crate::admin_client::{AdminClient, AdminError};

/// The admin listener's default address.
pub const DEFAULT_ADMIN: &str = "http://127.0.0.1:9444";
/// Where the block API is.
const BLOCKS_PATH: &str = "/admin/v1/blocks";
/// How long one call may take (adding a terminating block ends its
/// streams before the answer).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// The identity of a ServiceAccount is this prefix, `NS:NAME`.
const SA_PREFIX: &str = "system:serviceaccount:";

/// Examples for `breakwater block --help`.
pub const BLOCK_EXAMPLES: &str = "\
Examples:
  # Stop a DaemonSet's agents for 30 minutes, ending their open watches now
  breakwater block serviceaccount monitoring/node-agent --for 30m --terminate --reason INC-1234

  # Refuse cluster-wide LISTs of pods with 403 (clients give up instead of retrying)
  breakwater block pattern --verb list --resource pods --cluster-wide --respond 403

  # One bad agent, or everything from one node
  breakwater block pod monitoring/node-agent-x7k2p --terminate
  breakwater block node worker-17

  # Everything a rule of the limits file governs
  breakwater block rule telemetry-agents --for 15m";

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Output {
    /// Human-readable.
    #[default]
    Table,
    /// The admin API's JSON.
    Json,
    /// `block/ID` per block.
    Name,
}

/// The admin listener to talk to, and how to print.
#[derive(Debug, Clone, clap::Args)]
pub struct Conn {
    /// The admin listener (plain HTTP, on the proxy's node).
    #[arg(long, value_name = "URL", default_value = DEFAULT_ADMIN, global = true)]
    pub admin: String,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table, global = true)]
    pub output: Output,
}

/// `breakwater block KIND [ARG] [flags]`.
#[derive(Debug, Clone, clap::Args)]
pub struct BlockArgs {
    #[command(subcommand)]
    pub target: TargetArg,
    #[command(flatten)]
    pub opts: BlockOpts,
}

/// What to block.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum TargetArg {
    /// Every request of a ServiceAccount (user system:serviceaccount:NS:NAME).
    #[command(name = "serviceaccount", visible_alias = "sa")]
    ServiceAccount {
        /// The ServiceAccount, as NAMESPACE/NAME.
        #[arg(value_name = "NS/NAME")]
        account: String,
    },
    /// Every request of a user, by exact name (as `breakwater top` shows it).
    User {
        #[arg(value_name = "NAME")]
        name: String,
    },
    /// Every request a rule of the limits file governs.
    Rule {
        #[arg(value_name = "NAME")]
        name: String,
    },
    /// Every request made with a bound token of one Pod (one agent of a DaemonSet).
    Pod {
        /// The Pod, as NAMESPACE/NAME.
        #[arg(value_name = "NS/NAME")]
        pod: String,
    },
    /// Every request of one node: its kubelet, and bound tokens of its Pods.
    Node {
        #[arg(value_name = "NAME")]
        name: String,
    },
    /// A request pattern, e.g. cluster-wide LISTs of pods; give exactly one
    /// of --namespace, --all-namespaces, --cluster-wide.
    Pattern {
        /// The verb (get, list, watch, create, ...; * for any).
        #[arg(long)]
        verb: String,
        /// The resource: RESOURCE or GROUP/RESOURCE.
        #[arg(long)]
        resource: String,
        /// Requests in namespaces matching this glob.
        #[arg(short = 'n', long, value_name = "GLOB")]
        namespace: Option<String>,
        /// Requests in any namespace, cluster-wide ones included.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        /// Only cluster-wide requests: all-namespaces LISTs and WATCHes,
        /// cluster-scoped resources.
        #[arg(long)]
        cluster_wide: bool,
    },
}

/// The flags every `block` takes.
#[derive(Debug, Clone, clap::Args)]
pub struct BlockOpts {
    /// Lift the block after this long (e.g. 30m, 2h); without it, until
    /// `breakwater unblock`.
    #[arg(long = "for", value_name = "DURATION", value_parser = parse_for, global = true)]
    pub duration: Option<Duration>,
    /// Also end the matching watches and streams open now.
    #[arg(long, global = true)]
    pub terminate: bool,
    /// The status refused requests get: 429 (clients back off and retry)
    /// or 403 (clients give up).
    #[arg(long, value_name = "429|403", default_value = "429", value_parser = parse_respond, global = true)]
    pub respond: BlockRespond,
    /// Why, for whoever lists the blocks later (e.g. an incident id).
    #[arg(long, value_name = "TEXT", global = true)]
    pub reason: Option<String>,
    /// Block even exempt traffic (admins a rule keeps a path open for).
    #[arg(long, global = true)]
    pub force: bool,
    /// The block's id (default: a random one).
    #[arg(long, value_name = "ID", global = true)]
    pub id: Option<String>,
    #[command(flatten)]
    pub conn: Conn,
}

/// `breakwater blocks [flags]`.
#[derive(Debug, Clone, clap::Args)]
pub struct BlocksArgs {
    #[command(flatten)]
    pub conn: Conn,
}

/// `breakwater unblock (ID... | --all | --all-expired) [flags]`.
#[derive(Debug, Clone, clap::Args)]
pub struct UnblockArgs {
    /// The blocks to remove (as `breakwater blocks` lists them; `block/ID` works too).
    #[arg(value_name = "ID")]
    pub ids: Vec<String>,
    /// Remove every block.
    #[arg(long)]
    pub all: bool,
    /// Remove the blocks whose time is up (the proxy also drops them
    /// within seconds).
    #[arg(long)]
    pub all_expired: bool,
    /// The admin listener (plain HTTP, on the proxy's node).
    #[arg(long, value_name = "URL", default_value = DEFAULT_ADMIN)]
    pub admin: String,
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error(transparent)]
    Admin(#[from] AdminError),
    /// The arguments do not make a request.
    #[error("{0}")]
    Usage(String),
    #[error("no block with id \"{0}\" (see `breakwater blocks`)")]
    NotFound(String),
    #[error("writing the output")]
    Output(#[from] std::io::Error),
    /// Several ids failed (each is one line).
    #[error("{} blocks could not be removed", .0.len())]
    Several(Vec<CtlError>),
}

impl CtlError {
    /// The lines to print, each after `error: `.
    pub fn lines(&self) -> Vec<String> {
        match self {
            CtlError::Several(all) => all.iter().flat_map(CtlError::lines).collect(),
            other => vec![crate::error::Chain(other).to_string()],
        }
    }
}

fn parse_for(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d.is_zero() {
        return Err("must be longer than 0 (leave --for out to block until unblocked)".into());
    }
    Ok(d)
}

fn parse_respond(s: &str) -> Result<BlockRespond, String> {
    s.parse::<u16>()
        .ok()
        .and_then(|code| BlockRespond::try_from(code).ok())
        .ok_or_else(|| format!("must be 429 or 403, not {s:?}"))
}

/// `NS/NAME` → `(NS, NAME)`.
fn ns_name<'a>(kind: &str, arg: &'a str) -> Result<(&'a str, &'a str), CtlError> {
    match arg.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok((ns, name))
        }
        _ => Err(CtlError::Usage(format!(
            "{kind} wants NAMESPACE/NAME (e.g. monitoring/node-agent), not {arg:?}"
        ))),
    }
}

/// Ids the CLI creates and names: what fits in a URL path as it is.
fn check_id(id: &str) -> Result<&str, CtlError> {
    if !id.is_empty()
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
    {
        Ok(id)
    } else {
        Err(CtlError::Usage(format!(
            "{id:?} cannot be a block id: use letters, digits, '-', '_', '.', ':'"
        )))
    }
}

impl TargetArg {
    /// The block target the arguments name.
    pub fn target(&self) -> Result<BlockTarget, CtlError> {
        Ok(match self {
            TargetArg::ServiceAccount { account } => {
                let (ns, name) = ns_name("serviceaccount", account)?;
                BlockTarget::Identity {
                    user: format!("{SA_PREFIX}{ns}:{name}"),
                }
            }
            TargetArg::User { name } => BlockTarget::Identity { user: name.clone() },
            TargetArg::Rule { name } => BlockTarget::Rule { name: name.clone() },
            TargetArg::Pod { pod } => {
                let (ns, name) = ns_name("pod", pod)?;
                BlockTarget::Pod {
                    namespace: ns.to_string(),
                    name: name.to_string(),
                }
            }
            TargetArg::Node { name } => BlockTarget::Node { name: name.clone() },
            TargetArg::Pattern {
                verb,
                resource,
                namespace,
                all_namespaces,
                cluster_wide,
            } => {
                let namespace = match (namespace, all_namespaces, cluster_wide) {
                    (Some(glob), false, false) => Some(glob.clone()),
                    (None, true, false) => Some("*".to_string()),
                    (None, false, true) => None,
                    _ => {
                        return Err(CtlError::Usage(
                            "a pattern needs exactly one of --namespace GLOB, --all-namespaces, \
                             --cluster-wide (cluster-wide requests only)"
                                .into(),
                        ));
                    }
                };
                BlockTarget::Pattern {
                    verb: verb.clone(),
                    resource: resource.clone(),
                    namespace,
                }
            }
        })
    }
}

impl BlockArgs {
    /// The `POST /admin/v1/blocks` body, expiring `--for` after `now`.
    pub fn request(&self, now: SystemTime) -> Result<serde_json::Value, CtlError> {
        let o = &self.opts;
        let target = self.target.target()?;
        let expires_at = o
            .duration
            .map(|d| humantime::format_rfc3339_millis(now + d).to_string());
        let mut body = json!({
            "target": target,
            "expiresAt": expires_at,
            "respond": o.respond.code(),
            "force": o.force,
            "terminate": o.terminate,
            "reason": o.reason,
        });
        if let Some(id) = &o.id {
            body["id"] = json!(check_id(id)?);
        }
        Ok(body)
    }
}

fn client(admin: &str) -> Result<AdminClient, CtlError> {
    Ok(AdminClient::new(admin, CALL_TIMEOUT)?)
}

fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// `breakwater block`: adds the block and prints it.
pub async fn block<W: Write>(args: &BlockArgs, out: &mut W) -> Result<(), CtlError> {
    let body = args.request(SystemTime::now())?;
    let client = client(&args.opts.conn.admin)?;
    let status: BlockStatus = client.post(BLOCKS_PATH, &body).await?;
    let id = &status.block.id;
    match args.opts.conn.output {
        Output::Json => writeln!(out, "{}", pretty(&status))?,
        Output::Name => writeln!(out, "block/{id}")?,
        Output::Table if status.block.terminate => writeln!(
            out,
            "block/{id} created; ended {} now",
            plural(status.terminated, "open request", "open requests")
        )?,
        Output::Table => writeln!(out, "block/{id} created")?,
    }
    Ok(())
}

/// `breakwater blocks`: lists the blocks with their counts.
pub async fn blocks<W: Write>(args: &BlocksArgs, out: &mut W) -> Result<(), CtlError> {
    let client = client(&args.conn.admin)?;
    let list: Vec<BlockStatus> = client.get(BLOCKS_PATH).await?;
    match args.conn.output {
        Output::Json => writeln!(out, "{}", pretty(&list))?,
        Output::Name => {
            for s in &list {
                writeln!(out, "block/{}", s.block.id)?;
            }
        }
        Output::Table if list.is_empty() => writeln!(out, "No blocks.")?,
        Output::Table => write!(out, "{}", table(&list, SystemTime::now()))?,
    }
    Ok(())
}

/// `breakwater unblock`: removes the blocks named (all of them, or the
/// expired ones), printing each. Every id is tried; the unknown ones are
/// the error.
pub async fn unblock<W: Write>(args: &UnblockArgs, out: &mut W) -> Result<(), CtlError> {
    let bulk = args.all || args.all_expired;
    if (args.all && args.all_expired) || (bulk && !args.ids.is_empty()) {
        return Err(CtlError::Usage(
            "give block ids, --all or --all-expired, not several of them".into(),
        ));
    }
    if !bulk && args.ids.is_empty() {
        return Err(CtlError::Usage(
            "name the blocks to remove (see `breakwater blocks`), or give --all or --all-expired"
                .into(),
        ));
    }
    let ids: Vec<&str> = args
        .ids
        .iter()
        .map(|id| id.strip_prefix("block/").unwrap_or(id))
        .collect();
    for id in &ids {
        check_id(id)?;
    }
    let client = client(&args.admin)?;
    if !bulk {
        let mut failed = Vec::new();
        for id in ids {
            match delete(&client, id).await {
                Ok(true) => writeln!(out, "block/{id} deleted")?,
                Ok(false) => failed.push(CtlError::NotFound(id.to_string())),
                Err(err) => failed.push(err),
            }
        }
        return match failed.len() {
            0 => Ok(()),
            1 => Err(failed.remove(0)),
            _ => Err(CtlError::Several(failed)),
        };
    }
    let now = SystemTime::now();
    let list: Vec<BlockStatus> = client.get(BLOCKS_PATH).await?;
    let doomed: Vec<&Block> = list
        .iter()
        .map(|s| &s.block)
        .filter(|b| args.all || b.is_expired(now))
        .collect();
    if doomed.is_empty() {
        let none = if args.all {
            "No blocks."
        } else {
            "No expired blocks."
        };
        writeln!(out, "{none}")?;
    }
    for b in doomed {
        // Gone already: the proxy's own sweep of expired blocks, or
        // someone else, got there first.
        let done = if delete(&client, &b.id).await? {
            "deleted"
        } else {
            "already gone"
        };
        writeln!(out, "block/{} {done}", b.id)?;
    }
    Ok(())
}

/// DELETEs one block: false if there is no such block.
async fn delete(client: &AdminClient, id: &str) -> Result<bool, CtlError> {
    match client.delete::<Block>(&format!("{BLOCKS_PATH}/{id}")).await {
        Ok(_) => Ok(true),
        Err(err) if err.status() == Some(http::StatusCode::NOT_FOUND) => Ok(false),
        Err(err) => Err(err.into()),
    }
}

fn pretty<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string_pretty(value).unwrap_or_default()
}

/// What a block targets, in words: `serviceaccount monitoring/node-agent`,
/// `user alice`, `rule agents`, `pod ns/name`, `node n1`,
/// `pattern list pods (cluster-wide)`.
pub fn target_text(target: &BlockTarget) -> String {
    match target {
        BlockTarget::Identity { user } => {
            match user
                .strip_prefix(SA_PREFIX)
                .and_then(|rest| rest.split_once(':'))
            {
                Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains(':') => {
                    format!("serviceaccount {ns}/{name}")
                }
                _ => format!("user {user}"),
            }
        }
        BlockTarget::Rule { name } => format!("rule {name}"),
        BlockTarget::Pod { namespace, name } => format!("pod {namespace}/{name}"),
        BlockTarget::Node { name } => format!("node {name}"),
        BlockTarget::Pattern {
            verb,
            resource,
            namespace,
        } => match namespace.as_deref() {
            None => format!("pattern {verb} {resource} (cluster-wide)"),
            Some("*") => format!("pattern {verb} {resource} (all namespaces)"),
            Some(glob) => format!("pattern {verb} {resource} in {glob}"),
        },
    }
}

/// A duration as kubectl prints ages: `45s`, `3m10s`, `29m`, `150m`,
/// `5h30m`, `20h`, `3d2h`, `30d`, `2y`.
pub fn human_duration(d: Duration) -> String {
    let secs = d.as_secs();
    let (mins, hours) = (secs / 60, secs / 3600);
    let days = hours / 24;
    let with = |big: u64, unit: &str, small: u64, small_unit: &str| {
        if small == 0 {
            format!("{big}{unit}")
        } else {
            format!("{big}{unit}{small}{small_unit}")
        }
    };
    if secs < 120 {
        format!("{secs}s")
    } else if mins < 10 {
        with(mins, "m", secs % 60, "s")
    } else if mins < 3 * 60 {
        format!("{mins}m")
    } else if hours < 8 {
        with(hours, "h", mins % 60, "m")
    } else if hours < 48 {
        format!("{hours}h")
    } else if hours < 8 * 24 {
        with(days, "d", hours % 24, "h")
    } else if days < 2 * 365 {
        format!("{days}d")
    } else if days < 8 * 365 {
        with(days / 365, "y", days % 365, "d")
    } else {
        format!("{}y", days / 365)
    }
}

/// How long until the block lapses at `now`: `29m`, `never`, `expired`.
pub fn expires_text(block: &Block, now: SystemTime) -> String {
    match block.expires_at {
        None => "never".into(),
        Some(at) => match at.duration_since(now) {
            Ok(left) if !left.is_zero() => human_duration(left),
            _ => "expired".into(),
        },
    }
}

/// The blocks as a table at `now`, one line each under a header.
pub fn table(blocks: &[BlockStatus], now: SystemTime) -> String {
    let header = [
        "ID",
        "TARGET",
        "RESPOND",
        "TERMINATE",
        "EXPIRES",
        "HITS",
        "ENDED",
        "AGE",
        "REASON",
    ];
    let mut rows = vec![header.map(String::from).to_vec()];
    for s in blocks {
        let b = &s.block;
        let age = now.duration_since(b.created_at).unwrap_or_default();
        let reason = match b.reason.as_deref() {
            Some(r) if !r.trim().is_empty() => r.replace(['\n', '\t'], " "),
            _ => "<none>".into(),
        };
        rows.push(vec![
            b.id.clone(),
            target_text(&b.target) + if b.force { " (forced)" } else { "" },
            b.respond.code().to_string(),
            b.terminate.to_string(),
            expires_text(b, now),
            s.hits.to_string(),
            s.terminated.to_string(),
            human_duration(age),
            reason,
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut text = String::new();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            line.push_str(cell);
            if c + 1 < row.len() {
                let pad = widths[c] - cell.chars().count() + 3;
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests;
