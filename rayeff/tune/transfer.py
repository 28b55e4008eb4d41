"""Transfer hyper-parameter optimisation as an Optuna sampler: earlier studies on related tasks (sources) steer the
search of a new one (the target).

    sampler = TransferSampler([study_on_sst2, study_on_rte], seed=0)      # sources: plain optuna.Study objects
    target = optuna.create_study(direction="maximize", sampler=sampler)
    target.optimize(objective, n_trials=20)
    sampler.weights                                                        # {source name: weight} of the last trial

Sources may optimise on other scales and in other directions: each task's values become ranks, and the ranks
normal scores (a Gaussian copula, as in Salinas et al. 2020), higher always better. Three methods:

- `ensemble` (the default): one Gaussian process per task on those scores, the target's included, combined with
  weights learned from how well each model ranks the target's observed trials (the ranking-weighted ensemble of
  Feurer et al. 2018: bootstrap the target's trials, count how often each model orders their pairs best; a source
  that ranks worse than the target's own model mostly does gets no weight). The next trial maximises expected
  improvement of the ensemble over candidates drawn at random and around the best points.
- `weighted`: TPE over the target's trials plus the sources' trials as weighted observations (the same learned
  weights, fading as target trials accumulate): each task's top quarter is "good", and the next trial maximises
  the ratio of the good density to the rest's.
- `enqueue`: the sources' best configurations first, then Optuna's TPE inside their bounding box (with a margin):
  the simple warm start, kept as a baseline.

`ensemble` and `weighted` start from a portfolio of the sources' best configurations, up to three, chosen greedily:
the best summed over sources, then while sources disagree the one that adds most to the sum over sources of the
best score picked so far (the warm starts of Feurer et al. 2015 and Wistuba et al. 2015). Until the target has two
trials its model cannot be weighed against the sources'; the portfolio spends those first trials where sources did
well, rather than on a blend of sources that may disagree.

Before the target has trials, its search space is the parameters every source has, with the sources'
distributions (pass `search_space` when the target's differs). `ensemble` and `weighted` do not propose a
configuration the target has already evaluated while others remain (in a discrete space a repeat costs a trial and
teaches nothing). Without usable sources, `ensemble` is Bayesian optimisation with the target's own Gaussian
process (after two trials from the independent sampler), and `weighted` is TPE on the target's trials.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Sequence, get_args

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.samplers import BaseSampler, TPESampler
from optuna.search_space import IntersectionSearchSpace
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState
from scipy.stats import norm, rankdata

Method = Literal["ensemble", "weighted", "enqueue"]
METHODS: tuple[str, ...] = get_args(Method)

MAX_SOURCE_TRIALS = 200     # a source's surrogate is fitted on at most its best half and a random rest of this many
BOOTSTRAP_SAMPLES = 100     # resamples of the target's trials when learning the weights
RANDOM_CANDIDATES = 1000
LOCAL_CANDIDATES = 40       # candidates around each of the best points
LOCAL_SCALE = 0.1           # their spread, in the unit cube
GOOD_FRACTION = 0.25        # weighted: the share of each task's trials that counts as good
SOURCE_MASS = 10.0          # weighted: a source's trials weigh as much as this many target trials at first ...
FADE_TRIALS = 10.0          # ... halved once the target has this many
ENQUEUE_TOP = 3             # enqueue: each source's best configurations tried first
PORTFOLIO = 3               # ensemble, weighted: at most this many sources' best configurations first ...
PORTFOLIO_POOL = 5          # ... chosen among each source's this many best, each pick raising the sum over
PORTFOLIO_GAIN = 0.5        # sources of their best score picked so far by this much (normal scores)
LOG_MARGIN, LINEAR_MARGIN = 2.0, 0.1   # enqueue: the box reaches this factor (log) or fraction (linear) beyond them


@dataclass
class SourceTask:
    """A source's completed trials and the direction its values improve in."""
    trials: list[FrozenTrial]
    direction: StudyDirection
    name: str = ""
    descriptors: dict = field(default_factory=dict)

    @classmethod
    def from_study(cls, study: Study, name: str | None = None) -> SourceTask:
        if len(study.directions) > 1:
            raise ValueError(f"source study {study.study_name!r} has {len(study.directions)} objectives; "
                             "TransferSampler takes single-objective sources")
        trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        return cls(trials, study.direction, name or study.study_name)


def normal_scores(values: Sequence[float], direction: StudyDirection) -> np.ndarray:
    """Ranks turned into standard-normal quantiles, higher better: comparable across tasks and scales."""
    sign = 1.0 if direction == StudyDirection.MAXIMIZE else -1.0
    ranks = rankdata(sign * np.asarray(values, dtype=float))
    return norm.ppf((ranks - 0.5) / len(ranks))


class _Encoding:
    """A search space as the unit cube: numbers on their (log) scale in [0, 1], each category a one-hot column."""

    def __init__(self, space: dict[str, BaseDistribution]):
        self.space = dict(sorted(space.items()))
        self.columns: list[tuple[str, Any]] = []    # (name, None) for a number, (name, choice) per category
        for name, d in self.space.items():
            if isinstance(d, CategoricalDistribution):   # (a choice of None would read as a number: none is)
                self.columns += [(name, c) for c in d.choices]
            else:
                self.columns.append((name, None))

    def _scale(self, d, value: float) -> float:
        low, high, v = (math.log(d.low), math.log(d.high), math.log(value)) if d.log else (d.low, d.high, value)
        return 0.5 if high == low else min(max((v - low) / (high - low), 0.0), 1.0)

    def encode(self, params: dict) -> np.ndarray:
        return np.array([self._scale(self.space[n], params[n]) if c is None else float(params[n] == c)
                         for n, c in self.columns])

    def decode(self, u: np.ndarray) -> dict:
        params, i = {}, 0
        for name, d in self.space.items():
            if isinstance(d, CategoricalDistribution):
                k = len(d.choices)
                params[name] = d.choices[int(np.argmax(u[i:i + k]))]
                i += k
                continue
            x = min(max(float(u[i]), 0.0), 1.0)
            low, high = (math.log(d.low), math.log(d.high)) if d.log else (d.low, d.high)
            value = math.exp(low + x * (high - low)) if d.log else low + x * (high - low)
            step = getattr(d, "step", None)
            if step:
                value = d.low + round((value - d.low) / step) * step
            value = min(max(value, d.low), d.high)
            params[name] = int(round(value)) if isinstance(d, IntDistribution) else float(value)
            i += 1
        return params

    def fits(self, params: dict) -> bool:
        """The configuration has every parameter, inside this space."""
        return self.accepts(params) and all(isinstance(d, CategoricalDistribution) or d.low <= params[n] <= d.high
                                            for n, d in self.space.items())

    def accepts(self, params: dict) -> bool:
        """The configuration has every parameter and can be placed in the cube: choices among this space's,
        numbers (out-of-range ones are clipped to the edge)."""
        for name, d in self.space.items():
            value = params.get(name)
            if isinstance(d, CategoricalDistribution):
                if name not in params or value not in d.choices:
                    return False
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
                    (d.log and value <= 0):
                return False
        return True

    def restricted(self, names) -> _Encoding:
        return _Encoding({n: d for n, d in self.space.items() if n in names})

    def random(self, rng: np.random.RandomState, count: int) -> np.ndarray:
        blocks = []
        for name, d in self.space.items():
            if isinstance(d, CategoricalDistribution):
                blocks.append(np.eye(len(d.choices))[rng.randint(len(d.choices), size=count)])
            else:
                blocks.append(rng.uniform(size=(count, 1)))
        return np.hstack(blocks) if blocks else np.zeros((count, 0))

    def around(self, rng: np.random.RandomState, centre: np.ndarray, count: int) -> np.ndarray:
        """Points near `centre`: numbers moved by a small Gaussian step, categories redrawn now and then."""
        points = self.random(rng, count)
        i = 0
        for name, d in self.space.items():
            if isinstance(d, CategoricalDistribution):
                k = len(d.choices)
                keep = rng.uniform(size=count) > 0.2
                points[keep, i:i + k] = centre[i:i + k]
                i += k
            else:
                points[:, i] = np.clip(centre[i] + LOCAL_SCALE * rng.normal(size=count), 0.0, 1.0)
                i += 1
        return points


class _Task:
    """One task's observations, their normal scores, and a Gaussian process fitted on them in the task's own cube
    (a source's: the target's parameters it has)."""

    def __init__(self, encoding: _Encoding, params: list[dict], scores: np.ndarray, seed: int):
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.gaussian_process import GaussianProcessRegressor
        from sklearn.gaussian_process.kernels import ConstantKernel, Matern, WhiteKernel

        self.encoding, self.params, self.scores = encoding, params, scores
        self.x = self.encode(params)
        # Matern 5/2 with a length scale per column (ARD) and a noise term: the usual BO surrogate.
        kernel = ConstantKernel(1.0, (1e-2, 1e2)) * Matern(np.full(self.x.shape[1], 0.5), (1e-2, 1e1), nu=2.5) + \
            WhiteKernel(1e-2, (1e-6, 1.0))
        self.gp = GaussianProcessRegressor(kernel, normalize_y=True, random_state=seed)
        with warnings.catch_warnings():   # a length scale at its bound is expected with a handful of points
            warnings.simplefilter("ignore", ConvergenceWarning)
            self.gp.fit(self.x, scores)

    def encode(self, params: list[dict]) -> np.ndarray:
        return np.array([self.encoding.encode(p) for p in params])

    def predict(self, params: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard deviation of the score of each configuration."""
        return self.gp.predict(self.encode(params), return_std=True)

    def leave_one_out(self) -> np.ndarray:
        """Each observation's prediction from all the others (closed form, the fitted kernel kept)."""
        k_inv = np.linalg.inv(self.gp.kernel_(self.x))
        y = (self.scores - self.scores.mean())
        return self.scores - (k_inv @ y) / np.diag(k_inv)


def _misranked_pairs(predicted: np.ndarray, actual: np.ndarray, sample: np.ndarray) -> int:
    """Pairs of the resampled target trials that the predictions order the other way round."""
    p, a = predicted[sample], actual[sample]
    return int(np.sum((p[:, None] < p[None, :]) != (a[:, None] < a[None, :])) // 2)


def learn_weights(source_predictions: list[np.ndarray], target_loo: np.ndarray | None, target_scores: np.ndarray,
                  rng: np.random.RandomState) -> np.ndarray:
    """The ranking-weighted ensemble's weights, sources first and the target's own model last: the share of
    bootstrap resamples of the target's trials on which each model misranks fewest pairs (ties shared). A source
    whose median loss exceeds the target model's 95th percentile gets no weight (Feurer et al. 2018's dilution
    guard). Before the target has two trials nothing is known: equal weights over the sources."""
    count = len(source_predictions)
    n = len(target_scores)
    if n < 2 or target_loo is None:
        return np.append(np.full(count, 1.0 / count), 0.0) if count else np.array([1.0])
    predictions = source_predictions + [target_loo]
    losses = np.empty((BOOTSTRAP_SAMPLES, count + 1))
    for b in range(BOOTSTRAP_SAMPLES):
        sample = rng.randint(n, size=n)
        losses[b] = [_misranked_pairs(p, target_scores, sample) for p in predictions]
    best = losses == losses.min(axis=1, keepdims=True)
    weights = (best / best.sum(axis=1, keepdims=True)).mean(axis=0)
    diluting = np.median(losses[:, :count], axis=0) > np.percentile(losses[:, count], 95)
    weights[:count][diluting] = 0.0
    if weights.sum() == 0:   # every winner was a diluting source: the target's own model alone
        weights[count] = 1.0
    return weights / weights.sum()


@dataclass
class _Source:
    """A source as the sampler uses it: its trials that fit the target's space, on the parameters it shares."""
    task: SourceTask
    trials: list[FrozenTrial]
    encoding: _Encoding     # the target's space restricted to the shared parameters

    def ranked(self) -> list[FrozenTrial]:
        return sorted(self.trials, key=lambda t: t.value, reverse=self.task.direction == StudyDirection.MAXIMIZE)


class TransferSampler(BaseSampler):
    """An Optuna sampler that learns from source studies (see the module's docstring).

    `sources`: `optuna.Study` objects (or `SourceTask`s) whose completed trials share parameter names with the
    target. `method`: ensemble (default), weighted or enqueue. `search_space`: the target's, when the sources'
    distributions differ from it. `independent_sampler` samples parameters outside the space (default TPE).

    After each proposal, `weights` holds the weights it used ({source name: weight, "target": weight}) and
    `weights_of(trial_number)` those of any trial this sampler proposed; `source_trials_used` says how many of
    each source's trials fit the target's space."""

    def __init__(self, sources: Sequence[Study | SourceTask], seed: int | None = None, method: Method = "ensemble",
                 search_space: dict[str, BaseDistribution] | None = None,
                 independent_sampler: BaseSampler | None = None):
        if method not in METHODS:
            raise ValueError(f"method {method!r}: use one of {', '.join(METHODS)}")
        self.sources: list[SourceTask] = []
        for i, s in enumerate(sources):   # names key the weights: each one unique
            s = s if isinstance(s, SourceTask) else SourceTask.from_study(s)
            unique = s.name and s.name not in {t.name for t in self.sources}
            self.sources.append(replace(s, name=s.name if unique else f"{s.name or 'source'}#{i}"))
        self.method = method
        self._seed = seed
        self._rng = np.random.RandomState(seed)
        self._fixed_space = search_space
        self._independent = independent_sampler or TPESampler(seed=seed)
        self._box_tpe = TPESampler(seed=seed)
        self._intersection = IntersectionSearchSpace()
        self._fitted: tuple[tuple, list[_Task], list[dict]] | None = None   # for one search space: the sources'
        # models and the portfolio of their best configurations
        self._box: dict[str, BaseDistribution] = {}             # enqueue: where TPE samples after the queue
        self._weights_by_trial: dict[int, dict[str, float]] = {}
        self.weights: dict[str, float] = {}
        self.source_trials_used: dict[str, int] = {}

    def reseed_rng(self) -> None:
        self._rng.seed()
        self._independent.reseed_rng()
        self._box_tpe.reseed_rng()

    def weights_of(self, trial_number: int) -> dict[str, float] | None:
        return self._weights_by_trial.get(trial_number)

    # -- the search space ------------------------------------------------------------------------------------------

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        if self._fixed_space is not None:
            return {n: d for n, d in self._fixed_space.items() if not d.single()}
        space = self._intersection.calculate(study)
        if space:
            return {n: d for n, d in space.items() if not d.single()}
        common: dict[str, BaseDistribution] | None = None   # the target has no trials yet: the sources' space
        for s in self.sources:
            for t in s.trials:
                common = dict(t.distributions) if common is None else {
                    n: d for n, d in common.items() if t.distributions.get(n) == d}
        return {n: d for n, d in (common or {}).items() if not d.single()}

    def sample_independent(self, study: Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        if self.method == "enqueue" and param_name in self._box:
            return self._box_tpe.sample_independent(study, trial, param_name, self._box[param_name])
        return self._independent.sample_independent(study, trial, param_name, param_distribution)

    # -- sampling --------------------------------------------------------------------------------------------------

    def sample_relative(self, study: Study, trial: FrozenTrial, space: dict[str, BaseDistribution]) -> dict:
        self._raise_error_if_multi_objective(study)
        self._box = {}
        if not space:
            return {}
        encoding = _Encoding(space)
        usable = self._usable_sources(encoding)
        self.source_trials_used = {s.task.name: len(s.trials) for s in usable}
        others = [t for t in study.get_trials(deepcopy=False) if t.number != trial.number]
        seen = {tuple(encoding.encode(t.params)) for t in others if encoding.fits(t.params)}
        running = [t.params for t in others if t.state == TrialState.RUNNING and encoding.fits(t.params)]
        if self.method == "enqueue":   # no model, no weights: every source's best configurations count alike
            self._record(trial, {s.task.name: 1.0 / len(usable) for s in usable})
            return self._enqueued(encoding, usable, others)
        sources, portfolio = self._source_models(encoding, usable)
        done = [t for t in others if t.state == TrialState.COMPLETE and encoding.fits(t.params)]
        target = self._target_task(encoding, done, study.direction)
        weights = self._learn(sources, target)
        self._record(trial, {**{s.task.name: float(w) for s, w in zip(usable, weights[:-1])},
                             "target": float(weights[-1])})
        if len(others) < len(portfolio):   # the study's first trials
            unseen = [p for p in portfolio if not any(_agrees(t.params, p) for t in others)]
            if unseen:
                return unseen[0]
        if self.method == "weighted":
            return self._weighted_tpe(encoding, sources, target, weights, seen, running)
        return self._ensemble_ei(encoding, sources, target, weights, seen, running)

    def _record(self, trial: FrozenTrial, weights: dict[str, float]) -> None:
        self.weights = weights
        self._weights_by_trial[trial.number] = weights

    def _usable_sources(self, encoding: _Encoding) -> list[_Source]:
        """Each source's finished trials on the parameters it shares with the target (those every one of its
        finished trials has), with choices the target offers; sources that share none are left out."""
        usable = []
        for s in self.sources:
            trials = [t for t in s.trials if t.state == TrialState.COMPLETE and t.value is not None
                      and math.isfinite(t.value)]
            shared = set(encoding.space).intersection(*(t.params for t in trials)) if trials else set()
            sub = encoding.restricted(shared)
            trials = [t for t in trials if sub.accepts(t.params)]
            if shared and trials:
                usable.append(_Source(s, trials, sub))
        return usable

    def _source_models(self, encoding: _Encoding, usable: list[_Source]) -> tuple[list[_Task], list[dict]]:
        """Each usable source as a task, and the portfolio of their best configurations; fitted once per target
        space (sources do not change)."""
        key = tuple((n, repr(d)) for n, d in encoding.space.items())
        if self._fitted is not None and self._fitted[0] == key:
            return self._fitted[1], self._fitted[2]
        tasks = []
        for i, s in enumerate(usable):
            scores = normal_scores([t.value for t in s.trials], s.task.direction)
            keep = self._subsample(scores)
            tasks.append(_Task(s.encoding, [s.trials[k].params for k in keep], scores[keep], self._task_seed(i)))
        portfolio = _portfolio(usable, tasks)
        self._fitted = (key, tasks, portfolio)
        return tasks, portfolio

    def _subsample(self, scores: np.ndarray) -> np.ndarray:
        if len(scores) <= MAX_SOURCE_TRIALS:
            return np.arange(len(scores))
        order = np.argsort(-scores)
        best, rest = order[:MAX_SOURCE_TRIALS // 2], order[MAX_SOURCE_TRIALS // 2:]
        return np.concatenate([best, self._rng.choice(rest, MAX_SOURCE_TRIALS - len(best), replace=False)])

    def _task_seed(self, i: int) -> int:
        return (0 if self._seed is None else self._seed) * 1009 + i

    def _target_task(self, encoding: _Encoding, done: list[FrozenTrial], direction) -> _Task | None:
        if len(done) < 2:
            return None
        scores = normal_scores([t.value for t in done], direction)
        return _Task(encoding, [t.params for t in done], scores, self._task_seed(len(self.sources)))

    def _learn(self, sources: list[_Task], target: _Task | None) -> np.ndarray:
        if target is None:
            return learn_weights([np.zeros(0)] * len(sources), None, np.zeros(0), self._rng)
        predictions = [s.predict(target.params)[0] for s in sources]
        return learn_weights(predictions, target.leave_one_out(), target.scores, self._rng)

    def _fresh(self, encoding: _Encoding, candidates: np.ndarray, seen: set) -> np.ndarray:
        """The candidates snapped onto the space (grids, integers, one category), without repeats and without
        configurations the target has evaluated or is evaluating; when none is new, random ones that are; when
        the space holds none, the snapped candidates."""
        unique = {tuple(u): u for u in (encoding.encode(encoding.decode(c)) for c in candidates)}
        fresh = [u for k, u in unique.items() if k not in seen]
        if not fresh:
            extra = {tuple(u): u for u in (encoding.encode(encoding.decode(c))
                                           for c in encoding.random(self._rng, RANDOM_CANDIDATES))}
            fresh = [u for k, u in extra.items() if k not in seen]
        return np.array(fresh or list(unique.values()))

    def _best_points(self, encoding: _Encoding, tasks: list[_Task], weights: np.ndarray) -> list[np.ndarray]:
        """Each weighted task's two best configurations, in the target's cube (a source's missing parameters at
        random)."""
        points = []
        for task, weight in zip(tasks, weights):
            if weight > 0:
                for i in np.argsort(-task.scores)[:2]:
                    filled = encoding.decode(encoding.random(self._rng, 1)[0]) | task.params[i]
                    points.append(encoding.encode(filled))
        return points

    def _ensemble_ei(self, encoding, sources, target, weights, seen, running) -> dict:
        """Expected improvement of the weighted ensemble over the target's best, among random candidates and
        candidates near each task's best; before the target has two trials, the ensemble's best mean."""
        tasks = sources + ([target] if target is not None else [])
        w = weights if target is not None else weights[:-1]
        if not tasks or not np.any(w > 0):
            return {}
        blocks = [encoding.random(self._rng, RANDOM_CANDIDATES)]
        blocks += [encoding.around(self._rng, c, LOCAL_CANDIDATES) for c in self._best_points(encoding, tasks, w)]
        candidates = self._fresh(encoding, np.vstack(blocks), seen)
        params = [encoding.decode(c) for c in candidates]
        mean, var = np.zeros(len(candidates)), np.zeros(len(candidates))
        for task, weight in zip(tasks, w):
            if weight > 0:
                m, s = task.predict(params)
                mean += weight * m
                var += (weight * s) ** 2
        if target is None:   # nothing measured yet: the sources' consensus optimum
            gain = mean - mean.min() + 1e-9
        else:
            best_seen = [target.params[int(np.argmax(target.scores))]]   # the ensemble at the target's best trial
            incumbent = sum(weight * task.predict(best_seen)[0][0] for task, weight in zip(tasks, w) if weight > 0)
            std = np.sqrt(np.maximum(var, 1e-12))
            z = (mean - incumbent) / std
            gain = (mean - incumbent) * norm.cdf(z) + std * norm.pdf(z)
        gain = gain * _away_from(candidates, [encoding.encode(p) for p in running])
        return params[int(np.argmax(gain))]

    def _weighted_tpe(self, encoding, sources, target, weights, seen, running) -> dict:
        """TPE with weighted observations: per task the top quarter is good; Parzen densities of good and rest (a
        uniform component in each), and the candidate with the best ratio. A source's observations take random
        values for the parameters it lacks (its density is spread over them)."""
        n_target = 0 if target is None else len(target.scores)
        fade = FADE_TRIALS / (FADE_TRIALS + n_target)
        groups = [(t, SOURCE_MASS * fade * w / len(t.scores)) for t, w in zip(sources, weights[:-1]) if w > 0]
        if target is not None:
            groups.append((target, 1.0))
        good_x, good_w, bad_x, bad_w = [], [], [], []
        for task, weight in groups:
            cut = np.quantile(task.scores, 1 - GOOD_FRACTION)
            filler = encoding.random(self._rng, len(task.params))
            for p, s, fill in zip(task.params, task.scores, filler):
                x = encoding.encode(encoding.decode(fill) | p)
                (good_x if s >= cut else bad_x).append(x)
                (good_w if s >= cut else bad_w).append(weight)
        if not good_x:
            return {}
        good_x, good_w = np.array(good_x), np.array(good_w)
        picks = self._rng.choice(len(good_x), size=64, p=good_w / good_w.sum())
        candidates = self._fresh(encoding, np.vstack([encoding.around(self._rng, good_x[i], 1) for i in picks] +
                                                     [encoding.random(self._rng, 16)]), seen)
        bandwidth = max(0.05, 0.3 * (len(good_x) + len(bad_x)) ** -0.2)
        bad = np.array(bad_x) if bad_x else np.zeros((0, candidates.shape[1]))
        ratio = _density(candidates, good_x, good_w, bandwidth) / _density(candidates, bad, np.array(bad_w), bandwidth)
        ratio = ratio * _away_from(candidates, [encoding.encode(p) for p in running])
        return encoding.decode(candidates[int(np.argmax(ratio))])

    def _enqueued(self, encoding: _Encoding, usable: list[_Source], others: list[FrozenTrial]) -> dict:
        """The sources' best configurations in turn (round robin over sources), then TPE in their box. A source's
        configuration covers the parameters it shares with the target; the others are sampled independently."""
        ranked = [[{n: t.params[n] for n in s.encoding.space} for t in s.ranked()] for s in usable]
        queue = []
        for rank in range(ENQUEUE_TOP):
            for configurations in ranked:
                if rank < len(configurations) and configurations[rank] not in queue:
                    queue.append(configurations[rank])
        self._box = _bounding_box(encoding.space, queue)
        for params in queue:
            if not any(_agrees(t.params, params) for t in others):
                return params
        return {}


def _portfolio(usable: list[_Source], tasks: list[_Task]) -> list[dict]:
    """Up to PORTFOLIO configurations from the sources' best (each source's PORTFOLIO_POOL best, on the parameters
    it shares with the target), picked greedily: the one with the best summed score over sources, then each pick
    maximises the sum over sources of the best score among the picks, while it raises it by PORTFOLIO_GAIN. A
    configuration's score in a source is its observed one there, else that source's model's prediction."""
    pool: list[dict] = []
    for s in usable:
        for t in s.ranked()[:PORTFOLIO_POOL]:
            params = {n: t.params[n] for n in s.encoding.space}
            if params not in pool:
                pool.append(params)
    if not pool:
        return []
    scores = np.empty((len(pool), len(tasks)))
    for j, (s, task) in enumerate(zip(usable, tasks)):
        names = list(s.encoding.space)
        observed = {tuple((n, p[n]) for n in names): v for p, v in zip(task.params, task.scores)}
        for i, params in enumerate(pool):
            if any(n not in params for n in names):   # lacks some of this source's parameters: no evidence here
                scores[i, j] = task.scores.min()
            else:
                key = tuple((n, params[n]) for n in names)
                scores[i, j] = observed[key] if key in observed else task.predict([params])[0][0]
    picks = [int(np.argmax(scores.sum(axis=1)))]
    covered = scores[picks[0]]
    while len(picks) < min(PORTFOLIO, len(tasks)):   # then what covers the sources the picks serve worst
        gains = np.maximum(covered, scores).sum(axis=1) - covered.sum()
        best = int(np.argmax(gains))
        if gains[best] < PORTFOLIO_GAIN:   # the sources agree: one more of their best would teach little
            break
        picks.append(best)
        covered = np.maximum(covered, scores[best])
    return [pool[i] for i in picks]


def _agrees(params: dict, partial: dict) -> bool:
    """`params` holds every value of `partial`."""
    return all(n in params and params[n] == v for n, v in partial.items())


def _away_from(candidates: np.ndarray, running: list[np.ndarray]) -> np.ndarray:
    """A factor that falls to 0 at configurations other workers are evaluating now (local penalisation), so that
    concurrent proposals spread out instead of landing on one point."""
    factor = np.ones(len(candidates))
    for r in running:
        factor *= 1.0 - np.exp(-0.5 * ((candidates - r) ** 2).sum(axis=1) / LOCAL_SCALE ** 2)
    return factor


def _density(points: np.ndarray, centres: np.ndarray, weights: np.ndarray, bandwidth: float) -> np.ndarray:
    """A weighted Gaussian mixture in the unit cube plus a uniform component of weight 1."""
    if len(centres) == 0:
        return np.ones(len(points))
    d2 = ((points[:, None, :] - centres[None, :, :]) ** 2).sum(axis=2)
    kernel = np.exp(-0.5 * d2 / bandwidth ** 2)
    return (kernel @ weights + 1.0) / (weights.sum() + 1.0)


def _bounding_box(space: dict[str, BaseDistribution], good: list[dict]) -> dict[str, BaseDistribution]:
    """Each numeric range shrunk to the span of the good configurations plus a margin, within the original."""
    box = {}
    for name, d in space.items():
        values = [g[name] for g in good if name in g]
        if isinstance(d, CategoricalDistribution) or not values:
            continue
        if d.log:
            low, high = min(values) / LOG_MARGIN, max(values) * LOG_MARGIN
        else:
            margin = LINEAR_MARGIN * (d.high - d.low)
            low, high = min(values) - margin, max(values) + margin
        low, high = max(low, d.low), min(high, d.high)
        step = getattr(d, "step", None)
        if isinstance(d, IntDistribution):
            step = step or 1
            low = d.low + math.floor((low - d.low) / step) * step
            high = d.low + math.ceil((high - d.low) / step) * step
            box[name] = IntDistribution(int(low), int(min(high, d.high)), log=d.log, step=step)
        elif step:
            low = d.low + math.floor((low - d.low) / step) * step
            high = min(d.low + math.ceil((high - d.low) / step) * step, d.high)
            box[name] = FloatDistribution(low, high, step=step)
        else:
            box[name] = FloatDistribution(low, high, log=d.log)
    return box

