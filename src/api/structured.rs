//! Structured outputs: OpenAI's `response_format`, vLLM's `structured_outputs`
//! object and its older `guided_*` fields, turned into one grammar compiled
//! against the vocabulary. A grammar that does not compile, or an option the
//! grammar engine cannot honour, is a 400 naming the field it came from.

use serde_json::Value;

use super::error::ApiError;
use super::protocol::CommonParams;
use crate::engine::grammar::{Grammar, GrammarCompiler, GrammarSpec};

/// The constraint a request asks for, and the field it asked with (for errors).
pub fn spec(c: &CommonParams) -> Result<Option<(GrammarSpec, &'static str)>, ApiError> {
    let mut found: Vec<(GrammarSpec, &'static str)> = Vec::new();
    if let Some(rf) = &c.response_format {
        if let Some(s) = response_format(rf)? {
            found.push((s, "response_format"));
        }
    }
    if let Some(so) = &c.structured_outputs {
        if let Some(s) = structured_outputs(so)? {
            found.push((s, "structured_outputs"));
        }
    }
    if let Some(j) = &c.guided_json {
        found.push((
            GrammarSpec::JsonSchema(schema_value(j, "guided_json")?),
            "guided_json",
        ));
    }
    if let Some(r) = &c.guided_regex {
        found.push((GrammarSpec::Regex(r.clone()), "guided_regex"));
    }
    if let Some(ch) = &c.guided_choice {
        found.push((choice(ch, "guided_choice")?, "guided_choice"));
    }
    if let Some(g) = &c.guided_grammar {
        found.push((lark(g, "guided_grammar")?, "guided_grammar"));
    }
    if c.guided_whitespace_pattern.is_some() {
        return Err(ApiError::bad_request(
            "guided_whitespace_pattern",
            "guided_whitespace_pattern is not supported",
        ));
    }
    if found.len() > 1 {
        let names: Vec<&str> = found.iter().map(|f| f.1).collect();
        return Err(ApiError::bad_request(
            found[1].1,
            format!(
                "give one structured output constraint, not several ({})",
                names.join(", ")
            ),
        ));
    }
    Ok(found.pop())
}

/// Compiles the request's constraint, if any.
pub fn compile(compiler: &GrammarCompiler, c: &CommonParams) -> Result<Option<Grammar>, ApiError> {
    let Some((spec, param)) = spec(c)? else {
        return Ok(None);
    };
    compile_spec(compiler, &spec, param).map(Some)
}

pub fn compile_spec(
    compiler: &GrammarCompiler,
    spec: &GrammarSpec,
    param: &str,
) -> Result<Grammar, ApiError> {
    compiler
        .compile(spec)
        .map_err(|e| ApiError::bad_request(param, format!("invalid {param}: {e}")))
}

/// OpenAI's `response_format`: `text`, `json_object` or `json_schema`.
fn response_format(rf: &Value) -> Result<Option<GrammarSpec>, ApiError> {
    let bad = |m: &str| ApiError::bad_request("response_format", m.to_string());
    match rf.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(any_json_object())),
        Some("json_schema") => {
            let js = rf.get("json_schema").ok_or_else(|| {
                bad("response_format.json_schema is required for type json_schema")
            })?;
            let schema = js
                .get("schema")
                .cloned()
                .unwrap_or_else(|| serde_json::json!({}));
            Ok(Some(GrammarSpec::JsonSchema(schema_value(
                &schema,
                "response_format",
            )?)))
        }
        Some(other) => Err(bad(&format!(
            "response_format type {other:?} is not supported (text, json_object, json_schema)"
        ))),
        None => Err(bad("response_format needs a `type`")),
    }
}

/// vLLM's `structured_outputs`: one of `json`, `regex`, `choice`, `grammar`,
/// `json_object`.
fn structured_outputs(so: &Value) -> Result<Option<GrammarSpec>, ApiError> {
    const P: &str = "structured_outputs";
    let Some(obj) = so.as_object() else {
        return Err(ApiError::bad_request(
            P,
            "structured_outputs must be an object",
        ));
    };
    let mut specs = Vec::new();
    for (k, v) in obj {
        if v.is_null() || v == &Value::Bool(false) {
            continue;
        }
        let spec = match k.as_str() {
            "json" => GrammarSpec::JsonSchema(schema_value(v, P)?),
            "regex" => GrammarSpec::Regex(
                v.as_str()
                    .ok_or_else(|| {
                        ApiError::bad_request(P, "structured_outputs.regex must be a string")
                    })?
                    .to_string(),
            ),
            "choice" => choice(
                &serde_json::from_value::<Vec<String>>(v.clone()).map_err(|_| {
                    ApiError::bad_request(P, "structured_outputs.choice must be a list of strings")
                })?,
                P,
            )?,
            "grammar" => lark(
                v.as_str().ok_or_else(|| {
                    ApiError::bad_request(P, "structured_outputs.grammar must be a string")
                })?,
                P,
            )?,
            "json_object" => any_json_object(),
            // Options that tune a constraint rather than add one.
            "disable_any_whitespace"
            | "disable_fallback"
            | "disable_additional_properties"
            | "whitespace_pattern"
            | "backend" => continue,
            "structural_tag" => {
                return Err(ApiError::bad_request(
                    P,
                    "structured_outputs.structural_tag is not supported",
                ))
            }
            other => {
                return Err(ApiError::bad_request(
                    P,
                    format!("unknown structured_outputs field {other:?}"),
                ))
            }
        };
        specs.push(spec);
    }
    if specs.len() > 1 {
        return Err(ApiError::bad_request(
            P,
            "structured_outputs takes one of json, regex, choice, grammar, json_object",
        ));
    }
    Ok(specs.pop())
}

fn any_json_object() -> GrammarSpec {
    GrammarSpec::JsonSchema(serde_json::json!({"type": "object"}))
}

/// A schema given as an object, or as a string holding one.
fn schema_value(v: &Value, param: &str) -> Result<Value, ApiError> {
    match v {
        Value::String(s) => serde_json::from_str(s)
            .map_err(|e| ApiError::bad_request(param, format!("the JSON schema is not JSON: {e}"))),
        Value::Object(_) | Value::Bool(_) => Ok(v.clone()),
        _ => Err(ApiError::bad_request(
            param,
            "the JSON schema must be an object",
        )),
    }
}

fn choice(choices: &[String], param: &str) -> Result<GrammarSpec, ApiError> {
    if choices.is_empty() {
        return Err(ApiError::bad_request(
            param,
            "choice needs at least one option",
        ));
    }
    Ok(GrammarSpec::choice(choices))
}

fn lark(grammar: &str, param: &str) -> Result<GrammarSpec, ApiError> {
    if grammar.contains("::=") {
        return Err(ApiError::bad_request(
            param,
            "GBNF grammars are not supported: write the grammar in Lark syntax (llguidance's \
             gbnf_to_lark converts GBNF)",
        ));
    }
    Ok(GrammarSpec::Lark(grammar.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::validate::parse_json;

    fn spec_of(json: &str) -> Result<Option<(GrammarSpec, &'static str)>, ApiError> {
        spec(&parse_json::<CommonParams>(json.as_bytes()).unwrap())
    }

    #[test]
    fn every_way_of_asking_maps_to_a_grammar() {
        let (s, p) = spec_of(r#"{"response_format": {"type": "json_object"}}"#)
            .unwrap()
            .unwrap();
        assert_eq!((s, p), (any_json_object(), "response_format"));
        let (s, _) = spec_of(
            r#"{"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer"}}}}"#,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            s,
            GrammarSpec::JsonSchema(serde_json::json!({"type": "integer"}))
        );
        assert!(spec_of(r#"{"response_format": {"type": "text"}}"#)
            .unwrap()
            .is_none());
        let (s, p) = spec_of(r#"{"structured_outputs": {"regex": "a+"}}"#)
            .unwrap()
            .unwrap();
        assert_eq!(
            (s, p),
            (GrammarSpec::Regex("a+".into()), "structured_outputs")
        );
        let (s, _) = spec_of(r#"{"guided_choice": ["a.b", "c"]}"#)
            .unwrap()
            .unwrap();
        assert_eq!(s, GrammarSpec::Regex(r"(a\.b|c)".into()));
        let (s, _) = spec_of(r#"{"guided_json": "{\"type\": \"object\"}"}"#)
            .unwrap()
            .unwrap();
        assert_eq!(s, any_json_object());
    }

    #[test]
    fn conflicts_and_unsupported_options_are_400s() {
        let e = spec_of(r#"{"guided_regex": "a", "response_format": {"type": "json_object"}}"#)
            .unwrap_err();
        assert!(e.to_string().contains("one structured output"), "{e}");
        let e = spec_of(r#"{"response_format": {"type": "xml"}}"#).unwrap_err();
        assert!(
            matches!(e, ApiError::BadRequest { param: Some(ref p), .. } if p == "response_format")
        );
        assert!(spec_of(r#"{"guided_grammar": "root ::= \"a\""}"#).is_err());
        assert!(spec_of(r#"{"structured_outputs": {"structural_tag": "x"}}"#).is_err());
    }
}
