//! `GET /metrics`: the process's Prometheus registry in the text exposition format 0.0.4.
//!
//! Each crate defines its own metric families and registers them here under its component's prefix
//! (Knative's: `activator_`, `autoscaler_`, ...); the binary owns the one [`Registry`] per process.
//! prometheus-client writes OpenMetrics text; [`render`] turns it into the classic format that
//! every Prometheus scrapes as `text/plain; version=0.0.4`: counters are typed under their sample
//! name (`x_total`), and the OpenMetrics-only `# UNIT` and `# EOF` lines go.

use prometheus_client::registry::Registry;

/// The content type of [`render`]'s text.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The registry's metrics as Prometheus text 0.0.4.
pub fn render(registry: &Registry) -> String {
    let mut open_metrics = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut open_metrics, registry) {
        tracing::warn!("encoding metrics: {e}");
    }
    to_text_format(&open_metrics)
}

/// OpenMetrics text to Prometheus text 0.0.4 (the subset prometheus-client writes).
fn to_text_format(open_metrics: &str) -> String {
    let mut out = String::with_capacity(open_metrics.len());
    // The HELP line of the family whose TYPE line comes next: a counter's is renamed too.
    let mut help: Option<(&str, &str)> = None;
    for line in open_metrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            flush_help(&mut out, help.take(), "");
            help = Some(rest.split_once(' ').unwrap_or((rest, "")));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            let suffix = if kind == "counter" { "_total" } else { "" };
            match help.take() {
                Some(h) if h.0 == name => flush_help(&mut out, Some(h), suffix),
                other => flush_help(&mut out, other, ""),
            }
            out.push_str(&format!("# TYPE {name}{suffix} {kind}\n"));
            continue;
        }
        flush_help(&mut out, help.take(), "");
        out.push_str(line);
        out.push('\n');
    }
    flush_help(&mut out, help, "");
    out
}

fn flush_help(out: &mut String, help: Option<(&str, &str)>, suffix: &str) {
    if let Some((name, text)) = help {
        out.push_str(&format!("# HELP {name}{suffix} {text}\n"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::gauge::Gauge;
    use prometheus_client::metrics::histogram::Histogram;

    #[test]
    fn counters_are_typed_under_their_sample_name_and_open_metrics_lines_go() {
        let mut registry = Registry::default();
        let sub = registry.sub_registry_with_prefix("activator");
        let count = Counter::<u64>::default();
        sub.register("request_count", "Requests", count.clone());
        let depth = Gauge::<i64>::default();
        sub.register("queue_depth", "Held", depth.clone());
        let latency = Histogram::new([1.0, 10.0]);
        sub.register("request_latencies", "Latency", latency.clone());
        count.inc_by(3);
        depth.set(2);
        latency.observe(5.0);
        let text = render(&registry);
        assert!(
            !text.contains("# EOF") && !text.contains("# UNIT"),
            "{text}"
        );
        assert!(
            text.contains(
                "# HELP activator_request_count_total Requests.\n\
                 # TYPE activator_request_count_total counter\n\
                 activator_request_count_total 3\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("# TYPE activator_queue_depth gauge\nactivator_queue_depth 2\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE activator_request_latencies histogram\n"),
            "{text}"
        );
        assert!(
            text.contains("activator_request_latencies_count 1\n"),
            "{text}"
        );
    }
}
