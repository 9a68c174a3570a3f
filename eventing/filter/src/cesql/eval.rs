//! Evaluation in "complete evaluation mode" (spec 4.1): every expression yields a value, and errors
//! are collected on the way.

use cloudevents::Event;

use super::parser::{BinaryOp, Node};
use super::{ErrorKind, EvalError, Evaluation, Type, Value};
use crate::event::{AttributeValue, lookup};

/// The error list of one evaluation.
#[derive(Debug, Default)]
pub(crate) struct Errors(Vec<EvalError>);

impl Errors {
    pub(crate) fn raise(&mut self, kind: ErrorKind, message: String) {
        self.0.push(EvalError { kind, message });
    }

    fn count(&self) -> usize {
        self.0.len()
    }
}

pub(super) fn evaluate(root: &Node, event: &Event) -> Evaluation {
    let mut errors = Errors::default();
    let value = Evaluator { event }.eval(root, &mut errors);
    Evaluation {
        value,
        errors: errors.0,
    }
}

/// A string as a CESQL Integer: an optional sign and decimal digits, in the 32-bit range.
pub(crate) fn to_int(s: &str) -> Option<i32> {
    s.parse::<i32>().ok()
}

/// Implicit casting (spec 3.7). A failed cast raises a cast error and yields the zero value of the
/// target type. Integer to Boolean is not an implicit cast (the TCK's `NOT 10` is a cast error),
/// only the BOOL function does it.
pub(crate) fn cast(value: Value, target: Type, errors: &mut Errors) -> Value {
    match (value, target) {
        (v @ Value::Boolean(_), Type::Boolean)
        | (v @ Value::Integer(_), Type::Integer)
        | (v @ Value::String(_), Type::String) => v,
        (Value::Boolean(b), Type::String) => Value::String(b.to_string()),
        (Value::Integer(i), Type::String) => Value::String(i.to_string()),
        (Value::Boolean(b), Type::Integer) => Value::Integer(i32::from(b)),
        (Value::String(s), Type::Integer) => match to_int(&s) {
            Some(i) => Value::Integer(i),
            None => {
                errors.raise(
                    ErrorKind::Cast,
                    format!("cannot cast String {s:?} to Integer"),
                );
                Value::Integer(0)
            }
        },
        (Value::String(s), Type::Boolean) => {
            if s.eq_ignore_ascii_case("true") {
                Value::Boolean(true)
            } else if s.eq_ignore_ascii_case("false") {
                Value::Boolean(false)
            } else {
                errors.raise(
                    ErrorKind::Cast,
                    format!("cannot cast String {s:?} to Boolean"),
                );
                Value::Boolean(false)
            }
        }
        (Value::Integer(i), Type::Boolean) => {
            errors.raise(
                ErrorKind::Cast,
                format!("cannot implicitly cast Integer {i} to Boolean"),
            );
            Value::Boolean(false)
        }
    }
}

/// BOOL(x): as the implicit cast, plus Integer to Boolean (0 is false, anything else true).
pub(crate) fn explicit_bool(value: Value, errors: &mut Errors) -> Value {
    match value {
        Value::Integer(i) => Value::Boolean(i != 0),
        v => cast(v, Type::Boolean, errors),
    }
}

struct Evaluator<'e> {
    event: &'e Event,
}

impl Evaluator<'_> {
    /// Evaluates `node`; `Err(())` when the subexpression raised an error (already recorded), so the
    /// parent returns its zero value without computing.
    fn operand(&self, node: &Node, errors: &mut Errors) -> Result<Value, ()> {
        let before = errors.count();
        let v = self.eval(node, errors);
        if errors.count() > before {
            Err(())
        } else {
            Ok(v)
        }
    }

    fn boolean(&self, node: &Node, errors: &mut Errors) -> Result<bool, ()> {
        let v = self.operand(node, errors)?;
        Ok(matches!(
            cast(v, Type::Boolean, errors),
            Value::Boolean(true)
        ))
    }

    fn integer(&self, node: &Node, errors: &mut Errors) -> Result<i32, ()> {
        let v = self.operand(node, errors)?;
        match cast(v, Type::Integer, errors) {
            Value::Integer(i) => Ok(i),
            _ => Ok(0),
        }
    }

    fn eval(&self, node: &Node, errors: &mut Errors) -> Value {
        match node {
            Node::Literal(v) => v.clone(),
            Node::Identifier(name) => match lookup(self.event, name) {
                Some(AttributeValue::String(s)) => Value::String(s),
                Some(AttributeValue::Boolean(b)) => Value::Boolean(b),
                Some(AttributeValue::Integer(i)) => match i32::try_from(i) {
                    Ok(i) => Value::Integer(i),
                    // An extension beyond CESQL's 32-bit range is read as its decimal string.
                    Err(_) => Value::String(i.to_string()),
                },
                None => {
                    // Spec 3.2: a missing attribute evaluates to false (and the TCK wants the error).
                    errors.raise(
                        ErrorKind::MissingAttribute,
                        format!("attribute {name} is not in the event"),
                    );
                    Value::Boolean(false)
                }
            },
            Node::Exists(name) => Value::Boolean(lookup(self.event, name).is_some()),
            Node::Not(inner) => {
                Value::Boolean(self.boolean(inner, errors).map(|b| !b).unwrap_or(false))
            }
            Node::Negate(inner) => Value::Integer(match self.integer(inner, errors) {
                Ok(i) => i.checked_neg().unwrap_or_else(|| {
                    errors.raise(
                        ErrorKind::Math,
                        format!("-({i}) overflows a 32-bit integer"),
                    );
                    i32::MAX
                }),
                Err(()) => 0,
            }),
            Node::Binary(op, left, right) => self.binary(*op, left, right, errors),
            Node::Like {
                operand,
                pattern,
                negated,
            } => Value::Boolean(match self.operand(operand, errors) {
                Ok(v) => {
                    let Value::String(s) = cast(v, Type::String, errors) else {
                        unreachable!()
                    };
                    pattern.matches(&s) != *negated
                }
                Err(()) => false,
            }),
            Node::In {
                operand,
                set,
                negated,
            } => Value::Boolean(
                self.is_in(operand, set, errors)
                    .is_ok_and(|found| found != *negated),
            ),
            Node::Call {
                name,
                function,
                args,
            } => {
                let before = errors.count();
                let values: Vec<Value> = args.iter().map(|a| self.eval(a, errors)).collect();
                let Some(function) = function else {
                    errors.raise(
                        ErrorKind::MissingFunction,
                        format!("no function {name} taking {} argument(s)", args.len()),
                    );
                    return Value::Boolean(false);
                };
                if errors.count() > before {
                    return function.return_type().zero();
                }
                function.call(values, errors)
            }
        }
    }

    fn is_in(&self, operand: &Node, set: &[Node], errors: &mut Errors) -> Result<bool, ()> {
        let x = self.operand(operand, errors)?;
        let mut found = false;
        let mut failed = false;
        // Every element is evaluated (the evaluation flow is static); the elements are cast to
        // the left operand's type (spec 3.7, the IN rule).
        for element in set {
            match self.operand(element, errors) {
                Ok(v) => found |= cast(v, x.value_type(), errors) == x,
                Err(()) => failed = true,
            }
        }
        if failed { Err(()) } else { Ok(found) }
    }

    fn binary(&self, op: BinaryOp, left: &Node, right: &Node, errors: &mut Errors) -> Value {
        use BinaryOp::*;
        match op {
            // Short-circuit (spec 3.4.2): the right operand is evaluated only when needed.
            And => Value::Boolean(
                self.boolean(left, errors)
                    .and_then(|l| {
                        if l {
                            self.boolean(right, errors)
                        } else {
                            Ok(false)
                        }
                    })
                    .unwrap_or(false),
            ),
            Or => Value::Boolean(
                self.boolean(left, errors)
                    .and_then(|l| {
                        if l {
                            Ok(true)
                        } else {
                            self.boolean(right, errors)
                        }
                    })
                    .unwrap_or(false),
            ),
            Xor => {
                let l = self.boolean(left, errors);
                let r = self.boolean(right, errors);
                Value::Boolean(matches!((l, r), (Ok(l), Ok(r)) if l != r))
            }
            Eq | NotEq => {
                let l = self.operand(left, errors);
                let r = self.operand(right, errors);
                let (Ok(l), Ok(r)) = (l, r) else {
                    return Value::Boolean(false);
                };
                // `=` is ambiguous: the right operand's type picks the overload, the left is cast.
                let l = cast(l, r.value_type(), errors);
                Value::Boolean((l == r) == (op == Eq))
            }
            Less | LessEq | Greater | GreaterEq => {
                let l = self.integer(left, errors);
                let r = self.integer(right, errors);
                let (Ok(l), Ok(r)) = (l, r) else {
                    return Value::Boolean(false);
                };
                Value::Boolean(match op {
                    Less => l < r,
                    LessEq => l <= r,
                    Greater => l > r,
                    _ => l >= r,
                })
            }
            Add | Sub | Mul | Div | Mod => {
                let l = self.integer(left, errors);
                let r = self.integer(right, errors);
                let (Ok(l), Ok(r)) = (l, r) else {
                    return Value::Integer(0);
                };
                if matches!(op, Div | Mod) && r == 0 {
                    errors.raise(
                        ErrorKind::Math,
                        format!(
                            "division by zero in {l} {} 0",
                            if op == Div { "/" } else { "%" }
                        ),
                    );
                    return Value::Integer(0);
                }
                // Truncated division and remainder (Rust's / and % on integers).
                let result = match op {
                    Add => l.checked_add(r),
                    Sub => l.checked_sub(r),
                    Mul => l.checked_mul(r),
                    Div => l.checked_div(r),
                    _ => l.checked_rem(r),
                };
                Value::Integer(result.unwrap_or_else(|| {
                    errors.raise(
                        ErrorKind::Math,
                        format!("{op:?} of {l} and {r} overflows a 32-bit integer"),
                    );
                    0
                }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use cloudevents::{EventBuilder, EventBuilderV10};

    use super::super::{ErrorKind, Value, parse};
    use ErrorKind::*;

    fn event() -> cloudevents::Event {
        EventBuilderV10::new()
            .id("1")
            .source("/s")
            .ty("t")
            .extension("big", 3_000_000_000_i64)
            .extension("num", "42")
            .extension("word", "héllo")
            .build()
            .unwrap()
    }

    fn eval(src: &str) -> (Value, Vec<ErrorKind>) {
        let r = parse(src)
            .unwrap_or_else(|e| panic!("{src}: {e}"))
            .evaluate(&event());
        (r.value, r.errors.into_iter().map(|e| e.kind).collect())
    }

    #[test]
    fn evaluation_table() {
        let b = Value::Boolean;
        let i = Value::Integer;
        let s = |v: &str| Value::String(v.to_string());
        for (src, value, errors) in [
            // Precedence: * before +, + before comparison, comparison before logic.
            ("1 + 2 * 3 = 7 AND TRUE", b(true), vec![]),
            ("7 - 2 - 1", i(4), vec![]),
            ("-7 / 2", i(-3), vec![]),
            ("-7 % 2", i(-1), vec![]),
            // The grammar binds NOT tighter than '=': (NOT 'a') = 'b' is a cast error.
            ("NOT 'a' = 'b'", b(false), vec![Cast]),
            ("NOT ('a' = 'b')", b(true), vec![]),
            // Overflow is a math error with 0 (or MAX for negation/ABS).
            ("2147483647 + 1", i(0), vec![Math]),
            ("-2147483647 - 2", i(0), vec![Math]),
            ("-(-2147483648)", i(i32::MAX), vec![Math]),
            ("-2147483648 / -1", i(0), vec![Math]),
            // Errors in operands give the zero value of the operator's type.
            ("1 IN (missing, 1)", b(false), vec![MissingAttribute]),
            ("missing XOR TRUE", b(false), vec![MissingAttribute]),
            ("LENGTH(missing)", i(0), vec![MissingAttribute]),
            ("UPPER(missing)", s(""), vec![MissingAttribute]),
            ("TRUE OR missing", b(true), vec![]),
            ("FALSE AND missing", b(false), vec![]),
            // Implicit casts.
            ("num = 42", b(true), vec![]),
            ("num + 1", i(43), vec![]),
            ("'abc' + 1", i(1), vec![Cast]),
            ("1 = TRUE", b(false), vec![Cast]),
            ("TRUE = 1", b(true), vec![]),
            ("IS_INT(num)", b(true), vec![]),
            ("IS_INT('x')", b(false), vec![]),
            ("IS_BOOL('False')", b(true), vec![]),
            ("BOOL('yes')", b(false), vec![Cast]),
            // Extensions beyond the 32-bit range read as strings.
            ("big", s("3000000000"), vec![]),
            ("big = '3000000000'", b(true), vec![]),
            // Characters, not bytes.
            ("LENGTH(word)", i(5), vec![]),
            ("word LIKE 'h_llo'", b(true), vec![]),
            ("SUBSTRING(word, 2, 1)", s("é"), vec![]),
            ("RIGHT(word, 4)", s("éllo"), vec![]),
            ("CONCAT_WS('-', 1, TRUE, 'x')", s("1-true-x"), vec![]),
            // Function names are case-insensitive; unknown ones are a missingFunction error.
            ("concat('a', 'b')", s("ab"), vec![]),
            ("NOPE(1)", b(false), vec![MissingFunction]),
            ("ABS(1, 2)", b(false), vec![MissingFunction]),
            // Attributes.
            ("specversion", s("1.0"), vec![]),
            ("EXISTS time", b(false), vec![]),
            ("time", b(false), vec![MissingAttribute]),
        ] {
            assert_eq!(eval(src), (value, errors), "{src}");
        }
    }

    #[test]
    fn unknown_functions_are_reported_without_an_event() {
        let expr = parse("LENGTH('a') = 1 AND NOPE(1, 2)").unwrap();
        assert_eq!(
            expr.static_problems(),
            vec!["no function NOPE taking 2 argument(s)".to_string()]
        );
        assert!(
            parse("CONCAT_WS(',', 'a')")
                .unwrap()
                .static_problems()
                .is_empty()
        );
    }

    #[test]
    fn keywords_are_not_functions() {
        assert!(parse("AND(1)").is_err());
        assert!(parse("EXISTS(x)").is_err());
    }
}
