//! B8, CPU: the native executor's prefill and decode tokens/s at each
//! batch size against transformers on PyTorch CPU (eager, float32, KV
//! cache), side by side on the same machine, model and thread count.
//!
//! The model is a Llama-family model with random weights written by
//! `tests/python/make_tiny_hf.py --size bench` (a real architecture; no
//! weights can be downloaded here), or any Hugging Face directory given
//! with `--model`. Each batch prefills `batch` random prompts of
//! `--prompt` tokens in one step, then decodes `--decode` greedy tokens
//! for all of them, one step per token; both sides time exactly that.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use serde_json::{json, Value};
use talon_runtime::kv::SeqCache;
use talon_runtime::model::{Chunk, Model};
use talon_runtime::sampling::argmax;

use crate::{write_out, Cli};

pub struct B8 {
    pub model: Option<PathBuf>,
    pub batches: Vec<usize>,
    pub prompt: usize,
    pub decode: usize,
    pub repeats: usize,
    pub threads: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One prefill of `batch` prompts and `decode` steps: (prefill, decode)
/// tokens/s.
fn run_once(m: &Model, batch: usize, prompt: usize, decode: usize, seed: u64) -> (f64, f64) {
    let vocab = m.config.vocab_size as u64;
    let mut state = seed | 1;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % vocab) as u32
    };
    let per_seq = prompt + decode + 1;
    let bytes = (batch
        * per_seq.div_ceil(16)
        * 16
        * m.config.num_layers
        * 2
        * m.config.num_kv_heads
        * m.config.head_dim
        * 4) as u64;
    let mut kv = m.kv_cache(bytes + (1 << 20));
    let mut seqs: Vec<SeqCache> = (0..batch).map(|_| SeqCache::default()).collect();
    for s in &mut seqs {
        kv.reserve(s, per_seq)
            .expect("the cache was sized for the batch");
    }
    let tokens: Vec<u32> = (0..batch * prompt).map(|_| next()).collect();
    let started = Instant::now();
    let mut hidden = m.embed(&tokens).expect("tokens in the vocabulary");
    let chunks: Vec<Chunk<'_>> = seqs
        .iter()
        .map(|s| Chunk {
            cache: s,
            start: 0,
            len: prompt,
        })
        .collect();
    m.forward(&mut hidden, &chunks, &mut kv);
    let rows: Vec<usize> = (0..batch).map(|i| (i + 1) * prompt - 1).collect();
    let logits = m.logits(&hidden, &rows).expect("a whole model");
    let prefill = started.elapsed().as_secs_f64();
    let v = m.config.vocab_size;
    let mut last: Vec<u32> = (0..batch)
        .map(|i| argmax(&logits[i * v..(i + 1) * v]))
        .collect();
    for s in &mut seqs {
        s.len = prompt;
    }
    let started = Instant::now();
    for _ in 0..decode {
        let mut hidden = m.embed(&last).expect("tokens in the vocabulary");
        let chunks: Vec<Chunk<'_>> = seqs
            .iter()
            .map(|s| Chunk {
                cache: s,
                start: s.len,
                len: 1,
            })
            .collect();
        m.forward(&mut hidden, &chunks, &mut kv);
        let rows: Vec<usize> = (0..batch).collect();
        let logits = m.logits(&hidden, &rows).expect("a whole model");
        last = (0..batch)
            .map(|i| argmax(&logits[i * v..(i + 1) * v]))
            .collect();
        for s in &mut seqs {
            s.len += 1;
        }
    }
    let decoding = started.elapsed().as_secs_f64();
    (
        (batch * prompt) as f64 / prefill,
        (batch * decode) as f64 / decoding,
    )
}

pub fn b8(cli: &Cli, args: &B8) -> anyhow::Result<()> {
    let dir = match &args.model {
        Some(d) => d.clone(),
        None => talon_tests::hf::model(&["--size", "bench", "--dtype", "bf16"])?,
    };
    // both sides get the same threads
    std::env::set_var("MATMUL_NUM_THREADS", args.threads.to_string());
    rayon::ThreadPoolBuilder::new()
        .num_threads(args.threads)
        .build_global()
        .ok();
    let m = Model::load(&dir).with_context(|| format!("load {}", dir.display()))?;
    let c = &m.config;
    eprintln!(
        "b8: {} ({} layers, hidden {}, {} heads / {} KV heads, vocab {}, {:.1} M parameters), prompt {}, decode {}, {} threads",
        dir.display(), c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.vocab_size,
        c.parameters() as f64 / 1e6, args.prompt, args.decode, args.threads
    );
    let mut native = serde_json::Map::new();
    for &b in &args.batches {
        run_once(&m, b, args.prompt.min(16), 2, 99); // warm-up
        let runs: Vec<(f64, f64)> = (0..args.repeats)
            .map(|r| run_once(&m, b, args.prompt, args.decode, r as u64 + 1))
            .collect();
        native.insert(
            b.to_string(),
            json!({"prefill_tok_s": median(runs.iter().map(|r| r.0).collect()),
                   "decode_tok_s": median(runs.iter().map(|r| r.1).collect())}),
        );
    }
    let python = talon_tests::hf::python()?;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/b8_torch.py");
    let batches: Vec<String> = args.batches.iter().map(usize::to_string).collect();
    let out = std::process::Command::new(python)
        .arg(script)
        .arg(&dir)
        .args([
            "--batches",
            &batches.join(","),
            "--prompt",
            &args.prompt.to_string(),
        ])
        .args([
            "--decode",
            &args.decode.to_string(),
            "--threads",
            &args.threads.to_string(),
        ])
        .args(["--repeats", &args.repeats.to_string()])
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .context("run b8_torch.py")?;
    anyhow::ensure!(
        out.status.success(),
        "b8_torch.py failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let torch: Value = serde_json::from_slice(&out.stdout).context("b8_torch.py output")?;
    println!("| batch | native prefill tok/s | PyTorch prefill tok/s | ratio | native decode tok/s | PyTorch decode tok/s | ratio |");
    println!("|---|---|---|---|---|---|---|");
    for b in &batches {
        let (n, t) = (&native[b], &torch["batches"][b]);
        let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(0.0);
        println!(
            "| {b} | {:.0} | {:.0} | {:.2}× | {:.1} | {:.1} | {:.2}× |",
            f(n, "prefill_tok_s"),
            f(t, "prefill_tok_s"),
            f(n, "prefill_tok_s") / f(t, "prefill_tok_s"),
            f(n, "decode_tok_s"),
            f(t, "decode_tok_s"),
            f(n, "decode_tok_s") / f(t, "decode_tok_s"),
        );
    }
    write_out(
        cli,
        "b8_cpu.json",
        json!({"model": dir.display().to_string(), "parameters": c.parameters(), "prompt": args.prompt,
                "decode": args.decode, "threads": args.threads, "repeats": args.repeats,
                "native": native, "pytorch": torch}),
    )
}
