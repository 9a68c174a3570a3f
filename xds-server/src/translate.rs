//! Pure KIngress to Envoy translation.
