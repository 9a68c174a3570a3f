//! Knative's defaulting and validation of a KIngress (knative.dev/networking
//! pkg/apis/networking/v1alpha1 ingress_defaults.go and ingress_validation.go).
//!
//! Field paths and "missing field(s)" follow Knative's apis.FieldError so messages read the same as the
//! Knative webhook's. Where Sluice is stricter than Knative the check says so.

use std::fmt;

use crate::ingress::{
    HTTP_OPTION_ENABLED, HTTP_OPTION_REDIRECTED, HttpIngressPath, Ingress, IngressBackendSplit,
    IngressRule, IngressTls, IntOrString, VISIBILITY_CLUSTER_LOCAL, VISIBILITY_EXTERNAL_IP,
};
use crate::objects::DEFAULT_NAMESPACE;

/// Knative's apis.ErrMissingField message.
const MISSING: &str = "missing field(s)";

/// One invalid field, e.g. `spec.rules[0].http.paths[1].splits[0].serviceName: missing field(s)`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

/// Every invalid field of an Ingress, in spec order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ValidationError {
    pub errors: Vec<FieldError>,
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl Ingress {
    /// Knative's SetDefaults, plus httpOption "" -> "Enabled" (Knative documents that default on the
    /// field but leaves setting it to Serving's route reconciler).
    pub fn set_defaults(&mut self) {
        let spec = &mut self.spec;
        if spec.http_option.is_empty() {
            spec.http_option = HTTP_OPTION_ENABLED.to_string();
        }
        for rule in &mut spec.rules {
            if rule.visibility.is_empty() {
                rule.visibility = VISIBILITY_EXTERNAL_IP.to_string();
            }
            let Some(http) = &mut rule.http else { continue };
            for path in &mut http.paths {
                // Knative: if only one split is specified, we default to 100.
                if let [only] = path.splits.as_mut_slice()
                    && only.percent == 0
                {
                    only.percent = 100;
                }
            }
        }
    }

    /// Knative's Validate, collecting every error. Call after [`Ingress::set_defaults`].
    pub fn validate(&self) -> Result<(), ValidationError> {
        let mut v = Validator {
            errors: Vec::new(),
            namespace: if self.metadata.namespace.is_empty() {
                DEFAULT_NAMESPACE
            } else {
                &self.metadata.namespace
            },
        };
        let spec = &self.spec;
        if spec.rules.is_empty() {
            v.missing("spec.rules".to_string());
        }
        for (i, rule) in spec.rules.iter().enumerate() {
            v.rule(&format!("spec.rules[{i}]"), rule);
        }
        // TLS settings are optional, but every one given must be valid.
        for (i, tls) in spec.tls.iter().enumerate() {
            v.tls(&format!("spec.tls[{i}]"), tls);
        }
        // Sluice: Knative leaves this unchecked; an unknown option would silently serve plain HTTP.
        if spec.http_option != HTTP_OPTION_ENABLED && spec.http_option != HTTP_OPTION_REDIRECTED {
            v.push(
                "spec.httpOption".to_string(),
                format!(
                    "invalid value: {:?}, want {HTTP_OPTION_ENABLED} or {HTTP_OPTION_REDIRECTED}",
                    spec.http_option
                ),
            );
        }
        if v.errors.is_empty() {
            Ok(())
        } else {
            Err(ValidationError { errors: v.errors })
        }
    }
}

struct Validator<'a> {
    errors: Vec<FieldError>,
    /// The Ingress's namespace: Knative requires every backend to live in it.
    namespace: &'a str,
}

impl Validator<'_> {
    fn push(&mut self, field: String, message: impl Into<String>) {
        self.errors.push(FieldError {
            field,
            message: message.into(),
        });
    }

    fn missing(&mut self, field: String) {
        self.push(field, MISSING);
    }

    fn rule(&mut self, at: &str, rule: &IngressRule) {
        if *rule == IngressRule::default() {
            return self.missing(at.to_string());
        }
        // Sluice: Knative allows a rule without hosts (a catch-all); Sluice needs them to build
        // virtual hosts, and Knative Serving always sets them.
        if rule.hosts.is_empty() {
            self.missing(format!("{at}.hosts"));
        }
        for (i, host) in rule.hosts.iter().enumerate() {
            if host.is_empty() {
                self.push(format!("{at}.hosts[{i}]"), "must not be empty");
            }
        }
        // Sluice: Knative does not check the value; an unknown visibility would match no gateway.
        if rule.visibility != VISIBILITY_EXTERNAL_IP && rule.visibility != VISIBILITY_CLUSTER_LOCAL
        {
            self.push(
                format!("{at}.visibility"),
                format!(
                    "invalid value: {:?}, want {VISIBILITY_EXTERNAL_IP} or {VISIBILITY_CLUSTER_LOCAL}",
                    rule.visibility
                ),
            );
        }
        let Some(http) = &rule.http else {
            return self.missing(format!("{at}.http"));
        };
        if http.paths.is_empty() {
            return self.missing(format!("{at}.http.paths"));
        }
        for (i, path) in http.paths.iter().enumerate() {
            self.path(&format!("{at}.http.paths[{i}]"), path);
        }
    }

    fn path(&mut self, at: &str, path: &HttpIngressPath) {
        if *path == HttpIngressPath::default() {
            return self.missing(at.to_string());
        }
        // Sluice: Knative documents "Paths must begin with a '/'" but does not check it.
        if !path.path.is_empty() && !path.path.starts_with('/') {
            self.push(format!("{at}.path"), "must start with '/'");
        }
        if path.splits.is_empty() {
            return self.missing(format!("{at}.splits"));
        }
        let before = self.errors.len();
        let mut total: i64 = 0;
        for (i, split) in path.splits.iter().enumerate() {
            self.split(&format!("{at}.splits[{i}]"), split);
            total += split.percent;
        }
        // Knative stops at the first invalid split, so a sum over invalid splits is not reported.
        if self.errors.len() > before {
            return;
        }
        // Knative: a single split may leave percent unset, meaning 100.
        if (path.splits.len() != 1 || total != 0) && total != 100 {
            self.push(
                format!("{at}.splits"),
                format!("percents sum to {total}, want 100"),
            );
        }
    }

    fn split(&mut self, at: &str, split: &IngressBackendSplit) {
        if *split == IngressBackendSplit::default() {
            return self.missing(at.to_string());
        }
        if !(0..=100).contains(&split.percent) {
            self.push(
                format!("{at}.percent"),
                format!("invalid value: {}, want 0 to 100", split.percent),
            );
        }
        let backend_empty = split.service_namespace.is_empty()
            && split.service_name.is_empty()
            && split.service_port == IntOrString::default();
        if backend_empty {
            // Knative reports an empty IngressBackend as the split itself missing.
            return self.missing(at.to_string());
        }
        if split.service_namespace.is_empty() {
            self.missing(format!("{at}.serviceNamespace"));
        } else if split.service_namespace != self.namespace {
            self.push(
                format!("{at}.serviceNamespace"),
                format!(
                    "service namespace must match ingress namespace: {:?} != {:?}",
                    split.service_namespace, self.namespace
                ),
            );
        }
        if split.service_name.is_empty() {
            self.missing(format!("{at}.serviceName"));
        }
        match &split.service_port {
            IntOrString::Int(0) => self.missing(format!("{at}.servicePort")),
            // Sluice: Knative accepts an empty named port and any number; neither can be routed.
            IntOrString::String(s) if s.is_empty() => self.missing(format!("{at}.servicePort")),
            IntOrString::Int(p) if !(1..=65535).contains(p) => self.push(
                format!("{at}.servicePort"),
                format!("invalid value: {p}, want 1 to 65535"),
            ),
            _ => {}
        }
    }

    fn tls(&mut self, at: &str, tls: &IngressTls) {
        if *tls == IngressTls::default() {
            return self.missing(at.to_string());
        }
        // Knative requires the secret but not hosts: no hosts means every host of the listener.
        if tls.secret_name.is_empty() {
            self.missing(format!("{at}.secretName"));
        }
        if tls.secret_namespace.is_empty() {
            self.missing(format!("{at}.secretNamespace"));
        }
        for (i, host) in tls.hosts.iter().enumerate() {
            if host.is_empty() {
                self.push(format!("{at}.hosts[{i}]"), "must not be empty");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingress::{HTTP_OPTION_REDIRECTED, HttpIngressRuleValue};

    fn split(name: &str, percent: i64) -> IngressBackendSplit {
        IngressBackendSplit {
            service_namespace: "ns".into(),
            service_name: name.into(),
            service_port: IntOrString::Int(80),
            percent,
            ..Default::default()
        }
    }

    fn path(splits: Vec<IngressBackendSplit>) -> HttpIngressPath {
        HttpIngressPath {
            splits,
            ..Default::default()
        }
    }

    fn rule(paths: Vec<HttpIngressPath>) -> IngressRule {
        IngressRule {
            hosts: vec!["web.example.com".into()],
            visibility: String::new(),
            http: Some(HttpIngressRuleValue { paths }),
        }
    }

    /// A minimal valid Ingress before defaulting.
    fn ingress() -> Ingress {
        let mut ing = Ingress::default();
        ing.metadata.name = "web".into();
        ing.metadata.namespace = "ns".into();
        ing.spec.rules = vec![rule(vec![path(vec![split("web-00001", 0)])])];
        ing
    }

    fn errors(ing: &Ingress) -> Vec<String> {
        match ing.validate() {
            Ok(()) => vec![],
            Err(e) => e.errors.iter().map(ToString::to_string).collect(),
        }
    }

    fn defaulted(mut ing: Ingress) -> Ingress {
        ing.set_defaults();
        ing
    }

    #[test]
    fn defaults_fill_http_option_visibility_and_single_split_percent() {
        let ing = defaulted(ingress());
        assert_eq!(ing.spec.http_option, "Enabled");
        assert_eq!(ing.spec.rules[0].visibility, "ExternalIP");
        let p = &ing.spec.rules[0].http.as_ref().unwrap().paths[0];
        assert_eq!(p.splits[0].percent, 100);
    }

    #[test]
    fn defaults_keep_values_that_are_set() {
        let mut ing = ingress();
        ing.spec.http_option = HTTP_OPTION_REDIRECTED.into();
        ing.spec.rules[0].visibility = "ClusterLocal".into();
        ing.spec.rules[0].http.as_mut().unwrap().paths =
            vec![path(vec![split("a", 0), split("b", 0)])];
        let ing = defaulted(ing);
        assert_eq!(ing.spec.http_option, "Redirected");
        assert_eq!(ing.spec.rules[0].visibility, "ClusterLocal");
        // Only a single split is defaulted to 100.
        let p = &ing.spec.rules[0].http.as_ref().unwrap().paths[0];
        assert_eq!((p.splits[0].percent, p.splits[1].percent), (0, 0));
    }

    #[test]
    fn defaulted_valid_ingress_passes() {
        assert_eq!(defaulted(ingress()).validate(), Ok(()));
    }

    #[test]
    fn spec_needs_rules() {
        let mut ing = ingress();
        ing.spec.rules.clear();
        assert_eq!(errors(&defaulted(ing)), ["spec.rules: missing field(s)"]);
    }

    #[test]
    fn empty_rule_is_missing() {
        let mut ing = ingress();
        ing.spec.rules.push(IngressRule::default());
        ing.spec.http_option = "Enabled".into();
        // Not defaulted, so the second rule stays entirely empty.
        ing.spec.rules[0].visibility = "ExternalIP".into();
        assert_eq!(errors(&ing), ["spec.rules[1]: missing field(s)"]);
    }

    #[test]
    fn rule_needs_hosts_without_empty_names() {
        let mut ing = ingress();
        ing.spec.rules[0].hosts.clear();
        assert_eq!(
            errors(&defaulted(ing)),
            ["spec.rules[0].hosts: missing field(s)"]
        );
        let mut ing = ingress();
        ing.spec.rules[0].hosts.push(String::new());
        assert_eq!(
            errors(&defaulted(ing)),
            ["spec.rules[0].hosts[1]: must not be empty"]
        );
    }

    #[test]
    fn rule_needs_http_and_paths() {
        let mut ing = ingress();
        ing.spec.rules[0].http = None;
        assert_eq!(
            errors(&defaulted(ing)),
            ["spec.rules[0].http: missing field(s)"]
        );
        let mut ing = ingress();
        ing.spec.rules[0].http.as_mut().unwrap().paths.clear();
        assert_eq!(
            errors(&defaulted(ing)),
            ["spec.rules[0].http.paths: missing field(s)"]
        );
    }

    #[test]
    fn path_needs_splits() {
        let mut ing = ingress();
        let paths = &mut ing.spec.rules[0].http.as_mut().unwrap().paths;
        paths.push(HttpIngressPath {
            path: "/api".into(),
            ..Default::default()
        });
        paths.push(HttpIngressPath::default());
        assert_eq!(
            errors(&defaulted(ing)),
            [
                "spec.rules[0].http.paths[1].splits: missing field(s)",
                "spec.rules[0].http.paths[2]: missing field(s)",
            ]
        );
    }

    #[test]
    fn path_must_start_with_slash() {
        let mut ing = ingress();
        ing.spec.rules[0].http.as_mut().unwrap().paths[0].path = "api".into();
        assert_eq!(
            errors(&defaulted(ing)),
            ["spec.rules[0].http.paths[0].path: must start with '/'"]
        );
    }

    #[test]
    fn split_needs_backend_fields() {
        let mut ing = ingress();
        ing.spec.rules[0].http.as_mut().unwrap().paths[0].splits = vec![IngressBackendSplit {
            percent: 100,
            ..Default::default()
        }];
        assert_eq!(
            errors(&defaulted(ing)),
            ["spec.rules[0].http.paths[0].splits[0]: missing field(s)"]
        );

        let mut ing = ingress();
        ing.spec.rules[0].http.as_mut().unwrap().paths[0].splits = vec![IngressBackendSplit {
            service_port: IntOrString::Int(80),
            ..Default::default()
        }];
        assert_eq!(
            errors(&defaulted(ing)),
            [
                "spec.rules[0].http.paths[0].splits[0].serviceNamespace: missing field(s)",
                "spec.rules[0].http.paths[0].splits[0].serviceName: missing field(s)",
            ]
        );

        let mut ing = ingress();
        ing.spec.rules[0].http.as_mut().unwrap().paths[0].splits[0].service_port =
            IntOrString::Int(0);
        assert_eq!(
            errors(&defaulted(ing)),
            ["spec.rules[0].http.paths[0].splits[0].servicePort: missing field(s)"]
        );

        let mut ing = ingress();
        ing.spec.rules[0].http.as_mut().unwrap().paths[0].splits[0].service_port =
            IntOrString::Int(70000);
        assert_eq!(
            errors(&defaulted(ing)),
            [
                "spec.rules[0].http.paths[0].splits[0].servicePort: invalid value: 70000, want 1 to 65535"
            ]
        );
    }

    #[test]
    fn named_service_port_is_valid() {
        let mut ing = ingress();
        ing.spec.rules[0].http.as_mut().unwrap().paths[0].splits[0].service_port =
            IntOrString::String("http".into());
        assert_eq!(defaulted(ing).validate(), Ok(()));
    }

    #[test]
    fn service_namespace_must_match_ingress_namespace() {
        let mut ing = ingress();
        ing.spec.rules[0].http.as_mut().unwrap().paths[0].splits[0].service_namespace =
            "other".into();
        assert_eq!(
            errors(&defaulted(ing)),
            ["spec.rules[0].http.paths[0].splits[0].serviceNamespace: \
              service namespace must match ingress namespace: \"other\" != \"ns\""]
        );
    }

    #[test]
    fn percent_must_be_0_to_100() {
        let mut ing = ingress();
        ing.spec.rules[0].http.as_mut().unwrap().paths[0].splits =
            vec![split("a", 150), split("b", -50)];
        assert_eq!(
            errors(&defaulted(ing)),
            [
                "spec.rules[0].http.paths[0].splits[0].percent: invalid value: 150, want 0 to 100",
                "spec.rules[0].http.paths[0].splits[1].percent: invalid value: -50, want 0 to 100",
            ]
        );
    }

    #[test]
    fn split_percents_must_sum_to_100() {
        let mut ing = ingress();
        let paths = &mut ing.spec.rules[0].http.as_mut().unwrap().paths;
        paths.push(path(vec![split("a", 60), split("b", 30)]));
        assert_eq!(
            errors(&defaulted(ing)),
            ["spec.rules[0].http.paths[1].splits: percents sum to 90, want 100"]
        );

        // Two splits with no percents do not get defaulted and sum to 0.
        let mut ing = ingress();
        ing.spec.rules[0].http.as_mut().unwrap().paths[0].splits =
            vec![split("a", 0), split("b", 0)];
        assert_eq!(
            errors(&defaulted(ing)),
            ["spec.rules[0].http.paths[0].splits: percents sum to 0, want 100"]
        );

        let mut ing = ingress();
        ing.spec.rules[0].http.as_mut().unwrap().paths[0].splits =
            vec![split("a", 70), split("b", 30)];
        assert_eq!(defaulted(ing).validate(), Ok(()));
    }

    #[test]
    fn single_split_without_percent_is_valid_even_undefaulted() {
        let mut ing = ingress();
        ing.spec.http_option = "Enabled".into();
        ing.spec.rules[0].visibility = "ExternalIP".into();
        assert_eq!(ing.validate(), Ok(()));
    }

    #[test]
    fn visibility_and_http_option_must_be_known() {
        let mut ing = defaulted(ingress());
        ing.spec.rules[0].visibility = "Public".into();
        ing.spec.http_option = "Disabled".into();
        assert_eq!(
            errors(&ing),
            [
                "spec.rules[0].visibility: invalid value: \"Public\", want ExternalIP or ClusterLocal",
                "spec.httpOption: invalid value: \"Disabled\", want Enabled or Redirected",
            ]
        );
    }

    #[test]
    fn tls_needs_secret_name_and_namespace() {
        let mut ing = ingress();
        ing.spec.tls = vec![
            IngressTls {
                hosts: vec!["web.example.com".into()],
                ..Default::default()
            },
            IngressTls::default(),
            IngressTls {
                hosts: vec![],
                secret_name: "cert".into(),
                secret_namespace: "ns".into(),
            },
        ];
        assert_eq!(
            errors(&defaulted(ing)),
            [
                "spec.tls[0].secretName: missing field(s)",
                "spec.tls[0].secretNamespace: missing field(s)",
                "spec.tls[1]: missing field(s)",
            ]
        );
    }

    #[test]
    fn all_errors_are_collected_and_joined() {
        let mut ing = ingress();
        ing.spec.rules[0].hosts.clear();
        ing.spec.rules[0].http.as_mut().unwrap().paths[0].splits[0].service_name = String::new();
        let err = defaulted(ing).validate().unwrap_err();
        assert_eq!(
            err.to_string(),
            "spec.rules[0].hosts: missing field(s); \
             spec.rules[0].http.paths[0].splits[0].serviceName: missing field(s)"
        );
    }

    #[test]
    fn empty_namespace_means_default() {
        let mut ing = ingress();
        ing.metadata.namespace = String::new();
        ing.spec.rules[0].http.as_mut().unwrap().paths[0].splits[0].service_namespace =
            "default".into();
        assert_eq!(defaulted(ing).validate(), Ok(()));
    }
}
