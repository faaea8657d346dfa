//! The storage format: golden directories of every older format migrate
//! and read back the same state (records through the envelope and the
//! store: `record_tests`).

use std::sync::Arc;

use openraft::storage::{RaftLogReader, RaftLogStorage, RaftStateMachine};
use openraft::EntryPayload;

use super::{codec, DataDir, LogStore, StateMachineStore, FORMAT_VERSION};
use crate::metrics::Metrics;
use crate::state::*;

const GOLDEN_DIR: &str = include_str!("golden/format-v1-datadir.json");
const GOLDEN_STATE: &str = include_str!("golden/format-v1-state.json");
const GOLDEN_V2_DIR: &str = include_str!("golden/format-v2-datadir.json");
const GOLDEN_V3_DIR: &str = include_str!("golden/format-v3-datadir.json");
const GOLDEN_V4_DIR: &str = include_str!("golden/format-v4-datadir.json");
const GOLDEN_V5_DIR: &str = include_str!("golden/format-v5-datadir.json");
const GOLDEN_V6_DIR: &str = include_str!("golden/format-v6-datadir.json");

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// A format-1 data directory with the golden records, as an older release
/// left it.
fn golden_v1_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("talon-coordinator.json"),
        r#"{"kind":"talon-coordinator-data","format_version":1,"node_id":1}"#,
    )
    .unwrap();
    // no background flusher, and an open that waits out the lock a
    // database dropped just before may still hold (`open_db`)
    let db = super::open_db(&dir.path().join("db"), None).unwrap();
    let trees: serde_json::Value = serde_json::from_str(GOLDEN_DIR).unwrap();
    for (name, rows) in trees.as_object().unwrap() {
        let tree = db.open_tree(name).unwrap();
        for row in rows.as_array().unwrap() {
            let key = unhex(row[0].as_str().unwrap());
            tree.insert(key, row[1].as_str().unwrap().as_bytes())
                .unwrap();
        }
    }
    db.flush().unwrap();
    dir
}

/// A format-2 data directory as the release that wrote format 2 left it:
/// the golden format-1 directory migrated by that release, dumped byte for
/// byte.
fn golden_v2_dir() -> tempfile::TempDir {
    golden_dump_dir(2, GOLDEN_V2_DIR)
}

/// The same for format 3.
fn golden_v3_dir() -> tempfile::TempDir {
    golden_dump_dir(3, GOLDEN_V3_DIR)
}

/// The same for format 4 (the state without tenancy).
fn golden_v4_dir() -> tempfile::TempDir {
    golden_dump_dir(4, GOLDEN_V4_DIR)
}

/// The same for format 5 (the state without the chain).
fn golden_v5_dir() -> tempfile::TempDir {
    golden_dump_dir(5, GOLDEN_V5_DIR)
}

/// The same for format 6 (audit entries keyed by log index).
fn golden_v6_dir() -> tempfile::TempDir {
    golden_dump_dir(6, GOLDEN_V6_DIR)
}

fn golden_dump_dir(format: u32, dump: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("talon-coordinator.json"),
        format!(r#"{{"kind":"talon-coordinator-data","format_version":{format},"node_id":1}}"#),
    )
    .unwrap();
    // no background flusher, and an open that waits out the lock a
    // database dropped just before may still hold (`open_db`)
    let db = super::open_db(&dir.path().join("db"), None).unwrap();
    let trees: serde_json::Value = serde_json::from_str(dump).unwrap();
    for (name, rows) in trees.as_object().unwrap() {
        let tree = db.open_tree(name).unwrap();
        for row in rows.as_array().unwrap() {
            let key = unhex(row[0].as_str().unwrap());
            tree.insert(key, unhex(row[1].as_str().unwrap())).unwrap();
        }
    }
    db.flush().unwrap();
    dir
}

#[tokio::test]
async fn format_1_directory_migrates_and_reads_the_same() {
    reads_the_golden_state(golden_v1_dir()).await;
}

#[tokio::test]
async fn format_2_directory_migrates_and_reads_the_same() {
    let dir = golden_v2_dir();
    refuses_its_replicas(&dir);
    reads_the_golden_state(dir).await;
}

#[tokio::test]
async fn format_3_directory_migrates_and_reads_the_same() {
    let dir = golden_v3_dir();
    refuses_its_replicas(&dir);
    reads_the_golden_state(dir).await;
}

#[tokio::test]
async fn format_4_directory_migrates_and_reads_the_same() {
    let dir = golden_v4_dir();
    refuses_its_snapshot(&dir, |d| {
        codec::decode_format_4::<super::Applied>(d).is_ok()
    });
    reads_the_golden_state(dir).await;
}

#[tokio::test]
async fn format_5_directory_migrates_and_reads_the_same() {
    let dir = golden_v5_dir();
    refuses_its_snapshot(&dir, |d| {
        codec::decode_format_5::<super::Applied>(d).is_ok()
    });
    reads_the_golden_state(dir).await;
}

#[tokio::test]
async fn format_6_directory_migrates_and_reads_the_same() {
    reads_the_golden_state(golden_v6_dir()).await;
}

/// Format 6 kept an audit entry under its log index; format 7 under
/// index × 1024 (+ its position in a batch). Moving them must not let one
/// land on another's old key and be lost: index 1 moves to 1024, where
/// index 1024 was.
#[tokio::test]
async fn format_6_audit_entries_move_to_their_keys_without_overwriting_each_other() {
    let dir = golden_v6_dir();
    let entry = |index: u64| AuditEntry {
        index,
        at_ms: index,
        actor: "a".into(),
        action: "x".into(),
        target: "t".into(),
        detail: String::new(),
    };
    {
        let db = super::open_db(&dir.path().join("db"), None).unwrap();
        let sm = db.open_tree("sm").unwrap();
        for index in [1u64, 1024, 1024 * 1024] {
            let mut key = b"audit/".to_vec();
            key.extend_from_slice(&index.to_be_bytes());
            sm.insert(key, codec::encode_format_6(&entry(index)).unwrap())
                .unwrap();
        }
        db.flush().unwrap();
    }
    let data = DataDir::open(dir.path(), 1).unwrap();
    let sm = StateMachineStore::open(data, Arc::new(Metrics::new())).unwrap();
    let applied = sm.shared();
    let applied = applied.read().unwrap();
    for index in [1u64, 1024, 1024 * 1024] {
        assert_eq!(
            applied.state.audit.get(&first_audit_key(index)),
            Some(&entry(index)),
            "index {index}"
        );
    }
    applied.state.check_consistency().unwrap();
}

/// An old directory's snapshot does not decode as the current format (the
/// state grew) but does as its own (`reads_as_its_own`).
fn refuses_its_snapshot(dir: &tempfile::TempDir, reads_as_its_own: impl Fn(&[u8]) -> bool) {
    // no background flusher, and an open that waits out the lock a
    // database dropped just before may still hold (`open_db`)
    let db = super::open_db(&dir.path().join("db"), None).unwrap();
    let data = db
        .open_tree("snapshot")
        .unwrap()
        .get("current/data")
        .unwrap()
        .unwrap();
    assert!(codec::decode::<super::Applied>(&data).is_err());
    assert!(reads_as_its_own(&data));
}

/// A format-5 directory's tenants, key policies and usage rows are
/// rewritten in the current envelope and read back the same.
#[tokio::test]
async fn format_5_tenancy_records_migrate() {
    let dir = golden_v5_dir();
    let tenant = Tenant {
        name: "acme".into(),
        models: vec!["llama".into()],
        limits: Limits {
            requests_per_minute: Some(60),
            ..Default::default()
        },
        created_at_ms: 5,
        revision: 14,
        mask_pii: true,
        cache_ttl_s: 30,
        filters: vec![ContentFilter {
            pattern: "secret".into(),
            action: FilterAction::Mask,
        }],
    };
    let policy = KeyPolicy {
        tenant: "acme".into(),
        name: "web".into(),
        models: vec![],
        max_priority: Priority::High,
        limits: Limits::default(),
        revision: 15,
    };
    let row = (
        UsageKey {
            day: 20_789,
            tenant: "acme".into(),
            key: "web".into(),
            model: "llama".into(),
        },
        Usage {
            requests: 3,
            prompt_tokens: 30,
            completion_tokens: 12,
            gpu_seconds: 0.5,
            cost_usd: 0.001,
        },
    );
    {
        let db = super::open_db(&dir.path().join("db"), None).unwrap();
        let sm = db.open_tree("sm").unwrap();
        sm.insert("tenant/acme", codec::encode_format_5(&tenant).unwrap())
            .unwrap();
        sm.insert("key/k1", codec::encode_format_5(&policy).unwrap())
            .unwrap();
        sm.insert("usage/x", codec::encode_format_5(&row).unwrap())
            .unwrap();
        db.flush().unwrap();
    }
    let data = DataDir::open(dir.path(), 1).unwrap();
    let sm = StateMachineStore::open(data, Arc::new(Metrics::new())).unwrap();
    let applied = sm.shared();
    let applied = applied.read().unwrap();
    assert_eq!(applied.state.tenancy.tenants.get("acme"), Some(&tenant));
    assert_eq!(applied.state.tenancy.keys.get("k1"), Some(&policy));
    assert_eq!(applied.state.tenancy.usage.get(&row.0), Some(&row.1));
    assert!(applied.state.chain.is_empty());
}

/// An old directory's replicas do not decode as the current format (the
/// replica layout grew): the migration is needed.
fn refuses_its_replicas(dir: &tempfile::TempDir) {
    let data = super::open_db(&dir.path().join("db"), None).unwrap();
    let replica = data
        .open_tree("sm")
        .unwrap()
        .scan_prefix("replica/")
        .next()
        .unwrap()
        .unwrap()
        .1;
    assert!(codec::decode::<Replica>(&replica).is_err());
}

/// Opens an old golden directory (migrating it) twice and checks that it
/// holds the golden state, log, vote and snapshot, all in the current
/// envelope; one-GPU replicas read with their GPU list.
async fn reads_the_golden_state(dir: tempfile::TempDir) {
    let mut expected: State = serde_json::from_str(GOLDEN_STATE).unwrap();
    // the golden state lists audit entries by log index; format 7 keeps
    // them by index and position
    expected.audit = std::mem::take(&mut expected.audit)
        .into_values()
        .map(|a| (first_audit_key(a.index), a))
        .collect();
    for round in 0..2 {
        // The second round opens the migrated directory again: nothing to do.
        let data = DataDir::open(dir.path(), 1).unwrap();
        let marker = std::fs::read_to_string(dir.path().join("talon-coordinator.json")).unwrap();
        assert!(
            marker.contains(&format!("\"format_version\": {FORMAT_VERSION}")),
            "{marker}"
        );
        // since format 7 the state machine and the snapshot have their own
        // database, and the log's has none of it
        let in_db: Vec<_> = data.db.tree_names();
        assert!(
            !in_db
                .iter()
                .any(|n| n.as_ref() == b"sm" || n.as_ref() == b"snapshot"),
            "{in_db:?}"
        );
        let mut sm = StateMachineStore::open(data.clone(), Arc::new(Metrics::new())).unwrap();
        {
            let applied = sm.shared();
            let applied = applied.read().unwrap();
            assert_eq!(applied.state, expected, "round {round}");
            assert_eq!(applied.last_applied.map(|l| l.index), Some(13));
            assert_eq!(
                applied
                    .membership
                    .membership()
                    .voter_ids()
                    .collect::<Vec<_>>(),
                vec![1]
            );
        }
        let mut log = LogStore::new(data.clone());
        let entries = log.try_get_log_entries(0..100).await.unwrap();
        assert_eq!(entries.len(), 13);
        assert!(matches!(entries[0].payload, EntryPayload::Blank));
        assert!(matches!(
            &entries[5].payload,
            EntryPayload::Normal(r) if matches!(&r.command, Command::RegisterNode(inv) if inv.gpus[0].calibration.as_ref().unwrap().hgemm_tflops == 700.25)
        ));
        assert_eq!(
            log.read_vote().await.unwrap(),
            Some(openraft::Vote::new_committed(2, 1))
        );
        assert_eq!(
            log.read_committed().await.unwrap().map(|l| l.index),
            Some(13)
        );
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_log_id.map(|l| l.index), Some(13));
        let snapshot = sm
            .get_current_snapshot()
            .await
            .unwrap()
            .expect("snapshot kept");
        let snap: super::Applied = codec::decode(snapshot.snapshot.get_ref()).unwrap();
        assert_eq!(snap.state, expected);
        assert!(entries.iter().any(|e| matches!(
            &e.payload,
            EntryPayload::Normal(r) if matches!(&r.command, Command::SetReplicas { replicas, .. } if replicas.iter().all(|x| x.gpus == vec![x.gpu]) && !replicas.is_empty())
        )));
        for tree in [&data.log, &data.sm, &data.snapshot] {
            for item in tree.iter() {
                let (_, v) = item.unwrap();
                assert_eq!(
                    codec::version_of(&v),
                    Some(codec::ENCODING_VERSION),
                    "a value left in an old format"
                );
            }
        }
    }
}

#[test]
fn a_newer_format_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(DataDir::open(dir.path(), 1).unwrap());
    std::fs::write(
        dir.path().join("talon-coordinator.json"),
        r#"{"kind":"talon-coordinator-data","format_version":9,"node_id":1}"#,
    )
    .unwrap();
    let err = DataDir::open(dir.path(), 1).err().unwrap().to_string();
    assert!(err.contains("format version 9"), "{err}");
}

/// Writes the golden format-1 directory, migrated by this build, as a dump
/// (`golden_dump_dir` reads it back): the fixture of this format for the
/// release after it. `cargo test -p talon-coordinator --lib
/// dump_golden_current -- --ignored` writes `golden-current.json` in the
/// system's temporary directory.
#[test]
#[ignore]
fn dump_golden_current() {
    let dir = golden_v1_dir();
    drop(DataDir::open(dir.path(), 1).unwrap());
    // no background flusher, and an open that waits out the lock a
    // database dropped just before may still hold (`open_db`)
    let open = |name: &str| super::open_db(&dir.path().join(name), None).unwrap();
    // since format 7 the state machine and the snapshot have their own
    // database; the dump lists every tree by name as before
    let (db, state) = (open("db"), open("state"));
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let mut out = serde_json::Map::new();
    for (name, db) in [
        ("log", &db),
        ("meta", &db),
        ("sm", &state),
        ("snapshot", &state),
    ] {
        let tree = db.open_tree(name).unwrap();
        let rows: Vec<serde_json::Value> = tree
            .iter()
            .map(|i| {
                let (k, v) = i.unwrap();
                serde_json::json!([hex(&k), hex(&v)])
            })
            .collect();
        out.insert(name.into(), rows.into());
    }
    std::fs::write(
        std::env::temp_dir().join("golden-current.json"),
        serde_json::to_string_pretty(&out).unwrap(),
    )
    .unwrap();
}
