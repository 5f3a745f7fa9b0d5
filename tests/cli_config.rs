//! The command line and config files: defaults documented in config/ are the real ones,
//! the examples load, and mistakes are clear errors.

mod common;

use candela::cli::{Cli, Command};
use clap::{CommandFactory, FromArgMatches};
use common::repo_path;

fn serve_args(argv: &[&str]) -> anyhow::Result<serde_json::Value> {
    let mut full = vec!["candela", "serve"];
    full.extend(argv);
    let matches = Cli::command().try_get_matches_from(full)?;
    let mut cli = Cli::from_arg_matches(&matches)?;
    let Command::Serve(args) = &mut cli.command else {
        unreachable!()
    };
    if let Some(path) = args.config.clone() {
        candela::config::apply_config_file(
            args,
            matches.subcommand_matches("serve").unwrap(),
            &path,
        )?;
    }
    let mut v = serde_json::to_value(&*args)?;
    v.as_object_mut().unwrap().remove("config");
    Ok(v)
}

#[test]
fn default_toml_states_the_real_defaults() {
    let path = repo_path("config/default.toml");
    let from_file = serve_args(&["--config", path.to_str().unwrap()]).unwrap();
    assert_eq!(from_file, serve_args(&[]).unwrap());
    // Every option is mentioned in the file, set or commented out.
    let text = std::fs::read_to_string(&path).unwrap();
    for key in from_file.as_object().unwrap().keys() {
        assert!(
            text.contains(&format!("{key} =")),
            "config/default.toml does not document `{key}`"
        );
    }
}

#[test]
fn example_configs_load_and_flags_override_them() {
    for name in ["small-cpu", "container"] {
        let path = repo_path(&format!("config/{name}.toml"));
        serve_args(&["--config", path.to_str().unwrap()])
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
    }
    let path = repo_path("config/small-cpu.toml");
    let v = serve_args(&["--config", path.to_str().unwrap(), "--max-num-seqs", "7"]).unwrap();
    assert_eq!(v["max_num_seqs"], 7);
    assert_eq!(v["max_num_batched_tokens"], 512);
    assert_eq!(v["served_model_name"], serde_json::json!(["smollm2"]));
}

#[test]
fn bad_config_files_are_startup_errors() {
    let dir = std::env::temp_dir();
    for (name, text, want) in [
        ("unknown", "max_num_seq = 3", "unknown key `max_num_seq`"),
        ("badvalue", "port = \"eighty\"", "`port`"),
        ("syntax", "port = ", "config file"),
    ] {
        let p = dir.join(format!("candela-bad-{name}-{}.toml", std::process::id()));
        std::fs::write(&p, text).unwrap();
        let err = format!(
            "{:#}",
            serve_args(&["--config", p.to_str().unwrap()]).unwrap_err()
        );
        assert!(err.contains(want), "{name}: {err}");
        std::fs::remove_file(&p).unwrap();
    }
    let err = format!(
        "{:#}",
        serve_args(&["--config", "/no/such/file.toml"]).unwrap_err()
    );
    assert!(err.contains("reading config file"), "{err}");
}

#[test]
fn embedded_model_serves_without_any_flag() {
    let m = candela::models::load_model(&candela::models::LoadOptions {
        model: None,
        dtype: candle_core::DType::F32,
        quantization: Default::default(),
        ..Default::default()
    })
    .unwrap();
    assert!(matches!(m.source, candela::weights::ModelSource::Embedded));
    let mut r = common::runner(&m, 16, 8);
    let prompt = m.tokenizer.encode("Once upon a time", true).unwrap();
    let out = r
        .greedy(m.model.as_ref(), 0, &prompt, 11, |_| true)
        .unwrap();
    assert_eq!(
        m.tokenizer.decode(&out, true).unwrap(),
        ", there was a little girl named Lily."
    );
}

#[test]
fn kv_cache_dtype_sizes_the_cache_and_rejects_unknown_names() {
    let m = candela::models::load_model(&candela::models::LoadOptions {
        model: None,
        dtype: candle_core::DType::F32,
        quantization: Default::default(),
        ..Default::default()
    })
    .unwrap();
    let args = |dt: &str| candela::config::CacheArgs {
        block_size: 16,
        num_kv_blocks: Some(8),
        kv_cache_memory: None,
        kv_cache_dtype: dt.into(),
        enable_prefix_caching: true,
        no_enable_prefix_caching: false,
    };
    let f32 = args("auto").sizing(m.model.as_ref(), 256, 4).unwrap();
    let f16 = args("float16").sizing(m.model.as_ref(), 256, 4).unwrap();
    assert_eq!(f32.dtype, Some(candela::kv_cache::KvDtype::F32));
    assert_eq!(f16.dtype, Some(candela::kv_cache::KvDtype::F16));
    assert_eq!(f16.bytes_per_token * 2, f32.bytes_per_token);
    // The 8-bit caches take a byte per value plus their scales (a larger
    // share in this tiny model's small heads).
    for (name, dt) in [
        ("fp8", candela::kv_cache::KvDtype::Fp8E4M3),
        ("q8_0", candela::kv_cache::KvDtype::Q8_0),
    ] {
        let s = args(name).sizing(m.model.as_ref(), 256, 4).unwrap();
        assert_eq!(s.dtype, Some(dt));
        assert!(s.bytes_per_token * 4 > f32.bytes_per_token, "{name}");
        assert!(s.bytes_per_token < f16.bytes_per_token, "{name}");
    }
    let err = args("fp8_e5m2")
        .sizing(m.model.as_ref(), 256, 4)
        .unwrap_err();
    assert!(err.to_string().contains("--kv-cache-dtype"), "{err}");
}

#[test]
fn prefix_caching_is_on_by_default_and_can_be_turned_off() {
    use candela::cli::{Cli, Command};
    use clap::Parser;
    let parse = |extra: &[&str]| {
        let mut argv = vec!["candela", "serve"];
        argv.extend(extra);
        let Command::Serve(args) = Cli::parse_from(argv).command else {
            unreachable!()
        };
        args.cache.prefix_caching()
    };
    assert!(parse(&[]));
    assert!(parse(&["--enable-prefix-caching"]));
    assert!(!parse(&["--no-enable-prefix-caching"]));
    assert!(!parse(&["--enable-prefix-caching", "false"]));
}
