//! The one linear-layer type every model uses ([`Linear`]) and how its weights are held: the
//! choice a config makes ([`WeightFormat`]) and what it resolves to on a device
//! ([`LinearFormat`]).

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use serde::{Deserialize, Serialize};

use crate::kernels::{self, ops, Kernel, PackedLinear};
use crate::{Error, Result};

/// How the weights of the linear layers are held in memory and multiplied (config key
/// `weights`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum WeightFormat {
    /// bf16 on the fastest kernel this CPU has ([`kernels::active`]); f32 where that kernel
    /// would be the portable loop (slower than candle's f32 gemm) and off the CPU.
    #[default]
    Auto,
    /// f32 (GGUF weights dequantized), multiplied with candle's f32 gemm.
    F32,
    /// bf16 on the CPU's fastest kernel (or `FEDBPT_KERNEL`'s), each matmul's input rounded to
    /// bf16, f32 accumulation ([`crate::kernels`]). CPU only.
    Bf16,
    /// GGUF only: kept in the file's quantization, multiplied with candle's quantized matmul.
    Quantized,
}

/// A [`WeightFormat`] resolved for a device: what the layers are built as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinearFormat {
    F32,
    Quantized,
    /// bf16, packed for this kernel.
    Packed(Kernel),
}

impl LinearFormat {
    /// The name the summary and the bench record: `f32`, `quantized` or `bf16-<kernel>`.
    pub fn name(self) -> String {
        match self {
            LinearFormat::F32 => "f32".into(),
            LinearFormat::Quantized => "quantized".into(),
            LinearFormat::Packed(k) => format!("bf16-{}", k.name()),
        }
    }
}

impl WeightFormat {
    /// What the layers are built as on `device`; errors name the config key `weights` (or
    /// `FEDBPT_KERNEL`).
    pub fn resolve(self, device: &Device) -> Result<LinearFormat> {
        let kernel = || kernels::active().map_err(|e| Error::config("weights", e));
        Ok(match self {
            WeightFormat::F32 => LinearFormat::F32,
            WeightFormat::Quantized => LinearFormat::Quantized,
            WeightFormat::Bf16 if !device.is_cpu() => {
                return Err(Error::config(
                    "weights",
                    "bf16 is implemented for the CPU only; use f32 or auto on this device",
                ))
            }
            WeightFormat::Bf16 => LinearFormat::Packed(kernel()?),
            WeightFormat::Auto if !device.is_cpu() => LinearFormat::F32,
            WeightFormat::Auto => match kernel()? {
                Kernel::Portable if !kernels::forced() => LinearFormat::F32,
                k => LinearFormat::Packed(k),
            },
        })
    }
}

/// One linear layer `y = x . W^T (+ b)`, `W` `[out, in]`, in the form its format asks for.
#[derive(Debug)]
pub enum Linear {
    F32 {
        weight: Tensor,
        bias: Option<Tensor>,
    },
    /// GGUF layers kept quantized (no bias).
    Quant(QMatMul),
    Packed(PackedLinear),
}

impl Linear {
    /// An f32 `weight` (and `bias`) built as `format`; `Quantized` is refused (it applies to
    /// GGUF files' own layers only).
    pub fn new(weight: Tensor, bias: Option<Tensor>, format: LinearFormat) -> Result<Self> {
        match format {
            LinearFormat::F32 => Ok(Linear::F32 { weight, bias }),
            LinearFormat::Packed(kernel) => {
                Ok(Linear::Packed(PackedLinear::from_tensors(&weight, bias.as_ref(), kernel)?))
            }
            LinearFormat::Quantized => Err(Error::config(
                "weights",
                "`quantized` applies to GGUF files only; use auto, f32 or bf16",
            )),
        }
    }

    /// A GGUF tensor built as `format`.
    pub fn from_qtensor(q: QTensor, format: LinearFormat, device: &Device) -> Result<Self> {
        match format {
            LinearFormat::Quantized => Ok(Linear::Quant(QMatMul::from_qtensor(q)?)),
            _ => Self::new(q.dequantize(device)?, None, format),
        }
    }

    /// Re-packs the layer for `kernel` (an f32 layer is packed; a quantized one, or a kernel
    /// this CPU cannot run, is refused).
    pub fn pack(&mut self, kernel: Kernel) -> Result<()> {
        if !kernel.available() {
            return Err(Error::Model(format!("this CPU cannot run the {} kernel", kernel.name())));
        }
        *self = match self {
            Linear::F32 { weight, bias } => {
                Linear::Packed(PackedLinear::from_tensors(weight, bias.as_ref(), kernel)?)
            }
            Linear::Packed(p) => Linear::Packed(p.with_kernel(kernel)),
            Linear::Quant(_) => {
                return Err(Error::Model(
                    "quantized layers cannot be switched to bf16; load with weights = bf16".into(),
                ))
            }
        };
        Ok(())
    }

    /// The packed layer, if the layer is packed.
    pub fn packed(&self) -> Option<&PackedLinear> {
        match self {
            Linear::Packed(p) => Some(p),
            _ => None,
        }
    }

    /// `x` is `[rows, in]`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Linear::F32 { weight, bias } => ops::linear(x, weight, bias.as_ref()),
            Linear::Quant(q) => q.forward(x),
            Linear::Packed(p) => p.forward(x),
        }
    }
}
