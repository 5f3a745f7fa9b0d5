//! Where `--model` points: a local Hugging Face folder, a `.gguf` file, or a
//! Hugging Face repo id that is downloaded into the standard cache.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A folder with `config.json`, safetensors weights and `tokenizer.json`.
    Dir(PathBuf),
    /// A single GGUF file holding weights, config and tokenizer.
    Gguf(PathBuf),
    /// stories260K, compiled into the binary.
    Embedded,
}

/// Files a Hugging Face model folder provides; the weights are checked separately.
const REQUIRED: &[&str] = &["config.json", "tokenizer.json"];
const OPTIONAL: &[&str] = &["tokenizer_config.json", "generation_config.json"];
const INDEX: &str = "model.safetensors.index.json";

impl ModelSource {
    /// Resolves `--model`. A path that exists is used as is; something shaped
    /// like `owner/name` that is not a local path is fetched from the hub.
    pub fn resolve(model: &str) -> anyhow::Result<Self> {
        let path = Path::new(model);
        if path.is_file() {
            if has_gguf_ext(path) {
                return Ok(Self::Gguf(path.to_path_buf()));
            }
            bail!("{model}: not a .gguf file (pass a GGUF file or a Hugging Face model folder)");
        }
        if path.is_dir() {
            return Ok(Self::Dir(path.to_path_buf()));
        }
        let looks_local = model.starts_with('/')
            || model.starts_with('.')
            || model.starts_with('~')
            || has_gguf_ext(path)
            || model.matches('/').count() != 1;
        if looks_local {
            bail!("model {model:?} not found: no such file or folder (and not a Hugging Face repo id like \"owner/name\")");
        }
        download(model).map(Self::Dir)
    }

    /// The safetensors files of a folder: `model.safetensors`, or the shards
    /// listed by `model.safetensors.index.json`.
    pub fn safetensors_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
        let single = dir.join("model.safetensors");
        if single.is_file() {
            return Ok(vec![single]);
        }
        let index = dir.join(INDEX);
        if index.is_file() {
            return shard_names(&index)
                .map(|names| names.into_iter().map(|n| dir.join(n)).collect());
        }
        bail!(
            "{}: no model weights (expected model.safetensors or {INDEX} with its shards)",
            dir.display()
        )
    }
}

fn has_gguf_ext(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// Shard file names listed in a safetensors index, deduplicated, in order.
fn shard_names(index: &Path) -> anyhow::Result<Vec<String>> {
    let text =
        std::fs::read_to_string(index).with_context(|| format!("reading {}", index.display()))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: invalid JSON", index.display()))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .with_context(|| format!("{}: no weight_map", index.display()))?;
    let mut names: Vec<String> = Vec::new();
    for v in map.values() {
        let name = v.as_str().with_context(|| {
            format!("{}: weight_map values must be file names", index.display())
        })?;
        if !names.iter().any(|n| n == name) {
            names.push(name.to_string());
        }
    }
    names.sort();
    Ok(names)
}

#[cfg(feature = "hub")]
fn download(repo_id: &str) -> anyhow::Result<PathBuf> {
    use hf_hub::{api::sync::ApiBuilder, Cache, Repo};

    let cache = Cache::from_env();
    let offline = std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| matches!(v.as_str(), "1" | "true" | "TRUE" | "yes"));
    let repo = Repo::model(repo_id.to_string());
    if offline {
        // Only what is already in the cache.
        let cached = cache.repo(repo);
        let mut dir = None;
        for name in REQUIRED {
            let p = cached.get(name).with_context(|| {
                format!(
                    "HF_HUB_OFFLINE is set and {repo_id}/{name} is not in the cache at {}",
                    cache.path().display()
                )
            })?;
            dir = p.parent().map(Path::to_path_buf);
        }
        let dir = dir.expect("REQUIRED is not empty");
        ModelSource::safetensors_files(&dir)?;
        return Ok(dir);
    }
    let token = std::env::var("HF_TOKEN").ok().or_else(|| cache.token());
    let api = ApiBuilder::from_cache(cache)
        .with_token(token)
        .with_progress(true)
        .build()
        .context("setting up the Hugging Face hub client")?;
    let api = api.repo(repo);
    let fetch = |name: &str| {
        api.get(name)
            .with_context(|| format!("downloading {repo_id}/{name}"))
    };
    let mut dir = None;
    for name in REQUIRED {
        dir = fetch(name)?.parent().map(Path::to_path_buf);
    }
    for name in OPTIONAL {
        // Absent optional files are fine; real errors surface when required ones fail.
        let _ = api.get(name);
    }
    match api.get("model.safetensors") {
        Ok(_) => {}
        Err(_) => {
            let index = fetch(INDEX)?;
            for shard in shard_names(&index)? {
                fetch(&shard)?;
            }
        }
    }
    Ok(dir.expect("REQUIRED is not empty"))
}

#[cfg(not(feature = "hub"))]
fn download(repo_id: &str) -> anyhow::Result<PathBuf> {
    bail!("model {repo_id:?} is not a local path, and this build has no Hugging Face hub support (feature `hub`)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_local_paths_are_clear_errors() {
        for m in ["/nope/model", "./x", "missing.gguf", "a/b/c"] {
            let err = ModelSource::resolve(m).unwrap_err().to_string();
            assert!(err.contains("not found"), "{m}: {err}");
        }
    }

    #[test]
    fn folder_without_weights() {
        let dir = std::env::temp_dir().join(format!("candela-noweights-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let err = ModelSource::safetensors_files(&dir)
            .unwrap_err()
            .to_string();
        assert!(err.contains("model.safetensors"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
