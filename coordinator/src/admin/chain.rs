//! The gateway's chain in the admin API: rules are the admin role's to
//! put and delete (like tenants and keys); any role that reads may list
//! the chain, built-ins included, in the order it runs.

use talon_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::Admin;
use crate::error::AdminError;
use crate::state::chain::{Action, Conditions, Rule, Window, BUILTINS};
use crate::state::{self, Command, Permission, Priority};

fn invalid(m: String) -> Status {
    AdminError::InvalidArgument(m).into()
}

/// The one model a route or split names.
fn one_model(r: &pb::Rule) -> Result<String, Status> {
    match r.to_models.as_slice() {
        [m] => Ok(m.clone()),
        other => Err(invalid(format!(
            "a {} rule names exactly one model to send to, not {}",
            r.action,
            other.len()
        ))),
    }
}

/// A rule from the wire, checked as apply will check it.
pub(super) fn rule_from_wire(r: &pb::Rule) -> Result<Rule, Status> {
    let action = match r.action.as_str() {
        "route" => Action::Route {
            model: one_model(r)?,
        },
        "split" => Action::Split {
            model: one_model(r)?,
            percent: r.percent,
        },
        "fallback" => Action::Fallback {
            models: r.to_models.clone(),
        },
        "breaker" => Action::Breaker {
            failures: r.failures,
            open_s: r.open_s,
        },
        "deny" => Action::Deny {
            message: r.message.clone(),
        },
        "cap-priority" => Action::CapPriority {
            priority: Priority::parse(&r.message).map_err(invalid)?,
        },
        "mask-pii" => Action::MaskPii,
        other => {
            return Err(invalid(format!(
                "action {other:?} is unknown; use route, split, fallback, breaker, deny, cap-priority or mask-pii"
            )))
        }
    };
    let hours = if r.hours.is_empty() {
        None
    } else {
        let offset = i16::try_from(r.utc_offset_minutes).map_err(|_| {
            invalid(format!(
                "a UTC offset of {} minutes is no time zone's; give -720 to 840",
                r.utc_offset_minutes
            ))
        })?;
        Some(Window::parse(&r.hours, offset).map_err(invalid)?)
    };
    let header = match (r.header_name.is_empty(), r.header_value.is_empty()) {
        (true, true) => None,
        (false, _) => Some((r.header_name.clone(), r.header_value.clone())),
        (true, false) => {
            return Err(invalid(
                "a header value is given without a header name; give both".into(),
            ))
        }
    };
    let rule = Rule {
        name: r.name.clone(),
        priority: r.priority,
        when: Conditions {
            models: r.models.clone(),
            tenants: r.tenants.clone(),
            priorities: r
                .priorities
                .iter()
                .map(|p| Priority::parse(p))
                .collect::<Result<_, _>>()
                .map_err(invalid)?,
            header,
            hours,
        },
        action,
        created_at_ms: 0,
        revision: 0,
    };
    rule.validate().map_err(invalid)?;
    Ok(rule)
}

fn rule_to_wire(r: &Rule) -> pb::Rule {
    let mut wire = pb::Rule {
        name: r.name.clone(),
        priority: r.priority,
        models: r.when.models.clone(),
        tenants: r.when.tenants.clone(),
        priorities: r
            .when
            .priorities
            .iter()
            .map(|p| p.as_str().into())
            .collect(),
        header_name: r
            .when
            .header
            .as_ref()
            .map(|h| h.0.clone())
            .unwrap_or_default(),
        header_value: r
            .when
            .header
            .as_ref()
            .map(|h| h.1.clone())
            .unwrap_or_default(),
        hours: r
            .when
            .hours
            .map(|h| {
                let hm = |m: u16| format!("{:02}:{:02}", m / 60, m % 60);
                format!("{}-{}", hm(h.from_minute), hm(h.to_minute))
            })
            .unwrap_or_default(),
        utc_offset_minutes: r.when.hours.map_or(0, |h| i32::from(h.utc_offset_minutes)),
        action: r.action.kind().into(),
        created_at_ms: r.created_at_ms,
        revision: r.revision,
        ..Default::default()
    };
    match &r.action {
        Action::Route { model } => wire.to_models = vec![model.clone()],
        Action::Split { model, percent } => {
            wire.to_models = vec![model.clone()];
            wire.percent = *percent;
        }
        Action::Fallback { models } => wire.to_models = models.clone(),
        Action::Breaker { failures, open_s } => {
            wire.failures = *failures;
            wire.open_s = *open_s;
        }
        Action::Deny { message } => wire.message = message.clone(),
        Action::CapPriority { priority } => wire.message = priority.as_str().into(),
        Action::MaskPii => {}
    }
    wire
}

pub(super) async fn put_rule(
    this: &Admin,
    request: Request<pb::PutRuleRequest>,
) -> Result<Response<pb::Rule>, Status> {
    let actor = this
        .ctx
        .authorize_grpc(&request, Permission::Admin, "chain put")?
        .actor();
    let Some(r) = request.get_ref().rule.as_ref() else {
        return Err(invalid("the request has no rule".into()));
    };
    let rule = rule_from_wire(r)?;
    forward!(this, request, put_rule);
    match this
        .ctx
        .write("put_rule", actor, Command::PutRule(rule))
        .await?
    {
        state::Response::Rule(r) => Ok(Response::new(rule_to_wire(&r))),
        other => Err(AdminError::Internal(format!("unexpected apply response {other:?}")).into()),
    }
}

pub(super) async fn list_chain(
    this: &Admin,
    request: Request<pb::ListChainRequest>,
) -> Result<Response<pb::ListChainResponse>, Status> {
    this.ctx
        .authorize_grpc(&request, Permission::Read, "chain list")?;
    let applied = this.ctx.state.read().expect("state lock poisoned");
    let mut entries: Vec<pb::ChainEntry> = BUILTINS
        .iter()
        .map(|(name, priority, what)| pb::ChainEntry {
            priority: *priority,
            name: name.to_string(),
            kind: "builtin".into(),
            what: what.to_string(),
            when: "every request".into(),
            rule: None,
        })
        .collect();
    entries.extend(applied.state.chain.values().map(|r| pb::ChainEntry {
        priority: r.priority,
        name: r.name.clone(),
        kind: "rule".into(),
        what: r.action.label(),
        when: r.conditions_label(),
        rule: Some(rule_to_wire(r)),
    }));
    // the order the gateway runs them in
    entries.sort_by(|a, b| {
        (a.priority, a.kind != "builtin", &a.name).cmp(&(b.priority, b.kind != "builtin", &b.name))
    });
    Ok(Response::new(pb::ListChainResponse { entries }))
}

pub(super) async fn delete_rule(
    this: &Admin,
    request: Request<pb::DeleteRuleRequest>,
) -> Result<Response<pb::DeleteRuleResponse>, Status> {
    let actor = this
        .ctx
        .authorize_grpc(&request, Permission::Admin, "chain delete")?
        .actor();
    let name = request.get_ref().name.clone();
    state::tenant::validate_name("rule", &name).map_err(invalid)?;
    forward!(this, request, delete_rule);
    match this
        .ctx
        .write("delete_rule", actor, Command::DeleteRule { name })
        .await?
    {
        state::Response::Deleted { revision } => {
            Ok(Response::new(pb::DeleteRuleResponse { revision }))
        }
        other => Err(AdminError::Internal(format!("unexpected apply response {other:?}")).into()),
    }
}
