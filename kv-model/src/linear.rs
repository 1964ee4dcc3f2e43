//! Projection weights kept in the file's GGUF blocks, multiplied by f32 activations with our
//! own kernels.
//!
//! A decode step of a small model reads every weight once, so its speed is the speed at
//! which weight bytes stream from memory. Q4_1 is 5 bits per weight against f32's 32, so
//! keeping the blocks and dequantizing them in registers reads 6x fewer bytes. Unlike
//! candle's quantized matmul, the activations are never rounded: the weight is expanded
//! exactly as candle's `dequantize` does, and the result equals the f32 path up to
//! summation order (see [`crate::WeightFormat`] for why that matters).
//!
//! - Few rows (decode of up to [`MATVEC_MAX_ROWS`] sequences): a matrix-vector kernel over
//!   output rows that dequantizes each block once for up to two activation rows
//!   (`linear/matvec.rs`, the block types in `linear/blocks.rs` and `linear/kquant.rs`),
//!   written once over kv-quant's `Simd` width and run at AVX-512 or AVX2 when the CPU has
//!   them, portable Rust otherwise (kv-quant's `Isa`: `KV_ISA` caps the level); rayon
//!   threads split the output rows. A row's result is the same bits at any row count.
//! - A batch of rows (a decode step of 17 to [`STRIPS_MAX_ROWS`] sequences): each task
//!   dequantizes a strip of weight rows into L1 once and multiplies it with every
//!   activation row in register tiles (`linear/strips.rs`, written once over kv-quant's
//!   `Simd` width): the weights are read once per step for the whole batch.
//! - Many rows (prefill): each task dequantizes a panel of weight rows into an f32 tile that
//!   fits in L2 and multiplies all activation rows by it with the `gemm` crate (the GEMM
//!   candle itself uses); tasks split the output columns.
#![allow(unsafe_code)]

mod blocks;
mod kquant;
mod matvec;
mod q8;
mod strips;

pub(crate) use kquant::KType;
use matvec::{Format, XChunk};

/// One 256-weight block's reordered activations ([`matvec::Format::word_order`]).
type XChunk8 = [XChunk; 8];

use std::cell::RefCell;
use std::marker::PhantomData;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{CpuStorage, DType, Device, Module, Storage, Tensor};
use rayon::prelude::*;

use crate::{Activations, ModelError, Result};

/// Weights per block of the [`BlockType`]s.
pub(crate) const BLOCK: usize = 32;

/// Activation rows up to which the matrix-vector kernel is used; from here on the strip
/// kernel (`linear/strips.rs`) up to [`STRIPS_MAX_ROWS`].
///
/// Measured on an AMD EPYC (AVX-512, 2 threads, `bench --sections weight-rows`, one
/// layer's projections of SmolLM2 summed, microseconds per activation row, Q4_1): matvec
/// 58-70 at 2 to 16 rows against the strips' 80-97, so the matrix-vector kernel (each
/// block decoded once per pair of rows) up to 16; past 16 its activation rows no longer
/// stay in L1 (98 at 24 rows) and the strips (78) lead (`docs/measurements.md`, branch
/// `batch22`; an earlier machine had the strips ahead from 9 rows, and batched decode at
/// 16 sequences fell below 4 sequences here with that choice).
const MATVEC_MAX_ROWS: usize = 16;

/// Activation rows up to which the strip kernel is used past [`MATVEC_MAX_ROWS`] (and
/// projections of one input run as one parallel pass, [`Linear::forward_many`]); from
/// here on the panel GEMM, whose dequantization is shared by all rows. Measured as
/// [`MATVEC_MAX_ROWS`]: strips 78 against panels 83-87 at 24 and 32 rows, panels 64-67
/// against 77-79 from 48.
const STRIPS_MAX_ROWS: usize = 32;

/// f32 weights per dequantized panel: 256 KiB, a quarter of this machine's L2, so the tile,
/// the activation rows streaming past it and gemm's packed copies stay in cache.
///
/// Measured against the alternatives on a 529-token prefill (2 cores shared with other
/// builds, so CPU seconds are the guide): larger panels (up to the per-task cap of
/// `rows_per_task`) cost the same CPU time within noise; dequantizing up to 16 MiB of a matrix at once and calling gemm once with
/// its own threading took ~10% less CPU time but was slower in wall time under load, its
/// threads meeting at barriers while independent panel tasks balance themselves.
const PANEL_WEIGHTS: usize = 64 * 1024;

/// The GGUF block types with our own kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BlockType {
    /// 18 bytes: f16 scale `d`, 16 bytes of nibbles; `w = d * (q - 8)`.
    Q4_0,
    /// 20 bytes: f16 scale `d`, f16 minimum `m`, 16 bytes of nibbles; `w = d * q + m`.
    Q4_1,
    /// 34 bytes: f16 scale `d`, 32 signed bytes; `w = d * q`.
    Q8_0,
}

impl BlockType {
    /// The block type of a GGUF tensor type, if we have kernels for it.
    pub(crate) fn from_ggml(t: GgmlDType) -> Option<Self> {
        match t {
            GgmlDType::Q4_0 => Some(Self::Q4_0),
            GgmlDType::Q4_1 => Some(Self::Q4_1),
            GgmlDType::Q8_0 => Some(Self::Q8_0),
            _ => None,
        }
    }

    /// Bytes per block of 32 weights.
    pub(crate) const fn bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q8_0 => 34,
        }
    }
}

/// Every GGUF block type with our own kernels: the first three (`linear/blocks.rs`) and
/// those with fifth or sixth bits or scales within a block (`linear/kquant.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WeightType {
    /// Q4_0, Q4_1, Q8_0.
    Block(BlockType),
    /// Q5_0, Q5_1, Q4_K, Q5_K, Q6_K.
    K(KType),
}

impl WeightType {
    /// The type of a GGUF tensor type, if we have kernels for it.
    pub(crate) fn from_ggml(t: GgmlDType) -> Option<Self> {
        if let Some(b) = BlockType::from_ggml(t) {
            return Some(Self::Block(b));
        }
        Some(Self::K(match t {
            GgmlDType::Q5_0 => KType::Q5_0,
            GgmlDType::Q5_1 => KType::Q5_1,
            GgmlDType::Q4K => KType::Q4K,
            GgmlDType::Q5K => KType::Q5K,
            GgmlDType::Q6K => KType::Q6K,
            _ => return None,
        }))
    }

    /// Weights per block.
    pub(crate) const fn weights(self) -> usize {
        match self {
            Self::Block(_) => BLOCK,
            Self::K(k) => k.weights(),
        }
    }

    /// Bytes per block.
    pub(crate) const fn bytes(self) -> usize {
        match self {
            Self::Block(b) => b.bytes(),
            Self::K(k) => k.bytes(),
        }
    }

    /// Bytes of a row of `cols` weights (a multiple of [`WeightType::weights`]).
    const fn row_bytes(self, cols: usize) -> usize {
        cols / self.weights() * self.bytes()
    }
}

/// Runs `$body!(F)` with `F` the [`Format`] of the weight type `$ty`: the one place a
/// runtime type becomes a compile-time one.
macro_rules! with_format {
    ($ty:expr, $body:ident) => {
        match $ty {
            WeightType::Block(BlockType::Q4_0) => $body!(blocks::Q4_0),
            WeightType::Block(BlockType::Q4_1) => $body!(blocks::Q4_1),
            WeightType::Block(BlockType::Q8_0) => $body!(blocks::Q8_0),
            WeightType::K(KType::Q5_0) => $body!(kquant::Q5_0),
            WeightType::K(KType::Q5_1) => $body!(kquant::Q5_1),
            WeightType::K(KType::Q4K) => $body!(kquant::Q4K),
            WeightType::K(KType::Q5K) => $body!(kquant::Q5K),
            WeightType::K(KType::Q6K) => $body!(kquant::Q6K),
        }
    };
}

/// The workspace's one instruction-set level (detection and the `KV_ISA` switch live in
/// kv-quant); kv-model's own matrix kernels exist for each level.
pub(crate) use kv_quant::Isa;

/// The kernels at one instruction-set level. Only made for a level this CPU runs
/// ([`Kernels::new`] checks), so that tests and benchmarks name the level that really ran
/// ([`Isa::run`] itself falls back to a level the CPU has).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Kernels {
    isa: Isa,
}

impl Kernels {
    /// The kernels at `isa`, or `None` if this CPU cannot run them.
    pub(crate) fn new(isa: Isa) -> Option<Self> {
        isa.is_available().then_some(Self { isa })
    }

    /// The level every kernel of the workspace runs at ([`Isa::best`]: the fastest this
    /// CPU has, capped by `KV_ISA=scalar|avx2|avx512`).
    pub(crate) fn best() -> Self {
        Self::best_up_to(Isa::best())
    }

    /// The fastest level this CPU runs that is not above `cap`.
    pub(crate) fn best_up_to(cap: Isa) -> Self {
        Isa::ALL
            .into_iter()
            .rev()
            .filter(|&isa| isa <= cap)
            .find_map(Self::new)
            .unwrap_or(Self { isa: Isa::Scalar })
    }

    /// Weight rows `row` (whole blocks of `ty`, one row or several contiguous ones) as f32
    /// into `out` (as many weights): one dispatch however many rows.
    fn dequantize_rows(self, ty: WeightType, row: &[u8], out: &mut [f32]) {
        debug_assert_eq!(row.len() / ty.bytes() * ty.weights(), out.len());
        macro_rules! go {
            ($f:ty) => {
                self.isa
                    .run(matvec::Dequantize::<$f, { <$f as Format>::BYTES }> {
                        row,
                        out,
                        format: PhantomData,
                    })
            };
        }
        with_format!(ty, go)
    }

    /// [`Kernels::dot_matrix`] for a batch of activation rows: each strip of
    /// [`strips::STRIP`] weight rows dequantized once (into this thread's buffer) and
    /// multiplied with all `n` rows.
    fn dot_strips(
        self,
        ty: WeightType,
        rows: &[u8],
        x: &[f32],
        cols: usize,
        n: usize,
        out: &mut [f32],
    ) {
        let row_bytes = ty.row_bytes(cols);
        if row_bytes == 0 || n == 0 {
            out.fill(0.0);
            return;
        }
        STRIP_BUF.with_borrow_mut(|buf| {
            buf.resize(strips::STRIP * cols, 0.0);
            let strips = rows.chunks(strips::STRIP * row_bytes);
            for (strip, o) in strips.zip(out.chunks_mut(strips::STRIP * n)) {
                // Whole rows of blocks are contiguous: one call for the strip.
                let sr = strip.len() / row_bytes;
                self.dequantize_rows(ty, strip, &mut buf[..sr * cols]);
                self.isa.run(strips::StripDot {
                    w: &buf[..sr * cols],
                    x,
                    cols,
                    n,
                    out: &mut o[..sr * n],
                });
            }
        });
    }

    /// `out[j * n + i] = dot(weight row j, x row i)` for the weight rows in `rows` (whole
    /// rows of `cols` weights of type `ty`) and `n` activation rows of `x`.
    /// Which activation order `ty`'s dot products read (0: natural; see
    /// [`matvec::Format::WORD_ORDER`]).
    fn word_order(self, ty: WeightType) -> u8 {
        macro_rules! go {
            ($f:ty) => {
                <$f as Format>::WORD_ORDER
            };
        }
        with_format!(ty, go)
    }

    /// The `n` rows of `x` in `ty`'s activation order at this level, for
    /// [`Kernels::dot_matrix`] (empty where it reads them in natural order).
    fn reorder(self, ty: WeightType, x: &[f32], cols: usize, n: usize) -> Vec<XChunk8> {
        macro_rules! go {
            ($f:ty) => {
                self.isa.run(matvec::Reorder::<$f> {
                    x,
                    cols,
                    n,
                    format: PhantomData,
                })
            };
        }
        with_format!(ty, go)
    }

    /// `xr`: `x` already in `ty`'s activation order ([`Kernels::reorder`]), if the caller
    /// made it once for several calls.
    #[allow(clippy::too_many_arguments)]
    fn dot_matrix(
        self,
        ty: WeightType,
        rows: &[u8],
        x: &[f32],
        xr: Option<&[XChunk8]>,
        cols: usize,
        n: usize,
        out: &mut [f32],
    ) {
        let row_bytes = ty.row_bytes(cols);
        if row_bytes == 0 || n == 0 {
            out.fill(0.0);
            return;
        }
        debug_assert!(x.len() >= n * cols, "x holds n rows");
        debug_assert_eq!(rows.len() / row_bytes * n, out.len(), "rows and out differ");
        macro_rules! go {
            ($f:ty) => {
                self.isa
                    .run(matvec::DotMatrix::<$f, { <$f as Format>::BYTES }> {
                        rows,
                        row_bytes,
                        x,
                        cols,
                        n,
                        out,
                        xr,
                        format: PhantomData,
                    })
            };
        }
        with_format!(ty, go)
    }
}

/// A `[rows, cols]` weight matrix held as the file's blocks, row-major, each row
/// `cols / ty.weights()` blocks.
#[derive(Debug, Clone)]
pub(crate) struct BlockMatrix {
    ty: WeightType,
    rows: usize,
    cols: usize,
    data: Bytes,
    /// The interleaved copy for int8 activations (`linear/q8.rs`), made at the first q8
    /// product: exact activations never pay for it.
    q8: std::sync::OnceLock<Option<q8::Packed>>,
}

/// A weight matrix's block bytes: its own copy, or a range of the mapped model file.
#[derive(Debug, Clone)]
enum Bytes {
    Owned(Vec<u8>),
    Mapped(Arc<memmap2::Mmap>, std::ops::Range<usize>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Self::Owned(v) => v,
            // The range was checked against the map when the matrix was made.
            Self::Mapped(m, r) => &m[r.clone()],
        }
    }
}

/// A raw pointer into the output that rayon tasks share; each task writes its own columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: the pointer is only used by `BlockMatrix::matmul_panels` and `q8::q8_parts`,
// whose tasks write disjoint column ranges of one live buffer that outlives the parallel
// loop.
unsafe impl Send for OutPtr {}
// SAFETY: as for `Send`: no two tasks touch the same element.
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Through a method so closures capture the whole (Send) struct, not its raw field.
    fn get(self) -> *mut f32 {
        self.0
    }
}

thread_local! {
    /// Each rayon worker's dequantized panel, reused across calls.
    static PANEL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Each rayon worker's dequantized strip of the batch kernel, reused across calls.
    static STRIP_BUF: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

impl BlockMatrix {
    /// The interleaved copy of this matrix for the int8 kernel at `k` (`linear/q8.rs`),
    /// made at the first call: `None` for types without an integer kernel. As large as
    /// the matrix's blocks (plus padding to whole row groups).
    fn q8_packed(&self, k: Kernels) -> Option<&q8::Packed> {
        self.q8
            .get_or_init(|| {
                q8::Packed::new(
                    self.ty,
                    self.rows,
                    self.cols,
                    &self.data,
                    q8::lanes_for(k.isa),
                )
            })
            .as_ref()
    }

    /// `data` as `rows` rows of `cols` weights of type `ty`; `None` if `cols` is not a
    /// multiple of the block's weights or `data` is not exactly that many blocks.
    pub(crate) fn new(ty: WeightType, rows: usize, cols: usize, data: Vec<u8>) -> Option<Self> {
        Self::fits(ty, rows, cols, data.len()).then_some(Self {
            ty,
            rows,
            cols,
            data: Bytes::Owned(data),
            q8: std::sync::OnceLock::new(),
        })
    }

    /// As [`BlockMatrix::new`] over `range` of a mapped file, without copying; `None` also
    /// if the range is not inside the map.
    pub(crate) fn mapped(
        ty: WeightType,
        rows: usize,
        cols: usize,
        map: Arc<memmap2::Mmap>,
        range: std::ops::Range<usize>,
    ) -> Option<Self> {
        let ok = range.start <= range.end
            && range.end <= map.len()
            && Self::fits(ty, rows, cols, range.end - range.start);
        ok.then_some(Self {
            ty,
            rows,
            cols,
            data: Bytes::Mapped(map, range),
            q8: std::sync::OnceLock::new(),
        })
    }

    /// Whether `len` bytes are exactly `rows` rows of `cols` weights of `ty`.
    fn fits(ty: WeightType, rows: usize, cols: usize, len: usize) -> bool {
        cols.is_multiple_of(ty.weights())
            && rows
                .checked_mul(cols / ty.weights())
                .and_then(|b| b.checked_mul(ty.bytes()))
                == Some(len)
    }

    /// The blocks of a 2-D GGUF tensor, or `None` if its type has no kernels here.
    pub(crate) fn from_qtensor(t: &QTensor) -> Result<Option<Self>> {
        let Some(ty) = WeightType::from_ggml(t.dtype()) else {
            return Ok(None);
        };
        let (rows, cols) = t.shape().dims2()?;
        Ok(Self::new(ty, rows, cols, t.data()?.into_owned()))
    }

    fn row(&self, r: usize) -> &[u8] {
        let bytes = self.ty.row_bytes(self.cols);
        &self.data[r * bytes..][..bytes]
    }

    /// Weight row `r` as f32, exactly as candle's `dequantize` gives it.
    pub(crate) fn dequantize_row(&self, k: Kernels, r: usize, out: &mut [f32]) {
        k.dequantize_rows(self.ty, self.row(r), &mut out[..self.cols]);
    }

    /// `out = x · selfᵀ` for `x` `[n, cols]` and `out` `[n, rows]`, both row-major f32.
    ///
    /// # Panics
    /// If `x` or `out` is shorter than `n` rows (callers check shapes).
    pub(crate) fn matmul(&self, k: Kernels, x: &[f32], n: usize, out: &mut [f32]) {
        self.matmul_with(k, Path::for_rows(n), x, n, out);
    }

    /// [`BlockMatrix::matmul`] by a given path (the benchmark compares them).
    fn matmul_with(&self, k: Kernels, path: Path, x: &[f32], n: usize, out: &mut [f32]) {
        let (x, out) = (&x[..n * self.cols], &mut out[..n * self.rows]);
        match path {
            Path::Rows(p) => self.matvec(k, p, x, n, out),
            Path::Panels => self.matmul_panels(k, x, n, out),
            Path::Q8 => self.matmul_q8(k, x, n, out),
        }
    }

    /// `out = x · selfᵀ` with `x` rounded to 8 bits, as [`Linear::forward`] in q8 mode
    /// computes it (rounding included); zeros for a type without an
    /// integer kernel (the benchmark, its one caller, asks only for types with one).
    fn matmul_q8(&self, k: Kernels, x: &[f32], n: usize, out: &mut [f32]) {
        let Some(p) = self.q8_packed(k) else {
            out.fill(0.0);
            return;
        };
        let q = q8::Q8Rows::quantize(x, n, self.cols);
        q8::q8_parts(k, &mut [(p, out)], &q, n);
    }

    /// Output rows per rayon task: a few tasks per thread for balance.
    fn rows_per_task(&self, min: usize) -> usize {
        let tasks = rayon::current_num_threads() * 4;
        self.rows.div_ceil(tasks).max(min)
    }

    fn matvec(&self, k: Kernels, p: RowKernel, x: &[f32], n: usize, out: &mut [f32]) {
        if n == 1 {
            matvec_parts(k, p, &mut [(self, out)], x, 1);
            return;
        }
        let mut t = vec![0f32; self.rows * n];
        matvec_parts(k, p, &mut [(self, &mut t)], x, n);
        transpose_into(&t, n, out);
    }

    fn matmul_panels(&self, k: Kernels, x: &[f32], n: usize, out: &mut [f32]) {
        let (rows, cols) = (self.rows, self.cols);
        let panel = (PANEL_WEIGHTS / cols).clamp(8, 256) / 8 * 8;
        let panel = panel.min(self.rows_per_task(8).next_multiple_of(8));
        let dst = OutPtr(out.as_mut_ptr());
        (0..rows.div_ceil(panel)).into_par_iter().for_each(|p| {
            let r0 = p * panel;
            let pr = panel.min(rows - r0);
            PANEL.with_borrow_mut(|tile| {
                tile.resize(pr * cols, 0.0);
                let bytes = self.ty.row_bytes(cols);
                k.dequantize_rows(self.ty, &self.data[r0 * bytes..][..pr * bytes], tile);
                // SAFETY: gemm reads `x` as [n, cols] and the tile as [cols, pr] (strides
                // cols), within their slices; it writes out[i * rows + r0 + j], i < n,
                // j < pr: inside `out` ([n, rows]), columns no other task writes; `out`
                // outlives the loop and nothing else reads it meanwhile.
                unsafe {
                    gemm::gemm(
                        n,
                        pr,
                        cols,
                        dst.get().add(r0),
                        1,
                        rows as isize,
                        false,
                        x.as_ptr(),
                        1,
                        cols as isize,
                        tile.as_ptr(),
                        cols as isize,
                        1,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            });
        });
    }
}

/// Bytes the activations of a matrix-vector call are aligned to: a 512-bit load of a
/// row then never splits a cache line. Activations come from the heap, for a large buffer
/// 16 bytes past a boundary; measured with `bench --sections weights` (activations 16
/// bytes off, in cache, 1 thread): copying them aligned once per call made Q4_1 1.08x
/// faster, Q8_0 1.31x, the K-quants 1.07-1.13x, Q5_0/Q5_1 equal (docs/measurements.md).
const ALIGN: usize = 64;

/// A copy of activations starting on an [`ALIGN`] boundary (of an f32 vector 16 longer,
/// the copy at the first aligned element).
struct Aligned {
    buf: Vec<f32>,
    at: usize,
    len: usize,
}

impl Aligned {
    fn copy(x: &[f32]) -> Self {
        let lanes = ALIGN / size_of::<f32>();
        let mut buf = vec![0f32; x.len() + lanes];
        let at = buf.as_ptr().align_offset(ALIGN).min(lanes);
        buf[at..at + x.len()].copy_from_slice(x);
        Self {
            buf,
            at,
            len: x.len(),
        }
    }

    fn as_slice(&self) -> &[f32] {
        &self.buf[self.at..self.at + self.len]
    }
}

/// `x · mᵀ` for each `(m, out)` of `parts` (all with the same `cols`), into `out` as
/// `[m.rows, n]`: output-row-major, so that each weight row serves all `n` activation rows
/// while its blocks are in L1. One parallel loop over the rows of all parts: a decode step
/// pays one rayon dispatch for Q, K and V together, not three.
fn matvec_parts(
    k: Kernels,
    p: RowKernel,
    parts: &mut [(&BlockMatrix, &mut [f32])],
    x: &[f32],
    n: usize,
) {
    if n == 0 {
        return;
    }
    let aligned;
    let x = if x.as_ptr().align_offset(ALIGN) == 0 {
        x
    } else {
        aligned = Aligned::copy(x);
        aligned.as_slice()
    };
    let total: usize = parts.iter().map(|(m, _)| m.rows).sum();
    // A few tasks per thread for balance, not so many that the scheduling costs more than
    // the work (a decode step makes ~200 of these calls).
    let mut chunk = total.div_ceil(rayon::current_num_threads() * 4).max(16);
    if p == RowKernel::Strips {
        // Whole strips per task.
        chunk = chunk.next_multiple_of(strips::STRIP);
    }
    // Activations in the order a K-quant kernel reads them, once per call for every
    // task (and every part) that reads that order: a gather of `cols` floats per row,
    // which per task cost up to a third of a small matrix's time.
    let mut orders: Vec<(u8, Vec<XChunk8>)> = Vec::new();
    if p == RowKernel::Matvec {
        for (m, _) in parts.iter() {
            let id = k.word_order(m.ty);
            if id != 0 && !orders.iter().any(|(o, _)| *o == id) {
                orders.push((id, k.reorder(m.ty, x, m.cols, n)));
            }
        }
    }
    let orders = &orders;
    let mut tasks = Vec::new();
    for (m, out) in parts.iter_mut() {
        for (c, o) in out[..m.rows * n].chunks_mut(chunk * n).enumerate() {
            tasks.push((*m, c * chunk, o));
        }
    }
    tasks.into_par_iter().for_each(|(m, r0, o)| {
        let row_bytes = m.ty.row_bytes(m.cols);
        let rows = &m.data[r0 * row_bytes..][..o.len() / n * row_bytes];
        let id = k.word_order(m.ty);
        let xr = orders
            .iter()
            .find(|(o, _)| *o == id && id != 0)
            .map(|(_, xr)| &xr[..]);
        match p {
            RowKernel::Matvec => k.dot_matrix(m.ty, rows, x, xr, m.cols, n, o),
            RowKernel::Strips => k.dot_strips(m.ty, rows, x, m.cols, n, o),
        }
    });
}

/// The kernels that compute output-row-major results ([`matvec_parts`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RowKernel {
    /// Up to [`MATVEC_MAX_ROWS`] activation rows per pass over a weight row.
    Matvec,
    /// Strips of weight rows dequantized once for any number of activation rows.
    Strips,
}

/// How a [`BlockMatrix::matmul`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// Output-row-major through [`matvec_parts`].
    Rows(RowKernel),
    /// Dequantized panels and the `gemm` crate.
    Panels,
    /// Int8 activations and the interleaved kernel (`linear/q8.rs`): only by name.
    Q8,
}

impl Path {
    /// The path for `n` activation rows: measured crossovers.
    fn for_rows(n: usize) -> Self {
        if n <= MATVEC_MAX_ROWS {
            Self::Rows(RowKernel::Matvec)
        } else if n <= STRIPS_MAX_ROWS {
            Self::Rows(RowKernel::Strips)
        } else {
            Self::Panels
        }
    }

    fn from_name(name: &str, n: usize) -> Option<Self> {
        match name {
            "auto" => Some(Self::for_rows(n)),
            "matvec" => Some(Self::Rows(RowKernel::Matvec)),
            "strips" => Some(Self::Rows(RowKernel::Strips)),
            "panels" => Some(Self::Panels),
            "q8" => Some(Self::Q8),
            _ => None,
        }
    }
}

/// Output rows per tile of [`transpose_into`]: a tile's `[TILE, n]` source (16 KiB at 64
/// rows) stays in L1 while each of its `n` destination rows gets `TILE` contiguous floats
/// (4 cache lines).
const TILE: usize = 64;

/// `t` `[rows, n]` into `out` `[n, rows]`, in tiles of [`TILE`] rows.
///
/// Element by element, a row of `t` scatters over `n` destination rows `rows * 4` bytes
/// apart: for the output head (49152 rows) every store touched another page, and a
/// profile of a 64-sequence q8 decode (`perf record`, `kv batch`) had 38% of its samples
/// in this loop, 14% at 16 sequences. Tiled, each destination row is written in runs of
/// [`TILE`] floats.
fn transpose_into(t: &[f32], n: usize, out: &mut [f32]) {
    if n == 0 {
        return;
    }
    let rows = t.len() / n;
    for (b, tile) in t.chunks(TILE * n).enumerate() {
        let r0 = b * TILE;
        let len = tile.len() / n;
        for (i, dst) in out.chunks_exact_mut(rows).take(n).enumerate() {
            for (o, src) in dst[r0..r0 + len].iter_mut().zip(tile.chunks_exact(n)) {
                *o = src[i];
            }
        }
    }
}

/// Seconds per `matmul` of a random `[rows, cols]` matrix of `ty` (`q4_0`, `q4_1`, `q8_0`,
/// `q5_0`, `q5_1`, `q4_k`, `q5_k`, `q6_k`) by `n` activation rows at `isa` (`scalar`,
/// `avx2`, `avx512`), the median of `reps` calls after one warm-up; `None` for an unknown
/// name or a level this CPU lacks, or a `cols` not a multiple of the type's block. For the
/// `weight_speed` and `bench` examples: kernels are not public API.
#[doc(hidden)]
pub fn matmul_seconds(
    isa: &str,
    ty: &str,
    rows: usize,
    cols: usize,
    n: usize,
    reps: usize,
) -> Option<f64> {
    matmul_path_seconds("auto", isa, ty, rows, cols, n, reps)
}

/// [`matmul_seconds`] by one path: `auto` (what `matmul` picks), `matvec` (the
/// matrix-vector kernel), `strips` (the strip kernel), `panels` (dequantized panels and
/// gemm) or `q8` (activations rounded to 8 bits, the interleaved integer kernel; `None`
/// for a type without one), at any row count. For the `bench` example's crossover
/// measurement.
#[doc(hidden)]
pub fn matmul_path_seconds(
    path: &str,
    isa: &str,
    ty: &str,
    rows: usize,
    cols: usize,
    n: usize,
    reps: usize,
) -> Option<f64> {
    timed_matmul(path, isa, ty, (rows, cols), n, reps, 0)
}

/// [`matmul_seconds`] with the weights streamed from memory, as a model's decode reads
/// them: copies of the matrix (distinct memory) totalling at least `min_bytes` (set it
/// past the last-level cache) are multiplied in turn, `reps` calls cycling through them,
/// so no call finds its weights in cache; the median of the calls. The activations stay
/// in cache, as a decode step's do. For the `bench` example's `weights` section.
#[doc(hidden)]
pub fn matmul_seconds_from_memory(
    isa: &str,
    ty: &str,
    rows: usize,
    cols: usize,
    reps: usize,
    min_bytes: usize,
) -> Option<f64> {
    timed_matmul("auto", isa, ty, (rows, cols), 1, reps, min_bytes)
}

/// The timing behind [`matmul_path_seconds`] and [`matmul_seconds_from_memory`]:
/// `min_bytes` 0 times one matrix (in cache after the warm-up), more cycles copies.
fn timed_matmul(
    path: &str,
    isa: &str,
    ty: &str,
    (rows, cols): (usize, usize),
    n: usize,
    reps: usize,
    min_bytes: usize,
) -> Option<f64> {
    let path = Path::from_name(path, n)?;
    let k = Kernels::new(Isa::from_name(isa)?)?;
    let ty = match ty {
        "q4_0" => WeightType::Block(BlockType::Q4_0),
        "q4_1" => WeightType::Block(BlockType::Q4_1),
        "q8_0" => WeightType::Block(BlockType::Q8_0),
        "q5_0" => WeightType::K(KType::Q5_0),
        "q5_1" => WeightType::K(KType::Q5_1),
        "q4_k" => WeightType::K(KType::Q4K),
        "q5_k" => WeightType::K(KType::Q5K),
        "q6_k" => WeightType::K(KType::Q6K),
        _ => return None,
    };
    if !cols.is_multiple_of(ty.weights()) || (path == Path::Q8 && !q8::supports(ty)) {
        return None;
    }
    // Deterministic bytes; each block's f16 scale(s) set to small normal values.
    let blocks = rows.checked_mul(cols / ty.weights())?;
    let bytes = blocks.checked_mul(ty.bytes())?;
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut data: Vec<u8> = (0..bytes)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1);
            (state >> 56) as u8
        })
        .collect();
    let scale = half::f16::from_f32(0.01).to_bits().to_le_bytes();
    // Where each type keeps its f16 fields.
    let halves: &[usize] = match ty {
        WeightType::Block(BlockType::Q4_1) | WeightType::K(KType::Q5_1) => &[0, 2],
        WeightType::K(KType::Q4K | KType::Q5K) => &[0, 2],
        WeightType::K(KType::Q6K) => &[208],
        _ => &[0],
    };
    for b in data.chunks_exact_mut(ty.bytes()) {
        for &at in halves {
            b[at..at + 2].copy_from_slice(&scale);
        }
    }
    let copies = min_bytes.div_ceil(bytes.max(1)).max(1);
    let ms: Vec<BlockMatrix> = (0..copies)
        .map(|_| BlockMatrix::new(ty, rows, cols, data.clone()))
        .collect::<Option<_>>()?;
    // The activations 16 bytes past a 64-byte boundary, where the heap puts a large
    // buffer, every call (not wherever this run's heap puts them: that decided whether
    // each 512-bit load split a cache line, one type 20% slower in one build than in
    // another with the same kernel).
    let mut xs = vec![0f32; n * cols + 16];
    let skip = 4usize.wrapping_sub(xs.as_ptr() as usize / 4) % 16;
    let x = &mut xs[skip..][..n * cols];
    for (i, v) in x.iter_mut().enumerate() {
        *v = (i % 17) as f32 * 0.1 - 0.8;
    }
    let x = &*x;
    let mut out = vec![0f32; n * rows];
    // One warm-up call per copy (page faults, the last copies then in cache: the cycle
    // below starts with the first, long evicted).
    for m in &ms {
        m.matmul_with(k, path, x, n, &mut out);
    }
    let mut times: Vec<f64> = (0..reps.max(1))
        .map(|i| {
            let m = &ms[i % ms.len()];
            let t = std::time::Instant::now();
            m.matmul_with(k, path, std::hint::black_box(x), n, &mut out);
            t.elapsed().as_secs_f64()
        })
        .collect();
    std::hint::black_box(&out);
    times.sort_by(f64::total_cmp);
    Some(times[times.len() / 2])
}

/// One projection: our block kernels, or candle's matmul (f32 expansion, or its quantized
/// matmul when asked for).
#[derive(Debug)]
pub(crate) enum Linear {
    /// The file's blocks with our kernels (shared with the embeddings when tied).
    Blocks(Arc<BlockMatrix>),
    /// Anything candle multiplies.
    Candle(QMatMul),
}

/// The token embedding table.
#[derive(Debug)]
pub(crate) enum Embeddings {
    /// `[vocab, hidden]` f32.
    F32(Tensor),
    /// The file's blocks (shared with a tied output projection), rows dequantized on
    /// lookup: no f32 copy of the largest matrix of a small model.
    Blocks(Arc<BlockMatrix>),
}

impl Embeddings {
    /// The rows of `tokens`, `[tokens, hidden]` f32.
    pub(crate) fn lookup(&self, tokens: &[u32], device: &Device) -> Result<Tensor> {
        let m = match self {
            Self::F32(t) => return Ok(t.index_select(&Tensor::new(tokens, device)?, 0)?),
            Self::Blocks(m) => m,
        };
        let k = Kernels::best();
        let mut out = vec![0f32; tokens.len() * m.cols];
        for (&id, row) in tokens.iter().zip(out.chunks_exact_mut(m.cols)) {
            if id as usize >= m.rows {
                return Err(ModelError::TokenOutOfRange { id, vocab: m.rows });
            }
            m.dequantize_row(k, id as usize, row);
        }
        Ok(Tensor::from_vec(out, (tokens.len(), m.cols), device)?)
    }
}

impl Linear {
    /// `x · Wᵀ` for `x` `[n, cols]` f32: `[n, rows]` f32, the activations rounded to 8 bits
    /// first when `act` says so and the weights have an integer kernel (`linear/q8.rs`).
    pub(crate) fn forward(&self, x: &Tensor, act: Activations) -> Result<Tensor> {
        let w = match self {
            Self::Candle(m) => return Ok(m.forward(x)?),
            Self::Blocks(w) => w,
        };
        if act == Activations::Q8 && q8::supports(w.ty) {
            return Self::forward_q8(&[w], x).map(|mut v| v.remove(0));
        }
        let (n, cols) = x.dims2()?;
        if cols != w.cols {
            return Err(candle_core::Error::ShapeMismatchBinaryOp {
                lhs: x.shape().clone(),
                rhs: (w.rows, w.cols).into(),
                op: "linear",
            }
            .into());
        }
        let mut out = vec![0f32; n * w.rows];
        let k = Kernels::best();
        with_f32(x, |v| w.matmul(k, v, n, &mut out))?;
        Ok(Tensor::from_vec(out, (n, w.rows), x.device())?)
    }

    /// `forward` of several projections of the same `x`, bit-identical to separate calls.
    /// When all are blocks and `x` has up to [`STRIPS_MAX_ROWS`] rows (decode, one
    /// sequence or a batch), they run as one parallel pass: one dispatch and one read of `x` instead of one per projection.
    pub(crate) fn forward_many(ls: &[&Self], x: &Tensor, act: Activations) -> Result<Vec<Tensor>> {
        let (n, cols) = x.dims2()?;
        let ms: Option<Vec<&BlockMatrix>> = ls
            .iter()
            .map(|l| match l {
                Self::Blocks(m) if m.cols == cols => Some(&**m),
                _ => None,
            })
            .collect();
        if let Some(ms) = &ms {
            if act == Activations::Q8 && ms.iter().all(|m| q8::supports(m.ty)) {
                return Self::forward_q8(ms, x);
            }
        }
        let Path::Rows(p) = Path::for_rows(n) else {
            return ls.iter().map(|l| l.forward(x, act)).collect();
        };
        let Some(ms) = ms else {
            return ls.iter().map(|l| l.forward(x, act)).collect();
        };
        let k = Kernels::best();
        let mut outs: Vec<Vec<f32>> = ms.iter().map(|m| vec![0f32; m.rows * n]).collect();
        with_f32(x, |v| {
            let mut parts: Vec<(&BlockMatrix, &mut [f32])> = ms
                .iter()
                .copied()
                .zip(outs.iter_mut().map(|o| &mut o[..]))
                .collect();
            matvec_parts(k, p, &mut parts, v, n);
        })?;
        row_major(&ms, outs, n, x.device())
    }
}

/// Each matrix's output (`[rows, n]`, as the kernels write it) as an `[n, rows]` tensor.
fn row_major(
    ms: &[&BlockMatrix],
    outs: Vec<Vec<f32>>,
    n: usize,
    device: &candle_core::Device,
) -> Result<Vec<Tensor>> {
    ms.iter()
        .zip(outs)
        .map(|(m, t)| {
            let out = if n == 1 {
                t
            } else {
                let mut out = vec![0f32; t.len()];
                transpose_into(&t, n, &mut out);
                out
            };
            Ok(Tensor::from_vec(out, (n, m.rows), device)?)
        })
        .collect()
}

impl Linear {
    /// `x · mᵀ` for each of `ms` (all of `q8::supports`' types, all with `x`'s columns),
    /// `x` `[n, cols]` rounded to 8 bits once for all: one parallel pass at any row count,
    /// so that every row is computed the same way in prefill and decode.
    fn forward_q8(ms: &[&BlockMatrix], x: &Tensor) -> Result<Vec<Tensor>> {
        let (n, cols) = x.dims2()?;
        if let Some(m) = ms.iter().find(|m| m.cols != cols) {
            return Err(candle_core::Error::ShapeMismatchBinaryOp {
                lhs: x.shape().clone(),
                rhs: (m.rows, m.cols).into(),
                op: "linear",
            }
            .into());
        }
        let mut q = None;
        with_f32(x, |v| q = Some(q8::Q8Rows::quantize(v, n, cols)))?;
        let Some(q) = q else {
            return Err(candle_core::Error::Msg("activations not read".into()).into());
        };
        let k = Kernels::best();
        let packed: Option<Vec<&q8::Packed>> = ms.iter().map(|m| m.q8_packed(k)).collect();
        let Some(packed) = packed else {
            return Err(candle_core::Error::Msg("no int8 kernel for these weights".into()).into());
        };
        let mut outs: Vec<Vec<f32>> = ms.iter().map(|m| vec![0f32; m.rows * n]).collect();
        let mut parts: Vec<(&q8::Packed, &mut [f32])> = packed
            .iter()
            .copied()
            .zip(outs.iter_mut().map(|o| &mut o[..]))
            .collect();
        q8::q8_parts(k, &mut parts, &q, n);
        ms.iter()
            .zip(outs)
            .map(|(m, o)| Ok(Tensor::from_vec(o, (n, m.rows), x.device())?))
            .collect()
    }
}

/// Calls `f` with `x`'s elements as contiguous f32, copying only if they are not already.
fn with_f32(x: &Tensor, f: impl FnOnce(&[f32])) -> Result<()> {
    let x = x.to_dtype(DType::F32)?.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => f(&v[a..b]),
        _ => {
            drop(storage);
            f(&x.flatten_all()?.to_vec1::<f32>()?);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    const TYPES: [GgmlDType; 8] = [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q8_0,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ];

    /// Every level this CPU runs, so each test covers what the machine has.
    fn kernels() -> Vec<Kernels> {
        Isa::ALL.into_iter().filter_map(Kernels::new).collect()
    }

    fn random(rng: &mut StdRng, len: usize) -> Vec<f32> {
        // Different magnitudes per call, and an offset so Q4_1's minimum is not ~0.
        let scale = rng.random_range(0.01f32..4.0);
        let shift = rng.random_range(-1.0f32..1.0) * scale;
        (0..len)
            .map(|_| rng.random_range(-1.0f32..1.0) * scale + shift)
            .collect()
    }

    /// A random `[rows, cols]` weight quantized by candle, and candle's dequantization of it.
    fn weight(rng: &mut StdRng, ty: GgmlDType, rows: usize, cols: usize) -> (QTensor, Vec<f32>) {
        let t = Tensor::from_vec(random(rng, rows * cols), (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, ty).unwrap();
        let w = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        (q, w)
    }

    #[test]
    fn isa_cap_picks_the_best_level_not_above_it() {
        assert_eq!(Isa::from_name(" AVX2 "), Some(Isa::Avx2));
        assert_eq!(Isa::from_name("sse"), None);
        assert_eq!(Kernels::best_up_to(Isa::Scalar).isa, Isa::Scalar);
        let best = Kernels::best_up_to(Isa::Avx512).isa;
        for isa in Isa::ALL {
            let k = Kernels::best_up_to(isa).isa;
            assert!(k <= isa && k <= best);
            assert_eq!(Kernels::new(isa).is_some(), k == isa, "{isa:?}");
        }
        assert!(matmul_seconds("scalar", "q4_1", 16, 64, 1, 1).is_some());
        assert!(matmul_seconds("scalar", "q2_k", 16, 64, 1, 1).is_none());
        assert!(matmul_seconds("scalar", "q4_k", 16, 64, 1, 1).is_none());
        assert!(matmul_seconds("scalar", "q4_k", 4, 256, 1, 1).is_some());
        // From memory: 4 copies of a 4x256 Q4_K matrix (576 bytes each) for 2000 bytes.
        assert!(matmul_seconds_from_memory("scalar", "q4_k", 4, 256, 3, 2000).is_some());
        assert!(matmul_seconds_from_memory("scalar", "q4_k", 4, 64, 3, 2000).is_none());
    }

    #[test]
    fn dequantize_equals_candle_bit_for_bit() {
        let mut rng = StdRng::seed_from_u64(1);
        for ty in TYPES {
            let (rows, cols) = (7, 512);
            let (q, want) = weight(&mut rng, ty, rows, cols);
            let m = BlockMatrix::from_qtensor(&q).unwrap().unwrap();
            for k in kernels() {
                let mut row = vec![0f32; cols];
                for r in 0..rows {
                    m.dequantize_row(k, r, &mut row);
                    let w = &want[r * cols..][..cols];
                    for (j, (g, w)) in row.iter().zip(w).enumerate() {
                        assert_eq!(g.to_bits(), w.to_bits(), "{ty:?} {k:?} row {r} col {j}");
                    }
                }
            }
        }
    }

    /// Random block bytes (not what a quantizer writes: any scale, sign and code), with
    /// the f16 fields made finite, against candle's `dequantize` of the same bytes.
    #[test]
    fn dequantize_of_arbitrary_blocks_equals_candle_bit_for_bit() {
        let mut rng = StdRng::seed_from_u64(7);
        for ty in TYPES {
            let wt = WeightType::from_ggml(ty).unwrap();
            let (rows, cols) = (5, 512);
            let mut data: Vec<u8> = (0..rows * wt.row_bytes(cols))
                .map(|_| rng.random())
                .collect();
            let halves: &[usize] = match wt {
                WeightType::K(KType::Q6K) => &[208],
                WeightType::K(KType::Q4K | KType::Q5K | KType::Q5_1)
                | WeightType::Block(BlockType::Q4_1) => &[0, 2],
                _ => &[0],
            };
            for b in data.chunks_exact_mut(wt.bytes()) {
                for &at in halves {
                    // Either sign, zero included, any finite magnitude.
                    let v = half::f16::from_f32(rng.random_range(-2.0f32..2.0));
                    let v = if rng.random_range(0..8) == 0 {
                        half::f16::ZERO
                    } else {
                        v
                    };
                    b[at..at + 2].copy_from_slice(&v.to_bits().to_le_bytes());
                }
            }
            let storage = candle_core::quantized::QStorage::from_data(
                std::borrow::Cow::Borrowed(&data),
                &Device::Cpu,
                ty,
            )
            .unwrap();
            let q = QTensor::new(storage, (rows, cols)).unwrap();
            let want: Vec<f32> = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let m = BlockMatrix::from_qtensor(&q).unwrap().unwrap();
            for k in kernels() {
                let mut row = vec![0f32; cols];
                for r in 0..rows {
                    m.dequantize_row(k, r, &mut row);
                    for (j, (g, w)) in row.iter().zip(&want[r * cols..][..cols]).enumerate() {
                        assert_eq!(g.to_bits(), w.to_bits(), "{ty:?} {k:?} row {r} col {j}");
                    }
                }
            }
        }
    }

    /// A matrix whose columns are not whole blocks of its type is refused, not misread.
    #[test]
    fn k_quant_rows_must_be_whole_super_blocks() {
        let ty = WeightType::K(KType::Q4K);
        assert!(BlockMatrix::new(ty, 2, 256, vec![0; 2 * 144]).is_some());
        assert!(BlockMatrix::new(ty, 2, 128, vec![0; 144]).is_none());
        assert!(BlockMatrix::new(ty, 2, 256, vec![0; 2 * 144 + 1]).is_none());
        assert!(BlockMatrix::new(ty, usize::MAX, 256, vec![]).is_none());
    }

    /// Every path (matrix-vector for few rows, panels for many; scalar and AVX2) against an
    /// f64 product of candle's dequantized weights. f32 summation of `cols` terms in any
    /// order errs by at most about `cols * eps * sum |w x|`: that is the tolerance.
    #[test]
    fn matmul_matches_f64_reference_within_summation_error() {
        let mut rng = StdRng::seed_from_u64(2);
        for ty in TYPES {
            let (rows, cols) = (37, 512);
            let (q, w) = weight(&mut rng, ty, rows, cols);
            let m = BlockMatrix::from_qtensor(&q).unwrap().unwrap();
            for n in [
                1,
                2,
                3,
                8,
                9,
                MATVEC_MAX_ROWS,
                MATVEC_MAX_ROWS + 1,
                STRIPS_MAX_ROWS,
                STRIPS_MAX_ROWS + 1,
            ] {
                let x = random(&mut rng, n * cols);
                for k in kernels() {
                    let mut out = vec![f32::NAN; n * rows];
                    m.matmul(k, &x, n, &mut out);
                    for i in 0..n {
                        for r in 0..rows {
                            let terms = (0..cols)
                                .map(|c| f64::from(w[r * cols + c]) * f64::from(x[i * cols + c]));
                            let want: f64 = terms.clone().sum();
                            let mag: f64 = terms.map(f64::abs).sum();
                            let tol = cols as f64 * f64::from(f32::EPSILON) * mag;
                            let got = f64::from(out[i * rows + r]);
                            assert!(
                                (got - want).abs() <= tol,
                                "{ty:?} {k:?} n {n} [{i}, {r}]: {got} vs {want} (tol {tol})"
                            );
                        }
                    }
                }
            }
        }
    }

    /// A row's result is the same bits whether it is decoded alone or in a batch of up to
    /// [`MATVEC_MAX_ROWS`] (odd and even positions: rows go through the kernel in pairs),
    /// so batching sequences cannot change what one of them generates.
    #[test]
    fn matvec_rows_do_not_depend_on_their_batch() {
        let mut rng = StdRng::seed_from_u64(3);
        for ty in TYPES {
            let (rows, cols) = (40, 512);
            let (q, _) = weight(&mut rng, ty, rows, cols);
            let m = BlockMatrix::from_qtensor(&q).unwrap().unwrap();
            let n = MATVEC_MAX_ROWS;
            let x = random(&mut rng, n * cols);
            for k in kernels() {
                let mut all = vec![0f32; n * rows];
                m.matmul(k, &x, n, &mut all);
                for i in 0..n {
                    let mut one = vec![0f32; rows];
                    m.matmul(k, &x[i * cols..][..cols], 1, &mut one);
                    let batch = &all[i * rows..][..rows];
                    assert!(
                        one.iter()
                            .zip(batch)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{ty:?} {k:?} row {i}"
                    );
                }
            }
        }
    }

    /// The batch kernel at every level against its scalar reference (both over candle's
    /// weights, so they differ only in summation order), with strips and register tiles cut
    /// short at the edges (37 weight rows, odd row counts).
    #[test]
    fn strip_kernel_matches_its_scalar_reference() {
        let mut rng = StdRng::seed_from_u64(8);
        for ty in TYPES {
            let (rows, cols) = (37, 256);
            let (q, _) = weight(&mut rng, ty, rows, cols);
            let m = BlockMatrix::from_qtensor(&q).unwrap().unwrap();
            let path = Path::Rows(RowKernel::Strips);
            for n in [1, 3, 9, 16, 37] {
                let x = random(&mut rng, n * cols);
                let mut want = vec![f32::NAN; n * rows];
                m.matmul_with(Kernels::best_up_to(Isa::Scalar), path, &x, n, &mut want);
                for k in kernels() {
                    let mut got = vec![f32::NAN; n * rows];
                    m.matmul_with(k, path, &x, n, &mut got);
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        let xr = &x[i / rows * cols..][..cols];
                        let mag: f32 = xr.iter().map(|v| v.abs()).sum::<f32>() + 1.0;
                        let tol = cols as f32 * f32::EPSILON * mag * 8.0;
                        assert!((g - w).abs() <= tol, "{ty:?} {k:?} n {n} [{i}]: {g} vs {w}");
                    }
                }
            }
        }
    }

    /// In the strip kernel's range a row's result is the same bits in any batch of any
    /// size and at any position, so a sequence's tokens cannot depend on its batch-mates.
    #[test]
    fn strip_rows_do_not_depend_on_their_batch() {
        let mut rng = StdRng::seed_from_u64(9);
        let path = Path::Rows(RowKernel::Strips);
        for ty in TYPES {
            let (rows, cols) = (45, 256);
            let (q, _) = weight(&mut rng, ty, rows, cols);
            let m = BlockMatrix::from_qtensor(&q).unwrap().unwrap();
            let n = 16;
            let x = random(&mut rng, n * cols);
            for k in kernels() {
                let mut all = vec![0f32; n * rows];
                m.matmul_with(k, path, &x, n, &mut all);
                let short = 9;
                for (start, len) in [(0, short), (n - short, short), (2, n - 3), (5, 1)] {
                    let mut some = vec![0f32; len * rows];
                    let xs = &x[start * cols..][..len * cols];
                    m.matmul_with(k, path, xs, len, &mut some);
                    let want = &all[start * rows..][..len * rows];
                    assert!(
                        some.iter()
                            .zip(want)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{ty:?} {k:?} rows {start}..{}",
                        start + len
                    );
                }
            }
        }
    }

    /// Projections run together give the bits of separate calls: at decode of one sequence
    /// or a batch (one pass), and past the batch range or with a non-block projection
    /// (separate calls).
    /// Int8 activations: every level, with and without VNNI, within float summation error
    /// of the exact product of candle's weights and the rounded activations (f64), and the
    /// rounded product within the rounding's error of the exact-activation product.
    #[test]
    fn q8_kernels_match_the_f64_product_of_the_rounded_activations() {
        let mut rng = StdRng::seed_from_u64(19);
        for ty in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let (rows, cols, n) = (37, 320, 7);
            let (q, w) = weight(&mut rng, ty, rows, cols);
            let m = BlockMatrix::from_qtensor(&q).unwrap().unwrap();
            let mut x = random(&mut rng, n * cols);
            x[3] = 0.0;
            x[cols..cols + 32].fill(0.0); // a block of zeros: scale 0
            let xq = q8::Q8Rows::quantize(&x, n, cols);
            let xd = xq.dequantize();
            for k in kernels() {
                for vnni in [false, q8::uses_vnni(k)] {
                    let mut got = vec![0f32; rows * n];
                    let p =
                        q8::Packed::new(m.ty, rows, cols, &m.data, q8::lanes_for(k.isa)).unwrap();
                    q8::dot_groups(k, vnni, &p, 0, &xq, n, &mut got);
                    for (j, wr) in w.chunks_exact(cols).enumerate() {
                        for i in 0..n {
                            let (xr, xe) = (&xd[i * cols..][..cols], &x[i * cols..][..cols]);
                            let want: f64 = wr
                                .iter()
                                .zip(xr)
                                .map(|(&a, &b)| f64::from(a) * f64::from(b))
                                .sum();
                            let exact: f64 = wr
                                .iter()
                                .zip(xe)
                                .map(|(&a, &b)| f64::from(a) * f64::from(b))
                                .sum();
                            let mag: f64 = wr
                                .iter()
                                .zip(xr)
                                .map(|(&a, &b)| f64::from((a * b).abs()))
                                .sum();
                            let g = f64::from(got[i * rows + j]);
                            assert!(
                                (g - want).abs() <= 1e-5 * mag + 1e-6,
                                "{ty:?} {k:?} vnni {vnni} ({j}, {i}): {g} vs {want}"
                            );
                            // Each activation moves by at most half a step (amax / 254).
                            let step: f64 = xe
                                .chunks_exact(32)
                                .zip(wr.chunks_exact(32))
                                .map(|(xb, wb)| {
                                    let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                                    f64::from(amax) / 254.0
                                        * wb.iter().map(|v| f64::from(v.abs())).sum::<f64>()
                                })
                                .sum();
                            assert!(
                                (g - exact).abs() <= step * 1.01 + 1e-5 * mag + 1e-6,
                                "{ty:?} ({j}, {i}): {g} vs exact {exact}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Int8 activations: a row's result does not depend on its batch, bit for bit, at every
    /// level and batch size (1, 7, 19 and 64 rows: groups of four and the rows left over),
    /// and the levels agree bit for bit with the portable kernel, with and without VNNI,
    /// whatever the row-group size it was packed with (16, 8 or 5 lanes; 70 rows leave a
    /// padded group).
    #[test]
    fn q8_rows_do_not_depend_on_their_batch() {
        let mut rng = StdRng::seed_from_u64(21);
        for ty in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let (rows, cols) = (70, 128);
            let (q, _) = weight(&mut rng, ty, rows, cols);
            let m = BlockMatrix::from_qtensor(&q).unwrap().unwrap();
            let n = 64;
            let x = random(&mut rng, n * cols);
            let scalar = Kernels::new(Isa::Scalar).unwrap();
            let run = |k: Kernels, lanes: usize, vnni: bool, x: &[f32], n: usize| {
                let p = q8::Packed::new(m.ty, rows, cols, &m.data, lanes).unwrap();
                let xq = q8::Q8Rows::quantize(x, n, cols);
                let mut out = vec![0f32; rows * n];
                if vnni {
                    q8::dot_groups(k, true, &p, 0, &xq, n, &mut out);
                } else {
                    q8::q8_parts(k, &mut [(&p, &mut out[..])], &xq, n);
                }
                out.iter().map(|v| v.to_bits()).collect::<Vec<u32>>()
            };
            let want = run(scalar, 8, false, &x, n);
            for lanes in [16, 5] {
                assert_eq!(
                    run(scalar, lanes, false, &x, n),
                    want,
                    "{ty:?} lanes {lanes}"
                );
            }
            for k in kernels() {
                let lanes = q8::lanes_for(k.isa);
                for vnni in [false, q8::uses_vnni(k)] {
                    assert_eq!(run(k, lanes, vnni, &x, n), want, "{ty:?} {k:?} vnni {vnni}");
                }
                for b in [1, 7, 19] {
                    for i0 in [0, n - b] {
                        let part = run(k, lanes, false, &x[i0 * cols..][..b * cols], b);
                        for i in 0..b {
                            for j in 0..rows {
                                assert_eq!(
                                    part[i * rows + j],
                                    want[(i0 + i) * rows + j],
                                    "{ty:?} {k:?} batch {b} row {} out {j}",
                                    i0 + i
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn forward_many_equals_separate_forwards_bit_for_bit() {
        let mut rng = StdRng::seed_from_u64(6);
        let cols = 96;
        let mut ls: Vec<Linear> = [
            (40, GgmlDType::Q4_1),
            (24, GgmlDType::Q8_0),
            (8, GgmlDType::Q4_0),
        ]
        .into_iter()
        .map(|(rows, ty)| {
            let (q, _) = weight(&mut rng, ty, rows, cols);
            Linear::Blocks(Arc::new(BlockMatrix::from_qtensor(&q).unwrap().unwrap()))
        })
        .collect();
        let bits = |t: &Tensor| -> Vec<u32> {
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            v.iter().map(|f| f.to_bits()).collect()
        };
        for (candle, act) in [
            (false, Activations::Exact),
            (false, Activations::Q8),
            (true, Activations::Exact),
            (true, Activations::Q8),
        ] {
            if candle && !ls.iter().any(|l| matches!(l, Linear::Candle(_))) {
                let (_, w) = weight(&mut rng, GgmlDType::Q8_0, 16, cols);
                let t = Tensor::from_vec(w, (16, cols), &Device::Cpu).unwrap();
                ls.push(Linear::Candle(QMatMul::Tensor(t)));
            }
            for n in [1, 2, 3, 9, MATVEC_MAX_ROWS + 1, STRIPS_MAX_ROWS + 1] {
                let x =
                    Tensor::from_vec(random(&mut rng, n * cols), (n, cols), &Device::Cpu).unwrap();
                let refs: Vec<&Linear> = ls.iter().collect();
                let many = Linear::forward_many(&refs, &x, act).unwrap();
                assert_eq!(many.len(), ls.len());
                for (l, got) in ls.iter().zip(&many) {
                    let want = l.forward(&x, act).unwrap();
                    assert_eq!(got.dims(), want.dims());
                    assert_eq!(bits(got), bits(&want), "n {n} candle {candle} {act:?}");
                }
            }
        }
        let bad = Tensor::zeros((1, cols + 32), DType::F32, &Device::Cpu).unwrap();
        for act in [Activations::Exact, Activations::Q8] {
            assert!(Linear::forward_many(&[&ls[0], &ls[1]], &bad, act).is_err());
            assert!(ls[0].forward(&bad, act).is_err());
        }
    }

    #[test]
    fn block_embeddings_look_up_candle_rows_and_reject_bad_ids() {
        let mut rng = StdRng::seed_from_u64(5);
        let (rows, cols) = (10, 64);
        let (q, w) = weight(&mut rng, GgmlDType::Q8_0, rows, cols);
        let e = Embeddings::Blocks(Arc::new(BlockMatrix::from_qtensor(&q).unwrap().unwrap()));
        let f = Embeddings::F32(Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap());
        let ids = [3u32, 0, 9, 3];
        let a: Vec<f32> = e
            .lookup(&ids, &Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let b: Vec<f32> = f
            .lookup(&ids, &Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(a, b);
        assert!(matches!(
            e.lookup(&[1, 10], &Device::Cpu),
            Err(ModelError::TokenOutOfRange { id: 10, vocab: 10 })
        ));
    }

    #[test]
    fn mapped_matrices_read_their_range_and_refuse_ranges_outside_the_map() {
        let path = std::env::temp_dir().join(format!("kv-linear-map-{}", std::process::id()));
        let ty = WeightType::Block(BlockType::Q8_0);
        let mut bytes = vec![0u8; 4 + 2 * 34];
        bytes[4 + 34..4 + 36].copy_from_slice(&half::f16::from_f32(0.5).to_bits().to_le_bytes());
        bytes[4 + 36] = 6; // row 1, weight 0 = 0.5 * 6
        std::fs::write(&path, &bytes).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        // SAFETY: a private read-only map of a file this test alone writes.
        let map = Arc::new(unsafe { memmap2::Mmap::map(&file) }.unwrap());
        let m = BlockMatrix::mapped(ty, 2, 32, map.clone(), 4..4 + 68).unwrap();
        let mut row = vec![0f32; 32];
        m.dequantize_row(Kernels::best(), 1, &mut row);
        assert_eq!(row[0], 3.0);
        assert!(BlockMatrix::mapped(ty, 2, 32, map.clone(), 5..5 + 68).is_none());
        assert!(BlockMatrix::mapped(ty, 2, 32, map.clone(), 4..4 + 67).is_none());
        #[allow(clippy::reversed_empty_ranges)]
        let backwards = 68..4;
        assert!(BlockMatrix::mapped(ty, 0, 32, map, backwards).is_none());
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn new_rejects_data_of_the_wrong_size() {
        let ty = WeightType::Block(BlockType::Q4_1);
        assert!(BlockMatrix::new(ty, 2, 64, vec![0; 4 * 20]).is_some());
        assert!(BlockMatrix::new(ty, 2, 64, vec![0; 4 * 20 - 1]).is_none());
        assert!(BlockMatrix::new(ty, 2, 48, vec![0; 3 * 20]).is_none());
        assert!(BlockMatrix::new(ty, usize::MAX, 64, vec![]).is_none());
    }

    #[test]
    fn linear_forward_agrees_with_candle_f32_and_checks_shape() {
        let mut rng = StdRng::seed_from_u64(4);
        let (rows, cols, n) = (24, 64, 3);
        let (q, w) = weight(&mut rng, GgmlDType::Q4_1, rows, cols);
        let ours = Linear::Blocks(Arc::new(BlockMatrix::from_qtensor(&q).unwrap().unwrap()));
        let f32w = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
        let theirs = Linear::Candle(QMatMul::Tensor(f32w));
        let x = Tensor::from_vec(random(&mut rng, n * cols), (n, cols), &Device::Cpu).unwrap();
        let a: Vec<f32> = ours
            .forward(&x, Activations::Exact)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let b: Vec<f32> = theirs
            .forward(&x, Activations::Exact)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(a.len(), n * rows);
        for (a, b) in a.iter().zip(&b) {
            assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
        }
        let bad = Tensor::zeros((n, cols + 32), DType::F32, &Device::Cpu).unwrap();
        assert!(ours.forward(&bad, Activations::Exact).is_err());
        // A non-contiguous input (a transposed view) is copied, not misread.
        let xt = x.t().unwrap().contiguous().unwrap().t().unwrap();
        let c: Vec<f32> = ours
            .forward(&xt, Activations::Exact)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(a, c);
    }
}
