//! The subset of Go's text/template that Knative's `domain-template` and `tag-template` use.
//!
//! Hand-written rather than a crate: Go-template crates (gtmpl) pull in a whole expression language
//! for what is, in every Knative install we know of, field substitution. Supported actions:
//! `{{.Name}}`, `{{.Namespace}}`, `{{.Domain}}`, `{{.Tag}}`, `{{.Annotations.key}}`,
//! `{{.Labels.key}}`, `{{index .Annotations "key"}}`, `{{index .Labels "key"}}`, with Go's `{{-`/`-}}`
//! whitespace trimming. Anything else is refused when the ConfigMap is read, naming the action.

use std::collections::BTreeMap;

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Field(Field),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Field {
    Name,
    Namespace,
    Domain,
    Tag,
    Annotation(String),
    Label(String),
}

/// What a template can read: Knative's DomainTemplateValues and TagTemplateValues in one.
#[derive(Debug, Clone, Default)]
pub struct TemplateValues<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
    pub domain: &'a str,
    pub tag: &'a str,
    pub annotations: Option<&'a BTreeMap<String, String>>,
    pub labels: Option<&'a BTreeMap<String, String>>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("unclosed action starting at byte {0}: want \"}}}}\"")]
    Unclosed(usize),
    #[error(
        "unsupported action {{{{{0}}}}}: sluice supports .Name, .Namespace, .Domain, .Tag, \
         .Annotations.<key>, .Labels.<key> and index .Annotations \"<key>\""
    )]
    Unsupported(String),
    #[error("{0} is not available in this template (it has {1})")]
    NotAvailable(&'static str, &'static str),
}

impl Template {
    pub fn parse(source: &str) -> Result<Template, TemplateError> {
        let mut parts = Vec::new();
        let mut rest = source;
        let mut offset = 0;
        let mut trim_next_text = false;
        while let Some(start) = rest.find("{{") {
            let mut text = &rest[..start];
            if trim_next_text {
                text = text.trim_start();
            }
            let after = &rest[start + 2..];
            let end = after
                .find("}}")
                .ok_or(TemplateError::Unclosed(offset + start))?;
            let mut action = &after[..end];
            if let Some(a) = action.strip_prefix('-') {
                text = text.trim_end();
                action = a;
            }
            trim_next_text = false;
            if let Some(a) = action.strip_suffix('-') {
                trim_next_text = true;
                action = a;
            }
            if !text.is_empty() {
                parts.push(Part::Text(text.to_string()));
            }
            parts.push(Part::Field(parse_action(action.trim())?));
            let consumed = start + 2 + end + 2;
            offset += consumed;
            rest = &rest[consumed..];
        }
        let text = if trim_next_text {
            rest.trim_start()
        } else {
            rest
        };
        if !text.is_empty() {
            parts.push(Part::Text(text.to_string()));
        }
        Ok(Template {
            source: source.to_string(),
            parts,
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders the template. A missing annotation or label renders empty (Go prints "<no value>").
    pub fn render(&self, v: &TemplateValues<'_>) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Field(Field::Name) => out.push_str(v.name),
                Part::Field(Field::Namespace) => out.push_str(v.namespace),
                Part::Field(Field::Domain) => out.push_str(v.domain),
                Part::Field(Field::Tag) => out.push_str(v.tag),
                Part::Field(Field::Annotation(k)) => {
                    out.push_str(v.annotations.and_then(|m| m.get(k)).map_or("", |s| s))
                }
                Part::Field(Field::Label(k)) => {
                    out.push_str(v.labels.and_then(|m| m.get(k)).map_or("", |s| s))
                }
            }
        }
        out
    }

    /// Knative's DomainTemplateValues have no Tag.
    pub(crate) fn check_domain_fields(&self) -> Result<(), TemplateError> {
        if self.parts.contains(&Part::Field(Field::Tag)) {
            return Err(TemplateError::NotAvailable(
                ".Tag",
                ".Name, .Namespace, .Domain, .Annotations, .Labels",
            ));
        }
        Ok(())
    }

    /// Knative's TagTemplateValues have only Name and Tag.
    pub(crate) fn check_tag_fields(&self) -> Result<(), TemplateError> {
        for part in &self.parts {
            let name = match part {
                Part::Text(_) | Part::Field(Field::Name | Field::Tag) => continue,
                Part::Field(Field::Namespace) => ".Namespace",
                Part::Field(Field::Domain) => ".Domain",
                Part::Field(Field::Annotation(_)) => ".Annotations",
                Part::Field(Field::Label(_)) => ".Labels",
            };
            return Err(TemplateError::NotAvailable(name, ".Name, .Tag"));
        }
        Ok(())
    }
}

fn parse_action(action: &str) -> Result<Field, TemplateError> {
    let unsupported = || TemplateError::Unsupported(action.to_string());
    match action {
        ".Name" => return Ok(Field::Name),
        ".Namespace" => return Ok(Field::Namespace),
        ".Domain" => return Ok(Field::Domain),
        ".Tag" => return Ok(Field::Tag),
        _ => {}
    }
    let map_key = |map: &str, key: &str| match map {
        ".Annotations" => Ok(Field::Annotation(key.to_string())),
        ".Labels" => Ok(Field::Label(key.to_string())),
        _ => Err(unsupported()),
    };
    if let Some(args) = action.strip_prefix("index ") {
        let mut words = args.split_whitespace();
        let (Some(map), Some(key), None) = (words.next(), words.next(), words.next()) else {
            return Err(unsupported());
        };
        let key = key
            .strip_prefix('"')
            .and_then(|k| k.strip_suffix('"'))
            .ok_or_else(unsupported)?;
        return map_key(map, key);
    }
    for map in [".Annotations.", ".Labels."] {
        if let Some(key) = action.strip_prefix(map)
            && !key.is_empty()
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return map_key(map.trim_end_matches('.'), key);
        }
    }
    Err(unsupported())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values<'a>(ann: &'a BTreeMap<String, String>) -> TemplateValues<'a> {
        TemplateValues {
            name: "web",
            namespace: "ns",
            domain: "example.com",
            tag: "v2",
            annotations: Some(ann),
            labels: None,
        }
    }

    #[test]
    fn renders_knative_templates() {
        let ann = BTreeMap::from([("sub".to_string(), "blue".to_string())]);
        let table = [
            ("{{.Name}}.{{.Namespace}}.{{.Domain}}", "web.ns.example.com"),
            ("{{.Tag}}-{{.Name}}", "v2-web"),
            ("{{.Name}}-{{.Namespace}}.{{.Domain}}", "web-ns.example.com"),
            (
                "{{.Name}}.{{index .Annotations \"sub\"}}.{{.Domain}}",
                "web.blue.example.com",
            ),
            (
                "{{.Name}}.{{.Annotations.sub}}.{{.Domain}}",
                "web.blue.example.com",
            ),
            ("{{ .Name }}. {{- .Domain -}} x", "web.example.comx"),
            ("{{.Labels.missing}}{{.Name}}", "web"),
        ];
        for (src, want) in table {
            let t = Template::parse(src).unwrap();
            assert_eq!(t.render(&values(&ann)), want, "{src}");
        }
    }

    #[test]
    fn refuses_what_it_cannot_render() {
        assert_eq!(
            Template::parse("{{.Name").unwrap_err(),
            TemplateError::Unclosed(0)
        );
        let err = Template::parse("{{.Name | upper}}").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("unsupported action {{.Name | upper}}"),
            "{err}"
        );
        assert!(Template::parse("{{index .Spec \"a\"}}").is_err());
        assert!(
            Template::parse("{{.Tag}}.{{.Domain}}")
                .unwrap()
                .check_domain_fields()
                .is_err()
        );
        assert!(
            Template::parse("{{.Tag}}-{{.Namespace}}")
                .unwrap()
                .check_tag_fields()
                .is_err()
        );
    }
}
