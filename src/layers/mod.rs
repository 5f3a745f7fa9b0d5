//! The building blocks architectures share: the flattened batch every layer
//! sees, norms, linear layers, rotary embeddings, paged attention, MLPs and
//! embeddings. An architecture file (`crate::models`) wires these together
//! and owns nothing but its own arrangement and weight names.

pub mod attention;
pub mod batch;
pub mod decoder;
pub mod embedding;
pub mod linear;
pub mod mlp;
pub mod moe;
pub mod norm;
pub mod pooling;
pub mod rope;
pub mod ssm;

pub use attention::{AttnParams, PagedAttention};
pub use batch::{ForwardBatch, Logits, SeqSlice};
pub use decoder::{Output, PreNormDecoder, PreNormLayer, SelfAttention};
pub use embedding::Embedding;
pub use linear::{fused_linear, linear, Linear, Quantization};
pub use mlp::{Activation, GatedMlp, Mlp};
pub use moe::{ExpertNames, ExpertStats, FeedForward, MoeShape, Routing, SparseMoe};
pub use norm::{LayerNorm, RmsNorm};
pub use rope::{Rope, RopeScaling};
