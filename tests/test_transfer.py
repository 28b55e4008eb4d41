"""rayeff.tune.transfer.TransferSampler as a plain Optuna sampler, on toy objectives in the style of Optuna's own
examples (a float, a log-scale float, a log-scale int and a categorical), without any rayeff job."""

from __future__ import annotations

import math
import random
import statistics

import optuna
import pytest

from rayeff.tune.transfer import METHODS, SourceTask, TransferSampler

optuna.logging.set_verbosity(optuna.logging.WARNING)
PENALTY = {"adam": 0.0, "sgd": 1.0, "rmsprop": 3.0}


def toy(shift: float, scale: float = 1.0):
    """A bowl whose optimum moves with `shift`: related tasks have nearby optima; `scale` changes sign and units."""
    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", -5.0, 5.0)
        lr = trial.suggest_float("lr", 1e-5, 1e-1, log=True)
        width = trial.suggest_int("width", 1, 64, log=True)
        optimizer = trial.suggest_categorical("optimizer", list(PENALTY))
        loss = (x - 1 - shift) ** 2 + (math.log10(lr) + 3 + shift) ** 2 + (math.log2(width) - 3) ** 2 / 4
        return scale * (loss + PENALTY[optimizer])
    return objective


def source_study(shift: float, scale: float, seed: int, trials: int = 30, name: str | None = None,
                 direction: str | None = None) -> optuna.Study:
    """A random search on a related task; by default it improves where the loss falls, whatever `scale`."""
    study = optuna.create_study(direction=direction or ("minimize" if scale > 0 else "maximize"),
                                study_name=name or f"s{seed}", sampler=optuna.samplers.RandomSampler(seed=100 + seed))
    study.optimize(toy(shift, scale), n_trials=trials)
    return study


@pytest.fixture(scope="module")
def sources() -> list[optuna.Study]:
    """Three related tasks: one minimising, one maximising the negated loss in other units, one shifted further."""
    return [source_study(0.2, 1.0, 0), source_study(-0.3, -250.0, 1), source_study(0.5, 1.0, 2)]


def best_after(sampler: optuna.samplers.BaseSampler, trials: int) -> float:
    study = optuna.create_study(direction="minimize", sampler=sampler)
    study.optimize(toy(0.0), n_trials=trials)
    return study.best_value


def test_every_method_finds_the_related_optimum_sooner_than_cold_tpe_and_the_default_soonest(sources):
    """Median best loss after 6 trials over 5 seeds (the optimum is 0; cold TPE's median was 4.2 when written,
    the ensemble's 0.085, weighted TPE's 0.93, enqueue's 1.19: the sources' best random points)."""
    cold = statistics.median(best_after(optuna.samplers.TPESampler(seed=s), 6) for s in range(5))
    warm = {m: statistics.median(best_after(TransferSampler(sources, seed=s, method=m), 6) for s in range(5))
            for m in METHODS}
    assert all(w < cold / 3 for w in warm.values()), (warm, cold)
    assert warm["ensemble"] < cold / 20 and warm["ensemble"] == min(warm.values()), (warm, cold)


def test_a_source_that_ranks_the_target_backwards_loses_its_weight():
    """One source is the target's task, one its mirror image (best where the target is worst): after a few target
    trials the weights, learned from how each ranks them, go to the first."""
    like = source_study(0.0, 1.0, 3, name="like")
    mirror = source_study(0.0, -1.0, 4, name="mirror", direction="minimize")   # its best: the target's worst
    sampler = TransferSampler([like, mirror], seed=0)
    study = optuna.create_study(direction="minimize", sampler=sampler)
    study.optimize(toy(0.0), n_trials=2)
    assert sampler.weights == {"like": 0.5, "mirror": 0.5, "target": 0.0}   # one target trial: nothing to learn from
    study.optimize(toy(0.0), n_trials=2)
    later = []
    for _ in range(6):   # the weights of trials 5 to 10, each learned from the trials before it
        study.optimize(toy(0.0), n_trials=1)
        later.append(dict(sampler.weights))
        assert sum(sampler.weights.values()) == pytest.approx(1.0)
    assert all(w["mirror"] == 0.0 for w in later) and sum(w["like"] for w in later) > 1.0


def test_direction_and_scale_of_a_source_do_not_matter():
    """A source minimising v and the same trials maximising -1000 v are one task: the sampler proposes the same."""
    base = source_study(0.1, 1.0, 5)
    flipped = optuna.create_study(direction="maximize")
    for t in base.trials:
        flipped.add_trial(optuna.trial.create_trial(params=t.params, distributions=t.distributions,
                                                    value=-1000.0 * t.value))
    proposals = []
    for source in (base, flipped):
        study = optuna.create_study(direction="minimize", sampler=TransferSampler([source], seed=7))
        study.optimize(toy(0.0), n_trials=4)
        proposals.append([t.params for t in study.trials])
    assert proposals[0] == proposals[1]


def test_the_same_seed_proposes_the_same_trials_and_another_seed_does_not(sources):
    runs = {}
    for seed in (1, 1, 2):
        study = optuna.create_study(direction="minimize", sampler=TransferSampler(sources, seed=seed))
        study.optimize(toy(0.0), n_trials=5)
        runs.setdefault(seed, []).append([t.params for t in study.trials])
    assert runs[1][0] == runs[1][1] and runs[1][0] != runs[2][0]


def test_enqueue_tries_each_sources_best_in_turn_then_samples_inside_their_box(sources):
    sampler = TransferSampler(sources, seed=0, method="enqueue")
    study = optuna.create_study(direction="minimize", sampler=sampler)
    study.optimize(toy(0.0), n_trials=14)
    ranked = [sorted(s.trials, key=lambda t: t.value, reverse=s.direction == optuna.study.StudyDirection.MAXIMIZE)
              for s in sources]
    queue = [r[rank].params for rank in range(3) for r in ranked]
    assert [t.params for t in study.trials[:9]] == queue
    xs = [q["x"] for q in queue]
    low, high = min(xs) - 1.0, max(xs) + 1.0   # the margin: a tenth of the range of 10
    assert all(max(low, -5) <= t.params["x"] <= min(high, 5) for t in study.trials[9:])


@pytest.mark.parametrize("method", ["ensemble", "weighted"])
def test_a_discrete_space_is_covered_without_repeats(method):
    """Six configurations, six trials: each is evaluated once (a repeat would cost a trial and teach nothing)."""
    def objective(trial):
        return trial.suggest_int("k", 0, 2) + (trial.suggest_categorical("c", ["u", "v"]) == "v")

    source = optuna.create_study(sampler=optuna.samplers.BruteForceSampler(seed=0))
    source.optimize(objective, n_trials=6)
    study = optuna.create_study(sampler=TransferSampler([source], seed=0, method=method))
    study.optimize(objective, n_trials=6)
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 6
    assert study.trials[0].params == {"k": 0, "c": "u"}   # the source's best comes first


def grid_source(name: str, best: tuple[int, int], seed: int) -> optuna.Study:
    """Every point of a 6 x 6 grid, scored by its distance to `best` (and a little noise): a tabulated task."""
    study = optuna.create_study(study_name=name, sampler=optuna.samplers.BruteForceSampler(seed=seed))
    noise = random.Random(seed)
    study.optimize(lambda t: (t.suggest_int("a", 0, 5) - best[0]) ** 2 + (t.suggest_int("b", 0, 5) - best[1]) ** 2
                   + 0.01 * noise.random(), n_trials=36)
    return study


@pytest.mark.parametrize("method", ["ensemble", "weighted"])
def test_the_first_trials_are_the_sources_best_one_where_they_agree_one_each_where_they_do_not(method):
    """A portfolio of the sources' best configurations comes first: where two sources have their optimum at one
    point, that point and then the model's proposals; where they disagree, the configuration best summed over the
    sources, then the optimum of the source it serves worst, before the target's trials can say which to trust."""
    def first_trials(sources, objective):
        study = optuna.create_study(sampler=TransferSampler(sources, seed=0, method=method))
        study.optimize(objective, n_trials=3)
        return [(t.params["a"], t.params["b"]) for t in study.trials]

    def objective(t):
        return (t.suggest_int("a", 0, 5) - 1) ** 2 + (t.suggest_int("b", 0, 5) - 1) ** 2

    agree = first_trials([grid_source("p", (1, 1), 0), grid_source("q", (1, 1), 1)], objective)
    assert agree[0] == (1, 1) and agree[1] != (4, 4) and len(set(agree)) == 3
    disagree = first_trials([grid_source("p", (1, 1), 0), grid_source("q", (4, 4), 1), grid_source("r", (1, 2), 2)],
                            objective)
    assert disagree[:2] == [(1, 2), (4, 4)], disagree   # r's optimum is next to p's: it serves both


def test_ask_and_tell_with_the_targets_own_space_and_a_parameter_the_sources_lack(sources):
    """Through `study.ask(fixed_distributions)` (as rayeff's sweeps ask), with a range narrower than the sources'
    and a parameter no source has: values stay inside the target's distributions."""
    space = {"x": optuna.distributions.FloatDistribution(-1.0, 3.0),
             "lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
             "width": optuna.distributions.IntDistribution(1, 64, log=True),
             "optimizer": optuna.distributions.CategoricalDistribution(list(PENALTY)),
             "dropout": optuna.distributions.FloatDistribution(0.0, 0.5)}
    study = optuna.create_study(direction="minimize", sampler=TransferSampler(sources, seed=0))
    for _ in range(5):
        trial = study.ask(space)
        assert all(space[n]._contains(space[n].to_internal_repr(v)) for n, v in trial.params.items())
        study.tell(trial, toy(0.0)(optuna.trial.FixedTrial(trial.params)) + trial.params["dropout"])
    assert len(study.trials) == 5 and all(set(t.params) == set(space) for t in study.trials)


def test_bad_sources_and_methods_are_clear_errors(sources):
    two = optuna.create_study(directions=["minimize", "minimize"], study_name="two")
    with pytest.raises(ValueError, match="source study 'two' has 2 objectives"):
        TransferSampler([two])
    with pytest.raises(ValueError, match="method 'magic': use one of ensemble, weighted, enqueue"):
        TransferSampler(sources, method="magic")
    target = optuna.create_study(directions=["minimize", "minimize"], sampler=TransferSampler(sources))
    with pytest.raises(ValueError, match="multi-objective"):
        target.optimize(lambda t: (t.suggest_float("x", -5, 5), 0.0), n_trials=1)


def test_without_usable_sources_the_ensemble_is_bayesian_optimisation_on_the_target():
    """Two trials from the independent sampler (TPE's random start-up, as a cold TPE study draws them), then the
    target's own Gaussian process alone."""
    sampler = TransferSampler([SourceTask([], optuna.study.StudyDirection.MINIMIZE, "none")], seed=3)
    study = optuna.create_study(direction="minimize", sampler=sampler)
    study.optimize(toy(0.0), n_trials=3)
    reference = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=3))
    reference.optimize(toy(0.0), n_trials=3)
    assert [t.params for t in study.trials[:2]] == [t.params for t in reference.trials[:2]]
    assert study.trials[2].params != reference.trials[2].params and sampler.weights == {"target": 1.0}


def test_a_source_without_one_of_the_targets_parameters_still_counts_on_the_ones_it_has():
    """The source never tuned `width`: its trials teach the other three parameters; `width` comes from the model
    of the target's own trials and, before those, from the independent sampler."""
    def narrower(trial):
        x = trial.suggest_float("x", -5.0, 5.0)
        lr = trial.suggest_float("lr", 1e-5, 1e-1, log=True)
        optimizer = trial.suggest_categorical("optimizer", list(PENALTY))
        return (x - 1.2) ** 2 + (math.log10(lr) + 3.2) ** 2 + PENALTY[optimizer]

    source = optuna.create_study(study_name="no-width", sampler=optuna.samplers.RandomSampler(seed=9))
    source.optimize(narrower, n_trials=40)
    sampler = TransferSampler([source], seed=0)
    study = optuna.create_study(direction="minimize", sampler=sampler)
    study.optimize(toy(0.0), n_trials=3)
    assert sampler.source_trials_used == {"no-width": 40} and sampler.weights_of(0) == {"no-width": 1.0,
                                                                                      "target": 0.0}
    first = study.trials[0].params
    assert abs(first["x"] - 1.2) < 1.0 and abs(math.log10(first["lr"]) + 3.2) < 1.0 and first["optimizer"] == "adam"


def test_concurrent_proposals_spread_out_instead_of_landing_on_one_point(sources):
    """Four asks before any tell (four workers): each keeps clear of the ones still running."""
    study = optuna.create_study(direction="minimize", sampler=TransferSampler(sources, seed=0))
    running = [study.ask(sources[0].trials[0].distributions) for _ in range(4)]   # as rayeff's sweeps ask
    # the sampler's unit cube: x over its range of 10, lr in decades over its 4, width in octaves over its 6,
    # the optimizer one-hot
    points = [(t.params["x"] / 10, math.log10(t.params["lr"]) / 4, math.log2(t.params["width"]) / 6,
               *(float(t.params["optimizer"] == o) for o in PENALTY)) for t in running]
    gaps = [math.dist(a, b) for i, a in enumerate(points) for b in points[i + 1:]]
    assert min(gaps) > 0.2, points   # 0.31 when written; 0.055 before running trials were kept clear of


def test_each_trial_keeps_the_weights_it_was_proposed_with_and_a_queued_trial_has_none(sources):
    sampler = TransferSampler(sources, seed=0)
    study = optuna.create_study(direction="minimize", sampler=sampler)
    study.enqueue_trial({"x": 0.0, "lr": 1e-3, "width": 8, "optimizer": "adam"})
    study.optimize(toy(0.0), n_trials=5)
    assert sampler.weights_of(0) is None   # its values were fixed: the sampler proposed nothing
    assert all(set(sampler.weights_of(n)) == {"s0", "s1", "s2", "target"} for n in range(1, 5))
    assert sampler.weights_of(4) == sampler.weights and sum(sampler.weights_of(4).values()) == pytest.approx(1.0)
