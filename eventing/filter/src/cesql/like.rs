//! LIKE patterns: `%` any run of characters, `_` one character, `\%` and `\_` the literal
//! characters. Any other backslash is a literal backslash (as in sdk-go's matcher).

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Char(char),
    One,
    Many,
}

/// A LIKE pattern compiled once at parse time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Pattern(Vec<Part>);

impl Pattern {
    pub(crate) fn compile(pattern: &str) -> Pattern {
        let chars: Vec<char> = pattern.chars().collect();
        let mut parts = Vec::with_capacity(chars.len());
        let mut i = 0;
        while i < chars.len() {
            match chars[i] {
                '\\' if matches!(chars.get(i + 1), Some('%' | '_')) => {
                    parts.push(Part::Char(chars[i + 1]));
                    i += 2;
                    continue;
                }
                '%' => {
                    // Consecutive % are one.
                    if parts.last() != Some(&Part::Many) {
                        parts.push(Part::Many);
                    }
                }
                '_' => parts.push(Part::One),
                c => parts.push(Part::Char(c)),
            }
            i += 1;
        }
        Pattern(parts)
    }

    /// Whole-string match; backtracks only to the last `%` (linear in practice, no regex).
    pub(crate) fn matches(&self, text: &str) -> bool {
        let text: Vec<char> = text.chars().collect();
        let parts = &self.0;
        let (mut t, mut p) = (0, 0);
        let mut star: Option<(usize, usize)> = None;
        while t < text.len() {
            match parts.get(p) {
                Some(Part::Char(c)) if *c == text[t] => {
                    t += 1;
                    p += 1;
                }
                Some(Part::One) => {
                    t += 1;
                    p += 1;
                }
                Some(Part::Many) => {
                    star = Some((p, t));
                    p += 1;
                }
                _ => match star {
                    Some((sp, st)) => {
                        p = sp + 1;
                        t = st + 1;
                        star = Some((sp, st + 1));
                    }
                    None => return false,
                },
            }
        }
        parts[p..].iter().all(|part| *part == Part::Many)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn like_table() {
        for (text, pattern, want) in [
            ("abc", "abc", true),
            ("abc", "a%", true),
            ("abc", "%c", true),
            ("abc", "%b%", true),
            ("abc", "a_c", true),
            ("abc", "a_", false),
            ("", "%", true),
            ("", "_", false),
            ("a%c", r"a\%c", true),
            ("abc", r"a\%c", false),
            ("a_c", r"a\_c", true),
            ("abc", r"a\_c", false),
            (r"ab\c", r"ab\c", true),
            ("aaab", "%a%b", true),
            ("mississippi", "%sip%", true),
            ("mississippi", "m%ss%pi", true),
            ("mississippi", "m%ss%pix", false),
            ("héllo", "h_llo", true),
        ] {
            assert_eq!(
                Pattern::compile(pattern).matches(text),
                want,
                "{text:?} LIKE {pattern:?}"
            );
        }
    }
}
