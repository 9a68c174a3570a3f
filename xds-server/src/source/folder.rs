//! A watched folder of Knative/Kubernetes YAML: the embedded default state source.
//!
//! Every `*.yaml` / `*.yml` file below the folder (hidden files and folders skipped) may hold several
//! documents. A file event re-reads the files it names (a folder moved in, or an event without paths,
//! makes a full walk that re-reads files whose size or mtime changed), so a change in a folder of
//! thousands of files costs what changed. A broken document is reported with
//! its file, line and field and left out; everything else keeps working.
//!
//! Only the bad part suffers, as with Knative's webhook (which rejects a bad update and leaves the
//! old object in place):
//! - a file that stops parsing (an editor's half-saved file, a stray line) keeps its last good
//!   objects serving until it parses again;
//! - an object defined in two files is served from the file that defined it first; the newcomer is
//!   reported, naming the file that holds the object already. (On the first scan, with no history,
//!   the file whose path sorts first wins.)

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use notify::{RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};

use sluice_api::Ingress;
use sluice_api::core::{EndpointSlice, Endpoints, Secret, Service};
use sluice_api::meta::ObjectMeta;
use sluice_api::objects::{Object, ParseError, read_documents};

use super::{SourceError, SourceSnapshot, StateSource};
use crate::state::ClusterState;

/// How long to wait after a file event for more (an editor's save is several events).
const DEBOUNCE: Duration = Duration::from_millis(3);

pub struct FolderSource {
    root: PathBuf,
}

impl FolderSource {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        FolderSource { root: root.into() }
    }
}

/// What one file held when it was last read.
#[derive(Debug, Clone)]
struct FileEntry {
    len: u64,
    modified: Option<SystemTime>,
    /// The objects it defines, shared so that building a snapshot copies pointers, not objects.
    /// While the file does not parse, this holds its last good objects too.
    objects: Vec<Defined>,
    errors: Vec<SourceError>,
    /// Documents of Knative kinds Sluice does not serve: reported with the errors, but the file is
    /// not broken (its other objects apply as written).
    notices: Vec<SourceError>,
}

/// One object of a file, and where it is defined.
#[derive(Debug, Clone)]
struct Defined {
    /// 1-based document index in the file.
    doc: usize,
    /// 1-based line where the document starts.
    line: usize,
    object: Shared,
}

/// (kind, namespace, name): what two definitions of one object share.
type Identity = (&'static str, String, String);

/// A parsed object as the snapshot holds it: the kinds [`ClusterState`] keys by type, shared.
#[derive(Debug, Clone)]
enum Shared {
    Ingress(Arc<Ingress>),
    Service(Arc<Service>),
    Endpoints(Arc<Endpoints>),
    EndpointSlice(Arc<EndpointSlice>),
    Secret(Arc<Secret>),
    /// Knative Serving/Eventing objects and ConfigMaps, for the controllers that read them.
    Other(Box<Object>),
}

impl Shared {
    fn new(object: Object) -> Shared {
        match object {
            Object::Ingress(o) => Shared::Ingress(Arc::new(o)),
            Object::Service(o) => Shared::Service(Arc::new(o)),
            Object::Endpoints(o) => Shared::Endpoints(Arc::new(o)),
            Object::EndpointSlice(o) => Shared::EndpointSlice(Arc::new(o)),
            Object::Secret(o) => Shared::Secret(Arc::new(o)),
            other => Shared::Other(Box::new(other)),
        }
    }

    /// (kind, namespace, name), for duplicate detection; None for objects without metadata.
    fn id(&self) -> Option<Identity> {
        self.identity()
            .map(|(kind, meta)| (kind, meta.namespace.clone(), meta.name.clone()))
    }

    /// The kind and metadata, for duplicate detection; None for objects without them.
    fn identity(&self) -> Option<(&'static str, &ObjectMeta)> {
        match self {
            Shared::Ingress(o) => Some(("Ingress", &o.metadata)),
            Shared::Service(o) => Some(("Service", &o.metadata)),
            Shared::Endpoints(o) => Some(("Endpoints", &o.metadata)),
            Shared::EndpointSlice(o) => Some(("EndpointSlice", &o.metadata)),
            Shared::Secret(o) => Some(("Secret", &o.metadata)),
            Shared::Other(o) => o.kind().zip(o.metadata()),
        }
    }
}

/// The folder's parsed contents, updated incrementally by [`FolderScan::rescan`].
#[derive(Debug, Default)]
pub struct FolderScan {
    files: BTreeMap<PathBuf, FileEntry>,
    /// Folders the last full walk could not read.
    walk_errors: Vec<SourceError>,
    /// The last snapshot, when no object in it was defined twice: an edit that keeps every file's
    /// objects (kinds and names) patches it instead of rebuilding it from every file.
    last: Option<SourceSnapshot>,
    /// The file each object is served from: it keeps the object when another file defines it too.
    owners: BTreeMap<Identity, PathBuf>,
}

impl FolderScan {
    /// Re-reads changed files below `root` (size or mtime changed, or named in `touched` by a file
    /// event: mtime alone can miss two writes in one tick), forgets deleted ones, and returns the
    /// resulting snapshot.
    pub fn rescan(&mut self, root: &Path, touched: &BTreeSet<PathBuf>) -> SourceSnapshot {
        let mut seen = BTreeSet::new();
        let mut walk_errors = Vec::new();
        let mut paths = Vec::new();
        collect_yaml_files(root, &mut paths, &mut walk_errors);
        for path in paths {
            let meta = match std::fs::metadata(&path) {
                Ok(m) => m,
                Err(_) => continue, // deleted between listing and stat
            };
            let (len, modified) = (meta.len(), meta.modified().ok());
            seen.insert(path.clone());
            if let Some(e) = self.files.get(&path)
                && e.len == len
                && e.modified == modified
                && !touched.contains(&path)
            {
                continue;
            }
            let entry = read_file(&path, len, modified, self.files.get(&path));
            self.files.insert(path, entry);
        }
        self.files.retain(|p, _| seen.contains(p));
        self.walk_errors = walk_errors;
        self.snapshot()
    }

    /// Updates only the `touched` paths (what file events named): re-reads those that are YAML files,
    /// forgets those that are gone. Returns None when that is not enough, because a touched path is a
    /// folder (created or moved in: its files were never named), so the caller walks everything.
    /// With thousands of files, a change then costs one `stat` instead of one per file.
    pub fn update(&mut self, root: &Path, touched: &BTreeSet<PathBuf>) -> Option<SourceSnapshot> {
        let mut patch = true;
        let mut patched = Vec::new();
        for path in touched {
            let Ok(relative) = path.strip_prefix(root) else {
                return None; // spelled differently from `root` (a symlink?): walk to be sure
            };
            if relative.as_os_str().is_empty() {
                return None; // the folder itself
            }
            if relative
                .components()
                .any(|c| c.as_os_str().to_string_lossy().starts_with('.'))
            {
                continue; // hidden, as in the walk
            }
            match std::fs::metadata(path) {
                Ok(m) if m.is_dir() => return None,
                Ok(m) if is_yaml(path) => {
                    let entry = read_file(path, m.len(), m.modified().ok(), self.files.get(path));
                    if let Some(old) = self.files.insert(path.clone(), entry) {
                        patch &= same_objects(&old, &self.files[path]);
                    } else {
                        patch = false;
                    }
                    patched.push(path);
                }
                Ok(_) => {}
                // Gone: a file, or a folder with everything below it.
                Err(_) => {
                    // Paths order by component, so what lies below `path` follows it.
                    let gone: Vec<PathBuf> = self
                        .files
                        .range::<Path, _>((Bound::Included(path.as_path()), Bound::Unbounded))
                        .map(|(p, _)| p)
                        .take_while(|p| p.starts_with(path))
                        .cloned()
                        .collect();
                    patch &= gone.is_empty();
                    for p in gone {
                        self.files.remove(&p);
                    }
                }
            }
        }
        if patch && let Some(last) = &mut self.last {
            for path in patched {
                for defined in &self.files[path].objects {
                    last.replace(&defined.object);
                }
            }
            return Some(last.clone());
        }
        Some(self.snapshot())
    }

    fn snapshot(&mut self) -> SourceSnapshot {
        let mut errors = self.walk_errors.clone();
        let mut state = ClusterState::default();
        // Every definition of each object, in file order; one is served (its winner), the others
        // are reported. (Origins are formatted only when reported: this runs over every object on
        // every change.)
        type Definitions<'a> = Vec<(&'a Path, &'a Defined)>;
        let mut definitions: BTreeMap<(&'static str, &str, &str), Definitions> = BTreeMap::new();
        for (path, entry) in &self.files {
            errors.extend(entry.errors.iter().cloned());
            errors.extend(entry.notices.iter().cloned());
            for defined in &entry.objects {
                if let Some((kind, meta)) = defined.object.identity() {
                    definitions
                        .entry((kind, meta.namespace.as_str(), meta.name.as_str()))
                        .or_default()
                        .push((path.as_path(), defined));
                }
            }
        }
        let mut owners = BTreeMap::new();
        // The served definitions, by address: a broken file's kept objects may share a document
        // index with its new ones.
        let mut served: BTreeSet<*const Defined> = BTreeSet::new();
        let mut duplicates = false;
        for ((kind, namespace, name), defs) in &definitions {
            let id = (*kind, namespace.to_string(), name.to_string());
            // The file that served it before keeps it; a newcomer never replaces a running object.
            let winner = self
                .owners
                .get(&id)
                .and_then(|owner| defs.iter().position(|(p, _)| p == owner))
                .unwrap_or(0);
            let (winner_path, winner_def) = defs[winner];
            served.insert(std::ptr::from_ref(winner_def));
            for (i, (path, defined)) in defs.iter().enumerate() {
                if i == winner {
                    continue;
                }
                duplicates = true;
                errors.push(SourceError {
                    origin: at_line(path, defined.line),
                    message: format!(
                        "{kind} {namespace}/{name} is already defined in {}; this copy is ignored \
                         (the first definition keeps serving)",
                        at_line(winner_path, winner_def.line)
                    ),
                });
            }
            owners.insert(id, winner_path.to_path_buf());
        }
        let mut snapshot_objects = Vec::new();
        let mut origins = BTreeMap::new();
        for (path, entry) in &self.files {
            for defined in &entry.objects {
                let object = &defined.object;
                let Some((kind, meta)) = object.identity() else {
                    continue;
                };
                if !served.contains(&std::ptr::from_ref(defined)) {
                    continue;
                }
                let key = (meta.namespace.clone(), meta.name.clone());
                match object {
                    Shared::Ingress(o) => {
                        state.ingresses.insert(key, o.clone());
                    }
                    Shared::Service(o) => {
                        state.services.insert(key, o.clone());
                    }
                    Shared::Endpoints(o) => {
                        state.endpoints.insert(key, o.clone());
                    }
                    Shared::EndpointSlice(o) => {
                        state.endpoint_slices.insert(key, o.clone());
                    }
                    Shared::Secret(o) => {
                        state.secrets.insert(key, o.clone());
                    }
                    Shared::Other(other) => {
                        if !matches!(**other, Object::Other { .. }) {
                            snapshot_objects.push(Object::clone(other));
                            origins.insert(
                                format!("{kind} {}/{}", meta.namespace, meta.name),
                                at_line(path, defined.line),
                            );
                        }
                    }
                }
            }
        }
        self.owners = owners;
        let snapshot = SourceSnapshot {
            state,
            errors,
            objects: snapshot_objects,
            origins,
        };
        self.last = (!duplicates).then(|| snapshot.clone());
        snapshot
    }
}

/// Whether a re-read file defines the same objects (kinds and names, in order) and the same errors as
/// before, so the snapshot only needs the objects replaced.
fn same_objects(old: &FileEntry, new: &FileEntry) -> bool {
    old.errors == new.errors
        && old.notices == new.notices
        && old.objects.len() == new.objects.len()
        && old.objects.iter().zip(&new.objects).all(|(a, b)| {
            let (a, b) = (a.object.identity(), b.object.identity());
            a.map(|(k, m)| (k, &m.namespace, &m.name)) == b.map(|(k, m)| (k, &m.namespace, &m.name))
        })
}

impl SourceSnapshot {
    /// Puts a re-read object in place of its namesake.
    fn replace(&mut self, object: &Shared) {
        let Some((_, meta)) = object.identity() else {
            return;
        };
        let key = (meta.namespace.clone(), meta.name.clone());
        match object {
            Shared::Ingress(o) => {
                self.state.ingresses.insert(key, o.clone());
            }
            Shared::Service(o) => {
                self.state.services.insert(key, o.clone());
            }
            Shared::Endpoints(o) => {
                self.state.endpoints.insert(key, o.clone());
            }
            Shared::EndpointSlice(o) => {
                self.state.endpoint_slices.insert(key, o.clone());
            }
            Shared::Secret(o) => {
                self.state.secrets.insert(key, o.clone());
            }
            Shared::Other(other) => {
                let same = |o: &Object| {
                    o.kind() == other.kind()
                        && o.metadata().map(|m| (&m.namespace, &m.name))
                            == Some((&meta.namespace, &meta.name))
                };
                if let Some(slot) = self.objects.iter_mut().find(|o| same(o)) {
                    *slot = Object::clone(other);
                }
            }
        }
    }
}

fn is_hidden(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

fn is_yaml(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml") | Some("yml")
    )
}

fn collect_yaml_files(dir: &Path, out: &mut Vec<PathBuf>, errors: &mut Vec<SourceError>) {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            errors.push(SourceError {
                origin: dir.display().to_string(),
                message: format!("cannot read folder: {e}"),
            });
            return;
        }
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if is_hidden(&path) {
            continue;
        }
        match entry.file_type() {
            Ok(t) if t.is_dir() => collect_yaml_files(&path, out, errors),
            Ok(_) if is_yaml(&path) => out.push(path),
            _ => {}
        }
    }
}

/// `path:line`, as compilers print it.
fn at_line(path: &Path, line: usize) -> String {
    format!("{}:{line}", path.display())
}

/// Reads one file. When it cannot be read or a document does not parse, the objects it held before
/// (`previous`) that the new text no longer yields keep serving, and the errors say so.
fn read_file(
    path: &Path,
    len: u64,
    modified: Option<SystemTime>,
    previous: Option<&FileEntry>,
) -> FileEntry {
    let mut entry = FileEntry {
        len,
        modified,
        objects: Vec::new(),
        errors: Vec::new(),
        notices: Vec::new(),
    };
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            entry.errors.push(SourceError {
                origin: path.display().to_string(),
                message: format!("cannot read file: {e}"),
            });
            keep_last_good(&mut entry, previous);
            return entry;
        }
    };
    // An editor that saves in place truncates first: an empty file that held objects is most
    // likely half-saved, so it keeps them (deleting the file removes them).
    if text.is_empty() && previous.is_some_and(|p| !p.objects.is_empty()) {
        entry.errors.push(SourceError {
            origin: path.display().to_string(),
            message: "the file is empty; delete it to remove its objects".to_string(),
        });
        keep_last_good(&mut entry, previous);
        return entry;
    }
    for document in read_documents(&text) {
        match document.object {
            Ok(Object::Other {
                api_version, kind, ..
            }) if !is_known_elsewhere(&api_version, &kind) => entry.errors.push(SourceError {
                origin: at_line(path, document.line),
                message: format!(
                    "{api_version} {kind} is not served by Sluice's networking layer; the document is ignored"
                ),
            }),
            // A Knative kind no part of Sluice reads (DomainMapping, ContainerSource, SinkBinding,
            // channels, subscriptions, flows...): said, not dropped silently.
            Ok(Object::Other {
                api_version,
                kind,
                name,
            }) => entry.notices.push(SourceError {
                origin: at_line(path, document.line),
                message: format!(
                    "{api_version} {kind} {name:?} is not supported by Sluice (yet); the document is \
                     ignored"
                ),
            }),
            Ok(object) => entry.objects.push(Defined {
                doc: document.index,
                line: document.line,
                object: Shared::new(object),
            }),
            Err(e) => entry.errors.push(parse_error(path, document.line, &e)),
        }
    }
    if !entry.errors.is_empty() {
        keep_last_good(&mut entry, previous);
    }
    entry
}

/// `file:line: field: message`, the line being the error's own or else its document's.
fn parse_error(path: &Path, document_line: usize, e: &ParseError) -> SourceError {
    let origin = at_line(path, e.line.unwrap_or(document_line));
    let message = match &e.field {
        Some(field) => format!("{field}: {}", e.message),
        None => e.message.clone(),
    };
    SourceError { origin, message }
}

/// Keeps serving the objects a file held before it broke: those of `previous` the new read did not
/// yield (an object that still parses is replaced by its new version). The errors name them.
fn keep_last_good(entry: &mut FileEntry, previous: Option<&FileEntry>) {
    let Some(previous) = previous else { return };
    let yielded: BTreeSet<Identity> = entry.objects.iter().filter_map(|d| d.object.id()).collect();
    let kept: Vec<Defined> = previous
        .objects
        .iter()
        .filter(|d| d.object.id().is_some_and(|id| !yielded.contains(&id)))
        .cloned()
        .collect();
    if kept.is_empty() {
        return;
    }
    let names: Vec<String> = kept
        .iter()
        .filter_map(|d| d.object.identity())
        .map(|(kind, meta)| format!("{kind} {}", meta.key()))
        .collect();
    let note = format!(
        " (until this is fixed, the last good version keeps serving: {})",
        names.join(", ")
    );
    for error in &mut entry.errors {
        error.message.push_str(&note);
    }
    entry.objects.extend(kept);
    entry.objects.sort_by_key(|d| d.doc);
}

/// Objects other parts of Sluice read from the same folder (so not an error here).
fn is_known_elsewhere(api_version: &str, _kind: &str) -> bool {
    let group = api_version.split('/').next().unwrap_or_default();
    // Knative's groups (serving, eventing, sources, messaging, flows...): read by the serving and
    // eventing planes, or reported as not supported.
    group.ends_with(".knative.dev") || (api_version == "v1" && _kind == "ConfigMap")
}

impl StateSource for FolderSource {
    fn run(&self, tx: watch::Sender<SourceSnapshot>) -> BoxFuture<'_, Result<(), SourceError>> {
        Box::pin(async move {
            let root = self.root.clone();
            if !root.is_dir() {
                return Err(SourceError {
                    origin: root.display().to_string(),
                    message: "not a folder".into(),
                });
            }
            let (event_tx, mut event_rx) = mpsc::unbounded_channel::<Vec<PathBuf>>();
            let mut watcher =
                notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
                    // An error event still means something changed: rescan. Access events are
                    // ignored: our own reads cause them, and they would make every read trigger
                    // another rescan that reads the file again, forever.
                    let paths = match res {
                        Ok(e) if matches!(e.kind, notify::EventKind::Access(_)) => return,
                        Ok(e) => e.paths,
                        Err(_) => Vec::new(),
                    };
                    let _ = event_tx.send(paths);
                })
                .map_err(|e| SourceError {
                    origin: root.display().to_string(),
                    message: format!("cannot watch folder: {e}"),
                })?;
            watcher
                .watch(&root, RecursiveMode::Recursive)
                .map_err(|e| SourceError {
                    origin: root.display().to_string(),
                    message: format!("cannot watch folder: {e}"),
                })?;

            let scan = Arc::new(std::sync::Mutex::new(FolderScan::default()));
            let mut touched = BTreeSet::new();
            // Walk everything first, and whenever an event did not say which paths changed.
            let mut walk = true;
            let mut scanned_once = false;
            loop {
                let scan2 = scan.clone();
                let root2 = root.clone();
                let touched_now = std::mem::take(&mut touched);
                let walk_now = std::mem::take(&mut walk);
                let snapshot = tokio::task::spawn_blocking(move || {
                    let mut scan = scan2.lock().expect("scan lock");
                    let updated = if walk_now {
                        None
                    } else {
                        scan.update(&root2, &touched_now)
                    };
                    updated.unwrap_or_else(|| scan.rescan(&root2, &touched_now))
                })
                .await
                .expect("folder scan panicked");
                for e in &snapshot.errors {
                    tracing::warn!(origin = %e.origin, "{}", e.message);
                }
                // The first scan is always sent, even if empty: it tells the controller the folder
                // has been read.
                let first = !std::mem::replace(&mut scanned_once, true);
                tx.send_if_modified(|current| {
                    if *current == snapshot && !first {
                        false
                    } else {
                        *current = snapshot;
                        true
                    }
                });
                match event_rx.recv().await {
                    Some(paths) => {
                        walk |= paths.is_empty();
                        touched.extend(paths);
                    }
                    None => return Ok(()),
                }
                tokio::time::sleep(DEBOUNCE).await;
                while let Ok(paths) = event_rx.try_recv() {
                    walk |= paths.is_empty();
                    touched.extend(paths);
                }
            }
        })
    }

    fn write_ingress_status<'a>(
        &'a self,
        _ingress: &'a Ingress,
    ) -> BoxFuture<'a, Result<(), SourceError>> {
        Box::pin(async { Ok(()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INGRESS: &str = r#"
apiVersion: networking.internal.knative.dev/v1alpha1
kind: Ingress
metadata:
  name: hello
  namespace: default
  annotations:
    networking.knative.dev/ingress.class: sluice.ingress.networking.knative.dev
spec:
  rules:
  - hosts: [hello.example.com]
    http:
      paths:
      - splits:
        - serviceName: hello
          serviceNamespace: default
          servicePort: 80
"#;

    const SERVICE: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: hello
spec:
  ports:
  - port: 80
"#;

    fn scan(dir: &Path) -> SourceSnapshot {
        FolderScan::default().rescan(dir, &BTreeSet::new())
    }

    #[test]
    fn reads_multi_document_files_and_subfolders() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(
            dir.path().join("a.yaml"),
            format!("{INGRESS}\n---\n{SERVICE}"),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("sub/b.yml"),
            SERVICE.replace("hello", "other"),
        )
        .unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not yaml").unwrap();
        std::fs::create_dir(dir.path().join(".hidden")).unwrap();
        std::fs::write(dir.path().join(".hidden/c.yaml"), "garbage: [").unwrap();
        let snap = scan(dir.path());
        assert!(snap.errors.is_empty(), "{:?}", snap.errors);
        assert_eq!(snap.state.ingresses.len(), 1);
        let keys: Vec<_> = snap.state.services.keys().cloned().collect();
        assert_eq!(
            keys,
            vec![
                ("default".to_string(), "hello".to_string()),
                ("default".to_string(), "other".to_string())
            ]
        );
    }

    #[test]
    fn a_broken_file_is_reported_with_its_path_and_the_rest_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("good.yaml"), INGRESS).unwrap();
        std::fs::write(
            dir.path().join("bad.yaml"),
            SERVICE.replace("port: 80", "port: eighty"),
        )
        .unwrap();
        let snap = scan(dir.path());
        assert_eq!(snap.state.ingresses.len(), 1);
        assert!(snap.state.services.is_empty());
        assert_eq!(snap.errors.len(), 1, "{:?}", snap.errors);
        assert!(
            snap.errors[0].origin.ends_with("bad.yaml:8"),
            "{:?}",
            snap.errors
        );
        assert_eq!(
            snap.errors[0].message,
            "spec.ports[0].port: invalid type: string \"eighty\", expected i32"
        );
    }

    fn port_of(snap: &SourceSnapshot, name: &str) -> i32 {
        snap.state.services[&("default".to_string(), name.to_string())]
            .spec
            .ports[0]
            .port
    }

    #[test]
    fn a_file_that_stops_parsing_keeps_its_last_good_objects() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.yaml");
        let good = format!("{INGRESS}---\n{SERVICE}");
        std::fs::write(&file, &good).unwrap();
        let mut scan = FolderScan::default();
        let touched = BTreeSet::from([file.clone()]);
        assert!(scan.rescan(dir.path(), &touched).errors.is_empty());

        let appended = format!("{good}  bad: [\n");
        let half_saved = String::new();
        let truncated = good[..good.len() / 2].to_string();
        let second_broken = format!("{INGRESS}---\napiVersion: v1\nkind: [Service\n");
        for (case, text) in [
            ("a bad line appended", appended),
            ("truncated half-way", truncated),
            ("the second document broken", second_broken),
            ("emptied by an editor that saves in place", half_saved),
        ] {
            std::fs::write(&file, &text).unwrap();
            for snap in [
                scan.update(dir.path(), &touched).unwrap(),
                scan.rescan(dir.path(), &touched),
            ] {
                assert_eq!(snap.state.ingresses.len(), 1, "{case}: {:?}", snap.errors);
                assert_eq!(port_of(&snap, "hello"), 80, "{case}");
                assert_eq!(snap.errors.len(), 1, "{case}: {:?}", snap.errors);
                let error = &snap.errors[0];
                if !text.is_empty() {
                    let line: usize = error
                        .origin
                        .strip_prefix(&format!("{}:", file.display()))
                        .and_then(|l| l.parse().ok())
                        .unwrap_or_else(|| panic!("{case}: no file:line in {error}"));
                    assert!(
                        line >= 1 && line <= text.lines().count() + 1,
                        "{case}: {error}"
                    );
                }
                assert!(
                    error
                        .message
                        .contains("the last good version keeps serving"),
                    "{case}: {error}"
                );
            }
        }

        // Fixed (with a change): the new version is served and the error clears.
        std::fs::write(&file, good.replace("port: 80", "port: 81")).unwrap();
        let snap = scan.update(dir.path(), &touched).unwrap();
        assert!(snap.errors.is_empty(), "{:?}", snap.errors);
        assert_eq!(port_of(&snap, "hello"), 81);
        assert_eq!(snap, FolderScan::default().rescan(dir.path(), &touched));
    }

    #[test]
    fn a_document_that_parses_is_updated_while_another_is_broken() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.yaml");
        std::fs::write(&file, format!("{SERVICE}---\n{INGRESS}")).unwrap();
        let mut scan = FolderScan::default();
        let touched = BTreeSet::from([file.clone()]);
        scan.rescan(dir.path(), &touched);
        let broken_ingress = INGRESS.replace("servicePort: 80", "servicePort: [80]");
        std::fs::write(
            &file,
            format!("{}---\n{broken_ingress}", SERVICE.replace("80", "82")),
        )
        .unwrap();
        let snap = scan.rescan(dir.path(), &touched);
        assert_eq!(port_of(&snap, "hello"), 82);
        let ingress = snap.state.ingresses.values().next().expect("kept");
        let split = &ingress.spec.rules[0].http.as_ref().unwrap().paths[0].splits[0];
        assert_eq!(
            split.service_port,
            sluice_api::ingress::IntOrString::Int(80)
        );
        assert!(
            snap.errors[0].message.contains("Ingress default/hello"),
            "{:?}",
            snap.errors
        );
    }

    #[test]
    fn a_typo_below_spec_is_reported_as_file_line_and_field_and_the_last_good_version_stays() {
        let service = "\
apiVersion: serving.knative.dev/v1
kind: Service
metadata:
  name: web
spec:
  template:
    spec:
      containers:
      - image: web
        command: [web]
";
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("svc.yaml");
        std::fs::write(&file, service).unwrap();
        let mut scan = FolderScan::default();
        let touched = BTreeSet::from([file.clone()]);
        let good = scan.rescan(dir.path(), &touched);
        assert!(good.errors.is_empty(), "{:?}", good.errors);
        std::fs::write(&file, service.replace("command:", "comand:")).unwrap();
        let snap = scan.update(dir.path(), &touched).unwrap();
        assert_eq!(
            snap.errors[0].to_string(),
            format!(
                "{}:10: spec.template.spec.containers[0].comand: unknown field (did you mean \
                 `command`?) (until this is fixed, the last good version keeps serving: \
                 Service.serving.knative.dev default/web)",
                file.display()
            )
        );
        assert_eq!(snap.objects, good.objects);
    }

    #[test]
    fn knative_kinds_sluice_does_not_serve_are_reported_with_file_and_kind() {
        let service = "\
apiVersion: serving.knative.dev/v1
kind: Service
metadata:
  name: web
spec:
  template:
    spec:
      containers:
      - image: web
---
apiVersion: serving.knative.dev/v1beta1
kind: DomainMapping
metadata:
  name: example.com
spec:
  ref: {name: web, kind: Service, apiVersion: serving.knative.dev/v1}
";
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("svc.yaml");
        std::fs::write(&file, service).unwrap();
        let mut scan = FolderScan::default();
        let touched = BTreeSet::from([file.clone()]);
        let snap = scan.rescan(dir.path(), &touched);
        assert_eq!(snap.objects.len(), 1, "{:?}", snap.objects);
        assert_eq!(
            snap.errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            [format!(
                "{}:11: serving.knative.dev/v1beta1 DomainMapping \"example.com\" is not \
                 supported by Sluice (yet); the document is ignored",
                file.display()
            )]
        );
        // The file is not broken by it: removing the Service removes it (no "last good" kept).
        std::fs::write(&file, service.split("---\n").nth(1).unwrap()).unwrap();
        let snap = scan.rescan(dir.path(), &touched);
        assert!(snap.objects.is_empty(), "{:?}", snap.objects);
        assert_eq!(snap.errors.len(), 1, "{:?}", snap.errors);
        assert!(
            snap.errors[0].origin.ends_with("svc.yaml:1"),
            "{:?}",
            snap.errors
        );
    }

    #[test]
    fn a_new_file_never_replaces_a_running_object() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.yaml"), dir.path().join("b.yaml"));
        std::fs::write(&b, SERVICE).unwrap();
        let mut scan = FolderScan::default();
        scan.rescan(dir.path(), &BTreeSet::new());
        // a.yaml sorts first, but b.yaml had the Service first.
        std::fs::write(&a, format!("# a newcomer\n{}", SERVICE.replace("80", "81"))).unwrap();
        for snap in [
            scan.update(dir.path(), &BTreeSet::from([a.clone()]))
                .unwrap(),
            scan.rescan(dir.path(), &BTreeSet::new()),
        ] {
            assert_eq!(port_of(&snap, "hello"), 80);
            assert_eq!(snap.errors.len(), 1, "{:?}", snap.errors);
            assert_eq!(snap.errors[0].origin, format!("{}:3", a.display()));
            assert_eq!(
                snap.errors[0].message,
                format!(
                    "Service default/hello is already defined in {}:2; this copy is ignored \
                     (the first definition keeps serving)",
                    b.display()
                )
            );
        }
        // Edits to the serving file apply; the newcomer stays out.
        std::fs::write(&b, SERVICE.replace("80", "82")).unwrap();
        let snap = scan
            .update(dir.path(), &BTreeSet::from([b.clone()]))
            .unwrap();
        assert_eq!(port_of(&snap, "hello"), 82);
        // Once the first file lets go, the other one serves.
        std::fs::remove_file(&b).unwrap();
        let snap = scan.update(dir.path(), &BTreeSet::from([b])).unwrap();
        assert_eq!(port_of(&snap, "hello"), 81);
        assert!(snap.errors.is_empty(), "{:?}", snap.errors);
    }

    #[test]
    fn duplicate_objects_name_both_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), SERVICE).unwrap();
        std::fs::write(dir.path().join("b.yaml"), SERVICE).unwrap();
        let snap = scan(dir.path());
        assert_eq!(snap.state.services.len(), 1);
        assert_eq!(snap.errors.len(), 1);
        assert!(snap.errors[0].origin.contains("b.yaml"));
        assert!(snap.errors[0].message.contains("a.yaml"));
    }

    #[test]
    fn rescan_sees_changes_and_deletions() {
        let dir = tempfile::tempdir().unwrap();
        let mut scan = FolderScan::default();
        let file = dir.path().join("a.yaml");
        std::fs::write(&file, SERVICE).unwrap();
        assert_eq!(
            scan.rescan(dir.path(), &BTreeSet::new())
                .state
                .services
                .len(),
            1
        );
        // Same length, possibly same mtime tick: the file event forces a re-read.
        std::fs::write(&file, SERVICE.replace("hello", "hellp")).unwrap();
        let touched = BTreeSet::from([file.clone()]);
        let snap = scan.rescan(dir.path(), &touched);
        assert!(
            snap.state
                .services
                .contains_key(&("default".into(), "hellp".into()))
        );
        std::fs::remove_file(&file).unwrap();
        assert!(
            scan.rescan(dir.path(), &BTreeSet::new())
                .state
                .services
                .is_empty()
        );
    }

    #[test]
    fn update_reads_only_the_touched_paths_and_walks_for_new_folders() {
        let dir = tempfile::tempdir().unwrap();
        let mut scan = FolderScan::default();
        let (a, b) = (dir.path().join("a.yaml"), dir.path().join("b.yaml"));
        std::fs::write(&a, SERVICE).unwrap();
        scan.rescan(dir.path(), &BTreeSet::new());
        let svc = |name: &str| ("default".to_string(), name.to_string());

        // b is not named by an event: update leaves it out (the walk would find it).
        std::fs::write(&b, SERVICE.replace("hello", "other")).unwrap();
        std::fs::write(&a, SERVICE.replace("hello", "hellp")).unwrap();
        let snap = scan
            .update(dir.path(), &BTreeSet::from([a.clone()]))
            .unwrap();
        let names: Vec<_> = snap.state.services.keys().cloned().collect();
        assert_eq!(names, vec![svc("hellp")]);

        // Hidden and non-YAML paths are ignored; a deleted file is forgotten.
        let hidden = dir.path().join(".b.yaml.tmp");
        std::fs::write(&hidden, SERVICE).unwrap();
        std::fs::remove_file(&a).unwrap();
        let snap = scan
            .update(dir.path(), &BTreeSet::from([a.clone(), b.clone(), hidden]))
            .unwrap();
        let names: Vec<_> = snap.state.services.keys().cloned().collect();
        assert_eq!(names, vec![svc("other")]);

        // A folder moved in: its files were never named, so the caller must walk.
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        std::fs::write(sub.join("c.yaml"), SERVICE).unwrap();
        assert!(
            scan.update(dir.path(), &BTreeSet::from([sub.clone()]))
                .is_none()
        );
        assert_eq!(
            scan.rescan(dir.path(), &BTreeSet::new())
                .state
                .services
                .len(),
            2
        );

        // A deleted folder takes its files with it, and only them.
        let sibling = dir.path().join("sub-x.yaml");
        std::fs::write(&sibling, SERVICE.replace("hello", "sibling")).unwrap();
        scan.update(dir.path(), &BTreeSet::from([sibling])).unwrap();
        std::fs::remove_dir_all(&sub).unwrap();
        let snap = scan.update(dir.path(), &BTreeSet::from([sub])).unwrap();
        let names: Vec<_> = snap.state.services.keys().cloned().collect();
        assert_eq!(names, vec![svc("other"), svc("sibling")]);
    }

    #[test]
    fn an_edit_that_keeps_the_objects_patches_the_snapshot_like_a_full_scan() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.yaml"), dir.path().join("b.yaml"));
        std::fs::write(&a, INGRESS).unwrap();
        std::fs::write(&b, SERVICE).unwrap();
        let mut scan = FolderScan::default();
        scan.rescan(dir.path(), &BTreeSet::new());
        std::fs::write(&a, INGRESS.replace("hello.example.com", "hi.example.com")).unwrap();
        let patched = scan.update(dir.path(), &BTreeSet::from([a])).unwrap();
        assert_eq!(
            patched,
            FolderScan::default().rescan(dir.path(), &BTreeSet::new())
        );
        let ingress = patched.state.ingresses.values().next().unwrap();
        assert_eq!(ingress.spec.rules[0].hosts, ["hi.example.com"]);
    }

    #[tokio::test]
    async fn run_publishes_changes_while_running() {
        let dir = tempfile::tempdir().unwrap();
        let source = FolderSource::new(dir.path());
        let (tx, mut rx) = watch::channel(SourceSnapshot::default());
        let task = tokio::spawn(async move { source.run(tx).await });
        std::fs::write(dir.path().join("a.yaml"), INGRESS).unwrap();
        let wait = async {
            loop {
                rx.changed().await.unwrap();
                if rx.borrow().state.ingresses.len() == 1 {
                    break;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(5), wait)
            .await
            .unwrap();
        std::fs::remove_file(dir.path().join("a.yaml")).unwrap();
        let wait = async {
            loop {
                rx.changed().await.unwrap();
                if rx.borrow().state.ingresses.is_empty() {
                    break;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(5), wait)
            .await
            .unwrap();
        task.abort();
    }
}
