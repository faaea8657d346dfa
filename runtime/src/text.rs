//! Text in and out: the tokenizer (`tokenizer.json`, with the `tokenizers`
//! crate Hugging Face's own tokenizers are built on) and the chat template
//! (`tokenizer_config.json`'s Jinja, rendered with minijinja and Python's
//! string methods, as `apply_chat_template` renders it).

use std::path::Path;

use minijinja::{context, Environment, ErrorKind};
use serde_json::Value;

use crate::{Error, Result};

/// A model's tokenizer and chat template.
pub struct Text {
    tokenizer: tokenizers::Tokenizer,
    template: Option<Environment<'static>>,
    bos_token: String,
    eos_token: String,
    /// Tokens that end a generation.
    pub eos_ids: Vec<u32>,
}

/// A token in `tokenizer_config.json`: a string or an added-token object.
fn token_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    }
}

impl Text {
    /// Reads `dir/tokenizer.json` and, where present,
    /// `dir/tokenizer_config.json`; `eos_ids` are the model config's.
    pub fn load(dir: &Path, eos_ids: &[u32]) -> Result<Text> {
        let path = dir.join("tokenizer.json");
        let tokenizer = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| Error::Model(format!("{}: {e}", path.display())))?;
        let config_path = dir.join("tokenizer_config.json");
        let config: Value = match std::fs::read_to_string(&config_path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| Error::Model(format!("{}: {e}", config_path.display())))?,
            Err(_) => Value::Null,
        };
        Text::with(
            tokenizer,
            &config,
            eos_ids,
            &config_path.display().to_string(),
        )
    }

    /// A tokenizer given as `tokenizer.json`'s text and the contents of
    /// `tokenizer_config.json` (`Null`: none); errors name `origin`.
    pub fn from_json(
        tokenizer_json: &str,
        config: &Value,
        eos_ids: &[u32],
        origin: &str,
    ) -> Result<Text> {
        let tokenizer = tokenizer_json
            .parse::<tokenizers::Tokenizer>()
            .map_err(|e| Error::Model(format!("{origin}: tokenizer.json: {e}")))?;
        Text::with(tokenizer, config, eos_ids, origin)
    }

    fn with(
        tokenizer: tokenizers::Tokenizer,
        config: &Value,
        eos_ids: &[u32],
        origin: &str,
    ) -> Result<Text> {
        let bos_token = token_text(&config["bos_token"]).unwrap_or_default();
        let eos_token = token_text(&config["eos_token"]).unwrap_or_default();
        let template = match &config["chat_template"] {
            Value::String(t) => Some(t.clone()),
            // named templates: the default one
            Value::Array(list) => list
                .iter()
                .find(|t| t["name"] == "default")
                .and_then(|t| t["template"].as_str())
                .map(str::to_owned),
            _ => None,
        };
        let template = match template {
            Some(t) => Some(environment(t).map_err(|e| {
                Error::Model(format!("{origin}: chat_template does not parse: {e}"))
            })?),
            None => None,
        };
        let mut ids: Vec<u32> = eos_ids.to_vec();
        if let Some(id) = tokenizer.token_to_id(&eos_token) {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        Ok(Text {
            tokenizer,
            template,
            bos_token,
            eos_token,
            eos_ids: ids,
        })
    }

    /// Token ids of a plain prompt, with the special tokens the
    /// tokenizer's post-processor adds (a BOS, for Llama 3).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer
            .encode(text, true)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| Error::Request(format!("cannot tokenize the prompt: {e}")))
    }

    /// Token ids of text the chat template rendered (which holds its own
    /// special tokens).
    pub fn encode_rendered(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| Error::Request(format!("cannot tokenize the conversation: {e}")))
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        self.tokenizer.decode(ids, true).unwrap_or_default()
    }

    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// The conversation `messages` (OpenAI chat messages) rendered by the
    /// model's chat template, ready for the assistant's answer.
    pub fn render_chat(&self, messages: &Value) -> Result<String> {
        let env = self.template.as_ref().ok_or_else(|| {
            Error::Request(
                "this model has no chat_template in tokenizer_config.json; use /v1/completions"
                    .into(),
            )
        })?;
        let Value::Array(list) = messages else {
            return Err(Error::Request("messages must be an array".into()));
        };
        for (i, m) in list.iter().enumerate() {
            if !m["role"].is_string() {
                return Err(Error::Request(format!(
                    "messages[{i}].role must be a string"
                )));
            }
        }
        let template = env
            .get_template("chat")
            .map_err(|e| Error::Model(format!("chat template: {e}")))?;
        template
            .render(context! {
                messages => minijinja::Value::from_serialize(messages),
                add_generation_prompt => true,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| match e.kind() {
                ErrorKind::InvalidOperation => {
                    Error::Request(format!("the chat template refused the messages: {e}"))
                }
                _ => Error::Request(format!("cannot render the chat template: {e}")),
            })
    }
}

fn environment(template: String) -> std::result::Result<Environment<'static>, minijinja::Error> {
    let mut env = Environment::new();
    // as transformers compiles chat templates
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        },
    );
    env.add_template_owned("chat", template)?;
    Ok(env)
}
