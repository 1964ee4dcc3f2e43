//! The suite any [`CacheBackend`] runs to prove itself: ours, or yours.
//!
//! [`check`] runs, for every layout of [`KvDType::ALL`] the backend [`supports`]:
//!
//! - **attention**: a fixed sweep (MHA, GQA and MQA × head dims 64 and 128 × block sizes 1,
//!   16 and one block holding everything, plus a 150-token prompt per head layout) and then random cases drawn by proptest with a
//!   fixed seed: 1 to 3 sequences of different lengths (ragged batches, lengths across
//!   block boundaries), a prefill (sometimes in two chunks) and then up to four decode steps,
//!   on shuffled, non-contiguous block ids, two layers with different data, the usual or a
//!   custom softmax scale. Every `attend` is compared with [`crate::reference`] twice (see
//!   the tolerances below), and every `read` of the context with what was written;
//! - **read round trip**: rows written to scattered slots read back within the layout's
//!   rounding (the quantized layouts: their format's bound), also from non-contiguous and
//!   f16 input tensors; overwrites replace; an untouched layer reads back zero;
//! - **copy_blocks**: copies every layer's K and V, leaves the sources and every other block
//!   as they were, also for a block rewritten from its first slot up to half its length
//!   (copy-on-write of a partly filled block), one source to many targets and a self-move;
//!   writing to a copy changes neither the source nor another copy; a chain of moves
//!   applies in order; a copy run from target to source is named as such;
//! - **errors**: each bad call below fails with the stated [`KvError`] variant and leaves
//!   the storage bit-for-bit unchanged;
//! - **causal mask** and **head mapping**: probes whose outputs say what a query saw (zero
//!   keys weigh visible tokens equally, values encode their position or KV head), so a
//!   query that sees a token after its own, or a query head that reads another KV head
//!   than `h / (q_heads / kv_heads)`, fails with a message that says so before the
//!   attention cases run;
//! - **sliding window**: the same probe with [`AttentionBatch::window`] set: a query at `p`
//!   sees exactly `p - W + 1 ..= p`, and a message names the positions it saw otherwise.
//!
//! A layout the backend does not support is skipped, with the reason in the [`Report`],
//! after checking that `allocate` answers [`KvError::Unsupported`] for it.
//!
//! Layouts with 128-element groups run the head-dim-64 cases at head dim 128, and KIVI
//! layouts (keys quantized per 32-token block) run with block sizes rounded up to multiples
//! of 32 (coverage then reports "block size 32").
//!
//! # Tolerances
//!
//! Let *u* be the layout's unit roundoff, *V* the largest `abs(v)` in the context of a call,
//! and *S* the largest `abs(scale) · Σ_d abs(q_d · k_d)` over the call's queries, heads and
//! the keys each query sees: a bound on any score's size that does not cancel.
//!
//! | layout | *u*   | `read` vs written *x*     | `attend` vs reference on stored values | `attend` vs reference on the f32 input    |
//! |--------|-------|---------------------------|----------------------------------------|-------------------------------------------|
//! | f32    | 0     | bit-exact                 | `1e-4 · (1 + S) · V`                   | the same                                  |
//! | f16    | 2^-11 | `u · abs(x) + 2^-25`      | `1e-4 · (1 + S) · V · (1 + u)`         | `V · (u + e^(2uS) − 1)` + the compute one |
//! | bf16   | 2^-8  | `u · abs(x)`              | `1e-4 · (1 + S) · V · (1 + u)`         | `V · (u + e^(2uS) − 1)` + the compute one |
//!
//! Why these bounds:
//! - *Stored values* are the rows `read` returns. Against them only the arithmetic differs
//!   from the f64 reference. f32 dot products over 128 dims are off by at most about
//!   `128 · 2^-24 · S ≈ 8e-6 · S`; a score error δ moves the softmax weights by at most
//!   `e^(2δ) − 1` in L1 and so the output by that times *V*. `1e-4 · (1 + S) · V` leaves
//!   a margin of about 6 over that worst case for any summation order, but fails a backend
//!   that rounds queries, scores or weights to half precision: accumulate in f32.
//! - *The f32 input* is what the model computed. Rounding K to the layout moves each score by
//!   at most `u · S`, hence the weights by `e^(2uS) − 1` in L1; rounding V moves the output
//!   by at most `u · V`. With the suite's data (S ≈ 3) that is about `3.8e-3 · V` for f16
//!   and `2.8e-2 · V` for bf16. The bound is rigorous, so it never fails by bad luck; the
//!   tight checks are the two before it, which together pin the result down.
//! - *Written values*: f16 rounds to nearest with relative error at most 2^-11 (absolute
//!   2^-25 among its subnormals), bf16 at most 2^-8; f32 stores what it is given.
//!
//! ## Quantized layouts
//!
//! Their tolerances come from `kv-quant`'s format bounds, evaluated on the data written:
//! the suite quantizes each row (or KIVI key block) with the layout's kv-quant format and
//! takes its `error_bound`, the largest `abs(x - x̂)` any element of it can have.
//!
//! | keys / values            | `read` vs written *x*: bound *e* of each element                          |
//! |--------------------------|----------------------------------------------------------------------------|
//! | INT8 / INT4 rows (K, V)  | `RowFormat::error_bound` of the row                                         |
//! | Hadamard-rotated K rows  | `sqrt(d) ·` the bound of the rotated row (the rotation is orthonormal), plus the rotations' f32 rounding |
//! | KIVI keys                | `KiviKeyFormat::error_bound` of the f16-rounded keys written to the same 32-token key block `· (1 + 2^-10) + 2^-10 · abs(x) + 2^-24` (f16 rounding before quantizing, and again if a quantized block is reopened) |
//!
//! A KIVI query reads the keys of its own 32-token key block as written, in f16, and those
//! of earlier key blocks as stored, in prefill as in decode (a block is quantized only when
//! full, and no query may see keys quantized with scales that depend on later tokens); the
//! reference "on stored values" is computed that way for them. With a residual of `R`
//! tokens (`kivi2-r128`) a query at position `p` also reads in f16, as written, the keys of
//! every key block ending after `p - R` and the values of the tokens after `p - R`; `read`
//! still returns the stored (quantized) rows of full blocks. Before each step the suite
//! settles ([`CacheBackend::settle_blocks`]) the blocks of each sequence that its queries
//! are all `R` tokens past, as `PagedCache` does, which must change no result.
//!
//! `attend` vs the reference on stored values: as for the floats with `u = 0`. On the f32
//! input: with `δ = abs(scale) · max Σ_d abs(q_d) · e_d` over the queries, heads and visible
//! keys (how far stored keys can move a score) and `E_V` the largest value bound,
//! `E_V + V · (e^(2δ) − 1)` + the compute tolerance (for the float layouts this is the
//! bound above, `e = u · abs(x)`). Coarse formats make this bound loose; the check against
//! the stored values stays tight.
//!
//! # Errors the suite requires
//!
//! | call                                                  | variant                       |
//! |-------------------------------------------------------|-------------------------------|
//! | `write`/`read` with a slot's block or offset past the end | [`KvError::OutOfRange`] |
//! | `write`/`read`/`attend` with a layer past the end      | [`KvError::OutOfRange`]      |
//! | `write` with K or V not `[slots, kv_heads, head_dim]`  | [`KvError::ShapeMismatch`]   |
//! | `write` with NaN or infinity in K or V                 | [`KvError::NonFinite`]       |
//! | `attend` whose blocks do not cover a sequence          | [`KvError::InvalidArgument`] |
//! | `attend` with a block id past the end                  | [`KvError::OutOfRange`]      |
//! | `attend` with q not `[total_queries, q_heads, head_dim]` | [`KvError::ShapeMismatch`] |
//! | `copy_blocks` with a block past the end                | [`KvError::OutOfRange`]      |
//!
//! Calls that fail must leave the storage as it was, even when the bad slot or move comes
//! after good ones. `kv_core::validate` makes every check of this table that does not
//! depend on the values.
//!
//! # The suite tests itself
//!
//! `tests/suite_catches_faults.rs` runs it on the plain backend of
//! `examples/custom_backend.rs`, which passes, and on four broken twins (a causal mask off
//! by one, `h % kv_heads` head mapping, copies in the wrong direction, writes that store
//! rows before finding a bad one), each of which must fail with a message naming its fault.
//!
//! # Example
//!
//! In your backend crate's tests (with `kv-attention = { features = ["conformance"] }`):
//!
//! ```
//! # fn my_backend_conforms<B: kv_core::CacheBackend>(backend: B) {
//! // let backend = MyBackend::new();
//! match kv_attention::conformance::check(&backend) {
//!     Ok(report) => println!("{report}"),
//!     Err(failure) => panic!("{failure}"),
//! }
//! # }
//! ```
//!
//! [`supports`]: CacheBackend::supports

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt;
use std::num::NonZeroUsize;
use std::panic::{catch_unwind, AssertUnwindSafe};

use candle_core::{DType, Tensor};
use half::f16;
use kv_core::{
    AttentionBatch, BlockId, CacheBackend, KiviBits, KvDType, KvError, ModelShape, QuantGroup,
    SeqAttention, Slot, StorageSpec,
};
use kv_quant::{hadamard_in_place, Group, KiviBits as QuantBits, KiviKeyFormat, RowFormat};
use proptest::prelude::*;
use proptest::test_runner::{
    Config as ProptestConfig, RngAlgorithm, TestCaseError, TestError, TestRng, TestRunner,
};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::reference::{self, Heads};

/// How much [`check_with`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Random attention cases per layout, after the fixed sweep.
    pub random_cases: u32,
    /// Seed of the random cases and their data: a fixed seed makes a failure reproducible.
    pub seed: u64,
}

impl Default for Config {
    /// 32 random cases per layout (a few seconds in a debug build), seed fixed.
    fn default() -> Self {
        Self {
            random_cases: 32,
            seed: 0x6b76_5f63_6f6e_6631,
        }
    }
}

/// What [`check`] ran and how close the backend came to the tolerances.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// The backend's name.
    pub backend: String,
    /// One entry per layout that ran.
    pub dtypes: Vec<DTypeReport>,
    /// Layouts that did not run, and why.
    pub skipped: Vec<Skipped>,
}

/// What ran for one layout.
#[derive(Debug, Clone, PartialEq)]
pub struct DTypeReport {
    /// The layout.
    pub dtype: KvDType,
    /// Attention cases of the fixed sweep.
    pub sweep_cases: u32,
    /// Random attention cases.
    pub random_cases: u32,
    /// `attend` calls compared with the reference.
    pub attend_calls: u64,
    /// How many cases covered each feature (head layout, block size, head dim, chunked
    /// prefill, decode): names to counts.
    pub coverage: BTreeMap<&'static str, u32>,
    /// Largest error / tolerance against the reference on the stored values (below 1).
    pub worst_vs_stored: f64,
    /// Largest error / tolerance against the reference on the f32 input (below 1).
    pub worst_vs_input: f64,
    /// Bad calls checked to fail with the right error and change nothing.
    pub error_cases: u32,
    /// Checks besides attention that passed.
    pub checks: Vec<&'static str>,
}

/// A layout that was not checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The layout.
    pub dtype: KvDType,
    /// Why, in words.
    pub reason: String,
}

/// The first check a backend failed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("backend `{backend}` fails the conformance check `{check}`{}: {detail}",
    .dtype.map(|d| format!(" for {d}")).unwrap_or_default())]
pub struct ConformanceFailure {
    /// The backend's name.
    pub backend: String,
    /// The layout under test, if the check is about one.
    pub dtype: Option<KvDType>,
    /// Which check.
    pub check: &'static str,
    /// What went wrong; for random cases, the smallest failing case proptest found.
    pub detail: String,
}

/// Runs the suite with the default [`Config`].
///
/// # Errors
/// The first failed check, as a [`ConformanceFailure`]; a panic in the backend counts as a
/// failure of the check that caused it.
pub fn check<B: CacheBackend>(backend: &B) -> Result<Report, ConformanceFailure> {
    check_with(backend, &Config::default())
}

/// Runs the suite with `config`.
///
/// # Errors
/// As [`check`].
pub fn check_with<B: CacheBackend>(
    backend: &B,
    config: &Config,
) -> Result<Report, ConformanceFailure> {
    let name = backend.name().to_string();
    let fail = |dtype: Option<KvDType>, check: &'static str, detail: String| ConformanceFailure {
        backend: name.clone(),
        dtype,
        check,
        detail,
    };
    let mut report = Report {
        backend: name.clone(),
        dtypes: Vec::new(),
        skipped: Vec::new(),
    };
    for (index, &dtype) in KvDType::ALL.iter().enumerate() {
        if !backend.supports(dtype) {
            guarded(|| check_unsupported(backend, dtype))
                .map_err(|d| fail(Some(dtype), "unsupported layout", d))?;
            report.skipped.push(Skipped {
                dtype,
                reason: format!(
                    "`{name}` does not support the {dtype} layout (supports() is false and \
                     allocate answers Unsupported)"
                ),
            });
            continue;
        }
        let Some(tol) = Tolerance::of(dtype) else {
            report.skipped.push(Skipped {
                dtype,
                reason: format!(
                    "this version of the suite states no tolerance for the {dtype} layout"
                ),
            });
            continue;
        };
        let mut dr = DTypeReport {
            dtype,
            sweep_cases: 0,
            random_cases: 0,
            attend_calls: 0,
            coverage: BTreeMap::new(),
            worst_vs_stored: 0.0,
            worst_vs_input: 0.0,
            error_cases: 0,
            checks: Vec::new(),
        };
        guarded(|| check_round_trip(backend, dtype, tol))
            .map_err(|d| fail(Some(dtype), "read round trip", d))?;
        dr.checks.push("read round trip");
        guarded(|| check_copy_blocks(backend, dtype))
            .map_err(|d| fail(Some(dtype), "copy_blocks", d))?;
        dr.checks.push("copy_blocks");
        if backend.supports_block_bytes() {
            guarded(|| check_block_bytes(backend, dtype))
                .map_err(|d| fail(Some(dtype), "block export/import", d))?;
            dr.checks.push("block bytes");
        }
        dr.error_cases =
            guarded(|| check_errors(backend, dtype)).map_err(|d| fail(Some(dtype), "errors", d))?;
        dr.checks.push("errors");
        guarded(|| check_causal_mask(backend, dtype))
            .map_err(|d| fail(Some(dtype), "causal mask", d))?;
        dr.checks.push("causal mask");
        guarded(|| check_head_mapping(backend, dtype))
            .map_err(|d| fail(Some(dtype), "head mapping", d))?;
        dr.checks.push("head mapping");
        guarded(|| check_sliding_window(backend, dtype))
            .map_err(|d| fail(Some(dtype), "sliding window", d))?;
        dr.checks.push("sliding window");

        let stats = RefCell::new(AttnStats::default());
        for case in sweep_cases() {
            guarded(|| run_case(backend, dtype, tol, &case, &mut stats.borrow_mut())).map_err(
                |d| {
                    fail(
                        Some(dtype),
                        "attention sweep",
                        format!("{d}; case {case:?}"),
                    )
                },
            )?;
            dr.sweep_cases += 1;
        }
        let mut runner = TestRunner::new_with_rng(
            ProptestConfig {
                cases: config.random_cases,
                max_shrink_iters: 256,
                failure_persistence: None,
                ..ProptestConfig::default()
            },
            TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes(config.seed, index)),
        );
        let result = runner.run(&case_strategy(), |case| {
            // proptest turns a panic into a failure and shrinks it like any other.
            let mut probe = AttnStats::default();
            run_case(backend, dtype, tol, &case, &mut probe).map_err(TestCaseError::fail)?;
            stats.borrow_mut().merge(&probe);
            Ok(())
        });
        match result {
            Ok(()) => dr.random_cases = config.random_cases,
            Err(TestError::Fail(reason, case)) => {
                return Err(fail(
                    Some(dtype),
                    "attention",
                    format!("{reason}; smallest failing case: {case:?}"),
                ))
            }
            Err(TestError::Abort(reason)) => {
                return Err(fail(Some(dtype), "attention", format!("aborted: {reason}")))
            }
        }
        let stats = stats.into_inner();
        dr.attend_calls = stats.attend_calls;
        dr.coverage = stats.coverage;
        dr.worst_vs_stored = stats.worst_vs_stored;
        dr.worst_vs_input = stats.worst_vs_input;
        report.dtypes.push(dr);
    }
    if report.dtypes.is_empty() {
        return Err(fail(
            None,
            "supports",
            "the backend supports none of the layouts in KvDType::ALL".into(),
        ));
    }
    Ok(report)
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "backend `{}` conforms", self.backend)?;
        for d in &self.dtypes {
            writeln!(
                f,
                "  {}: {} sweep + {} random attention cases, {} attend calls; worst error \
                 {:.3} of tolerance vs stored values, {:.3} vs f32 input; {} error cases; {}",
                d.dtype,
                d.sweep_cases,
                d.random_cases,
                d.attend_calls,
                d.worst_vs_stored,
                d.worst_vs_input,
                d.error_cases,
                d.checks.join(", ")
            )?;
            let coverage: Vec<String> =
                d.coverage.iter().map(|(k, v)| format!("{k} {v}")).collect();
            writeln!(f, "    coverage: {}", coverage.join(", "))?;
        }
        for s in &self.skipped {
            writeln!(f, "  {} skipped: {}", s.dtype, s.reason)?;
        }
        Ok(())
    }
}

/// Runs `f`, turning a panic into a failure message.
fn guarded<T>(f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a non-string payload".into());
            Err(format!("the backend panicked: {msg}"))
        }
    }
}

fn seed_bytes(seed: u64, stream: usize) -> [u8; 32] {
    let mut out = [0u8; 32];
    out[..8].copy_from_slice(&seed.to_le_bytes());
    out[8..16].copy_from_slice(&(stream as u64).to_le_bytes());
    out[16..24].copy_from_slice(b"kv-conf.");
    out
}

/// What one layout may do to the values written to it: see the tables in the module docs.
#[derive(Debug, Clone, Copy)]
enum Tolerance {
    /// A float layout: relative rounding `u`, absolute `tiny` near zero (half the smallest
    /// subnormal).
    Float { u: f64, tiny: f64 },
    /// A quantized layout, in kv-quant's formats.
    Quant { keys: QuantKeys, values: RowFormat },
}

/// How a quantized layout stores keys.
#[derive(Debug, Clone, Copy)]
enum QuantKeys {
    /// One row per token.
    Rows(RowFormat),
    /// One row per token, after the normalized Hadamard rotation.
    Rotated(RowFormat),
    /// KIVI blocks (per channel over the tokens of a key block), f16 until full, and the
    /// residual: tokens at the end of a sequence read in f16.
    Kivi(KiviKeyFormat, usize),
}

/// Which of K and V a bound is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kv {
    K,
    V,
}

impl Tolerance {
    fn of(dtype: KvDType) -> Option<Self> {
        let group = |g: QuantGroup| match g {
            QuantGroup::G32 => Group::G32,
            QuantGroup::G64 => Group::G64,
            QuantGroup::G128 => Group::G128,
        };
        let rows = |f: RowFormat| Tolerance::Quant {
            keys: QuantKeys::Rows(f),
            values: f,
        };
        match dtype {
            KvDType::F32 => Some(Tolerance::Float { u: 0.0, tiny: 0.0 }),
            KvDType::F16 => Some(Tolerance::Float {
                u: 2f64.powi(-11),
                tiny: 2f64.powi(-25),
            }),
            KvDType::BF16 => Some(Tolerance::Float {
                u: 2f64.powi(-8),
                tiny: 2f64.powi(-134),
            }),
            KvDType::Int8 { group: g } => Some(rows(RowFormat::Int8 { group: group(g) })),
            KvDType::Int4 { group: g } => Some(rows(RowFormat::Int4 { group: group(g) })),
            KvDType::Int4Hadamard { group: g } => {
                let f = RowFormat::Int4 { group: group(g) };
                Some(Tolerance::Quant {
                    keys: QuantKeys::Rotated(f),
                    values: f,
                })
            }
            KvDType::Kivi { bits, .. } => {
                let (bits, values) = match bits {
                    KiviBits::B4 => (QuantBits::B4, RowFormat::Int4 { group: Group::G32 }),
                    KiviBits::B2 => (QuantBits::B2, RowFormat::Int2 { group: Group::G32 }),
                };
                Some(Tolerance::Quant {
                    keys: QuantKeys::Kivi(
                        KiviKeyFormat::new(bits, dtype.block_tokens()),
                        dtype.residual_tokens(),
                    ),
                    values,
                })
            }
            _ => None,
        }
    }

    /// For KIVI, the tokens of a key block and the residual: a query reads the keys of its
    /// own key block in f16 (they are not quantized until the block is full, and a query
    /// must not see keys quantized with scales that depend on later tokens), and those of
    /// earlier blocks as stored, except the blocks and values within the residual.
    fn own_block_tokens(&self) -> Option<(usize, usize)> {
        match self {
            Tolerance::Quant {
                keys: QuantKeys::Kivi(f, residual),
                ..
            } => Some((f.block_tokens, *residual)),
            _ => None,
        }
    }

    /// Unit roundoff of the stored values for the compute tolerance's `(1 + u)`: 0 for the
    /// quantized layouts, whose bounds are absolute.
    fn unit(&self) -> f64 {
        match self {
            Tolerance::Float { u, .. } => *u,
            Tolerance::Quant { .. } => 0.0,
        }
    }

    /// For every element of `data` (`[slots.len(), heads, d]`, written as K or V to
    /// `slots`), how far what `read` returns may be from it.
    fn bounds(
        &self,
        which: Kv,
        data: &[f32],
        slots: &[Slot],
        heads: usize,
        d: usize,
    ) -> Result<Vec<f64>, String> {
        let (keys, values) = match *self {
            Tolerance::Float { u, tiny } => {
                return Ok(data.iter().map(|&x| u * (x as f64).abs() + tiny).collect())
            }
            Tolerance::Quant { keys, values } => (keys, values),
        };
        let row_bound = |format: RowFormat, row: &[f32]| -> Result<f64, String> {
            let mut bytes = vec![0u8; format.row_bytes(row.len()).map_err(s)?];
            format.quantize_row(row, &mut bytes).map_err(s)?;
            format.error_bound(&bytes).map_err(s)
        };
        let mut out = vec![0.0f64; data.len()];
        match (which, keys) {
            (Kv::V, _) | (Kv::K, QuantKeys::Rows(_)) => {
                let format = match (which, keys) {
                    (Kv::K, QuantKeys::Rows(f)) => f,
                    _ => values,
                };
                for (row, b) in data.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
                    // kv-quant's bound is rigorous; the margin covers its f64 evaluation.
                    b.fill(row_bound(format, row)? * (1.0 + 1e-9));
                }
            }
            (Kv::K, QuantKeys::Rotated(format)) => {
                let mut rotated = vec![0.0f32; d];
                for (row, b) in data.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
                    rotated.copy_from_slice(row);
                    hadamard_in_place(&mut rotated).map_err(s)?;
                    let bound = row_bound(format, &rotated)?;
                    // The rotation is orthonormal: an error vector with elements within `bound`
                    // has a 2-norm within sqrt(d) bound, and so has every element of its
                    // rotation back. The rotations in f32 add log2(d) roundings per element.
                    let norm = row.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
                    let sqrt_d = (d as f64).sqrt();
                    let rounding =
                        4.0 * (d as f64).log2().max(1.0) * 2f64.powi(-24) * (norm + sqrt_d * bound);
                    b.fill(sqrt_d * bound + rounding);
                }
            }
            (Kv::K, QuantKeys::Kivi(format, _)) => {
                // Rows sharing a key block (cache block, offset / block_tokens), per head.
                let t = format.block_tokens;
                let mut groups: BTreeMap<(BlockId, u32), Vec<usize>> = BTreeMap::new();
                for (i, slot) in slots.iter().enumerate() {
                    groups
                        .entry((slot.block, slot.offset / t as u32))
                        .or_default()
                        .push(i);
                }
                let mut block = vec![0.0f32; t * d];
                let mut bytes = vec![0u8; format.block_bytes(d).map_err(s)?];
                for members in groups.values() {
                    for h in 0..heads {
                        // The key block as stored: f16-rounded keys; slots not written here
                        // repeat the first member, so they widen no channel's range.
                        let row = |i: usize| &data[(i * heads + h) * d..][..d];
                        for (k, dst) in block.chunks_exact_mut(d).enumerate() {
                            let src = row(members[k.min(members.len() - 1)]);
                            for (o, &x) in dst.iter_mut().zip(src) {
                                *o = f16::from_f32(x).to_f32();
                            }
                        }
                        format.quantize_block(&block, d, &mut bytes).map_err(s)?;
                        let bound = format.error_bound(&bytes, d).map_err(s)?;
                        for &i in members {
                            let at = (i * heads + h) * d;
                            for (b, &x) in out[at..at + d].iter_mut().zip(row(i)) {
                                // Rounded to f16 on the way in and, if its block was quantized
                                // and reopened, on the way back.
                                *b = bound * (1.0 + 2f64.powi(-10))
                                    + 2f64.powi(-10) * (x as f64).abs()
                                    + 2f64.powi(-24);
                            }
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// The first element of `got` further from `want` than `bounds` allow.
    fn first_misread(
        &self,
        want: &[f32],
        got: &[f32],
        bounds: &[f64],
    ) -> Option<(usize, f32, f32)> {
        want.iter()
            .zip(got)
            .zip(bounds)
            .position(|((&w, &g), &b)| !within((w as f64 - g as f64).abs(), b))
            .map(|i| (i, want[i], got[i]))
    }
}

/// `err <= bound`, false when either is NaN: a NaN result always fails.
fn within(err: f64, bound: f64) -> bool {
    err <= bound
}

fn s<E: fmt::Display>(e: E) -> String {
    e.to_string()
}

fn tensor<B: CacheBackend>(
    backend: &B,
    data: Vec<f32>,
    dims: (usize, usize, usize),
) -> Result<Tensor, String> {
    Tensor::from_vec(data, dims, backend.device()).map_err(s)
}

fn host(t: &Tensor) -> Result<Vec<f32>, String> {
    t.to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(s)
}

fn random(rng: &mut StdRng, n: usize, amp: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-amp..=amp)).collect()
}

/// The smallest of `d`, `2 d`, `4 d`, ... that `dtype` stores (a 128-element group needs a
/// head dim of 128): cases written for head dim 64 run at 128 for such layouts.
fn fit_head_dim(dtype: KvDType, d: usize) -> usize {
    (0..5)
        .map(|i| d << i)
        .find(|&d| dtype.row_bytes(d).is_ok())
        .unwrap_or(d)
}

/// `block_size` rounded up to a multiple of the layout's [`KvDType::block_tokens`] (32 for
/// KIVI, whose keys are quantized per 32-token block; 1 for the others).
fn fit_block(dtype: KvDType, block_size: usize) -> usize {
    let t = dtype.block_tokens().max(1);
    block_size.div_ceil(t).max(1) * t
}

/// Every slot of a storage, block by block.
fn all_slots(spec: &StorageSpec) -> Vec<Slot> {
    (0..spec.num_blocks as u32)
        .map(BlockId::new)
        .flat_map(|block| (0..spec.block_size as u32).map(move |offset| Slot { block, offset }))
        .collect()
}

/// Everything a storage holds, K and V of every layer, as read back.
fn snapshot<B: CacheBackend>(backend: &B, storage: &B::Storage) -> Result<Vec<f32>, String> {
    let spec = *backend.spec(storage);
    let slots = all_slots(&spec);
    let mut out = Vec::new();
    for layer in 0..spec.shape.n_layers() {
        let (k, v) = backend.read(storage, layer, &slots).map_err(s)?;
        out.extend(host(&k)?);
        out.extend(host(&v)?);
    }
    Ok(out)
}

/// A storage of `spec` with random K/V in every slot of every layer.
fn filled<B: CacheBackend>(
    backend: &B,
    spec: &StorageSpec,
    rng: &mut StdRng,
) -> Result<B::Storage, String> {
    let mut storage = backend.allocate(spec).map_err(s)?;
    let slots = all_slots(spec);
    let dims = (slots.len(), spec.shape.n_kv_heads(), spec.shape.head_dim());
    let n = dims.0 * dims.1 * dims.2;
    for layer in 0..spec.shape.n_layers() {
        let k = tensor(backend, random(rng, n, 1.0), dims)?;
        let v = tensor(backend, random(rng, n, 1.0), dims)?;
        backend
            .write(&mut storage, layer, &slots, &k, &v)
            .map_err(|e| format!("filling layer {layer}: {e}"))?;
    }
    Ok(storage)
}

/// [`filled`], then block 1 of layer 0 rewritten from its first slot up to half its
/// length, as a new sequence reusing it would: for a layout that quantizes over a block's
/// tokens (KIVI keys) it is now a block being filled, with its window.
fn filled_with_half_block<B: CacheBackend>(
    backend: &B,
    spec: &StorageSpec,
    rng: &mut StdRng,
) -> Result<B::Storage, String> {
    let mut storage = filled(backend, spec, rng)?;
    let half = (spec.block_size / 2).max(1);
    let fresh: Vec<Slot> = (0..half as u32)
        .map(|offset| Slot {
            block: BlockId::new(1),
            offset,
        })
        .collect();
    let dims = (half, spec.shape.n_kv_heads(), spec.shape.head_dim());
    let n = dims.0 * dims.1 * dims.2;
    let (k, v) = (
        tensor(backend, random(rng, n, 1.0), dims)?,
        tensor(backend, random(rng, n, 1.0), dims)?,
    );
    backend
        .write(&mut storage, 0, &fresh, &k, &v)
        .map_err(|e| format!("rewriting half of block 1: {e}"))?;
    Ok(storage)
}

fn check_unsupported<B: CacheBackend>(backend: &B, dtype: KvDType) -> Result<(), String> {
    let shape = ModelShape::new(1, 2, 1, fit_head_dim(dtype, 64)).map_err(s)?;
    let spec = StorageSpec::new(shape, dtype, fit_block(dtype, 16), 2).map_err(s)?;
    match backend.allocate(&spec) {
        Err(KvError::Unsupported { .. }) => Ok(()),
        Err(e) => Err(format!(
            "supports({dtype}) is false, so allocate must answer Unsupported, not: {e}"
        )),
        Ok(_) => Err(format!(
            "supports({dtype}) is false but allocate succeeded for it"
        )),
    }
}

fn check_round_trip<B: CacheBackend>(
    backend: &B,
    dtype: KvDType,
    tol: Tolerance,
) -> Result<(), String> {
    let mut rng = StdRng::seed_from_u64(1);
    let (kv_heads, d) = (2, fit_head_dim(dtype, 64));
    let shape = ModelShape::new(2, 4, kv_heads, d).map_err(s)?;
    let spec = StorageSpec::new(shape, dtype, fit_block(dtype, 16), 4).map_err(s)?;
    let mut storage = backend.allocate(&spec).map_err(s)?;
    if backend.spec(&storage) != &spec {
        return Err("spec() does not return the spec the storage was allocated with".into());
    }
    let zero = snapshot(backend, &storage)?;
    if let Some(i) = zero.iter().position(|&x| x != 0.0) {
        return Err(format!(
            "a fresh storage reads {} at element {i}, not 0",
            zero[i]
        ));
    }

    // 24 scattered slots in a shuffled order, values spanning the layout's range.
    let mut slots = all_slots(&spec);
    slots.shuffle(&mut rng);
    slots.truncate(24);
    let n = slots.len() * kv_heads * d;
    let special = [
        0.0,
        -0.0,
        1.0,
        -1.0,
        60000.0,
        -1e-3,
        6e-8,
        1e-30,
        0.1,
        1.0 / 3.0,
    ];
    let k: Vec<f32> = (0..n)
        .map(|i| match special.get(i % 97) {
            Some(&x) => x,
            None => rng.random_range(-4.0..4.0),
        })
        .collect();
    let v = random(&mut rng, n, 100.0);
    // K arrives non-contiguous ([tokens, heads, dim] viewed through a transpose).
    let k_t = tensor(
        backend,
        transpose01(&k, slots.len(), kv_heads, d),
        (kv_heads, slots.len(), d),
    )?
    .transpose(0, 1)
    .map_err(s)?;
    let v_t = tensor(backend, v.clone(), (slots.len(), kv_heads, d))?;
    backend
        .write(&mut storage, 1, &slots, &k_t, &v_t)
        .map_err(|e| format!("write from a transposed K: {e}"))?;

    let expect_read = |storage: &B::Storage, slots: &[Slot], k: &[f32], v: &[f32], what: &str| {
        let (rk, rv) = backend.read(storage, 1, slots).map_err(s)?;
        let want_dims = [slots.len(), kv_heads, d];
        if rk.dims() != want_dims || rv.dims() != want_dims {
            return Err(format!(
                "read returned {:?} and {:?}, expected {want_dims:?}",
                rk.dims(),
                rv.dims()
            ));
        }
        for (name, which, want, got) in [("K", Kv::K, k, host(&rk)?), ("V", Kv::V, v, host(&rv)?)] {
            let bounds = tol.bounds(which, want, slots, kv_heads, d)?;
            if let Some((i, w, g)) = tol.first_misread(want, &got, &bounds) {
                let row = i / (kv_heads * d);
                return Err(format!(
                    "{what}: {name} of slot {:?} head {} dim {} reads {g}, written {w}",
                    slots[row],
                    (i / d) % kv_heads,
                    i % d
                ));
            }
        }
        Ok::<(), String>(())
    };
    expect_read(&storage, &slots, &k, &v, "after the first write")?;
    // Reading in another order gives the same rows.
    let rev: Vec<Slot> = slots.iter().rev().copied().collect();
    let row = kv_heads * d;
    let k_rev: Vec<f32> = k.chunks(row).rev().flatten().copied().collect();
    let v_rev: Vec<f32> = v.chunks(row).rev().flatten().copied().collect();
    expect_read(&storage, &rev, &k_rev, &v_rev, "reading in reverse order")?;

    // Overwrite the first 8 slots from f16 input tensors; the other 16 keep their rows.
    let m = 8 * row;
    let as_f16 = |rng: &mut StdRng| {
        tensor(backend, random(rng, m, 2.0), (8, kv_heads, d))?
            .to_dtype(DType::F16)
            .map_err(s)
    };
    let (k2, v2) = (as_f16(&mut rng)?, as_f16(&mut rng)?);
    backend
        .write(&mut storage, 1, &slots[..8], &k2, &v2)
        .map_err(|e| format!("write from f16 tensors: {e}"))?;
    let (k2, v2) = (host(&k2)?, host(&v2)?);
    let mut k_now = k.clone();
    let mut v_now = v.clone();
    k_now[..m].copy_from_slice(&k2);
    v_now[..m].copy_from_slice(&v2);
    expect_read(
        &storage,
        &slots,
        &k_now,
        &v_now,
        "after overwriting 8 slots",
    )?;

    let (rk0, rv0) = backend.read(&storage, 0, &slots).map_err(s)?;
    if host(&rk0)?.iter().chain(&host(&rv0)?).any(|&x| x != 0.0) {
        return Err("writing layer 1 changed layer 0".into());
    }
    Ok(())
}

/// `[a, b, c]` row-major data re-laid out as `[b, a, c]`.
fn transpose01(x: &[f32], a: usize, b: usize, c: usize) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    for i in 0..a {
        for j in 0..b {
            out[(j * a + i) * c..][..c].copy_from_slice(&x[(i * b + j) * c..][..c]);
        }
    }
    out
}

/// Every block exported from one storage and imported into another (in reverse block
/// order) reads back bit for bit and exports the same bytes again; a partly filled block
/// (a KIVI window) comes along. Bad imports are refused and change nothing.
fn check_block_bytes<B: CacheBackend>(backend: &B, dtype: KvDType) -> Result<(), String> {
    let mut rng = StdRng::seed_from_u64(3);
    let (kv_heads, d) = (2, fit_head_dim(dtype, 64));
    let shape = ModelShape::new(2, 4, kv_heads, d).map_err(s)?;
    let spec = StorageSpec::new(shape, dtype, fit_block(dtype, 4), 6).map_err(s)?;
    let source = filled_with_half_block(backend, &spec, &mut rng)?;
    let nb = spec.num_blocks;
    let mut exports = Vec::new();
    for b in 0..nb {
        let mut bytes = Vec::new();
        backend
            .export_block(&source, BlockId::new(b as u32), &mut bytes)
            .map_err(|e| format!("export of block {b}: {e}"))?;
        exports.push(bytes);
    }
    let mut target = backend.allocate(&spec).map_err(s)?;
    for (b, bytes) in exports.iter().enumerate() {
        backend
            .import_block(&mut target, BlockId::new((nb - 1 - b) as u32), bytes)
            .map_err(|e| format!("import of block {b}'s export: {e}"))?;
    }
    let (before, after) = (snapshot(backend, &source)?, snapshot(backend, &target)?);
    // The snapshot is [layer][K|V][block][offset][head][dim].
    let block_len = spec.block_size * kv_heads * d;
    for pool in 0..2 * shape.n_layers() {
        for b in 0..nb {
            let got = &after[(pool * nb + nb - 1 - b) * block_len..][..block_len];
            let want = &before[(pool * nb + b) * block_len..][..block_len];
            if got
                .iter()
                .zip(want)
                .any(|(x, y)| x.to_bits() != y.to_bits())
            {
                return Err(format!(
                    "block {b} imported into block {} does not read back bit for bit \
                     (layer {}, {})",
                    nb - 1 - b,
                    pool / 2,
                    if pool % 2 == 0 { "K" } else { "V" }
                ));
            }
        }
    }
    for (b, bytes) in exports.iter().enumerate() {
        let mut again = Vec::new();
        backend
            .export_block(&target, BlockId::new((nb - 1 - b) as u32), &mut again)
            .map_err(|e| format!("export of an imported block: {e}"))?;
        if &again != bytes {
            return Err(format!(
                "block {b} imported and exported again gives other bytes ({} vs {})",
                again.len(),
                bytes.len()
            ));
        }
    }
    // Refusals, each leaving the target as it was.
    let past = BlockId::new(nb as u32);
    let mut sink = Vec::new();
    expect_error(
        "export of a block past the end",
        Want::OutOfRange,
        backend.export_block(&source, past, &mut sink),
    )?;
    if !sink.is_empty() {
        return Err("a refused export appended bytes".into());
    }
    expect_error(
        "import into a block past the end",
        Want::OutOfRange,
        backend.import_block(&mut target, past, &exports[0]),
    )?;
    let short = &exports[0][..exports[0].len() - 1];
    if backend
        .import_block(&mut target, BlockId::new(0), short)
        .is_ok()
    {
        return Err("an import one byte short was accepted".into());
    }
    let mut long = exports[0].clone();
    long.push(0);
    if backend
        .import_block(&mut target, BlockId::new(0), &long)
        .is_ok()
    {
        return Err("an import one byte long was accepted".into());
    }
    if backend
        .import_block(&mut target, BlockId::new(0), &[])
        .is_ok()
    {
        return Err("an empty import was accepted".into());
    }
    if snapshot(backend, &target)? != after {
        return Err("a refused import changed the storage".into());
    }
    Ok(())
}

fn check_copy_blocks<B: CacheBackend>(backend: &B, dtype: KvDType) -> Result<(), String> {
    let mut rng = StdRng::seed_from_u64(2);
    let (kv_heads, d) = (2, fit_head_dim(dtype, 64));
    let shape = ModelShape::new(2, 4, kv_heads, d).map_err(s)?;
    let spec = StorageSpec::new(shape, dtype, fit_block(dtype, 4), 8).map_err(s)?;
    let bs = spec.block_size;
    // Block 1 of layer 0 partly filled: the copies below are copy-on-write of a partial
    // block.
    let mut storage = filled_with_half_block(backend, &spec, &mut rng)?;
    let half = (bs / 2).max(1);
    let before = snapshot(backend, &storage)?;
    backend
        .copy_blocks(&mut storage, &[])
        .map_err(|e| format!("an empty list of moves: {e}"))?;
    let moves = [(1, 5), (2, 6), (1, 7), (3, 3)].map(|(a, b)| (BlockId::new(a), BlockId::new(b)));
    backend
        .copy_blocks(&mut storage, &moves)
        .map_err(|e| format!("copy_blocks({moves:?}): {e}"))?;
    let after = snapshot(backend, &storage)?;
    // The snapshot is [layer][K|V][block][offset][head][dim].
    let block_len = spec.block_size * spec.shape.n_kv_heads() * spec.shape.head_dim();
    let source_of = |b: usize| match b {
        5 | 7 => 1,
        6 => 2,
        other => other,
    };
    let pools = 2 * spec.shape.n_layers();
    let block_of = |snap: &[f32], pool: usize, b: usize| -> Vec<f32> {
        snap[(pool * spec.num_blocks + b) * block_len..][..block_len].to_vec()
    };
    // A copy from `to` into `from` is the classic swap of a (dst, src) convention: name it.
    for &(from, to) in &moves {
        let (from, to) = (from.index(), to.index());
        let reversed = from != to
            && (0..pools).all(|p| {
                block_of(&after, p, from) == block_of(&before, p, to)
                    && block_of(&before, p, from) != block_of(&before, p, to)
            });
        if reversed {
            return Err(format!(
                "copy_blocks({moves:?}) copied block {to} into block {from}: the copy ran in \
                 the wrong direction (a move is (from, to) and copies `from` into `to`)"
            ));
        }
    }
    for (chunk, (a, b)) in after
        .chunks(block_len)
        .zip(before.chunks(block_len))
        .enumerate()
    {
        let block = chunk % spec.num_blocks;
        let pool = chunk / spec.num_blocks; // 2 * layer + (0 for K, 1 for V)
        let src = source_of(block);
        let want = &before[(pool * spec.num_blocks + src) * block_len..][..block_len];
        if a != want {
            return Err(format!(
                "after {moves:?}, {} of layer {} block {block} {}",
                if pool % 2 == 0 { "K" } else { "V" },
                pool / 2,
                if src == block {
                    format!("changed although no move wrote it (was {:?}..)", &b[..2])
                } else {
                    format!("is not a copy of block {src}")
                }
            ));
        }
    }

    // Writing the next slot of copy 5 (the writer's side of copy-on-write) leaves the
    // source and the other copy as they were.
    let next = [Slot {
        block: BlockId::new(5),
        offset: (half % bs) as u32,
    }];
    let one = (1, kv_heads, d);
    let (k, v) = (
        tensor(backend, random(&mut rng, kv_heads * d, 1.0), one)?,
        tensor(backend, random(&mut rng, kv_heads * d, 1.0), one)?,
    );
    backend
        .write(&mut storage, 0, &next, &k, &v)
        .map_err(|e| format!("writing to a copy: {e}"))?;
    let written = snapshot(backend, &storage)?;
    for block in [1usize, 7] {
        for pool in 0..pools {
            let at = (pool * spec.num_blocks + block) * block_len;
            if written[at..at + block_len] != after[at..at + block_len] {
                return Err(format!(
                    "writing slot {:?} of a copy changed block {block} ({} of layer {})",
                    next[0],
                    if pool % 2 == 0 { "K" } else { "V" },
                    pool / 2
                ));
            }
        }
    }

    // Moves apply in order: a chain carries block 2's rows through 4 into 0.
    let chain = [(2, 4), (4, 0)].map(|(a, b)| (BlockId::new(a), BlockId::new(b)));
    backend
        .copy_blocks(&mut storage, &chain)
        .map_err(|e| format!("copy_blocks({chain:?}): {e}"))?;
    let chained = snapshot(backend, &storage)?;
    for pool in 0..pools {
        let source = block_of(&written, pool, 2);
        for block in [4usize, 0] {
            if block_of(&chained, pool, block) != source {
                return Err(format!(
                    "after copy_blocks({chain:?}), {} of layer {} block {block} does not hold \
                     block 2's rows: moves apply one after another, in the order given",
                    if pool % 2 == 0 { "K" } else { "V" },
                    pool / 2
                ));
            }
        }
    }
    Ok(())
}

/// Writes `rows` tokens (the blocks of `seq` must hold them, perhaps more than `seq`'s
/// length) with zero keys and values `value(token, kv_head)` in every element to layer 0, and attends from queries of ones: zero keys weigh every visible
/// token the same, so each output is the mean of the values its query saw.
fn mean_probe<B: CacheBackend>(
    backend: &B,
    dtype: KvDType,
    (q_heads, kv_heads): (usize, usize),
    rows: usize,
    value: impl Fn(usize, usize) -> f32,
    seq: &SeqAttention,
    window: Option<NonZeroUsize>,
) -> Result<Vec<f32>, String> {
    let d = fit_head_dim(dtype, 64);
    let bs = fit_block(dtype, 4);
    let shape = ModelShape::new(1, q_heads, kv_heads, d).map_err(s)?;
    let spec = StorageSpec::new(shape, dtype, bs, rows.div_ceil(bs) + 2).map_err(s)?;
    let mut storage = backend.allocate(&spec).map_err(s)?;
    let slots: Vec<Slot> = (0..rows)
        .map(|t| Slot {
            block: seq.blocks()[t / bs],
            offset: (t % bs) as u32,
        })
        .collect();
    let k = vec![0.0f32; rows * kv_heads * d];
    let v: Vec<f32> = (0..rows * kv_heads)
        .flat_map(|r| std::iter::repeat_n(value(r / kv_heads, r % kv_heads), d))
        .collect();
    let dims = (rows, kv_heads, d);
    backend
        .write(
            &mut storage,
            0,
            &slots,
            &tensor(backend, k, dims)?,
            &tensor(backend, v, dims)?,
        )
        .map_err(|e| format!("writing the probe's K/V: {e}"))?;
    let n = seq.n_queries();
    let q = tensor(backend, vec![1.0; n * q_heads * d], (n, q_heads, d))?;
    let mut batch = AttentionBatch::new(vec![seq.clone()], d);
    batch.window = window;
    let out = backend
        .attend(&storage, 0, &q, &batch)
        .map_err(|e| format!("attend failed: {e}"))?;
    if out.dims() != [n, q_heads, d] {
        return Err(format!("attend returned shape {:?}", out.dims()));
    }
    host(&out)
}

/// Every query must see exactly the keys at positions `0..=` its own. With equal scores a
/// query's output is the mean of the values it saw; values equal to their position make
/// that mean `p / 2` for a query at `p` that saw `p + 1` tokens, so the count seen can be
/// read back and named.
fn check_causal_mask<B: CacheBackend>(backend: &B, dtype: KvDType) -> Result<(), String> {
    let bs = fit_block(dtype, 4);
    // 7 tokens over blocks 2, 0, 1 (room for more), as a prefill of all 7 and a decode step
    // at position 4 of the first 5.
    let blocks: Vec<BlockId> = [2, 0, 1]
        .into_iter()
        .map(BlockId::new)
        .take(7usize.div_ceil(bs) + 1)
        .collect();
    for (kv_len, n_queries) in [(7, 7), (5, 1)] {
        let seq = SeqAttention::new(blocks.clone(), kv_len, n_queries).map_err(s)?;
        let d = fit_head_dim(dtype, 64);
        let out = mean_probe(backend, dtype, (2, 2), 7, |t, _| t as f32, &seq, None)?;
        for (row, got) in out.chunks_exact(2 * d).enumerate() {
            let pos = kv_len - n_queries + row;
            let want = pos as f32 / 2.0;
            if let Some(&g) = got.iter().find(|&&g| !within((g - want).abs().into(), 0.1)) {
                let seen = (2.0 * g).round() + 1.0;
                return Err(format!(
                    "the query at position {pos} ({n_queries} queries over {kv_len} tokens) \
                     averaged values as if it saw {seen} tokens (output {g}, expected {want} \
                     from the {} tokens at positions 0..={pos}): a query sees the keys up to \
                     and including its own position, none after it",
                    pos + 1
                ));
            }
        }
    }
    Ok(())
}

/// Under a sliding window of `W` tokens a query at `p` must see exactly the keys at
/// `p - W + 1 ..= p`. As in the causal probe, values equal to their position make a
/// query's output the mean of the positions it saw, `(first + p) / 2`, so the first
/// position seen can be read back and named. Windows of 1 (only the own token), 3 (across
/// blocks) and 20 (longer than the context: plain causal) over a prefill and a decode step.
fn check_sliding_window<B: CacheBackend>(backend: &B, dtype: KvDType) -> Result<(), String> {
    let bs = fit_block(dtype, 4);
    let blocks: Vec<BlockId> = [2, 0, 3, 1]
        .into_iter()
        .map(BlockId::new)
        .take(11usize.div_ceil(bs) + 1)
        .collect();
    let d = fit_head_dim(dtype, 64);
    for w in [1usize, 3, 20] {
        let window = NonZeroUsize::new(w);
        for (kv_len, n_queries) in [(11, 11), (9, 1)] {
            let seq = SeqAttention::new(blocks.clone(), kv_len, n_queries).map_err(s)?;
            let out = mean_probe(backend, dtype, (2, 1), 11, |t, _| t as f32, &seq, window)?;
            for (row, got) in out.chunks_exact(2 * d).enumerate() {
                let pos = kv_len - n_queries + row;
                let first = (pos + 1).saturating_sub(w);
                let want = (first + pos) as f32 / 2.0;
                if let Some(&g) = got.iter().find(|&&g| !within((g - want).abs().into(), 0.1)) {
                    let seen_from = 2.0 * g - pos as f32;
                    return Err(format!(
                        "with a window of {w} the query at position {pos} ({n_queries} \
                         queries over {kv_len} tokens) averaged values as if it saw positions \
                         {seen_from:.1}..={pos} (output {g}, expected {want}): a window of W \
                         shows a query at p exactly the keys at p - W + 1 ..= p ({first}..={pos})"
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Query head `h` must read KV head `h / (q_heads / kv_heads)`. One token whose KV head `j`
/// holds the value `j + 1` makes every output name the KV head its query head read.
fn check_head_mapping<B: CacheBackend>(backend: &B, dtype: KvDType) -> Result<(), String> {
    let d = fit_head_dim(dtype, 64);
    for (q_heads, kv_heads) in [(6, 2), (4, 1), (3, 3)] {
        let seq = SeqAttention::new(vec![BlockId::new(1)], 1, 1).map_err(s)?;
        let out = mean_probe(
            backend,
            dtype,
            (q_heads, kv_heads),
            1,
            |_, j| (j + 1) as f32,
            &seq,
            None,
        )?;
        let group = q_heads / kv_heads;
        for (h, got) in out.chunks_exact(d).enumerate() {
            let want = h / group;
            if let Some(&g) = got
                .iter()
                .find(|&&g| !within((g - (want + 1) as f32).abs().into(), 0.05))
            {
                return Err(format!(
                    "with {q_heads} query heads over {kv_heads} KV heads, query head {h} read \
                     KV head {} (output {g}), expected KV head {want}: query head h reads KV \
                     head h / (q_heads / kv_heads)",
                    g.round() - 1.0
                ));
            }
        }
    }
    Ok(())
}

/// What a bad call must answer.
#[derive(Debug, Clone, Copy)]
enum Want {
    OutOfRange,
    ShapeMismatch,
    NonFinite,
    InvalidArgument,
}

impl Want {
    fn matches(self, e: &KvError) -> bool {
        matches!(
            (self, e),
            (Want::OutOfRange, KvError::OutOfRange { .. })
                | (Want::ShapeMismatch, KvError::ShapeMismatch { .. })
                | (Want::NonFinite, KvError::NonFinite { .. })
                | (Want::InvalidArgument, KvError::InvalidArgument { .. })
        )
    }
}

fn expect_error<T>(what: &str, want: Want, got: kv_core::Result<T>) -> Result<(), String> {
    match got {
        Ok(_) => Err(format!("{what}: succeeded, expected {want:?}")),
        Err(e) if want.matches(&e) => Ok(()),
        Err(e) => Err(format!("{what}: expected {want:?}, got {e:?}")),
    }
}

/// A write that must fail: what it is, the error it must give, layer, slots, K, V.
type BadWrite<'a> = (&'a str, Want, usize, &'a [Slot], &'a Tensor, &'a Tensor);

fn check_errors<B: CacheBackend>(backend: &B, dtype: KvDType) -> Result<u32, String> {
    let mut rng = StdRng::seed_from_u64(3);
    let (q_heads, kv_heads, nb) = (4, 2, 6);
    let (d, bs) = (fit_head_dim(dtype, 64), fit_block(dtype, 4));
    let shape = ModelShape::new(2, q_heads, kv_heads, d).map_err(s)?;
    let spec = StorageSpec::new(shape, dtype, bs, nb).map_err(s)?;
    let mut storage = filled(backend, &spec, &mut rng)?;
    let before = snapshot(backend, &storage)?;
    let mut count = 0u32;

    let slot = |block: usize, offset: usize| Slot {
        block: BlockId::new(block as u32),
        offset: offset as u32,
    };
    let mut rows = |n: usize, heads: usize, dim: usize, poison: Option<f32>| {
        let mut data = random(&mut rng, n * heads * dim, 1.0);
        if let (Some(x), Some(last)) = (poison, data.last_mut()) {
            *last = x;
        }
        tensor(backend, data, (n, heads, dim))
    };
    // Each bad slot list starts with a good slot: a backend must not write it either.
    let good = [slot(0, 1), slot(4, 3)];
    let past_block = [good[0], slot(nb, 0)];
    let past_offset = [good[0], slot(1, bs)];
    let (k, v) = (rows(2, kv_heads, d, None)?, rows(2, kv_heads, d, None)?);
    let (k_heads, v_rows) = (rows(2, kv_heads + 1, d, None)?, rows(1, kv_heads, d, None)?);
    let k_dim = rows(2, kv_heads, d / 2, None)?;
    let v_nan = rows(2, kv_heads, d, Some(f32::NAN))?;
    let k_inf = rows(2, kv_heads, d, Some(f32::INFINITY))?;
    let q1 = rows(1, q_heads, d, None)?;
    let (q2, q_kv_heads) = (rows(2, q_heads, d, None)?, rows(1, kv_heads, d, None)?);

    let writes: [BadWrite<'_>; 8] = [
        (
            "write to a block past the end",
            Want::OutOfRange,
            0,
            &past_block,
            &k,
            &v,
        ),
        (
            "write to an offset past the block",
            Want::OutOfRange,
            1,
            &past_offset,
            &k,
            &v,
        ),
        (
            "write to a layer past the end",
            Want::OutOfRange,
            2,
            &good,
            &k,
            &v,
        ),
        (
            "write K with too many heads",
            Want::ShapeMismatch,
            0,
            &good,
            &k_heads,
            &v,
        ),
        (
            "write V with fewer rows than slots",
            Want::ShapeMismatch,
            0,
            &good,
            &k,
            &v_rows,
        ),
        (
            "write K with the wrong head dim",
            Want::ShapeMismatch,
            0,
            &good,
            &k_dim,
            &v,
        ),
        ("write V holding NaN", Want::NonFinite, 1, &good, &k, &v_nan),
        (
            "write K holding infinity",
            Want::NonFinite,
            0,
            &good,
            &k_inf,
            &v,
        ),
    ];
    for (what, want, layer, slots, k, v) in writes {
        expect_error(what, want, backend.write(&mut storage, layer, slots, k, v))?;
        if snapshot(backend, &storage)? != before {
            return Err(format!(
                "{what}: failed but changed the storage (a call that fails must write nothing)"
            ));
        }
        count += 1;
    }

    let batch = |blocks: Vec<BlockId>, len: usize| -> Result<AttentionBatch, String> {
        let seq = SeqAttention::new(blocks, len, 1).map_err(s)?;
        Ok(AttentionBatch::new(vec![seq], d))
    };
    let ok = batch(vec![BlockId::new(3), BlockId::new(1)], 6)?;
    backend
        .attend(&storage, 1, &q1, &ok)
        .map_err(|e| format!("a valid attend failed: {e}"))?;
    let short = batch(vec![BlockId::new(3)], bs + 1)?;
    let past_end = batch(vec![BlockId::new(3), BlockId::new(nb as u32)], 6)?;
    let attends: [(&str, Want, usize, &Tensor, &AttentionBatch); 5] = [
        (
            "attend on a layer past the end",
            Want::OutOfRange,
            2,
            &q1,
            &ok,
        ),
        (
            "attend with blocks not covering the sequence",
            Want::InvalidArgument,
            0,
            &q1,
            &short,
        ),
        (
            "attend with a block past the end",
            Want::OutOfRange,
            0,
            &q1,
            &past_end,
        ),
        (
            "attend with more q rows than queries",
            Want::ShapeMismatch,
            0,
            &q2,
            &ok,
        ),
        (
            "attend with q of KV-head count",
            Want::ShapeMismatch,
            0,
            &q_kv_heads,
            &ok,
        ),
    ];
    for (what, want, layer, q, batch) in attends {
        expect_error(what, want, backend.attend(&storage, layer, q, batch))?;
        count += 1;
    }

    let read = backend.read(&storage, 0, &past_block);
    expect_error("read a slot past the end", Want::OutOfRange, read)?;
    let read = backend.read(&storage, 2, &good);
    expect_error("read a layer past the end", Want::OutOfRange, read)?;
    count += 2;

    let bad_moves: [&[(BlockId, BlockId)]; 2] = [
        &[
            (BlockId::new(1), BlockId::new(2)),
            (BlockId::new(0), BlockId::new(nb as u32)),
        ],
        &[(BlockId::new(nb as u32 + 3), BlockId::new(0))],
    ];
    for moves in bad_moves {
        let what = format!("copy_blocks({moves:?}) with a block past the end");
        expect_error(
            &what,
            Want::OutOfRange,
            backend.copy_blocks(&mut storage, moves),
        )?;
        if snapshot(backend, &storage)? != before {
            return Err(format!(
                "{what}: failed but changed the storage (a call that fails must write nothing)"
            ));
        }
        count += 1;
    }
    Ok(count)
}

/// How blocks are sized in an attention case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BlockChoice {
    /// One token per block: every token in another block.
    One,
    /// 16 tokens per block, the usual paged layout.
    Sixteen,
    /// One block per sequence, large enough for the longest: contiguous storage.
    Whole,
}

/// One sequence of an attention case.
#[derive(Debug, Clone, Copy)]
struct SeqPlan {
    /// Prompt tokens.
    prompt: usize,
    /// Prefill the prompt in two calls, the first of this many tokens.
    split: Option<usize>,
    /// Decode steps after the prompt, one token each.
    decode: usize,
}

/// One attention case: shapes, layout, sequences, data seed.
#[derive(Debug, Clone)]
struct AttnCase {
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    block: BlockChoice,
    seqs: Vec<SeqPlan>,
    /// Queries are uniform in ±q_amp (K and V in ±1): larger gives peakier softmaxes.
    q_amp: f32,
    /// A softmax scale other than 1/sqrt(head_dim).
    scale: Option<f32>,
    seed: u64,
}

const N_LAYERS: usize = 2;

fn case_strategy() -> impl Strategy<Value = AttnCase> {
    let heads = prop_oneof![
        (1usize..=4).prop_map(|n| (n, n)),
        (2usize..=3, 2usize..=3).prop_map(|(kv, group)| (kv * group, kv)),
        (2usize..=6).prop_map(|q| (q, 1)),
    ];
    let seq = (1usize..=40, proptest::option::of(1usize..40), 0usize..=4).prop_map(
        |(prompt, split, decode)| SeqPlan {
            prompt,
            split: split.filter(|&s| s < prompt),
            decode,
        },
    );
    (
        heads,
        prop_oneof![Just(64usize), Just(128)],
        prop_oneof![
            Just(BlockChoice::One),
            Just(BlockChoice::Sixteen),
            Just(BlockChoice::Whole)
        ],
        proptest::collection::vec(seq, 1..=3),
        prop_oneof![Just(1.0f32), Just(4.0)],
        proptest::option::of(0.05f32..0.5),
        any::<u64>(),
    )
        .prop_map(
            |((q_heads, kv_heads), head_dim, block, seqs, q_amp, scale, seed)| AttnCase {
                q_heads,
                kv_heads,
                head_dim,
                block,
                seqs,
                q_amp,
                scale,
                seed,
            },
        )
}

/// Every head layout × head dim × block choice once, with sequences that cross block
/// boundaries during prefill and during decode; then a long prompt per head layout.
fn sweep_cases() -> Vec<AttnCase> {
    let mut out = Vec::new();
    for (q_heads, kv_heads) in [(4, 4), (6, 2), (4, 1)] {
        for head_dim in [64, 128] {
            for block in [BlockChoice::One, BlockChoice::Sixteen, BlockChoice::Whole] {
                out.push(AttnCase {
                    q_heads,
                    kv_heads,
                    head_dim,
                    block,
                    seqs: vec![
                        SeqPlan {
                            prompt: 15,
                            split: None,
                            decode: 3,
                        },
                        SeqPlan {
                            prompt: 1,
                            split: None,
                            decode: 2,
                        },
                        SeqPlan {
                            prompt: 33,
                            split: Some(20),
                            decode: 1,
                        },
                    ],
                    q_amp: 1.0,
                    scale: None,
                    seed: out.len() as u64,
                });
            }
        }
        // Long enough that a backend's tiles, query chunks and rescaling run many rounds.
        for block in [BlockChoice::Sixteen, BlockChoice::Whole] {
            out.push(AttnCase {
                q_heads,
                kv_heads,
                head_dim: 64,
                block,
                seqs: vec![
                    // Past 160 tokens, so the residual of `kivi2-r128` both covers blocks
                    // and leaves some behind (settled and read quantized).
                    SeqPlan {
                        prompt: 230,
                        split: Some(70),
                        decode: 2,
                    },
                    SeqPlan {
                        prompt: 5,
                        split: None,
                        decode: 1,
                    },
                ],
                q_amp: 4.0,
                scale: None,
                seed: out.len() as u64,
            });
        }
    }
    out
}

#[derive(Debug, Default)]
struct AttnStats {
    attend_calls: u64,
    coverage: BTreeMap<&'static str, u32>,
    worst_vs_stored: f64,
    worst_vs_input: f64,
}

impl AttnStats {
    fn merge(&mut self, o: &AttnStats) {
        self.attend_calls += o.attend_calls;
        for (k, v) in &o.coverage {
            *self.coverage.entry(k).or_default() += v;
        }
        self.worst_vs_stored = self.worst_vs_stored.max(o.worst_vs_stored);
        self.worst_vs_input = self.worst_vs_input.max(o.worst_vs_input);
    }

    /// Counts the features `case` covered, run with block size `bs` and head dim `d`.
    fn cover(&mut self, case: &AttnCase, bs: usize, d: usize) {
        let heads = if case.kv_heads == 1 && case.q_heads > 1 {
            "MQA"
        } else if case.kv_heads == case.q_heads {
            "MHA"
        } else {
            "GQA"
        };
        let block = match (case.block, bs) {
            (BlockChoice::Whole, _) => "one block per sequence",
            (_, 1) => "block size 1",
            (_, 16) => "block size 16",
            (_, 32) => "block size 32",
            _ => "other block size",
        };
        let dim = if d == 64 {
            "head dim 64"
        } else {
            "head dim 128"
        };
        let mut features = vec![heads, block, dim];
        if case.seqs.len() > 1 {
            features.push("ragged batch");
        }
        if case.seqs.iter().any(|s| s.split.is_some()) {
            features.push("chunked prefill");
        }
        if case.seqs.iter().any(|s| s.decode > 0) {
            features.push("decode");
        }
        if case.scale.is_some() {
            features.push("custom scale");
        }
        for f in features {
            *self.coverage.entry(f).or_default() += 1;
        }
    }
}

/// The f32 truth of one sequence: K, V and a query for every position, per layer.
struct SeqData {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    q: Vec<Vec<f32>>,
}

/// Tokens `begin..end` of sequence `seq` arrive in one step.
#[derive(Debug, Clone, Copy)]
struct Part {
    seq: usize,
    begin: usize,
    end: usize,
}

fn steps(case: &AttnCase) -> Vec<Vec<Part>> {
    let mut steps = vec![case
        .seqs
        .iter()
        .enumerate()
        .map(|(seq, p)| Part {
            seq,
            begin: 0,
            end: p.split.unwrap_or(p.prompt),
        })
        .collect::<Vec<_>>()];
    let second: Vec<Part> = case
        .seqs
        .iter()
        .enumerate()
        .filter_map(|(seq, p)| {
            p.split.map(|s| Part {
                seq,
                begin: s,
                end: p.prompt,
            })
        })
        .collect();
    if !second.is_empty() {
        steps.push(second);
    }
    let max_decode = case.seqs.iter().map(|p| p.decode).max().unwrap_or(0);
    for j in 0..max_decode {
        steps.push(
            case.seqs
                .iter()
                .enumerate()
                .filter(|(_, p)| p.decode > j)
                .map(|(seq, p)| Part {
                    seq,
                    begin: p.prompt + j,
                    end: p.prompt + j + 1,
                })
                .collect(),
        );
    }
    steps
}

fn run_case<B: CacheBackend>(
    backend: &B,
    dtype: KvDType,
    tol: Tolerance,
    case: &AttnCase,
    stats: &mut AttnStats,
) -> Result<(), String> {
    let (qh, kvh) = (case.q_heads, case.kv_heads);
    let d = fit_head_dim(dtype, case.head_dim);
    let heads = Heads::new(qh, kvh, d).map_err(s)?;
    let lens: Vec<usize> = case.seqs.iter().map(|p| p.prompt + p.decode).collect();
    let max_len = lens.iter().copied().max().unwrap_or(1).max(1);
    // Layouts that quantize over a block's tokens need whole multiples of them.
    let bs = fit_block(
        dtype,
        match case.block {
            BlockChoice::One => 1,
            BlockChoice::Sixteen => 16,
            BlockChoice::Whole => max_len,
        },
    );
    let per_seq: Vec<usize> = lens.iter().map(|l| l.div_ceil(bs)).collect();
    let num_blocks = per_seq.iter().sum::<usize>() + 2;
    let shape = ModelShape::new(N_LAYERS, qh, kvh, d).map_err(s)?;
    let spec = StorageSpec::new(shape, dtype, bs, num_blocks).map_err(s)?;
    let mut storage = backend.allocate(&spec).map_err(s)?;

    let mut rng = StdRng::seed_from_u64(case.seed);
    let mut ids: Vec<BlockId> = (0..num_blocks as u32).map(BlockId::new).collect();
    ids.shuffle(&mut rng);
    let mut tables = Vec::new();
    let mut next = 0;
    for &n in &per_seq {
        tables.push(ids[next..next + n].to_vec());
        next += n;
    }
    let data: Vec<SeqData> = lens
        .iter()
        .map(|&len| SeqData {
            k: (0..N_LAYERS)
                .map(|_| random(&mut rng, len * kvh * d, 1.0))
                .collect(),
            v: (0..N_LAYERS)
                .map(|_| random(&mut rng, len * kvh * d, 1.0))
                .collect(),
            q: (0..N_LAYERS)
                .map(|_| random(&mut rng, len * qh * d, case.q_amp))
                .collect(),
        })
        .collect();
    let slot = |seq: usize, t: usize| Slot {
        block: tables[seq][t / bs],
        offset: (t % bs) as u32,
    };
    let row_kv = kvh * d;

    let residual = spec.dtype.residual_tokens();
    for (step, parts) in steps(case).iter().enumerate() {
        if residual > 0 {
            // The residual contract: blocks every query to come is `residual` tokens past
            // may lose their f16 copies; settling them must change no result.
            let settle: Vec<BlockId> = parts
                .iter()
                .flat_map(|p| {
                    let past = (p.begin.saturating_sub(residual) / bs).min(tables[p.seq].len());
                    tables[p.seq][..past].iter().copied()
                })
                .collect();
            backend
                .settle_blocks(&mut storage, &settle)
                .map_err(|e| format!("step {step}: settle_blocks failed: {e}"))?;
        }
        for layer in 0..N_LAYERS {
            // Layer 0 gets one write for the whole step, layer 1 one write per sequence.
            let groups: Vec<&[Part]> = if layer == 0 {
                vec![parts]
            } else {
                parts.chunks(1).collect()
            };
            for group in groups {
                let mut slots = Vec::new();
                let (mut k, mut v) = (Vec::new(), Vec::new());
                for p in group {
                    slots.extend((p.begin..p.end).map(|t| slot(p.seq, t)));
                    let sd = &data[p.seq];
                    k.extend_from_slice(&sd.k[layer][p.begin * row_kv..p.end * row_kv]);
                    v.extend_from_slice(&sd.v[layer][p.begin * row_kv..p.end * row_kv]);
                }
                let dims = (slots.len(), kvh, d);
                let (k, v) = (tensor(backend, k, dims)?, tensor(backend, v, dims)?);
                backend
                    .write(&mut storage, layer, &slots, &k, &v)
                    .map_err(|e| format!("step {step} layer {layer}: write failed: {e}"))?;
            }
            attend_and_compare(
                backend, &storage, tol, case, heads, layer, step, parts, &data, &tables, bs, stats,
            )?;
        }
    }
    stats.cover(case, bs, d);
    Ok(())
}

#[allow(clippy::too_many_arguments)] // the state of one step of one case, spelled out
fn attend_and_compare<B: CacheBackend>(
    backend: &B,
    storage: &B::Storage,
    tol: Tolerance,
    case: &AttnCase,
    heads: Heads,
    layer: usize,
    step: usize,
    parts: &[Part],
    data: &[SeqData],
    tables: &[Vec<BlockId>],
    bs: usize,
    stats: &mut AttnStats,
) -> Result<(), String> {
    let (qh, kvh, d) = (heads.q_heads, heads.kv_heads, heads.head_dim);
    let (row_kv, row_q) = (kvh * d, qh * d);
    let mut seqs = Vec::new();
    let mut q = Vec::new();
    for p in parts {
        seqs.push(
            SeqAttention::new(
                tables[p.seq][..p.end.div_ceil(bs)].to_vec(),
                p.end,
                p.end - p.begin,
            )
            .map_err(s)?,
        );
        q.extend_from_slice(&data[p.seq].q[layer][p.begin * row_q..p.end * row_q]);
    }
    let mut batch = AttentionBatch::new(seqs, d);
    if let Some(scale) = case.scale {
        batch.scale = scale;
    }
    let total = batch.total_queries();
    let out = backend
        .attend(storage, layer, &tensor(backend, q, (total, qh, d))?, &batch)
        .map_err(|e| format!("step {step} layer {layer}: attend failed: {e}"))?;
    if out.dims() != [total, qh, d] {
        return Err(format!(
            "attend returned shape {:?}, expected {:?}",
            out.dims(),
            [total, qh, d]
        ));
    }
    let out = host(&out)?;
    stats.attend_calls += 1;

    let mut row = 0;
    for p in parts {
        let sd = &data[p.seq];
        let (k_in, v_in) = (
            &sd.k[layer][..p.end * row_kv],
            &sd.v[layer][..p.end * row_kv],
        );
        let q_in = &sd.q[layer][p.begin * row_q..p.end * row_q];
        let slots: Vec<Slot> = (0..p.end)
            .map(|t| Slot {
                block: tables[p.seq][t / bs],
                offset: (t % bs) as u32,
            })
            .collect();
        let (rk, rv) = backend.read(storage, layer, &slots).map_err(s)?;
        let (k_st, v_st) = (host(&rk)?, host(&rv)?);
        let k_bounds = tol.bounds(Kv::K, k_in, &slots, kvh, d)?;
        let v_bounds = tol.bounds(Kv::V, v_in, &slots, kvh, d)?;
        for (name, want, got, bounds) in
            [("K", k_in, &k_st, &k_bounds), ("V", v_in, &v_st, &v_bounds)]
        {
            if got.len() != want.len() {
                return Err(format!(
                    "read returned {} values, expected {}",
                    got.len(),
                    want.len()
                ));
            }
            if let Some((i, w, g)) = tol.first_misread(want, got, bounds) {
                return Err(format!(
                    "step {step} layer {layer}: {name} of sequence {} token {} reads {g}, \
                     written {w}",
                    p.seq,
                    i / row_kv
                ));
            }
        }
        let got = &out[row * row_q..(row + p.end - p.begin) * row_q];
        row += p.end - p.begin;

        let big_s = score_magnitude(heads, q_in, k_in, batch.scale);
        let v_max = v_in.iter().fold(0.0f64, |m, &x| m.max((x as f64).abs()));
        let compute = 1e-4 * (1.0 + big_s) * v_max * (1.0 + tol.unit());
        // Stored keys move each score by at most delta, hence the weights by
        // e^(2 delta) - 1 in L1; stored values move the output by at most their bound.
        let delta = score_error(heads, q_in, &k_bounds, batch.scale);
        let v_err = v_bounds.iter().fold(0.0f64, |m, &b| m.max(b));
        let storage_err = v_err + v_max * (2.0 * delta).exp_m1();
        let checks = [
            ("the stored values", &k_st[..], &v_st[..], compute),
            ("the f32 input", k_in, v_in, compute + storage_err),
        ];
        for (idx, (against, k, v, bound)) in checks.into_iter().enumerate() {
            let want = match (idx, tol.own_block_tokens()) {
                // KIVI: each query reads its own key block's keys as written (in f16).
                (0, Some((t, residual))) => own_block_reference(
                    heads,
                    q_in,
                    (k_in, v_in),
                    (k, v),
                    batch.scale,
                    t,
                    residual,
                )?,
                _ => reference::attend(heads, q_in, k, v, batch.scale).map_err(s)?,
            };
            let (worst, at) = got
                .iter()
                .zip(&want)
                .map(|(&g, &w)| (g as f64 - w as f64).abs())
                .enumerate()
                .fold((0.0f64, 0), |(m, mi), (i, e)| {
                    // A NaN output is the worst error.
                    if !within(e, m) {
                        (e, i)
                    } else {
                        (m, mi)
                    }
                });
            if !within(worst, bound) {
                return Err(format!(
                    "step {step} layer {layer}: sequence {} query {} (position {}) head {} dim \
                     {}: attend gives {}, the reference on {against} {} (error {worst:.3e} > \
                     tolerance {bound:.3e})",
                    p.seq,
                    at / row_q,
                    p.begin + at / row_q,
                    (at / d) % qh,
                    at % d,
                    got[at],
                    want[at]
                ));
            }
            let ratio = if bound > 0.0 { worst / bound } else { 0.0 };
            let worst_seen = if idx == 0 {
                &mut stats.worst_vs_stored
            } else {
                &mut stats.worst_vs_input
            };
            *worst_seen = worst_seen.max(ratio);
        }
    }
    Ok(())
}

/// `max |scale| · Σ_d |q_d · k_d|` over the queries, heads and visible keys of one sequence:
/// the *S* of the tolerance table.
fn score_magnitude(heads: Heads, q: &[f32], k: &[f32], scale: f32) -> f64 {
    let (qh, kvh, d) = (heads.q_heads, heads.kv_heads, heads.head_dim);
    let group = heads.group_size();
    let n_q = q.len() / (qh * d);
    let kv_len = k.len() / (kvh * d);
    let mut best = 0.0f64;
    for i in 0..n_q {
        for h in 0..qh {
            let qv = &q[(i * qh + h) * d..][..d];
            for t in 0..=(kv_len - n_q + i) {
                let kv = &k[(t * kvh + h / group) * d..][..d];
                let sum: f64 = qv
                    .iter()
                    .zip(kv)
                    .map(|(&a, &b)| (a as f64 * b as f64).abs())
                    .sum();
                best = best.max(sum);
            }
        }
    }
    best * (scale as f64).abs()
}

/// The reference attention of one sequence when each query reads the keys of its own
/// `t`-token key block as written, rounded to f16 (`k_in`), and every earlier key as stored
/// (`k_stored`): what a KIVI layout must compute, in prefill as in decode. With a residual
/// of `residual` tokens, a query at position `pos` also reads as written, rounded to f16,
/// the keys of the key blocks ending after `pos - residual` and the values of the tokens
/// after it (`v_in`); every other value as stored.
fn own_block_reference(
    heads: Heads,
    q: &[f32],
    (k_in, v_in): (&[f32], &[f32]),
    (k_stored, v_stored): (&[f32], &[f32]),
    scale: f32,
    t: usize,
    residual: usize,
) -> Result<Vec<f32>, String> {
    let (row_q, row_kv) = (
        heads.q_heads * heads.head_dim,
        heads.kv_heads * heads.head_dim,
    );
    let n_q = q.len() / row_q;
    let kv_len = k_stored.len() / row_kv;
    let mut out = Vec::with_capacity(q.len());
    for i in 0..n_q {
        let pos = kv_len - n_q + i;
        let mut k = k_stored[..(pos + 1) * row_kv].to_vec();
        let first_key = pos.saturating_sub(residual) / t * t;
        let own = first_key * row_kv..(pos + 1) * row_kv;
        for (dst, &x) in k[own.clone()].iter_mut().zip(&k_in[own]) {
            *dst = f16::from_f32(x).to_f32();
        }
        let mut v = v_stored[..(pos + 1) * row_kv].to_vec();
        let first_value = (pos + 1).saturating_sub(residual);
        let recent = first_value * row_kv..(pos + 1) * row_kv;
        for (dst, &x) in v[recent.clone()].iter_mut().zip(&v_in[recent]) {
            *dst = f16::from_f32(x).to_f32();
        }
        let one = &q[i * row_q..(i + 1) * row_q];
        out.extend(reference::attend(heads, one, &k, &v, scale).map_err(s)?);
    }
    Ok(out)
}

/// `max |scale| · Σ_d |q_d| · e_d` over the queries, heads and visible keys of one
/// sequence, `e` being the keys' per-element storage bounds: the most storing the keys can
/// move a score.
fn score_error(heads: Heads, q: &[f32], k_bounds: &[f64], scale: f32) -> f64 {
    let (qh, kvh, d) = (heads.q_heads, heads.kv_heads, heads.head_dim);
    let group = heads.group_size();
    let n_q = q.len() / (qh * d);
    let kv_len = k_bounds.len() / (kvh * d);
    let mut best = 0.0f64;
    for i in 0..n_q {
        for h in 0..qh {
            let qv = &q[(i * qh + h) * d..][..d];
            for t in 0..=(kv_len - n_q + i) {
                let e = &k_bounds[(t * kvh + h / group) * d..][..d];
                let sum: f64 = qv.iter().zip(e).map(|(&a, &b)| (a as f64).abs() * b).sum();
                best = best.max(sum);
            }
        }
    }
    best * (scale as f64).abs()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_cover_every_token_once_in_order() {
        let case = AttnCase {
            q_heads: 2,
            kv_heads: 1,
            head_dim: 64,
            block: BlockChoice::Sixteen,
            seqs: vec![
                SeqPlan {
                    prompt: 5,
                    split: Some(2),
                    decode: 2,
                },
                SeqPlan {
                    prompt: 3,
                    split: None,
                    decode: 0,
                },
            ],
            q_amp: 1.0,
            scale: None,
            seed: 0,
        };
        let mut next = [0usize; 2];
        for parts in steps(&case) {
            for p in parts {
                assert_eq!(p.begin, next[p.seq]);
                assert!(p.end > p.begin);
                next[p.seq] = p.end;
            }
        }
        assert_eq!(next, [7, 3]);
    }

    #[test]
    fn tolerance_flags_misreads_and_nan() {
        let f16 = Tolerance::of(KvDType::F16).expect("f16 has a tolerance");
        let slot = |offset| Slot {
            block: BlockId::new(0),
            offset,
        };
        let misread = |tol: Tolerance, want: &[f32], got: &[f32]| {
            let slots: Vec<Slot> = (0..want.len() as u32).map(slot).collect();
            let b = tol.bounds(Kv::V, want, &slots, 1, 1).expect("bounds");
            tol.first_misread(want, got, &b)
        };
        assert!(misread(f16, &[1.0, 2.0], &[1.0004, 2.0]).is_none());
        assert_eq!(
            misread(f16, &[1.0, 2.0], &[1.0, 2.01]).map(|m| m.0),
            Some(1)
        );
        assert!(misread(f16, &[1.0], &[f32::NAN]).is_some());
        let f32_ = Tolerance::of(KvDType::F32).expect("f32 has a tolerance");
        assert!(misread(f32_, &[0.1], &[0.1 + 1e-8]).is_some());
    }

    #[test]
    fn quantized_bounds_follow_the_formats() {
        let int8 = Tolerance::of("int8-g32".parse().expect("int8")).expect("has a tolerance");
        let mut row: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin()).collect();
        row[40] = 100.0;
        let slots = [Slot {
            block: BlockId::new(0),
            offset: 0,
        }];
        let b = int8.bounds(Kv::K, &row, &slots, 1, 64).expect("bounds");
        // One bound per row: that of its worst group (scale 100/127 rounded up to f16).
        assert!(b.iter().all(|&x| x == b[0]));
        assert!(b[0] >= 100.0 / 127.0 / 2.0 && b[0] < 100.0 / 127.0 / 2.0 * 1.002);
        let mut stored = row.clone();
        stored[3] += b[0] as f32 * 1.01;
        assert_eq!(int8.first_misread(&row, &stored, &b).map(|m| m.0), Some(3));

        // KIVI keys: rows sharing a 32-token key block share their channels' bounds; rows
        // of another key block (block 0 offsets 32.., or block 1) have their own.
        let kivi = Tolerance::of("kivi4".parse().expect("kivi4")).expect("has a tolerance");
        let slots: Vec<Slot> = [(0, 0), (0, 1), (0, 32), (1, 0)]
            .iter()
            .map(|&(block, offset)| Slot {
                block: BlockId::new(block),
                offset,
            })
            .collect();
        let mut keys = vec![0.5f32; 4 * 32];
        keys[..32].fill(-8.0); // widens key block (0, 0) only
        let b = kivi.bounds(Kv::K, &keys, &slots, 1, 32).expect("bounds");
        assert!(
            b[0] > 0.25 && (b[32] - b[0]).abs() < 0.01,
            "{} {}",
            b[0],
            b[32]
        );
        assert!(b[64] < 1e-3 && b[96] < 1e-3, "{} {}", b[64], b[96]);
    }

    #[test]
    fn score_magnitude_takes_the_largest_visible_term_sum() {
        let heads = Heads::new(1, 1, 2).expect("shape");
        // One query at position 1 sees both keys; |1*3| + |-1*-1| = 4 beats |1*1| + 0.
        let s = score_magnitude(heads, &[1.0, -1.0], &[1.0, 0.0, 3.0, -1.0], 0.5);
        assert_eq!(s, 2.0);
        // Two queries: the first sees only key 0 (sum 1), the second both.
        let s = score_magnitude(heads, &[1.0, 0.0, 0.0, 0.0], &[1.0, 0.0, 9.0, 9.0], 1.0);
        assert_eq!(s, 1.0);
    }
}
