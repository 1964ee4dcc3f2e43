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

    #[test]
    fn architectures_round_down() {
        assert_eq!(arch_for(9, 0), Some("compute_90"));
        assert_eq!(arch_for(8, 9), Some("compute_89"));
        assert_eq!(arch_for(8, 7), Some("compute_86"));
        assert_eq!(arch_for(12, 0), Some("compute_90"));
        assert_eq!(arch_for(6, 1), None);
    }
}
