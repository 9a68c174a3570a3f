//! The built-in functions of CESQL v1 (spec 3.5): string manipulation, ABS and the casting
//! functions. Resolved by name and arity at parse time.

use super::eval::{Errors, cast, explicit_bool, to_int};
use super::{ErrorKind, Type, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Builtin {
    Length,
    Concat,
    ConcatWs,
    Lower,
    Upper,
    Trim,
    Left,
    Right,
    Substring,
    SubstringLen,
    Abs,
    Int,
    Bool,
    String,
    IsInt,
    IsBool,
}

impl Builtin {
    /// The overload for this (uppercase) name and number of arguments, if any.
    pub(crate) fn resolve(name: &str, arity: usize) -> Option<Builtin> {
        use Builtin::*;
        let f = match (name, arity) {
            ("LENGTH", 1) => Length,
            ("CONCAT", _) => Concat,
            ("CONCAT_WS", n) if n >= 1 => ConcatWs,
            ("LOWER", 1) => Lower,
            ("UPPER", 1) => Upper,
            ("TRIM", 1) => Trim,
            ("LEFT", 2) => Left,
            ("RIGHT", 2) => Right,
            ("SUBSTRING", 2) => Substring,
            ("SUBSTRING", 3) => SubstringLen,
            ("ABS", 1) => Abs,
            ("INT", 1) => Int,
            ("BOOL", 1) => Bool,
            ("STRING", 1) => String,
            ("IS_INT", 1) => IsInt,
            ("IS_BOOL", 1) => IsBool,
            _ => return None,
        };
        Some(f)
    }

    /// The type of the argument at `index` (None: any type, no implicit cast).
    fn parameter(self, index: usize) -> Option<Type> {
        use Builtin::*;
        match self {
            Int | Bool | String | IsInt | IsBool => None,
            Abs => Some(Type::Integer),
            Left | Right | Substring | SubstringLen if index > 0 => Some(Type::Integer),
            _ => Some(Type::String),
        }
    }

    pub(crate) fn return_type(self) -> Type {
        use Builtin::*;
        match self {
            Length | Abs | Int => Type::Integer,
            Bool | IsInt | IsBool => Type::Boolean,
            _ => Type::String,
        }
    }

    /// Calls the function on already evaluated arguments, casting them to the parameter types.
    pub(crate) fn call(self, args: Vec<Value>, errors: &mut Errors) -> Value {
        let args: Vec<Value> = args
            .into_iter()
            .enumerate()
            .map(|(i, v)| match self.parameter(i) {
                Some(t) => cast(v, t, errors),
                None => v,
            })
            .collect();
        let s = |i: usize| match &args[i] {
            Value::String(s) => s.as_str(),
            _ => "",
        };
        let n = |i: usize| match args[i] {
            Value::Integer(n) => n,
            _ => 0,
        };
        use Builtin::*;
        match self {
            Length => Value::Integer(i32::try_from(s(0).chars().count()).unwrap_or(i32::MAX)),
            Concat => Value::String((0..args.len()).map(s).collect()),
            ConcatWs => Value::String((1..args.len()).map(s).collect::<Vec<_>>().join(s(0))),
            Lower => Value::String(s(0).to_lowercase()),
            Upper => Value::String(s(0).to_uppercase()),
            Trim => Value::String(s(0).trim().to_string()),
            Left | Right => {
                let (x, y) = (s(0), n(1));
                if y < 0 {
                    errors.raise(
                        ErrorKind::FunctionEvaluation,
                        format!("{self:?}: negative length {y}"),
                    );
                    return Value::String(x.to_string());
                }
                let len = x.chars().count();
                let take = (y as usize).min(len);
                let out: std::string::String = if self == Left {
                    x.chars().take(take).collect()
                } else {
                    x.chars().skip(len - take).collect()
                };
                Value::String(out)
            }
            Substring => substring(s(0), n(1), None, errors),
            SubstringLen => substring(s(0), n(1), Some(n(2)), errors),
            Abs => {
                let x = n(0);
                match x.checked_abs() {
                    Some(a) => Value::Integer(a),
                    None => {
                        // Spec: ABS(-2147483648) returns 2147483647 and a math error.
                        errors.raise(
                            ErrorKind::Math,
                            format!("ABS({x}) overflows a 32-bit integer"),
                        );
                        Value::Integer(i32::MAX)
                    }
                }
            }
            Int => cast(args[0].clone(), Type::Integer, errors),
            Bool => explicit_bool(args[0].clone(), errors),
            String => cast(args[0].clone(), Type::String, errors),
            IsInt => Value::Boolean(match &args[0] {
                Value::Integer(_) => true,
                Value::String(s) => to_int(s).is_some(),
                Value::Boolean(_) => false,
            }),
            IsBool => Value::Boolean(match &args[0] {
                Value::Boolean(_) => true,
                Value::String(s) => {
                    s.eq_ignore_ascii_case("true") || s.eq_ignore_ascii_case("false")
                }
                Value::Integer(_) => false,
            }),
        }
    }
}

/// SUBSTRING(x, pos[, len]), positions in characters from 1; a negative `pos` counts from the end;
/// `pos` 0 gives "". Spec: "" and an error when `pos > LENGTH(x) OR pos < -LENGTH(x)` or `len < 0`.
fn substring(x: &str, pos: i32, len: Option<i32>, errors: &mut Errors) -> Value {
    let chars: Vec<char> = x.chars().collect();
    let total = i64::try_from(chars.len()).unwrap_or(i64::MAX);
    let pos = i64::from(pos);
    if pos > total || pos < -total {
        errors.raise(
            ErrorKind::FunctionEvaluation,
            format!("SUBSTRING: position {pos} is outside a string of length {total}"),
        );
        return Value::String(String::new());
    }
    if let Some(len) = len
        && len < 0
    {
        errors.raise(
            ErrorKind::FunctionEvaluation,
            format!("SUBSTRING: negative length {len}"),
        );
        return Value::String(String::new());
    }
    if pos == 0 {
        return Value::String(String::new());
    }
    let start = if pos > 0 { pos - 1 } else { total + pos } as usize;
    let end = match len {
        Some(len) => (start + len as usize).min(chars.len()),
        None => chars.len(),
    };
    Value::String(chars[start..end].iter().collect())
}
