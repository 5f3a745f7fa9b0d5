//! Where weights come from: Hugging Face folders of safetensors (local or
//! downloaded from the hub), GGUF files, and the model compiled into the
//! binary. Architectures see a `VarBuilder` under Hugging Face names,
//! whatever the source.

pub mod embedded;
pub mod gguf;
pub mod source;

pub use source::ModelSource;
