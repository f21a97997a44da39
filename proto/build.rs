//! Compiles the dispa.v1 protos with protox (pure Rust), so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/dispa/v1/config.proto",
        "proto/dispa/v1/discovery.proto",
        "proto/dispa/v1/admin.proto",
        "proto/dispa/v1/telemetry.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        // Snapshot payloads are encoded once per version and shared by every stream as
        // reference-counted `Bytes`, never re-encoded per agent.
        .bytes(".dispa.v1")
        .compile_fds(fds)?;
    Ok(())
}
