//! Reading multi-document YAML files into typed Knative and Kubernetes objects.
//!
//! Each document is dispatched on its apiVersion and kind. Errors name the document, the line in the
//! whole file and the field path, so a user can fix the file without guessing.

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_yaml::Value;

use crate::core::{ConfigMap, EndpointSlice, Endpoints, Secret, Service};
use crate::eventing::{self, Broker, PingSource, RabbitmqBrokerConfig, Trigger};
use crate::ingress::{self, Ingress};
use crate::meta::ObjectMeta;
use crate::serving::{self, Configuration, Revision, Route};

/// Kubernetes: an object without a namespace lives in "default".
pub const DEFAULT_NAMESPACE: &str = "default";

/// One object read from a YAML document.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    Ingress(Ingress),
    Service(Service),
    Endpoints(Endpoints),
    EndpointSlice(EndpointSlice),
    Secret(Secret),
    ConfigMap(ConfigMap),
    /// serving.knative.dev/v1 Service (named apart from core/v1 Service).
    KnativeService(serving::Service),
    Configuration(Configuration),
    Revision(Revision),
    Route(Route),
    Broker(Broker),
    Trigger(Trigger),
    PingSource(PingSource),
    RabbitmqBrokerConfig(RabbitmqBrokerConfig),
    /// A kind Sluice does not read; kept so callers can say what they skipped.
    Other {
        api_version: String,
        kind: String,
        name: String,
    },
}

impl Object {
    /// The object's kind as written in YAML (`KnativeService` is "Service" of serving.knative.dev), or
    /// None for a kind Sluice does not read.
    pub fn kind(&self) -> Option<&'static str> {
        Some(match self {
            Object::Ingress(_) => "Ingress",
            Object::Service(_) => "Service",
            Object::Endpoints(_) => "Endpoints",
            Object::EndpointSlice(_) => "EndpointSlice",
            Object::Secret(_) => "Secret",
            Object::ConfigMap(_) => "ConfigMap",
            Object::KnativeService(_) => "Service.serving.knative.dev",
            Object::Configuration(_) => "Configuration",
            Object::Revision(_) => "Revision",
            Object::Route(_) => "Route",
            Object::Broker(_) => "Broker",
            Object::Trigger(_) => "Trigger",
            Object::PingSource(_) => "PingSource",
            Object::RabbitmqBrokerConfig(_) => "RabbitmqBrokerConfig",
            Object::Other { .. } => return None,
        })
    }

    /// The object's metadata, for the kinds Sluice reads.
    pub fn metadata(&self) -> Option<&ObjectMeta> {
        match self {
            Object::Ingress(o) => Some(&o.metadata),
            Object::Service(o) => Some(&o.metadata),
            Object::Endpoints(o) => Some(&o.metadata),
            Object::EndpointSlice(o) => Some(&o.metadata),
            Object::Secret(o) => Some(&o.metadata),
            Object::ConfigMap(o) => Some(&o.metadata),
            Object::KnativeService(o) => Some(&o.metadata),
            Object::Configuration(o) => Some(&o.metadata),
            Object::Revision(o) => Some(&o.metadata),
            Object::Route(o) => Some(&o.metadata),
            Object::Broker(o) => Some(&o.metadata),
            Object::Trigger(o) => Some(&o.metadata),
            Object::PingSource(o) => Some(&o.metadata),
            Object::RabbitmqBrokerConfig(o) => Some(&o.metadata),
            Object::Other { .. } => None,
        }
    }
}

/// Why one document could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.render())]
pub struct ParseError {
    /// 1-based index of the document in the file, counting empty documents.
    pub document: usize,
    /// 1-based line in the whole file, when the YAML parser knows it.
    pub line: Option<usize>,
    /// Field path such as `spec.rules[0].http.paths[1].splits[0].servicePort`.
    pub field: Option<String>,
    pub message: String,
}

impl ParseError {
    fn render(&self) -> String {
        let mut out = format!("document {}", self.document);
        if let Some(line) = self.line {
            out.push_str(&format!(", line {line}"));
        }
        out.push_str(": ");
        if let Some(field) = &self.field {
            out.push_str(field);
            out.push_str(": ");
        }
        out.push_str(&self.message);
        out
    }

    fn new(document: usize, field: Option<&str>, message: impl Into<String>) -> Self {
        ParseError {
            document,
            line: None,
            field: field.map(str::to_string),
            message: message.into(),
        }
    }
}

/// One document of a multi-document YAML text, read.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    /// 1-based index of the document in the file, counting empty documents.
    pub index: usize,
    /// 1-based line where the document's content starts (its first line that is not blank, a
    /// comment or a `---` alone), so that a report about a whole object can point at it.
    pub line: usize,
    pub object: Result<Object, ParseError>,
}

/// Reads every document of a multi-document YAML text.
///
/// Empty documents (only comments, or a bare `---`) produce no entry. A YAML syntax error ends the
/// list: libyaml cannot resume after one, so later documents are not read.
///
/// Lines are counted from the start of `text`, not of the document.
pub fn parse_documents(text: &str) -> Vec<Result<Object, ParseError>> {
    read_documents(text).into_iter().map(|d| d.object).collect()
}

/// [`parse_documents`], with each document's index and first line.
pub fn read_documents(text: &str) -> Vec<Document> {
    // serde_yaml (0.9, the last release) panics on some malformed input ("unexpected end of
    // mapping", found by the yaml_objects fuzz target: an alias at the end of a truncated file). A
    // user's half-saved file must be an error with its file name, never a crash of `sluice up`.
    std::panic::catch_unwind(|| read_documents_unguarded(text)).unwrap_or_else(|_| {
        vec![Document {
            index: 1,
            line: 1,
            object: Err(ParseError::new(
                1,
                None,
                "the YAML parser failed on this file (check anchors, aliases and indentation)",
            )),
        }]
    })
}

fn read_documents_unguarded(text: &str) -> Vec<Document> {
    let starts = document_start_lines(text);
    let line_of = |document: usize| starts.get(document - 1).copied().unwrap_or(1);
    // Two identical document streams in lockstep: the first is read as an untyped Value to find
    // apiVersion and kind, the second is deserialized straight into the typed struct so that errors
    // keep their line numbers (a Value has none). serde_yaml's deserializers are consumed by use.
    let untyped = serde_yaml::Deserializer::from_str(text);
    let mut typed = serde_yaml::Deserializer::from_str(text);
    let mut out: Vec<Document> = Vec::new();
    let mut last_yaml_error = None;
    for (index, doc) in untyped.enumerate() {
        let document = index + 1;
        let Some(typed_doc) = typed.next() else {
            break;
        };
        let value = match Value::deserialize(doc) {
            Ok(value) => value,
            Err(err) => {
                // After a syntax error libyaml cannot resume and reports the same error for every
                // later document, forever; other errors (a duplicate key) leave later documents
                // readable.
                let err = yaml_error(document, None, &err);
                let key = (err.line, err.message.clone());
                if last_yaml_error.as_ref() == Some(&key) {
                    break;
                }
                last_yaml_error = Some(key);
                out.push(Document {
                    index: document,
                    line: err.line.unwrap_or_else(|| line_of(document)),
                    object: Err(err),
                });
                continue;
            }
        };
        if value.is_null() {
            continue;
        }
        out.push(Document {
            index: document,
            line: line_of(document),
            object: parse_document(document, &value, typed_doc),
        });
    }
    out
}

/// The first content line of each document, in the order libyaml reads them. libyaml does not give
/// document positions, so they are found from the markers: a `---` at column 0 always starts a
/// document (block content at the top level is indented, so it cannot begin with `---`), and text
/// before the first marker is a document only when it holds more than comments.
fn document_start_lines(text: &str) -> Vec<usize> {
    let is_marker = |l: &str| {
        l.strip_prefix("---")
            .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r']))
    };
    let is_content = |l: &str| {
        let t = l.trim();
        !t.is_empty() && !t.starts_with('#')
    };
    // (marker line, first content line) of each document so far.
    let mut docs: Vec<(Option<usize>, Option<usize>)> = vec![(None, None)];
    for (i, l) in text.lines().enumerate() {
        let n = i + 1;
        if is_marker(l) {
            // Content on the marker line itself (`--- {a: 1}`) starts the document there.
            let inline = is_content(&l[3..]).then_some(n);
            docs.push((Some(n), inline));
        } else if is_content(l) {
            let last = docs.last_mut().expect("never empty");
            last.1.get_or_insert(n);
        }
    }
    docs.into_iter()
        .filter(|(marker, content)| marker.is_some() || content.is_some())
        .map(|(marker, content)| content.or(marker).unwrap_or(1))
        .collect()
}

fn parse_document(
    document: usize,
    value: &Value,
    typed: serde_yaml::Deserializer<'_>,
) -> Result<Object, ParseError> {
    if !value.is_mapping() {
        return Err(ParseError::new(
            document,
            None,
            "a Kubernetes object must be a mapping",
        ));
    }
    let api_version = string_field(document, value, "apiVersion")?;
    let kind = string_field(document, value, "kind")?;
    let object = match (api_version.as_str(), kind.as_str()) {
        (ingress::API_VERSION, ingress::KIND) => Object::Ingress(typed_object(document, typed)?),
        ("v1", "Service") => Object::Service(typed_object(document, typed)?),
        ("v1", "Endpoints") => Object::Endpoints(typed_object(document, typed)?),
        ("v1", "Secret") => Object::Secret(typed_object(document, typed)?),
        ("v1", "ConfigMap") => Object::ConfigMap(typed_object(document, typed)?),
        (serving::API_VERSION, "Service") => Object::KnativeService(typed_object(document, typed)?),
        (serving::API_VERSION, "Configuration") => {
            Object::Configuration(typed_object(document, typed)?)
        }
        (serving::API_VERSION, "Revision") => Object::Revision(typed_object(document, typed)?),
        (serving::API_VERSION, "Route") => Object::Route(typed_object(document, typed)?),
        (eventing::API_VERSION, "Broker") => Object::Broker(typed_object(document, typed)?),
        (eventing::API_VERSION, "Trigger") => Object::Trigger(typed_object(document, typed)?),
        (eventing::SOURCES_API_VERSION, "PingSource") => {
            Object::PingSource(typed_object(document, typed)?)
        }
        (eventing::RABBITMQ_API_VERSION, eventing::RABBITMQ_BROKER_CONFIG_KIND) => {
            Object::RabbitmqBrokerConfig(typed_object(document, typed)?)
        }
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            Object::EndpointSlice(typed_object(document, typed)?)
        }
        _ => {
            let name = value
                .get("metadata")
                .and_then(|m| m.get("name"))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            return Ok(Object::Other {
                api_version,
                kind,
                name,
            });
        }
    };
    finish_metadata(document, object)
}

fn string_field(document: usize, value: &Value, field: &str) -> Result<String, ParseError> {
    match value.get(field) {
        None | Some(Value::Null) => Err(ParseError::new(document, Some(field), "missing field")),
        Some(Value::String(s)) if s.is_empty() => {
            Err(ParseError::new(document, Some(field), "missing field"))
        }
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(ParseError::new(
            document,
            Some(field),
            format!("invalid type: {}, expected a string", describe(other)),
        )),
    }
}

fn describe(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Sequence(_) => "sequence",
        Value::Mapping(_) => "mapping",
        Value::Tagged(_) => "tagged value",
    }
}

fn typed_object<T: DeserializeOwned>(
    document: usize,
    typed: serde_yaml::Deserializer<'_>,
) -> Result<T, ParseError> {
    serde_path_to_error::deserialize(typed).map_err(|err| {
        let path = err.path().to_string();
        let field = (path != "." && !path.is_empty()).then_some(path);
        yaml_error(document, field, err.inner())
    })
}

/// Applies Kubernetes' metadata rules: a name is required, an empty namespace means "default".
fn finish_metadata(document: usize, mut object: Object) -> Result<Object, ParseError> {
    let meta = match &mut object {
        Object::Ingress(o) => &mut o.metadata,
        Object::Service(o) => &mut o.metadata,
        Object::Endpoints(o) => &mut o.metadata,
        Object::EndpointSlice(o) => &mut o.metadata,
        Object::Secret(o) => &mut o.metadata,
        Object::ConfigMap(o) => &mut o.metadata,
        Object::KnativeService(o) => &mut o.metadata,
        Object::Configuration(o) => &mut o.metadata,
        Object::Revision(o) => &mut o.metadata,
        Object::Route(o) => &mut o.metadata,
        Object::Broker(o) => &mut o.metadata,
        Object::Trigger(o) => &mut o.metadata,
        Object::PingSource(o) => &mut o.metadata,
        Object::RabbitmqBrokerConfig(o) => &mut o.metadata,
        Object::Other { .. } => return Ok(object),
    };
    if meta.name.is_empty() {
        return Err(ParseError::new(
            document,
            Some("metadata.name"),
            "missing field",
        ));
    }
    if meta.namespace.is_empty() {
        meta.namespace = DEFAULT_NAMESPACE.to_string();
    }
    Ok(object)
}

/// Turns a serde_yaml error into a ParseError, moving its path prefix and " at line N column M"
/// suffix into the structured fields so they are not printed twice.
fn yaml_error(document: usize, field: Option<String>, err: &serde_yaml::Error) -> ParseError {
    let line = err.location().map(|l| l.line());
    let mut message = err.to_string();
    if let Some(loc) = err.location() {
        let suffix = format!(" at line {} column {}", loc.line(), loc.column());
        if let Some(pos) = message.find(&suffix) {
            message.replace_range(pos..pos + suffix.len(), "");
        }
    }
    // serde_yaml prefixes messages with its own copy of the path ("spec.rules[0]: ...").
    if let Some((prefix, rest)) = message.split_once(": ") {
        let looks_like_path = !prefix.is_empty()
            && !prefix.contains(char::is_whitespace)
            && field
                .as_deref()
                .is_some_and(|f| f.starts_with(prefix) || prefix.starts_with(f));
        if looks_like_path {
            message = rest.to_string();
        }
    }
    if let Some(shorter) = unknown_field(&message) {
        message = shorter;
    }
    ParseError {
        document,
        line,
        field,
        message,
    }
}

/// serde's "unknown field `comand`, expected one of `name`, `image`, ..." as "unknown field (did you
/// mean `command`?)": the field path already names the field, and the list is long.
fn unknown_field(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    let (name, rest) = rest.split_once('`')?;
    let expected: Vec<&str> = rest
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|e| !e.is_empty())
        .collect();
    let closest = expected
        .iter()
        .map(|e| (edit_distance(&name.to_lowercase(), &e.to_lowercase()), *e))
        .min()
        .filter(|(d, _)| *d <= 2.max(name.len() / 4));
    Some(match closest {
        Some((_, e)) => format!("unknown field (did you mean `{e}`?)"),
        None => "unknown field".to_string(),
    })
}

/// Levenshtein distance, for suggesting the field a typo meant.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous + usize::from(ca != *cb);
            previous = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingress::IntOrString;

    fn only(text: &str) -> Result<Object, ParseError> {
        let mut all = parse_documents(text);
        assert_eq!(all.len(), 1, "{all:?}");
        all.remove(0)
    }

    const INGRESS: &str = "\
apiVersion: networking.internal.knative.dev/v1alpha1
kind: Ingress
metadata:
  name: web
  namespace: ns
spec:
  rules:
  - hosts: [web.example.com]
    visibility: ExternalIP
    http:
      paths:
      - splits:
        - serviceNamespace: ns
          serviceName: web-00001
          servicePort: 80
          percent: 100
";

    #[test]
    fn input_that_makes_the_yaml_parser_panic_is_an_error() {
        // The yaml_objects fuzz target's finding, as it was found.
        let text = "# App-endHeaders:\n            Knant: 100\n---\napiVersion: v1\nkind: Service\nmetadata:\n  name: hello\n  namespace: default\nspec:\n  ports:\n  - name: *h";
        let documents = parse_documents(text);
        assert!(documents.iter().any(Result::is_err), "{documents:?}");
    }

    #[test]
    fn multi_document_file_with_all_kinds() {
        let text = format!(
            "{INGRESS}---
apiVersion: v1
kind: Service
metadata: {{name: web-00001, namespace: ns}}
spec:
  ports: [{{name: http, port: 80, targetPort: 8080}}]
---
apiVersion: v1
kind: Endpoints
metadata: {{name: web-00001, namespace: ns}}
subsets:
- addresses: [{{ip: 10.0.0.1}}]
  ports: [{{port: 8080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-00001-abcde
  labels: {{kubernetes.io/service-name: web-00001}}
addressType: IPv4
endpoints:
- addresses: [10.0.0.2]
---
apiVersion: v1
kind: Secret
metadata: {{name: tls, namespace: ns}}
type: kubernetes.io/tls
data: {{tls.crt: Y3J0, tls.key: a2V5}}
"
        );
        let objects: Vec<Object> = parse_documents(&text)
            .into_iter()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(objects.len(), 5);
        let Object::Ingress(ing) = &objects[0] else {
            panic!("{:?}", objects[0])
        };
        assert_eq!(ing.metadata.key(), "ns/web");
        let split = &ing.spec.rules[0].http.as_ref().unwrap().paths[0].splits[0];
        assert_eq!(split.service_port, IntOrString::Int(80));
        let Object::Service(svc) = &objects[1] else {
            panic!("{:?}", objects[1])
        };
        assert_eq!(svc.spec.ports[0].target_port, Some(IntOrString::Int(8080)));
        let Object::Endpoints(eps) = &objects[2] else {
            panic!("{:?}", objects[2])
        };
        assert_eq!(eps.subsets[0].addresses[0].ip, "10.0.0.1");
        let Object::EndpointSlice(slice) = &objects[3] else {
            panic!("{:?}", objects[3])
        };
        // No namespace in the file: Kubernetes' default.
        assert_eq!(slice.metadata.namespace, "default");
        assert_eq!(slice.endpoints[0].addresses, vec!["10.0.0.2"]);
        let Object::Secret(secret) = &objects[4] else {
            panic!("{:?}", objects[4])
        };
        assert_eq!(secret.data["tls.crt"], "Y3J0");
    }

    #[test]
    fn syntax_error_gives_file_line() {
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\n---\napiVersion: v1\nkind: [Service\nmetadata: {}\n";
        let all = parse_documents(text);
        assert_eq!(all.len(), 2, "{all:?}");
        assert!(all[0].is_ok());
        let err = all[1].as_ref().unwrap_err();
        assert_eq!(err.document, 2);
        let line = err.line.expect("syntax errors carry a line");
        assert!((6..=8).contains(&line), "{err}");
        assert!(err.to_string().starts_with("document 2, line "), "{err}");
    }

    #[test]
    fn unknown_field_in_spec_names_field_and_line() {
        let text = format!("{INGRESS}          weight: 3\n");
        let err = only(&text).unwrap_err();
        assert_eq!(err.document, 1);
        assert_eq!(err.line, Some(17), "{err}");
        let field = err.field.as_deref().unwrap();
        assert!(
            field.starts_with("spec.rules[0].http.paths[0].splits[0]"),
            "{err}"
        );
        assert_eq!(
            err.field.as_deref(),
            Some("spec.rules[0].http.paths[0].splits[0].weight")
        );
        assert_eq!(err.message, "unknown field", "{err}");
        assert!(!err.message.contains(" at line "), "{err}");
    }

    #[test]
    fn wrong_type_gives_path_and_line_in_whole_file() {
        let bad = INGRESS.replace("percent: 100", "percent: x");
        let text = format!("# leading comment\n---\n{bad}");
        let all = parse_documents(&text);
        assert_eq!(all.len(), 1);
        let err = all[0].as_ref().unwrap_err();
        assert_eq!(
            err.field.as_deref(),
            Some("spec.rules[0].http.paths[0].splits[0].percent")
        );
        assert_eq!(err.message, "invalid type: string \"x\", expected i64");
        // Line 16 of the document, after two leading lines.
        assert_eq!(err.line, Some(18));
        assert_eq!(
            err.to_string(),
            "document 1, line 18: spec.rules[0].http.paths[0].splits[0].percent: \
             invalid type: string \"x\", expected i64"
        );
    }

    #[test]
    fn errors_in_a_later_document_count_lines_from_file_start() {
        let bad = INGRESS.replace("percent: 100", "percent: x");
        let text = format!("apiVersion: v1\nkind: Secret\nmetadata: {{name: s}}\n---\n{bad}");
        let all = parse_documents(&text);
        assert!(all[0].is_ok());
        let err = all[1].as_ref().unwrap_err();
        assert_eq!(err.document, 2);
        assert_eq!(err.line, Some(20));
    }

    #[test]
    fn missing_name_is_an_error() {
        let err = only("apiVersion: v1\nkind: Service\nmetadata: {namespace: ns}\n").unwrap_err();
        assert_eq!(err.field.as_deref(), Some("metadata.name"));
        assert_eq!(err.to_string(), "document 1: metadata.name: missing field");
    }

    #[test]
    fn missing_api_version_or_kind_is_an_error() {
        let err = only("kind: Service\nmetadata: {name: a}\n").unwrap_err();
        assert_eq!(err.field.as_deref(), Some("apiVersion"));
        let err = only("apiVersion: v1\nmetadata: {name: a}\n").unwrap_err();
        assert_eq!(err.field.as_deref(), Some("kind"));
        let err = only("apiVersion: 1\nkind: Service\n").unwrap_err();
        assert_eq!(err.field.as_deref(), Some("apiVersion"));
    }

    #[test]
    fn empty_namespace_defaults() {
        let obj =
            only("apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: ''}\n").unwrap();
        assert_eq!(obj.metadata().unwrap().key(), "default/a");
    }

    #[test]
    fn other_kinds_are_kept_by_name() {
        let all = parse_documents(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n---\napiVersion: v1\nkind: PersistentVolume\n",
        );
        assert_eq!(
            all,
            vec![
                Ok(Object::Other {
                    api_version: "apps/v1".into(),
                    kind: "Deployment".into(),
                    name: "d".into()
                }),
                Ok(Object::Other {
                    api_version: "v1".into(),
                    kind: "PersistentVolume".into(),
                    name: String::new()
                }),
            ]
        );
    }

    #[test]
    fn comment_only_documents_are_skipped() {
        let text = "# header\n---\n# nothing here\n---\napiVersion: v1\nkind: Secret\nmetadata: {name: s}\n---\n---\n# trailing\n";
        let all = parse_documents(text);
        assert_eq!(all.len(), 1, "{all:?}");
        assert!(matches!(all[0], Ok(Object::Secret(_))));
        assert!(parse_documents("").is_empty());
        assert!(parse_documents("# only a comment\n").is_empty());
    }

    #[test]
    fn non_mapping_document_is_an_error() {
        let err = only("- a\n- b\n").unwrap_err();
        assert_eq!(err.field, None);
        assert!(err.message.contains("mapping"));
    }

    #[test]
    fn bad_service_port_is_reported_at_the_port() {
        let text = INGRESS.replace("servicePort: 80", "servicePort: [80]");
        let err = only(&text).unwrap_err();
        assert_eq!(
            err.field.as_deref(),
            Some("spec.rules[0].http.paths[0].splits[0].servicePort")
        );
        assert_eq!(err.line, Some(15));
        assert_eq!(
            err.message,
            "invalid type: sequence, expected an integer or a string"
        );
        let named = only(&INGRESS.replace("servicePort: 80", "servicePort: http")).unwrap();
        let Object::Ingress(ing) = named else {
            panic!()
        };
        let split = &ing.spec.rules[0].http.as_ref().unwrap().paths[0].splits[0];
        assert_eq!(split.service_port, IntOrString::String("http".into()));
    }

    #[test]
    fn duplicate_key_fails_only_its_document() {
        let text = "apiVersion: v1\nkind: Secret\nkind: Secret\nmetadata: {name: s}\n---\n\
                    apiVersion: v1\nkind: Secret\nmetadata: {name: t}\n";
        let all = parse_documents(text);
        assert_eq!(all.len(), 2, "{all:?}");
        let err = all[0].as_ref().unwrap_err();
        assert!(err.message.contains("duplicate"), "{err}");
        assert!(matches!(&all[1], Ok(Object::Secret(s)) if s.metadata.name == "t"));
    }

    #[test]
    fn documents_know_their_first_line() {
        let text = "# header\n---\n# nothing here\n---\n\napiVersion: v1\nkind: Secret\n\
                    metadata: {name: s}\n---\napiVersion: v1\nkind: Secret\nmetadata: {name: t}\n\
                    --- {apiVersion: v1, kind: Secret, metadata: {name: u}}\n";
        let lines: Vec<(usize, usize)> = read_documents(text)
            .iter()
            .map(|d| (d.index, d.line))
            .collect();
        assert_eq!(lines, [(2, 6), (3, 10), (4, 13)]);
        let implicit = "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\n---\n\
                        apiVersion: v1\nkind: Secret\nmetadata: {name: t}\n";
        let lines: Vec<usize> = read_documents(implicit).iter().map(|d| d.line).collect();
        assert_eq!(lines, [1, 5]);
    }

    #[test]
    fn syntax_error_stops_reading_later_documents() {
        let text = "apiVersion: v1\nkind: [Secret\n---\napiVersion: v1\nkind: Secret\nmetadata: {name: t}\n";
        let all = parse_documents(text);
        assert_eq!(all.len(), 1, "{all:?}");
        assert!(all[0].is_err());
    }
}
