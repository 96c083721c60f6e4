//! contrib/grafana/cachefs.json, the Grafana dashboard: it is a dashboard Grafana can
//! import (valid JSON with the fields an import needs, every panel queries the
//! Prometheus data source variable) and every metric its queries use is one the binary
//! serves, with a type that fits how the query uses it (`_bucket` of a histogram, ...).
//! The served list is the registry's own exposition ([`cachefs::metrics::render`]),
//! which has every family from the start; `served_families_match_a_running_daemon`
//! checks that list against a real daemon's /metrics.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde_json::Value;

use crate::common::*;

fn dashboard() -> Value {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/grafana/cachefs.json");
    let text = std::fs::read_to_string(&path).expect("contrib/grafana/cachefs.json");
    serde_json::from_str(&text).expect("the dashboard is valid JSON")
}

/// Metric family -> type, from `# TYPE` lines of an exposition.
fn families(exposition: &str) -> BTreeMap<String, String> {
    exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| {
            let (name, kind) = l.split_once(' ').unwrap();
            (name.to_string(), kind.to_string())
        })
        .collect()
}

/// Every `expr` string anywhere under `v`.
fn exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr", Value::String(e)) => out.push(e.clone()),
                    _ => exprs(v, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

/// The metric names (`cachefs_...` identifiers) in a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let b = expr.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
    let mut i = 0;
    while i < b.len() {
        if ident(b[i]) && (i == 0 || !ident(b[i - 1])) {
            let start = i;
            while i < b.len() && ident(b[i]) {
                i += 1;
            }
            let word = &expr[start..i];
            if word.starts_with("cachefs_") {
                out.insert(word.to_string());
            }
        } else {
            i += 1;
        }
    }
    out
}

/// Why `name`, as a query uses it, is not a series of `served`; `None` if it is.
fn unserved(name: &str, served: &BTreeMap<String, String>) -> Option<String> {
    if let Some(kind) = served.get(name) {
        return (kind == "histogram")
            .then(|| format!("{name} is a histogram: query {name}_bucket, _sum or _count"));
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(family) = name.strip_suffix(suffix)
            && served.get(family).is_some_and(|k| k == "histogram")
        {
            return None;
        }
    }
    Some(format!("{name} is not served by cachefs"))
}

#[test]
fn every_metric_the_dashboard_queries_is_served() {
    let served = families(&cachefs::metrics::render());
    let mut all = Vec::new();
    exprs(&dashboard(), &mut all);
    assert!(all.len() >= 20, "too few queries found: {all:?}");
    let mut used = BTreeSet::new();
    let mut wrong = Vec::new();
    for e in &all {
        let names = metric_names(e);
        assert!(!names.is_empty(), "a query with no cachefs metric: {e}");
        for n in names {
            if let Some(why) = unserved(&n, &served) {
                wrong.push(format!("{why} (in `{e}`)"));
            }
            used.insert(n);
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    // The new families of issue 16 are on the dashboard.
    for n in [
        "cachefs_cache_usage_bytes",
        "cachefs_cache_budget_bytes",
        "cachefs_fuse_op_duration_seconds_bucket",
        "cachefs_process_resident_memory_bytes",
        "cachefs_process_open_fds",
        "cachefs_process_threads",
        "cachefs_lazy_bytes_fetched_total",
    ] {
        assert!(used.contains(n), "{n} is not on the dashboard");
    }
}

#[test]
fn the_checker_catches_unknown_and_misused_names() {
    let served = families(&cachefs::metrics::render());
    assert_eq!(
        metric_names("rate(cachefs_cache_hits_total{instance=~\"$i\"}[5m]) / cachefs_nope"),
        ["cachefs_cache_hits_total", "cachefs_nope"]
            .map(String::from)
            .into()
    );
    assert!(unserved("cachefs_nope", &served).is_some());
    assert!(unserved("cachefs_cache_hit_total", &served).is_some());
    assert!(unserved("cachefs_src_op_duration_seconds", &served).is_some());
    assert!(unserved("cachefs_cache_hits_total_count", &served).is_some());
    assert!(unserved("cachefs_src_op_duration_seconds_bucket", &served).is_none());
    assert!(unserved("cachefs_cache_hits_total", &served).is_none());
}

#[test]
fn the_dashboard_is_importable() {
    let d = dashboard();
    for key in ["title", "uid", "panels", "schemaVersion", "templating"] {
        assert!(d.get(key).is_some(), "no {key}");
    }
    assert_eq!(d["uid"], "cachefs");
    let vars: Vec<&str> = d["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(vars, ["datasource", "instance"]);
    let mut ids = BTreeSet::new();
    let mut titles = BTreeSet::new();
    for p in d["panels"].as_array().unwrap() {
        let id = p["id"].as_u64().expect("a numeric panel id");
        assert!(ids.insert(id), "panel id {id} twice");
        let g = &p["gridPos"];
        for k in ["h", "w", "x", "y"] {
            assert!(g[k].is_u64(), "panel {id} gridPos.{k}");
        }
        assert!(
            g["x"].as_u64().unwrap() + g["w"].as_u64().unwrap() <= 24,
            "panel {id} too wide"
        );
        if p["type"] == "row" {
            continue;
        }
        let title = p["title"].as_str().unwrap();
        assert!(
            titles.insert(title.to_string()),
            "two panels titled {title}"
        );
        assert_eq!(p["datasource"]["uid"], "${datasource}", "panel {title}");
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {title} has no query");
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "panel {title}");
            let e = t["expr"].as_str().unwrap();
            assert!(e.contains("instance=~\"$instance\""), "{title}: {e}");
        }
    }
}

/// `render()` of the library is what the daemon serves: the same families on a real
/// mount's /metrics.
#[test]
fn served_families_match_a_running_daemon() {
    if !can_mount("served_families_match_a_running_daemon") {
        return;
    }
    let m = Mounted::with_dirs(tempdir(), tempdir(), &["--metrics-addr", "127.0.0.1:0"]);
    let needle = "serving metrics at http://";
    let log = m.wait_for_log(needle, Duration::from_secs(10));
    let rest = &log[log.find(needle).unwrap() + needle.len()..];
    let addr: SocketAddr = rest[..rest.find("/metrics").unwrap()].parse().unwrap();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let body = resp.split_once("\r\n\r\n").unwrap().1;
    assert_eq!(families(body), families(&cachefs::metrics::render()));
    m.stop();
}
