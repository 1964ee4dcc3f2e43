//! The tokenizer stored in a GGUF file, rebuilt with the `tokenizers` crate, and the chat
//! template of instruct models.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::AddedToken;

use crate::config::{describe, integer, read_header, string};
use crate::{ModelError, Result};

/// GGUF `tokenizer.ggml.token_type` of tokens that mark structure (`<|im_start|>`): matched
/// whole in the input, never split, hidden when decoding for display.
const TOKEN_TYPE_CONTROL: usize = 3;
/// GGUF token type of tokens a user added: matched whole, shown when decoding.
const TOKEN_TYPE_USER_DEFINED: usize = 4;

/// A byte-level BPE tokenizer built from the vocabulary and merges in a GGUF file.
///
/// ```no_run
/// let tokenizer = kv_model::Tokenizer::from_gguf_file(kv_model::default_model_path())?;
/// let ids = tokenizer.encode("Hello world")?;
/// assert_eq!(tokenizer.decode(&ids)?, "Hello world");
/// let chat = tokenizer.chat_template().expect("an instruct model").render("Hi!");
/// let ids = tokenizer.encode(&chat)?; // <|im_start|> etc. are single tokens
/// # let _ = ids;
/// # Ok::<(), kv_model::ModelError>(())
/// ```
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    add_bos: bool,
    stop_tokens: Vec<u32>,
    chat: Option<ChatTemplate>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos)
            .field("add_bos", &self.add_bos)
            .field("stop_tokens", &self.stop_tokens)
            .field("chat", &self.chat)
            .finish()
    }
}

impl Tokenizer {
    /// Reads the tokenizer of the GGUF file at `path` (header only, no weights).
    ///
    /// # Errors
    /// [`ModelError::ModelNotFound`], [`ModelError::InvalidGguf`], and those of
    /// [`Tokenizer::from_metadata`].
    pub fn from_gguf_file(path: impl AsRef<Path>) -> Result<Self> {
        let (content, _) = read_header(path.as_ref())?;
        Self::from_metadata(&content.metadata)
    }

    /// Builds the tokenizer from `tokenizer.ggml.*` metadata.
    ///
    /// Supports byte-level BPE (`tokenizer.ggml.model = "gpt2"`) with the GPT-2
    /// pre-tokenizer (`pre` absent, `default` or `gpt2`) or SmolLM's (`smollm`: every digit
    /// its own piece, then GPT-2's rules).
    ///
    /// # Errors
    /// [`ModelError::Unsupported`] for other tokenizer models or pre-tokenizers;
    /// [`ModelError::MissingMetadata`]/[`ModelError::BadMetadata`] for a malformed
    /// vocabulary; [`ModelError::Tokenizer`] when the `tokenizers` crate refuses it.
    pub fn from_metadata(md: &HashMap<String, Value>) -> Result<Self> {
        let model = string(md, "tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(ModelError::Unsupported {
                what: "tokenizer",
                detail: format!(
                    "tokenizer.ggml.model {model:?} (supported: \"gpt2\" byte-level BPE)"
                ),
            });
        }
        let pre = match md.get("tokenizer.ggml.pre") {
            None => "default",
            Some(_) => string(md, "tokenizer.ggml.pre")?,
        };
        let byte_level = ByteLevel::new(false, true, true);
        let pre_tokenizer: PreTokenizerWrapper = match pre {
            "default" | "gpt2" => byte_level.into(),
            "smollm" => Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into(),
            other => {
                return Err(ModelError::Unsupported {
                    what: "pre-tokenizer",
                    detail: format!(
                    "tokenizer.ggml.pre {other:?} (supported: \"default\", \"gpt2\", \"smollm\")"
                ),
                })
            }
        };

        let tokens = string_array(md, "tokenizer.ggml.tokens")?;
        let merges = string_array(md, "tokenizer.ggml.merges")?;
        let types = match md.get("tokenizer.ggml.token_type") {
            None => vec![1; tokens.len()],
            Some(Value::Array(a)) if a.len() == tokens.len() => a
                .iter()
                .map(|v| integer(v, "tokenizer.ggml.token_type"))
                .collect::<Result<Vec<_>>>()?,
            Some(other) => {
                return Err(ModelError::BadMetadata {
                    key: "tokenizer.ggml.token_type".into(),
                    expected: format!("an array of {} integers", tokens.len()),
                    got: describe(other),
                })
            }
        };

        let vocab: HashMap<String, u32, ahash::RandomState> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        if vocab.len() != tokens.len() {
            return Err(ModelError::BadMetadata {
                key: "tokenizer.ggml.tokens".into(),
                expected: "distinct tokens".into(),
                got: format!("{} tokens of which {} distinct", tokens.len(), vocab.len()),
            });
        }
        let merges = merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| ModelError::BadMetadata {
                        key: "tokenizer.ggml.merges".into(),
                        expected: "pairs written \"left right\"".into(),
                        got: format!("{m:?}"),
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(ModelError::tokenizer)?;

        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        let special: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &t)| t == TOKEN_TYPE_CONTROL)
            .map(|(s, _)| AddedToken::from(s.to_string(), true))
            .collect();
        inner.add_special_tokens(&special);
        let user: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &t)| t == TOKEN_TYPE_USER_DEFINED)
            .map(|(s, _)| AddedToken::from(s.to_string(), false))
            .collect();
        inner.add_tokens(&user);

        let id = |key: &str| -> Result<Option<u32>> {
            match md.get(key) {
                None => Ok(None),
                Some(v) => {
                    let id = integer(v, key)?;
                    if id >= tokens.len() {
                        return Err(ModelError::BadMetadata {
                            key: key.into(),
                            expected: format!("a token id below {}", tokens.len()),
                            got: id.to_string(),
                        });
                    }
                    Ok(Some(id as u32))
                }
            }
        };
        let bos = id("tokenizer.ggml.bos_token_id")?;
        let add_bos = matches!(
            md.get("tokenizer.ggml.add_bos_token"),
            Some(Value::Bool(true))
        );
        let mut stop_tokens = Vec::new();
        for key in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"] {
            stop_tokens.extend(id(key)?);
        }
        // Instruct models end a turn with eos but base-model habits end documents with
        // <|endoftext|>: stop at either.
        stop_tokens.extend(inner.token_to_id("<|endoftext|>"));
        stop_tokens.sort_unstable();
        stop_tokens.dedup();

        let chat = match md.get("tokenizer.chat_template") {
            Some(Value::String(t)) => ChatTemplate::from_jinja(t),
            _ => None,
        };
        Ok(Self {
            inner,
            bos,
            add_bos,
            stop_tokens,
            chat,
        })
    }

    /// Token ids of `text`. Control tokens written in the text (`<|im_start|>`) become their
    /// single ids; the BOS token is prepended when the file asks for it.
    ///
    /// # Errors
    /// [`ModelError::Tokenizer`].
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(ModelError::tokenizer)?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if self.add_bos {
            ids.extend(self.bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// The BOS token when the vocabulary asks for it to be prepended (GGUF
    /// `tokenizer.ggml.add_bos_token`, as llama.cpp reads it), else `None`. [`encode`]
    /// prepends it; perplexity puts it first in every chunk.
    ///
    /// [`encode`]: Tokenizer::encode
    pub fn bos_to_add(&self) -> Option<u32> {
        self.bos.filter(|_| self.add_bos)
    }

    /// Text of `ids` for display: control tokens are left out.
    ///
    /// # Errors
    /// [`ModelError::Tokenizer`].
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(ModelError::tokenizer)
    }

    /// Tokens that end generation (end of turn, end of text).
    pub fn stop_tokens(&self) -> &[u32] {
        &self.stop_tokens
    }

    /// The chat format of instruct models, when the file's template is one this crate knows.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat.as_ref()
    }

    /// Tokens in the vocabulary, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a token written as in the vocabulary (`"<|im_end|>"`, `"Ġthe"`).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The vocabulary entry of `id`.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// A streaming decoder that turns tokens into text as they come.
    pub fn stream(&self) -> TextStream<'_> {
        TextStream {
            tokenizer: self,
            pending: Vec::new(),
        }
    }
}

fn string_array<'a>(md: &'a HashMap<String, Value>, key: &str) -> Result<Vec<&'a str>> {
    match md.get(key) {
        Some(Value::Array(a)) if !a.is_empty() => a
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.as_str()),
                other => Err(ModelError::BadMetadata {
                    key: key.into(),
                    expected: "an array of strings".into(),
                    got: format!("an array holding {}", describe(other)),
                }),
            })
            .collect(),
        Some(other) => Err(ModelError::BadMetadata {
            key: key.into(),
            expected: "a non-empty array of strings".into(),
            got: describe(other),
        }),
        None => Err(ModelError::MissingMetadata { key: key.into() }),
    }
}

/// Turns generated tokens into text piece by piece.
///
/// One token can hold part of a UTF-8 character (byte-level BPE splits emoji and accents);
/// text is released only once the pending bytes form whole characters.
#[derive(Debug)]
pub struct TextStream<'a> {
    tokenizer: &'a Tokenizer,
    pending: Vec<u32>,
}

impl TextStream<'_> {
    /// Adds a token; returns the text it completes, if any.
    ///
    /// # Errors
    /// [`ModelError::Tokenizer`].
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.pending.push(id);
        let text = self.tokenizer.decode(&self.pending)?;
        if text.ends_with('\u{FFFD}') {
            return Ok(None);
        }
        self.pending.clear();
        Ok((!text.is_empty()).then_some(text))
    }

    /// Whatever is still pending, invalid bytes shown as U+FFFD.
    ///
    /// # Errors
    /// [`ModelError::Tokenizer`].
    pub fn finish(&mut self) -> Result<Option<String>> {
        let text = self.tokenizer.decode(&self.pending)?;
        self.pending.clear();
        Ok((!text.is_empty()).then_some(text))
    }
}

/// The ChatML conversation format (`<|im_start|>role\n...<|im_end|>\n`) used by SmolLM2,
/// Qwen and others, with the default system prompt the model was trained with.
///
/// ```
/// use kv_model::ChatTemplate;
/// let t = ChatTemplate::chatml(Some("Be brief.".into()));
/// assert_eq!(
///     t.render("Hi"),
///     "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
/// );
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatTemplate {
    default_system: Option<String>,
}

impl ChatTemplate {
    /// ChatML with an optional system prompt.
    pub fn chatml(default_system: Option<String>) -> Self {
        Self { default_system }
    }

    /// Recognises a ChatML Jinja template (as stored in `tokenizer.chat_template`) and the
    /// literal default system prompt it inserts when the conversation has none. `None` for
    /// other formats: the caller then needs raw prompts.
    pub fn from_jinja(template: &str) -> Option<Self> {
        if !template.contains("<|im_start|>") {
            return None;
        }
        const SYSTEM: &str = "<|im_start|>system\n";
        let default_system = template.find(SYSTEM).and_then(|at| {
            let rest = &template[at + SYSTEM.len()..];
            let end = rest.find("<|im_end|>")?;
            let text = &rest[..end];
            // A literal, not a Jinja expression such as `{{ message['content'] }}`.
            (!text.contains("{{") && !text.contains("{%") && !text.trim().is_empty())
                .then(|| text.to_string())
        });
        Some(Self { default_system })
    }

    /// The system prompt used when the caller gives none.
    pub fn default_system(&self) -> Option<&str> {
        self.default_system.as_deref()
    }

    /// One user turn followed by the opening of the assistant's turn, with the default
    /// system prompt.
    pub fn render(&self, user: &str) -> String {
        self.render_with_system(self.default_system.as_deref(), user)
    }

    /// As [`ChatTemplate::render`] with an explicit system prompt (`None`: no system turn).
    pub fn render_with_system(&self, system: Option<&str>, user: &str) -> String {
        let mut out = String::new();
        if let Some(system) = system {
            out.push_str("<|im_start|>system\n");
            out.push_str(system);
            out.push_str("<|im_end|>\n");
        }
        out.push_str("<|im_start|>user\n");
        out.push_str(user);
        out.push_str("<|im_end|>\n<|im_start|>assistant\n");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The SmolLM2-Instruct template as stored in its GGUF file.
    const SMOLLM2_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn chatml_template_and_default_system_prompt() {
        let t = ChatTemplate::from_jinja(SMOLLM2_TEMPLATE).unwrap();
        assert_eq!(
            t.default_system(),
            Some("You are a helpful AI assistant named SmolLM, trained by Hugging Face")
        );
        assert_eq!(
            t.render("What is 2+2?"),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            t.render_with_system(None, "x"),
            "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn other_templates_are_not_chatml() {
        assert_eq!(
            ChatTemplate::from_jinja("[INST] {{ message }} [/INST]"),
            None
        );
        let no_default = "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}{% endfor %}";
        assert_eq!(
            ChatTemplate::from_jinja(no_default),
            Some(ChatTemplate::chatml(None))
        );
    }

    /// A tiny byte-level vocabulary: enough to check the GGUF-to-tokenizers wiring.
    fn tiny() -> HashMap<String, Value> {
        let s = |x: &str| Value::String(x.into());
        let tokens = [
            "<|endoftext|>",
            "<|im_start|>",
            "<|im_end|>",
            "h",
            "i",
            "Ġ",
            "1",
            "2",
            "\u{10a}", // "Ċ" = '\n' in byte-level
            "hi",
            "Ġhi",
            "12",
        ];
        let types = [3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1];
        let mut md = HashMap::new();
        md.insert("tokenizer.ggml.model".into(), s("gpt2"));
        md.insert("tokenizer.ggml.pre".into(), s("smollm"));
        md.insert(
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.iter().map(|t| s(t)).collect()),
        );
        md.insert(
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.iter().map(|&t| Value::I32(t)).collect()),
        );
        md.insert(
            "tokenizer.ggml.merges".into(),
            Value::Array(vec![s("h i"), s("Ġ hi"), s("1 2")]),
        );
        md.insert("tokenizer.ggml.bos_token_id".into(), Value::U32(1));
        md.insert("tokenizer.ggml.eos_token_id".into(), Value::U32(2));
        md.insert("tokenizer.ggml.add_bos_token".into(), Value::Bool(false));
        md
    }

    #[test]
    fn builds_from_metadata_with_special_tokens_and_digit_splitting() {
        let t = Tokenizer::from_metadata(&tiny()).unwrap();
        assert_eq!(t.encode("hi hi").unwrap(), vec![9, 10]);
        // "12" is in the vocabulary, but SmolLM splits digits before BPE.
        assert_eq!(t.encode("12").unwrap(), vec![6, 7]);
        assert_eq!(t.encode("<|im_start|>hi<|im_end|>").unwrap(), vec![1, 9, 2]);
        assert_eq!(t.decode(&[1, 9, 10, 2]).unwrap(), "hi hi");
        assert_eq!(t.stop_tokens(), &[0, 2]);
    }

    #[test]
    fn stream_releases_text_as_tokens_come() {
        let t = Tokenizer::from_metadata(&tiny()).unwrap();
        let mut s = t.stream();
        assert_eq!(s.push(9).unwrap().as_deref(), Some("hi"));
        assert_eq!(s.push(2).unwrap(), None); // control token: nothing to show
        assert_eq!(s.push(10).unwrap().as_deref(), Some(" hi"));
        assert_eq!(s.finish().unwrap(), None);
    }

    #[test]
    fn unsupported_and_malformed_tokenizers_are_errors() {
        let mut md = tiny();
        md.insert("tokenizer.ggml.model".into(), Value::String("llama".into()));
        assert!(matches!(
            Tokenizer::from_metadata(&md),
            Err(ModelError::Unsupported {
                what: "tokenizer",
                ..
            })
        ));
        let mut md = tiny();
        md.insert("tokenizer.ggml.pre".into(), Value::String("qwen2".into()));
        assert!(matches!(
            Tokenizer::from_metadata(&md),
            Err(ModelError::Unsupported {
                what: "pre-tokenizer",
                ..
            })
        ));
        let mut md = tiny();
        md.insert(
            "tokenizer.ggml.merges".into(),
            Value::Array(vec![Value::String("nospace".into())]),
        );
        assert!(matches!(
            Tokenizer::from_metadata(&md),
            Err(ModelError::BadMetadata { .. })
        ));
        let mut md = tiny();
        md.insert("tokenizer.ggml.eos_token_id".into(), Value::U32(999));
        assert!(matches!(
            Tokenizer::from_metadata(&md),
            Err(ModelError::BadMetadata { .. })
        ));
        let mut md = tiny();
        md.remove("tokenizer.ggml.tokens");
        assert!(matches!(
            Tokenizer::from_metadata(&md),
            Err(ModelError::MissingMetadata { .. })
        ));
    }
}
