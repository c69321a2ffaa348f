//! Chat prompts: render messages with the Jinja chat template stored in the GGUF
//! (`tokenizer.chat_template`), the way Hugging Face and llama.cpp do. A model without a
//! template (a base model such as gemma3-270m) gets a clear error, unless the caller opts
//! into the documented fallback: Gemma's turn format for gemma-family models.

pub use tessera_protocol::ChatMessage;

/// Why messages could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// The model has no chat template and no fallback was allowed.
    #[error("{model} has no chat template (tokenizer.chat_template): it is a base model that continues text; send a raw prompt (completions, or --raw) instead{hint}")]
    NoTemplate {
        /// Model name for the message.
        model: String,
        /// How to opt into a fallback, where one exists.
        hint: &'static str,
    },
    /// The template failed to parse or render.
    #[error("chat template error: {0}")]
    Template(String),
}

/// How a model's messages become a prompt string.
#[derive(Debug, Clone)]
pub enum ChatTemplate {
    /// The Jinja source from the GGUF.
    Jinja(String),
    /// Gemma's `<start_of_turn>` format, used only when the caller allows the fallback.
    GemmaTurns,
    /// No template and no fallback for this architecture.
    None,
}

impl ChatTemplate {
    /// Picks the template for a model from its metadata.
    pub fn for_model(template: Option<&str>, arch: crate::gguf::Architecture) -> Self {
        match (template, arch) {
            (Some(src), _) => Self::Jinja(src.to_owned()),
            (None, crate::gguf::Architecture::Gemma3) => Self::GemmaTurns,
            (None, _) => Self::None,
        }
    }

    /// True when the GGUF itself carries a template.
    pub fn is_native(&self) -> bool {
        matches!(self, Self::Jinja(_))
    }

    /// Renders `messages` followed by the assistant's opening, ready to tokenize with special
    /// tokens parsed. `allow_fallback` permits a non-native format.
    pub fn render(
        &self,
        model: &str,
        messages: &[ChatMessage],
        bos_token: &str,
        eos_token: &str,
        allow_fallback: bool,
    ) -> Result<String, ChatError> {
        match self {
            Self::Jinja(src) => render_jinja(src, messages, bos_token, eos_token),
            Self::GemmaTurns if allow_fallback => Ok(render_gemma(messages)),
            Self::GemmaTurns => Err(ChatError::NoTemplate {
                model: model.to_owned(),
                hint: "; or allow Gemma's turn format as a fallback (--chat-format gemma), which a base model follows poorly",
            }),
            Self::None => Err(ChatError::NoTemplate { model: model.to_owned(), hint: "" }),
        }
    }
}

fn render_jinja(
    src: &str,
    messages: &[ChatMessage],
    bos: &str,
    eos: &str,
) -> Result<String, ChatError> {
    let mut env = minijinja::Environment::new();
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    env.add_template("chat", src)
        .map_err(|e| ChatError::Template(e.to_string()))?;
    let tmpl = env
        .get_template("chat")
        .map_err(|e| ChatError::Template(e.to_string()))?;
    tmpl.render(minijinja::context! {
        messages => messages,
        add_generation_prompt => true,
        bos_token => bos,
        eos_token => eos,
    })
    .map_err(|e| ChatError::Template(e.to_string()))
}

/// Gemma's turn format; system text is prepended to the first user turn, as Gemma's own
/// instruction-tuned template does.
fn render_gemma(messages: &[ChatMessage]) -> String {
    let mut out = String::new();
    let mut system = String::new();
    for m in messages {
        match m.role.as_str() {
            "system" => {
                system.push_str(&m.content);
                system.push_str("\n\n");
            }
            role => {
                let role = if role == "assistant" { "model" } else { role };
                out.push_str("<start_of_turn>");
                out.push_str(role);
                out.push('\n');
                out.push_str(&std::mem::take(&mut system));
                out.push_str(m.content.trim());
                out.push_str("<end_of_turn>\n");
            }
        }
    }
    out.push_str("<start_of_turn>model\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::Architecture;

    const SMOLLM_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn smollm_template_inserts_default_system_prompt() {
        let t = ChatTemplate::for_model(Some(SMOLLM_TEMPLATE), Architecture::Llama);
        let s = t
            .render("m", &[ChatMessage::user("Hi")], "", "", false)
            .expect("renders");
        assert_eq!(
            s,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn python_methods_and_raise_exception_work() {
        let src = "{% if messages|length > 1 %}{{ raise_exception('one message only') }}{% endif %}{{ messages[0]['content'].strip().upper() }}";
        let t = ChatTemplate::Jinja(src.into());
        assert_eq!(
            t.render("m", &[ChatMessage::user("  hi ")], "", "", false)
                .expect("renders"),
            "HI"
        );
        let two = [ChatMessage::user("a"), ChatMessage::user("b")];
        let err = t.render("m", &two, "", "", false).expect_err("raises");
        assert!(err.to_string().contains("one message only"), "{err}");
    }

    #[test]
    fn base_model_without_template_is_refused_unless_fallback_allowed() {
        let t = ChatTemplate::for_model(None, Architecture::Gemma3);
        let err = t
            .render(
                "gemma3-270m",
                &[ChatMessage::user("Hi")],
                "<bos>",
                "<eos>",
                false,
            )
            .expect_err("refused");
        assert!(err.to_string().contains("no chat template"), "{err}");
        let s = t
            .render(
                "gemma3-270m",
                &[
                    ChatMessage {
                        role: "system".into(),
                        content: "Be brief.".into(),
                    },
                    ChatMessage::user("Hi"),
                ],
                "<bos>",
                "<eos>",
                true,
            )
            .expect("fallback");
        assert_eq!(
            s,
            "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
        );
        assert!(ChatTemplate::for_model(None, Architecture::Llama)
            .render("x", &[], "", "", true)
            .is_err());
    }
}
