//! Plain attention with f64 accumulation: the oracle every backend is compared with.
