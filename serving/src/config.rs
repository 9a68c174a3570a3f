//! Knative's serving config maps, typed: `config-network` (knative/networking pkg/config/config.go),
//! `config-domain` (serving pkg/reconciler/route/config/domain.go) and `config-defaults` (serving
//! pkg/apis/config/defaults.go), read from namespace `knative-serving` with Knative's keys and
//! defaults. `config-autoscaler` belongs to the autoscaler crate.
//!
//! Sluice differs from Knative in two defaults, both because it runs on one machine:
//! - the default domain is `localhost` (Knative: `svc.cluster.local` since 1.x, `example.com` before),
//!   so `*.localhost` names resolve to loopback with no DNS set-up;
//! - the default ingress class is Sluice's own (`sluice.ingress.networking.knative.dev`; Knative's is
//!   Istio's).

use std::collections::BTreeMap;

use serde::Deserialize;
use sluice_api::core::ConfigMap;
use sluice_api::ingress::SLUICE_INGRESS_CLASS;
use sluice_api::serving::Defaults;

use crate::template::{Template, TemplateValues};

pub const KNATIVE_SERVING_NAMESPACE: &str = "knative-serving";
pub const CONFIG_NETWORK: &str = "config-network";
pub const CONFIG_DOMAIN: &str = "config-domain";
pub const CONFIG_DEFAULTS: &str = "config-defaults";
/// Sluice's default domain when config-domain names none (Knative's is `svc.cluster.local`).
pub const SLUICE_DEFAULT_DOMAIN: &str = "localhost";
/// Knative: `DefaultDomainTemplate`.
pub const DEFAULT_DOMAIN_TEMPLATE: &str = "{{.Name}}.{{.Namespace}}.{{.Domain}}";
/// Knative: `DefaultTagTemplate`.
pub const DEFAULT_TAG_TEMPLATE: &str = "{{.Tag}}-{{.Name}}";
/// Kubernetes' cluster domain; cluster-local hosts end in `.svc.<cluster domain>`.
pub const CLUSTER_DOMAIN: &str = "cluster.local";
/// The key Knative's ConfigMaps carry documentation under; never a setting.
const EXAMPLE_KEY: &str = "_example";

/// A config map value Sluice cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("ConfigMap {KNATIVE_SERVING_NAMESPACE}/{config_map}: {key}: {message}")]
pub struct ConfigError {
    pub config_map: &'static str,
    pub key: String,
    pub message: String,
}

fn err(config_map: &'static str, key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        config_map,
        key: key.to_string(),
        message: message.into(),
    }
}

/// Everything the reconciler reads from Knative's config maps.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServingConfig {
    pub network: NetworkConfig,
    pub domain: DomainConfig,
    pub defaults: Defaults,
    /// Appended to external URLs in statuses (`http://web.default.localhost:8080`) when the gateway
    /// listens on a port other than 80. Not a Knative setting: Knative's URLs never carry a port.
    pub external_url_port: Option<u16>,
}

impl ServingConfig {
    /// Reads the config maps Sluice knows from namespace knative-serving; others are ignored.
    /// A missing config map means Knative's defaults.
    pub fn from_config_maps<'a>(
        maps: impl IntoIterator<Item = &'a ConfigMap>,
    ) -> Result<ServingConfig, ConfigError> {
        let mut config = ServingConfig::default();
        for map in maps {
            if map.metadata.namespace != KNATIVE_SERVING_NAMESPACE {
                continue;
            }
            match map.metadata.name.as_str() {
                CONFIG_NETWORK => config.network = NetworkConfig::from_data(&map.data)?,
                CONFIG_DOMAIN => config.domain = DomainConfig::from_data(&map.data)?,
                CONFIG_DEFAULTS => config.defaults = defaults_from_data(&map.data)?,
                _ => {}
            }
        }
        Ok(config)
    }
}

/// config-network `http-protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HttpProtocol {
    #[default]
    Enabled,
    Disabled,
    Redirected,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NetworkConfig {
    /// `ingress-class` (legacy `ingress.class`): the class put on KIngresses, unless a Route's
    /// `networking.knative.dev/ingress.class` annotation says otherwise.
    pub ingress_class: String,
    /// `domain-template` (legacy `domainTemplate`).
    pub domain_template: Template,
    /// `tag-template` (legacy `tagTemplate`).
    pub tag_template: Template,
    /// `http-protocol` (legacy `httpProtocol`). Without TLS only `enabled` changes anything.
    pub http_protocol: HttpProtocol,
    /// `default-external-scheme`: the scheme of external URLs ("http").
    pub default_external_scheme: String,
    /// `rollout-duration`: read and checked; Sluice moves traffic at once (no gradual rollout).
    pub rollout_duration_secs: i64,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            ingress_class: SLUICE_INGRESS_CLASS.to_string(),
            domain_template: Template::parse(DEFAULT_DOMAIN_TEMPLATE).expect("valid"),
            tag_template: Template::parse(DEFAULT_TAG_TEMPLATE).expect("valid"),
            http_protocol: HttpProtocol::Enabled,
            default_external_scheme: "http".to_string(),
            rollout_duration_secs: 0,
        }
    }
}

impl NetworkConfig {
    pub fn from_data(data: &BTreeMap<String, String>) -> Result<NetworkConfig, ConfigError> {
        let mut nc = NetworkConfig::default();
        // Knative: the new key takes precedence over the legacy one.
        let get = |new: &str, legacy: &str| -> Option<(String, String)> {
            data.get(new)
                .map(|v| (new.to_string(), v.clone()))
                .or_else(|| data.get(legacy).map(|v| (legacy.to_string(), v.clone())))
        };
        if let Some((_, v)) = get("ingress-class", "ingress.class") {
            nc.ingress_class = v;
        }
        if let Some((key, v)) = get("domain-template", "domainTemplate") {
            let t = Template::parse(&v).map_err(|e| err(CONFIG_NETWORK, &key, e.to_string()))?;
            t.check_domain_fields()
                .map_err(|e| err(CONFIG_NETWORK, &key, e.to_string()))?;
            check_domain_template(&t).map_err(|m| err(CONFIG_NETWORK, &key, m))?;
            nc.domain_template = t;
        }
        if let Some((key, v)) = get("tag-template", "tagTemplate") {
            let t = Template::parse(&v).map_err(|e| err(CONFIG_NETWORK, &key, e.to_string()))?;
            t.check_tag_fields()
                .map_err(|e| err(CONFIG_NETWORK, &key, e.to_string()))?;
            nc.tag_template = t;
        }
        if let Some((key, v)) = get("http-protocol", "httpProtocol") {
            nc.http_protocol = match v.to_ascii_lowercase().as_str() {
                "" | "enabled" => HttpProtocol::Enabled,
                "disabled" => HttpProtocol::Disabled,
                "redirected" => HttpProtocol::Redirected,
                _ => {
                    return Err(err(
                        CONFIG_NETWORK,
                        &key,
                        format!("{v:?} is not supported, want enabled, disabled or redirected"),
                    ));
                }
            };
        }
        if let Some((_, v)) = get("default-external-scheme", "defaultExternalScheme") {
            nc.default_external_scheme = v;
        }
        if let Some((key, v)) = get("rollout-duration", "rolloutDuration") {
            let secs: i64 = v
                .trim()
                .parse()
                .map_err(|_| err(CONFIG_NETWORK, &key, format!("{v:?} is not an integer")))?;
            if secs < 0 {
                return Err(err(
                    CONFIG_NETWORK,
                    &key,
                    format!("must be a positive integer, but was {secs}"),
                ));
            }
            nc.rollout_duration_secs = secs;
        }
        Ok(nc)
    }
}

/// Knative's checkDomainTemplate: a test rendering must be a bare host name.
fn check_domain_template(t: &Template) -> Result<(), String> {
    let host = t.render(&TemplateValues {
        name: "foo",
        namespace: "bar",
        domain: "baz.com",
        ..Default::default()
    });
    if host.is_empty() {
        return Err("empty hostname".to_string());
    }
    if let Some(i) = host.find(['/', '?', '#']) {
        return Err(format!("domain template has url path: {}", &host[i..]));
    }
    if host.contains(char::is_whitespace) {
        return Err(format!("{host:?} is not a host name"));
    }
    Ok(())
}

/// config-domain: domain -> label selector; a Route uses the most specific matching domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainConfig {
    pub domains: BTreeMap<String, BTreeMap<String, String>>,
}

impl Default for DomainConfig {
    fn default() -> Self {
        DomainConfig {
            domains: BTreeMap::from([(SLUICE_DEFAULT_DOMAIN.to_string(), BTreeMap::new())]),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct LabelSelector {
    #[serde(default)]
    selector: BTreeMap<String, String>,
}

impl DomainConfig {
    pub fn from_data(data: &BTreeMap<String, String>) -> Result<DomainConfig, ConfigError> {
        let mut domains = BTreeMap::new();
        for (domain, value) in data {
            if domain == EXAMPLE_KEY {
                continue;
            }
            let selector: LabelSelector = if value.trim().is_empty() {
                LabelSelector::default()
            } else {
                serde_yaml::from_str::<Option<LabelSelector>>(value)
                    .map_err(|e| {
                        err(
                            CONFIG_DOMAIN,
                            domain,
                            format!("want empty or \"selector: {{label: value}}\": {e}"),
                        )
                    })?
                    .unwrap_or_default()
            };
            domains.insert(domain.clone(), selector.selector);
        }
        // Knative adds its default domain when no entry has an empty selector.
        if !domains.values().any(BTreeMap::is_empty) {
            domains.insert(SLUICE_DEFAULT_DOMAIN.to_string(), BTreeMap::new());
        }
        Ok(DomainConfig { domains })
    }

    /// Knative's LookupDomainForLabels: cluster-local Routes get `svc.cluster.local`; otherwise the
    /// matching selector with most labels wins, ties to the alphabetically first domain.
    pub fn lookup(&self, labels: &BTreeMap<String, String>) -> String {
        if labels
            .get(sluice_api::serving::VISIBILITY_LABEL)
            .map(String::as_str)
            == Some(sluice_api::serving::VISIBILITY_CLUSTER_LOCAL)
        {
            return format!("svc.{CLUSTER_DOMAIN}");
        }
        let mut best: Option<(&String, usize)> = None;
        for (domain, selector) in &self.domains {
            let matches = selector.iter().all(|(k, v)| labels.get(k) == Some(v));
            if !matches {
                continue;
            }
            // BTreeMap iterates domains in order, so the first of equal specificity is kept.
            if best.is_none_or(|(_, s)| selector.len() > s) {
                best = Some((domain, selector.len()));
            }
        }
        best.map(|(d, _)| d.clone()).unwrap_or_default()
    }
}

/// config-defaults, with Knative's keys, defaults and cross-checks.
pub fn defaults_from_data(data: &BTreeMap<String, String>) -> Result<Defaults, ConfigError> {
    let mut d = Defaults::default();
    let int = |key: &str, target: &mut i64| -> Result<(), ConfigError> {
        if let Some(v) = data.get(key) {
            *target = v
                .trim()
                .parse()
                .map_err(|_| err(CONFIG_DEFAULTS, key, format!("{v:?} is not an integer")))?;
        }
        Ok(())
    };
    int("revision-timeout-seconds", &mut d.revision_timeout_seconds)?;
    int(
        "max-revision-timeout-seconds",
        &mut d.max_revision_timeout_seconds,
    )?;
    int(
        "revision-idle-timeout-seconds",
        &mut d.revision_idle_timeout_seconds,
    )?;
    int("container-concurrency", &mut d.container_concurrency)?;
    int(
        "container-concurrency-max-limit",
        &mut d.container_concurrency_max_limit,
    )?;
    // Knative: the response-start timeout defaults to the revision timeout given.
    d.revision_response_start_timeout_seconds = d.revision_timeout_seconds;
    int(
        "revision-response-start-timeout-seconds",
        &mut d.revision_response_start_timeout_seconds,
    )?;
    if let Some(v) = data.get("allow-container-concurrency-zero") {
        d.allow_container_concurrency_zero = match v.to_ascii_lowercase().as_str() {
            "true" => true,
            "false" => false,
            _ => {
                return Err(err(
                    CONFIG_DEFAULTS,
                    "allow-container-concurrency-zero",
                    format!("{v:?} is not a boolean"),
                ));
            }
        };
    }
    if let Some(v) = data.get("container-name-template") {
        // Sluice: only a literal name (Knative allows a template over the parent's ObjectMeta).
        if v.contains("{{") {
            return Err(err(
                CONFIG_DEFAULTS,
                "container-name-template",
                "sluice supports only a literal container name here",
            ));
        }
        d.container_name = v.clone();
    }
    if d.revision_timeout_seconds > d.max_revision_timeout_seconds {
        return Err(err(
            CONFIG_DEFAULTS,
            "revision-timeout-seconds",
            format!(
                "revision-timeout-seconds ({}) cannot be greater than max-revision-timeout-seconds ({})",
                d.revision_timeout_seconds, d.max_revision_timeout_seconds
            ),
        ));
    }
    if d.revision_response_start_timeout_seconds > 0
        && d.revision_response_start_timeout_seconds > d.revision_timeout_seconds
    {
        return Err(err(
            CONFIG_DEFAULTS,
            "revision-response-start-timeout-seconds",
            format!(
                "revision-response-start-timeout-seconds ({}) cannot be greater than revision-timeout-seconds ({})",
                d.revision_response_start_timeout_seconds, d.revision_timeout_seconds
            ),
        ));
    }
    if d.revision_idle_timeout_seconds > 0
        && d.revision_idle_timeout_seconds > d.revision_timeout_seconds
    {
        return Err(err(
            CONFIG_DEFAULTS,
            "revision-idle-timeout-seconds",
            format!(
                "revision-idle-timeout-seconds ({}) cannot be greater than revision-timeout-seconds ({})",
                d.revision_idle_timeout_seconds, d.revision_timeout_seconds
            ),
        ));
    }
    if d.container_concurrency_max_limit < 1 {
        return Err(err(
            CONFIG_DEFAULTS,
            "container-concurrency-max-limit",
            format!(
                "expected 1 <= {} <= 2147483647",
                d.container_concurrency_max_limit
            ),
        ));
    }
    if d.container_concurrency < 0 || d.container_concurrency > d.container_concurrency_max_limit {
        return Err(err(
            CONFIG_DEFAULTS,
            "container-concurrency",
            format!(
                "expected 0 <= {} <= {}",
                d.container_concurrency, d.container_concurrency_max_limit
            ),
        ));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn map(name: &str, pairs: &[(&str, &str)]) -> ConfigMap {
        let mut m = ConfigMap::default();
        m.metadata.name = name.into();
        m.metadata.namespace = KNATIVE_SERVING_NAMESPACE.into();
        m.data = data(pairs);
        m
    }

    #[test]
    fn no_config_maps_means_knative_defaults_and_localhost() {
        let c = ServingConfig::from_config_maps([]).unwrap();
        assert_eq!(c.defaults, Defaults::default());
        assert_eq!(c.defaults.revision_timeout_seconds, 300);
        assert_eq!(c.defaults.max_revision_timeout_seconds, 600);
        assert_eq!(c.defaults.container_concurrency_max_limit, 1000);
        assert_eq!(c.network.ingress_class, SLUICE_INGRESS_CLASS);
        assert_eq!(c.network.domain_template.source(), DEFAULT_DOMAIN_TEMPLATE);
        assert_eq!(c.network.tag_template.source(), DEFAULT_TAG_TEMPLATE);
        assert_eq!(c.domain.lookup(&BTreeMap::new()), "localhost");
    }

    #[test]
    fn reads_maps_from_knative_serving_only() {
        let mut other = map(CONFIG_DEFAULTS, &[("container-concurrency", "5")]);
        other.metadata.namespace = "default".into();
        let maps = [
            other,
            map(
                CONFIG_NETWORK,
                &[("domain-template", "{{.Name}}-{{.Namespace}}.{{.Domain}}")],
            ),
            map(CONFIG_DOMAIN, &[("example.org", ""), ("_example", "docs")]),
            map(CONFIG_DEFAULTS, &[("revision-timeout-seconds", "120")]),
        ];
        let c = ServingConfig::from_config_maps(&maps).unwrap();
        assert_eq!(c.defaults.container_concurrency, 0);
        assert_eq!(c.defaults.revision_timeout_seconds, 120);
        assert_eq!(c.defaults.revision_response_start_timeout_seconds, 120);
        assert_eq!(c.domain.lookup(&BTreeMap::new()), "example.org");
        assert_eq!(
            c.network.domain_template.source(),
            "{{.Name}}-{{.Namespace}}.{{.Domain}}"
        );
    }

    #[test]
    fn domain_selectors_pick_the_most_specific() {
        let d = DomainConfig::from_data(&data(&[
            ("prod.example.com", "selector:\n  app: prod\n"),
            (
                "prod-eu.example.com",
                "selector:\n  app: prod\n  region: eu\n",
            ),
        ]))
        .unwrap();
        let labels = |pairs: &[(&str, &str)]| data(pairs);
        assert_eq!(d.lookup(&labels(&[])), "localhost");
        assert_eq!(d.lookup(&labels(&[("app", "prod")])), "prod.example.com");
        assert_eq!(
            d.lookup(&labels(&[("app", "prod"), ("region", "eu")])),
            "prod-eu.example.com"
        );
        assert_eq!(
            d.lookup(&labels(&[(
                "networking.knative.dev/visibility",
                "cluster-local"
            )])),
            "svc.cluster.local"
        );
    }

    #[test]
    fn errors_name_the_config_map_and_key() {
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
        let table: &[Case] = &[
            (
                CONFIG_NETWORK,
                &[("domain-template", "{{.Name}}/{{.Domain}}")],
                "ConfigMap knative-serving/config-network: domain-template: domain template has url path: /baz.com",
            ),
            (
                CONFIG_NETWORK,
                &[("tag-template", "{{.Tag}}-{{.Namespace}}")],
                "ConfigMap knative-serving/config-network: tag-template: .Namespace is not available",
            ),
            (
                CONFIG_NETWORK,
                &[("http-protocol", "sometimes")],
                "ConfigMap knative-serving/config-network: http-protocol: \"sometimes\" is not supported",
            ),
            (
                CONFIG_DOMAIN,
                &[("a.com", "selector: [x]")],
                "ConfigMap knative-serving/config-domain: a.com: want empty or",
            ),
            (
                CONFIG_DEFAULTS,
                &[("revision-timeout-seconds", "900")],
                "ConfigMap knative-serving/config-defaults: revision-timeout-seconds: revision-timeout-seconds (900) cannot be greater than max-revision-timeout-seconds (600)",
            ),
            (
                CONFIG_DEFAULTS,
                &[("container-concurrency", "2000")],
                "ConfigMap knative-serving/config-defaults: container-concurrency: expected 0 <= 2000 <= 1000",
            ),
            (
                CONFIG_DEFAULTS,
                &[("container-concurrency", "x")],
                "ConfigMap knative-serving/config-defaults: container-concurrency: \"x\" is not an integer",
            ),
        ];
        for (name, pairs, want) in table {
            let err = ServingConfig::from_config_maps([&map(name, pairs)]).unwrap_err();
            assert!(err.to_string().starts_with(want), "{err}\nwant {want}");
        }
    }

    #[test]
    fn legacy_network_keys_are_read_and_new_keys_win() {
        let nc = NetworkConfig::from_data(&data(&[
            ("ingress.class", "legacy"),
            ("tagTemplate", "{{.Name}}-{{.Tag}}"),
        ]))
        .unwrap();
        assert_eq!(nc.ingress_class, "legacy");
        assert_eq!(nc.tag_template.source(), "{{.Name}}-{{.Tag}}");
        let nc = NetworkConfig::from_data(&data(&[
            ("ingress.class", "legacy"),
            ("ingress-class", "new"),
        ]))
        .unwrap();
        assert_eq!(nc.ingress_class, "new");
    }
}
