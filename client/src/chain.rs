//! The gateway's chain: rules put, listed and deleted through the admin
//! API (`talon chain`).

use talon_proto::v1 as pb;

use crate::{Client, ClientError};

pub use talon_proto::v1::{ChainEntry, Rule};

impl Client {
    /// Creates or replaces a rule of the chain.
    pub async fn put_rule(&self, rule: Rule) -> Result<Rule, ClientError> {
        let message = pb::PutRuleRequest { rule: Some(rule) };
        self.call(true, message, |mut c, r| async move { c.put_rule(r).await })
            .await
    }

    /// The chain as the gateways run it, built-ins included.
    pub async fn list_chain(&self) -> Result<Vec<ChainEntry>, ClientError> {
        let reply = self
            .call(true, pb::ListChainRequest {}, |mut c, r| async move {
                c.list_chain(r).await
            })
            .await?;
        Ok(reply.entries)
    }

    pub async fn delete_rule(&self, name: &str) -> Result<u64, ClientError> {
        let message = pb::DeleteRuleRequest { name: name.into() };
        let reply = self
            .call(
                false,
                message,
                |mut c, r| async move { c.delete_rule(r).await },
            )
            .await?;
        Ok(reply.revision)
    }
}
