//! Runs revision instances as local processes: spawn, readiness, stop, restart, logs
