//! What a key may ask for: its tenant's and its own allowed models, its
//! priority ceiling, and its budgets.
//!
//! A key without a tenant (an admin key, an inference key made with
//! `talon credential create`, or any caller with authentication off) is
//! not limited here. A request that asks for a model its key may not use
//! is refused 403 before anything else is looked at (so a key cannot learn
//! which models other tenants have); one that asks for a higher priority
//! than its key's ceiling is refused 403; one that names none gets
//! `normal`, or the ceiling when that is lower. A spent budget answers 429
//! `insufficient_quota` (what the OpenAI clients raise as a quota error)
//! with `Retry-After` until the day or month turns (UTC).

use axum::http::StatusCode;

use super::GwError;
use crate::state::tenant::{day_of, month_start};
use crate::state::{KeyPolicy, Priority, State, Tenant};

/// A key's policy and its tenant, as applied here.
#[derive(Clone, Debug)]
pub struct Holder {
    pub credential: String,
    pub policy: KeyPolicy,
    pub tenant: Tenant,
}

impl Holder {
    /// The policy of credential `id`, if it is a key with a tenant.
    pub fn of(state: &State, id: &str) -> Option<Holder> {
        let policy = state.tenancy.keys.get(id)?;
        let tenant = state.tenancy.tenants.get(&policy.tenant)?;
        Some(Holder {
            credential: id.to_string(),
            policy: policy.clone(),
            tenant: tenant.clone(),
        })
    }

    pub fn label(&self) -> String {
        self.policy.label()
    }
}

fn forbidden(code: &'static str, message: String) -> GwError {
    GwError {
        status: StatusCode::FORBIDDEN,
        kind: code,
        message,
        retry_after_s: None,
    }
}

/// Checks the model and priority; the priority the request runs at.
pub fn check(holder: &Holder, model: &str, asked: Option<&str>) -> Result<Priority, GwError> {
    if !holder.policy.allows_model(&holder.tenant, model) {
        let mut allowed: Vec<&str> = holder.policy.models.iter().map(String::as_str).collect();
        if allowed.is_empty() {
            allowed = holder.tenant.models.iter().map(String::as_str).collect();
        }
        return Err(forbidden(
            "model_not_allowed",
            format!(
                "key {} may not use model {model:?}; it may use: {}",
                holder.label(),
                allowed.join(", ")
            ),
        ));
    }
    let ceiling = holder.policy.max_priority;
    match asked {
        None => Ok(Priority::Normal.max(ceiling)),
        Some(p) => {
            let p = Priority::parse(p).map_err(GwError::bad_request)?;
            if p < ceiling {
                return Err(forbidden(
                    "priority_not_allowed",
                    format!(
                        "key {} may ask for priority {} at most, not {}; drop x-talon-priority or ask an admin to raise the key's ceiling",
                        holder.label(),
                        ceiling.as_str(),
                        p.as_str()
                    ),
                ));
            }
            Ok(p)
        }
    }
}

/// Refuses a request whose key or tenant has spent a budget. `unrecorded`
/// is what this gateway charged that is not in the state yet, for the
/// key and for the tenant.
pub fn check_budgets(
    state: &State,
    holder: &Holder,
    now_ms: u64,
    unrecorded: (f64, f64),
) -> Result<(), GwError> {
    let today = day_of(now_ms);
    let month = month_start(today);
    let tenancy = &state.tenancy;
    let name = holder.policy.name.as_str();
    let tenant = holder.tenant.name.as_str();
    let checks = [
        (
            holder.policy.limits.daily_budget_usd,
            "key",
            "daily",
            Some(name),
            today,
            unrecorded.0,
        ),
        (
            holder.policy.limits.monthly_budget_usd,
            "key",
            "monthly",
            Some(name),
            month,
            unrecorded.0,
        ),
        (
            holder.tenant.limits.daily_budget_usd,
            "tenant",
            "daily",
            None,
            today,
            unrecorded.1,
        ),
        (
            holder.tenant.limits.monthly_budget_usd,
            "tenant",
            "monthly",
            None,
            month,
            unrecorded.1,
        ),
    ];
    for (budget, whose, period, key, from, extra) in checks {
        let Some(budget) = budget else { continue };
        let spent = tenancy.spent(tenant, key, from, today) + extra;
        if spent >= budget {
            let next = if period == "daily" {
                u64::from(today + 1) * 86_400_000
            } else {
                // the first day of next month
                u64::from(month_start(month + 31)) * 86_400_000
            };
            let who = match whose {
                "key" => format!("key {}", holder.label()),
                _ => format!("tenant {tenant}"),
            };
            return Err(GwError {
                status: StatusCode::TOO_MANY_REQUESTS,
                kind: "insufficient_quota",
                message: format!(
                    "{who} has spent its {period} budget (${spent:.4} of ${budget:.4}); it renews at the next UTC {}, or an admin can raise it",
                    if period == "daily" { "day" } else { "month" }
                ),
                retry_after_s: Some(next.saturating_sub(now_ms).div_ceil(1000).max(1)),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Limits;

    fn holder(models: &[&str], tenant_models: &[&str], max: Priority) -> Holder {
        Holder {
            credential: "0123456789abcdef".into(),
            policy: KeyPolicy {
                tenant: "acme".into(),
                name: "app".into(),
                models: models.iter().map(|m| m.to_string()).collect(),
                max_priority: max,
                limits: Limits::default(),
                revision: 1,
            },
            tenant: Tenant {
                name: "acme".into(),
                models: tenant_models.iter().map(|m| m.to_string()).collect(),
                limits: Limits::default(),
                created_at_ms: 0,
                revision: 1,
                mask_pii: false,
                cache_ttl_s: 0,
                filters: vec![],
            },
        }
    }

    #[test]
    fn models_and_priorities() {
        let h = holder(&[], &["llama", "qwen"], Priority::High);
        assert_eq!(check(&h, "llama", None).unwrap(), Priority::Normal);
        assert_eq!(check(&h, "qwen", Some("high")).unwrap(), Priority::High);
        let e = check(&h, "mistral", None).unwrap_err();
        assert_eq!(e.status, StatusCode::FORBIDDEN);
        assert!(e.message.contains("llama, qwen"), "{}", e.message);
        let e = check(&h, "llama", Some("critical")).unwrap_err();
        assert!(e.message.contains("priority high at most"), "{}", e.message);
        // a key narrower than its tenant
        let h = holder(&["qwen"], &["llama", "qwen"], Priority::Low);
        assert!(check(&h, "llama", None).is_err());
        assert_eq!(check(&h, "qwen", None).unwrap(), Priority::Low);
        assert!(check(&h, "qwen", Some("normal")).is_err());
    }

    #[test]
    fn a_spent_budget_refuses_until_the_day_turns() {
        let mut state = State::default();
        let mut h = holder(&[], &[], Priority::Normal);
        h.policy.limits.daily_budget_usd = Some(1.0);
        let now = 20_789 * 86_400_000 + 3_600_000; // 01:00 UTC
        state.tenancy.usage.insert(
            crate::state::UsageKey {
                day: 20_789,
                tenant: "acme".into(),
                key: "app".into(),
                model: "llama".into(),
            },
            crate::state::Usage {
                cost_usd: 0.6,
                ..Default::default()
            },
        );
        assert!(check_budgets(&state, &h, now, (0.0, 0.0)).is_ok());
        let e = check_budgets(&state, &h, now, (0.5, 0.5)).unwrap_err();
        assert_eq!(e.kind, "insufficient_quota");
        assert_eq!(e.retry_after_s, Some(23 * 3600));
        // yesterday's spending does not count today
        assert!(check_budgets(&state, &h, now + 86_400_000, (0.0, 0.0)).is_ok());
    }
}
