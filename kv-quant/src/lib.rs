//! Byte layouts and kernels of the rows a KV cache stores.
//!
//! A *row* is one head's `head_dim` vector of K or V for one token. This crate defines how a
//! row is stored ([`RowFormat`]: f32, f16, bf16, and INT8/INT4/INT2 with per-group f16
//! scales, laid out as the `bytemuck::Pod` structs of [`layout`]), converts rows to and from
//! f32, and provides the fused kernels decode attention needs: a query's dot product with a
//! stored key ([`RowFormat::dot`]) and the probability-weighted accumulation of a stored
//! value ([`RowFormat::axpy`]), both read straight from the bytes. Keys can also be stored
//! KIVI-style, per channel across a block of tokens ([`KiviKeyFormat`]), and rotated with a
//! normalized Hadamard transform first ([`hadamard_in_place`]).
//!
//! Every kernel has a scalar reference and, on x86-64, AVX2 and AVX-512 versions chosen at
//! run time ([`Isa`], [`Kernels`]); tests hold every level the CPU has to the reference.
//! The crate also holds the workspace's one SIMD layer ([`simd`]): CPU detection and the
//! `KV_ISA` switch, the level tokens, the width-generic [`simd::Simd`] operations and the
//! helpers (reductions, prefetching) that kv-backend-cpu builds its kernels on.
//! Error bounds of every format are derived in [`layout`] and checked by property tests.
//!
//! The crate never depends on candle or any tensor library: plain slices in, plain slices
//! out, no allocation on the kernel paths, so every backend can use it. kv-core repeats the
//! per-group size formulas rather than depend on it (it must stay light); a test in
//! kv-backend-cpu holds kv-core's sizes equal to [`RowFormat::row_bytes`].
//!
//! ```
//! use kv_quant::{Group, RowFormat};
//!
//! let fmt: RowFormat = "int8-g32".parse()?;
//! assert_eq!(fmt, RowFormat::Int8 { group: Group::G32 });
//! let k = [0.5f32; 64];
//! let mut row = [0u8; 68];
//! fmt.quantize_row(&k, &mut row)?;
//! let q = [1.0f32; 64];
//! // Each stored element is within the format's bound of 0.5 (the f16 scale is rounded up,
//! // so here x̂ = 0.50045), hence the score within 64 bounds of 32.
//! let bound = fmt.error_bound(&row)?;
//! assert!(f64::from((fmt.dot(&q, &row)? - 32.0).abs()) <= 64.0 * bound);
//! # Ok::<(), kv_quant::QuantError>(())
//! ```
#![deny(unsafe_code)]

mod encode;
mod error;
mod format;
mod hadamard;
mod heads;
mod kernels;
pub mod kivi;
mod kivi_kernels;
pub mod layout;
mod rows;
mod scalar;
#[allow(unsafe_code)] // the level tokens and their target-feature entry points
pub mod simd;

pub use error::{QuantError, Result};
pub use format::{Group, RowFormat};
pub use hadamard::hadamard_in_place;
pub use kernels::Kernels;
pub use kivi::{KiviBits, KiviKeyFormat};
pub use simd::Isa;
