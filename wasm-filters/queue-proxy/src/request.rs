//! What kind of request arrived, from its headers, as Knative's queue-proxy tells them apart. Pure.

/// `K-Network-Probe`: Knative's probe header.
pub const PROBE_HEADER: &str = "k-network-probe";
/// `K-Network-Hash`: the hash a `K-Network-Probe: probe` carries and expects back.
pub const HASH_HEADER: &str = "k-network-hash";
/// `K-Proxy-Request`: set to "activator" by the activator on the requests it forwards.
pub const PROXY_HEADER: &str = "k-proxy-request";
/// `K-Kubelet-Probe`: Knative's marker for kubelet probes that went through a proxy.
pub const KUBELET_PROBE_HEADER: &str = "k-kubelet-probe";

/// The headers the filter decides on (names lowercase, as Envoy gives them).
#[derive(Debug, Clone, Copy, Default)]
pub struct Headers<'a> {
    pub network_probe: Option<&'a str>,
    pub network_hash: Option<&'a str>,
    pub user_agent: Option<&'a str>,
    pub kubelet_probe: Option<&'a str>,
    pub proxy_request: Option<&'a str>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// `K-Network-Probe: queue`: answered by the filter, 200 "queue" when the instance is ready.
    QueueProbe,
    /// `K-Network-Probe: probe`: answered by the filter, echoing the hash (400 without one).
    HashProbe { hash: Option<String> },
    /// Another `K-Network-Probe` value: 400, as Knative answers.
    UnknownProbe { value: String },
    /// A kubelet probe: proxied to the instance, but neither counted nor held by the breaker.
    KubeletProbe,
    /// A user request: counted, and subject to the breaker.
    Request { proxied: bool },
}

pub fn classify(h: Headers<'_>) -> Kind {
    match h.network_probe.filter(|v| !v.is_empty()) {
        Some("queue") => return Kind::QueueProbe,
        Some("probe") => {
            return Kind::HashProbe {
                hash: h.network_hash.filter(|v| !v.is_empty()).map(str::to_string),
            };
        }
        Some(other) => {
            return Kind::UnknownProbe {
                value: other.to_string(),
            };
        }
        None => {}
    }
    // Knative's IsKubeletProbe.
    if h.user_agent.is_some_and(|ua| ua.starts_with("kube-probe/"))
        || h.kubelet_probe.is_some_and(|v| !v.is_empty())
    {
        return Kind::KubeletProbe;
    }
    Kind::Request {
        proxied: h.proxy_request == Some("activator"),
    }
}

/// The body of Knative's 400 answer to a probe header it does not know.
pub fn unknown_probe_body(value: &str) -> String {
    format!("unexpected probe header value: {value:?}\n")
}

/// The body of Knative's 400 answer to `K-Network-Probe: probe` without a hash.
pub const MISSING_HASH_BODY: &str =
    "a probe request must contain a non-empty \"K-Network-Hash\" header\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_told_apart_as_knative_does() {
        let cases: Vec<(Headers<'_>, Kind)> = vec![
            (Headers::default(), Kind::Request { proxied: false }),
            (
                Headers {
                    proxy_request: Some("activator"),
                    ..Headers::default()
                },
                Kind::Request { proxied: true },
            ),
            (
                Headers {
                    proxy_request: Some("someone-else"),
                    ..Headers::default()
                },
                Kind::Request { proxied: false },
            ),
            (
                Headers {
                    network_probe: Some("queue"),
                    ..Headers::default()
                },
                Kind::QueueProbe,
            ),
            (
                Headers {
                    network_probe: Some("probe"),
                    network_hash: Some("abc"),
                    ..Headers::default()
                },
                Kind::HashProbe {
                    hash: Some("abc".into()),
                },
            ),
            (
                Headers {
                    network_probe: Some("probe"),
                    network_hash: Some(""),
                    ..Headers::default()
                },
                Kind::HashProbe { hash: None },
            ),
            (
                Headers {
                    network_probe: Some("activator"),
                    ..Headers::default()
                },
                Kind::UnknownProbe {
                    value: "activator".into(),
                },
            ),
            (
                Headers {
                    network_probe: Some(""),
                    ..Headers::default()
                },
                Kind::Request { proxied: false },
            ),
            (
                Headers {
                    user_agent: Some("kube-probe/1.30"),
                    ..Headers::default()
                },
                Kind::KubeletProbe,
            ),
            (
                Headers {
                    user_agent: Some("curl/8 kube-probe/1.30"),
                    ..Headers::default()
                },
                Kind::Request { proxied: false },
            ),
            (
                Headers {
                    kubelet_probe: Some("queue"),
                    ..Headers::default()
                },
                Kind::KubeletProbe,
            ),
        ];
        for (headers, want) in cases {
            assert_eq!(classify(headers), want, "{headers:?}");
        }
    }

    #[test]
    fn unknown_probe_body_quotes_the_value() {
        assert_eq!(
            unknown_probe_body("x"),
            "unexpected probe header value: \"x\"\n"
        );
    }
}
