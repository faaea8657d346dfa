//! Tenants, inference keys and what they spent: the gateway's policy data
//! in the replicated state (data format 5).
//!
//! A tenant is a name with limits and budgets and, optionally, the models
//! its keys may use. An inference key is a credential of role `inference`
//! with a [`KeyPolicy`]: its tenant, a name unique in the tenant (the key's
//! identity across rotations: limits and usage follow the name, not the
//! secret), allowed models, the highest priority its requests may ask
//! for, and its own limits and budgets. Usage is kept per UTC day, tenant,
//! key and model; the leader records the gateways' charges in batches.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Most tenants the registry holds.
pub const MAX_TENANTS: usize = 10_000;
/// Most models a tenant or key may list.
pub const MAX_MODELS: usize = 256;
/// Days of usage kept (older days are dropped as new usage is recorded).
pub const KEEP_DAYS: u32 = 400;
/// Most usage rows one entry records.
pub const MAX_USAGE_ROWS: usize = 10_000;

const DAY_MS: u64 = 86_400_000;

/// A request's priority class; the order is from most to least urgent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Priority {
    Critical,
    High,
    Normal,
    Low,
}

impl Priority {
    pub const ALL: [Priority; 4] = [
        Priority::Critical,
        Priority::High,
        Priority::Normal,
        Priority::Low,
    ];

    pub fn parse(s: &str) -> Result<Priority, String> {
        Priority::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| format!("priority {s:?} is unknown; use critical, high, normal or low"))
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Critical => "critical",
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }
}

/// Limits and budgets; `None` is no limit.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    /// Requests per minute (a token bucket of this size, refilled evenly).
    pub requests_per_minute: Option<u32>,
    /// Prompt plus completion tokens per minute.
    pub tokens_per_minute: Option<u64>,
    /// US dollars per UTC day.
    pub daily_budget_usd: Option<f64>,
    /// US dollars per UTC calendar month.
    pub monthly_budget_usd: Option<f64>,
}

impl Limits {
    pub fn validate(&self) -> Result<(), String> {
        if self.requests_per_minute == Some(0) {
            return Err(
                "requests_per_minute must be at least 1 (leave it unset for no limit)".into(),
            );
        }
        if let Some(t) = self.tokens_per_minute {
            if t == 0 || t > 1_000_000_000_000 {
                return Err(format!(
                    "tokens_per_minute must be 1 to 10^12 (leave it unset for no limit), got {t}"
                ));
            }
        }
        for (field, v) in [
            ("daily_budget_usd", self.daily_budget_usd),
            ("monthly_budget_usd", self.monthly_budget_usd),
        ] {
            if let Some(v) = v {
                if !v.is_finite() || v <= 0.0 || v > 1e12 {
                    return Err(format!(
                        "{field} must be a positive number of dollars up to 10^12, got {v}"
                    ));
                }
            }
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        *self == Limits::default()
    }
}

/// One tenant.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Tenant {
    pub name: String,
    /// Models its keys may use; empty: every model.
    pub models: Vec<String>,
    pub limits: Limits,
    pub created_at_ms: u64,
    pub revision: u64,
    /// Mask PII in its prompts and answers ([`crate::gateway::mask`]).
    pub mask_pii: bool,
    /// Keep its deterministic answers this long (0: no cache).
    pub cache_ttl_s: u32,
    /// Content filters on its prompts and answers, in order.
    pub filters: Vec<ContentFilter>,
}

/// Most content filters a tenant holds.
pub const MAX_FILTERS: usize = 32;
/// Longest filter pattern, bytes.
pub const MAX_PATTERN: usize = 256;

/// A regular expression (Rust `regex` syntax; `(?i)` for any case) and
/// what to do where it matches.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContentFilter {
    pub pattern: String,
    pub action: FilterAction,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FilterAction {
    /// Refuse a prompt that matches; withhold an answer that does.
    Block,
    /// Replace what matches by `[FILTERED]`.
    Mask,
}

impl FilterAction {
    pub fn parse(s: &str) -> Result<FilterAction, String> {
        match s {
            "block" => Ok(FilterAction::Block),
            "mask" => Ok(FilterAction::Mask),
            other => Err(format!(
                "filter action {other:?} is unknown; use block or mask"
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FilterAction::Block => "block",
            FilterAction::Mask => "mask",
        }
    }
}

impl ContentFilter {
    /// The compiled pattern, or why it is refused.
    pub fn compile(&self) -> Result<regex::Regex, String> {
        if self.pattern.is_empty() || self.pattern.len() > MAX_PATTERN {
            return Err(format!(
                "filter pattern must be 1 to {MAX_PATTERN} bytes long, got {}",
                self.pattern.len()
            ));
        }
        regex::RegexBuilder::new(&self.pattern)
            .size_limit(1 << 20)
            .build()
            .map_err(|e| {
                format!(
                    "filter pattern {:?} is not a valid regular expression: {e}",
                    self.pattern
                )
            })
    }
}

/// The policy of one inference key, by credential id.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KeyPolicy {
    pub tenant: String,
    /// Unique in the tenant; kept across rotations.
    pub name: String,
    /// Models it may use (within its tenant's); empty: the tenant's.
    pub models: Vec<String>,
    /// The highest priority its requests may ask for; also what they get
    /// when they name none and this is below normal.
    pub max_priority: Priority,
    pub limits: Limits,
    pub revision: u64,
}

impl KeyPolicy {
    /// `tenant/name`: how limits, usage and logs name the key.
    pub fn label(&self) -> String {
        format!("{}/{}", self.tenant, self.name)
    }

    /// Whether the key (and its tenant) may use `model`.
    pub fn allows_model(&self, tenant: &Tenant, model: &str) -> bool {
        let listed = |list: &[String]| list.is_empty() || list.iter().any(|m| m == model);
        listed(&tenant.models) && listed(&self.models)
    }
}

/// A usage row: one UTC day (days since 1970-01-01), tenant, key name and
/// model.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct UsageKey {
    pub day: u32,
    pub tenant: String,
    pub key: String,
    pub model: String,
}

impl UsageKey {
    /// The lowest key of `tenant` on `day` (every tenant's: `""`).
    pub fn first_of(day: u32, tenant: &str) -> UsageKey {
        UsageKey {
            day,
            tenant: tenant.to_string(),
            key: String::new(),
            model: String::new(),
        }
    }
}

/// What was spent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// GPU time charged: seconds on the replica's GPUs, shared among the
    /// requests it served at once.
    pub gpu_seconds: f64,
    pub cost_usd: f64,
}

impl Usage {
    pub fn add(&mut self, other: &Usage) {
        self.requests = self.requests.saturating_add(other.requests);
        self.prompt_tokens = self.prompt_tokens.saturating_add(other.prompt_tokens);
        self.completion_tokens = self
            .completion_tokens
            .saturating_add(other.completion_tokens);
        self.gpu_seconds += other.gpu_seconds;
        self.cost_usd += other.cost_usd;
    }

    fn validate(&self) -> Result<(), String> {
        for (field, v) in [
            ("gpu_seconds", self.gpu_seconds),
            ("cost_usd", self.cost_usd),
        ] {
            if !v.is_finite() || !(0.0..=1e12).contains(&v) {
                return Err(format!(
                    "usage {field} must be finite and 0 to 10^12, got {v}"
                ));
            }
        }
        Ok(())
    }
}

/// Tenants, key policies and usage.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Tenancy {
    pub tenants: BTreeMap<String, Tenant>,
    /// By credential id.
    pub keys: BTreeMap<String, KeyPolicy>,
    pub usage: BTreeMap<UsageKey, Usage>,
}

impl Tenancy {
    /// Spending of `tenant` (and of key `key`, if given) from day `from`
    /// through day `to`.
    /// Rows sort by day, tenant, key: each day's rows of one tenant are
    /// one range, so this reads only those (it runs on every request of
    /// a key with a budget).
    pub fn spent(&self, tenant: &str, key: Option<&str>, from: u32, to: u32) -> f64 {
        (from..=to)
            .map(|day| {
                self.usage
                    .range(UsageKey::first_of(day, tenant)..)
                    .take_while(|(k, _)| k.day == day && k.tenant == tenant)
                    .filter(|(k, _)| key.is_none_or(|key| k.key == key))
                    .map(|(_, u)| u.cost_usd)
                    .sum::<f64>()
            })
            .sum()
    }
}

/// The UTC day of a time in milliseconds since the epoch.
pub fn day_of(ms: u64) -> u32 {
    (ms / DAY_MS) as u32
}

/// The first day of the UTC calendar month that `day` is in.
pub fn month_start(day: u32) -> u32 {
    let (y, m, _) = civil_from_days(i64::from(day));
    days_from_civil(y, m, 1) as u32
}

/// `YYYY-MM-DD` of a day number.
pub fn day_name(day: u32) -> String {
    let (y, m, d) = civil_from_days(i64::from(day));
    format!("{y:04}-{m:02}-{d:02}")
}

/// Howard Hinnant's algorithm: days since 1970-01-01 to (year, month, day).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from(if m > 2 { m - 3 } else { m + 9 });
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Checks a tenant or key name: 1 to 64 characters of lowercase letters,
/// digits, `-`, `_` and `.`.
pub fn validate_name(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err(format!(
            "{what} name must be 1 to 64 characters long, got {} characters",
            name.len()
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "{what} name {name:?} contains {bad:?}; use lowercase letters, digits, '-', '_' and '.'"
        ));
    }
    Ok(())
}

fn validate_models(models: &[String]) -> Result<(), String> {
    if models.len() > MAX_MODELS {
        return Err(format!(
            "{} models listed; the most is {MAX_MODELS}",
            models.len()
        ));
    }
    for m in models {
        super::model::validate_name(m)?;
    }
    Ok(())
}

impl Tenant {
    pub fn validate(&self) -> Result<(), String> {
        validate_name("tenant", &self.name)?;
        if self.filters.len() > MAX_FILTERS {
            return Err(format!(
                "{} content filters; the most is {MAX_FILTERS}",
                self.filters.len()
            ));
        }
        for f in &self.filters {
            f.compile()?;
        }
        if self.cache_ttl_s > 86_400 {
            return Err(format!(
                "cache_ttl_s is {}; the most is 86400 (a day)",
                self.cache_ttl_s
            ));
        }
        validate_models(&self.models)?;
        self.limits.validate()
    }
}

impl KeyPolicy {
    pub fn validate(&self) -> Result<(), String> {
        validate_name("tenant", &self.tenant)?;
        validate_name("key", &self.name)?;
        validate_models(&self.models)?;
        self.limits.validate()
    }
}

/// Checks one usage row's names and numbers.
pub fn validate_usage_row(k: &UsageKey, u: &Usage) -> Result<(), String> {
    validate_name("tenant", &k.tenant)?;
    validate_name("key", &k.key)?;
    super::model::validate_name(&k.model)?;
    u.validate()
}

/// Tenancy is written only in the current layout: values of data formats
/// 2 to 4 have no such field, and read as empty.
pub(super) fn serialize_tenancy<S: Serializer>(t: &Tenancy, s: S) -> Result<S::Ok, S::Error> {
    if super::replica::layout_has_tenancy() {
        t.serialize(s)
    } else {
        s.serialize_unit()
    }
}

pub(super) fn deserialize_tenancy<'de, D: Deserializer<'de>>(d: D) -> Result<Tenancy, D::Error> {
    if super::replica::layout_has_tenancy() {
        Tenancy::deserialize(d)
    } else {
        Ok(Tenancy::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar_days_and_months() {
        assert_eq!(day_name(0), "1970-01-01");
        // 2026-12-02 is day 20789
        assert_eq!(day_name(20_789), "2026-12-02");
        assert_eq!(day_name(month_start(20_789)), "2026-12-01");
        assert_eq!(day_name(month_start(day_of(951_782_400_000))), "2000-02-01"); // 2000-02-29
        for d in [0u32, 59, 60, 365, 11_016, 20_789, 40_000] {
            let (y, m, dd) = civil_from_days(i64::from(d));
            assert_eq!(days_from_civil(y, m, dd), i64::from(d));
        }
    }

    #[test]
    fn limits_refuse_nonsense() {
        let bad = [
            Limits {
                requests_per_minute: Some(0),
                ..Default::default()
            },
            Limits {
                tokens_per_minute: Some(0),
                ..Default::default()
            },
            Limits {
                daily_budget_usd: Some(f64::NAN),
                ..Default::default()
            },
            Limits {
                monthly_budget_usd: Some(-1.0),
                ..Default::default()
            },
        ];
        for l in bad {
            assert!(l.validate().is_err(), "{l:?}");
        }
        assert!(Limits {
            requests_per_minute: Some(60),
            daily_budget_usd: Some(2.5),
            ..Default::default()
        }
        .validate()
        .is_ok());
    }
}
