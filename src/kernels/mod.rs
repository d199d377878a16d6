//! The CPU kernels every model runs on: the linear layer's matrix kernels, chosen at run time by
//! what the CPU has, and the element-wise and attention kernels ([`ops`]).
//!
//! The linear layers ([`PackedLinear`]) hold their weights as bf16, packed once at load into
//! panels of [`NR`] output columns (see [`packed`]), round each matmul's input to bf16 and
//! accumulate in f32. One packing serves every kernel:
//! - [`Kernel::Amx`]: AMX tiles (`tdpbf16ps`), 16 rows x 48 columns per block;
//! - [`Kernel::Avx512Bf16`]: `vdpbf16ps`, 8 rows x 48 columns;
//! - [`Kernel::Avx2`]: f32 FMA over the bf16 weights widened to f32 once per panel and task;
//! - [`Kernel::Portable`]: plain loops.
//!
//! AVX-512 BF16, AVX2 and the portable loop add the same exact products in the same order, so
//! they give the same bits; AMX sums its pairs in its own order (agreement to f32 rounding).
//! `FEDBPT_KERNEL=amx|avx512bf16|avx2|portable` forces one (it must be available); otherwise
//! the fastest one that this CPU has and that passes a self-check on first use runs.

use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

pub mod cpu;
mod layout;
pub mod ops;
mod packed;
mod tiles;

pub use layout::{from_bf16, to_bf16, MAX_TILE_ROWS, NR};
pub use packed::{forward_shared, forward_swiglu, PackedLinear};

/// The environment variable that forces a kernel.
pub const KERNEL_VAR: &str = "FEDBPT_KERNEL";

/// A matrix kernel for the packed linear layers, fastest first in [`Kernel::ALL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kernel {
    Amx,
    #[serde(rename = "avx512bf16")]
    Avx512Bf16,
    Avx2,
    Portable,
}

impl Kernel {
    /// Fastest first.
    pub const ALL: [Kernel; 4] = [Kernel::Amx, Kernel::Avx512Bf16, Kernel::Avx2, Kernel::Portable];

    /// The name `FEDBPT_KERNEL`, the summary and the bench use.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Amx => "amx",
            Kernel::Avx512Bf16 => "avx512bf16",
            Kernel::Avx2 => "avx2",
            Kernel::Portable => "portable",
        }
    }

    pub fn parse(name: &str) -> Option<Kernel> {
        Kernel::ALL.into_iter().find(|k| k.name() == name.trim().to_ascii_lowercase())
    }

    /// Whether this CPU (and, for AMX, the OS) can run it.
    pub fn available(self) -> bool {
        let f = cpu::features();
        match self {
            Kernel::Amx => f.amx_bf16,
            Kernel::Avx512Bf16 => f.avx512_bf16,
            Kernel::Avx2 => f.avx2_fma,
            Kernel::Portable => true,
        }
    }

    /// The kernels this CPU can run, fastest first.
    pub fn available_all() -> Vec<Kernel> {
        Kernel::ALL.into_iter().filter(|k| k.available()).collect()
    }

    /// Checks the kernel against the portable loop on a small layer with ragged edges (rows and
    /// columns past a block, an odd input width): a kernel that fails is not used.
    pub fn self_check(self) -> Result<(), String> {
        if !self.available() {
            return Err(format!("this CPU cannot run the {} kernel", self.name()));
        }
        packed::self_check(self)
    }
}

/// The kernel this process's packed layers use: `FEDBPT_KERNEL`'s if set (an error if unknown,
/// unavailable or failing its self-check), else the fastest available one that passes its
/// self-check. Decided once per process.
pub fn active() -> Result<Kernel, String> {
    static ACTIVE: OnceLock<Result<Kernel, String>> = OnceLock::new();
    ACTIVE.get_or_init(|| choose(std::env::var(KERNEL_VAR).ok().as_deref())).clone()
}

/// The FLOPs of a register-bound loop of `iters` x 4 AMX bf16 tile products (for the measured
/// peak), or `None` where AMX is not available.
pub fn amx_peak_loop(iters: u64) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    if Kernel::Amx.available() {
        // SAFETY: AMX is available and permitted (checked just above).
        return Some(unsafe { tiles::amx_peak_loop(iters) });
    }
    let _ = iters;
    None
}

/// Whether `FEDBPT_KERNEL` forces a kernel in this process.
pub fn forced() -> bool {
    std::env::var_os(KERNEL_VAR).is_some_and(|v| !v.is_empty())
}

fn choose(forced: Option<&str>) -> Result<Kernel, String> {
    match forced.filter(|v| !v.is_empty()) {
        Some(name) => {
            let kernel = Kernel::parse(name).ok_or_else(|| {
                format!("{KERNEL_VAR}=`{name}` is not one of amx, avx512bf16, avx2, portable")
            })?;
            kernel.self_check().map_err(|e| format!("{KERNEL_VAR}={name}: {e}"))?;
            Ok(kernel)
        }
        None => {
            for kernel in Kernel::available_all() {
                match kernel.self_check() {
                    Ok(()) => return Ok(kernel),
                    Err(e) => tracing::warn!("kernel {} not used: {e}", kernel.name()),
                }
            }
            Err("no kernel passed its self-check (not even the portable loop)".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_or_unavailable_forced_kernels_are_refused() {
        for k in Kernel::ALL {
            assert_eq!(Kernel::parse(k.name()), Some(k));
            let json = serde_json::to_string(&k).unwrap();
            assert_eq!(json, format!("\"{}\"", k.name()));
        }
        assert_eq!(Kernel::parse(" AVX2 "), Some(Kernel::Avx2));
        let e = choose(Some("sse9")).unwrap_err();
        assert!(e.contains("FEDBPT_KERNEL") && e.contains("sse9"), "{e}");
        assert_eq!(choose(Some("portable")), Ok(Kernel::Portable));
        for k in Kernel::ALL {
            match choose(Some(k.name())) {
                Ok(got) => assert!(k.available() && got == k),
                Err(e) => {
                    assert!(!k.available(), "{} is available but refused: {e}", k.name());
                    assert!(e.contains("cannot run"), "{e}");
                }
            }
        }
        // Unforced, the fastest available kernel (every available one passes here).
        assert_eq!(choose(None), Ok(Kernel::available_all()[0]));
        assert!(Kernel::Portable.available());
    }
}
