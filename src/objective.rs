//! Objectives: the losses a client minimises over its shard (BBT's ce / hinge / perf), the
//! evaluation metrics, and FedBPT's perturbation-aware fitness (paper Eq. 7).
//!
//! Scores are one row of class scores per example (label-word logits, or similarities), as the
//! backends return them.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Margin of the multi-class hinge loss, as in BBT.
pub const HINGE_MARGIN: f64 = 2.0;

/// Floor of the perturbed loss in [`fitness_perturbed`], so that a perfect fit on perturbed
/// data cannot divide by zero.
pub const PERTURBED_LOSS_FLOOR: f64 = 1e-6;

/// Which loss a client minimises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossType {
    /// Cross-entropy of the softmax over class scores.
    #[default]
    Ce,
    /// Multi-class hinge loss with margin [`HINGE_MARGIN`].
    Hinge,
    /// Minus the task metric (accuracy or F1, see [`Metric`]).
    Perf,
}

/// How a client averages its loss over its shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientLoss {
    /// The mean over the shard's examples (the reference's).
    #[default]
    Mean,
    /// The mean over the shard's classes of each class's mean loss: a shard of 7 positives and
    /// 1 negative weighs its negative as much as its positives, so a skewed client's fitness
    /// stops rewarding a prompt that predicts its majority class.
    ClassBalanced,
}

/// Task metric, used for reporting and by [`LossType::Perf`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    /// Fraction of examples whose highest score is their label.
    #[default]
    Accuracy,
    /// F1 of class 1 for binary tasks (the reference's choice for MRPC); macro-F1 otherwise.
    F1,
}

impl Metric {
    /// The metric's value on a batch; `n_classes` selects binary or macro F1.
    pub fn eval(self, scores: &[Vec<f32>], labels: &[usize], n_classes: usize) -> f64 {
        match self {
            Metric::Accuracy => accuracy(scores, labels),
            Metric::F1 if n_classes == 2 => f1_binary(scores, labels),
            Metric::F1 => macro_f1(scores, labels, n_classes),
        }
    }
}

/// Mean loss over the batch; `perf` means minus accuracy. See [`loss_with_metric`].
pub fn loss(scores: &[Vec<f32>], labels: &[usize], kind: LossType) -> Result<f64> {
    loss_with_metric(scores, labels, kind, Metric::Accuracy)
}

/// Mean loss over the batch, `metric` choosing what `perf` negates.
///
/// Errors when the batch is empty, scores and labels differ in length, score rows differ in
/// length, a label is out of range, or a score is not finite.
pub fn loss_with_metric(
    scores: &[Vec<f32>],
    labels: &[usize],
    kind: LossType,
    metric: Metric,
) -> Result<f64> {
    let n_classes = validate(scores, labels)?;
    let mean = |per_example: fn(&[f32], usize) -> f64| {
        scores.iter().zip(labels).map(|(s, &y)| per_example(s, y)).sum::<f64>()
            / labels.len() as f64
    };
    Ok(match kind {
        LossType::Ce => mean(cross_entropy),
        LossType::Hinge => mean(hinge),
        LossType::Perf => -metric.eval(scores, labels, n_classes),
    })
}

/// The loss a client ranks by: [`loss_with_metric`] over the whole shard, or with
/// [`ClientLoss::ClassBalanced`] the mean over the classes present of that loss on each class's
/// examples (for `perf`, minus the mean per-class accuracy: a class alone has no F1).
pub fn client_loss(
    scores: &[Vec<f32>],
    labels: &[usize],
    kind: LossType,
    metric: Metric,
    balance: ClientLoss,
) -> Result<f64> {
    let n_classes = validate(scores, labels)?;
    if balance == ClientLoss::Mean {
        return loss_with_metric(scores, labels, kind, metric);
    }
    let metric = Metric::Accuracy;
    let mut total = 0.0;
    let mut present = 0usize;
    for class in 0..n_classes {
        let (s, l): (Vec<Vec<f32>>, Vec<usize>) = scores
            .iter()
            .zip(labels)
            .filter(|&(_, &y)| y == class)
            .map(|(s, &y)| (s.clone(), y))
            .unzip();
        if !l.is_empty() {
            total += loss_with_metric(&s, &l, kind, metric)?;
            present += 1;
        }
    }
    Ok(total / present as f64)
}

/// `-log softmax(s)[y]`, with the log-sum-exp shifted by the max for stability.
fn cross_entropy(s: &[f32], y: usize) -> f64 {
    let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = s.iter().map(|&x| (x as f64 - max).exp()).sum();
    max + sum.ln() - s[y] as f64
}

/// Mean over the wrong classes j of `max(0, margin - (s_y - s_j))`. (PyTorch's
/// `MultiMarginLoss` divides the same sum by all classes instead; the constant factor changes
/// neither the ranking of candidates nor the ratio of Eq. 7.)
fn hinge(s: &[f32], y: usize) -> f64 {
    if s.len() < 2 {
        return 0.0;
    }
    let sy = s[y] as f64;
    let total: f64 = s
        .iter()
        .enumerate()
        .filter(|&(j, _)| j != y)
        .map(|(_, &sj)| (HINGE_MARGIN - (sy - sj as f64)).max(0.0))
        .sum();
    total / (s.len() - 1) as f64
}

/// Checks a batch and returns its number of classes.
fn validate(scores: &[Vec<f32>], labels: &[usize]) -> Result<usize> {
    let bad = |msg: String| Err(Error::Task(format!("loss: {msg}")));
    if scores.len() != labels.len() {
        return bad(format!("{} score rows for {} labels", scores.len(), labels.len()));
    }
    let Some(first) = scores.first() else {
        return bad("empty batch".into());
    };
    let n_classes = first.len();
    if n_classes == 0 {
        return bad("score rows are empty".into());
    }
    for (i, (s, &y)) in scores.iter().zip(labels).enumerate() {
        if s.len() != n_classes {
            return bad(format!("example {i} has {} scores, example 0 has {n_classes}", s.len()));
        }
        if y >= n_classes {
            return bad(format!("example {i} has label {y} but there are {n_classes} classes"));
        }
        if let Some(x) = s.iter().find(|x| !x.is_finite()) {
            return bad(format!("example {i} has a non-finite score {x}"));
        }
    }
    Ok(n_classes)
}

/// Index of the highest score; ties go to the lowest index. `None` for an empty row.
pub fn argmax(s: &[f32]) -> Option<usize> {
    let mut best = None;
    for (j, &x) in s.iter().enumerate() {
        match best {
            Some((_, b)) if x <= b => {}
            _ => best = Some((j, x)),
        }
    }
    best.map(|(j, _)| j)
}

/// Fraction of examples whose argmax is the label (0 for an empty batch). Rows and labels are
/// paired up to the shorter of the two.
pub fn accuracy(scores: &[Vec<f32>], labels: &[usize]) -> f64 {
    let n = scores.len().min(labels.len());
    if n == 0 {
        return 0.0;
    }
    let hits = scores.iter().zip(labels).filter(|(s, &y)| argmax(s) == Some(y)).count();
    hits as f64 / n as f64
}

/// `2 tp / (2 tp + fp + fn)` of one class; 0 when that class is neither predicted nor present.
fn f1_of(scores: &[Vec<f32>], labels: &[usize], class: usize) -> f64 {
    let (mut tp, mut fp, mut fnn) = (0usize, 0usize, 0usize);
    for (s, &y) in scores.iter().zip(labels) {
        let pred = argmax(s) == Some(class);
        match (pred, y == class) {
            (true, true) => tp += 1,
            (true, false) => fp += 1,
            (false, true) => fnn += 1,
            (false, false) => {}
        }
    }
    let denom = 2 * tp + fp + fnn;
    if denom == 0 {
        0.0
    } else {
        (2 * tp) as f64 / denom as f64
    }
}

/// F1 of the positive class (label 1) of a binary task.
pub fn f1_binary(scores: &[Vec<f32>], labels: &[usize]) -> f64 {
    f1_of(scores, labels, 1)
}

/// Unweighted mean of the per-class F1 over the classes that occur among the labels or the
/// predictions (as scikit-learn does), so an absent class does not count as a zero.
pub fn macro_f1(scores: &[Vec<f32>], labels: &[usize], n_classes: usize) -> f64 {
    let mut seen = vec![false; n_classes];
    for (s, &y) in scores.iter().zip(labels) {
        for c in [Some(y), argmax(s)].into_iter().flatten() {
            if let Some(flag) = seen.get_mut(c) {
                *flag = true;
            }
        }
    }
    let present: Vec<usize> = (0..n_classes).filter(|&c| seen[c]).collect();
    if present.is_empty() {
        return 0.0;
    }
    present.iter().map(|&c| f1_of(scores, labels, c)).sum::<f64>() / present.len() as f64
}

/// FedBPT's fitness of a candidate prompt (paper Eq. 7): `loss_real / loss_perturbed`. Lower is
/// better: a good prompt fits the real shard and does not fit its randomly perturbed copy.
///
/// The ratio assumes non-negative losses (ce, hinge; for perf use [`fitness_perturbed_for`]).
/// `loss_perturbed` is floored at [`PERTURBED_LOSS_FLOOR`] so that a prompt fitting even the
/// perturbed data perfectly gives a large but finite fitness instead of a division by zero
/// (and 0 / 0 becomes 0, a perfect fit everywhere). A non-finite input gives `+inf`, the worst
/// fitness, so that CMA-ES ranks such a candidate last instead of tripping on a NaN.
pub fn fitness_perturbed(loss_real: f64, loss_perturbed: f64) -> f64 {
    if !(loss_real.is_finite() && loss_perturbed.is_finite()) {
        return f64::INFINITY;
    }
    loss_real / loss_perturbed.max(PERTURBED_LOSS_FLOOR)
}

/// [`fitness_perturbed`] for any [`LossType`]: a perf loss (minus a metric in [0, 1]) is first
/// shifted by one into an error rate, because the ratio of two negative numbers would reward
/// the wrong candidate.
pub fn fitness_perturbed_for(kind: LossType, loss_real: f64, loss_perturbed: f64) -> f64 {
    match kind {
        LossType::Perf => fitness_perturbed(1.0 + loss_real, 1.0 + loss_perturbed),
        LossType::Ce | LossType::Hinge => fitness_perturbed(loss_real, loss_perturbed),
    }
}

/// The best-on-dev model so far: the highest dev metric, ties broken by the lower dev loss, and
/// ties in both by the earlier step (fewer rounds or iterations). Centralized BBT and the
/// federation's server select with this one rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BestOnDev {
    /// Dev metric (accuracy, or the task's metric) of `z`.
    pub metric: f64,
    pub loss: f64,
    /// Round (federation) or iteration (BBT) that produced `z`; 0 is the starting point.
    pub step: usize,
    pub z: Vec<f32>,
}

impl BestOnDev {
    /// Keeps `z` if it beats the current best under the rule above; returns whether it did.
    /// A NaN metric or loss never wins.
    pub fn offer(
        best: &mut Option<BestOnDev>,
        metric: f64,
        loss: f64,
        step: usize,
        z: &[f32],
    ) -> bool {
        if metric.is_nan() || loss.is_nan() {
            return false;
        }
        let better = match best {
            None => true,
            Some(b) => metric > b.metric || (metric == b.metric && loss < b.loss),
        };
        if better {
            *best = Some(BestOnDev { metric, loss, step, z: z.to_vec() });
        }
        better
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_balanced_loss_averages_the_classes() {
        // Three positives scored well, one negative scored badly.
        let scores = vec![vec![0.0, 2.0], vec![0.0, 2.0], vec![0.0, 2.0], vec![0.0, 3.0]];
        let labels = [1, 1, 1, 0];
        let ce = |s: &[f32], y: usize| cross_entropy(s, y);
        let (pos, neg) = (ce(&scores[0], 1), ce(&scores[3], 0));
        let mean = client_loss(&scores, &labels, LossType::Ce, Metric::Accuracy, ClientLoss::Mean);
        assert!((mean.unwrap() - (3.0 * pos + neg) / 4.0).abs() < 1e-12);
        let balanced = client_loss(
            &scores,
            &labels,
            LossType::Ce,
            Metric::Accuracy,
            ClientLoss::ClassBalanced,
        )
        .unwrap();
        assert!((balanced - (pos + neg) / 2.0).abs() < 1e-12, "{balanced}");
        // perf: minus the mean per-class accuracy (1 for the positives, 0 for the negative).
        let perf =
            client_loss(&scores, &labels, LossType::Perf, Metric::F1, ClientLoss::ClassBalanced);
        assert_eq!(perf.unwrap(), -0.5);
        // A class absent from the shard is left out, not counted as zero loss.
        let only_pos = client_loss(
            &scores[..3],
            &labels[..3],
            LossType::Ce,
            Metric::Accuracy,
            ClientLoss::ClassBalanced,
        );
        assert!((only_pos.unwrap() - pos).abs() < 1e-12);
        assert!(client_loss(&[], &[], LossType::Ce, Metric::Accuracy, ClientLoss::ClassBalanced)
            .is_err());
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn best_on_dev_breaks_ties_by_loss_then_keeps_the_earlier() {
        let mut best = None;
        assert!(BestOnDev::offer(&mut best, 0.80, 0.50, 0, &[0.0]));
        assert!(!BestOnDev::offer(&mut best, 0.79, 0.10, 1, &[1.0]), "lower metric");
        assert!(BestOnDev::offer(&mut best, 0.80, 0.40, 2, &[2.0]), "same metric, lower loss");
        assert!(
            !BestOnDev::offer(&mut best, 0.80, 0.40, 3, &[3.0]),
            "a full tie keeps the earlier"
        );
        assert!(!BestOnDev::offer(&mut best, f64::NAN, 0.0, 4, &[4.0]));
        assert!(BestOnDev::offer(&mut best, 0.81, 0.90, 5, &[5.0]), "higher metric wins");
        let b = best.unwrap();
        assert_eq!((b.metric, b.loss, b.step, b.z), (0.81, 0.90, 5, vec![5.0]));
    }

    #[test]
    fn ce_of_equal_scores_is_ln_n() {
        let l = loss(&[vec![0.0, 0.0]], &[1], LossType::Ce).unwrap();
        assert!(close(l, std::f64::consts::LN_2), "{l}");
        let l = loss(&[vec![5.0, 5.0, 5.0]], &[0], LossType::Ce).unwrap();
        assert!(close(l, 3f64.ln()), "{l}");
    }

    #[test]
    fn ce_is_stable_for_large_scores() {
        // log(1 + e^-1000) ~ 0 for the right class, ~1000 for the wrong one.
        let scores = vec![vec![1000.0, 0.0], vec![1000.0, 0.0]];
        let l = loss(&scores, &[0, 1], LossType::Ce).unwrap();
        assert!(close(l, 500.0), "{l}");
    }

    #[test]
    fn hinge_hand_computed() {
        // y = 0: s_y - s_1 = 1 -> 1; s_y - s_2 = 3 -> 0; mean over wrong classes = 0.5.
        // y = 2: s_y - s_0 = -3 -> 5; s_y - s_1 = -2 -> 4; mean = 4.5. Batch mean = 2.5.
        let scores = vec![vec![3.0, 2.0, 0.0], vec![3.0, 2.0, 0.0]];
        let l = loss(&scores, &[0, 2], LossType::Hinge).unwrap();
        assert!(close(l, 2.5), "{l}");
        assert!(close(loss(&[vec![5.0, 0.0]], &[0], LossType::Hinge).unwrap(), 0.0));
    }

    #[test]
    fn accuracy_and_f1_hand_computed() {
        // Predictions (argmax, ties low): 1, 0, 1, 0 (tie), 1.
        let scores =
            vec![vec![0.0, 1.0], vec![2.0, 1.0], vec![0.0, 3.0], vec![1.0, 1.0], vec![-1.0, 0.0]];
        let labels = [1, 0, 0, 1, 1];
        assert!(close(accuracy(&scores, &labels), 0.6));
        // Class 1: tp 2, fp 1, fn 1 -> 4 / 6.
        assert!(close(f1_binary(&scores, &labels), 2.0 / 3.0));
        // Class 0: tp 1, fp 1, fn 1 -> 0.5; macro = (0.5 + 2/3) / 2.
        assert!(close(macro_f1(&scores, &labels, 2), (0.5 + 2.0 / 3.0) / 2.0));
        // An absent third class is not averaged in.
        assert!(close(macro_f1(&scores, &labels, 3), (0.5 + 2.0 / 3.0) / 2.0));
        assert!(close(loss(&scores, &labels, LossType::Perf).unwrap(), -0.6));
        let l = loss_with_metric(&scores, &labels, LossType::Perf, Metric::F1).unwrap();
        assert!(close(l, -2.0 / 3.0));
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), Some(1));
        assert_eq!(argmax(&[]), None);
        assert_eq!(accuracy(&[], &[]), 0.0);
    }

    #[test]
    fn loss_rejects_bad_batches() {
        let s = vec![vec![0.0, 1.0]];
        assert!(loss(&s, &[0, 1], LossType::Ce).is_err());
        assert!(loss(&s, &[2], LossType::Ce).is_err());
        assert!(loss(&[], &[], LossType::Ce).is_err());
        assert!(loss(&[vec![0.0, f32::NAN]], &[0], LossType::Hinge).is_err());
        assert!(loss(&[vec![0.0, f32::INFINITY]], &[0], LossType::Ce).is_err());
        assert!(loss(&[vec![0.0, 1.0], vec![0.0]], &[0, 0], LossType::Ce).is_err());
    }

    #[test]
    fn fitness_is_the_guarded_ratio() {
        assert!(close(fitness_perturbed(0.5, 2.0), 0.25));
        assert!(close(fitness_perturbed(0.0, 0.0), 0.0));
        assert!(close(fitness_perturbed(1.0, 0.0), 1.0 / PERTURBED_LOSS_FLOOR));
        assert_eq!(fitness_perturbed(f64::NAN, 1.0), f64::INFINITY);
        // perf: error rates 0.1 / 0.5.
        assert!(close(fitness_perturbed_for(LossType::Perf, -0.9, -0.5), 0.2));
    }

    #[test]
    fn loss_type_serde_is_lowercase() {
        assert_eq!(serde_json::to_string(&LossType::Hinge).unwrap(), "\"hinge\"");
        assert_eq!(serde_json::from_str::<LossType>("\"perf\"").unwrap(), LossType::Perf);
        assert_eq!(LossType::default(), LossType::Ce);
        assert_eq!(serde_json::from_str::<Metric>("\"f1\"").unwrap(), Metric::F1);
    }
}
