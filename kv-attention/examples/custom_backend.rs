//! A complete cache backend in plain Rust: K/V in two `Vec<f32>`, attention from the
//! provided default, and the conformance suite that proves it right.
//!
//! Run it with
//! `cargo run -p kv-attention --example custom_backend --features conformance`;
//! `docs/implementing-a-backend.md` walks through it. `cargo xtask test-all` runs it too.

use kv_core::candle::{DType, Device, Tensor};
use kv_core::{validate, BlockId, CacheBackend, KvDType, KvError, Result, Slot, StorageSpec};

/// Stores f32 rows in host memory. Everything a backend must get right is here; what it may
/// make faster (attention) is left to the trait's provided method.
#[derive(Debug, Clone)]
pub struct VecBackend {
    device: Device,
}

impl VecBackend {
    /// A backend on the CPU device, the only one whose tensors it can read in place.
    pub fn new() -> Self {
        Self {
            device: Device::Cpu,
        }
    }
}

impl Default for VecBackend {
    fn default() -> Self {
        Self::new()
    }
}

/// The pools: for K and for V, one f32 per element, laid out
/// `[layer][block][offset][kv_head][head_dim]`.
#[derive(Debug, Clone)]
pub struct VecStorage {
    spec: StorageSpec,
    k: Vec<f32>,
    v: Vec<f32>,
}

impl VecStorage {
    /// Elements of one token's row (all KV heads).
    fn row(&self) -> usize {
        self.spec.shape.n_kv_heads() * self.spec.shape.head_dim()
    }

    /// Where the row of `slot` in `layer` starts. The slot and layer were validated, so
    /// this stays inside the pools (their size was computed with checked arithmetic).
    fn at(&self, layer: usize, slot: Slot) -> usize {
        (layer * self.spec.capacity_tokens() + slot.flat(self.spec.block_size)) * self.row()
    }
}

/// A tensor's elements as row-major f32, whatever its dtype and strides.
fn to_f32(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

impl CacheBackend for VecBackend {
    type Storage = VecStorage;

    fn name(&self) -> &str {
        "vec"
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn supports(&self, dtype: KvDType) -> bool {
        dtype == KvDType::F32
    }

    fn allocate(&self, spec: &StorageSpec) -> Result<VecStorage> {
        if !self.supports(spec.dtype) {
            return Err(KvError::Unsupported {
                backend: self.name().into(),
                what: format!("the {} layout", spec.dtype),
            });
        }
        // layers x slots x kv_heads x head_dim, refused rather than wrapped when too large.
        let len = [
            spec.shape.n_layers(),
            spec.shape.n_kv_heads(),
            spec.shape.head_dim(),
        ]
        .into_iter()
        .try_fold(spec.capacity_tokens(), usize::checked_mul)
        .ok_or_else(|| KvError::InvalidArgument {
            what: "storage spec",
            detail: "the pools' element count overflows usize".into(),
        })?;
        let zeros = || -> Result<Vec<f32>> {
            let mut pool = Vec::new();
            pool.try_reserve_exact(len)
                .map_err(|e| KvError::BackendUnavailable {
                    backend: "vec",
                    reason: format!("cannot allocate {len} f32: {e}"),
                })?;
            pool.resize(len, 0.0);
            Ok(pool)
        };
        Ok(VecStorage {
            spec: *spec,
            k: zeros()?,
            v: zeros()?,
        })
    }

    fn spec<'a>(&self, storage: &'a VecStorage) -> &'a StorageSpec {
        &storage.spec
    }

    fn write(
        &self,
        storage: &mut VecStorage,
        layer: usize,
        slots: &[Slot],
        k: &Tensor,
        v: &Tensor,
    ) -> Result<()> {
        // Every check before the first store, so a refused write changes nothing.
        validate::write(&storage.spec, &self.device, layer, slots, k, v)?;
        let (k, v) = (to_f32(k)?, to_f32(v)?);
        validate::finite("k", &k)?;
        validate::finite("v", &v)?;
        let row = storage.row();
        for (i, &slot) in slots.iter().enumerate() {
            let at = storage.at(layer, slot);
            storage.k[at..at + row].copy_from_slice(&k[i * row..(i + 1) * row]);
            storage.v[at..at + row].copy_from_slice(&v[i * row..(i + 1) * row]);
        }
        Ok(())
    }

    // `attend` is the provided method: f64 attention over what `read` returns. A faster
    // backend overrides it, starting with `validate::attend`.

    fn copy_blocks(&self, storage: &mut VecStorage, moves: &[(BlockId, BlockId)]) -> Result<()> {
        validate::moves(&storage.spec, moves)?;
        let block = storage.spec.block_size * storage.row();
        let layer_len = storage.spec.num_blocks * block;
        // In the order given, one block at a time: chains and repeated sources just work.
        for layer in 0..storage.spec.shape.n_layers() {
            for &(from, to) in moves {
                let from = layer * layer_len + from.index() * block;
                let to = layer * layer_len + to.index() * block;
                storage.k.copy_within(from..from + block, to);
                storage.v.copy_within(from..from + block, to);
            }
        }
        Ok(())
    }

    fn read(&self, storage: &VecStorage, layer: usize, slots: &[Slot]) -> Result<(Tensor, Tensor)> {
        validate::layer(&storage.spec, layer)?;
        validate::slots(&storage.spec, slots)?;
        let row = storage.row();
        let (mut k, mut v) = (Vec::new(), Vec::new());
        for &slot in slots {
            let at = storage.at(layer, slot);
            k.extend_from_slice(&storage.k[at..at + row]);
            v.extend_from_slice(&storage.v[at..at + row]);
        }
        let shape = storage.spec.shape;
        let dims = (slots.len(), shape.n_kv_heads(), shape.head_dim());
        Ok((
            Tensor::from_vec(k, dims, &self.device)?,
            Tensor::from_vec(v, dims, &self.device)?,
        ))
    }
}

/// Runs the suite every backend runs; prints what it checked, or the first failure.
#[allow(dead_code)] // the tests that reuse this file bring their own `main`
fn main() -> std::process::ExitCode {
    match kv_attention::conformance::check(&VecBackend::new()) {
        Ok(report) => {
            print!("{report}");
            std::process::ExitCode::SUCCESS
        }
        Err(failure) => {
            eprintln!("{failure}");
            std::process::ExitCode::FAILURE
        }
    }
}
