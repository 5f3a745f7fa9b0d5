//! `POST /v1/embeddings`: OpenAI's request and response, over an embedding
//! model's engine (each input one request, all submitted together, so they
//! share steps with everything else running).

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::error::{ApiError, ErrorResponse};
use super::guard::ReadBody;
use super::validate::parse_json;
use super::AppState;
use crate::engine::{EngineEvent, GenerateRequest, ValidRequest};
use crate::models::ModelKind;

/// `input`: a string, strings, token ids, or lists of token ids.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum Input {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct EmbeddingRequest {
    pub input: Option<Input>,
    pub model: Option<String>,
    pub encoding_format: Option<String>,
    pub dimensions: Option<i64>,
    /// vLLM's extension: cut inputs longer than this many tokens (-1: the
    /// model's maximum) instead of refusing them.
    pub truncate_prompt_tokens: Option<i64>,
    #[allow(dead_code)] // accepted and ignored, as OpenAI documents it
    pub user: Option<String>,
}

/// OpenAI's embeddings response.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EmbeddingResponse {
    /// `list`
    pub object: &'static str,
    pub data: Vec<Embedding>,
    pub model: String,
    pub usage: EmbeddingUsage,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Embedding {
    /// `embedding`
    pub object: &'static str,
    pub index: usize,
    pub embedding: Vector,
}

/// The vector: floats, or with `encoding_format: base64` its little-endian
/// float32 bytes in base64.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum Vector {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EmbeddingUsage {
    pub prompt_tokens: usize,
    pub total_tokens: usize,
}

struct Prepared {
    reqs: Vec<ValidRequest>,
    base64: bool,
    dimensions: Option<usize>,
}

fn prepare(st: &AppState, body: &[u8]) -> Result<Prepared, ApiError> {
    let req: EmbeddingRequest = parse_json(body)?;
    st.check_model(req.model.as_deref())?;
    let ModelKind::Embedding { dim, matryoshka } = st.engine.model_kind() else {
        return Err(ApiError::bad_request(
            "model",
            format!(
                "this model serves the {} task, not embeddings: use /v1/completions or /v1/chat/completions",
                st.engine.model_kind().task()
            ),
        ));
    };
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::bad_request(
                "encoding_format",
                format!("encoding_format must be \"float\" or \"base64\", got {other:?}"),
            ))
        }
    };
    let dimensions = match req.dimensions {
        None => None,
        Some(d) if !matryoshka => {
            return Err(ApiError::bad_request(
                "dimensions",
                format!(
                "this model does not support Matryoshka embeddings: dimensions ({d}) cannot be set"
            ),
            ))
        }
        Some(d) if d < 1 || d as usize > dim => {
            return Err(ApiError::bad_request(
                "dimensions",
                format!("dimensions must be between 1 and {dim}, got {d}"),
            ))
        }
        Some(d) => Some(d as usize),
    };
    let max_len = st.max_model_len;
    let truncate = match req.truncate_prompt_tokens {
        None => None,
        Some(-1) => Some(max_len),
        Some(k) if k >= 1 && k as usize <= max_len => Some(k as usize),
        Some(k) => {
            return Err(ApiError::bad_request(
                "truncate_prompt_tokens",
                format!("truncate_prompt_tokens must be -1 or between 1 and {max_len}, got {k}"),
            ))
        }
    };
    let input = req
        .input
        .ok_or_else(|| ApiError::bad_request("input", "input is required"))?;
    let tok = st.engine.tokenizer();
    let from_text = |t: String| -> Result<Vec<u32>, ApiError> {
        if t.is_empty() {
            return Err(ApiError::bad_request(
                "input",
                "input must not contain empty strings",
            ));
        }
        let ids = match truncate {
            Some(k) => tok.encode_truncated(&t, k),
            None => {
                super::completions::check_text_fits(tok, &t, max_len, "input")?;
                tok.encode(&t, true)
            }
        };
        ids.map_err(|e| ApiError::bad_request("input", e.to_string()))
    };
    // Token ids are taken as given; cut from the left, as vLLM does.
    let from_ids = |ids: Vec<u32>| match truncate {
        Some(k) if ids.len() > k => ids[ids.len() - k..].to_vec(),
        _ => ids,
    };
    let inputs: Vec<Vec<u32>> = match input {
        Input::Text(t) => vec![from_text(t)?],
        Input::Texts(ts) => ts.into_iter().map(from_text).collect::<Result<_, _>>()?,
        Input::Tokens(ids) => vec![from_ids(ids)],
        Input::TokenLists(ls) => ls.into_iter().map(from_ids).collect(),
    };
    if inputs.is_empty() || inputs.iter().any(Vec::is_empty) {
        return Err(ApiError::bad_request("input", "input must not be empty"));
    }
    super::validate::check_num_seqs(inputs.len(), 1, st.max_seqs_per_request)?;
    let reqs = inputs
        .into_iter()
        .map(|ids| {
            let len = ids.len();
            st.engine.validate(GenerateRequest::embedding(ids)).map_err(|e| match e {
                crate::engine::EngineError::ContextLength { max_model_len, .. } => ApiError::context_length(
                    "input",
                    format!(
                        "This model's maximum context length is {max_model_len} tokens. However, you requested \
                         {len} tokens in the input for embedding generation. Please reduce the length of the \
                         input, or set truncate_prompt_tokens."
                    ),
                ),
                e => e.into(),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Prepared {
        reqs,
        base64,
        dimensions,
    })
}

/// OpenAI's embeddings (embedding models only).
#[utoipa::path(post, path = "/v1/embeddings", operation_id = "createEmbedding", tag = "openai", request_body = EmbeddingRequest,
    responses((status = 200, body = EmbeddingResponse),
        (status = "4XX", body = ErrorResponse), (status = "5XX", body = ErrorResponse)))]
pub async fn handle(State(st): State<Arc<AppState>>, ReadBody(body): ReadBody) -> Response {
    match run(st, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn run(st: Arc<AppState>, body: axum::body::Bytes) -> Result<Response, ApiError> {
    let p = st
        .offload(super::Lane::Generate, move |st| prepare(st, &body))
        .await?;
    let streams = super::completions::submit_all(&st, p.reqs)?;
    super::tracker::note_engine_ids(&streams);
    let mut data = Vec::with_capacity(streams.len());
    let mut prompt_tokens = 0;
    for (index, mut s) in streams.into_iter().enumerate() {
        let mut vector = None;
        while let Some(ev) = s.next().await {
            match ev {
                EngineEvent::Embedding(v) => vector = Some(v),
                EngineEvent::Done { usage, .. } => prompt_tokens += usage.prompt_tokens,
                EngineEvent::Error(e) => return Err(e.into()),
                EngineEvent::Output(_) | EngineEvent::PromptLogprobs(_) => {}
            }
        }
        let mut v =
            vector.ok_or_else(|| ApiError::Internal("the engine sent no embedding".into()))?;
        if let Some(d) = p.dimensions {
            // Matryoshka: the first d values, renormalized.
            v.truncate(d);
            crate::layers::pooling::l2_normalize(&mut v);
        }
        let embedding = if p.base64 {
            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            Vector::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
        } else {
            Vector::Float(v)
        };
        data.push(Embedding {
            object: "embedding",
            index,
            embedding,
        });
    }
    Ok(axum::Json(EmbeddingResponse {
        object: "list",
        data,
        model: st.model_name.clone(),
        usage: EmbeddingUsage {
            prompt_tokens,
            total_tokens: prompt_tokens,
        },
    })
    .into_response())
}
