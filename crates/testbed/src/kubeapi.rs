//! A stand-in for the Kubernetes API server, for the two calls Pronto
//! makes: `PATCH /api/v1/nodes/NAME` with a JSON merge patch (RFC 7386, as
//! the API server applies `application/merge-patch+json`) and `GET` of a
//! DaemonSet. It checks the bearer token and answers errors with
//! Kubernetes `Status` objects. No cluster runs on the test machines.

use std::collections::BTreeMap;
use std::io::{BufReader, Read};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use anyhow::Result;
use serde_json::{Value, json};

use crate::http::{Head, accept_each, respond};

#[derive(Debug, Default)]
struct State {
    nodes: BTreeMap<String, Value>,
    daemonsets: BTreeMap<(String, String), Value>,
    /// `METHOD PATH` of every request.
    seen: Vec<String>,
}

#[derive(Debug)]
struct Shared {
    token: String,
    state: Mutex<State>,
    stopping: AtomicBool,
}

#[derive(Debug)]
pub struct FakeApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl FakeApiServer {
    /// A server accepting `token`, with these nodes (no labels).
    pub fn start(token: &str, nodes: &[&str]) -> Result<Self> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let addr = listener.local_addr()?;
        let mut state = State::default();
        for node in nodes {
            state.nodes.insert(
                (*node).to_owned(),
                json!({"kind": "Node", "apiVersion": "v1",
                       "metadata": {"name": node, "labels": {"kubernetes.io/hostname": node}}}),
            );
        }
        let shared = Arc::new(Shared {
            token: token.to_owned(),
            state: Mutex::new(state),
            stopping: AtomicBool::new(false),
        });
        let acceptor = {
            let (stop, shared) = (shared.clone(), shared.clone());
            accept_each(
                listener,
                move || stop.stopping.load(Ordering::SeqCst),
                move |stream| {
                    let _ = serve(stream, &shared);
                },
            )
        };
        Ok(Self {
            addr,
            shared,
            acceptor: Some(acceptor),
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The labels of `node` now.
    pub fn labels(&self, node: &str) -> BTreeMap<String, String> {
        let state = self.state();
        let Some(labels) = state
            .nodes
            .get(node)
            .and_then(|n| n["metadata"]["labels"].as_object())
        else {
            return BTreeMap::new();
        };
        labels
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
            .collect()
    }

    pub fn add_daemonset(&self, namespace: &str, name: &str) {
        self.state().daemonsets.insert(
            (namespace.to_owned(), name.to_owned()),
            json!({"kind": "DaemonSet", "apiVersion": "apps/v1",
                   "metadata": {"name": name, "namespace": namespace}}),
        );
    }

    pub fn delete_daemonset(&self, namespace: &str, name: &str) {
        self.state()
            .daemonsets
            .remove(&(namespace.to_owned(), name.to_owned()));
    }

    /// `METHOD PATH` of every request so far.
    pub fn requests(&self) -> Vec<String> {
        self.state().seen.clone()
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

fn status(code: u16, reason: &str, message: &str) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
               "reason": reason, "message": message, "code": code}),
    )
}

fn serve(mut stream: TcpStream, shared: &Shared) -> Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let Some(request) = Head::read(&mut reader)? else {
        return Ok(());
    };
    let mut body = vec![
        0;
        request
            .get("content-length")
            .and_then(|l| l.parse().ok())
            .unwrap_or(0)
    ];
    reader.read_exact(&mut body)?;
    let mut words = request.first.split(' ');
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let mut state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
    state.seen.push(format!("{method} {path}"));
    let authorized = request.get("authorization") == Some(&format!("Bearer {}", shared.token));
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (code, answer) = if !authorized {
        status(401, "Unauthorized", "Unauthorized")
    } else {
        match (method, parts.as_slice()) {
            ("PATCH", ["api", "v1", "nodes", name]) => {
                if request.get("content-type") != Some("application/merge-patch+json") {
                    status(
                        415,
                        "UnsupportedMediaType",
                        "the body of the request was in an unknown format",
                    )
                } else {
                    match (
                        state.nodes.get_mut(*name),
                        serde_json::from_slice::<Value>(&body),
                    ) {
                        (None, _) => {
                            status(404, "NotFound", &format!("nodes \"{name}\" not found"))
                        }
                        (_, Err(e)) => status(400, "BadRequest", &e.to_string()),
                        (Some(node), Ok(patch)) => {
                            merge_patch(node, &patch);
                            (200, node.clone())
                        }
                    }
                }
            }
            ("GET", ["apis", "apps", "v1", "namespaces", ns, "daemonsets", name]) => {
                match state
                    .daemonsets
                    .get(&((*ns).to_owned(), (*name).to_owned()))
                {
                    Some(ds) => (200, ds.clone()),
                    None => status(
                        404,
                        "NotFound",
                        &format!("daemonsets.apps \"{name}\" not found"),
                    ),
                }
            }
            _ => status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ),
        }
    };
    drop(state);
    respond(
        &mut stream,
        code,
        &[("Content-Type", "application/json".into())],
        answer.to_string().as_bytes(),
    )
}

/// RFC 7386: objects merge key by key, `null` removes, anything else
/// replaces.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let object = target.as_object_mut().expect("an object");
    for (key, value) in patch {
        if value.is_null() {
            object.remove(key);
        } else {
            merge_patch(object.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let mut doc = json!({"a": {"b": 1, "c": 2}, "d": [1]});
        merge_patch(&mut doc, &json!({"a": {"b": null, "e": 3}, "d": {"x": 1}}));
        assert_eq!(doc, json!({"a": {"c": 2, "e": 3}, "d": {"x": 1}}));
    }
}
