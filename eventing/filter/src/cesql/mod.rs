//! CloudEvents SQL (CESQL v1): a hand-written lexer, a precedence-climbing parser and an evaluator
//! that follows the spec's error model (a value AND a list of errors; errors never abort evaluation).
//!
//! ```
//! use sluice_event_filter::cesql::{self, Value};
//! let expr = cesql::parse("type LIKE 'com.example.%' AND EXISTS subject").unwrap();
//! # let event = cloudevents::Event::default();
//! let result = expr.evaluate(&event);
//! assert_eq!(result.value, Value::Boolean(false));
//! ```
//!
//! Semantics the CESQL TCK pins down and that this implementation follows:
//! - An absent attribute evaluates to `false` with a `missingAttribute` error.
//! - An operator or function whose operand raised an error returns the zero value of its return
//!   type (`false`, `0`, `""`) and passes the errors on, without computing.
//! - A failed implicit cast raises a `cast` error and yields the zero value of the target type; the
//!   operator then computes with it (`NOT 10` is `true` with a cast error).
//! - AND/OR short-circuit; `=`/`<>` cast the left operand to the right operand's type; `IN` casts
//!   the set elements to the left operand's type; `LIKE` casts its operand to String.

mod eval;
mod functions;
mod lexer;
mod like;
mod parser;

use std::fmt;

use cloudevents::Event;

/// A CESQL value: the three primitive types of the spec. URIs and timestamps are strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Boolean(bool),
    Integer(i32),
    String(String),
}

impl Value {
    pub fn value_type(&self) -> Type {
        match self {
            Value::Boolean(_) => Type::Boolean,
            Value::Integer(_) => Type::Integer,
            Value::String(_) => Type::String,
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Boolean(b) => write!(f, "{b}"),
            Value::Integer(i) => write!(f, "{i}"),
            Value::String(s) => write!(f, "{s:?}"),
        }
    }
}

/// The CESQL types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Type {
    Boolean,
    Integer,
    String,
}

impl Type {
    /// The value a failed operation returns (spec: "the zero value for the return type").
    pub fn zero(self) -> Value {
        match self {
            Type::Boolean => Value::Boolean(false),
            Type::Integer => Value::Integer(0),
            Type::String => Value::String(String::new()),
        }
    }
}

impl fmt::Display for Type {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Type::Boolean => "Boolean",
            Type::Integer => "Integer",
            Type::String => "String",
        })
    }
}

/// The error kinds of the CESQL spec (and its TCK's `error:` names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    Parse,
    Math,
    Cast,
    MissingAttribute,
    MissingFunction,
    FunctionEvaluation,
    Generic,
}

impl ErrorKind {
    /// The TCK's name for the kind (`missingAttribute`, ...).
    pub fn tck_name(self) -> &'static str {
        match self {
            ErrorKind::Parse => "parse",
            ErrorKind::Math => "math",
            ErrorKind::Cast => "cast",
            ErrorKind::MissingAttribute => "missingAttribute",
            ErrorKind::MissingFunction => "missingFunction",
            ErrorKind::FunctionEvaluation => "functionEvaluation",
            ErrorKind::Generic => "generic",
        }
    }
}

/// One error raised while evaluating.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} error: {message}", kind.tck_name())]
pub struct EvalError {
    pub kind: ErrorKind,
    pub message: String,
}

/// The result of evaluating an expression: always a value, plus the errors raised on the way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evaluation {
    pub value: Value,
    pub errors: Vec<EvalError>,
}

impl Evaluation {
    /// CESQL as a filter predicate (spec 1.2): passes only for a Boolean `true` with no error.
    pub fn is_true(&self) -> bool {
        self.errors.is_empty() && self.value == Value::Boolean(true)
    }
}

/// A syntax error, with the 1-based character column where it was found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("column {column}: {message}")]
pub struct ParseError {
    pub column: usize,
    pub message: String,
}

/// A parsed CESQL expression. Cheap to evaluate, `Send + Sync`, immutable.
#[derive(Debug, Clone, PartialEq)]
pub struct Expression {
    source: String,
    root: parser::Node,
}

/// Parses a CESQL expression. Keywords, function names and identifiers are case-insensitive.
pub fn parse(source: &str) -> Result<Expression, ParseError> {
    let root = parser::parse(source)?;
    Ok(Expression {
        source: source.to_string(),
        root,
    })
}

impl Expression {
    /// The expression as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Evaluates against an event: the value and every error raised (complete evaluation mode).
    pub fn evaluate(&self, event: &Event) -> Evaluation {
        eval::evaluate(&self.root, event)
    }

    /// The filter predicate: `true` only when the result is Boolean `true` without errors.
    pub fn matches(&self, event: &Event) -> bool {
        self.evaluate(event).is_true()
    }

    /// Problems found without an event: calls of functions that do not exist or with an arity no
    /// overload takes. Each would raise a `missingFunction` error on every evaluation.
    pub fn static_problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        self.root.unknown_calls(&mut out);
        out
    }
}

impl fmt::Display for Expression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}
