//! Tenants, inference keys and usage in the admin API. Tenants and keys
//! are the admin role's (like every credential); usage is readable by any
//! role that reads. Keys are made on the leader and shown once.

use talon_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::{new_credential, Admin};
use crate::error::AdminError;
use crate::state::tenant::{self, day_name, day_of, month_start};
use crate::state::{
    self, Command, ContentFilter, FilterAction, KeyPolicy, Limits, Permission, Priority, Role,
    Tenant,
};

fn limits_from_wire(l: Option<&pb::Limits>) -> Limits {
    let Some(l) = l else {
        return Limits::default();
    };
    Limits {
        requests_per_minute: l.requests_per_minute,
        tokens_per_minute: l.tokens_per_minute,
        daily_budget_usd: l.daily_budget_usd,
        monthly_budget_usd: l.monthly_budget_usd,
    }
}

fn limits_to_wire(l: &Limits) -> pb::Limits {
    pb::Limits {
        requests_per_minute: l.requests_per_minute,
        tokens_per_minute: l.tokens_per_minute,
        daily_budget_usd: l.daily_budget_usd,
        monthly_budget_usd: l.monthly_budget_usd,
    }
}

/// Spent today and this month by `tenant` (and `key`, if given).
fn spent(state: &state::State, tenant: &str, key: Option<&str>) -> (f64, f64) {
    let today = day_of(crate::context::now_ms());
    (
        state.tenancy.spent(tenant, key, today, today),
        state.tenancy.spent(tenant, key, month_start(today), today),
    )
}

fn tenant_to_wire(state: &state::State, t: &Tenant) -> pb::Tenant {
    let (today, month) = spent(state, &t.name, None);
    pb::Tenant {
        name: t.name.clone(),
        models: t.models.clone(),
        limits: Some(limits_to_wire(&t.limits)),
        created_at_ms: t.created_at_ms,
        revision: t.revision,
        spent_today_usd: today,
        spent_month_usd: month,
        mask_pii: t.mask_pii,
        cache_ttl_s: t.cache_ttl_s,
        filters: t
            .filters
            .iter()
            .map(|f| pb::ContentFilter {
                pattern: f.pattern.clone(),
                action: f.action.as_str().into(),
            })
            .collect(),
    }
}

fn key_to_wire(state: &state::State, id: &str, p: &KeyPolicy, created_at_ms: u64) -> pb::Key {
    let (today, month) = spent(state, &p.tenant, Some(&p.name));
    pb::Key {
        id: id.to_string(),
        tenant: p.tenant.clone(),
        name: p.name.clone(),
        models: p.models.clone(),
        max_priority: p.max_priority.as_str().into(),
        limits: Some(limits_to_wire(&p.limits)),
        created_at_ms,
        revision: p.revision,
        spent_today_usd: today,
        spent_month_usd: month,
    }
}

fn invalid(m: String) -> Status {
    AdminError::InvalidArgument(m).into()
}

fn unexpected(other: state::Response) -> Status {
    AdminError::Internal(format!("unexpected apply response {other:?}")).into()
}

fn priority_or_normal(p: &str) -> Result<Priority, Status> {
    if p.is_empty() {
        Ok(Priority::Normal)
    } else {
        Priority::parse(p).map_err(invalid)
    }
}

pub(super) async fn put_tenant(
    this: &Admin,
    request: Request<pb::PutTenantRequest>,
) -> Result<Response<pb::Tenant>, Status> {
    let actor = this
        .ctx
        .authorize_grpc(&request, Permission::Admin, "tenant put")?
        .actor();
    let Some(t) = request.get_ref().tenant.as_ref() else {
        return Err(invalid("the request has no tenant".into()));
    };
    let tenant = Tenant {
        name: t.name.clone(),
        models: t.models.clone(),
        limits: limits_from_wire(t.limits.as_ref()),
        created_at_ms: 0,
        revision: 0,
        mask_pii: t.mask_pii,
        cache_ttl_s: t.cache_ttl_s,
        filters: t
            .filters
            .iter()
            .map(|f| {
                Ok(ContentFilter {
                    pattern: f.pattern.clone(),
                    action: FilterAction::parse(&f.action)?,
                })
            })
            .collect::<Result<_, String>>()
            .map_err(invalid)?,
    };
    tenant.validate().map_err(invalid)?;
    forward!(this, request, put_tenant);
    match this
        .ctx
        .write("put_tenant", actor, Command::PutTenant(tenant))
        .await?
    {
        state::Response::Tenant(t) => {
            let applied = this.ctx.state.read().expect("state lock poisoned");
            Ok(Response::new(tenant_to_wire(&applied.state, &t)))
        }
        other => Err(unexpected(other)),
    }
}

pub(super) async fn list_tenants(
    this: &Admin,
    request: Request<pb::ListTenantsRequest>,
) -> Result<Response<pb::ListTenantsResponse>, Status> {
    this.ctx
        .authorize_grpc(&request, Permission::Admin, "tenant list")?;
    let applied = this.ctx.state.read().expect("state lock poisoned");
    let tenants = applied
        .state
        .tenancy
        .tenants
        .values()
        .map(|t| tenant_to_wire(&applied.state, t))
        .collect();
    Ok(Response::new(pb::ListTenantsResponse { tenants }))
}

pub(super) async fn delete_tenant(
    this: &Admin,
    request: Request<pb::DeleteTenantRequest>,
) -> Result<Response<pb::DeleteTenantResponse>, Status> {
    let actor = this
        .ctx
        .authorize_grpc(&request, Permission::Admin, "tenant delete")?
        .actor();
    let name = request.get_ref().name.clone();
    tenant::validate_name("tenant", &name).map_err(invalid)?;
    forward!(this, request, delete_tenant);
    match this
        .ctx
        .write("delete_tenant", actor, Command::DeleteTenant { name })
        .await?
    {
        state::Response::Deleted { revision } => {
            Ok(Response::new(pb::DeleteTenantResponse { revision }))
        }
        other => Err(unexpected(other)),
    }
}

fn key_reply(
    this: &Admin,
    response: state::Response,
    secret: String,
) -> Result<Response<pb::CreateKeyResponse>, Status> {
    match response {
        state::Response::Key { credential, policy } => {
            let applied = this.ctx.state.read().expect("state lock poisoned");
            let key = key_to_wire(
                &applied.state,
                &credential.id,
                &policy,
                credential.created_at_ms,
            );
            Ok(Response::new(pb::CreateKeyResponse {
                key: Some(key),
                secret,
            }))
        }
        other => Err(unexpected(other)),
    }
}

pub(super) async fn create_key(
    this: &Admin,
    request: Request<pb::CreateKeyRequest>,
) -> Result<Response<pb::CreateKeyResponse>, Status> {
    let principal = this
        .ctx
        .authorize_grpc(&request, Permission::Admin, "key create")?;
    let req = request.get_ref();
    let policy = KeyPolicy {
        tenant: req.tenant.clone(),
        name: req.name.clone(),
        models: req.models.clone(),
        max_priority: priority_or_normal(&req.max_priority)?,
        limits: limits_from_wire(req.limits.as_ref()),
        revision: 0,
    };
    policy.validate().map_err(invalid)?;
    forward!(this, request, create_key);
    let (credential, secret) = new_credential(
        &format!("{}.{}", policy.tenant, policy.name),
        Role::Inference,
        None,
        &principal.name,
    );
    let response = this
        .ctx
        .write(
            "create_key",
            principal.actor(),
            Command::CreateKey { credential, policy },
        )
        .await?;
    key_reply(this, response, secret)
}

pub(super) async fn list_keys(
    this: &Admin,
    request: Request<pb::ListKeysRequest>,
) -> Result<Response<pb::ListKeysResponse>, Status> {
    this.ctx
        .authorize_grpc(&request, Permission::Admin, "key list")?;
    let tenant = request.get_ref().tenant.as_str();
    let applied = this.ctx.state.read().expect("state lock poisoned");
    let state = &applied.state;
    let keys = state
        .tenancy
        .keys
        .iter()
        .filter(|(_, p)| tenant.is_empty() || p.tenant == tenant)
        .map(|(id, p)| {
            let created = state.credentials.get(id).map_or(0, |c| c.created_at_ms);
            key_to_wire(state, id, p, created)
        })
        .collect();
    Ok(Response::new(pb::ListKeysResponse { keys }))
}

pub(super) async fn update_key(
    this: &Admin,
    request: Request<pb::UpdateKeyRequest>,
) -> Result<Response<pb::Key>, Status> {
    let actor = this
        .ctx
        .authorize_grpc(&request, Permission::Admin, "key update")?
        .actor();
    let req = request.get_ref();
    state::credential::validate_id(&req.id).map_err(invalid)?;
    let old = {
        let applied = this.ctx.state.read().expect("state lock poisoned");
        applied.state.tenancy.keys.get(&req.id).cloned()
    };
    let Some(old) = old else {
        return Err(AdminError::NotFound(format!(
            "credential {:?} is not a key with a tenant (talon key list shows them)",
            req.id
        ))
        .into());
    };
    let policy = KeyPolicy {
        models: req.models.clone(),
        max_priority: priority_or_normal(&req.max_priority)?,
        limits: limits_from_wire(req.limits.as_ref()),
        ..old
    };
    policy.validate().map_err(invalid)?;
    forward!(this, request, update_key);
    let id = req.id.clone();
    match this
        .ctx
        .write("update_key", actor, Command::UpdateKey { id, policy })
        .await?
    {
        state::Response::Key { credential, policy } => {
            let applied = this.ctx.state.read().expect("state lock poisoned");
            Ok(Response::new(key_to_wire(
                &applied.state,
                &credential.id,
                &policy,
                credential.created_at_ms,
            )))
        }
        other => Err(unexpected(other)),
    }
}

pub(super) async fn rotate_key(
    this: &Admin,
    request: Request<pb::RotateKeyRequest>,
) -> Result<Response<pb::CreateKeyResponse>, Status> {
    let principal = this
        .ctx
        .authorize_grpc(&request, Permission::Admin, "key rotate")?;
    let old = request.get_ref().id.clone();
    state::credential::validate_id(&old).map_err(invalid)?;
    forward!(this, request, rotate_key);
    let holder = {
        let applied = this.ctx.state.read().expect("state lock poisoned");
        applied
            .state
            .credentials
            .get(&old)
            .map(|c| c.principal.clone())
    };
    let Some(holder) = holder else {
        return Err(AdminError::NotFound(format!("credential {old:?} does not exist")).into());
    };
    let (credential, secret) = new_credential(&holder, Role::Inference, None, &principal.name);
    let response = this
        .ctx
        .write(
            "rotate_key",
            principal.actor(),
            Command::RotateKey { old, credential },
        )
        .await?;
    key_reply(this, response, secret)
}

pub(super) async fn get_usage(
    this: &Admin,
    request: Request<pb::GetUsageRequest>,
) -> Result<Response<pb::GetUsageResponse>, Status> {
    this.ctx
        .authorize_grpc(&request, Permission::Read, "usage")?;
    let req = request.get_ref();
    let days = if req.days == 0 {
        31
    } else {
        req.days.min(tenant::KEEP_DAYS)
    };
    let today = day_of(crate::context::now_ms());
    let from = today.saturating_sub(days - 1);
    let applied = this.ctx.state.read().expect("state lock poisoned");
    let rows = applied
        .state
        .tenancy
        .usage
        .iter()
        .filter(|(k, _)| {
            k.day >= from
                && (req.tenant.is_empty() || k.tenant == req.tenant)
                && (req.key.is_empty() || k.key == req.key)
                && (req.model.is_empty() || k.model == req.model)
        })
        .map(|(k, u)| pb::UsageRow {
            day: day_name(k.day),
            tenant: k.tenant.clone(),
            key: k.key.clone(),
            model: k.model.clone(),
            requests: u.requests,
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            gpu_seconds: u.gpu_seconds,
            cost_usd: u.cost_usd,
        })
        .collect();
    Ok(Response::new(pb::GetUsageResponse { rows }))
}
