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

/// Reads the headers [`classify`] decides on through `get` (lowercase names; the hash only for
/// `K-Network-Probe: probe`) and classifies the request. Both filter builds read headers this way.
pub fn classify_from(mut get: impl FnMut(&str) -> Option<String>) -> Kind {
    let probe = get(PROBE_HEADER);
    let hash = match probe.as_deref() {
        Some("probe") => get(HASH_HEADER),
        _ => None,
    };
    let user_agent = get("user-agent");
    let kubelet = get(KUBELET_PROBE_HEADER);
    let proxy = get(PROXY_HEADER);
    classify(Headers {
        network_probe: probe.as_deref(),
        network_hash: hash.as_deref(),
        user_agent: user_agent.as_deref(),
        kubelet_probe: kubelet.as_deref(),
        proxy_request: proxy.as_deref(),
    })
}

/// What the filter does with a request, from its kind and the instance's readiness.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Answer it here (a probe): status, the `K-Network-Hash` to echo if any, body (text/plain).
    Reply {
        status: u32,
        hash: Option<String>,
        body: String,
    },
    /// Proxy it without counting it or holding it in the breaker (a kubelet probe).
    Forward,
    /// A user request: counted, and through the breaker.
    Admit { proxied: bool },
}

pub fn answer(kind: Kind, ready: bool) -> Answer {
    let reply = |status, hash, body: &str| Answer::Reply {
        status,
        hash,
        body: body.to_string(),
    };
    match kind {
        Kind::QueueProbe if ready => reply(200, None, "queue"),
        Kind::QueueProbe => reply(503, None, "queue not ready\n"),
        Kind::HashProbe { hash: Some(hash) } => reply(200, Some(hash), ""),
        Kind::HashProbe { hash: None } => reply(400, None, MISSING_HASH_BODY),
        Kind::UnknownProbe { value } => reply(400, None, &unknown_probe_body(&value)),
        Kind::KubeletProbe => Answer::Forward,
        Kind::Request { proxied } => Answer::Admit { proxied },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_are_answered_here_and_requests_admitted() {
        let headers = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        let queue = classify_from(headers(&[("k-network-probe", "queue")]));
        assert_eq!(
            answer(queue.clone(), true),
            Answer::Reply {
                status: 200,
                hash: None,
                body: "queue".into()
            }
        );
        assert!(matches!(
            answer(queue, false),
            Answer::Reply { status: 503, .. }
        ));
        let hash = classify_from(headers(&[
            ("k-network-probe", "probe"),
            ("k-network-hash", "h1"),
        ]));
        assert_eq!(
            answer(hash, true),
            Answer::Reply {
                status: 200,
                hash: Some("h1".into()),
                body: String::new()
            }
        );
        // The hash is only read for `probe`.
        let other = classify_from(headers(&[
            ("k-network-probe", "what"),
            ("k-network-hash", "h1"),
        ]));
        assert!(matches!(
            answer(other, true),
            Answer::Reply {
                status: 400,
                hash: None,
                ..
            }
        ));
        let kubelet = classify_from(headers(&[("user-agent", "kube-probe/1.30")]));
        assert_eq!(answer(kubelet, true), Answer::Forward);
        let proxied = classify_from(headers(&[("k-proxy-request", "activator")]));
        assert_eq!(answer(proxied, false), Answer::Admit { proxied: true });
    }

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
