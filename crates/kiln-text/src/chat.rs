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
    /// What was said.
    pub content: String,
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
        let user = Message { role: "user".into(), content: "Hi?".into() };
        let out = render_chat(SMOLLM, std::slice::from_ref(&user), "", "").unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
        );
        let system = Message { role: "system".into(), content: "Be brief.".into() };
        let out = render_chat(SMOLLM, &[system, user], "", "").unwrap();
        assert!(out.starts_with("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user"), "{out}");
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
