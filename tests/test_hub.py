"""Hub sharing against the loopback Hub (`fake_hub.py`): push with the Trainer's conventions and the library call,
load back through AutoModel, CLIPModel, trust_remote_code without the package, the pipeline, a LoRA adapter and a
normalizer-only repository; the card and its metrics; no token and no pickle leaves the machine; failed pushes.

The Hub client reads HF_ENDPOINT when it is imported, so every client runs in a fresh subprocess (`run_hub_script`)
while the server runs here.
"""

import json

import pytest
from fake_hub import module_hub, fake_hub, run_hub_script  # noqa: F401  (pytest fixtures)
from huggingface_hub import ModelCard

SENTINEL = "hf_SENTINELtokenNEVERtoLEAK0123456789"  # HF_TOKEN of every pushing process
REMOTE_CODE = {"configuration_neuclip.py", "modeling_neuclip.py", "normalizers.py", "objectives.py", "distributed.py"}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
REPOS = ("user/neuclip-tiny", "user/neuclip-lora", "user/neuclip-lora-library", "user/neuclip-tiny-normalizer",
         "user/neuclip-base")

PREAMBLE = """
import json, logging, sys
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)  # every logger, at its most verbose
from transformers.utils import logging as hf_logging
hf_logging.set_verbosity_debug()
import huggingface_hub.utils.logging as hub_logging
hub_logging.set_verbosity_debug()
import torch
from safetensors.torch import save_file, load_file
"""

PUSH = PREAMBLE + """
from zero_shot_helpers import random_images, small_processor
from hub_helpers import CLASSES, build_trainer, embeddings_and_logits, hub_model
from neuclip_hf import NeuCLIPModel, push_normalizer, push_to_hub

processor = small_processor()
probe = processor(text=[f"a photo of a {c}" for c in CLASSES], images=random_images(3, seed=11), padding="max_length",
                  max_length=32, return_tensors="pt")
save_file({"input_ids": probe["input_ids"], "pixel_values": probe["pixel_values"]}, "probe.safetensors")

def outputs(model):
    return embeddings_and_logits(model, probe)

# 1. A full model through the Trainer: --push_to_hub --hub_model_id, every_save background push, final push.
trainer, callback = build_trainer("run", steps=2, push_to_hub=True, hub_model_id="user/neuclip-tiny",
                                  save_strategy="steps", save_steps=2)
trainer.train()
trainer.push_to_hub(training_data="random caption pairs")
model = trainer.model
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, "full_state.safetensors")
save_file(outputs(model), "full_outputs.safetensors")

# 2. The normalizer on its own.
push_normalizer(model, "user/neuclip-tiny-normalizer", source_model="user/neuclip-tiny")

# 3. LoRA: a base pushed with the library call, loaded back from the Hub, adapted, pushed as adapter + normalizer.
push_to_hub(hub_model(seed=1), "user/neuclip-base", processor)
base = NeuCLIPModel.from_pretrained("user/neuclip-base")
lora_trainer, _ = build_trainer("lora_run", steps=2, model=base, lora=dict(r=4, alpha=8.0), push_to_hub=True,
                                hub_model_id="user/neuclip-lora", hub_strategy="end")
lora_trainer.train()
lora_trainer.push_to_hub(training_data="random caption pairs", finetuned_from="user/neuclip-base")
push_to_hub(lora_trainer.model, "user/neuclip-lora-library", processor)  # the library call on a PEFT model
save_file(outputs(lora_trainer.model), "lora_outputs.safetensors")
save_file({k: v.contiguous() for k, v in lora_trainer.model.get_base_model().normalizer.state_dict().items()},
          "lora_normalizer.safetensors")
print(json.dumps({"metrics": callback.results["latest"], "best_step": callback.results["best_step"]}))
"""

LOAD_WITH_PACKAGE = PREAMBLE + """
from PIL import Image
from transformers import AutoModel, AutoProcessor, CLIPModel, pipeline
import neuclip_hf
from neuclip_hf import NeuCLIPModel, load_normalizer
from neuclip_hf.lora import load_lora, merge_lora
from zero_shot_helpers import random_images
from hub_helpers import embeddings_and_logits

probe, reference = load_file("probe.safetensors"), load_file("full_state.safetensors")

def outputs(model):
    return embeddings_and_logits(model, probe)

def assert_close(actual, expected, atol=1e-6):
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, atol=atol, rtol=1e-5, msg=name)

model = AutoModel.from_pretrained("user/neuclip-tiny")
assert type(model) is NeuCLIPModel
state = model.state_dict()
assert set(state) == set(reference) and all(torch.equal(state[k], v) for k, v in reference.items())
assert_close(outputs(model), load_file("full_outputs.safetensors"))

clip = CLIPModel.from_pretrained("user/neuclip-tiny")
assert type(clip) is CLIPModel
clip_state = clip.state_dict()
assert set(clip_state) == {k for k in reference if not k.startswith("normalizer.")}
assert all(torch.equal(v, reference[k]) for k, v in clip_state.items())

# The zero-shot pipeline gives the model's own softmax over the candidate labels.
image = random_images(1, seed=5)[0]
labels = ["cat", "dog", "car"]
classifier = pipeline("zero-shot-image-classification", model="user/neuclip-tiny")
scores = {r["label"]: r["score"] for r in classifier(image, candidate_labels=labels)}
processor = AutoProcessor.from_pretrained("user/neuclip-tiny")
texts = [classifier.hypothesis_template.format(label) if hasattr(classifier, "hypothesis_template")
         else f"This is a photo of {label}." for label in labels]
inputs = processor(text=texts, images=[image], padding="max_length", max_length=32, return_tensors="pt")
with torch.no_grad():
    expected = model(**inputs).logits_per_image.softmax(dim=-1)[0]
for label, value in zip(labels, expected.tolist()):
    assert abs(scores[label] - value) < 1e-5, (label, scores[label], value)

# The normalizer-only repository warm-starts a fresh model's normalizer.
fresh = NeuCLIPModel(model.config)
report = load_normalizer(fresh, "user/neuclip-tiny-normalizer")
assert report["differences"] == {}
assert all(torch.equal(v, reference["normalizer." + k]) for k, v in fresh.normalizer.state_dict().items())
other = NeuCLIPModel(neuclip_hf.NeuCLIPConfig.from_clip_config(model.config, objective="amorlip"))
try:
    load_normalizer(other, "user/neuclip-tiny-normalizer")
    raise AssertionError("another objective was accepted")
except ValueError as error:
    assert "trained for objective='neuclip'" in str(error)

# The LoRA adapter: base from adapter_config.json (the Hub id), normalizer restored, merge equals the adapter.
lora = load_lora("user/neuclip-lora")
assert_close(outputs(lora), load_file("lora_outputs.safetensors"))
lora_normalizer = load_file("lora_normalizer.safetensors")
assert all(torch.equal(v, lora_normalizer[k]) for k, v in lora.get_base_model().normalizer.state_dict().items())
merged = merge_lora(lora)
assert type(merged) is NeuCLIPModel
assert_close(outputs(merged), load_file("lora_outputs.safetensors"), atol=1e-5)
print(json.dumps({"ok": True, "scores": scores}))
"""

LOAD_WITHOUT_PACKAGE = """
import json, sys
sys.modules["neuclip_hf"] = None  # the package must not be importable
import torch
from safetensors.torch import load_file
from transformers import AutoModel, pipeline
from PIL import Image

reference = load_file("full_state.safetensors")
probe = load_file("probe.safetensors")
model = AutoModel.from_pretrained("user/neuclip-tiny", trust_remote_code=True)
assert type(model).__name__ == "NeuCLIPModel" and "transformers_modules" in type(model).__module__
state = model.state_dict()
assert set(state) == set(reference) and all(torch.equal(state[k], v) for k, v in reference.items())
model.eval()
with torch.no_grad():
    out = model(input_ids=probe["input_ids"], pixel_values=probe["pixel_values"])
expected = load_file("full_outputs.safetensors")
torch.testing.assert_close(out.logits_per_image, expected["logits"], atol=1e-6, rtol=1e-5)
image = Image.open("probe.png")
classifier = pipeline("zero-shot-image-classification", model="user/neuclip-tiny", trust_remote_code=True)
scores = {r["label"]: r["score"] for r in classifier(image, candidate_labels=["cat", "dog", "car"])}
print(json.dumps({"ok": True, "scores": scores}))
"""


@pytest.fixture(scope="module")
def pushed(module_hub, tmp_path_factory):
    """Run the pushes once: (hub, working directory with the reference tensors, push result, push process output)."""
    workdir = tmp_path_factory.mktemp("push")
    result, output = run_hub_script(module_hub, PUSH, workdir, "push", token=SENTINEL)
    return module_hub, workdir, result, output


def test_pushed_repositories_hold_model_files_only(pushed):
    hub, _, _, _ = pushed
    full = set(hub.files("user/neuclip-tiny"))
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "processor_config.json"} | REMOTE_CODE <= full
    lora = set(hub.files("user/neuclip-lora"))
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors", "normalizer.safetensors",
            "normalizer_config.json"} <= lora and "model.safetensors" not in lora
    library = set(hub.files("user/neuclip-lora-library"))
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors", "normalizer.safetensors",
            "normalizer_config.json", "tokenizer.json"} <= library and "model.safetensors" not in library
    assert set(hub.files("user/neuclip-tiny-normalizer")) == {"README.md", "normalizer.safetensors",
                                                              "normalizer_config.json"}
    for repo in REPOS:
        names = set(hub.files(repo))
        assert not [n for n in names if n.endswith(PICKLE_SUFFIXES) or n.startswith("checkpoint-")], names
    assert hub.count("commit", "user/neuclip-tiny") == 2  # the every_save push at step 2, then the final one


def test_token_never_leaves_the_process(pushed):
    hub, _, _, output = pushed
    for repo in REPOS:
        for name, content in hub.files(repo).items():
            assert SENTINEL.encode() not in content, f"{repo}/{name} contains the token"
    assert "DEBUG" in output and SENTINEL not in output  # debug logs of every library were captured and are clean


def test_model_card_parses_and_carries_the_metrics(pushed):
    hub, _, result, _ = pushed
    card = ModelCard.load(hub.repo_dir("user/neuclip-tiny") / "README.md")
    data = card.data
    assert data.pipeline_tag == "zero-shot-image-classification" and data.library_name == "transformers"
    assert data.license == "apache-2.0" and {"neuclip_hf", "neuclip", "clip"} <= set(data.tags)
    recorded = {e.metric_type: e.metric_value for e in data.eval_results}
    metrics = result["metrics"]
    assert recorded["accuracy"] == pytest.approx(metrics["acc1"], abs=1e-6)
    assert recorded["top_5_accuracy"] == pytest.approx(metrics["acc5"], abs=1e-6)
    assert recorded["image_retrieval_recall_at_1"] == pytest.approx(metrics["image_retrieval_recall@1"], abs=1e-6)
    assert {e.task_type for e in data.eval_results} == {"zero-shot-image-classification", "image-text-retrieval"}
    assert {e.dataset_name for e in data.eval_results} == {"random labelled images"}
    text = card.text
    for needle in ("2511.08417", "2505.18983", "2103.00020", "random caption pairs", "| optimizer steps | 2 |",
                   "| global batch (pairs per step) | 8 |", "1 x CPU process", "`neuclip_num_prototypes`",
                   "Intended uses and limitations", 'trust_remote_code=True'):
        assert needle in text, needle
    lora_card = ModelCard.load(hub.repo_dir("user/neuclip-lora") / "README.md")
    assert lora_card.data.library_name == "peft" and lora_card.data.base_model == "user/neuclip-base"
    assert "LoRA on q_proj, v_proj of both towers (r=4, alpha=8.0" in lora_card.text
    normalizer_card = ModelCard.load(hub.repo_dir("user/neuclip-tiny-normalizer") / "README.md")
    assert normalizer_card.data.base_model == "user/neuclip-tiny" and "PrototypeNormalizer" in normalizer_card.text


def test_load_back_with_the_package(pushed):
    hub, workdir, _, _ = pushed
    result, _ = run_hub_script(hub, LOAD_WITH_PACKAGE, workdir, "load_with_package")
    assert result["ok"] and abs(sum(result["scores"].values()) - 1) < 1e-5


def test_load_back_without_the_package(pushed):
    from zero_shot_helpers import random_images

    hub, workdir, _, _ = pushed
    random_images(1, seed=5)[0].save(workdir / "probe.png")
    result, _ = run_hub_script(hub, LOAD_WITHOUT_PACKAGE, workdir, "load_without_package", with_package=False)
    assert result["ok"] and set(result["scores"]) == {"cat", "dog", "car"}


FAILING_PUSH = PREAMBLE + """
import hashlib, os
from pathlib import Path
from hub_helpers import build_trainer, hub_model
from zero_shot_helpers import small_processor
from neuclip_hf import HubPushError, push_to_hub

def digest(folder):
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).rglob("*")) if p.is_file()}

# 0. The Hub rejects the card (HTTP 400 from validate-yaml): the library call stops before creating or uploading.
try:
    push_to_hub(hub_model(), "user/bad-card", small_processor())
    raise AssertionError("the push went through")
except HubPushError as error:
    card_error = {"message": str(error), "attempts": error.attempts}

trainer, _ = build_trainer("run", steps=2, push_to_hub=True, hub_model_id="user/flaky", hub_strategy="end",
                           save_strategy="steps", save_steps=2, hub_push_attempts=3)
trainer.train()
delays = []
trainer.hub_retry.sleep = delays.append  # instant retries; the waits are recorded
checkpoint = digest("run/checkpoint-2")
errors = []
for attempt in range(2):  # 1: three HTTP 500 answers; 2: a 403, not retried
    try:
        trainer.push_to_hub()
        errors.append(None)
    except HubPushError as error:
        errors.append({"message": str(error), "status": error.status, "attempts": error.attempts,
                       "local_dir": error.local_dir})
failed_delays = list(delays)
trainer.push_to_hub()  # 3: the connection drops once, the retry succeeds
assert digest("run/checkpoint-2") == checkpoint  # pushing never touches the checkpoint
saved = load_file("run/model.safetensors")  # the saved model is complete and equals the trained one
state = trainer.model.state_dict()
assert set(saved) == set(state) and all(torch.equal(saved[k], state[k]) for k in saved)
print(json.dumps({"errors": errors, "delays": failed_delays, "all_delays": delays, "card_error": card_error,
                  "output_dir": os.path.abspath("run")}))
"""


def test_failed_push_retries_keeps_local_files_and_reports_clearly(fake_hub, tmp_path):
    fake_hub.fail(400, kinds=("validate_yaml",), times=1)
    fake_hub.fail(500, kinds=("commit",), times=3)
    fake_hub.fail(403, kinds=("commit",), times=1)
    fake_hub.fail("drop", kinds=("commit",), times=1)
    result, output = run_hub_script(fake_hub, FAILING_PUSH, tmp_path, "failing_push", token=SENTINEL)
    first, second = result["errors"]
    assert first["status"] == 500 and first["attempts"] == 3 and first["local_dir"] == result["output_dir"]
    assert first["message"].startswith("Upload of ") and ("to user/flaky failed after 3 attempts: HTTP 500 on POST "
                                                           "/api/models/user/flaky/commit/main" in first["message"])
    assert f"The local files in {result['output_dir']} are intact" in first["message"]
    assert second["status"] == 403 and second["attempts"] == 1 and "(not retried" in second["message"]
    assert result["delays"] == [2.0, 4.0]  # exponential backoff from --hub_push_backoff 2
    assert result["all_delays"] == [2.0, 4.0, 2.0]  # the dropped connection cost one retry
    assert fake_hub.count("commit", "user/flaky") == 3 + 1 + 2
    assert set(fake_hub.files("user/flaky")) >= {"model.safetensors", "config.json", "README.md"}
    assert SENTINEL not in output and SENTINEL not in json.dumps(result)
    assert "retry 1/2 in 2.0 s" in output  # the retries are logged
    # A card the Hub rejects (a 4xx) is not retried, and nothing is created or uploaded for it.
    card_error = result["card_error"]
    assert card_error["attempts"] == 1 and "Model card validation to user/bad-card failed" in card_error["message"]
    assert not fake_hub.repo_dir("user/bad-card").exists()
