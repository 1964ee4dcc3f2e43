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

/// Bytes the kernels prefetch while they read others: the rows the caller reads next,
/// requested a cache line at a time in step with the rows read, so that the requests
/// spread over the computation instead of queueing all at once.
pub(crate) struct Prefetch<'a> {
    ahead: &'a [u8],
    /// Offset in `ahead` of the next line to request (after the first, a line boundary).
    next: usize,
}

impl<'a> Prefetch<'a> {
    pub(crate) fn new(ahead: &'a [u8]) -> Self {
        Self { ahead, next: 0 }
    }

    /// Requests the lines of the next `bytes` bytes of `ahead` not yet requested, into L2.
    #[inline(always)]
    pub(crate) fn bytes(&mut self, bytes: usize) {
        const LINE: usize = 64;
        let end = (self.next + bytes).min(self.ahead.len());
        let misalign = self.ahead.as_ptr() as usize % LINE;
        while self.next < end {
            // SAFETY: `next < ahead.len()`, so the address is inside `ahead`; a prefetch
            // neither reads the value nor faults, and SSE is part of the x86-64 baseline.
            unsafe {
                core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T1 }>(
                    self.ahead.as_ptr().add(self.next).cast(),
                )
            };
            // The next line boundary of the data (its first line may start mid-line).
            self.next = ((self.next + misalign) / LINE + 1) * LINE - misalign;
        }
    }
}
