//! Arbitrary bytes as a GGUF file: header and metadata, then the model configuration and
//! the tokenizer built from them. Every input must give a value or a typed error: no panic,
//! no abort, no allocation sized by an unchecked count (libFuzzer's malloc limit catches
//! those).
//!
//! The bytes reach kv-model through [`parse_metadata`] alone: kv-model's pre-flight check
//! (`check_gguf_bytes`), then candle's reader on what the check let through, as
//! `kv_model::load` does.
#![no_main]

use std::collections::HashMap;
use std::io::Cursor;

use candle_core::quantized::gguf_file::{Content, Value};
use kv_model::{LlamaConfig, Tokenizer};
use libfuzzer_sys::fuzz_target;

/// The library entry point under test: bytes of a GGUF file to its metadata, or `None` for
/// a file refused with an error. The one call to change when the entry point changes.
fn parse_metadata(bytes: &[u8]) -> Option<HashMap<String, Value>> {
    kv_model::check_gguf_bytes(bytes).ok()?;
    Content::read(&mut Cursor::new(bytes))
        .ok()
        .map(|content| content.metadata)
}

fuzz_target!(|bytes: &[u8]| {
    let Some(metadata) = parse_metadata(bytes) else {
        return;
    };
    if let Ok(config) = LlamaConfig::from_metadata(&metadata) {
        // A configuration the library accepts must describe a cache it can size.
        let shape = config.shape().expect("from_metadata checks the shape");
        let _ = kv_core::memory::bytes_per_token(&shape, kv_core::KvDType::F16);
    }
    if let Ok(tokenizer) = Tokenizer::from_metadata(&metadata) {
        // Whatever vocabulary the file holds, text round trips without a panic.
        if let Ok(ids) = tokenizer.encode("Hello, world! <|im_start|>user\n\u{e9}\u{1f600}") {
            let _ = tokenizer.decode(&ids);
        }
        let _ = tokenizer.decode(&[0, 1, u32::MAX]);
    }
});
