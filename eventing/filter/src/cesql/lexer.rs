//! CESQL tokens (CESQLLexer.g4 of the CloudEvents spec), case-insensitive for keywords.

use super::ParseError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Tok {
    LParen,
    RParen,
    Comma,
    Star,
    Slash,
    Percent,
    Plus,
    Minus,
    Eq,
    NotEq,
    LessGreater,
    Less,
    LessEq,
    Greater,
    GreaterEq,
    /// Unsigned digits; the sign is a separate token (the parser folds `-` into a literal).
    Integer(String),
    Str(String),
    /// A run of letters, digits and `_`: keyword, identifier or function name.
    Word(String),
    Eof,
}

impl Tok {
    pub(super) fn describe(&self) -> String {
        match self {
            Tok::Integer(d) => format!("integer {d}"),
            Tok::Str(s) => format!("string {s:?}"),
            Tok::Word(w) => format!("'{w}'"),
            Tok::Eof => "end of expression".to_string(),
            other => format!("'{}'", other.symbol()),
        }
    }

    fn symbol(&self) -> &'static str {
        match self {
            Tok::LParen => "(",
            Tok::RParen => ")",
            Tok::Comma => ",",
            Tok::Star => "*",
            Tok::Slash => "/",
            Tok::Percent => "%",
            Tok::Plus => "+",
            Tok::Minus => "-",
            Tok::Eq => "=",
            Tok::NotEq => "!=",
            Tok::LessGreater => "<>",
            Tok::Less => "<",
            Tok::LessEq => "<=",
            Tok::Greater => ">",
            Tok::GreaterEq => ">=",
            _ => "",
        }
    }
}

/// A token and its 1-based character column.
#[derive(Debug, Clone)]
pub(super) struct Spanned {
    pub tok: Tok,
    pub column: usize,
}

pub(super) fn tokenize(source: &str) -> Result<Vec<Spanned>, ParseError> {
    let chars: Vec<char> = source.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let column = i + 1;
        let two = |next: char| chars.get(i + 1) == Some(&next);
        let (tok, len) = match c {
            ' ' | '\t' | '\r' | '\n' => {
                i += 1;
                continue;
            }
            '(' => (Tok::LParen, 1),
            ')' => (Tok::RParen, 1),
            ',' => (Tok::Comma, 1),
            '*' => (Tok::Star, 1),
            '/' => (Tok::Slash, 1),
            '%' => (Tok::Percent, 1),
            '+' => (Tok::Plus, 1),
            '-' => (Tok::Minus, 1),
            '=' => (Tok::Eq, 1),
            '!' if two('=') => (Tok::NotEq, 2),
            '<' if two('>') => (Tok::LessGreater, 2),
            '<' if two('=') => (Tok::LessEq, 2),
            '<' => (Tok::Less, 1),
            '>' if two('=') => (Tok::GreaterEq, 2),
            '>' => (Tok::Greater, 1),
            '\'' | '"' => {
                let (s, len) = string_literal(&chars, i)?;
                (Tok::Str(s), len)
            }
            c if c.is_ascii_alphanumeric() || c == '_' => {
                let len = chars[i..]
                    .iter()
                    .take_while(|c| c.is_ascii_alphanumeric() || **c == '_')
                    .count();
                let word: String = chars[i..i + len].iter().collect();
                if word.chars().all(|c| c.is_ascii_digit()) {
                    (Tok::Integer(word), len)
                } else {
                    (Tok::Word(word), len)
                }
            }
            other => {
                return Err(ParseError {
                    column,
                    message: format!("unexpected character {other:?}"),
                });
            }
        };
        out.push(Spanned { tok, column });
        i += len;
    }
    out.push(Spanned {
        tok: Tok::Eof,
        column: chars.len() + 1,
    });
    Ok(out)
}

/// A '...' or "..." literal starting at `start`. Inside, `\'` and `\"` stand for the quote and a
/// doubled delimiter (`''`) for one; any other backslash is kept as written, so LIKE patterns keep
/// their `\%` and `\_` escapes (as sdk-go does).
fn string_literal(chars: &[char], start: usize) -> Result<(String, usize), ParseError> {
    let quote = chars[start];
    let mut out = String::new();
    let mut i = start + 1;
    loop {
        match chars.get(i) {
            None => {
                return Err(ParseError {
                    column: start + 1,
                    message: "unterminated string literal".to_string(),
                });
            }
            Some('\\') => match chars.get(i + 1) {
                Some(q @ ('\'' | '"')) => {
                    out.push(*q);
                    i += 2;
                }
                Some(other) => {
                    out.push('\\');
                    out.push(*other);
                    i += 2;
                }
                None => {
                    out.push('\\');
                    i += 1;
                }
            },
            Some(c) if *c == quote => {
                if chars.get(i + 1) == Some(&quote) {
                    out.push(quote);
                    i += 2;
                } else {
                    return Ok((out, i + 1 - start));
                }
            }
            Some(c) => {
                out.push(*c);
                i += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(s: &str) -> Vec<Tok> {
        tokenize(s).unwrap().into_iter().map(|t| t.tok).collect()
    }

    #[test]
    fn operators_and_words() {
        assert_eq!(
            toks("a<>b != 1 <= >= ( ) , CONCAT_WS"),
            vec![
                Tok::Word("a".into()),
                Tok::LessGreater,
                Tok::Word("b".into()),
                Tok::NotEq,
                Tok::Integer("1".into()),
                Tok::LessEq,
                Tok::GreaterEq,
                Tok::LParen,
                Tok::RParen,
                Tok::Comma,
                Tok::Word("CONCAT_WS".into()),
                Tok::Eof
            ]
        );
    }

    #[test]
    fn string_escapes() {
        for (src, want) in [
            (r#"'a"b\'c'"#, r#"a"b'c"#),
            (r#""a'b\"c""#, r#"a'b"c"#),
            (r"'ab\c'", r"ab\c"),
            (r"'a\%b'", r"a\%b"),
            ("'it''s'", "it's"),
            ("''", ""),
        ] {
            assert_eq!(
                toks(src),
                vec![Tok::Str(want.to_string()), Tok::Eof],
                "{src}"
            );
        }
    }

    #[test]
    fn errors_name_the_column() {
        let e = tokenize("a = 'abc").unwrap_err();
        assert_eq!(e.column, 5);
        let e = tokenize("a # b").unwrap_err();
        assert_eq!(e.column, 3);
    }
}
