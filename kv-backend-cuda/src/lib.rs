//! The CUDA backend of the kv cache.
//!
//! Built without the `cuda` feature (the default), this crate still compiles and exports
//! the same names, but [`CudaBackend::new`] returns [`KvError::BackendUnavailable`] saying
//! how to get the real one. The kernels are written in CUDA C and compiled at run time with
//! NVRTC when the feature is on.
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

const NOT_BUILT: &str = "kv-backend-cuda was built without the `cuda` feature; rebuild with \
                         `--features kv-backend-cuda/cuda` on a machine with the CUDA toolkit";

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
    fn without_the_feature_creation_says_why() {
        let err = super::CudaBackend::new(0).expect_err("built without cuda");
        let msg = err.to_string();
        assert!(msg.contains("without the `cuda` feature"), "{msg}");
    }
}
