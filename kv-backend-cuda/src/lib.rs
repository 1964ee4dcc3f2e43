//! The CUDA backend of the kv cache.
//!
//! Not implemented yet: the crate exports the names the real backend will have, so engines
//! can be written against them, and [`CudaBackend::new`] returns
//! [`KvError::BackendUnavailable`] saying so. The `cuda` feature is reserved for the real
//! backend and is a compile error until its kernels exist.
//!
//! ```
//! match kv_backend_cuda::CudaBackend::new(0) {
//!     Ok(backend) => println!("using {}", kv_core::CacheBackend::name(&backend)),
//!     Err(e) => println!("no CUDA: {e}"),
//! }
//! ```
#![forbid(unsafe_code)]

#[cfg(feature = "cuda")]
compile_error!(
    "the CUDA kernels of kv-backend-cuda are not written yet; build without the `cuda` feature \
     (the crate then compiles a backend that reports itself unavailable)"
);

use kv_core::candle::{Device, Tensor};
use kv_core::{AttentionBatch, BlockId, CacheBackend, KvDType, KvError, Result, Slot, StorageSpec};

/// A KV cache on an NVIDIA GPU.
#[derive(Debug)]
pub struct CudaBackend {
    device: Device,
}

/// Block pools in GPU memory.
#[derive(Debug)]
pub struct CudaStorage {
    spec: StorageSpec,
}

const NOT_BUILT: &str = "the CUDA backend is not implemented yet; use the CPU backend";

impl CudaBackend {
    /// Opens GPU `ordinal`.
    ///
    /// # Errors
    /// [`KvError::BackendUnavailable`]: this build has no CUDA support, or no such GPU.
    pub fn new(ordinal: usize) -> Result<Self> {
        let _ = ordinal;
        Err(KvError::BackendUnavailable {
            backend: "cuda",
            reason: NOT_BUILT.into(),
        })
    }

    fn unavailable<T>(&self) -> Result<T> {
        Err(KvError::BackendUnavailable {
            backend: "cuda",
            reason: NOT_BUILT.into(),
        })
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
        self.unavailable()
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
        self.unavailable()
    }
    fn attend(&self, _: &CudaStorage, _: usize, _: &Tensor, _: &AttentionBatch) -> Result<Tensor> {
        self.unavailable()
    }
    fn copy_blocks(&self, _: &mut CudaStorage, _: &[(BlockId, BlockId)]) -> Result<()> {
        self.unavailable()
    }
    fn read(&self, _: &CudaStorage, _: usize, _: &[Slot]) -> Result<(Tensor, Tensor)> {
        self.unavailable()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn creation_says_the_backend_is_not_implemented() {
        let err = super::CudaBackend::new(0).expect_err("no CUDA backend yet");
        let msg = err.to_string();
        assert!(msg.contains("not implemented yet"), "{msg}");
    }
}
