//! SentencePiece BPE as GGUF files store it (`tokenizer.ggml.model = "llama"`): a vocabulary
//! with one score per piece and no merge list. Pieces are merged greedily, the pair whose
//! union has the highest score first (leftmost on ties), the way llama.cpp and SentencePiece
//! do; characters left without a piece fall back to `<0xNN>` byte tokens.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

/// The SentencePiece word-boundary mark that stands for a space.
pub(crate) const SPACE_MARK: char = '\u{2581}';

/// A SentencePiece BPE model: the vocabulary, scores and byte-fallback tokens.
#[derive(Debug)]
pub(crate) struct SentencePiece {
    /// Piece text to id.
    ids: HashMap<String, u32>,
    /// Score of every id (higher merges first).
    scores: Vec<f32>,
    /// The `<0xNN>` token of every byte, where the vocabulary has one.
    bytes: [Option<u32>; 256],
    /// The unknown token, used for a byte without a `<0xNN>` token.
    unknown: Option<u32>,
}

/// One symbol of the text being merged: a byte range, linked to its neighbours.
#[derive(Debug, Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// A candidate merge of the symbols `left` and `right` (its neighbour).
#[derive(Debug)]
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    /// Bytes of the merged piece, to detect candidates made stale by other merges.
    len: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Bigram {}

impl Ord for Bigram {
    fn cmp(&self, other: &Self) -> Ordering {
        // Highest score first; on a tie, the leftmost pair. (Of candidates with the same
        // left symbol at most one is current, the others are skipped: `len` only makes
        // the order total.)
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
            .then_with(|| self.len.cmp(&other.len))
    }
}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl SentencePiece {
    /// Builds the model from the pieces (`tokens[id]`) and their scores. When two ids share
    /// a text, the text maps to the later one, as in llama.cpp.
    pub(crate) fn new(tokens: &[&str], scores: Vec<f32>, unknown: Option<u32>) -> Self {
        let mut ids = HashMap::with_capacity(tokens.len());
        let mut bytes = [None; 256];
        for (id, token) in tokens.iter().enumerate() {
            // Ids fit u32: the caller checked the vocabulary size.
            let id = id as u32;
            ids.insert((*token).to_string(), id);
            if let Some(b) = parse_byte_token(token) {
                bytes[usize::from(b)].get_or_insert(id);
            }
        }
        Self {
            ids,
            scores,
            bytes,
            unknown,
        }
    }

    /// The id of a piece written as in the vocabulary.
    pub(crate) fn piece_id(&self, piece: &str) -> Option<u32> {
        self.ids.get(piece).copied()
    }

    /// Appends the ids of `text` (already prefixed and with spaces written as `▁`).
    /// Returns the first byte that has neither a `<0xNN>` token nor an unknown token.
    pub(crate) fn encode_into(&self, text: &str, out: &mut Vec<u32>) -> Result<(), u8> {
        let mut symbols: Vec<Symbol> = Vec::with_capacity(text.len());
        for (i, (start, c)) in text.char_indices().enumerate() {
            symbols.push(Symbol {
                start,
                len: c.len_utf8(),
                prev: i.checked_sub(1),
                next: None,
            });
            if let Some(prev) = i.checked_sub(1) {
                symbols[prev].next = Some(i);
            }
        }
        let mut queue = BinaryHeap::new();
        for right in 1..symbols.len() {
            self.push_bigram(text, &symbols, right - 1, right, &mut queue);
        }
        while let Some(bigram) = queue.pop() {
            let (left, right) = (symbols[bigram.left], symbols[bigram.right]);
            // Skip a candidate whose symbols have changed since it was queued.
            if left.len == 0 || right.len == 0 || left.len + right.len != bigram.len {
                continue;
            }
            symbols[bigram.left].len += right.len;
            symbols[bigram.left].next = right.next;
            symbols[bigram.right].len = 0;
            if let Some(next) = right.next {
                symbols[next].prev = Some(bigram.left);
            }
            if let Some(prev) = left.prev {
                self.push_bigram(text, &symbols, prev, bigram.left, &mut queue);
            }
            if let Some(next) = right.next {
                self.push_bigram(text, &symbols, bigram.left, next, &mut queue);
            }
        }
        let mut at = (!symbols.is_empty()).then_some(0);
        while let Some(i) = at {
            let s = symbols[i];
            let piece = &text[s.start..s.start + s.len];
            match self.ids.get(piece) {
                Some(&id) => out.push(id),
                None => {
                    for &b in piece.as_bytes() {
                        out.push(self.bytes[usize::from(b)].or(self.unknown).ok_or(b)?);
                    }
                }
            }
            at = s.next;
        }
        Ok(())
    }

    fn push_bigram(
        &self,
        text: &str,
        symbols: &[Symbol],
        left: usize,
        right: usize,
        queue: &mut BinaryHeap<Bigram>,
    ) {
        let start = symbols[left].start;
        let len = symbols[left].len + symbols[right].len;
        if let Some(&id) = self.ids.get(&text[start..start + len]) {
            let score = self.scores.get(id as usize).copied().unwrap_or(0.0);
            queue.push(Bigram {
                score,
                left,
                right,
                len,
            });
        }
    }
}

/// The byte a `<0xNN>` token stands for.
pub(crate) fn parse_byte_token(token: &str) -> Option<u8> {
    let hex = token.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> SentencePiece {
        let tokens = ["<unk>", "<0x41>", "▁", "h", "i", "▁h", "▁hi", "hi", "é"];
        let scores = vec![0.0, 0.0, -5.0, -4.0, -4.0, -2.0, -1.0, -3.0, -4.0];
        SentencePiece::new(&tokens, scores, Some(0))
    }

    #[test]
    fn merges_by_score_and_falls_back_to_bytes() {
        let m = model();
        let mut out = Vec::new();
        // "▁h" (-2) beats "hi" (-3); then "▁h"+"i" = "▁hi" (-1).
        m.encode_into("▁hi", &mut out).unwrap();
        assert_eq!(out, vec![6]);
        out.clear();
        // 'A' has a byte token; 'B' falls back to <unk>; 'é' is a piece.
        m.encode_into("ABé", &mut out).unwrap();
        assert_eq!(out, vec![1, 0, 8]);
        out.clear();
        m.encode_into("", &mut out).unwrap();
        assert!(out.is_empty());
    }

    #[test]
    fn a_byte_without_token_or_unknown_is_reported() {
        let m = SentencePiece::new(&["a"], vec![0.0], None);
        let mut out = Vec::new();
        assert_eq!(m.encode_into("ab", &mut out), Err(b'b'));
    }

    #[test]
    fn byte_tokens_parse() {
        assert_eq!(parse_byte_token("<0x0A>"), Some(10));
        assert_eq!(parse_byte_token("<0xff>"), Some(255));
        assert_eq!(parse_byte_token("<0x0>"), None);
        assert_eq!(parse_byte_token("0x0A"), None);
    }
}
