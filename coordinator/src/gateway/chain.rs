//! The gateway's plugin chain: every request passes through an ordered
//! list of entries before it is routed. The built-in plugins have fixed
//! places ([`crate::state::chain::BUILTINS`]): `keys` (100), `guardrails`
//! (200), `limits` (300), `cache` (1000, after everything). Between them
//! run the rules the registry holds (`talon chain put`, replicated by
//! Raft, so every coordinator runs the same chain within a second of a
//! change), each with a priority from 0 to 999 and conditions (model,
//! tenant, priority, a header, a time-of-day window), and any [`Plugin`]
//! compiled in with [`Gateway::with_plugin`]. Equal priorities run
//! built-in first, then rules by name, then compiled plugins.
//!
//! Rules are plugins too: a rule's action — route to another model (the
//! cost rule: at peak hours, low-priority traffic to a cheaper model), a
//! weighted split, a fallback chain, a breaker for the model, deny, a
//! priority cap, PII masking — is what its [`Plugin::on_request`] does.
//! A rule that changes the model after `keys` ran is checked against the
//! key again: a rule cannot send a key where it may not go.
//!
//! # Adding a plugin
//!
//! Implement [`Plugin`] and register it on the gateway before serving:
//!
//! ```ignore
//! struct Tag;
//! impl Plugin for Tag {
//!     fn name(&self) -> &str { "tag" }
//!     fn priority(&self) -> u32 { 150 } // after keys, before guardrails
//!     fn on_request(&self, r: &mut Request<'_>) -> Result<(), GwError> {
//!         if r.header("x-team") == Some("batch") {
//!             r.cap_priority(Priority::Low);
//!         }
//!         Ok(())
//!     }
//! }
//! let gateway = Gateway::new(ctx).with_plugin(Arc::new(Tag));
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use serde_json::Value;

use super::core::{Call, Gateway, GwError};
use super::keys::{self, Holder};
use crate::state::chain::{Action, Rule, BUILTINS};
use crate::state::Priority;
#[cfg(test)]
use crate::state::State;

/// What the chain knows of a request while it runs, and what its entries
/// asked of the steps after it.
pub(super) struct Admitting {
    pub call: Call,
    pub holder: Option<Holder>,
    /// The priority the key's check gave (`None` until `keys` ran).
    pub checked: Option<Priority>,
    pub mask_pii: bool,
    /// A breaker for the model: failures in a row, seconds open.
    pub breaker: Option<(u32, Duration)>,
    /// Rules that applied, in order (logged).
    pub applied: Vec<String>,
}

/// A request as a plugin sees it.
pub struct Request<'a> {
    a: &'a mut Admitting,
    now_ms: u64,
}

impl Request<'_> {
    /// The model asked for, as the chain has it so far.
    pub fn model(&self) -> &str {
        self.a.call.body["model"].as_str().unwrap_or_default()
    }

    /// Sends the request to `model` instead; refused when the key already
    /// checked may not use it.
    pub fn set_model(&mut self, model: &str, by: &str) -> Result<(), GwError> {
        if let (Some(holder), Some(_)) = (&self.a.holder, self.a.checked) {
            keys::check(holder, model, None).map_err(|e| GwError {
                message: format!("{} (the chain's {by} sends the request there)", e.message),
                ..e
            })?;
        }
        self.a.call.body["model"] = Value::String(model.to_string());
        Ok(())
    }

    /// The priority the request runs at so far (normal when it named
    /// none).
    pub fn priority(&self) -> Priority {
        self.a.checked.unwrap_or_else(|| {
            self.a
                .call
                .priority
                .as_deref()
                .and_then(|p| Priority::parse(p).ok())
                .unwrap_or(Priority::Normal)
        })
    }

    /// Lowers the request's priority to `p` at most (never raises it: a
    /// plugin cannot lift a request above its key's ceiling).
    pub fn cap_priority(&mut self, p: Priority) {
        let now = self.priority();
        if p > now {
            self.a.call.priority = Some(p.as_str().to_string());
            if self.a.checked.is_some() {
                self.a.checked = Some(p);
            }
        }
    }

    /// The tenant of the request's key, if it has one.
    pub fn tenant(&self) -> Option<&str> {
        self.a.holder.as_ref().map(|h| h.tenant.name.as_str())
    }

    /// A header of the request (name in lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.a.call.header(name)
    }

    /// Unix time in ms by the gateway's clock.
    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    /// The OpenAI body (without `stream`).
    pub fn body(&self) -> &Value {
        &self.a.call.body
    }

    /// The body, to change; `model` is better changed with
    /// [`Request::set_model`], which checks the key.
    pub fn body_mut(&mut self) -> &mut Value {
        &mut self.a.call.body
    }

    /// Models to try, in order, when the model cannot serve the request.
    pub fn fall_back_to(&mut self, models: &[String]) {
        self.a.call.fallbacks = models.to_vec();
    }

    /// A breaker for the request's model.
    pub fn breaker(&mut self, failures: u32, open_for: Duration) {
        self.a.breaker = Some((failures, open_for));
    }

    /// Masks PII in the prompt and answer; takes effect at the guardrails.
    pub fn mask_pii(&mut self) {
        self.a.mask_pii = true;
    }
}

/// One entry of the chain.
pub trait Plugin: Send + Sync {
    /// How listings and logs name it.
    fn name(&self) -> &str;
    /// Where it runs: 0 to 999, lower first (the built-ins sit at 100,
    /// 200, 300 and 1000).
    fn priority(&self) -> u32;
    /// Looks at (and may change) a request before it is routed; an error
    /// refuses the request with it.
    fn on_request(&self, request: &mut Request<'_>) -> Result<(), GwError>;
}

/// Per split rule, how many requests it split so far.
#[derive(Default)]
pub(super) struct Splits(Mutex<HashMap<String, u64>>);

impl Splits {
    fn next(&self, rule: &str) -> u64 {
        let mut all = self.0.lock().expect("split lock poisoned");
        let n = all.entry(rule.to_string()).or_default();
        *n += 1;
        *n - 1
    }
}

/// A rule of the registry as a plugin.
struct RulePlugin<'a> {
    rule: &'a Rule,
    splits: &'a Splits,
}

impl Plugin for RulePlugin<'_> {
    fn name(&self) -> &str {
        &self.rule.name
    }

    fn priority(&self) -> u32 {
        self.rule.priority
    }

    fn on_request(&self, r: &mut Request<'_>) -> Result<(), GwError> {
        let by = format!("rule {}", self.rule.name);
        match &self.rule.action {
            Action::Route { model } => r.set_model(model, &by)?,
            Action::Split { model, percent } => {
                if super::canary::to_newest(self.splits.next(&self.rule.name), *percent) {
                    r.set_model(model, &by)?;
                }
            }
            Action::Fallback { models } => r.fall_back_to(models),
            Action::Breaker { failures, open_s } => {
                r.breaker(*failures, Duration::from_secs(u64::from(*open_s)))
            }
            Action::Deny { message } => {
                return Err(GwError::new(
                    StatusCode::FORBIDDEN,
                    "policy_denied",
                    format!("{message} (rule {} of the gateway's chain)", self.rule.name),
                ))
            }
            Action::CapPriority { priority } => r.cap_priority(*priority),
            Action::MaskPii => r.mask_pii(),
        }
        Ok(())
    }
}

/// An entry in the order the chain runs.
pub(super) enum Step<'a> {
    Builtin(&'static str),
    Rule(&'a Rule),
    Compiled(&'a Arc<dyn Plugin>),
}

/// The chain's entries with `rules` (the registry's, by name), in order:
/// by priority, and at equal priority built-ins, then rules by name, then
/// compiled plugins as added (the sort is stable).
pub(super) fn steps<'a>(rules: &'a [Rule], compiled: &'a [Arc<dyn Plugin>]) -> Vec<Step<'a>> {
    let mut all: Vec<(u32, u8, Step<'a>)> =
        Vec::with_capacity(BUILTINS.len() + rules.len() + compiled.len());
    all.extend(
        BUILTINS
            .iter()
            .map(|(name, p, _)| (*p, 0, Step::Builtin(name))),
    );
    all.extend(rules.iter().map(|r| (r.priority, 1, Step::Rule(r))));
    all.extend(
        compiled
            .iter()
            .map(|p| (p.priority(), 2, Step::Compiled(p))),
    );
    all.sort_by_key(|(priority, kind, _)| (*priority, *kind));
    all.into_iter().map(|(_, _, s)| s).collect()
}

/// The registry's rules as of one applied log index, shared by every
/// request until the next entry applies (a request does not copy them).
#[derive(Default)]
pub(super) struct RuleCache(Mutex<(Option<u64>, Arc<Vec<Rule>>)>);

impl RuleCache {
    pub(super) fn of(&self, applied: &crate::store::Applied) -> Arc<Vec<Rule>> {
        let at = applied.last_applied.map(|l| l.index);
        let mut cached = self.0.lock().expect("rule cache lock poisoned");
        if cached.0 != at {
            *cached = (
                at,
                Arc::new(applied.state.chain.values().cloned().collect()),
            );
        }
        cached.1.clone()
    }
}

impl Gateway {
    /// Adds a compiled plugin to the chain (before serving).
    pub fn with_plugin(mut self, plugin: Arc<dyn Plugin>) -> Gateway {
        tracing::info!(
            plugin = plugin.name(),
            priority = plugin.priority(),
            "plugin in the chain"
        );
        Arc::make_mut(&mut self.plugins).push(plugin);
        self
    }

    /// Replaces the clock the chain's time-of-day conditions read (Unix
    /// ms); tests set the hour with it.
    pub fn with_clock(mut self, clock: Arc<dyn Fn() -> u64 + Send + Sync>) -> Gateway {
        self.clock = clock;
        self
    }

    /// Runs one rule or compiled plugin on `a` at the gateway's time.
    pub(super) fn run_step(&self, step: &Step<'_>, a: &mut Admitting) -> Result<(), GwError> {
        run_step(step, a, (self.clock)(), &self.splits)
    }
}

/// Runs one rule (when its conditions hold) or compiled plugin on `a` at
/// `now_ms`; a built-in is the caller's to run.
fn run_step(
    step: &Step<'_>,
    a: &mut Admitting,
    now_ms: u64,
    splits: &Splits,
) -> Result<(), GwError> {
    let mut r = Request { a, now_ms };
    match step {
        Step::Builtin(_) => Ok(()),
        Step::Rule(rule) => {
            let applies = rule.applies(
                r.model(),
                r.tenant(),
                r.priority(),
                |h| r.header(h).map(str::to_string),
                now_ms,
            );
            if !applies {
                return Ok(());
            }
            r.a.applied.push(rule.name.clone());
            RulePlugin { rule, splits }.on_request(&mut r)
        }
        Step::Compiled(p) => p.on_request(&mut r),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::chain::{Conditions, Window};

    fn rule(name: &str, priority: u32, when: Conditions, action: Action) -> Rule {
        Rule {
            name: name.into(),
            priority,
            when,
            action,
            created_at_ms: 0,
            revision: 0,
        }
    }

    /// Runs the rules and compiled plugins of `state`'s chain on a
    /// request for `model` at `priority`, at `now_ms`; the model and
    /// priority it leaves.
    fn run(
        state: &State,
        compiled: &[Arc<dyn Plugin>],
        model: &str,
        priority: Option<&str>,
        now_ms: u64,
    ) -> Result<(String, Priority, Vec<String>), GwError> {
        let splits = Splits::default();
        let mut a = admitting(model, priority);
        let rules: Vec<Rule> = state.chain.values().cloned().collect();
        for step in steps(&rules, compiled) {
            run_step(&step, &mut a, now_ms, &splits)?;
        }
        let r = Request { a: &mut a, now_ms };
        Ok((r.model().to_string(), r.priority(), a.call.fallbacks))
    }

    /// A request for `model` at `priority`, with header x-team: batch,
    /// before the chain ran.
    fn admitting(model: &str, priority: Option<&str>) -> Admitting {
        let call = Call {
            path: "/chat/completions",
            body: serde_json::json!({"model": model}),
            priority: priority.map(str::to_string),
            deadline: None,
            principal: None,
            cache: super::super::cache::Use::Both,
            hops: 0,
            headers: vec![("x-team".into(), "batch".into())],
            fallbacks: vec![],
            breaker: None,
            held: None,
        };
        Admitting {
            call,
            holder: None,
            checked: None,
            mask_pii: false,
            breaker: None,
            applied: vec![],
        }
    }

    /// 2026-12-02 at `h`:`m` UTC.
    fn at(h: u64, m: u64) -> u64 {
        (20_789 * 24 * 60 + h * 60 + m) * 60_000
    }

    #[test]
    fn at_peak_hours_low_priority_traffic_goes_to_the_cheaper_model() {
        let mut state = State::default();
        let peak = Conditions {
            models: vec!["big".into()],
            priorities: vec![Priority::Low],
            hours: Some(Window::parse("09:00-18:00", 0).unwrap()),
            ..Default::default()
        };
        let r = rule(
            "peak-to-small",
            50,
            peak,
            Action::Route {
                model: "small".into(),
            },
        );
        state.chain.insert(r.name.clone(), r);
        // the injected clock: 10:00, 08:59, 18:00, 17:59
        assert_eq!(
            run(&state, &[], "big", Some("low"), at(10, 0)).unwrap().0,
            "small"
        );
        assert_eq!(
            run(&state, &[], "big", Some("low"), at(8, 59)).unwrap().0,
            "big"
        );
        assert_eq!(
            run(&state, &[], "big", Some("low"), at(18, 0)).unwrap().0,
            "big"
        );
        assert_eq!(
            run(&state, &[], "big", Some("low"), at(17, 59)).unwrap().0,
            "small"
        );
        // other priorities and models are left alone at peak
        assert_eq!(run(&state, &[], "big", None, at(10, 0)).unwrap().0, "big");
        assert_eq!(
            run(&state, &[], "big", Some("high"), at(10, 0)).unwrap().0,
            "big"
        );
        assert_eq!(
            run(&state, &[], "other", Some("low"), at(10, 0)).unwrap().0,
            "other"
        );
    }

    #[test]
    fn entries_run_in_priority_order_and_see_what_earlier_ones_did() {
        let mut state = State::default();
        // cap runs first (10), so the route (20) sees a low-priority request
        let cap = rule(
            "batch-is-low",
            10,
            Conditions {
                header: Some(("x-team".into(), "batch".into())),
                ..Default::default()
            },
            Action::CapPriority {
                priority: Priority::Low,
            },
        );
        let route = rule(
            "low-to-small",
            20,
            Conditions {
                priorities: vec![Priority::Low],
                ..Default::default()
            },
            Action::Route {
                model: "small".into(),
            },
        );
        let fallback = rule(
            "small-falls-back",
            30,
            Conditions {
                models: vec!["small".into()],
                ..Default::default()
            },
            Action::Fallback {
                models: vec!["tiny".into()],
            },
        );
        for r in [cap, route, fallback] {
            state.chain.insert(r.name.clone(), r);
        }
        let (model, priority, fallbacks) = run(&state, &[], "big", None, at(12, 0)).unwrap();
        assert_eq!((model.as_str(), priority), ("small", Priority::Low));
        assert_eq!(fallbacks, vec!["tiny".to_string()]);
        // the order is the priorities', not the names'
        let rules: Vec<Rule> = state.chain.values().cloned().collect();
        let names: Vec<String> = steps(&rules, &[])
            .iter()
            .map(|s| match s {
                Step::Builtin(n) => n.to_string(),
                Step::Rule(r) => r.name.clone(),
                Step::Compiled(p) => p.name().to_string(),
            })
            .collect();
        assert_eq!(
            names,
            [
                "batch-is-low",
                "low-to-small",
                "small-falls-back",
                "keys",
                "guardrails",
                "limits",
                "cache"
            ]
        );
    }

    #[test]
    fn a_split_is_exact_and_a_deny_refuses() {
        let mut state = State::default();
        let split = rule(
            "canary",
            10,
            Conditions::default(),
            Action::Split {
                model: "new".into(),
                percent: 25,
            },
        );
        state.chain.insert(split.name.clone(), split.clone());
        let splits = Splits::default();
        let mut to_new = 0;
        for _ in 0..400 {
            let mut a = admitting("old", None);
            let mut r = Request {
                a: &mut a,
                now_ms: 0,
            };
            RulePlugin {
                rule: &split,
                splits: &splits,
            }
            .on_request(&mut r)
            .unwrap();
            to_new += usize::from(r.model() == "new");
        }
        assert_eq!(to_new, 100);
        let deny = rule(
            "closed",
            5,
            Conditions::default(),
            Action::Deny {
                message: "the old model is closed".into(),
            },
        );
        state.chain.insert(deny.name.clone(), deny);
        let e = run(&state, &[], "old", None, 0).unwrap_err();
        assert_eq!(e.status, StatusCode::FORBIDDEN);
        assert!(e.message.contains("rule closed"), "{}", e.message);
    }

    struct Batch;
    impl Plugin for Batch {
        fn name(&self) -> &str {
            "batch"
        }
        fn priority(&self) -> u32 {
            15
        }
        fn on_request(&self, r: &mut Request<'_>) -> Result<(), GwError> {
            if r.header("x-team") == Some("batch") {
                r.cap_priority(Priority::Low);
            }
            Ok(())
        }
    }

    #[test]
    fn a_compiled_plugin_runs_at_its_priority() {
        let mut state = State::default();
        let route = rule(
            "low-to-small",
            20,
            Conditions {
                priorities: vec![Priority::Low],
                ..Default::default()
            },
            Action::Route {
                model: "small".into(),
            },
        );
        state.chain.insert(route.name.clone(), route);
        let compiled: Vec<Arc<dyn Plugin>> = vec![Arc::new(Batch)];
        let (model, priority, _) = run(&state, &compiled, "big", None, 0).unwrap();
        assert_eq!((model.as_str(), priority), ("small", Priority::Low));
        // it never raises a priority
        let (_, p, _) = run(&state, &compiled, "big", Some("low"), 0).unwrap();
        assert_eq!(p, Priority::Low);
    }
}
