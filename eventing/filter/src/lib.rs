//! Trigger filters of Knative Eventing for Sluice's broker: the legacy `spec.filter.attributes`
//! exact match, the `spec.filters` dialects (exact, prefix, suffix, all, any, not, cesql) and a
//! complete CloudEvents SQL (CESQL v1) parser and evaluator ([`cesql`]).
//!
//! ```
//! use sluice_api::filters::SubscriptionsApiFilter;
//! use sluice_event_filter::Filter;
//!
//! let filters = [SubscriptionsApiFilter { cesql: Some("type LIKE 'com.example.%'".into()), ..Default::default() }];
//! let filter = Filter::compile(None, &filters).unwrap();
//! let event = cloudevents::EventBuilderV10::new()
//!     .id("1").source("/s").ty("com.example.created").build().unwrap();
//! # use cloudevents::EventBuilder;
//! assert!(filter.matches(&event));
//! ```

// ---- Public API (stable: the broker codes against it) -------------------------------------------

pub mod cesql;

pub use cloudevents::Event;
pub use sluice_api::filters::{SubscriptionsApiFilter, TriggerFilter};
pub use sluice_api::validation::{FieldError, ValidationError};

/// A Trigger's compiled filter: cheap to evaluate, immutable, `Send + Sync`.
#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    root: Node,
}

/// Knative's three-valued filter result (eventing pkg/eventfilter FilterResult). The broker
/// delivers unless the result is `Fail`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterResult {
    Pass,
    Fail,
    NoFilter,
}

/// Why a Trigger's filters cannot be compiled; every error names its field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    /// e.g. `spec.filters[1]: multiple dialects found (exact, prefix), filters can have only one
    /// dialect set` or `spec.filters[0].cesql: invalid CESQL expression "a =": column 4: ...`.
    #[error("invalid trigger filter: {0}")]
    Invalid(ValidationError),
}

impl Filter {
    /// Validates and compiles a Trigger's `spec.filter` (`attributes`) and `spec.filters`.
    ///
    /// Knative (broker filter handler, filterEvent): when `filters` is not empty it is used and
    /// `filter.attributes` is ignored; otherwise `filter` applies when present; with neither, every
    /// event passes. Both are validated, as Knative's webhook does.
    pub fn compile(
        attributes: Option<&TriggerFilter>,
        filters: &[SubscriptionsApiFilter],
    ) -> Result<Filter, FilterError> {
        let mut errors = sluice_api::filters::validate_trigger_filters(attributes, filters);
        let root = if !filters.is_empty() {
            // Knative: CreateSubscriptionsAPIFilters = NewAllFilter(MaterializeFiltersList(filters)).
            all(materialize_list(filters, "spec.filters", &mut errors))
        } else if let Some(filter) = attributes {
            Node::Attributes(pairs(&filter.attributes))
        } else {
            Node::NoFilter
        };
        if !errors.is_empty() {
            return Err(FilterError::Invalid(ValidationError { errors }));
        }
        Ok(Filter { root })
    }

    /// Compiles the `filter` and `filters` of a Trigger's `spec` given as JSON (the form
    /// `sluice_api::eventing::Trigger` keeps its spec in for now). Fields that do not deserialize
    /// (an unknown dialect, a number where a string goes) are reported under their field name.
    pub fn compile_trigger_spec(spec: &serde_json::Value) -> Result<Filter, FilterError> {
        fn field<T: serde::de::DeserializeOwned>(
            spec: &serde_json::Value,
            name: &str,
            errors: &mut Vec<FieldError>,
        ) -> Option<T> {
            let value = spec.get(name).filter(|v| !v.is_null())?;
            serde_json::from_value(value.clone())
                .map_err(|e| {
                    errors.push(FieldError {
                        field: format!("spec.{name}"),
                        message: e.to_string(),
                    })
                })
                .ok()
        }
        let mut errors = Vec::new();
        let filter: Option<TriggerFilter> = field(spec, "filter", &mut errors);
        let filters: Vec<SubscriptionsApiFilter> =
            field(spec, "filters", &mut errors).unwrap_or_default();
        if !errors.is_empty() {
            return Err(FilterError::Invalid(ValidationError { errors }));
        }
        Filter::compile(filter.as_ref(), &filters)
    }

    /// A filter that lets every event through (a Trigger without filters).
    pub fn match_all() -> Filter {
        Filter {
            root: Node::NoFilter,
        }
    }

    /// Whether every event passes without being looked at (a Trigger without filters), so that a
    /// dispatcher need not read the event's attributes.
    pub fn passes_everything(&self) -> bool {
        matches!(self.root, Node::NoFilter)
    }

    /// Knative's filter result for this event.
    pub fn evaluate(&self, event: &Event) -> FilterResult {
        self.root.evaluate(event)
    }

    /// Whether the event is delivered to the Trigger's subscriber (Knative: anything but FailFilter).
    pub fn matches(&self, event: &Event) -> bool {
        self.evaluate(event) != FilterResult::Fail
    }
}

impl Default for Filter {
    fn default() -> Self {
        Filter::match_all()
    }
}

impl FilterResult {
    /// Knative's FilterResult.Or: NoFilter is neutral, one Pass passes.
    fn or(self, other: FilterResult) -> FilterResult {
        match (self, other) {
            (FilterResult::NoFilter, y) => y,
            (x, FilterResult::NoFilter) => x,
            (FilterResult::Pass, _) | (_, FilterResult::Pass) => FilterResult::Pass,
            _ => FilterResult::Fail,
        }
    }
}

// ---- Implementation --------------------------------------------------------------------------------

mod event;

/// A materialized filter, one variant per Knative filter type.
#[derive(Debug, Clone, PartialEq)]
enum Node {
    /// Legacy `spec.filter.attributes`; "" matches any value but the attribute must be set.
    Attributes(Vec<(String, String)>),
    /// The exact dialect (Knative builds it on the attributes filter; values are never "").
    Exact(Vec<(String, String)>),
    Prefix(Vec<(String, String)>),
    Suffix(Vec<(String, String)>),
    All(Vec<Node>),
    Any(Vec<Node>),
    /// `None` when the inner entry materialized to nothing (Knative: NewNotFilter(nil)).
    Not(Option<Box<Node>>),
    Cesql(cesql::Expression),
    NoFilter,
}

fn pairs(map: &std::collections::BTreeMap<String, String>) -> Vec<(String, String)> {
    map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// Knative's NewAllFilter: a single filter is used as it is.
fn all(mut nodes: Vec<Node>) -> Node {
    if nodes.len() == 1 {
        nodes.pop().unwrap_or(Node::NoFilter)
    } else {
        Node::All(nodes)
    }
}

/// Knative's MaterializeFiltersList: entries that materialize to nothing are skipped.
fn materialize_list(
    filters: &[SubscriptionsApiFilter],
    path: &str,
    errors: &mut Vec<FieldError>,
) -> Vec<Node> {
    filters
        .iter()
        .enumerate()
        .filter_map(|(i, f)| materialize(f, &format!("{path}[{i}]"), errors))
        .collect()
}

/// Knative's MaterializeSubscriptionsAPIFilter: the first dialect set, in the order exact, prefix,
/// suffix, all, any, not, cesql; `None` for an entry without a dialect, or an exact/prefix/suffix
/// with an empty attribute or value (Knative's constructors refuse those and the entry is skipped).
fn materialize(
    filter: &SubscriptionsApiFilter,
    path: &str,
    errors: &mut Vec<FieldError>,
) -> Option<Node> {
    // CESQL is parsed (and its errors reported) even when another dialect wins, as the webhook does.
    let parsed = filter.cesql.as_deref().filter(|s| !s.is_empty()).and_then(|src| match cesql::parse(src) {
        Ok(expr) => {
            for problem in expr.static_problems() {
                // Knative accepts these (they only fail at evaluation): warn, do not reject.
                tracing::warn!(field = %format!("{path}.cesql"), expression = src, "{problem}: the filter never passes");
            }
            Some(expr)
        }
        Err(e) => {
            errors.push(FieldError {
                field: format!("{path}.cesql"),
                message: format!("invalid CESQL expression {src:?}: {e}"),
            });
            None
        }
    });
    let keyed = |map: &Option<std::collections::BTreeMap<String, String>>, dialect: &str| {
        let map = map.as_ref().filter(|m| !m.is_empty())?;
        if map.iter().any(|(k, v)| k.is_empty() || v.is_empty()) {
            tracing::warn!(field = %format!("{path}.{dialect}"), "attribute and value can't be empty: filter entry ignored, as Knative does");
            return Some(None);
        }
        Some(Some(pairs(map)))
    };
    if let Some(p) = keyed(&filter.exact, "exact") {
        return p.map(Node::Exact);
    }
    if let Some(p) = keyed(&filter.prefix, "prefix") {
        return p.map(Node::Prefix);
    }
    if let Some(p) = keyed(&filter.suffix, "suffix") {
        return p.map(Node::Suffix);
    }
    if let Some(list) = filter.all.as_ref().filter(|l| !l.is_empty()) {
        return Some(all(materialize_list(list, &format!("{path}.all"), errors)));
    }
    if let Some(list) = filter.any.as_ref().filter(|l| !l.is_empty()) {
        return Some(Node::Any(materialize_list(
            list,
            &format!("{path}.any"),
            errors,
        )));
    }
    if let Some(not) = &filter.not {
        return Some(Node::Not(
            materialize(not, &format!("{path}.not"), errors).map(Box::new),
        ));
    }
    parsed.map(Node::Cesql)
}

fn pass_if(b: bool) -> FilterResult {
    if b {
        FilterResult::Pass
    } else {
        FilterResult::Fail
    }
}

impl Node {
    fn evaluate(&self, e: &Event) -> FilterResult {
        match self {
            Node::NoFilter => FilterResult::NoFilter,
            Node::Attributes(pairs) | Node::Exact(pairs) => {
                pass_if(pairs.iter().all(|(name, want)| {
                    match event::lookup_for_filter(e, name) {
                        // Knative: an absent attribute, or an unset one ("") under the any-value filter, fails.
                        None => false,
                        Some(value) if want.is_empty() => !value.is_empty(),
                        Some(value) => value == *want,
                    }
                }))
            }
            Node::Prefix(pairs) => pass_if(pairs.iter().all(|(name, prefix)| {
                event::lookup_for_filter(e, name).is_some_and(|v| v.starts_with(prefix.as_str()))
            })),
            Node::Suffix(pairs) => pass_if(pairs.iter().all(|(name, suffix)| {
                event::lookup_for_filter(e, name).is_some_and(|v| v.ends_with(suffix.as_str()))
            })),
            Node::All(nodes) => {
                // Knative's allFilter: the first Fail fails; otherwise the LAST result (so a trailing
                // NoFilter makes the whole NoFilter).
                let mut result = FilterResult::NoFilter;
                for n in nodes {
                    result = n.evaluate(e);
                    if result == FilterResult::Fail {
                        return FilterResult::Fail;
                    }
                }
                result
            }
            Node::Any(nodes) => {
                let mut result = FilterResult::NoFilter;
                for n in nodes {
                    result = result.or(n.evaluate(e));
                    if result == FilterResult::Pass {
                        return FilterResult::Pass;
                    }
                }
                result
            }
            Node::Not(inner) => match inner.as_ref().map(|n| n.evaluate(e)) {
                Some(FilterResult::Pass) => FilterResult::Fail,
                Some(FilterResult::Fail) => FilterResult::Pass,
                _ => FilterResult::NoFilter,
            },
            // Knative: an evaluation error or a false result fails; CESQL v1 (1.2): so does a
            // non-Boolean result.
            Node::Cesql(expr) => pass_if(expr.matches(e)),
        }
    }
}

#[cfg(test)]
mod tests;
