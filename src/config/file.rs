//! `--config FILE`: a TOML file whose keys are the flags' names in snake_case
//! (`max_num_seqs = 64`). Flags given on the command line (or through their
//! environment variables) win over the file; the file wins over defaults.

use std::path::Path;

use anyhow::{bail, Context};
use clap::parser::ValueSource;
use clap::ArgMatches;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

/// Applies the TOML file at `path` to `args`, whose fields' clap ids match the
/// keys. `matches` tells which flags were given explicitly.
pub fn apply_config_file<T: Serialize + DeserializeOwned>(
    args: &mut T,
    matches: &ArgMatches,
    path: &Path,
) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("config file {}", path.display()))?;
    let mut current = serde_json::to_value(&*args)?;
    let fields = current
        .as_object_mut()
        .expect("args serialize as an object");
    let mut known: Vec<&str> = Vec::new();
    let snapshot = fields.clone();
    for k in snapshot.keys() {
        if k != "config" {
            known.push(k);
        }
    }
    for (key, value) in table {
        if !known.contains(&key.as_str()) {
            bail!(
                "config file {}: unknown key `{key}`; known keys: {}",
                path.display(),
                known.join(", ")
            );
        }
        let explicit = matches!(
            matches.value_source(&key),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        );
        if !explicit {
            let mut v = serde_json::to_value(value)?;
            // A single string where the flag takes a list (api_key, allowed_origins).
            if snapshot[&key].is_array() && v.is_string() {
                v = Value::Array(vec![v]);
            }
            fields.insert(key, v);
        }
    }
    let de = current.clone();
    *args = serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        anyhow::anyhow!(
            "config file {}: bad value for `{key}`: {}",
            path.display(),
            e.into_inner()
        )
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Args, CommandFactory, FromArgMatches, Parser};
    use serde::Deserialize;

    #[derive(Debug, Parser, Serialize, Deserialize)]
    struct Demo {
        #[arg(long)]
        model: Option<String>,
        #[arg(long, default_value_t = 8000)]
        port: u16,
        #[arg(long, value_delimiter = ',')]
        api_key: Vec<String>,
        #[arg(long)]
        config: Option<std::path::PathBuf>,
        #[command(flatten)]
        #[serde(flatten)]
        inner: Inner,
    }

    #[derive(Debug, Args, Serialize, Deserialize)]
    struct Inner {
        #[arg(long, default_value_t = 16)]
        block_size: usize,
    }

    fn run(argv: &[&str], toml: &str) -> anyhow::Result<Demo> {
        // Tests run in parallel: every call gets its own file.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("candela-cfg-{}-{n}.toml", std::process::id()));
        std::fs::write(&path, toml).unwrap();
        let matches = Demo::command().get_matches_from(argv);
        let mut d = Demo::from_arg_matches(&matches).unwrap();
        let r = apply_config_file(&mut d, &matches, &path).map(|_| d);
        std::fs::remove_file(&path).unwrap();
        r
    }

    #[test]
    fn file_beats_defaults_and_flags_beat_the_file() {
        let d = run(
            &["x"],
            "port = 9000\nblock_size = 32\napi_key = \"k\"\nmodel = \"m\"",
        )
        .unwrap();
        assert_eq!(
            (d.port, d.inner.block_size, d.api_key, d.model.as_deref()),
            (9000, 32, vec!["k".into()], Some("m"))
        );
        let d = run(&["x", "--port", "7000"], "port = 9000").unwrap();
        assert_eq!(d.port, 7000);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let e = run(&["x"], "prot = 1").unwrap_err().to_string();
        assert!(
            e.contains("unknown key `prot`") && e.contains("port"),
            "{e}"
        );
        let e = run(&["x"], "port = \"high\"").unwrap_err().to_string();
        assert!(e.contains("`port`"), "{e}");
        let e = run(&["x"], "port = [").unwrap_err();
        assert!(format!("{e:#}").contains("config file"), "{e:#}");
    }
}
