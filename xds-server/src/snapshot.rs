//! Per-resource versioned snapshots.
