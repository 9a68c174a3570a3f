//! Where instance logs live, and reading them back (`sluice logs <service>`).
//!
//! Layout, so a separate CLI process can find them without the runtime:
//!
//! ```text
//! <state_dir>/logs/<namespace>/<revision>/service          the K_SERVICE of the revision (one line)
//! <state_dir>/logs/<namespace>/<revision>/<instance>.log   appended; one line per output line
//! ```
//!
//! Each line is `<RFC 3339 UTC time, ms> <instance> <stream> <text>`, where stream is `stdout`, `stderr`
//! or `sluice` (the runtime's own events: started, ready, exited). The fixed-width timestamp first makes
//! lines of several files merge by a plain sort.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::RuntimeError;

/// File in a revision's log folder naming its service.
pub const SERVICE_FILE: &str = "service";

/// `<state_dir>/logs/<namespace>/<revision>`.
pub fn revision_log_dir(state_dir: &Path, namespace: &str, revision: &str) -> PathBuf {
    state_dir.join("logs").join(namespace).join(revision)
}

/// `<state_dir>/logs/<namespace>/<revision>/<instance>.log`.
pub fn instance_log_path(
    state_dir: &Path,
    namespace: &str,
    revision: &str,
    instance: &str,
) -> PathBuf {
    revision_log_dir(state_dir, namespace, revision).join(format!("{instance}.log"))
}

/// Which logs to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogSelector {
    /// All revisions whose `service` file names this service.
    Service(String),
    /// One revision.
    Revision(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogQuery {
    pub namespace: String,
    pub selector: LogSelector,
}

impl LogQuery {
    pub fn service(namespace: impl Into<String>, service: impl Into<String>) -> Self {
        LogQuery {
            namespace: namespace.into(),
            selector: LogSelector::Service(service.into()),
        }
    }

    pub fn revision(namespace: impl Into<String>, revision: impl Into<String>) -> Self {
        LogQuery {
            namespace: namespace.into(),
            selector: LogSelector::Revision(revision.into()),
        }
    }
}

/// The log files the query selects, sorted by path. Missing folders give an empty list. A CLI that
/// follows logs tails these (and lists again to pick up new instances).
pub fn log_files(state_dir: &Path, query: &LogQuery) -> Result<Vec<PathBuf>, RuntimeError> {
    let ns_dir = state_dir.join("logs").join(&query.namespace);
    let revision_dirs: Vec<PathBuf> = match &query.selector {
        LogSelector::Revision(r) => vec![ns_dir.join(r)],
        LogSelector::Service(s) => list_dir(&ns_dir)?
            .into_iter()
            .filter(|dir| {
                std::fs::read_to_string(dir.join(SERVICE_FILE)).is_ok_and(|owner| owner.trim() == s)
            })
            .collect(),
    };
    let mut files = Vec::new();
    for dir in revision_dirs {
        files.extend(
            list_dir(&dir)?
                .into_iter()
                .filter(|p| p.extension().is_some_and(|e| e == "log")),
        );
    }
    files.sort();
    Ok(files)
}

/// All lines of the selected logs, merged in time order (lines with equal timestamps keep file order).
pub fn read_logs(state_dir: &Path, query: &LogQuery) -> Result<Vec<String>, RuntimeError> {
    let mut lines = Vec::new();
    for path in log_files(state_dir, query)? {
        let bytes = std::fs::read(&path).map_err(|source| RuntimeError::Logs {
            path: path.clone(),
            source,
        })?;
        lines.extend(String::from_utf8_lossy(&bytes).lines().map(str::to_string));
    }
    lines.sort_by(|a, b| timestamp(a).cmp(timestamp(b)));
    Ok(lines)
}

/// Follows the selected logs (`sluice logs -f`): each [`LogFollower::poll`] returns the complete lines
/// written since the last poll, in time order, including files of instances started meanwhile. The
/// first poll returns everything already there. The caller decides how often to poll.
#[derive(Debug)]
pub struct LogFollower {
    state_dir: PathBuf,
    query: LogQuery,
    /// Bytes consumed per file, and the unfinished last line.
    files: std::collections::BTreeMap<PathBuf, (u64, Vec<u8>)>,
}

impl LogFollower {
    pub fn new(state_dir: impl Into<PathBuf>, query: LogQuery) -> Self {
        LogFollower {
            state_dir: state_dir.into(),
            query,
            files: Default::default(),
        }
    }

    pub fn poll(&mut self) -> Result<Vec<String>, RuntimeError> {
        use std::io::{Read, Seek, SeekFrom};
        let mut lines = Vec::new();
        for path in log_files(&self.state_dir, &self.query)? {
            let (offset, partial) = self.files.entry(path.clone()).or_default();
            let err = |source| RuntimeError::Logs {
                path: path.clone(),
                source,
            };
            let mut file = std::fs::File::open(&path).map_err(err)?;
            file.seek(SeekFrom::Start(*offset)).map_err(err)?;
            let mut buf = std::mem::take(partial);
            let n = file.read_to_end(&mut buf).map_err(err)?;
            *offset += n as u64;
            let complete = buf.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
            *partial = buf.split_off(complete);
            lines.extend(String::from_utf8_lossy(&buf).lines().map(str::to_string));
        }
        lines.sort_by(|a, b| timestamp(a).cmp(timestamp(b)));
        Ok(lines)
    }
}

fn timestamp(line: &str) -> &str {
    line.split_once(' ').map_or(line, |(ts, _)| ts)
}

fn list_dir(dir: &Path) -> Result<Vec<PathBuf>, RuntimeError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(RuntimeError::Logs {
                path: dir.to_path_buf(),
                source,
            });
        }
    };
    Ok(entries.filter_map(|e| e.ok().map(|e| e.path())).collect())
}

/// Formats one log line (with its newline).
pub(crate) fn format_line(at: SystemTime, instance: &str, stream: &str, text: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(text);
    let text = text.trim_end_matches(['\n', '\r']);
    format!(
        "{} {instance} {stream} {text}\n",
        humantime::format_rfc3339_millis(at)
    )
    .into_bytes()
}

/// Appends one whole line with a single write (O_APPEND keeps concurrent writers' lines whole).
pub(crate) fn append(file: &std::fs::File, line: &[u8]) {
    let mut f = file;
    if let Err(e) = f.write_all(line) {
        tracing::warn!(error = %e, "cannot write instance log");
    }
}

/// Creates the revision's folder and `service` file; opens the instance's log for appending.
pub(crate) fn open_instance_log(
    state_dir: &Path,
    namespace: &str,
    revision: &str,
    service: &str,
    instance: &str,
) -> std::io::Result<(PathBuf, std::fs::File)> {
    let dir = revision_log_dir(state_dir, namespace, revision);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join(SERVICE_FILE), format!("{service}\n"))?;
    let path = instance_log_path(state_dir, namespace, revision, instance);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)?;
    Ok((path, file))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn follower_returns_only_new_complete_lines_and_new_files() {
        let dir = tempfile::tempdir().unwrap();
        let t = |ms| SystemTime::UNIX_EPOCH + Duration::from_millis(ms);
        let mut follower = LogFollower::new(dir.path(), LogQuery::service("default", "web"));
        assert!(follower.poll().unwrap().is_empty());
        let (_, a) = open_instance_log(dir.path(), "default", "web-1", "web", "web-1-a").unwrap();
        append(&a, &format_line(t(1), "web-1-a", "stdout", b"one"));
        append(&a, b"1970-01-01T00:00:00.002Z web-1-a stdout unfin");
        assert_eq!(
            follower.poll().unwrap(),
            vec!["1970-01-01T00:00:00.001Z web-1-a stdout one"]
        );
        append(&a, b"ished\n");
        let (_, b) = open_instance_log(dir.path(), "default", "web-1", "web", "web-1-b").unwrap();
        append(&b, &format_line(t(3), "web-1-b", "stderr", b"three"));
        assert_eq!(
            follower.poll().unwrap(),
            vec![
                "1970-01-01T00:00:00.002Z web-1-a stdout unfinished",
                "1970-01-01T00:00:00.003Z web-1-b stderr three",
            ]
        );
        assert!(follower.poll().unwrap().is_empty());
    }

    #[test]
    fn paths_follow_the_convention() {
        let p = instance_log_path(Path::new("/s"), "default", "web-00001", "web-00001-x7k2p");
        assert_eq!(
            p,
            PathBuf::from("/s/logs/default/web-00001/web-00001-x7k2p.log")
        );
    }

    #[test]
    fn lines_carry_time_instance_and_stream() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_500);
        let line = format_line(at, "web-1", "stdout", b"hello\r\n");
        assert_eq!(
            String::from_utf8(line).unwrap(),
            "1970-01-01T00:00:01.500Z web-1 stdout hello\n"
        );
    }

    #[test]
    fn service_query_merges_revisions_in_time_order() {
        let dir = tempfile::tempdir().unwrap();
        let t = |ms| SystemTime::UNIX_EPOCH + Duration::from_millis(ms);
        for (rev, svc, inst, ms, text) in [
            ("web-1", "web", "web-1-a", 3, "third"),
            ("web-1", "web", "web-1-a", 1, "first"),
            ("web-2", "web", "web-2-b", 2, "second"),
            ("api-1", "api", "api-1-c", 0, "other service"),
        ] {
            let (_, f) = open_instance_log(dir.path(), "default", rev, svc, inst).unwrap();
            append(&f, &format_line(t(ms), inst, "stdout", text.as_bytes()));
        }
        let lines = read_logs(dir.path(), &LogQuery::service("default", "web")).unwrap();
        let texts: Vec<&str> = lines
            .iter()
            .map(|l| l.rsplit(' ').next().unwrap())
            .collect();
        assert_eq!(texts, vec!["first", "second", "third"]);
        let only = read_logs(dir.path(), &LogQuery::revision("default", "api-1")).unwrap();
        assert_eq!(only.len(), 1);
        assert!(
            read_logs(dir.path(), &LogQuery::service("other", "web"))
                .unwrap()
                .is_empty()
        );
    }
}
