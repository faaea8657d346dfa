//! The decoder on a random Llama the test writes itself: a pipeline split
//! computes what the whole model does, batching does not change a
//! sequence's logits, and bad weights are refused naming the tensor.

use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::Dtype;

use crate::kv::SeqCache;
use crate::model::{Chunk, Model};
use crate::sampling::argmax;

const LAYERS: usize = 4;
const HIDDEN: usize = 32;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const INTER: usize = 48;
const VOCAB: usize = 50;

fn shapes() -> Vec<(String, Vec<usize>)> {
    let hd = HIDDEN / HEADS;
    let mut t = vec![
        ("model.embed_tokens.weight".to_string(), vec![VOCAB, HIDDEN]),
        ("model.norm.weight".to_string(), vec![HIDDEN]),
        ("lm_head.weight".to_string(), vec![VOCAB, HIDDEN]),
    ];
    for i in 0..LAYERS {
        let p = format!("model.layers.{i}");
        for (name, shape) in [
            ("input_layernorm.weight", vec![HIDDEN]),
            ("post_attention_layernorm.weight", vec![HIDDEN]),
            ("self_attn.q_proj.weight", vec![HEADS * hd, HIDDEN]),
            ("self_attn.k_proj.weight", vec![KV_HEADS * hd, HIDDEN]),
            ("self_attn.v_proj.weight", vec![KV_HEADS * hd, HIDDEN]),
            ("self_attn.o_proj.weight", vec![HIDDEN, HEADS * hd]),
            ("mlp.gate_proj.weight", vec![INTER, HIDDEN]),
            ("mlp.up_proj.weight", vec![INTER, HIDDEN]),
            ("mlp.down_proj.weight", vec![HIDDEN, INTER]),
        ] {
            t.push((format!("{p}.{name}"), shape));
        }
    }
    t
}

/// Writes a random FP16 Llama into `dir`, leaving out `skip` and giving
/// `reshape` a wrong shape.
fn write_model(dir: &Path, skip: Option<&str>, reshape: Option<&str>) {
    let config = serde_json::json!({
        "model_type": "llama", "hidden_size": HIDDEN, "intermediate_size": INTER,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "hidden_act": "silu"
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let mut data = Vec::new();
    for (name, mut shape) in shapes() {
        if Some(name.as_str()) == skip {
            continue;
        }
        if Some(name.as_str()) == reshape {
            shape[0] += 1;
        }
        let n: usize = shape.iter().product();
        let bytes: Vec<u8> = (0..n)
            .flat_map(|_| {
                let v = if name.contains("norm") {
                    1.0 + next()
                } else {
                    next() * 0.6
                };
                half::f16::from_f32(v).to_le_bytes()
            })
            .collect();
        data.push((name, shape, bytes));
    }
    let views: Vec<(String, TensorView<'_>)> = data
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                TensorView::new(Dtype::F16, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}

/// Greedy tokens from `prompt`, through `stages` in order, hidden states
/// crossing each boundary as bytes (as they cross between agents).
fn greedy(stages: &[Model], prompt: &[u32], steps: usize) -> Vec<u32> {
    let mut caches: Vec<_> = stages.iter().map(|m| m.kv_cache(1 << 20)).collect();
    let mut seqs: Vec<SeqCache> = stages.iter().map(|_| SeqCache::default()).collect();
    for (kv, s) in caches.iter_mut().zip(&mut seqs) {
        kv.reserve(s, prompt.len() + steps).unwrap();
    }
    let mut out = Vec::new();
    let mut input = prompt.to_vec();
    for _ in 0..steps {
        let mut hidden = stages[0].embed(&input).unwrap();
        for ((m, kv), s) in stages.iter().zip(&mut caches).zip(&mut seqs) {
            let bytes: Vec<u8> = hidden.iter().flat_map(|v| v.to_le_bytes()).collect();
            hidden = bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            let chunk = Chunk {
                cache: s,
                start: s.len,
                len: input.len(),
            };
            m.forward(&mut hidden, &[chunk], kv);
            s.len += input.len();
        }
        let last = stages.last().unwrap();
        let logits = last.logits(&hidden, &[input.len() - 1]).unwrap();
        let id = argmax(&logits);
        out.push(id);
        input = vec![id];
    }
    out
}

#[test]
fn a_two_stage_split_decodes_what_the_whole_model_does() {
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path(), None, None);
    let whole = Model::load(dir.path()).unwrap();
    let config = whole.config.clone();
    let first = Model::load_layers(dir.path(), config.clone(), 0..1).unwrap();
    let second = Model::load_layers(dir.path(), config, 1..LAYERS).unwrap();
    assert!(first.is_first() && !first.is_last() && second.is_last());
    let prompt = [3, 14, 15, 9, 26, 5];
    let a = greedy(&[whole], &prompt, 24);
    let b = greedy(&[first, second], &prompt, 24);
    assert_eq!(a, b);
    assert!(
        a.iter().collect::<std::collections::HashSet<_>>().len() > 1,
        "{a:?}"
    );
}

#[test]
fn batching_does_not_change_a_sequences_logits() {
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path(), None, None);
    let m = Model::load(dir.path()).unwrap();
    let mut kv = m.kv_cache(1 << 20);
    let (p1, p2) = ([1u32, 2, 3, 4, 5], [7u32, 8, 9]);
    let alone = |prompt: &[u32]| {
        let mut kv = m.kv_cache(1 << 20);
        let mut s = SeqCache::default();
        kv.reserve(&mut s, prompt.len()).unwrap();
        let mut h = m.embed(prompt).unwrap();
        m.forward(
            &mut h,
            &[Chunk {
                cache: &s,
                start: 0,
                len: prompt.len(),
            }],
            &mut kv,
        );
        m.logits(&h, &[prompt.len() - 1]).unwrap()
    };
    let (mut s1, mut s2) = (SeqCache::default(), SeqCache::default());
    kv.reserve(&mut s1, 8).unwrap();
    kv.reserve(&mut s2, 8).unwrap();
    let mut h = m.embed(&[&p1[..], &p2[..]].concat()).unwrap();
    let chunks = [
        Chunk {
            cache: &s1,
            start: 0,
            len: p1.len(),
        },
        Chunk {
            cache: &s2,
            start: 0,
            len: p2.len(),
        },
    ];
    m.forward(&mut h, &chunks, &mut kv);
    let both = m
        .logits(&h, &[p1.len() - 1, p1.len() + p2.len() - 1])
        .unwrap();
    let close = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .all(|(x, y)| (x - y).abs() <= 1e-4 * (1.0 + y.abs()))
    };
    assert!(close(&both[..VOCAB], &alone(&p1)));
    assert!(close(&both[VOCAB..], &alone(&p2)));
}

#[test]
fn bad_weights_are_refused_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path(), Some("model.layers.2.mlp.up_proj.weight"), None);
    let err = Model::load(dir.path()).err().unwrap().to_string();
    assert!(
        err.contains("tensor model.layers.2.mlp.up_proj.weight is missing"),
        "{err}"
    );
    // a stage without layer 2 does not need it
    let config = crate::config::ModelConfig::load(dir.path()).unwrap();
    Model::load_layers(dir.path(), config, 0..2).unwrap();

    write_model(
        dir.path(),
        None,
        Some("model.layers.1.self_attn.k_proj.weight"),
    );
    let err = Model::load(dir.path()).err().unwrap().to_string();
    assert!(
        err.contains("tensor model.layers.1.self_attn.k_proj.weight has shape [17, 32]")
            && err.contains("needs [16, 32]"),
        "{err}"
    );

    write_model(dir.path(), None, None);
    let file = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() - 100]).unwrap();
    let err = Model::load(dir.path()).err().unwrap().to_string();
    assert!(
        err.contains("tensor ") && err.contains("truncated"),
        "{err}"
    );

    std::fs::remove_file(&file).unwrap();
    let err = Model::load(dir.path()).err().unwrap().to_string();
    assert!(err.contains("neither model.safetensors"), "{err}");
}

/// The step-message fuzz target's seeds and regressions
/// (`fuzz/corpus/step_msg`, `fuzz/regressions/step_msg`) decode without a
/// panic, and what decodes encodes back to the same bytes, as the target
/// checks (`TALON_WRITE_SEEDS=1` rewrites the seed).
#[test]
fn step_message_fuzz_inputs_decode_cleanly() {
    use crate::stage::{StepChunk, StepMsg};
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let seed = StepMsg {
        chunks: vec![
            StepChunk {
                seq: 7,
                start: 0,
                len: 2,
            },
            StepChunk {
                seq: 9,
                start: 5,
                len: 1,
            },
        ],
        released: vec![3],
        hidden: (0..3 * 64).map(|i| i as f32 * 0.25).collect(),
    };
    if std::env::var_os("TALON_WRITE_SEEDS").is_some() {
        let dir = root.join("corpus/step_msg");
        std::fs::create_dir_all(&dir).expect("corpus directory");
        std::fs::write(dir.join("seed-0"), seed.encode()).expect("seed written");
    }
    let mut inputs = vec![seed.encode()];
    for dir in ["corpus/step_msg", "regressions/step_msg"] {
        if let Ok(files) = std::fs::read_dir(root.join(dir)) {
            inputs.extend(
                files
                    .flatten()
                    .map(|f| std::fs::read(f.path()).expect("input")),
            );
        }
    }
    for input in inputs {
        if let Ok(step) = StepMsg::decode(&input, 64, 4096) {
            assert_eq!(step.encode(), input, "a decoded step encodes differently");
        }
    }
}
