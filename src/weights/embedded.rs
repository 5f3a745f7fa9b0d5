//! stories260K compiled into the binary: `candela serve` with no `--model`
//! serves it from memory, offline, in milliseconds. (llama2.c, MIT licence:
//! models/stories260K/LICENSE.)

/// The name the embedded model is served under.
pub const NAME: &str = "stories260K";

/// The model folder's files.
pub const CONFIG: &str = include_str!("../../models/stories260K/config.json");
pub const WEIGHTS: &[u8] = include_bytes!("../../models/stories260K/model.safetensors");
pub const TOKENIZER: &[u8] = include_bytes!("../../models/stories260K/tokenizer.json");
pub const TOKENIZER_CONFIG: &str = include_str!("../../models/stories260K/tokenizer_config.json");
pub const GENERATION_CONFIG: &str = include_str!("../../models/stories260K/generation_config.json");
