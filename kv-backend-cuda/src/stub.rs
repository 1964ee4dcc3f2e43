//! The backend as built without the `cuda` feature: the same names, and a constructor that
//! says how to get the real one (as candle's dummy CUDA backend does).

use kv_core::candle::{Device, Tensor};
use kv_core::{AttentionBatch, BlockId, CacheBackend, KvDType, KvError, Result, Slot, StorageSpec};

/// A KV cache on an NVIDIA GPU (this build has no CUDA support: see [`CudaBackend::new`]).
#[derive(Debug)]
pub struct CudaBackend {
    device: Device,
}

/// Block pools in GPU memory (never built without the `cuda` feature).
#[derive(Debug)]
pub struct CudaStorage {
    spec: StorageSpec,
}

const NOT_BUILT: &str = "this build of kv-backend-cuda has no CUDA support; rebuild with \
     `--features cuda` (a CUDA 13 toolchain: `cargo xtask cuda-setup`) or use the CPU backend";

fn unavailable<T>() -> Result<T> {
    Err(KvError::BackendUnavailable {
        backend: "cuda",
        reason: NOT_BUILT.into(),
    })
}

impl CudaBackend {
    /// Opens GPU `ordinal`: without the `cuda` feature, always an error.
    ///
    /// # Errors
    /// [`KvError::BackendUnavailable`], saying how to build the real backend.
    pub fn new(ordinal: usize) -> Result<Self> {
        let _ = ordinal;
        let _ = CudaBackend {
            device: Device::Cpu,
        };
        unavailable()
    }
}

impl CacheBackend for CudaBackend {
    type Storage = CudaStorage;

    fn name(&self) -> &str {
        "cuda"
    }
    fn device(&self) -> &Device {
        &self.device
    }
    fn supports(&self, _dtype: KvDType) -> bool {
        false
    }
    fn allocate(&self, _spec: &StorageSpec) -> Result<CudaStorage> {
        unavailable()
    }
    fn spec<'a>(&self, storage: &'a CudaStorage) -> &'a StorageSpec {
        &storage.spec
    }
    fn write(
        &self,
        _: &mut CudaStorage,
        _: usize,
        _: &[Slot],
        _: &Tensor,
        _: &Tensor,
    ) -> Result<()> {
        unavailable()
    }
    fn attend(&self, _: &CudaStorage, _: usize, _: &Tensor, _: &AttentionBatch) -> Result<Tensor> {
        unavailable()
    }
    fn copy_blocks(&self, _: &mut CudaStorage, _: &[(BlockId, BlockId)]) -> Result<()> {
        unavailable()
    }
    fn read(&self, _: &CudaStorage, _: usize, _: &[Slot]) -> Result<(Tensor, Tensor)> {
        unavailable()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn creation_says_how_to_get_the_real_backend() {
        let err = super::CudaBackend::new(0).expect_err("no CUDA in this build");
        let msg = err.to_string();
        assert!(msg.contains("--features cuda"), "{msg}");
        assert!(matches!(
            err,
            kv_core::KvError::BackendUnavailable {
                backend: "cuda",
                ..
            }
        ));
    }
}
