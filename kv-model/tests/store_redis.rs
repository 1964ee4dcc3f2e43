//! The Redis tier under faults with the real model (ignored: `KV_MODEL_PATH`, release,
//! feature `redis`, a `redis-server` from `KV_REDIS_SERVER` or `PATH`; `cargo xtask redis`
//! installs one). Two "engines" (two caches) share one server started on a free port: the
//! second restores the first's prefix; with the server down at start or killed mid-run the
//! engines recompute, without crashing, and give the same greedy tokens.
#![cfg(feature = "redis")]
// Tests unwrap: a panic is how they fail.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::Duration;

use kv_attention::redis_server::RedisServer;
use kv_attention::store::{BlockStore, RedisStore};
use kv_backend_cpu::CpuBackend;
use kv_model::{CacheLayout, GenerateOptions, Model, Tokenizer};

#[test]
#[ignore = "needs the real model (KV_MODEL_PATH, release) and a redis-server"]
fn engines_share_a_prefix_through_redis_and_survive_its_loss() {
    let path = PathBuf::from(std::env::var_os("KV_MODEL_PATH").expect("set KV_MODEL_PATH"));
    let model = Model::load(&path).unwrap();
    let tokenizer = Tokenizer::from_gguf_file(&path).unwrap();
    let layout = CacheLayout::default();
    let bs = layout.block_size;
    let fp = kv_model::model_fingerprint(&path, &model, &tokenizer, layout, "cpu").unwrap();
    let options = GenerateOptions {
        max_tokens: 10,
        ..GenerateOptions::default()
    };
    let system = "You are a careful assistant. Answer briefly and never invent facts. \
                  Examples: Q: 2 + 2? A: 4. Q: Largest planet? A: Jupiter.";
    let prompt = tokenizer
        .encode(&format!("{system} Q: What is the capital of Italy? A:"))
        .unwrap();
    let want = model
        .generate(CpuBackend::new(), layout, &prompt, &options, |_| Ok(()))
        .unwrap()
        .tokens;
    let run = |url: &str| {
        let tier: Box<dyn BlockStore> =
            Box::new(RedisStore::new(url, 600, Duration::from_millis(500)).unwrap());
        model
            .generate_with_store(
                CpuBackend::new(),
                layout,
                fp,
                vec![tier],
                &prompt,
                &options,
                |_| Ok(()),
            )
            .unwrap()
    };
    // The store down at start: recompute, same tokens, the error counted.
    let gone = {
        let s = RedisServer::start().unwrap();
        s.url()
    };
    let (g, r) = run(&gone);
    assert_eq!(g.tokens, want);
    assert_eq!(r.reused_tokens, 0);
    assert!(r.stats.store_errors > 0 && r.last_error.is_some());
    // Engine 1 fills the store, engine 2 restores the prefix from it.
    let server = RedisServer::start().unwrap();
    let (g, r) = run(&server.url());
    assert_eq!(g.tokens, want);
    assert!(r.stats.bytes_saved > 0 && r.stats.store_errors == 0);
    let (g, r) = run(&server.url());
    assert_eq!(g.tokens, want);
    assert_eq!(r.reused_tokens, (prompt.len() - 1) / bs * bs);
    assert!(r.stats.hits > 0 && r.stats.bytes_loaded > 0);
    // The server killed mid-run (between engines' requests): no crash, same tokens.
    let url = server.url();
    drop(server);
    let (g, r) = run(&url);
    assert_eq!(g.tokens, want);
    assert_eq!(r.reused_tokens, 0);
    assert!(r.stats.store_errors > 0);
}
