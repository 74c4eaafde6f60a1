//! Chat prompts: messages rendered with a model's own chat template (the Jinja template
//! GGUF files and `tokenizer_config.json` carry), as Hugging Face's
//! `apply_chat_template(..., add_generation_prompt=True)` renders them.

use kiln_core::{Error, Result};
use serde::{Deserialize, Serialize};

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// What was said: text, or parts (text and images) in order.
    pub content: Content,
}

impl Message {
    /// A message of plain text.
    pub fn text(role: impl Into<String>, text: impl Into<String>) -> Self {
        Message { role: role.into(), content: Content::Text(text.into()) }
    }

    /// The message's images, in order.
    pub fn images(&self) -> impl Iterator<Item = &Part> {
        let parts: &[Part] = match &self.content {
            Content::Text(_) => &[],
            Content::Parts(parts) => parts,
        };
        parts.iter().filter(|p| !matches!(p, Part::Text { .. }))
    }
}

/// A message's content: a string, or a list of parts (OpenAI's and Hugging Face's
/// shapes alike), which the chat template renders in order — images as the model's
/// image placeholder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Text and images, in order.
    Parts(Vec<Part>),
}

/// One part of a message's content, tagged by `type`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Part {
    /// `{"type": "text", "text": ...}`.
    Text {
        /// The text.
        text: String,
    },
    /// `{"type": "image", "path": ...}` (a file; relative paths are the caller's to
    /// resolve) or `{"type": "image", "url": "data:..."}`.
    Image {
        /// A file.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        path: Option<std::path::PathBuf>,
        /// A `data:` URL.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        url: Option<String>,
    },
    /// OpenAI's `{"type": "image_url", "image_url": {"url": ...}}`.
    ImageUrl {
        /// Where the image is.
        image_url: ImageUrl,
    },
}

/// OpenAI's `image_url` object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageUrl {
    /// A `data:` URL, or a remote one (refused: kiln fetches nothing).
    pub url: String,
    /// OpenAI's detail hint; kiln's processor settings decide instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// `messages` rendered with `template`, ending with the prompt for the assistant's turn.
/// `bos` and `eos` are the template's `bos_token` and `eos_token`.
pub fn render_chat(template: &str, messages: &[Message], bos: &str, eos: &str) -> Result<String> {
    let mut env = minijinja::Environment::new();
    // Templates signal misuse (e.g. roles out of order) by calling raise_exception.
    env.add_function("raise_exception", |message: String| -> std::result::Result<String, minijinja::Error> {
        Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, message))
    });
    let bad = |e: minijinja::Error| Error::InvalidInput(format!("the model's chat template: {e}"));
    env.add_template("chat", template).map_err(bad)?;
    let context = minijinja::context! {
        messages => messages,
        add_generation_prompt => true,
        bos_token => bos,
        eos_token => eos,
    };
    env.get_template("chat").and_then(|t| t.render(context)).map_err(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-Instruct's template, as its GGUF file carries it.
    const SMOLLM: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn a_chatml_template_renders_as_hugging_face_does() {
        let user = Message::text("user", "Hi?");
        let out = render_chat(SMOLLM, std::slice::from_ref(&user), "", "").unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
        );
        let system = Message::text("system", "Be brief.");
        let out = render_chat(SMOLLM, &[system, user], "", "").unwrap();
        assert!(out.starts_with("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user"), "{out}");
    }

    /// Qwen2-VL's template (the fixture's), as its chat_template.json carries it.
    const QWEN_VL: &str = "{% set image_count = namespace(value=0) %}{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}<|vision_start|><|image_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

    #[test]
    fn image_parts_render_as_the_template_places_them() {
        let json = r#"{"role": "user", "content": [{"type": "image", "path": "a.png"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            {"type": "text", "text": "Compare these images."}]}"#;
        let message: Message = serde_json::from_str(json).unwrap();
        assert_eq!(message.images().count(), 2);
        let out = render_chat(QWEN_VL, &[message], "", "").unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n\
             <|vision_start|><|image_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|>\
             Compare these images.<|im_end|>\n<|im_start|>assistant\n"
        );
        // A plain string still renders as before; an unknown part type is refused by name.
        assert!(
            render_chat(QWEN_VL, &[Message::text("user", "Hi")], "", "")
                .unwrap()
                .contains("user\nHi<|im_end|>")
        );
        let bad = serde_json::from_str::<Message>(r#"{"role": "user", "content": [{"type": "audio"}]}"#);
        assert!(bad.is_err());
    }

    #[test]
    fn a_template_error_names_the_template() {
        let err = render_chat("{{ raise_exception('roles must alternate') }}", &[], "", "").unwrap_err();
        assert!(
            err.to_string().contains("chat template") && err.to_string().contains("roles must alternate"),
            "{err}"
        );
        assert!(render_chat("{% for %}", &[], "", "").is_err());
    }
}
