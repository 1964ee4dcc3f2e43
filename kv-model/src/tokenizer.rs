//! The tokenizer stored in a GGUF file: SentencePiece BPE (`tokenizer.ggml.model =
//! "llama"`, our own implementation of llama.cpp's algorithm) or byte-level BPE (`"gpt2"`,
//! the `tokenizers` crate's BPE with the pre-tokenizer the file names), with the file's
//! special tokens, BOS/EOS policy and chat template.

mod spm;

use std::collections::HashMap;
use std::path::Path;

use aho_corasick::{AhoCorasick, MatchKind};
use candle_core::quantized::gguf_file::Value;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::SplitDelimiterBehavior;

use crate::chat::ChatTemplate;
use crate::config::{describe, integer, read_header, string};
use crate::{ModelError, Result};
use spm::{parse_byte_token, SentencePiece, SPACE_MARK};

/// GGUF `tokenizer.ggml.token_type` of a piece of text (also the default).
const TOKEN_TYPE_NORMAL: usize = 1;
/// GGUF token type of the unknown token (`<unk>`): special, like control tokens.
const TOKEN_TYPE_UNKNOWN: usize = 2;
/// GGUF token type of tokens that mark structure (`<|im_start|>`): matched whole in the
/// input when special tokens are parsed, never split, hidden when decoding for display.
const TOKEN_TYPE_CONTROL: usize = 3;
/// GGUF token type of tokens a user added: always matched whole, shown when decoding.
const TOKEN_TYPE_USER_DEFINED: usize = 4;
/// GGUF token type of SentencePiece's `<0xNN>` byte-fallback tokens.
const TOKEN_TYPE_BYTE: usize = 6;

/// The tokenizer models GGUF files name in `tokenizer.ggml.model` that kv implements.
const SUPPORTED_MODELS: &str = "\"llama\" (SentencePiece BPE), \"gpt2\" (byte-level BPE)";

/// The byte-level pre-tokenizers for which llama.cpp prepends BOS when the file has no
/// `tokenizer.ggml.add_bos_token` (llama-vocab.cpp: the Llama 3 family, tekken, chameleon).
const BPE_PRE_WITH_BOS: &[&str] = &[
    "llama3",
    "llama-v3",
    "llama-bpe",
    "falcon3",
    "falcon-h1",
    "pixtral",
    "midm-2.0",
    "lfm2",
    "jina-v5-nano",
    "tekken",
    "chameleon",
];

/// The byte-level pre-tokenizers, by the names GGUF files give in `tokenizer.ggml.pre`
/// (llama.cpp's names; several names share one rule set).
const SUPPORTED_PRE: &str = "default, gpt2, gpt-2, phi-2, mpt, olmo, jais, trillion, \
     roberta-bpe, exaone4, llama-bpe, llama3, llama-v3, falcon3, falcon-h1, pixtral, midm-2.0, \
     lfm2, dbrx, smaug-bpe, qwen2, deepseek-r1-qwen, stablelm2, megrez, hunyuan, kormo, \
     qwen35, smollm, starcoder, refact, command-r, codeshell, exaone, minerva-7b, falcon, \
     gpt-4o, llama4";

/// GPT-2's split rule, which `tokenizers`' `ByteLevel` applies with `use_regex`.
const GPT2_REGEX: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// Llama 3's split rule (its `tokenizer.json`).
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen 2's split rule: Llama 3's with single digits.
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen 3.5's split rule: Qwen 2's with combining marks inside words.
const QWEN35_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// GPT-4o's split rule (also Llama 4's).
const GPT4O_REGEX: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A GGUF file's tokenizer: text to token ids and back.
///
/// ```no_run
/// let tokenizer = kv_model::Tokenizer::from_gguf_file(kv_model::default_model_path())?;
/// let ids = tokenizer.encode("Hello world")?;
/// assert_eq!(tokenizer.decode(&ids)?, "Hello world");
/// let chat = tokenizer.chat_template().expect("an instruct model").render("Hi!")?;
/// let ids = tokenizer.encode(&chat)?; // <|im_start|> etc. are single tokens
/// # let _ = ids;
/// # Ok::<(), kv_model::ModelError>(())
/// ```
pub struct Tokenizer {
    model: Model,
    /// Piece text of every id.
    tokens: Vec<String>,
    /// GGUF token type of every id.
    types: Vec<usize>,
    /// Splits text at control, unknown and user-defined tokens (special tokens parsed).
    all_special: Option<Splitter>,
    /// Splits text at user-defined tokens only (special tokens taken as text).
    user_defined: Option<Splitter>,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    stop_tokens: Vec<u32>,
    chat: Option<ChatTemplate>,
}

/// The subword model under the special-token handling.
enum Model {
    /// SentencePiece BPE; `add_space_prefix` puts a space before text that starts the input
    /// or follows a special token.
    SentencePiece {
        model: Box<SentencePiece>,
        add_space_prefix: bool,
    },
    /// Byte-level BPE with its pre-tokenizer (the `tokenizers` crate).
    ByteLevel(Box<tokenizers::Tokenizer>),
}

/// Finds whole special tokens in text (leftmost, longest first).
struct Splitter {
    matcher: AhoCorasick,
    ids: Vec<u32>,
}

impl Splitter {
    fn new(tokens: &[String], ids: Vec<u32>) -> Result<Option<Self>> {
        if ids.is_empty() {
            return Ok(None);
        }
        let patterns = ids.iter().map(|&id| tokens[id as usize].as_str());
        let matcher = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(patterns)
            .map_err(ModelError::tokenizer)?;
        Ok(Some(Self { matcher, ids }))
    }
}

/// A piece of the input: text for the subword model, or a special token found whole.
enum Fragment<'a> {
    Text(&'a str),
    Token(u32),
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let model = match &self.model {
            Model::SentencePiece { .. } => "SentencePiece BPE",
            Model::ByteLevel(_) => "byte-level BPE",
        };
        f.debug_struct("Tokenizer")
            .field("model", &model)
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("add_bos", &self.add_bos)
            .field("add_eos", &self.add_eos)
            .field("stop_tokens", &self.stop_tokens)
            .field("chat", &self.chat)
            .finish()
    }
}

impl Tokenizer {
    /// Reads the tokenizer of the GGUF file at `path` (header only: it works on
    /// vocabulary-only files without tensors).
    ///
    /// # Errors
    /// [`ModelError::ModelNotFound`], [`ModelError::InvalidGguf`], and those of
    /// [`Tokenizer::from_metadata`].
    pub fn from_gguf_file(path: impl AsRef<Path>) -> Result<Self> {
        let (content, _) = read_header(path.as_ref())?;
        Self::from_metadata(&content.metadata)
    }

    /// Builds the tokenizer from `tokenizer.ggml.*` metadata, with llama.cpp's defaults for
    /// keys a file leaves out.
    ///
    /// Supports SentencePiece BPE (`tokenizer.ggml.model = "llama"`: scores, `<0xNN>` byte
    /// fallback, `tokenizer.ggml.add_space_prefix`) and byte-level BPE (`"gpt2"`) with the
    /// pre-tokenizers of Llama 3, Qwen 2, SmolLM, GPT-2 and the others llama.cpp names
    /// (see the error for the list).
    ///
    /// # Errors
    /// [`ModelError::Unsupported`] for other tokenizer models or pre-tokenizers;
    /// [`ModelError::MissingMetadata`]/[`ModelError::BadMetadata`] for a malformed
    /// vocabulary; [`ModelError::Tokenizer`] when the `tokenizers` crate refuses it.
    pub fn from_metadata(md: &HashMap<String, Value>) -> Result<Self> {
        let kind = string(md, "tokenizer.ggml.model")?;
        if kind != "llama" && kind != "gpt2" {
            return Err(ModelError::Unsupported {
                what: "tokenizer",
                detail: format!("tokenizer.ggml.model {kind:?} (supported: {SUPPORTED_MODELS})"),
            });
        }
        let token_strs = string_array(md, "tokenizer.ggml.tokens")?;
        if u32::try_from(token_strs.len()).is_err() {
            return Err(ModelError::BadMetadata {
                key: "tokenizer.ggml.tokens".into(),
                expected: "at most 2^32 tokens".into(),
                got: format!("{} tokens", token_strs.len()),
            });
        }
        let n = token_strs.len();
        let types = match md.get("tokenizer.ggml.token_type") {
            None => vec![TOKEN_TYPE_NORMAL; n],
            Some(Value::Array(a)) if a.len() == n => a
                .iter()
                .map(|v| integer(v, "tokenizer.ggml.token_type"))
                .collect::<Result<Vec<_>>>()?,
            Some(other) => {
                return Err(ModelError::BadMetadata {
                    key: "tokenizer.ggml.token_type".into(),
                    expected: format!("an array of {n} integers"),
                    got: describe(other),
                })
            }
        };
        let id = |key: &str| -> Result<Option<u32>> {
            match md.get(key) {
                None => Ok(None),
                Some(v) => {
                    let id = integer(v, key)?;
                    if id >= n {
                        return Err(ModelError::BadMetadata {
                            key: key.into(),
                            expected: format!("a token id below {n}"),
                            got: id.to_string(),
                        });
                    }
                    Ok(Some(id as u32))
                }
            }
        };
        let flag = |key: &str, default: bool| -> Result<bool> {
            match md.get(key) {
                None => Ok(default),
                Some(Value::Bool(b)) => Ok(*b),
                Some(other) => Err(ModelError::BadMetadata {
                    key: key.into(),
                    expected: "a boolean".into(),
                    got: describe(other),
                }),
            }
        };
        // A default id only where the vocabulary has it.
        let default_id = |id: u32| (id as usize) < n;
        let spm = kind == "llama";
        let unknown = id("tokenizer.ggml.unknown_token_id")?;
        let (bos, eos, unknown, add_bos) = if spm {
            (
                id("tokenizer.ggml.bos_token_id")?.or(default_id(1).then_some(1)),
                id("tokenizer.ggml.eos_token_id")?.or(default_id(2).then_some(2)),
                unknown.or(default_id(0).then_some(0)),
                flag("tokenizer.ggml.add_bos_token", true)?,
            )
        } else {
            (
                id("tokenizer.ggml.bos_token_id")?,
                id("tokenizer.ggml.eos_token_id")?,
                unknown,
                // llama.cpp's default for byte-level BPE: BOS only for the pre-tokenizers
                // of the Llama 3 family and a few others (llama-vocab.cpp), unless the
                // file says.
                flag(
                    "tokenizer.ggml.add_bos_token",
                    md.get("tokenizer.ggml.pre")
                        .and_then(|_| string(md, "tokenizer.ggml.pre").ok())
                        .is_some_and(|pre| BPE_PRE_WITH_BOS.contains(&pre)),
                )?,
            )
        };
        let add_eos = flag("tokenizer.ggml.add_eos_token", false)?;
        if add_bos && bos.is_none() {
            return Err(ModelError::MissingMetadata {
                key: "tokenizer.ggml.bos_token_id (add_bos_token is true)".into(),
            });
        }
        if add_eos && eos.is_none() {
            return Err(ModelError::MissingMetadata {
                key: "tokenizer.ggml.eos_token_id (add_eos_token is true)".into(),
            });
        }

        let model = if spm {
            let scores = match md.get("tokenizer.ggml.scores") {
                None => vec![0.0; n],
                Some(Value::Array(a)) if a.len() == n => a
                    .iter()
                    .map(|v| match v {
                        Value::F32(x) => Ok(*x),
                        Value::F64(x) => Ok(*x as f32),
                        other => Err(ModelError::BadMetadata {
                            key: "tokenizer.ggml.scores".into(),
                            expected: "an array of floats".into(),
                            got: format!("an array holding {}", describe(other)),
                        }),
                    })
                    .collect::<Result<Vec<_>>>()?,
                Some(other) => {
                    return Err(ModelError::BadMetadata {
                        key: "tokenizer.ggml.scores".into(),
                        expected: format!("an array of {n} floats"),
                        got: describe(other),
                    })
                }
            };
            Model::SentencePiece {
                model: Box::new(SentencePiece::new(&token_strs, scores, unknown)),
                add_space_prefix: flag("tokenizer.ggml.add_space_prefix", true)?,
            }
        } else {
            let pre = match md.get("tokenizer.ggml.pre") {
                None => "default",
                Some(_) => string(md, "tokenizer.ggml.pre")?,
            };
            let merges = string_array(md, "tokenizer.ggml.merges")?;
            Model::ByteLevel(Box::new(byte_level_bpe(&token_strs, &merges, pre)?))
        };

        let tokens: Vec<String> = token_strs.iter().map(|t| t.to_string()).collect();
        let of_types = |wanted: &[usize]| -> Vec<u32> {
            (0..n)
                .filter(|&i| wanted.contains(&types[i]) && !tokens[i].is_empty())
                .map(|i| i as u32)
                .collect()
        };
        let all_special = Splitter::new(
            &tokens,
            of_types(&[
                TOKEN_TYPE_CONTROL,
                TOKEN_TYPE_UNKNOWN,
                TOKEN_TYPE_USER_DEFINED,
            ]),
        )?;
        let user_defined = Splitter::new(&tokens, of_types(&[TOKEN_TYPE_USER_DEFINED]))?;

        let mut stop_tokens = Vec::new();
        stop_tokens.extend(eos);
        stop_tokens.extend(id("tokenizer.ggml.eot_token_id")?);
        // Instruct models end a turn with eos but base-model habits end documents with
        // <|endoftext|>: stop at either.
        stop_tokens.extend(
            tokens
                .iter()
                .position(|t| t == "<|endoftext|>")
                .map(|i| i as u32),
        );
        stop_tokens.sort_unstable();
        stop_tokens.dedup();

        let token_text = |id: Option<u32>| id.map_or("", |i| tokens[i as usize].as_str());
        let chat = match md.get("tokenizer.chat_template") {
            Some(Value::String(t)) => Some(ChatTemplate::from_jinja_lenient(
                t,
                token_text(bos),
                token_text(eos),
            )),
            _ => None,
        };
        Ok(Self {
            model,
            tokens,
            types,
            all_special,
            user_defined,
            bos,
            eos,
            add_bos,
            add_eos,
            stop_tokens,
            chat,
        })
    }

    /// Token ids of a prompt: control tokens written in the text (`<|im_start|>`) become
    /// their single ids, and the BOS token is prepended when the file asks for it (unless
    /// the text already starts with it, as chat templates that write `bos_token` do).
    ///
    /// # Errors
    /// [`ModelError::Tokenizer`].
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::with_capacity(text.len() / 3 + 2);
        let bos = self.bos_to_add();
        ids.extend(bos);
        self.encode_into(text, true, &mut ids)?;
        if bos.is_some() && ids.get(1) == bos.as_ref() {
            ids.remove(0);
        }
        Ok(ids)
    }

    /// Token ids of `text` as llama.cpp's `llama_tokenize` gives them: BOS and EOS as the
    /// file asks (`tokenizer.ggml.add_bos_token`, `add_eos_token`) only with `add_special`;
    /// control tokens written in the text matched whole only with `parse_special` (else
    /// tokenized as text). User-defined tokens are always matched whole.
    ///
    /// # Errors
    /// [`ModelError::Tokenizer`].
    pub fn encode_with(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>> {
        let mut ids = Vec::with_capacity(text.len() / 3 + 2);
        if add_special {
            ids.extend(self.bos_to_add());
        }
        self.encode_into(text, parse_special, &mut ids)?;
        if add_special && self.add_eos {
            ids.extend(self.eos);
        }
        Ok(ids)
    }

    fn encode_into(&self, text: &str, parse_special: bool, out: &mut Vec<u32>) -> Result<()> {
        let splitter = if parse_special {
            self.all_special.as_ref()
        } else {
            self.user_defined.as_ref()
        };
        let mut fragments = Vec::new();
        let mut at = 0;
        if let Some(s) = splitter {
            for m in s.matcher.find_iter(text) {
                if m.start() > at {
                    fragments.push(Fragment::Text(&text[at..m.start()]));
                }
                fragments.push(Fragment::Token(s.ids[m.pattern().as_usize()]));
                at = m.end();
            }
        }
        if at < text.len() {
            fragments.push(Fragment::Text(&text[at..]));
        }
        match &self.model {
            Model::SentencePiece {
                model,
                add_space_prefix,
            } => {
                let mut after_special = true;
                for fragment in fragments {
                    match fragment {
                        Fragment::Token(id) => {
                            out.push(id);
                            after_special = true;
                        }
                        Fragment::Text(t) => {
                            let mut escaped = String::with_capacity(t.len() + 3);
                            if *add_space_prefix && after_special {
                                escaped.push(SPACE_MARK);
                            }
                            escaped
                                .extend(t.chars().map(|c| if c == ' ' { SPACE_MARK } else { c }));
                            model.encode_into(&escaped, out).map_err(|b| {
                                ModelError::Tokenizer {
                                    detail: format!(
                                    "byte 0x{b:02X} has no <0x{b:02X}> token and the vocabulary \
                                     has no unknown token"
                                ),
                                }
                            })?;
                            after_special = false;
                        }
                    }
                }
            }
            Model::ByteLevel(bpe) => {
                for fragment in fragments {
                    match fragment {
                        Fragment::Token(id) => out.push(id),
                        Fragment::Text(t) => {
                            let enc = bpe.encode(t, false).map_err(ModelError::tokenizer)?;
                            out.extend_from_slice(enc.get_ids());
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// The BOS token when the vocabulary asks for it to be prepended (GGUF
    /// `tokenizer.ggml.add_bos_token`, as llama.cpp reads it), else `None`. [`encode`]
    /// prepends it; perplexity puts it first in every chunk.
    ///
    /// [`encode`]: Tokenizer::encode
    pub fn bos_to_add(&self) -> Option<u32> {
        self.bos.filter(|_| self.add_bos)
    }

    /// The BOS token of the vocabulary, if it has one.
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    /// The EOS token of the vocabulary, if it has one.
    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// Text of `ids` for display: control tokens are left out, and SentencePiece's
    /// leading space (the one `add_space_prefix` put there) is removed.
    ///
    /// # Errors
    /// [`ModelError::TokenOutOfRange`] for an id outside the vocabulary.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let bytes = self.decode_bytes(ids, false)?;
        let mut text = String::from_utf8_lossy(&bytes).into_owned();
        if matches!(
            self.model,
            Model::SentencePiece {
                add_space_prefix: true,
                ..
            }
        ) && text.starts_with(' ')
        {
            text.remove(0);
        }
        Ok(text)
    }

    /// The bytes `ids` stand for; control tokens give their text only with `special`.
    fn decode_bytes(&self, ids: &[u32], special: bool) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            out.extend(self.piece_bytes(id, special)?);
        }
        Ok(out)
    }

    fn piece_bytes(&self, id: u32, special: bool) -> Result<Vec<u8>> {
        let (token, kind) = match (self.tokens.get(id as usize), self.types.get(id as usize)) {
            (Some(t), Some(&k)) => (t.as_str(), k),
            _ => {
                return Err(ModelError::TokenOutOfRange {
                    id,
                    vocab: self.tokens.len(),
                })
            }
        };
        Ok(match kind {
            TOKEN_TYPE_CONTROL | TOKEN_TYPE_UNKNOWN if !special => Vec::new(),
            TOKEN_TYPE_CONTROL | TOKEN_TYPE_UNKNOWN | TOKEN_TYPE_USER_DEFINED => {
                token.as_bytes().to_vec()
            }
            _ => match &self.model {
                Model::SentencePiece { .. } => match parse_byte_token(token) {
                    Some(b) if kind == TOKEN_TYPE_BYTE || kind == TOKEN_TYPE_NORMAL => vec![b],
                    _ => token.replace(SPACE_MARK, " ").into_bytes(),
                },
                Model::ByteLevel(_) => byte_level_decode(token),
            },
        })
    }

    /// The text of one token as llama.cpp's `llama-tokenize` shows it: spaces for `▁`/`Ġ`,
    /// control tokens written out, invalid UTF-8 (part of a character) as U+FFFD.
    ///
    /// # Errors
    /// [`ModelError::TokenOutOfRange`] for an id outside the vocabulary.
    pub fn piece(&self, id: u32) -> Result<String> {
        Ok(String::from_utf8_lossy(&self.piece_bytes(id, true)?).into_owned())
    }

    /// Tokens that end generation (end of turn, end of text).
    pub fn stop_tokens(&self) -> &[u32] {
        &self.stop_tokens
    }

    /// The file's own chat template (`tokenizer.chat_template`), if it has one. A template
    /// that does not compile is reported when rendered, so the model still runs raw prompts.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat.as_ref()
    }

    /// The text of the BOS and EOS tokens, which chat templates write as `bos_token` and
    /// `eos_token` (empty when the vocabulary has none).
    pub fn special_texts(&self) -> (&str, &str) {
        let text = |id: Option<u32>| id.map_or("", |i| self.tokens[i as usize].as_str());
        (text(self.bos), text(self.eos))
    }

    /// Tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// The id of a token written as in the vocabulary (`"<|im_end|>"`, `"Ġthe"`, `"▁the"`).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        match &self.model {
            Model::SentencePiece { model, .. } => model.piece_id(token),
            Model::ByteLevel(bpe) => bpe.token_to_id(token),
        }
    }

    /// The vocabulary entry of `id`.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.tokens.get(id as usize).cloned()
    }

    /// A streaming decoder that turns tokens into text as they come.
    pub fn stream(&self) -> TextStream<'_> {
        TextStream {
            tokenizer: self,
            pending: Vec::new(),
        }
    }
}

/// The byte-level BPE of a GGUF file, with the pre-tokenizer `pre` names.
fn byte_level_bpe(tokens: &[&str], merges: &[&str], pre: &str) -> Result<tokenizers::Tokenizer> {
    let split = |regex: &str| -> Result<PreTokenizerWrapper> {
        Ok(Split::new(
            SplitPattern::Regex(regex.into()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(ModelError::tokenizer)?
        .into())
    };
    // Bytes to the GPT-2 alphabet after the splits (`use_regex`: GPT-2's own split too).
    let bytes =
        |use_regex: bool| -> PreTokenizerWrapper { ByteLevel::new(false, true, use_regex).into() };
    let (steps, ignore_merges): (Vec<PreTokenizerWrapper>, bool) = match pre {
        "gpt2" | "gpt-2" | "phi-2" | "mpt" | "olmo" | "jais" | "trillion" | "roberta-bpe"
        | "exaone4" => (vec![bytes(true)], false),
        // llama.cpp's default rule set (also for files that name none).
        "default" => (
            vec![
                split(r"[\p{P}\$\+<=>\^~\|]+")?,
                split(GPT2_REGEX)?,
                split(r"\p{N}+")?,
                split("[0-9][0-9][0-9]")?,
                bytes(false),
            ],
            false,
        ),
        "falcon" => (
            vec![
                split(r"[\p{P}\$\+<=>\^~\|`]+")?,
                split(GPT2_REGEX)?,
                split("[0-9][0-9][0-9]")?,
                bytes(false),
            ],
            false,
        ),
        "llama-bpe" | "llama3" | "llama-v3" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" => (vec![split(LLAMA3_REGEX)?, bytes(false)], true),
        "dbrx" | "smaug-bpe" => (vec![split(LLAMA3_REGEX)?, bytes(false)], false),
        "qwen2" | "deepseek-r1-qwen" | "stablelm2" | "megrez" | "hunyuan" | "kormo" => {
            (vec![split(QWEN2_REGEX)?, bytes(false)], false)
        }
        "qwen35" => (vec![split(QWEN35_REGEX)?, bytes(false)], false),
        "gpt-4o" | "llama4" => (vec![split(GPT4O_REGEX)?, bytes(false)], false),
        // Every digit its own piece, then GPT-2's rules.
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            (vec![Digits::new(true).into(), bytes(true)], false)
        }
        other => {
            return Err(ModelError::Unsupported {
                what: "pre-tokenizer",
                detail: format!("tokenizer.ggml.pre {other:?} (supported: {SUPPORTED_PRE})"),
            })
        }
    };
    let pre_tokenizer: PreTokenizerWrapper = if steps.len() == 1 {
        steps
            .into_iter()
            .next()
            .ok_or_else(|| ModelError::tokenizer("no pre-tokenizer"))?
    } else {
        Sequence::new(steps).into()
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
            // As llama.cpp: the first space after the first character separates the pair.
            let first = m.chars().next().map_or(0, char::len_utf8);
            m[first..]
                .find(' ')
                .map(|at| (m[..first + at].to_string(), m[first + at + 1..].to_string()))
                .ok_or_else(|| ModelError::BadMetadata {
                    key: "tokenizer.ggml.merges".into(),
                    expected: "pairs written \"left right\"".into(),
                    got: format!("{m:?}"),
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(ignore_merges)
        .build()
        .map_err(ModelError::tokenizer)?;
    let mut inner = tokenizers::Tokenizer::new(bpe);
    inner.with_pre_tokenizer(Some(pre_tokenizer));
    Ok(inner)
}

/// The bytes of a byte-level BPE piece: GPT-2 writes each byte as one printable character
/// (bytes that are printable Latin-1 as themselves, the others as U+0100 onwards).
fn byte_level_decode(token: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(token.len());
    for c in token.chars() {
        match byte_of_char(c) {
            Some(b) => out.push(b),
            // Not in the alphabet (a piece added as plain text): its own UTF-8.
            None => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
        }
    }
    out
}

/// The inverse of GPT-2's `bytes_to_unicode`.
fn byte_of_char(c: char) -> Option<u8> {
    let printable = |b: u32| matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF);
    let code = u32::from(c);
    if code < 256 {
        return printable(code).then_some(code as u8);
    }
    // The non-printable bytes, in order, got U+0100, U+0101, ...
    let nth = code - 256;
    (0u32..256)
        .filter(|&b| !printable(b))
        .nth(nth as usize)
        .map(|b| b as u8)
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
/// One token can hold part of a UTF-8 character (byte-level BPE and SentencePiece's byte
/// fallback split emoji and accents); text is released only once the pending bytes form
/// whole characters. Control tokens give no text. Unlike [`Tokenizer::decode`], a leading
/// space is kept: streamed tokens continue a prompt.
#[derive(Debug)]
pub struct TextStream<'a> {
    tokenizer: &'a Tokenizer,
    pending: Vec<u8>,
}

impl TextStream<'_> {
    /// Adds a token; returns the text it completes, if any.
    ///
    /// # Errors
    /// [`ModelError::TokenOutOfRange`] for an id outside the vocabulary.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        let bytes = self.tokenizer.piece_bytes(id, false)?;
        self.pending.extend_from_slice(&bytes);
        let ready = match std::str::from_utf8(&self.pending) {
            Ok(_) => self.pending.len(),
            // Only the end is unfinished: release what comes before it.
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            // Bytes that no continuation makes valid: release them as U+FFFD.
            Err(_) => self.pending.len(),
        };
        if ready == 0 {
            return Ok(None);
        }
        let text = String::from_utf8_lossy(&self.pending[..ready]).into_owned();
        self.pending.drain(..ready);
        Ok(Some(text))
    }

    /// Whatever is still pending, invalid bytes shown as U+FFFD.
    pub fn finish(&mut self) -> Result<Option<String>> {
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        Ok((!text.is_empty()).then_some(text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        md.insert("tokenizer.ggml.model".into(), Value::String("bert".into()));
        assert!(matches!(
            Tokenizer::from_metadata(&md),
            Err(ModelError::Unsupported {
                what: "tokenizer",
                ..
            })
        ));
        let mut md = tiny();
        md.insert(
            "tokenizer.ggml.pre".into(),
            Value::String("no-such-pre".into()),
        );
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

    #[test]
    fn special_tokens_are_text_unless_parsed_and_bos_is_added_once() {
        let mut md = tiny();
        md.insert("tokenizer.ggml.add_bos_token".into(), Value::Bool(true));
        md.insert("tokenizer.ggml.add_eos_token".into(), Value::Bool(true));
        let t = Tokenizer::from_metadata(&md).unwrap();
        assert_eq!(t.encode("hi").unwrap(), vec![1, 9]);
        // A prompt that starts with BOS (as templates write it) keeps one.
        assert_eq!(t.encode("<|im_start|>hi").unwrap(), vec![1, 9]);
        assert_eq!(t.encode_with("hi", true, true).unwrap(), vec![1, 9, 2]);
        assert_eq!(t.encode_with("hi", false, true).unwrap(), vec![9]);
        // Not parsed: "<|im_start|>" is text, and this vocabulary has no pieces for '<' and
        // '|', which byte-level BPE then leaves out.
        assert!(!t
            .encode_with("<|im_start|>hi", false, false)
            .unwrap()
            .contains(&1));
        assert_eq!(t.piece(10).unwrap(), " hi");
        assert_eq!(t.piece(1).unwrap(), "<|im_start|>");
        assert!(matches!(
            t.decode(&[99]),
            Err(ModelError::TokenOutOfRange { id: 99, .. })
        ));
    }

    /// A tiny SentencePiece vocabulary.
    fn tiny_spm() -> HashMap<String, Value> {
        let s = |x: &str| Value::String(x.into());
        let tokens = [
            "<unk>", "<s>", "</s>", "<0x0A>", "<0xC3>", "<0xA9>", "▁", "h", "i", "▁h", "▁hi", "hi",
            "<tool>",
        ];
        let scores = [
            0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -5.0, -4.0, -4.0, -2.0, -1.0, -3.0, 0.0f32,
        ];
        let types = [2, 3, 3, 6, 6, 6, 1, 1, 1, 1, 1, 1, 4];
        let mut md = HashMap::new();
        md.insert("tokenizer.ggml.model".into(), s("llama"));
        md.insert(
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.iter().map(|t| s(t)).collect()),
        );
        md.insert(
            "tokenizer.ggml.scores".into(),
            Value::Array(scores.iter().map(|&x| Value::F32(x)).collect()),
        );
        md.insert(
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.iter().map(|&t| Value::I32(t)).collect()),
        );
        md
    }

    #[test]
    fn sentencepiece_prefixes_a_space_falls_back_to_bytes_and_adds_bos() {
        let t = Tokenizer::from_metadata(&tiny_spm()).unwrap();
        // llama.cpp's defaults: BOS 1 added, EOS 2, a space before the text.
        assert_eq!(t.bos_to_add(), Some(1));
        assert_eq!(t.stop_tokens(), &[2]);
        assert_eq!(t.encode("hi").unwrap(), vec![1, 10]);
        assert_eq!(t.encode_with("hi hi", false, false).unwrap(), vec![10, 10]);
        // 'é' has no piece: its two UTF-8 bytes; '\n' too.
        assert_eq!(
            t.encode_with("é\n", false, false).unwrap(),
            vec![6, 4, 5, 3]
        );
        // A user-defined token is matched whole, and as after any special token in
        // llama.cpp, the text after it gets a space prefix.
        assert_eq!(
            t.encode_with("hi<tool>hi", false, false).unwrap(),
            vec![10, 12, 10]
        );
        // Control tokens only when parsed; the text after one gets a space prefix.
        assert_eq!(t.encode_with("</s>hi", false, true).unwrap(), vec![2, 10]);
        assert_eq!(t.decode(&[1, 10, 10, 4, 5, 3, 2]).unwrap(), "hi hié\n");
        assert_eq!(t.piece(10).unwrap(), " hi");
        assert_eq!(t.token_to_id("▁hi"), Some(10));
        let mut stream = t.stream();
        assert_eq!(stream.push(10).unwrap().as_deref(), Some(" hi"));
        assert_eq!(stream.push(4).unwrap(), None); // half of 'é'
        assert_eq!(stream.push(5).unwrap().as_deref(), Some("é"));
        assert_eq!(stream.push(4).unwrap(), None);
        assert_eq!(stream.finish().unwrap().as_deref(), Some("\u{FFFD}"));

        let mut md = tiny_spm();
        md.insert("tokenizer.ggml.add_space_prefix".into(), Value::Bool(false));
        md.insert("tokenizer.ggml.add_bos_token".into(), Value::Bool(false));
        let t = Tokenizer::from_metadata(&md).unwrap();
        assert_eq!(t.encode("hi").unwrap(), vec![11]);
        let mut md = tiny_spm();
        md.insert(
            "tokenizer.ggml.scores".into(),
            Value::Array(vec![Value::F32(0.0)]),
        );
        assert!(matches!(
            Tokenizer::from_metadata(&md),
            Err(ModelError::BadMetadata { .. })
        ));
    }

    #[test]
    fn byte_level_alphabet_round_trips() {
        for b in 0..=255u8 {
            let c = (0u32..)
                .filter_map(char::from_u32)
                .find(|&c| byte_of_char(c) == Some(b))
                .unwrap();
            assert!(u32::from(c) < 324, "byte {b} maps to {c:?}");
        }
        assert_eq!(byte_of_char('Ġ'), Some(b' '));
        assert_eq!(byte_of_char('Ċ'), Some(b'\n'));
        assert_eq!(byte_of_char('a'), Some(b'a'));
        assert_eq!(byte_of_char(' '), None);
        assert_eq!(byte_level_decode("Ġhi"), b" hi");
    }
}
