//! The CESQL TCK (cloudevents/spec cesql/cesql_tck), one test per file, every case checked: the
//! value when the case gives `result`, the error kind when it gives `error` (and no error when it
//! gives none). The YAML files are copied into tests/cesql-tck/ from /work/shared/cesql-tck so the
//! tests do not depend on the shared folder.

use std::collections::BTreeMap;
use std::path::PathBuf;

use cloudevents::event::ExtensionValue;
use cloudevents::{AttributesWriter, Event, EventBuilder, EventBuilderV10};
use serde::Deserialize;
use sluice_event_filter::cesql::{self, ErrorKind, Value};

#[derive(Deserialize)]
struct TckFile {
    name: String,
    tests: Vec<TckCase>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TckCase {
    name: String,
    expression: String,
    #[serde(default)]
    result: Option<serde_yaml::Value>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    event: Option<serde_yaml::Value>,
    #[serde(default)]
    event_overrides: Option<BTreeMap<String, serde_yaml::Value>>,
}

/// The event of cases without `event`: every optional attribute set, a few typed extensions, none
/// of the names the TCK expects to be missing (`missing`, `myext`...).
fn full_event() -> Event {
    EventBuilderV10::new()
        .id("full-event")
        .source("http://localhost/source")
        .ty("com.example.FullEvent")
        .subject("topic")
        .time("2018-04-26T14:48:09+02:00")
        .extension("exbool", true)
        .extension("exint", 42)
        .extension("exstring", "exstring")
        .data_with_schema(
            "text/json",
            url::Url::parse("http://localhost/schema").unwrap(),
            "hello",
        )
        .build()
        .expect("valid full event")
}

fn yaml_to_json(v: &serde_yaml::Value) -> serde_json::Value {
    serde_json::to_value(v).expect("yaml to json")
}

fn input_event(case: &TckCase) -> Result<Event, String> {
    let mut event = match &case.event {
        Some(e) => serde_json::from_value::<Event>(yaml_to_json(e))
            .map_err(|e| format!("bad event: {e}"))?,
        None => full_event(),
    };
    for (k, v) in case.event_overrides.iter().flatten() {
        let as_str = || match v {
            serde_yaml::Value::String(s) => s.clone(),
            other => serde_yaml::to_string(other).unwrap().trim().to_string(),
        };
        match k.as_str() {
            "id" => {
                event.set_id(as_str());
            }
            "source" => {
                event.set_source(as_str());
            }
            "type" => {
                event.set_type(as_str());
            }
            "subject" => {
                event.set_subject(Some(as_str()));
            }
            "datacontenttype" => {
                event.set_datacontenttype(Some(as_str()));
            }
            "dataschema" => {
                event.set_dataschema(Some(url::Url::parse(&as_str()).map_err(|e| e.to_string())?));
            }
            "time" => {
                let t = chrono_parse(&as_str())?;
                event.set_time(Some(t));
            }
            name => {
                let value = match v {
                    serde_yaml::Value::Bool(b) => ExtensionValue::Boolean(*b),
                    serde_yaml::Value::Number(n) if n.is_i64() => {
                        ExtensionValue::Integer(n.as_i64().unwrap())
                    }
                    _ => ExtensionValue::String(as_str()),
                };
                event.set_extension(name, value);
            }
        }
    }
    Ok(event)
}

fn chrono_parse(s: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.to_utc())
        .map_err(|e| format!("bad time {s:?}: {e}"))
}

fn expected_value(v: &serde_yaml::Value) -> Result<Value, String> {
    match v {
        serde_yaml::Value::Bool(b) => Ok(Value::Boolean(*b)),
        serde_yaml::Value::Number(n) => n
            .as_i64()
            .and_then(|i| i32::try_from(i).ok())
            .map(Value::Integer)
            .ok_or_else(|| format!("result {n} is not a 32-bit integer")),
        serde_yaml::Value::String(s) => Ok(Value::String(s.clone())),
        other => Err(format!("unsupported result {other:?}")),
    }
}

fn error_kind(name: &str) -> Result<ErrorKind, String> {
    Ok(match name {
        "parse" => ErrorKind::Parse,
        "math" => ErrorKind::Math,
        "cast" => ErrorKind::Cast,
        "missingAttribute" => ErrorKind::MissingAttribute,
        "missingFunction" => ErrorKind::MissingFunction,
        "functionEvaluation" => ErrorKind::FunctionEvaluation,
        "generic" => ErrorKind::Generic,
        other => return Err(format!("unknown error kind {other}")),
    })
}

/// The same value; for strings that are both RFC 3339 timestamps, the same instant. The one case
/// this covers is "Timestamp type cohercion to string": cloudevents-sdk keeps `time` as UTC, so the
/// event's `+02:00` offset comes back as the same instant written in `Z` form.
fn same_value(got: &Value, want: &Value) -> bool {
    if got == want {
        return true;
    }
    match (got, want) {
        (Value::String(g), Value::String(w)) => match (chrono_parse(g), chrono_parse(w)) {
            (Ok(g), Ok(w)) => g == w,
            _ => false,
        },
        _ => false,
    }
}

fn run_case(case: &TckCase) -> Result<(), String> {
    let expected_error = case.error.as_deref().map(error_kind).transpose()?;
    let parsed = cesql::parse(&case.expression);
    if expected_error == Some(ErrorKind::Parse) {
        return match parsed {
            Err(_) => Ok(()),
            Ok(_) => Err("parsed, want a parse error".to_string()),
        };
    }
    let expr = parsed.map_err(|e| format!("parse error: {e}"))?;
    let event = input_event(case)?;
    let result = expr.evaluate(&event);
    match expected_error {
        Some(kind) => {
            if !result.errors.iter().any(|e| e.kind == kind) {
                return Err(format!(
                    "want a {} error, got {:?}",
                    kind.tck_name(),
                    result.errors
                ));
            }
        }
        None => {
            if !result.errors.is_empty() {
                return Err(format!("want no error, got {:?}", result.errors));
            }
        }
    }
    if let Some(want) = &case.result {
        let want = expected_value(want)?;
        if !same_value(&result.value, &want) {
            return Err(format!("value {:?}, want {want:?}", result.value));
        }
    }
    Ok(())
}

fn run_file(file: &str) {
    let path: PathBuf = [
        env!("CARGO_MANIFEST_DIR"),
        "tests",
        "cesql-tck",
        &format!("{file}.yaml"),
    ]
    .iter()
    .collect();
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let tck: TckFile =
        serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let failures: Vec<String> = tck
        .tests
        .iter()
        .filter_map(|case| {
            run_case(case)
                .err()
                .map(|why| format!("  {} [{}]: {why}", case.name, case.expression))
        })
        .collect();
    println!(
        "TCK {file} ({}): {} of {} cases passed",
        tck.name,
        tck.tests.len() - failures.len(),
        tck.tests.len()
    );
    assert!(
        failures.is_empty(),
        "TCK {file}: {} of {} cases failed:\n{}",
        failures.len(),
        tck.tests.len(),
        failures.join("\n")
    );
}

macro_rules! tck_files {
    ($($file:ident),* $(,)?) => {
        $(#[test] fn $file() { run_file(stringify!($file)); })*

        /// Every YAML file of the copied TCK has a test above.
        #[test]
        fn every_tck_file_has_a_test() {
            let dir: PathBuf = [env!("CARGO_MANIFEST_DIR"), "tests", "cesql-tck"].iter().collect();
            let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
                .unwrap()
                .filter_map(|e| e.ok()?.file_name().to_str()?.strip_suffix(".yaml").map(str::to_string))
                .collect();
            on_disk.sort();
            let mut tested = vec![$(stringify!($file).to_string()),*];
            tested.sort();
            assert_eq!(on_disk, tested);
        }
    };
}

tck_files!(
    binary_comparison_operators,
    binary_logical_operators,
    binary_math_operators,
    case_sensitivity,
    casting_functions,
    context_attributes_access,
    exists_expression,
    in_expression,
    integer_builtin_functions,
    like_expression,
    literals,
    negate_operator,
    not_operator,
    parse_errors,
    spec_examples,
    string_builtin_functions,
    sub_expression,
    subscriptions_api_recreations,
);

/// The harness itself fails a case whose value, error or parse outcome differs from the file.
#[test]
fn harness_rejects_wrong_expectations() {
    let case = |expression: &str, result: Option<serde_yaml::Value>, error: Option<&str>| TckCase {
        name: "self-test".to_string(),
        expression: expression.to_string(),
        result,
        error: error.map(str::to_string),
        event: None,
        event_overrides: None,
    };
    assert!(run_case(&case("1 + 1", Some(2.into()), None)).is_ok());
    assert!(run_case(&case("1 + 1", Some(3.into()), None)).is_err());
    assert!(run_case(&case("1 + 1", Some("2".into()), None)).is_err());
    assert!(run_case(&case("1 / 0", Some(0.into()), None)).is_err());
    assert!(run_case(&case("1 / 0", Some(0.into()), Some("cast"))).is_err());
    assert!(run_case(&case("1 +", None, None)).is_err());
    assert!(run_case(&case("1 + 1", None, Some("parse"))).is_err());
    assert!(run_case(&case("time", Some("2018-04-26T12:48:09Z".into()), None)).is_ok());
    assert!(run_case(&case("time", Some("2018-04-26T12:48:10Z".into()), None)).is_err());
}

/// The copy in tests/cesql-tck/ is the shared snapshot, byte for byte (checked where the shared
/// folder is beside the checkout, as in the project's workspace; skipped elsewhere).
#[test]
fn tck_copy_matches_shared_snapshot() {
    let shared: PathBuf = [
        env!("CARGO_MANIFEST_DIR"),
        "..",
        "..",
        "..",
        "shared",
        "cesql-tck",
    ]
    .iter()
    .collect();
    let Ok(entries) = std::fs::read_dir(&shared) else {
        println!("{} not found: skipping the comparison", shared.display());
        return;
    };
    let copy: PathBuf = [env!("CARGO_MANIFEST_DIR"), "tests", "cesql-tck"]
        .iter()
        .collect();
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().ends_with(".yaml") {
            continue;
        }
        let want = std::fs::read(entry.path()).unwrap();
        let got = std::fs::read(copy.join(&name)).unwrap_or_default();
        assert!(
            got == want,
            "tests/cesql-tck/{} differs from {}: copy it again",
            name.to_string_lossy(),
            shared.display()
        );
    }
}
