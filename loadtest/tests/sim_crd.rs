//! CustomResourceDefinitions in kube-sim, driven by real kubectl: a CRD
//! applied and waited for, custom objects applied, listed, selected, paged,
//! watched and deleted, and the type gone again with its CRD.
//!
//! These are the behaviours the watch hub's "every resource, CRDs included"
//! claim rests on, so they are checked against the client that users run.

mod common;

use serde_json::{Value, json};

const CRD: &str = r#"apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.example.com
spec:
  group: example.com
  scope: Namespaced
  names:
    plural: widgets
    singular: widget
    kind: Widget
    shortNames: [wd]
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        x-kubernetes-preserve-unknown-fields: true
    subresources:
      status: {}
  - name: v1beta1
    served: true
    storage: false
    schema:
      openAPIV3Schema:
        type: object
        x-kubernetes-preserve-unknown-fields: true
"#;

fn widget(name: &str, color: &str, size: u32) -> String {
    format!(
        "apiVersion: example.com/v1\nkind: Widget\nmetadata:\n  name: {name}\n  namespace: demo\n  labels:\n    color: {color}\nspec:\n  size: {size}\n"
    )
}

/// kube-sim (demo seed) driven by kubectl as its admin.
struct Env(common::Kubectl);

impl std::ops::Deref for Env {
    type Target = common::Kubectl;
    fn deref(&self) -> &common::Kubectl {
        &self.0
    }
}

async fn start() -> Env {
    Env(common::Kubectl::new(common::start().await, "sim-crd"))
}

impl Env {
    /// Runs kubectl, which must succeed; returns stdout (stderr must be empty:
    /// no discovery or OpenAPI warnings).
    async fn run(&self, args: &[&str]) -> String {
        let (ok, stdout, stderr) = self.try_run(args).await;
        assert!(ok, "kubectl {args:?} failed: {stderr}\n{stdout}");
        assert!(stderr.is_empty(), "kubectl {args:?} warned: {stderr}");
        stdout
    }

    async fn json(&self, args: &[&str]) -> Value {
        serde_json::from_str(&self.run(args).await).expect("kubectl printed JSON")
    }

    fn file(&self, name: &str, text: &str) -> String {
        let p = self.0.file(name, text);
        p.to_str().expect("utf-8 temp path").to_string()
    }

    /// Applies the Widget CRD and waits for it to be established.
    async fn install_crd(&self) {
        let f = self.file("crd.yaml", CRD);
        let out = self.run(&["apply", "-f", &f]).await;
        assert_eq!(
            out.trim(),
            "customresourcedefinition.apiextensions.k8s.io/widgets.example.com created"
        );
        let out = self
            .run(&[
                "wait",
                "--for",
                "condition=established",
                "--timeout=30s",
                "crd/widgets.example.com",
            ])
            .await;
        assert!(out.contains("condition met"), "{out}");
    }
}

fn names(list: &Value) -> Vec<&str> {
    list["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| i["metadata"]["name"].as_str().expect("name"))
        .collect()
}

#[tokio::test]
async fn kubectl_applies_a_crd_then_its_widgets_and_deleting_it_removes_the_type() {
    if !common::kubectl_available() {
        return;
    }
    let env = start().await;
    env.install_crd().await;

    // The status the apiserver's controllers write.
    let crd = env
        .json(&["get", "crd", "widgets.example.com", "-o", "json"])
        .await;
    let conditions: Vec<(&str, &str)> = crd["status"]["conditions"]
        .as_array()
        .expect("conditions")
        .iter()
        .map(|c| {
            (
                c["type"].as_str().unwrap_or(""),
                c["status"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        conditions,
        [("NamesAccepted", "True"), ("Established", "True")]
    );
    assert_eq!(crd["status"]["acceptedNames"]["kind"], "Widget");
    assert_eq!(crd["status"]["storedVersions"], json!(["v1"]));

    // Discovery: both served versions, v1 preferred; the status subresource.
    let group = env.json(&["get", "--raw", "/apis/example.com"]).await;
    assert_eq!(group["preferredVersion"]["version"], "v1");
    assert_eq!(group["versions"].as_array().expect("versions").len(), 2);
    let v1 = env.json(&["get", "--raw", "/apis/example.com/v1"]).await;
    let resources: Vec<&str> = v1["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .map(|r| r["name"].as_str().expect("name"))
        .collect();
    assert_eq!(resources, ["widgets", "widgets/status"]);
    assert_eq!(v1["resources"][0]["kind"], "Widget");
    assert_eq!(v1["resources"][0]["namespaced"], true);
    assert_eq!(v1["resources"][0]["shortNames"], json!(["wd"]));
    let groups = env.json(&["get", "--raw", "/apis"]).await;
    assert!(
        groups["groups"]
            .as_array()
            .expect("groups")
            .iter()
            .any(|g| g["name"] == "example.com"),
        "{groups}"
    );

    // Two widgets, applied in one file.
    let f = env.file(
        "widgets.yaml",
        &format!("{}---\n{}", widget("w1", "blue", 1), widget("w2", "red", 2)),
    );
    let out = env.run(&["apply", "-f", &f]).await;
    assert_eq!(
        out.trim(),
        "widget.example.com/w1 created\nwidget.example.com/w2 created"
    );
    let list = env
        .json(&["get", "widgets", "-n", "demo", "-o", "json"])
        .await;
    assert_eq!(names(&list), ["w1", "w2"]);
    assert_eq!(list["items"][0]["apiVersion"], "example.com/v1");
    assert_eq!(list["items"][0]["kind"], "Widget");
    assert_eq!(list["items"][1]["spec"]["size"], 2);
    assert_eq!(list["items"][0]["metadata"]["generation"], 1);

    // A second apply patches (JSON merge patch: kube-sim refuses a strategic
    // merge patch of a custom resource with 415, like the apiserver).
    let f = env.file("w1.yaml", &widget("w1", "blue", 10));
    let out = env.run(&["apply", "-f", &f]).await;
    assert_eq!(out.trim(), "widget.example.com/w1 configured");
    let w1 = env
        .json(&["get", "wd", "w1", "-n", "demo", "-o", "json"])
        .await;
    assert_eq!(w1["spec"]["size"], 10);
    assert_eq!(w1["metadata"]["generation"], 2);

    // The other served version reads the same object in its own version.
    let beta = env
        .json(&[
            "get",
            "--raw",
            "/apis/example.com/v1beta1/namespaces/demo/widgets/w1",
        ])
        .await;
    assert_eq!(beta["apiVersion"], "example.com/v1beta1");
    assert_eq!(beta["spec"]["size"], 10);

    // The generic list machinery: tables, selectors, chunking.
    let table = env.run(&["get", "widgets", "-n", "demo"]).await;
    let header: Vec<&str> = table
        .lines()
        .next()
        .expect("header")
        .split_whitespace()
        .collect();
    assert_eq!(header, ["NAME", "AGE"]);
    assert_eq!(table.lines().count(), 3, "{table}");
    let blue = env
        .json(&[
            "get",
            "widgets",
            "-n",
            "demo",
            "-l",
            "color=blue",
            "-o",
            "json",
        ])
        .await;
    assert_eq!(names(&blue), ["w1"]);
    let by_name = env
        .json(&[
            "get",
            "widgets",
            "-A",
            "--field-selector",
            "metadata.name=w2",
            "-o",
            "json",
        ])
        .await;
    assert_eq!(names(&by_name), ["w2"]);
    let chunked = env
        .json(&[
            "get",
            "widgets",
            "-n",
            "demo",
            "--chunk-size=1",
            "-o",
            "json",
        ])
        .await;
    assert_eq!(names(&chunked), ["w1", "w2"]);
    let page = env
        .json(&[
            "get",
            "--raw",
            "/apis/example.com/v1/namespaces/demo/widgets?limit=1",
        ])
        .await;
    assert_eq!(names(&page), ["w1"]);
    assert_eq!(page["kind"], "WidgetList");
    assert!(page["metadata"]["continue"].is_string(), "{page}");

    // What kube-sim itself sends (kubectl fills kind/apiVersion in for
    // -o json): a custom resource's list items keep their TypeMeta, as the
    // apiserver's unstructured storage returns them; a built-in type's
    // items carry none.
    let raw = env
        .json(&[
            "get",
            "--raw",
            "/apis/example.com/v1/namespaces/demo/widgets",
        ])
        .await;
    assert_eq!(names(&raw), ["w1", "w2"]);
    for item in raw["items"].as_array().expect("items") {
        assert_eq!(item["kind"], "Widget", "{item}");
        assert_eq!(item["apiVersion"], "example.com/v1", "{item}");
    }
    let beta = env
        .json(&[
            "get",
            "--raw",
            "/apis/example.com/v1beta1/namespaces/demo/widgets",
        ])
        .await;
    assert_eq!(beta["items"][0]["apiVersion"], "example.com/v1beta1");
    let builtin = env
        .json(&["get", "--raw", "/api/v1/namespaces/demo/configmaps"])
        .await;
    let items = builtin["items"].as_array().expect("items");
    assert!(!items.is_empty(), "the demo seed has configmaps: {builtin}");
    for item in items {
        let item = item.as_object().expect("object");
        assert!(
            !item.contains_key("kind") && !item.contains_key("apiVersion"),
            "{item:?}"
        );
    }

    let out = env.run(&["delete", "widget", "w2", "-n", "demo"]).await;
    assert_eq!(out.trim(), "widget.example.com \"w2\" deleted");
    let list = env
        .json(&["get", "widgets", "-n", "demo", "-o", "json"])
        .await;
    assert_eq!(names(&list), ["w1"]);

    // Deleting the CRD deletes its objects and unserves the type.
    let out = env.run(&["delete", "crd", "widgets.example.com"]).await;
    assert_eq!(
        out.trim(),
        "customresourcedefinition.apiextensions.k8s.io \"widgets.example.com\" deleted"
    );
    for path in [
        "/apis/example.com",
        "/apis/example.com/v1",
        "/apis/example.com/v1/namespaces/demo/widgets",
        "/apis/example.com/v1beta1/namespaces/demo/widgets/w1",
    ] {
        let (ok, _, err) = env.try_run(&["get", "--raw", path]).await;
        assert!(!ok && err.contains("NotFound"), "{path}: {err}");
    }
    // kubectl still has widgets in its discovery cache, so it lists and
    // meets the 404 (as against an apiserver); a fresh cache would not
    // know the type at all.
    let (ok, _, err) = env.try_run(&["get", "widgets", "-n", "demo"]).await;
    assert!(
        !ok && err.contains("the server could not find the requested resource"),
        "{err}"
    );
    let fresh = env.dir.join("fresh-cache");
    let fresh = fresh.to_str().expect("utf-8 temp path");
    let (ok, _, err) = env
        .try_run(&["get", "widgets", "-n", "demo", "--cache-dir", fresh])
        .await;
    assert!(
        !ok && err.contains("the server doesn't have a resource type \"widgets\""),
        "{err}"
    );
    assert!(
        env.sim
            .store()
            .find("example.com", "v1", "widgets")
            .is_none()
    );
}

#[tokio::test]
async fn kubectl_get_widgets_watch_prints_rows_for_new_widgets() {
    if !common::kubectl_available() {
        return;
    }
    let env = start().await;
    env.install_crd().await;
    let f = env.file("w.yaml", &widget("first", "blue", 1));
    env.run(&["apply", "-f", &f]).await;

    let mut kubectl = env.spawn_lines(&["get", "widgets", "-n", "demo", "-w"]);
    let header = kubectl.next().await;
    assert_eq!(
        header.split_whitespace().collect::<Vec<_>>(),
        ["NAME", "AGE"]
    );
    assert!(kubectl.next().await.starts_with("first "));

    let rt = env
        .sim
        .store()
        .find("example.com", "v1", "widgets")
        .expect("served");
    env.sim
        .store()
        .create(
            rt,
            Some("demo"),
            json!({"apiVersion": "example.com/v1", "kind": "Widget",
                "metadata": {"name": "second", "namespace": "demo"}, "spec": {"size": 2}}),
        )
        .expect("create");
    assert!(kubectl.next().await.starts_with("second "));
    kubectl.child.kill().await.expect("stop kubectl");
}
