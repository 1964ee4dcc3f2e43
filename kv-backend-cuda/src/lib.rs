//! The CUDA backend of the kv cache: block pools in GPU memory and paged attention in CUDA
//! kernels, behind the same [`CacheBackend`] trait as the CPU backend.
//!
//! With the `cuda` feature, [`CudaBackend::new`] opens a GPU through candle-core's CUDA
//! device and compiles the kernels of `kv-backend-cuda/kernels/` with NVRTC for it (once
//! per architecture and process). Pools are one device allocation per storage, laid out
//! head-major per layer as the CPU backend's: `[layer][K, V][kv_head][block][slot][row]`,
//! rows in kv-quant's byte formats. Layouts: f32, f16, bf16, `int8-gG`, `int4-gG` and
//! `int4h-gG` (quantized on write, in the kernel, to the bytes kv-quant's quantizer
//! writes), and KIVI (`kivi4`, `kivi2` and the residual `kivi*-rR`): keys in 32-token key
//! blocks quantized per channel once full, kept meanwhile in f16 windows (a per-layer
//! device pool, tracked on the host as the CPU backend tracks its windows); a query reads
//! its own key block in f16 and earlier ones quantized (with a residual R, also the keys
//! of blocks ending within R and the values of the last R tokens in f16, until the blocks
//! are settled), so a prefill computes what decoding token by token does.
//! - **export_block / import_block**: a block's bytes as stored, every layer, and KIVI's
//!   windows, in the CPU backend's order; an import is parsed and checked on the host
//!   (lengths, window flags and masks, every row decoding to finite values) before any
//!   byte is stored.
//!
//! - **write**: every check that does not depend on the values on the host
//!   (`kv_core::validate`), then a dry run of the write kernel that checks the values
//!   (finite, in range) and stores nothing, then the storing run: all or nothing.
//! - **attend**: one kernel for decode and prefill. Each thread block takes one sequence,
//!   one KV head, the query heads that read it, a tile of queries and a range of keys; it
//!   reads each K and V row of its range once, straight from the stored bytes, for all of
//!   its query rows (the GQA group), with an online softmax. Decode splits a sequence's keys
//!   into chunks of 512 read in parallel (split-K, flash-decoding) and a second kernel
//!   merges the chunks with the log-sum-exp rule; ragged batches are one launch.
//! - **copy_blocks** copies one range per (layer, K/V, head) and block; dependent moves
//!   (chains) run in order. **read** dequantizes into f32.
//!
//! Without the `cuda` feature the crate builds everywhere and [`CudaBackend::new`] returns
//! [`KvError::BackendUnavailable`] saying how to get the real one.
//!
//! **Not yet run on a GPU**: no GPU was available while it was written. The kernels are
//! compiled by NVRTC in CI, the host-side planning and the kernels' scalar helpers are
//! tested on the CPU, and the GPU tests (`tests/gpu.rs`: the conformance suite for every
//! layout) and the bench (`examples/gpu_attention_bench.rs`, decode attention GB/s against a
//! device-to-device copy probe) print `SKIPPED` without a device.
//!
//! ```
//! use kv_core::CacheBackend;
//! match kv_backend_cuda::CudaBackend::new(0) {
//!     Ok(backend) => {
//!         // Every layout of kv-core, KIVI included.
//!         assert!(backend.supports("int4-g32".parse()?));
//!         assert!(backend.supports("kivi4".parse()?));
//!         println!("using {}", backend.name());
//!     }
//!     Err(e) => println!("no CUDA: {e}"),
//! }
//! # Ok::<(), kv_core::KvError>(())
//! ```
#![cfg_attr(not(feature = "cuda"), forbid(unsafe_code))]
#![cfg_attr(feature = "cuda", deny(unsafe_code))]

pub mod kernels;
pub mod sample;
// Without `cuda` only the tests use the host-side plan: it is tested on every machine.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
mod plan;
// The KIVI windows' bookkeeping, host-side: tested on every machine.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
mod kivi;
// Block export and import bytes, host-side: tested on every machine.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
mod blocks;

#[cfg(feature = "cuda")]
#[allow(unsafe_code)] // kernel launches; each has a SAFETY comment
mod device;
#[cfg(feature = "cuda")]
pub use device::{compile_module, sample_rows, CudaBackend, CudaStorage};

#[cfg(not(feature = "cuda"))]
mod stub;
#[cfg(not(feature = "cuda"))]
pub use stub::{CudaBackend, CudaStorage};

#[allow(unused_imports)] // named by the docs above
use kv_core::{CacheBackend, KvError};
