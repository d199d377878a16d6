//! What this CPU can run, detected once per process.
//!
//! AMX needs three things: the CPU's CPUID bits, the OS saving tile state (XCR0 bits 17 and 18),
//! and Linux's per-process permission, which a process asks for with
//! `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)` before its first tile instruction
//! (without it the first one faults). `is_x86_feature_detected!("amx-tile")` is not stable, so
//! the bits are read here directly.

use std::sync::OnceLock;

/// The instruction sets the kernels use, as this process may run them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    /// AVX-512 F, BW, DQ and VL (and FMA).
    pub avx512f: bool,
    pub avx2_fma: bool,
    pub avx512_bf16: bool,
    /// AMX tiles with bf16 products, permission granted.
    pub amx_bf16: bool,
}

/// This CPU's features (detected on first use).
pub fn features() -> Features {
    static FEATURES: OnceLock<Features> = OnceLock::new();
    *FEATURES.get_or_init(detect)
}

/// The widest vectors the element-wise and attention kernels use in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VectorLevel {
    Avx512,
    Avx2,
    Baseline,
}

/// AVX-512 where the CPU has it, unless `FEDBPT_KERNEL` holds the linear layers to AVX2 or the
/// portable loop (then the whole forward runs as on a CPU without AVX-512, so that a forced
/// level measures that kind of machine); AVX2 and FMA where the CPU has those; else baseline.
pub fn vector_level() -> VectorLevel {
    static LEVEL: OnceLock<VectorLevel> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let f = features();
        let held_below_avx512 = super::forced()
            && matches!(super::active(), Ok(super::Kernel::Avx2 | super::Kernel::Portable));
        if f.avx512f && !held_below_avx512 {
            VectorLevel::Avx512
        } else if f.avx2_fma {
            VectorLevel::Avx2
        } else {
            VectorLevel::Baseline
        }
    })
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Features {
    Features {
        avx512f: is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512dq")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("fma"),
        avx2_fma: is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
        avx512_bf16: is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16"),
        amx_bf16: amx::cpu_has_it() && amx::os_saves_tiles() && amx::request_permission(),
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Features {
    Features { avx512f: false, avx2_fma: false, avx512_bf16: false, amx_bf16: false }
}

#[cfg(target_arch = "x86_64")]
mod amx {
    use std::arch::x86_64::{__cpuid, __cpuid_count, _xgetbv};

    /// CPUID leaf 7: AMX-TILE (EDX bit 24) and AMX-BF16 (EDX bit 22).
    pub(super) fn cpu_has_it() -> bool {
        // Leaf 0 says how many leaves there are.
        let max_leaf = __cpuid(0).eax;
        if max_leaf < 7 {
            return false;
        }
        let edx = __cpuid_count(7, 0).edx;
        edx & (1 << 24) != 0 && edx & (1 << 22) != 0
    }

    /// XCR0 bits 17 (tile configuration) and 18 (tile data): the OS saves tile state.
    pub(super) fn os_saves_tiles() -> bool {
        let osxsave = __cpuid(1).ecx & (1 << 27) != 0;
        if !osxsave {
            return false;
        }
        #[target_feature(enable = "xsave")]
        fn xcr0() -> u64 {
            // SAFETY: the OS enabled XGETBV (OSXSAVE, checked by the caller).
            unsafe { _xgetbv(0) }
        }
        // SAFETY: OSXSAVE implies XSAVE support.
        let xcr0 = unsafe { xcr0() };
        xcr0 & (3 << 17) == 3 << 17
    }

    /// Asks Linux for tile state in this process (granted once for all its threads).
    pub(super) fn request_permission() -> bool {
        #[cfg(target_os = "linux")]
        {
            const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
            const XFEATURE_XTILEDATA: libc::c_long = 18;
            // SAFETY: a plain system call with integer arguments.
            let rc = unsafe {
                libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)
            };
            rc == 0
        }
        #[cfg(not(target_os = "linux"))]
        {
            false
        }
    }
}
