"""FSDP2-sharded encoders against DDP, 2 gloo processes under `accelerate launch` (slow tier, hard timeouts).

The encoders are sharded with torch's `fully_shard` (each CLIP encoder layer one unit); the normalizer and the
scalar `logit_scale` stay whole (`fsdp_replicated_parameters`). After the same steps both give the same weights, and
a sharded torch.distributed.checkpoint saved mid-run and resumed in a new launch ends where the straight run ends;
in a custom loop (tests/scripts/fsdp_vs_ddp.py) and through recipes/train.py --fsdp_encoders true
(tests/scripts/fsdp_recipe_runs.py: DDP, FSDP and FSDP resumed, and each format's checkpoint resumed by the other
kind of run, FSDP2 with activation checkpointing, DDP and FSDP2 compiled, and DDP and FSDP2 under bf16 autocast, in
one launch).

Those 2-process checkpoints are also resumed at another world size (4 processes, and 1 for DDP) at the same global
batch: refused without `--resume_with_other_layout next_epoch`, continued with it (tests/scripts/
resume_other_layout.py); the custom loop's FSDP2 checkpoint resumed on 4 processes ends where the 2-process run ends.
"""

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from helpers import assert_launch_succeeded, launch_processes, tiny_batch, tiny_config

from neuclip_hf import NeuCLIPModel
from neuclip_hf.distributed import average_replicated_gradients_, fsdp_replicated_parameters

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).parent / "scripts" / "fsdp_vs_ddp.py"
RECIPE_RUNS = Path(__file__).parent / "scripts" / "fsdp_recipe_runs.py"
OTHER_LAYOUT_RUNS = Path(__file__).parent / "scripts" / "resume_other_layout.py"
TIMEOUT = 240  # seconds per launch; one takes ~20 s on 2 idle cores, so only a hang reaches it
RECIPE_TIMEOUT = 540  # the ten recipe runs take ~3 min on 2 idle cores (two compile)
STEPS, SAVE_AT = 4, 2
MAX_GRAD_NORM = 0.05  # below every step's gradient norm (1.0-1.8 here): clipping acts at every step
RECIPE_FLAGS = ["--per_device_train_batch_size", "16", "--eval_max_samples", "64", "--dataloader_num_workers", "0",
                "--logging_steps", "1", "--report_to", "none", "--disable_tqdm", "true", "--warmup_steps", "1",
                "--max_grad_norm", str(MAX_GRAD_NORM)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    for extra, processes in (([], 2), (["--resume"], 2), (["--resume"], 4)):
        done = launch_processes([SCRIPT, out, STEPS, SAVE_AT, *extra], timeout=TIMEOUT, num_processes=processes)
        assert_launch_succeeded(done)
        assert f"world size {processes}" in done.stdout
    return {name: torch.load(out / f"{name}.pt", weights_only=True)
            for name in ("ddp", "fsdp", "resumed", "resumed_w4")}


@pytest.mark.slow
def test_fsdp_equals_ddp_after_the_same_steps(runs):
    ddp, fsdp = runs["ddp"], runs["fsdp"]
    assert set(ddp) == set(fsdp)
    torch.manual_seed(0)
    initial = NeuCLIPModel(tiny_config("neuclip", neuclip_num_prototypes=16)).state_dict()
    assert not torch.equal(ddp["vision_model.encoder.layers.0.mlp.fc1.weight"],
                           initial["vision_model.encoder.layers.0.mlp.fc1.weight"])  # training moved the weights
    assert not torch.equal(ddp["logit_scale"], initial["logit_scale"])
    for name, value in ddp.items():
        torch.testing.assert_close(fsdp[name], value, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_exactly(runs):
    for name, value in runs["fsdp"].items():
        torch.testing.assert_close(runs["resumed"][name], value, atol=0, rtol=0, msg=name)


@pytest.mark.slow
def test_fsdp_checkpoint_from_2_ranks_resumes_on_4(runs):
    # The same global batch, split 4 ways: the re-sharded encoders and AdamW state continue the 2-rank run (the
    # order of the reductions differs, hence a tolerance).
    assert set(runs["resumed_w4"]) == set(runs["fsdp"])
    for name, value in runs["fsdp"].items():
        if name.endswith("self_attn.k_proj.bias"):
            # Its exact gradient is zero (a key bias adds q . b_k to every logit of a query: softmax ignores it), so
            # AdamW steps it by up to lr on rounding noise, whose sign depends on the reduction order.
            assert (runs["resumed_w4"][name] - value).abs().max() <= 2 * (STEPS - SAVE_AT) * 1e-3, name
            continue
        torch.testing.assert_close(runs["resumed_w4"][name], value, atol=1e-5, rtol=1e-5, msg=name)


def test_replicated_parameters_are_the_normalizer_and_the_scalars():
    for objective, expected in (("neuclip", {"logit_scale", "normalizer.text_prototypes",
                                             "normalizer.image_prototypes"}),
                                ("siglip", {"logit_scale", "normalizer.logit_bias"}),
                                ("clip", {"logit_scale"})):
        assert set(fsdp_replicated_parameters(NeuCLIPModel(tiny_config(objective)))) == expected, objective


def test_optimizer_state_by_name_matches_torch_named_state():
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from neuclip_hf.trainer import optimizer_state_by_name

    torch.manual_seed(0)
    model = NeuCLIPModel(tiny_config("clip"))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": params[:5]}, {"params": params[5:], "weight_decay": 0.0}], lr=1e-3)
    model(**tiny_batch(4), return_loss=True).loss.backward()
    optimizer.step()
    named = optimizer_state_by_name(optimizer.state_dict(), optimizer, model)
    expected = get_optimizer_state_dict(model, optimizer)  # torch's own keying by parameter name
    assert named["state"].keys() == expected["state"].keys() and len(named["state"]) == len(params)
    for name, state in expected["state"].items():
        for key, value in state.items():
            assert torch.equal(named["state"][name][key], value), (name, key)
    assert [group["params"] for group in named["param_groups"]] == [group["params"]
                                                                     for group in expected["param_groups"]]
    other = torch.optim.AdamW([{"params": params[:4]}, {"params": params[4:]}], lr=1e-3)
    with pytest.raises(ValueError) as error:
        optimizer_state_by_name(optimizer.state_dict(), other, model)
    assert str(error.value) == (f"the saved encoder optimizer has parameter groups of sizes [5, {len(params) - 5}], "
                                f"this run's [4, {len(params) - 4}]: another model or set-up")


def test_averaging_replicated_gradients_is_a_no_op_without_sharding():
    model = NeuCLIPModel(tiny_config("clip"))
    model.logit_scale.grad = torch.tensor(3.0)
    average_replicated_gradients_(model)
    assert model.logit_scale.grad.item() == 3.0


@pytest.mark.parametrize("how", ["argument", "accelerate_env"])
def test_trainer_refuses_fsdp_with_a_clear_message(tmp_path, monkeypatch, how):
    from neuclip_hf.trainer import FSDP_REFUSAL, NeuCLIPTrainer, NeuCLIPTrainingArguments

    values = dict(output_dir=str(tmp_path), use_cpu=True, max_steps=1, report_to=[])
    if how == "argument":
        values["fsdp"] = True
    else:  # what `accelerate launch --use_fsdp` exports
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError) as error:
        NeuCLIPTrainer(model=NeuCLIPModel(tiny_config("neuclip")), args=NeuCLIPTrainingArguments(**values))
    assert str(error.value) == FSDP_REFUSAL
    assert "logit_scale" in FSDP_REFUSAL and "--fsdp_encoders true" in FSDP_REFUSAL


def test_trainer_fsdp_encoders_needs_a_distributed_launch(tmp_path):
    from neuclip_hf.trainer import FSDP_NEEDS_PROCESSES, NeuCLIPTrainer, NeuCLIPTrainingArguments

    args = NeuCLIPTrainingArguments(output_dir=str(tmp_path), use_cpu=True, max_steps=1, report_to=[],
                                    fsdp_encoders=True)
    with pytest.raises(ValueError) as error:
        NeuCLIPTrainer(model=NeuCLIPModel(tiny_config("neuclip")), args=args)
    assert str(error.value) == FSDP_NEEDS_PROCESSES


# -- through NeuCLIPTrainer and recipes/train.py -------------------------------------------------------------------
@pytest.fixture(scope="module")
def recipe_runs(tmp_path_factory):
    from neuclip_hf.default_data import prepare_default_data

    prepare_default_data()  # the embedded data's cache, before two ranks would race to build it
    out = tmp_path_factory.mktemp("fsdp_recipe")
    done = launch_processes([RECIPE_RUNS, out, STEPS, SAVE_AT, *RECIPE_FLAGS], timeout=RECIPE_TIMEOUT, cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert_launch_succeeded(done)
    assert "ten runs done, world size 2" in done.stdout
    # Every layer forward of training ran under checkpoint: 2 encoders x 2 layers x STEPS steps (evaluation runs in
    # eval mode, where transformers does not checkpoint).
    assert int(done.stdout.split("checkpointed layer forwards:")[1].split()[0]) == 2 * 2 * STEPS
    (out / "compiled_graphs.txt").write_text(done.stdout.split("compiled graphs:")[1].split("\n")[0])
    return out


def _logged_grad_norms(run_dir: Path) -> list[float]:
    history = json.loads((run_dir / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())["log_history"]
    return [line["grad_norm"] for line in history if "grad_norm" in line]


def _assert_same_weights(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for name, value in a.items():
        if value.is_floating_point():
            torch.testing.assert_close(b[name], value, atol=1e-5, rtol=1e-5, msg=name)
        else:  # the normalizer's counters
            assert torch.equal(b[name], value), name


@pytest.mark.slow
def test_recipe_fsdp_encoders_equals_ddp(recipe_runs):
    ddp = NeuCLIPModel.from_pretrained(recipe_runs / "ddp")  # one process: the saved full weights load as they are
    fsdp = NeuCLIPModel.from_pretrained(recipe_runs / "fsdp")
    assert int(fsdp.normalizer.num_updates) == STEPS
    _assert_same_weights(ddp.state_dict(), fsdp.state_dict())
    # The same clipped steps: the norm over sharded and whole gradients equals DDP's, above the clipping threshold.
    ddp_norms, fsdp_norms = _logged_grad_norms(recipe_runs / "ddp"), _logged_grad_norms(recipe_runs / "fsdp")
    assert len(ddp_norms) == STEPS and min(ddp_norms) > MAX_GRAD_NORM
    torch.testing.assert_close(torch.tensor(fsdp_norms), torch.tensor(ddp_norms), atol=1e-5, rtol=1e-5)
    # Every rank evaluated the sharded model; the metrics are the DDP run's.
    ddp_eval, fsdp_eval = (json.loads((recipe_runs / run / "eval_results.json").read_text())["eval"]
                           for run in ("ddp", "fsdp"))
    assert fsdp_eval["acc1"] == pytest.approx(ddp_eval["acc1"]) and fsdp_eval["num_samples"] == 64
    # Saved as a NeuCLIPModel (not torch's FSDPNeuCLIPModel), with this package's code, not torch's.
    config = json.loads((recipe_runs / "fsdp" / "config.json").read_text())
    assert config["architectures"] == ["NeuCLIPModel"]
    assert config["auto_map"]["AutoModel"] == "modeling_neuclip.NeuCLIPModel"
    assert not list((recipe_runs / "fsdp").glob("_fsdp*.py"))
    # The checkpoint holds the encoder optimizer as shards (one file per rank), not a rank-0 optimizer.pt.
    checkpoint = recipe_runs / "fsdp" / f"checkpoint-{SAVE_AT}"
    assert sorted(p.name for p in (checkpoint / "optimizer_fsdp").glob("*.distcp")) == ["__0_0.distcp",
                                                                                         "__1_0.distcp"]
    assert not (checkpoint / "optimizer.pt").exists() and (checkpoint / "model.safetensors").exists()


@pytest.mark.slow
def test_recipe_fsdp_encoders_resume_equals_straight_run(recipe_runs):
    straight, resumed = recipe_runs / "fsdp", recipe_runs / "resumed"
    _assert_same_weights(NeuCLIPModel.from_pretrained(straight).state_dict(),
                         NeuCLIPModel.from_pretrained(resumed).state_dict())
    norms = _logged_grad_norms(straight)
    torch.testing.assert_close(torch.tensor(_logged_grad_norms(resumed)), torch.tensor(norms), atol=1e-5, rtol=1e-5)
    final = f"checkpoint-{STEPS}/normalizer_optimizer.pt"
    a, b = (torch.load(run / final, weights_only=True)["optimizer"]["state"] for run in (straight, resumed))
    assert a.keys() == b.keys() and a
    for index in a:
        for key, value in a[index].items():
            torch.testing.assert_close(b[index][key], value, atol=1e-5, rtol=1e-5, msg=f"{index}.{key}")


@pytest.mark.slow
def test_recipe_fsdp_with_activation_checkpointing_equals_ddp(recipe_runs):
    _assert_same_weights(NeuCLIPModel.from_pretrained(recipe_runs / "ddp").state_dict(),
                         NeuCLIPModel.from_pretrained(recipe_runs / "fsdp_checkpointed").state_dict())


@pytest.mark.slow
def test_recipe_fsdp_with_torch_compile_equals_compiled_ddp(recipe_runs):
    # Compiled against compiled: Inductor's fused kernels round differently from eager (the prototypes' AdaGrad
    # steps amplify that to ~2.5e-4 against eager DDP here, the encoders stay within 1e-6), sharding does not.
    _assert_same_weights(NeuCLIPModel.from_pretrained(recipe_runs / "ddp_compiled").state_dict(),
                         NeuCLIPModel.from_pretrained(recipe_runs / "fsdp_compiled").state_dict())
    graphs = [int(n) for n in (recipe_runs / "compiled_graphs.txt").read_text().split()]
    assert min(graphs) > 0, graphs  # both runs compiled the model
    # No compiled graph left a collective unwaited on either rank (they were 27 when the loss's gathers were traced).
    assert [(recipe_runs / f"unwaited_collectives_rank{rank}.txt").read_text() for rank in range(2)] == ["0", "0"]


@pytest.mark.slow
def test_recipe_fsdp_under_bf16_autocast_equals_ddp(recipe_runs):
    # --bf16 on CPU is torch's autocast (parameters, gradients, the loss and the estimators stay fp32): sharding the
    # encoders changes the order of the gradient sums only, so FSDP2 ends where DDP ends, while both differ from the
    # fp32 runs by bf16's rounding of the encoders' matmuls.
    ddp, fsdp = (NeuCLIPModel.from_pretrained(recipe_runs / run).state_dict() for run in ("ddp_bf16", "fsdp_bf16"))
    _assert_same_weights(ddp, fsdp)
    fp32 = NeuCLIPModel.from_pretrained(recipe_runs / "ddp").state_dict()
    name = "vision_model.encoder.layers.0.mlp.fc1.weight"
    assert (ddp[name] - fp32[name]).abs().max() > 1e-5  # autocast ran: bf16 matmuls moved the weights elsewhere
    assert all(value.dtype in (torch.float32, torch.int64) for value in fsdp.values())
    torch.testing.assert_close(torch.tensor(_logged_grad_norms(recipe_runs / "fsdp_bf16")),
                               torch.tensor(_logged_grad_norms(recipe_runs / "ddp_bf16")), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("run, straight", [("fsdp_to_ddp", "fsdp"), ("ddp_to_fsdp", "ddp")])
def test_recipe_resume_across_ddp_and_fsdp_equals_the_straight_run(recipe_runs, run, straight):
    # The encoder optimizer's state crosses formats (DCP shards read whole by DDP, DDP's optimizer.pt sharded by
    # FSDP2): the run ends where the straight run that wrote the checkpoint ends.
    _assert_same_weights(NeuCLIPModel.from_pretrained(recipe_runs / straight).state_dict(),
                         NeuCLIPModel.from_pretrained(recipe_runs / run).state_dict())
    torch.testing.assert_close(torch.tensor(_logged_grad_norms(recipe_runs / run)),
                               torch.tensor(_logged_grad_norms(recipe_runs / straight)), atol=1e-5, rtol=1e-5)


# -- resuming the 2-process checkpoints at another world size (same global batch of 32) ----------------------------
@pytest.fixture(scope="module")
def other_layout_runs(recipe_runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("other_layout")
    done = launch_processes([OTHER_LAYOUT_RUNS, recipe_runs, out, STEPS, SAVE_AT, *RECIPE_FLAGS], num_processes=4,
                            timeout=RECIPE_TIMEOUT, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert_launch_succeeded(done)
    assert "resumed at world size 4" in done.stdout
    sys.path.insert(0, str(ROOT / "recipes"))
    import train as train_recipe

    # One process from the same 2-process checkpoints (its rank 0 finds a data position of the other layout; the
    # FSDP2 optimizer's DCP shards are read whole without a process group).
    for run in ("ddp", "fsdp"):
        train_recipe.main([str(ROOT / "recipes" / "configs" / "default.yaml"), "--max_steps", str(STEPS),
                           "--save_steps", str(SAVE_AT), *RECIPE_FLAGS, "--per_device_train_batch_size", "32",
                           "--resume_with_other_layout", "next_epoch", "--output_dir", str(out / f"{run}_w1"),
                           "--resume_from_checkpoint", str(recipe_runs / run / f"checkpoint-{SAVE_AT}")])
    return out, done.stdout


@pytest.mark.slow
def test_resume_at_another_layout_is_refused_by_every_rank_with_one_message(other_layout_runs, recipe_runs):
    checkpoint = recipe_runs / "ddp" / f"checkpoint-{SAVE_AT}"
    saved = "2 process(es) x 0 DataLoader worker(s), batch 16 per process"
    layout = (f"{checkpoint} was written by {saved} and this run has 4 process(es) x 0 DataLoader worker(s), batch 8 "
              "per process: the saved data positions are per process and per worker, so they cannot carry over. "
              "Resume with the same layout, or pass --resume_with_other_layout next_epoch to keep everything else "
              "and start the next epoch of the data.")
    batch = (f"{checkpoint} was written with a global batch of 32 ({saved}) and this run has 16 (4 process(es) x 0 "
             "DataLoader worker(s), batch 4 per process). The objectives, the estimators and the epoch schedules are "
             "defined by the global batch: keep it, with --per_device_train_batch_size = 32 / processes.")
    for name, message in (("other_layout", layout), ("other_batch", batch)):
        for rank in range(4):  # every rank refused, with the same message
            assert (other_layout_runs[0] / f"refused_{name}_rank{rank}.txt").read_text() == message


@pytest.mark.slow
@pytest.mark.parametrize("run, processes", [("ddp_w4", 4), ("fsdp_w4", 4), ("ddp_w1", 1), ("fsdp_w1", 1)])
def test_resume_at_another_world_size_continues_the_run(other_layout_runs, run, processes):
    out = other_layout_runs[0] / run
    final = out / f"checkpoint-{STEPS}"
    assert json.loads((final / "trainer_state.json").read_text())["global_step"] == STEPS
    assert int(NeuCLIPModel.from_pretrained(out).normalizer.num_updates) == STEPS  # the normalizer carried over
    # The encoder optimizer carried over: AdamW has taken all STEPS steps (re-sharded from 2 DCP shards for FSDP2).
    if processes > 1 and run.startswith("fsdp"):
        assert len(list((final / "optimizer_fsdp").glob("*.distcp"))) == processes
        dcp_to_torch_save(final / "optimizer_fsdp", out / "optimizer_full.pt")
        state = torch.load(out / "optimizer_full.pt", weights_only=True)["optimizer"]["state"]
    else:
        state = torch.load(final / "optimizer.pt", weights_only=True)["state"]
    assert {float(entry["step"]) for entry in state.values()} == {float(STEPS)}
    # Every process started the next data epoch; the run-wide data totals carried over (2 x 32 samples read before
    # the resume, then STEPS - SAVE_AT steps of the global batch of 32).
    data = [torch.load(final / f"data_state_rank{rank}.pt", weights_only=True) for rank in range(processes)]
    assert [state["epoch"] for state in data] == [1] * processes
    assert {state["layout"]["world_size"] for state in data} == {processes}
    assert sum(state["totals"]["read"] for state in data) == 2 * SAVE_AT * 16 + (STEPS - SAVE_AT) * 32
