//! Knative's KPA as a pure library, metric scraping from Envoy, and the scaler trait
