//! Benchmark B7 (filled in below).
use std::path::Path;

pub fn run_cli(_data_dir: &Path, _out: Option<&Path>) -> Result<(), String> {
    Err("b7 not implemented yet".into())
}
