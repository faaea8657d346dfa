//! The gRPC `Inference` service: the gateway's core behind protobuf.
//!
//! A request becomes the same OpenAI body the HTTP gateway routes (chat
//! when it has messages, text completion when it has a prompt); the call's
//! `grpc-timeout` is its deadline. Gateway errors map to gRPC codes, with
//! `retry-after` metadata on RESOURCE_EXHAUSTED and UNAVAILABLE.

use std::pin::Pin;
use std::time::Duration;

use axum::http::StatusCode;
use futures_util::{Stream, StreamExt};
use serde_json::{json, Value};
use talon_proto::v1 as pb;
use tonic::{Request, Response, Status};

use crate::gateway::{chunk_text, Call, Gateway, GwError, StreamItem, Streaming};
use crate::state::Permission;

pub struct InferenceSvc {
    gateway: Gateway,
}

impl InferenceSvc {
    pub fn new(gateway: Gateway) -> InferenceSvc {
        InferenceSvc { gateway }
    }
}

/// The gRPC status for a gateway error.
fn status(e: GwError) -> Status {
    let mut s = match e.status {
        StatusCode::BAD_REQUEST => Status::invalid_argument(e.message),
        StatusCode::NOT_FOUND => Status::not_found(e.message),
        StatusCode::TOO_MANY_REQUESTS => Status::resource_exhausted(e.message),
        StatusCode::SERVICE_UNAVAILABLE => Status::unavailable(e.message),
        s if s.is_client_error() => Status::invalid_argument(e.message),
        _ => Status::internal(e.message),
    };
    if let Some(secs) = e.retry_after_s {
        if let Ok(v) = secs.to_string().parse() {
            s.metadata_mut().insert("retry-after", v);
        }
    }
    s
}

/// `grpc-timeout` ("<digits><unit>", unit one of H M S m u n) as a duration.
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The gateway call for a request, or why it is malformed.
pub(crate) fn to_call(request: &Request<pb::InferRequest>) -> Result<Call, Status> {
    let deadline = request
        .metadata()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout);
    let r = request.get_ref();
    if r.model.is_empty() {
        return Err(Status::invalid_argument(
            "model is empty; name a registered model",
        ));
    }
    let mut body = json!({"model": r.model});
    let path = if !r.messages.is_empty() {
        for (i, m) in r.messages.iter().enumerate() {
            if !matches!(m.role.as_str(), "system" | "user" | "assistant" | "tool") {
                return Err(Status::invalid_argument(format!(
                    "messages[{i}].role is {:?}; use system, user, assistant or tool",
                    m.role
                )));
            }
        }
        body["messages"] = r
            .messages
            .iter()
            .map(|m| json!({"role": m.role, "content": m.content}))
            .collect();
        "/chat/completions"
    } else if !r.prompt.is_empty() {
        body["prompt"] = json!(r.prompt);
        "/completions"
    } else {
        return Err(Status::invalid_argument(
            "the request has neither messages (chat) nor a prompt (completion); give one",
        ));
    };
    if r.max_tokens > 0 {
        body["max_tokens"] = json!(r.max_tokens);
    }
    if let Some(t) = r.temperature {
        if !(0.0..=2.0).contains(&t) {
            return Err(Status::invalid_argument(format!(
                "temperature is {t}; use 0 to 2"
            )));
        }
        body["temperature"] = json!(t);
    }
    Ok(Call {
        path,
        priority: (!r.priority.is_empty()).then(|| r.priority.clone()),
        deadline,
        principal: None,
        hops: 0,
        headers: super::core::kept_headers(request.metadata().iter().filter_map(|kv| match kv {
            tonic::metadata::KeyAndValueRef::Ascii(k, v) => Some((k.as_str(), v.to_str().ok()?)),
            tonic::metadata::KeyAndValueRef::Binary(..) => None,
        })),
        fallbacks: Vec::new(),
        breaker: None,
        held: None,
        cache: super::cache::Use::of(None, None, &body),
        body,
    })
}

fn text(answer: &Value) -> String {
    answer["choices"][0]["message"]["content"]
        .as_str()
        .or_else(|| answer["choices"][0]["text"].as_str())
        .unwrap_or_default()
        .to_string()
}

impl InferenceSvc {
    /// The caller's key checked, then its request as a gateway call.
    fn authorized_call(&self, request: &Request<pb::InferRequest>) -> Result<Call, Status> {
        let principal =
            self.gateway
                .context()
                .authorize_grpc(request, Permission::Infer, "inference")?;
        let mut call = to_call(request)?;
        call.principal = Some(principal);
        Ok(call)
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::InferChunk, Status>> + Send>>;

#[tonic::async_trait]
impl pb::inference_server::Inference for InferenceSvc {
    async fn infer(
        &self,
        request: Request<pb::InferRequest>,
    ) -> Result<Response<pb::InferReply>, Status> {
        let call = self.authorized_call(&request)?;
        let (replica, answer) = self.gateway.complete(&call).await.map_err(status)?;
        let usage = &answer["usage"];
        Ok(Response::new(pb::InferReply {
            id: answer["id"].as_str().unwrap_or_default().to_string(),
            model: answer["model"].as_str().unwrap_or_default().to_string(),
            text: text(&answer),
            finish_reason: answer["choices"][0]["finish_reason"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            usage: Some(pb::Usage {
                prompt_tokens: usage["prompt_tokens"].as_u64().unwrap_or(0),
                completion_tokens: usage["completion_tokens"].as_u64().unwrap_or(0),
                total_tokens: usage["total_tokens"].as_u64().unwrap_or(0),
            }),
            replica,
        }))
    }

    type InferStreamStream = ChunkStream;

    async fn infer_stream(
        &self,
        request: Request<pb::InferRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let call = self.authorized_call(&request)?;
        let Streaming { replica, chunks } =
            self.gateway.open_stream(&call).await.map_err(status)?;
        let stream = tokio_stream::wrappers::ReceiverStream::new(chunks).filter_map(move |item| {
            let out = match item {
                StreamItem::Chunk(v) => Some(Ok(pb::InferChunk {
                    text: chunk_text(&v).to_string(),
                    finish_reason: v["choices"][0]["finish_reason"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    replica: replica.clone(),
                })),
                // The channel closes right after.
                StreamItem::Done => None,
                StreamItem::Lost(m) | StreamItem::Failed(m) => Some(Err(Status::aborted(m))),
            };
            std::future::ready(out)
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(
            parse_grpc_timeout("1500m"),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        for bad in ["", "m", "12x", "-1S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad}");
        }
    }

    #[test]
    fn malformed_requests_name_the_field() {
        let msg =
            |r: pb::InferRequest| to_call(&Request::new(r)).unwrap_err().message().to_string();
        assert!(msg(pb::InferRequest::default()).contains("model is empty"));
        let base = pb::InferRequest {
            model: "m".into(),
            ..Default::default()
        };
        assert!(msg(base.clone()).contains("neither messages"));
        let bad_role = pb::InferRequest {
            messages: vec![pb::ChatMessage {
                role: "robot".into(),
                content: "hi".into(),
            }],
            ..base.clone()
        };
        assert!(msg(bad_role).contains("messages[0].role"));
        let hot = pb::InferRequest {
            prompt: "x".into(),
            temperature: Some(7.0),
            ..base.clone()
        };
        assert!(msg(hot).contains("temperature is 7"));
        let ok = to_call(&Request::new(pb::InferRequest {
            prompt: "x".into(),
            max_tokens: 5,
            ..base
        }))
        .unwrap();
        assert_eq!(ok.path, "/completions");
        assert_eq!(ok.body["max_tokens"], 5);
    }
}
