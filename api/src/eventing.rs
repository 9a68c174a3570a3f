//! eventing.knative.dev/v1 Broker and Trigger, and sources.knative.dev/v1 PingSource.
//!
//! PLACEHOLDER types (metadata plus an untyped spec) until the eventing types are written out.

use serde::{Deserialize, Serialize};

use crate::meta::ObjectMeta;

pub const API_VERSION: &str = "eventing.knative.dev/v1";
pub const SOURCES_API_VERSION: &str = "sources.knative.dev/v1";

macro_rules! placeholder {
    ($name:ident) => {
        #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
        #[serde(rename_all = "camelCase")]
        pub struct $name {
            #[serde(default)]
            pub metadata: ObjectMeta,
            #[serde(default)]
            pub spec: serde_json::Value,
        }
    };
}

placeholder!(Broker);
placeholder!(Trigger);
placeholder!(PingSource);
