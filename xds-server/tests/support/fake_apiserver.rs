//! An in-process fake Kubernetes API server that speaks the real list/watch HTTP JSON protocol, so
//! Kubernetes-facing code is tested through its real client (kube) and not a mocked trait.
//!
//! Serves, for any `api/v1/...` or `apis/{group}/{version}/...` resource, cluster-wide or under
//! `namespaces/{ns}/`:
//! - `GET` list: a `{Kind}List` with `metadata.resourceVersion` (`limit`/`continue` ignored: one page);
//! - `GET ?watch=1&resourceVersion=N`: newline-delimited `{"type": ADDED|MODIFIED|DELETED|BOOKMARK|ERROR,
//!   "object": ...}` events after N, then live ones, kept open until `timeoutSeconds`, [`FakeApiServer::close_watches`]
//!   or the server is dropped; a resourceVersion older than [`FakeApiServer::compact`] gets the real
//!   server's in-stream `ERROR` with a 410 `Expired` Status;
//! - `GET` one object; `PATCH` (JSON merge patch) of an object or its `status` subresource, recorded;
//! - `POST` create (409 `AlreadyExists` when the name is taken), `PUT` replace (409 `Conflict` when
//!   the body's `metadata.resourceVersion` is not the stored one, as the real server's optimistic
//!   concurrency; 404 when absent), `DELETE`: what leader election on a coordination.k8s.io/v1 Lease
//!   needs (every kind works the same way).
//!
//! Every request records the value of the `x-test-client` header, so a test that runs several clients
//! (replicas) against one server can tell who wrote what.
//!
//! `labelSelector` and `fieldSelector` are honoured for `key=value`, `key==value` and `key!=value` terms
//! (field paths are dotted, e.g. `metadata.name`, `type`).
//!
//! Tests change objects with [`FakeApiServer::apply`] and [`FakeApiServer::delete`] while watches are
//! open. Dropping the server stops it and every open connection.

#![allow(dead_code)] // each test binary uses a different part of it

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::CONTENT_TYPE;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// A request the server received.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    pub query: String,
    /// The `x-test-client` header, if the client sent one.
    pub client: Option<String>,
}

/// The header a test client may send to be told apart in [`FakeApiServer::requests`].
pub const CLIENT_HEADER: &str = "x-test-client";

impl RecordedRequest {
    /// A query parameter, decoded.
    pub fn param(&self, name: &str) -> Option<String> {
        query_params(&self.query).remove(name)
    }

    pub fn is_watch(&self) -> bool {
        self.param("watch").is_some_and(|w| w == "1" || w == "true")
    }
}

/// A PATCH the server received, with its body as JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedPatch {
    pub path: String,
    pub query: String,
    pub content_type: String,
    pub body: Value,
}

/// One change, as a watch delivers it.
#[derive(Debug, Clone)]
struct Change {
    resource: String,
    namespace: String,
    resource_version: u64,
    type_: &'static str,
    object: Value,
}

/// What open watch streams are told.
#[derive(Debug, Clone)]
enum Signal {
    Change(Box<Change>),
    /// End every stream open now.
    Close,
}

#[derive(Debug, Default)]
struct Store {
    resource_version: u64,
    /// resource ("api/v1/services") -> (namespace, name) -> object.
    objects: BTreeMap<String, BTreeMap<(String, String), Value>>,
    /// resource -> (apiVersion, kind), learnt from applied objects.
    kinds: BTreeMap<String, (String, String)>,
    history: Vec<Change>,
    /// Watches from a resourceVersion below this get 410 Gone.
    compacted_below: u64,
    requests: Vec<RecordedRequest>,
    patches: Vec<RecordedPatch>,
}

struct Inner {
    store: Mutex<Store>,
    /// Sent while `store` is locked, so a watch that subscribes under the lock misses nothing.
    signals: broadcast::Sender<Signal>,
    /// While set, changes are not sent to open watches, as if their connections had stalled.
    held: AtomicBool,
}

pub struct FakeApiServer {
    addr: SocketAddr,
    inner: Arc<Inner>,
    accept: JoinHandle<()>,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        // The accept task owns every connection task (a JoinSet), so this ends them all.
        self.accept.abort();
    }
}

impl FakeApiServer {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let inner = Arc::new(Inner {
            store: Mutex::new(Store::default()),
            signals: broadcast::channel(4096).0,
            held: AtomicBool::new(false),
        });
        let served = inner.clone();
        let accept = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let inner = served.clone();
                connections.spawn(async move {
                    let service = service_fn(move |req| handle(inner.clone(), req));
                    // Errors here are clients going away mid-stream; nothing to report.
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
                while connections.try_join_next().is_some() {}
            }
        });
        FakeApiServer {
            addr,
            inner,
            accept,
        }
    }

    /// `http://127.0.0.1:PORT`, for `kube::Config::new`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Creates or replaces an object (it must carry apiVersion, kind, metadata.name and, when
    /// namespaced, metadata.namespace); sets its resourceVersion, uid and generation like the real
    /// server and tells open watches ADDED or MODIFIED. Returns the new resourceVersion.
    pub fn apply(&self, mut object: Value) -> u64 {
        let (api_version, kind) = type_of(&object);
        let resource = resource_path(&api_version, &kind);
        let (namespace, name) = key_of(&object);
        let mut store = self.inner.store.lock().unwrap();
        store.resource_version += 1;
        let rv = store.resource_version;
        store
            .kinds
            .insert(resource.clone(), (api_version.clone(), kind.clone()));
        let previous = store
            .objects
            .get(&resource)
            .and_then(|objects| objects.get(&(namespace.clone(), name.clone())))
            .cloned();
        let meta = object
            .as_object_mut()
            .expect("object")
            .entry("metadata")
            .or_insert_with(|| json!({}));
        meta["resourceVersion"] = json!(rv.to_string());
        let (type_, generation, uid) = match &previous {
            None => ("ADDED", 1, format!("uid-{rv}")),
            Some(old) => {
                let old_generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
                let spec_changed = old.get("spec") != object.get("spec");
                (
                    "MODIFIED",
                    old_generation + i64::from(spec_changed),
                    old["metadata"]["uid"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                )
            }
        };
        let meta = &mut object["metadata"];
        meta["generation"] = json!(generation);
        meta["uid"] = json!(uid);
        store
            .objects
            .entry(resource.clone())
            .or_default()
            .insert((namespace.clone(), name), object.clone());
        self.record_change(&mut store, resource, namespace, rv, type_, object);
        rv
    }

    /// Deletes an object and tells open watches DELETED; false when there was none.
    pub fn delete(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> bool {
        let resource = resource_path(api_version, kind);
        let mut store = self.inner.store.lock().unwrap();
        let Some(mut object) = store
            .objects
            .get_mut(&resource)
            .and_then(|objects| objects.remove(&(namespace.to_string(), name.to_string())))
        else {
            return false;
        };
        store.resource_version += 1;
        let rv = store.resource_version;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.record_change(
            &mut store,
            resource,
            namespace.to_string(),
            rv,
            "DELETED",
            object,
        );
        true
    }

    fn record_change(
        &self,
        store: &mut Store,
        resource: String,
        namespace: String,
        resource_version: u64,
        type_: &'static str,
        object: Value,
    ) {
        let change = Change {
            resource,
            namespace,
            resource_version,
            type_,
            object,
        };
        publish(&self.inner, store, change);
    }

    pub fn get(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let resource = resource_path(api_version, kind);
        let store = self.inner.store.lock().unwrap();
        store
            .objects
            .get(&resource)
            .and_then(|objects| objects.get(&(namespace.to_string(), name.to_string())))
            .cloned()
    }

    /// Ends every watch stream open now (a clean end of the chunked response, as when the real
    /// server's watch times out); clients are expected to watch again from their last resourceVersion.
    pub fn close_watches(&self) {
        let _store = self.inner.store.lock().unwrap();
        let _ = self.inner.signals.send(Signal::Close);
    }

    /// While held, open watches deliver no changes (they are lost to them, as on a stalled
    /// connection); changes still go to history, lists and new watches' replay.
    pub fn hold_watches(&self, held: bool) {
        self.inner.held.store(held, Ordering::SeqCst);
    }

    /// Forgets history: a watch from any resourceVersion before now gets 410 Gone and the client
    /// must list again.
    pub fn compact(&self) {
        let mut store = self.inner.store.lock().unwrap();
        store.compacted_below = store.resource_version;
        store.history.clear();
    }

    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.inner.store.lock().unwrap().requests.clone()
    }

    /// Lists (not watches) received for a resource path such as `/api/v1/services`.
    pub fn list_count(&self, path: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.method == "GET" && r.path == path && !r.is_watch())
            .count()
    }

    /// Watches received for a resource path such as `/api/v1/services`.
    pub fn watch_count(&self, path: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.method == "GET" && r.path == path && r.is_watch())
            .count()
    }

    pub fn patches(&self) -> Vec<RecordedPatch> {
        self.inner.store.lock().unwrap().patches.clone()
    }
}

/// Records a change and tells open watches, unless they are held (then they never see it).
fn publish(inner: &Inner, store: &mut Store, change: Change) {
    store.history.push(change.clone());
    if !inner.held.load(Ordering::SeqCst) {
        // No receiver is fine: nobody is watching yet.
        let _ = inner.signals.send(Signal::Change(Box::new(change)));
    }
}

fn type_of(object: &Value) -> (String, String) {
    let field = |f: &str| {
        object[f]
            .as_str()
            .unwrap_or_else(|| panic!("object without {f}: {object}"))
            .to_string()
    };
    (field("apiVersion"), field("kind"))
}

fn key_of(object: &Value) -> (String, String) {
    let meta = &object["metadata"];
    (
        meta["namespace"].as_str().unwrap_or_default().to_string(),
        meta["name"]
            .as_str()
            .unwrap_or_else(|| panic!("object without metadata.name: {object}"))
            .to_string(),
    )
}

/// `v1`/`Service` -> `api/v1/services`; `discovery.k8s.io/v1`/`EndpointSlice` ->
/// `apis/discovery.k8s.io/v1/endpointslices`.
fn resource_path(api_version: &str, kind: &str) -> String {
    let plural = match kind {
        "Endpoints" => "endpoints".to_string(),
        "Ingress" => "ingresses".to_string(),
        k => format!("{}s", k.to_lowercase()),
    };
    if api_version.contains('/') {
        format!("apis/{api_version}/{plural}")
    } else {
        format!("api/{api_version}/{plural}")
    }
}

/// A request path, taken apart.
#[derive(Debug)]
struct Target {
    resource: String,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

fn parse_target(path: &str) -> Option<Target> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (prefix, rest) = match parts.as_slice() {
        ["api", version, rest @ ..] => (format!("api/{version}"), rest),
        ["apis", group, version, rest @ ..] => (format!("apis/{group}/{version}"), rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        _ => (None, rest),
    };
    match rest {
        [plural, tail @ ..] if tail.len() <= 2 => Some(Target {
            resource: format!("{prefix}/{plural}"),
            namespace,
            name: tail.first().map(|s| s.to_string()),
            subresource: tail.get(1).map(|s| s.to_string()),
        }),
        _ => None,
    }
}

fn query_params(query: &str) -> BTreeMap<String, String> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%' && i + 2 < bytes.len())
            .then(|| std::str::from_utf8(&bytes[i + 1..i + 3]).ok())
            .flatten()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match (escaped, bytes[i]) {
            (Some(b), _) => {
                out.push(b);
                i += 3;
                continue;
            }
            (None, b'+') => out.push(b' '),
            (None, b) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Equality-based label and field selectors, as far as they are used here.
#[derive(Debug, Default, Clone)]
struct Selector {
    labels: Vec<(String, bool, String)>,
    fields: Vec<(String, bool, String)>,
}

impl Selector {
    fn from_params(params: &BTreeMap<String, String>) -> Self {
        let terms = |s: Option<&String>| {
            s.map(|s| {
                s.split(',')
                    .filter(|t| !t.is_empty())
                    .map(|t| {
                        if let Some((k, v)) = t.split_once("!=") {
                            (k.to_string(), false, v.to_string())
                        } else {
                            let (k, v) = t.split_once('=').unwrap_or((t, ""));
                            (k.to_string(), true, v.trim_start_matches('=').to_string())
                        }
                    })
                    .collect()
            })
            .unwrap_or_default()
        };
        Selector {
            labels: terms(params.get("labelSelector")),
            fields: terms(params.get("fieldSelector")),
        }
    }

    fn matches(&self, object: &Value) -> bool {
        let labels_ok = self.labels.iter().all(|(k, eq, v)| {
            let actual = object["metadata"]["labels"][k].as_str();
            (actual == Some(v.as_str())) == *eq
        });
        let fields_ok = self.fields.iter().all(|(path, eq, v)| {
            let actual = path
                .split('.')
                .try_fold(object, |o, part| o.get(part))
                .and_then(Value::as_str)
                .unwrap_or_default();
            (actual == v) == *eq
        });
        labels_ok && fields_ok
    }
}

fn full(status: StatusCode, body: Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed_unsync())
        .expect("response")
}

fn status_error(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    full(code, status_object(code.as_u16(), reason, message))
}

fn status_object(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

async fn handle(inner: Arc<Inner>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or_default().to_string();
    let content_type = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let client = req
        .headers()
        .get(CLIENT_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    inner.store.lock().unwrap().requests.push(RecordedRequest {
        method: method.to_string(),
        path: path.clone(),
        query: query.clone(),
        client,
    });
    let params = query_params(&query);
    let Some(target) = parse_target(&path) else {
        return Ok(status_error(
            StatusCode::NOT_FOUND,
            "NotFound",
            "no such path",
        ));
    };
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return Ok(status_error(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                &e.to_string(),
            ));
        }
    };
    let response = match (&method, &target.name) {
        (&Method::GET, None) if params.get("watch").is_some_and(|w| w == "1" || w == "true") => {
            watch(&inner, &target, &params)
        }
        (&Method::GET, None) => list(&inner, &target, &params),
        (&Method::GET, Some(name)) => get(&inner, &target, name),
        (&Method::PATCH, Some(name)) => {
            patch(&inner, &path, &target, name, &query, &content_type, &body)
        }
        (&Method::POST, None) => create(&inner, &target, &body),
        (&Method::PUT, Some(name)) if target.subresource.is_none() => {
            replace(&inner, &target, name, &body)
        }
        (&Method::DELETE, Some(name)) => remove(&inner, &target, name),
        _ => status_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "not supported by the fake API server",
        ),
    };
    Ok(response)
}

fn in_namespace(target: &Target, namespace: &str) -> bool {
    target.namespace.as_deref().is_none_or(|ns| ns == namespace)
}

fn list(inner: &Inner, target: &Target, params: &BTreeMap<String, String>) -> Response<Body> {
    let selector = Selector::from_params(params);
    let store = inner.store.lock().unwrap();
    let items: Vec<Value> = store
        .objects
        .get(&target.resource)
        .into_iter()
        .flatten()
        .filter(|((ns, _), obj)| in_namespace(target, ns) && selector.matches(obj))
        .map(|(_, obj)| obj.clone())
        .collect();
    let (api_version, kind) = store
        .kinds
        .get(&target.resource)
        .cloned()
        .unwrap_or_else(|| ("v1".to_string(), String::new()));
    full(
        StatusCode::OK,
        json!({
            "apiVersion": api_version,
            "kind": format!("{kind}List"),
            "metadata": { "resourceVersion": store.resource_version.to_string() },
            "items": items,
        }),
    )
}

fn get(inner: &Inner, target: &Target, name: &str) -> Response<Body> {
    let store = inner.store.lock().unwrap();
    let namespace = target.namespace.clone().unwrap_or_default();
    match store
        .objects
        .get(&target.resource)
        .and_then(|objects| objects.get(&(namespace, name.to_string())))
    {
        Some(obj) => full(StatusCode::OK, obj.clone()),
        None => status_error(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("{name} not found"),
        ),
    }
}

/// The apiVersion and kind a body names, or those learnt for the resource.
fn body_type(store: &Store, target: &Target, object: &Value) -> Option<(String, String)> {
    match (object["apiVersion"].as_str(), object["kind"].as_str()) {
        (Some(a), Some(k)) => Some((a.to_string(), k.to_string())),
        _ => store.kinds.get(&target.resource).cloned(),
    }
}

fn create(inner: &Inner, target: &Target, body: &[u8]) -> Response<Body> {
    let mut object: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return status_error(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string()),
    };
    let Some(name) = object["metadata"]["name"].as_str().map(str::to_string) else {
        return status_error(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "metadata.name is required",
        );
    };
    let namespace = target.namespace.clone().unwrap_or_default();
    let mut store = inner.store.lock().unwrap();
    let Some((api_version, kind)) = body_type(&store, target, &object) else {
        return status_error(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "apiVersion and kind are required",
        );
    };
    let key = (namespace.clone(), name.clone());
    if store
        .objects
        .get(&target.resource)
        .is_some_and(|objects| objects.contains_key(&key))
    {
        return full(
            StatusCode::CONFLICT,
            status_object(409, "AlreadyExists", &format!("{name} already exists")),
        );
    }
    store.resource_version += 1;
    let rv = store.resource_version;
    object["apiVersion"] = json!(api_version);
    object["kind"] = json!(kind);
    let meta = &mut object["metadata"];
    meta["namespace"] = json!(namespace);
    meta["resourceVersion"] = json!(rv.to_string());
    meta["uid"] = json!(format!("uid-{rv}"));
    meta["generation"] = json!(1);
    store
        .kinds
        .insert(target.resource.clone(), (api_version, kind));
    store
        .objects
        .entry(target.resource.clone())
        .or_default()
        .insert(key, object.clone());
    let change = Change {
        resource: target.resource.clone(),
        namespace,
        resource_version: rv,
        type_: "ADDED",
        object: object.clone(),
    };
    publish(inner, &mut store, change);
    full(StatusCode::CREATED, object)
}

/// PUT: the whole object, guarded by its resourceVersion (optimistic concurrency).
fn replace(inner: &Inner, target: &Target, name: &str, body: &[u8]) -> Response<Body> {
    let mut object: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return status_error(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string()),
    };
    let namespace = target.namespace.clone().unwrap_or_default();
    let key = (namespace.clone(), name.to_string());
    let mut store = inner.store.lock().unwrap();
    let Some(current) = store
        .objects
        .get(&target.resource)
        .and_then(|objects| objects.get(&key))
        .cloned()
    else {
        return status_error(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("{name} not found"),
        );
    };
    let stored_rv = current["metadata"]["resourceVersion"].clone();
    match object["metadata"]["resourceVersion"].as_str() {
        Some(rv) if json!(rv) != stored_rv => {
            return full(
                StatusCode::CONFLICT,
                status_object(
                    409,
                    "Conflict",
                    &format!(
                        "Operation cannot be fulfilled on {name}: the object has been modified; please apply your changes to the latest version and try again"
                    ),
                ),
            );
        }
        Some(_) => {}
        None => {
            return status_error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid",
                "metadata.resourceVersion: must be specified for an update",
            );
        }
    }
    store.resource_version += 1;
    let rv = store.resource_version;
    let generation = current["metadata"]["generation"].as_i64().unwrap_or(1)
        + i64::from(current.get("spec") != object.get("spec"));
    if object.get("apiVersion").is_none() {
        object["apiVersion"] = current["apiVersion"].clone();
        object["kind"] = current["kind"].clone();
    }
    let meta = &mut object["metadata"];
    meta["namespace"] = json!(namespace);
    meta["resourceVersion"] = json!(rv.to_string());
    meta["uid"] = current["metadata"]["uid"].clone();
    meta["generation"] = json!(generation);
    store
        .objects
        .get_mut(&target.resource)
        .expect("resource")
        .insert(key, object.clone());
    let change = Change {
        resource: target.resource.clone(),
        namespace,
        resource_version: rv,
        type_: "MODIFIED",
        object: object.clone(),
    };
    publish(inner, &mut store, change);
    full(StatusCode::OK, object)
}

fn remove(inner: &Inner, target: &Target, name: &str) -> Response<Body> {
    let namespace = target.namespace.clone().unwrap_or_default();
    let mut store = inner.store.lock().unwrap();
    let Some(mut object) = store
        .objects
        .get_mut(&target.resource)
        .and_then(|objects| objects.remove(&(namespace.clone(), name.to_string())))
    else {
        return status_error(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("{name} not found"),
        );
    };
    store.resource_version += 1;
    let rv = store.resource_version;
    object["metadata"]["resourceVersion"] = json!(rv.to_string());
    let change = Change {
        resource: target.resource.clone(),
        namespace,
        resource_version: rv,
        type_: "DELETED",
        object: object.clone(),
    };
    publish(inner, &mut store, change);
    full(StatusCode::OK, object)
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(fields) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let object = target.as_object_mut().expect("object");
    for (key, value) in fields {
        if value.is_null() {
            object.remove(key);
        } else {
            merge_patch(object.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

fn patch(
    inner: &Inner,
    path: &str,
    target: &Target,
    name: &str,
    query: &str,
    content_type: &str,
    body: &[u8],
) -> Response<Body> {
    let body: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return status_error(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string()),
    };
    let mut store = inner.store.lock().unwrap();
    store.patches.push(RecordedPatch {
        path: path.to_string(),
        query: query.to_string(),
        content_type: content_type.to_string(),
        body: body.clone(),
    });
    if content_type != "application/merge-patch+json" {
        return status_error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            "the fake API server only takes merge patches",
        );
    }
    let namespace = target.namespace.clone().unwrap_or_default();
    let key = (namespace.clone(), name.to_string());
    let Some(mut object) = store
        .objects
        .get(&target.resource)
        .and_then(|objects| objects.get(&key))
        .cloned()
    else {
        return status_error(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("{name} not found"),
        );
    };
    match target.subresource.as_deref() {
        // The status subresource takes only status; everything else in the patch is ignored.
        Some("status") => merge_patch(
            object
                .as_object_mut()
                .expect("object")
                .entry("status")
                .or_insert(Value::Null),
            &body["status"],
        ),
        None => merge_patch(&mut object, &body),
        Some(other) => {
            return status_error(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("no subresource {other}"),
            );
        }
    }
    store.resource_version += 1;
    let rv = store.resource_version;
    object["metadata"]["resourceVersion"] = json!(rv.to_string());
    store
        .objects
        .get_mut(&target.resource)
        .expect("resource")
        .insert(key, object.clone());
    let change = Change {
        resource: target.resource.clone(),
        namespace,
        resource_version: rv,
        type_: "MODIFIED",
        object: object.clone(),
    };
    publish(inner, &mut store, change);
    full(StatusCode::OK, object)
}

fn event_line(type_: &str, object: &Value) -> Bytes {
    let mut line = json!({ "type": type_, "object": object }).to_string();
    line.push('\n');
    Bytes::from(line)
}

/// One open watch: what it still has to send, and what it listens to.
struct WatchStream {
    pending: VecDeque<Bytes>,
    /// No live changes follow the pending lines (a 410).
    finished: bool,
    signals: broadcast::Receiver<Signal>,
    resource: String,
    target_namespace: Option<String>,
    selector: Selector,
    deadline: Instant,
}

impl WatchStream {
    fn wants(&self, change: &Change) -> bool {
        change.resource == self.resource
            && self
                .target_namespace
                .as_deref()
                .is_none_or(|ns| ns == change.namespace)
            && self.selector.matches(&change.object)
    }

    async fn next_line(&mut self) -> Option<Bytes> {
        if let Some(line) = self.pending.pop_front() {
            return Some(line);
        }
        if self.finished {
            return None;
        }
        loop {
            let signal = tokio::select! {
                s = self.signals.recv() => s,
                () = tokio::time::sleep_until(self.deadline) => return None,
            };
            match signal {
                Ok(Signal::Change(change)) => {
                    if !self.wants(&change) {
                        continue;
                    }
                    return Some(event_line(change.type_, &change.object));
                }
                // Closed, or fell behind: end the stream; the client watches again.
                Ok(Signal::Close) | Err(_) => return None,
            }
        }
    }
}

fn watch(inner: &Arc<Inner>, target: &Target, params: &BTreeMap<String, String>) -> Response<Body> {
    let selector = Selector::from_params(params);
    let bookmarks = params
        .get("allowWatchBookmarks")
        .is_some_and(|b| b == "true" || b == "1");
    let timeout = params
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .unwrap_or(1800);
    let from = params
        .get("resourceVersion")
        .filter(|rv| !rv.is_empty())
        .map(|rv| rv.parse::<u64>().unwrap_or(0))
        .unwrap_or(0);

    let store = inner.store.lock().unwrap();
    let mut stream = WatchStream {
        pending: VecDeque::new(),
        finished: false,
        signals: inner.signals.subscribe(),
        resource: target.resource.clone(),
        target_namespace: target.namespace.clone(),
        selector,
        deadline: Instant::now() + Duration::from_secs(timeout),
    };
    if from == 0 {
        // "Any" semantics: start with the current objects as ADDED.
        for ((ns, _), obj) in store.objects.get(&target.resource).into_iter().flatten() {
            if in_namespace(target, ns) && stream.selector.matches(obj) {
                stream.pending.push_back(event_line("ADDED", obj));
            }
        }
    } else if from < store.compacted_below {
        // The real server answers 200 and sends the 410 inside the stream.
        stream.pending.push_back(event_line(
            "ERROR",
            &status_object(
                410,
                "Expired",
                &format!(
                    "too old resource version: {from} ({})",
                    store.compacted_below
                ),
            ),
        ));
        stream.finished = true;
    } else {
        let missed: Vec<Bytes> = store
            .history
            .iter()
            .filter(|c| c.resource_version > from && stream.wants(c))
            .map(|c| event_line(c.type_, &c.object))
            .collect();
        stream.pending.extend(missed);
    }
    if bookmarks && !stream.finished {
        let (api_version, kind) = store
            .kinds
            .get(&target.resource)
            .cloned()
            .unwrap_or_else(|| ("v1".to_string(), String::new()));
        stream.pending.push_back(event_line(
            "BOOKMARK",
            &json!({
                "apiVersion": api_version,
                "kind": kind,
                "metadata": { "resourceVersion": store.resource_version.to_string() },
            }),
        ));
    }
    drop(store);

    let lines = futures::stream::unfold(stream, |mut stream| async move {
        let line = stream.next_line().await?;
        Some((Ok::<_, Infallible>(Frame::data(line)), stream))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(CONTENT_TYPE, "application/json")
        .body(BodyExt::boxed_unsync(StreamBody::new(lines.boxed())))
        .expect("response")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_taken_apart() {
        let t = parse_target(
            "/apis/networking.internal.knative.dev/v1alpha1/namespaces/default/ingresses/web/status",
        )
        .unwrap();
        assert_eq!(
            t.resource,
            "apis/networking.internal.knative.dev/v1alpha1/ingresses"
        );
        assert_eq!(t.namespace.as_deref(), Some("default"));
        assert_eq!(t.name.as_deref(), Some("web"));
        assert_eq!(t.subresource.as_deref(), Some("status"));
        let t = parse_target("/api/v1/services").unwrap();
        assert_eq!(t.resource, "api/v1/services");
        assert!(t.namespace.is_none() && t.name.is_none());
    }
}
