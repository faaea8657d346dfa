//! B6's input: the Azure LLM inference trace (CSV) or a Mooncake trace
//! (JSON lines), and a multi-day trace whose rate follows a diurnal profile
//! built from one hour's request mix.

use std::path::Path;
use std::sync::Arc;

use crate::rng::Rng;
use crate::routing::prefix;

/// Tokens per Mooncake hash block.
pub const MOONCAKE_BLOCK_TOKENS: u32 = 512;

/// The trace formats B6 reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `TIMESTAMP,ContextTokens,GeneratedTokens`, timestamps
    /// `YYYY-MM-DD HH:MM:SS[.fraction]`.
    Azure,
    /// JSON lines with `timestamp` (ms), `input_length`, `output_length`,
    /// `hash_ids`.
    Mooncake,
}

impl Format {
    pub fn parse(s: &str) -> Result<Format, String> {
        match s {
            "azure" => Ok(Format::Azure),
            "mooncake" => Ok(Format::Mooncake),
            other => Err(format!(
                "unknown trace format {other:?}; expected azure or mooncake"
            )),
        }
    }
}

/// One request's shape.
#[derive(Clone, Debug, PartialEq)]
pub struct Shape {
    pub prompt: u32,
    pub output: u32,
    /// Chained prefix keys of the prompt's blocks (empty: no prefix data).
    pub keys: Arc<[u64]>,
}

/// A trace: arrivals in seconds from its start, each with a shape.
#[derive(Clone, Debug)]
pub struct Trace {
    pub name: String,
    pub shapes: Vec<Shape>,
    /// (arrival seconds, index into `shapes`), sorted by time.
    pub arrivals: Vec<(f64, u32)>,
    /// Tokens per prefix block (0 when the trace has no prefix data).
    pub block_tokens: u32,
}

impl Trace {
    pub fn duration_s(&self) -> f64 {
        self.arrivals.last().map_or(0.0, |a| a.0)
    }

    pub fn has_prefixes(&self) -> bool {
        self.block_tokens > 0
    }

    /// Every request's (prompt, output), in arrival order.
    pub fn mix(&self) -> Vec<(u32, u32)> {
        self.arrivals
            .iter()
            .map(|&(_, i)| {
                let s = &self.shapes[i as usize];
                (s.prompt, s.output)
            })
            .collect()
    }

    /// Highest arrival rate over any `window_s` window, per second.
    pub fn peak_rate(&self, window_s: f64) -> f64 {
        let mut peak = 0usize;
        let mut start = 0;
        for end in 0..self.arrivals.len() {
            while self.arrivals[end].0 - self.arrivals[start].0 > window_s {
                start += 1;
            }
            peak = peak.max(end - start + 1);
        }
        peak as f64 / window_s
    }
}

/// Reads a trace file, with a precise error for the first bad line.
pub fn load(path: &Path, format: Format) -> Result<Trace, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let name = path
        .file_stem()
        .map_or("trace".to_string(), |s| s.to_string_lossy().into_owned());
    let trace = match format {
        Format::Azure => parse_azure(&name, &text),
        Format::Mooncake => parse_mooncake(&name, &text),
    }
    .map_err(|e| format!("{}: {e}", path.display()))?;
    if trace.arrivals.is_empty() {
        return Err(format!("{}: no requests", path.display()));
    }
    Ok(trace)
}

fn finish(name: &str, mut rows: Vec<(f64, Shape)>, block_tokens: u32) -> Trace {
    rows.sort_by(|a, b| a.0.total_cmp(&b.0));
    let t0 = rows.first().map_or(0.0, |r| r.0);
    let mut shapes = Vec::with_capacity(rows.len());
    let mut arrivals = Vec::with_capacity(rows.len());
    for (i, (t, shape)) in rows.into_iter().enumerate() {
        arrivals.push((t - t0, i as u32));
        shapes.push(shape);
    }
    Trace {
        name: name.to_string(),
        shapes,
        arrivals,
        block_tokens,
    }
}

pub fn parse_azure(name: &str, text: &str) -> Result<Trace, String> {
    let mut rows = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || (n == 0 && line.starts_with("TIMESTAMP")) {
            continue;
        }
        let bad = |what: &str| {
            format!(
                "line {}: {what}; expected TIMESTAMP,ContextTokens,GeneratedTokens \
                 like 2023-11-16 18:15:46.68,374,44",
                n + 1
            )
        };
        let mut cols = line.split(',');
        let (Some(ts), Some(ctx), Some(gen), None) =
            (cols.next(), cols.next(), cols.next(), cols.next())
        else {
            return Err(bad("not three columns"));
        };
        let t = parse_timestamp(ts.trim()).ok_or_else(|| bad("bad timestamp"))?;
        let prompt = ctx
            .trim()
            .parse::<u32>()
            .map_err(|_| bad("bad ContextTokens"))?;
        let output = gen
            .trim()
            .parse::<u32>()
            .map_err(|_| bad("bad GeneratedTokens"))?;
        rows.push((
            t,
            Shape {
                prompt: prompt.max(1),
                output: output.max(1),
                keys: Arc::from(Vec::new()),
            },
        ));
    }
    Ok(finish(name, rows, 0))
}

/// Seconds since 1970 of `YYYY-MM-DD HH:MM:SS[.fraction]`.
fn parse_timestamp(s: &str) -> Option<f64> {
    let (date, time) = s.split_once([' ', 'T'])?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':');
    let (h, min, sec) = (t.next()?, t.next()?, t.next()?);
    let (h, min, sec) = (
        h.parse::<f64>().ok()?,
        min.parse::<f64>().ok()?,
        sec.parse::<f64>().ok()?,
    );
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || h >= 24.0 || min >= 60.0 || sec >= 61.0
    {
        return None;
    }
    Some(days_from_civil(y, m, day) as f64 * 86_400.0 + h * 3600.0 + min * 60.0 + sec)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[derive(serde::Deserialize)]
struct MooncakeRow {
    timestamp: f64,
    input_length: u32,
    output_length: u32,
    #[serde(default)]
    hash_ids: Vec<u64>,
}

pub fn parse_mooncake(name: &str, text: &str) -> Result<Trace, String> {
    let mut rows = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let row: MooncakeRow = serde_json::from_str(line).map_err(|e| {
            format!(
                "line {}: {e}; expected {{\"timestamp\": ms, \"input_length\": n, \
                 \"output_length\": n, \"hash_ids\": [..]}}",
                n + 1
            )
        })?;
        if !row.timestamp.is_finite() || row.timestamp < 0.0 {
            return Err(format!(
                "line {}: timestamp must be milliseconds ≥ 0",
                n + 1
            ));
        }
        rows.push((
            row.timestamp / 1000.0,
            Shape {
                prompt: row.input_length.max(1),
                output: row.output_length.max(1),
                keys: Arc::from(prefix::chain(row.hash_ids)),
            },
        ));
    }
    Ok(finish(name, rows, MOONCAKE_BLOCK_TOKENS))
}

/// How the multi-day trace is made.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Diurnal {
    pub days: f64,
    /// Peak-to-mean swing of the daily rate: rate(t) = mean · (1 + a · sin).
    pub amplitude: f64,
    pub seed: u64,
}

/// A `days`-long trace from `hour`: arrivals are a Poisson process whose
/// rate follows one sinusoid a day (trough at 04:00, peak at 16:00) around
/// the hour's mean rate, with a ±10 % day-to-day level; each arrival takes
/// the shape of a request drawn uniformly from the hour, so the token mix
/// and the prefix sharing are the hour's.
pub fn diurnal(hour: &Trace, d: Diurnal) -> Trace {
    let mut rng = Rng::new(d.seed);
    let span = hour.duration_s().max(1.0);
    let mean = hour.arrivals.len() as f64 / span;
    let amplitude = d.amplitude.clamp(0.0, 0.95);
    let peak = mean * (1.0 + amplitude) * 1.1;
    let end = d.days * 86_400.0;
    let day_levels: Vec<f64> = (0..=d.days.ceil() as usize)
        .map(|_| 1.0 + 0.1 * (2.0 * rng.unit() - 1.0))
        .collect();
    let mut arrivals = Vec::new();
    let mut t = 0.0;
    loop {
        // Thinning: candidates at the peak rate, kept with rate(t)/peak.
        t += rng.exp() / peak;
        if t >= end {
            break;
        }
        let day = (t / 86_400.0) as usize;
        let phase = 2.0 * std::f64::consts::PI * ((t % 86_400.0) / 86_400.0 - 10.0 / 24.0);
        let rate = mean * day_levels[day] * (1.0 + amplitude * phase.sin());
        if rng.unit() * peak < rate {
            let pick = hour.arrivals[rng.below(hour.arrivals.len() as u64) as usize].1;
            arrivals.push((t, pick));
        }
    }
    Trace {
        name: format!("{}-diurnal{}d", hour.name, d.days),
        shapes: hour.shapes.clone(),
        arrivals,
        block_tokens: hour.block_tokens,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn azure_rows_parse_and_bad_ones_say_what_to_change() {
        let text = "TIMESTAMP,ContextTokens,GeneratedTokens\n\
                    2023-11-16 18:15:46.5,374,44\n\
                    2023-11-16 18:15:50.0,396,109\n\
                    2023-11-17 00:00:00,10,1\n";
        let t = parse_azure("a", text).map_err(|e| e.to_string());
        let Ok(t) = t else { panic!("{t:?}") };
        assert_eq!(t.arrivals.len(), 3);
        assert!((t.arrivals[1].0 - 3.5).abs() < 1e-6);
        // Across midnight.
        assert!((t.arrivals[2].0 - (5.0 * 3600.0 + 44.0 * 60.0 + 13.5)).abs() < 1e-6);
        let err = parse_azure("a", "2023-11-16 18:15:46,374\n")
            .err()
            .unwrap_or_default();
        assert!(
            err.contains("line 1") && err.contains("three columns"),
            "{err}"
        );
        let err = parse_azure("a", "yesterday,1,2\n")
            .err()
            .unwrap_or_default();
        assert!(err.contains("bad timestamp"), "{err}");
    }

    #[test]
    fn mooncake_rows_keep_prefix_keys() {
        let text = "{\"timestamp\": 0, \"input_length\": 1024, \"output_length\": 5, \"hash_ids\": [1, 2]}\n\
                    {\"timestamp\": 1500, \"input_length\": 600, \"output_length\": 9, \"hash_ids\": [1, 3]}\n";
        let t = parse_mooncake("m", text).map_err(|e| e.to_string());
        let Ok(t) = t else { panic!("{t:?}") };
        assert_eq!(t.arrivals[1].0, 1.5);
        assert_eq!(t.shapes[0].keys[0], t.shapes[1].keys[0]);
        assert_ne!(t.shapes[0].keys[1], t.shapes[1].keys[1]);
        let err = parse_mooncake("m", "{\"timestamp\": 1}\n")
            .err()
            .unwrap_or_default();
        assert!(
            err.contains("line 1") && err.contains("input_length"),
            "{err}"
        );
    }

    #[test]
    fn the_diurnal_trace_keeps_the_mean_and_swings_daily() {
        let hour = Trace {
            name: "h".into(),
            shapes: vec![Shape {
                prompt: 100,
                output: 10,
                keys: Arc::from(Vec::new()),
            }],
            arrivals: (0..3600).map(|i| (f64::from(i), 0)).collect(),
            block_tokens: 0,
        };
        let t = diurnal(
            &hour,
            Diurnal {
                days: 2.0,
                amplitude: 0.6,
                seed: 1,
            },
        );
        let mean = t.arrivals.len() as f64 / (2.0 * 86_400.0);
        assert!((mean - 1.0).abs() < 0.12, "mean {mean}");
        let in_hour = |h: f64| {
            t.arrivals
                .iter()
                .filter(|a| (a.0 % 86_400.0) / 3600.0 >= h && (a.0 % 86_400.0) / 3600.0 < h + 1.0)
                .count() as f64
                / (2.0 * 3600.0)
        };
        assert!(
            in_hour(16.0) > 1.4 && in_hour(4.0) < 0.6,
            "{} {}",
            in_hour(16.0),
            in_hour(4.0)
        );
    }
}
