//! Table-driven tests of the attributes filter and each `spec.filters` dialect, against Knative's
//! behaviour (eventing pkg/eventfilter/attributes and pkg/eventfilter/subscriptionsapi tests).

use std::collections::BTreeMap;

use cloudevents::{EventBuilder, EventBuilderV10};

use super::*;

/// type=dev.knative.example, source=/src, id=1234, subject=sub, ext=extvalue, flag=true, count=7;
/// no time, no datacontenttype, no dataschema.
fn event() -> Event {
    EventBuilderV10::new()
        .id("1234")
        .source("/src")
        .ty("dev.knative.example")
        .subject("sub")
        .extension("ext", "extvalue")
        .extension("flag", true)
        .extension("count", 7)
        .build()
        .unwrap()
}

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn attributes(pairs: &[(&str, &str)]) -> Filter {
    Filter::compile(
        Some(&TriggerFilter {
            attributes: map(pairs),
        }),
        &[],
    )
    .unwrap()
}

fn exact(pairs: &[(&str, &str)]) -> SubscriptionsApiFilter {
    SubscriptionsApiFilter {
        exact: Some(map(pairs)),
        ..Default::default()
    }
}

fn prefix(pairs: &[(&str, &str)]) -> SubscriptionsApiFilter {
    SubscriptionsApiFilter {
        prefix: Some(map(pairs)),
        ..Default::default()
    }
}

fn suffix(pairs: &[(&str, &str)]) -> SubscriptionsApiFilter {
    SubscriptionsApiFilter {
        suffix: Some(map(pairs)),
        ..Default::default()
    }
}

fn cesql(expr: &str) -> SubscriptionsApiFilter {
    SubscriptionsApiFilter {
        cesql: Some(expr.to_string()),
        ..Default::default()
    }
}

fn all(filters: Vec<SubscriptionsApiFilter>) -> SubscriptionsApiFilter {
    SubscriptionsApiFilter {
        all: Some(filters),
        ..Default::default()
    }
}

fn any(filters: Vec<SubscriptionsApiFilter>) -> SubscriptionsApiFilter {
    SubscriptionsApiFilter {
        any: Some(filters),
        ..Default::default()
    }
}

fn not(filter: SubscriptionsApiFilter) -> SubscriptionsApiFilter {
    SubscriptionsApiFilter {
        not: Some(Box::new(filter)),
        ..Default::default()
    }
}

fn result_of(filters: &[SubscriptionsApiFilter]) -> FilterResult {
    Filter::compile(None, filters)
        .unwrap_or_else(|e| panic!("{e}"))
        .evaluate(&event())
}

use FilterResult::{Fail, NoFilter, Pass};

#[test]
fn attributes_filter_exact_match_and_any_value() {
    for (pairs, want, why) in [
        (vec![], Pass, "empty attributes pass everything"),
        (vec![("type", "dev.knative.example")], Pass, "exact type"),
        (vec![("type", "dev.knative.other")], Fail, "other type"),
        (
            vec![("type", "dev.knative.example"), ("source", "/src")],
            Pass,
            "all keys match",
        ),
        (
            vec![("type", "dev.knative.example"), ("source", "/other")],
            Fail,
            "one key differs",
        ),
        (vec![("type", "")], Pass, "\"\" is any value"),
        (
            vec![("subject", "")],
            Pass,
            "any value of a set optional attribute",
        ),
        (
            vec![("time", "")],
            Fail,
            "any value of an unset optional attribute fails",
        ),
        (vec![("datacontenttype", "")], Fail, "unset datacontenttype"),
        (vec![("ext", "extvalue")], Pass, "extension exact"),
        (vec![("ext", "")], Pass, "extension present"),
        (
            vec![("missing", "")],
            Fail,
            "absent extension fails even with any value",
        ),
        (vec![("missing", "x")], Fail, "absent extension"),
        (
            vec![("flag", "true")],
            Pass,
            "boolean extension compared as its string form",
        ),
        (
            vec![("count", "7")],
            Pass,
            "integer extension compared as its string form",
        ),
        (vec![("specversion", "1.0")], Pass, "specversion"),
        (vec![("id", "1234")], Pass, "id"),
    ] {
        assert_eq!(
            attributes(&pairs).evaluate(&event()),
            want,
            "{why}: {pairs:?}"
        );
    }
}

#[test]
fn exact_dialect() {
    for (pairs, want) in [
        (vec![("type", "dev.knative.example")], Pass),
        (vec![("type", "dev.knative")], Fail),
        (vec![("source", "/src")], Pass),
        (vec![("ext", "extvalue")], Pass),
        (vec![("ext", "EXTVALUE")], Fail),
        (vec![("missing", "x")], Fail),
        (vec![("subject", "sub")], Pass),
        (vec![("time", "x")], Fail),
    ] {
        assert_eq!(result_of(&[exact(&pairs)]), want, "{pairs:?}");
    }
}

#[test]
fn prefix_dialect() {
    for (pairs, want) in [
        (vec![("type", "dev.knative.")], Pass),
        (vec![("type", "dev.knative.example")], Pass),
        (vec![("type", "knative")], Fail),
        (vec![("ext", "ext")], Pass),
        (vec![("count", "7")], Pass),
        (vec![("missing", "x")], Fail),
        (vec![("datacontenttype", "text")], Fail),
    ] {
        assert_eq!(result_of(&[prefix(&pairs)]), want, "{pairs:?}");
    }
}

#[test]
fn suffix_dialect() {
    for (pairs, want) in [
        (vec![("type", ".example")], Pass),
        (vec![("type", "dev.knative.example")], Pass),
        (vec![("type", "dev.knative")], Fail),
        (vec![("ext", "value")], Pass),
        (vec![("missing", "x")], Fail),
    ] {
        assert_eq!(result_of(&[suffix(&pairs)]), want, "{pairs:?}");
    }
}

#[test]
fn all_any_not_combine_like_knative() {
    let yes = || exact(&[("type", "dev.knative.example")]);
    let no = || exact(&[("type", "nope")]);
    // An entry without a dialect materializes to nothing (Knative skips it).
    let none = SubscriptionsApiFilter::default;
    for (filters, want, why) in [
        (vec![yes()], Pass, "single filter"),
        (vec![yes(), no()], Fail, "spec.filters is an implicit all"),
        (vec![none()], NoFilter, "no dialect: skipped"),
        (vec![all(vec![yes(), yes()])], Pass, "all pass"),
        (vec![all(vec![yes(), no()])], Fail, "all with one fail"),
        (vec![any(vec![no(), yes()])], Pass, "any with one pass"),
        (vec![any(vec![no(), no()])], Fail, "any all fail"),
        (vec![not(yes())], Fail, "not pass"),
        (vec![not(no())], Pass, "not fail"),
        (vec![not(none())], NoFilter, "not of nothing is no filter"),
        (vec![not(not(yes()))], Pass, "double not"),
        (
            vec![any(vec![none(), no()])],
            Fail,
            "any: NoFilter is neutral",
        ),
        (
            vec![all(vec![yes(), not(none())])],
            NoFilter,
            "Knative's all returns the last result",
        ),
        (
            vec![not(all(vec![yes(), not(none())]))],
            NoFilter,
            "so not(all(pass, nofilter)) is no filter",
        ),
        (
            vec![all(vec![
                exact(&[("type", "dev.knative.example")]),
                cesql("ext = 'extvalue'"),
            ])],
            Pass,
            "mixed dialects",
        ),
        (
            vec![exact(&[("type", "")])],
            NoFilter,
            "empty value: Knative ignores the entry",
        ),
    ] {
        assert_eq!(result_of(&filters), want, "{why}");
    }
}

#[test]
fn cesql_dialect_passes_only_on_true_without_errors() {
    for (expr, want) in [
        ("type = 'dev.knative.example'", Pass),
        ("type LIKE 'dev.%' AND EXISTS subject", Pass),
        ("count > 5 AND flag", Pass),
        ("type = 'other'", Fail),
        ("missing = 'x'", Fail),
        ("NOT (missing = 'x')", Fail),
        ("1 / 0 = 0", Fail),
        ("'not a boolean'", Fail),
        ("count", Fail),
        ("NOSUCHFUNCTION(1)", Fail),
    ] {
        assert_eq!(result_of(&[cesql(expr)]), want, "{expr}");
    }
}

#[test]
fn filters_win_over_attributes() {
    let attrs = TriggerFilter {
        attributes: map(&[("type", "nope")]),
    };
    let filter =
        Filter::compile(Some(&attrs), &[exact(&[("type", "dev.knative.example")])]).unwrap();
    assert!(
        filter.matches(&event()),
        "Knative: non-empty spec.filters ignores spec.filter"
    );
    let filter = Filter::compile(Some(&attrs), &[]).unwrap();
    assert!(
        !filter.matches(&event()),
        "empty spec.filters: spec.filter applies"
    );
    let filter = Filter::compile(None, &[]).unwrap();
    assert_eq!(filter.evaluate(&event()), NoFilter);
    assert!(filter.matches(&event()));
}

#[test]
fn validation_errors_name_the_field() {
    let two = SubscriptionsApiFilter {
        exact: Some(map(&[("type", "a")])),
        prefix: Some(map(&[("source", "b")])),
        ..Default::default()
    };
    for (filters, want) in [
        (
            vec![yes_filter(), two],
            "spec.filters[1]: multiple dialects found (exact, prefix), filters can have only one dialect set",
        ),
        (
            vec![cesql("type = ")],
            "spec.filters[0].cesql: invalid CESQL expression \"type = \": column 8: unexpected end of expression, expected an expression",
        ),
        (
            vec![any(vec![yes_filter(), cesql("a LIKE 1")])],
            "spec.filters[0].any[1].cesql: invalid CESQL expression \"a LIKE 1\"",
        ),
        (
            vec![exact(&[("Type", "x")])],
            "spec.filters[0].exact[Type]: invalid key name \"Type\"",
        ),
        (
            vec![prefix(&[("a", "x"), ("b", "y")])],
            "spec.filters[0].prefix: Multiple items found, can have only one key-value",
        ),
    ] {
        let err = Filter::compile(None, &filters).expect_err(want).to_string();
        assert!(
            err.contains(want),
            "got {err:?}, want it to contain {want:?}"
        );
    }
    let attrs = TriggerFilter {
        attributes: map(&[("my-ext", "x")]),
    };
    let err = Filter::compile(Some(&attrs), &[]).unwrap_err().to_string();
    assert!(
        err.contains("spec.filter.attributes[my-ext]: invalid key name"),
        "{err}"
    );
}

fn yes_filter() -> SubscriptionsApiFilter {
    exact(&[("type", "dev.knative.example")])
}

#[test]
fn filter_is_send_and_sync() {
    fn check<T: Send + Sync + Clone + 'static>() {}
    check::<Filter>();
    check::<cesql::Expression>();
}

#[test]
fn compiles_an_untyped_trigger_spec() {
    let spec = serde_json::json!({
        "broker": "default",
        "filter": {"attributes": {"type": "nope"}},
        "filters": [{"any": [{"exact": {"type": "dev.knative.example"}}, {"cesql": "ext = 'x'"}]}],
        "subscriber": {"uri": "http://example.com"}
    });
    assert!(
        Filter::compile_trigger_spec(&spec)
            .unwrap()
            .matches(&event())
    );
    let spec = serde_json::json!({"filter": {"attributes": {"type": "nope"}}});
    assert!(
        !Filter::compile_trigger_spec(&spec)
            .unwrap()
            .matches(&event())
    );
    let spec = serde_json::json!({"broker": "default"});
    assert_eq!(
        Filter::compile_trigger_spec(&spec)
            .unwrap()
            .evaluate(&event()),
        NoFilter
    );
    let spec = serde_json::json!({"filters": [{"exactt": {"type": "x"}}]});
    let err = Filter::compile_trigger_spec(&spec).unwrap_err().to_string();
    assert!(
        err.contains("spec.filters: unknown field `exactt`"),
        "{err}"
    );
}
