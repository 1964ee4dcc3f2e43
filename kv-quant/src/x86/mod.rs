//! x86-64 kernels not yet written over the vector width ([`crate::simd::Simd`]): the AVX2
//! quantizers (the write path, run at both SIMD levels) and the multi-head and KIVI score
//! kernels, which differ by width in more than the lane count (split INT4 codes and
//! 512-bit reductions at AVX-512). The one-row kernels live in [`crate::rows`], written once.
//!
//! Layers: each kernel is an `unsafe fn` whose one obligation is "the CPU has these
//! features" (the dispatcher discharges it with a [`crate::simd`] token); inside,
//! arithmetic intrinsics are safe calls, and the only `unsafe` blocks are the loads and
//! stores in small `#[inline]` helpers that take fixed-size arrays, so every pointer they
//! touch is in bounds by type.

pub(crate) mod avx2;
pub(crate) mod avx512;
