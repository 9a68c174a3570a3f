//! Knative Serving reconciliation: Service, Configuration, Revision and Route to KIngress, and Knative's config maps
