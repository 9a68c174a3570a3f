//! The embedded log: segment files on disk, one writer thread doing group commits, one maintenance
//! thread flushing consumer offsets and applying retention.
//!
//! Files in the log's directory:
//! - `<base offset, 20 digits>.log`: a segment, records framed as in [`crate::frame`]; the last one is
//!   the active segment, the only one written to.
//! - `consumers.offsets`: the consumers' committed offsets (see [`crate::offsets`]).
//! - `next-segment.prealloc`: the next segment, already full of zeros, renamed into place at a roll
//!   (see [`LogOptions::preallocate`]). A segment's data ends at the first all-zero record header.
//! - `LOCK`: `flock`ed while a [`SegmentLog`] has the directory open, so two brokers never share it.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tokio::sync::{oneshot, watch};
use tracing::{debug, error, info, warn};

use crate::frame::{self, Decoded, HEADER_LEN};
use crate::offsets::{self, sync_dir};
use crate::retention::{Deletion, DeletionReason, SegmentInfo, plan_retention};
use crate::{BoxFuture, EventLog, LogError, LogOptions, Record, validate_consumer};

const SEGMENT_SUFFIX: &str = ".log";
const LOCK_FILE: &str = "LOCK";
const SPARE_FILE: &str = "next-segment.prealloc";
const SPARE_TMP_FILE: &str = "next-segment.prealloc.tmp";
/// Reads of segment files go by chunks of this size.
const READ_CHUNK: usize = 64 * 1024;

/// The embedded, durable [`EventLog`]: a directory of segment files. See the crate documentation.
pub struct SegmentLog {
    shared: Arc<Shared>,
    writer_tx: mpsc::Sender<WriterMsg>,
    threads: Mutex<Threads>,
}

struct Threads {
    writer: Option<JoinHandle<()>>,
    maintenance: Option<JoinHandle<()>>,
    /// Dropping it stops the maintenance thread.
    maintenance_stop: Option<mpsc::Sender<()>>,
    /// The `flock`ed LOCK file; dropping it unlocks the directory.
    lock: Option<File>,
    stopped: bool,
}

struct Shared {
    dir: PathBuf,
    options: LogOptions,
    /// By base offset; the last one is the active segment.
    segments: RwLock<BTreeMap<u64, Arc<Segment>>>,
    head: watch::Sender<u64>,
    cache: Mutex<ReadCache>,
    consumers: Mutex<Consumers>,
    /// Serializes writes of the offsets file (maintenance thread and close).
    offsets_io: Mutex<()>,
    /// Serializes retention runs (maintenance thread and `apply_retention`).
    retention_io: Mutex<()>,
    /// Set after a write or fsync failed: what failed. The log then refuses appends until reopened,
    /// because after a failed fsync the state of the file is unknown.
    failed: Mutex<Option<String>>,
    closed: AtomicBool,
    /// A complete preallocated `next-segment.prealloc` is ready for the next roll.
    spare_ready: AtomicBool,
    /// Records made durable and fdatasyncs done since open (for [`LogStats`]).
    synced_records: AtomicU64,
    syncs: AtomicU64,
}

/// Counters since open: how well group commit batches (`records / syncs` records per fdatasync).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogStats {
    /// Records appended and made durable.
    pub records: u64,
    /// Group commits (one write and one fdatasync each).
    pub syncs: u64,
    /// A preallocated next segment is ready for the next roll.
    pub preallocated_ready: bool,
}

struct Segment {
    base: u64,
    path: PathBuf,
    /// Read with positional reads only, so readers and the writer share it without a cursor.
    file: File,
    /// Sparse index (offset, byte position), ascending; `None` until a read needs it (closed segments
    /// found at open are not scanned until then).
    index: Mutex<Option<Vec<(u64, u64)>>>,
    /// Durable size in bytes.
    bytes: AtomicU64,
    /// Milliseconds since the Unix epoch of the last append (file mtime for segments found at open).
    last_append_ms: AtomicU64,
}

#[derive(Default)]
struct Consumers {
    /// What consumers committed.
    committed: BTreeMap<String, u64>,
    /// Changed since the last write of the offsets file.
    dirty: bool,
}

/// The most recent durable records, contiguous, so that reads near the head never touch the disk.
struct ReadCache {
    records: VecDeque<Record>,
    bytes: usize,
    capacity: usize,
}

enum WriterMsg {
    Append {
        records: Vec<Bytes>,
        reply: AppendReply,
    },
    Shutdown {
        reply: Option<oneshot::Sender<()>>,
    },
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn io_err(path: &Path, op: &'static str) -> impl FnOnce(std::io::Error) -> LogError {
    let path = path.to_path_buf();
    move |source| LogError::Io { path, op, source }
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}{SEGMENT_SUFFIX}"))
}

/// The base offset of a segment file name, `None` for other files.
fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

impl SegmentLog {
    /// Opens (creating if needed) the log in `dir`: takes the directory's lock, recovers the active
    /// segment (truncating a torn or corrupt tail after the last good record), loads the consumers'
    /// offsets and starts the writer and maintenance threads.
    pub fn open(dir: impl AsRef<Path>, options: LogOptions) -> Result<SegmentLog, LogError> {
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir).map_err(io_err(&dir, "create the log directory"))?;
        let lock_file = lock_dir(&dir)?;

        let mut bases: Vec<u64> = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err(&dir, "list the log directory"))? {
            let entry = entry.map_err(io_err(&dir, "list the log directory"))?;
            if let Some(base) = entry.file_name().to_str().and_then(parse_segment_name) {
                bases.push(base);
            }
        }
        bases.sort_unstable();
        if bases.is_empty() {
            let path = segment_path(&dir, 0);
            File::create(&path).map_err(io_err(&path, "create the first segment"))?;
            sync_dir(&dir)?;
            bases.push(0);
        }

        let mut segments = BTreeMap::new();
        let last_base = *bases.last().expect("at least one segment");
        for &base in &bases[..bases.len() - 1] {
            let path = segment_path(&dir, base);
            let file = File::open(&path).map_err(io_err(&path, "open segment"))?;
            let meta = file.metadata().map_err(io_err(&path, "stat segment"))?;
            let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            segments.insert(
                base,
                Arc::new(Segment {
                    base,
                    path,
                    file,
                    index: Mutex::new(None),
                    bytes: AtomicU64::new(meta.len()),
                    last_append_ms: AtomicU64::new(millis(mtime)),
                }),
            );
        }
        let (active, write_file, recovered) = recover_active(&dir, last_base, &options)?;
        segments.insert(last_base, active.clone());
        let head = recovered.next_offset;

        let spare_ready = check_spare(&dir, &options)?;
        let mut committed = offsets::load(&dir)?;
        let mut dirty = false;
        for (name, offset) in committed.iter_mut() {
            if *offset > head {
                warn!(consumer = %name, offset = *offset, head, dir = %dir.display(),
                    "consumer committed beyond the recovered head (records lost from the tail); it resumes at the head");
                *offset = head;
                dirty = true;
            }
        }
        info!(dir = %dir.display(), segments = segments.len(), start = segments.keys().next().copied().unwrap_or(0),
            head, consumers = committed.len(), "event log opened");

        let shared = Arc::new(Shared {
            dir: dir.clone(),
            segments: RwLock::new(segments),
            head: watch::Sender::new(head),
            cache: Mutex::new(ReadCache {
                records: VecDeque::new(),
                bytes: 0,
                capacity: options.read_cache_bytes,
            }),
            consumers: Mutex::new(Consumers { committed, dirty }),
            offsets_io: Mutex::new(()),
            retention_io: Mutex::new(()),
            failed: Mutex::new(None),
            closed: AtomicBool::new(false),
            spare_ready: AtomicBool::new(spare_ready),
            synced_records: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
            options,
        });

        let writer = Writer {
            shared: shared.clone(),
            active,
            file: write_file,
            pos: recovered.end_pos,
            next_offset: head,
            last_index_pos: recovered.last_index_pos,
            buf: Vec::with_capacity(1024 * 1024),
        };
        let (writer_tx, writer_rx) = mpsc::channel();
        let writer_thread = std::thread::Builder::new()
            .name("event-log-writer".into())
            .spawn(move || writer.run(writer_rx))
            .map_err(io_err(&dir, "start the writer thread"))?;
        let (stop_tx, stop_rx) = mpsc::channel();
        let maintenance_shared = shared.clone();
        let maintenance_thread = std::thread::Builder::new()
            .name("event-log-maintenance".into())
            .spawn(move || run_maintenance(maintenance_shared, stop_rx))
            .map_err(io_err(&dir, "start the maintenance thread"))?;

        Ok(SegmentLog {
            shared,
            writer_tx,
            threads: Mutex::new(Threads {
                writer: Some(writer_thread),
                maintenance: Some(maintenance_thread),
                maintenance_stop: Some(stop_tx),
                lock: Some(lock_file),
                stopped: false,
            }),
        })
    }

    /// The log's directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// The segments, oldest first (the last is the active one).
    pub fn segments(&self) -> Vec<SegmentInfo> {
        self.shared.segment_infos().0
    }

    /// Counters since open.
    pub fn stats(&self) -> LogStats {
        LogStats {
            records: self.shared.synced_records.load(Ordering::Relaxed),
            syncs: self.shared.syncs.load(Ordering::Relaxed),
            preallocated_ready: self.shared.spare_ready.load(Ordering::SeqCst),
        }
    }

    /// Runs retention now with `now` as the current time (the maintenance thread does this every
    /// `retention_check_interval`); returns what it deleted.
    pub fn apply_retention(&self, now: SystemTime) -> Result<Vec<Deletion>, LogError> {
        self.shared.apply_retention(now)
    }

    /// Writes committed consumer offsets to disk now (the maintenance thread does this every
    /// `offsets_flush_interval`, and close does it too).
    pub fn flush_offsets(&self) -> Result<(), LogError> {
        self.shared.flush_offsets()
    }

    /// Stops the threads after the writer has finished what it holds, persists offsets, unlocks the
    /// directory. Idempotent.
    fn stop(&self) -> Result<(), LogError> {
        let mut threads = lock(&self.threads);
        if threads.stopped {
            return Ok(());
        }
        threads.stopped = true;
        self.shared.closed.store(true, Ordering::SeqCst);
        let _ = self.writer_tx.send(WriterMsg::Shutdown { reply: None });
        if let Some(writer) = threads.writer.take() {
            let _ = writer.join();
        }
        drop(threads.maintenance_stop.take());
        if let Some(maintenance) = threads.maintenance.take() {
            let _ = maintenance.join();
        }
        let result = self.shared.flush_offsets();
        drop(threads.lock.take());
        debug!(dir = %self.shared.dir.display(), "event log closed");
        result
    }
}

impl Drop for SegmentLog {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            error!(error = %e, "closing the event log on drop");
        }
    }
}

impl EventLog for SegmentLog {
    fn append(&self, records: Vec<Bytes>) -> BoxFuture<'_, Result<Vec<u64>, LogError>> {
        Box::pin(async move {
            if records.is_empty() {
                return Ok(Vec::new());
            }
            if self.shared.closed.load(Ordering::SeqCst) {
                return Err(LogError::Closed);
            }
            self.shared.check_failed()?;
            let max = self.shared.options.max_record_bytes;
            if let Some(r) = records.iter().find(|r| r.len() > max as usize) {
                return Err(LogError::RecordTooLarge { size: r.len(), max });
            }
            let (reply, done) = oneshot::channel();
            self.writer_tx
                .send(WriterMsg::Append { records, reply })
                .map_err(|_| LogError::Closed)?;
            done.await.map_err(|_| LogError::Closed)?
        })
    }

    fn read(&self, from: u64, max_records: usize) -> BoxFuture<'_, Result<Vec<Record>, LogError>> {
        // Reads are positional reads of recent data (normally in the page cache, or served from the
        // read cache) and bounded by max_records: done inline rather than on a blocking pool.
        Box::pin(async move { self.shared.read(from, max_records) })
    }

    fn head(&self) -> u64 {
        *self.shared.head.borrow()
    }

    fn start(&self) -> u64 {
        let segments = self
            .shared
            .segments
            .read()
            .unwrap_or_else(|p| p.into_inner());
        segments.keys().next().copied().unwrap_or(0)
    }

    fn subscribe_head(&self) -> watch::Receiver<u64> {
        self.shared.head.subscribe()
    }

    fn commit(&self, consumer: &str, offset: u64) -> BoxFuture<'_, Result<(), LogError>> {
        let result = (|| {
            validate_consumer(consumer)?;
            if self.shared.closed.load(Ordering::SeqCst) {
                return Err(LogError::Closed);
            }
            let head = self.head();
            if offset > head {
                return Err(LogError::OffsetBeyondHead {
                    consumer: consumer.to_string(),
                    offset,
                    head,
                });
            }
            let mut consumers = lock(&self.shared.consumers);
            let previous = consumers.committed.insert(consumer.to_string(), offset);
            if previous != Some(offset) {
                consumers.dirty = true;
            }
            Ok(previous.is_none())
        })();
        Box::pin(async move {
            if result? {
                // A new consumer is written to disk before its commit resolves. Were it lost in a
                // crash, its trigger would be new again at restart and start at the head, skipping
                // what was accepted (202) but not yet delivered. One fsync per new consumer; later
                // commits stay in memory until the periodic flush (a crash replays them).
                let shared = self.shared.clone();
                match tokio::task::spawn_blocking(move || shared.flush_offsets()).await {
                    Ok(flushed) => flushed?,
                    Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                    // The runtime is shutting down.
                    Err(_) => return Err(LogError::Closed),
                }
            }
            Ok(())
        })
    }

    fn committed(&self, consumer: &str) -> Option<u64> {
        lock(&self.shared.consumers)
            .committed
            .get(consumer)
            .copied()
    }

    fn consumers(&self) -> Vec<(String, u64)> {
        lock(&self.shared.consumers)
            .committed
            .iter()
            .map(|(name, offset)| (name.clone(), *offset))
            .collect()
    }

    fn remove_consumer(&self, consumer: &str) -> BoxFuture<'_, Result<(), LogError>> {
        let mut consumers = lock(&self.shared.consumers);
        if consumers.committed.remove(consumer).is_some() {
            consumers.dirty = true;
        }
        Box::pin(std::future::ready(Ok(())))
    }

    fn close(&self) -> BoxFuture<'_, Result<(), LogError>> {
        Box::pin(async move {
            // Wait for the writer's last group commit without blocking the runtime; the joins in
            // stop() are then immediate but for an offsets flush in progress.
            if !lock(&self.threads).stopped {
                let (reply, done) = oneshot::channel();
                self.shared.closed.store(true, Ordering::SeqCst);
                if self
                    .writer_tx
                    .send(WriterMsg::Shutdown { reply: Some(reply) })
                    .is_ok()
                {
                    let _ = done.await;
                }
            }
            self.stop()
        })
    }
}

impl Shared {
    fn check_failed(&self) -> Result<(), LogError> {
        match &*lock(&self.failed) {
            Some(reason) => Err(LogError::Failed {
                dir: self.dir.clone(),
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    fn read(&self, from: u64, max_records: usize) -> Result<Vec<Record>, LogError> {
        let head = *self.head.borrow();
        let start = {
            let segments = self.segments.read().unwrap_or_else(|p| p.into_inner());
            segments.keys().next().copied().unwrap_or(0)
        };
        // Below the start (deleted by retention) reading begins at the start, even if the read cache
        // still holds older records: every reader sees the same log.
        let from = from.max(start);
        if max_records == 0 || from >= head {
            return Ok(Vec::new());
        }
        {
            let cache = lock(&self.cache);
            if let Some(first) = cache.records.front()
                && from >= first.offset
            {
                let skip = (from - first.offset) as usize;
                // `range` starts at `skip` directly; `iter().skip()` would walk the cache from its front.
                return Ok(cache
                    .records
                    .range(skip.min(cache.records.len())..)
                    .take(max_records)
                    .cloned()
                    .collect());
            }
        }
        // From the disk: the segment holding `from` and those after it, each with its end offset.
        let spans: Vec<(Arc<Segment>, u64)> = {
            let segments = self.segments.read().unwrap_or_else(|p| p.into_inner());
            let first = segments
                .range(..=from)
                .next_back()
                .map(|(base, _)| *base)
                .or_else(|| segments.keys().next().copied())
                .unwrap_or(0);
            let list: Vec<&Arc<Segment>> = segments.range(first..).map(|(_, s)| s).collect();
            list.iter()
                .enumerate()
                .map(|(i, s)| {
                    let end = list.get(i + 1).map_or(head, |next| next.base.min(head));
                    (Arc::clone(s), end)
                })
                .collect()
        };
        let mut out = Vec::new();
        let mut next = from;
        for (segment, end) in spans {
            next = next.max(segment.base);
            if out.len() >= max_records || next >= head {
                break;
            }
            if next >= end {
                continue;
            }
            segment.read(next, end, max_records - out.len(), &self.options, &mut out)?;
            next = end;
        }
        Ok(out)
    }

    /// The segments as retention sees them, and the active segment's size.
    fn segment_infos(&self) -> (Vec<SegmentInfo>, u64) {
        let head = *self.head.borrow();
        let segments = self.segments.read().unwrap_or_else(|p| p.into_inner());
        let list: Vec<&Arc<Segment>> = segments.values().collect();
        let infos: Vec<SegmentInfo> = list
            .iter()
            .enumerate()
            .map(|(i, s)| SegmentInfo {
                base: s.base,
                end: list.get(i + 1).map_or(head, |next| next.base),
                bytes: s.bytes.load(Ordering::SeqCst),
                last_append: SystemTime::UNIX_EPOCH
                    + Duration::from_millis(s.last_append_ms.load(Ordering::SeqCst)),
            })
            .collect();
        let active_bytes = infos.last().map_or(0, |s| s.bytes);
        (infos, active_bytes)
    }

    fn apply_retention(&self, now: SystemTime) -> Result<Vec<Deletion>, LogError> {
        let _serial = lock(&self.retention_io);
        let (mut infos, active_bytes) = self.segment_infos();
        infos.pop(); // the active segment is never deleted
        // What consumers committed, flushed or not: a consumer that committed has delivered, so if
        // a crash loses the commit it resumes at the start of what is left, having lost nothing.
        let min_committed = lock(&self.consumers).committed.values().min().copied();
        let plan = plan_retention(
            &infos,
            active_bytes,
            min_committed,
            &self.options.retention,
            now,
        );
        if plan.is_empty() {
            return Ok(plan);
        }
        let (removed, start) = {
            let mut segments = self.segments.write().unwrap_or_else(|p| p.into_inner());
            let last = segments.keys().next_back().copied();
            let removed: Vec<(Arc<Segment>, DeletionReason)> = plan
                .iter()
                .filter(|d| Some(d.base) != last)
                .filter_map(|d| segments.remove(&d.base).map(|s| (s, d.reason)))
                .collect();
            (removed, segments.keys().next().copied().unwrap_or(0))
        };
        if removed
            .iter()
            .any(|(_, reason)| *reason == DeletionReason::HardCap)
        {
            let behind: Vec<String> = lock(&self.consumers)
                .committed
                .iter()
                .filter(|(_, offset)| **offset < start)
                .map(|(name, _)| name.clone())
                .collect();
            error!(dir = %self.dir.display(), start, ?behind,
                "event log over hard_cap_bytes: deleted segments consumers had not delivered; they skip to the new start");
        }
        for (segment, reason) in &removed {
            info!(segment = %segment.path.display(), ?reason, "retention deletes a segment");
            fs::remove_file(&segment.path).map_err(io_err(&segment.path, "delete segment"))?;
        }
        sync_dir(&self.dir)?;
        Ok(plan)
    }

    fn flush_offsets(&self) -> Result<(), LogError> {
        let _serial = lock(&self.offsets_io);
        let snapshot = {
            let mut consumers = lock(&self.consumers);
            if !consumers.dirty {
                return Ok(());
            }
            consumers.dirty = false;
            consumers.committed.clone()
        };
        match offsets::store(&self.dir, &snapshot) {
            Ok(()) => Ok(()),
            Err(e) => {
                lock(&self.consumers).dirty = true;
                Err(e)
            }
        }
    }
}

impl Segment {
    /// Appends to `out` the records `from..end` of this segment, at most `max`.
    fn read(
        &self,
        from: u64,
        end: u64,
        max: usize,
        options: &LogOptions,
        out: &mut Vec<Record>,
    ) -> Result<(), LogError> {
        let len = self.bytes.load(Ordering::SeqCst);
        let (start_offset, start_pos) = {
            let mut index = lock(&self.index);
            if index.is_none() {
                let mut builder = IndexBuilder::new(options.index_interval_bytes);
                let scanned = scan(
                    &self.file,
                    &self.path,
                    len,
                    0,
                    self.base,
                    options.max_record_bytes,
                    |offset, pos, _| {
                        builder.observe(offset, pos);
                        true
                    },
                )?;
                if let Some((position, reason)) = scanned.corrupt {
                    return Err(LogError::Corrupt {
                        path: self.path.clone(),
                        position,
                        reason,
                    });
                }
                *index = Some(builder.entries);
            }
            let entries = index.as_ref().expect("built above");
            match entries.partition_point(|(offset, _)| *offset <= from) {
                0 => (self.base, 0),
                i => entries[i - 1],
            }
        };
        let wanted = (end - from).min(max as u64) as usize;
        let before = out.len();
        let scanned = scan(
            &self.file,
            &self.path,
            len,
            start_pos,
            start_offset,
            options.max_record_bytes,
            |offset, _, payload| {
                if offset >= end {
                    return false;
                }
                if offset >= from {
                    out.push(Record {
                        offset,
                        data: Bytes::copy_from_slice(payload),
                    });
                }
                out.len() - before < wanted
            },
        )?;
        if out.len() - before < wanted {
            let (position, reason) = scanned.corrupt.unwrap_or((
                scanned.end_pos,
                format!(
                    "segment ends at offset {} but records up to {} were expected",
                    scanned.next_offset, end
                ),
            ));
            return Err(LogError::Corrupt {
                path: self.path.clone(),
                position,
                reason,
            });
        }
        Ok(())
    }
}

/// Builds a sparse index: the first record, then one entry per `interval` bytes.
struct IndexBuilder {
    entries: Vec<(u64, u64)>,
    last_pos: u64,
    interval: u64,
}

impl IndexBuilder {
    fn new(interval: u64) -> Self {
        IndexBuilder {
            entries: Vec::new(),
            last_pos: 0,
            interval: interval.max(1),
        }
    }

    fn observe(&mut self, offset: u64, pos: u64) {
        if self.entries.is_empty() || pos - self.last_pos >= self.interval {
            self.entries.push((offset, pos));
            self.last_pos = pos;
        }
    }
}

/// Where a scan stopped.
struct Scanned {
    /// Byte position after the last good record read.
    end_pos: u64,
    /// Offset of the record that would follow.
    next_offset: u64,
    /// Set if the scan stopped at a corrupt or torn record: its position and what is wrong.
    corrupt: Option<(u64, String)>,
    /// Set if the scan stopped at an all-zero header (preallocated space).
    zero_tail: bool,
}

/// Reads the records of `file` from byte `pos` (the record `offset`) up to byte `len`, calling
/// `on_record(offset, position, payload)` for each until it returns false.
fn scan(
    file: &File,
    path: &Path,
    len: u64,
    mut pos: u64,
    mut offset: u64,
    max_record_bytes: u32,
    mut on_record: impl FnMut(u64, u64, &[u8]) -> bool,
) -> Result<Scanned, LogError> {
    let mut buf: Vec<u8> = Vec::new();
    let mut buf_start = pos;
    let mut want = HEADER_LEN;
    loop {
        if pos >= len {
            return Ok(Scanned {
                end_pos: pos,
                next_offset: offset,
                corrupt: None,
                zero_tail: false,
            });
        }
        let buf_end = buf_start + buf.len() as u64;
        if pos < buf_start || pos + want as u64 > buf_end {
            let size = (want.max(READ_CHUNK) as u64).min(len - pos) as usize;
            buf.resize(size, 0);
            let read = read_fully_at(file, &mut buf, pos).map_err(io_err(path, "read segment"))?;
            buf.truncate(read);
            buf_start = pos;
        }
        let slice = &buf[(pos - buf_start) as usize..];
        if slice.len() >= HEADER_LEN && slice[..HEADER_LEN].iter().all(|b| *b == 0) {
            // No valid header is all zeros (the CRC of a zero offset is not zero): the start of
            // preallocated space, the end of the data.
            return Ok(Scanned {
                end_pos: pos,
                next_offset: offset,
                corrupt: None,
                zero_tail: true,
            });
        }
        match frame::decode(slice, offset, max_record_bytes) {
            Decoded::Record { frame_len } => {
                if !on_record(offset, pos, &slice[HEADER_LEN..frame_len]) {
                    return Ok(Scanned {
                        end_pos: pos,
                        next_offset: offset,
                        corrupt: None,
                        zero_tail: false,
                    });
                }
                pos += frame_len as u64;
                offset += 1;
                want = HEADER_LEN;
            }
            Decoded::Incomplete { needed } => {
                if slice.len() >= needed || pos + needed as u64 > len {
                    return Ok(Scanned {
                        end_pos: pos,
                        next_offset: offset,
                        corrupt: Some((
                            pos,
                            format!(
                                "torn record: {} bytes left in the file where the record needs {needed}",
                                len - pos
                            ),
                        )),
                        zero_tail: false,
                    });
                }
                want = needed;
            }
            Decoded::Corrupt { reason } => {
                return Ok(Scanned {
                    end_pos: pos,
                    next_offset: offset,
                    corrupt: Some((pos, reason)),
                    zero_tail: false,
                });
            }
        }
    }
}

/// Like `read_exact_at` but returns how much was read if the file is shorter.
fn read_fully_at(file: &File, buf: &mut [u8], pos: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], pos + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// What recovery of the active segment found.
struct Recovered {
    end_pos: u64,
    next_offset: u64,
    last_index_pos: u64,
}

/// Opens the active (last) segment, scans it and truncates a torn or corrupt tail.
fn recover_active(
    dir: &Path,
    base: u64,
    options: &LogOptions,
) -> Result<(Arc<Segment>, File, Recovered), LogError> {
    let path = segment_path(dir, base);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(io_err(&path, "open the active segment"))?;
    let meta = file.metadata().map_err(io_err(&path, "stat segment"))?;
    let len = meta.len();
    let mut builder = IndexBuilder::new(options.index_interval_bytes);
    let scanned = scan(
        &file,
        &path,
        len,
        0,
        base,
        options.max_record_bytes,
        |offset, pos, _| {
            builder.observe(offset, pos);
            true
        },
    )?;
    if let Some((position, reason)) = &scanned.corrupt {
        // The broker acknowledges an event only once it is durable, so records past the first
        // bad one were never acknowledged unless the disk corrupted them later; like Kafka's log
        // recovery we keep the good prefix and append after it.
        warn!(segment = %path.display(), position, reason = %reason, dropped_bytes = len - position,
            "truncating a torn or corrupt tail of the event log after a crash");
        file.set_len(*position)
            .map_err(io_err(&path, "truncate the torn tail"))?;
        file.sync_all()
            .map_err(io_err(&path, "fsync after truncating the torn tail"))?;
    }
    if scanned.zero_tail
        && !all_zeros(&file, scanned.end_pos, len).map_err(io_err(&path, "read segment"))?
    {
        // A crash tore a group commit whose later pages reached the disk and whose first did not.
        // Records that were never acknowledged must not reappear behind new appends: zero the tail
        // (truncating and growing again leaves a hole that reads as zeros).
        warn!(segment = %path.display(), position = scanned.end_pos,
            "zeroing unacknowledged data after the end of the event log");
        file.set_len(scanned.end_pos)
            .and_then(|()| file.set_len(len))
            .and_then(|()| file.sync_all())
            .map_err(io_err(&path, "zero the torn tail"))?;
    }
    let read_handle = file.try_clone().map_err(io_err(&path, "open segment"))?;
    let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
    let last_index_pos = builder.last_pos;
    let segment = Arc::new(Segment {
        base,
        path,
        file: read_handle,
        index: Mutex::new(Some(builder.entries)),
        bytes: AtomicU64::new(scanned.end_pos),
        last_append_ms: AtomicU64::new(millis(mtime)),
    });
    Ok((
        segment,
        file,
        Recovered {
            end_pos: scanned.end_pos,
            next_offset: scanned.next_offset,
            last_index_pos,
        },
    ))
}

/// Whether bytes `from..to` of `file` are all zero.
fn all_zeros(file: &File, from: u64, to: u64) -> std::io::Result<bool> {
    let mut buf = vec![0u8; READ_CHUNK];
    let mut pos = from;
    while pos < to {
        let size = (to - pos).min(READ_CHUNK as u64) as usize;
        let read = read_fully_at(file, &mut buf[..size], pos)?;
        if read == 0 {
            break;
        }
        if buf[..read].iter().any(|b| *b != 0) {
            return Ok(false);
        }
        pos += read as u64;
    }
    Ok(true)
}

/// Whether a complete preallocated next segment is on disk; removes a half-written or mis-sized one.
fn check_spare(dir: &Path, options: &LogOptions) -> Result<bool, LogError> {
    let tmp = dir.join(SPARE_TMP_FILE);
    if tmp.exists() {
        fs::remove_file(&tmp)
            .map_err(io_err(&tmp, "remove a half-written preallocated segment"))?;
    }
    let spare = dir.join(SPARE_FILE);
    match fs::metadata(&spare) {
        Ok(meta) if options.preallocate && meta.len() == options.segment_bytes => Ok(true),
        Ok(_) => {
            fs::remove_file(&spare).map_err(io_err(&spare, "remove the preallocated segment"))?;
            Ok(false)
        }
        Err(_) => Ok(false),
    }
}

/// Writes `next-segment.prealloc`: `segment_bytes` of zeros, fsync'd, then renamed into place.
fn prepare_spare(dir: &Path, segment_bytes: u64) -> Result<(), LogError> {
    let tmp = dir.join(SPARE_TMP_FILE);
    let spare = dir.join(SPARE_FILE);
    let file = File::create(&tmp).map_err(io_err(&tmp, "create"))?;
    let zeros = vec![0u8; 1024 * 1024];
    let mut pos = 0;
    while pos < segment_bytes {
        let size = (segment_bytes - pos).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..size], pos)
            .map_err(io_err(&tmp, "write zeros"))?;
        pos += size as u64;
    }
    file.sync_all().map_err(io_err(&tmp, "fsync"))?;
    drop(file);
    fs::rename(&tmp, &spare).map_err(io_err(&spare, "rename the preallocated segment to"))?;
    sync_dir(dir)
}

/// Takes an exclusive `flock` on `<dir>/LOCK`: one log per directory, even within one process.
fn lock_dir(dir: &Path) -> Result<File, LogError> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err(&path, "open the lock file"))?;
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(LogError::Locked {
                dir: dir.to_path_buf(),
            });
        }
        return Err(LogError::Io {
            path,
            op: "lock",
            source: e,
        });
    }
    Ok(file)
}

/// The writer thread's state: the active segment and the group commit buffer.
struct Writer {
    shared: Arc<Shared>,
    active: Arc<Segment>,
    /// Read-write handle of the active segment.
    file: File,
    /// Durable size of the active segment.
    pos: u64,
    /// The durable head.
    next_offset: u64,
    last_index_pos: u64,
    buf: Vec<u8>,
}

/// Appends written to the buffer but not yet durable.
type AppendReply = oneshot::Sender<Result<Vec<u64>, LogError>>;

#[derive(Default)]
struct Pending {
    replies: Vec<(AppendReply, Vec<u64>)>,
    records: Vec<Record>,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<WriterMsg>) {
        let max_batch = self.shared.options.max_batch_bytes;
        let mut batch = Vec::new();
        loop {
            let mut shutdown = None;
            let mut bytes = 0;
            // Block for the first append, then take every append already waiting: the group commit.
            match rx.recv() {
                Ok(WriterMsg::Append { records, reply }) => {
                    bytes += records.iter().map(|r| r.len()).sum::<usize>();
                    batch.push((records, reply));
                }
                Ok(WriterMsg::Shutdown { reply }) => shutdown = Some(reply),
                Err(_) => return,
            }
            while shutdown.is_none() && bytes < max_batch {
                match rx.try_recv() {
                    Ok(WriterMsg::Append { records, reply }) => {
                        bytes += records.iter().map(|r| r.len()).sum::<usize>();
                        batch.push((records, reply));
                    }
                    Ok(WriterMsg::Shutdown { reply }) => shutdown = Some(reply),
                    Err(_) => break,
                }
            }
            self.process(&mut batch);
            if let Some(reply) = shutdown {
                if let Some(reply) = reply {
                    let _ = reply.send(());
                }
                // Appends still queued are dropped with the receiver: their callers get Closed.
                return;
            }
        }
    }

    fn process(&mut self, batch: &mut Vec<(Vec<Bytes>, AppendReply)>) {
        let segment_bytes = self.shared.options.segment_bytes;
        let interval = self.shared.options.index_interval_bytes.max(1);
        let mut pending = Pending::default();
        self.buf.clear();
        let mut offset = self.next_offset;
        for (records, reply) in batch.drain(..) {
            if let Err(e) = self.shared.check_failed() {
                let _ = reply.send(Err(e));
                continue;
            }
            let size = self.pos + self.buf.len() as u64;
            if size >= segment_bytes && size > 0 {
                // Roll: make what is buffered durable in the full segment, then start a new one.
                if !self.flush(&mut pending) {
                    let _ = reply.send(self.shared.check_failed().map(|()| Vec::new()));
                    continue;
                }
                if let Err(e) = self.roll() {
                    self.fail(&e.to_string());
                    let _ = reply.send(Err(e));
                    continue;
                }
                offset = self.next_offset;
            }
            let mut offsets = Vec::with_capacity(records.len());
            {
                let mut index = lock(&self.active.index);
                let index = index.get_or_insert_with(Vec::new);
                for data in records {
                    let record_pos = self.pos + self.buf.len() as u64;
                    if index.is_empty() || record_pos - self.last_index_pos >= interval {
                        index.push((offset, record_pos));
                        self.last_index_pos = record_pos;
                    }
                    frame::encode(&mut self.buf, offset, &data);
                    offsets.push(offset);
                    pending.records.push(Record { offset, data });
                    offset += 1;
                }
            }
            pending.replies.push((reply, offsets));
        }
        self.flush(&mut pending);
    }

    /// Writes and fdatasyncs the buffer, then publishes its records and answers their appenders.
    /// Returns false if the log failed (the appenders got the error).
    fn flush(&mut self, pending: &mut Pending) -> bool {
        if self.buf.is_empty() {
            return true;
        }
        let result = self
            .file
            .write_all_at(&self.buf, self.pos)
            .map_err(io_err(&self.active.path, "write records"))
            .and_then(|()| {
                self.file
                    .sync_data()
                    .map_err(io_err(&self.active.path, "fdatasync"))
            });
        if let Err(e) = result {
            // Best effort: cut what may have been written so a reopen sees a clean tail.
            let _ = self.file.set_len(self.pos);
            let reason = e.to_string();
            error!(error = %reason, "event log write failed; refusing appends until reopened");
            self.fail(&reason);
            for (reply, _) in pending.replies.drain(..) {
                let _ = reply.send(Err(LogError::Failed {
                    dir: self.shared.dir.clone(),
                    reason: reason.clone(),
                }));
            }
            pending.records.clear();
            self.buf.clear();
            return false;
        }
        self.pos += self.buf.len() as u64;
        self.buf.clear();
        self.next_offset += pending.records.len() as u64;
        self.shared
            .synced_records
            .fetch_add(pending.records.len() as u64, Ordering::Relaxed);
        self.shared.syncs.fetch_add(1, Ordering::Relaxed);
        self.active.bytes.store(self.pos, Ordering::SeqCst);
        self.active
            .last_append_ms
            .store(millis(SystemTime::now()), Ordering::SeqCst);
        {
            let mut cache = lock(&self.shared.cache);
            for record in pending.records.drain(..) {
                if cache.capacity == 0 {
                    continue;
                }
                cache.bytes += record.data.len();
                cache.records.push_back(record);
                while cache.bytes > cache.capacity {
                    match cache.records.pop_front() {
                        Some(old) => cache.bytes -= old.data.len(),
                        None => break,
                    }
                }
            }
        }
        self.shared.head.send_replace(self.next_offset);
        for (reply, offsets) in pending.replies.drain(..) {
            let _ = reply.send(Ok(offsets));
        }
        true
    }

    fn fail(&self, reason: &str) {
        lock(&self.shared.failed).get_or_insert_with(|| reason.to_string());
    }

    /// Starts a new active segment at the head.
    fn roll(&mut self) -> Result<(), LogError> {
        let base = self.next_offset;
        let dir = &self.shared.dir;
        let path = segment_path(dir, base);
        // The full segment keeps exactly its data (it may have been preallocated larger).
        let allocated = self
            .file
            .metadata()
            .map_err(io_err(&self.active.path, "stat segment"))?
            .len();
        if allocated > self.pos {
            self.file
                .set_len(self.pos)
                .and_then(|()| self.file.sync_all())
                .map_err(io_err(
                    &self.active.path,
                    "cut the preallocated rest of a full segment",
                ))?;
        }
        let mut preallocated = false;
        if self.shared.options.preallocate && self.shared.spare_ready.swap(false, Ordering::SeqCst)
        {
            match fs::rename(dir.join(SPARE_FILE), &path) {
                Ok(()) => preallocated = true,
                Err(e) => {
                    warn!(error = %e, "using the preallocated segment; creating a growing one")
                }
            }
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(!preallocated)
            .open(&path)
            .map_err(io_err(&path, "create segment"))?;
        sync_dir(dir)?;
        let read_handle = file.try_clone().map_err(io_err(&path, "open segment"))?;
        let segment = Arc::new(Segment {
            base,
            path,
            file: read_handle,
            index: Mutex::new(Some(Vec::new())),
            bytes: AtomicU64::new(0),
            last_append_ms: AtomicU64::new(millis(SystemTime::now())),
        });
        self.shared
            .segments
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(base, segment.clone());
        debug!(segment = %segment.path.display(), "event log rolled to a new segment");
        self.active = segment;
        self.file = file;
        self.pos = 0;
        self.last_index_pos = 0;
        Ok(())
    }
}

/// Flushes consumer offsets every `offsets_flush_interval` and applies retention every
/// `retention_check_interval`, until `stop` is dropped.
fn run_maintenance(shared: Arc<Shared>, stop: mpsc::Receiver<()>) {
    let flush_every = shared.options.offsets_flush_interval;
    let retention_every = shared.options.retention_check_interval;
    let tick = flush_every
        .min(retention_every)
        .max(Duration::from_millis(10));
    let mut next_retention = Instant::now() + retention_every;
    loop {
        match stop.recv_timeout(tick) {
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            _ => return,
        }
        if let Err(e) = shared.flush_offsets() {
            warn!(error = %e, "flushing consumer offsets; retrying");
        }
        if shared.options.preallocate && !shared.spare_ready.load(Ordering::SeqCst) {
            match prepare_spare(&shared.dir, shared.options.segment_bytes) {
                Ok(()) => shared.spare_ready.store(true, Ordering::SeqCst),
                Err(e) => warn!(error = %e, "preallocating the next segment; retrying"),
            }
        }
        if Instant::now() >= next_retention {
            next_retention = Instant::now() + retention_every;
            if let Err(e) = shared.apply_retention(SystemTime::now()) {
                warn!(error = %e, "event log retention");
            }
        }
    }
}
