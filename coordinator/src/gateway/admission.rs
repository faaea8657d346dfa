//! Admission and settlement of one request: the key's policy
//! ([`keys`](super::keys)), the cluster-wide limits
//! ([`limits`](super::limits)), and the charge ([`cost`](super::cost))
//! when it ends. Every front end goes through [`Gateway::complete`] or
//! [`Gateway::open_stream`], which call these.

use std::sync::Arc;
use std::time::Instant;

use serde_json::Value;

use super::chain::{self, Admitting, Step};
use super::core::{Call, Gateway};
use super::filter::Filters;
use super::keys::{self, Holder};
use super::limits::{Need, Reservation, DEFAULT_RESERVE};
use super::GwError;
use crate::quota::Meter;
use crate::state::{Priority, Usage, UsageKey};

/// An admitted request, to settle when it ends.
pub struct Admission {
    holder: Option<Holder>,
    model: String,
    reservation: Reservation,
    prompt_estimate: u64,
    started: Instant,
    /// Mask (and filter) the answer; the prompt was at admission.
    pub(super) masking: Option<Masking>,
}

/// Prompt tokens, estimated before admission: a token per four bytes of
/// text plus four per message (what the OpenAI cookbook's rule of thumb
/// gives for English; the answer's usage settles the difference).
pub fn estimate_prompt_tokens(body: &Value) -> u64 {
    let text = |v: &Value| -> u64 {
        match v {
            Value::String(s) => s.len() as u64,
            Value::Array(parts) => parts
                .iter()
                .map(|p| {
                    p["text"]
                        .as_str()
                        .or(p.as_str())
                        .map_or(0, |s| s.len() as u64)
                })
                .sum(),
            _ => 0,
        }
    };
    let bytes: u64 = match body["messages"].as_array() {
        Some(messages) => messages.iter().map(|m| text(&m["content"]) + 16).sum(),
        None => text(&body["prompt"]) + text(&body["input"]),
    };
    bytes.div_ceil(4).max(1)
}

/// How a tenant's prompts and answers are masked and filtered.
#[derive(Clone)]
pub(super) struct Masking {
    pub pii: bool,
    pub filters: Option<Arc<Filters>>,
}

impl Masking {
    fn mask(&self, s: &str) -> String {
        super::mask::mask_with(s, self.pii, self.filters.as_deref())
    }

    fn blocked(&self, s: &str) -> Option<usize> {
        self.filters.as_ref().and_then(|f| f.blocked(s))
    }
}

/// Runs `f` on every text of a request's messages and prompt.
fn for_each_prompt_text(body: &mut Value, f: &mut impl FnMut(&mut String)) {
    fn visit(v: &mut Value, f: &mut impl FnMut(&mut String)) {
        match v {
            Value::String(s) => f(s),
            Value::Array(parts) => {
                for p in parts {
                    match p {
                        Value::String(s) => f(s),
                        Value::Object(o) => {
                            if let Some(Value::String(t)) = o.get_mut("text") {
                                f(t);
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    if let Some(messages) = body["messages"].as_array_mut() {
        for m in messages {
            if let Some(content) = m.get_mut("content") {
                visit(content, f);
            }
        }
    }
    for field in ["prompt", "input"] {
        if let Some(v) = body.get_mut(field) {
            visit(v, f);
        }
    }
}

/// Refuses a prompt a block filter matches; masks the rest.
fn mask_prompt(body: &mut Value, m: &Masking, tenant: &str) -> Result<(), GwError> {
    let mut blocked = None;
    for_each_prompt_text(body, &mut |s| {
        if blocked.is_none() {
            blocked = m.blocked(s);
        }
    });
    if let Some(i) = blocked {
        return Err(GwError {
            status: axum::http::StatusCode::BAD_REQUEST,
            kind: "content_filtered",
            message: format!(
                "the request matches content filter #{i} of tenant {tenant} (action block); remove what it matches"
            ),
            retry_after_s: None,
        });
    }
    for_each_prompt_text(body, &mut |s| *s = m.mask(s));
    Ok(())
}

/// Masks every choice of an answer; a choice a block filter matches is
/// withheld (`finish_reason: content_filter`, as OpenAI reports it).
pub(super) fn mask_answer(answer: &mut Value, m: &Masking) {
    let Some(choices) = answer["choices"].as_array_mut() else {
        return;
    };
    for c in choices {
        let mut withheld = false;
        for text in ["/message/content", "/text"] {
            if let Some(Value::String(s)) = c.pointer_mut(text) {
                if m.blocked(s).is_some() {
                    s.clear();
                    withheld = true;
                } else {
                    *s = m.mask(s);
                }
            }
        }
        if withheld {
            c["finish_reason"] = Value::String("content_filter".into());
        }
    }
}

/// Today's usage row of a key and model.
fn usage_key(holder: &Holder, model: &str) -> UsageKey {
    UsageKey {
        day: crate::state::tenant::day_of(crate::context::now_ms()),
        tenant: holder.tenant.name.clone(),
        key: holder.policy.name.clone(),
        model: model.to_string(),
    }
}

/// The completion tokens a request may produce, as reserved.
fn completion_reserve(body: &Value) -> u64 {
    body["max_completion_tokens"]
        .as_u64()
        .or_else(|| body["max_tokens"].as_u64())
        .unwrap_or(DEFAULT_RESERVE)
}

impl Admission {
    /// Whether the request is charged to a key with a tenant.
    pub fn is_charged(&self) -> bool {
        self.holder.is_some()
    }

    /// The tenant and how long it keeps answers, when it caches.
    pub(super) fn cache_ttl(&self) -> Option<(&str, std::time::Duration)> {
        let t = &self.holder.as_ref()?.tenant;
        (t.cache_ttl_s > 0).then(|| {
            (
                t.name.as_str(),
                std::time::Duration::from_secs(u64::from(t.cache_ttl_s)),
            )
        })
    }
}

impl Gateway {
    /// Checks `call` against its key's policy and limits; the call with
    /// the priority it runs at, and the admission to settle.
    pub(super) async fn admit(&self, call: &Call) -> Result<(Call, Admission), GwError> {
        let admitted = self.admit_or_refuse(call).await;
        if let Err(e) = &admitted {
            if crate::metrics::REFUSALS.contains(&e.kind) {
                let labels = crate::metrics::PolicyLabels { result: e.kind };
                self.ctx
                    .metrics
                    .policy_refusals
                    .get_or_create(&labels)
                    .inc();
            }
        }
        admitted
    }

    /// Runs the chain ([`super::chain`]) on `call`: the rules and
    /// compiled plugins in order, and at their places the built-ins —
    /// the key's check, the guardrails on the prompt, the budgets and
    /// limits (the cache is the caller's, after admission).
    async fn admit_or_refuse(&self, call: &Call) -> Result<(Call, Admission), GwError> {
        call.model()?;
        let (rules, holder) = {
            let applied = self.ctx.state.read().expect("state lock poisoned");
            let holder = call
                .principal
                .as_ref()
                .and_then(|p| Holder::of(&applied.state, &p.credential));
            (self.rules.of(&applied), holder)
        };
        let mut a = Admitting {
            call: call.clone(),
            holder,
            checked: None,
            mask_pii: false,
            breaker: None,
            applied: Vec::new(),
        };
        let mut reservation = Reservation::default();
        let mut masking = None;
        for step in chain::steps(&rules, &self.plugins) {
            let done = match step {
                Step::Builtin("keys") => self.check_key(&mut a),
                Step::Builtin("guardrails") => self.guard_prompt(&mut a).map(|m| masking = m),
                Step::Builtin("limits") => self.reserve_limits(&a).await.map(|r| reservation = r),
                Step::Builtin(_) => Ok(()),
                step => self.run_step(&step, &mut a),
            };
            if let Err(e) = done {
                // an entry after the limits refused: what they reserved goes back
                self.limiter.release(reservation);
                return Err(e);
            }
        }
        for rule in &a.applied {
            let labels = crate::metrics::RuleLabels { rule: rule.clone() };
            self.ctx.metrics.chain_rules.get_or_create(&labels).inc();
        }
        let model = a.call.model()?.to_string();
        let prompt_estimate = estimate_prompt_tokens(&a.call.body);
        let mut call = a.call;
        call.breaker = a.breaker;
        let admission = Admission {
            holder: a.holder,
            model,
            reservation,
            prompt_estimate,
            started: Instant::now(),
            masking,
        };
        Ok((call, admission))
    }

    /// The `keys` built-in: the model and priority the key may ask for.
    fn check_key(&self, a: &mut Admitting) -> Result<(), GwError> {
        let Some(holder) = &a.holder else {
            return Ok(());
        };
        let priority = keys::check(holder, a.call.model()?, a.call.priority.as_deref())?;
        if priority != Priority::Normal || a.call.priority.is_some() {
            a.call.priority = Some(priority.as_str().to_string());
        }
        a.checked = Some(priority);
        Ok(())
    }

    /// The `guardrails` built-in: a prompt a block filter matches is
    /// refused, the rest masked; how the answer is to be masked.
    fn guard_prompt(&self, a: &mut Admitting) -> Result<Option<Masking>, GwError> {
        let (filters, tenant_pii, tenant) = match &a.holder {
            Some(h) => (
                self.filters.of(&h.tenant),
                h.tenant.mask_pii,
                h.tenant.name.as_str(),
            ),
            None => (None, false, "-"),
        };
        let pii = tenant_pii || a.mask_pii;
        if !pii && filters.is_none() {
            return Ok(None);
        }
        let masking = Masking { pii, filters };
        mask_prompt(&mut a.call.body, &masking, tenant)?;
        Ok(Some(masking))
    }

    /// The `limits` built-in: budgets, then a reservation of the key's and
    /// tenant's requests and tokens per minute.
    async fn reserve_limits(&self, a: &Admitting) -> Result<Reservation, GwError> {
        let Some(holder) = &a.holder else {
            return Ok(Reservation::default());
        };
        {
            let unrecorded = self
                .limiter
                .unrecorded(&holder.tenant.name, &holder.policy.name);
            let applied = self.ctx.state.read().expect("state lock poisoned");
            keys::check_budgets(&applied.state, holder, crate::context::now_ms(), unrecorded)?;
        }
        let tokens = estimate_prompt_tokens(&a.call.body) + completion_reserve(&a.call.body);
        let mut needs: Vec<Need> = Vec::new();
        let (k, t) = (&holder.policy.limits, &holder.tenant.limits);
        let id = holder.credential.clone();
        let tenant = holder.tenant.name.clone();
        if let Some(rpm) = k.requests_per_minute {
            needs.push((Meter::KeyRequests(id.clone()), 1.0, f64::from(rpm)));
        }
        if let Some(tpm) = k.tokens_per_minute {
            needs.push((Meter::KeyTokens(id), tokens as f64, tpm as f64));
        }
        if let Some(rpm) = t.requests_per_minute {
            needs.push((Meter::TenantRequests(tenant.clone()), 1.0, f64::from(rpm)));
        }
        if let Some(tpm) = t.tokens_per_minute {
            needs.push((Meter::TenantTokens(tenant), tokens as f64, tpm as f64));
        }
        self.limiter.reserve(needs, tokens).await
    }

    /// Ends an admission answered from the cache: the reservation goes
    /// back, the request is counted with no tokens and no GPU cost.
    pub(super) fn settle_hit(&self, mut a: Admission) {
        let Some(holder) = a.holder.take() else {
            return;
        };
        self.limiter.release(std::mem::take(&mut a.reservation));
        let usage = Usage {
            requests: 1,
            ..Default::default()
        };
        self.limiter
            .charge(vec![(usage_key(&holder, &a.model), usage)]);
    }

    /// Ends an admission: `answered` is the replica that answered and the
    /// answer's `usage` (absent when the request failed: nothing is
    /// charged and the reservation goes back).
    pub(super) fn settle(&self, mut a: Admission, answered: Option<(&str, &Value)>) {
        let Some(holder) = a.holder.take() else {
            return;
        };
        let reservation = std::mem::take(&mut a.reservation);
        let Some((replica, usage)) = answered else {
            self.limiter.release(reservation);
            return;
        };
        let prompt = usage["prompt_tokens"].as_u64().unwrap_or(a.prompt_estimate);
        let completion = usage["completion_tokens"].as_u64().unwrap_or(0);
        self.limiter.settle(reservation, prompt + completion);
        let (gpu_seconds, cost_usd) =
            self.request_cost(&a.model, replica, a.started.elapsed(), prompt, completion);
        let row = (
            usage_key(&holder, &a.model),
            Usage {
                requests: 1,
                prompt_tokens: prompt,
                completion_tokens: completion,
                gpu_seconds,
                cost_usd,
            },
        );
        self.limiter.charge(vec![row]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn prompts_are_masked_and_estimated() {
        let mut body = json!({"model": "m", "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "I am ann@corp.io"}]},
            {"role": "assistant", "tool_calls": []}
        ]});
        let pii = Masking {
            pii: true,
            filters: None,
        };
        mask_prompt(&mut body, &pii, "t").unwrap();
        assert_eq!(body["messages"][1]["content"][0]["text"], "I am [EMAIL]");
        assert!(
            body["messages"][2].get("content").is_none(),
            "no field is added"
        );
        // 8 + 12 bytes of text and 16 a message: 68 bytes, 17 tokens
        assert_eq!(estimate_prompt_tokens(&body), 17);
        let mut answer = json!({"choices": [{"text": "call 13812345678"}]});
        mask_answer(&mut answer, &pii);
        assert_eq!(answer["choices"][0]["text"], "call [PHONE]");
        assert!(answer["choices"][0].get("message").is_none());
    }
}
