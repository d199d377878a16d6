//! The linear layers of the decoder and how their weights are held: [`WeightFormat`] (the
//! choice a caller makes) and [`Linear`] (f32, kept in a GGUF quantization, or packed bf16).

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use serde::{Deserialize, Serialize};

use crate::models::bf16::Bf16Linear;
use crate::{Error, Result};

/// How the weights of the linear layers are held in memory and multiplied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum WeightFormat {
    /// f32 (GGUF weights dequantized), multiplied with candle's f32 gemm.
    #[default]
    F32,
    /// bf16, each matmul's input rounded to bf16, f32 accumulation ([`crate::models::bf16`]):
    /// about twice the f32 speed on CPUs with AVX-512 BF16. CPU only.
    Bf16,
    /// GGUF only: kept in the file's quantization, multiplied with candle's quantized matmul.
    Quantized,
}

/// One linear layer's weight `[out, in]`, in the form its [`WeightFormat`] asks for.
#[derive(Debug)]
pub(super) enum Linear {
    Dense(Tensor),
    Quant(QMatMul),
    Bf16(Bf16Linear),
}

impl Linear {
    pub(super) fn from_qtensor(q: QTensor, format: WeightFormat, device: &Device) -> Result<Self> {
        Ok(match format {
            WeightFormat::F32 => Linear::Dense(q.dequantize(device)?),
            WeightFormat::Quantized => Linear::Quant(QMatMul::from_qtensor(q)?),
            WeightFormat::Bf16 => {
                let mut dense = Linear::Dense(q.dequantize(device)?);
                dense.pack_bf16()?;
                dense
            }
        })
    }

    /// Packs an f32 layer for bf16 multiplication; a quantized layer stays as it is (the
    /// caller refuses that case).
    pub(super) fn pack_bf16(&mut self) -> Result<()> {
        if let Linear::Dense(w) = self {
            if !w.device().is_cpu() {
                return Err(Error::Model("bf16 weights are implemented for the CPU only".into()));
            }
            *self = Linear::Bf16(Bf16Linear::from_tensors(w, None)?);
        }
        Ok(())
    }

    /// `x` is `[rows, in]`.
    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Linear::Dense(w) => x.matmul(&w.t()?)?,
            Linear::Quant(q) => q.forward(x)?,
            Linear::Bf16(b) => b.forward(x)?,
        })
    }
}
