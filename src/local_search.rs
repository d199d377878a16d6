//! One party's search over z: a CMA-ES started from a search distribution with fresh evolution
//! paths, run for a fixed number of iterations (FedBPT's client round, steps 2-4; centralized BBT
//! is the same search from `N(0, sigma^2 I)` for its whole budget).
//!
//! It does no I/O: the caller scores each population (through a model, a pool of workers, or a
//! test function) and tells the fitness back, so actors only move messages around it.

use crate::cmaes::{CmaFlavour, Cmaes, CmaesOptions};
use crate::objective::{
    client_loss, fitness_perturbed_for, loss_with_metric, ClientLoss, LossType, Metric,
};
use crate::protocol::{ClientUpdate, SearchDistribution};
use crate::{Error, Result};

/// A local CMA-ES between its `ask`s and `tell`s.
#[derive(Debug, Clone)]
pub struct LocalSearch {
    es: Cmaes,
    iterations: usize,
    /// Step size before each `ask` so far (the reference records them there).
    sigmas: Vec<f64>,
    /// An `ask` whose `tell` has not come yet.
    awaiting_tell: bool,
}

impl LocalSearch {
    /// Starts from `dist` (mean, step size and, when sent, covariance) with `popsize` candidates
    /// per iteration for `iterations` iterations, drawing from its own generator seeded by
    /// `seed` (which should differ between clients and rounds: the reference reseeded every
    /// client identically, so all clients drew the same samples). `flavour` picks the CMA-ES;
    /// either way it starts as the reference's `_copy_light` does: the received distribution,
    /// zero paths, no generation told, and a fresh eigendecomposition of the received covariance.
    pub fn start(
        dist: &SearchDistribution,
        popsize: usize,
        iterations: usize,
        seed: u64,
        flavour: CmaFlavour,
    ) -> Result<Self> {
        if iterations == 0 {
            return Err(Error::Optimizer("a local search needs at least one iteration".into()));
        }
        let mean: Vec<f64> = dist.mean.iter().map(|&v| f64::from(v)).collect();
        let opts = CmaesOptions { popsize: Some(popsize), seed, bounds: None, flavour };
        let mut es = Cmaes::new(mean, dist.sigma, opts)?;
        if let Some(packed) = &dist.covariance {
            if packed.dim != es.dim() {
                return Err(Error::Optimizer(format!(
                    "covariance of dimension {} for a mean of dimension {}",
                    packed.dim,
                    es.dim()
                )));
            }
            es.set_covariance(packed.unpack()?)?;
        }
        Ok(Self { es, iterations, sigmas: Vec::with_capacity(iterations), awaiting_tell: false })
    }

    /// The next population, or `None` once every iteration has been told. Records the step
    /// size first. Asking again before telling returns `None` too.
    pub fn ask(&mut self) -> Option<Vec<Vec<f64>>> {
        if self.awaiting_tell || self.sigmas.len() >= self.iterations {
            return None;
        }
        self.sigmas.push(self.es.sigma());
        self.awaiting_tell = true;
        Some(self.es.ask())
    }

    /// Fitness (lower is better) of the population the last [`LocalSearch::ask`] returned.
    pub fn tell(&mut self, candidates: &[Vec<f64>], fitness: &[f64]) -> Result<()> {
        if !self.awaiting_tell {
            return Err(Error::Optimizer("tell without a pending ask".into()));
        }
        self.es.tell(candidates, fitness)?;
        self.awaiting_tell = false;
        Ok(())
    }

    /// Iterations asked so far.
    pub fn iteration(&self) -> usize {
        self.sigmas.len()
    }

    /// Whether every iteration has been asked and told.
    pub fn is_done(&self) -> bool {
        !self.awaiting_tell && self.sigmas.len() >= self.iterations
    }

    /// Current mean, as the prompt vector the model sees.
    pub fn mean(&self) -> Vec<f32> {
        self.es.mean().iter().map(|&v| v as f32).collect()
    }

    /// The CMA-ES (step size, evaluations, ...).
    pub fn strategy(&self) -> &Cmaes {
        &self.es
    }

    /// The upload of `client` for `round`: the final mean, its fitness and loss (scored by the
    /// caller with [`Objective::score`]) and the recorded step sizes. Errors before the last
    /// iteration was told.
    pub fn finish(self, client: usize, round: usize, final_score: Scored) -> Result<ClientUpdate> {
        if !self.is_done() {
            return Err(Error::Optimizer(format!(
                "local search finished after {} of {} iterations",
                self.sigmas.len(),
                self.iterations
            )));
        }
        Ok(ClientUpdate {
            client,
            round,
            mean: self.mean(),
            fitness: final_score.fitness,
            loss: final_score.loss,
            sigmas: self.sigmas,
            start_fitness: None,
            class_counts: Vec::new(),
        })
    }
}

/// A candidate's fitness (what the search ranks by) and its plain loss on the real data.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scored {
    pub fitness: f64,
    pub loss: f64,
}

/// How one candidate is scored: the loss (and metric, for `perf`) of its class scores on the real
/// shard, averaged as `balance` says, and, with FedBPT's perturbation, the Eq. 7 ratio to its
/// loss on the perturbed copy. The reported plain loss is always the mean over examples.
#[derive(Debug, Clone, Copy)]
pub struct Objective {
    pub loss: LossType,
    pub metric: Metric,
    pub balance: ClientLoss,
}

impl Objective {
    /// Scores one candidate from its class scores `[example][class]` on the real shard and, when
    /// perturbing, on the perturbed shard (with that shard's labels).
    pub fn score(
        &self,
        real: &[Vec<f32>],
        labels: &[usize],
        perturbed: Option<(&[Vec<f32>], &[usize])>,
    ) -> Result<Scored> {
        let loss = loss_with_metric(real, labels, self.loss, self.metric)?;
        let ranked = match self.balance {
            ClientLoss::Mean => loss,
            balance => client_loss(real, labels, self.loss, self.metric, balance)?,
        };
        let fitness = match perturbed {
            Some((scores, labels)) => {
                let lp = client_loss(scores, labels, self.loss, self.metric, self.balance)?;
                fitness_perturbed_for(self.loss, ranked, lp)
            }
            None => ranked,
        };
        Ok(Scored { fitness, loss })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::PackedCovariance;

    fn dist(sigma: f64) -> SearchDistribution {
        SearchDistribution { round: 3, mean: vec![0.5, -0.5, 0.0], sigma, covariance: None }
    }

    #[test]
    fn sigmas_are_recorded_before_each_ask() {
        let mut s = LocalSearch::start(&dist(0.7), 5, 3, 1, CmaFlavour::Tutorial).unwrap();
        let mut told = Vec::new();
        while let Some(xs) = s.ask() {
            assert!(s.ask().is_none(), "no second ask before the tell");
            let fs: Vec<f64> = xs.iter().map(|x| x.iter().map(|v| v * v).sum()).collect();
            s.tell(&xs, &fs).unwrap();
            told.push(s.strategy().sigma());
        }
        assert!(s.is_done());
        let final_score = Scored { fitness: 0.25, loss: 0.5 };
        let u = s.clone().finish(4, 3, final_score).unwrap();
        assert_eq!(u.sigmas.len(), 3);
        assert_eq!(u.sigmas[0], 0.7, "the first is the sigma the server sent");
        assert_eq!(u.sigmas[1..], told[..2], "then each tell's result, the last one left out");
        assert_eq!((u.client, u.round, u.fitness, u.loss), (4, 3, 0.25, 0.5));
        assert_eq!(u.mean, s.mean());
    }

    #[test]
    fn protocol_misuse_is_an_error() {
        let mut s = LocalSearch::start(&dist(0.7), 4, 2, 1, CmaFlavour::Tutorial).unwrap();
        assert!(s.tell(&[vec![0.0; 3]], &[1.0]).is_err(), "tell before ask");
        let xs = s.ask().unwrap();
        let score = Scored { fitness: 0.0, loss: 0.0 };
        assert!(s.clone().finish(0, 3, score).is_err(), "finish mid-search");
        s.tell(&xs, &vec![1.0; xs.len()]).unwrap();
        assert!(LocalSearch::start(&dist(0.7), 4, 0, 1, CmaFlavour::Tutorial).is_err());
        assert!(LocalSearch::start(&dist(0.0), 4, 1, 1, CmaFlavour::Tutorial).is_err());
        assert!(LocalSearch::start(&dist(0.7), 1, 1, 1, CmaFlavour::Tutorial).is_err());
        let mut bad = dist(0.7);
        bad.covariance = Some(PackedCovariance { dim: 2, upper: vec![1.0, 0.0, 1.0] });
        assert!(LocalSearch::start(&bad, 4, 1, 1, CmaFlavour::Tutorial).is_err());
    }

    #[test]
    fn starts_from_the_sent_covariance() {
        let mut d = dist(0.5);
        d.covariance =
            Some(PackedCovariance { dim: 3, upper: vec![4.0, 0.0, 0.0, 1.0, 0.0, 0.25] });
        let s = LocalSearch::start(&d, 6, 1, 2, CmaFlavour::Tutorial).unwrap();
        assert_eq!(s.strategy().covariance()[(0, 0)], 4.0);
        assert_eq!(s.strategy().covariance()[(2, 2)], 0.25);
        assert_eq!(s.strategy().popsize(), 6);
        assert_eq!(s.mean(), d.mean);
    }

    #[test]
    fn a_pycma_search_starts_like_the_references_copy_light() {
        // The sent covariance, zero paths, nothing told; without one, pycma's C0.
        let mut d = dist(0.5);
        d.covariance =
            Some(PackedCovariance { dim: 3, upper: vec![4.0, 0.0, 0.0, 1.0, 0.0, 0.25] });
        let mut s = LocalSearch::start(&d, 5, 2, 2, CmaFlavour::Pycma).unwrap();
        let es = s.strategy();
        assert_eq!(es.flavour(), CmaFlavour::Pycma);
        assert_eq!(es.covariance()[(0, 0)], 4.0);
        assert_eq!(es.axis_lengths(), [0.5, 1.0, 2.0], "decomposed, ascending");
        assert!(es.ps().iter().chain(es.pc()).all(|v| *v == 0.0));
        assert_eq!(es.generation(), 0);
        let fresh = LocalSearch::start(&dist(0.5), 5, 2, 2, CmaFlavour::Pycma).unwrap();
        let c = fresh.strategy().covariance();
        assert_eq!(c[(0, 0)], 1.0);
        assert_eq!(c[(2, 2)], (2e-4f64 / 3.0).exp());
        while let Some(xs) = s.ask() {
            let fs: Vec<f64> = xs.iter().map(|x| x.iter().map(|v| v * v).sum()).collect();
            s.tell(&xs, &fs).unwrap();
        }
        assert!(s.is_done());
    }

    #[test]
    fn eq7_fitness_is_the_ratio_and_loss_stays_plain() {
        let obj =
            Objective { loss: LossType::Ce, metric: Metric::Accuracy, balance: ClientLoss::Mean };
        let real = vec![vec![0.0, 2.0], vec![1.0, 0.0]];
        let labels = [1, 0];
        let noisy = vec![vec![0.0, 0.0], vec![0.0, 0.0]];
        let plain = obj.score(&real, &labels, None).unwrap();
        assert_eq!(plain.fitness, plain.loss);
        let eq7 = obj.score(&real, &labels, Some((&noisy, &labels))).unwrap();
        assert_eq!(eq7.loss, plain.loss);
        let ln2 = std::f64::consts::LN_2;
        assert!((eq7.fitness - plain.loss / ln2).abs() < 1e-12, "{eq7:?}");
    }
}
