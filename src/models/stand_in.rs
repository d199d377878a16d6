//! A stand-in backend for testing and profiling the runtime (faults, quorum, retries, resume,
//! scale) in seconds: it costs next to nothing and is deterministic, but it is not a language
//! model. Its class scores are built from the labels it is given, so its accuracies say nothing
//! about any method; never report them.
//!
//! Each example gets a pseudo-random score per class from a hash of its text; the true class
//! also gets `gain * <prompt, u>`, with `u` a fixed direction, so that a search over the prompt
//! can raise accuracy and a perturbed copy (whose texts hash differently and whose signal is
//! scaled by `1 - rate`) fits worse. Enabled by the `stand-in` feature; `model_name =
//! "stand-in"` selects it.

use std::time::Duration;

use crate::data::Example;
use crate::models::{downcast, ModelInfo, Prepared, PromptModel, PromptSettings, TokenNoise};
use crate::seeds::derive;
use crate::task::TaskSpec;
use crate::{Error, Result};

/// Hidden size of the stand-in's prompt vectors.
pub const STAND_IN_HIDDEN: usize = 8;

/// The stand-in backend.
pub struct StandIn {
    info: ModelInfo,
    settings: PromptSettings,
    /// Sleep per scored (example, prompt) pair, to mimic a forward's cost.
    pub delay_per_pair: Duration,
}

struct StandInBatch {
    /// Per example: label, one noise score per class, and the signal's scale.
    rows: Vec<(usize, Vec<f32>, f32)>,
    n_classes: usize,
}

impl StandIn {
    pub fn new(settings: PromptSettings) -> Self {
        let info = ModelInfo {
            name: "stand-in".into(),
            family: "stand-in".into(),
            hidden_size: STAND_IN_HIDDEN,
            vocab_size: 1000,
            n_params: 0,
            embedding_std: 1.0,
        };
        Self { info, settings, delay_per_pair: Duration::ZERO }
    }

    fn signal(&self, prompt: &[f32]) -> f32 {
        // <prompt, u> with u = (1, -1, 1, -1, ...) / sqrt(len).
        let len = prompt.len().max(1) as f32;
        prompt.iter().enumerate().map(|(i, p)| if i % 2 == 0 { *p } else { -*p }).sum::<f32>()
            / len.sqrt()
    }
}

fn text_hash(text: &str, seed: u64) -> u64 {
    text.bytes()
        .fold(seed ^ 0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

impl PromptModel for StandIn {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn settings(&self) -> &PromptSettings {
        &self.settings
    }

    fn prepare(
        &self,
        task: &TaskSpec,
        examples: &[Example],
        noise: Option<TokenNoise>,
    ) -> Result<Prepared> {
        let n_classes = task.n_classes();
        let salt = noise.map_or(0, |n| n.seed);
        let scale = noise.map_or(1.0, |n| 1.0 - n.rate);
        let mut rows = Vec::with_capacity(examples.len());
        for (i, e) in examples.iter().enumerate() {
            if e.label >= n_classes {
                return Err(Error::Task(format!(
                    "example {i} has label {} but the task has {n_classes} classes",
                    e.label
                )));
            }
            let h = text_hash(&e.text, salt);
            let noise: Vec<f32> = (0..n_classes as u64)
                .map(|c| (derive(h, &[c]) >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
                .collect();
            rows.push((e.label, noise, scale));
        }
        Ok(Prepared {
            labels: examples.iter().map(|e| e.label).collect(),
            n_classes,
            tokens_per_pass: examples.len(),
            inner: Box::new(StandInBatch { rows, n_classes }),
        })
    }

    fn scores(&self, batch: &Prepared, prompt: Option<&[f32]>) -> Result<Vec<Vec<f32>>> {
        let b = downcast::<StandInBatch>(batch, "stand-in")?;
        let want = self.settings.n_prompt_tokens * STAND_IN_HIDDEN;
        let s = match prompt {
            Some(p) if p.len() != want => {
                return Err(Error::Model(format!("prompt has {} values, expected {want}", p.len())))
            }
            Some(p) => self.signal(p),
            None => 0.0,
        };
        if !self.delay_per_pair.is_zero() {
            std::thread::sleep(self.delay_per_pair * b.rows.len() as u32);
        }
        Ok(b.rows
            .iter()
            .map(|(label, noise, scale)| {
                (0..b.n_classes)
                    .map(|c| noise[c] + if c == *label { scale * s } else { 0.0 })
                    .collect()
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objective::accuracy;

    #[test]
    fn the_signal_direction_raises_accuracy_and_noise_weakens_it() {
        let settings = PromptSettings {
            n_prompt_tokens: 2,
            mode: Default::default(),
            placement: Default::default(),
            placeholder: None,
        };
        let m = StandIn::new(settings);
        let task = TaskSpec::builtin("mr").unwrap();
        let exs: Vec<Example> = (0..200)
            .map(|i| Example { text: format!("review {i}"), text_b: None, label: i % 2 })
            .collect();
        let clean = m.prepare(&task, &exs, None).unwrap();
        let zero = vec![0.0; 16];
        let good: Vec<f32> = (0..16).map(|i| if i % 2 == 0 { 0.3 } else { -0.3 }).collect();
        let a0 = accuracy(&m.scores(&clean, Some(&zero)).unwrap(), &clean.labels);
        let a1 = accuracy(&m.scores(&clean, Some(&good)).unwrap(), &clean.labels);
        assert!((0.35..0.65).contains(&a0), "{a0}");
        assert!(a1 > 0.9, "{a1}");
        let noisy = m.prepare(&task, &exs, Some(TokenNoise { rate: 0.5, seed: 3 })).unwrap();
        let a2 = accuracy(&m.scores(&noisy, Some(&good)).unwrap(), &noisy.labels);
        assert!(a2 < a1, "{a2} vs {a1}");
        assert_eq!(m.scores(&clean, Some(&good)).unwrap(), m.scores(&clean, Some(&good)).unwrap());
        assert!(m.scores(&clean, Some(&zero[1..])).is_err());
    }
}
