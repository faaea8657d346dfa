//! Demand forecast of one model and priority class: request rate with a
//! prediction band, and the token mix of its requests.
//!
//! Requests are counted in fixed buckets (a minute by default). With two
//! whole seasons of history the rate is forecast by MSTL (seasonal-trend
//! decomposition by Loess) with an ETS model of the deseasonalised trend;
//! with less, by ETS alone; with under ten buckets, by the recent mean with
//! a Poisson band. Both models come from the `augurs` crates; what Talon
//! adds is the bucketing, the choice of season, and the guard rails: the
//! band never falls below the Poisson noise of the point forecast, a rate is
//! never negative, and a model that fails to fit falls back a step.

use std::collections::VecDeque;

use augurs_core::{Fit, Predict};
use augurs_ets::AutoETS;
use augurs_mstl::MSTLModel;

/// Fewer buckets than this: the recent mean.
const MIN_MODEL_POINTS: usize = 10;
/// Prompt/output pairs kept as the token mix.
pub const MIX_SAMPLES: usize = 512;
/// Autocorrelation a candidate season needs to count as one.
const SEASON_MIN_ACF: f64 = 0.3;

/// How a series is bucketed and forecast.
#[derive(Clone, Debug, PartialEq)]
pub struct ForecastSettings {
    /// Seconds per bucket.
    pub bucket_secs: f64,
    /// Candidate seasons, in buckets (a day of minutes: 1440).
    pub seasons: Vec<usize>,
    /// Buckets of history kept (older ones are dropped).
    pub max_history: usize,
    /// Coverage of the prediction band, 0–1.
    pub level: f64,
}

impl Default for ForecastSettings {
    fn default() -> Self {
        ForecastSettings {
            bucket_secs: 60.0,
            seasons: vec![1440],
            max_history: 3 * 1440,
            level: 0.95,
        }
    }
}

/// Which model produced a forecast.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// No history yet: zero.
    Empty,
    /// Recent mean with a Poisson band.
    RecentMean,
    /// ETS on the whole series.
    Ets,
    /// MSTL with this season (buckets) and ETS on the trend.
    Mstl { season: usize },
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Method::Empty => write!(f, "no history"),
            Method::RecentMean => write!(f, "recent mean"),
            Method::Ets => write!(f, "ETS"),
            Method::Mstl { season } => write!(f, "MSTL(season {season} buckets)+ETS"),
        }
    }
}

/// Forecast request rate, per second, for the buckets after the last whole
/// one.
#[derive(Clone, Debug, PartialEq)]
pub struct RateForecast {
    pub method: Method,
    pub bucket_secs: f64,
    pub point: Vec<f64>,
    pub lower: Vec<f64>,
    pub upper: Vec<f64>,
}

impl RateForecast {
    /// Highest upper band over the first `buckets` buckets.
    pub fn peak_upper(&self, buckets: usize) -> f64 {
        self.upper
            .iter()
            .take(buckets.max(1))
            .copied()
            .fold(0.0, f64::max)
    }

    /// Highest point forecast over the first `buckets` buckets.
    pub fn peak_point(&self, buckets: usize) -> f64 {
        self.point
            .iter()
            .take(buckets.max(1))
            .copied()
            .fold(0.0, f64::max)
    }
}

/// One model-and-class demand series.
#[derive(Clone, Debug)]
pub struct DemandSeries {
    settings: ForecastSettings,
    /// Index of the bucket `counts[0]` covers.
    first_bucket: i64,
    counts: VecDeque<f64>,
    mix: VecDeque<(u32, u32)>,
}

impl DemandSeries {
    pub fn new(settings: ForecastSettings) -> DemandSeries {
        DemandSeries {
            settings,
            first_bucket: 0,
            counts: VecDeque::new(),
            mix: VecDeque::new(),
        }
    }

    pub fn settings(&self) -> &ForecastSettings {
        &self.settings
    }

    /// A series that goes on from what another one kept ([`Self::history`]
    /// and [`Self::mix`]): a new leader taking over the forecast. Counts
    /// beyond `max_history` (the oldest) and mix beyond the kept samples
    /// are dropped; negative or non-finite counts count as 0.
    pub fn resume(
        settings: ForecastSettings,
        first_bucket: i64,
        counts: &[f64],
        mix: &[(u32, u32)],
    ) -> DemandSeries {
        let mut series = DemandSeries::new(settings);
        series.first_bucket = first_bucket;
        series.counts = counts
            .iter()
            .map(|&c| if c.is_finite() { c.max(0.0) } else { 0.0 })
            .collect();
        if !series.counts.is_empty() {
            let last = first_bucket + series.counts.len() as i64 - 1;
            series.extend_to(last);
        }
        for &(p, o) in mix {
            series.record_mix(p, o);
        }
        series
    }

    /// The index of the first kept bucket and every kept bucket's count
    /// from it (the last one still filling).
    pub fn history(&self) -> (i64, Vec<f64>) {
        (self.first_bucket, self.counts.iter().copied().collect())
    }

    /// Count one request arriving at `at_secs` (any epoch, monotone enough:
    /// a request older than the kept history is dropped).
    pub fn record(&mut self, at_secs: f64, prompt_tokens: u32, output_tokens: u32) {
        self.add_count(at_secs, 1.0);
        self.record_mix(prompt_tokens, output_tokens);
    }

    /// Keep one request's token counts in the mix (its arrival counted
    /// apart, by [`DemandSeries::add_count`]).
    pub fn record_mix(&mut self, prompt_tokens: u32, output_tokens: u32) {
        self.mix.push_back((prompt_tokens, output_tokens));
        while self.mix.len() > MIX_SAMPLES {
            self.mix.pop_front();
        }
    }

    /// Add `n` requests to the bucket of `at_secs` (counts reported in bulk
    /// by a gateway).
    pub fn add_count(&mut self, at_secs: f64, n: f64) {
        let bucket = (at_secs / self.settings.bucket_secs).floor() as i64;
        if self.counts.is_empty() {
            self.first_bucket = bucket;
        }
        if bucket < self.first_bucket {
            return;
        }
        self.extend_to(bucket);
        let i = (bucket - self.first_bucket) as usize;
        self.counts[i] += n.max(0.0);
    }

    /// Make the series reach the bucket of `now_secs`, so that quiet time
    /// counts as zero requests.
    pub fn advance(&mut self, now_secs: f64) {
        if self.counts.is_empty() {
            return;
        }
        let bucket = (now_secs / self.settings.bucket_secs).floor() as i64;
        self.extend_to(bucket);
    }

    fn extend_to(&mut self, bucket: i64) {
        while self.first_bucket + (self.counts.len() as i64) <= bucket {
            self.counts.push_back(0.0);
        }
        while self.counts.len() > self.settings.max_history.max(2) {
            self.counts.pop_front();
            self.first_bucket += 1;
        }
    }

    /// Whole buckets (the last one, still filling, excluded), as counts.
    pub fn whole_counts(&self) -> Vec<f64> {
        let n = self.counts.len().saturating_sub(1);
        self.counts.iter().take(n).copied().collect()
    }

    /// Recent (prompt, output) token pairs, oldest first.
    pub fn mix(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        self.mix.iter().copied()
    }

    /// Mean prompt and output tokens of the kept mix (0 when none).
    pub fn mean_tokens(&self) -> (f64, f64) {
        if self.mix.is_empty() {
            return (0.0, 0.0);
        }
        let n = self.mix.len() as f64;
        let (p, o) = self.mix.iter().fold((0.0, 0.0), |(p, o), &(a, b)| {
            (p + f64::from(a), o + f64::from(b))
        });
        (p / n, o / n)
    }

    /// Forecast `horizon` buckets ahead of the last whole bucket.
    pub fn forecast(&self, horizon: usize) -> RateForecast {
        forecast_counts(&self.whole_counts(), &self.settings, horizon)
    }
}

/// Forecast of a bucketed count series, as rates per second.
pub fn forecast_counts(
    counts: &[f64],
    settings: &ForecastSettings,
    horizon: usize,
) -> RateForecast {
    let horizon = horizon.max(1);
    let (method, point, lower, upper) = if counts.is_empty() {
        (
            Method::Empty,
            vec![0.0; horizon],
            vec![0.0; horizon],
            vec![0.0; horizon],
        )
    } else {
        modelled(counts, settings, horizon)
            .unwrap_or_else(|| recent_mean(counts, settings, horizon))
    };
    let z = z_of(settings.level);
    let per_sec = |v: f64| v.max(0.0) / settings.bucket_secs;
    let mut out = RateForecast {
        method,
        bucket_secs: settings.bucket_secs,
        point: Vec::with_capacity(horizon),
        lower: Vec::with_capacity(horizon),
        upper: Vec::with_capacity(horizon),
    };
    // The model's band comes from the noise of the whole history; after a
    // burst has passed it stays wide for as long as the burst is kept. It
    // is capped at twice the band the recent buckets' own noise gives.
    let recent = &counts[counts.len().saturating_sub(MIN_MODEL_POINTS)..];
    let recent_sd = if recent.is_empty() {
        0.0
    } else {
        let m = recent.iter().sum::<f64>() / recent.len() as f64;
        (recent.iter().map(|c| (c - m).powi(2)).sum::<f64>() / recent.len() as f64).sqrt()
    };
    for i in 0..horizon {
        let p = point[i].max(0.0);
        // Counts are at least Poisson-noisy: the band is never narrower.
        let poisson = z * p.sqrt();
        let cap = p + 2.0 * z * recent_sd.max(p.sqrt());
        out.point.push(per_sec(p));
        out.lower.push(per_sec(lower[i].min(p - poisson)));
        out.upper.push(per_sec(upper[i].min(cap).max(p + poisson)));
    }
    out
}

type Bands = (Method, Vec<f64>, Vec<f64>, Vec<f64>);

fn modelled(counts: &[f64], settings: &ForecastSettings, horizon: usize) -> Option<Bands> {
    if counts.len() < MIN_MODEL_POINTS {
        return None;
    }
    if let Some(season) = pick_season(counts, &settings.seasons) {
        let model = MSTLModel::new(
            vec![season],
            AutoETS::new(1, "AZN").ok()?.into_trend_model(),
        );
        if let Some(bands) = fit_predict(&model, counts, horizon, settings.level) {
            return Some((Method::Mstl { season }, bands.0, bands.1, bands.2));
        }
    }
    let model = AutoETS::new(1, "AZN").ok()?;
    let (p, l, u) = fit_predict(&model, counts, horizon, settings.level)?;
    Some((Method::Ets, p, l, u))
}

fn fit_predict<M: Fit>(
    model: &M,
    y: &[f64],
    horizon: usize,
    level: f64,
) -> Option<(Vec<f64>, Vec<f64>, Vec<f64>)> {
    let fitted = model.fit(y).ok()?;
    let f = fitted.predict(horizon, Some(level)).ok()?;
    let intervals = f.intervals?;
    let ok = |v: &[f64]| v.len() == horizon && v.iter().all(|x| x.is_finite());
    if !ok(&f.point) || !ok(&intervals.lower) || !ok(&intervals.upper) {
        return None;
    }
    Some((f.point, intervals.lower, intervals.upper))
}

fn recent_mean(counts: &[f64], settings: &ForecastSettings, horizon: usize) -> Bands {
    let recent = &counts[counts.len().saturating_sub(MIN_MODEL_POINTS)..];
    let mean = recent.iter().sum::<f64>() / recent.len() as f64;
    let var = recent.iter().map(|c| (c - mean).powi(2)).sum::<f64>() / recent.len() as f64;
    let spread = z_of(settings.level) * var.max(mean).sqrt();
    (
        Method::RecentMean,
        vec![mean; horizon],
        vec![mean - spread; horizon],
        vec![mean + spread; horizon],
    )
}

/// The configured season the series shows, if it holds two of it: the
/// candidate with the highest autocorrelation above `SEASON_MIN_ACF`.
pub fn pick_season(counts: &[f64], candidates: &[usize]) -> Option<usize> {
    candidates
        .iter()
        .copied()
        .filter(|&s| s >= 2 && counts.len() >= 2 * s)
        .map(|s| (s, autocorrelation(counts, s)))
        .filter(|&(_, acf)| acf >= SEASON_MIN_ACF)
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(s, _)| s)
}

/// The lag in `2..=max_lag` with the highest autocorrelation, if any
/// reaches `SEASON_MIN_ACF`: the period a series shows by itself.
pub fn detect_period(counts: &[f64], max_lag: usize) -> Option<usize> {
    let max_lag = max_lag.min(counts.len() / 2);
    // A period's multiples correlate as well: the period is the first peak
    // within 10 % of the best one.
    let acfs: Vec<(usize, f64)> = (2..=max_lag)
        .map(|l| (l, autocorrelation(counts, l)))
        .collect();
    // Skip the lags next to zero, where any smooth series correlates.
    let first_dip = acfs.iter().position(|&(_, a)| a < 0.0)?;
    let best = acfs[first_dip..]
        .iter()
        .map(|&(_, a)| a)
        .fold(f64::MIN, f64::max);
    if best < SEASON_MIN_ACF {
        return None;
    }
    // The first run of lags near the best is the period's peak; its top
    // is the period.
    let rest = &acfs[first_dip..];
    let start = rest.iter().position(|&(_, a)| a >= 0.9 * best)?;
    rest[start..]
        .iter()
        .take_while(|&&(_, a)| a >= 0.9 * best)
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|&(l, _)| l)
}

fn autocorrelation(y: &[f64], lag: usize) -> f64 {
    let n = y.len();
    if lag >= n {
        return 0.0;
    }
    let mean = y.iter().sum::<f64>() / n as f64;
    let var: f64 = y.iter().map(|v| (v - mean).powi(2)).sum();
    if var <= f64::EPSILON {
        return 0.0;
    }
    // Normalised by the overlap, so long lags are not penalised.
    let cov: f64 = (lag..n).map(|i| (y[i] - mean) * (y[i - lag] - mean)).sum();
    (cov / (n - lag) as f64) / (var / n as f64)
}

/// Two-sided normal quantile for a coverage `level` (0.8, 0.9, 0.95, 0.99;
/// others by the nearest below).
fn z_of(level: f64) -> f64 {
    match level {
        l if l >= 0.99 => 2.576,
        l if l >= 0.95 => 1.960,
        l if l >= 0.90 => 1.645,
        l if l >= 0.80 => 1.282,
        _ => 1.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// A daily-shaped count series: `mean` per bucket, ±`amp` over a period
    /// of `period` buckets, Poisson-ish noise.
    fn seasonal(n: usize, period: usize, mean: f64, amp: f64, seed: u64) -> Vec<f64> {
        let mut rng = Rng::new(seed);
        (0..n)
            .map(|i| {
                let phase = 2.0 * std::f64::consts::PI * i as f64 / period as f64;
                let rate = mean * (1.0 + amp * phase.sin());
                // Normal approximation of Poisson noise.
                let noise = rate.sqrt() * rng.normal();
                (rate + noise).max(0.0).round()
            })
            .collect()
    }

    #[test]
    fn a_resumed_series_forecasts_as_the_one_it_goes_on_from() {
        let settings = ForecastSettings {
            bucket_secs: 60.0,
            seasons: vec![48],
            max_history: 200,
            level: 0.8,
        };
        let mut a = DemandSeries::new(settings.clone());
        for (i, c) in seasonal(240, 48, 50.0, 0.5, 9).into_iter().enumerate() {
            a.add_count(6_000.0 + i as f64 * 60.0, c);
            a.record_mix(100 + i as u32, 10);
        }
        let (first, counts) = a.history();
        assert_eq!(counts.len(), 200, "kept to max_history");
        let mix: Vec<(u32, u32)> = a.mix().collect();
        let mut b = DemandSeries::resume(settings.clone(), first, &counts, &mix);
        assert_eq!(b.history(), a.history());
        assert_eq!(b.mean_tokens(), a.mean_tokens());
        assert_eq!(b.forecast(10).point, a.forecast(10).point);
        // it goes on: a later count lands in the right bucket
        let last = (first + counts.len() as i64) as f64 * 60.0;
        a.add_count(last, 7.0);
        b.add_count(last, 7.0);
        assert_eq!(b.history(), a.history());
        // more than it keeps, and bad counts, are cut and zeroed
        let long: Vec<f64> = (0..300)
            .map(|i| if i == 299 { f64::NAN } else { 1.0 })
            .collect();
        let c = DemandSeries::resume(settings, 0, &long, &[]);
        let (first, kept) = c.history();
        assert_eq!((first, kept.len()), (100, 200));
        assert_eq!(kept[199], 0.0);
    }

    #[test]
    fn the_period_is_recovered_from_the_series() {
        for (period, seed) in [(24, 1), (48, 2), (60, 3)] {
            let y = seasonal(period * 5, period, 100.0, 0.5, seed);
            let found = detect_period(&y, period * 2);
            let off = found.map(|p| (p as i64 - period as i64).abs());
            assert!(
                off.is_some_and(|o| o <= 1),
                "period {period}: found {found:?}"
            );
        }
        let flat = seasonal(200, 24, 100.0, 0.0, 4);
        assert_eq!(detect_period(&flat, 48), None);
    }

    #[test]
    fn mstl_is_chosen_for_a_seasonal_series_and_its_band_covers() {
        let period = 48;
        let settings = ForecastSettings {
            bucket_secs: 60.0,
            seasons: vec![period, 7 * period],
            max_history: 10 * period,
            level: 0.95,
        };
        let mut covered = 0;
        let mut total = 0;
        for seed in 0..5 {
            let y = seasonal(period * 5, period, 120.0, 0.6, 10 + seed);
            let (history, future) = y.split_at(period * 4);
            let f = forecast_counts(history, &settings, period);
            assert_eq!(f.method, Method::Mstl { season: period });
            for (i, actual) in future.iter().enumerate() {
                let rate = actual / 60.0;
                total += 1;
                if rate >= f.lower[i] && rate <= f.upper[i] {
                    covered += 1;
                }
            }
            // The forecast follows the season: its peak is where the
            // series peaks (a quarter period in), not flat.
            let peak_at = (0..period)
                .max_by(|&a, &b| f.point[a].total_cmp(&f.point[b]))
                .unwrap_or(0);
            assert!(
                (peak_at as i64 - period as i64 / 4).abs() <= 4,
                "peak at {peak_at}"
            );
        }
        let coverage = f64::from(covered) / f64::from(total);
        assert!(coverage >= 0.85, "95% band covered {coverage:.2}");
    }

    #[test]
    fn short_history_falls_back_and_rates_are_never_negative() {
        let settings = ForecastSettings::default();
        let f = forecast_counts(&[], &settings, 5);
        assert_eq!(f.method, Method::Empty);
        assert!(f.point.iter().all(|&v| v == 0.0));
        let f = forecast_counts(&[3.0, 0.0, 1.0], &settings, 5);
        assert_eq!(f.method, Method::RecentMean);
        assert!(f.lower.iter().all(|&v| v >= 0.0) || f.lower.iter().all(|v| v.is_finite()));
        assert!(f.point.iter().all(|&v| v >= 0.0));
        assert!(f.upper[0] > f.point[0]);
        // A series falling to zero forecasts zero, not below.
        let falling: Vec<f64> = (0..30).map(|i| (30 - i) as f64).collect();
        let f = forecast_counts(&falling, &settings, 60);
        assert!(f.point.iter().all(|&v| v >= 0.0));
    }

    #[test]
    fn the_series_buckets_counts_and_quiet_time() {
        let mut s = DemandSeries::new(ForecastSettings {
            bucket_secs: 10.0,
            seasons: vec![],
            max_history: 5,
            level: 0.9,
        });
        s.record(100.0, 10, 2);
        s.record(105.0, 30, 4);
        s.record(112.0, 20, 6);
        s.advance(131.0);
        assert_eq!(s.whole_counts(), vec![2.0, 1.0, 0.0]);
        assert_eq!(s.mean_tokens(), (20.0, 4.0));
        s.advance(200.0);
        // Only five buckets are kept.
        assert_eq!(s.whole_counts().len(), 4);
        // A request older than the history is dropped, not misplaced.
        s.record(100.0, 1, 1);
        assert_eq!(s.whole_counts().iter().sum::<f64>(), 0.0);
    }
}
