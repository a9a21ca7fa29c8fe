"""The sweep: arms of (method, strength, seed), their keys and tags, the config that makes them, what
TRL gets for each arm, the array the launcher submits, and the frontier's means over seeds."""
import csv
import io
import math
import statistics

import pytest

from jobs import records
from jobs.config import resolve_config, save_config
from jobs.launcher import plan_slurm
from pipeline.rundir.layout import RunLayout, atomic_write_json
from pipeline.training.methods import METHODS
from pipeline.registry import Arm, get_stage, sweep_arms, trained_arms
from pipeline.reporting.frontier import FRONTIER_COLUMNS, frontier_csv, seed_means, seed_means_csv
from pipeline.reporting.report import report_markdown

TWO_BY_TWO_BY_TWO = ["sweep.methods=[dpo,ipo]", "sweep.strengths.ipo=[0.5,2]", "dpo.betas=[0.1,1]",
                     "sweep.seeds=[3,4]"]


# ------------------------------------------------------------------ keys and tags
def test_the_default_arm_keeps_the_beta_only_key_and_tag():
    arm = Arm.parse("0.1")
    assert arm == Arm(0.1) == Arm(0.1, "dpo", None) and arm.method == "dpo" and arm.seed is None
    assert (arm.key, arm.tag, arm.dirname, arm.beta, arm.strength) == ("0.1", "beta-0.1", "beta-0.1", 0.1, 0.1)
    assert Arm.parse("dpo:0.1") == arm  # the explicit spelling of the same arm
    assert resolve_config("gpt2-large").sweep.methods == ["dpo"]
    assert [a.key for a in sweep_arms(resolve_config("gpt2-large"))] == ["0.05", "0.1", "1.0"]


@pytest.mark.parametrize("arm, key, tag", [
    (Arm(0.05), "0.05", "beta-0.05"),
    (Arm(1.0), "1.0", "beta-1.0"),
    (Arm(0.1, "ipo"), "ipo:0.1", "ipo-beta-0.1"),
    (Arm(0.1, "dpo", 1), "dpo:0.1:seed1", "dpo-beta-0.1-seed-1"),
    (Arm(5.0, "robust", 0), "robust:5.0:seed0", "robust-beta-5.0-seed-0"),
    (Arm(1e-5, "hinge", 12), "hinge:1e-05:seed12", "hinge-beta-1e-05-seed-12"),
    (Arm(None, "preferred_ft"), "preferred_ft", "preferred-ft"),
    (Arm(None, "preferred_ft", 1), "preferred_ft:seed1", "preferred-ft-seed-1"),
    (Arm(4, "best_of_n"), "best_of_n:4", "best-of-n-4"),
    (Arm(16.0, "best_of_n", 0), "best_of_n:16:seed0", "best-of-n-16-seed-0"),
])
def test_every_key_round_trips_and_every_tag_is_a_plain_name(arm, key, tag):
    assert (arm.key, arm.tag) == (key, tag)
    assert Arm.parse(arm.key) == arm and Arm.parse(arm.key).key == key
    assert all(c.isalnum() or c in ".-" for c in tag)  # a directory name, a wandb run name
    assert "/" not in key and not key.startswith("-")


@pytest.mark.parametrize("spelling", ["ipo:2", "ipo:2.0", "IPO:2e0", " ipo : 20e-1 ", "ipo:2:seed7", "ipo:2:seed07"])
def test_any_spelling_of_an_arm_names_the_same_arm(spelling):
    arm = get_stage("dpo").parse_task(spelling)
    assert (arm.method, arm.beta) == ("ipo", 2.0) and arm.seed == (7 if "seed" in spelling else None)


@pytest.mark.parametrize("text", ["nosuch:0.1", "ipo:x", "ipo:0.1:7", "ipo:0.1:seed-1", "ipo:0.1:seedx", "a:b:c:d", "",
                                  "ipo", "preferred_ft:0.1", "preferred_ft:0.1:seed1", "best_of_n:1", "best_of_n:2.5",
                                  "best_of_n"])
def test_bad_arm_keys_are_refused_with_the_form(text):
    with pytest.raises(ValueError, match=r"METHOD:BETA\[:seedN\], e.g. --task ipo:0.5"):
        Arm.parse(text)


def test_arms_are_methods_by_strengths_by_seeds_in_config_order():
    cfg = resolve_config("tiny", sets=TWO_BY_TWO_BY_TWO)
    assert [a.key for a in sweep_arms(cfg)] == [
        "dpo:0.1:seed3", "dpo:0.1:seed4", "dpo:1.0:seed3", "dpo:1.0:seed4",
        "ipo:0.5:seed3", "ipo:0.5:seed4", "ipo:2.0:seed3", "ipo:2.0:seed4"]
    assert len({a.tag for a in sweep_arms(cfg)}) == 8
    no_seeds = resolve_config("tiny", sets=TWO_BY_TWO_BY_TWO[:-1])
    assert [a.key for a in sweep_arms(no_seeds)] == ["0.1", "1.0", "ipo:0.5", "ipo:2.0"]


def test_the_tiny_methods_preset_sweeps_every_method_over_two_seeds():
    cfg = resolve_config("tiny-methods")
    arms = sweep_arms(cfg)
    assert {a.method for a in arms} == set(METHODS) and {a.seed for a in arms} == {0, 1}
    assert len(arms) == 2 * sum(len(cfg.sweep.strengths_of(m, cfg.dpo.betas)) for m in cfg.sweep.methods)
    assert [a.key for a in arms if a.method in ("preferred_ft", "best_of_n")] == [
        "preferred_ft:seed0", "preferred_ft:seed1", "best_of_n:2:seed0", "best_of_n:2:seed1",
        "best_of_n:4:seed0", "best_of_n:4:seed1", "best_of_n:8:seed0", "best_of_n:8:seed1"]
    assert [a for a in arms if a.trains] == trained_arms(cfg) and len(trained_arms(cfg)) == 18  # 14 pairwise + 2 Preferred-FT + 2 RLOO
    assert get_stage("dpo").task_list(cfg) == trained_arms(cfg)  # the DPO array never gets a Best-of-N arm


# ------------------------------------------------------------------ config
@pytest.mark.parametrize("sets, field, fix", [
    (["sweep.methods=[dpo,nosuch]"], "sweep.methods[1]", "'nosuch' is not a method; choose from dpo, ipo, robust, hinge"),
    (["sweep.methods=[]"], "sweep.methods", "must list at least one method"),
    (["sweep.methods=[dpo,dpo]"], "sweep.methods", "contains duplicates"),
    (["sweep.strengths.ipo=[0.5]"], "sweep.strengths.ipo", "'ipo' is not in sweep.methods=['dpo']; add it there"),
    (["sweep.methods=[ipo]", "sweep.strengths.ipo=[0.5,0]"], "sweep.strengths.ipo[1]", "0.0 must be > 0"),
    (["sweep.methods=[ipo]", "sweep.strengths.ipo=[-1]"], "sweep.strengths.ipo[0]", "must be > 0"),
    (["sweep.methods=[ipo]", "sweep.strengths.ipo=[0.5,0.5]"], "sweep.strengths.ipo", "contains duplicates"),
    (["sweep.methods=[ipo]", "sweep.strengths.ipo=[]"], "sweep.strengths.ipo", "at least one strength"),
    (["sweep.seeds=[1,1]"], "sweep.seeds", "contains duplicates"),
    (["sweep.seeds=[-1]"], "sweep.seeds[0]", "must be >= 0"),
    (["sweep.methods=[dpo,robust]", "dpo.label_smoothing=0"], "dpo.label_smoothing", "robust method needs"),
    (["dpo.label_smoothing=0.5"], "dpo.label_smoothing", "must be in [0, 0.5)"),
    (["sweep.methods=[dpo,preferred_ft]", "sweep.strengths.preferred_ft=[0.1]"], "sweep.strengths.preferred_ft",
     "Preferred-FT has no strength (one arm per seed); drop sweep.strengths.preferred_ft"),
    (["sweep.methods=[dpo,best_of_n]", "sweep.strengths.best_of_n=[4,1]"], "sweep.strengths.best_of_n[1]",
     "1.0 is not a valid N: Best-of-N keeps the best of N samples, an integer >= 2"),
    (["sweep.methods=[dpo,best_of_n]", "sweep.strengths.best_of_n=[2.5]"], "sweep.strengths.best_of_n[0]",
     "an integer >= 2"),
    (["sweep.methods=[best_of_n]"], "sweep.methods", "has no trained method; the pipeline trains at least one arm "
                                                     "(add e.g. dpo: --set sweep.methods=[dpo,best_of_n])"),
    (["dpo.loss_type=ipo"], "dpo: unknown key(s) loss_type",
     "dpo.loss_type was replaced by sweep.methods (one arm per method, strength and seed), e.g. --set sweep.methods=[ipo]"),
])
def test_sweep_errors_name_the_field_and_the_fix(sets, field, fix):
    with pytest.raises(ValueError) as info:
        resolve_config("tiny", sets=sets)
    message = str(info.value)
    assert message.startswith(field) and fix in message, message


def test_a_run_stored_with_dpo_loss_type_sigmoid_loads_with_the_same_arms(tmp_path):
    import yaml

    from jobs.config import config_to_yaml, load_run_config

    stored = yaml.safe_load(config_to_yaml(resolve_config("tiny")))
    del stored["sweep"], stored["dpo"]["label_smoothing"]
    stored["dpo"]["loss_type"] = "sigmoid"  # a config.yaml written before the sweep section
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(stored))
    assert [a.tag for a in sweep_arms(load_run_config(tmp_path))] == ["beta-0.05", "beta-0.1", "beta-1.0"]
    stored["dpo"]["loss_type"] = "ipo"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(stored))
    with pytest.raises(ValueError, match="dpo.loss_type: this run was made with dpo.loss_type='ipo'"):
        load_run_config(tmp_path)


# ------------------------------------------------------------------ what TRL gets
@pytest.mark.parametrize("arm, loss_type, label_smoothing, seed", [
    (Arm(0.1), "sigmoid", 0.0, 5),        # the run's seed
    (Arm(0.5, "ipo", 2), "ipo", 0.0, 2),
    (Arm(0.1, "robust", 3), "robust", 0.2, 3),
    (Arm(1.0, "hinge"), "hinge", 0.0, 5),
])
def test_each_arm_reaches_trl_with_its_loss_strength_and_seed(tmp_path, arm, loss_type, label_smoothing, seed):
    import torch

    from pipeline.stages.dpo import trl_config
    from pipeline.training.loop import trainer_kwargs

    cfg = resolve_config("tiny", sets=["seed=5", "dpo.label_smoothing=0.2", "sweep.methods=[dpo,ipo,robust,hinge]"])
    args = trl_config(cfg, arm, trainer_kwargs(cfg, cfg.dpo, tmp_path, torch.device("cpu"), torch.float32, []))
    assert args.loss_type == [loss_type] and args.beta == arm.beta
    assert args.label_smoothing == label_smoothing and (args.seed, args.data_seed) == (seed, seed)


def test_every_method_is_a_loss_trl_accepts():
    from trl import DPOConfig as TRLDPOConfig

    from pipeline.config import DPO_LOSS_TYPES

    for method in METHODS.values():
        assert method.label and method.about
        if not method.trains:  # Best-of-N: evaluated from the SFT model, no TRL loss
            assert method.loss_type is None
            continue
        if method.trainer == "online":  # RLOO: no pairwise loss (tests/test_online.py)
            continue
        assert method.loss_type in DPO_LOSS_TYPES
        TRLDPOConfig(output_dir="/tmp/unused", loss_type=[method.loss_type], use_cpu=True, report_to=[],
                     **method.trl_options(resolve_config("tiny")))


# ------------------------------------------------------------------ the launcher's array
def planned_dpo_job(cfg, run_dir):
    """A run directory holding `cfg` with SFT and pairs done, and the DPO job the launcher plans for it."""
    layout = RunLayout(run_dir)
    save_config(cfg, layout)
    atomic_write_json(layout.done_path("sft"), {})
    atomic_write_json(layout.done_path("pairs"), {})
    planned, _ = plan_slurm(cfg, layout, {})
    return layout, next(p for p in planned if p.stage.name == "dpo")


def test_the_dpo_array_has_one_task_per_arm(tmp_path):
    cfg = resolve_config("tiny", sets=TWO_BY_TWO_BY_TWO)
    layout, dpo = planned_dpo_job(cfg, tmp_path)
    assert [records.task_key(t) for t in dpo.tasks] == [a.key for a in sweep_arms(cfg)] and len(dpo.tasks) == 8
    atomic_write_json(layout.done_path("dpo", Arm(0.5, "ipo", 4)), {})  # one arm finished: the others remain
    planned, _ = plan_slurm(cfg, layout, {})
    assert len(next(p for p in planned if p.stage.name == "dpo").tasks) == 7
    assert (tmp_path / "dpo" / "ipo-beta-0.5-seed-4" / "DONE.json").is_file()


# ------------------------------------------------------------------ frontier over seeds
def dpo_row(method, strength, seed, step, reward, kl, reward_se=0.01, kl_se=0.02):
    return {"policy": "dpo", "id": f"dpo-{method}-{strength}-{seed}-{step}", "beta": strength, "method": method,
            "seed": seed, "arm": f"{method}-{strength}-{seed}", "step": step, "reward": reward, "reward_std": 0.1,
            "reward_stderr": reward_se, "kl": kl, "kl_stderr": kl_se, "n": 8, "examples": []}


SFT_ROW = {"policy": "sft", "id": "sft", "beta": None, "step": 0, "reward": 0.5, "reward_std": 0.1,
           "reward_stderr": 0.02, "kl": 1e-7, "kl_stderr": 1e-8, "n": 8, "examples": []}


def test_means_over_seeds_and_their_standard_errors_match_a_hand_computation(tmp_path):
    rewards, kls = [0.60, 0.70, 0.95], [2.0, 3.0, 7.0]
    results = [SFT_ROW] + [dpo_row("ipo", 0.5, seed, 10, r, k) for seed, r, k in zip((0, 1, 2), rewards, kls)]
    results += [dpo_row("ipo", 0.5, seed, 20, 0.8, 4.0 + seed) for seed in (0, 1)]
    results += [dpo_row("dpo", 0.1, 0, 10, 0.9, 5.0, reward_se=0.03, kl_se=0.4)]  # one seed: its own errors
    means = seed_means(results)
    assert [(m["method"], m["strength"], m["step"], m["seeds"]) for m in means] == [
        ("ipo", 0.5, 10, 3), ("ipo", 0.5, 20, 2), ("dpo", 0.1, 10, 1)]
    first = means[0]
    assert first["reward"] == pytest.approx(statistics.mean(rewards))
    assert first["reward_stderr"] == pytest.approx(statistics.stdev(rewards) / math.sqrt(3))
    assert first["kl"] == pytest.approx(4.0) and first["kl_stderr"] == pytest.approx(statistics.stdev(kls) / math.sqrt(3))
    # two seeds: stdev of (4, 5) = 0.7071, over sqrt 2 = 0.5
    assert (means[1]["kl"], means[1]["kl_stderr"], means[1]["reward_stderr"]) == (pytest.approx(4.5), pytest.approx(0.5), 0)
    assert (means[2]["reward_stderr"], means[2]["kl_stderr"]) == (0.03, 0.4)
    rows = list(csv.DictReader(io.StringIO(seed_means_csv(means))))
    assert float(rows[0]["reward_stderr"]) == pytest.approx(first["reward_stderr"], abs=1e-6)

    frontier = list(csv.DictReader(io.StringIO(frontier_csv(results))))
    assert list(frontier[0]) == FRONTIER_COLUMNS
    assert (frontier[0]["method"], frontier[0]["strength"], frontier[0]["seed"]) == ("", "", "")
    assert (frontier[1]["method"], frontier[1]["strength"], frontier[1]["beta"], frontier[1]["seed"]) == (
        "ipo", "0.5", "0.5", "0")

    from types import SimpleNamespace

    cfg = SimpleNamespace(name="t", model=SimpleNamespace(name="tiny"), reward=SimpleNamespace(kind="vader"),
                          eval=SimpleNamespace(num_prompts=2, samples_per_prompt=4))
    report = report_markdown(cfg, results)
    assert "| policy | strength | seed | step |" in report and "| ipo | 0.5 | 2 | 10 |" in report
    assert report.startswith("# Reward vs KL")  # not "DPO ...": the sweep has other methods
    assert "Mean over seeds" in report and "| ipo | 0.5 | 10 | 3 | 0.750 ± " in report
    assert "### IPO τ = 0.5, seed 2 (step 10)" in report and "### DPO β = 0.1, seed 0 (step 10)" in report

    from pipeline.reporting.frontier import plot_frontier

    plot_frontier(results, tmp_path / "frontier.png")
    assert (tmp_path / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_one_seed_keeps_the_report_as_before():
    results = [SFT_ROW, dpo_row("dpo", 0.1, 0, 10, 0.8, 1.5, reward_se=0.05, kl_se=0.25)]
    from types import SimpleNamespace

    cfg = SimpleNamespace(name="t", model=SimpleNamespace(name="tiny"), reward=SimpleNamespace(kind="vader"),
                          eval=SimpleNamespace(num_prompts=2, samples_per_prompt=4))
    report = report_markdown(cfg, results)
    assert "| dpo | 0.1 | 10 | 0.800 ± 0.050 | 1.50 ± 0.25 | 8 |" in report and "Mean over seeds" not in report
    assert "### DPO β = 0.1 (step 10)" in report


# ------------------------------------------------------------------ Preferred-FT and Best-of-N in the sweep
def test_the_dpo_array_gets_preferred_ft_but_never_best_of_n(tmp_path):
    cfg = resolve_config("tiny", sets=["sweep.methods=[dpo,preferred_ft,best_of_n]", "sweep.strengths.best_of_n=[2,8]"])
    assert [a.key for a in sweep_arms(cfg)] == ["0.05", "0.1", "1.0", "preferred_ft", "best_of_n:2", "best_of_n:8"]
    _, dpo = planned_dpo_job(cfg, tmp_path)
    assert [records.task_key(t) for t in dpo.tasks] == ["0.05", "0.1", "1.0", "preferred_ft"]
    assert resolve_config("tiny", sets=["sweep.methods=[dpo,best_of_n]"]).sweep.strengths_of("best_of_n", [0.1]) == [4, 16]


def test_preferred_ft_reaches_trl_as_the_sft_loss_and_best_of_n_is_not_trained(tmp_path):
    import torch

    from pipeline.stages.dpo import trl_config
    from pipeline.training.loop import trainer_kwargs

    cfg = resolve_config("tiny", sets=["seed=5", "sweep.methods=[dpo,preferred_ft,best_of_n]"])
    kwargs = trainer_kwargs(cfg, cfg.dpo, tmp_path, torch.device("cpu"), torch.float32, [])
    args = trl_config(cfg, Arm(None, "preferred_ft", 2), kwargs)
    assert args.loss_type == ["sft"] and (args.seed, args.data_seed) == (2, 2)
    with pytest.raises(ValueError, match="not trained"):
        trl_config(cfg, Arm(4, "best_of_n"), kwargs)


def test_best_of_n_rows_in_the_frontier_and_the_report(tmp_path):
    from types import SimpleNamespace

    from pipeline.reporting.frontier import plot_frontier

    def bon_row(n, seed, reward, kl, analytic):
        return {"policy": "best_of_n", "id": f"best-of-n-{n}-seed-{seed}", "beta": None, "strength": n,
                "method": "best_of_n", "seed": seed, "arm": f"best-of-n-{n}-seed-{seed}", "step": 0, "reward": reward,
                "reward_std": 0.1, "reward_stderr": 0.01, "kl": kl, "kl_stderr": 0.0, "kl_analytic": analytic,
                "n": 8, "examples": []}

    pft = {**dpo_row("preferred_ft", None, 0, 30, 0.7, 2.0), "strength": None, "beta": None}
    results = [SFT_ROW, dpo_row("dpo", 0.1, 0, 30, 0.8, 1.5), pft,
               bon_row(2, 0, 0.6, 0.18, 0.1931), bon_row(4, 0, 0.7, 0.60, 0.6363)]
    rows = list(csv.DictReader(io.StringIO(frontier_csv(results))))
    assert list(rows[0]) == FRONTIER_COLUMNS and FRONTIER_COLUMNS[-1] == "kl_analytic"
    assert [(r["policy"], r["method"], r["beta"], r["strength"], r["step"], r["kl_analytic"]) for r in rows] == [
        ("sft", "", "", "", "0", ""), ("dpo", "dpo", "0.1", "0.1", "30", ""),
        ("dpo", "preferred_ft", "", "", "30", ""),
        ("best_of_n", "best_of_n", "", "2", "0", "0.1931"), ("best_of_n", "best_of_n", "", "4", "0", "0.6363")]
    assert float(rows[4]["kl"]) == 0.6 and float(rows[4]["reward"]) == 0.7
    means = seed_means(results)
    assert [(m["method"], m["strength"]) for m in means] == [("dpo", 0.1), ("preferred_ft", None), ("best_of_n", 2),
                                                             ("best_of_n", 4)]
    cfg = SimpleNamespace(name="t", model=SimpleNamespace(name="tiny"), reward=SimpleNamespace(kind="vader"),
                          eval=SimpleNamespace(num_prompts=2, samples_per_prompt=4))
    report = report_markdown(cfg, results)
    assert "| best_of_n | N=4 | 0 | 0.700 ± 0.010 | 0.600 ± 0.000 (analytic 0.636) | 8 |" in report
    assert "| preferred_ft |  | 30 |" in report and "### Preferred-FT (step 30)" in report
    assert "### Best-of-N N = 4 (kept sample)" in report and "**Best-of-N** (no training)" in report
    plot_frontier(results, tmp_path / "frontier.png")
    assert (tmp_path / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
