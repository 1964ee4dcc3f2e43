//! x86-64 SIMD kernels. The only place in the crate with `unsafe` code besides the
//! dispatch in [`crate::kernels`].
//!
//! Layers: each kernel is an `unsafe fn` whose one obligation is "the CPU has these
//! features" (the dispatcher discharges it with [`crate::Kernels`]'s invariant); inside,
//! arithmetic intrinsics are safe calls, and the only `unsafe` blocks are the loads and
//! stores in small `#[inline]` helpers that take fixed-size arrays, so every pointer they
//! touch is in bounds by type.

pub(crate) mod avx2;
pub(crate) mod avx512;
