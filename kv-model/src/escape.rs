//! Control characters from files (names, metadata strings, tokens) escaped before they
//! reach a terminal in a message.

/// `s` with every control character (C0, DEL, C1, and the bidirectional overrides that can
/// reorder what a terminal shows) written as `\u{..}`; everything else unchanged.
///
/// ```
/// assert_eq!(kv_model::escape_controls("a\x1b[2Jb\n"), "a\\u{1b}[2Jb\\u{a}");
/// ```
pub fn escape_controls(s: &str) -> String {
    escape(s).into_owned()
}

/// As [`escape_controls`], borrowing when there is nothing to escape.
pub(crate) fn escape(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(needs_escape) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if needs_escape(c) {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

fn needs_escape(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_is_borrowed_and_controls_are_escaped() {
        assert!(matches!(
            escape("héllo wörld"),
            std::borrow::Cow::Borrowed(_)
        ));
        assert_eq!(
            escape_controls("\u{7}\u{9b}x\u{202e}"),
            "\\u{7}\\u{9b}x\\u{202e}"
        );
    }
}
