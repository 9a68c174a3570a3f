//! The CESQL grammar (CESQLParser.g4 of the CloudEvents spec), by precedence climbing. From the
//! loosest to the tightest binding, as in the ANTLR grammar:
//! 1. `AND`, `OR`, `XOR`, one level, right-associative;
//! 2. comparisons `= != <> < <= > >=`;
//! 3. `+ -`; 4. `* / %`;
//! 5. postfix `[NOT] LIKE 'pattern'` and `[NOT] IN (set)`;
//! 6. prefix `NOT` and `-` (so `NOT a = b` is `(NOT a) = b`, as in the grammar);
//! 7. literals, identifiers, `EXISTS identifier`, function calls and `( expression )`.

use super::ParseError;
use super::Value;
use super::functions::Builtin;
use super::lexer::{Spanned, Tok, tokenize};
use super::like::Pattern;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum BinaryOp {
    And,
    Or,
    Xor,
    Eq,
    NotEq,
    Less,
    LessEq,
    Greater,
    GreaterEq,
    Add,
    Sub,
    Mul,
    Div,
    Mod,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Node {
    Literal(Value),
    /// A context attribute or extension, lowercased.
    Identifier(String),
    Exists(String),
    Not(Box<Node>),
    Negate(Box<Node>),
    Binary(BinaryOp, Box<Node>, Box<Node>),
    Like {
        operand: Box<Node>,
        pattern: Pattern,
        negated: bool,
    },
    In {
        operand: Box<Node>,
        set: Vec<Node>,
        negated: bool,
    },
    /// `function` is None when no built-in has this name and arity (a missingFunction error at
    /// evaluation, as the spec and its TCK want).
    Call {
        name: String,
        function: Option<Builtin>,
        args: Vec<Node>,
    },
}

impl Node {
    pub(super) fn unknown_calls(&self, out: &mut Vec<String>) {
        match self {
            Node::Literal(_) | Node::Identifier(_) | Node::Exists(_) => {}
            Node::Not(n) | Node::Negate(n) => n.unknown_calls(out),
            Node::Binary(_, l, r) => {
                l.unknown_calls(out);
                r.unknown_calls(out);
            }
            Node::Like { operand, .. } => operand.unknown_calls(out),
            Node::In { operand, set, .. } => {
                operand.unknown_calls(out);
                set.iter().for_each(|n| n.unknown_calls(out));
            }
            Node::Call {
                name,
                function,
                args,
            } => {
                if function.is_none() {
                    out.push(format!(
                        "no function {name} taking {} argument(s)",
                        args.len()
                    ));
                }
                args.iter().for_each(|n| n.unknown_calls(out));
            }
        }
    }
}

const KEYWORDS: &[&str] = &[
    "AND", "OR", "XOR", "NOT", "LIKE", "EXISTS", "IN", "TRUE", "FALSE",
];

pub(super) fn parse(source: &str) -> Result<Node, ParseError> {
    let tokens = tokenize(source)?;
    let mut p = Parser {
        tokens,
        pos: 0,
        depth: 0,
    };
    let node = p.logic()?;
    if p.peek() != &Tok::Eof {
        return Err(p.unexpected("an operator or the end of the expression"));
    }
    Ok(node)
}

/// How deep an expression may nest (parentheses, function arguments, NOT and minus chains, and the
/// right-associative AND/OR/XOR chains). The parser, the evaluator and the tree's drop all recurse,
/// so an unbounded depth lets one Trigger's filter overflow the broker's stack (found by the `cesql`
/// fuzz target); Knative's ANTLR parser on Go's growable stacks has no such limit, and no real filter
/// comes near this one.
pub(super) const MAX_DEPTH: usize = 128;

struct Parser {
    tokens: Vec<Spanned>,
    pos: usize,
    /// Current recursion depth of `logic` and `unary`.
    depth: usize,
}

impl Parser {
    fn peek(&self) -> &Tok {
        &self.tokens[self.pos].tok
    }

    fn peek_at(&self, ahead: usize) -> &Tok {
        let i = (self.pos + ahead).min(self.tokens.len() - 1);
        &self.tokens[i].tok
    }

    fn column(&self) -> usize {
        self.tokens[self.pos].column
    }

    fn advance(&mut self) -> Tok {
        let t = self.tokens[self.pos].tok.clone();
        if self.pos < self.tokens.len() - 1 {
            self.pos += 1;
        }
        t
    }

    fn is_keyword(&self, ahead: usize, keyword: &str) -> bool {
        matches!(self.peek_at(ahead), Tok::Word(w) if w.eq_ignore_ascii_case(keyword))
    }

    fn unexpected(&self, expected: &str) -> ParseError {
        ParseError {
            column: self.column(),
            message: format!("unexpected {}, expected {expected}", self.peek().describe()),
        }
    }

    fn expect(&mut self, tok: Tok, expected: &str) -> Result<(), ParseError> {
        if self.peek() == &tok {
            self.advance();
            Ok(())
        } else {
            Err(self.unexpected(expected))
        }
    }

    /// Level 1: AND/OR/XOR, right-associative.
    /// Runs one nested production, refusing to go deeper than [`MAX_DEPTH`].
    fn nested(
        &mut self,
        production: fn(&mut Self) -> Result<Node, ParseError>,
    ) -> Result<Node, ParseError> {
        if self.depth >= MAX_DEPTH {
            return Err(ParseError {
                column: self.column(),
                message: format!("the expression nests deeper than {MAX_DEPTH} levels"),
            });
        }
        self.depth += 1;
        let node = production(self);
        self.depth -= 1;
        node
    }

    fn logic(&mut self) -> Result<Node, ParseError> {
        self.nested(Self::logic_level)
    }

    fn logic_level(&mut self) -> Result<Node, ParseError> {
        let left = self.comparison()?;
        let op = if self.is_keyword(0, "AND") {
            BinaryOp::And
        } else if self.is_keyword(0, "OR") {
            BinaryOp::Or
        } else if self.is_keyword(0, "XOR") {
            BinaryOp::Xor
        } else {
            return Ok(left);
        };
        self.advance();
        let right = self.logic()?;
        Ok(Node::Binary(op, Box::new(left), Box::new(right)))
    }

    fn comparison(&mut self) -> Result<Node, ParseError> {
        let mut left = self.additive()?;
        loop {
            let op = match self.peek() {
                Tok::Eq => BinaryOp::Eq,
                Tok::NotEq | Tok::LessGreater => BinaryOp::NotEq,
                Tok::Less => BinaryOp::Less,
                Tok::LessEq => BinaryOp::LessEq,
                Tok::Greater => BinaryOp::Greater,
                Tok::GreaterEq => BinaryOp::GreaterEq,
                _ => return Ok(left),
            };
            self.advance();
            let right = self.additive()?;
            left = Node::Binary(op, Box::new(left), Box::new(right));
        }
    }

    fn additive(&mut self) -> Result<Node, ParseError> {
        let mut left = self.multiplicative()?;
        loop {
            let op = match self.peek() {
                Tok::Plus => BinaryOp::Add,
                Tok::Minus => BinaryOp::Sub,
                _ => return Ok(left),
            };
            self.advance();
            let right = self.multiplicative()?;
            left = Node::Binary(op, Box::new(left), Box::new(right));
        }
    }

    fn multiplicative(&mut self) -> Result<Node, ParseError> {
        let mut left = self.postfix()?;
        loop {
            let op = match self.peek() {
                Tok::Star => BinaryOp::Mul,
                Tok::Slash => BinaryOp::Div,
                Tok::Percent => BinaryOp::Mod,
                _ => return Ok(left),
            };
            self.advance();
            let right = self.postfix()?;
            left = Node::Binary(op, Box::new(left), Box::new(right));
        }
    }

    /// `x [NOT] LIKE 'pattern'` and `x [NOT] IN (a, b, ...)`.
    fn postfix(&mut self) -> Result<Node, ParseError> {
        let mut operand = self.unary()?;
        loop {
            let negated = self.is_keyword(0, "NOT")
                && (self.is_keyword(1, "LIKE") || self.is_keyword(1, "IN"));
            let at = usize::from(negated);
            if self.is_keyword(at, "LIKE") {
                self.pos += at;
                self.advance();
                let Tok::Str(pattern) = self.peek().clone() else {
                    return Err(self.unexpected(
                        "a string literal: the LIKE pattern must be a string literal",
                    ));
                };
                self.advance();
                operand = Node::Like {
                    operand: Box::new(operand),
                    pattern: Pattern::compile(&pattern),
                    negated,
                };
            } else if self.is_keyword(at, "IN") {
                self.pos += at;
                self.advance();
                self.expect(Tok::LParen, "'(' opening the IN set")?;
                let mut set = vec![self.logic()?];
                while self.peek() == &Tok::Comma {
                    self.advance();
                    set.push(self.logic()?);
                }
                self.expect(Tok::RParen, "',' or ')' closing the IN set")?;
                operand = Node::In {
                    operand: Box::new(operand),
                    set,
                    negated,
                };
            } else {
                return Ok(operand);
            }
        }
    }

    fn unary(&mut self) -> Result<Node, ParseError> {
        self.nested(Self::unary_level)
    }

    fn unary_level(&mut self) -> Result<Node, ParseError> {
        if self.is_keyword(0, "NOT") {
            self.advance();
            return Ok(Node::Not(Box::new(self.unary()?)));
        }
        match self.peek() {
            // A sign directly before digits is part of the literal (INTEGER_LITERAL in the lexer
            // grammar), so -2147483648 is a valid literal.
            Tok::Minus | Tok::Plus if matches!(self.peek_at(1), Tok::Integer(_)) => {
                let negative = self.advance() == Tok::Minus;
                let column = self.column();
                let Tok::Integer(digits) = self.advance() else {
                    unreachable!()
                };
                integer_literal(&digits, negative, column).map(Node::Literal)
            }
            Tok::Minus => {
                self.advance();
                Ok(Node::Negate(Box::new(self.unary()?)))
            }
            _ => self.primary(),
        }
    }

    fn primary(&mut self) -> Result<Node, ParseError> {
        let column = self.column();
        match self.peek().clone() {
            Tok::LParen => {
                self.advance();
                let inner = self.logic()?;
                self.expect(Tok::RParen, "')'")?;
                Ok(inner)
            }
            Tok::Integer(digits) => {
                self.advance();
                integer_literal(&digits, false, column).map(Node::Literal)
            }
            Tok::Str(s) => {
                self.advance();
                Ok(Node::Literal(Value::String(s)))
            }
            Tok::Word(w) if w.eq_ignore_ascii_case("TRUE") => {
                self.advance();
                Ok(Node::Literal(Value::Boolean(true)))
            }
            Tok::Word(w) if w.eq_ignore_ascii_case("FALSE") => {
                self.advance();
                Ok(Node::Literal(Value::Boolean(false)))
            }
            Tok::Word(w) if w.eq_ignore_ascii_case("EXISTS") => {
                self.advance();
                let column = self.column();
                match self.advance() {
                    Tok::Word(name) if is_identifier(&name) => {
                        Ok(Node::Exists(name.to_ascii_lowercase()))
                    }
                    other => Err(ParseError {
                        column,
                        message: format!(
                            "unexpected {}, expected an attribute name after EXISTS",
                            other.describe()
                        ),
                    }),
                }
            }
            Tok::Word(w) if self.peek_at(1) == &Tok::LParen => {
                if KEYWORDS.iter().any(|k| w.eq_ignore_ascii_case(k)) {
                    return Err(self.unexpected("an expression"));
                }
                if !w.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
                    || !w.chars().all(|c| c.is_ascii_alphabetic() || c == '_')
                {
                    return Err(ParseError {
                        column,
                        message: format!("invalid function name '{w}': letters and '_' only"),
                    });
                }
                self.advance();
                self.advance();
                let mut args = Vec::new();
                if self.peek() != &Tok::RParen {
                    args.push(self.logic()?);
                    while self.peek() == &Tok::Comma {
                        self.advance();
                        args.push(self.logic()?);
                    }
                }
                self.expect(Tok::RParen, "',' or ')' closing the function arguments")?;
                let name = w.to_ascii_uppercase();
                let function = Builtin::resolve(&name, args.len());
                Ok(Node::Call {
                    name,
                    function,
                    args,
                })
            }
            Tok::Word(w) if is_identifier(&w) => {
                self.advance();
                Ok(Node::Identifier(w.to_ascii_lowercase()))
            }
            Tok::Word(w) => Err(ParseError {
                column,
                message: format!("unexpected '{w}', expected an expression"),
            }),
            _ => Err(self.unexpected("an expression")),
        }
    }
}

/// An attribute name: letters and digits (CloudEvents naming), not a keyword.
fn is_identifier(w: &str) -> bool {
    w.chars().all(|c| c.is_ascii_alphanumeric())
        && !KEYWORDS.iter().any(|k| w.eq_ignore_ascii_case(k))
}

/// Integer literals must be valid 32-bit signed integers (spec 2.2).
fn integer_literal(digits: &str, negative: bool, column: usize) -> Result<Value, ParseError> {
    let text = if negative {
        format!("-{digits}")
    } else {
        digits.to_string()
    };
    text.parse::<i32>()
        .map(Value::Integer)
        .map_err(|_| ParseError {
            column,
            message: format!("integer literal {text} is outside the 32-bit signed range"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Node {
        parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn lit(i: i32) -> Box<Node> {
        Box::new(Node::Literal(Value::Integer(i)))
    }

    #[test]
    fn multiplication_binds_tighter_than_addition() {
        assert_eq!(
            p("1 + 2 * 3"),
            Node::Binary(
                BinaryOp::Add,
                lit(1),
                Box::new(Node::Binary(BinaryOp::Mul, lit(2), lit(3)))
            )
        );
    }

    #[test]
    fn logic_operators_are_one_right_associative_level() {
        let a = || Box::new(Node::Identifier("a".into()));
        let b = || Box::new(Node::Identifier("b".into()));
        let c = || Box::new(Node::Identifier("c".into()));
        assert_eq!(
            p("a AND b OR c"),
            Node::Binary(
                BinaryOp::And,
                a(),
                Box::new(Node::Binary(BinaryOp::Or, b(), c()))
            )
        );
    }

    #[test]
    fn sign_folds_into_integer_literal() {
        assert_eq!(p("-2147483648"), Node::Literal(Value::Integer(i32::MIN)));
        assert_eq!(p("--10"), Node::Negate(lit(-10)));
        assert_eq!(p("5 -1"), Node::Binary(BinaryOp::Sub, lit(5), lit(1)));
        assert!(parse("2147483648").is_err());
    }

    #[test]
    fn keywords_and_identifiers_are_case_insensitive() {
        assert_eq!(p("EXISTS SOURCE"), Node::Exists("source".into()));
        assert_eq!(p("tRuE"), Node::Literal(Value::Boolean(true)));
        assert!(
            matches!(p("int(hop)"), Node::Call { ref name, function: Some(_), .. } if name == "INT")
        );
    }

    #[test]
    fn nesting_is_bounded_so_a_filter_cannot_overflow_the_stack() {
        let parens = |n: usize| format!("{}1{}", "(".repeat(n), ")".repeat(n));
        // Each level of parentheses is one `logic` and one `unary`.
        assert!(parse(&parens(MAX_DEPTH / 2 - 1)).is_ok());
        for deep in [
            parens(100_000),
            format!("{}TRUE", "NOT ".repeat(100_000)),
            format!("{}1", "- ".repeat(100_000)),
            vec!["a"; 100_000].join(" AND "),
            format!("{}1{}", "abs(".repeat(100_000), ")".repeat(100_000)),
        ] {
            let e = parse(&deep).expect_err("too deep");
            assert!(e.message.contains("nests deeper"), "{e}");
        }
    }

    #[test]
    fn parse_errors_name_the_column() {
        for (src, column) in [
            ("ABC(", 5),
            ("x LIKE 123", 8),
            ("a = ", 5),
            ("(1 + 2", 7),
            ("1 2", 3),
            ("a IN ()", 7),
        ] {
            let e = parse(src).expect_err(src);
            assert_eq!(e.column, column, "{src}: {e}");
        }
    }
}
