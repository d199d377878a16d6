//! The benchmarks: forwards against their peers, tracing, the wire, many clients.

use fedbpt::peak::Peak;

pub mod cluster;
pub mod forward;
pub mod peers;
pub mod scale;
pub mod trace;

/// `gflops` as a share of the measured peak of the unit `format` runs on: the f32 FMA peak for
/// f32 and the AVX2 and portable kernels (which multiply in f32), the `vdpbf16ps` peak for
/// AVX-512 BF16, the tiles' for AMX; none for formats without one.
pub(crate) fn share(peak: Option<&Peak>, format: &str, gflops: f64) -> Option<f64> {
    let peak = peak?;
    match format {
        "f32" | "bf16-avx2" | "bf16-portable" => Some(gflops / peak.f32_gflops),
        "bf16-avx512bf16" => peak.bf16_gflops.map(|p| gflops / p),
        "bf16-amx" => peak.amx_bf16_gflops.map(|p| gflops / p),
        _ => None,
    }
}
