//! The gateway's chain as the registry holds it (format 6): rules, each
//! with a priority, conditions and one action. The gateway runs them in
//! priority order among its built-in plugins
//! ([`crate::gateway::chain`]); here are the types, their checks and the
//! commands that put and delete them.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::tenant::{validate_name, Priority};
use super::{rejected, Change, RejectionKind, Response, State};

/// Most rules a cluster holds.
pub const MAX_RULES: usize = 256;
/// Most entries in one list of a rule (models, tenants, fallbacks).
pub const MAX_LIST: usize = 32;
/// Rule priorities run from 0 to this; the built-in plugins sit at fixed
/// ones inside ([`BUILTINS`]).
pub const MAX_PRIORITY: u32 = 999;

/// The built-in plugins' places in the chain, in order: a rule runs before
/// a built-in whose priority is higher than its own.
pub const BUILTINS: [(&str, u32, &str); 4] = [
    ("keys", 100, "the key's allowed models and priority ceiling"),
    (
        "guardrails",
        200,
        "the tenant's content filters and PII masking of the prompt",
    ),
    (
        "limits",
        300,
        "budgets, then requests and tokens per minute, cluster-wide",
    ),
    ("cache", 1000, "the response cache, after every rule"),
];

/// The priority of the built-in plugin `name`.
pub fn builtin_priority(name: &str) -> u32 {
    BUILTINS
        .iter()
        .find(|(n, _, _)| *n == name)
        .map_or(0, |(_, p, _)| *p)
}

/// A time of day window in minutes after midnight, `[from, to)`, at a
/// fixed offset from UTC; `from > to` wraps past midnight (22:00–06:00).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    pub from_minute: u16,
    pub to_minute: u16,
    /// Minutes east of UTC (−720 to 840): the operator's clock.
    pub utc_offset_minutes: i16,
}

impl Window {
    /// Whether `now_ms` (Unix time) falls inside.
    pub fn contains(&self, now_ms: u64) -> bool {
        let local = (now_ms / 60_000) as i64 + i64::from(self.utc_offset_minutes);
        let minute = local.rem_euclid(24 * 60) as u16;
        if self.from_minute <= self.to_minute {
            (self.from_minute..self.to_minute).contains(&minute)
        } else {
            minute >= self.from_minute || minute < self.to_minute
        }
    }

    /// `HH:MM-HH:MM`, with the offset when there is one.
    pub fn label(&self) -> String {
        let hm = |m: u16| format!("{:02}:{:02}", m / 60, m % 60);
        let mut s = format!("{}-{}", hm(self.from_minute), hm(self.to_minute));
        if self.utc_offset_minutes != 0 {
            let o = self.utc_offset_minutes;
            s += &format!(
                " UTC{}{:02}:{:02}",
                if o < 0 { '-' } else { '+' },
                o.unsigned_abs() / 60,
                o.unsigned_abs() % 60
            );
        }
        s
    }

    /// Parses `HH:MM-HH:MM` (24:00 allowed as an end).
    pub fn parse(s: &str, utc_offset_minutes: i16) -> Result<Window, String> {
        let bad = || format!("hours {s:?} are not HH:MM-HH:MM (for example 09:00-17:30)");
        let (from, to) = s.split_once('-').ok_or_else(bad)?;
        let minute = |t: &str| -> Result<u16, String> {
            let (h, m) = t.trim().split_once(':').ok_or_else(bad)?;
            let (h, m): (u16, u16) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
            if m > 59 || h > 24 || (h == 24 && m > 0) {
                return Err(bad());
            }
            Ok(h * 60 + m)
        };
        let w = Window {
            from_minute: minute(from)?,
            to_minute: minute(to)?,
            utc_offset_minutes,
        };
        w.validate()?;
        Ok(w)
    }

    fn validate(&self) -> Result<(), String> {
        if self.from_minute > 24 * 60 || self.to_minute > 24 * 60 {
            return Err(format!(
                "hours {} reach past 24:00; give minutes of the day from 0 to 1440",
                self.label()
            ));
        }
        if self.from_minute == self.to_minute {
            return Err(format!(
                "hours {} are empty; give a window such as 09:00-17:00 (00:00-24:00 for all day)",
                self.label()
            ));
        }
        if !(-720..=840).contains(&self.utc_offset_minutes) {
            return Err(format!(
                "a UTC offset of {} minutes is no time zone's; give -720 to 840",
                self.utc_offset_minutes
            ));
        }
        Ok(())
    }
}

/// When a rule applies: every condition given must hold (an empty list is
/// no condition).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conditions {
    /// The model the request asks for (as the chain has it so far).
    pub models: Vec<String>,
    /// The tenant of the request's key.
    pub tenants: Vec<String>,
    /// The priority the request asks for (normal when it names none).
    pub priorities: Vec<Priority>,
    /// A header and the value it must have (names in lowercase).
    pub header: Option<(String, String)>,
    pub hours: Option<Window>,
}

/// What a rule does to a request it applies to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Action {
    /// Send it to another model (the cost rule: at peak hours, low
    /// priority traffic to a cheaper model).
    Route { model: String },
    /// Send `percent` % of the requests it applies to to another model,
    /// exactly over every hundred (a canary between models).
    Split { model: String, percent: u32 },
    /// When the model cannot serve it (every replica full, failing or
    /// gone, or its breaker open), try these models in order.
    Fallback { models: Vec<String> },
    /// A breaker for the model: after `failures` failures in a row its
    /// requests fail at once (and fall back) for `open_s` seconds, then
    /// one probe is let through.
    Breaker { failures: u32, open_s: u32 },
    /// Refuse it with this message (403).
    Deny { message: String },
    /// Run it at this priority at most.
    CapPriority { priority: Priority },
    /// Mask PII in its prompt and answer (before the guardrails run).
    MaskPii,
}

impl Action {
    pub fn kind(&self) -> &'static str {
        match self {
            Action::Route { .. } => "route",
            Action::Split { .. } => "split",
            Action::Fallback { .. } => "fallback",
            Action::Breaker { .. } => "breaker",
            Action::Deny { .. } => "deny",
            Action::CapPriority { .. } => "cap-priority",
            Action::MaskPii => "mask-pii",
        }
    }

    /// One line for listings and the audit log.
    pub fn label(&self) -> String {
        match self {
            Action::Route { model } => format!("route to {model}"),
            Action::Split { model, percent } => format!("split {percent} % to {model}"),
            Action::Fallback { models } => format!("fall back to {}", models.join(", ")),
            Action::Breaker { failures, open_s } => {
                format!("breaker: open after {failures} failures for {open_s} s")
            }
            Action::Deny { message } => format!("deny: {message}"),
            Action::CapPriority { priority } => format!("priority at most {}", priority.as_str()),
            Action::MaskPii => "mask PII".into(),
        }
    }
}

/// One entry of the chain.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rule {
    pub name: String,
    /// 0 to [`MAX_PRIORITY`]; lower runs first.
    pub priority: u32,
    pub when: Conditions,
    pub action: Action,
    /// Set by apply.
    pub created_at_ms: u64,
    pub revision: u64,
}

impl Rule {
    /// Checks what a rule may hold; the message says what to change.
    pub fn validate(&self) -> Result<(), String> {
        validate_name("rule", &self.name)?;
        if self.priority > MAX_PRIORITY {
            return Err(format!(
                "rule {} has priority {}; give 0 to {MAX_PRIORITY}",
                self.name, self.priority
            ));
        }
        if let Some((name, _, _)) = BUILTINS.iter().find(|(_, p, _)| *p == self.priority) {
            return Err(format!(
                "priority {} is the built-in plugin {name}'s; give another",
                self.priority
            ));
        }
        let w = &self.when;
        for list in [&w.models, &w.tenants] {
            if list.len() > MAX_LIST {
                return Err(format!(
                    "rule {} lists {} names in one condition; the most is {MAX_LIST}",
                    self.name,
                    list.len()
                ));
            }
        }
        for m in &w.models {
            super::model::validate_name(m)?;
        }
        for t in &w.tenants {
            validate_name("tenant", t)?;
        }
        if let Some((name, value)) = &w.header {
            let valid = !name.is_empty()
                && name.len() <= 64
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if !valid {
                return Err(format!(
                    "header name {name:?} must be 1 to 64 lowercase letters, digits or '-'"
                ));
            }
            if value.len() > 256 || value.chars().any(char::is_control) {
                return Err(format!(
                    "header value for {name} must be at most 256 printable characters"
                ));
            }
        }
        if let Some(h) = &w.hours {
            h.validate()?;
        }
        match &self.action {
            Action::Route { model } => super::model::validate_name(model)?,
            Action::Split { model, percent } => {
                super::model::validate_name(model)?;
                if !(1..=100).contains(percent) {
                    return Err(format!(
                        "a split sends 1 to 100 % of requests, not {percent}"
                    ));
                }
            }
            Action::Fallback { models } => {
                if models.is_empty() || models.len() > MAX_LIST {
                    return Err(format!(
                        "a fallback names 1 to {MAX_LIST} models, not {}",
                        models.len()
                    ));
                }
                for m in models {
                    super::model::validate_name(m)?;
                }
            }
            Action::Breaker { failures, open_s } => {
                if !(1..=1000).contains(failures) || !(1..=3600).contains(open_s) {
                    return Err(format!(
                        "a breaker opens after 1 to 1000 failures for 1 to 3600 s, not {failures} for {open_s} s"
                    ));
                }
            }
            Action::Deny { message } => {
                if message.is_empty() || message.len() > 512 {
                    return Err("a deny rule's message must be 1 to 512 bytes".into());
                }
            }
            Action::CapPriority { .. } => {}
            Action::MaskPii => {
                let guardrails = builtin_priority("guardrails");
                if self.priority >= guardrails {
                    return Err(format!(
                        "a mask-pii rule must run before the guardrails (priority below {guardrails}), not at {}",
                        self.priority
                    ));
                }
            }
        }
        Ok(())
    }

    /// Whether the rule applies to a request for `model` of `tenant` at
    /// `priority` with `header` (a lookup by lowercase name) at `now_ms`.
    pub fn applies(
        &self,
        model: &str,
        tenant: Option<&str>,
        priority: Priority,
        header: impl Fn(&str) -> Option<String>,
        now_ms: u64,
    ) -> bool {
        let w = &self.when;
        (w.models.is_empty() || w.models.iter().any(|m| m == model))
            && (w.tenants.is_empty() || tenant.is_some_and(|t| w.tenants.iter().any(|x| x == t)))
            && (w.priorities.is_empty() || w.priorities.contains(&priority))
            && w.header
                .as_ref()
                .is_none_or(|(name, value)| header(name).as_deref() == Some(value.as_str()))
            && w.hours.is_none_or(|h| h.contains(now_ms))
    }

    /// The conditions in one line (`any request` without any).
    pub fn conditions_label(&self) -> String {
        let w = &self.when;
        let mut parts = Vec::new();
        if !w.models.is_empty() {
            parts.push(format!("model {}", w.models.join("|")));
        }
        if !w.tenants.is_empty() {
            parts.push(format!("tenant {}", w.tenants.join("|")));
        }
        if !w.priorities.is_empty() {
            let p: Vec<&str> = w.priorities.iter().map(|p| p.as_str()).collect();
            parts.push(format!("priority {}", p.join("|")));
        }
        if let Some((n, v)) = &w.header {
            parts.push(format!("{n}: {v}"));
        }
        if let Some(h) = &w.hours {
            parts.push(format!("hours {}", h.label()));
        }
        if parts.is_empty() {
            "any request".into()
        } else {
            parts.join(", ")
        }
    }
}

impl State {
    /// Creates or replaces a rule of the chain.
    pub(super) fn put_rule(
        &mut self,
        index: u64,
        at: u64,
        rule: &Rule,
    ) -> Result<(Response, Vec<Change>, (&'static str, String, String)), (Response, Vec<Change>)>
    {
        if let Err(message) = rule.validate() {
            return Err(rejected(RejectionKind::Invalid, message));
        }
        let created = self.chain.get(&rule.name).map(|r| r.created_at_ms);
        if created.is_none() && self.chain.len() >= MAX_RULES {
            return Err(rejected(
                RejectionKind::Invalid,
                format!("the chain holds {MAX_RULES} rules, the most; delete one first"),
            ));
        }
        let mut r = rule.clone();
        r.created_at_ms = created.unwrap_or(at);
        r.revision = index;
        let detail = format!(
            "priority={} when={} action={}",
            r.priority,
            r.conditions_label(),
            r.action.label()
        );
        self.chain.insert(r.name.clone(), r.clone());
        Ok((
            Response::Rule(Box::new(r)),
            vec![Change::Rule(rule.name.clone())],
            ("chain.put", rule.name.clone(), detail),
        ))
    }

    pub(super) fn delete_rule(
        &mut self,
        index: u64,
        name: &str,
    ) -> Result<(Response, Vec<Change>, (&'static str, String, String)), (Response, Vec<Change>)>
    {
        if self.chain.remove(name).is_none() {
            let known: Vec<&str> = self.chain.keys().map(String::as_str).collect();
            return Err(rejected(
                RejectionKind::NotFound,
                format!(
                    "rule {name:?} does not exist; the chain has: {}",
                    if known.is_empty() {
                        "no rules".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            ));
        }
        Ok((
            Response::Deleted { revision: index },
            vec![Change::Rule(name.to_string())],
            ("chain.delete", name.to_string(), String::new()),
        ))
    }
}

/// The chain is written only in the current layout: values of data formats
/// 2 to 5 have no such field, and read as empty.
pub(super) fn serialize_chain<S: Serializer>(
    c: &BTreeMap<String, Rule>,
    s: S,
) -> Result<S::Ok, S::Error> {
    if super::replica::layout_is_current() {
        c.serialize(s)
    } else {
        s.serialize_unit()
    }
}

pub(super) fn deserialize_chain<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, Rule>, D::Error> {
    if super::replica::layout_is_current() {
        BTreeMap::deserialize(d)
    } else {
        Ok(BTreeMap::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(priority: u32, action: Action) -> Rule {
        Rule {
            name: "r".into(),
            priority,
            when: Conditions::default(),
            action,
            created_at_ms: 0,
            revision: 0,
        }
    }

    #[test]
    fn windows_wrap_midnight_and_keep_their_offset() {
        let at = |h: u64, m: u64| (20_789 * 24 * 60 + h * 60 + m) * 60_000;
        let day = Window::parse("09:00-17:30", 0).unwrap();
        assert!(!day.contains(at(8, 59)));
        assert!(day.contains(at(9, 0)));
        assert!(day.contains(at(17, 29)));
        assert!(!day.contains(at(17, 30)));
        let night = Window::parse("22:00-06:00", 0).unwrap();
        assert!(night.contains(at(23, 0)) && night.contains(at(2, 0)));
        assert!(!night.contains(at(12, 0)));
        // 09:00-17:00 in UTC+8 is 01:00-09:00 UTC
        let beijing = Window::parse("09:00-17:00", 480).unwrap();
        assert!(beijing.contains(at(1, 0)) && !beijing.contains(at(9, 0)));
        assert_eq!(beijing.label(), "09:00-17:00 UTC+08:00");
        let all = Window::parse("00:00-24:00", 0).unwrap();
        assert!((0..24).all(|h| all.contains(at(h, 30))));
        for bad in ["9-17", "09:00-09:00", "25:00-26:00", "09:60-10:00", "x"] {
            assert!(Window::parse(bad, 0).is_err(), "{bad}");
        }
        assert!(Window::parse("09:00-10:00", 900).is_err());
    }

    #[test]
    fn rules_refuse_nonsense_with_what_to_change() {
        let bad = [
            (rule(100, Action::MaskPii), "built-in plugin keys"),
            (rule(250, Action::MaskPii), "before the guardrails"),
            (rule(1200, Action::MaskPii), "give 0 to 999"),
            (
                rule(
                    10,
                    Action::Split {
                        model: "m".into(),
                        percent: 0,
                    },
                ),
                "1 to 100 %",
            ),
            (rule(10, Action::Fallback { models: vec![] }), "1 to 32"),
            (
                rule(
                    10,
                    Action::Breaker {
                        failures: 0,
                        open_s: 5,
                    },
                ),
                "1 to 1000",
            ),
            (
                rule(
                    10,
                    Action::Route {
                        model: "Bad Name".into(),
                    },
                ),
                "",
            ),
        ];
        for (r, says) in bad {
            let e = r.validate().unwrap_err();
            assert!(e.contains(says), "{e}");
        }
        let mut header = rule(10, Action::MaskPii);
        header.when.header = Some(("X-Team".into(), "a".into()));
        assert!(header.validate().unwrap_err().contains("lowercase"));
        assert!(rule(10, Action::MaskPii).validate().is_ok());
    }

    #[test]
    fn conditions_all_hold_or_the_rule_does_not_apply() {
        let mut r = rule(
            50,
            Action::Route {
                model: "cheap".into(),
            },
        );
        r.when = Conditions {
            models: vec!["big".into()],
            tenants: vec!["acme".into()],
            priorities: vec![Priority::Low],
            header: Some(("x-team".into(), "search".into())),
            hours: None,
        };
        let team = |v: &'static str| move |n: &str| (n == "x-team").then(|| v.to_string());
        assert!(r.applies("big", Some("acme"), Priority::Low, team("search"), 0));
        assert!(!r.applies("small", Some("acme"), Priority::Low, team("search"), 0));
        assert!(!r.applies("big", None, Priority::Low, team("search"), 0));
        assert!(!r.applies("big", Some("acme"), Priority::Normal, team("search"), 0));
        assert!(!r.applies("big", Some("acme"), Priority::Low, team("ads"), 0));
        assert_eq!(
            r.conditions_label(),
            "model big, tenant acme, priority low, x-team: search"
        );
    }
}
