//! stories260K compiled into the binary: `candela serve` with no `--model`
//! serves it from memory, offline, in milliseconds. (llama2.c, MIT licence:
//! models/stories260K/LICENSE.)

use anyhow::Context;
use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use super::config::DecoderConfig;
use super::linear::Quantization;
use super::llama::Llama;
use super::loader::LoadedModel;
use super::source::ModelSource;
use crate::tokenizer::Tokenizer;

/// The name the embedded model is served under.
pub const NAME: &str = "stories260K";

const CONFIG: &str = include_str!("../../models/stories260K/config.json");
const WEIGHTS: &[u8] = include_bytes!("../../models/stories260K/model.safetensors");
const TOKENIZER: &[u8] = include_bytes!("../../models/stories260K/tokenizer.json");
const TOKENIZER_CONFIG: &str = include_str!("../../models/stories260K/tokenizer_config.json");
const GENERATION_CONFIG: &str = include_str!("../../models/stories260K/generation_config.json");

pub fn load(dtype: DType, quant: Quantization) -> anyhow::Result<LoadedModel> {
    let config = DecoderConfig::from_json(CONFIG)?;
    let tokenizer = Tokenizer::from_parts(
        TOKENIZER,
        Some(serde_json::from_str(TOKENIZER_CONFIG)?),
        Some(serde_json::from_str(GENERATION_CONFIG)?),
        None,
        &config,
    )?;
    let vb = VarBuilder::from_slice_safetensors(WEIGHTS, dtype, &Device::Cpu)?;
    let model = Llama::load(vb, &config, quant).context("loading the embedded model")?;
    Ok(LoadedModel {
        model: Box::new(model),
        tokenizer,
        config,
        source: ModelSource::Embedded,
    })
}
