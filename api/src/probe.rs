//! Knative's Ingress probe hash (knative.dev/networking pkg/ingress/ingress.go `ComputeHash` and
//! `InsertProbe`), byte-compatible with the Go code.
//!
//! The hash is sha256 over Go's `json.Marshal(ing.Spec)` followed by the namespace and the name. The
//! prober sends `K-Network-Probe: probe` with `K-Network-Hash: override`; a gateway that already serves
//! this version of the Ingress answers with `K-Network-Hash: <hash>`, which tells the prober the new
//! config is live.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use crate::ingress::{
    HeaderMatch, HttpIngressPath, HttpIngressRuleValue, Ingress, IngressBackendSplit, IngressRule,
    IngressSpec, IngressTls, IntOrString,
};

/// Knative: requests carrying this header probe the networking layer and never reach the user.
pub const PROBE_HEADER: &str = "K-Network-Probe";
/// Knative: the value of [`PROBE_HEADER`].
pub const PROBE_VALUE: &str = "probe";
/// Knative: the header carrying the Ingress hash (header.HashKey).
pub const HASH_HEADER: &str = "K-Network-Hash";
/// Knative: the [`HASH_HEADER`] value a prober sends to select the probe routes (header.HashValueOverride).
pub const HASH_VALUE_OVERRIDE: &str = "override";
/// Knative Serving: the header that selects a tagged route (header.RouteTagKey).
pub const TAG_HEADER: &str = "Knative-Serving-Tag";

/// Lowercase hex sha256 of Go's `json.Marshal(spec)` ++ namespace ++ name, as Knative's ComputeHash.
///
/// The namespace is used as stored, not defaulted, because Go uses `ing.GetNamespace()`.
pub fn compute_hash(ingress: &Ingress) -> String {
    let mut bytes = marshal_spec(&ingress.spec).into_bytes();
    bytes.extend_from_slice(ingress.metadata.namespace.as_bytes());
    bytes.extend_from_slice(ingress.metadata.name.as_bytes());
    hex::encode(Sha256::digest(&bytes))
}

/// Knative's InsertProbe: computes the hash of the Ingress as given, then, in every rule, puts before
/// the existing paths a copy of each one that also matches `K-Network-Hash: override` and sets
/// `K-Network-Hash: <hash>` in its appendHeaders. The original paths are left as they were, so normal
/// traffic is routed unchanged and only probes hit the copies. Returns the hash.
///
/// Go returns an error for a rule without `http`; here such a rule is skipped (validation already
/// rejects it).
pub fn insert_probe(ingress: &mut Ingress) -> String {
    let hash = compute_hash(ingress);
    for rule in &mut ingress.spec.rules {
        let Some(http) = &mut rule.http else { continue };
        let mut paths: Vec<HttpIngressPath> = http
            .paths
            .iter()
            .map(|p| {
                let mut probe = p.clone();
                probe.headers.insert(
                    HASH_HEADER.to_string(),
                    HeaderMatch {
                        exact: HASH_VALUE_OVERRIDE.to_string(),
                    },
                );
                probe
                    .append_headers
                    .insert(HASH_HEADER.to_string(), hash.clone());
                probe
            })
            .collect();
        paths.append(&mut http.paths);
        http.paths = paths;
    }
    hash
}

/// Go's `json.Marshal(ingress.Spec)` for Knative's IngressSpec.
///
/// Written by hand over the typed structs rather than through serde_json: Go emits struct fields in
/// declaration order, applies `omitempty` only where the Go tags say so (`paths` and `splits` are
/// `null` when nil; serviceNamespace/serviceName/servicePort and `exact` are always present), and
/// escapes `<`, `>`, `&`, U+2028 and U+2029. serde_json's Value would reorder fields and escapes
/// differently. An empty Vec here stands for Go's nil slice.
pub fn marshal_spec(spec: &IngressSpec) -> String {
    let mut out = String::with_capacity(256);
    let mut o = Obj::open(&mut out);
    if !spec.tls.is_empty() {
        o.key("tls");
        array(o.out, &spec.tls, tls);
    }
    if !spec.rules.is_empty() {
        o.key("rules");
        array(o.out, &spec.rules, rule);
    }
    if !spec.http_option.is_empty() {
        o.key("httpOption");
        string(o.out, &spec.http_option);
    }
    o.close();
    out
}

// Go: IngressTLS{Hosts omitempty, SecretName omitempty, SecretNamespace omitempty}; the deprecated
// serverCertificate/privateKey fields are omitempty and always empty.
fn tls(out: &mut String, t: &IngressTls) {
    let mut o = Obj::open(out);
    if !t.hosts.is_empty() {
        o.key("hosts");
        array(o.out, &t.hosts, |out, h| string(out, h));
    }
    o.opt_string("secretName", &t.secret_name);
    o.opt_string("secretNamespace", &t.secret_namespace);
    o.close();
}

// Go: IngressRule{Hosts omitempty, Visibility omitempty, HTTP *HTTPIngressRuleValue omitempty}.
fn rule(out: &mut String, r: &IngressRule) {
    let mut o = Obj::open(out);
    if !r.hosts.is_empty() {
        o.key("hosts");
        array(o.out, &r.hosts, |out, h| string(out, h));
    }
    o.opt_string("visibility", &r.visibility);
    if let Some(http) = &r.http {
        o.key("http");
        http_rule(o.out, http);
    }
    o.close();
}

// Go: HTTPIngressRuleValue{Paths `json:"paths"`}: no omitempty, a nil slice is `null`.
fn http_rule(out: &mut String, h: &HttpIngressRuleValue) {
    let mut o = Obj::open(out);
    o.key("paths");
    nullable_array(o.out, &h.paths, path);
    o.close();
}

// Go: HTTPIngressPath{Path, RewriteHost, Headers omitempty; Splits `json:"splits"`; AppendHeaders
// omitempty; Timeout and Retries are omitempty pointers that Sluice never sets}.
fn path(out: &mut String, p: &HttpIngressPath) {
    let mut o = Obj::open(out);
    o.opt_string("path", &p.path);
    o.opt_string("rewriteHost", &p.rewrite_host);
    if !p.headers.is_empty() {
        o.key("headers");
        map(o.out, &p.headers, |out, m| {
            // Go: HeaderMatch{Exact `json:"exact"`}, no omitempty.
            let mut o = Obj::open(out);
            o.key("exact");
            string(o.out, &m.exact);
            o.close();
        });
    }
    o.key("splits");
    nullable_array(o.out, &p.splits, split);
    if !p.append_headers.is_empty() {
        o.key("appendHeaders");
        map(o.out, &p.append_headers, |out, v| string(out, v));
    }
    o.close();
}

// Go: IngressBackendSplit{IngressBackend inline (serviceNamespace, serviceName, servicePort, none
// omitempty), Percent omitempty, AppendHeaders omitempty}.
fn split(out: &mut String, s: &IngressBackendSplit) {
    let mut o = Obj::open(out);
    o.key("serviceNamespace");
    string(o.out, &s.service_namespace);
    o.key("serviceName");
    string(o.out, &s.service_name);
    o.key("servicePort");
    match &s.service_port {
        IntOrString::Int(i) => o.out.push_str(&i.to_string()),
        IntOrString::String(v) => string(o.out, v),
    }
    if s.percent != 0 {
        o.key("percent");
        o.out.push_str(&s.percent.to_string());
    }
    if !s.append_headers.is_empty() {
        o.key("appendHeaders");
        map(o.out, &s.append_headers, |out, v| string(out, v));
    }
    o.close();
}

/// A JSON object being written: tracks whether a comma is needed.
struct Obj<'a> {
    out: &'a mut String,
    first: bool,
}

impl<'a> Obj<'a> {
    fn open(out: &'a mut String) -> Self {
        out.push('{');
        Obj { out, first: true }
    }

    fn key(&mut self, k: &str) {
        if !self.first {
            self.out.push(',');
        }
        self.first = false;
        string(self.out, k);
        self.out.push(':');
    }

    /// A Go string field tagged omitempty.
    fn opt_string(&mut self, k: &str, v: &str) {
        if !v.is_empty() {
            self.key(k);
            string(self.out, v);
        }
    }

    fn close(self) {
        self.out.push('}');
    }
}

fn array<T>(out: &mut String, items: &[T], mut f: impl FnMut(&mut String, &T)) {
    out.push('[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        f(out, item);
    }
    out.push(']');
}

/// A Go slice without omitempty: nil (our empty Vec) marshals as `null`.
fn nullable_array<T>(out: &mut String, items: &[T], f: impl FnMut(&mut String, &T)) {
    if items.is_empty() {
        out.push_str("null");
    } else {
        array(out, items, f);
    }
}

/// Go sorts map keys by byte order, which is BTreeMap's order for String keys.
fn map<V>(out: &mut String, m: &BTreeMap<String, V>, mut f: impl FnMut(&mut String, &V)) {
    let mut o = Obj::open(out);
    for (k, v) in m {
        o.key(k);
        f(o.out, v);
    }
    o.close();
}

/// Go's encoding/json string escaping with HTML escaping on (what json.Marshal does), as of Go 1.22:
/// `"` and `\` backslashed; \b \f \n \r \t by name; other control characters, `<`, `>` and `&` as
/// \u00xx with lowercase hex; U+2028 and U+2029 as \u2028 and \u2029; DEL and all other characters
/// as they are.
fn string(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{2028}' => out.push_str("\\u2028"),
            '\u{2029}' => out.push_str("\\u2029"),
            c if (c as u32) < 0x20 || c == '<' || c == '>' || c == '&' => {
                let b = c as u8;
                out.push_str("\\u00");
                out.push(HEX[(b >> 4) as usize] as char);
                out.push(HEX[(b & 0xf) as usize] as char);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_split_ingress(split: IngressBackendSplit) -> Ingress {
        let mut ing = Ingress::default();
        ing.spec.rules = vec![IngressRule {
            hosts: vec!["example.com".into()],
            visibility: String::new(),
            http: Some(HttpIngressRuleValue {
                paths: vec![HttpIngressPath {
                    splits: vec![split],
                    ..Default::default()
                }],
            }),
        }];
        ing
    }

    fn sha256_hex(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }

    // Golden values from Knative's own test (knative.dev/networking pkg/ingress/ingress_test.go,
    // TestInsertProbe), computed by Go.
    #[test]
    fn matches_knative_golden_hash_without_append_headers() {
        let ing = one_split_ingress(IngressBackendSplit {
            service_name: "blah".into(),
            ..Default::default()
        });
        assert_eq!(
            marshal_spec(&ing.spec),
            r#"{"rules":[{"hosts":["example.com"],"http":{"paths":[{"splits":[{"serviceNamespace":"","serviceName":"blah","servicePort":0}]}]}}]}"#
        );
        assert_eq!(
            compute_hash(&ing),
            "a25000a350642c8abef53078b329bd043e18758f6063c1172d53b04e14fcf5c1"
        );
    }

    #[test]
    fn matches_knative_golden_hash_with_append_headers() {
        let mut ing = one_split_ingress(IngressBackendSplit {
            service_name: "blah".into(),
            append_headers: [("Foo".to_string(), "bar".to_string())].into(),
            ..Default::default()
        });
        assert_eq!(
            insert_probe(&mut ing),
            "6b652c7abed871354affd4a9cb699d33816f24541fac942149b91ad872fe63ca"
        );
    }

    #[test]
    fn small_defaulted_spec_marshals_like_go() {
        let mut ing = one_split_ingress(IngressBackendSplit {
            service_namespace: "ns".into(),
            service_name: "s".into(),
            service_port: IntOrString::Int(80),
            ..Default::default()
        });
        ing.spec.rules[0].hosts = vec!["a.example.com".into()];
        ing.metadata.namespace = "ns".into();
        ing.metadata.name = "web".into();
        ing.set_defaults();
        let json = marshal_spec(&ing.spec);
        assert_eq!(
            json,
            r#"{"rules":[{"hosts":["a.example.com"],"visibility":"ExternalIP","http":{"paths":[{"splits":[{"serviceNamespace":"ns","serviceName":"s","servicePort":80,"percent":100}]}]}}],"httpOption":"Enabled"}"#
        );
        assert_eq!(
            compute_hash(&ing),
            sha256_hex(format!("{json}nsweb").as_bytes())
        );
    }

    #[test]
    fn every_field_in_go_declaration_order() {
        let mut spec = IngressSpec {
            tls: vec![IngressTls {
                hosts: vec!["a.example.com".into()],
                secret_name: "cert".into(),
                secret_namespace: "ns".into(),
            }],
            http_option: "Redirected".into(),
            ..Default::default()
        };
        spec.rules = vec![IngressRule {
            hosts: vec!["a.example.com".into(), "b.example.com".into()],
            visibility: "ClusterLocal".into(),
            http: Some(HttpIngressRuleValue {
                paths: vec![HttpIngressPath {
                    path: "/api".into(),
                    rewrite_host: "internal.example.com".into(),
                    headers: [(
                        "Knative-Serving-Tag".to_string(),
                        HeaderMatch { exact: "v2".into() },
                    )]
                    .into(),
                    splits: vec![IngressBackendSplit {
                        service_namespace: "ns".into(),
                        service_name: "s".into(),
                        service_port: IntOrString::String("http".into()),
                        percent: 30,
                        append_headers: [("X-A".to_string(), "1".to_string())].into(),
                    }],
                    append_headers: [("X-B".to_string(), "2".to_string())].into(),
                }],
            }),
        }];
        assert_eq!(
            marshal_spec(&spec),
            concat!(
                r#"{"tls":[{"hosts":["a.example.com"],"secretName":"cert","secretNamespace":"ns"}],"#,
                r#""rules":[{"hosts":["a.example.com","b.example.com"],"visibility":"ClusterLocal","#,
                r#""http":{"paths":[{"path":"/api","rewriteHost":"internal.example.com","#,
                r#""headers":{"Knative-Serving-Tag":{"exact":"v2"}},"#,
                r#""splits":[{"serviceNamespace":"ns","serviceName":"s","servicePort":"http","percent":30,"appendHeaders":{"X-A":"1"}}],"#,
                r#""appendHeaders":{"X-B":"2"}}]}}],"httpOption":"Redirected"}"#
            )
        );
    }

    #[test]
    fn nil_slices_marshal_as_null_and_empty_spec_as_empty_object() {
        assert_eq!(marshal_spec(&IngressSpec::default()), "{}");
        let spec = IngressSpec {
            rules: vec![
                IngressRule {
                    http: Some(HttpIngressRuleValue { paths: vec![] }),
                    ..Default::default()
                },
                IngressRule {
                    http: Some(HttpIngressRuleValue {
                        paths: vec![HttpIngressPath::default()],
                    }),
                    ..Default::default()
                },
                IngressRule::default(),
            ],
            ..Default::default()
        };
        assert_eq!(
            marshal_spec(&spec),
            r#"{"rules":[{"http":{"paths":null}},{"http":{"paths":[{"splits":null}]}},{}]}"#
        );
    }

    #[test]
    fn empty_header_match_keeps_exact() {
        let spec = IngressSpec {
            rules: vec![IngressRule {
                http: Some(HttpIngressRuleValue {
                    paths: vec![HttpIngressPath {
                        headers: [("h".to_string(), HeaderMatch::default())].into(),
                        ..Default::default()
                    }],
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(
            marshal_spec(&spec),
            r#"{"rules":[{"http":{"paths":[{"headers":{"h":{"exact":""}},"splits":null}]}}]}"#
        );
    }

    #[test]
    fn strings_are_escaped_like_go_with_html_escaping() {
        let mut out = String::new();
        string(
            &mut out,
            "a<b>&\"q\"\\\n\r\t\u{8}\u{c}\u{1}\u{1f}\u{7f}é\u{2028}\u{2029}😀",
        );
        assert_eq!(
            out,
            "\"a\\u003cb\\u003e\\u0026\\\"q\\\"\\\\\\n\\r\\t\\b\\f\\u0001\\u001f\u{7f}é\\u2028\\u2029😀\""
        );
    }

    #[test]
    fn map_keys_are_sorted_bytewise() {
        let mut out = String::new();
        let m: BTreeMap<String, String> =
            [("b", "1"), ("B", "2"), ("a", "3"), ("é", "4"), ("_", "5")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        map(&mut out, &m, |out, v| string(out, v));
        assert_eq!(out, r#"{"B":"2","_":"5","a":"3","b":"1","é":"4"}"#);
    }

    #[test]
    fn hash_covers_namespace_and_name() {
        let mut a = one_split_ingress(IngressBackendSplit::default());
        a.metadata.namespace = "ns".into();
        a.metadata.name = "x".into();
        let mut b = a.clone();
        b.metadata.name = "y".into();
        assert_ne!(compute_hash(&a), compute_hash(&b));
        let json = marshal_spec(&a.spec);
        assert_eq!(
            compute_hash(&a),
            sha256_hex(format!("{json}nsx").as_bytes())
        );
    }

    #[test]
    fn insert_probe_prepends_probe_copies_of_every_path() {
        let mut ing = one_split_ingress(IngressBackendSplit {
            service_namespace: "ns".into(),
            service_name: "s".into(),
            service_port: IntOrString::Int(80),
            percent: 100,
            ..Default::default()
        });
        {
            let paths = &mut ing.spec.rules[0].http.as_mut().unwrap().paths;
            paths[0]
                .headers
                .insert(TAG_HEADER.to_string(), HeaderMatch { exact: "v1".into() });
            paths.push(HttpIngressPath {
                path: "/b".into(),
                ..paths[0].clone()
            });
        }
        ing.spec.rules.push(IngressRule {
            hosts: vec!["no-http.example.com".into()],
            ..Default::default()
        });
        let original = ing.clone();
        let hash = insert_probe(&mut ing);
        // The hash is of the Ingress before the probe paths were added.
        assert_eq!(hash, compute_hash(&original));
        assert_ne!(hash, compute_hash(&ing));

        let before = &original.spec.rules[0].http.as_ref().unwrap().paths;
        let after = &ing.spec.rules[0].http.as_ref().unwrap().paths;
        assert_eq!(after.len(), 4);
        // Originals follow, untouched, so normal traffic is routed as before.
        assert_eq!(&after[2..], &before[..]);
        for (probe, orig) in after[..2].iter().zip(before) {
            assert_eq!(probe.path, orig.path);
            assert_eq!(probe.splits, orig.splits);
            assert_eq!(probe.headers.len(), orig.headers.len() + 1);
            assert_eq!(probe.headers[HASH_HEADER].exact, HASH_VALUE_OVERRIDE);
            assert_eq!(probe.headers[TAG_HEADER].exact, "v1");
            assert_eq!(probe.append_headers[HASH_HEADER], hash);
        }
        // A rule without http is left alone (Go would return an error).
        assert_eq!(ing.spec.rules[1], original.spec.rules[1]);
    }
}
