//! kv-backend-cuda with the `cuda` feature: every test of the real backend, in one binary
//! (each binary that links candle's CUDA code is about 40 MiB; `cargo xtask gpu-bundle`
//! ships this one to a GPU machine).
//!
//! Without a GPU (CI), `nvrtc_compiles_every_kernel` still runs and fails on a kernel that
//! does not compile; the GPU tests print why they skipped. A skip is not a pass: the
//! conformance run needs a GPU.

use kv_attention::conformance;
use kv_backend_cuda::kernels::MODULES;
use kv_backend_cuda::{compile_module, CudaBackend};
use kv_core::candle::{DType, Device, Tensor};
use kv_core::{BlockId, CacheBackend, KvDType, KvError, ModelShape, Slot, StorageSpec};
use kv_quant::RowFormat;

/// The backend on GPU 0, or `None` after printing why there is none.
fn gpu(test: &str) -> Option<CudaBackend> {
    match CudaBackend::new(0) {
        Ok(b) => Some(b),
        Err(e) => {
            println!("SKIPPED {test}: no device ({e})");
            // Without a device the error must be the typed one, not a panic.
            assert!(
                matches!(
                    e,
                    KvError::BackendUnavailable {
                        backend: "cuda",
                        ..
                    }
                ),
                "{e}"
            );
            None
        }
    }
}

#[test]
fn nvrtc_compiles_every_kernel() {
    for arch in ["compute_80", "compute_90"] {
        for m in MODULES {
            let started = std::time::Instant::now();
            let ptx = match compile_module(m, arch) {
                Ok(ptx) => ptx,
                Err(e) => panic!("{e}"),
            };
            for f in m.functions {
                assert!(
                    ptx.contains(&format!(".entry {f}(")),
                    "{}.cu for {arch}: no entry {f} in the PTX",
                    m.name
                );
            }
            let target = format!(".target sm_{}", &arch["compute_".len()..]);
            assert!(ptx.contains(&target), "{}: {target} missing", m.name);
            println!(
                "{}.cu for {arch}: {} bytes of PTX in {:.0?}",
                m.name,
                ptx.len(),
                started.elapsed()
            );
        }
    }
}

#[test]
fn conformance_on_gpu() {
    let Some(backend) = gpu("conformance_on_gpu") else {
        return;
    };
    println!("kernels compiled for {}", backend.arch());
    let report = match conformance::check(&backend) {
        Ok(report) => report,
        Err(failure) => panic!("{failure}"),
    };
    println!("{report}");
    // Every layout of KvDType::ALL ran the whole suite, the KIVI ones (kivi4, kivi2 and
    // every residual `kivi*-rR`) included: none was skipped.
    let ran: Vec<KvDType> = report.dtypes.iter().map(|d| d.dtype).collect();
    assert_eq!(ran, KvDType::ALL, "{report}");
    assert!(report.skipped.is_empty(), "{report}");
    // Block export and import ran for every layout.
    assert!(backend.supports_block_bytes());
    for d in &report.dtypes {
        assert!(d.checks.contains(&"block bytes"), "{}: {report}", d.dtype);
    }
    assert!(
        KvDType::ALL.iter().any(|d| d.residual_tokens() > 0),
        "the residual-window layouts are in KvDType::ALL"
    );
}

/// The backend claims every layout kv-core has, and allocates each.
#[test]
fn every_layout_is_supported() {
    let Some(backend) = gpu("every_layout_is_supported") else {
        return;
    };
    let shape = ModelShape::new(1, 4, 2, 64).expect("shape");
    for &dtype in KvDType::ALL {
        assert!(backend.supports(dtype), "{dtype}");
        if dtype.row_bytes(64).is_err() {
            continue; // a group wider than this head dim
        }
        let spec = StorageSpec::new(shape, dtype, 32, 2).expect("spec");
        if let Err(e) = backend.allocate(&spec) {
            panic!("{dtype}: {e}");
        }
    }
}

/// Rows with a spread of magnitudes, signs, ties and zeros, deterministic.
fn rows(n: usize, d: usize, seed: u32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(12345);
    (0..n * d)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let u = (x % 20_001) as f32 / 10_000.0 - 1.0;
            match i % 37 {
                0 => 0.0,
                1 => -0.0,
                2 => 8.0 * u,
                3 => 1e-6 * u,
                _ => u * (1.0 + (i % 5) as f32),
            }
        })
        .collect()
}

#[test]
fn quantized_rows_are_kv_quants_bytes() {
    let Some(backend) = gpu("quantized_rows_are_kv_quants_bytes") else {
        return;
    };
    let (kv_heads, d, block_size, num_blocks) = (2usize, 128usize, 4usize, 3usize);
    let shape = ModelShape::new(1, 4, kv_heads, d).expect("shape");
    for &dtype in KvDType::ALL {
        let (kf, rotate) = match dtype {
            KvDType::F32 => (RowFormat::F32, false),
            KvDType::F16 => (RowFormat::F16, false),
            KvDType::BF16 => (RowFormat::Bf16, false),
            KvDType::Int8 { group } => (
                format!("int8-g{}", group.size()).parse().expect("fmt"),
                false,
            ),
            KvDType::Int4 { group } => (
                format!("int4-g{}", group.size()).parse().expect("fmt"),
                false,
            ),
            KvDType::Int4Hadamard { group } => (
                format!("int4-g{}", group.size()).parse().expect("fmt"),
                true,
            ),
            _ => continue,
        };
        let spec = StorageSpec::new(shape, dtype, block_size, num_blocks).expect("spec");
        let mut storage = backend.allocate(&spec).expect("allocate");
        let n = 5;
        let (k, v) = (rows(n * kv_heads, d, 1), rows(n * kv_heads, d, 2));
        let slots: Vec<Slot> = (0..n)
            .map(|i| Slot {
                block: BlockId::new(((i * 2) % num_blocks) as u32),
                offset: (i % block_size) as u32,
            })
            .collect();
        let dev = backend.device();
        let kt = Tensor::from_slice(&k, (n, kv_heads, d), dev).expect("k");
        let vt = Tensor::from_slice(&v, (n, kv_heads, d), dev).expect("v");
        backend
            .write(&mut storage, 0, &slots, &kt, &vt)
            .expect("write");
        let bytes = backend.storage_bytes(&storage).expect("bytes");
        let rb = dtype.row_bytes(d).expect("row bytes");
        let kernels = kv_quant::Kernels::best();
        for (i, s) in slots.iter().enumerate() {
            for h in 0..kv_heads {
                for (which, data) in [(0usize, &k), (1, &v)] {
                    let mut x = data[(i * kv_heads + h) * d..][..d].to_vec();
                    if which == 0 && rotate {
                        kv_quant::hadamard_in_place(&mut x).expect("rotate");
                    }
                    let mut want = vec![0u8; rb];
                    kernels.quantize_row(kf, &x, &mut want).expect("quantize");
                    let r = (which * kv_heads + h) * num_blocks + s.block.index();
                    let at = (r * block_size + s.offset as usize) * rb;
                    assert_eq!(
                        &bytes[at..at + rb],
                        &want[..],
                        "{dtype}: row {i} head {h} which {which}"
                    );
                }
            }
        }
        // A NaN anywhere refuses the whole write and stores nothing.
        let mut bad = v.clone();
        bad[d + 3] = f32::NAN;
        let bt = Tensor::from_slice(&bad, (n, kv_heads, d), dev).expect("v");
        let zeros = Tensor::zeros((n, kv_heads, d), DType::F32, dev).expect("zeros");
        let err = backend
            .write(&mut storage, 0, &slots, &zeros, &bt)
            .expect_err("NaN");
        assert!(matches!(err, KvError::NonFinite { what: "v" }), "{err}");
        assert_eq!(
            backend.storage_bytes(&storage).expect("bytes"),
            bytes,
            "{dtype}: unchanged"
        );
    }
}

#[test]
fn tensors_from_the_cpu_are_refused() {
    let Some(backend) = gpu("tensors_from_the_cpu_are_refused") else {
        return;
    };
    let shape = ModelShape::new(1, 2, 1, 64).expect("shape");
    let spec = StorageSpec::new(shape, KvDType::F16, 16, 2).expect("spec");
    let mut storage = backend.allocate(&spec).expect("allocate");
    let k = Tensor::zeros((1, 1, 64), DType::F32, &Device::Cpu).expect("k");
    let slot = [Slot {
        block: BlockId::new(0),
        offset: 0,
    }];
    let err = backend
        .write(&mut storage, 0, &slot, &k, &k)
        .expect_err("cpu tensor");
    assert!(matches!(err, KvError::InvalidArgument { .. }), "{err}");
}

/// KIVI on the device stores kv-quant's key blocks: a write of 40 tokens quantizes the
/// first 32-token key block from the f16-rounded keys, byte for byte as kv-quant's
/// `KiviKeyFormat::quantize_block`, and keeps the other 8 in the f16 window, where `read`
/// finds them; a NaN refuses the write and changes nothing.
#[test]
fn kivi_key_blocks_are_kv_quants_bytes() {
    let Some(backend) = gpu("kivi_key_blocks_are_kv_quants_bytes") else {
        return;
    };
    let (kv_heads, d, block_size, num_blocks) = (2usize, 64usize, 64usize, 2usize);
    let shape = ModelShape::new(1, 4, kv_heads, d).expect("shape");
    for (bits, qbits) in [
        (kv_core::KiviBits::B4, kv_quant::KiviBits::B4),
        (kv_core::KiviBits::B2, kv_quant::KiviBits::B2),
    ] {
        let dtype = KvDType::kivi(bits);
        let format = kv_quant::KiviKeyFormat::new(qbits, 32);
        let spec = StorageSpec::new(shape, dtype, block_size, num_blocks).expect("spec");
        let mut storage = backend.allocate(&spec).expect("allocate");
        let n = 40;
        let (k, v) = (rows(n * kv_heads, d, 3), rows(n * kv_heads, d, 4));
        let slots: Vec<Slot> = (0..n as u32)
            .map(|offset| Slot {
                block: BlockId::new(1),
                offset,
            })
            .collect();
        let dev = backend.device();
        let kt = Tensor::from_slice(&k, (n, kv_heads, d), dev).expect("k");
        let vt = Tensor::from_slice(&v, (n, kv_heads, d), dev).expect("v");
        backend
            .write(&mut storage, 0, &slots, &kt, &vt)
            .expect("write");
        let bytes = backend.storage_bytes(&storage).expect("bytes");
        let rb = dtype.row_bytes(d).expect("row bytes");
        let block_bytes = format.block_bytes(d).expect("block bytes");
        let f16 = |x: f32| half::f16::from_f32(x).to_f32();
        for h in 0..kv_heads {
            let keys: Vec<f32> = (0..32)
                .flat_map(|t| k[(t * kv_heads + h) * d..][..d].iter().map(|&x| f16(x)))
                .collect();
            let mut want = vec![0u8; block_bytes];
            format
                .quantize_block(&keys, d, &mut want)
                .expect("quantize");
            let at = (h * num_blocks + 1) * block_size * rb;
            assert_eq!(&bytes[at..at + block_bytes], &want[..], "{dtype}: head {h}");
        }
        // The filling key block reads its f16 keys.
        let (kr, _) = backend.read(&storage, 0, &slots[32..]).expect("read");
        let kr: Vec<f32> = kr.flatten_all().expect("flat").to_vec1().expect("host");
        let want: Vec<f32> = k[32 * kv_heads * d..].iter().map(|&x| f16(x)).collect();
        assert_eq!(kr, want, "{dtype}: window keys");
        let mut bad = k.clone();
        bad[5] = f32::NAN;
        let bt = Tensor::from_slice(&bad, (n, kv_heads, d), dev).expect("k");
        let err = backend
            .write(&mut storage, 0, &slots, &bt, &vt)
            .expect_err("NaN");
        assert!(matches!(err, KvError::NonFinite { what: "k" }), "{err}");
        assert_eq!(
            backend.storage_bytes(&storage).expect("bytes"),
            bytes,
            "{dtype}"
        );
    }
}
