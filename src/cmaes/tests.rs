use super::*;

fn sphere(x: &[f64]) -> f64 {
    x.iter().map(|v| v * v).sum()
}

fn ellipsoid(x: &[f64]) -> f64 {
    let n = x.len() as f64;
    x.iter().enumerate().map(|(i, v)| 1e6f64.powf(i as f64 / (n - 1.0)) * v * v).sum()
}

fn rosenbrock(x: &[f64]) -> f64 {
    x.windows(2).map(|w| 100.0 * (w[1] - w[0] * w[0]).powi(2) + (1.0 - w[0]).powi(2)).sum()
}

/// Runs ask/tell until the best fitness of a generation reaches `target` or `max_evals`
/// evaluations are spent; returns the best fitness seen.
fn minimize(es: &mut Cmaes, f: impl Fn(&[f64]) -> f64, target: f64, max_evals: usize) -> f64 {
    while es.evaluations() < max_evals {
        let xs = es.ask();
        let fs: Vec<f64> = xs.iter().map(|x| f(x)).collect();
        es.tell(&xs, &fs).expect("tell");
        if es.best().expect("told").1 < target {
            break;
        }
    }
    es.best().expect("told").1
}

fn opts(seed: u64) -> CmaesOptions {
    CmaesOptions { popsize: None, seed, bounds: None, ..Default::default() }
}

#[test]
fn default_parameters_match_pycma() {
    let es = Cmaes::new(vec![0.0; 10], 1.0, opts(0)).unwrap();
    assert_eq!(es.popsize(), 10);
    let p = &es.params;
    assert_eq!(p.weights.len(), 5);
    assert!((p.weights.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    assert!(p.weights.windows(2).all(|w| w[0] > w[1]));
    assert!((p.mueff - 3.1672).abs() < 1e-3, "mueff {}", p.mueff);
    assert!((es.chi_n - 3.0847).abs() < 1e-3);
    assert_eq!(Cmaes::new(vec![0.0; 500], 1.0, opts(0)).unwrap().popsize(), 22);
}

#[test]
fn sphere_d10_converges() {
    let mut es = Cmaes::new(vec![1.0; 10], 0.5, opts(1)).unwrap();
    let f = minimize(&mut es, sphere, 1e-8, 3000);
    assert!(f < 1e-8, "sphere reached only {f:e} in {} evals", es.evaluations());
}

#[test]
fn ellipsoid_d10_converges() {
    let mut es = Cmaes::new(vec![1.0; 10], 0.5, opts(2)).unwrap();
    let f = minimize(&mut es, ellipsoid, 1e-8, 10_000);
    assert!(f < 1e-8, "ellipsoid reached only {f:e} in {} evals", es.evaluations());
}

#[test]
fn rosenbrock_d10_converges() {
    let mut es = Cmaes::new(vec![0.0; 10], 0.5, opts(3)).unwrap();
    let f = minimize(&mut es, rosenbrock, 1e-6, 15_000);
    assert!(f < 1e-6, "rosenbrock reached only {f:e} in {} evals", es.evaluations());
    let (x, _) = es.best().unwrap();
    assert!(x.iter().all(|v| (v - 1.0).abs() < 1e-2), "not the global optimum: {x:?}");
}

#[test]
fn sphere_d500_makes_progress() {
    let mut es = Cmaes::new(vec![1.0; 500], 0.3, opts(4)).unwrap();
    let f0 = sphere(es.mean());
    let f = minimize(&mut es, sphere, f0 * 1e-3, 40_000);
    assert!(f < f0 * 1e-3, "sphere d=500: {f0} -> {f} in {} evals", es.evaluations());
}

#[test]
fn same_seed_same_candidates() {
    let mut a = Cmaes::new(vec![0.5; 7], 0.3, opts(42)).unwrap();
    let mut b = Cmaes::new(vec![0.5; 7], 0.3, opts(42)).unwrap();
    let mut c = Cmaes::new(vec![0.5; 7], 0.3, opts(43)).unwrap();
    for _ in 0..20 {
        let (xa, xb, xc) = (a.ask(), b.ask(), c.ask());
        assert_eq!(xa, xb);
        assert_ne!(xa, xc);
        let fa: Vec<f64> = xa.iter().map(|x| ellipsoid(x)).collect();
        let fc: Vec<f64> = xc.iter().map(|x| ellipsoid(x)).collect();
        a.tell(&xa, &fa).unwrap();
        b.tell(&xb, &fa).unwrap();
        c.tell(&xc, &fc).unwrap();
    }
    assert_eq!(a.mean(), b.mean());
    assert_eq!(a.covariance(), b.covariance());
}

fn step(es: &mut Cmaes) -> Vec<Vec<f64>> {
    let xs = es.ask();
    let fs: Vec<f64> = xs.iter().map(|x| rosenbrock(x)).collect();
    es.tell(&xs, &fs).unwrap();
    xs
}

#[test]
fn serde_round_trip_continues_identically() {
    let mut a = Cmaes::new(vec![0.0; 6], 0.5, opts(7)).unwrap();
    for _ in 0..15 {
        step(&mut a);
    }
    // Through serde_json::Value (what checkpoints hold): bit-exact.
    let mut b: Cmaes = serde_json::from_value(serde_json::to_value(&a).unwrap()).unwrap();
    // Through JSON text: serde_json's default float parser may be off by one ulp, so this
    // copy is checked to a tight tolerance only.
    let mut c: Cmaes = serde_json::from_str(&serde_json::to_string(&a).unwrap()).unwrap();
    for _ in 0..15 {
        let (xa, xb, xc) = (step(&mut a), step(&mut b), step(&mut c));
        assert_eq!(xa, xb);
        for (u, v) in xa.iter().flatten().zip(xc.iter().flatten()) {
            assert!((u - v).abs() <= 1e-9 * (1.0 + u.abs()), "{u} vs {v}");
        }
    }
    assert_eq!(a.generation(), b.generation());
    assert_eq!(a.best(), b.best());
}

#[test]
fn tell_with_other_counts() {
    let mut es = Cmaes::new(vec![0.0; 4], 1.0, opts(5)).unwrap();
    let xs = es.ask();
    assert_eq!(xs.len(), 8);
    // Three of eight: the best one of them (mu = 1) becomes the mean.
    let fs: Vec<f64> = xs[..3].iter().map(|x| sphere(x)).collect();
    es.tell(&xs[..3], &fs).unwrap();
    let best = (0..3).min_by(|&a, &b| fs[a].total_cmp(&fs[b])).unwrap();
    for (m, x) in es.mean().iter().zip(&xs[best]) {
        assert!((m - x).abs() < 1e-12);
    }
    // A single candidate, and more than the popsize.
    es.tell(&[vec![0.1; 4]], &[0.04]).unwrap();
    let many: Vec<Vec<f64>> = es.ask().into_iter().chain(es.ask()).collect();
    let fs: Vec<f64> = many.iter().map(|x| sphere(x)).collect();
    es.tell(&many, &fs).unwrap();
    assert_eq!(es.evaluations(), 3 + 1 + 16);
    assert_eq!(es.generation(), 3);
    assert!(es.sigma() > 0.0);

    // All parents: every candidate pulls the mean, the better ones harder.
    let mut es = Cmaes::new(vec![0.0; 2], 1.0, opts(5)).unwrap();
    es.set_parents(Parents::All);
    es.tell(&[vec![1.0, 0.0], vec![-1.0, 0.0]], &[0.0, 1.0]).unwrap();
    assert!(es.mean()[0] > 0.0 && es.mean()[0] < 1.0, "{:?}", es.mean());
}

#[test]
fn rejects_bad_input() {
    let mut es = Cmaes::new(vec![0.0; 3], 1.0, opts(0)).unwrap();
    let xs = es.ask();
    let mut fs: Vec<f64> = xs.iter().map(|x| sphere(x)).collect();
    fs[2] = f64::NAN;
    assert!(es.tell(&xs, &fs).is_err());
    fs[2] = f64::INFINITY;
    assert!(es.tell(&xs, &fs).is_err());
    assert!(es.tell(&[], &[]).is_err());
    assert!(es.tell(&xs, &fs[..2]).is_err());
    assert!(es.tell(&[vec![0.0; 2]], &[1.0]).is_err());
    assert!(es.tell(&[vec![0.0, f64::NAN, 0.0]], &[1.0]).is_err());
    // A failed tell leaves the state alone.
    assert_eq!(es.generation(), 0);
    assert_eq!(es.evaluations(), 0);
    assert!(es.best().is_none());

    assert!(Cmaes::new(vec![], 1.0, opts(0)).is_err());
    assert!(Cmaes::new(vec![0.0], 0.0, opts(0)).is_err());
    assert!(Cmaes::new(vec![0.0], f64::NAN, opts(0)).is_err());
    let small = CmaesOptions { popsize: Some(1), ..opts(0) };
    assert!(Cmaes::new(vec![0.0], 1.0, small).is_err());
    let bad_bounds = CmaesOptions { bounds: Some((1.0, -1.0)), ..opts(0) };
    assert!(Cmaes::new(vec![0.0], 1.0, bad_bounds).is_err());

    assert!(es.set_sigma(-1.0).is_err());
    assert!(es.set_mean(vec![0.0; 2]).is_err());
    assert!(es.set_covariance(DMatrix::identity(2, 2)).is_err());
    let mut asym = DMatrix::identity(3, 3);
    asym[(0, 1)] = 0.5;
    assert!(es.set_covariance(asym).is_err());
    let indefinite = DMatrix::from_diagonal(&DVector::from_vec(vec![1.0, -1.0, 1.0]));
    assert!(es.set_covariance(indefinite).is_err());
}

#[test]
fn setters_shape_the_samples() {
    let mut es = Cmaes::new(vec![0.0; 2], 1.0, opts(9)).unwrap();
    es.set_mean(vec![10.0, -10.0]).unwrap();
    es.set_sigma(0.1).unwrap();
    let c = DMatrix::from_row_slice(2, 2, &[4.0, 0.0, 0.0, 0.01]);
    es.set_covariance(c.clone()).unwrap();
    assert_eq!(es.covariance(), &c);
    let mut xs = Vec::new();
    for _ in 0..500 {
        xs.extend(es.ask());
    }
    let n = xs.len() as f64;
    let var = |k: usize, m: f64| xs.iter().map(|x| (x[k] - m).powi(2)).sum::<f64>() / n;
    // Variances sigma^2 * C: 0.04 and 1e-4, to sampling error.
    assert!((var(0, 10.0) / 0.04 - 1.0).abs() < 0.1);
    assert!((var(1, -10.0) / 1e-4 - 1.0).abs() < 0.1);

    es.reset_paths();
    assert_eq!(es.ps.norm(), 0.0);
    assert_eq!(es.pc.norm(), 0.0);
}

#[test]
fn bounds_clip_candidates() {
    let o = CmaesOptions {
        popsize: Some(12),
        seed: 3,
        bounds: Some((-0.5, 0.5)),
        ..Default::default()
    };
    let mut es = Cmaes::new(vec![0.4; 5], 2.0, o).unwrap();
    // The optimum (2, 2, ...) lies outside: the search must end on the upper bound.
    let f = |x: &[f64]| x.iter().map(|v| (v - 2.0).powi(2)).sum::<f64>();
    for _ in 0..200 {
        let xs = es.ask();
        assert!(xs.iter().flatten().all(|v| (-0.5..=0.5).contains(v)));
        let fs: Vec<f64> = xs.iter().map(|x| f(x)).collect();
        es.tell(&xs, &fs).unwrap();
    }
    assert!(es.mean().iter().all(|m| (m - 0.5).abs() < 1e-3), "{:?}", es.mean());
}

#[test]
fn injected_samples_update_exactly_as_samples() {
    let mut plain = Cmaes::new(vec![0.3; 12], 0.7, opts(21)).unwrap();
    let (mut compared, mut clipped) = (0, 0);
    for _ in 0..30 {
        let mut injected = plain.clone();
        let xs = plain.ask();
        assert_eq!(injected.ask(), xs);
        let fs: Vec<f64> = xs.iter().map(|x| rosenbrock(x)).collect();
        let within = xs.iter().all(|x| plain.mahalanobis_step(x) <= plain.injection_limit());
        plain.tell(&xs, &fs).unwrap();
        injected.tell_injected(&xs, &fs).unwrap();
        if within {
            // Nothing to clip: the update is the samples' own, bit for bit.
            assert_eq!(plain.mean(), injected.mean());
            assert_eq!(plain.sigma(), injected.sigma());
            assert_eq!(plain.covariance(), injected.covariance());
            assert_eq!(plain.ps, injected.ps);
            compared += 1;
        } else {
            // A rare sample beyond sqrt(d) + 2d/(d+2) is clipped like any injected point.
            clipped += 1;
        }
    }
    assert!(compared >= 20, "{compared} generations compared, {clipped} clipped");
}

#[test]
fn a_far_injected_point_is_clipped_to_the_limit() {
    let d = 20;
    let mut es = Cmaes::new(vec![0.0; d], 0.5, opts(22)).unwrap();
    es.set_parents(Parents::All);
    let mut unclipped = es.clone();
    // Two "client means", one 1,000 sigmas away along axis 0.
    let mut far = vec![0.0; d];
    far[0] = 500.0;
    let near = vec![0.01; d];
    let limit = es.injection_limit();
    assert!((limit - ((d as f64).sqrt() + 2.0 * d as f64 / (d as f64 + 2.0))).abs() < 1e-12);
    assert!((es.mahalanobis_step(&far) - 1000.0).abs() < 1e-9);
    let pts = [near.clone(), far.clone()];
    es.tell_injected(&pts, &[1.0, 2.0]).unwrap();
    unclipped.tell(&pts, &[1.0, 2.0]).unwrap();
    // The clipped step of the far point is `limit` long: the mean moves by at most
    // sigma * limit along axis 0, and C's largest entry stays of order one.
    assert!(es.mean()[0] <= 0.5 * limit + 1e-9, "{}", es.mean()[0]);
    assert!(es.covariance().amax() < 2.0, "C grew to {}", es.covariance().amax());
    assert!(es.ps.norm() < 2.0 * limit, "|ps| = {}", es.ps.norm());
    assert!(es.sigma() < 0.5 * std::f64::consts::E, "sigma {}", es.sigma());
    // Told as a sample, the same point blows C up by two orders of magnitude.
    assert!(unclipped.covariance().amax() > 50.0, "{}", unclipped.covariance().amax());
    assert!(unclipped.ps.norm() > 10.0 * es.ps.norm());
}

#[test]
fn one_dimension_works() {
    let mut es = Cmaes::new(vec![3.0], 1.0, opts(11)).unwrap();
    let f = minimize(&mut es, sphere, 1e-10, 2000);
    assert!(f < 1e-10);
}

fn pycma_opts(seed: u64, popsize: Option<usize>) -> CmaesOptions {
    CmaesOptions { popsize, seed, bounds: None, flavour: CmaFlavour::Pycma }
}

#[test]
fn pycma_flavour_converges() {
    let mut es = Cmaes::new(vec![1.0; 10], 0.5, pycma_opts(1, None)).unwrap();
    let f = minimize(&mut es, sphere, 1e-8, 3000);
    assert!(f < 1e-8, "sphere reached only {f:e} in {} evals", es.evaluations());
    let mut es = Cmaes::new(vec![1.0; 10], 0.5, pycma_opts(2, None)).unwrap();
    let f = minimize(&mut es, ellipsoid, 1e-8, 10_000);
    assert!(f < 1e-8, "ellipsoid reached only {f:e} in {} evals", es.evaluations());
    // Popsize 5: one mirror per generation, active weights on the worst two.
    let mut es = Cmaes::new(vec![1.0; 10], 0.5, pycma_opts(3, Some(5))).unwrap();
    let f = minimize(&mut es, sphere, 1e-8, 5000);
    assert!(f < 1e-8, "sphere (popsize 5) reached only {f:e} in {} evals", es.evaluations());
}

#[test]
fn pycma_mirrors_the_worst_unless_it_was_a_mirror() {
    let mut es = Cmaes::new(vec![0.0; 4], 1.0, pycma_opts(4, Some(5))).unwrap();
    let xs = es.ask();
    assert_eq!(es.mirrors_asked(), 0, "nothing told yet, nothing to mirror");
    // The worst is candidate 2: the next ask starts with the mean plus (old mean - x_2).
    let fs = [0.0, 1.0, 9.0, 2.0, 3.0];
    let old_mean = es.mean().to_vec();
    es.tell(&xs, &fs).unwrap();
    let ys = es.ask();
    assert_eq!(es.mirrors_asked(), 1);
    let step: Vec<f64> = old_mean.iter().zip(&xs[2]).map(|(m, x)| m - x).collect();
    let mirror_step: Vec<f64> = ys[0].iter().zip(es.mean()).map(|(y, m)| y - m).collect();
    let ratio = mirror_step[0] / step[0];
    assert!(ratio > 0.0);
    for (a, b) in mirror_step.iter().zip(&step) {
        assert!((a - b * ratio).abs() < 1e-12, "{mirror_step:?} vs {step:?}");
    }
    // The mirror ranks last: it is not mirrored back.
    es.tell(&ys, &[99.0, 1.0, 2.0, 3.0, -1.0]).unwrap();
    es.ask();
    assert_eq!(es.mirrors_asked(), 0);
}

#[test]
fn checkpoints_without_a_flavour_load_as_tutorial() {
    let es = Cmaes::new(vec![0.5; 3], 0.3, opts(8)).unwrap();
    let mut v = serde_json::to_value(&es).unwrap();
    let state = v.as_object_mut().unwrap();
    for key in ["flavour", "mirror_directions", "asked_mirrors"] {
        assert!(state.remove(key).is_some(), "{key}");
    }
    let params = state.get_mut("params").unwrap().as_object_mut().unwrap();
    params.remove("negative_weights").unwrap();
    params.remove("mirrors").unwrap();
    let mut old: Cmaes = serde_json::from_value(v).unwrap();
    let mut new = es.clone();
    assert_eq!(old.flavour(), CmaFlavour::Tutorial);
    assert_eq!(old.ask(), new.ask());
}

#[test]
fn pycma_tell_with_other_counts() {
    // Counts other than the popsize use the parameters of a population of that size.
    let mut es = Cmaes::new(vec![0.0; 4], 1.0, pycma_opts(5, Some(8))).unwrap();
    let xs = es.ask();
    let fs: Vec<f64> = xs[..3].iter().map(|x| sphere(x)).collect();
    es.tell(&xs[..3], &fs).unwrap();
    es.tell(&[vec![0.1; 4]], &[0.04]).unwrap();
    assert!(es.mean().iter().all(|m| (m - 0.1).abs() < 1e-15), "one candidate is the new mean");
    let many: Vec<Vec<f64>> = es.ask().into_iter().chain(es.ask()).collect();
    let fs: Vec<f64> = many.iter().map(|x| sphere(x)).collect();
    es.tell(&many, &fs).unwrap();
    es.set_parents(Parents::All);
    es.tell_injected(&[vec![0.2; 4]], &[0.1]).unwrap();
    assert_eq!((es.generation(), es.evaluations()), (4, 3 + 1 + 16 + 1));
    assert!(es.sigma() > 0.0 && es.mean().iter().all(|m| m.is_finite()));
}
