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
        use std::io::Write;
        use std::process::{Command, Stdio};
        let dir = std::env::temp_dir().join(format!("kv-cuda-host-check-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let c = dir.join("check.c");
        let exe = dir.join("check");
        let harness = format!(
            "#include <stdio.h>\n#include <string.h>\n#include <stdbool.h>\n\
             #define KV_HOST_CHECK 1\n#define __device__ static\n#define __forceinline__ inline\n\
             #define __fmul_rn(a, b) ((a) * (b))\n#define __fadd_rn(a, b) ((a) + (b))\n\
             static long long __double_as_longlong(double d) {{ long long x; memcpy(&x, &d, 8); return x; }}\n\
             static unsigned __float_as_uint(float f) {{ unsigned x; memcpy(&x, &f, 4); return x; }}\n\
             static float __uint_as_float(unsigned u) {{ float f; memcpy(&f, &u, 4); return f; }}\n\
             float h2f(unsigned short h) {{\n\
               unsigned sign = (unsigned)(h & 0x8000) << 16, rest = h & 0x7fff;\n\
               float m = rest >= 0x7c00 ? __uint_as_float(0x7f800000u | ((rest & 0x3ff) << 13))\n\
                                        : __uint_as_float(rest << 13) * __uint_as_float(0x77800000u);\n\
               return __uint_as_float(__float_as_uint(m) | sign);\n}}\n\
             {COMMON}\n\
             int main(void) {{\n\
               unsigned long long b;\n\
               while (scanf(\"%llx\", &b) == 1) {{\n\
                 double v; memcpy(&v, &b, 8); float f = (float)v;\n\
                 printf(\"%04x %04x %04x %04x\\n\", f64_to_f16_rn(v), f16_ceil(v), f16_floor(v), f2bf_rn(f));\n\
               }}\n  return 0;\n}}\n"
        );
        std::fs::write(&c, harness).expect("write harness");
        let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
        let built = Command::new(&cc)
            .args(["-O1", "-std=c99", "-o"])
            .arg(&exe)
            .arg(&c)
            .status();
        match built {
            Ok(st) if st.success() => {}
            Ok(st) => panic!(
                "{cc} could not compile common.cuh's helpers ({st}): {}",
                c.display()
            ),
            Err(e) => {
                println!("SKIPPED host check of common.cuh: no C compiler ({cc}: {e})");
                return;
            }
        }
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
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
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
        let mut child = Command::new(&exe)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("run harness");
        let mut stdin = child.stdin.take().expect("stdin");
        let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
        let out = child.wait_with_output().expect("harness output");
        writer.join().expect("writer").expect("write input");
        let text = String::from_utf8(out.stdout).expect("utf-8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), values.len());
        for (v, line) in values.iter().zip(lines) {
            let got: Vec<u16> = line
                .split(' ')
                .map(|h| u16::from_str_radix(h, 16).expect("hex"))
                .collect();
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
        let _ = std::fs::remove_dir_all(&dir);
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

    #[test]
    fn architectures_round_down() {
        assert_eq!(arch_for(9, 0), Some("compute_90"));
        assert_eq!(arch_for(8, 9), Some("compute_89"));
        assert_eq!(arch_for(8, 7), Some("compute_86"));
        assert_eq!(arch_for(12, 0), Some("compute_90"));
        assert_eq!(arch_for(6, 1), None);
    }
}
