"""Config layering and validation: every bad input names the field and leaves nothing on disk."""
import math

import pytest
import yaml

from conftest import launch
from jobs.config import ExperimentConfig, load_run_config, resolve_config, save_config
from pipeline.configlib import parse_assignment
from pipeline.rundir.layout import RunLayout


def test_layers_apply_in_order(tmp_path):
    config_file = tmp_path / "exp.yaml"
    config_file.write_text(yaml.safe_dump({"dpo": {"betas": [0.2, 0.4], "learning_rate": 1e-4}, "seed": 3}))
    cfg = resolve_config("tiny", str(config_file), ["dpo.learning_rate=5e-6", "slurm.dpo.time=01:30:00"])
    assert cfg.model.name == "tiny"                      # preset
    assert cfg.dpo.betas == [0.2, 0.4] and cfg.seed == 3  # file over preset
    assert cfg.dpo.learning_rate == 5e-6                  # --set over file
    assert cfg.slurm.dpo.time == "01:30:00"               # a str field keeps the raw text
    assert cfg.sft.logging_steps == 20                    # untouched preset value


def test_gpt2_large_preset_matches_seed_report():
    cfg = resolve_config("gpt2-large")
    assert (cfg.model.name, cfg.data.dataset, cfg.reward.model) == (
        "gpt2-large", "stanfordnlp/imdb", "siebert/sentiment-roberta-large-english")
    assert cfg.dpo.betas == [0.05, 0.1, 1.0] and cfg.dpo.save_steps == 100
    assert cfg.pairs.num_prompts * 6 == 6000 and cfg.pairs.completions_per_prompt == 4
    assert cfg.sft.learning_rate == cfg.dpo.learning_rate == 2e-5
    assert cfg.slurm.dpo.gpus_per_node == 1


def test_gpt2_large_preset_is_the_seeds_recipe_step_for_step():
    """SFT: 8 reviews per optimizer step, one epoch over IMDb's 25,000 training reviews = 3,125 steps;
    DPO: random batches of 8 pairs, one epoch over 6,000 pairs = 750 steps per beta (the seed's log)."""
    cfg = resolve_config("gpt2-large")
    imdb_train_reviews, pairs = 25_000, cfg.pairs.num_prompts * 6
    for section, examples, steps in ((cfg.sft, imdb_train_reviews, 3125), (cfg.dpo, pairs, 750)):
        per_step = section.batch_size * section.grad_accum * cfg.slurm.dpo.nodes * max(1, cfg.slurm.dpo.gpus_per_node)
        assert per_step == 8 and examples * section.epochs / per_step == steps
        assert not section.group_by_length  # random batches: which examples share a step is the recipe's
    assert not cfg.sft.packing  # packed rows would make ~28 reviews a step and 897 steps


def test_resolved_config_round_trips_through_the_run_dir(tmp_path):
    cfg = resolve_config("tiny", sets=["dpo.betas=[0.3]"])
    save_config(cfg, RunLayout(tmp_path))
    assert load_run_config(tmp_path) == cfg
    assert isinstance(load_run_config(tmp_path), ExperimentConfig)


@pytest.mark.parametrize("sets, field, fix", [
    (["dpo.betas=[0.1,-0.5]"], "dpo.betas[1]", "must be > 0"),
    (["dpo.betas=[0]"], "dpo.betas[0]", "must be > 0"),
    (["dpo.bta=0.1"], "dpo", "unknown key(s) bta; did you mean dpo.betas instead of dpo.bta?; valid keys:"),
    (["sft.batch_size=eight"], "sft.batch_size", "expected an integer"),
    (["sft.learning_rate=fast"], "sft.learning_rate", "expected a number"),
    (["wandb.enabled=maybe"], "wandb.enabled", "expected true or false"),
    (["data.dataset=./no/such/file.parquet"], "data.dataset", "does not exist"),
    (["reward.kind=bert"], "reward.kind", "is not one of classifier, reward_model, vader"),
    (["pairs.completions_per_prompt=1"], "pairs.completions_per_prompt", ">= 2"),
    (["sweep.methods=[nosuch]"], "sweep.methods[0]", "'nosuch' is not a method; choose from dpo, ipo, robust, hinge"),
    (["dpo.loss_type=ipo"], "dpo: unknown key(s) loss_type", "dpo.loss_type was replaced by sweep.methods"),
    (["sft.lr_scheduler=cosine_annealing"], "sft.lr_scheduler", "is not one of linear, cosine,"),
    (["dpo.lr_scheduler=reduce_lr_on_plateau"], "dpo.lr_scheduler", "is not one of"),
    (["model.dtype=fp8"], "model.dtype", "'fp8' is not one of auto, float32, bfloat16, float16"),
    (["dpo.compile=fast"], "dpo.compile", "'fast' is not one of off, default, reduce-overhead"),
    (["pairs.kv_cache=paged"], "pairs.kv_cache", "'paged' is not one of dynamic, static"),
    (["distributed.zero_stage=1"], "distributed.zero_stage", "1 is not one of 0, 2, 3"),
    (["wandb.mode=live"], "wandb.mode", "'live' is not offline, online or disabled"),
    (["device=gpu"], "device", "'gpu' is not auto, cpu or cuda"),
    (["data.text_field="], "data.text_field", "must name the column"),
    (["reward.positive_label="], "reward.positive_label", "must name a label"),
    (["pairs.max_new_tokens=200"], "pairs.max_new_tokens", "more than the tiny model's context (model.n_positions=128)"),
    (["dpo.max_length=512"], "dpo.max_length", "raise model.n_positions"),
    (["dpo.betas=[0.1"], "dpo.betas", "cannot parse '[0.1': line 1, column 5: expected ',' or ']'"),
    (["eval.fixed_prompts=hello"], "eval.fixed_prompts", "expected a list"),
    (["slurm.dpo.time=forever"], "slurm.dpo.time", "'forever'"),
    (["nonsense.key=1"], "unknown top-level key(s) nonsense", "valid sections: data, device, distributed"),
    (["tiny.x=1"], "unknown top-level key(s) tiny;", "valid sections:"),
    (["slurm.dpo.gpus=1"], "slurm.dpo", "did you mean slurm.dpo.gpus_per_node instead of slurm.dpo.gpus?"),
    # non-finite numbers: YAML's .inf/.nan and the strings float() reads, in scalars and nested lists/mappings
    (["dpo.betas=[0.1,inf]"], "dpo.betas[1]", "inf is not a finite number; give a finite value"),
    (["dpo.betas=[.nan]"], "dpo.betas[0]", "nan is not a finite number"),
    (["dpo.learning_rate=NaN"], "dpo.learning_rate", "nan is not a finite number"),
    (["sft.epochs=.inf"], "sft.epochs", "inf is not a finite number"),
    (["sft.warmup_ratio=-inf"], "sft.warmup_ratio", "-inf is not a finite number"),
    (["sweep.methods=[dpo,ipo]", "sweep.strengths={ipo: [0.5, -.inf]}"], "sweep.strengths.ipo[1]",
     "-inf is not a finite number"),
    (["eval.fixed_prompts={a: 1, a: 2}"], "eval.fixed_prompts", "key 'a' given twice (first on line 1); keep one"),
])
def test_bad_values_name_the_field(sets, field, fix):
    with pytest.raises(ValueError) as info:
        resolve_config("tiny", sets=sets)
    message = str(info.value)
    assert message.startswith(field) and fix in message, message


def test_valid_choices_follow_the_libraries():
    """The accepted schedulers, optimizers and DPO losses are the ones transformers and TRL take."""
    from transformers import SchedulerType
    from transformers.training_args import OptimizerNames
    from trl import DPOConfig as TRLDPOConfig

    from pipeline.config import DPO_LOSS_TYPES, LR_SCHEDULERS, OPTIMIZERS

    assert set(LR_SCHEDULERS) == {s.value for s in SchedulerType} - {"reduce_lr_on_plateau"}
    assert set(OPTIMIZERS) <= {o.value for o in OptimizerNames}
    with pytest.raises(ValueError, match=r"dpo.optimizer: 'rms' is not a transformers optimizer; choose one of .*rmsprop"):
        resolve_config("tiny", sets=["dpo.optimizer=rms"])
    for loss in DPO_LOSS_TYPES:
        TRLDPOConfig(output_dir="/tmp/unused", loss_type=[loss], use_cpu=True, report_to=[])
    for method in ("ipo", "robust", "hinge"):
        assert resolve_config("tiny", sets=[f"sweep.methods=[{method}]"]).sweep.methods == [method]


def test_malformed_yaml_is_one_line_naming_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("dpo:\n  betas: [0.1, 0.2\n  learning_rate: 1e-5\n")
    run_dir = tmp_path / "run"
    proc = launch("run", "--preset", "tiny", "--config", str(bad), "--run-dir", str(run_dir), "--executor", "local",
                  check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: --config {bad}: line 3, column ") and "fix the YAML syntax" in line
    assert not run_dir.exists()


def test_yaml_with_a_key_given_twice_is_refused_naming_file_line_and_key(tmp_path):
    dup = tmp_path / "dup.yaml"
    dup.write_text("dpo:\n  betas: [0.1]\n  learning_rate: 1e-5\n  betas: [0.5]\n")
    run_dir = tmp_path / "run"
    proc = launch("run", "--preset", "tiny", "--config", str(dup), "--run-dir", str(run_dir), "--executor", "local",
                  check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (f"error: --config {dup}: line 4, column 3: key 'betas' given twice "
                                   "(first on line 2); keep one of them")
    assert not run_dir.exists()
    # the same key in two different sections, and a YAML merge key overriding, are fine
    ok = tmp_path / "ok.yaml"
    ok.write_text("sft: &common\n  learning_rate: 1e-5\ndpo:\n  <<: *common\n  learning_rate: 2e-6\n")
    cfg = resolve_config("tiny", str(ok))
    assert (cfg.sft.learning_rate, cfg.dpo.learning_rate) == (1e-5, 2e-6)


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown preset; choose one of dpo-paper, gpt2-large, tiny"):
        resolve_config("gpt2-xxl")


def test_set_needs_key_and_value():
    with pytest.raises(ValueError, match="expected SECTION.KEY=VALUE"):
        parse_assignment("dpo.beta")


@pytest.mark.parametrize("args, expected", [
    (["--set", "dpo.betas=[-1]"], "dpo.betas[0]: beta=-1.0 must be > 0"),
    (["--set", "sft.epochs=x"], "sft.epochs: expected a number"),
    (["--set", "data.dataset=/nope/imdb.jsonl"], "data.dataset: /nope/imdb.jsonl does not exist"),
    (["--set", "dpo.loss_type=ipo"], "dpo: unknown key(s) loss_type; dpo.loss_type was replaced by sweep.methods"),
    (["--set", "tiny.x=1"], "error: unknown top-level key(s) tiny; valid sections:"),
    (["--until", "nosuch"], "--until 'nosuch': unknown stage; choose one of sft, pairs, pairs_merge, dpo, eval"),
    (["--set", "model.name=./no/such/model"], "model.name: ./no/such/model is not an existing directory"),
    (["--set", "dpo.betas=[0.1,inf]"], "dpo.betas[1]: inf is not a finite number"),
    (["--set", "sft.learning_rate=nan"], "sft.learning_rate: nan is not a finite number"),
])
def test_cli_refuses_bad_config_and_writes_nothing(tmp_path, args, expected):
    run_dir = tmp_path / "run"
    proc = launch("run", "--preset", "tiny", "--run-dir", str(run_dir), "--executor", "local", *args, check=False)
    assert proc.returncode == 2
    assert expected in proc.stderr
    assert not run_dir.exists()


def test_cli_refuses_unknown_preset(tmp_path):
    proc = launch("run", "--preset", "huge", "--run-dir", str(tmp_path / "r"), check=False)
    assert proc.returncode == 2 and "invalid choice: 'huge'" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_relaunch_with_changed_config_is_refused(tmp_path):
    cfg = resolve_config("tiny")
    save_config(cfg, RunLayout(tmp_path))
    proc = launch("run", "--run-dir", str(tmp_path), "--set", "dpo.learning_rate=0.5", "--executor", "local",
                  "--dry-run", check=False)
    assert proc.returncode == 2 and "dpo.learning_rate" in proc.stderr and "new --run-dir" in proc.stderr
    assert load_run_config(tmp_path) == cfg


def test_resume_may_change_slurm_resources_only(tmp_path):
    """After a node failure a run continues on fewer nodes: slurm.* may change on a relaunch."""
    from jobs.launcher import prepare_run

    cfg = resolve_config("tiny", sets=["slurm.dpo.nodes=2"])
    save_config(cfg, RunLayout(tmp_path))
    said = []
    changed, _, save = prepare_run(tmp_path, None, None, ["slurm.dpo.nodes=1", "slurm.dpo.time=45"], log=said.append)
    assert save and (changed.slurm.dpo.nodes, changed.slurm.dpo.time) == (1, "45") and changed.dpo == cfg.dpo
    assert said == ["slurm resources changed for the jobs submitted from now on: slurm.dpo.nodes, slurm.dpo.time"]
    assert prepare_run(tmp_path, None, None, [])[2] is False  # nothing changed: nothing to save
    proc = launch("resume", "--run-dir", str(tmp_path), "--set", "dpo.betas=[0.3]", check=False)
    assert proc.returncode == 2 and "only slurm.* resources may change" in proc.stderr
    assert load_run_config(tmp_path) == cfg


def test_dpo_paper_preset_is_the_papers_imdb_recipe():
    """Appendix C.1: 2-8 token IMDb prefixes, 4 completions for 25,000 of them, all 6 pairs each;
    Appendix B: RMSprop, lr 1e-6 warmed up over 150 steps, 64 pairs per step; beta 0.1 in the sweep."""
    cfg = resolve_config("dpo-paper")
    assert (cfg.model.name, cfg.data.dataset, cfg.reward.kind, cfg.reward.model) == (
        "gpt2-large", "stanfordnlp/imdb", "classifier", "siebert/sentiment-roberta-large-english")
    assert (cfg.data.prompt_min_tokens, cfg.data.prompt_max_tokens) == (2, 8)
    k = cfg.pairs.completions_per_prompt
    pairs = cfg.pairs.num_prompts * k * (k - 1) // 2
    assert (cfg.pairs.num_prompts, k, pairs) == (25_000, 4, 150_000)
    per_step = cfg.dpo.batch_size * cfg.dpo.grad_accum * cfg.slurm.dpo.nodes * max(1, cfg.slurm.dpo.gpus_per_node)
    assert per_step == 64 and math.ceil(pairs * cfg.dpo.epochs / per_step) == 2344
    assert (cfg.dpo.optimizer, cfg.dpo.learning_rate, cfg.dpo.warmup_steps) == ("rmsprop", 1e-6, 150)
    assert 0.1 in cfg.dpo.betas and cfg.sweep.methods == ["dpo"] and not cfg.dpo.group_by_length
    assert cfg.sft.epochs == 1.0 and not cfg.sft.packing


def test_optimizer_and_warmup_steps_reach_the_trainer(tmp_path):
    """dpo-paper's optimiser as the Trainer builds it: RMSprop, lr rising linearly 0 -> 1e-6 over 150 steps."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer
    from trl import DPOConfig as TRLDPOConfig

    from pipeline.training.loop import trainer_kwargs

    cfg = resolve_config("dpo-paper", sets=["device=cpu", "distributed.zero_stage=0"])
    args = TRLDPOConfig(**trainer_kwargs(cfg, cfg.dpo, tmp_path, torch.device("cpu"), torch.float32, []))
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8))
    trainer = Trainer(model=model, args=args)
    trainer.create_optimizer_and_scheduler(num_training_steps=2344)
    assert isinstance(trainer.optimizer, torch.optim.RMSprop)
    lr_at = []
    for step in range(301):
        lr_at.append(trainer.lr_scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    assert lr_at[0] == 0 and lr_at[75] == pytest.approx(0.5e-6) and lr_at[150] == lr_at[300] == pytest.approx(1e-6)
