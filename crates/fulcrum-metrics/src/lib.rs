//! Just enough of Prometheus: labelled counters and histograms kept in memory and rendered in
//! the text exposition format. Recording takes one short lock; scraping copies.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

/// Bucket bounds in seconds, from 50 µs to 10 s.
pub const LATENCY_BUCKETS: &[f64] =
    &[0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];
/// Bucket bounds for sizes (batch sizes, counts).
pub const SIZE_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0];

#[derive(Debug, Clone, Default)]
struct Series {
    buckets: Vec<u64>,
    count: u64,
    sum: f64,
}

/// A histogram family: one series per label value.
#[derive(Debug)]
pub struct Histogram {
    name: &'static str,
    help: &'static str,
    label: &'static str,
    bounds: &'static [f64],
    series: Mutex<BTreeMap<String, Series>>,
}

impl Histogram {
    pub const fn new(name: &'static str, help: &'static str, label: &'static str, bounds: &'static [f64]) -> Self {
        Histogram { name, help, label, bounds, series: Mutex::new(BTreeMap::new()) }
    }

    pub fn observe(&self, label: &str, value: f64) {
        let mut series = self.series.lock().unwrap_or_else(|e| e.into_inner());
        let s = series
            .entry(label.to_string())
            .or_insert_with(|| Series { buckets: vec![0; self.bounds.len()], ..Default::default() });
        for (bucket, bound) in s.buckets.iter_mut().zip(self.bounds) {
            if value <= *bound {
                *bucket += 1;
            }
        }
        s.count += 1;
        s.sum += value;
    }

    /// The number of observations for a label (for tests and status pages).
    pub fn count(&self, label: &str) -> u64 {
        self.series.lock().unwrap_or_else(|e| e.into_inner()).get(label).map_or(0, |s| s.count)
    }

    pub fn render(&self, out: &mut String) {
        let series = self.series.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let _ = writeln!(out, "# HELP {} {}\n# TYPE {} histogram", self.name, self.help, self.name);
        for (label, s) in series {
            let sel =
                if self.label.is_empty() { String::new() } else { format!("{}=\"{}\",", self.label, escape(&label)) };
            for (bucket, bound) in s.buckets.iter().zip(self.bounds) {
                let _ = writeln!(out, "{}_bucket{{{sel}le=\"{bound}\"}} {bucket}", self.name);
            }
            let _ = writeln!(out, "{}_bucket{{{sel}le=\"+Inf\"}} {}", self.name, s.count);
            let plain = sel.trim_end_matches(',');
            let _ = writeln!(out, "{}_sum{{{plain}}} {}", self.name, s.sum);
            let _ = writeln!(out, "{}_count{{{plain}}} {}", self.name, s.count);
        }
    }
}

/// A counter family with up to two labels.
#[derive(Debug)]
pub struct Counter {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
    values: Mutex<BTreeMap<Vec<String>, u64>>,
}

impl Counter {
    pub const fn new(name: &'static str, help: &'static str, labels: &'static [&'static str]) -> Self {
        Counter { name, help, labels, values: Mutex::new(BTreeMap::new()) }
    }

    pub fn add(&self, labels: &[&str], n: u64) {
        let mut values = self.values.lock().unwrap_or_else(|e| e.into_inner());
        // Look up without allocating; a new series allocates once.
        match values.iter_mut().find(|(k, _)| k.iter().map(String::as_str).eq(labels.iter().copied())) {
            Some((_, v)) => *v += n,
            None => {
                values.insert(labels.iter().map(|l| l.to_string()).collect(), n);
            }
        }
    }

    pub fn get(&self, labels: &[&str]) -> u64 {
        let key: Vec<String> = labels.iter().map(|l| l.to_string()).collect();
        self.values.lock().unwrap_or_else(|e| e.into_inner()).get(&key).copied().unwrap_or(0)
    }

    /// The sum of the series whose labels `keep` accepts (all requests, the failed ones).
    pub fn sum_where(&self, keep: impl Fn(&[String]) -> bool) -> u64 {
        self.values.lock().unwrap_or_else(|e| e.into_inner()).iter().filter(|(k, _)| keep(k)).map(|(_, v)| v).sum()
    }

    pub fn render(&self, out: &mut String) {
        let values = self.values.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let _ = writeln!(out, "# HELP {} {}\n# TYPE {} counter", self.name, self.help, self.name);
        for (labels, value) in values {
            let sel: Vec<String> =
                self.labels.iter().zip(&labels).map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect();
            let _ = writeln!(out, "{}{{{}}} {value}", self.name, sel.join(","));
        }
    }
}

/// A value that goes up and down (queue depth).
#[derive(Debug)]
pub struct Gauge {
    name: &'static str,
    help: &'static str,
    value: std::sync::atomic::AtomicI64,
}

impl Gauge {
    pub const fn new(name: &'static str, help: &'static str) -> Self {
        Gauge { name, help, value: std::sync::atomic::AtomicI64::new(0) }
    }

    pub fn set(&self, v: i64) {
        self.value.store(v, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn add(&self, v: i64) {
        self.value.fetch_add(v, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn get(&self) -> i64 {
        self.value.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn render(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP {} {}\n# TYPE {} gauge\n{} {}",
            self.name,
            self.help,
            self.name,
            self.name,
            self.get()
        );
    }
}

/// A label value with `\`, `"` and newlines escaped.
pub fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_renders_cumulative_buckets() {
        let h = Histogram::new("x_seconds", "help", "route", &[0.1, 1.0]);
        h.observe("/a", 0.05);
        h.observe("/a", 0.5);
        let mut out = String::new();
        h.render(&mut out);
        assert!(out.contains("x_seconds_bucket{route=\"/a\",le=\"0.1\"} 1"), "{out}");
        assert!(out.contains("x_seconds_bucket{route=\"/a\",le=\"1\"} 2"), "{out}");
        assert!(out.contains("x_seconds_count{route=\"/a\"} 2"), "{out}");
    }

    #[test]
    fn counter_renders_labels() {
        let c = Counter::new("req_total", "help", &["route", "code"]);
        c.add(&["/a", "200"], 2);
        let mut out = String::new();
        c.render(&mut out);
        assert!(out.contains("req_total{route=\"/a\",code=\"200\"} 2"), "{out}");
        assert_eq!(c.get(&["/a", "200"]), 2);
        c.add(&["/b", "404"], 3);
        assert_eq!(c.sum_where(|_| true), 5);
        assert_eq!(c.sum_where(|l| l[1].starts_with('4')), 3);
    }
}
