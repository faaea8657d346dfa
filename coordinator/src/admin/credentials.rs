//! Credentials and node removal in the admin API: create, list and revoke
//! keys, who am I, remove a node. Keys are made on the leader (randomness
//! never reaches `apply`) and shown once; only hashes are replicated.

use talon_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::{credential_to_wire, new_credential, Admin};
use crate::auth::{self, Principal};
use crate::error::AdminError;
use crate::state::{self, Command, Permission, Role};

pub(super) async fn create(
    this: &Admin,
    request: Request<pb::CreateCredentialRequest>,
) -> Result<Response<pb::CreateCredentialResponse>, Status> {
    let principal = this
        .ctx
        .authorize_grpc(&request, Permission::Admin, "credential create")?;
    let req = request.get_ref();
    state::credential::validate_principal(&req.principal).map_err(AdminError::InvalidArgument)?;
    let role = Role::parse(&req.role).map_err(AdminError::InvalidArgument)?;
    let node_id = match (role, req.node_id.as_str()) {
        (Role::Agent, "") => {
            return Err(AdminError::InvalidArgument(
                "an agent credential needs --node <node id>".into(),
            )
            .into())
        }
        (Role::Agent, node) => {
            state::node::validate_node_id(node).map_err(AdminError::InvalidArgument)?;
            Some(node.to_string())
        }
        (_, "") => None,
        (role, _) => {
            return Err(AdminError::InvalidArgument(format!(
                "only agent credentials are bound to a node; drop --node for a {} credential",
                role.as_str()
            ))
            .into())
        }
    };
    forward!(this, request, create_credential);
    let (credential, key) = new_credential(&req.principal, role, node_id, &principal.name);
    match this
        .ctx
        .write(
            "create_credential",
            principal.actor(),
            Command::CreateCredential(credential),
        )
        .await?
    {
        state::Response::Credential(c) => Ok(Response::new(pb::CreateCredentialResponse {
            credential: Some(credential_to_wire(&c)),
            key,
        })),
        other => Err(AdminError::Internal(format!("unexpected apply response {other:?}")).into()),
    }
}

pub(super) async fn list(
    this: &Admin,
    request: Request<pb::ListCredentialsRequest>,
) -> Result<Response<pb::ListCredentialsResponse>, Status> {
    this.ctx
        .authorize_grpc(&request, Permission::Admin, "credential list")?;
    let applied = this.ctx.state.read().expect("state lock poisoned");
    let credentials = applied
        .state
        .credentials
        .values()
        .map(credential_to_wire)
        .collect();
    Ok(Response::new(pb::ListCredentialsResponse { credentials }))
}

pub(super) async fn revoke(
    this: &Admin,
    request: Request<pb::RevokeCredentialRequest>,
) -> Result<Response<pb::RevokeCredentialResponse>, Status> {
    let actor = this
        .ctx
        .authorize_grpc(&request, Permission::Admin, "credential revoke")?
        .actor();
    let id = request.get_ref().id.clone();
    state::credential::validate_id(&id).map_err(AdminError::InvalidArgument)?;
    forward!(this, request, revoke_credential);
    match this
        .ctx
        .write("revoke_credential", actor, Command::RevokeCredential { id })
        .await?
    {
        state::Response::Revoked { revision } => {
            Ok(Response::new(pb::RevokeCredentialResponse { revision }))
        }
        other => Err(AdminError::Internal(format!("unexpected apply response {other:?}")).into()),
    }
}

pub(super) async fn who_am_i(
    this: &Admin,
    request: Request<pb::WhoAmIRequest>,
) -> Result<Response<pb::WhoAmIResponse>, Status> {
    let authenticated = this.ctx.config.auth.enabled;
    let principal = if authenticated {
        let applied = this.ctx.state.read().expect("state lock poisoned");
        auth::grpc_key(&request)
            .and_then(|key| auth::authenticate(&applied.state, key))
            .map_err(Status::from)?
    } else {
        Principal::anonymous()
    };
    Ok(Response::new(pb::WhoAmIResponse {
        credential_id: principal.credential,
        principal: principal.name,
        role: principal.role.as_str().into(),
        authenticated,
    }))
}

pub(super) async fn remove_node(
    this: &Admin,
    request: Request<pb::RemoveNodeRequest>,
) -> Result<Response<pb::RemoveNodeResponse>, Status> {
    let actor = this
        .ctx
        .authorize_grpc(&request, Permission::Write, "node remove")?
        .actor();
    let node_id = request.get_ref().node_id.clone();
    state::node::validate_node_id(&node_id).map_err(AdminError::InvalidArgument)?;
    forward!(this, request, remove_node);
    match this
        .ctx
        .write("remove_node", actor, Command::RemoveNode { node_id })
        .await?
    {
        state::Response::NodeRemoved { revision } => {
            Ok(Response::new(pb::RemoveNodeResponse { revision }))
        }
        other => Err(AdminError::Internal(format!("unexpected apply response {other:?}")).into()),
    }
}
