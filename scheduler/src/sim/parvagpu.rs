//! Loader for ParvaGPU's (SC'24) A100-80GB MIG profiles and SLO scenarios.
//!
//! `prof_data/<model>.csv`: `Mig instance,Batch size,Workload Number,
//! Throughput,Latency` — instance size in GPCs (1, 2, 3, 4, 7), batch size,
//! MPS processes, throughput *per process* (req/s) and batch latency (s).
//! `SLO/SLO_req_rate.csv` and `SLO/SLO_latency.csv`: one scenario per row,
//! one column per model in alphabetical order of the profile files, `N/A`
//! where the model is absent; latency in ms.

use std::path::{Path, PathBuf};

use super::csv::{LoadError, Table};

/// One profiled operating point.
#[derive(Clone, Debug, PartialEq)]
pub struct ProfilePoint {
    /// MIG instance size in GPCs.
    pub gpcs: u8,
    pub batch: u32,
    pub procs: u32,
    /// Total throughput of the segment (per-process throughput × processes), req/s.
    pub throughput: f64,
    /// Batch latency, ms.
    pub latency_ms: f64,
}

/// A model's profile.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelProfile {
    pub name: String,
    pub points: Vec<ProfilePoint>,
}

/// One model's SLO in one scenario.
#[derive(Clone, Debug, PartialEq)]
pub struct Slo {
    pub model: usize,
    pub rate: f64,
    pub latency_ms: f64,
}

/// The whole data set.
#[derive(Clone, Debug, PartialEq)]
pub struct ParvaData {
    pub models: Vec<ModelProfile>,
    /// Scenarios 1..=6, each the SLOs of the models present.
    pub scenarios: Vec<Vec<Slo>>,
}

/// Load `dir` (the `parvagpu/` folder).
pub fn load(dir: &Path) -> Result<ParvaData, LoadError> {
    let prof_dir = dir.join("prof_data");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&prof_dir)
        .map_err(|e| LoadError {
            path: prof_dir.clone(),
            line: 0,
            msg: format!("cannot list: {e}"),
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "csv"))
        .collect();
    files.sort();
    let mut models = Vec::new();
    for f in &files {
        let t = Table::read(f, true)?;
        let (ci, cb, cw, ct, cl) = (
            t.need_col("Mig instance")?,
            t.need_col("Batch size")?,
            t.need_col("Workload Number")?,
            t.need_col("Throughput")?,
            t.need_col("Latency")?,
        );
        let mut points = Vec::new();
        for (line, row) in &t.rows {
            let gpcs: u8 = t.parse(*line, row, ci, "Mig instance")?;
            if ![1, 2, 3, 4, 7].contains(&gpcs) {
                return Err(t.err(
                    *line,
                    format!("MIG instance size {gpcs} is not 1, 2, 3, 4 or 7"),
                ));
            }
            let procs: u32 = t.parse(*line, row, cw, "Workload Number")?;
            let thr: f64 = t.parse(*line, row, ct, "Throughput")?;
            let lat: f64 = t.parse(*line, row, cl, "Latency")?;
            if !(thr.is_finite() && lat.is_finite() && thr >= 0.0 && lat >= 0.0) {
                return Err(t.err(*line, "negative or non-finite throughput/latency"));
            }
            points.push(ProfilePoint {
                gpcs,
                batch: t.parse(*line, row, cb, "Batch size")?,
                procs,
                throughput: thr * procs as f64,
                latency_ms: lat * 1000.0,
            });
        }
        let name = f
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default();
        models.push(ModelProfile { name, points });
    }
    let rates = Table::read(&dir.join("SLO/SLO_req_rate.csv"), false)?;
    let lats = Table::read(&dir.join("SLO/SLO_latency.csv"), false)?;
    if rates.rows.len() != lats.rows.len() {
        return Err(LoadError {
            path: dir.join("SLO"),
            line: 0,
            msg: format!(
                "{} rate rows but {} latency rows",
                rates.rows.len(),
                lats.rows.len()
            ),
        });
    }
    let mut scenarios = Vec::new();
    for ((lr, r), (ll, l)) in rates.rows.iter().zip(&lats.rows) {
        if r.len() != models.len() || l.len() != models.len() {
            return Err(rates.err(
                *lr,
                format!(
                    "{} columns (latency row {ll}: {}), expected one per model ({})",
                    r.len(),
                    l.len(),
                    models.len()
                ),
            ));
        }
        let mut slos = Vec::new();
        for m in 0..models.len() {
            if r[m] == "N/A" || l[m] == "N/A" {
                continue;
            }
            slos.push(Slo {
                model: m,
                rate: rates.parse(*lr, r, m, "request rate")?,
                latency_ms: lats.parse(*ll, l, m, "latency SLO")?,
            });
        }
        scenarios.push(slos);
    }
    Ok(ParvaData { models, scenarios })
}
