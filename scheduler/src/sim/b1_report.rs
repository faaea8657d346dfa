//! B1 output: the printed tables, CSV and JSON.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::json;

use super::b1::{median, median_at, published, B1Config, RunResult};
use crate::policy::PolicyKind;

/// Arrived % columns of the printed table.
pub const COLUMNS: [usize; 12] = [75, 80, 85, 90, 95, 100, 105, 110, 115, 120, 125, 130];

fn f2(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.2}")).unwrap_or_else(|| "-".into())
}

/// Timing summary of one policy: medians over runs.
pub fn timing(results: &[RunResult], trace: &str, p: PolicyKind) -> Option<(f64, f64, f64, f64)> {
    let rs: Vec<&RunResult> = results
        .iter()
        .filter(|r| r.trace == trace && r.policy == p)
        .collect();
    if rs.is_empty() {
        return None;
    }
    let p50 = median(rs.iter().map(|r| r.decision_p50_ns as f64 / 1e3).collect())?;
    let p99 = median(rs.iter().map(|r| r.decision_p99_ns as f64 / 1e3).collect())?;
    let run = median(rs.iter().map(|r| r.run_ns as f64 / 1e6).collect())?;
    let decisions = median(rs.iter().map(|r| r.decisions as f64).collect())?;
    Some((p50, p99, run, decisions))
}

/// The text report.
pub fn render(cfg: &B1Config, results: &[RunResult]) -> String {
    let mut out = String::new();
    for trace in &cfg.traces {
        let _ = writeln!(
            out,
            "\n## B1 {trace}: unallocated GPU % (median of {} seeds), cluster x{}",
            cfg.seeds, cfg.scale
        );
        let _ = write!(out, "| policy |");
        for c in COLUMNS {
            let _ = write!(out, " {c} |");
        }
        let _ = writeln!(out);
        let _ = writeln!(out, "|---|{}", "---|".repeat(COLUMNS.len()));
        for p in &cfg.policies {
            let _ = write!(out, "| {} |", p.title());
            for c in COLUMNS {
                let _ = write!(out, " {} |", f2(median_at(results, trace, *p, c)));
            }
            let _ = writeln!(out);
        }
        let _ = writeln!(
            out,
            "\nvs published (ours / paper / diff) at 100, 110, 130 %:"
        );
        for p in &cfg.policies {
            let mut line = format!("  {:<14}", p.title());
            let mut any = false;
            for a in [100u32, 110, 130] {
                if let Some(pb) = published(trace, a, *p) {
                    let ours = median_at(results, trace, *p, a as usize);
                    let d = ours
                        .map(|o| format!("{:+.2}", o - pb))
                        .unwrap_or("-".into());
                    let _ = write!(line, "  @{a}: {} / {pb:.2} / {d}", f2(ours));
                    any = true;
                }
            }
            if any {
                let _ = writeln!(out, "{line}");
            }
        }
        if cfg.policies.contains(&PolicyKind::Fgd) && cfg.policies.contains(&PolicyKind::Talon) {
            let _ = writeln!(out, "\nTalon vs FGD (unallocated %, reduction):");
            for a in [100usize, 110, 130] {
                let f = median_at(results, trace, PolicyKind::Fgd, a);
                let t = median_at(results, trace, PolicyKind::Talon, a);
                if let (Some(f), Some(t)) = (f, t) {
                    let _ = writeln!(
                        out,
                        "  @{a}: FGD {f:.2}  Talon {t:.2}  ({:+.1} % of FGD's unallocated)",
                        100.0 * (t - f) / f
                    );
                }
            }
        }
        let _ = writeln!(out, "\ndecision time (median over seeds):");
        let _ = writeln!(
            out,
            "| policy | decisions/run | p50 us | p99 us | whole run ms |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|");
        for p in &cfg.policies {
            if let Some((p50, p99, run, n)) = timing(results, trace, *p) {
                let _ = writeln!(
                    out,
                    "| {} | {n:.0} | {p50:.1} | {p99:.1} | {run:.1} |",
                    p.title()
                );
            }
        }
    }
    out
}

/// Write `b1_runs.csv`, `b1_curves.csv` and `b1_summary.json` into `dir`.
pub fn write(dir: &Path, cfg: &B1Config, results: &[RunResult]) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut runs =
        String::from("trace,policy,seed,scale,decisions,failed,p50_ns,p99_ns,max_ns,run_ns\n");
    let mut curves = String::from("trace,policy,seed,arrived,unallocated\n");
    for r in results {
        let _ = writeln!(
            runs,
            "{},{},{},{},{},{},{},{},{},{}",
            r.trace,
            r.policy.name(),
            r.seed,
            cfg.scale,
            r.decisions,
            r.failed,
            r.decision_p50_ns,
            r.decision_p99_ns,
            r.decision_max_ns,
            r.run_ns
        );
        for (a, v) in r.unallocated.iter().enumerate() {
            if let Some(v) = v {
                let _ = writeln!(
                    curves,
                    "{},{},{},{a},{v:.4}",
                    r.trace,
                    r.policy.name(),
                    r.seed
                );
            }
        }
    }
    let mut summary = serde_json::Map::new();
    for trace in &cfg.traces {
        let mut per = serde_json::Map::new();
        for p in &cfg.policies {
            let curve: serde_json::Map<String, serde_json::Value> = (75..=130)
                .filter_map(|a| median_at(results, trace, *p, a).map(|v| (a.to_string(), json!(v))))
                .collect();
            let t = timing(results, trace, *p);
            per.insert(
                p.name().to_string(),
                json!({
                    "median_unallocated_pct": curve,
                    "published": {
                        "100": published(trace, 100, *p),
                        "110": published(trace, 110, *p),
                        "130": published(trace, 130, *p),
                    },
                    "decision_p50_us": t.map(|t| t.0),
                    "decision_p99_us": t.map(|t| t.1),
                    "run_ms": t.map(|t| t.2),
                    "decisions_per_run": t.map(|t| t.3),
                }),
            );
        }
        summary.insert(trace.clone(), serde_json::Value::Object(per));
    }
    let doc = json!({
        "benchmark": "B1",
        "seeds": cfg.seeds,
        "seed_base": cfg.seed_base,
        "scale": cfg.scale,
        "ratio": cfg.ratio,
        "traces": summary,
    });
    let w = |name: &str, body: &str| {
        let p = dir.join(name);
        std::fs::write(&p, body).map_err(|e| format!("{}: {e}", p.display()))
    };
    w("b1_runs.csv", &runs)?;
    w("b1_curves.csv", &curves)?;
    w(
        "b1_summary.json",
        &serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?,
    )?;
    Ok(())
}
