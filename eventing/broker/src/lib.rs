//! Broker ingress, trigger dispatch and delivery, replies and PingSource.
//!
//! ```text
//! let service = BrokerService::start(BrokerOptions::new(data_dir, listen)).await?;
//! service.apply(EventingObjects { brokers, triggers, pingsources }).await;   // live: add/update/remove
//! let status = service.status();   // Broker/Trigger/PingSource objects with Knative conditions
//! service.shutdown().await;
//! ```
//!
//! - [`ingress`]: `POST /<namespace>/<broker>` (CloudEvents binary, structured, batch) -> the broker's
//!   durable log -> 202.
//! - [`dispatch`]: one consumer per Trigger reading the log from its committed offset: filter, deliver
//!   (bounded parallelism, or ordered), retry, dead-letter, reply back into the broker, commit.
//! - [`delivery`]: Knative's retry policy (pure) and the pooled HTTP sender.
//! - [`gateway`]: the path to subscribers through Sluice's gateway: wait until it is served; its
//!   own failures are not delivery attempts.
//! - [`ping`]: PingSource schedules.
//! - [`metrics`]: Knative's broker metrics and Sluice's delivery, log and lag figures (Prometheus).
//! - [`config`]: Knative objects validated into the broker's own types; [`defaults`]:
//!   `config-br-defaults`.
//! - [`codec`]: CloudEvents <-> HTTP messages and log records; the TTL extension.

pub mod backend;
pub mod codec;
pub mod config;
pub mod defaults;
pub mod delivery;
pub mod dispatch;
pub mod gateway;
pub mod ingress;
pub mod metrics;
pub mod ping;
pub mod rabbitmq;
pub mod service;

pub use config::{BrokerKey, ConfigError, EventingObjects};
pub use metrics::BrokerMetrics;
pub use service::{BrokerOptions, BrokerService, EventingStatus, ServiceError};
