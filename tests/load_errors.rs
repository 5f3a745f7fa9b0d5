//! Bad model inputs give clear errors, never panics.

mod common;

use std::path::{Path, PathBuf};

use candela::models::{load_model, LoadOptions};
use candle_core::DType;
use common::*;

/// A copy of a fixture in a fresh temp folder, to break in some way.
fn scratch_copy(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("candela-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(fixture_dir("llama_gqa")).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
    }
    dir
}

fn load_err(path: &Path) -> String {
    let err = load_model(&LoadOptions {
        model: Some(path.to_str().unwrap().to_string()),
        dtype: DType::F32,
        quantization: Default::default(),
        ..Default::default()
    })
    .expect_err("loading should fail");
    format!("{err:#}")
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, v.to_string()).unwrap();
}

#[test]
fn missing_files_are_named() {
    for file in ["config.json", "tokenizer.json", "model.safetensors"] {
        let dir = scratch_copy(&format!("missing-{file}"));
        std::fs::remove_file(dir.join(file)).unwrap();
        let err = load_err(&dir);
        assert!(err.contains(file), "{file}: {err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
    let err = load_err(Path::new("/definitely/not/here"));
    assert!(err.contains("not found"), "{err}");
}

#[test]
fn unsupported_architecture_is_named_with_the_supported_list() {
    let dir = scratch_copy("arch");
    edit_config(&dir, |c| {
        c["architectures"] = serde_json::json!(["GPTNeoXForCausalLM"])
    });
    let err = load_err(&dir);
    assert!(err.contains("GPTNeoXForCausalLM"), "{err}");
    for arch in [
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
    ] {
        assert!(err.contains(arch), "{err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn wrongly_typed_config_field_is_named() {
    let dir = scratch_copy("type");
    edit_config(&dir, |c| {
        c["num_key_value_heads"] = serde_json::json!("two")
    });
    let err = load_err(&dir);
    assert!(
        err.contains("num_key_value_heads") && err.contains("invalid type"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn tensor_of_wrong_shape_names_tensor_and_shapes() {
    let dir = scratch_copy("shape");
    edit_config(&dir, |c| c["intermediate_size"] = serde_json::json!(96));
    let err = load_err(&dir);
    assert!(err.contains("model.layers.0.mlp.gate_proj.weight"), "{err}");
    assert!(
        err.contains("[96, 64]") && err.contains("[128, 64]"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn garbage_gguf_is_rejected() {
    let dir = scratch_copy("gguf");
    let p = dir.join("broken.gguf");
    std::fs::write(&p, b"GGUF but not really").unwrap();
    let err = load_err(&p);
    assert!(err.contains("not a valid GGUF file"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn sharded_safetensors_load_through_the_index() {
    // Split the fixture's weights over two shard files with an index, as large checkpoints are.
    let dir = scratch_copy("shards");
    let tensors =
        candle_core::safetensors::load(dir.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    let mut names: Vec<_> = tensors.keys().cloned().collect();
    names.sort();
    let (a, b) = names.split_at(names.len() / 2);
    let mut map = serde_json::Map::new();
    for (part, file) in [
        (a, "model-00001-of-00002.safetensors"),
        (b, "model-00002-of-00002.safetensors"),
    ] {
        let sub: std::collections::HashMap<_, _> = part
            .iter()
            .map(|n| (n.clone(), tensors[n].clone()))
            .collect();
        candle_core::safetensors::save(&sub, dir.join(file)).unwrap();
        for n in part {
            map.insert(n.clone(), file.into());
        }
    }
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": map}).to_string(),
    )
    .unwrap();
    let m = load(&dir, DType::F32);
    let g = golden("llama_gqa");
    let mut r = runner(&m, 16, 16);
    let case = &g["greedy"][0];
    let want = ids(&case["tokens"]);
    assert_eq!(
        r.greedy(
            m.model.as_ref(),
            0,
            &ids(&case["prompt"]),
            want.len(),
            |_| true
        )
        .unwrap(),
        want
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
