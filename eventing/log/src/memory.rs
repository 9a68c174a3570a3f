//! A non-durable [`EventLog`] in memory, for tests of other crates. Keeps every record (no retention).

use std::collections::BTreeMap;
use std::sync::Mutex;

use bytes::Bytes;
use tokio::sync::watch;

use crate::{BoxFuture, EventLog, LogError, Record, validate_consumer};

/// An [`EventLog`] in memory: the same offsets, reads, head watch and consumers as [`crate::SegmentLog`],
/// nothing on disk.
pub struct MemoryLog {
    state: Mutex<State>,
    head: watch::Sender<u64>,
}

struct State {
    records: Vec<Bytes>,
    consumers: BTreeMap<String, u64>,
    closed: bool,
}

impl MemoryLog {
    pub fn new() -> Self {
        MemoryLog {
            state: Mutex::new(State {
                records: Vec::new(),
                consumers: BTreeMap::new(),
                closed: false,
            }),
            head: watch::Sender::new(0),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Default for MemoryLog {
    fn default() -> Self {
        Self::new()
    }
}

impl EventLog for MemoryLog {
    fn append(&self, records: Vec<Bytes>) -> BoxFuture<'_, Result<Vec<u64>, LogError>> {
        let result = (|| {
            let mut state = self.state();
            if state.closed {
                return Err(LogError::Closed);
            }
            let first = state.records.len() as u64;
            let offsets = (first..first + records.len() as u64).collect();
            state.records.extend(records);
            self.head.send_replace(state.records.len() as u64);
            Ok(offsets)
        })();
        Box::pin(std::future::ready(result))
    }

    fn read(&self, from: u64, max_records: usize) -> BoxFuture<'_, Result<Vec<Record>, LogError>> {
        let state = self.state();
        let records = state
            .records
            .iter()
            .enumerate()
            .skip(from.min(usize::MAX as u64) as usize)
            .take(max_records)
            .map(|(i, data)| Record {
                offset: i as u64,
                data: data.clone(),
            })
            .collect();
        Box::pin(std::future::ready(Ok(records)))
    }

    fn head(&self) -> u64 {
        self.state().records.len() as u64
    }

    fn start(&self) -> u64 {
        0
    }

    fn subscribe_head(&self) -> watch::Receiver<u64> {
        self.head.subscribe()
    }

    fn commit(&self, consumer: &str, offset: u64) -> BoxFuture<'_, Result<(), LogError>> {
        let result = validate_consumer(consumer).and_then(|()| {
            let mut state = self.state();
            let head = state.records.len() as u64;
            if offset > head {
                return Err(LogError::OffsetBeyondHead {
                    consumer: consumer.to_string(),
                    offset,
                    head,
                });
            }
            state.consumers.insert(consumer.to_string(), offset);
            Ok(())
        });
        Box::pin(std::future::ready(result))
    }

    fn committed(&self, consumer: &str) -> Option<u64> {
        self.state().consumers.get(consumer).copied()
    }

    fn consumers(&self) -> Vec<(String, u64)> {
        self.state()
            .consumers
            .iter()
            .map(|(name, offset)| (name.clone(), *offset))
            .collect()
    }

    fn remove_consumer(&self, consumer: &str) -> BoxFuture<'_, Result<(), LogError>> {
        self.state().consumers.remove(consumer);
        Box::pin(std::future::ready(Ok(())))
    }

    fn close(&self) -> BoxFuture<'_, Result<(), LogError>> {
        self.state().closed = true;
        Box::pin(std::future::ready(Ok(())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_log_appends_reads_and_tracks_consumers() {
        let log = MemoryLog::new();
        let mut head = log.subscribe_head();
        assert_eq!(
            log.append(vec![Bytes::from("a"), Bytes::from("b")])
                .await
                .unwrap(),
            vec![0, 1]
        );
        assert_eq!(log.append(vec![Bytes::from("c")]).await.unwrap(), vec![2]);
        assert_eq!(*head.borrow_and_update(), 3);
        let read = log.read(1, 10).await.unwrap();
        assert_eq!(
            read,
            vec![
                Record {
                    offset: 1,
                    data: Bytes::from("b")
                },
                Record {
                    offset: 2,
                    data: Bytes::from("c")
                },
            ]
        );
        assert!(log.read(3, 10).await.unwrap().is_empty());
        log.commit("t", 2).await.unwrap();
        assert_eq!(log.committed("t"), Some(2));
        assert!(log.commit("t", 4).await.is_err());
        assert_eq!(log.consumers(), vec![("t".to_string(), 2)]);
        log.remove_consumer("t").await.unwrap();
        assert_eq!(log.committed("t"), None);
        log.close().await.unwrap();
        assert!(matches!(
            log.append(vec![Bytes::from("d")]).await,
            Err(LogError::Closed)
        ));
    }
}
