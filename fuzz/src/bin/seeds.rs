//! Writes the seed inputs (`talon_coordinator::fuzzing::seeds`) into
//! `fuzz/corpus/<target>/seed-<n>`: `cargo run --bin seeds` from `fuzz/`.

fn main() -> std::io::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for (n, (target, bytes)) in talon_coordinator::fuzzing::seeds().into_iter().enumerate() {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(format!("seed-{n}")), bytes)?;
    }
    Ok(())
}
