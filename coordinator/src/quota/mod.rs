//! Cluster-wide limits and usage: the leader's ledger.
//!
//! Every coordinator runs a gateway, and a key's limit holds for all of
//! them together, not per gateway. The leader keeps one token bucket
//! ([`bucket`]) per limited key and tenant (requests per minute, tokens per
//! minute). A gateway that lacks units for a request asks the leader for a
//! *slice* (at least what the request needs, up to a fifth of a second of
//! the limit's rate) over the coordinators' Raft port (`Quota`, mutual TLS
//! with TLS on), spends it locally, and gives back what it has not spent
//! after a second idle. Completion tokens are reserved by `max_tokens` and
//! settled after the answer: unspent units go back into the gateway's
//! slice, an overrun is a debt the next slice pays first.
//!
//! The bound: the leader never lends more than its buckets hold, so the
//! units admitted cluster-wide in any interval of `t` seconds are at most
//! `limit + limit × t / 60` — what one bucket alone would admit — while
//! one leader leads. A new leader starts with full buckets while slices
//! the old one lent may still be spent: each leader change can admit up to
//! one more `limit` (plus the slices outstanding, at most a fifth of a
//! second of rate per gateway). Buckets are soft state, like telemetry.
//!
//! The same RPC carries the gateways' charges (requests, tokens,
//! GPU-seconds, dollars per key and model); the leader adds them up and
//! records them through Raft once a second (`RecordUsage`), where budgets
//! read them on every coordinator.

pub mod bucket;

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::state::{State, Usage, UsageKey};
use bucket::{Bucket, Grant};

/// Most asks, returns or charges in one quota request.
pub const MAX_ITEMS: usize = 4096;

/// One limited quantity.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Meter {
    /// Requests of a key (by credential id).
    KeyRequests(String),
    /// Tokens of a key (by credential id).
    KeyTokens(String),
    /// Requests of a tenant.
    TenantRequests(String),
    /// Tokens of a tenant.
    TenantTokens(String),
}

impl Meter {
    /// The bucket behind the meter and its limit per minute, from the
    /// applied state; `None`: no limit (or no such key or tenant).
    fn limit(&self, state: &State) -> Option<(String, f64)> {
        let t = &state.tenancy;
        match self {
            Meter::KeyRequests(id) => t.keys.get(id).and_then(|k| {
                let rpm = k.limits.requests_per_minute?;
                Some((format!("key/{}/requests", k.label()), f64::from(rpm)))
            }),
            Meter::KeyTokens(id) => t.keys.get(id).and_then(|k| {
                let tpm = k.limits.tokens_per_minute?;
                Some((format!("key/{}/tokens", k.label()), tpm as f64))
            }),
            Meter::TenantRequests(name) => t.tenants.get(name).and_then(|x| {
                let rpm = x.limits.requests_per_minute?;
                Some((format!("tenant/{name}/requests"), f64::from(rpm)))
            }),
            Meter::TenantTokens(name) => t.tenants.get(name).and_then(|x| {
                let tpm = x.limits.tokens_per_minute?;
                Some((format!("tenant/{name}/tokens"), tpm as f64))
            }),
        }
    }
}

/// Units asked of one meter.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Ask {
    pub meter: Meter,
    /// What the request at hand lacks.
    pub need: f64,
    /// What the gateway would like to hold (at least `need`).
    pub want: f64,
}

/// A gateway's message to the leader.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct QuotaRequest {
    pub asks: Vec<Ask>,
    /// Units lent and not spent.
    pub returns: Vec<(Meter, f64)>,
    /// Usage to record.
    pub charges: Vec<(UsageKey, Usage)>,
}

/// The leader's answer: one grant per ask, in order.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct QuotaReply {
    pub grants: Vec<SliceGrant>,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum SliceGrant {
    /// Units lent.
    Granted(f64),
    Refused {
        retry_after_ms: u64,
    },
    /// No limit on this meter: spend freely.
    Unlimited,
}

fn finite_units(v: f64) -> bool {
    v.is_finite() && (0.0..=1e15).contains(&v)
}

impl QuotaRequest {
    /// Refuses what no gateway of this release sends.
    pub fn validate(&self) -> Result<(), String> {
        if self.asks.len() > MAX_ITEMS
            || self.returns.len() > MAX_ITEMS
            || self.charges.len() > MAX_ITEMS
        {
            return Err(format!(
                "a quota request holds at most {MAX_ITEMS} items of each kind"
            ));
        }
        for a in &self.asks {
            if !finite_units(a.need) || !finite_units(a.want) {
                return Err(format!(
                    "ask {:?}: units must be finite, 0 to 10^15",
                    a.meter
                ));
            }
        }
        if let Some((m, _)) = self.returns.iter().find(|(_, v)| !finite_units(*v)) {
            return Err(format!("return {m:?}: units must be finite, 0 to 10^15"));
        }
        Ok(())
    }
}

/// The leader's buckets and the charges not yet recorded.
#[derive(Default)]
pub struct Ledger {
    buckets: Mutex<HashMap<String, Bucket>>,
    pending: Mutex<BTreeMap<UsageKey, Usage>>,
}

impl Ledger {
    /// Serves one request against `state`'s limits at `now_ms`.
    pub fn serve(&self, state: &State, request: QuotaRequest, now_ms: u64) -> QuotaReply {
        let mut buckets = self.buckets.lock().expect("quota lock poisoned");
        for (meter, units) in &request.returns {
            if let Some((id, _)) = meter.limit(state) {
                if let Some(b) = buckets.get_mut(&id) {
                    b.give_back(*units, now_ms);
                }
            }
        }
        let grants = request
            .asks
            .iter()
            .map(|ask| match ask.meter.limit(state) {
                None => SliceGrant::Unlimited,
                Some((id, per_minute)) => {
                    let b = buckets
                        .entry(id)
                        .or_insert_with(|| Bucket::new(per_minute, now_ms));
                    b.set_limit(per_minute, now_ms);
                    match b.grant(ask.need, ask.want, now_ms) {
                        Grant::Granted(g) => SliceGrant::Granted(g),
                        Grant::Refused { retry_after_ms } => SliceGrant::Refused { retry_after_ms },
                    }
                }
            })
            .collect();
        // full buckets lend nothing out: forget them
        if buckets.len() > 10_000 {
            buckets.retain(|_, b| !b.is_full(now_ms));
        }
        drop(buckets);
        let valid = request
            .charges
            .into_iter()
            .filter(|(k, u)| {
                let ok = crate::state::tenant::validate_usage_row(k, u).is_ok();
                if !ok {
                    tracing::warn!(?k, "dropping a malformed usage charge");
                }
                ok
            })
            .collect();
        self.charge(valid);
        QuotaReply { grants }
    }

    /// Adds charges to what the next record holds.
    pub fn charge(&self, charges: Vec<(UsageKey, Usage)>) {
        if charges.is_empty() {
            return;
        }
        let mut pending = self.pending.lock().expect("quota lock poisoned");
        for (k, u) in charges {
            pending.entry(k).or_default().add(&u);
        }
    }

    /// Takes the charges to record (at most [`crate::state::tenant::MAX_USAGE_ROWS`]).
    pub fn take_pending(&self) -> Vec<(UsageKey, Usage)> {
        let mut pending = self.pending.lock().expect("quota lock poisoned");
        let mut out = Vec::new();
        while out.len() < crate::state::tenant::MAX_USAGE_ROWS {
            match pending.pop_first() {
                Some(row) => out.push(row),
                None => break,
            }
        }
        out
    }

    /// Runs `f` on the charges not yet recorded.
    pub fn with_pending(&self, f: impl FnOnce(&BTreeMap<UsageKey, Usage>)) {
        f(&self.pending.lock().expect("quota lock poisoned"));
    }

    /// Forgets every bucket (leadership was lost: the next leader lends).
    pub fn clear_buckets(&self) {
        self.buckets.lock().expect("quota lock poisoned").clear();
    }
}

/// Records the leader's pending charges once a second while it leads;
/// charges left when it stops leading are handed to `forward` (the local
/// gateway, which sends them to the next leader).
pub async fn run_recorder(
    ctx: std::sync::Arc<crate::admin::AdminContext>,
    forward: impl Fn(Vec<(UsageKey, Usage)>) + Send + Sync + 'static,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    let mut led = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let leader = ctx.is_leader();
        if led && !leader {
            ctx.quota.clear_buckets();
        }
        led = leader;
        let rows = ctx.quota.take_pending();
        if rows.is_empty() {
            continue;
        }
        if !leader {
            forward(rows);
            continue;
        }
        let command = crate::state::Command::RecordUsage { rows: rows.clone() };
        match ctx
            .write("record_usage", "talon:gateway".into(), command)
            .await
        {
            Ok(_) => {}
            Err(crate::error::AdminError::Rejected(r)) => {
                tracing::error!(reason = %r.message, rows = rows.len(), "usage refused; dropped");
            }
            Err(e) => {
                tracing::warn!(error = %e, rows = rows.len(), "recording usage failed; retrying");
                ctx.quota.charge(rows);
            }
        }
    }
}
