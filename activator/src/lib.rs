//! Buffers requests for revisions without capacity, pokes the autoscaler, throttles per revision
