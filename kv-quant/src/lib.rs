//! Conversions between f32 and the stored element formats of KV-cache rows.
//!
//! Float layouts (f16, bf16) live here now; quantized INT8/INT4 rows with group scales join
//! them. This crate never depends on candle: it works on plain slices.
#![forbid(unsafe_code)]
