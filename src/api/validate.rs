//! The validation stage: OpenAI requests become engine requests. This module
//! parses and maps the API's fields (JSON errors, `logit_bias` keys, `top_k`
//! conventions, per-request limits); the parameters' ranges and the model's
//! limits are checked once, by [`crate::engine::GenerateRequest::validate`],
//! which produces the [`crate::engine::ValidRequest`] the engine takes. Every
//! error names its parameter.

use crate::engine::{SamplingParams, StopParams};

use super::error::ApiError;
use super::protocol::CommonParams;

fn bad(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::bad_request(param, message)
}

/// Parses a JSON body, naming the offending field on error.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::BadRequest {
            message: "the request body is empty; expected a JSON object".into(),
            param: None,
        });
    }
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::BadRequest {
                message: format!("invalid JSON: {inner}"),
                param: None,
            }
        } else if path == "." || path.is_empty() {
            ApiError::BadRequest {
                message: format!("invalid request: {inner}"),
                param: None,
            }
        } else {
            bad(&path, format!("invalid value for `{path}`: {inner}"))
        }
    })
}

/// A request may ask for at most `max` sequences (prompts x `n`,
/// `--max-seqs-per-request`): each is a request in the engine's queue, and
/// one call must not fill the queue or the batch on its own.
pub fn check_num_seqs(prompts: usize, n: usize, max: usize) -> Result<(), ApiError> {
    if prompts > max {
        return Err(bad(
            "prompt",
            format!(
                "{prompts} prompts in one request; at most {max} sequences (prompts x n) are \
                 allowed per request"
            ),
        ));
    }
    if prompts.saturating_mul(n) > max {
        return Err(bad(
            "n",
            format!(
                "{prompts} prompts x n = {n} asks for {} sequences; at most {max} are allowed per \
                 request",
                prompts.saturating_mul(n)
            ),
        ));
    }
    Ok(())
}

/// Sampling and stopping parameters shared by completions and chat.
pub fn engine_params(
    c: &CommonParams,
    max_tokens: usize,
) -> Result<(SamplingParams, StopParams, usize), ApiError> {
    let n = c.n.unwrap_or(1) as usize;
    let top_k = match c.top_k.unwrap_or(0) {
        k if k <= 0 => 0, // -1 and 0 both mean "off", as in vLLM
        k => k as usize,
    };
    let mut logit_bias = Vec::new();
    for (k, &v) in c.logit_bias.iter().flatten() {
        let id: u32 = k.parse().map_err(|_| {
            bad(
                "logit_bias",
                format!("logit_bias keys must be token ids, got {k:?}"),
            )
        })?;
        logit_bias.push((id, v));
    }
    let stop_token_ids = c.stop_token_ids.clone().unwrap_or_default();
    let stop = c.stop.clone().map(|s| s.into_vec()).unwrap_or_default();
    let sampling = SamplingParams {
        temperature: c.temperature.unwrap_or(1.0),
        top_p: c.top_p.unwrap_or(1.0),
        top_k,
        min_p: c.min_p.unwrap_or(0.0),
        seed: c.seed.map(|s| s as u64),
        presence_penalty: c.presence_penalty.unwrap_or(0.0),
        frequency_penalty: c.frequency_penalty.unwrap_or(0.0),
        repetition_penalty: c.repetition_penalty.unwrap_or(1.0),
        logit_bias,
    };
    let stop = StopParams {
        max_tokens,
        min_tokens: c.min_tokens.unwrap_or(0) as usize,
        ignore_eos: c.ignore_eos.unwrap_or(false),
        stop_token_ids,
        stop,
        skip_special_tokens: c.skip_special_tokens.unwrap_or(true),
    };
    Ok((sampling, stop, n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::protocol::completions::CompletionRequest;

    #[test]
    fn json_errors_name_the_field() {
        let e = parse_json::<CompletionRequest>(br#"{"prompt": "x", "max_tokens": "many"}"#)
            .unwrap_err();
        assert!(
            matches!(&e, ApiError::BadRequest { param: Some(p), .. } if p == "max_tokens"),
            "{e:?}"
        );
        let e = parse_json::<CompletionRequest>(b"{not json").unwrap_err();
        assert!(e.to_string().starts_with("invalid JSON"), "{e}");
        // Unknown fields are ignored.
        parse_json::<CompletionRequest>(br#"{"prompt": "x", "frobnicate": 3}"#).unwrap();
    }

    #[test]
    fn params_are_mapped() {
        let c = |json: &str| parse_json::<CommonParams>(json.as_bytes()).unwrap();
        assert!(engine_params(&c(r#"{"logit_bias": {"abc": 1}}"#), 5).is_err());
        let (s, st, n) =
            engine_params(&c(r#"{"top_k": -1, "stop": "x", "n": 2, "seed": 5}"#), 5).unwrap();
        assert_eq!(
            (s.top_k, st.stop.clone(), n, s.seed),
            (0, vec!["x".to_string()], 2, Some(5))
        );
    }
}
