//! The gateway's half of the cluster-wide limits ([`crate::quota`]): slices
//! lent by the leader, spent here, settled after each answer, and given
//! back when idle; and the charges this gateway sends the leader.
//!
//! A request needs one request unit and its token reservation (prompt
//! tokens estimated before admission, plus `max_tokens`, or
//! [`DEFAULT_RESERVE`] when it names none) from each limited meter of its
//! key and tenant. When the slices here hold enough, nothing leaves this
//! coordinator; otherwise one `Quota` call to the leader asks for every
//! shortfall at once. A refusal is 429 with `Retry-After` from the
//! leader's bucket. With no leader reachable a limited key is refused 503
//! (fail closed); unlimited keys never wait on the leader.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::StatusCode;

use super::GwError;
use crate::admin::AdminContext;
use crate::network::{LeaderCall, LeaderPort};
use crate::quota::{Ask, Meter, QuotaReply, QuotaRequest, SliceGrant};
use crate::state::{Usage, UsageKey};

/// Completion tokens reserved for a request that gives no `max_tokens`.
pub const DEFAULT_RESERVE: u64 = 512;
/// A slice unused this long goes back to the leader.
const IDLE: Duration = Duration::from_secs(1);
/// A slice holds up to this much of its limit's rate.
const SLICE_S: f64 = 0.2;

/// Units held for one meter.
#[derive(Debug)]
struct Slice {
    units: f64,
    /// The leader says the meter has no limit (the state here lags).
    unlimited: bool,
    used: Instant,
}

/// What a request took, to settle when it ends.
#[derive(Debug, Default)]
pub struct Reservation {
    /// Token meters and the tokens reserved on each.
    tokens: Vec<(Meter, f64)>,
    pub reserved_tokens: u64,
}

pub struct Limiter {
    ctx: Arc<AdminContext>,
    slices: Mutex<HashMap<Meter, Slice>>,
    /// Charges to send the leader (this coordinator does not lead).
    outgoing: Mutex<BTreeMap<UsageKey, Usage>>,
    leader: LeaderPort,
}

/// What a meter needs for one request: the meter, the units, and its
/// limit per minute (sizes the slice asked for).
pub type Need = (Meter, f64, f64);

impl Limiter {
    pub fn new(ctx: Arc<AdminContext>) -> Limiter {
        Limiter {
            ctx,
            slices: Mutex::new(HashMap::new()),
            outgoing: Mutex::new(BTreeMap::new()),
            leader: LeaderPort::default(),
        }
    }

    /// Takes what every need asks from the slices here, if they hold it;
    /// else the shortfalls.
    fn take_local(&self, needs: &[Need]) -> Result<(), Vec<Ask>> {
        let mut slices = self.slices.lock().expect("limits lock poisoned");
        let short: Vec<Ask> = needs
            .iter()
            .filter_map(|(meter, need, per_minute)| {
                let held = slices.get(meter);
                if held.is_some_and(|s| s.unlimited || s.units >= *need) {
                    return None;
                }
                let lack = need - held.map_or(0.0, |s| s.units);
                Some(Ask {
                    meter: meter.clone(),
                    need: lack,
                    want: (lack + per_minute / 60.0 * SLICE_S).floor().max(lack),
                })
            })
            .collect();
        if !short.is_empty() {
            return Err(short);
        }
        let now = Instant::now();
        for (meter, need, _) in needs {
            if let Some(s) = slices.get_mut(meter) {
                if !s.unlimited {
                    s.units -= need;
                }
                s.used = now;
            }
        }
        Ok(())
    }

    /// Reserves `needs` (request and token units); `tokens` is the token
    /// reservation (for settling).
    pub async fn reserve(&self, needs: Vec<Need>, tokens: u64) -> Result<Reservation, GwError> {
        let reservation = Reservation {
            tokens: needs
                .iter()
                .filter(|(m, _, _)| matches!(m, Meter::KeyTokens(_) | Meter::TenantTokens(_)))
                .map(|(m, n, _)| (m.clone(), *n))
                .collect(),
            reserved_tokens: tokens,
        };
        if needs.is_empty() {
            return Ok(reservation);
        }
        // Two rounds: another request here may spend a slice between the
        // grant and the take.
        for _ in 0..3 {
            let asks = match self.take_local(&needs) {
                Ok(()) => return Ok(reservation),
                Err(asks) => asks,
            };
            let request = QuotaRequest {
                asks: asks.clone(),
                returns: self.idle_slices(),
                charges: self.take_outgoing(),
            };
            let reply = self.call(request).await?;
            let mut slices = self.slices.lock().expect("limits lock poisoned");
            let mut refused: Option<u64> = None;
            for (ask, grant) in asks.iter().zip(reply.grants) {
                let slice = slices.entry(ask.meter.clone()).or_insert(Slice {
                    units: 0.0,
                    unlimited: false,
                    used: Instant::now(),
                });
                match grant {
                    SliceGrant::Granted(g) => slice.units += g,
                    SliceGrant::Unlimited => slice.unlimited = true,
                    SliceGrant::Refused { retry_after_ms } => {
                        refused = Some(refused.unwrap_or(0).max(retry_after_ms));
                    }
                }
            }
            if let Some(ms) = refused {
                return Err(limited(&asks, ms));
            }
        }
        Err(limited(&needs_as_asks(&needs), 1000))
    }

    /// Settles a reservation: `used` tokens were really spent.
    pub fn settle(&self, reservation: Reservation, used: u64) {
        if reservation.tokens.is_empty() {
            return;
        }
        let mut slices = self.slices.lock().expect("limits lock poisoned");
        for (meter, reserved) in reservation.tokens {
            if let Some(s) = slices.get_mut(&meter) {
                // unspent units come back; an overrun is a debt
                s.units += reserved - used as f64;
            }
        }
    }

    /// Gives back a reservation whose request never ran.
    pub fn release(&self, reservation: Reservation) {
        self.settle(reservation, 0);
    }

    /// Slices idle for [`IDLE`], emptied, to return.
    fn idle_slices(&self) -> Vec<(Meter, f64)> {
        let mut slices = self.slices.lock().expect("limits lock poisoned");
        let now = Instant::now();
        let mut out = Vec::new();
        slices.retain(|meter, s| {
            if now.duration_since(s.used) < IDLE {
                return true;
            }
            if s.units > 0.0 && !s.unlimited {
                out.push((meter.clone(), s.units));
            }
            // a debt stays until paid
            s.units < 0.0
        });
        out
    }

    fn take_outgoing(&self) -> Vec<(UsageKey, Usage)> {
        let mut outgoing = self.outgoing.lock().expect("limits lock poisoned");
        let mut rows = Vec::new();
        while rows.len() < crate::quota::MAX_ITEMS {
            match outgoing.pop_first() {
                Some(row) => rows.push(row),
                None => break,
            }
        }
        rows
    }

    /// Records charges: into the ledger when this coordinator leads, else
    /// sent to the leader with the next call or tick.
    pub fn charge(&self, rows: Vec<(UsageKey, Usage)>) {
        if self.ctx.is_leader() {
            self.ctx.quota.charge(rows);
            return;
        }
        let mut outgoing = self.outgoing.lock().expect("limits lock poisoned");
        for (k, u) in rows {
            outgoing.entry(k).or_default().add(&u);
        }
    }

    /// Charges not yet recorded in the state, summed for a key (tenant,
    /// name) and for its tenant.
    pub fn unrecorded(&self, tenant: &str, key: &str) -> (f64, f64) {
        let mut sums = (0.0, 0.0);
        let mut add = |k: &UsageKey, u: &Usage| {
            if k.tenant == tenant {
                sums.1 += u.cost_usd;
                if k.key == key {
                    sums.0 += u.cost_usd;
                }
            }
        };
        for (k, u) in self.outgoing.lock().expect("limits lock poisoned").iter() {
            add(k, u);
        }
        self.ctx.quota.with_pending(|pending| {
            for (k, u) in pending {
                add(k, u);
            }
        });
        sums
    }

    /// Returns idle slices and sends charges; run twice a second.
    pub async fn tick(&self) {
        let returns = self.idle_slices();
        let charges = self.take_outgoing();
        if returns.is_empty() && charges.is_empty() {
            return;
        }
        let request = QuotaRequest {
            asks: Vec::new(),
            returns,
            charges: charges.clone(),
        };
        if let Err(e) = self.call(request).await {
            tracing::debug!(error = %e.message, "quota tick failed; charges kept");
            self.charge(charges);
        }
    }

    /// One quota call: to the local ledger when this coordinator leads,
    /// else to the leader's Raft port.
    async fn call(&self, request: QuotaRequest) -> Result<QuotaReply, GwError> {
        let now_ms = crate::context::now_ms();
        if self.ctx.leads() {
            let applied = self.ctx.state.read().expect("state lock poisoned");
            return Ok(self.ctx.quota.serve(&applied.state, request, now_ms));
        }
        let unavailable = |why: String| {
            GwError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            kind: "limits_unavailable",
            message: format!(
                "this key's limits cannot be checked: {why}; retry shortly (limited keys fail closed)"
            ),
            retry_after_s: Some(1),
        }
        };
        self.leader
            .call(&self.ctx, LeaderCall::Quota, &request)
            .await
            .map_err(unavailable)
    }
}

fn needs_as_asks(needs: &[Need]) -> Vec<Ask> {
    needs
        .iter()
        .map(|(m, n, _)| Ask {
            meter: m.clone(),
            need: *n,
            want: *n,
        })
        .collect()
}

/// The 429 for asks the leader refused.
fn limited(asks: &[Ask], retry_after_ms: u64) -> GwError {
    let what: Vec<String> = asks
        .iter()
        .map(|a| match &a.meter {
            Meter::KeyRequests(_) => "the key's requests per minute".to_string(),
            Meter::KeyTokens(_) => format!("the key's tokens per minute ({:.0} needed)", a.need),
            Meter::TenantRequests(t) => format!("tenant {t}'s requests per minute"),
            Meter::TenantTokens(t) => {
                format!("tenant {t}'s tokens per minute ({:.0} needed)", a.need)
            }
        })
        .collect();
    let never = retry_after_ms == u64::MAX;
    GwError {
        status: StatusCode::TOO_MANY_REQUESTS,
        kind: "rate_limit_exceeded",
        message: if never {
            format!(
                "the request needs more than a whole minute of {}; send a smaller request (lower max_tokens)",
                what.join(" and ")
            )
        } else {
            format!(
                "rate limit reached: {}; retry after {} ms",
                what.join(" and "),
                retry_after_ms
            )
        },
        retry_after_s: Some(if never {
            60
        } else {
            retry_after_ms.div_ceil(1000).max(1)
        }),
    }
}
