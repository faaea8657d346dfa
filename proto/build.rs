//! Compiles the .proto files with protox (pure Rust): no system `protoc`.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/talon/v1/raft.proto",
        "proto/talon/v1/admin.proto",
        "proto/talon/v1/agent.proto",
        "proto/talon/v1/inference.proto",
    ];
    let descriptors = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
