//! The CUDA C sources of the backend and the options NVRTC compiles them with.
//!
//! The sources live in `kv-backend-cuda/kernels/` and are compiled into this crate as text
//! (`include_str!`): the backend compiles them with NVRTC at run time, once per device, for
//! that device's architecture. They include no header (half-precision conversions are
//! inline PTX), so NVRTC needs no include path; `common.cuh` is prepended to each module's
//! source here rather than `#include`d.

/// Shared helpers, prepended to every module.
const COMMON: &str = include_str!("../kernels/common.cuh");

/// One NVRTC compilation unit: a name, its source file and the kernels it defines.
#[derive(Debug, Clone, Copy)]
pub struct KernelModule {
    /// Module name (also the file stem under `kernels/`).
    pub name: &'static str,
    /// The `.cu` file's text, without the shared prelude.
    pub body: &'static str,
    /// The `extern "C"` kernels it defines.
    pub functions: &'static [&'static str],
}

impl KernelModule {
    /// The full text NVRTC compiles: the shared prelude, then the module.
    pub fn source(&self) -> String {
        format!("{COMMON}\n// ---- {}.cu ----\n{}", self.name, self.body)
    }
}

/// Every kernel module of the backend.
pub const MODULES: &[KernelModule] = &[
    KernelModule {
        name: "write",
        body: include_str!("../kernels/write.cu"),
        functions: &["kv_write"],
    },
    KernelModule {
        name: "rows",
        body: include_str!("../kernels/rows.cu"),
        functions: &["kv_read", "kv_copy_blocks"],
    },
    KernelModule {
        name: "attend",
        body: include_str!("../kernels/attend.cu"),
        functions: &["kv_attend", "kv_merge"],
    },
    KernelModule {
        name: "kivi",
        body: include_str!("../kernels/kivi.cu"),
        functions: &[
            "kv_kivi_quantize",
            "kv_kivi_read",
            "kv_kivi_window_copy",
            "kv_kivi_window_open",
            "kv_kivi_window_open_values",
            "kv_kivi_window_store",
        ],
    },
    KernelModule {
        name: "sample",
        body: include_str!("../kernels/sample.cu"),
        functions: &["kv_sample"],
    },
];

/// NVRTC options of every compilation besides the architecture: IEEE division and square
/// root and no flushing of subnormals, which the quantizer's bit-exactness with kv-quant
/// depends on. (Fused multiply-add stays on; the kernels spell out unfused products where
/// they must match kv-quant.)
pub const NVRTC_FLAGS: &[&str] = &["--prec-div=true", "--prec-sqrt=true", "--ftz=false"];

/// The virtual architectures the backend compiles for, oldest first; a device gets the
/// newest one not above its compute capability.
pub const ARCHES: &[(u32, &str)] = &[
    (70, "compute_70"),
    (75, "compute_75"),
    (80, "compute_80"),
    (86, "compute_86"),
    (89, "compute_89"),
    (90, "compute_90"),
];

/// The architecture to compile for on a device of compute capability `major.minor`, or
/// `None` below the oldest supported (Volta, 7.0).
pub fn arch_for(major: u32, minor: u32) -> Option<&'static str> {
    let cc = major.checked_mul(10)?.checked_add(minor)?;
    ARCHES
        .iter()
        .rev()
        .find(|(c, _)| *c <= cc)
        .map(|&(_, name)| name)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `common.cuh` (and a module's scalar helpers) compiled with the host C compiler: the
    /// device-only pieces replaced by plain C, `__global__` kernels left out
    /// (`KV_HOST_CHECK`), and a `main` that reads stdin and prints results.
    struct HostHarness {
        dir: std::path::PathBuf,
        exe: std::path::PathBuf,
    }

    impl HostHarness {
        /// Builds the harness, or prints why it is skipped (no C compiler) and returns
        /// `None`. A compiler that rejects the source fails the test.
        fn build(name: &str, module: &str, main: &str) -> Option<Self> {
            use std::process::Command;
            let dir = std::env::temp_dir()
                .join(format!("kv-cuda-host-check-{name}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("temp dir");
            let c = dir.join("check.c");
            let exe = dir.join("check");
            let source = format!(
                "#include <stdio.h>\n#include <string.h>\n#include <stdbool.h>\n#include <math.h>\n\
                 #define KV_HOST_CHECK 1\n#define __device__ static\n#define __forceinline__ inline\n\
                 #define __fmul_rn(a, b) ((a) * (b))\n#define __fadd_rn(a, b) ((a) + (b))\n\
                 #define __fsub_rn(a, b) ((a) - (b))\n#define __fdiv_rn(a, b) ((a) / (b))\n\
                 #undef INFINITY\n\
                 static long long __double_as_longlong(double d) {{ long long x; memcpy(&x, &d, 8); return x; }}\n\
                 static unsigned __float_as_uint(float f) {{ unsigned x; memcpy(&x, &f, 4); return x; }}\n\
                 static float __uint_as_float(unsigned u) {{ float f; memcpy(&f, &u, 4); return f; }}\n\
                 float h2f(unsigned short h) {{\n\
                   unsigned sign = (unsigned)(h & 0x8000) << 16, rest = h & 0x7fff;\n\
                   float m = rest >= 0x7c00 ? __uint_as_float(0x7f800000u | ((rest & 0x3ff) << 13))\n\
                                            : __uint_as_float(rest << 13) * __uint_as_float(0x77800000u);\n\
                   return __uint_as_float(__float_as_uint(m) | sign);\n}}\n\
                 {COMMON}\n\
                 static u16 f2h_rn(float f) {{ return f64_to_f16_rn((double)f); }}\n\
                 {module}\n{main}"
            );
            std::fs::write(&c, source).expect("write harness");
            let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
            let built = Command::new(&cc)
                .args(["-O1", "-std=c99", "-ffp-contract=off", "-o"])
                .arg(&exe)
                .arg(&c)
                .arg("-lm")
                .status();
            match built {
                Ok(st) if st.success() => Some(HostHarness { dir, exe }),
                Ok(st) => panic!(
                    "{cc} could not compile the {name} harness ({st}): {}",
                    c.display()
                ),
                Err(e) => {
                    println!("SKIPPED host check {name}: no C compiler ({cc}: {e})");
                    None
                }
            }
        }

        /// Runs the harness on `input` and returns what it printed.
        fn run(&self, input: &str) -> String {
            use std::io::Write;
            use std::process::{Command, Stdio};
            let mut child = Command::new(&self.exe)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("run harness");
            let mut stdin = child.stdin.take().expect("stdin");
            let input = input.to_owned();
            let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
            let out = child.wait_with_output().expect("harness output");
            writer.join().expect("writer").expect("write input");
            assert!(out.status.success(), "harness failed: {}", out.status);
            String::from_utf8(out.stdout).expect("utf-8")
        }
    }

    impl Drop for HostHarness {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// A deterministic xorshift64 stream from `seed`: the same test inputs on every run.
    fn xorshift(seed: u64) -> impl FnMut() -> u64 {
        let mut x = seed;
        move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        }
    }

    /// The space-separated hex fields of one line the harness printed.
    fn hex<T>(
        line: Option<&str>,
        parse: fn(&str, u32) -> Result<T, std::num::ParseIntError>,
    ) -> Vec<T> {
        line.expect("a line of harness output")
            .split(' ')
            .map(|h| parse(h, 16).expect("hex"))
            .collect()
    }

    /// The bytes of a line `ok b0 b1 ...` the quantizing harnesses print, failing `case` when
    /// the C code refused its input (`ok` is 0).
    fn accepted_bytes(line: Option<&str>, case: &str) -> Vec<u8> {
        let line = line.expect("a bytes line");
        let (ok, bytes) = line.split_once(' ').unwrap_or((line, ""));
        assert_eq!(ok, "1", "{case}: the C code refused it");
        hex(Some(bytes), u8::from_str_radix)
    }

    #[test]
    fn every_declared_kernel_is_defined_once() {
        for m in MODULES {
            for f in m.functions {
                let decl = format!("extern \"C\" __global__ void {f}(");
                assert_eq!(m.body.matches(&decl).count(), 1, "{}: {f}", m.name);
            }
            assert_eq!(
                m.body.matches("extern \"C\" __global__").count(),
                m.functions.len(),
                "{}: a kernel missing from MODULES",
                m.name
            );
            assert!(!m.source().contains("#include"), "{}: header-free", m.name);
        }
    }

    /// The scalar helpers of `common.cuh` compiled with the host C compiler (the only part
    /// of the kernels a CPU can run): f64 -> f16 rounding to nearest even, the directed f16
    /// roundings the quantizer's scales use, and bf16 rounding, against the `half` crate on
    /// values around every f16 (midpoints included), subnormals and overflow.
    #[test]
    fn host_check_of_the_rounding_helpers() {
        use half::{bf16, f16};
        let main = "int main(void) {\n\
               unsigned long long b;\n\
               while (scanf(\"%llx\", &b) == 1) {\n\
                 double v; memcpy(&v, &b, 8); float f = (float)v;\n\
                 printf(\"%04x %04x %04x %04x\\n\", f64_to_f16_rn(v), f16_ceil(v), f16_floor(v), f2bf_rn(f));\n\
               }\n  return 0;\n}\n";
        let Some(harness) = HostHarness::build("rounding", "", main) else {
            return;
        };
        // Values: every f16 (both signs), the midpoints and near-midpoints between
        // neighbours, and a spread of doubles from far below the subnormals to overflow.
        let mut values = Vec::new();
        for bits in 0u16..0x7bff {
            let a = f16::from_bits(bits).to_f64();
            let b = f16::from_bits(bits + 1).to_f64();
            let mid = (a + b) / 2.0;
            for v in [
                a,
                mid,
                f64::from_bits(mid.to_bits() + 1),
                f64::from_bits(mid.to_bits() - 1),
            ] {
                values.push(v);
                values.push(-v);
            }
        }
        let mut random = xorshift(0x9e37_79b9_7f4a_7c15);
        for _ in 0..20_000 {
            let x = random();
            let e = (x >> 53) % 80;
            values.push(f64::from_bits(
                x & 0x800f_ffff_ffff_ffff | ((1023 - 40 + e) << 52),
            ));
        }
        values.extend([
            0.0, -0.0, 65504.0, 65519.99, 65520.0, 1e300, -1e300, 5.9e-8, 2.98e-8, 2.9e-8,
        ]);
        let input: String = values
            .iter()
            .map(|v| format!("{:x}\n", v.to_bits()))
            .collect();
        let text = harness.run(&input);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), values.len());
        for (v, line) in values.iter().zip(lines) {
            let got = hex(Some(line), u16::from_str_radix);
            // `half` converts an f64 through f32 (two roundings: 2^-25 + one ulp becomes
            // the tie 2^-25 and rounds to 0), so it gives one of the two neighbours, not
            // always the nearest. The directed roundings by definition, from either one:
            let h = f16::from_f64(*v);
            let ceil = if h.to_f64() >= *v { h } else { next(h, true) };
            let floor = if h.to_f64() <= *v { h } else { next(h, false) };
            // Then the nearest of the two, ties to the even one (the differences are exact:
            // both neighbours are within a factor of two of `v`, or zero).
            let (up, down) = (ceil.to_f64() - *v, *v - floor.to_f64());
            let rn = if ceil.is_infinite() {
                // Overflow starts at 65504 + half an ulp (65520), the tie included.
                if v.abs() >= 65520.0 {
                    ceil
                } else {
                    floor
                }
            } else if floor.is_infinite() {
                if v.abs() >= 65520.0 {
                    floor
                } else {
                    ceil
                }
            } else if up < down || (up == down && ceil.to_bits() & 1 == 0) {
                ceil
            } else {
                floor
            };
            let want = [
                rn.to_bits(),
                ceil.to_bits(),
                floor.to_bits(),
                bf16::from_f32(*v as f32).to_bits(),
            ];
            for (i, name) in ["f64_to_f16_rn", "f16_ceil", "f16_floor", "f2bf_rn"]
                .iter()
                .enumerate()
            {
                if i == 3 && (*v as f32).is_infinite() {
                    continue; // f2bf_rn is only called on finite f32
                }
                assert_eq!(
                    got[i], want[i],
                    "{name}({v:e}): got {:04x}, want {:04x}",
                    got[i], want[i]
                );
            }
        }
    }

    /// The KIVI block quantizer and loader of `kivi.cu`, compiled for the host, against
    /// kv-quant's `KiviKeyFormat` on blocks of f16 keys (as the window holds them): the
    /// same bytes, and the same dequantized f32 bits.
    #[test]
    fn host_check_of_the_kivi_block_quantizer() {
        use half::f16;
        use kv_quant::{KiviBits, KiviKeyFormat};
        let module = MODULES
            .iter()
            .find(|m| m.name == "kivi")
            .expect("kivi module")
            .body;
        let main = "int main(void) {\n\
              unsigned d, bits;\n\
              static unsigned short rows[32 * 256];\n\
              static u8 out[4 * 256 + 32 * 256];\n\
              while (scanf(\"%u %u\", &d, &bits) == 2) {\n\
                if (d > 256 || (bits != 2 && bits != 4)) return 2;\n\
                for (unsigned i = 0; i < 32 * d; ++i) {\n\
                  unsigned x; if (scanf(\"%x\", &x) != 1) return 3; rows[i] = (unsigned short)x;\n\
                }\n\
                unsigned cols = d / 8 * bits, n = 4 * d + 32 * cols;\n\
                memset(out, 0xaa, n);\n\
                int ok = 1;\n\
                for (unsigned j = 0; j < cols; ++j) ok &= kivi_quantize_column(rows, 32, d, bits, j, out);\n\
                printf(\"%d\", ok);\n\
                for (unsigned i = 0; i < n; ++i) printf(\" %02x\", out[i]);\n\
                printf(\"\\n\");\n\
                for (unsigned i = 0; i < 32 * d; ++i)\n\
                  printf(i ? \" %08x\" : \"%08x\", __float_as_uint(kivi_load(out, d, bits, i / d, i % d)));\n\
                printf(\"\\n\");\n\
                for (unsigned i = 0; i < 32 * d; ++i)\n\
                  printf(i ? \" %04x\" : \"%04x\", kivi_window_f16(kivi_load(out, d, bits, i / d, i % d)));\n\
                printf(\"\\n\");\n\
              }\n  return 0;\n}\n";
        let Some(harness) = HostHarness::build("kivi", module, main) else {
            return;
        };
        let mut next = xorshift(0x2545_f491_4f6c_dd1d);
        // Blocks: (head_dim, bits, keys as f16 bits), with outlier channels, constant
        // channels (scale 0), signed zeros, wide ranges and values near f16's limit.
        let mut blocks: Vec<(usize, KiviBits, Vec<u16>)> = Vec::new();
        for case in 0..48 {
            let d = [32, 64, 128][case % 3];
            let bits = if case % 2 == 0 {
                KiviBits::B4
            } else {
                KiviBits::B2
            };
            let keys: Vec<u16> = (0..32 * d)
                .map(|i| {
                    let (t, c) = (i / d, i % d);
                    let r = next();
                    let v = match (case / 6, c % 7) {
                        (_, 0) if case % 4 == 1 => 1.5,            // constant channel
                        (_, 3) => 40.0 + (r % 1000) as f32 * 0.01, // outlier channel
                        (0, _) => ((r % 2001) as f32 - 1000.0) * 1e-3,
                        (1, _) => {
                            if t % 2 == 0 {
                                0.0
                            } else {
                                -0.0
                            }
                        }
                        (2, _) => (r % 131_000) as f32 - 65_500.0,
                        (3, _) => f16::from_bits((r as u16) & 0x7bff).to_f32(),
                        (4, _) => -f16::from_bits((r as u16) & 0x7bff).to_f32(),
                        _ => ((r % 17) as f32 - 8.0) * 0.125,
                    };
                    f16::from_f32(v).to_bits()
                })
                .collect();
            blocks.push((d, bits, keys));
        }
        let mut input = String::new();
        for (d, bits, keys) in &blocks {
            input.push_str(&format!("{d} {}\n", bits.bits()));
            for k in keys {
                input.push_str(&format!("{k:x} "));
            }
            input.push('\n');
        }
        let text = harness.run(&input);
        let mut lines = text.lines();
        for (n, (d, bits, keys)) in blocks.iter().enumerate() {
            let fmt = KiviKeyFormat::new(*bits, 32);
            let f32_keys: Vec<f32> = keys.iter().map(|&k| f16::from_bits(k).to_f32()).collect();
            let mut want = vec![0u8; fmt.block_bytes(*d).expect("block bytes")];
            fmt.quantize_block(&f32_keys, *d, &mut want)
                .expect("f16 keys quantize");
            let mut want_f = vec![0.0f32; 32 * d];
            fmt.dequantize_block(&want, *d, &mut want_f)
                .expect("dequantize");
            let got = accepted_bytes(lines.next(), &format!("block {n}"));
            assert_eq!(
                got,
                want,
                "block {n} (head_dim {d}, {} bits): bytes differ",
                bits.bits()
            );
            let got_f = hex(lines.next(), u32::from_str_radix);
            let want_bits: Vec<u32> = want_f.iter().map(|v| v.to_bits()).collect();
            assert_eq!(got_f, want_bits, "block {n}: dequantized values differ");
            // The window a write reopens the block into: the CPU backend's f16 of each
            // dequantized key, clamped to f16's range.
            let got_w = hex(lines.next(), u16::from_str_radix);
            let want_w: Vec<u16> = want_f
                .iter()
                .map(|v| f16::from_f32(v.clamp(-65504.0, 65504.0)).to_bits())
                .collect();
            assert_eq!(got_w, want_w, "block {n}: window f16 differs");
        }
        assert_eq!(lines.next(), None);
    }

    /// The KIVI key readers of `attend.cu`, compiled for the host, on a pool laid out as the
    /// device's (`plan::Geometry`) with key blocks quantized by kv-quant, three windows
    /// and a window table: `kivi_key` reads a filling block's key from its window in f16
    /// and every other key (a quantized block, kept window or not) as kv-quant dequantizes
    /// it; `kivi_kept_row` names the window row only for a quantized block's kept window
    /// (keys), or for any window (a residual's values).
    #[test]
    fn host_check_of_the_kivi_attend_readers() {
        use crate::kivi::{NO_WINDOW, QUANTIZED};
        use crate::plan::Geometry;
        use half::f16;
        use kv_quant::{KiviBits, KiviKeyFormat};
        let module = MODULES
            .iter()
            .find(|m| m.name == "attend")
            .expect("attend module")
            .body;
        let main = "int main(void) {\n\
              unsigned kvh_n, nb, bs, d, rb, bits, pool_n, wins_n, table_n;\n\
              while (scanf(\"%u %u %u %u %u %u %u %u %u\", &kvh_n, &nb, &bs, &d, &rb, &bits,\n\
                           &pool_n, &wins_n, &table_n) == 9) {\n\
                static u8 pool[1 << 17]; static u16 wins[1 << 15]; static u32 table[64];\n\
                static u32 blocks[64];\n\
                if (pool_n > sizeof pool || wins_n > 1 << 15 || table_n > 64 || nb > 64) return 2;\n\
                for (unsigned i = 0; i < pool_n; ++i) { unsigned x; if (scanf(\"%x\", &x) != 1) return 3; pool[i] = (u8)x; }\n\
                for (unsigned i = 0; i < wins_n; ++i) { unsigned x; if (scanf(\"%x\", &x) != 1) return 3; wins[i] = (u16)x; }\n\
                for (unsigned i = 0; i < table_n; ++i) { unsigned x; if (scanf(\"%x\", &x) != 1) return 3; table[i] = x; }\n\
                for (unsigned b = 0; b < nb; ++b) blocks[b] = b;\n\
                for (unsigned h = 0; h < kvh_n; ++h)\n\
                  for (unsigned b = 0; b < nb; ++b)\n\
                    for (unsigned o = 0; o < bs; ++o) {\n\
                      const u16* row = kivi_kept_row(wins, table, h, blocks, b * bs + o, kvh_n, bs, d, false);\n\
                      const u16* any = kivi_kept_row(wins, table, h, blocks, b * bs + o, kvh_n, bs, d, true);\n\
                      printf(\"%lld %lld\", row ? (long long)(row - wins) : -1LL, any ? (long long)(any - wins) : -1LL);\n\
                      for (unsigned c = 0; c < d; ++c)\n\
                        printf(\" %08x\", __float_as_uint(kivi_key(pool, wins, table, 1, h, b, o, c, kvh_n,\n\
                                                                   nb, bs, d, rb, bits)));\n\
                      printf(\"\\n\");\n\
                    }\n\
              }\n  return 0;\n}\n";
        let Some(harness) = HostHarness::build("kivi-attend", module, main) else {
            return;
        };
        let mut next = xorshift(0x9e37_79b9_7f4a_7c15);
        let (layers, kv_heads, num_blocks, block_size, d) =
            (2usize, 2usize, 3usize, 64usize, 32usize);
        let per = block_size / 32;
        for (bits, dtype) in [
            (KiviBits::B4, kv_core::KvDType::kivi(kv_core::KiviBits::B4)),
            (KiviBits::B2, kv_core::KvDType::kivi(kv_core::KiviBits::B2)),
        ] {
            let fmt = KiviKeyFormat::new(bits, 32);
            let row_bytes = dtype.row_bytes(d).expect("row bytes");
            let g = Geometry {
                layers,
                kv_heads,
                num_blocks,
                block_size,
                row_bytes,
            };
            let mut pool = vec![0u8; g.total_bytes().expect("size")];
            let block_bytes = fmt.block_bytes(d).expect("block bytes");
            // Every key block of layer 1 quantized by kv-quant from f16 keys; the
            // dequantized keys are what a reader of the block must get.
            let mut dequantized = vec![vec![0.0f32; 32 * d]; kv_heads * num_blocks * per];
            for h in 0..kv_heads {
                for b in 0..num_blocks {
                    for kb in 0..per {
                        let keys: Vec<f32> = (0..32 * d)
                            .map(|_| {
                                f16::from_f32(((next() % 2001) as f32 - 1000.0) * 1e-2).to_f32()
                            })
                            .collect();
                        let at = g.row_offset(1, 0, h, b, kb * 32);
                        fmt.quantize_block(&keys, d, &mut pool[at..at + block_bytes])
                            .expect("quantize");
                        let i = (h * num_blocks + b) * per + kb;
                        fmt.dequantize_block(&pool[at..at + block_bytes], d, &mut dequantized[i])
                            .expect("dequantize");
                    }
                }
            }
            let window_elems = kv_heads * 32 * d;
            let wins: Vec<u16> = (0..3 * window_elems)
                .map(|_| f16::from_f32(((next() % 2001) as f32 - 1000.0) * 1e-3).to_bits())
                .collect();
            // Key blocks: (0,0) filling in window 2; (1,1) quantized, window 0 kept;
            // (2,0) filling in window 1; the rest without windows.
            let mut table = vec![NO_WINDOW; num_blocks * per];
            table[0] = 2;
            table[per + 1] = QUANTIZED;
            table[2 * per] = 1;
            let mut input = format!(
                "{kv_heads} {num_blocks} {block_size} {d} {row_bytes} {} {} {} {}\n",
                bits.bits(),
                pool.len(),
                wins.len(),
                table.len()
            );
            for x in &pool {
                input.push_str(&format!("{x:x} "));
            }
            for x in &wins {
                input.push_str(&format!("{x:x} "));
            }
            for x in &table {
                input.push_str(&format!("{x:x} "));
            }
            input.push('\n');
            let text = harness.run(&input);
            let mut lines = text.lines();
            for h in 0..kv_heads {
                for b in 0..num_blocks {
                    for o in 0..block_size {
                        let (kb, j) = (o / 32, o % 32);
                        let e = table[b * per + kb];
                        let window_row = |w: u32| ((w as usize * kv_heads + h) * 32 + j) * d;
                        let line = lines.next().expect("a line per key");
                        let (kept, rest) = line.split_once(' ').expect("fields");
                        let (any, keys) = rest.split_once(' ').expect("fields");
                        let want_any = if e != NO_WINDOW {
                            window_row(e & !QUANTIZED) as i64
                        } else {
                            -1
                        };
                        assert_eq!(
                            any.parse::<i64>().expect("int"),
                            want_any,
                            "{dtype} {h} {b} {o}"
                        );
                        let want_kept = if e != NO_WINDOW && e & QUANTIZED != 0 {
                            window_row(e & !QUANTIZED) as i64
                        } else {
                            -1
                        };
                        assert_eq!(
                            kept.parse::<i64>().expect("int"),
                            want_kept,
                            "{dtype} {h} {b} {o}"
                        );
                        let want: Vec<u32> = if e != NO_WINDOW && e & QUANTIZED == 0 {
                            wins[window_row(e)..][..d]
                                .iter()
                                .map(|&x| f16::from_bits(x).to_f32().to_bits())
                                .collect()
                        } else {
                            dequantized[(h * num_blocks + b) * per + kb][j * d..][..d]
                                .iter()
                                .map(|x| x.to_bits())
                                .collect()
                        };
                        assert_eq!(
                            hex(Some(keys), u32::from_str_radix),
                            want,
                            "{dtype} {h} {b} {o}"
                        );
                    }
                }
            }
            assert_eq!(lines.next(), None);
        }
    }

    /// The asymmetric helpers (`asym_params`, `asym_code`) and the row loader `load_elem`
    /// of `common.cuh`, compiled for the host, against kv-quant's INT4 and INT2 rows: the
    /// harness packs groups as `write.cu` does (codes low bits first) and must produce
    /// kv-quant's bytes, and `load_elem` must read back kv-quant's dequantized values.
    #[test]
    fn host_check_of_the_asymmetric_rows() {
        use kv_quant::{Group, Kernels, RowFormat};
        let main = "int main(void) {\n\
              int fmt; unsigned g, d;\n\
              static float x[512]; static u8 row[1024];\n\
              while (scanf(\"%d %u %u\", &fmt, &g, &d) == 3) {\n\
                if (d > 512 || g == 0 || d % g) return 2;\n\
                for (unsigned i = 0; i < d; ++i) {\n\
                  unsigned u; if (scanf(\"%x\", &u) != 1) return 3; x[i] = __uint_as_float(u);\n\
                }\n\
                const u32 bits = asym_bits(fmt), levels = (1u << bits) - 1u, per = 8u / bits;\n\
                const u32 gb = group_bytes(fmt, g);\n\
                int ok = 1;\n\
                memset(row, 0xaa, d / g * gb);\n\
                for (u32 g0 = 0; g0 < d; g0 += g) {\n\
                  float lo = INFINITY, hi = -INFINITY;\n\
                  for (u32 i = 0; i < g; ++i) { lo = fminf(lo, x[g0 + i]); hi = fmaxf(hi, x[g0 + i]); }\n\
                  u16 s, m; u8* out = row + g0 / g * gb;\n\
                  if (!asym_params(lo, hi, levels, &s, &m)) { ok = 0; continue; }\n\
                  store_u16(out, s); store_u16(out + 2, m);\n\
                  for (u32 b = 0; b < g / per; ++b) {\n\
                    u32 byte = 0;\n\
                    for (u32 k = 0; k < per; ++k)\n\
                      byte |= asym_code(x[g0 + per * b + k], h2f(s), h2f(m), levels) << (k * bits);\n\
                    out[4 + b] = (u8)byte;\n\
                  }\n\
                }\n\
                printf(\"%d\", ok);\n\
                for (u32 i = 0; i < d / g * gb; ++i) printf(\" %02x\", row[i]);\n\
                printf(\"\\n\");\n\
                for (u32 i = 0; i < d; ++i)\n\
                  printf(i ? \" %08x\" : \"%08x\", __float_as_uint(load_elem(row, fmt, g, i)));\n\
                printf(\"\\n\");\n\
              }\n  return 0;\n}\n";
        let Some(harness) = HostHarness::build("asym", "", main) else {
            return;
        };
        let mut next = xorshift(0x9e37_79b9_7f4a_7c15);
        let mut cases = Vec::new();
        for case in 0..60 {
            let (fmt, code) = if case % 2 == 0 {
                (RowFormat::Int4 { group: Group::G32 }, 4)
            } else {
                (RowFormat::Int2 { group: Group::G32 }, 5)
            };
            let (fmt, g) = match case % 3 {
                0 => (fmt, 32),
                1 => (
                    match fmt {
                        RowFormat::Int4 { .. } => RowFormat::Int4 { group: Group::G64 },
                        _ => RowFormat::Int2 { group: Group::G64 },
                    },
                    64,
                ),
                _ => (
                    match fmt {
                        RowFormat::Int4 { .. } => RowFormat::Int4 { group: Group::G128 },
                        _ => RowFormat::Int2 { group: Group::G128 },
                    },
                    128,
                ),
            };
            let d = 128;
            let scale = [1e-3, 1.0, 300.0, 6e4][case / 15];
            let row: Vec<f32> = (0..d)
                .map(|i| match (case % 5, i % 9) {
                    (0, 0) => 0.0,
                    (1, _) => -0.0,
                    _ => ((next() % 20_001) as f32 - 10_000.0) * 1e-4 * scale,
                })
                .collect();
            cases.push((fmt, code, g, row));
        }
        let mut input = String::new();
        for (_, code, g, row) in &cases {
            input.push_str(&format!("{code} {g} {}\n", row.len()));
            for v in row {
                input.push_str(&format!("{:x} ", v.to_bits()));
            }
            input.push('\n');
        }
        let text = harness.run(&input);
        let mut lines = text.lines();
        let k = Kernels::best();
        for (n, (fmt, _, _, row)) in cases.iter().enumerate() {
            let mut want = vec![0u8; fmt.row_bytes(row.len()).expect("row bytes")];
            k.quantize_row(*fmt, row, &mut want).expect("quantize");
            let mut want_f = vec![0.0f32; row.len()];
            k.dequantize_row(*fmt, &want, &mut want_f)
                .expect("dequantize");
            let got = accepted_bytes(lines.next(), &format!("case {n}"));
            assert_eq!(got, want, "case {n} ({fmt:?}): bytes differ");
            let got_f = hex(lines.next(), u32::from_str_radix);
            let want_bits: Vec<u32> = want_f.iter().map(|v| v.to_bits()).collect();
            assert_eq!(got_f, want_bits, "case {n} ({fmt:?}): values differ");
        }
        assert_eq!(lines.next(), None);
    }

    /// `row_offset` of `common.cuh` (where every kernel finds a row, and `kivi.cu` a key
    /// block) compiled for the host, against the Rust geometry the pool is sized by
    /// (`plan::Geometry::row_offset`): the same byte offset for every coordinate, including
    /// pools past 4 GiB where the 32-bit arguments' products must be widened first.
    #[test]
    fn host_check_of_row_offsets() {
        use crate::plan::Geometry;
        let main = "int main(void) {\n\
              unsigned a[9];\n\
              while (scanf(\"%u %u %u %u %u %u %u %u %u\", &a[0], &a[1], &a[2], &a[3], &a[4],\n\
                           &a[5], &a[6], &a[7], &a[8]) == 9)\n\
                printf(\"%llu\\n\", (unsigned long long)row_offset(a[0], a[1], a[2], a[3], a[4],\n\
                                                                a[5], a[6], a[7], a[8]));\n\
              return 0;\n}\n";
        let Some(harness) = HostHarness::build("offsets", "", main) else {
            return;
        };
        let mut random = xorshift(0x5851_f42d_4c95_7f2d);
        let mut cases = Vec::new();
        // (layers, kv_heads, num_blocks, block_size, row_bytes): small pools, the Llama-2-7B
        // layer shapes, and pools far past 4 GiB.
        for (layers, kv_heads, num_blocks, block_size, row_bytes) in [
            (1, 1, 1, 1, 2),
            (2, 3, 7, 16, 128),
            (32, 32, 4096, 32, 256),
            (80, 8, 200_000, 32, 136),
            (1, 64, 1_000_000, 64, 520),
        ] {
            let g = Geometry {
                layers,
                kv_heads,
                num_blocks,
                block_size,
                row_bytes,
            };
            for i in 0..200u64 {
                let pick = |n: usize, r: u64| match i % 4 {
                    0 => 0,
                    1 => n - 1,
                    _ => (r % n as u64) as usize,
                };
                let c = (
                    pick(layers, random()),
                    pick(2, random()),
                    pick(kv_heads, random()),
                    pick(num_blocks, random()),
                    pick(block_size, random()),
                );
                cases.push((g, c));
            }
        }
        let input: String = cases
            .iter()
            .map(|(g, (l, w, h, b, s))| {
                format!(
                    "{l} {w} {h} {b} {s} {} {} {} {}\n",
                    g.kv_heads, g.num_blocks, g.block_size, g.row_bytes
                )
            })
            .collect();
        let text = harness.run(&input);
        let got: Vec<u64> = text.lines().map(|l| l.parse().expect("offset")).collect();
        assert_eq!(got.len(), cases.len());
        let mut past_4g = 0;
        for ((g, (l, w, h, b, s)), got) in cases.iter().zip(got) {
            let want = g.row_offset(*l, *w, *h, *b, *s) as u64;
            assert_eq!(got, want, "{g:?} at ({l}, {w}, {h}, {b}, {s})");
            past_4g += usize::from(want > u64::from(u32::MAX));
        }
        assert!(
            past_4g > 100,
            "the large pools reach past 4 GiB ({past_4g} cases)"
        );
    }

    /// The next f16 towards +infinity (`up`) or -infinity.
    fn next(h: half::f16, up: bool) -> half::f16 {
        let b = h.to_bits();
        let bits = match (b & 0x7fff == 0, b & 0x8000 == 0, up) {
            (true, _, true) => 0x0001,
            (true, _, false) => 0x8001,
            (false, true, true) | (false, false, false) => b + 1,
            (false, true, false) | (false, false, true) => b - 1,
        };
        half::f16::from_bits(bits)
    }

    /// kv-model's host `Sampler` for a given draw `u` (its `sample` after the draw), written
    /// out here because kv-model depends on this crate: the order "larger logit first, lower
    /// id on ties", top-k, f64 masses exp((l - max) / t), the nucleus over the normalised
    /// probabilities, then the first token whose cumulative probability exceeds u.
    fn host_sample(logits: &[f32], t: f32, k: Option<usize>, p: Option<f32>, u: f64) -> u32 {
        let mut c: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, l))
            .collect();
        c.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if let Some(k) = k {
            c.truncate(k);
        }
        let max = f64::from(c[0].1);
        let mut probs: Vec<f64> = c
            .iter()
            .map(|&(_, l)| ((f64::from(l) - max) / f64::from(t)).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= total);
        if let Some(top_p) = p {
            let mut cumulative = 0.0;
            let mut keep = probs.len();
            for (i, x) in probs.iter().enumerate() {
                cumulative += x;
                if cumulative >= f64::from(top_p) {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut u = u * total;
        for (i, x) in probs.iter().enumerate() {
            if u < *x {
                return c[i].0;
            }
            u -= x;
        }
        c[probs.len() - 1].0
    }

    /// `sample.cu`'s whole row algorithm (top-k, nucleus and draw as weighted radix selects
    /// over fixed-point masses) run with one "thread" by the host C compiler, against the host
    /// sampler for the same draw on random rows: ties, -inf, every cut.
    #[test]
    fn host_check_of_the_sampler() {
        let module = MODULES
            .iter()
            .find(|m| m.name == "sample")
            .expect("sample module")
            .body;
        // Input: one row per case, "n temperature_bits top_k top_p_bits shift u_bits" then the
        // n logits' bits; output: "status token".
        let main = r#"
int main(void) {
    unsigned n, tb, k, pb, shift; unsigned long long ub;
    static float row[1 << 16];
    SampleShared sh;
    u32 out[2];
    while (scanf("%u %x %u %x %u %llx", &n, &tb, &k, &pb, &shift, &ub) == 6) {
        for (unsigned i = 0; i < n; i++) { unsigned b; if (scanf("%x", &b) != 1) return 2; row[i] = __uint_as_float(b); }
        double u; memcpy(&u, &ub, 8);
        sample_row(row, n, __uint_as_float(tb), k, __uint_as_float(pb), shift, u, out, &sh, 0, 1);
        printf("%u %u\n", out[0], out[1]);
    }
    return 0;
}
"#;
        let Some(harness) = HostHarness::build("sample", module, main) else {
            return;
        };
        use crate::sample::{SampleParams, SamplePlan};
        let mut next = xorshift(0x0123_4567_89ab_cdef);
        let mut unit = || (next() >> 11) as f64 / (1u64 << 53) as f64;
        struct Case {
            logits: Vec<f32>,
            params: SampleParams,
            u: f64,
        }
        let mut cases = Vec::new();
        for case in 0..3000usize {
            let n = [1usize, 2, 3, 7, 64, 300, 1000, 5000][case % 8];
            let style = (case / 8) % 5;
            let logits: Vec<f32> = (0..n)
                .map(|i| {
                    let r = unit();
                    match style {
                        // Spread values.
                        0 => (r * 20.0 - 10.0) as f32,
                        // Few distinct values: many ties, ordered by id.
                        1 => (r * 6.0).floor() as f32 * 0.5,
                        // Some -inf ("never"), signed zeros.
                        2 if i % 3 == 1 => f32::NEG_INFINITY,
                        2 if i % 5 == 0 => -0.0,
                        2 => (r * 4.0) as f32,
                        // A peaked row: one dominant token.
                        3 if i == n / 2 => 30.0,
                        3 => (r * 2.0) as f32,
                        // Large magnitudes.
                        _ => ((r - 0.5) * 2e4) as f32,
                    }
                })
                .collect();
            let temperature = [0.3f32, 0.7, 1.0, 1.5, 5.0][case % 5];
            let top_k = [None, Some(1), Some(5), Some(40), Some(n + 3)][(case / 5) % 5];
            let top_p = [None, Some(0.5f32), Some(0.9), Some(1.0)][(case / 25) % 4];
            cases.push(Case {
                logits,
                params: SampleParams {
                    temperature,
                    top_k,
                    top_p,
                },
                u: unit(),
            });
        }
        let mut input = String::new();
        for c in &cases {
            let plan = SamplePlan::new(&c.params, 1, c.logits.len()).expect("plan");
            input += &format!(
                "{} {:x} {} {:x} {} {:x}",
                plan.vocab,
                plan.temperature_bits,
                plan.top_k,
                plan.top_p_bits,
                plan.shift,
                c.u.to_bits()
            );
            for l in &c.logits {
                input += &format!(" {:x}", l.to_bits());
            }
            input.push('\n');
        }
        let out = harness.run(&input);
        let mut lines = out.lines();
        let (mut near, mut exact) = (0, 0);
        for (i, c) in cases.iter().enumerate() {
            let got: Vec<u32> = lines
                .next()
                .expect("a line per case")
                .split(' ')
                .map(|v| v.parse().expect("decimal"))
                .collect();
            let SampleParams {
                temperature: t,
                top_k: k,
                top_p: p,
            } = c.params;
            let all_neg_inf = c.logits.iter().all(|l| *l == f32::NEG_INFINITY);
            if all_neg_inf {
                assert_eq!(got, [2, 0], "case {i}");
                continue;
            }
            assert_eq!(got[0], 0, "case {i}: status");
            let want = host_sample(&c.logits, t, k, p, c.u);
            if got[1] == want {
                exact += 1;
                continue;
            }
            // The one allowed difference: u within rounding of a bucket's edge (the kernel's
            // masses are fixed point, the host's f64 sums run in another order).
            let nudged = [c.u - 1e-7, c.u + 1e-7]
                .iter()
                .filter(|u| (0.0..1.0).contains(*u))
                .any(|&u| host_sample(&c.logits, t, k, p, u) == got[1]);
            assert!(
                nudged,
                "case {i}: kernel {} vs host {want} (n {}, {:?}, u {})",
                got[1],
                c.logits.len(),
                c.params,
                c.u
            );
            near += 1;
        }
        println!("sampler host check: {exact} exact, {near} at a bucket edge");
        assert!(
            near * 100 <= cases.len(),
            "{near} edge cases of {}",
            cases.len()
        );

        // Errors, as the host sampler's: NaN or +inf anywhere, all -inf.
        let errors = "3 3f800000 0 0 60 0 0 7fc00000 3f800000\n\
                      2 3f800000 0 0 61 0 7f800000 0\n\
                      2 3f800000 1 3f000000 61 0 ff800000 ff800000\n";
        assert_eq!(harness.run(errors), "1 0\n1 0\n2 0\n");
    }

    #[test]
    fn architectures_round_down() {
        assert_eq!(arch_for(9, 0), Some("compute_90"));
        assert_eq!(arch_for(8, 9), Some("compute_89"));
        assert_eq!(arch_for(8, 7), Some("compute_86"));
        assert_eq!(arch_for(12, 0), Some("compute_90"));
        assert_eq!(arch_for(6, 1), None);
    }
}
