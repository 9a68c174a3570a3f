//! Consumer offsets on disk: one small text file for all consumers, replaced atomically.
//!
//! ```text
//! sluice-offsets v1
//! <offset> <consumer name to the end of the line>
//! ```
//! One file for all consumers (rather than one per consumer) so that a flush costs one write, one
//! fsync and one rename whatever the number of triggers. It is written to a temporary file, fsync'd,
//! renamed over the old one and the directory fsync'd, so a crash leaves the old or the new file,
//! never a mix.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

use crate::LogError;

pub const FILE_NAME: &str = "consumers.offsets";
const TMP_NAME: &str = "consumers.offsets.tmp";
const HEADER: &str = "sluice-offsets v1";

/// Renders the file's text.
pub fn render(offsets: &BTreeMap<String, u64>) -> String {
    let mut text = String::with_capacity(HEADER.len() + 1 + offsets.len() * 48);
    text.push_str(HEADER);
    text.push('\n');
    for (name, offset) in offsets {
        text.push_str(&format!("{offset} {name}\n"));
    }
    text
}

/// Parses the file's text; `Err((line, reason))` names the first bad line (1-based).
pub fn parse(text: &str) -> Result<BTreeMap<String, u64>, (usize, String)> {
    let mut lines = text.lines();
    match lines.next() {
        Some(HEADER) => {}
        other => return Err((1, format!("expected {HEADER:?}, found {other:?}"))),
    }
    let mut offsets = BTreeMap::new();
    for (i, line) in lines.enumerate() {
        let number = i + 2;
        if line.is_empty() {
            continue;
        }
        let (offset, name) = line
            .split_once(' ')
            .ok_or_else(|| (number, "expected \"<offset> <consumer>\"".to_string()))?;
        let offset = offset
            .parse::<u64>()
            .map_err(|e| (number, format!("offset {offset:?}: {e}")))?;
        if name.is_empty() {
            return Err((number, "empty consumer name".to_string()));
        }
        offsets.insert(name.to_string(), offset);
    }
    Ok(offsets)
}

/// Loads the offsets of `dir`, empty if there is no file yet. Removes a temporary file left by a
/// crash during a write (the renamed file, if any, is the complete one).
pub fn load(dir: &Path) -> Result<BTreeMap<String, u64>, LogError> {
    let tmp = dir.join(TMP_NAME);
    if tmp.exists() {
        fs::remove_file(&tmp).map_err(|source| LogError::Io {
            path: tmp.clone(),
            op: "remove the temporary offsets file left by a crash",
            source,
        })?;
    }
    let path = dir.join(FILE_NAME);
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(source) => {
            return Err(LogError::Io {
                path,
                op: "read consumer offsets",
                source,
            });
        }
    };
    parse(&text).map_err(|(line, reason)| LogError::CorruptOffsets { path, line, reason })
}

/// Replaces the offsets file of `dir` atomically and durably.
pub fn store(dir: &Path, offsets: &BTreeMap<String, u64>) -> Result<(), LogError> {
    let tmp = dir.join(TMP_NAME);
    let path = dir.join(FILE_NAME);
    let io = |path: &Path, op: &'static str| {
        let path = path.to_path_buf();
        move |source| LogError::Io { path, op, source }
    };
    let mut file = File::create(&tmp).map_err(io(&tmp, "create"))?;
    file.write_all(render(offsets).as_bytes())
        .map_err(io(&tmp, "write"))?;
    file.sync_all().map_err(io(&tmp, "fsync"))?;
    drop(file);
    fs::rename(&tmp, &path).map_err(io(&path, "rename the temporary offsets file over"))?;
    sync_dir(dir)
}

/// Makes a directory's entries (created, renamed, removed files) durable.
pub fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| LogError::Io {
            path: dir.to_path_buf(),
            op: "fsync the directory",
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_render_and_parse_back() {
        let mut offsets = BTreeMap::new();
        offsets.insert("default/trigger one".to_string(), 12);
        offsets.insert("uid-1".to_string(), 0);
        offsets.insert("x".to_string(), u64::MAX);
        assert_eq!(parse(&render(&offsets)), Ok(offsets));
        assert_eq!(parse(&render(&BTreeMap::new())), Ok(BTreeMap::new()));
    }

    #[test]
    fn bad_lines_are_named() {
        for (text, line) in [
            ("", 1),
            ("other header\n", 1),
            ("sluice-offsets v1\n1 a\nnot-a-number b\n", 3),
            ("sluice-offsets v1\n12\n", 2),
            ("sluice-offsets v1\n12 \n", 2),
        ] {
            assert_eq!(parse(text).map_err(|(l, _)| l), Err(line), "{text:?}");
        }
    }

    #[test]
    fn store_then_load_and_leftover_temp_file_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()).unwrap(), BTreeMap::new());
        let mut offsets = BTreeMap::new();
        offsets.insert("a".to_string(), 5);
        store(dir.path(), &offsets).unwrap();
        fs::write(dir.path().join(TMP_NAME), "half writ").unwrap();
        assert_eq!(load(dir.path()).unwrap(), offsets);
        assert!(!dir.path().join(TMP_NAME).exists());
    }
}
