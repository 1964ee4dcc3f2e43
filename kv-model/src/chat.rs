//! Chat templates: the Jinja template a GGUF file stores in `tokenizer.chat_template`
//! (rendered with minijinja the way Hugging Face's `apply_chat_template` renders it), or
//! one of a few built-in formats for files without one.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::value::{Kwargs, Value as JinjaValue, ValueKind};
use minijinja::{Environment, Error as JinjaError, ErrorKind};

use crate::{ModelError, Result};

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant` (templates may know others, such as `tool`).
    pub role: String,
    /// What was said.
    pub content: String,
}

impl ChatMessage {
    /// A turn of `role` saying `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// The built-in templates, by the names `kv generate --chat-template` accepts.
const BUILTINS: &[(&str, &str)] = &[
    (
        "chatml",
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}\
         {% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
    ),
    (
        "llama2",
        "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}{% set messages = messages[1:] %}{% else %}{% set system = none %}{% endif %}\
         {% for message in messages %}\
         {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}\
         {% if message['role'] == 'user' %}\
         {% if loop.first and system %}{% set content = '<<SYS>>\n' + system + '\n<</SYS>>\n\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}\
         {{ bos_token + '[INST] ' + content | trim + ' [/INST]' }}\
         {% else %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}\
         {% endfor %}",
    ),
    (
        "llama3",
        "{{ bos_token }}{% for message in messages %}\
         {{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}\
         {% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
    ),
    (
        "gemma",
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] + '\n\n' %}{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}\
         {% for message in messages %}\
         {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}\
         {% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}\
         {{ '<start_of_turn>' + role + '\n' + (system if loop.first else '') + message['content'] | trim + '<end_of_turn>\n' }}\
         {% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}",
    ),
];

/// A conversation format: turns messages into the prompt text an instruct model was trained
/// on.
///
/// Rendered like Hugging Face's `apply_chat_template`: Jinja with `trim_blocks` and
/// `lstrip_blocks`, the variables `messages`, `add_generation_prompt`, `bos_token`,
/// `eos_token`, `tools` and `documents` (none), the function `raise_exception`, `strftime_now`, and Python's string and
/// dict methods (`.strip()`, `.startswith()`, `.items()`, ...).
///
/// ```
/// use kv_model::{ChatMessage, ChatTemplate};
/// let t = ChatTemplate::builtin("chatml", "", "")?;
/// let text = t.render_messages(
///     &[ChatMessage::new("system", "Be brief."), ChatMessage::new("user", "Hi")],
///     true,
/// )?;
/// assert_eq!(
///     text,
///     "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
/// );
/// # Ok::<(), kv_model::ModelError>(())
/// ```
pub struct ChatTemplate {
    /// The compiled template, or why it does not compile (kept so that a model whose
    /// template minijinja cannot parse still loads and runs with raw prompts).
    env: std::result::Result<Environment<'static>, String>,
    bos: String,
    eos: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles a Jinja chat template; `bos_token`/`eos_token` are the texts templates
    /// write for BOS and EOS (see [`crate::Tokenizer::special_texts`]).
    ///
    /// # Errors
    /// [`ModelError::ChatTemplate`] when the template does not parse.
    pub fn from_jinja(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let template = Self::from_jinja_lenient(source, bos_token, eos_token);
        if let Err(detail) = &template.env {
            return Err(ModelError::ChatTemplate {
                detail: detail.clone(),
            });
        }
        Ok(template)
    }

    /// As [`ChatTemplate::from_jinja`], but a template that does not compile fails only
    /// when rendered.
    pub(crate) fn from_jinja_lenient(source: &str, bos_token: &str, eos_token: &str) -> Self {
        Self {
            env: Self::compile(source).map_err(|e| jinja_detail(&e)),
            bos: bos_token.into(),
            eos: eos_token.into(),
        }
    }

    fn compile(source: &str) -> std::result::Result<Environment<'static>, JinjaError> {
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        // As Python's Jinja: none is not iterable (minijinja's test says it is).
        env.add_test("iterable", |v: JinjaValue| {
            !matches!(
                v.kind(),
                ValueKind::None | ValueKind::Undefined | ValueKind::Bool | ValueKind::Number
            ) && v.try_iter().is_ok()
        });
        env.add_template_owned("chat", hf_generation_blocks(source))?;
        Ok(env)
    }

    /// A built-in format by name (see [`ChatTemplate::builtin_names`]).
    ///
    /// # Errors
    /// [`ModelError::InvalidArgument`] for an unknown name.
    pub fn builtin(name: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let source = BUILTINS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, s)| *s)
            .ok_or_else(|| ModelError::InvalidArgument {
                what: "chat template",
                expected: format!(
                    "a built-in name ({}) or a Jinja file",
                    Self::builtin_names().join(", ")
                ),
                got: format!("{name:?}"),
            })?;
        Self::from_jinja(source, bos_token, eos_token)
    }

    /// A built-in name, or else the path of a Jinja file.
    ///
    /// # Errors
    /// [`ModelError::InvalidArgument`] when `name_or_file` is neither a built-in nor a
    /// file, [`ModelError::Io`] when the file cannot be read, and those of
    /// [`ChatTemplate::from_jinja`].
    pub fn builtin_or_file(name_or_file: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        if BUILTINS.iter().any(|(n, _)| *n == name_or_file) {
            return Self::builtin(name_or_file, bos_token, eos_token);
        }
        let path = Path::new(name_or_file);
        let source = std::fs::read_to_string(path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                ModelError::InvalidArgument {
                    what: "chat template",
                    expected: format!(
                        "a built-in name ({}) or a Jinja file",
                        Self::builtin_names().join(", ")
                    ),
                    got: format!("{name_or_file:?}, which is neither"),
                }
            } else {
                ModelError::Io {
                    path: path.to_path_buf(),
                    source,
                }
            }
        })?;
        Self::from_jinja(&source, bos_token, eos_token)
    }

    /// Names of the built-in formats.
    pub fn builtin_names() -> Vec<&'static str> {
        BUILTINS.iter().map(|(n, _)| *n).collect()
    }

    /// Renders a conversation; with `add_generation_prompt` the text ends with the opening
    /// of the assistant's turn.
    ///
    /// # Errors
    /// [`ModelError::ChatTemplate`] when the template fails or raises an exception (many
    /// refuse a system turn or turns that do not alternate).
    pub fn render_messages(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let messages: Vec<JinjaValue> = messages
            .iter()
            .map(|m| {
                JinjaValue::from_iter([
                    ("role", JinjaValue::from(m.role.as_str())),
                    ("content", JinjaValue::from(m.content.as_str())),
                ])
            })
            .collect();
        let ctx = JinjaValue::from_iter([
            ("messages", JinjaValue::from(messages)),
            (
                "add_generation_prompt",
                JinjaValue::from(add_generation_prompt),
            ),
            ("bos_token", JinjaValue::from(self.bos.as_str())),
            ("eos_token", JinjaValue::from(self.eos.as_str())),
            // What Hugging Face passes when the caller gives no tools or documents.
            ("tools", JinjaValue::from(())),
            ("documents", JinjaValue::from(())),
        ]);
        let env = self
            .env
            .as_ref()
            .map_err(|detail| ModelError::ChatTemplate {
                detail: format!("the template does not compile: {detail}"),
            })?;
        let template = env.get_template("chat").map_err(template_error)?;
        template.render(ctx).map_err(template_error)
    }

    /// One user turn and the opening of the assistant's turn (any system prompt is the
    /// template's own default).
    ///
    /// # Errors
    /// Those of [`ChatTemplate::render_messages`].
    pub fn render(&self, user: &str) -> Result<String> {
        self.render_messages(&[ChatMessage::new("user", user)], true)
    }

    /// As [`ChatTemplate::render`], after a system turn when `system` is given.
    ///
    /// # Errors
    /// Those of [`ChatTemplate::render_messages`].
    pub fn render_with_system(&self, system: Option<&str>, user: &str) -> Result<String> {
        let mut messages = Vec::with_capacity(2);
        if let Some(system) = system {
            messages.push(ChatMessage::new("system", system));
        }
        messages.push(ChatMessage::new("user", user));
        self.render_messages(&messages, true)
    }
}

/// Hugging Face's `{% generation %}...{% endgeneration %}` marks the assistant's text for
/// training masks and renders its body as is: it becomes `{% if true %}...{% endif %}`,
/// keeping the tags' whitespace control (`{%-`, `-%}`).
fn hf_generation_blocks(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(open) = rest.find("{%") {
        let Some(close) = rest[open..].find("%}").map(|c| open + c) else {
            break;
        };
        let inner = &rest[open + 2..close];
        let body = inner
            .trim_start_matches(['-', '+'])
            .trim_end_matches(['-', '+'])
            .trim();
        let replacement = match body {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        out.push_str(&rest[..open + 2]);
        match replacement {
            Some(r) => {
                let lead = if inner.starts_with('-') { "- " } else { " " };
                let trail = if inner.ends_with('-') { " -" } else { " " };
                out.push_str(lead);
                out.push_str(r);
                out.push_str(trail);
            }
            None => out.push_str(inner),
        }
        out.push_str("%}");
        rest = &rest[close + 2..];
    }
    out.push_str(rest);
    out
}

/// minijinja's message with the cause chain and the template line, on one line.
fn jinja_detail(e: &JinjaError) -> String {
    let mut detail = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        detail.push_str(": ");
        detail.push_str(&s.to_string());
        source = s.source();
    }
    detail
}

fn template_error(e: JinjaError) -> ModelError {
    ModelError::ChatTemplate {
        detail: jinja_detail(&e),
    }
}

/// `raise_exception(message)`: templates call it to refuse a conversation.
fn raise_exception(message: String) -> std::result::Result<JinjaValue, JinjaError> {
    Err(JinjaError::new(
        ErrorKind::InvalidOperation,
        format!("the template raised: {message}"),
    ))
}

/// `strftime_now(format)`: today's date (UTC), for templates that print it (Llama 3.x).
/// Supports `%d %m %Y %y %b %B %H %M %S %%`.
fn strftime_now(format: String) -> std::result::Result<String, JinjaError> {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Ok(strftime(&format, secs))
}

fn strftime(format: &str, unix_secs: u64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let days = unix_secs / 86_400;
    let secs = unix_secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('b') => out.push_str(&name[..3]),
            Some('B') => out.push_str(name),
            Some('H') => out.push_str(&format!("{:02}", secs / 3600)),
            Some('M') => out.push_str(&format!("{:02}", secs / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", secs % 60)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// `tojson` as Python's `json.dumps(ensure_ascii=False)` writes it (`", "` and `": "`
/// separators, or `indent=N`), which Hugging Face's templates expect; minijinja's own
/// escapes HTML characters.
fn tojson(value: JinjaValue, kwargs: Kwargs) -> std::result::Result<String, JinjaError> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(&value, indent, 0, &mut out)?;
    Ok(out)
}

fn write_json(
    value: &JinjaValue,
    indent: Option<usize>,
    depth: usize,
    out: &mut String,
) -> std::result::Result<(), JinjaError> {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let item_separator = if indent.is_some() { "," } else { ", " };
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => out.push_str(&value.to_string()),
        ValueKind::String => {
            let s = value.as_str().unwrap_or_default();
            out.push_str(&serde_json::to_string(s).map_err(|e| {
                JinjaError::new(ErrorKind::InvalidOperation, format!("tojson: {e}"))
            })?);
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<JinjaValue> = value.try_iter()?.collect();
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_separator);
                }
                newline(out, depth + 1);
                write_json(item, indent, depth + 1, out)?;
            }
            if !items.is_empty() {
                newline(out, depth);
            }
            out.push(']');
        }
        ValueKind::Map => {
            let keys: Vec<JinjaValue> = value.try_iter()?.collect();
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_separator);
                }
                newline(out, depth + 1);
                let name = key
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| key.to_string());
                out.push_str(&serde_json::to_string(&name).map_err(|e| {
                    JinjaError::new(ErrorKind::InvalidOperation, format!("tojson: {e}"))
                })?);
                out.push_str(": ");
                write_json(&value.get_item(key)?, indent, depth + 1, out)?;
            }
            if !keys.is_empty() {
                newline(out, depth);
            }
            out.push('}');
        }
        _ => {
            return Err(JinjaError::new(
                ErrorKind::InvalidOperation,
                format!("tojson: cannot write a {} as JSON", value.kind()),
            ))
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The SmolLM2-Instruct template as stored in its GGUF file.
    pub(crate) const SMOLLM2_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn smollm2_template_renders_the_chatml_kv_always_used() {
        let t = ChatTemplate::from_jinja(SMOLLM2_TEMPLATE, "<|im_start|>", "<|im_end|>").unwrap();
        // The text kv's hard-coded ChatML turn produced before templates were rendered.
        assert_eq!(
            t.render("What is 2+2?").unwrap(),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            t.render_with_system(Some("Be brief."), "x").unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"
        );
        let turns = [
            ChatMessage::new("user", "a"),
            ChatMessage::new("assistant", "b"),
            ChatMessage::new("user", "c"),
        ];
        assert_eq!(
            t.render_messages(&turns, false).unwrap(),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nb<|im_end|>\n<|im_start|>user\nc<|im_end|>\n"
        );
    }

    #[test]
    fn builtins_render_their_formats() {
        let turns = [
            ChatMessage::new("system", "S"),
            ChatMessage::new("user", "Hi"),
            ChatMessage::new("assistant", "Yo"),
            ChatMessage::new("user", "Bye"),
        ];
        let render = |name| {
            ChatTemplate::builtin(name, "<s>", "</s>")
                .unwrap()
                .render_messages(&turns, true)
                .unwrap()
        };
        assert_eq!(
            render("llama2"),
            "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nHi [/INST] Yo </s><s>[INST] Bye [/INST]"
        );
        assert_eq!(
            render("llama3"),
            "<s><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\nYo<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        assert_eq!(
            render("gemma"),
            "<s><start_of_turn>user\nS\n\nHi<end_of_turn>\n<start_of_turn>model\nYo<end_of_turn>\n\
             <start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
        );
        assert!(
            render("chatml").ends_with("<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n")
        );
    }

    #[test]
    fn exceptions_unknown_names_and_bad_templates_are_errors() {
        let gemma = ChatTemplate::builtin("gemma", "<bos>", "<eos>").unwrap();
        let bad = [ChatMessage::new("user", "a"), ChatMessage::new("user", "b")];
        let err = gemma.render_messages(&bad, true).unwrap_err();
        assert!(err.to_string().contains("roles must alternate"), "{err}");
        assert!(matches!(
            ChatTemplate::builtin("nope", "", ""),
            Err(ModelError::InvalidArgument { .. })
        ));
        assert!(matches!(
            ChatTemplate::builtin_or_file("/no/such/template.jinja", "", ""),
            Err(ModelError::InvalidArgument { .. })
        ));
        // A directory is a file that cannot be read.
        assert!(matches!(
            ChatTemplate::builtin_or_file("/", "", ""),
            Err(ModelError::Io { .. })
        ));
        assert!(ChatTemplate::builtin_or_file("llama3", "", "").is_ok());
        assert!(matches!(
            ChatTemplate::from_jinja("{% for %}", "", ""),
            Err(ModelError::ChatTemplate { .. })
        ));
    }

    #[test]
    fn python_methods_filters_and_tojson_work() {
        let t = ChatTemplate::from_jinja(
            "{{ tools is iterable }}{{ messages is iterable }}{{ 'ab' is iterable }}|\
             {{ messages[0].content.strip().upper() }}|{{ messages[0]['content'] | trim | length }}|\
             {{ {'a': [1, 'é', none, true]} | tojson }}|{{ {'k': 1} | tojson(indent=2) }}|\
             {% if messages[0].content.startswith(' x') %}yes{% endif %}",
            "",
            "",
        )
        .unwrap();
        assert_eq!(
            t.render_messages(&[ChatMessage::new("user", " x y ")], false)
                .unwrap(),
            "FalseTrueTrue|X Y|3|{\"a\": [1, \"é\", null, true]}|{\n  \"k\": 1\n}|yes"
        );
    }

    #[test]
    fn generation_blocks_render_their_body_and_loop_controls_work() {
        assert_eq!(
            hf_generation_blocks("a{%- generation -%} b {% endgeneration %}{{ x }}{% if y %}"),
            "a{%- if true -%} b {% endif %}{{ x }}{% if y %}"
        );
        let t = ChatTemplate::from_jinja(
            "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}\
             {%- generation -%} {{ m.content }} {%- endgeneration %}{% endfor %}",
            "",
            "",
        )
        .unwrap();
        let turns = ["a", "b", "c"].map(|c| ChatMessage::new("user", c));
        assert_eq!(t.render_messages(&turns, false).unwrap(), "ab");
    }

    #[test]
    fn strftime_formats_dates() {
        // 2024-07-26 13:05:09 UTC.
        assert_eq!(
            strftime("%d %b %Y %H:%M:%S %B %m %y %%", 1_721_999_109),
            "26 Jul 2024 13:05:09 July 07 24 %"
        );
        assert_eq!(strftime("%Y-%m-%d", 0), "1970-01-01");
        assert_eq!(strftime("%Y-%m-%d", 951_782_400), "2000-02-29");
    }
}
