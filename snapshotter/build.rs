//! Generates the Snapshots service from `proto/` (needs `protoc`: Debian's protobuf-compiler,
//! with libprotobuf-dev for the well-known types; scripts/setup.sh installs both).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&["proto/snapshots.proto"], &["proto"])?;
    Ok(())
}
