#!/usr/bin/env python3
"""Parity fixtures for the `pycma` flavour of `src/cmaes/` (tests/pycma_parity.rs).

Usage (from the repository root):

    python3 -m venv .pycma && .pycma/bin/pip install cma==3.4.0 numpy==2.4.6
    .pycma/bin/python scripts/pycma_fixtures.py tests/fixtures/pycma

Writes two JSON files into OUTDIR:

* ``pycma-local.json``: a client's local search as the reference runs it
  (d = 100, popsize 5, sigma0 0.5, 4 iterations, pycma defaults: active CMA,
  one selective mirror with delay, c1 * 5/6, damps 0.568).
* ``pycma-server.json``: the reference's global ES (``CMA_mu = popsize = 10``)
  over three rounds: ``sigma = s6``, ``ask()`` (discarded), ``tell()`` of ten
  client means that were not asked (half of them, all in round 2, beyond the
  Mahalanobis limit, so they are clipped), then the sigma sent next round.

Every tell is also replayed by `spec_tell` below, an independent numpy
implementation of the formulas in docs/pycma-flavour.md; the script fails if the
replay and pycma differ by more than 1e-12 (relative), so the document and the
fixtures agree by construction. The layout of the files is described in
docs/pycma-flavour.md ("Fixtures").

Only numpy's global legacy generator (MT19937 + polar Gaussian) drives pycma's
sampling; every call of it is recorded (``randn``) so that a reimplementation can
replay the candidates without reimplementing numpy's generator.
"""

import json
import math
import os
import platform
import sys
import warnings

CMA_VERSION = "3.4.0"
NUMPY_VERSION = "2.4.6"

import numpy as np  # noqa: E402

warnings.filterwarnings("ignore", message="Could not import matplotlib")
import cma  # noqa: E402
from cma.recombination_weights import RecombinationWeights  # noqa: E402
from cma.utilities.math import Mh  # noqa: E402

if cma.__version__ != CMA_VERSION or np.__version__ != NUMPY_VERSION:
    sys.exit(
        f"pycma_fixtures.py is pinned to cma {CMA_VERSION} and numpy {NUMPY_VERSION}, "
        f"found cma {cma.__version__} and numpy {np.__version__}"
    )
warnings.simplefilter("ignore", cma.evolution_strategy.InjectionWarning)

DIM = 100
SEED = 42  # the reference's default seed (server)
LOCAL_SEED = 22  # chosen so that 4 iterations exercise every mirror case (docs/pycma-flavour.md)
REL_TOL = 1e-12  # spec replay vs pycma

# Local search (the client's ES).
LOCAL_POPSIZE = 5
LOCAL_SIGMA0 = 0.5
LOCAL_ITERATIONS = 4
# Server (the global ES).
CLIENTS = 10
SERVER_SIGMA0 = 1.0
SERVER_ROUNDS = 3
LOCAL_ITER_FOR_S6 = 4  # length of each client's recorded sigma list
# Mahalanobis lengths (in units of the told sigma) of the client means, per round; the
# limit is sqrt(100) + 200/102 = 11.96: the last five are clipped, all ten in round 2.
TARGET_LENGTHS = [
    [2.0, 5.0, 8.0, 10.0, 11.5, 12.5, 15.0, 20.0, 30.0, 60.0],
    [12.5, 13.0, 15.0, 20.0, 25.0, 30.0, 40.0, 60.0, 80.0, 100.0],
    [2.0, 5.0, 8.0, 10.0, 11.5, 12.5, 15.0, 20.0, 30.0, 60.0],
]
# Weight of a direction shared by all clients in their mean's step, per round. Round 1:
# independent directions (h_sigma = 1, sigma shrinks); round 2: the clients agree (10), so
# |ps| exceeds chi_n (sigma grows) and h_sigma stalls; round 3: independent again (h_sigma
# still 0: ps decays slowly).
COMMON_DRIFT = [0.0, 10.0, 0.0]


def floats(a):
    return [float(v) for v in np.asarray(a, dtype=float).ravel()]


def upper(c):
    c = np.asarray(c)
    return floats(c[np.triu_indices(c.shape[0])])


def shifted_sphere(xstar):
    return lambda x: float(np.sum((np.asarray(x) - xstar) ** 2))


class RandnRecorder:
    """Wraps np.random.randn (the option 'randn' pycma seeded) and logs every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, *shape):
        a = np.random.randn(*shape)
        self.calls.append({"shape": list(shape), "values": floats(a)})
        return a

    def take(self):
        calls, self.calls = self.calls, []
        return calls


def instrument(es, rec):
    """Replace es.sm.update, es.adapt_sigma.hsig/update2 and randn by recording wrappers.

    Nothing is changed in what they compute or in the order of random draws.
    """
    log = {}
    sm = es.sm
    orig_update = sm.update

    def update(vectors, weights, c1_times_delta_hsigma=0):
        w = np.array(weights, dtype=float, copy=True)
        v = np.asarray(vectors)
        eff = w.copy()
        for k in np.nonzero(w < 0)[0]:
            eff[k] *= len(v[k]) / (sm.norm(v[k]) + 1e-9) ** 2
        log["sampler_weights"] = floats(w)
        log["effective_weights"] = floats(eff)
        log["decay"] = float(1 + c1_times_delta_hsigma - sum(w))
        return orig_update(vectors, weights, c1_times_delta_hsigma)

    sm.update = update
    orig_hsig = es.adapt_sigma.hsig

    def hsig(es_):
        h = orig_hsig(es_)
        log["hsig"] = bool(h)
        return h

    es.adapt_sigma.hsig = hsig
    orig_update2 = es.adapt_sigma.update2

    def update2(es_, **kw):
        f = orig_update2(es_, **kw)
        log["sigma_factor"] = float(f)
        return f

    es.adapt_sigma.update2 = update2
    sm.randn = rec
    es.opts["randn"] = rec  # used by the mirror's random rescaling
    return log


def params_of(es):
    """The strategy parameters pycma uses in `tell` (from the sampler, not es.sp)."""
    if not es.adapt_sigma.is_initialized:  # pycma does this lazily in the first tell
        es.adapt_sigma.initialize(es)
    p = es.sm.parameters(mueff=es.sp.weights.mueff, lam=es.sp.weights.lambda_)
    return {
        "dim": es.N,
        "popsize": es.sp.popsize,
        "mu": es.sp.weights.mu,
        "weights": floats(es.sp.weights),
        "mueff": float(es.sp.weights.mueff),
        "cc": float(es.sp.cc),
        "cs": float(es.adapt_sigma.cs),
        "c1": float(p["c1"]),
        "cmu": float(p["cmu"]),
        "damps": float(es.adapt_sigma.damps),
        "chi_n": float(Mh.chiN(es.N)),
        "lam_mirr": int(es.sp.lam_mirr),
        "lazy_update_gap": float(es.sm.lazy_update_gap),
        "repair_limit": float(es.N**0.5 + 2 * es.N / (es.N + 2)),
        "cmean": float(es.sp.cmean),
        "active_injected": float(es.opts["CMA_active_injected"]),
    }


def state_of(es, with_b=False):
    sm = es.sm
    b_identity = bool(np.array_equal(sm.B, np.eye(es.N)))
    s = {
        "countiter": int(es.countiter),
        "count_tell": int(sm.count_tell),
        "last_eigen_update": int(sm.last_update),
        "count_eigen": int(sm.count_eigen),
        "mean": floats(es.mean),
        "sigma": float(es.sigma),
        "ps": floats(es.adapt_sigma.ps),
        "pc": floats(es.pc),
        "C_upper": upper(sm.C),
        "D": floats(sm.D),
        "B_is_identity": b_identity,
    }
    if with_b and not b_identity:
        s["B"] = floats(sm.B)  # row-major; columns are eigenvectors
    return s


class Snapshot:
    """The part of pycma's state that a tell reads, kept in memory for `spec_tell`."""

    def __init__(self, es):
        self.mean = es.mean.copy()
        self.sigma = float(es.sigma)
        self.C = es.sm.C.copy()
        self.B = es.sm.B.copy()
        self.D = es.sm.D.copy()
        self.ps = es.adapt_sigma.ps.copy()
        self.pc = es.pc.copy()
        self.countiter = es.countiter


def spec_tell(p, s, xs, fs, unknown, injected):
    """One tell from the formulas of docs/pycma-flavour.md, independent of pycma's code.

    `s` is the state just before the tell (B, D as of the last decomposition, possibly
    done inside the preceding ask); `unknown[k]` says whether told point k was not
    asked (it is clipped), `injected[k]` whether it was an injected (mirrored) one.
    """
    n = len(s.mean)
    w = np.asarray(p["weights"])
    mu, mueff, cc, cs, c1, cmu, damps = (p[k] for k in ("mu", "mueff", "cc", "cs", "c1", "cmu", "damps"))

    def mnorm(y):  # ||C^-1/2 y|| with the (lagging) eigensystem
        return math.sqrt(np.sum((s.B.T @ y / s.D) ** 2))

    xs = [np.array(x, dtype=float) for x in xs]
    clip = []
    for k, x in enumerate(xs):
        fac = 1.0
        if unknown[k]:
            fac = mnorm(x - s.mean) / s.sigma / p["repair_limit"]
            if fac > 1:
                xs[k] = (x - s.mean) / fac + s.mean
        clip.append(fac)
    order = np.argsort(fs, kind="stable")
    xsorted = np.array([xs[i] for i in order])
    mean = s.mean + (w[:mu] @ xsorted[:mu] - s.mean)
    dm = mean - s.mean
    z = s.B @ ((s.B.T @ dm) / s.D) * math.sqrt(mueff) / s.sigma
    ps = (1 - cs) * s.ps + math.sqrt(cs * (2 - cs)) * z
    t = s.countiter + 1
    hsig = bool(np.sum(ps**2) / (1 - (1 - cs) ** (2 * t)) / n - 1 < 1 + 4.0 / (n + 1))
    h = 1.0 if hsig else 0.0
    c1a = c1 * (1 - (1 - h) * cc * (2 - cc))
    pc = (1 - cc) * s.pc + h * math.sqrt(cc * (2 - cc) * mueff) / s.sigma * dm
    # weights for the told count: pycma's RecombinationWeights.__call__
    told = len(xs)
    if told <= mu:
        wt = list(w[:told])
    elif told < len(w):
        wt = list(w[:mu]) + list(w[mu - told:])
    else:
        wt = list(w[:mu]) + (told - len(w)) * [0.0] + list(w[mu:])
    sw = [c1a] + [cmu * wi for wi in wt]
    for rank, i in enumerate(order):
        if injected[i] and sw[rank + 1] < 0:
            sw[rank + 1] *= p["active_injected"]
    decay = 1 - sum(sw)
    vecs = [math.sqrt(c1 / (c1a + 1e-23)) * pc] + [(x - s.mean) / s.sigma for x in xsorted]
    C = s.C * decay
    for wk, v in zip(sw, vecs):
        if wk < 0:
            wk *= n / (mnorm(v) + 1e-9) ** 2
        C += wk * np.outer(v, v)
    ds = cs / damps * (math.sqrt(np.sum(ps**2)) / p["chi_n"] - 1)
    sigma = s.sigma * math.exp(min(1.0, max(-1.0, ds)))
    return {"mean": mean, "sigma": sigma, "ps": ps, "pc": pc, "C": C, "hsig": hsig, "clip": clip}


def spec_ask(mean, sigma, B, D, directions, draws, popsize):
    """The candidates of one ask from the recorded normal draws (docs: "Sampling")."""
    n = len(mean)
    draws = [np.asarray(c["values"]).reshape(c["shape"]) for c in draws]
    xs = []
    for y in directions:  # injected mirror directions come first
        mn = math.sqrt(np.sum((B.T @ y / D) ** 2)) / sigma
        if mn > n**0.5:
            zz = draws.pop(0)[0]
            y = y * (math.sqrt(np.sum(zz**2)) / mn / sigma)
        else:
            y = y * (1.0 / sigma)
        xs.append(mean + sigma * y)
    arz = draws.pop(0)
    assert not draws and len(arz) == popsize - len(directions)
    for z in arz:
        xs.append(mean + sigma * (B @ (D * z)))
    return np.array(xs)


def check_replay(name, spec, es):
    worst = 0.0
    for key, got in (("mean", es.mean), ("ps", es.adapt_sigma.ps), ("pc", es.pc), ("C", es.sm.C)):
        want = spec[key]
        scale = max(1.0, float(np.max(np.abs(want))))
        err = float(np.max(np.abs(np.asarray(got) - want))) / scale
        worst = max(worst, err)
        if err > REL_TOL:
            sys.exit(f"{name}: spec replay of {key} differs from pycma by {err:e}")
    err = abs(es.sigma - spec["sigma"]) / spec["sigma"]
    worst = max(worst, err)
    if err > REL_TOL:
        sys.exit(f"{name}: spec replay of sigma differs from pycma by {err:e}")
    return worst


def local_fixture():
    x0 = np.random.RandomState(12345).standard_normal(DIM) * 0.3
    xstar = x0 + 0.5 * np.random.RandomState(777).standard_normal(DIM)
    f = shifted_sphere(xstar)
    opts = {"popsize": LOCAL_POPSIZE, "seed": LOCAL_SEED, "verbose": -9}
    es = cma.CMAEvolutionStrategy(x0, LOCAL_SIGMA0, opts)
    rec = RandnRecorder()
    log = instrument(es, rec)
    out = {
        "meta": meta("local"),
        "setup": {
            "constructor": "cma.CMAEvolutionStrategy(x0, sigma0, inopts)",
            "inopts": opts,
            "x0": floats(x0),
            "sigma0": LOCAL_SIGMA0,
            "fitness": "sum((x - xstar)**2)",
            "xstar": floats(xstar),
        },
        "params": params_of(es),
        "initial": state_of(es, with_b=True),
        "iterations": [],
    }
    worst = worst_ask = 0.0
    for it in range(LOCAL_ITERATIONS):
        directions = [d.copy() for d in es.pop_injection_directions]
        mean_before_ask = es.mean.copy()
        sigma_before_ask = float(es.sigma)
        xs = es.ask()
        draws = rec.take()
        n_inj = len(directions)
        mirrors = []
        for k, y in enumerate(directions):
            mn = float(es.sm.norm(y) / es.sigma)  # what ask_geno's mahalanobis_norm(y) gave
            rescaled = mn > es.N**0.5 * es.opts["CMA_injections_threshold_keep_len"]
            mirrors.append(
                {
                    "index": k,
                    "direction": floats(y),
                    "mahalanobis_norm": mn,
                    "rescaled": bool(rescaled),
                }
            )
        want = spec_ask(mean_before_ask, sigma_before_ask, es.sm.B, es.sm.D, directions, draws, LOCAL_POPSIZE)
        err = float(np.max(np.abs(want - np.asarray(xs))))
        if err > REL_TOL:
            sys.exit(f"local iteration {it + 1}: spec ask differs from pycma by {err:e}")
        worst_ask = max(worst_ask, err)
        fs = [f(x) for x in xs]
        snap = Snapshot(es)
        es.tell(xs, fs)
        spec = spec_tell(out["params"], snap, xs, fs, [False] * len(xs), [k < n_inj for k in range(len(xs))])
        worst = max(worst, check_replay(f"local iteration {it + 1}", spec, es))
        if spec["hsig"] != log["hsig"]:
            sys.exit("hsig mismatch")
        rec_it = {
            "iteration": it + 1,
            "mean_before_ask": floats(mean_before_ask),
            "sigma_before_ask": sigma_before_ask,
            "randn": draws,
            "injected": mirrors,
            "candidates": [floats(x) for x in xs],
            "fitness": fs,
            "ranking": [int(i) for i in es.fit.idx],
            "hsig": log["hsig"],
            "sampler_weights": log["sampler_weights"],
            "effective_weights": log["effective_weights"],
            "decay": log["decay"],
            "sigma_factor": log["sigma_factor"],
            "after": state_of(es, with_b=True),
            "next_mirror_source": None,
        }
        if es.pop_injection_directions:
            # mean_old - pop[fit.idx[-1]]: the worst candidate of this iteration
            rec_it["next_mirror_source"] = int(es.fit.idx[-1])
        out["iterations"].append(rec_it)
    out["meta"]["spec_replay_max_rel_err"] = worst
    out["meta"]["spec_ask_max_abs_err"] = worst_ask
    out["meta"]["copy_light_max_abs_diff"] = copy_light_check(x0, out)
    return out


def copy_light_check(x0, out):
    """The reference's client ES is global_es._copy_light(...); show it equals the fresh ES."""
    saved = np.random.get_state()
    g = cma.CMAEvolutionStrategy(
        x0, LOCAL_SIGMA0, {"seed": LOCAL_SEED, "popsize": CLIENTS, "maxiter": 200, "verbose": -9, "CMA_mu": CLIENTS}
    )
    es = g._copy_light(inopts={"seed": LOCAL_SEED, "maxiter": LOCAL_ITERATIONS, "popsize": LOCAL_POPSIZE, "CMA_mu": None})
    diff = 0.0
    for rec_it in out["iterations"]:
        xs = es.ask()
        diff = max(diff, float(np.max(np.abs(np.asarray(xs) - np.asarray(rec_it["candidates"])))))
        es.tell(xs, rec_it["fitness"])
    a = out["iterations"][-1]["after"]
    diff = max(diff, float(np.max(np.abs(es.sm.C[np.triu_indices(DIM)] - np.asarray(a["C_upper"])))))
    diff = max(diff, abs(es.sigma - a["sigma"]))
    np.random.set_state(saved)
    return diff


def server_fixture():
    xstar = np.random.RandomState(4242).standard_normal(DIM) * 0.5
    f = shifted_sphere(xstar)
    m = CLIENTS
    # global_es.py: cma_opts, then CMAEvolutionStrategy(intrinsic_dim * [0], sigma, cma_opts)
    cma_opts = {"seed": SEED, "popsize": m, "maxiter": SERVER_ROUNDS, "verbose": -1, "CMA_mu": m}
    es = cma.CMAEvolutionStrategy(DIM * [0], SERVER_SIGMA0, inopts=cma_opts)
    rec = RandnRecorder()
    log = instrument(es, rec)
    local_cma_mu = RecombinationWeights(LOCAL_POPSIZE).mu  # fedbpt_train.py
    local_sigma_current = es.sigma
    out = {
        "meta": meta("server"),
        "setup": {
            "constructor": "cma.CMAEvolutionStrategy(dim * [0], sigma0, inopts)",
            "inopts": cma_opts,
            "sigma0": SERVER_SIGMA0,
            "clients": m,
            "local_popsize": LOCAL_POPSIZE,
            "local_cma_mu": local_cma_mu,
            "fitness": "sum((x - xstar)**2) of each client mean",
            "xstar": floats(xstar),
        },
        "params": params_of(es),
        "initial": state_of(es),
        "rounds": [],
    }
    worst = 0.0
    for r in range(SERVER_ROUNDS):
        gen = np.random.RandomState(1000 + r)  # client data, independent of pycma's generator
        sigma_sent = float(es.sigma)
        # each client's sigmas before its local asks (fedbpt_train.py: local_sigmas)
        local_sigmas = [
            [sigma_sent * float(g) ** j for j in range(LOCAL_ITER_FOR_S6)]
            for g in gen.uniform(0.9, 1.1, size=m)
        ]
        client_sigma_list = [float(np.sum(np.array(s) ** 2)) for s in local_sigmas]
        s6 = float(np.sqrt(np.sum(np.array(client_sigma_list)) / m / local_cma_mu))
        es.sigma = s6  # global_es.sigma = global_sigma
        eigen_count_before_ask = es.sm.count_eigen
        global_sigma_old = es.sigma
        es.ask()  # the reference asks and discards: it draws popsize * dim normals and may decompose C
        draws = rec.take()
        state_before = state_of(es)
        snap = Snapshot(es)
        lengths = list(gen.permutation(TARGET_LENGTHS[r]))
        common = gen.standard_normal(DIM)
        means = []
        for L in lengths:
            z = COMMON_DRIFT[r] * common + gen.standard_normal(DIM)
            dx = es.sm.transform(z) * (L / np.linalg.norm(z)) * s6
            means.append(es.mean + dx)
        solutions = np.array(means)
        fitnesses = np.array([f(x) for x in solutions])
        mahal = [float(es.sm.norm(x - es.mean) / es.sigma) for x in solutions]
        es.tell(solutions, fitnesses)
        spec = spec_tell(out["params"], snap, solutions, fitnesses, [True] * m, [False] * m)
        worst = max(worst, check_replay(f"server round {r + 1}", spec, es))
        global_sigma_new = float(es.sigma)
        after_tell = state_of(es)
        # set local sigma (global_es.py)
        es.sigma = global_sigma_new / global_sigma_old * local_sigma_current
        local_sigma_current = es.sigma
        if es.sigma < 0.5:
            es.sigma = 0.5
        if es.sigma > local_sigma_current:
            es.sigma = local_sigma_current
        out["rounds"].append(
            {
                "round": r + 1,
                "sigma_sent": sigma_sent,
                "local_sigmas": local_sigmas,
                "client_sigma_sq_sums": client_sigma_list,
                "s6": s6,
                "ask_draws": [c["shape"] for c in draws],
                "eigen_in_ask": state_before["count_eigen"] > eigen_count_before_ask,
                "before_tell": state_before,
                "solutions": [floats(x) for x in solutions],
                "fitness": floats(fitnesses),
                "mahalanobis_norm": mahal,
                "clip_factor": [float(c) for c in spec["clip"]],
                "ranking": [int(i) for i in es.fit.idx],
                "hsig": log["hsig"],
                "sampler_weights": log["sampler_weights"],
                "decay": log["decay"],
                "sigma_factor": log["sigma_factor"],
                "after_tell": after_tell,
                "sigma_next": float(es.sigma),
            }
        )
    out["meta"]["spec_replay_max_rel_err"] = worst
    return out


def meta(kind):
    return {
        "kind": kind,
        "generator": "scripts/pycma_fixtures.py",
        "cma": cma.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "float_format": "JSON numbers written by Python repr (shortest round-trip)",
        "C_upper": "upper triangle of es.sm.C, row-major: C[0][0..d], C[1][1..d], ...",
        "B": "row-major d x d, columns are eigenvectors; present only when not the identity",
    }


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: pycma_fixtures.py OUTDIR")
    outdir = sys.argv[1]
    os.makedirs(outdir, exist_ok=True)
    cwd = os.getcwd()
    for name, build in (("pycma-local.json", local_fixture), ("pycma-server.json", server_fixture)):
        data = build()
        path = os.path.join(outdir, name)
        with open(path, "w") as fh:
            json.dump(data, fh, separators=(",", ":"))
            fh.write("\n")
        print(f"{path}: {os.path.getsize(path)} bytes, spec replay max rel err "
              f"{data['meta']['spec_replay_max_rel_err']:.1e}")
    if os.path.exists(os.path.join(cwd, "outcmaes")):
        print("warning: pycma wrote ./outcmaes", file=sys.stderr)


if __name__ == "__main__":
    main()
