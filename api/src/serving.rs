//! serving.knative.dev/v1: Service, Configuration, Revision and Route.
//!
//! PLACEHOLDER types (metadata plus an untyped spec) until the serving types are written out.

use serde::{Deserialize, Serialize};

use crate::meta::ObjectMeta;

pub const API_VERSION: &str = "serving.knative.dev/v1";

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

placeholder!(Service);
placeholder!(Configuration);
placeholder!(Revision);
placeholder!(Route);
