//! The checked entry points of every row kernel, each run through the one dispatch of
//! [`crate::simd`] ([`Isa::run`]): a kernel is a value with a scalar body and one
//! width-generic SIMD body ([`simd::Kernel`]), declared below with [`kernel!`].

use crate::error::{checked_len, expect_len, QuantError, Result};
use crate::format::RowFormat;
use crate::kivi::KiviKeyFormat;
use crate::simd::{self, Isa, Simd};
use crate::{heads, kivi_kernels, rows, scalar};

/// Declares a kernel: a struct of its arguments and its [`simd::Kernel`] impl, whose two
/// bodies see the arguments by name.
macro_rules! kernel {
    ($name:ident { $($f:ident: $t:ty),* $(,)? } -> $out:ty;
     scalar => $scalar:expr;
     simd($s:ident) => $simd:expr;) => {
        struct $name<'a> {
            $($f: $t),*
        }
        impl simd::Kernel for $name<'_> {
            type Output = $out;
            #[inline]
            fn scalar(self) -> $out {
                let $name { $($f),* } = self;
                $scalar
            }
            #[inline(always)]
            fn simd<S: Simd>(self, $s: S) -> $out {
                let $name { $($f),* } = self;
                $simd
            }
        }
    };
}

/// The row kernels at one instruction-set level.
///
/// A `Kernels` value can only be made for a level this CPU runs ([`Kernels::new`] checks),
/// which is the invariant that makes its SIMD calls sound. The methods of [`RowFormat`] and
/// [`KiviKeyFormat`] use [`Kernels::best`]; hold a `Kernels` yourself to pin a level (tests,
/// benchmarks).
///
/// ```
/// use kv_quant::{Group, Isa, Kernels, RowFormat};
///
/// let fmt = RowFormat::Int8 { group: Group::G32 };
/// let k: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin()).collect();
/// let q: Vec<f32> = (0..64).map(|i| (i as f32 * 0.11).cos()).collect();
/// let mut row = vec![0u8; fmt.row_bytes(64)?];
/// fmt.quantize_row(&k, &mut row)?;
///
/// let reference = Kernels::new(Isa::Scalar)?.dot(fmt, &q, &row)?;
/// for isa in Isa::available() {
///     let got = Kernels::new(isa)?.dot(fmt, &q, &row)?;
///     assert!((got - reference).abs() <= 1e-4 * (1.0 + reference.abs()), "{isa}");
/// }
/// # Ok::<(), kv_quant::QuantError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kernels {
    isa: Isa,
}

impl Kernels {
    /// Kernels at `isa`.
    ///
    /// # Errors
    /// [`QuantError::IsaUnavailable`] if this CPU cannot run `isa`.
    pub fn new(isa: Isa) -> Result<Kernels> {
        if isa.is_available() {
            Ok(Kernels { isa })
        } else {
            Err(QuantError::IsaUnavailable { isa })
        }
    }

    /// Kernels at [`Isa::best`].
    pub fn best() -> Kernels {
        // `best` only ever returns an available level.
        Kernels { isa: Isa::best() }
    }

    /// The scalar reference kernels.
    pub const fn scalar() -> Kernels {
        Kernels { isa: Isa::Scalar }
    }

    /// The level these kernels run at.
    pub const fn isa(&self) -> Isa {
        self.isa
    }

    /// Stores `x` (one row, `x.len() == head_dim`) in `format` into `out`, without
    /// allocating. On error `out` is left unchanged: a rejected row is never half-written.
    ///
    /// Every level writes the same bytes (the SIMD quantizers replay the scalar
    /// arithmetic), so a cache filled on one machine reads the same on another.
    ///
    /// # Errors
    /// [`QuantError::InvalidHeadDim`] if `x.len()` does not fit `format`;
    /// [`QuantError::LengthMismatch`] if `out.len() != format.row_bytes(x.len())`;
    /// [`QuantError::NonFinite`] for a NaN or infinite element;
    /// [`QuantError::OutOfRange`] for an element the format cannot represent.
    pub fn quantize_row(&self, format: RowFormat, x: &[f32], out: &mut [u8]) -> Result<()> {
        format.check_row(x.len(), "out", out.len())?;
        self.isa.run(Quantize { format, x, out })
    }

    /// Writes the dequantized row into `out` (`out.len() == head_dim`).
    ///
    /// Every level produces the same values (`m + s * c` is rounded once on every path).
    ///
    /// # Errors
    /// [`QuantError::InvalidHeadDim`] / [`QuantError::LengthMismatch`] if `out.len()` does
    /// not fit `format` or `row.len() != format.row_bytes(out.len())`.
    pub fn dequantize_row(&self, format: RowFormat, row: &[u8], out: &mut [f32]) -> Result<()> {
        format.check_row(out.len(), "row", row.len())?;
        self.isa.run(Dequantize { format, row, out });
        Ok(())
    }

    /// Dequantizes consecutive rows of `head_dim` elements (`rows` holds `n` stored rows,
    /// `out` holds `n * head_dim` floats) in one call: the same values as
    /// [`dequantize_row`](Self::dequantize_row) on each row, without a dispatch per row,
    /// which dominates for short rows.
    ///
    /// ```
    /// use kv_quant::{Group, Kernels, RowFormat};
    /// let k = Kernels::best();
    /// let fmt = RowFormat::Int8 { group: Group::G32 };
    /// let mut rows = vec![0u8; 2 * fmt.row_bytes(32)?];
    /// let (a, b) = rows.split_at_mut(fmt.row_bytes(32)?);
    /// k.quantize_row(fmt, &[1.0; 32], a)?;
    /// k.quantize_row(fmt, &[-2.0; 32], b)?;
    /// let mut out = vec![0.0f32; 64];
    /// k.dequantize_rows(fmt, 32, &rows, &mut out)?;
    /// let mut second = vec![0.0f32; 32];
    /// k.dequantize_row(fmt, &rows[fmt.row_bytes(32)?..], &mut second)?;
    /// assert_eq!(&out[32..], &second[..]);
    /// assert!((out[0] - 1.0).abs() < 1e-2 && (out[63] + 2.0).abs() < 1e-2);
    /// # Ok::<(), kv_quant::QuantError>(())
    /// ```
    ///
    /// # Errors
    /// [`QuantError::InvalidHeadDim`] if `head_dim` does not fit `format`;
    /// [`QuantError::LengthMismatch`] if `rows` is not whole rows or `out` not as many rows.
    pub fn dequantize_rows(
        &self,
        format: RowFormat,
        head_dim: usize,
        rows: &[u8],
        out: &mut [f32],
    ) -> Result<()> {
        // Non-zero for every head_dim the format accepts.
        let rb = format.row_bytes(head_dim)?;
        let n = rows.len() / rb;
        crate::error::expect_len("rows", n * rb, rows.len())?;
        let out_len = crate::error::checked_len("out", n, head_dim)?;
        crate::error::expect_len("out", out_len, out.len())?;
        self.isa.run(DequantizeRows {
            format,
            rows,
            rb,
            out,
            head_dim,
        });
        Ok(())
    }

    /// `q · x̂`: the attention score of query `q` against a stored key row, computed from
    /// the stored bytes without materialising an f32 row.
    ///
    /// Levels differ only in summation order; the result is within
    /// `(head_dim + 4) * 2^-24 * sum |q[i] * x̂[i]|` of the exact dot product of `q` and the
    /// dequantized row.
    ///
    /// # Errors
    /// As [`dequantize_row`](Self::dequantize_row), with `q.len()` as `head_dim`.
    pub fn dot(&self, format: RowFormat, q: &[f32], row: &[u8]) -> Result<f32> {
        format.check_row(q.len(), "row", row.len())?;
        Ok(self.dot_unchecked(format, q, row))
    }

    fn dot_unchecked(&self, format: RowFormat, q: &[f32], row: &[u8]) -> f32 {
        self.isa.run(Dot { format, q, row })
    }

    /// `acc += w * x̂`: accumulates a stored value row weighted by its attention
    /// probability, without materialising an f32 row.
    ///
    /// Each element is within `2 * 2^-24 * (|acc[i]| + |w * x̂[i]|)` of the exact update.
    ///
    /// # Errors
    /// As [`dequantize_row`](Self::dequantize_row), with `acc.len()` as `head_dim`.
    pub fn axpy(&self, format: RowFormat, w: f32, row: &[u8], acc: &mut [f32]) -> Result<()> {
        format.check_row(acc.len(), "row", row.len())?;
        self.axpy_unchecked(format, w, row, acc);
        Ok(())
    }

    fn axpy_unchecked(&self, format: RowFormat, w: f32, row: &[u8], acc: &mut [f32]) {
        self.isa.run(Axpy {
            format,
            w,
            row,
            acc,
        })
    }

    /// Scores of `q` against `out.len()` rows stored back to back in `rows` (a paged block):
    /// `out[t] = q · x̂_t`. One argument check for the whole block.
    ///
    /// # Errors
    /// [`QuantError::InvalidHeadDim`] if `q.len()` does not fit `format`;
    /// [`QuantError::LengthMismatch`] unless `rows.len() == out.len() * row_bytes`.
    pub fn dot_many(
        &self,
        format: RowFormat,
        q: &[f32],
        rows: &[u8],
        out: &mut [f32],
    ) -> Result<()> {
        let rb = format.row_bytes(q.len())?;
        expect_len("rows", checked_len("rows", rb, out.len())?, rows.len())?;
        self.isa.run(DotMany {
            format,
            q,
            rows,
            rb,
            out,
        });
        Ok(())
    }

    /// `acc += sum_t weights[t] * x̂_t` over `weights.len()` rows stored back to back.
    ///
    /// # Errors
    /// [`QuantError::InvalidHeadDim`] if `acc.len()` does not fit `format`;
    /// [`QuantError::LengthMismatch`] unless `rows.len() == weights.len() * row_bytes`.
    pub fn axpy_many(
        &self,
        format: RowFormat,
        weights: &[f32],
        rows: &[u8],
        acc: &mut [f32],
    ) -> Result<()> {
        let rb = format.row_bytes(acc.len())?;
        expect_len("rows", checked_len("rows", rb, weights.len())?, rows.len())?;
        self.isa.run(AxpyMany {
            format,
            weights,
            rows,
            rb,
            acc,
        });
        Ok(())
    }

    /// Scores of several query rows against a run of stored rows, each row read once for
    /// all of them: `scores[h * stride + r] = q_h · x̂_r` for the `q.len() / head_dim`
    /// query rows `q_h` (the heads of a GQA group) and the `rows.len() / row_bytes` rows.
    /// A decode step with several query heads per KV head reads every key this way,
    /// unpacking it once in registers instead of once per head or into an f32 buffer.
    ///
    /// Each score has [`dot`](Self::dot)'s rounding bound. The quantized formats have
    /// multi-head kernels at every SIMD level; float
    /// formats score head by head with [`dot_many`](Self::dot_many).
    ///
    /// ```
    /// use kv_quant::{Group, Kernels, RowFormat};
    /// let k = Kernels::best();
    /// let fmt = RowFormat::Int8 { group: Group::G32 };
    /// let rb = fmt.row_bytes(32)?;
    /// let mut rows = vec![0u8; 3 * rb];
    /// for (r, row) in rows.chunks_exact_mut(rb).enumerate() {
    ///     k.quantize_row(fmt, &[r as f32; 32], row)?;
    /// }
    /// let q: Vec<f32> = [1.0f32, -0.5].iter().flat_map(|&v| [v; 32]).collect();
    /// let mut scores = [0.0f32; 2 * 4]; // 2 heads, stride 4
    /// k.dot_heads(fmt, 32, &q, &rows, &mut scores, 4)?;
    /// assert!((scores[2] - 64.0).abs() < 0.1 && (scores[4 + 2] + 32.0).abs() < 0.1);
    /// # Ok::<(), kv_quant::QuantError>(())
    /// ```
    ///
    /// # Errors
    /// [`QuantError::InvalidHeadDim`] if `head_dim` does not fit `format`;
    /// [`QuantError::LengthMismatch`] if `q` is not whole rows of `head_dim`, `rows` not
    /// whole stored rows, `stride` below the number of rows, or `scores` shorter than
    /// `(heads - 1) * stride + rows`.
    pub fn dot_heads(
        &self,
        format: RowFormat,
        head_dim: usize,
        q: &[f32],
        rows: &[u8],
        scores: &mut [f32],
        stride: usize,
    ) -> Result<()> {
        self.dot_heads_ahead(format, head_dim, q, rows, scores, stride, &[])
    }

    /// [`dot_heads`](Self::dot_heads), prefetching `ahead` (into L2, a cache line at a time
    /// as the rows are read): the bytes the caller reads next, typically the matching rows
    /// of the next tile. A decode step that streams the cache from memory keeps its
    /// requests in flight this way without a burst of them between calls. Any bytes will
    /// do (an empty slice for none); they do not change the result.
    ///
    /// ```
    /// use kv_quant::{Group, Kernels, RowFormat};
    /// let k = Kernels::best();
    /// let fmt = RowFormat::Int8 { group: Group::G32 };
    /// let rb = fmt.row_bytes(32)?;
    /// let mut rows = vec![0u8; 8 * rb];
    /// for (r, row) in rows.chunks_exact_mut(rb).enumerate() {
    ///     k.quantize_row(fmt, &[r as f32; 32], row)?;
    /// }
    /// let (now, next) = rows.split_at(4 * rb);
    /// let q = [0.5f32; 32];
    /// let mut scores = [0.0f32; 4];
    /// k.dot_heads_ahead(fmt, 32, &q, now, &mut scores, 4, next)?;
    /// assert!((scores[3] - 48.0).abs() < 0.1);
    /// # Ok::<(), kv_quant::QuantError>(())
    /// ```
    ///
    /// # Errors
    /// As [`dot_heads`](Self::dot_heads).
    #[allow(clippy::too_many_arguments)]
    pub fn dot_heads_ahead(
        &self,
        format: RowFormat,
        head_dim: usize,
        q: &[f32],
        rows: &[u8],
        scores: &mut [f32],
        stride: usize,
        ahead: &[u8],
    ) -> Result<()> {
        let (rb, heads, n) = check_heads(format, head_dim, "q", q.len(), rows, stride)?;
        if heads == 0 || n == 0 {
            return Ok(());
        }
        check_strided("scores", heads, stride, n, scores.len())?;
        self.isa.run(DotHeads {
            format,
            head_dim,
            q,
            rows,
            rb,
            n,
            scores,
            stride,
            ahead,
        });
        Ok(())
    }

    /// Weighted sums of a run of stored rows into several accumulators, each row read once
    /// for all of them: `acc_h += sum_r weights[h * stride + r] * x̂_r` for the
    /// `acc.len() / head_dim` accumulator rows `acc_h` and the `rows.len() / row_bytes`
    /// rows. The value side of [`dot_heads`](Self::dot_heads).
    ///
    /// Each update has [`axpy`](Self::axpy)'s rounding bound per row added.
    ///
    /// # Errors
    /// [`QuantError::InvalidHeadDim`] if `head_dim` does not fit `format`;
    /// [`QuantError::LengthMismatch`] if `acc` is not whole rows of `head_dim`, `rows` not
    /// whole stored rows, `stride` below the number of rows, or `weights` shorter than
    /// `(heads - 1) * stride + rows`.
    pub fn axpy_heads(
        &self,
        format: RowFormat,
        head_dim: usize,
        weights: &[f32],
        stride: usize,
        rows: &[u8],
        acc: &mut [f32],
    ) -> Result<()> {
        self.axpy_heads_ahead(format, head_dim, weights, stride, rows, acc, &[])
    }

    /// [`axpy_heads`](Self::axpy_heads), prefetching `ahead` as
    /// [`dot_heads_ahead`](Self::dot_heads_ahead) does.
    ///
    /// ```
    /// use kv_quant::{Group, Kernels, RowFormat};
    /// let k = Kernels::best();
    /// let fmt = RowFormat::Int8 { group: Group::G32 };
    /// let rb = fmt.row_bytes(32)?;
    /// let mut rows = vec![0u8; 4 * rb];
    /// for row in rows.chunks_exact_mut(rb) {
    ///     k.quantize_row(fmt, &[2.0; 32], row)?;
    /// }
    /// let (now, next) = rows.split_at(2 * rb);
    /// let mut acc = [0.0f32; 32];
    /// k.axpy_heads_ahead(fmt, 32, &[0.25, 0.5], 2, now, &mut acc, next)?;
    /// assert!((acc[0] - 1.5).abs() < 0.01); // 0.25 * 2 + 0.5 * 2, up to INT8 rounding
    /// # Ok::<(), kv_quant::QuantError>(())
    /// ```
    ///
    /// # Errors
    /// As [`axpy_heads`](Self::axpy_heads).
    #[allow(clippy::too_many_arguments)]
    pub fn axpy_heads_ahead(
        &self,
        format: RowFormat,
        head_dim: usize,
        weights: &[f32],
        stride: usize,
        rows: &[u8],
        acc: &mut [f32],
        ahead: &[u8],
    ) -> Result<()> {
        let (rb, heads, n) = check_heads(format, head_dim, "acc", acc.len(), rows, stride)?;
        if heads == 0 || n == 0 {
            return Ok(());
        }
        check_strided("weights", heads, stride, n, weights.len())?;
        self.isa.run(AxpyHeads {
            format,
            head_dim,
            weights,
            stride,
            rows,
            rb,
            n,
            acc,
            ahead,
        });
        Ok(())
    }

    /// Scores of `q` against every key of a quantized KIVI block:
    /// `out[t] = q · k̂_t` for `t < format.block_tokens`. See [`KiviKeyFormat::scores`].
    ///
    /// # Errors
    /// [`QuantError::InvalidHeadDim`] / [`QuantError::InvalidBlockTokens`] for a shape the
    /// format rejects; [`QuantError::LengthMismatch`] if `block` or `out` has the wrong
    /// length.
    pub fn kivi_scores(
        &self,
        format: KiviKeyFormat,
        q: &[f32],
        block: &[u8],
        out: &mut [f32],
    ) -> Result<()> {
        format.check_block(q.len(), block.len())?;
        expect_len("out", format.block_tokens, out.len())?;
        self.isa.run(KiviScores {
            format,
            q,
            block,
            out,
        });
        Ok(())
    }

    /// Scores of several query rows against every key of a quantized KIVI block, each
    /// token's codes unpacked once for all of them: `scores[h * stride + t] = q_h · k̂_t`
    /// for the `q.len() / head_dim` query rows and `t < format.block_tokens`. The
    /// multi-head form of [`kivi_scores`](Self::kivi_scores), with its rounding bound.
    ///
    /// # Errors
    /// [`QuantError::InvalidHeadDim`] / [`QuantError::InvalidBlockTokens`] for a shape the
    /// format rejects; [`QuantError::LengthMismatch`] if `q` is not whole rows of
    /// `head_dim`, `block` has the wrong length, `stride` is below `block_tokens`, or
    /// `scores` is shorter than `(heads - 1) * stride + block_tokens`.
    pub fn kivi_scores_heads(
        &self,
        format: KiviKeyFormat,
        head_dim: usize,
        q: &[f32],
        block: &[u8],
        scores: &mut [f32],
        stride: usize,
    ) -> Result<()> {
        self.kivi_scores_heads_ahead(format, head_dim, q, block, scores, stride, &[])
    }

    /// [`kivi_scores_heads`](Self::kivi_scores_heads), prefetching `ahead` (into L2) spread
    /// over the tokens' codes as they are read, all of it by the last token: a decode step
    /// scoring a quantized key block asks this way for bytes it reads later (f16 rows of a
    /// residual window, several times the block's size) without a burst of requests
    /// between calls. Any bytes will do (an empty slice for none); they do not change the
    /// result.
    ///
    /// ```
    /// use kv_quant::{Kernels, KiviBits, KiviKeyFormat};
    /// let k = Kernels::best();
    /// let fmt = KiviKeyFormat::new(KiviBits::B4, 32);
    /// let keys: Vec<f32> = (0..32 * 32).map(|i| (i % 7) as f32).collect();
    /// let mut block = vec![0u8; fmt.block_bytes(32)?];
    /// fmt.quantize_block(&keys, 32, &mut block)?;
    /// let later = vec![0u8; 8192]; // what the caller reads next
    /// let q = [1.0f32; 32];
    /// let mut scores = [0.0f32; 32];
    /// k.kivi_scores_heads_ahead(fmt, 32, &q, &block, &mut scores, 32, &later)?;
    /// let mut plain = [0.0f32; 32];
    /// k.kivi_scores_heads(fmt, 32, &q, &block, &mut plain, 32)?;
    /// assert_eq!(scores, plain); // the same scores, only asked for `later` besides
    /// # Ok::<(), kv_quant::QuantError>(())
    /// ```
    ///
    /// # Errors
    /// As [`kivi_scores_heads`](Self::kivi_scores_heads).
    #[allow(clippy::too_many_arguments)]
    pub fn kivi_scores_heads_ahead(
        &self,
        format: KiviKeyFormat,
        head_dim: usize,
        q: &[f32],
        block: &[u8],
        scores: &mut [f32],
        stride: usize,
        ahead: &[u8],
    ) -> Result<()> {
        format.check_block(head_dim, block.len())?;
        let (heads, n) = (q.len() / head_dim, format.block_tokens);
        expect_len("q", heads * head_dim, q.len())?;
        if stride < n {
            return Err(QuantError::LengthMismatch {
                what: "stride (at least the block's tokens)",
                expected: n,
                got: stride,
            });
        }
        if heads == 0 {
            return Ok(());
        }
        check_strided("scores", heads, stride, n, scores.len())?;
        self.isa.run(KiviScoresHeads {
            format,
            head_dim,
            q,
            block,
            n,
            scores,
            stride,
            ahead,
        });
        Ok(())
    }
}

kernel!(Quantize { format: RowFormat, x: &'a [f32], out: &'a mut [u8] } -> Result<()>;
    scalar => scalar::quantize(format, x, out);
    simd(s) => crate::encode::quantize(s, format, x, out);
);

kernel!(Dequantize { format: RowFormat, row: &'a [u8], out: &'a mut [f32] } -> ();
    scalar => scalar::dequantize(format, row, out);
    simd(s) => rows::dequantize(s, format, row, out);
);

kernel!(DequantizeRows {
    format: RowFormat, rows: &'a [u8], rb: usize, out: &'a mut [f32], head_dim: usize,
} -> ();
    scalar => {
        for (row, dst) in rows.chunks_exact(rb).zip(out.chunks_exact_mut(head_dim)) {
            scalar::dequantize(format, row, dst);
        }
    };
    simd(s) => rows::dequantize_rows(s, format, rows, rb, out, head_dim);
);

kernel!(Dot { format: RowFormat, q: &'a [f32], row: &'a [u8] } -> f32;
    scalar => scalar::dot(format, q, row);
    simd(s) => rows::dot(s, format, q, row);
);

kernel!(Axpy { format: RowFormat, w: f32, row: &'a [u8], acc: &'a mut [f32] } -> ();
    scalar => scalar::axpy(format, w, row, acc);
    simd(s) => rows::axpy(s, format, w, row, acc);
);

kernel!(DotMany {
    format: RowFormat, q: &'a [f32], rows: &'a [u8], rb: usize, out: &'a mut [f32],
} -> ();
    scalar => {
        for (o, row) in out.iter_mut().zip(rows.chunks_exact(rb)) {
            *o = scalar::dot(format, q, row);
        }
    };
    simd(s) => rows::dot_many(s, format, q, rows, rb, out);
);

kernel!(AxpyMany {
    format: RowFormat, weights: &'a [f32], rows: &'a [u8], rb: usize, acc: &'a mut [f32],
} -> ();
    scalar => {
        for (&w, row) in weights.iter().zip(rows.chunks_exact(rb)) {
            scalar::axpy(format, w, row, acc);
        }
    };
    simd(s) => rows::axpy_many(s, format, weights, rows, rb, acc);
);

/// The portable multi-head scores: head by head, row by row.
#[allow(clippy::too_many_arguments)]
fn dot_heads_scalar(
    format: RowFormat,
    head_dim: usize,
    q: &[f32],
    rows: &[u8],
    rb: usize,
    n: usize,
    scores: &mut [f32],
    stride: usize,
) {
    for (h, qh) in q.chunks_exact(head_dim).enumerate() {
        let out = &mut scores[h * stride..][..n];
        for (o, row) in out.iter_mut().zip(rows.chunks_exact(rb)) {
            *o = scalar::dot(format, qh, row);
        }
    }
}

/// The portable multi-head weighted sums: head by head, row by row.
#[allow(clippy::too_many_arguments)]
fn axpy_heads_scalar(
    format: RowFormat,
    head_dim: usize,
    weights: &[f32],
    stride: usize,
    rows: &[u8],
    rb: usize,
    n: usize,
    acc: &mut [f32],
) {
    for (h, ah) in acc.chunks_exact_mut(head_dim).enumerate() {
        let w = &weights[h * stride..][..n];
        for (&wr, row) in w.iter().zip(rows.chunks_exact(rb)) {
            scalar::axpy(format, wr, row, ah);
        }
    }
}

/// The portable KIVI scores: head by head.
fn kivi_heads_scalar(
    format: KiviKeyFormat,
    head_dim: usize,
    q: &[f32],
    block: &[u8],
    n: usize,
    scores: &mut [f32],
    stride: usize,
) {
    for (h, qh) in q.chunks_exact(head_dim).enumerate() {
        crate::kivi::scores_reference(format, qh, block, &mut scores[h * stride..][..n]);
    }
}

kernel!(DotHeads {
    format: RowFormat, head_dim: usize, q: &'a [f32], rows: &'a [u8], rb: usize, n: usize,
    scores: &'a mut [f32], stride: usize, ahead: &'a [u8],
} -> ();
    // The portable kernels leave prefetching to the hardware.
    scalar => {
        let _ = ahead;
        dot_heads_scalar(format, head_dim, q, rows, rb, n, scores, stride)
    };
    // `n` is implied by `rows` and `rb` for the SIMD kernels.
    simd(s) => {
        let _ = n;
        heads::dot_heads(s, format, head_dim, q, rows, rb, scores, stride, ahead)
    };
);

kernel!(AxpyHeads {
    format: RowFormat, head_dim: usize, weights: &'a [f32], stride: usize, rows: &'a [u8],
    rb: usize, n: usize, acc: &'a mut [f32], ahead: &'a [u8],
} -> ();
    scalar => {
        let _ = ahead;
        axpy_heads_scalar(format, head_dim, weights, stride, rows, rb, n, acc)
    };
    simd(s) => {
        let _ = n;
        heads::axpy_heads(s, format, head_dim, weights, stride, rows, rb, acc, ahead)
    };
);

kernel!(KiviScores { format: KiviKeyFormat, q: &'a [f32], block: &'a [u8], out: &'a mut [f32] } -> ();
    scalar => crate::kivi::scores_reference(format, q, block, out);
    simd(s) => kivi_kernels::kivi_scores(s, format.bits, q, block, out);
);

kernel!(KiviScoresHeads {
    format: KiviKeyFormat, head_dim: usize, q: &'a [f32], block: &'a [u8], n: usize,
    scores: &'a mut [f32], stride: usize, ahead: &'a [u8],
} -> ();
    // The portable kernels leave prefetching to the hardware.
    scalar => {
        let _ = ahead;
        kivi_heads_scalar(format, head_dim, q, block, n, scores, stride)
    };
    simd(s) => kivi_kernels::kivi_scores_heads(
        s, format.bits, head_dim, q, block, n, scores, stride, ahead,
    );
);

/// Checks the shape of a multi-head call: `per_head_len` is whole rows of `head_dim`,
/// `rows` whole stored rows, `stride` at least their number. Returns (row bytes, heads,
/// rows).
fn check_heads(
    format: RowFormat,
    head_dim: usize,
    what: &'static str,
    per_head_len: usize,
    rows: &[u8],
    stride: usize,
) -> Result<(usize, usize, usize)> {
    // Non-zero for every head_dim the format accepts.
    let rb = format.row_bytes(head_dim)?;
    let (heads, n) = (per_head_len / head_dim, rows.len() / rb);
    expect_len(what, heads * head_dim, per_head_len)?;
    expect_len("rows", n * rb, rows.len())?;
    if stride < n {
        return Err(QuantError::LengthMismatch {
            what: "stride (at least the number of rows)",
            expected: n,
            got: stride,
        });
    }
    Ok((rb, heads, n))
}

/// `Err(LengthMismatch)` unless `len` holds `heads` rows of `n` at `stride`.
fn check_strided(
    what: &'static str,
    heads: usize,
    stride: usize,
    n: usize,
    len: usize,
) -> Result<()> {
    let need = checked_len(what, heads - 1, stride)?
        .checked_add(n)
        .ok_or_else(|| QuantError::LengthOverflow {
            what,
            detail: format!("{} x {stride} + {n}", heads - 1),
        })?;
    if len < need {
        return Err(QuantError::LengthMismatch {
            what,
            expected: need,
            got: len,
        });
    }
    Ok(())
}

/// The main entry points, at [`Isa::best`].
///
/// ```
/// use kv_quant::{Group, RowFormat};
///
/// let fmt = RowFormat::Int4 { group: Group::G32 };
/// let head_dim = 64;
/// let k: Vec<f32> = (0..head_dim).map(|i| (i as f32 * 0.7).sin()).collect();
/// let q: Vec<f32> = (0..head_dim).map(|i| (i as f32 * 0.3).cos()).collect();
///
/// // Quantize into caller-owned bytes: no allocation on the hot path.
/// let mut row = vec![0u8; fmt.row_bytes(head_dim)?];
/// fmt.quantize_row(&k, &mut row)?;
///
/// // Fused kernels read the bytes directly.
/// let score = fmt.dot(&q, &row)?;
/// let mut acc = vec![0.0f32; head_dim];
/// fmt.axpy(0.5, &row, &mut acc)?;
///
/// // Every element is within the format's documented bound.
/// let mut k_hat = vec![0.0f32; head_dim];
/// fmt.dequantize_row(&row, &mut k_hat)?;
/// let bound = fmt.error_bound(&row)?;
/// assert!(k.iter().zip(&k_hat).all(|(a, b)| f64::from((a - b).abs()) <= bound));
/// let exact: f32 = q.iter().zip(&k_hat).map(|(a, b)| a * b).sum();
/// assert!((score - exact).abs() < 1e-4);
///
/// // NaN is rejected with a typed error, and nothing is stored.
/// let mut bad = k.clone();
/// bad[5] = f32::NAN;
/// let before = row.clone();
/// assert!(matches!(
///     fmt.quantize_row(&bad, &mut row),
///     Err(kv_quant::QuantError::NonFinite { index: 5, .. })
/// ));
/// assert_eq!(row, before);
/// # Ok::<(), kv_quant::QuantError>(())
/// ```
impl RowFormat {
    /// [`Kernels::quantize_row`] at the best level.
    ///
    /// # Errors
    /// See [`Kernels::quantize_row`].
    pub fn quantize_row(self, x: &[f32], out: &mut [u8]) -> Result<()> {
        Kernels::best().quantize_row(self, x, out)
    }

    /// [`Kernels::dequantize_row`] at the best level.
    ///
    /// # Errors
    /// See [`Kernels::dequantize_row`].
    pub fn dequantize_row(self, row: &[u8], out: &mut [f32]) -> Result<()> {
        Kernels::best().dequantize_row(self, row, out)
    }

    /// [`Kernels::dot`] at the best level.
    ///
    /// # Errors
    /// See [`Kernels::dot`].
    pub fn dot(self, q: &[f32], row: &[u8]) -> Result<f32> {
        Kernels::best().dot(self, q, row)
    }

    /// [`Kernels::axpy`] at the best level.
    ///
    /// # Errors
    /// See [`Kernels::axpy`].
    pub fn axpy(self, w: f32, row: &[u8], acc: &mut [f32]) -> Result<()> {
        Kernels::best().axpy(self, w, row, acc)
    }

    /// [`Kernels::dot_many`] at the best level.
    ///
    /// # Errors
    /// See [`Kernels::dot_many`].
    pub fn dot_many(self, q: &[f32], rows: &[u8], out: &mut [f32]) -> Result<()> {
        Kernels::best().dot_many(self, q, rows, out)
    }

    /// [`Kernels::axpy_many`] at the best level.
    ///
    /// # Errors
    /// See [`Kernels::axpy_many`].
    pub fn axpy_many(self, weights: &[f32], rows: &[u8], acc: &mut [f32]) -> Result<()> {
        Kernels::best().axpy_many(self, weights, rows, acc)
    }

    /// The largest possible |x - x̂| of any element stored in `row`, from the bounds in
    /// [`crate::layout`] evaluated with the row's stored scales (f16/bf16: half an ulp of the
    /// largest stored value; f32: 0). Conformance tests derive their tolerances from this
    /// instead of guessing.
    ///
    /// # Errors
    /// [`QuantError::LengthMismatch`] if `row.len()` is not a whole number of groups (or
    /// elements) of the format.
    pub fn error_bound(self, row: &[u8]) -> Result<f64> {
        let head_dim = self.head_dim_of(row.len())?;
        self.validate(head_dim)?;
        Ok(scalar::error_bound(self, row))
    }
}
