//! The tenant, key and usage commands of [`State::apply`] (the types and
//! their checks are in [`super::tenant`]).

use super::tenant::{day_of, validate_usage_row, KeyPolicy, Tenant, Usage, UsageKey};
use super::tenant::{KEEP_DAYS, MAX_TENANTS, MAX_USAGE_ROWS};
use super::{rejected, Change, Command, Credential, RejectionKind, Response, Role, State};

/// How a tenancy command applied.
pub(super) enum Applied {
    Audited(Response, Vec<Change>, (&'static str, String, String)),
    /// Usage records are not audited.
    Unaudited(Response, Vec<Change>),
    Rejected((Response, Vec<Change>)),
}

/// The answer, changes and audit record of a created or rotated key.
fn key_done(
    c: Credential,
    p: KeyPolicy,
    action: &'static str,
) -> (Response, Vec<Change>, (&'static str, String, String)) {
    let detail = format!(
        "principal={} key={} models={} max_priority={} limits={:?}",
        c.principal,
        p.label(),
        p.models.join(","),
        p.max_priority.as_str(),
        p.limits
    );
    let changes = vec![Change::Credential(c.id.clone()), Change::Key(c.id.clone())];
    let target = c.id.clone();
    (
        Response::Key {
            credential: Box::new(c),
            policy: Box::new(p),
        },
        changes,
        (action, target, detail),
    )
}

impl State {
    /// Applies a tenancy command; `apply` gives it no other.
    pub(super) fn apply_tenancy(&mut self, index: u64, at: u64, command: &Command) -> Applied {
        let (response, changes, audit) = match command {
            Command::PutTenant(t) => match self.put_tenant(index, at, t) {
                Ok(t) => {
                    let detail = format!("models={} limits={:?}", t.models.join(","), t.limits);
                    let changes = vec![Change::Tenant(t.name.clone())];
                    let target = t.name.clone();
                    (
                        Response::Tenant(Box::new(t)),
                        changes,
                        ("tenant.put", target, detail),
                    )
                }
                Err(rejection) => return Applied::Rejected(rejection),
            },
            Command::DeleteTenant { name } => match self.delete_tenant(name) {
                Ok(()) => (
                    Response::Deleted { revision: index },
                    vec![Change::Tenant(name.clone())],
                    ("tenant.delete", name.clone(), String::new()),
                ),
                Err(rejection) => return Applied::Rejected(rejection),
            },
            Command::CreateKey { credential, policy } => {
                match self.create_key(index, at, credential, policy) {
                    Ok((c, p)) => key_done(c, p, "key.create"),
                    Err(rejection) => return Applied::Rejected(rejection),
                }
            }
            Command::UpdateKey { id, policy } => match self.update_key(index, id, policy) {
                Ok(p) => {
                    let detail = format!(
                        "key={} models={} max_priority={} limits={:?}",
                        p.label(),
                        p.models.join(","),
                        p.max_priority.as_str(),
                        p.limits
                    );
                    let Some(c) = self.credentials.get(id).cloned() else {
                        return Applied::Rejected(rejected(
                            RejectionKind::NotFound,
                            format!("credential {id:?} does not exist"),
                        ));
                    };
                    (
                        Response::Key {
                            credential: Box::new(c),
                            policy: Box::new(p),
                        },
                        vec![Change::Key(id.clone())],
                        ("key.update", id.clone(), detail),
                    )
                }
                Err(rejection) => return Applied::Rejected(rejection),
            },
            Command::RotateKey { old, credential } => {
                match self.rotate_key(index, at, old, credential) {
                    Ok((c, p)) => {
                        let (response, mut changes, (_, target, detail)) =
                            key_done(c, p, "key.rotate");
                        changes.push(Change::Credential(old.clone()));
                        changes.push(Change::Key(old.clone()));
                        let detail = format!("{detail} replaces={old}");
                        (response, changes, ("key.rotate", target, detail))
                    }
                    Err(rejection) => return Applied::Rejected(rejection),
                }
            }
            Command::RecordUsage { rows } => {
                return match self.record_usage(at, rows) {
                    Ok(dropped) => {
                        let mut changes: Vec<Change> =
                            rows.iter().map(|(k, _)| Change::Usage(k.clone())).collect();
                        changes.extend(dropped.into_iter().map(Change::Usage));
                        let n = rows.len();
                        Applied::Unaudited(Response::UsageRecorded { rows: n }, changes)
                    }
                    Err(rejection) => Applied::Rejected(rejection),
                };
            }
            _ => {
                return Applied::Rejected(rejected(
                    RejectionKind::Invalid,
                    "not a tenancy command".into(),
                ))
            }
        };
        Applied::Audited(response, changes, audit)
    }
}

type Rejected = (Response, Vec<Change>);

/// The tenant and key commands of [`State::apply`].
impl State {
    pub(super) fn put_tenant(
        &mut self,
        index: u64,
        at: u64,
        t: &Tenant,
    ) -> Result<Tenant, Rejected> {
        t.validate()
            .map_err(|m| rejected(RejectionKind::Invalid, m))?;
        let tenancy = &mut self.tenancy;
        let created_at_ms = match tenancy.tenants.get(&t.name) {
            Some(old) => old.created_at_ms,
            None if tenancy.tenants.len() >= MAX_TENANTS => {
                return Err(rejected(
                    RejectionKind::Invalid,
                    format!("the registry holds {MAX_TENANTS} tenants, the most it keeps; delete unused ones first"),
                ))
            }
            None => at,
        };
        let t = Tenant {
            created_at_ms,
            revision: index,
            ..t.clone()
        };
        tenancy.tenants.insert(t.name.clone(), t.clone());
        Ok(t)
    }

    pub(super) fn delete_tenant(&mut self, name: &str) -> Result<(), Rejected> {
        if !self.tenancy.tenants.contains_key(name) {
            return Err(rejected(
                RejectionKind::NotFound,
                format!("tenant {name:?} does not exist"),
            ));
        }
        let keys: Vec<&str> = self
            .tenancy
            .keys
            .iter()
            .filter(|(_, k)| k.tenant == name)
            .map(|(id, _)| id.as_str())
            .collect();
        if !keys.is_empty() {
            return Err(rejected(
                RejectionKind::Invalid,
                format!(
                    "tenant {name:?} still has {} key(s) ({}); revoke them first (talon key revoke <id>)",
                    keys.len(),
                    keys.join(", ")
                ),
            ));
        }
        self.tenancy.tenants.remove(name);
        Ok(())
    }

    fn check_key(&self, credential: &Credential, policy: &KeyPolicy) -> Result<(), Rejected> {
        policy
            .validate()
            .map_err(|m| rejected(RejectionKind::Invalid, m))?;
        if credential.role != Role::Inference {
            return Err(rejected(
                RejectionKind::Invalid,
                format!(
                    "a key with a tenant must have the inference role, not {}",
                    credential.role.as_str()
                ),
            ));
        }
        if !self.tenancy.tenants.contains_key(&policy.tenant) {
            return Err(rejected(
                RejectionKind::NotFound,
                format!(
                    "tenant {:?} does not exist; create it first (talon tenant create {})",
                    policy.tenant, policy.tenant
                ),
            ));
        }
        Ok(())
    }

    pub(super) fn create_key(
        &mut self,
        index: u64,
        at: u64,
        credential: &Credential,
        policy: &KeyPolicy,
    ) -> Result<(Credential, KeyPolicy), Rejected> {
        self.check_key(credential, policy)?;
        if let Some((id, _)) = self
            .tenancy
            .keys
            .iter()
            .find(|(_, k)| k.tenant == policy.tenant && k.name == policy.name)
        {
            return Err(rejected(
                RejectionKind::AlreadyExists,
                format!(
                    "tenant {:?} already has a key named {:?} (credential {id}); rotate it (talon key rotate {id}) or pick another name",
                    policy.tenant, policy.name
                ),
            ));
        }
        let c = self.create_credential(index, at, credential)?;
        let p = KeyPolicy {
            revision: index,
            ..policy.clone()
        };
        self.tenancy.keys.insert(c.id.clone(), p.clone());
        Ok((c, p))
    }

    /// Changes a key's models, priority ceiling and limits (not its
    /// tenant or name).
    pub(super) fn update_key(
        &mut self,
        index: u64,
        id: &str,
        policy: &KeyPolicy,
    ) -> Result<KeyPolicy, Rejected> {
        let Some(old) = self.tenancy.keys.get(id) else {
            return Err(rejected(
                RejectionKind::NotFound,
                format!("credential {id:?} is not a key with a tenant"),
            ));
        };
        if old.tenant != policy.tenant || old.name != policy.name {
            return Err(rejected(
                RejectionKind::Invalid,
                format!(
                    "a key's tenant and name cannot change ({} stays {}); create a new key instead",
                    id,
                    old.label()
                ),
            ));
        }
        policy
            .validate()
            .map_err(|m| rejected(RejectionKind::Invalid, m))?;
        let p = KeyPolicy {
            revision: index,
            ..policy.clone()
        };
        self.tenancy.keys.insert(id.to_string(), p.clone());
        Ok(p)
    }

    /// Replaces key `old` by `credential` with the same policy: the old
    /// secret stops working when this entry applies.
    pub(super) fn rotate_key(
        &mut self,
        index: u64,
        at: u64,
        old: &str,
        credential: &Credential,
    ) -> Result<(Credential, KeyPolicy), Rejected> {
        let Some(policy) = self.tenancy.keys.get(old).cloned() else {
            return Err(rejected(
                RejectionKind::NotFound,
                format!("credential {old:?} is not a key with a tenant (only those rotate; revoke and create others)"),
            ));
        };
        let Some(previous) = self.credentials.get(old) else {
            return Err(rejected(
                RejectionKind::NotFound,
                format!("credential {old:?} does not exist"),
            ));
        };
        if credential.principal != previous.principal || credential.role != previous.role {
            return Err(rejected(
                RejectionKind::Invalid,
                "a rotated key keeps its principal and role".into(),
            ));
        }
        let c = self.create_credential(index, at, credential)?;
        self.credentials.remove(old);
        self.tenancy.keys.remove(old);
        let p = KeyPolicy {
            revision: index,
            ..policy
        };
        self.tenancy.keys.insert(c.id.clone(), p.clone());
        Ok((c, p))
    }

    /// Adds usage rows and drops days older than [`KEEP_DAYS`] before the
    /// entry's time. Rows are checked first: one bad row refuses the entry.
    /// The rows dropped for their age.
    pub(super) fn record_usage(
        &mut self,
        at: u64,
        rows: &[(UsageKey, Usage)],
    ) -> Result<Vec<UsageKey>, Rejected> {
        if rows.len() > MAX_USAGE_ROWS {
            return Err(rejected(
                RejectionKind::Invalid,
                format!(
                    "{} usage rows in one entry; the most is {MAX_USAGE_ROWS}",
                    rows.len()
                ),
            ));
        }
        for (k, u) in rows {
            validate_usage_row(k, u).map_err(|m| rejected(RejectionKind::Invalid, m))?;
        }
        let usage = &mut self.tenancy.usage;
        for (k, u) in rows {
            usage.entry(k.clone()).or_default().add(u);
        }
        let oldest = day_of(at).saturating_sub(KEEP_DAYS);
        if !usage.first_key_value().is_some_and(|(k, _)| k.day < oldest) {
            return Ok(Vec::new());
        }
        // rows sort by day first: the old ones are a prefix
        let keep = usage.split_off(&UsageKey::first_of(oldest, ""));
        Ok(std::mem::replace(usage, keep).into_keys().collect())
    }
}
