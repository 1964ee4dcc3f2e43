//! The conformance suite tests itself: the plain backend of `examples/custom_backend.rs`
//! passes it, and each deliberately broken variant fails it with a message that names the
//! fault.

#[path = "../examples/custom_backend.rs"]
mod custom_backend;

use custom_backend::{VecBackend, VecStorage};
use kv_attention::conformance::{self, Config, ConformanceFailure};
use kv_core::candle::{Device, Tensor};
use kv_core::{
    AttentionBatch, BlockId, CacheBackend, KvDType, Result, SeqAttention, Slot, StorageSpec,
};

/// One bug each, injected around the correct backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// Each query also sees the token after its own (when the blocks hold one).
    CausalOffByOne,
    /// Query head `h` reads KV head `h % kv_heads` instead of `h / group`.
    GqaModulo,
    /// `copy_blocks` copies `to` into `from`.
    CopyBackwards,
    /// `write` stores row by row, so a bad slot or value after good ones leaves them written.
    PartialWrite,
    /// The sliding window is off by one: a query also sees the key just before its window.
    WindowOffByOne,
}

struct Broken {
    inner: VecBackend,
    fault: Fault,
    name: String,
}

impl Broken {
    fn new(fault: Fault) -> Self {
        Self {
            inner: VecBackend::new(),
            fault,
            name: format!("vec with {fault:?}"),
        }
    }
}

impl CacheBackend for Broken {
    type Storage = VecStorage;
    fn name(&self) -> &str {
        &self.name
    }
    fn device(&self) -> &Device {
        self.inner.device()
    }
    fn supports(&self, dtype: KvDType) -> bool {
        self.inner.supports(dtype)
    }
    fn allocate(&self, spec: &StorageSpec) -> Result<VecStorage> {
        self.inner.allocate(spec)
    }
    fn spec<'a>(&self, storage: &'a VecStorage) -> &'a StorageSpec {
        self.inner.spec(storage)
    }
    fn write(
        &self,
        storage: &mut VecStorage,
        layer: usize,
        slots: &[Slot],
        k: &Tensor,
        v: &Tensor,
    ) -> Result<()> {
        if self.fault != Fault::PartialWrite {
            return self.inner.write(storage, layer, slots, k, v);
        }
        // Shapes are still checked up front (else the rows below could not be cut), but each
        // row is then stored before the next is looked at.
        kv_core::validate::layer(self.spec(storage), layer)?;
        if k.dims().first() != Some(&slots.len()) || v.dims().first() != Some(&slots.len()) {
            return self.inner.write(storage, layer, slots, k, v);
        }
        for (i, slot) in slots.iter().enumerate() {
            let (k, v) = (k.narrow(0, i, 1)?, v.narrow(0, i, 1)?);
            self.inner.write(storage, layer, &[*slot], &k, &v)?;
        }
        Ok(())
    }
    fn attend(
        &self,
        storage: &VecStorage,
        layer: usize,
        q: &Tensor,
        batch: &AttentionBatch,
    ) -> Result<Tensor> {
        let bs = self.spec(storage).block_size;
        match self.fault {
            Fault::WindowOffByOne => {
                let mut wider = batch.clone();
                wider.window = batch.window.and_then(|w| w.checked_add(1));
                self.inner.attend(storage, layer, q, &wider)
            }
            Fault::CausalOffByOne => {
                let mut wider = batch.clone();
                for seq in &mut wider.seqs {
                    if seq.blocks().len() * bs > seq.kv_len() {
                        *seq = SeqAttention::new(
                            seq.blocks().to_vec(),
                            seq.kv_len() + 1,
                            seq.n_queries(),
                        )?;
                    }
                }
                self.inner.attend(storage, layer, q, &wider)
            }
            Fault::GqaModulo => {
                // Query head h must read KV head h / g; this one reads h % kv. Run the correct
                // kernel on heads permuted so that position p(h) = (h % kv) * g + h / kv
                // holds head h: the kernel then pairs it with KV head h % kv.
                kv_core::validate::attend(self.spec(storage), self.device(), layer, q, batch)?;
                let shape = self.spec(storage).shape;
                let (qh, kvh) = (shape.n_q_heads(), shape.n_kv_heads());
                let g = qh / kvh;
                let perm: Vec<u32> = (0..qh).map(|h| ((h % kvh) * g + h / kvh) as u32).collect();
                let mut inverse = vec![0u32; qh];
                for (h, &p) in perm.iter().enumerate() {
                    inverse[p as usize] = h as u32;
                }
                let index = |v: &[u32]| Tensor::new(v, q.device());
                let permuted = q.index_select(&index(&inverse)?, 1)?;
                let out = self.inner.attend(storage, layer, &permuted, batch)?;
                Ok(out.index_select(&index(&perm)?, 1)?)
            }
            _ => self.inner.attend(storage, layer, q, batch),
        }
    }
    fn copy_blocks(&self, storage: &mut VecStorage, moves: &[(BlockId, BlockId)]) -> Result<()> {
        if self.fault == Fault::CopyBackwards {
            let swapped: Vec<(BlockId, BlockId)> = moves.iter().map(|&(a, b)| (b, a)).collect();
            return self.inner.copy_blocks(storage, &swapped);
        }
        self.inner.copy_blocks(storage, moves)
    }
    fn read(&self, storage: &VecStorage, layer: usize, slots: &[Slot]) -> Result<(Tensor, Tensor)> {
        self.inner.read(storage, layer, slots)
    }
}

/// Few random cases: every fault below is caught by a fixed check before them.
fn quick() -> Config {
    Config {
        random_cases: 4,
        ..Config::default()
    }
}

fn failure_of(fault: Fault) -> ConformanceFailure {
    match conformance::check_with(&Broken::new(fault), &quick()) {
        Ok(report) => panic!("{fault:?} passed the suite:\n{report}"),
        Err(failure) => failure,
    }
}

#[test]
fn the_plain_backend_conforms() {
    let report = conformance::check(&VecBackend::new()).unwrap_or_else(|f| panic!("{f}"));
    assert_eq!(report.dtypes.len(), 1, "{report}");
    assert_eq!(report.dtypes[0].dtype, KvDType::F32);
    assert_eq!(report.skipped.len(), KvDType::ALL.len() - 1, "{report}");
    let checks = &report.dtypes[0].checks;
    for check in [
        "copy_blocks",
        "errors",
        "causal mask",
        "head mapping",
        "sliding window",
    ] {
        assert!(checks.contains(&check), "{check}: {report}");
    }
}

#[test]
fn an_off_by_one_causal_mask_fails_and_is_named() {
    let f = failure_of(Fault::CausalOffByOne);
    assert_eq!(f.check, "causal mask", "{f}");
    assert!(
        f.detail.contains("position 0 ")
            && f.detail.contains("as if it saw 2 tokens")
            && f.detail.contains("none after it"),
        "{f}"
    );
}

#[test]
fn a_wrong_gqa_mapping_fails_and_is_named() {
    let f = failure_of(Fault::GqaModulo);
    assert_eq!(f.check, "head mapping", "{f}");
    // 6 query heads over 2 KV heads: head 1 belongs to KV head 0, h % 2 reads KV head 1.
    assert!(
        f.detail.contains("query head 1 read KV head 1") && f.detail.contains("expected KV head 0"),
        "{f}"
    );
}

#[test]
fn a_copy_in_the_wrong_direction_fails_and_is_named() {
    let f = failure_of(Fault::CopyBackwards);
    assert_eq!(f.check, "copy_blocks", "{f}");
    assert!(f.detail.contains("wrong direction"), "{f}");
}

#[test]
fn a_partial_write_on_error_fails_and_is_named() {
    let f = failure_of(Fault::PartialWrite);
    assert_eq!(f.check, "errors", "{f}");
    assert!(f.detail.contains("failed but changed the storage"), "{f}");
}

#[test]
fn a_window_off_by_one_fails_and_is_named() {
    let f = failure_of(Fault::WindowOffByOne);
    assert_eq!(f.check, "sliding window", "{f}");
    // Window 1 at position 1 of the prefill: the query saw positions 0..=1, not 1..=1.
    assert!(
        f.detail.contains("window of 1 the query at position 1 ")
            && f.detail.contains("saw positions 0.0..=1"),
        "{f}"
    );
}
