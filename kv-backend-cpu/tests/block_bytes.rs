//! Imports of bytes no export writes are refused with a typed error and change nothing.

use kv_backend_cpu::CpuBackend;
use kv_core::candle::{Device, Tensor};
use kv_core::{
    BlockId, CacheBackend, KiviBits, KvDType, KvError, ModelShape, QuantGroup, Slot, StorageSpec,
};

fn storage(dtype: KvDType, tokens: u32) -> (CpuBackend, kv_backend_cpu::CpuStorage) {
    let backend = CpuBackend::new();
    let shape = ModelShape::new(1, 2, 1, 64).expect("shape");
    let spec = StorageSpec::new(shape, dtype, 32, 2).expect("spec");
    let mut st = backend.allocate(&spec).expect("allocate");
    let slots: Vec<Slot> = (0..tokens)
        .map(|offset| Slot {
            block: BlockId::new(0),
            offset,
        })
        .collect();
    let n = tokens as usize * 64;
    let data: Vec<f32> = (0..n)
        .map(|i| ((i * 7919) % 113) as f32 / 50.0 - 1.0)
        .collect();
    let t = Tensor::from_vec(data, (tokens as usize, 1, 64), &Device::Cpu).expect("tensor");
    backend.write(&mut st, 0, &slots, &t, &t).expect("write");
    (backend, st)
}

fn export(b: &CpuBackend, st: &kv_backend_cpu::CpuStorage, block: u32) -> Vec<u8> {
    let mut out = Vec::new();
    b.export_block(st, BlockId::new(block), &mut out)
        .expect("export");
    out
}

#[test]
fn a_nan_in_a_float_block_is_refused() {
    let (b, mut st) = storage(KvDType::F32, 32);
    let mut bytes = export(&b, &st, 0);
    assert_eq!(bytes.len(), 2 * 32 * 64 * 4);
    bytes[8..12].copy_from_slice(&f32::NAN.to_le_bytes());
    let before = export(&b, &st, 1);
    let err = b
        .import_block(&mut st, BlockId::new(1), &bytes)
        .unwrap_err();
    assert!(matches!(err, KvError::NonFinite { .. }), "{err}");
    assert_eq!(export(&b, &st, 1), before, "nothing changed");
}

#[test]
fn an_infinite_scale_in_an_int8_block_is_refused() {
    let (b, mut st) = storage(
        KvDType::Int8 {
            group: QuantGroup::G32,
        },
        32,
    );
    let good = export(&b, &st, 0);
    b.import_block(&mut st, BlockId::new(1), &good)
        .expect("a real export imports");
    assert_eq!(export(&b, &st, 1), good);
    // Find a byte pair whose replacement by f16 infinity makes the block non-finite: every
    // row holds f16 scales, so some position does; the import must never accept it.
    let mut refused = 0;
    for at in (0..good.len() - 1).step_by(2) {
        let mut bad = good.clone();
        bad[at..at + 2].copy_from_slice(&half::f16::INFINITY.to_le_bytes());
        match b.import_block(&mut st, BlockId::new(1), &bad) {
            Err(KvError::NonFinite { .. }) => refused += 1,
            Err(e) => panic!("unexpected error {e}"),
            Ok(()) => {}
        }
    }
    assert!(refused > 0, "no infinite scale was detected");
    // Restore, then check the refusals changed nothing.
    b.import_block(&mut st, BlockId::new(1), &good)
        .expect("import");
    assert_eq!(export(&b, &st, 1), good);
}

#[test]
fn kivi_windows_travel_and_bad_flags_are_refused() {
    // 20 tokens of a 32-token key block: the keys are in the block's f16 window.
    let (b, mut st) = storage(KvDType::kivi(KiviBits::B4), 20);
    let bytes = export(&b, &st, 0);
    b.import_block(&mut st, BlockId::new(1), &bytes)
        .expect("import");
    assert_eq!(export(&b, &st, 1), bytes);
    let slots: Vec<Slot> = (0..20)
        .map(|o| Slot {
            block: BlockId::new(1),
            offset: o,
        })
        .collect();
    let src: Vec<Slot> = (0..20)
        .map(|o| Slot {
            block: BlockId::new(0),
            offset: o,
        })
        .collect();
    let (k1, _) = b.read(&st, 0, &slots).expect("read");
    let (k0, _) = b.read(&st, 0, &src).expect("read");
    let (k0, k1) = (
        k0.flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("host"),
        k1.flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("host"),
    );
    assert_eq!(k0, k1, "the window's f16 keys came along");
    // The window record follows the K and V pools of the one layer: K 32 x 34 bytes
    // (int4 key block of 64 dims amortised), V the same; find the flag as the byte after.
    let flag_at = bytes.len() - 1 - 8 - 32 * 64 * 2;
    assert_eq!(bytes[flag_at], 1, "the block has an open window");
    let before = export(&b, &st, 1);
    let mut bad = bytes.clone();
    bad[flag_at] = 2;
    let err = b.import_block(&mut st, BlockId::new(1), &bad).unwrap_err();
    assert!(matches!(err, KvError::InvalidArgument { .. }), "{err}");
    let mut bad = bytes.clone();
    bad[flag_at + 8] = 0xff; // mask bit 63 set: past a 32-token key block
    let err = b.import_block(&mut st, BlockId::new(1), &bad).unwrap_err();
    assert!(matches!(err, KvError::InvalidArgument { .. }), "{err}");
    let mut bad = bytes.clone();
    let last = bad.len() - 2;
    bad[last..].copy_from_slice(&half::f16::NAN.to_le_bytes());
    let err = b.import_block(&mut st, BlockId::new(1), &bad).unwrap_err();
    assert!(matches!(err, KvError::NonFinite { .. }), "{err}");
    assert_eq!(export(&b, &st, 1), before, "nothing changed");
}
