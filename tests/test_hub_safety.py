"""Upload rules that need no server: which files leave the machine, the token scan, retry classification."""

import json

import pytest
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError

from neuclip_hf.hub import HubPushError, RetryPolicy, call_with_retry, is_transient, upload_files, upload_folder
from neuclip_hf.trainer import NeuCLIPTrainingArguments

TOKEN = "hf_UNITtestTOKEN0000000000000000"
UNREACHABLE = HfApi(endpoint="http://127.0.0.1:9")  # nothing listens there: any request would fail loudly


def test_only_model_files_are_uploaded(tmp_path):
    for name in ("config.json", "model.safetensors", "modeling_neuclip.py", "README.md", "tokenizer.json",
                 "training_args.bin", "optimizer.pt", "rng_state.pth", "events.out.tfevents.1", "_tmp.json",
                 "checkpoint-2/model.safetensors", ".cache/x.json", "runs/log.json", "merges.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"{}")
    assert upload_files(tmp_path) == ["README.md", "config.json", "merges.txt", "model.safetensors",
                                      "modeling_neuclip.py", "runs/log.json", "tokenizer.json"]


def test_a_file_holding_the_token_is_never_uploaded(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hub_token": TOKEN}))
    with pytest.raises(ValueError, match=r"refusing to upload config.json .*contains your Hub token") as error:
        upload_folder(tmp_path, "user/x", token=TOKEN, api=UNREACHABLE)
    assert TOKEN not in str(error.value)


def test_safetensors_metadata_is_scanned_too(tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "model.safetensors"), metadata={"note": TOKEN})
    with pytest.raises(ValueError, match="refusing to upload model.safetensors"):
        upload_folder(tmp_path, "user/x", token=TOKEN, api=UNREACHABLE)


def _http_error(status: int) -> HfHubHTTPError:
    import httpx2

    response = httpx2.Response(status, request=httpx2.Request("POST", "http://hub/api/models/u/m/commit/main"))
    return HfHubHTTPError(f"{status} error", response=response)


@pytest.mark.parametrize("status, transient", [(500, True), (503, True), (429, True), (408, True), (400, False),
                                               (401, False), (403, False), (404, False)])
def test_transient_errors(status, transient):
    assert is_transient(_http_error(status)) is transient


def test_retry_policy_backs_off_exponentially_and_is_bounded():
    delays = []
    policy = RetryPolicy(attempts=5, initial_delay=1.0, max_delay=3.0, sleep=delays.append)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 5:
            raise ConnectionError(f"network down with {TOKEN}")  # a message that happens to hold the token
        return "done"

    assert call_with_retry(flaky, "upload", "user/x", policy, secret=TOKEN) == "done"
    assert delays == [1.0, 2.0, 3.0, 3.0]
    def down():
        raise ConnectionError(f"no route to host (token {TOKEN})")

    with pytest.raises(HubPushError) as error:
        call_with_retry(down, "upload", "user/x", RetryPolicy(attempts=2, sleep=delays.append), local_dir="out",
                        secret=TOKEN)
    assert error.value.attempts == 2 and error.value.status is None
    assert TOKEN not in str(error.value) and "<redacted>" in str(error.value)
    with pytest.raises(TypeError):  # programming errors are not disguised as push failures
        call_with_retry(lambda: None + 1, "upload", "user/x", RetryPolicy(sleep=delays.append))
    with pytest.raises(ValueError, match="attempts=0"):
        RetryPolicy(attempts=0)


def test_checkpoint_hub_strategies_are_refused(tmp_path):
    with pytest.raises(ValueError, match="--hub_strategy=checkpoint is not supported: checkpoints hold pickled"):
        NeuCLIPTrainingArguments(output_dir=str(tmp_path), use_cpu=True, push_to_hub=True, hub_strategy="checkpoint",
                                 hub_model_id="user/x")
