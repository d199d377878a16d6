//! Speed of one linear layer at BBT's shapes: candle's f32 gemm (with the bias in the
//! accumulator, as the BERT forward runs it) against the bf16 kernel.
//!
//! `cargo run --release --example bf16_linear`

use std::time::Instant;

use candle_core::{Device, Tensor};
use fedbpt::models::{bf16, ops};

fn best_of(iters: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..iters)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    println!("fast bf16 kernel on this CPU: {}", bf16::has_fast_kernel());
    // (rows, inputs, outputs): MiniLM's QKV, FFN up and down at 32 sentences x 30 tokens and at
    // 20 candidates' worth; SmolLM2's gate/up and down at 64 x 10 rows.
    for (rows, inputs, outputs) in [
        (960, 384, 1152),
        (960, 384, 1536),
        (960, 1536, 384),
        (19200, 384, 1536),
        (640, 576, 1536),
        (640, 1536, 576),
    ] {
        let x = Tensor::randn(0f32, 1.0, (rows, inputs), &dev)?;
        let w = Tensor::randn(0f32, 0.05, (outputs, inputs), &dev)?;
        let b = Tensor::zeros(outputs, candle_core::DType::F32, &dev)?;
        let packed = bf16::Bf16Linear::from_tensors(&w, Some(&b))?;
        let flops = 2.0 * (rows * inputs * outputs) as f64;
        let f32_s = best_of(5, || {
            ops::linear(&x, &w, Some(&b)).map(drop).ok();
        });
        let bf16_s = best_of(5, || {
            packed.forward(&x).map(drop).ok();
        });
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let portable_s = best_of(2, || {
            packed.forward_portable(&xs, rows);
        });
        println!(
            "[{rows} x {inputs}] -> {outputs}: f32 {:.0} GFLOP/s, bf16 {:.0} GFLOP/s ({:.2}x), \
             bf16 portable loop {:.0} GFLOP/s",
            flops / f32_s / 1e9,
            flops / bf16_s / 1e9,
            f32_s / bf16_s,
            flops / portable_s / 1e9,
        );
    }
    Ok(())
}
