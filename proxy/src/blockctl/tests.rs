use std::time::{Duration, SystemTime};

use breakwater_limits::{Block, BlockRespond, BlockStatus, BlockTarget};
use clap::Parser;

use super::*;

/// The three commands as `main.rs` mounts them.
#[derive(Debug, clap::Parser)]
#[command(name = "breakwater")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    Block(BlockArgs),
    Blocks(BlocksArgs),
    Unblock(UnblockArgs),
}

fn parse(line: &str) -> Result<Command, clap::Error> {
    Cli::try_parse_from(line.split_whitespace()).map(|c| c.command)
}

fn block_args(line: &str) -> BlockArgs {
    match parse(line) {
        Ok(Command::Block(args)) => args,
        other => panic!("{line}: {other:?}"),
    }
}

/// 2026-03-01T12:00:00Z.
fn t0() -> SystemTime {
    humantime::parse_rfc3339("2026-03-01T12:00:00Z").expect("time")
}

fn status(id: &str, target: BlockTarget) -> BlockStatus {
    BlockStatus {
        block: Block {
            id: id.into(),
            target,
            expires_at: None,
            respond: BlockRespond::Status429,
            force: false,
            terminate: false,
            created_at: t0(),
            reason: None,
        },
        hits: 0,
        terminated: 0,
    }
}

#[test]
fn the_command_line_is_consistent() {
    use clap::CommandFactory;
    Cli::command().debug_assert();
}

#[test]
fn a_service_account_block_for_30m_that_terminates() {
    let args = block_args(
        "breakwater block serviceaccount monitoring/node-agent --for 30m --terminate --reason INC-1234",
    );
    let body = args.request(t0()).expect("request");
    assert_eq!(
        body,
        serde_json::json!({
            "target": {"kind": "identity", "user": "system:serviceaccount:monitoring:node-agent"},
            "expiresAt": "2026-03-01T12:30:00.000Z",
            "respond": 429,
            "force": false,
            "terminate": true,
            "reason": "INC-1234",
        })
    );
    // What the proxy decodes it to.
    let block: Block = serde_json::from_value(body).expect("a Block");
    assert_eq!(block.expires_at, Some(t0() + Duration::from_secs(1800)));
    assert_eq!(args.opts.conn.admin, "http://127.0.0.1:9444");
    assert_eq!(args.opts.conn.output, Output::Table);

    // `sa`, and the flags before the kind, say the same.
    let again = block_args(
        "breakwater block --terminate --for 30m sa monitoring/node-agent --reason INC-1234",
    );
    assert_eq!(
        again.request(t0()).expect("request"),
        args.request(t0()).expect("request")
    );
}

#[test]
fn a_cluster_wide_pattern_answering_403() {
    let args = block_args(
        "breakwater block pattern --verb list --resource pods --cluster-wide --respond 403",
    );
    let body = args.request(t0()).expect("request");
    assert_eq!(
        body["target"],
        serde_json::json!({"kind": "pattern", "verb": "list", "resource": "pods", "namespace": null})
    );
    assert_eq!(body["respond"], 403);
    assert_eq!(body["expiresAt"], serde_json::Value::Null);
    assert!(body.get("id").is_none(), "the proxy picks the id");

    let all = block_args("breakwater block pattern --verb watch --resource apps/deployments -A");
    assert_eq!(
        all.request(t0()).expect("request")["target"]["namespace"],
        "*"
    );
    let some = block_args("breakwater block pattern --verb list --resource pods -n team-*");
    assert_eq!(
        some.request(t0()).expect("request")["target"]["namespace"],
        "team-*"
    );
}

#[test]
fn a_pattern_needs_exactly_one_scope() {
    for line in [
        "breakwater block pattern --verb list --resource pods",
        "breakwater block pattern --verb list --resource pods --cluster-wide -A",
        "breakwater block pattern --verb list --resource pods -n x --cluster-wide",
    ] {
        let err = block_args(line).request(t0()).expect_err(line);
        let msg = err.to_string();
        assert!(
            msg.contains("--namespace")
                && msg.contains("--all-namespaces")
                && msg.contains("--cluster-wide"),
            "{msg}"
        );
    }
}

#[test]
fn the_other_targets_and_flags() {
    let cases = [
        (
            "breakwater block user alice",
            serde_json::json!({"kind": "identity", "user": "alice"}),
        ),
        (
            "breakwater block rule agents",
            serde_json::json!({"kind": "rule", "name": "agents"}),
        ),
        (
            "breakwater block pod monitoring/agent-x7k2p",
            serde_json::json!({"kind": "pod", "namespace": "monitoring", "name": "agent-x7k2p"}),
        ),
        (
            "breakwater block node worker-1",
            serde_json::json!({"kind": "node", "name": "worker-1"}),
        ),
    ];
    for (line, target) in cases {
        assert_eq!(
            block_args(line).request(t0()).expect(line)["target"],
            target
        );
    }
    let args = block_args(
        "breakwater block rule admins --force --id inc-1234 -o json --admin http://127.0.0.1:1",
    );
    let body = args.request(t0()).expect("request");
    assert_eq!(body["force"], true);
    assert_eq!(body["id"], "inc-1234");
    assert_eq!(args.opts.conn.output, Output::Json);
    assert_eq!(args.opts.conn.admin, "http://127.0.0.1:1");

    for bad in [
        "breakwater block serviceaccount node-agent",
        "breakwater block pod /x",
        "breakwater block sa a/b/c",
        "breakwater block user alice --id a/b",
    ] {
        assert!(
            matches!(block_args(bad).request(t0()), Err(CtlError::Usage(_))),
            "{bad}"
        );
    }
    for bad in [
        "breakwater block user alice --respond 500",
        "breakwater block user alice --for 0s",
        "breakwater block user alice --for soon",
        "breakwater block pattern --verb list",
    ] {
        assert!(parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn targets_read_as_words() {
    let cases = [
        (
            BlockTarget::Identity {
                user: "system:serviceaccount:monitoring:node-agent".into(),
            },
            "serviceaccount monitoring/node-agent",
        ),
        (
            BlockTarget::Identity {
                user: "alice".into(),
            },
            "user alice",
        ),
        (
            BlockTarget::Identity {
                user: "system:serviceaccount:broken".into(),
            },
            "user system:serviceaccount:broken",
        ),
        (
            BlockTarget::Rule {
                name: "agents".into(),
            },
            "rule agents",
        ),
        (
            BlockTarget::Pod {
                namespace: "ns".into(),
                name: "name".into(),
            },
            "pod ns/name",
        ),
        (BlockTarget::Node { name: "n1".into() }, "node n1"),
        (
            BlockTarget::Pattern {
                verb: "list".into(),
                resource: "pods".into(),
                namespace: None,
            },
            "pattern list pods (cluster-wide)",
        ),
        (
            BlockTarget::Pattern {
                verb: "list".into(),
                resource: "pods".into(),
                namespace: Some("*".into()),
            },
            "pattern list pods (all namespaces)",
        ),
        (
            BlockTarget::Pattern {
                verb: "watch".into(),
                resource: "apps/deployments".into(),
                namespace: Some("team-*".into()),
            },
            "pattern watch apps/deployments in team-*",
        ),
    ];
    for (target, words) in cases {
        assert_eq!(target_text(&target), words);
    }
}

#[test]
fn durations_read_as_kubectl_ages() {
    let cases = [
        (0, "0s"),
        (5, "5s"),
        (119, "119s"),
        (120, "2m"),
        (185, "3m5s"),
        (180, "3m"),
        (29 * 60 + 59, "29m"),
        // Minutes up to 3 hours, as kubectl does.
        (2 * 3600, "120m"),
        (3 * 3600, "3h"),
        (5 * 3600 + 30 * 60, "5h30m"),
        (8 * 3600 + 59 * 60, "8h"),
        (47 * 3600, "47h"),
        (4 * 86400, "4d"),
        (3 * 86400 + 2 * 3600, "3d2h"),
        (30 * 86400, "30d"),
        (3 * 365 * 86400, "3y"),
        (9 * 365 * 86400 + 86400, "9y"),
    ];
    for (secs, text) in cases {
        assert_eq!(human_duration(Duration::from_secs(secs)), text, "{secs}s");
    }
}

#[test]
fn expiry_reads_as_time_left() {
    let mut b = status("a", BlockTarget::Node { name: "n".into() }).block;
    assert_eq!(expires_text(&b, t0()), "never");
    b.expires_at = Some(t0() + Duration::from_secs(1800));
    // A moment after `--for 30m`.
    assert_eq!(expires_text(&b, t0() + Duration::from_millis(700)), "29m");
    assert_eq!(
        expires_text(&b, t0() + Duration::from_secs(1800)),
        "expired"
    );
    assert_eq!(
        expires_text(&b, t0() + Duration::from_secs(3600)),
        "expired"
    );
}

#[test]
fn the_table_shows_each_block_in_words() {
    let mut sa = status(
        "3f9a1c2e4b5d6a7f",
        BlockTarget::Identity {
            user: "system:serviceaccount:monitoring:node-agent".into(),
        },
    );
    sa.block.expires_at = Some(t0() + Duration::from_secs(1800));
    sa.block.terminate = true;
    sa.block.reason = Some("INC-1234".into());
    sa.hits = 1520;
    sa.terminated = 48;
    let mut pattern = status(
        "p1",
        BlockTarget::Pattern {
            verb: "list".into(),
            resource: "pods".into(),
            namespace: None,
        },
    );
    pattern.block.respond = BlockRespond::Status403;
    pattern.block.created_at = t0() - Duration::from_secs(4 * 86400 - 65);
    pattern.block.expires_at = Some(t0());
    let mut forced = status(
        "adm",
        BlockTarget::Rule {
            name: "admins".into(),
        },
    );
    forced.block.force = true;
    forced.block.created_at = t0() - Duration::from_secs(3 * 60);
    forced.block.reason = Some("  ".into());

    let now = t0() + Duration::from_secs(5);
    let text = table(&[sa, pattern, forced], now);
    assert_eq!(
        text,
        "\
ID                 TARGET                                 RESPOND   TERMINATE   EXPIRES   HITS   ENDED   AGE     REASON
3f9a1c2e4b5d6a7f   serviceaccount monitoring/node-agent   429       true        29m       1520   48      5s      INC-1234
p1                 pattern list pods (cluster-wide)       403       false       expired   0      0       3d23h   <none>
adm                rule admins (forced)                   429       false       never     0      0       3m5s    <none>
"
    );
}

#[test]
fn unblock_wants_ids_or_one_of_the_bulk_flags() {
    for line in [
        "breakwater unblock",
        "breakwater unblock a --all",
        "breakwater unblock --all --all-expired",
    ] {
        let Ok(Command::Unblock(args)) = parse(line) else {
            panic!("{line} parses");
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let err = rt
            .block_on(unblock(&args, &mut Vec::<u8>::new()))
            .expect_err(line);
        assert!(matches!(err, CtlError::Usage(_)), "{line}: {err}");
    }
}

#[test]
fn several_failures_are_one_line_each() {
    let err = CtlError::Several(vec![
        CtlError::NotFound("a".into()),
        CtlError::NotFound("b".into()),
    ]);
    assert_eq!(
        err.lines(),
        [
            "no block with id \"a\" (see `breakwater blocks`)",
            "no block with id \"b\" (see `breakwater blocks`)"
        ]
    );
}
