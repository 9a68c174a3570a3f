//! Trigger filters as written in eventing.knative.dev/v1 Trigger: the legacy `spec.filter.attributes`
//! exact match and the `spec.filters` dialects (Knative's SubscriptionsAPIFilter).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::validation::FieldError;

/// `spec.filter`: every listed attribute must equal the value ("" matches any value, as in Knative).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TriggerFilter {
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
}

/// One entry of `spec.filters`. Knative requires exactly one dialect per entry.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SubscriptionsApiFilter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suffix: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub all: Option<Vec<SubscriptionsApiFilter>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub any: Option<Vec<SubscriptionsApiFilter>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not: Option<Box<SubscriptionsApiFilter>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cesql: Option<String>,
}

/// Knative's attribute name rule for `spec.filter.attributes` and the exact/prefix/suffix dialects:
/// lowercase alphanumeric, starting with a letter (`^[a-z][a-z0-9]*$`).
pub fn is_valid_attribute_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some('a'..='z'))
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
}

impl SubscriptionsApiFilter {
    /// The dialects set in this entry, in Knative's order. Knative counts an empty map or list as
    /// unset (`len(filter.Exact) > 0`), `not` as set when present, `cesql` when not empty.
    pub fn dialects(&self) -> Vec<&'static str> {
        let mut found = Vec::new();
        let non_empty_map =
            |m: &Option<BTreeMap<String, String>>| m.as_ref().is_some_and(|m| !m.is_empty());
        let non_empty_list =
            |l: &Option<Vec<SubscriptionsApiFilter>>| l.as_ref().is_some_and(|l| !l.is_empty());
        if non_empty_map(&self.exact) {
            found.push("exact");
        }
        if non_empty_map(&self.prefix) {
            found.push("prefix");
        }
        if non_empty_map(&self.suffix) {
            found.push("suffix");
        }
        if non_empty_list(&self.all) {
            found.push("all");
        }
        if non_empty_list(&self.any) {
            found.push("any");
        }
        if self.not.is_some() {
            found.push("not");
        }
        if self.cesql.as_ref().is_some_and(|s| !s.is_empty()) {
            found.push("cesql");
        }
        found
    }
}

/// Knative's Trigger validation of `spec.filter` and `spec.filters` (eventing pkg/apis/eventing/v1
/// trigger_validation.go: ValidateAttributeFilters, ValidateSubscriptionAPIFiltersList), collecting
/// every error with its field path. CESQL expressions are only checked for presence here; parsing
/// them is the filter crate's job (sluice-event-filter), which adds its errors under the same paths.
pub fn validate_trigger_filters(
    filter: Option<&TriggerFilter>,
    filters: &[SubscriptionsApiFilter],
) -> Vec<FieldError> {
    let mut errors = Vec::new();
    if let Some(filter) = filter {
        validate_attribute_names(&filter.attributes, "spec.filter.attributes", &mut errors);
    }
    validate_filters_list(filters, "spec.filters", &mut errors);
    errors
}

fn validate_filters_list(
    filters: &[SubscriptionsApiFilter],
    path: &str,
    errors: &mut Vec<FieldError>,
) {
    for (i, f) in filters.iter().enumerate() {
        validate_filter(f, &format!("{path}[{i}]"), errors);
    }
}

fn validate_filter(filter: &SubscriptionsApiFilter, path: &str, errors: &mut Vec<FieldError>) {
    let dialects = filter.dialects();
    if dialects.len() > 1 {
        // Knative: "multiple dialects found, filters can have only one dialect set".
        errors.push(FieldError {
            field: path.to_string(),
            message: format!(
                "multiple dialects found ({}), filters can have only one dialect set",
                dialects.join(", ")
            ),
        });
    }
    for (name, map) in [
        ("exact", &filter.exact),
        ("prefix", &filter.prefix),
        ("suffix", &filter.suffix),
    ] {
        let Some(map) = map else { continue };
        let field = format!("{path}.{name}");
        // Knative: ValidateSingleAttributeMap, one key-value pair per dialect entry.
        if map.len() > 1 {
            errors.push(FieldError {
                field,
                message: format!(
                    "Multiple items found, can have only one key-value (found {})",
                    map.keys()
                        .map(String::as_str)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
            continue;
        }
        validate_attribute_names(map, &field, errors);
    }
    if let Some(all) = &filter.all {
        validate_filters_list(all, &format!("{path}.all"), errors);
    }
    if let Some(any) = &filter.any {
        validate_filters_list(any, &format!("{path}.any"), errors);
    }
    if let Some(not) = &filter.not {
        validate_filter(not, &format!("{path}.not"), errors);
    }
}

fn validate_attribute_names(
    attrs: &BTreeMap<String, String>,
    path: &str,
    errors: &mut Vec<FieldError>,
) {
    for name in attrs.keys() {
        if !is_valid_attribute_name(name) {
            // Knative: apis.ErrInvalidKeyName(attr, ..., msg).ViaKey(attr).
            errors.push(FieldError {
                field: format!("{path}[{name}]"),
                message: format!(
                    "invalid key name {name:?}: Attribute name must start with a letter and can only contain lowercase alphanumeric"
                ),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> Option<BTreeMap<String, String>> {
        Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn attribute_names_must_be_lowercase_alphanumeric_starting_with_a_letter() {
        for (name, ok) in [
            ("type", true),
            ("ext1", true),
            ("Type", false),
            ("1ext", false),
            ("my-ext", false),
            ("", false),
        ] {
            assert_eq!(is_valid_attribute_name(name), ok, "{name:?}");
        }
    }

    #[test]
    fn each_entry_allows_at_most_one_dialect() {
        let both = SubscriptionsApiFilter {
            exact: map(&[("type", "a")]),
            prefix: map(&[("source", "b")]),
            ..Default::default()
        };
        let errors = validate_trigger_filters(None, &[SubscriptionsApiFilter::default(), both]);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(
            errors[0].to_string(),
            "spec.filters[1]: multiple dialects found (exact, prefix), filters can have only one dialect set"
        );
    }

    #[test]
    fn empty_maps_and_lists_do_not_count_as_dialects() {
        let f = SubscriptionsApiFilter {
            exact: map(&[]),
            all: Some(vec![]),
            cesql: Some(String::new()),
            ..Default::default()
        };
        assert!(f.dialects().is_empty());
        assert!(validate_trigger_filters(None, &[f]).is_empty());
    }

    #[test]
    fn nested_errors_name_their_path() {
        let bad = SubscriptionsApiFilter {
            suffix: map(&[("Type", "x")]),
            ..Default::default()
        };
        let multi = SubscriptionsApiFilter {
            exact: map(&[("a", "1"), ("b", "2")]),
            ..Default::default()
        };
        let f = SubscriptionsApiFilter {
            all: Some(vec![
                SubscriptionsApiFilter {
                    not: Some(Box::new(bad)),
                    ..Default::default()
                },
                multi,
            ]),
            ..Default::default()
        };
        let errors: Vec<String> = validate_trigger_filters(None, &[f])
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(
            errors[0].starts_with("spec.filters[0].all[0].not.suffix[Type]: invalid key name"),
            "{errors:?}"
        );
        assert!(
            errors[1].starts_with("spec.filters[0].all[1].exact: Multiple items found"),
            "{errors:?}"
        );
    }

    #[test]
    fn legacy_attributes_names_are_validated() {
        let filter = TriggerFilter {
            attributes: [("Type".to_string(), "x".to_string())].into(),
        };
        let errors = validate_trigger_filters(Some(&filter), &[]);
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].field, "spec.filter.attributes[Type]");
    }
}
