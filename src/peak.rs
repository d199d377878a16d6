//! The CPU's arithmetic peak, measured: register-bound loops of independent fused multiply-adds
//! (f32) and bf16 dot products, on every thread at once. `fedbpt bench` reports each forward and
//! linear layer as a share of these: the vector units' peaks (AVX-512 or AVX2, and AVX-512
//! BF16) and, where the CPU has AMX, the tiles' bf16 peak (a loop of `tdpbf16ps` over four
//! accumulator tiles).

use std::time::Instant;

/// Measured peaks, in GFLOP/s over `threads` threads (a multiply-add counts as two).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Peak {
    pub threads: usize,
    /// The f32 loop's instruction set (`avx512f`, `avx2+fma`, or `scalar`).
    pub f32_kernel: &'static str,
    pub f32_gflops: f64,
    /// `None` without AVX-512 BF16.
    pub bf16_gflops: Option<f64>,
    /// AMX tiles, bf16; `None` without AMX.
    pub amx_bf16_gflops: Option<f64>,
}

/// Runs each loop on `threads` threads at once, best of three, about `seconds` per try.
pub fn measure(threads: usize, seconds: f64) -> Peak {
    let threads = threads.max(1);
    let f32_kernel = kernels::f32_name();
    let f32_gflops = best_rate(threads, seconds, kernels::f32_loop);
    let bf16_gflops = kernels::has_bf16().then(|| best_rate(threads, seconds, kernels::bf16_loop));
    let amx_bf16_gflops = crate::kernels::Kernel::Amx
        .available()
        .then(|| best_rate(threads, seconds, kernels::amx_loop));
    Peak { threads, f32_kernel, f32_gflops, bf16_gflops, amx_bf16_gflops }
}

/// `run(iters)` does `iters` rounds and returns the FLOPs done (and a value to keep alive).
fn best_rate(threads: usize, seconds: f64, run: fn(u64) -> (f64, f32)) -> f64 {
    // Calibrate on one thread: iterations for about `seconds`.
    let mut iters = 1u64 << 12;
    loop {
        let t = Instant::now();
        std::hint::black_box(run(iters));
        let dt = t.elapsed().as_secs_f64();
        if dt > seconds / 4.0 || iters > 1 << 40 {
            iters = ((iters as f64) * seconds / dt.max(1e-9)).max(1.0) as u64;
            break;
        }
        iters *= 4;
    }
    (0..3)
        .map(|_| {
            let t = Instant::now();
            let flops: f64 = std::thread::scope(|s| {
                let handles: Vec<_> = (0..threads)
                    .map(|_| s.spawn(move || std::hint::black_box(run(iters)).0))
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap_or(0.0)).sum()
            });
            flops / t.elapsed().as_secs_f64() / 1e9
        })
        .fold(0.0, f64::max)
}

#[cfg(target_arch = "x86_64")]
mod kernels {
    use std::arch::x86_64::*;

    /// Independent accumulators: enough to hide the latency of two units (4 cycles x 2).
    const ACC: usize = 16;

    pub fn f32_name() -> &'static str {
        if is_x86_feature_detected!("avx512f") {
            "avx512f"
        } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            "avx2+fma"
        } else {
            "scalar"
        }
    }

    pub fn has_bf16() -> bool {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
    }

    pub fn f32_loop(iters: u64) -> (f64, f32) {
        match f32_name() {
            // SAFETY: the features were detected above.
            "avx512f" => unsafe { fma512(iters) },
            "avx2+fma" => unsafe { fma256(iters) },
            _ => super::scalar_loop(iters),
        }
    }

    pub fn bf16_loop(iters: u64) -> (f64, f32) {
        if has_bf16() {
            // SAFETY: avx512f and avx512bf16 were detected.
            unsafe { dpbf16(iters) }
        } else {
            (0.0, 0.0)
        }
    }

    pub fn amx_loop(iters: u64) -> (f64, f32) {
        (crate::kernels::amx_peak_loop(iters).unwrap_or(0.0), 0.0)
    }

    #[target_feature(enable = "avx512f")]
    fn fma512(iters: u64) -> (f64, f32) {
        let (a, b) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
        let mut acc = [_mm512_set1_ps(1.0); ACC];
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm512_fmadd_ps(*x, a, b);
            }
        }
        let sum = acc.iter().fold(_mm512_setzero_ps(), |s, x| _mm512_add_ps(s, *x));
        ((iters * ACC as u64 * 16 * 2) as f64, _mm512_reduce_add_ps(sum))
    }

    #[target_feature(enable = "avx2,fma")]
    fn fma256(iters: u64) -> (f64, f32) {
        // 12 of the 16 ymm registers: the rest hold the constants.
        let (a, b) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
        let mut acc = [_mm256_set1_ps(1.0); 12];
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm256_fmadd_ps(*x, a, b);
            }
        }
        let mut out = [0f32; 8];
        let sum = acc.iter().fold(_mm256_setzero_ps(), |s, x| _mm256_add_ps(s, *x));
        // SAFETY: `out` holds 8 floats.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), sum) };
        ((iters * 12 * 8 * 2) as f64, out.iter().sum())
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    fn dpbf16(iters: u64) -> (f64, f32) {
        // Pairs of bf16 ones and tiny values: each dot product adds 32 pairs' products.
        let x = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-3), _mm512_set1_ps(1e-3));
        let y = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1.0), _mm512_set1_ps(1.0));
        let mut acc = [_mm512_setzero_ps(); ACC];
        for _ in 0..iters {
            for a in acc.iter_mut() {
                *a = _mm512_dpbf16_ps(*a, x, y);
            }
        }
        let sum = acc.iter().fold(_mm512_setzero_ps(), |s, v| _mm512_add_ps(s, *v));
        // 16 lanes x 2 pairs x (multiply + add).
        ((iters * ACC as u64 * 16 * 2 * 2) as f64, _mm512_reduce_add_ps(sum))
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod kernels {
    pub fn f32_name() -> &'static str {
        "scalar"
    }
    pub fn has_bf16() -> bool {
        false
    }
    pub fn f32_loop(iters: u64) -> (f64, f32) {
        super::scalar_loop(iters)
    }
    pub fn bf16_loop(_: u64) -> (f64, f32) {
        (0.0, 0.0)
    }
    pub fn amx_loop(_: u64) -> (f64, f32) {
        (0.0, 0.0)
    }
}

/// Eight independent scalar multiply-adds per iteration (the compiler may vectorize them).
#[allow(dead_code)]
fn scalar_loop(iters: u64) -> (f64, f32) {
    let mut acc = [1f32; 8];
    for _ in 0..iters {
        for x in acc.iter_mut() {
            *x = x.mul_add(0.999_999, 1e-7);
        }
    }
    ((iters * 8 * 2) as f64, acc.iter().sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loops_count_what_they_compute() {
        // (1 * a + b) iterated: each accumulator follows the same recurrence, so the returned
        // sum pins that every lane ran every iteration.
        let n = 1000u64;
        let mut v = 1f32;
        for _ in 0..n {
            v = v.mul_add(0.999_999, 1e-7);
        }
        let (flops, sum) = kernels::f32_loop(n);
        let lanes = flops / (2.0 * n as f64);
        assert!(lanes >= 8.0, "{lanes}");
        assert!((sum / lanes as f32 - v).abs() < 1e-4, "{sum} / {lanes} vs {v}");
        if kernels::has_bf16() {
            let (flops, sum) = kernels::bf16_loop(n);
            // 16 accumulators x 16 lanes, each adding 2 x (1e-3 in bf16) per iteration.
            let per = crate::kernels::from_bf16(crate::kernels::to_bf16(1e-3));
            assert_eq!(flops, (n * 16 * 16 * 4) as f64);
            let want = 16.0 * 16.0 * 2.0 * per * n as f32;
            assert!((sum - want).abs() / want < 1e-2, "{sum} vs {want}");
        }
        let p = measure(1, 0.01);
        assert!(p.f32_gflops > 0.0 && p.threads == 1);
    }
}
