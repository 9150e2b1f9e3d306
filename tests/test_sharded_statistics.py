"""Per-rank batch statistics and sharded estimator updates equal the single-process run (1, 2 and 4 gloo ranks).

Each rank computes only its L x B block of similarities and all-gathers the per-anchor vectors; AmorLIP's networks
sum the ranks' gradient parts with one all-reduce; NeuCLIP splits its update by prototypes (the default: each rank
steps its own rows, the per-anchor sums over prototypes are all-reduced), by anchors or not at all. The losses, the
embeddings' gradients, the gathered statistics and every estimator state after three steps (restarts, an AmorLIP
epoch boundary, FastCLIP's table), must equal the one-process run to 1e-6 (the own optimizer's state to 1e-5) and
be bit-identical on every rank.
"""

import pytest
import torch
from helpers import OBJECTIVES, free_port, spawn_with_timeout, unit_vectors
from sharded_workers import BATCH, EPS, STEPS, VARIANTS, run_objective, worker

from neuclip_hf.objectives import ContrastiveBatch, NormalizerInputs

TIMEOUT = 300  # seconds per spawn; a 4-rank run takes ~20 s on 2 busy cores, so only a hang reaches it
TOLERANCE = dict(atol=1e-6, rtol=1e-6)
OPTIMIZER_TOLERANCE = dict(atol=1e-5, rtol=1e-5)
RUNS = (*OBJECTIVES, *VARIANTS)


@pytest.fixture(scope="module")
def reference():
    return {objective: run_objective(objective) for objective in RUNS}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("sharded")
    results = {}
    for world_size in (1, 2, 4):
        spawn_with_timeout(worker, (world_size, free_port(), list(RUNS), str(out_dir)), world_size, TIMEOUT)
        results[world_size] = [torch.load(out_dir / f"world{world_size}_rank{r}.pt", weights_only=True)
                               for r in range(world_size)]
    return results


@pytest.mark.slow
@pytest.mark.parametrize("world_size", (1, 2, 4))
@pytest.mark.parametrize("objective", RUNS)
def test_ranks_equal_single_process_run(runs, reference, objective, world_size):
    expected = reference[objective]
    assert expected["world_size"] == 1
    first = runs[world_size][0][objective]
    for rank, results in enumerate(runs[world_size]):
        got = results[objective]
        assert got["world_size"] == world_size
        for key in ("losses", "image_grads", "text_grads", "scale_grads", "statistics"):
            torch.testing.assert_close(got[key], expected[key], **TOLERANCE, msg=lambda m: f"rank {rank} {key}: {m}")
        assert set(got["normalizer"]) == set(expected["normalizer"])
        for name, value in expected["normalizer"].items():
            # AdaGrad's accumulators sum squared gradients: their relative error is twice the gradients', per step.
            tolerance = OPTIMIZER_TOLERANCE if name.startswith("optimizer.") else TOLERANCE
            torch.testing.assert_close(got["normalizer"][name], value, **tolerance,
                                       msg=lambda m: f"rank {rank} normalizer.{name}: {m}")
            # Every rank ends in the same state: the all-reduced sums are identical on all of them.
            assert torch.equal(got["normalizer"][name], first["normalizer"][name]), f"normalizer.{name} differs"


def test_from_batch_holds_only_the_local_rows_statistics_in_one_process():
    """Without a process group `from_batch` is the whole batch and its update is not sharded."""
    image, text = unit_vectors(BATCH, 16, 0), unit_vectors(BATCH, 16, 1)
    batch = ContrastiveBatch.gather(image, text, torch.tensor(2.0))
    inputs = NormalizerInputs.from_batch(batch, EPS)
    full = NormalizerInputs.from_embeddings(image, text, batch.temperature, EPS)
    assert not inputs.sharded and inputs.update_rows == slice(0, BATCH)
    for name in ("positive", "log_g_image", "log_g_text"):
        torch.testing.assert_close(getattr(inputs, name), getattr(full, name), **TOLERANCE)
    # A float64 reference from the formula: log(eps + mean_{j != i} exp((s_ij - s_ii) / T)).
    similarity = image.double() @ text.double().T
    logits = (similarity - similarity.diagonal()[:, None]) / float(batch.temperature)
    ghat = (logits.exp().sum(1) - 1) / (BATCH - 1)
    torch.testing.assert_close(inputs.log_g_image.double(), torch.log(EPS + ghat), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("objective", ("neuclip", "neuclip_uneven", "amorlip"))
def test_estimator_resumes_at_another_world_size(tmp_path, reference, objective):
    """A checkpoint of the estimator written by 2 ranks after step 1 (the prototype split's rows and AdaGrad sums
    gathered, AmorLIP's networks and Adam state), resumed by 4 ranks and by 1 process for the remaining steps, ends
    where the uninterrupted single-process run ends."""
    spawn_with_timeout(worker, (2, free_port(), [objective], str(tmp_path), (0, 1), None, "_first"), 2, TIMEOUT)
    saved = str(tmp_path / "world2_rank0_first.pt")
    for world_size in (4, 1):
        spawn_with_timeout(worker, (world_size, free_port(), [objective], str(tmp_path), (1, STEPS), saved, "_rest"),
                           world_size, TIMEOUT)
        for rank in range(world_size):
            got = torch.load(tmp_path / f"world{world_size}_rank{rank}_rest.pt", weights_only=True)[objective]
            torch.testing.assert_close(got["losses"], reference[objective]["losses"][1:], **TOLERANCE)
            for name, value in reference[objective]["normalizer"].items():
                tolerance = OPTIMIZER_TOLERANCE if name.startswith("optimizer.") else TOLERANCE
                torch.testing.assert_close(got["normalizer"][name], value, **tolerance,
                                           msg=lambda m: f"{world_size} ranks, rank {rank}, {name}: {m}")
