//! Compiles the etcd message subset the benchmarks use (protox: no protoc).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let descriptors = protox::compile(["proto/etcd_subset.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(descriptors)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
