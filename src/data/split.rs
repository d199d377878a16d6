//! Sampling: duplicate removal, the fixed test split, k-shot train / dev sets, client partitions
//! (iid, and two Dirichlet non-iid schemes) and the token noise of FedBPT's perturbation.
//!
//! Everything random takes a seed (or a caller-owned generator) so that every party, and every
//! rerun, draws the same samples.

use std::collections::BTreeMap;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Gamma};

use super::{Dataset, Example};
use crate::{Error, Result};

/// The three example sets of one experiment.
#[derive(Debug, Clone)]
pub struct Split {
    /// The k-shot training examples (what the clients' shards are cut from).
    pub train: Vec<Example>,
    /// The dev examples of the same size, for model selection.
    pub dev: Vec<Example>,
    /// The fixed held-out test set.
    pub test: Vec<Example>,
}

/// Sets aside a fixed, seeded test set of `test_size` examples and returns `(rest, test)`.
///
/// The split is stratified: each class gets a share of the test set proportional to its size
/// (largest remainders round), so that a small test set keeps the corpus' class balance.
pub fn test_split(
    ds: &Dataset,
    test_size: usize,
    seed: u64,
) -> Result<(Vec<Example>, Vec<Example>)> {
    let n = ds.examples.len();
    if test_size >= n {
        return Err(Error::config(
            "test_size",
            format!("{test_size} leaves no training data in `{}` ({n} examples)", ds.name),
        ));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut by_class = indices_by_class(ds.examples.iter().map(|e| e.label));
    // Quota of each class: floor of its proportional share, then one more for the classes with
    // the largest remainders until the quotas sum to test_size.
    let mut quotas: Vec<(usize, usize)> = by_class
        .values()
        .map(|idx| {
            let exact = test_size * idx.len();
            (exact / n, exact % n)
        })
        .collect();
    let mut order: Vec<usize> = (0..quotas.len()).collect();
    order.sort_by(|&a, &b| quotas[b].1.cmp(&quotas[a].1).then(a.cmp(&b)));
    let short = test_size - quotas.iter().map(|q| q.0).sum::<usize>();
    for &i in order.iter().take(short) {
        quotas[i].0 += 1;
    }

    let mut in_test = vec![false; n];
    for (idx, (quota, _)) in by_class.values_mut().zip(quotas) {
        idx.shuffle(&mut rng);
        for &i in &idx[..quota] {
            in_test[i] = true;
        }
    }
    let (mut test, mut rest): (Vec<_>, Vec<_>) =
        ds.examples.iter().zip(&in_test).partition(|(_, &t)| t);
    test.shuffle(&mut rng);
    rest.shuffle(&mut rng);
    let strip = |v: Vec<(&Example, &bool)>| v.into_iter().map(|(e, _)| e.clone()).collect();
    Ok((strip(rest), strip(test)))
}

/// Draws a k-shot train set and a dev set from `pool`, as the reference does: after one seeded
/// shuffle, each class contributes its first `k` examples to train and its next `dev_k` to dev
/// (the reference's `dev_k == k`). Both outputs are shuffled (deterministically) so that classes
/// are interleaved. A smaller `dev_k` keeps the evaluation's cost fixed when `k` grows with the
/// number of clients (`fedbpt bench-scale`); with `dev_k == k` the draw is the reference's.
pub fn k_shot(
    pool: &[Example],
    n_classes: usize,
    k: usize,
    dev_k: usize,
    seed: u64,
) -> Result<(Vec<Example>, Vec<Example>)> {
    if k == 0 {
        return Err(Error::config("k_shot", "must be at least 1"));
    }
    if dev_k == 0 {
        return Err(Error::config("dev_k_shot", "must be at least 1"));
    }
    if n_classes == 0 {
        return Err(Error::config("n_classes", "must be at least 1"));
    }
    check_labels(pool.iter().map(|e| e.label), n_classes)?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut order: Vec<usize> = (0..pool.len()).collect();
    order.shuffle(&mut rng);
    let mut per_class: Vec<Vec<usize>> = vec![Vec::new(); n_classes];
    for i in order {
        per_class[pool[i].label].push(i);
    }
    let (mut train, mut dev) = (Vec::new(), Vec::new());
    for (c, idx) in per_class.iter().enumerate() {
        if idx.len() < k + dev_k {
            return Err(Error::config(
                "k_shot",
                format!(
                    "class {c} has {} examples; k_shot {k} needs {} ({k} for train, {dev_k} for dev)",
                    idx.len(),
                    k + dev_k
                ),
            ));
        }
        train.extend(idx[..k].iter().map(|&i| pool[i].clone()));
        dev.extend(idx[k..k + dev_k].iter().map(|&i| pool[i].clone()));
    }
    train.shuffle(&mut rng);
    dev.shuffle(&mut rng);
    Ok((train, dev))
}

/// Splits `0..n` at random into `n_clients` shards whose sizes differ by at most one. Each
/// shard's indices are sorted.
pub fn partition_iid(n: usize, n_clients: usize, seed: u64) -> Result<Vec<Vec<usize>>> {
    check_clients(n, n_clients)?;
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let (base, extra) = (n / n_clients, n % n_clients);
    let mut shards = Vec::with_capacity(n_clients);
    let mut rest = order.as_slice();
    for client in 0..n_clients {
        let (shard, tail) = rest.split_at(base + usize::from(client < extra));
        let mut shard = shard.to_vec();
        shard.sort_unstable();
        shards.push(shard);
        rest = tail;
    }
    Ok(shards)
}

/// Non-iid partition of examples with the given labels over `n_clients` clients: for each class,
/// client proportions are drawn from Dirichlet(alpha, ..., alpha) and the class' shuffled
/// examples are cut accordingly. Small `alpha` gives each client few classes; large `alpha`
/// approaches an iid split.
///
/// Every client gets at least one example: while some client is empty, the largest client hands
/// it one example (its last), which disturbs the drawn proportions as little as possible. Each
/// shard's indices are sorted.
pub fn partition_dirichlet(
    labels: &[usize],
    n_classes: usize,
    n_clients: usize,
    alpha: f64,
    seed: u64,
) -> Result<Vec<Vec<usize>>> {
    if !(alpha.is_finite() && alpha > 0.0) {
        return Err(Error::config("alpha", format!("must be positive and finite, got {alpha}")));
    }
    check_clients(labels.len(), n_clients)?;
    check_labels(labels.iter().copied(), n_classes)?;
    let gamma = Gamma::new(alpha, 1.0)
        .map_err(|e| Error::config("alpha", format!("invalid Dirichlet concentration: {e}")))?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut shards: Vec<Vec<usize>> = vec![Vec::new(); n_clients];
    let mut per_class: Vec<Vec<usize>> = vec![Vec::new(); n_classes];
    for (i, &l) in labels.iter().enumerate() {
        per_class[l].push(i);
    }
    for mut idx in per_class {
        if idx.is_empty() {
            continue;
        }
        idx.shuffle(&mut rng);
        // Dirichlet draw as normalised Gamma(alpha, 1) variates.
        let mut p: Vec<f64> = (0..n_clients).map(|_| gamma.sample(&mut rng)).collect();
        let total: f64 = p.iter().sum();
        if !(total.is_finite() && total > 0.0) {
            // Tiny alpha can underflow every draw to 0; the Dirichlet's limit is then a single
            // client taking the whole class.
            p.iter_mut().for_each(|x| *x = 0.0);
            p[rng.random_range(0..n_clients)] = 1.0;
        } else {
            p.iter_mut().for_each(|x| *x /= total);
        }
        let m = idx.len();
        let mut start = 0usize;
        let mut cum = 0.0;
        for (client, &pk) in p.iter().enumerate() {
            cum += pk;
            let end = if client + 1 == n_clients {
                m
            } else {
                ((cum * m as f64).floor() as usize).clamp(start, m)
            };
            shards[client].extend_from_slice(&idx[start..end]);
            start = end;
        }
    }
    // n >= n_clients, so while a shard is empty the largest one holds at least two.
    fill_empty(&mut shards);
    shards.iter_mut().for_each(|s| s.sort_unstable());
    Ok(shards)
}

/// What [`dedup_examples`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Deduplicated {
    /// Texts that occurred more than once with one label, and the extra copies dropped.
    pub repeated: usize,
    pub copies: usize,
    /// Texts whose copies disagree on the label, and all their copies (dropped: which label
    /// is right cannot be known).
    pub conflicting_texts: usize,
    pub conflicting: usize,
}

/// Removes exact duplicates (same `text` and `text_b`), keeping the first copy, so that no text
/// can land in two of the test, dev and training sets. Texts whose copies carry different labels
/// are removed altogether. The order of what remains is unchanged.
pub fn dedup_examples(examples: &mut Vec<Example>) -> Deduplicated {
    use std::collections::HashMap;
    let key = |e: &Example| (e.text.clone(), e.text_b.clone());
    // For each text: its first label, whether another label was seen, and its count.
    let mut seen: HashMap<(String, Option<String>), (usize, bool, usize)> = HashMap::new();
    for e in examples.iter() {
        let entry = seen.entry(key(e)).or_insert((e.label, false, 0));
        entry.1 |= entry.0 != e.label;
        entry.2 += 1;
    }
    let mut out = Deduplicated::default();
    for &(_, conflict, count) in seen.values() {
        if conflict {
            out.conflicting_texts += 1;
            out.conflicting += count;
        } else if count > 1 {
            out.repeated += 1;
            out.copies += count - 1;
        }
    }
    if out == Deduplicated::default() {
        return out;
    }
    let mut kept: std::collections::HashSet<(String, Option<String>)> = Default::default();
    examples.retain(|e| {
        let k = key(e);
        match seen.get(&k) {
            Some(&(_, true, _)) => false,
            _ => kept.insert(k),
        }
    });
    out
}

/// The reference's non-iid partition (`Dirichlet_noniid` in NVFlare's fed-bpt
/// `data_process.py`): each client's class mix is drawn from Dirichlet(alpha x prior class
/// distribution); client sizes `x >= 0` are the least-norm solution of "every class's examples
/// are used" (`sum_k mix[c][k] x_k = n_c`); client `k` then gets `floor(mix[c][k] x_k)` random
/// examples of each class `c`, and the leftovers go to clients drawn uniformly. When no
/// non-negative sizes can use every example (the mixes leave a class out of reach), each class
/// is instead shared over the clients by Dirichlet(alpha / n_clients) draws, as the reference
/// falls back to. Every client gets at least one example (the largest gives one to an empty
/// one, which the reference does not do). Each shard's indices are sorted.
pub fn partition_client_mix(
    labels: &[usize],
    n_classes: usize,
    n_clients: usize,
    alpha: f64,
    seed: u64,
) -> Result<Vec<Vec<usize>>> {
    if !(alpha.is_finite() && alpha > 0.0) {
        return Err(Error::config("alpha", format!("must be positive and finite, got {alpha}")));
    }
    check_clients(labels.len(), n_clients)?;
    check_labels(labels.iter().copied(), n_classes)?;
    let n = labels.len() as f64;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut per_class: Vec<Vec<usize>> = vec![Vec::new(); n_classes];
    for (i, &l) in labels.iter().enumerate() {
        per_class[l].push(i);
    }
    // Classes absent from the data take no part (the reference's `np.unique`).
    let present: Vec<usize> = (0..n_classes).filter(|&c| !per_class[c].is_empty()).collect();
    let counts: Vec<f64> = present.iter().map(|&c| per_class[c].len() as f64).collect();
    // mix[c][k]: share of class c in client k's data.
    let concentrations: Vec<f64> = counts.iter().map(|m| alpha * m / n).collect();
    let per_client: Vec<Vec<f64>> =
        (0..n_clients).map(|_| dirichlet(&concentrations, &mut rng)).collect::<Result<_>>()?;
    let mix: Vec<Vec<f64>> =
        (0..present.len()).map(|c| per_client.iter().map(|p| p[c]).collect()).collect();
    let division: Vec<Vec<f64>> = match least_norm_nonnegative(&mix, &counts) {
        Some(sizes) => {
            mix.iter().map(|row| row.iter().zip(&sizes).map(|(r, x)| r * x).collect()).collect()
        }
        None => {
            let even = vec![alpha / n_clients as f64; n_clients];
            let per_class_size = (n / present.len() as f64).floor();
            present
                .iter()
                .map(|_| {
                    dirichlet(&even, &mut rng)
                        .map(|p| p.into_iter().map(|s| s * per_class_size).collect())
                })
                .collect::<Result<_>>()?
        }
    };
    let mut shards: Vec<Vec<usize>> = vec![Vec::new(); n_clients];
    let mut rest = Vec::new();
    for (ci, &c) in present.iter().enumerate() {
        let mut pool = per_class[c].clone();
        pool.shuffle(&mut rng);
        for (k, shard) in shards.iter_mut().enumerate() {
            let want = (division[ci][k].max(0.0).floor() as usize).min(pool.len());
            shard.extend(pool.drain(pool.len() - want..));
        }
        rest.extend(pool);
    }
    rest.sort_unstable();
    for i in rest {
        shards[rng.random_range(0..n_clients)].push(i);
    }
    fill_empty(&mut shards);
    shards.iter_mut().for_each(|s| s.sort_unstable());
    Ok(shards)
}

/// A Dirichlet draw as normalized Gamma variates; if every variate underflows to zero (tiny
/// concentrations), the limit: all mass on one component, drawn uniformly.
fn dirichlet(concentrations: &[f64], rng: &mut ChaCha8Rng) -> Result<Vec<f64>> {
    let mut p = Vec::with_capacity(concentrations.len());
    for &a in concentrations {
        let g = Gamma::new(a, 1.0)
            .map_err(|e| Error::config("alpha", format!("invalid Dirichlet concentration: {e}")))?;
        p.push(g.sample(rng));
    }
    let total: f64 = p.iter().sum();
    if total.is_finite() && total > 0.0 {
        p.iter_mut().for_each(|x| *x /= total);
    } else {
        p.iter_mut().for_each(|x| *x = 0.0);
        let k = rng.random_range(0..p.len());
        p[k] = 1.0;
    }
    Ok(p)
}

/// The least-norm `x >= 0` with `A x = b` (`A` is `rows x cols`), or `None` when there is none.
/// Solved in its dual, `max_l b.l - |max(0, A^T l)|^2 / 2` (concave, one variable per row), by
/// semismooth Newton steps with backtracking; the primal is `x = max(0, A^T l)`.
fn least_norm_nonnegative(a: &[Vec<f64>], b: &[f64]) -> Option<Vec<f64>> {
    use nalgebra::{DMatrix, DVector};
    let rows = a.len();
    let cols = a.first()?.len();
    let am = DMatrix::from_fn(rows, cols, |i, j| a[i][j]);
    let bv = DVector::from_column_slice(b);
    let primal = |l: &DVector<f64>| (am.transpose() * l).map(|u| u.max(0.0));
    let dual = |l: &DVector<f64>| bv.dot(l) - 0.5 * primal(l).norm_squared();
    let tol = 1e-9 * bv.norm().max(1.0);
    // Start from the unconstrained least-norm solution's multipliers.
    let mut l = (&am * am.transpose()).lu().solve(&bv).unwrap_or_else(|| DVector::zeros(rows));
    for _ in 0..200 {
        let x = primal(&l);
        let r = &bv - &am * &x;
        if r.norm() <= tol {
            return Some(x.iter().copied().collect());
        }
        let u = am.transpose() * &l;
        let active = DMatrix::from_fn(rows, cols, |i, j| if u[j] > 0.0 { am[(i, j)] } else { 0.0 });
        let h = &active * active.transpose() + DMatrix::identity(rows, rows) * 1e-12;
        let d = h.lu().solve(&r)?;
        let (g0, slope) = (dual(&l), r.dot(&d));
        let mut t = 1.0;
        while dual(&(&l + &d * t)) < g0 + 1e-4 * t * slope && t > 1e-12 {
            t *= 0.5;
        }
        if t <= 1e-12 {
            return None;
        }
        l += d * t;
        if !l.iter().all(|v| v.is_finite()) {
            return None;
        }
    }
    None
}

/// While some shard is empty, the largest (the lowest index among equals) gives it its last
/// example. Needs at least as many examples as shards.
fn fill_empty(shards: &mut [Vec<usize>]) {
    while let Some(empty) = shards.iter().position(Vec::is_empty) {
        let largest =
            (0..shards.len()).max_by_key(|&c| (shards[c].len(), std::cmp::Reverse(c))).unwrap_or(0);
        match shards[largest].pop() {
            Some(i) if shards[largest].is_empty() => {
                // The largest had a single example: nothing can be spread further.
                shards[largest].push(i);
                return;
            }
            Some(i) => shards[empty].push(i),
            None => return,
        }
    }
}

/// FedBPT's perturbation: each token whose `editable` flag is set is, with probability `rate`,
/// replaced by a random token id drawn uniformly from `[0, vocab_size)` minus its current id (so
/// that every replacement is a real change). Positions past the end of `editable` are not
/// editable. Returns how many tokens changed. A `rate` of 0 or less (or NaN), or a vocabulary of
/// fewer than two ids, changes nothing.
pub fn noise_tokens(
    ids: &mut [u32],
    editable: &[bool],
    rate: f32,
    vocab_size: u32,
    rng: &mut impl Rng,
) -> usize {
    if rate.is_nan() || rate <= 0.0 || vocab_size < 2 {
        return 0;
    }
    let mut changed = 0;
    for (id, _) in ids.iter_mut().zip(editable).filter(|(_, &e)| e) {
        if rng.random::<f32>() >= rate {
            continue;
        }
        *id = if *id < vocab_size {
            // Uniform over the other vocab_size - 1 ids.
            let r = rng.random_range(0..vocab_size - 1);
            if r >= *id {
                r + 1
            } else {
                r
            }
        } else {
            rng.random_range(0..vocab_size)
        };
        changed += 1;
    }
    changed
}

/// Cuts `labels.len()` examples into class-balanced minibatches of at most `batch_size`: classes
/// are dealt round-robin, so every batch holds each class in the proportion of the whole set.
/// `batch_size = 0` or one at least the set's size gives a single batch of everything.
pub fn minibatches(labels: &[usize], batch_size: usize) -> Vec<Vec<usize>> {
    let n = labels.len();
    if batch_size == 0 || batch_size >= n {
        return vec![(0..n).collect()];
    }
    let n_batches = n.div_ceil(batch_size);
    let mut batches = vec![Vec::with_capacity(batch_size); n_batches];
    let dealt = indices_by_class(labels.iter().copied()).into_values().flatten();
    for (slot, i) in dealt.enumerate() {
        batches[slot % n_batches].push(i);
    }
    batches
}

/// Example indices grouped by label, classes in increasing order.
fn indices_by_class(labels: impl Iterator<Item = usize>) -> BTreeMap<usize, Vec<usize>> {
    let mut by_class: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, l) in labels.enumerate() {
        by_class.entry(l).or_default().push(i);
    }
    by_class
}

fn check_labels(mut labels: impl Iterator<Item = usize>, n_classes: usize) -> Result<()> {
    match labels.find(|&l| l >= n_classes) {
        Some(l) => Err(Error::config(
            "n_classes",
            format!("label {l} is out of range for {n_classes} classes"),
        )),
        None => Ok(()),
    }
}

fn check_clients(n: usize, n_clients: usize) -> Result<()> {
    if n_clients == 0 {
        return Err(Error::config("n_clients", "must be at least 1"));
    }
    if n < n_clients {
        return Err(Error::config(
            "n_clients",
            format!("{n_clients} clients but only {n} examples: every client needs one"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(i: usize, label: usize) -> Example {
        Example { text: format!("t{i}"), text_b: None, label }
    }

    /// 3 classes of sizes 50, 30, 20.
    fn dataset() -> Dataset {
        let examples = (0..100)
            .map(|i| {
                ex(
                    i,
                    if i < 50 {
                        0
                    } else if i < 80 {
                        1
                    } else {
                        2
                    },
                )
            })
            .collect();
        Dataset {
            name: "toy".into(),
            label_names: vec!["a".into(), "b".into(), "c".into()],
            examples,
            warnings: vec![],
        }
    }

    fn texts(v: &[Example]) -> Vec<&str> {
        v.iter().map(|e| e.text.as_str()).collect()
    }

    #[test]
    fn test_split_is_disjoint_stratified_and_seeded() {
        let ds = dataset();
        let (rest, test) = test_split(&ds, 10, 7).unwrap();
        assert_eq!((rest.len(), test.len()), (90, 10));
        let mut all = [texts(&rest), texts(&test)].concat();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 100);
        let count = |c| test.iter().filter(|e| e.label == c).count();
        assert_eq!((count(0), count(1), count(2)), (5, 3, 2));
        assert_eq!(test_split(&ds, 10, 7).unwrap().1, test);
        assert_ne!(texts(&test_split(&ds, 10, 8).unwrap().1), texts(&test));
        assert!(test_split(&ds, 100, 7).is_err());
    }

    #[test]
    fn k_shot_takes_k_per_class_disjoint() {
        let ds = dataset();
        let (rest, test) = test_split(&ds, 10, 1).unwrap();
        let (train, dev) = k_shot(&rest, 3, 4, 4, 2).unwrap();
        for c in 0..3 {
            assert_eq!(train.iter().filter(|e| e.label == c).count(), 4);
            assert_eq!(dev.iter().filter(|e| e.label == c).count(), 4);
        }
        let mut all = [texts(&train), texts(&dev), texts(&test)].concat();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 12 + 12 + 10);
        assert_eq!(k_shot(&rest, 3, 4, 4, 2).unwrap(), (train.clone(), dev));
        assert_ne!(k_shot(&rest, 3, 4, 4, 3).unwrap().0, train);
        // Output is interleaved, not grouped by class.
        assert_ne!(
            train.iter().map(|e| e.label).collect::<Vec<_>>(),
            [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
        );
    }

    #[test]
    fn a_smaller_dev_leaves_train_as_the_reference_draws_it() {
        let ds = dataset();
        let (rest, _) = test_split(&ds, 10, 1).unwrap();
        let (train, dev) = k_shot(&rest, 3, 4, 4, 2).unwrap();
        let (train_small, dev_small) = k_shot(&rest, 3, 4, 1, 2).unwrap();
        assert_eq!(texts(&train_small).len(), 12);
        let (mut a, mut b) = (texts(&train), texts(&train_small));
        a.sort_unstable();
        b.sort_unstable();
        assert_eq!(a, b, "the train draw does not depend on the dev size");
        for c in 0..3 {
            assert_eq!(dev_small.iter().filter(|e| e.label == c).count(), 1);
        }
        let dev_texts = texts(&dev);
        assert!(texts(&dev_small).iter().all(|t| dev_texts.contains(t)));
        assert!(k_shot(&rest, 3, 4, 0, 2).unwrap_err().to_string().contains("dev_k_shot"));
    }

    #[test]
    fn k_shot_names_the_short_class() {
        let ds = dataset();
        let msg = k_shot(&ds.examples, 3, 11, 11, 0).unwrap_err().to_string();
        assert!(msg.contains("class 2") && msg.contains("k_shot"), "{msg}");
        assert!(k_shot(&ds.examples, 2, 1, 1, 0).is_err(), "label 2 is out of range for 2 classes");
    }

    fn assert_cover(shards: &[Vec<usize>], n: usize) {
        let mut all: Vec<usize> = shards.concat();
        all.sort_unstable();
        assert_eq!(all, (0..n).collect::<Vec<_>>());
        assert!(shards.iter().all(|s| !s.is_empty()));
    }

    #[test]
    fn minibatches_are_class_balanced_and_cover_once() {
        let labels: Vec<usize> = (0..20).map(|i| usize::from(i % 5 == 0)).collect();
        let batches = minibatches(&labels, 5);
        assert_eq!(batches.len(), 4);
        assert_cover(&batches, 20);
        for b in &batches {
            assert_eq!(b.len(), 5);
            // 4 of 20 are class 1: one in each batch.
            assert_eq!(b.iter().filter(|&&i| labels[i] == 1).count(), 1, "{b:?}");
        }
        assert_eq!(minibatches(&labels, 7).len(), 3);
        assert_eq!(minibatches(&labels, 0), vec![(0..20).collect::<Vec<_>>()]);
        assert_eq!(minibatches(&labels, 20), vec![(0..20).collect::<Vec<_>>()]);
    }

    #[test]
    fn iid_partition_covers_equally() {
        let shards = partition_iid(103, 10, 5).unwrap();
        assert_cover(&shards, 103);
        assert!(shards.iter().all(|s| s.len() == 10 || s.len() == 11));
        assert_eq!(partition_iid(103, 10, 5).unwrap(), shards);
        assert_ne!(partition_iid(103, 10, 6).unwrap(), shards);
        assert!(partition_iid(5, 0, 0).is_err());
        assert!(partition_iid(5, 6, 0).is_err());
    }

    /// Largest distance, over clients, between a client's class distribution and the uniform one.
    fn max_skew(labels: &[usize], shards: &[Vec<usize>], n_classes: usize) -> f64 {
        shards
            .iter()
            .map(|s| {
                (0..n_classes)
                    .map(|c| {
                        let p =
                            s.iter().filter(|&&i| labels[i] == c).count() as f64 / s.len() as f64;
                        (p - 1.0 / n_classes as f64).abs()
                    })
                    .fold(0.0, f64::max)
            })
            .fold(0.0, f64::max)
    }

    #[test]
    fn dirichlet_partition_skew_follows_alpha() {
        let labels: Vec<usize> = (0..2000).map(|i| i % 4).collect();
        let skewed = partition_dirichlet(&labels, 4, 10, 0.1, 3).unwrap();
        assert_cover(&skewed, 2000);
        assert!(max_skew(&labels, &skewed, 4) > 0.5, "alpha 0.1 should be far from uniform");
        let flat = partition_dirichlet(&labels, 4, 10, 1000.0, 3).unwrap();
        assert_cover(&flat, 2000);
        assert!(max_skew(&labels, &flat, 4) < 0.1, "alpha 1000 should be near uniform");
        assert_eq!(partition_dirichlet(&labels, 4, 10, 0.1, 3).unwrap(), skewed);
        assert_ne!(partition_dirichlet(&labels, 4, 10, 0.1, 4).unwrap(), skewed);
    }

    #[test]
    fn dirichlet_partition_never_leaves_a_client_empty() {
        let labels: Vec<usize> = (0..12).map(|i| i % 2).collect();
        for seed in 0..50 {
            assert_cover(&partition_dirichlet(&labels, 2, 12, 0.01, seed).unwrap(), 12);
        }
        // Underflowing Gamma draws still give a valid partition.
        assert_cover(&partition_dirichlet(&labels, 2, 3, 1e-300, 0).unwrap(), 12);
    }

    #[test]
    fn dirichlet_partition_rejects_bad_arguments() {
        let labels = [0, 1, 0, 1];
        for alpha in [0.0, -1.0, f64::NAN] {
            assert!(partition_dirichlet(&labels, 2, 2, alpha, 0).is_err());
        }
        assert!(partition_dirichlet(&labels, 2, 0, 1.0, 0).is_err());
        assert!(partition_dirichlet(&labels, 2, 5, 1.0, 0).is_err());
        assert!(partition_dirichlet(&labels, 1, 2, 1.0, 0).is_err());
    }

    #[test]
    fn duplicates_are_removed_and_conflicts_dropped() {
        let mut v = vec![ex(1, 0), ex(2, 1), ex(1, 0), ex(3, 0), ex(3, 1), ex(1, 0), ex(4, 1)];
        let pair = Example { text: "t2".into(), text_b: Some("b".into()), label: 0 };
        v.push(pair.clone());
        let d = dedup_examples(&mut v);
        assert_eq!(
            d,
            Deduplicated { repeated: 1, copies: 2, conflicting_texts: 1, conflicting: 2 }
        );
        assert_eq!(texts(&v), vec!["t1", "t2", "t4", "t2"], "first copies, order kept");
        assert_eq!(v[3], pair, "text_b is part of the key");
        let before = v.clone();
        assert_eq!(dedup_examples(&mut v), Deduplicated::default());
        assert_eq!(v, before);
    }

    #[test]
    fn least_norm_nonnegative_solves_small_programs() {
        let close = |x: Vec<f64>, want: &[f64]| {
            assert_eq!(x.len(), want.len());
            for (a, b) in x.iter().zip(want) {
                assert!((a - b).abs() < 1e-8, "{x:?} vs {want:?}");
            }
        };
        close(least_norm_nonnegative(&[vec![1.0, 1.0]], &[2.0]).unwrap(), &[1.0, 1.0]);
        let a = vec![vec![0.9, 0.1], vec![0.1, 0.9]];
        close(least_norm_nonnegative(&a, &[1.0, 1.0]).unwrap(), &[1.0, 1.0]);
        // The unconstrained least-norm solution is [1/3, 2/3, -1/3]: the bound binds.
        let a = vec![vec![1.0, 0.0, 1.0], vec![0.0, 1.0, -1.0]];
        close(least_norm_nonnegative(&a, &[0.0, 1.0]).unwrap(), &[0.0, 1.0, 0.0]);
        // Only x = (-6, 8) solves it: no non-negative sizes use every example.
        let a = vec![vec![0.9, 0.8], vec![0.1, 0.2]];
        assert!(least_norm_nonnegative(&a, &[1.0, 1.0]).is_none());
    }

    fn mean_skew_and_size_spread(shards: &[Vec<usize>], labels: &[usize]) -> (f64, f64) {
        let skew = shards
            .iter()
            .map(|s| {
                let p = s.iter().filter(|&&i| labels[i] == 1).count() as f64 / s.len() as f64;
                (p - 0.5).abs()
            })
            .sum::<f64>()
            / shards.len() as f64;
        let sizes: Vec<f64> = shards.iter().map(|s| s.len() as f64).collect();
        let m = sizes.iter().sum::<f64>() / sizes.len() as f64;
        let sd = (sizes.iter().map(|x| (x - m).powi(2)).sum::<f64>() / sizes.len() as f64).sqrt();
        (skew, sd / m)
    }

    #[test]
    fn client_mix_partition_covers_and_skews_as_the_reference() {
        // Two balanced classes, 10 clients, alpha 1: each client's mix ~ Beta(0.5, 0.5), whose
        // mean |p - 1/2| is 1/pi = 0.32; per-class shares give about 0.24 and far less even sizes.
        let labels: Vec<usize> = (0..400).map(|i| i % 2).collect();
        let (mut mix, mut shares) = ((0.0, 0.0), (0.0, 0.0));
        let seeds = 40;
        for seed in 0..seeds {
            let a = partition_client_mix(&labels, 2, 10, 1.0, seed).unwrap();
            assert_cover(&a, 400);
            let b = partition_dirichlet(&labels, 2, 10, 1.0, seed).unwrap();
            let (sa, za) = mean_skew_and_size_spread(&a, &labels);
            let (sb, zb) = mean_skew_and_size_spread(&b, &labels);
            mix = (mix.0 + sa / seeds as f64, mix.1 + za / seeds as f64);
            shares = (shares.0 + sb / seeds as f64, shares.1 + zb / seeds as f64);
        }
        assert!((0.27..0.37).contains(&mix.0), "client-mix skew {}", mix.0);
        assert!(mix.0 > shares.0 + 0.04, "client-mix {} vs class-shares {}", mix.0, shares.0);
        assert!(mix.1 < shares.1, "sizes: client-mix spread {} vs {}", mix.1, shares.1);
        assert_eq!(
            partition_client_mix(&labels, 2, 10, 1.0, 3).unwrap(),
            partition_client_mix(&labels, 2, 10, 1.0, 3).unwrap()
        );
        assert_ne!(
            partition_client_mix(&labels, 2, 10, 1.0, 3).unwrap(),
            partition_client_mix(&labels, 2, 10, 1.0, 4).unwrap()
        );
        // Large alpha approaches iid; four classes and tiny alpha still cover everything.
        let flat = partition_client_mix(&labels, 2, 10, 1e4, 1).unwrap();
        assert!(mean_skew_and_size_spread(&flat, &labels).0 < 0.08);
        let four: Vec<usize> = (0..200).map(|i| i % 4).collect();
        for seed in 0..20 {
            assert_cover(&partition_client_mix(&four, 4, 12, 0.05, seed).unwrap(), 200);
        }
        assert_cover(&partition_client_mix(&labels[..12], 2, 12, 1.0, 0).unwrap(), 12);
        assert!(partition_client_mix(&labels, 2, 0, 1.0, 0).is_err());
        assert!(partition_client_mix(&labels, 2, 10, 0.0, 0).is_err());
        assert!(partition_client_mix(&labels, 1, 10, 1.0, 0).is_err());
    }

    #[test]
    fn noise_respects_rate_and_mask() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let orig: Vec<u32> = (0..200).map(|i| i % 50).collect();
        let editable: Vec<bool> = (0..200).map(|i| i % 3 != 0).collect();

        let mut ids = orig.clone();
        assert_eq!(noise_tokens(&mut ids, &editable, 0.0, 50, &mut rng), 0);
        assert_eq!(ids, orig);

        let changed = noise_tokens(&mut ids, &editable, 1.0, 50, &mut rng);
        assert_eq!(changed, editable.iter().filter(|&&e| e).count());
        for ((a, b), e) in ids.iter().zip(&orig).zip(&editable) {
            assert_eq!(a != b, *e);
            assert!(*a < 50);
        }

        let mut ids = orig.clone();
        let changed = noise_tokens(&mut ids, &editable, 0.5, 50, &mut rng);
        assert!((40..=93).contains(&changed), "about half of 133: {changed}");
    }
}
