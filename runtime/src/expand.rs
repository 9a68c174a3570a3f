//! Kubernetes' `$(VAR_NAME)` expansion in a container's command, args and env values (kubelet's
//! `third_party/forked/golang/expansion`): `$(NAME)` becomes the variable's value when it is defined and
//! stays as written when not; `$$` is a literal `$`. So `args: ["--port=$(PORT)"]` works as on a cluster.

/// Expands `$(NAME)` references in `input` with `lookup`.
pub fn expand(input: &str, lookup: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            // Kubernetes: `$$` escapes, so `$$(PORT)` is the literal `$(PORT)`.
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
        {
            let name = &inner[..end];
            match lookup(name) {
                Some(value) => out.push_str(&value),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// Expands every env value against the variables defined before it (Kubernetes' order rule), then
/// returns the final map lookup for command and args.
pub fn expand_env(env: &[(String, String)]) -> Vec<(String, String)> {
    let mut done: Vec<(String, String)> = Vec::with_capacity(env.len());
    for (name, value) in env {
        let expanded = expand(value, |n| {
            done.iter()
                .rev()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.clone())
        });
        done.push((name.clone(), expanded));
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(name: &str) -> Option<String> {
        match name {
            "PORT" => Some("8080".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn expansion_follows_kubernetes() {
        let cases = [
            ("--port=$(PORT)", "--port=8080"),
            ("$(PORT)$(PORT)", "80808080"),
            ("$(UNDEFINED)", "$(UNDEFINED)"),
            ("$$(PORT)", "$(PORT)"),
            ("$$", "$"),
            ("cost $5", "cost $5"),
            ("$(PORT", "$(PORT"),
            ("x$(EMPTY)y", "xy"),
            ("trailing $", "trailing $"),
            ("no refs", "no refs"),
        ];
        for (input, want) in cases {
            assert_eq!(expand(input, vars), want, "{input}");
        }
    }

    #[test]
    fn env_values_see_earlier_variables_only() {
        let env = vec![
            ("A".to_string(), "a".to_string()),
            ("B".to_string(), "$(A)-$(C)".to_string()),
            ("C".to_string(), "c".to_string()),
        ];
        let out = expand_env(&env);
        assert_eq!(out[1].1, "a-$(C)");
    }
}
