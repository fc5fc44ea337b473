//! Compiles the wire schema with protox (pure Rust, no protoc on the machine), generates prost
//! types and their proto3 canonical-JSON serde impls (pbjson).
use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The client contract, and the state one process hands the next on an upgrade.
    let schemas = ["proto/barrage/v1/barrage.proto", "proto/barrage/v1/state.proto"];
    for schema in schemas {
        println!("cargo:rerun-if-changed={schema}");
    }
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let descriptors = protox::compile(schemas, ["proto"])?;
    let descriptor_path = out.join("barrage_descriptor.bin");
    std::fs::write(&descriptor_path, prost::Message::encode_to_vec(&descriptors))?;
    prost_build::Config::new()
        .file_descriptor_set_path(&descriptor_path)
        .skip_protoc_run()
        .compile_protos(&schemas, &["proto"])?;
    let set = std::fs::read(&descriptor_path)?;
    pbjson_build::Builder::new().register_descriptors(&set)?.build(&[".barrage.v1"])?;
    Ok(())
}
