//! Traffic counters, one set per virtual service and per server: atomics on the request path,
//! copied into [`Traffic`] for reports and rendered for Prometheus.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use fulcrum_se_protocol::{LATENCY_BOUNDS_MS, Traffic};

#[derive(Debug)]
pub struct Counters {
    pub requests: AtomicU64,
    pub connections: AtomicU64,
    pub open_connections: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub errors: AtomicU64,
    latency_sum_us: AtomicU64,
    /// One per bound, then one for everything slower.
    latency: Vec<AtomicU64>,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            requests: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            open_connections: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            latency_sum_us: AtomicU64::new(0),
            latency: (0..=LATENCY_BOUNDS_MS.len()).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    pub fn latency(&self, took: Duration) {
        let ms = took.as_secs_f64() * 1000.0;
        let bucket = LATENCY_BOUNDS_MS.iter().position(|b| ms <= *b).unwrap_or(LATENCY_BOUNDS_MS.len());
        self.latency[bucket].fetch_add(1, Relaxed);
        self.latency_sum_us.fetch_add(took.as_micros() as u64, Relaxed);
    }

    pub fn opened(&self) {
        self.connections.fetch_add(1, Relaxed);
        self.open_connections.fetch_add(1, Relaxed);
    }

    pub fn closed(&self) {
        self.open_connections.fetch_sub(1, Relaxed);
    }

    pub fn snapshot(&self) -> Traffic {
        Traffic {
            requests: self.requests.load(Relaxed),
            connections: self.connections.load(Relaxed),
            open_connections: self.open_connections.load(Relaxed),
            bytes_in: self.bytes_in.load(Relaxed),
            bytes_out: self.bytes_out.load(Relaxed),
            errors: self.errors.load(Relaxed),
            latency_buckets: self.latency.iter().map(|b| b.load(Relaxed)).collect(),
        }
    }

    /// Prometheus series for one object: `labels` is `vs="web"` or `vs="web",server="..."`.
    pub fn render(&self, prefix: &str, labels: &str, out: &mut Metrics) {
        let t = self.snapshot();
        out.counter(&format!("{prefix}_requests_total"), "Requests proxied.", labels, t.requests);
        out.counter(&format!("{prefix}_connections_total"), "Connections opened.", labels, t.connections);
        out.gauge(&format!("{prefix}_open_connections"), "Connections open now.", labels, t.open_connections);
        out.counter(&format!("{prefix}_bytes_in_total"), "Bytes received from clients.", labels, t.bytes_in);
        out.counter(&format!("{prefix}_bytes_out_total"), "Bytes sent to clients.", labels, t.bytes_out);
        out.counter(&format!("{prefix}_errors_total"), "Requests or connections that failed.", labels, t.errors);
        let name = format!("{prefix}_latency_seconds");
        let help = "Time to the end of the response (HTTP) or of the connection (TCP).";
        let mut seen = 0;
        for (bound, n) in LATENCY_BOUNDS_MS.iter().zip(&t.latency_buckets) {
            seen += n;
            out.sample(
                &name,
                help,
                "histogram",
                format_args!("{name}_bucket{{{labels},le=\"{}\"}} {seen}", bound / 1000.0),
            );
        }
        let total: u64 = t.latency_buckets.iter().sum();
        out.sample(&name, help, "histogram", format_args!("{name}_bucket{{{labels},le=\"+Inf\"}} {total}"));
        let sum = self.latency_sum_us.load(Relaxed) as f64 / 1e6;
        out.sample(&name, help, "histogram", format_args!("{name}_sum{{{labels}}} {sum}"));
        out.sample(&name, help, "histogram", format_args!("{name}_count{{{labels}}} {total}"));
    }
}

/// Prometheus text: each family's HELP/TYPE once, then all of its samples together (the
/// exposition format wants a family's samples in one group, whichever object they are of).
#[derive(Default)]
pub struct Metrics {
    /// Families in the order first seen: (name, HELP/TYPE lines, samples).
    families: Vec<(String, String, String)>,
}

impl Metrics {
    fn family(&mut self, name: &str, help: &str, kind: &str) -> &mut String {
        let i = match self.families.iter().position(|(n, _, _)| n == name) {
            Some(i) => i,
            None => {
                let head = format!("# HELP {name} {help}\n# TYPE {name} {kind}\n");
                self.families.push((name.to_string(), head, String::new()));
                self.families.len() - 1
            }
        };
        &mut self.families[i].2
    }

    /// Adds one sample line (`name{labels} value`) to family `name`.
    pub fn sample(&mut self, name: &str, help: &str, kind: &str, line: std::fmt::Arguments<'_>) {
        let samples = self.family(name, help, kind);
        let _ = samples.write_fmt(line);
        samples.push('\n');
    }

    pub fn counter(&mut self, name: &str, help: &str, labels: &str, value: u64) {
        self.sample(name, help, "counter", format_args!("{name}{{{labels}}} {value}"));
    }

    pub fn gauge(&mut self, name: &str, help: &str, labels: &str, value: u64) {
        self.sample(name, help, "gauge", format_args!("{name}{{{labels}}} {value}"));
    }

    pub fn text(&self) -> String {
        self.families.iter().map(|(_, head, samples)| format!("{head}{samples}")).collect()
    }
}

pub use fulcrum_metrics::escape as label;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_lands_in_its_bucket_and_renders_cumulatively() {
        let c = Counters::default();
        c.latency(Duration::from_micros(300));
        c.latency(Duration::from_millis(30));
        c.latency(Duration::from_secs(9));
        let t = c.snapshot();
        assert_eq!(t.latency_buckets[0], 1);
        assert_eq!(t.latency_buckets[6], 1);
        assert_eq!(*t.latency_buckets.last().unwrap(), 1);
        let mut m = Metrics::default();
        c.render("fulcrum_se_vs", "vs=\"web\"", &mut m);
        Counters::default().render("fulcrum_se_vs", "vs=\"api\"", &mut m);
        let text = m.text();
        assert!(text.contains("fulcrum_se_vs_latency_seconds_bucket{vs=\"web\",le=\"0.05\"} 2"), "{text}");
        assert!(text.contains("fulcrum_se_vs_latency_seconds_count{vs=\"web\"} 3"));
        // Each family once, its samples of both virtual services together.
        assert_eq!(text.matches("# TYPE fulcrum_se_vs_requests_total counter").count(), 1);
        let lines: Vec<&str> = text.lines().collect();
        let at = |needle: &str| lines.iter().position(|l| l.starts_with(needle)).unwrap();
        assert_eq!(at("fulcrum_se_vs_requests_total{vs=\"api\"}"), at("fulcrum_se_vs_requests_total{vs=\"web\"}") + 1);
        assert_eq!(label("a\"b"), "a\\\"b");
    }
}
