//! `<state-dir>/serving-state.json`: the serving controller's memory ([`ServingState`]: revision names
//! and specs, generations, image digests) kept across restarts of `sluice up`, so a restart does not
//! renumber revisions and a `traffic` entry pinned to a `revisionName` keeps pointing at the same code.
//!
//! Written atomically (a temporary file in the same folder, then rename) whenever it changes; read once
//! at start. A file that cannot be read is moved aside (`serving-state.json.corrupt-<unix time>`) and
//! reported; Sluice then starts from an empty memory, as on a first run.

use std::path::{Path, PathBuf};

use sluice_serving::ServingState;

pub const STATE_FILE: &str = "serving-state.json";

/// What [`load`] found.
#[derive(Debug)]
pub struct Loaded {
    pub state: ServingState,
    /// Why the file was not used (it was moved to the path named in the message).
    pub problem: Option<String>,
}

/// Reads the state file in `state_dir`; a missing file is a first run.
pub fn load(state_dir: &Path, now_unix: u64) -> Loaded {
    let path = state_dir.join(STATE_FILE);
    let text = match std::fs::read(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Loaded {
                state: ServingState::default(),
                problem: None,
            };
        }
        Err(e) => {
            return Loaded {
                state: ServingState::default(),
                problem: Some(format!(
                    "{}: cannot read it ({e}); starting with no revisions remembered",
                    path.display()
                )),
            };
        }
    };
    match serde_json::from_slice::<ServingState>(&text) {
        Ok(state) => Loaded {
            state,
            problem: None,
        },
        Err(e) => {
            let aside = set_aside_path(&path, now_unix);
            let moved = match std::fs::rename(&path, &aside) {
                Ok(()) => format!("moved to {}", aside.display()),
                Err(m) => format!("could not move it aside: {m}"),
            };
            Loaded {
                state: ServingState::default(),
                problem: Some(format!(
                    "{}: not a serving state ({e}); {moved}; starting with no revisions remembered \
                     (revision names start again at 00001)",
                    path.display()
                )),
            }
        }
    }
}

fn set_aside_path(path: &Path, now_unix: u64) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".corrupt-{now_unix}"));
    path.with_file_name(name)
}

/// Writes `state` to the state file in `state_dir` atomically: a reader (or a crash) sees the old
/// file or the new one, never half of one.
pub fn save(state_dir: &Path, state: &ServingState) -> std::io::Result<()> {
    // A temporary file of its own per write: two writers (the background one and the last write at
    // shutdown) never rename each other's half-written file into place.
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = state_dir.join(STATE_FILE);
    let tmp = state_dir.join(format!(".{STATE_FILE}.{}.{n}.tmp", std::process::id()));
    let json = serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?;
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&json)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_serving::{ReconcileInput, reconcile};

    fn state_with_a_revision() -> ServingState {
        let text = "apiVersion: serving.knative.dev/v1\nkind: Service\nmetadata: {name: web}\nspec:\n  \
                    template:\n    spec:\n      containers: [{image: web:v1}]\n";
        let mut input = ReconcileInput::default();
        for o in sluice_api::parse_documents(text) {
            if let Ok(sluice_api::Object::KnativeService(s)) = o {
                input.services.push(s);
            }
        }
        let mut state = ServingState::default();
        reconcile(&input, &mut state);
        state
            .image_digests
            .insert("default/web-00001".into(), "sha256:abc".into());
        state
    }

    #[test]
    fn the_state_round_trips_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let loaded = load(dir.path(), 1);
        assert_eq!(loaded.state, ServingState::default());
        assert!(loaded.problem.is_none());
        let state = state_with_a_revision();
        assert!(!state.configurations.is_empty());
        save(dir.path(), &state).unwrap();
        save(dir.path(), &state).unwrap(); // over an existing file
        let loaded = load(dir.path(), 2);
        assert_eq!(loaded.state, state);
        assert!(loaded.problem.is_none());
        // Only the state file is left: the temporary one was renamed.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [STATE_FILE]);
    }

    #[test]
    fn a_corrupt_file_is_reported_and_set_aside_never_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        for (n, text) in [
            &b"{\"objects\": ["[..],
            b"not json",
            b"{\"objects\": 7}",
            &[0xff, 0xfe][..],
        ]
        .into_iter()
        .enumerate()
        {
            std::fs::write(dir.path().join(STATE_FILE), text).unwrap();
            let loaded = load(dir.path(), 100 + n as u64);
            assert_eq!(loaded.state, ServingState::default());
            let problem = loaded.problem.expect("reported");
            let aside = dir.path().join(format!("{STATE_FILE}.corrupt-{}", 100 + n));
            assert!(problem.contains(&aside.display().to_string()), "{problem}");
            assert_eq!(std::fs::read(&aside).unwrap(), text);
            assert!(!dir.path().join(STATE_FILE).exists());
        }
    }
}
