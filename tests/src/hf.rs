//! Hugging Face models with random weights, and what `transformers`
//! computes on them: the reference the native executor is checked against
//! (`tests/python/make_tiny_hf.py`, run in `target/torch-venv`, built by
//! `tests/python/setup-torch.sh` on first use).

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;

fn python_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("python")
}

/// The python of `target/torch-venv` (torch, transformers, tokenizers from
/// PyPI), installed on first use and reused after.
pub fn python() -> anyhow::Result<PathBuf> {
    let out = Command::new("bash")
        .arg(python_dir().join("setup-torch.sh"))
        .output()
        .context("run tests/python/setup-torch.sh")?;
    anyhow::ensure!(
        out.status.success(),
        "installing torch and transformers failed (it needs python3 with venv and PyPI):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// A model written by `make_tiny_hf.py` with `args` (e.g. `--arch qwen2
/// --dtype f16`), cached under `target/hf-models` by the script's text and
/// the arguments; the directory holds `reference.json` too.
pub fn model(args: &[&str]) -> anyhow::Result<PathBuf> {
    let script = python_dir().join("make_tiny_hf.py");
    let text = std::fs::read(&script).context("read make_tiny_hf.py")?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    args.hash(&mut h);
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
    std::fs::create_dir_all(target.join("hf-models")).context("create target/hf-models")?;
    let root = target
        .join("hf-models")
        .canonicalize()
        .context("target/hf-models")?;
    let dir = root.join(format!(
        "{}-{:016x}",
        args.join("").replace('-', ""),
        h.finish()
    ));
    if dir.join("reference.json").exists() {
        return Ok(dir);
    }
    let python = python()?;
    let partial = root.join(format!(
        ".partial-{}-{:016x}",
        std::process::id(),
        h.finish()
    ));
    let _ = std::fs::remove_dir_all(&partial);
    let out = Command::new(&python)
        .arg(&script)
        .arg(&partial)
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .context("run make_tiny_hf.py")?;
    anyhow::ensure!(
        out.status.success(),
        "make_tiny_hf.py {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // another test may have written it meanwhile: either copy will do
    if std::fs::rename(&partial, &dir).is_err() {
        let _ = std::fs::remove_dir_all(&partial);
    }
    Ok(dir)
}
