//! The CPU backend passes the conformance suite every backend runs, on the global pool and
//! on a private one.

use kv_attention::conformance;
use kv_backend_cpu::CpuBackend;
use kv_core::KvDType;

#[test]
fn cpu_backend_conforms() {
    let report = match conformance::check(&CpuBackend::new()) {
        Ok(report) => report,
        Err(failure) => panic!("{failure}"),
    };
    println!("{report}");
    // Every layout ran, float and quantized; nothing was skipped.
    let ran: Vec<KvDType> = report.dtypes.iter().map(|d| d.dtype).collect();
    assert_eq!(ran, KvDType::ALL);
    assert!(report.skipped.is_empty(), "{report}");
    for d in &report.dtypes {
        assert!(
            d.random_cases > 0 && d.sweep_cases > 0 && d.attend_calls > 0,
            "{report}"
        );
        // Export/import round trip, bit for bit, for every layout.
        assert!(d.checks.contains(&"block bytes"), "{report}");
        // KIVI quantizes keys over 32-token blocks, so its smallest block holds 32 tokens.
        let blocks: &[&str] = if d.dtype.block_tokens() == 32 {
            &["block size 32"]
        } else {
            &["block size 1", "block size 16"]
        };
        for &feature in ["MHA", "GQA", "MQA", "chunked prefill", "decode"]
            .iter()
            .chain(blocks)
        {
            assert!(
                d.coverage.get(feature).copied().unwrap_or(0) > 0,
                "{feature}: {report}"
            );
        }
    }
}

#[test]
fn cpu_backend_with_its_own_pool_conforms() {
    let backend = match CpuBackend::with_threads(3) {
        Ok(b) => b,
        Err(e) => panic!("cannot start threads: {e}"),
    };
    let config = conformance::Config {
        random_cases: 8,
        seed: 7,
    };
    if let Err(failure) = conformance::check_with(&backend, &config) {
        panic!("{failure}");
    }
}
