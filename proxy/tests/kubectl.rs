//! kubectl v1.32, unchanged, through Breakwater to kube-sim.

mod common;

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};

use common::{demo_env, kubectl_cmd};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_reads_and_writes_through_the_proxy() {
    let env = demo_env().await;

    let ns = env.kubectl_ok(&["get", "ns"]).await;
    assert!(ns.contains("default") && ns.contains("demo"), "{ns}");

    let resources = env.kubectl_ok(&["api-resources"]).await;
    for r in [
        "pods",
        "configmaps",
        "daemonsets",
        "leases",
        "serviceaccounts",
    ] {
        assert!(
            resources.contains(r),
            "api-resources lacks {r}: {resources}"
        );
    }

    let pods = env.kubectl_ok(&["get", "pods", "-A"]).await;
    assert!(
        pods.contains("NAMESPACE") && pods.contains("demo"),
        "{pods}"
    );

    env.kubectl_ok(&[
        "create",
        "configmap",
        "greeting",
        "-n",
        "default",
        "--from-literal=hello=world",
    ])
    .await;
    let yaml = env
        .kubectl_ok(&[
            "get",
            "configmap",
            "greeting",
            "-n",
            "default",
            "-o",
            "yaml",
        ])
        .await;
    assert!(yaml.contains("hello: world"), "{yaml}");
    assert!(yaml.contains("resourceVersion:"), "{yaml}");

    // apply: first a create, then an update of the same object.
    let manifest = env.dir.path().join("cm.yaml");
    let write = |data: &str| {
        std::fs::write(
            &manifest,
            format!(
                "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: applied\n  namespace: default\ndata:\n  key: {data}\n"
            ),
        )
        .expect("write manifest")
    };
    let path = manifest.to_str().expect("utf8 path").to_string();
    write("one");
    let out = env.kubectl_ok(&["apply", "-f", &path]).await;
    assert!(out.contains("created"), "{out}");
    write("two");
    let out = env.kubectl_ok(&["apply", "-f", &path]).await;
    assert!(out.contains("configured"), "{out}");
    let got = env
        .kubectl_ok(&[
            "get",
            "cm",
            "applied",
            "-n",
            "default",
            "-o",
            "jsonpath={.data.key}",
        ])
        .await;
    assert_eq!(got, "two");

    let out = env
        .kubectl_ok(&["delete", "configmap", "greeting", "-n", "default"])
        .await;
    assert!(out.contains("deleted"), "{out}");
    let gone = env
        .kubectl(&["get", "configmap", "greeting", "-n", "default"])
        .await;
    assert!(!gone.status.success());
    let err = String::from_utf8_lossy(&gone.stderr);
    assert!(
        err.contains("NotFound") || err.contains("not found"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_exec_and_create_token_work_through_the_proxy() {
    let env = demo_env().await;
    let pods = env
        .kubectl_ok(&[
            "get",
            "pods",
            "-n",
            "demo",
            "-o",
            "jsonpath={.items[0].metadata.name}",
        ])
        .await;
    assert!(!pods.is_empty(), "the demo seeds pods in namespace demo");

    let out = env
        .kubectl_ok(&[
            "exec",
            "-n",
            "demo",
            &pods,
            "--",
            "echo",
            "hello",
            "breakwater",
        ])
        .await;
    assert_eq!(out, "hello breakwater\n");

    let token = env
        .kubectl_ok(&["create", "token", "default", "-n", "demo"])
        .await;
    let token = token.trim();
    assert_eq!(token.split('.').count(), 3, "a JWT: {token}");
    // The new token authenticates through the proxy on its own (a
    // token-only kubeconfig: a client certificate would win over it).
    let kc = common::write_kubeconfig(
        &env,
        "kc-token",
        &env.proxy_url(),
        &format!("token: {token}"),
    );
    let out = env.kubectl_with(&kc, &["auth", "whoami"]).await;
    let who = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(who.contains("system:serviceaccount:demo:default"), "{who}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_watch_receives_a_pod_created_after_it_started() {
    let env = demo_env().await;
    let mut child = kubectl_cmd(&env.demo.kubeconfig, env.cache.path())
        .args(["get", "pods", "-n", "demo", "-w"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kubectl");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();

    // The initial list: a header, then the seeded pods.
    let header = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("header in time")
        .expect("read")
        .expect("a header line");
    assert!(header.starts_with("NAME"), "{header}");

    // kubectl has listed; its watch starts from the list's RV, so a pod
    // created now must arrive as an event.
    env.kubectl_ok(&["run", "late-pod", "-n", "demo", "--image", "busybox"])
        .await;
    let seen = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.expect("read") {
            if line.starts_with("late-pod") {
                return line;
            }
        }
        panic!("kubectl -w ended before the event arrived");
    })
    .await
    .expect("the event arrived within 30 s");
    assert!(seen.starts_with("late-pod"), "{seen}");
    let _ = child.kill().await;
    env.demo.shutdown().await;
}
