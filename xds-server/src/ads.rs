//! ADS server (SotW and delta).
