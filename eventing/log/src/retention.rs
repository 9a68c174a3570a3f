//! Which segments to delete (pure: the caller passes the segments, the consumers' position and now).

use std::time::{Duration, SystemTime};

/// Which segments retention deletes. Only whole, closed segments are deleted (never the active one),
/// oldest first.
///
/// A closed segment is *consumed* when every consumer's committed offset is past its last record (a
/// log without consumers has nothing pending: all its closed segments are consumed). A consumed
/// segment is deleted once it is older than `max_age` (time of its last append) **or** the log is
/// larger than `max_bytes`. A segment that some consumer still needs is never deleted, except when
/// the log is larger than `hard_cap_bytes`: then the oldest segments go whatever consumers still
/// need them (those consumers skip the lost records, and an error is logged).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Consumed segments older than this are deleted. `None`: age alone deletes nothing. Default 24 h.
    pub max_age: Option<Duration>,
    /// Consumed segments are deleted while the log is larger than this. `None`: no size limit for
    /// consumed segments. Default 1 GiB.
    pub max_bytes: Option<u64>,
    /// Oldest segments are deleted while the log is larger than this, even if consumers still need
    /// them. `None` (the default): never delete what a consumer has not committed.
    pub hard_cap_bytes: Option<u64>,
}

impl Default for RetentionPolicy {
    fn default() -> Self {
        RetentionPolicy {
            max_age: Some(Duration::from_secs(24 * 3600)),
            max_bytes: Some(1024 * 1024 * 1024),
            hard_cap_bytes: None,
        }
    }
}

/// One segment as retention sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentInfo {
    /// Offset of its first record.
    pub base: u64,
    /// One past the offset of its last record (the next segment's base).
    pub end: u64,
    /// Its size on disk.
    pub bytes: u64,
    /// When a record was last appended to it.
    pub last_append: SystemTime,
}

/// Why a segment is deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeletionReason {
    /// Every consumer has passed it and it is older than `max_age`.
    ConsumedAndOld,
    /// Every consumer has passed it and the log is larger than `max_bytes`.
    ConsumedAndOverSize,
    /// The log is larger than `hard_cap_bytes`; consumers may lose records.
    HardCap,
}

/// A segment to delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deletion {
    pub base: u64,
    pub reason: DeletionReason,
}

/// The segments to delete, oldest first.
///
/// `closed` are the closed segments oldest first (the active one excluded); `active_bytes` is the size
/// of the active segment; `min_committed` is the lowest committed offset of all consumers (`None`
/// without consumers). Deletion stops at the first segment kept so that the log stays contiguous.
pub fn plan_retention(
    closed: &[SegmentInfo],
    active_bytes: u64,
    min_committed: Option<u64>,
    policy: &RetentionPolicy,
    now: SystemTime,
) -> Vec<Deletion> {
    let mut total: u64 = closed.iter().map(|s| s.bytes).sum::<u64>() + active_bytes;
    let mut deletions = Vec::new();
    for segment in closed {
        let consumed = min_committed.is_none_or(|m| m >= segment.end);
        let old = policy.max_age.is_some_and(|max_age| {
            // A clock that went backwards makes a segment young, never old.
            now.duration_since(segment.last_append)
                .is_ok_and(|age| age >= max_age)
        });
        let over_size = policy.max_bytes.is_some_and(|max| total > max);
        let over_hard_cap = policy.hard_cap_bytes.is_some_and(|cap| total > cap);
        let reason = match (consumed, old, over_size, over_hard_cap) {
            (true, true, _, _) => DeletionReason::ConsumedAndOld,
            (true, false, true, _) => DeletionReason::ConsumedAndOverSize,
            (_, _, _, true) => DeletionReason::HardCap,
            _ => break,
        };
        total -= segment.bytes;
        deletions.push(Deletion {
            base: segment.base,
            reason,
        });
    }
    deletions
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn at(hours: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + HOUR * hours as u32
    }

    /// Three closed segments of 100 bytes: [0,10) written at hour 1, [10,20) at 2, [20,30) at 3.
    fn segments() -> Vec<SegmentInfo> {
        (0..3)
            .map(|i| SegmentInfo {
                base: i * 10,
                end: i * 10 + 10,
                bytes: 100,
                last_append: at(i + 1),
            })
            .collect()
    }

    fn policy(max_age: Option<u64>, max_bytes: Option<u64>, hard: Option<u64>) -> RetentionPolicy {
        RetentionPolicy {
            max_age: max_age.map(|h| HOUR * h as u32),
            max_bytes,
            hard_cap_bytes: hard,
        }
    }

    #[test]
    fn deletes_only_segments_all_consumers_passed_and_old_or_over_size() {
        use DeletionReason::*;
        // (name, min_committed, policy, now hour, expected deletions)
        type Case = (
            &'static str,
            Option<u64>,
            RetentionPolicy,
            u64,
            Vec<(u64, DeletionReason)>,
        );
        let cases: Vec<Case> = vec![
            (
                "all consumed and old",
                Some(30),
                policy(Some(1), None, None),
                10,
                vec![
                    (0, ConsumedAndOld),
                    (10, ConsumedAndOld),
                    (20, ConsumedAndOld),
                ],
            ),
            (
                "consumer in the second segment keeps it and what follows",
                Some(15),
                policy(Some(1), None, None),
                10,
                vec![(0, ConsumedAndOld)],
            ),
            (
                "consumer exactly at a segment end has passed it",
                Some(10),
                policy(Some(1), None, None),
                10,
                vec![(0, ConsumedAndOld)],
            ),
            (
                "consumed but young segments are kept",
                Some(30),
                policy(Some(5), None, None),
                4,
                vec![],
            ),
            (
                "age only deletes the old ones",
                Some(30),
                policy(Some(2), None, None),
                4,
                vec![(0, ConsumedAndOld), (10, ConsumedAndOld)],
            ),
            (
                "over size deletes consumed segments until within size",
                Some(30),
                policy(None, Some(200), None),
                4,
                vec![(0, ConsumedAndOverSize), (10, ConsumedAndOverSize)],
            ),
            (
                "over size never deletes what a consumer needs",
                Some(0),
                policy(None, Some(50), None),
                4,
                vec![],
            ),
            (
                "no consumers: everything closed is consumed",
                None,
                policy(Some(1), None, None),
                10,
                vec![
                    (0, ConsumedAndOld),
                    (10, ConsumedAndOld),
                    (20, ConsumedAndOld),
                ],
            ),
            (
                "hard cap deletes what consumers need",
                Some(0),
                policy(None, None, Some(200)),
                4,
                vec![(0, HardCap), (10, HardCap)],
            ),
            (
                "nothing configured deletes nothing",
                Some(30),
                policy(None, None, None),
                100,
                vec![],
            ),
        ];
        for (name, min_committed, policy, now, expected) in cases {
            let got: Vec<(u64, DeletionReason)> =
                plan_retention(&segments(), 50, min_committed, &policy, at(now))
                    .into_iter()
                    .map(|d| (d.base, d.reason))
                    .collect();
            assert_eq!(got, expected, "{name}");
        }
    }

    #[test]
    fn clock_going_backwards_keeps_segments() {
        let got = plan_retention(&segments(), 0, None, &policy(Some(1), None, None), at(0));
        assert!(got.is_empty());
    }
}
