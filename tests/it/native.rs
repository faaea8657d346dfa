//! The native executor against Hugging Face `transformers` (PyTorch CPU,
//! from PyPI) on small models of real architectures with random weights:
//! the same tokens for the same text, the same chat rendering, logits
//! within 1e-3 relative, and 64 identical greedy tokens — from the decoder
//! alone, through the continuous-batching engine with other requests in
//! the same batches, and through a two-stage split.

use std::path::Path;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use serde_json::Value;
use talon_runtime::engine::{Engine, EngineSettings, Event, Finish};
use talon_runtime::kv::SeqCache;
use talon_runtime::model::{Chunk, Model};
use talon_runtime::sampling::{argmax, SamplingParams};
use talon_runtime::text::Text;

use crate::harness::{free_port, wait_for, Cluster, Proc};
use crate::placement::TOKEN;

/// The variants checked: (arguments to make_tiny_hf.py).
const VARIANTS: [&[&str]; 3] = [
    &[
        "--arch",
        "llama",
        "--dtype",
        "bf16",
        "--rope-scaling",
        "llama3",
    ],
    &["--arch", "qwen2", "--dtype", "f16"],
    &[
        "--arch",
        "llama",
        "--dtype",
        "f32",
        "--rope-scaling",
        "linear",
    ],
];

fn reference(dir: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// max |a − b| / max |b|: the error relative to the logits' scale.
fn relative_error(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let diff = a
        .iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
    diff / scale
}

/// Greedy tokens through `stages` with a KV cache, one token per step.
fn greedy(stages: &[Model], prompt: &[u32], steps: usize) -> Vec<u32> {
    let mut caches: Vec<_> = stages.iter().map(|m| m.kv_cache(8 << 20)).collect();
    let mut seqs: Vec<SeqCache> = stages.iter().map(|_| SeqCache::default()).collect();
    for (kv, s) in caches.iter_mut().zip(&mut seqs) {
        kv.reserve(s, prompt.len() + steps).unwrap();
    }
    let (mut out, mut input) = (Vec::new(), prompt.to_vec());
    for _ in 0..steps {
        let mut hidden = stages[0].embed(&input).unwrap();
        for ((m, kv), s) in stages.iter().zip(&mut caches).zip(&mut seqs) {
            let chunk = Chunk {
                cache: s,
                start: s.len,
                len: input.len(),
            };
            m.forward(&mut hidden, &[chunk], kv);
            s.len += input.len();
        }
        let id = argmax(
            &stages[stages.len() - 1]
                .logits(&hidden, &[input.len() - 1])
                .unwrap(),
        );
        out.push(id);
        input = vec![id];
    }
    out
}

#[test]
fn native_cpu_matches_transformers_logits_tokens_and_chat_template() {
    for args in VARIANTS {
        let dir = talon_tests::hf::model(args).unwrap();
        let r = reference(&dir);
        let model = Model::load(&dir).unwrap();
        let text = Text::load(&dir, &model.config.eos_token_ids).unwrap();
        let prompt = ids(&r["prompt_ids"]);
        assert_eq!(
            text.encode(r["prompt"].as_str().unwrap()).unwrap(),
            prompt,
            "{args:?}"
        );
        let chat = text.render_chat(&r["messages"]).unwrap();
        assert_eq!(chat, r["chat_text"].as_str().unwrap(), "{args:?}");
        assert_eq!(
            text.encode_rendered(&chat).unwrap(),
            ids(&r["chat_ids"]),
            "{args:?}"
        );

        // every prompt position's logits in one prefill
        let mut kv = model.kv_cache(8 << 20);
        let mut seq = SeqCache::default();
        kv.reserve(&mut seq, prompt.len()).unwrap();
        let mut hidden = model.embed(&prompt).unwrap();
        let chunk = Chunk {
            cache: &seq,
            start: 0,
            len: prompt.len(),
        };
        model.forward(&mut hidden, &[chunk], &mut kv);
        let rows: Vec<usize> = (0..prompt.len()).collect();
        let logits = model.logits(&hidden, &rows).unwrap();
        let vocab = model.config.vocab_size;
        let mut worst = 0.0f32;
        for (i, want) in r["logits_all"].as_array().unwrap().iter().enumerate() {
            worst = worst.max(relative_error(
                &logits[i * vocab..(i + 1) * vocab],
                &floats(want),
            ));
        }
        assert!(worst <= 1e-3, "{args:?}: logits differ by {worst} relative");

        let want = ids(&r["greedy"]);
        assert_eq!(
            greedy(&[model], &prompt, 64),
            want,
            "{args:?}: greedy tokens"
        );
        // a two-stage split: the same tokens
        let config = talon_runtime::config::ModelConfig::load(&dir).unwrap();
        let half = config.num_layers / 2;
        let stages = [
            Model::load_layers(&dir, config.clone(), 0..half).unwrap(),
            Model::load_layers(&dir, config.clone(), half..config.num_layers).unwrap(),
        ];
        assert_eq!(greedy(&stages, &prompt, 64), want, "{args:?}: two stages");
        eprintln!("{args:?}: logits within {worst:.2e}; 64 greedy tokens identical, whole and in two stages");
    }
}

/// Serves `prompt` on `engine`, answering its events.
fn submit(engine: &Engine, prompt: Vec<u32>, params: SamplingParams) -> mpsc::Receiver<Event> {
    let (tx, rx) = mpsc::channel();
    engine
        .submit(prompt, params, Box::new(move |e| tx.send(e).is_ok()))
        .unwrap();
    rx
}

fn finish(rx: &mpsc::Receiver<Event>) -> (Finish, String) {
    let mut streamed = String::new();
    loop {
        match rx
            .recv_timeout(Duration::from_secs(120))
            .expect("the engine answers")
        {
            Event::Token { text, .. } => streamed.push_str(&text),
            Event::Done(f) => return (f, streamed),
            Event::Failed(why) | Event::Lost(why) => panic!("request failed: {why}"),
        }
    }
}

#[test]
fn the_engine_batches_continuously_and_answers_each_request_as_alone() {
    let dir = talon_tests::hf::model(VARIANTS[0]).unwrap();
    let r = reference(&dir);
    let model = Model::load(&dir).unwrap();
    let text = Arc::new(Text::load(&dir, &[]).unwrap());
    let settings = EngineSettings {
        // 16 blocks of 16 positions (4 layers × K and V × 64 × f32): the
        // five requests below do not fit at once, and queue for blocks
        kv_bytes: 16 * (16 * 4 * 2 * 64 * 4),
        max_seqs: 8,
        max_prefill_tokens: 64,
    };
    let engine = Engine::start(model, text.clone(), settings).unwrap();
    let prompt = ids(&r["prompt_ids"]);
    let greedy = SamplingParams {
        temperature: 0.0,
        max_tokens: 64,
        ..Default::default()
    };
    // the reference request, with others of other lengths and sampling in
    // the same batches, and more than the cache holds at once
    let others: Vec<_> = (0..4)
        .map(|i| {
            let p = text.encode(&"the GPUs are warm ".repeat(i + 1)).unwrap();
            submit(
                &engine,
                p,
                SamplingParams {
                    temperature: 0.8,
                    top_p: 0.9,
                    seed: Some(i as u64),
                    max_tokens: 20 + 7 * i,
                    ..Default::default()
                },
            )
        })
        .collect();
    let main = submit(&engine, prompt.clone(), greedy.clone());
    let (f, streamed) = finish(&main);
    assert_eq!(
        f.tokens,
        ids(&r["greedy"]),
        "greedy tokens in a shared batch"
    );
    assert_eq!(f.reason, "length");
    assert_eq!(streamed, f.text, "the stream adds up to the answer");
    assert_eq!(f.text, r["greedy_text"].as_str().unwrap());
    let firsts: Vec<Finish> = others.iter().map(|rx| finish(rx).0).collect();
    for (i, f) in firsts.iter().enumerate() {
        assert_eq!(f.completion_tokens, 20 + 7 * i, "{f:?}");
    }
    // the same seed gives the same answer, batched differently
    let again = submit(
        &engine,
        text.encode("the GPUs are warm ").unwrap(),
        SamplingParams {
            temperature: 0.8,
            top_p: 0.9,
            seed: Some(0),
            max_tokens: 20,
            ..Default::default()
        },
    );
    assert_eq!(finish(&again).0.tokens, firsts[0].tokens);

    // a stop sequence ends the answer before it and is not in it
    let chars: Vec<char> = f.text.chars().collect();
    let cut: String = chars[chars.len() / 3..chars.len() / 3 + 3].iter().collect();
    let cut = cut.as_str();
    let stop = submit(
        &engine,
        prompt.clone(),
        SamplingParams {
            stop: vec![cut.to_string()],
            ..greedy.clone()
        },
    );
    let (s, streamed) = finish(&stop);
    assert_eq!(s.reason, "stop");
    assert_eq!(s.text, &f.text[..f.text.find(cut).unwrap()]);
    assert_eq!(streamed, s.text);

    let stats = engine.stats();
    assert!(
        stats.decode_steps > 0 && stats.prefill_tokens > 0,
        "{stats:?}"
    );
    // what the agent reports for routing: step times by batch size, and
    // the tokens answers take
    assert_eq!(stats.finished, 7, "{stats:?}");
    assert!(
        stats.decode_step(1).is_some() && stats.decode_step(4).is_some(),
        "{stats:?}"
    );
    assert!(
        stats.mean_completion_tokens().is_some_and(|t| t > 20.0),
        "{stats:?}"
    );
    assert_eq!(
        stats.free_blocks, stats.total_blocks,
        "every block came back: {stats:?}"
    );
    let err = engine
        .submit(vec![1; 400], greedy, Box::new(|_| true))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("shorten the prompt or lower max_tokens"),
        "{err}"
    );
}

/// A test model (made once, off the runtime's threads), its reference,
/// and a one-coordinator cluster that takes agents.
async fn model_and_cluster(args: &'static [&'static str]) -> (std::path::PathBuf, Value, Cluster) {
    let dir = tokio::task::spawn_blocking(move || talon_tests::hf::model(args))
        .await
        .expect("setup")
        .expect("model");
    let r = reference(&dir);
    let cluster = Cluster::form(
        1,
        &["--join-token", TOKEN, "--telemetry-interval-ms", "200"],
    )
    .await;
    (dir, r, cluster)
}

/// A `talon-agent --native` on one simulated L4, its HTTP on `listen`.
fn native_agent(grpc: &str, id: &str, listen: &str) -> Proc {
    Proc::spawn_with_env(
        "talon-agent",
        &[
            "--node-id",
            id,
            "--coordinators",
            grpc,
            "--sim-gpus",
            "l4:1",
            "--http-listen",
            listen,
            "--telemetry-interval-ms",
            "200",
            "--native",
        ],
        &[("TALON_JOIN_TOKEN", TOKEN)],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_serves_a_native_model_through_the_gateway_with_transformers_tokens() {
    let (dir, r, cluster) = model_and_cluster(VARIANTS[1]).await;
    let grpc = cluster.nodes[0].grpc.clone();
    let http = cluster.nodes[0].http.clone();
    let key = cluster.admin_key();
    let listen = format!("127.0.0.1:{}", free_port());
    let _agent = native_agent(&grpc, "cpu", &listen);
    let client = cluster.client();
    let node = wait_for("the agent", Duration::from_secs(60), || async {
        client
            .get_node("cpu")
            .await
            .ok()
            .filter(|n| n.state == "ready")
    })
    .await;
    let labels = node.inventory.expect("inventory").labels;
    assert!(
        labels
            .get("talon-engines")
            .is_some_and(|e| e.split(',').any(|e| e == "native")),
        "{labels:?}"
    );
    let mut spec = talon_tests::model_spec("tiny-native", "native", 512, 1);
    spec.artifact_uri = format!("file://{}", dir.display());
    client.create_model(spec).await.expect("model");
    wait_for("the native replica", Duration::from_secs(120), || async {
        let list = client.list_replicas("tiny-native").await.ok()?;
        (list.replicas.len() == 1 && list.replicas[0].state == "ready").then_some(())
    })
    .await;

    let post = |path: &'static str, body: Value| {
        let (http, key) = (http.clone(), key.clone());
        async move {
            let (status, text) = tokio::task::spawn_blocking(move || {
                talon_tests::http_post(&http, path, &body.to_string(), &key)
            })
            .await
            .expect("post")
            .expect("an answer");
            (
                status,
                serde_json::from_str::<Value>(&text).unwrap_or(Value::String(text)),
            )
        }
    };
    // the same 64 tokens transformers chose, through the gateway
    let (status, answer) = post(
        "/v1/completions",
        serde_json::json!({"model": "tiny-native", "prompt": r["prompt"], "max_tokens": 64, "temperature": 0}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["choices"][0]["text"], r["greedy_text"], "{answer}");
    assert_eq!(answer["usage"]["completion_tokens"], 64, "{answer}");
    assert_eq!(
        answer["usage"]["prompt_tokens"],
        ids(&r["prompt_ids"]).len(),
        "{answer}"
    );

    let (status, chat) = post(
        "/v1/chat/completions",
        serde_json::json!({"model": "tiny-native", "messages": r["messages"], "max_tokens": 12, "seed": 3}),
    )
    .await;
    assert_eq!(status, 200, "{chat}");
    assert_eq!(
        chat["usage"]["prompt_tokens"],
        ids(&r["chat_ids"]).len(),
        "{chat}"
    );
    assert!(
        chat["choices"][0]["message"]["content"].is_string(),
        "{chat}"
    );

    // bad input: refused naming the field, nothing served
    let (status, err) = post(
        "/v1/completions",
        serde_json::json!({"model": "tiny-native", "prompt": "hi", "temperature": 7}),
    )
    .await;
    assert_eq!(status, 400, "{err}");
    assert!(err.to_string().contains("temperature 7"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_native_model_split_over_two_agents_decodes_transformers_tokens_and_is_placed_again_when_a_stage_is_lost(
) {
    let (dir, r, cluster) = model_and_cluster(VARIANTS[0]).await;
    let grpc = cluster.nodes[0].grpc.clone();
    let http = cluster.nodes[0].http.clone();
    let key = cluster.admin_key();
    // hosts of one L4 each: a model planned at 40,000 MiB fits none, so
    // it runs on two; the third is where a lost stage goes
    let listens: Vec<(String, String)> = ["s1", "s2", "s3"]
        .iter()
        .map(|id| (id.to_string(), format!("127.0.0.1:{}", free_port())))
        .collect();
    let _agents: Vec<Proc> = listens
        .iter()
        .map(|(id, listen)| native_agent(&grpc, id, listen))
        .collect();
    let client = cluster.client();
    wait_for("three ready nodes", Duration::from_secs(60), || async {
        let nodes = client.list_nodes().await.ok()?;
        (nodes.iter().filter(|n| n.state == "ready").count() == 3).then_some(())
    })
    .await;
    let mut spec = talon_tests::model_spec("piped", "native", 40_000, 1);
    spec.artifact_uri = format!("file://{}", dir.display());
    spec.labels.insert("layers".into(), "4".into());
    client.create_model(spec).await.expect("model");
    let placed = wait_for("both stages ready", Duration::from_secs(120), || async {
        let list = client.list_replicas("piped").await.ok()?;
        let ready = list.replicas.len() == 2 && list.replicas.iter().all(|r| r.state == "ready");
        ready.then_some(list.replicas)
    })
    .await;
    let mut stages: Vec<_> = placed
        .iter()
        .filter_map(|r| Some((r.pipeline.clone()?, r.node_id.clone())))
        .collect();
    stages.sort_by_key(|(p, _)| p.index);
    assert_eq!(stages.len(), 2, "{placed:?}");
    assert_ne!(stages[0].1, stages[1].1, "the stages are on two agents");
    assert_eq!(
        (
            stages[0].0.first_layer,
            stages[1].0.first_layer,
            stages[0].0.layers + stages[1].0.layers
        ),
        (0, stages[0].0.layers, 4)
    );

    let body = serde_json::json!({"model": "piped", "prompt": r["prompt"], "max_tokens": 64, "temperature": 0});
    let (status, text) = tokio::task::spawn_blocking(move || {
        talon_tests::http_post(&http, "/v1/completions", &body.to_string(), &key)
    })
    .await
    .expect("post")
    .expect("an answer");
    assert_eq!(status, 200, "{text}");
    let answer: Value = serde_json::from_str(&text).expect("json");
    assert_eq!(answer["choices"][0]["text"], r["greedy_text"], "{answer}");

    // every step crossed to the second agent
    let tail_node = &stages[1].1;
    let listen = listens
        .iter()
        .find(|(id, _)| id == tail_node)
        .expect("listen")
        .1
        .clone();
    let metrics = reqwest::get(format!("http://{listen}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let steps: u64 = metrics
        .lines()
        .find(|l| l.starts_with("talon_agent_pipeline_steps_total{replica=\"piped@v1-0.stage1\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0);
    assert!(
        steps >= 64,
        "the second stage ran {steps} steps:\n{metrics}"
    );

    // the second agent gone: a request sent now waits at the gateway for
    // the pipeline to be placed again and is answered then, or is answered
    // as unavailable (worth retrying) — never as an engine error
    let mut agents = _agents;
    let at = listens
        .iter()
        .position(|(id, _)| id == tail_node)
        .expect("tail agent");
    drop(agents.remove(at));
    let ask = |body: Value| {
        let (http, key) = (cluster.nodes[0].http.clone(), cluster.admin_key());
        async move {
            tokio::task::spawn_blocking(move || {
                talon_tests::http_post(&http, "/v1/completions", &body.to_string(), &key)
            })
            .await
            .expect("post")
            .expect("an answer")
        }
    };
    let greedy = serde_json::json!({"model": "piped", "prompt": r["prompt"], "max_tokens": 64, "temperature": 0});
    let (status, text) = ask(greedy.clone()).await;
    match status {
        200 => {
            let answer: Value = serde_json::from_str(&text).expect("json");
            assert_eq!(answer["choices"][0]["text"], r["greedy_text"], "{answer}");
        }
        _ => {
            assert_eq!(status, 503, "{text}");
            assert!(text.contains("unavailable"), "{text}");
        }
    }

    // once its node is down, the lost stage is placed on the third host,
    // the first stage restarts with it, and the pipeline answers the same
    // tokens again
    let lost = tail_node.clone();
    let moved = wait_for(
        "the pipeline placed again",
        Duration::from_secs(120),
        || async {
            let list = client.list_replicas("piped").await.ok()?;
            let ready = list.replicas.len() == 2
                && list
                    .replicas
                    .iter()
                    .all(|r| r.state == "ready" && r.node_id != lost);
            ready.then_some(list.replicas)
        },
    )
    .await;
    let (status, text) = ask(greedy).await;
    assert_eq!(status, 200, "{text} {moved:?}");
    let answer: Value = serde_json::from_str(&text).expect("json");
    assert_eq!(answer["choices"][0]["text"], r["greedy_text"], "{answer}");
}
