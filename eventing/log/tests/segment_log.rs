//! SegmentLog through its public API, on real files in a temporary directory. Crashes are simulated by
//! cutting or scribbling on segment files between a close and a reopen (the broker's tests kill -9 a
//! real process).

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sluice_event_log::{
    Bytes, DeletionReason, EventLog, LogError, LogOptions, Record, RetentionPolicy, SegmentLog,
};

/// Generous bound for waiting on a condition; never an assertion about speed.
const PATIENCE: Duration = Duration::from_secs(30);

fn payload(i: u64) -> Bytes {
    Bytes::from(format!("event-{i:05}-{}", "x".repeat((i % 7) as usize)))
}

fn payloads(range: std::ops::Range<u64>) -> Vec<Bytes> {
    range.map(payload).collect()
}

/// Options with small segments (a few records each) and no background retention.
fn small_segments() -> LogOptions {
    LogOptions {
        segment_bytes: 200,
        index_interval_bytes: 64,
        retention_check_interval: Duration::from_secs(3600),
        // Also prepares the next (tiny) preallocated segment quickly, so that rolls mix preallocated
        // and growing segments.
        offsets_flush_interval: Duration::from_millis(10),
        ..LogOptions::default()
    }
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    files.sort();
    files
}

async fn read_all(log: &dyn EventLog, from: u64) -> Vec<Record> {
    let mut out = Vec::new();
    let mut next = from;
    loop {
        let batch = log.read(next, 7).await.unwrap();
        let Some(last) = batch.last() else {
            return out;
        };
        next = last.offset + 1;
        out.extend(batch);
    }
}

fn assert_records(records: &[Record], offsets: std::ops::Range<u64>) {
    let got: Vec<u64> = records.iter().map(|r| r.offset).collect();
    assert_eq!(got, offsets.clone().collect::<Vec<_>>());
    for r in records {
        assert_eq!(r.data, payload(r.offset), "payload of offset {}", r.offset);
    }
}

#[tokio::test]
async fn appended_records_read_back_in_order_from_cache_and_from_disk() {
    for cache in [16 * 1024 * 1024, 0] {
        let dir = tempfile::tempdir().unwrap();
        let options = LogOptions {
            read_cache_bytes: cache,
            ..small_segments()
        };
        let log = SegmentLog::open(dir.path(), options).unwrap();
        assert_eq!((log.start(), log.head()), (0, 0));
        assert_eq!(log.append(payloads(0..3)).await.unwrap(), vec![0, 1, 2]);
        assert_eq!(log.append(payloads(3..4)).await.unwrap(), vec![3]);
        assert_eq!(log.append(Vec::new()).await.unwrap(), Vec::<u64>::new());
        assert_eq!(
            log.append(payloads(4..30)).await.unwrap(),
            (4..30).collect::<Vec<_>>()
        );
        assert_eq!(log.head(), 30);
        assert_records(&read_all(&log, 0).await, 0..30);
        assert_records(&read_all(&log, 17).await, 17..30);
        assert_records(&log.read(5, 3).await.unwrap(), 5..8);
        assert!(log.read(30, 10).await.unwrap().is_empty());
        assert!(log.read(1000, 10).await.unwrap().is_empty());
        assert!(log.read(0, 0).await.unwrap().is_empty());
        log.close().await.unwrap();
    }
}

#[tokio::test]
async fn segment_log_is_usable_as_a_trait_object() {
    let dir = tempfile::tempdir().unwrap();
    let log: Arc<dyn EventLog> =
        Arc::new(SegmentLog::open(dir.path(), LogOptions::default()).unwrap());
    assert_eq!(log.append(payloads(0..2)).await.unwrap(), vec![0, 1]);
    assert_records(&log.read(0, 10).await.unwrap(), 0..2);
    log.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appenders_get_distinct_increasing_offsets_in_group_commits() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(SegmentLog::open(dir.path(), LogOptions::default()).unwrap());
    let tasks = 64u64;
    let per_task = 50u64;
    let mut handles = Vec::new();
    for t in 0..tasks {
        let log = log.clone();
        handles.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            for i in 0..per_task {
                let data = Bytes::from(format!("task {t} event {i}"));
                let offsets = log.append(vec![data.clone()]).await.unwrap();
                mine.push((offsets[0], data));
            }
            mine
        }));
    }
    let mut all = Vec::new();
    for h in handles {
        let mine = h.await.unwrap();
        assert!(
            mine.windows(2).all(|w| w[0].0 < w[1].0),
            "one appender's offsets increase"
        );
        all.extend(mine);
    }
    all.sort_by_key(|(offset, _)| *offset);
    let offsets: Vec<u64> = all.iter().map(|(o, _)| *o).collect();
    assert_eq!(
        offsets,
        (0..tasks * per_task).collect::<Vec<_>>(),
        "dense, no duplicates"
    );
    let read = read_all(log.as_ref(), 0).await;
    for ((offset, data), record) in all.iter().zip(&read) {
        assert_eq!((record.offset, &record.data), (*offset, data));
    }
    let stats = log.stats();
    assert_eq!(stats.records, tasks * per_task);
    assert!(
        stats.syncs < stats.records,
        "concurrent appends share fdatasyncs: {stats:?}"
    );
    log.close().await.unwrap();
}

#[tokio::test]
async fn full_segments_roll_into_new_files_named_by_base_offset() {
    let dir = tempfile::tempdir().unwrap();
    let log = SegmentLog::open(dir.path(), small_segments()).unwrap();
    for i in 0..40 {
        log.append(vec![payload(i)]).await.unwrap();
    }
    let files = segment_files(dir.path());
    assert!(files.len() > 3, "rolled: {files:?}");
    let bases: Vec<u64> = log.segments().iter().map(|s| s.base).collect();
    let names: Vec<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        bases
            .iter()
            .map(|b| format!("{b:020}.log"))
            .collect::<Vec<_>>()
    );
    for segment in &log.segments()[..bases.len() - 1] {
        assert!(
            segment.bytes >= 200,
            "a closed segment is full: {segment:?}"
        );
    }
    assert_records(&read_all(&log, 0).await, 0..40);
    log.close().await.unwrap();
}

#[tokio::test]
async fn reopened_log_continues_after_its_last_record() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = SegmentLog::open(dir.path(), small_segments()).unwrap();
        log.append(payloads(0..25)).await.unwrap();
        log.close().await.unwrap();
    }
    {
        // Dropped without close: Drop finishes and flushes too.
        let log = SegmentLog::open(dir.path(), small_segments()).unwrap();
        assert_eq!(log.head(), 25);
        assert_eq!(
            log.append(payloads(25..30)).await.unwrap(),
            (25..30).collect::<Vec<_>>()
        );
    }
    let log = SegmentLog::open(dir.path(), small_segments()).unwrap();
    assert_eq!(log.head(), 30);
    // Reads from the middle of closed segments found at open use their lazily built index.
    assert_records(&read_all(&log, 0).await, 0..30);
    assert_records(&read_all(&log, 13).await, 13..30);
    assert_records(&log.read(9, 2).await.unwrap(), 9..11);
    assert_eq!(log.append(payloads(30..31)).await.unwrap(), vec![30]);
    log.close().await.unwrap();
}

/// Writes 10 records in one segment, closes, lets `damage` scribble on the segment file, reopens.
async fn reopen_after(damage: impl FnOnce(&Path, u64)) -> (tempfile::TempDir, SegmentLog) {
    let dir = tempfile::tempdir().unwrap();
    let log = SegmentLog::open(dir.path(), LogOptions::default()).unwrap();
    log.append(payloads(0..10)).await.unwrap();
    log.close().await.unwrap();
    drop(log);
    let file = segment_files(dir.path()).pop().unwrap();
    let len = fs::metadata(&file).unwrap().len();
    damage(&file, len);
    let log = SegmentLog::open(dir.path(), LogOptions::default()).unwrap();
    (dir, log)
}

/// The byte position of record `n` in a segment of `payload(0..)` records.
fn position_of(n: u64) -> u64 {
    (0..n).map(|i| 16 + payload(i).len() as u64).sum()
}

#[tokio::test]
async fn torn_tail_is_truncated_and_appends_continue_after_the_last_good_record() {
    type Damage = fn(&Path, u64);
    // (name, damage, head after recovery, zero bytes kept after the last record)
    let cases: Vec<(&str, Damage, u64, u64)> = vec![
        ("last record cut short", |f, len| cut(f, len - 3), 9, 0),
        (
            "only a partial header left",
            |f, _| cut(f, position_of(9) + 5),
            9,
            0,
        ),
        (
            "garbage after the last record",
            |f, _| append_bytes(f, b"\x07garbage!garbage!garbage"),
            10,
            0,
        ),
        (
            "zeros after the last record (preallocated space)",
            |f, _| append_bytes(f, &[0u8; 4096]),
            10,
            4096,
        ),
        ("empty file", |f, _| cut(f, 0), 0, 0),
    ];
    for (name, damage, head, zeros) in cases {
        let (dir, log) = reopen_after(damage).await;
        assert_eq!(log.head(), head, "{name}");
        assert_records(&read_all(&log, 0).await, 0..head);
        let file = segment_files(dir.path()).pop().unwrap();
        assert_eq!(
            fs::metadata(&file).unwrap().len(),
            position_of(head) + zeros,
            "{name}: truncated"
        );
        assert_eq!(
            log.append(payloads(head..head + 2)).await.unwrap(),
            vec![head, head + 1]
        );
        log.close().await.unwrap();
        drop(log);
        let log = SegmentLog::open(dir.path(), LogOptions::default()).unwrap();
        assert_records(&read_all(&log, 0).await, 0..head + 2);
    }
}

/// A log whose active segment is a preallocated file of 4 KiB partly written (records 0..n).
async fn preallocated_log(dir: &Path) -> (SegmentLog, u64) {
    let options = LogOptions {
        offsets_flush_interval: Duration::from_millis(10),
        ..preallocated_options()
    };
    let log = SegmentLog::open(dir, options).unwrap();
    let deadline = std::time::Instant::now() + PATIENCE;
    while !log.stats().preallocated_ready {
        assert!(
            std::time::Instant::now() < deadline,
            "no preallocated segment prepared"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut n = 0;
    while log.segments().len() < 2 {
        log.append(vec![payload(n)]).await.unwrap();
        n += 1;
    }
    // A few records into the preallocated segment.
    log.append(payloads(n..n + 3)).await.unwrap();
    (log, n + 3)
}

fn preallocated_options() -> LogOptions {
    LogOptions {
        segment_bytes: 4096,
        retention_check_interval: Duration::from_secs(3600),
        ..LogOptions::default()
    }
}

#[tokio::test]
async fn preallocated_segments_are_overwritten_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (log, n) = preallocated_log(dir.path()).await;
    let active = segment_files(dir.path()).pop().unwrap();
    assert_eq!(
        fs::metadata(&active).unwrap().len(),
        4096,
        "the active segment was preallocated"
    );
    let first = segment_files(dir.path())[0].clone();
    assert_eq!(
        fs::metadata(&first).unwrap().len(),
        log.segments()[0].bytes,
        "the full segment holds only its data"
    );
    assert_records(&read_all(&log, 0).await, 0..n);
    log.close().await.unwrap();
    drop(log);

    let log = SegmentLog::open(dir.path(), preallocated_options()).unwrap();
    assert_eq!(
        log.head(),
        n,
        "zeros after the data are free space, not a torn record"
    );
    assert_eq!(
        fs::metadata(&active).unwrap().len(),
        4096,
        "preallocation kept"
    );
    assert_eq!(
        log.append(payloads(n..n + 2)).await.unwrap(),
        vec![n, n + 1]
    );
    assert_records(&read_all(&log, 0).await, 0..n + 2);
    log.close().await.unwrap();
}

#[tokio::test]
async fn unacknowledged_data_after_a_zeroed_gap_is_wiped_at_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let (log, n) = preallocated_log(dir.path()).await;
    let end = log.segments().last().unwrap().bytes;
    log.close().await.unwrap();
    drop(log);
    // A torn group commit: its first page never reached the disk, a later one did, holding what
    // would be record n + 1 exactly where the next append of record n will end.
    let active = segment_files(dir.path()).pop().unwrap();
    let next = payload(n);
    let mut body = Vec::new();
    body.extend_from_slice(&(n + 1).to_le_bytes());
    body.extend_from_slice(&next);
    let mut stale = Vec::new();
    stale.extend_from_slice(&(next.len() as u32).to_le_bytes());
    stale.extend_from_slice(&crc32(&body).to_le_bytes());
    stale.extend_from_slice(&body);
    let stale_pos = end + 16 + next.len() as u64;
    {
        use std::os::unix::fs::FileExt;
        let f = OpenOptions::new().write(true).open(&active).unwrap();
        f.write_all_at(&stale, stale_pos).unwrap();
    }
    let log = SegmentLog::open(dir.path(), preallocated_options()).unwrap();
    assert_eq!(log.head(), n);
    let bytes = fs::read(&active).unwrap();
    assert!(bytes[end as usize..].iter().all(|b| *b == 0), "tail zeroed");
    assert_eq!(bytes.len(), 4096, "still preallocated");
    // Had the stale record stayed, a reopen after this append would bring it back as offset n + 1.
    assert_eq!(log.append(vec![payload(n)]).await.unwrap(), vec![n]);
    log.close().await.unwrap();
    drop(log);
    let log = SegmentLog::open(dir.path(), preallocated_options()).unwrap();
    assert_eq!(log.head(), n + 1);
    log.close().await.unwrap();
}

/// CRC32 (IEEE) as the log frames records, written bitwise so that the test shares no code with it.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[tokio::test]
async fn record_with_a_bad_crc_and_everything_after_it_are_dropped() {
    let (_dir, log) = reopen_after(|file, _| {
        // Flip one byte in the payload of record 5.
        let pos = position_of(5) + 16 + 2;
        let mut bytes = fs::read(file).unwrap();
        bytes[pos as usize] ^= 0x40;
        fs::write(file, bytes).unwrap();
    })
    .await;
    assert_eq!(log.head(), 5);
    assert_records(&read_all(&log, 0).await, 0..5);
    assert_eq!(log.append(payloads(5..6)).await.unwrap(), vec![5]);
    assert_records(&read_all(&log, 0).await, 0..6);
    log.close().await.unwrap();
}

#[tokio::test]
async fn only_the_last_of_many_segments_is_recovered() {
    // (name, damage given the last segment and its data length, head: first offset of the last
    // segment plus the records that survive)
    type Damage = fn(&Path, u64);
    type Head = fn(u64, u64) -> u64;
    let cases: Vec<(&str, Damage, Head)> = vec![
        (
            "crash while creating the segment left it empty",
            |f, _| cut(f, 0),
            |base, _| base,
        ),
        (
            "torn last record",
            |f, data| cut(f, data - 1),
            |_, end| end - 1,
        ),
        (
            "garbage right after the data",
            |f, data| write_at(f, data, b"\xffgarbage"),
            |_, end| end,
        ),
        (
            "garbage at the end of the file",
            |f, _| append_bytes(f, b"\xffgarbage"),
            |_, end| end,
        ),
    ];
    for (name, damage, expected_head) in cases {
        let dir = tempfile::tempdir().unwrap();
        let log = SegmentLog::open(dir.path(), small_segments()).unwrap();
        for i in 0..23 {
            log.append(vec![payload(i)]).await.unwrap();
        }
        let segments = log.segments();
        assert!(segments.len() > 2, "{name}: {segments:?}");
        let last = segments.last().unwrap().clone();
        log.close().await.unwrap();
        drop(log);
        damage(segment_files(dir.path()).last().unwrap(), last.bytes);
        let log = SegmentLog::open(dir.path(), small_segments()).unwrap();
        let expected_head = expected_head(last.base, last.end);
        assert_eq!(log.head(), expected_head, "{name}");
        assert_records(&read_all(&log, 0).await, 0..expected_head);
        let appended = log
            .append(payloads(expected_head..expected_head + 5))
            .await
            .unwrap();
        assert_eq!(
            appended,
            (expected_head..expected_head + 5).collect::<Vec<_>>(),
            "{name}"
        );
        assert_records(&read_all(&log, 0).await, 0..expected_head + 5);
        log.close().await.unwrap();
    }
}

fn cut(file: &Path, len: u64) {
    OpenOptions::new()
        .write(true)
        .open(file)
        .unwrap()
        .set_len(len)
        .unwrap();
}

fn write_at(file: &Path, pos: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    OpenOptions::new()
        .write(true)
        .open(file)
        .unwrap()
        .write_all_at(bytes, pos)
        .unwrap();
}

fn append_bytes(file: &Path, bytes: &[u8]) {
    OpenOptions::new()
        .append(true)
        .open(file)
        .unwrap()
        .write_all(bytes)
        .unwrap();
}

#[tokio::test]
async fn consumer_offsets_survive_reopen_and_removal_is_durable() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = SegmentLog::open(dir.path(), LogOptions::default()).unwrap();
        log.append(payloads(0..10)).await.unwrap();
        assert_eq!(log.committed("default/t1"), None);
        log.commit("default/t1", 4).await.unwrap();
        log.commit("uid-2", 10).await.unwrap();
        log.commit("gone", 1).await.unwrap();
        log.commit("default/t1", 7).await.unwrap();
        assert!(matches!(
            log.commit("default/t1", 11).await,
            Err(LogError::OffsetBeyondHead { head: 10, .. })
        ));
        assert!(matches!(
            log.commit("", 1).await,
            Err(LogError::InvalidConsumer { .. })
        ));
        log.close().await.unwrap();
    }
    {
        let log = SegmentLog::open(dir.path(), LogOptions::default()).unwrap();
        assert_eq!(
            log.consumers(),
            vec![
                ("default/t1".to_string(), 7),
                ("gone".to_string(), 1),
                ("uid-2".to_string(), 10)
            ]
        );
        log.remove_consumer("gone").await.unwrap();
        // Dropped without close.
    }
    let log = SegmentLog::open(dir.path(), LogOptions::default()).unwrap();
    assert_eq!(log.committed("gone"), None);
    assert_eq!(log.committed("default/t1"), Some(7));
    log.close().await.unwrap();
}

/// The files a `kill -9` would leave behind, copied while `dir`'s log is still open: a killed process
/// loses only what it kept in memory, never what it had written to its files.
fn crash_image(dir: &Path) -> tempfile::TempDir {
    let image = tempfile::tempdir().unwrap();
    for entry in fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            fs::copy(entry.path(), image.path().join(entry.file_name())).unwrap();
        }
    }
    image
}

#[tokio::test]
async fn a_new_consumer_is_on_disk_once_its_first_commit_resolves() {
    let dir = tempfile::tempdir().unwrap();
    // No periodic flush during the test: only what commit itself makes durable is on disk.
    let options = LogOptions {
        offsets_flush_interval: Duration::from_secs(3600),
        retention_check_interval: Duration::from_secs(3600),
        preallocate: false,
        ..LogOptions::default()
    };
    let log = SegmentLog::open(dir.path(), options.clone()).unwrap();
    log.append(payloads(0..3)).await.unwrap();
    // A new trigger registers at the head; then events are accepted that it has not delivered yet.
    log.commit("default/t", log.head()).await.unwrap();
    log.append(payloads(3..8)).await.unwrap();
    // Its later commits may stay in memory (at-least-once: a crash replays them).
    log.commit("default/t", 5).await.unwrap();

    let image = crash_image(dir.path());
    let recovered = SegmentLog::open(image.path(), options).unwrap();
    assert_eq!(recovered.head(), 8);
    // Without its registration the trigger would be new again after the crash and start at the
    // head, skipping 3..8, which were acknowledged as durable.
    assert_eq!(
        recovered.committed("default/t"),
        Some(3),
        "the consumer registered before the crash"
    );
    recovered.close().await.unwrap();
    log.close().await.unwrap();
}

#[tokio::test]
async fn offsets_are_flushed_in_the_background() {
    let dir = tempfile::tempdir().unwrap();
    let options = LogOptions {
        offsets_flush_interval: Duration::from_millis(20),
        preallocate: false,
        ..LogOptions::default()
    };
    let log = SegmentLog::open(dir.path(), options).unwrap();
    log.append(payloads(0..3)).await.unwrap();
    log.commit("t", 3).await.unwrap();
    let file = dir.path().join("consumers.offsets");
    let deadline = std::time::Instant::now() + PATIENCE;
    while !fs::read_to_string(&file).is_ok_and(|t| t.contains("3 t")) {
        assert!(
            std::time::Instant::now() < deadline,
            "offsets never flushed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    log.close().await.unwrap();
}

/// A log of about 8 small segments written "at" hour 0 (retention is given `now` explicitly).
async fn log_for_retention(policy: RetentionPolicy) -> (tempfile::TempDir, SegmentLog) {
    let dir = tempfile::tempdir().unwrap();
    let options = LogOptions {
        retention: policy,
        ..small_segments()
    };
    let log = SegmentLog::open(dir.path(), options).unwrap();
    for i in 0..60 {
        log.append(vec![payload(i)]).await.unwrap();
    }
    (dir, log)
}

fn days(n: u64) -> SystemTime {
    SystemTime::now() + Duration::from_secs(n * 24 * 3600)
}

#[tokio::test]
async fn retention_deletes_only_old_segments_every_consumer_has_passed() {
    let (dir, log) = log_for_retention(RetentionPolicy {
        max_age: Some(Duration::from_secs(24 * 3600)),
        max_bytes: None,
        hard_cap_bytes: None,
    })
    .await;
    let segments = log.segments();
    assert!(segments.len() >= 5, "{segments:?}");
    let third_end = segments[2].end;
    log.commit("fast", 60).await.unwrap();
    log.commit("slow", third_end).await.unwrap();

    assert!(
        log.apply_retention(SystemTime::now()).unwrap().is_empty(),
        "young segments stay"
    );
    let deleted = log.apply_retention(days(2)).unwrap();
    assert_eq!(
        deleted.iter().map(|d| d.base).collect::<Vec<_>>(),
        segments[..3].iter().map(|s| s.base).collect::<Vec<_>>(),
        "only what the slow consumer passed"
    );
    assert!(
        deleted
            .iter()
            .all(|d| d.reason == DeletionReason::ConsumedAndOld)
    );
    assert_eq!(log.start(), third_end);
    assert_eq!(segment_files(dir.path()).len(), segments.len() - 3);
    // A read below the start begins at the start.
    assert_records(&read_all(&log, 0).await, third_end..60);

    log.commit("slow", 60).await.unwrap();
    log.apply_retention(days(2)).unwrap();
    assert_eq!(log.segments().len(), 1, "all but the active segment");
    assert_eq!(log.start(), log.segments()[0].base);
    // The consumers' view survives a reopen after retention.
    log.close().await.unwrap();
    drop(log);
    let log = SegmentLog::open(dir.path(), small_segments()).unwrap();
    assert_eq!(log.head(), 60);
    assert_records(&read_all(&log, 0).await, log.start()..60);
    log.close().await.unwrap();
}

#[tokio::test]
async fn retention_size_limit_spares_undelivered_segments_but_hard_cap_does_not() {
    let (_dir, log) = log_for_retention(RetentionPolicy {
        max_age: None,
        max_bytes: Some(1),
        hard_cap_bytes: None,
    })
    .await;
    log.commit("stuck", 0).await.unwrap();
    assert!(log.apply_retention(days(100)).unwrap().is_empty());
    log.close().await.unwrap();

    let (_dir, log) = log_for_retention(RetentionPolicy {
        max_age: None,
        max_bytes: None,
        hard_cap_bytes: Some(500),
    })
    .await;
    log.commit("stuck", 0).await.unwrap();
    let deleted = log.apply_retention(SystemTime::now()).unwrap();
    assert!(!deleted.is_empty());
    assert!(deleted.iter().all(|d| d.reason == DeletionReason::HardCap));
    let total: u64 = log.segments().iter().map(|s| s.bytes).sum();
    assert!(total <= 500, "within the hard cap: {total}");
    let first = log.read(0, 1).await.unwrap();
    assert_eq!(
        first[0].offset,
        log.start(),
        "the stuck consumer skips to the start"
    );
    log.close().await.unwrap();
}

#[tokio::test]
async fn head_watch_wakes_a_waiting_reader() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(SegmentLog::open(dir.path(), LogOptions::default()).unwrap());
    let mut head = log.subscribe_head();
    let reader = {
        let log = log.clone();
        tokio::spawn(async move {
            head.wait_for(|h| *h > 0).await.unwrap();
            log.read(0, 10).await.unwrap()
        })
    };
    log.append(payloads(0..2)).await.unwrap();
    let read = tokio::time::timeout(PATIENCE, reader)
        .await
        .unwrap()
        .unwrap();
    assert_records(&read, 0..2);
    log.close().await.unwrap();
}

#[tokio::test]
async fn one_directory_is_opened_by_one_log_only() {
    let dir = tempfile::tempdir().unwrap();
    let log = SegmentLog::open(dir.path(), LogOptions::default()).unwrap();
    assert!(matches!(
        SegmentLog::open(dir.path(), LogOptions::default()),
        Err(LogError::Locked { .. })
    ));
    log.close().await.unwrap();
    // close unlocks even before the SegmentLog is dropped.
    let again = SegmentLog::open(dir.path(), LogOptions::default()).unwrap();
    again.close().await.unwrap();
}

#[tokio::test]
async fn oversized_records_and_appends_after_close_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let options = LogOptions {
        max_record_bytes: 10,
        ..LogOptions::default()
    };
    let log = SegmentLog::open(dir.path(), options).unwrap();
    assert!(matches!(
        log.append(vec![
            Bytes::from_static(b"small"),
            Bytes::from(vec![0u8; 11])
        ])
        .await,
        Err(LogError::RecordTooLarge { size: 11, max: 10 })
    ));
    assert_eq!(log.head(), 0, "nothing of a refused append is written");
    log.close().await.unwrap();
    assert!(matches!(
        log.append(vec![Bytes::from_static(b"late")]).await,
        Err(LogError::Closed)
    ));
}

#[tokio::test]
async fn corrupt_offsets_file_is_an_error_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(
        dir.path().join("consumers.offsets"),
        "sluice-offsets v1\nfoo bar\n",
    )
    .unwrap();
    match SegmentLog::open(dir.path(), LogOptions::default()) {
        Err(e @ LogError::CorruptOffsets { line: 2, .. }) => {
            assert!(e.to_string().contains("consumers.offsets"), "{e}");
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("opened with a corrupt offsets file"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_throughput_smoke() {
    // Not a benchmark and no assertion on speed: prints appends/s for the report
    // (`cargo test -p sluice-event-log --release -- --nocapture append_throughput`).
    // Segments of 4 MiB with the next one preallocated early, so that most appends go to
    // preallocated segments as they do in steady state (the first segment of a new log grows).
    for preallocate in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let options = LogOptions {
            segment_bytes: 4 * 1024 * 1024,
            offsets_flush_interval: Duration::from_millis(10),
            preallocate,
            ..LogOptions::default()
        };
        let log = Arc::new(SegmentLog::open(dir.path(), options).unwrap());
        let deadline = std::time::Instant::now() + PATIENCE;
        while preallocate && !log.stats().preallocated_ready && std::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Fill the first (growing) segment.
        let filler = Bytes::from(vec![b'f'; 64 * 1024]);
        while log.segments().len() < 2 {
            log.append(vec![filler.clone(); 8]).await.unwrap();
        }
        throughput(log, preallocate).await;
    }
}

async fn throughput(log: Arc<SegmentLog>, preallocate: bool) {
    let before = log.stats();
    let (tasks, per_task) = (200u64, 100u64);
    let started = std::time::Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|_| {
            let log = log.clone();
            tokio::spawn(async move {
                for _ in 0..per_task {
                    log.append(vec![Bytes::from(vec![b'e'; 512])])
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.await.unwrap();
    }
    let elapsed = started.elapsed();
    let after = log.stats();
    let (records, syncs) = (after.records - before.records, after.syncs - before.syncs);
    println!(
        "preallocate={preallocate}: {records} appends of 512 B from {tasks} concurrent appenders in {elapsed:?}: {:.0} appends/s, {:.1} records per fdatasync",
        records as f64 / elapsed.as_secs_f64(),
        records as f64 / syncs as f64
    );
    log.close().await.unwrap();
}
