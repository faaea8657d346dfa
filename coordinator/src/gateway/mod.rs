//! The inference gateway, served by every coordinator. It never waits on
//! Raft: models and replica placements come from the local applied state,
//! replica readiness and load from the leader's telemetry (a follower,
//! which has none, tries every placed replica, least loaded first).
//!
//! Three front ends share one core ([`Gateway::complete`] and
//! [`Gateway::open_stream`]):
//! - OpenAI-compatible HTTP beside `/metrics`: `GET /v1/models`,
//!   `POST /v1/chat/completions` and `/v1/completions` (`"stream": true`
//!   gives server-sent events, token by token as the replica produces
//!   them), `/v1/embeddings`;
//! - the gRPC `Inference` service ([`grpc`]);
//! - a WebSocket at `/v1/stream` ([`websocket`]).
//!
//! Routing: replicas are tried in order of predicted completion time
//! ([`routing`]). A request that names a deadline
//! (`x-talon-deadline-ms`) no replica is predicted to meet is refused at
//! once with 429. A replica whose queue is full for the request's priority
//! answers 429 and the next one is tried; when all are full the gateway
//! answers 429 with the soonest `Retry-After`. A non-streaming request is
//! retried on the next replica when one cannot be reached or fails; when
//! every replica was reached and failed it, the answer is 502 at once; when
//! none is ready or reachable (a node was lost and its replicas are moving)
//! it waits for one until its deadline (else 30 s), then answers 503 with
//! `Retry-After`. Agents get the time left, not the time given.
//! A stream is retried likewise until its first chunk; once chunks have
//! gone out, losing the replica ends the stream with an error naming the
//! replica and its node (a stream cannot be resumed elsewhere).

mod admission;
mod attempt;
pub mod auth;
mod breaker;
mod cache;
mod call;
mod canary;
pub mod chain;
mod core;
mod cost;
mod fallback;
pub mod filter;
pub mod grpc;
pub mod keys;
pub mod limits;
pub mod mask;
mod openai;
pub mod prefixes;
pub mod queue;
mod relay;
pub mod routing;
mod stream;
pub mod websocket;

pub use self::admission::estimate_prompt_tokens;
pub use self::core::{Call, Gateway, GwError, StreamItem, Streaming};
pub use self::cost::replica_price;
pub use openai::{check_body, MAX_OUTPUT_TOKENS};
pub use stream::chunk_text;
