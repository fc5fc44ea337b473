//! Compiles the wire schema with protox (pure Rust, no protoc on the machine), generates prost
//! types and their proto3 canonical-JSON serde impls (pbjson).
use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let schema = "proto/barrage/v1/barrage.proto";
    println!("cargo:rerun-if-changed={schema}");
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let descriptors = protox::compile([schema], ["proto"])?;
    let descriptor_path = out.join("barrage_descriptor.bin");
    std::fs::write(&descriptor_path, prost::Message::encode_to_vec(&descriptors))?;
    prost_build::Config::new()
        .file_descriptor_set_path(&descriptor_path)
        .skip_protoc_run()
        .compile_protos(&[schema], &["proto"])?;
    let set = std::fs::read(&descriptor_path)?;
    pbjson_build::Builder::new().register_descriptors(&set)?.build(&[".barrage.v1"])?;
    Ok(())
}
