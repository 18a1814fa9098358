//! Figures and their output: medians and ranges over rounds, the human
//! table, and one JSON line per figure.

pub(crate) struct Fig {
    pub(crate) imp: &'static str,
    pub(crate) metric: &'static str,
    pub(crate) value: f64,
    pub(crate) n: u64,
}

/// Metrics in table order, with their unit and whether lower is better.
const METRICS: &[(&str, &str, bool)] = &[
    ("rtt_p50_us", "us", true),
    ("rtt_p99_us", "us", true),
    ("oneway_msgs_per_s", "msg/s", false),
    ("window_msgs_per_s", "msg/s", false),
    ("big_MBps", "MB/s", false),
    ("big_rtt_p50_us", "us", true),
    ("fd_per_s", "fd/s", false),
    ("ack_cpu_ns_1k", "ns", true),
    ("ack_cpu_ns_100k", "ns", true),
    ("rtt_allocs_per_op", "allocs", true),
    ("oneway_allocs_per_msg", "allocs", true),
    ("mem_per_worker_bytes", "bytes", true),
    ("mem_per_pending_ack_bytes", "bytes", true),
    ("huge_rtt_p50_ms", "ms", true),
    ("thread_msgs_per_s", "msg/s", false),
    ("thread_rtt_p50_us", "us", true),
    ("gather_1_us", "us", true),
    ("gather_16_us", "us", true),
    ("gather_256_us", "us", true),
];

fn unit_of(metric: &str) -> &'static str {
    METRICS.iter().find(|m| m.0 == metric).map_or("", |m| m.1)
}

fn fmt_value(v: f64) -> String {
    if v >= 100_000.0 {
        format!("{v:.0}")
    } else if v >= 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// One figure over all rounds: the median, the range, and the samples summed.
pub(crate) struct Summary {
    pub(crate) median: f64,
    min: f64,
    max: f64,
    rounds: usize,
    n: u64,
}

pub(crate) fn summarize(figs: &[Fig], imp: &str, metric: &str) -> Option<Summary> {
    let mut values: Vec<f64> = figs.iter().filter(|f| f.imp == imp && f.metric == metric).map(|f| f.value).collect();
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let k = values.len();
    let median = if k % 2 == 1 { values[k / 2] } else { (values[k / 2 - 1] + values[k / 2]) / 2.0 };
    let n = figs.iter().filter(|f| f.imp == imp && f.metric == metric).map(|f| f.n).sum();
    Some(Summary { median, min: values[0], max: values[k - 1], rounds: k, n })
}

pub(crate) fn print_report(figs: &[Fig], notes: &[String], placement: &str) {
    let mut impls: Vec<&str> = Vec::new();
    for f in figs {
        if !impls.contains(&f.imp) {
            impls.push(f.imp);
        }
    }
    impls.sort_by_key(|i| !i.starts_with("clusterphone"));
    let ours: Vec<&str> = impls.iter().copied().filter(|i| i.starts_with("clusterphone")).collect();
    let base: Vec<&str> = impls.iter().copied().filter(|i| !i.starts_with("clusterphone")).collect();
    let get = |imp: &str, metric: &str| summarize(figs, imp, metric).map(|s| s.median);

    println!();
    println!("placement: {placement}");
    let mut header = format!("{:<26} {:<7}", "metric", "unit");
    for i in &impls {
        header += &format!(" {i:>17}");
    }
    for o in &ours {
        for b in &base {
            let short = o.replacen("clusterphone", "cp", 1);
            header += &format!(" {:>17}", format!("{short}/{b}"));
        }
    }
    println!("{header}");
    println!("{}", "-".repeat(header.len()));
    for &(metric, unit, lower_better) in METRICS {
        if impls.iter().all(|i| get(i, metric).is_none()) {
            continue;
        }
        let mut line = format!("{:<26} {unit:<7}", format!("{metric} ({})", if lower_better { "lo" } else { "hi" }));
        for i in &impls {
            line += &format!(" {:>17}", get(i, metric).map_or("-".to_owned(), fmt_value));
        }
        for o in &ours {
            for b in &base {
                let ratio = match (get(o, metric), get(b, metric)) {
                    (Some(x), Some(y)) if y > 0.0 => format!("{:.2}x", x / y),
                    _ => "-".to_owned(),
                };
                line += &format!(" {ratio:>17}");
            }
        }
        println!("{line}");
    }
    println!("(lo: lower is better, hi: higher is better; values are medians over rounds; ratios are clusterphone / baseline)");
    let rounds = impls
        .iter()
        .flat_map(|i| METRICS.iter().filter_map(|m| summarize(figs, i, m.0)))
        .map(|s| s.rounds)
        .max()
        .unwrap_or(0);
    if rounds > 1 {
        println!();
        println!("range over {rounds} interleaved rounds (min..max)");
        for &(metric, _, _) in METRICS {
            let mut line = format!("{metric:<26}        ");
            let mut any = false;
            for i in &impls {
                let cell = match summarize(figs, i, metric) {
                    Some(s) if s.rounds > 1 => {
                        any = true;
                        format!("{}..{}", fmt_value(s.min), fmt_value(s.max))
                    }
                    Some(s) => fmt_value(s.median),
                    None => "-".to_owned(),
                };
                line += &format!(" {cell:>17}");
            }
            if any {
                println!("{line}");
            }
        }
    }
    for n in notes {
        println!("note: {n}");
    }
    println!();
    let fmt_json = |v: f64| if v.is_finite() { format!("{v:.3}") } else { "null".to_owned() };
    for i in &impls {
        for &(metric, _, _) in METRICS {
            let Some(s) = summarize(figs, i, metric) else { continue };
            println!(
                "{{\"impl\": \"{i}\", \"metric\": \"{metric}\", \"value\": {}, \"unit\": \"{}\", \"n\": {}, \"placement\": \"{placement}\", \"rounds\": {}, \"min\": {}, \"max\": {}}}",
                fmt_json(s.median),
                unit_of(metric),
                s.n,
                s.rounds,
                fmt_json(s.min),
                fmt_json(s.max),
            );
        }
    }
}
