//! Reading the queue-proxy filter's metrics from Envoy's `/stats/prometheus` (the names are documented in
//! wasm-filters/README.md): per instance `sluice_qp__<namespace>__<revision>__<instance>__<stat>`, each
//! part the Kubernetes name with `-` and `.` turned into `_`.
//!
//! The mapping is reimplemented here rather than taken from `sluice_queue_proxy::names`: that crate
//! depends on `proxy-wasm`, whose host calls have no native implementation, and the autoscaler should
//! not link them. A test pins the mapping to the README's example.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use sluice_api::autoscaling::Stat;

/// The prefix of every queue-proxy metric.
pub const PREFIX: &str = "sluice_qp";
/// Envoy's prefix on the native queue-proxy filter's series in `/stats/prometheus`: `envoy_` and the
/// dynamic module's `metrics_namespace` (`sluice`), before the same names the wasm filter's have.
pub const NATIVE_PROMETHEUS_PREFIX: &str = "envoy_sluice_";
const AVERAGE_CONCURRENCY: &str = "average_concurrency_milli";
const AVERAGE_PROXIED_CONCURRENCY: &str = "average_proxied_concurrency_milli";
const REQUEST_COUNT: &str = "request_count";
const PROXIED_REQUEST_COUNT: &str = "proxied_request_count";
const READY: &str = "ready";

/// A name part as the filter writes it: lowercase, `-`, `.` (and anything else outside `[a-z0-9]`)
/// turned into `_` (the filter's `names::part`).
pub fn metric_part(name: &str) -> String {
    name.chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            _ => '_',
        })
        .collect()
}

/// The metric name of one instance's stat (the filter's `names::instance_metric`).
pub fn instance_metric(namespace: &str, revision: &str, instance: &str, stat: &str) -> String {
    format!(
        "{PREFIX}__{}__{}__{}__{stat}",
        metric_part(namespace),
        metric_part(revision),
        metric_part(instance)
    )
}

/// One instance's stat as scraped. The names are metric parts (see [`metric_part`]), not the
/// Kubernetes names: match them against `metric_part(name)`.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceStat {
    pub namespace: String,
    pub revision: String,
    pub instance: String,
    /// `pod_name` is the instance part.
    pub stat: Stat,
    /// The filter's `ready` gauge, when present.
    pub ready: Option<bool>,
}

/// Why a scrape failed.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    #[error("scrape {url}: {source}")]
    Request {
        url: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("scrape {url}: HTTP {status}")]
    Status {
        url: String,
        status: http::StatusCode,
    },
    #[error("scrape {url}: timed out after {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error("scrape: bad prometheus text: {0}")]
    Parse(String),
}

/// Parses a Prometheus text exposition into per-instance stats; other metrics (and the per-revision
/// series) are ignored. Envoy prints series without tags as `name{} value`, which `prometheus-parse`
/// does not accept, so empty label sets are dropped first.
pub fn parse_prometheus(text: &str) -> Result<Vec<InstanceStat>, ScrapeError> {
    let lines = text.lines().map(|line| {
        Ok::<_, std::io::Error>(match line.split_once("{} ") {
            Some((name, value)) if !name.contains(' ') => format!("{name} {value}"),
            _ => line.to_string(),
        })
    });
    let scrape =
        prometheus_parse::Scrape::parse(lines).map_err(|e| ScrapeError::Parse(e.to_string()))?;
    let mut by_instance: BTreeMap<(String, String, String), InstanceStat> = BTreeMap::new();
    for sample in scrape.samples {
        let name = sample
            .metric
            .strip_prefix(NATIVE_PROMETHEUS_PREFIX)
            .unwrap_or(&sample.metric);
        let Some(rest) = name.strip_prefix(PREFIX).and_then(|r| r.strip_prefix("__")) else {
            continue;
        };
        let parts: Vec<&str> = rest.split("__").collect();
        // Per-instance series have 4 parts after the prefix; per-revision ones 3.
        let [namespace, revision, instance, stat] = parts[..] else {
            continue;
        };
        let value = match sample.value {
            prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => continue,
        };
        let key = (
            namespace.to_string(),
            revision.to_string(),
            instance.to_string(),
        );
        let entry = by_instance.entry(key).or_insert_with(|| InstanceStat {
            namespace: namespace.to_string(),
            revision: revision.to_string(),
            instance: instance.to_string(),
            stat: Stat {
                pod_name: instance.to_string(),
                ..Stat::default()
            },
            ready: None,
        });
        match stat {
            AVERAGE_CONCURRENCY => entry.stat.average_concurrent_requests = value / 1000.0,
            AVERAGE_PROXIED_CONCURRENCY => {
                entry.stat.average_proxied_concurrent_requests = value / 1000.0
            }
            REQUEST_COUNT => entry.stat.request_count = value,
            PROXIED_REQUEST_COUNT => entry.stat.proxied_request_count = value,
            READY => entry.ready = Some(value >= 1.0),
            _ => {}
        }
    }
    Ok(by_instance.into_values().collect())
}

/// Fetches Envoy's `/stats/prometheus` over HTTP/1 (hyper's client).
#[derive(Clone)]
pub struct EnvoyScraper {
    client: Client<HttpConnector, Empty<Bytes>>,
    url: http::Uri,
    timeout: Duration,
}

impl EnvoyScraper {
    /// `url` is the full stats URL, e.g. `http://127.0.0.1:9901/stats/prometheus`. Only the queue-proxy
    /// stats are needed, so callers may add `?filter=^wasmcustom.sluice_qp__` to keep the page small (Envoy matches
    /// the filter against the stat's own name, which carries the `wasmcustom.` prefix the page drops).
    pub fn new(url: http::Uri, timeout: Duration) -> Self {
        EnvoyScraper {
            client: Client::builder(TokioExecutor::new()).build_http(),
            url,
            timeout,
        }
    }

    pub fn url(&self) -> &http::Uri {
        &self.url
    }

    /// Fetches the page text.
    pub async fn fetch(&self) -> Result<String, ScrapeError> {
        let url = self.url.to_string();
        let work = async {
            let response =
                self.client
                    .get(self.url.clone())
                    .await
                    .map_err(|e| ScrapeError::Request {
                        url: url.clone(),
                        source: Box::new(e),
                    })?;
            let status = response.status();
            if !status.is_success() {
                return Err(ScrapeError::Status {
                    url: url.clone(),
                    status,
                });
            }
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| ScrapeError::Request {
                    url: url.clone(),
                    source: Box::new(e),
                })?
                .to_bytes();
            Ok(String::from_utf8_lossy(&body).into_owned())
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok(result) => result,
            Err(_) => Err(ScrapeError::Timeout {
                url,
                timeout: self.timeout,
            }),
        }
    }

    /// Fetches and parses.
    pub async fn scrape(&self) -> Result<Vec<InstanceStat>, ScrapeError> {
        parse_prometheus(&self.fetch().await?)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// What Envoy's admin page looks like with two instances of one revision and one of another.
    pub(crate) fn fixture(a_milli: u64, b_milli: u64) -> String {
        format!(
            "# TYPE envoy_server_uptime gauge\n\
             envoy_server_uptime{{}} 12\n\
             # TYPE sluice_qp__default__hello_00001__hello_00001_a__average_concurrency_milli gauge\n\
             sluice_qp__default__hello_00001__hello_00001_a__average_concurrency_milli{{}} {a_milli}\n\
             sluice_qp__default__hello_00001__hello_00001_a__average_proxied_concurrency_milli{{}} 500\n\
             sluice_qp__default__hello_00001__hello_00001_a__request_count{{}} 7\n\
             sluice_qp__default__hello_00001__hello_00001_a__proxied_request_count{{}} 2\n\
             sluice_qp__default__hello_00001__hello_00001_a__ready{{}} 1\n\
             # TYPE sluice_qp__default__hello_00001__hello_00001_a__requests_total counter\n\
             sluice_qp__default__hello_00001__hello_00001_a__requests_total{{}} 1234\n\
             sluice_qp__default__hello_00001__hello_00001_b__average_concurrency_milli {b_milli}\n\
             sluice_qp__default__hello_00001__average_concurrency_milli{{}} 99999\n\
             sluice_qp__team_a__web_00002__web_00002_x__request_count{{}} 3\n"
        )
    }

    #[test]
    fn names_match_the_filter_readme_example() {
        assert_eq!(
            instance_metric(
                "default",
                "hello-00001",
                "hello-00001-a",
                AVERAGE_CONCURRENCY
            ),
            "sluice_qp__default__hello_00001__hello_00001_a__average_concurrency_milli"
        );
        assert_eq!(metric_part("Weird.Name-1"), "weird_name_1");
    }

    #[test]
    fn prometheus_text_gives_per_instance_stats() {
        let stats = parse_prometheus(&fixture(2500, 1000)).unwrap();
        assert_eq!(stats.len(), 3, "{stats:#?}");
        let a = &stats[0];
        assert_eq!(
            (
                a.namespace.as_str(),
                a.revision.as_str(),
                a.instance.as_str()
            ),
            ("default", "hello_00001", "hello_00001_a")
        );
        assert_eq!(a.stat.pod_name, "hello_00001_a");
        assert_eq!(a.stat.average_concurrent_requests, 2.5);
        assert_eq!(a.stat.average_proxied_concurrent_requests, 0.5);
        assert_eq!(a.stat.request_count, 7.0);
        assert_eq!(a.stat.proxied_request_count, 2.0);
        assert_eq!(a.ready, Some(true));
        let b = &stats[1];
        assert_eq!(b.instance, "hello_00001_b");
        assert_eq!(b.stat.average_concurrent_requests, 1.0);
        assert_eq!(b.ready, None);
        let x = &stats[2];
        assert_eq!(
            (x.namespace.as_str(), x.revision.as_str()),
            ("team_a", "web_00002")
        );
        assert_eq!(x.stat.request_count, 3.0);
    }

    #[test]
    fn the_native_filters_series_read_the_same() {
        // The dynamic module's series carry Envoy's `envoy_<metrics_namespace>_` prefix.
        let native: String = fixture(2500, 1000)
            .lines()
            .map(|line| {
                let line = line.replace("TYPE sluice_qp__", "TYPE envoy_sluice_sluice_qp__");
                match line.strip_prefix("sluice_qp__") {
                    Some(rest) => format!("envoy_sluice_sluice_qp__{rest}\n"),
                    None => format!("{line}\n"),
                }
            })
            .collect();
        assert!(native.contains("\nenvoy_sluice_sluice_qp__default__"));
        assert_eq!(
            parse_prometheus(&native).unwrap(),
            parse_prometheus(&fixture(2500, 1000)).unwrap()
        );
    }

    #[test]
    fn unrelated_or_empty_pages_give_nothing() {
        assert!(parse_prometheus("").unwrap().is_empty());
        assert!(
            parse_prometheus("# TYPE x gauge\nx{} 1\nnot a metric line\n")
                .unwrap()
                .is_empty()
        );
    }
}
