//! Hugging Face chat templates (Jinja) rendered with minijinja, configured as
//! transformers configures Jinja: `trim_blocks`, `lstrip_blocks`, Python string
//! methods, `raise_exception`, `strftime_now` and `tojson`.

use anyhow::anyhow;
use minijinja::value::Serde;
use minijinja::{Environment, Error, ErrorKind, Value};
use serde_json::Value as Json;

const NAME: &str = "chat";

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

fn raise_exception(msg: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

fn strftime_now(format: String) -> String {
    chrono::Local::now().format(&format).to_string()
}

impl ChatTemplate {
    pub fn new(
        source: &str,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> anyhow::Result<Self> {
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(|e| anyhow!("chat template syntax: {e}"))?,
        );
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(NAME, source.to_string())
            .map_err(|e| anyhow!("invalid chat template: {e}"))?;
        Ok(Self {
            env,
            source: source.to_string(),
            bos_token,
            eos_token,
        })
    }

    /// The Jinja source (to see what conventions it teaches the model).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages` (OpenAI-shaped message objects). `extra` holds further
    /// top-level variables (`tools`, `documents`, template kwargs); its keys
    /// override the defaults.
    pub fn render(
        &self,
        messages: &Json,
        add_generation_prompt: bool,
        extra: &Json,
    ) -> anyhow::Result<String> {
        let mut ctx = serde_json::Map::new();
        ctx.insert("messages".into(), messages.clone());
        ctx.insert(
            "add_generation_prompt".into(),
            Json::Bool(add_generation_prompt),
        );
        ctx.insert(
            "bos_token".into(),
            self.bos_token.clone().unwrap_or_default().into(),
        );
        ctx.insert(
            "eos_token".into(),
            self.eos_token.clone().unwrap_or_default().into(),
        );
        if let Json::Object(map) = extra {
            for (k, v) in map {
                ctx.insert(k.clone(), v.clone());
            }
        }
        let template = self.env.get_template(NAME).map_err(|e| anyhow!("{e}"))?;
        template
            .render(Value::from(Serde(&Json::Object(ctx))))
            .map_err(|e| anyhow!("chat template error: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn renders_chatml() {
        let t = ChatTemplate::new(CHATML, None, None).unwrap();
        let out = t
            .render(
                &json!([{"role": "user", "content": "Hi"}]),
                true,
                &json!({}),
            )
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn python_helpers_work() {
        let src = "{% for m in messages %}{% if m.role not in ['user'] %}{{ raise_exception('bad role ' + m.role) }}{% endif %}\
                   {{ bos_token }}{{ m.content.strip().upper() }}{{ m | tojson }}{% if loop.last %}{% break %}{% endif %}{% endfor %}\
                   {{ strftime_now('%Y') | length }}";
        let t = ChatTemplate::new(src, Some("<s>".into()), None).unwrap();
        let out = t
            .render(
                &json!([{"role": "user", "content": " hi "}]),
                false,
                &json!({}),
            )
            .unwrap();
        assert!(out.starts_with("<s>HI{"), "{out}");
        assert!(out.ends_with('4'), "{out}");
        let err = t
            .render(
                &json!([{"role": "tool", "content": "x"}]),
                false,
                &json!({}),
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad role tool"), "{err}");
    }
}
