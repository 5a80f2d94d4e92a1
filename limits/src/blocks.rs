//! The emergency brake: blocks that reject an identity, a rule, or a request
//! pattern at once, persisted to a JSON file so they survive a restart.
//!
//! Blocks are checked by [`crate::Limiter::admit`] before any limit, and
//! work without the apiserver. Exempt traffic (requests matching an exempt
//! rule) is only ever blocked by a block with `force: true`: an admin must
//! not lock themselves out by accident. [`Blocks::add`] additionally refuses,
//! unless forced, a block that names an exempt rule or a user an exempt rule
//! lists — those would never take effect and are almost surely a mistake.
//!
//! A block with `terminate: true` also ends the matching long-running
//! requests already open (the proxy keeps the register of them; see
//! [`ActiveBlock::applies`]).
//!
//! Persistence writes a temporary file next to the target, syncs it, and
//! renames it over the target, so a crash leaves either the old or the new
//! list, never a torn one.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::matcher::{Glob, RequestAttrs, ResourcePattern, Subject, VerbSet};
use crate::validate::ValidatedLimits;

/// What a block rejects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase", deny_unknown_fields)]
pub enum BlockTarget {
    /// Every request of this user (exact name, e.g.
    /// `system:serviceaccount:monitoring:node-agent`).
    Identity {
        /// User name.
        user: String,
    },
    /// Every request made with a bound ServiceAccount token of this Pod
    /// (the token's `authentication.kubernetes.io/pod-name`, in its
    /// ServiceAccount's namespace): one agent of a DaemonSet.
    Pod {
        /// The Pod's namespace.
        namespace: String,
        /// The Pod's name.
        name: String,
    },
    /// Every request of this node: bound tokens naming it
    /// (`authentication.kubernetes.io/node-name`) and the node's own
    /// credentials (`system:node:NAME` in `system:nodes`).
    Node {
        /// The node's name.
        name: String,
    },
    /// Every request the named rule governs.
    Rule {
        /// Rule name.
        name: String,
    },
    /// A request pattern, e.g. "LIST pods cluster-wide".
    Pattern {
        /// Verb (`list`, `watch`, ...; `*` for any).
        verb: String,
        /// `resource` or `group/resource` (the limits file's syntax).
        resource: String,
        /// Namespace glob; `None` matches only cluster-wide requests
        /// (namespace `""`: all-namespaces lists and cluster-scoped
        /// resources), `Some("*")` every namespace.
        #[serde(default)]
        namespace: Option<String>,
    },
}

/// The status a blocked caller receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "u16", into = "u16")]
pub enum BlockRespond {
    /// 429 Too Many Requests with Retry-After (clients back off and retry).
    #[default]
    Status429,
    /// 403 Forbidden (clients give up).
    Status403,
}

impl BlockRespond {
    /// The HTTP status code.
    pub fn code(self) -> u16 {
        match self {
            BlockRespond::Status429 => 429,
            BlockRespond::Status403 => 403,
        }
    }
}

impl From<BlockRespond> for u16 {
    fn from(r: BlockRespond) -> u16 {
        r.code()
    }
}

impl TryFrom<u16> for BlockRespond {
    type Error = String;
    fn try_from(v: u16) -> Result<Self, String> {
        match v {
            429 => Ok(BlockRespond::Status429),
            403 => Ok(BlockRespond::Status403),
            _ => Err(format!("respond must be 429 or 403, got {v}")),
        }
    }
}

/// One block. As JSON (also a good `POST /admin/v1/blocks` body; `id` and
/// `createdAt` default to a random id and now):
/// `{"id": "…", "target": {"kind": "pattern", "verb": "list", "resource":
/// "pods", "namespace": null}, "expiresAt": "2026-01-01T00:00:00.000Z",
/// "respond": 429, "force": false, "terminate": false, "createdAt": "…",
/// "reason": "incident"}`; other targets: `{"kind": "identity", "user":
/// "…"}`, `{"kind": "rule", "name": "…"}`, `{"kind": "pod", "namespace":
/// "…", "name": "…"}`, `{"kind": "node", "name": "…"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Block {
    /// Unique id (random hex unless given).
    #[serde(default = "random_id")]
    pub id: String,
    /// What is blocked.
    pub target: BlockTarget,
    /// When the block lapses; `None`: until removed.
    #[serde(default, with = "rfc3339_opt")]
    pub expires_at: Option<SystemTime>,
    /// 429 (default) or 403.
    #[serde(default)]
    pub respond: BlockRespond,
    /// Also block exempt traffic.
    #[serde(default)]
    pub force: bool,
    /// Also end the matching long-running requests already open (watches,
    /// `logs -f`, exec/attach/port-forward) when the block is added.
    /// Unary requests in flight finish either way.
    #[serde(default)]
    pub terminate: bool,
    /// When it was created.
    #[serde(default = "SystemTime::now", with = "rfc3339")]
    pub created_at: SystemTime,
    /// Free text for operators.
    #[serde(default)]
    pub reason: Option<String>,
}

impl Block {
    /// A 429 block of `target` created now, with a random id, no expiry.
    pub fn new(target: BlockTarget) -> Block {
        Block {
            id: random_id(),
            target,
            expires_at: None,
            respond: BlockRespond::Status429,
            force: false,
            terminate: false,
            created_at: SystemTime::now(),
            reason: None,
        }
    }

    /// Has it lapsed at `now`?
    pub fn is_expired(&self, now: SystemTime) -> bool {
        self.expires_at.is_some_and(|t| t <= now)
    }
}

/// A random 16-hex-digit block id.
pub fn random_id() -> String {
    let n: u64 = rand::rng().random();
    format!("{n:016x}")
}

/// Why a block was refused or blocks could not be loaded/saved.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// Another block has this id.
    #[error("a block with id `{0}` already exists")]
    DuplicateId(String),
    /// It would block exempt traffic without `force`.
    #[error(
        "{0} is exempt (the limits file keeps a path open for it); force the block (`force: true`, `breakwater block --force`) to block it anyway"
    )]
    Exempt(String),
    /// A rule block names no rule of the limits file in force (it would
    /// never match); forcing it adds it anyway (for a rule about to come).
    #[error(
        "no rule `{0}` in the limits file in force (rules: {1}); force the block (`force: true`, `breakwater block --force`) to add it anyway"
    )]
    UnknownRule(String, String),
    /// The pattern's verb, resource or namespace is not valid.
    #[error("invalid block pattern: {0}")]
    InvalidPattern(String),
    /// A target field is empty.
    #[error("block target is empty: {0}")]
    Empty(&'static str),
    /// Reading or writing the blocks file.
    #[error("blocks file {path}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The blocks file is not valid JSON of the expected shape.
    #[error("blocks file {path}: bad JSON")]
    Parse {
        /// The file.
        path: String,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
}

/// A block in force: the block, its pattern compiled for matching, and
/// its counters (shared by every copy of the set, so a listing shows
/// them).
#[derive(Debug, Clone)]
pub struct ActiveBlock {
    block: Block,
    compiled: Option<CompiledPattern>,
    hits: Arc<AtomicU64>,
    terminated: Arc<AtomicU64>,
}

impl ActiveBlock {
    fn new(block: Block) -> Result<ActiveBlock, BlockError> {
        let compiled = compile(&block)?;
        Ok(ActiveBlock {
            block,
            compiled,
            hits: Arc::default(),
            terminated: Arc::default(),
        })
    }

    /// The block.
    pub fn block(&self) -> &Block {
        &self.block
    }

    /// Does it apply to this request? `rule` is the name of the rule the
    /// request matched and `exempt` whether that rule is exempt (exempt
    /// traffic is blocked only by a forced block). Expiry is not
    /// considered here.
    pub fn applies(
        &self,
        subject: &Subject<'_>,
        req: &RequestAttrs<'_>,
        rule: Option<&str>,
        exempt: bool,
    ) -> bool {
        (!exempt || self.block.force)
            && match &self.block.target {
                BlockTarget::Identity { user } => user == subject.user,
                BlockTarget::Pod { namespace, name } => {
                    subject.pod == Some(name.as_str())
                        && subject
                            .service_account()
                            .is_some_and(|(ns, _)| ns == namespace)
                }
                BlockTarget::Node { name } => subject.node_name() == Some(name.as_str()),
                BlockTarget::Rule { name } => rule == Some(name.as_str()),
                BlockTarget::Pattern { .. } => {
                    self.compiled.as_ref().is_some_and(|p| p.matches(req))
                }
            }
    }

    /// Counts open requests it ended.
    pub fn count_terminated(&self, n: u64) {
        self.terminated.fetch_add(n, Ordering::Relaxed);
    }

    /// The block with its counters, for listing.
    pub fn status(&self) -> BlockStatus {
        BlockStatus {
            block: self.block.clone(),
            hits: self.hits.load(Ordering::Relaxed),
            terminated: self.terminated.load(Ordering::Relaxed),
        }
    }
}

/// A block as `GET /admin/v1/blocks` lists it: its fields, plus how many
/// requests it refused (`hits`) and how many open ones it ended
/// (`terminated`) since this process loaded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BlockStatus {
    /// The block.
    #[serde(flatten)]
    pub block: Block,
    /// Requests refused by it.
    #[serde(default)]
    pub hits: u64,
    /// Open requests it ended (`terminate: true`).
    #[serde(default)]
    pub terminated: u64,
}

#[derive(Debug, Clone)]
struct CompiledPattern {
    verbs: VerbSet,
    resource: ResourcePattern,
    namespace: Option<Glob>,
}

impl CompiledPattern {
    fn new(verb: &str, resource: &str, namespace: Option<&str>) -> Result<Self, BlockError> {
        let mut verbs = VerbSet::default();
        if !verbs.insert(verb) {
            return Err(BlockError::InvalidPattern(format!("unknown verb `{verb}`")));
        }
        let resource = ResourcePattern::new(resource).map_err(BlockError::InvalidPattern)?;
        let namespace = namespace
            .map(|n| Glob::new(n).map_err(|e| BlockError::InvalidPattern(e.to_string())))
            .transpose()?;
        Ok(CompiledPattern {
            verbs,
            resource,
            namespace,
        })
    }

    fn matches(&self, req: &RequestAttrs<'_>) -> bool {
        req.is_resource_request
            && self.verbs.contains(req.verb)
            && self.resource.matches(req)
            && match &self.namespace {
                None => req.namespace.is_empty(),
                Some(g) => g.matches(req.namespace),
            }
    }
}

/// The persisted file: `{"apiVersion": ..., "kind": "Blocks", "blocks": [...]}`.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct BlocksFile {
    api_version: String,
    kind: String,
    blocks: Vec<Block>,
}

/// The set of blocks.
#[derive(Debug, Clone, Default)]
pub struct Blocks {
    entries: Vec<ActiveBlock>,
}

impl Blocks {
    /// No blocks.
    pub fn new() -> Blocks {
        Blocks::default()
    }

    /// Adds a block after checking it (see the module docs on exempt rules);
    /// returns it as in force.
    pub fn add(
        &mut self,
        block: Block,
        limits: &ValidatedLimits,
    ) -> Result<&ActiveBlock, BlockError> {
        if self.entries.iter().any(|e| e.block.id == block.id) {
            return Err(BlockError::DuplicateId(block.id));
        }
        let entry = ActiveBlock::new(block)?;
        let block = &entry.block;
        if !block.force {
            match &block.target {
                BlockTarget::Rule { name } => {
                    if limits.rules.iter().any(|r| r.exempt && *r.name == **name) {
                        return Err(BlockError::Exempt(format!("rule `{name}`")));
                    }
                    if !limits.rules.iter().any(|r| *r.name == **name) {
                        let known: Vec<&str> = limits.rules.iter().map(|r| &*r.name).collect();
                        let known = if known.is_empty() {
                            "none".to_string()
                        } else {
                            known.join(", ")
                        };
                        return Err(BlockError::UnknownRule(name.clone(), known));
                    }
                }
                BlockTarget::Identity { user } => {
                    if let Some(r) = limits
                        .rules
                        .iter()
                        .find(|r| r.exempt && r.matcher.names_user(user))
                    {
                        return Err(BlockError::Exempt(format!(
                            "user `{user}` (rule `{}`)",
                            r.name
                        )));
                    }
                }
                // A pattern, a Pod or a node cannot be checked against
                // exempt rules without a request; exempt traffic is simply
                // not blocked without force.
                BlockTarget::Pattern { .. }
                | BlockTarget::Pod { .. }
                | BlockTarget::Node { .. } => {}
            }
        }
        self.entries.push(entry);
        Ok(&self.entries[self.entries.len() - 1])
    }

    /// Adds a block without the exempt check (loading a persisted file:
    /// it was checked when added).
    fn insert_unchecked(&mut self, block: Block) -> Result<(), BlockError> {
        if self.entries.iter().any(|e| e.block.id == block.id) {
            return Err(BlockError::DuplicateId(block.id));
        }
        self.entries.push(ActiveBlock::new(block)?);
        Ok(())
    }

    /// Removes a block by id.
    pub fn remove(&mut self, id: &str) -> Option<Block> {
        let i = self.entries.iter().position(|e| e.block.id == id)?;
        Some(self.entries.remove(i).block)
    }

    /// All blocks, in the order added.
    pub fn list(&self) -> Vec<Block> {
        self.entries.iter().map(|e| e.block.clone()).collect()
    }

    /// All blocks with their counters, in the order added.
    pub fn statuses(&self) -> Vec<BlockStatus> {
        self.entries.iter().map(ActiveBlock::status).collect()
    }

    /// The blocks in force with their counters, in the order added.
    pub fn active(&self) -> impl Iterator<Item = &ActiveBlock> {
        self.entries.iter()
    }

    /// Number of blocks.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// No blocks?
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Removes and returns the blocks lapsed at `now`.
    pub fn expire(&mut self, now: SystemTime) -> Vec<Block> {
        let mut gone = Vec::new();
        self.entries.retain(|e| {
            if e.block.is_expired(now) {
                gone.push(e.block.clone());
                false
            } else {
                true
            }
        });
        gone
    }

    /// The first unexpired block that applies, counted as a hit. `rule` is
    /// the name of the rule the request matched and `exempt` whether that
    /// rule is exempt.
    pub fn find(
        &self,
        subject: &Subject<'_>,
        req: &RequestAttrs<'_>,
        rule: Option<&str>,
        exempt: bool,
        now: SystemTime,
    ) -> Option<&Block> {
        let e = self
            .entries
            .iter()
            .find(|e| !e.block.is_expired(now) && e.applies(subject, req, rule, exempt))?;
        e.hits.fetch_add(1, Ordering::Relaxed);
        Some(&e.block)
    }

    /// Loads a blocks file; a missing file is an empty set (first start).
    pub fn load(path: &Path) -> Result<Blocks, BlockError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Blocks::new()),
            Err(source) => {
                return Err(BlockError::Io {
                    path: path.display().to_string(),
                    source,
                });
            }
        };
        let file: BlocksFile = serde_json::from_str(&text).map_err(|source| BlockError::Parse {
            path: path.display().to_string(),
            source,
        })?;
        let mut blocks = Blocks::new();
        for b in file.blocks {
            blocks.insert_unchecked(b)?;
        }
        Ok(blocks)
    }

    /// Writes the set atomically: temp file in the same directory, fsync,
    /// rename over `path`.
    pub fn save(&self, path: &Path) -> Result<(), BlockError> {
        let io = |source| BlockError::Io {
            path: path.display().to_string(),
            source,
        };
        let file = BlocksFile {
            api_version: crate::file::API_VERSION.to_string(),
            kind: "Blocks".to_string(),
            blocks: self.list(),
        };
        let json = serde_json::to_vec_pretty(&file).map_err(|source| BlockError::Parse {
            path: path.display().to_string(),
            source,
        })?;
        let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
        tmp_name.push(format!(".tmp.{}", random_id()));
        let tmp = path.with_file_name(tmp_name);
        let result = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&json)?;
            f.write_all(b"\n")?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result.map_err(io)
    }
}

fn compile(block: &Block) -> Result<Option<CompiledPattern>, BlockError> {
    match &block.target {
        BlockTarget::Identity { user } if user.is_empty() => Err(BlockError::Empty("user")),
        BlockTarget::Rule { name } | BlockTarget::Node { name } if name.is_empty() => {
            Err(BlockError::Empty("name"))
        }
        BlockTarget::Pod { name, .. } if name.is_empty() => Err(BlockError::Empty("name")),
        BlockTarget::Pod { namespace, .. } if namespace.is_empty() => {
            Err(BlockError::Empty("namespace"))
        }
        BlockTarget::Pattern {
            verb,
            resource,
            namespace,
        } => CompiledPattern::new(verb, resource, namespace.as_deref()).map(Some),
        _ => Ok(None),
    }
}

/// Seconds until `expires_at`, rounded up; `None` without expiry.
pub(crate) fn remaining(block: &Block, now: SystemTime) -> Option<Duration> {
    let at = block.expires_at?;
    Some(at.duration_since(now).unwrap_or_default())
}

mod rfc3339 {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::SystemTime;

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_rfc3339_millis(*t))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_rfc3339_weak(&s).map_err(serde::de::Error::custom)
    }
}

mod rfc3339_opt {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::SystemTime;

    pub fn serialize<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.collect_str(&humantime::format_rfc3339_millis(*t)),
            None => s.serialize_none(),
        }
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SystemTime>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| humantime::parse_rfc3339_weak(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}
