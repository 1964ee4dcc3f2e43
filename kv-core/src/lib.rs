//! The vocabulary of a KV cache: model shapes, storage layouts, exact memory accounting,
//! paged-block bookkeeping, and the [`CacheBackend`] trait that devices implement.
//!
//! This crate holds no device code. A backend crate (`kv-backend-cpu`, `kv-backend-cuda`, or
//! yours) stores K/V and computes attention; [`CacheManager`] decides where tokens go,
//! shares blocks between forks and prompts with a common prefix, and recycles them
//! ([`SharedCacheManager`] shares one manager between threads).
//!
//! ```
//! use kv_core::{memory, CacheManager, KvDType, ModelShape};
//! let shape = ModelShape::preset("llama-3-8b")?;
//! assert_eq!(memory::cache_bytes(&shape, KvDType::F16, 4096)?, 512 << 20);
//!
//! let mut cache = CacheManager::new(16, 256)?;
//! let seq = cache.create_sequence();
//! let reserved = cache.reserve(seq, 40)?; // where to write the prompt's K/V
//! assert_eq!(reserved.slots[17].block, reserved.slots[16].block);
//! # Ok::<(), kv_core::KvError>(())
//! ```
#![forbid(unsafe_code)]

mod backend;
mod blocks;
pub mod content;
mod dtype;
mod error;
mod manager;
pub mod memory;
mod prefix;
pub mod reference;
mod shape;
mod shared;
pub mod validate;

pub use backend::{AttentionBatch, CacheBackend, SeqAttention, StorageSpec, StorageSpecBuilder};
pub use blocks::{BlockAllocator, BlockId, BlockTable, Slot};
/// The tensor library backends exchange data with, re-exported so implementors use the
/// same version.
pub use candle_core as candle;
pub use dtype::{KiviBits, KiviResidual, KvDType, QuantGroup};
pub use error::{KvError, Result};
pub use manager::{CacheManager, CacheStats, Preempted, PrefixMatch, Reserved, SeqId};
pub use shape::{ModelShape, ModelShapeBuilder};
pub use shared::SharedCacheManager;
