//! The broker's durable, segmented, append-only event log with consumer offsets
