//! llama.cpp's OpenAI-compatible server as the llama-cpp-python package: the
//! real inference engine the tests and benchmarks serve through Talon, on a
//! tiny Llama GGUF they write themselves (nothing can download weights).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;

fn python_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("python")
}

/// The python of `target/llama-venv`, built by `tests/python/setup-llama.sh`
/// on first use (a few minutes on 2 cores) and reused after.
pub fn python() -> anyhow::Result<PathBuf> {
    let out = Command::new("bash")
        .arg(python_dir().join("setup-llama.sh"))
        .output()
        .context("run tests/python/setup-llama.sh")?;
    anyhow::ensure!(
        out.status.success(),
        "building llama-cpp-python failed (it needs python3 with venv and a C++ compiler):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// Writes a tiny Llama GGUF (2 layers, 64 wide) with random weights from
/// `seed` into `dir` (`tests/python/make_tiny_gguf.py`).
pub fn tiny_gguf(python: &Path, dir: &Path, seed: u32) -> anyhow::Result<PathBuf> {
    let path = dir.join(format!("tiny-seed{seed}.gguf"));
    let status = Command::new(python)
        .arg(python_dir().join("make_tiny_gguf.py"))
        .arg(&path)
        .args(["--seed", &seed.to_string()])
        .status()
        .context("run make_tiny_gguf.py")?;
    anyhow::ensure!(status.success(), "make_tiny_gguf.py failed");
    Ok(path)
}

/// The server's command line for `model` on `port` (one thread: the
/// benchmarks share two cores).
pub fn server_args(gguf: &Path, model: &str, port: u16) -> Vec<String> {
    [
        "-m",
        "llama_cpp.server",
        "--model",
        &gguf.display().to_string(),
        "--model_alias",
        model,
        "--host",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--n_threads",
        "1",
        "--n_ctx",
        "256",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// An agent's `[engines.llamacpp]` profile for llama-cpp-python's server
/// (its readiness is `/v1/models`: it has no `/health`), with `extra`
/// settings lines.
pub fn agent_profile(python: &Path, extra: &str) -> String {
    format!(
        r#"
[engines.llamacpp]
command = "{python} -m llama_cpp.server --model {{artifact}} --model_alias {{model}} --host {{host}} --port {{port}} --n_threads 1"
health_path = "/v1/models"
{extra}

[engines.llamacpp.options]
context-length = "--n_ctx {{value}}"
"#,
        python = python.display()
    )
}
