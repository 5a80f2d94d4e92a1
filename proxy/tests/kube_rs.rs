//! kube-rs, a real client library, through the proxy: list, and the
//! `watcher` seeing ADDED, MODIFIED and DELETED in order.

mod common;

use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;

use common::demo_env;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_rs_lists_and_watches_through_the_proxy() {
    let env = demo_env().await;
    let kubeconfig = kube::config::Kubeconfig::read_from(&env.demo.kubeconfig).expect("kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .expect("config");
    let client = kube::Client::try_from(config).expect("client");

    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let list = namespaces
        .list(&ListParams::default())
        .await
        .expect("list namespaces");
    assert!(
        list.items
            .iter()
            .any(|n| n.metadata.name.as_deref() == Some("demo"))
    );

    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let cfg = watcher::Config::default().labels("test=kube-rs");
    let mut stream = watcher(cms.clone(), cfg).boxed();

    // Wait for the initial list to finish before writing.
    loop {
        match next(&mut stream).await {
            watcher::Event::InitDone => break,
            _ => continue,
        }
    }
    let mut cm = ConfigMap::default();
    cm.metadata.name = Some("watched".into());
    cm.metadata.labels = Some([("test".to_string(), "kube-rs".to_string())].into());
    cms.create(&PostParams::default(), &cm)
        .await
        .expect("create");
    let patch = serde_json::json!({"data": {"a": "b"}});
    cms.patch("watched", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("patch");
    cms.delete("watched", &DeleteParams::default())
        .await
        .expect("delete");

    let added = applied(next(&mut stream).await);
    assert!(added.data.is_none());
    let modified = applied(next(&mut stream).await);
    assert_eq!(
        modified
            .data
            .as_ref()
            .and_then(|d| d.get("a"))
            .map(String::as_str),
        Some("b")
    );
    match next(&mut stream).await {
        watcher::Event::Delete(cm) => assert_eq!(cm.metadata.name.as_deref(), Some("watched")),
        other => panic!("expected Delete, got {other:?}"),
    }
}

type Stream =
    futures_util::stream::BoxStream<'static, Result<watcher::Event<ConfigMap>, watcher::Error>>;

async fn next(stream: &mut Stream) -> watcher::Event<ConfigMap> {
    tokio::time::timeout(Duration::from_secs(20), stream.next())
        .await
        .expect("an event within 20 s")
        .expect("stream open")
        .expect("no watcher error")
}

fn applied(ev: watcher::Event<ConfigMap>) -> ConfigMap {
    match ev {
        watcher::Event::Apply(cm) => cm,
        other => panic!("expected Apply, got {other:?}"),
    }
}
