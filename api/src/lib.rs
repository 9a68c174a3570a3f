//! Knative and Kubernetes resource types that Sluice reads and writes.
//!
//! Only serde types, Knative's defaulting and validation, and shared names live here: nothing about
//! Envoy, processes or I/O.

pub mod autoscaling;
pub mod core;
pub mod eventing;
pub mod filters;
pub mod ingress;
pub mod meta;
pub mod objects;
pub mod probe;
pub mod serving;
pub mod validation;

pub use ingress::Ingress;
pub use meta::{Condition, ConditionStatus, ObjectMeta};
pub use objects::{Document, Object, ParseError, parse_documents, read_documents};
pub use validation::{FieldError, ValidationError};
