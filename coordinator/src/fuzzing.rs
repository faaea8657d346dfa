//! Entry points for the fuzzers (`fuzz/`, cargo-fuzz): one per input
//! surface of the coordinator, each taking arbitrary bytes the way that
//! surface receives them and running what the coordinator runs on them
//! before anything else sees them. A panic, a hang or a broken invariant is
//! a finding. Built with the `fuzzing` feature, and in tests, which replay
//! the committed seeds (`fuzz/corpus/`) and every regression input.

use std::path::Path;

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use prost::Message;
use serde_json::Value;
use talon_proto::v1 as pb;

use crate::raft_types::{Entry, LogId, NodeId, SnapshotMeta, StoredMembership, TypeConfig, Vote};
use crate::state::{self, Request, Response, State};
use crate::store::{codec, Applied};

/// The surfaces, by the name of their fuzz target.
pub const TARGETS: &[(&str, fn(&[u8]))] = &[
    ("raft_rpc", raft_rpc),
    ("store_records", store_records),
    ("state_apply", state_apply),
    ("openai_http", openai_http),
    ("websocket_message", websocket_message),
    ("grpc_requests", grpc_requests),
    ("config_file", config_file),
    ("store_migration", store_migration),
];

/// What a coordinator's Raft service decodes from a peer (and a peer's
/// answers, which the sender decodes): the binary envelope of each RPC.
pub fn raft_rpc(data: &[u8]) {
    let _ = codec::decode::<AppendEntriesRequest<TypeConfig>>(data);
    let _ = codec::decode::<VoteRequest<NodeId>>(data);
    let _ = codec::decode::<InstallSnapshotRequest<TypeConfig>>(data);
    let _ = codec::decode::<Result<AppendEntriesResponse<NodeId>, String>>(data);
    let _ = codec::decode::<Result<VoteResponse<NodeId>, String>>(data);
    let _ = codec::decode::<Result<InstallSnapshotResponse<NodeId>, String>>(data);
    let _ = codec::decode::<crate::quota::QuotaRequest>(data);
    let _ = codec::decode::<Result<crate::quota::QuotaReply, String>>(data);
    let _ = codec::decode::<Result<usize, String>>(data);
    let _ = codec::decode::<crate::autoscale::carry::HistoryRequest>(data);
    if let Ok(Ok(page)) =
        codec::decode::<Result<crate::autoscale::carry::HistoryPage, String>>(data)
    {
        // what a follower does with the leader's page: checked, kept
        let _ = crate::autoscale::Autoscale::default().inherit(page);
    }
    if let Ok(report) = codec::decode::<crate::autoscale::demand::DemandReport>(data) {
        // what the leader does with it: validated, kept, taken, summed
        let demand = crate::autoscale::demand::ClusterDemand::default();
        if demand.report(report.clone(), |_| true, 1_000_000).is_ok() {
            for p in &report.points {
                let _ = demand.take(&p.model, u64::MAX);
                let _ = demand.window(&p.model, 0, u64::MAX);
            }
        }
    }
}

/// What a coordinator reads back from its data directory: log entries, the
/// vote and purge point, every kind of state record, snapshots, and the
/// marker file.
pub fn store_records(data: &[u8]) {
    let _ = codec::decode::<Entry>(data);
    let _ = codec::decode::<Vote>(data);
    let _ = codec::decode::<Option<LogId>>(data);
    let _ = codec::decode::<StoredMembership>(data);
    let _ = codec::decode::<state::Model>(data);
    let _ = codec::decode::<state::NodeRecord>(data);
    let _ = codec::decode::<state::Replica>(data);
    let _ = codec::decode::<state::Credential>(data);
    let _ = codec::decode::<state::Tenant>(data);
    let _ = codec::decode::<state::AuditEntry>(data);
    let _ = codec::decode::<state::chain::Rule>(data);
    let _ = codec::decode::<(state::UsageKey, state::Usage)>(data);
    let _ = codec::decode::<[u8; 32]>(data);
    let _ = codec::decode::<SnapshotMeta>(data);
    if let Ok(applied) = codec::decode::<Applied>(data) {
        // A snapshot is installed whole: what it holds must be a state the
        // checks accept, or it is refused — never half-used.
        let _ = applied.state.check_consistency();
    }
    let _ = crate::store::check_marker(data, Path::new("/fuzz"), 1);
}

/// What the migration reads from an older release's data directory: the
/// first byte picks the record's tree and key, the second the older
/// format (JSON, envelope versions 1 to 5), the rest is the value.
pub fn store_migration(data: &[u8]) {
    let [tree, old, value @ ..] = data else {
        return;
    };
    crate::store::fuzz_migrate_value(*tree, *old, value);
}

/// What a follower applies: any sequence of decodable requests, as a
/// leader (or a forged leader) could replicate them. Every request is
/// applied or refused with the state unchanged, and the state stays
/// consistent either way.
pub fn state_apply(data: &[u8]) {
    let Ok(requests) = postcard::from_bytes::<Vec<Request>>(data) else {
        return;
    };
    let mut state = State::default();
    for (i, request) in requests.iter().enumerate() {
        let before = state.clone();
        let (response, changes) = state.apply(i as u64 + 1, request);
        if let Response::Rejected(rejection) = &response {
            assert!(
                changes.is_empty() && state == before,
                "request {i} was refused ({rejection:?}) but changed the state: {request:?}"
            );
        }
        if let Err(e) = state.check_consistency() {
            panic!("request {i} left the state inconsistent ({e}): {request:?}");
        }
    }
}

/// An OpenAI HTTP request: the first byte picks the path, then `name:
/// value` header lines up to an empty line, then the body.
pub fn openai_http(data: &[u8]) {
    const PATHS: [&str; 3] = ["/chat/completions", "/completions", "/embeddings"];
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let path = PATHS[first as usize % PATHS.len()];
    let split = rest
        .windows(2)
        .position(|w| w == b"\n\n")
        .unwrap_or(rest.len());
    let (head, body) = (&rest[..split], rest.get(split + 2..).unwrap_or(&[]));
    let mut headers = HeaderMap::new();
    for line in head.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        // What hyper would refuse never reaches the gateway.
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) {
            headers.append(name, value);
        }
    }
    let Ok(body) = serde_json::from_slice::<Value>(body) else {
        return;
    };
    if crate::gateway::check_body(path, &body).is_err() {
        return;
    }
    let call = crate::gateway::Call::from_http(path, &headers, body);
    let _ = crate::gateway::estimate_prompt_tokens(&call.body);
    let _ = call.header("x-talon-priority");
}

/// One text message on the gateway's WebSocket.
pub fn websocket_message(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(call) = crate::gateway::websocket::call(text) {
            let _ = crate::gateway::estimate_prompt_tokens(&call.body);
        }
    }
}

/// Every gRPC request type the coordinator serves (admin, agent,
/// inference), as prost decodes it, and the checks its handler runs
/// before anything else: the first byte picks the type.
pub fn grpc_requests(data: &[u8]) {
    let Some((&first, bytes)) = data.split_first() else {
        return;
    };
    macro_rules! decode {
        ($($t:ty),* $(,)?) => {{
            let decoders: &[fn(&[u8])] = &[$(|b| { let _ = <$t>::decode(b); }),*];
            decoders
        }};
    }
    let plain = decode!(
        pb::ClusterInitRequest,
        pb::ClusterJoinRequest,
        pb::ClusterRemoveRequest,
        pb::ClusterStatusRequest,
        pb::GetModelRequest,
        pb::ListModelsRequest,
        pb::DeleteModelRequest,
        pb::ListAuditRequest,
        pb::ListNodesRequest,
        pb::GetNodeRequest,
        pb::SetNodeSchedulingRequest,
        pb::FleetStatsRequest,
        pb::ListReplicasRequest,
        pb::SetFaultsRequest,
        pb::CreateCredentialRequest,
        pb::ListCredentialsRequest,
        pb::RevokeCredentialRequest,
        pb::WhoAmIRequest,
        pb::RemoveNodeRequest,
        pb::PutTenantRequest,
        pb::ListTenantsRequest,
        pb::DeleteTenantRequest,
        pb::CreateKeyRequest,
        pb::ListKeysRequest,
        pb::UpdateKeyRequest,
        pb::RotateKeyRequest,
        pb::GetUsageRequest,
        pb::PutRuleRequest,
        pb::ListChainRequest,
        pb::DeleteRuleRequest,
        pb::JoinRequest,
        pb::WatchAssignmentsRequest,
        pb::RaftPayload,
    );
    match first % 5 {
        0 => {
            if let Ok(r) = pb::CreateModelRequest::decode(bytes) {
                let _ = crate::convert::spec_from_wire(r.spec);
            }
        }
        1 => {
            if let Ok(r) = pb::RegisterRequest::decode(bytes) {
                let _ = crate::convert::inventory_from_wire(r.inventory);
            }
        }
        2 => {
            if let Ok(r) = pb::TelemetryReport::decode(bytes) {
                if crate::agents::validate_report(&r).is_ok() {
                    let store = crate::telemetry::TelemetryStore::new(8);
                    store.record(r, std::time::Instant::now());
                }
            }
        }
        3 => {
            if let Ok(r) = pb::InferRequest::decode(bytes) {
                let _ = crate::gateway::grpc::to_call(&tonic::Request::new(r));
            }
        }
        _ => {
            if let Ok(r) = pb::UpdateModelLabelsRequest::decode(bytes) {
                let _ = state::model::validate_name(&r.name);
                let set = r.set.into_iter().collect();
                let _ = state::model::validate_labels(&set);
                let _ = state::model::validate_engine_options(&set);
            }
            for decode in plain {
                decode(bytes);
            }
        }
    }
}

/// A coordinator's TOML config file, then its validation.
pub fn config_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = toml::from_str::<crate::config::Config>(text) {
        if config.validate().is_ok() {
            let _ = config.openraft();
        }
    }
}

/// Seed inputs: valid encodings of each surface's messages, from which the
/// fuzzers mutate (committed under `fuzz/corpus/<target>/seed-<n>`; the
/// replay test rewrites them there when `TALON_WRITE_SEEDS=1`).
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();
    let spec = state::ModelSpec {
        name: "m".into(),
        version: "v1".into(),
        engine: "vllm".into(),
        artifact_uri: "hf://org/model".into(),
        memory_mib: 1000,
        latency_slo_ms: 200,
        min_replicas: 1,
        max_replicas: 2,
        priority: "normal".into(),
        labels: Default::default(),
    };
    let request = |command| Request {
        at_ms: 1_000,
        actor: "seed".into(),
        command,
    };
    let requests = vec![
        request(state::Command::CreateModel(spec.clone())),
        request(state::Command::UpdateModelLabelsIf {
            name: "m".into(),
            set: [("a".to_string(), "1".to_string())].into(),
            remove: vec![],
            expect: Default::default(),
        }),
        request(state::Command::DeleteModel {
            name: "m".into(),
            version: None,
        }),
    ];
    if let Ok(b) = postcard::to_stdvec(&requests) {
        out.push(("state_apply", b));
    }
    // a group-committed entry: two label writes, the second refused
    let batch = vec![
        request(state::Command::CreateModel(spec.clone())),
        request(state::Command::Batch(vec![
            request(state::Command::UpdateModelLabels {
                name: "m".into(),
                set: [("a".to_string(), "1".to_string())].into(),
                remove: vec![],
            }),
            request(state::Command::UpdateModelLabelsIf {
                name: "m".into(),
                set: [("a".to_string(), "2".to_string())].into(),
                remove: vec![],
                expect: [("a".to_string(), "0".to_string())].into(),
            }),
        ])),
    ];
    if let Ok(b) = postcard::to_stdvec(&batch) {
        out.push(("state_apply", b));
    }
    // old values for the migration: a format-6 audit entry and model
    let audit = state::AuditEntry {
        index: 7,
        at_ms: 1_000,
        actor: "seed".into(),
        action: "model.labels".into(),
        target: "m".into(),
        detail: String::new(),
    };
    if let Ok(mut b) = codec::encode(&audit) {
        b[2] = codec::FORMAT_6_ENCODING;
        out.push(("store_migration", [vec![11, 5], b].concat()));
    }
    out.push((
        "store_migration",
        [vec![6, 0], br#"{"name":"m"}"#.to_vec()].concat(),
    ));
    let entry = Entry {
        log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(1, 1), 5),
        payload: openraft::EntryPayload::Normal(requests[0].clone()),
    };
    if let Ok(b) = codec::encode(&entry) {
        out.push(("store_records", b));
    }
    let append = AppendEntriesRequest::<TypeConfig> {
        vote: openraft::Vote::new(2, 1),
        prev_log_id: None,
        entries: vec![entry],
        leader_commit: None,
    };
    if let Ok(b) = codec::encode(&append) {
        out.push(("raft_rpc", b));
    }
    if let Ok(b) = codec::encode(&VoteRequest::<NodeId>::new(openraft::Vote::new(3, 2), None)) {
        out.push(("raft_rpc", b));
    }
    out.push((
        "store_records",
        br#"{"kind":"talon-coordinator","format_version":6,"node_id":1}"#.to_vec(),
    ));
    let chat = br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":8,"stream":true}"#;
    let mut http = vec![0u8];
    http.extend_from_slice(b"x-talon-priority: high\ncache-control: no-cache\n\n");
    http.extend_from_slice(chat);
    out.push(("openai_http", http));
    let mut completion = vec![1u8];
    completion.extend_from_slice(b"\n\n");
    completion.extend_from_slice(br#"{"model":"m","prompt":"once","temperature":0.5}"#);
    out.push(("openai_http", completion));
    out.push((
        "websocket_message",
        br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"priority":"low","deadline_ms":500}"#
            .to_vec(),
    ));
    let create = pb::CreateModelRequest {
        spec: Some(pb::ModelSpec {
            name: "m".into(),
            version: "v1".into(),
            engine: "vllm".into(),
            artifact_uri: "hf://org/model".into(),
            memory_mib: 1000,
            latency_slo_ms: 200,
            min_replicas: 1,
            max_replicas: 2,
            priority: "normal".into(),
            labels: Default::default(),
        }),
    };
    let mut grpc = vec![0u8];
    grpc.extend(create.encode_to_vec());
    out.push(("grpc_requests", grpc));
    let infer = pb::InferRequest {
        model: "m".into(),
        prompt: "hello".into(),
        max_tokens: 16,
        ..Default::default()
    };
    let mut grpc = vec![3u8];
    grpc.extend(infer.encode_to_vec());
    out.push(("grpc_requests", grpc));
    out.push((
        "config_file",
        b"node_id = 2\nlisten = \"127.0.0.1:7400\"\nheartbeat_ms = 50\nwrite_timeout_ms = 5000\n"
            .to_vec(),
    ));
    // a leader's page of forecast carries, as a follower decodes it
    let page: Result<crate::autoscale::carry::HistoryPage, String> =
        Ok(crate::autoscale::carry::HistoryPage {
            carries: vec![crate::autoscale::carry::Carry {
                model: "m".into(),
                bucket_s: 60.0,
                first_bucket: 28_333_333,
                counts: vec![3.0, 0.0, 7.5],
                taken_upto: 1_700_000_100,
                mix: vec![(120, 30), (800, 12)],
                trust: 0.9,
            }],
            more: true,
        });
    if let Ok(b) = codec::encode(&page) {
        out.push(("raft_rpc", b));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every seed, every committed corpus input and every regression
    /// input (`fuzz/regressions/<target>/`) runs through its target.
    #[test]
    fn seeds_corpus_and_regressions_run_clean() {
        let mut ran = 0;
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
        if std::env::var_os("TALON_WRITE_SEEDS").is_some() {
            for (n, (target, bytes)) in seeds().into_iter().enumerate() {
                let dir = root.join("corpus").join(target);
                std::fs::create_dir_all(&dir).expect("corpus directory");
                std::fs::write(dir.join(format!("seed-{n}")), bytes).expect("seed written");
            }
        }
        for (target, input) in seeds() {
            let run = TARGETS
                .iter()
                .find(|(name, _)| *name == target)
                .expect("a seed for a known target");
            (run.1)(&input);
            ran += 1;
        }
        for dir in ["corpus", "regressions"] {
            for (target, run) in TARGETS {
                let Ok(files) = std::fs::read_dir(root.join(dir).join(target)) else {
                    continue;
                };
                for file in files.flatten() {
                    let input = std::fs::read(file.path()).expect("readable input");
                    run(&input);
                    ran += 1;
                }
            }
        }
        assert!(ran >= seeds().len());
    }

    #[test]
    fn garbage_runs_clean_through_every_target() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for len in 0..300usize {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            for (_, run) in TARGETS {
                run(&bytes);
            }
        }
    }
}
