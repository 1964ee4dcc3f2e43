//! Attention over a KV cache, written once for every [`kv_core::CacheBackend`].
//!
//! [`PagedCache`] ties a backend's storage to the [`kv_core::CacheManager`] bookkeeping: a
//! model asks it for slots, writes each layer's K/V, and attends. [`reference`](mod@reference)
//! is the plain f64 attention every backend is checked against, and `conformance` (feature
//! `conformance`) is the suite any backend runs to prove itself. [`SequenceCache`] is the
//! one-sequence form for code written against candle-nn's `KvCache`.
//!
//! `examples/custom_backend.rs` implements a backend from scratch and runs the suite on it.
//!
//! [`cache_file`] is the saved form of cache blocks (files and the values of the tiers),
//! [`store`] the tiers themselves ([`store::BlockStore`]: host memory, local disk) and
//! [`TieredCache`] a [`PagedCache`] that consults them on a prefix miss.
// The one exception is the read-only map of a cache file (`cache_file::map`).
#![deny(unsafe_code)]

pub mod cache_file;
#[cfg(feature = "conformance")]
pub mod conformance;
mod paged;
#[cfg(feature = "redis")]
#[doc(hidden)]
pub mod redis_server;
pub mod reference;
mod sequence;
mod sliding;
pub mod store;

pub use paged::{CacheUsage, GroupBlocks, PagedCache, SlidingUsage};
pub use sequence::SequenceCache;
pub use sliding::SlidingLayers;
pub use store::TieredCache;
