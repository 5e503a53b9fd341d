"""Edge toolbox over a real registry (cache by sha256, byte counts, corruption), personalisation, and the
serving helpers in serve.models (batched generation equals the model's own generate, PNG, download body).

The HTTP path of the toolbox runs against a real Serve instance in tests/integration/test_serve.py.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from actors.publishing import publish_generation_model
from baim.config import LearnerSpec
from baim.decompose import GenerationModel, TaskModel, decompose
from baim.learners import VAELearner
from orchestrator.core.artifacts import pack_module
from orchestrator.core.errors import ArtifactRejected, UnknownTask
from orchestrator.core.registry import Registry
from serve.client import Toolbox, personalise
from serve.models import (
    GenerationRequest,
    artifact_body,
    decode_png_base64,
    generate_batch,
    load_model,
    load_version,
    model_artifact,
    payload_from_body,
    png_base64,
    to_uint8,
)
from tests.support.models import tiny_baim

RESOLUTION = 16


def publish(registry: Registry, task: str, version: str, seed: int = 0) -> TaskModel:
    model = decompose(tiny_baim(seed), task)
    registry.put(f"task/{task}", version, pack_module(model, model.spec()))
    return model


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(str(tmp_path / "registry"))


# ---- serve.models -------------------------------------------------------------------------------------


def test_batched_generation_equals_each_models_own_generate(registry: Registry) -> None:
    # Prepare
    model = publish(registry, "smiling", "v000001")
    loaded = load_model(registry.get("task/smiling", "v000001"), task="smiling", model_version="v000001")
    requests = [GenerationRequest(3, 11), GenerationRequest(1, 5), GenerationRequest(2, 11)]

    # Execute
    batched = generate_batch(loaded, requests)

    # Assert: same noise as the model's own generate(n, seed); float rounding of another batch shape only
    assert [tuple(images.shape) for images in batched] == [(3, 3, 16, 16), (1, 3, 16, 16), (2, 3, 16, 16)]
    for request, images in zip(requests, batched, strict=True):
        alone = model.eval().generate(request.n, seed=request.seed)
        assert torch.allclose(images, alone, atol=1e-5)
    assert not torch.allclose(batched[0][:1], batched[1])  # different seeds, different images


def test_learner_artifacts_are_served_too(registry: Registry) -> None:
    # Prepare: an edge upload's spec, as actors/edge.py writes it
    torch.manual_seed(0)
    learner = VAELearner(LearnerSpec(widths=(8,), latent_dim=4, resolution=RESOLUTION)).eval()
    spec = {"kind": "learner", "edge_id": "edge-0", "task": "male", "learner": learner.spec.to_dict()}
    registry.put("task/male", "v000001", pack_module(learner, spec))
    loaded = load_model(registry.get("task/male", "v000001"), task="male", model_version="v000001")

    # Execute
    (images,) = generate_batch(loaded, [GenerationRequest(n=2, seed=3)])

    # Assert
    expected = learner.generate(2, torch.Generator().manual_seed(3))
    assert torch.allclose(images, expected, atol=1e-6)
    assert loaded.kind == "learner"
    assert loaded.parameter_count == sum(p.numel() for p in learner.parameters())


def test_png_round_trip_is_lossless_after_quantisation() -> None:
    images = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(0))
    encoded = png_base64(images)
    decoded = np.stack([decode_png_base64(e) for e in encoded])
    assert np.array_equal(decoded, to_uint8(images))
    assert decoded.shape == (2, 5, 7, 3)


def test_download_body_hashes_to_the_artifact_sha256(registry: Registry) -> None:
    publish(registry, "smiling", "v000001")
    payload = registry.get("task/smiling", "v000001")
    body = artifact_body(payload)
    assert hashlib.sha256(body).hexdigest() == payload.sha256
    assert payload_from_body(body, payload.sha256, artifact_id="x") == payload


def test_download_body_without_separator_is_rejected() -> None:
    with pytest.raises(ArtifactRejected, match="no newline"):
        payload_from_body(b"garbage", "0" * 64, artifact_id="task/x@v1")


def test_a_baim_artifact_is_not_servable(registry: Registry) -> None:
    baim = tiny_baim()
    registry.put("task/smiling", "v000001", pack_module(baim, baim.spec()))
    with pytest.raises(ArtifactRejected, match="spec kind"):
        load_model(registry.get("task/smiling", "v000001"), task="smiling", model_version="v000001")


# ---- toolbox over the registry ------------------------------------------------------------------------


def test_toolbox_miss_then_hit_counts_bytes(registry: Registry, tmp_path: Path) -> None:
    # Prepare
    publish(registry, "smiling", "v000001")
    nbytes = registry.ref("task/smiling", "v000001").nbytes
    toolbox = Toolbox(tmp_path / "cache", registry=registry)

    # Execute
    first = toolbox.fetch("smiling")
    second = toolbox.fetch("smiling")

    # Assert
    assert (first.cache_hit, first.bytes_received) == (False, nbytes)
    assert (second.cache_hit, second.bytes_received) == (True, 0)
    assert toolbox.bytes_received == nbytes
    assert (toolbox.fetches, toolbox.cache_hits) == (2, 1)
    assert first.sha256 == second.sha256 == registry.ref("task/smiling", "v000001").sha256
    assert toolbox.cached_sha256s() == [first.sha256]
    assert first.model is not second.model  # each fetch is a fresh copy, safe to fine-tune
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_toolbox_fetches_a_new_version(registry: Registry, tmp_path: Path) -> None:
    publish(registry, "smiling", "v000001", seed=0)
    toolbox = Toolbox(tmp_path / "cache", registry=str(registry.uri))
    old = toolbox.fetch("smiling")
    publish(registry, "smiling", "v000002", seed=1)

    new = toolbox.fetch("smiling")

    assert (new.model_version, new.cache_hit) == ("v000002", False)
    assert new.bytes_received == registry.ref("task/smiling", "v000002").nbytes
    assert new.sha256 != old.sha256
    assert sorted(toolbox.cached_sha256s()) == sorted([old.sha256, new.sha256])


def test_toolbox_refetches_a_corrupt_cache_file(registry: Registry, tmp_path: Path) -> None:
    publish(registry, "smiling", "v000001")
    toolbox = Toolbox(tmp_path / "cache", registry=registry)
    first = toolbox.fetch("smiling")
    cached = tmp_path / "cache" / f"{first.sha256}.artifact"
    data = bytearray(cached.read_bytes())
    data[-1] ^= 0xFF
    cached.write_bytes(bytes(data))

    again = toolbox.fetch("smiling")

    assert (again.cache_hit, again.bytes_received) == (False, first.bytes_received)
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == first.sha256


def test_toolbox_unknown_task(registry: Registry, tmp_path: Path) -> None:
    publish(registry, "smiling", "v000001")
    toolbox = Toolbox(tmp_path / "cache", registry=registry)
    with pytest.raises(UnknownTask, match="known tasks: smiling"):
        toolbox.fetch("hats")


def test_toolbox_needs_a_source(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="endpoint URL or a registry"):
        Toolbox(tmp_path)
    with pytest.raises(ValueError, match="http"):
        Toolbox(tmp_path, endpoint="ftp://host")


# ---- personalisation ----------------------------------------------------------------------------------


def shard(seed: int, count: int = 16) -> list[torch.Tensor]:
    """A local 'shard' with a clear structure (smooth colour gradients), in batches of 8."""
    generator = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0.0, 1.0, RESOLUTION)
    base = ramp.view(1, 1, 1, -1) * torch.rand(count, 3, 1, 1, generator=generator)
    images = (base + 0.05 * torch.rand(count, 3, RESOLUTION, RESOLUTION, generator=generator)).clamp(0, 1)
    return list(images.split(8))


@pytest.mark.parametrize("kind", ["task_model", "learner"])
def test_personalise_lowers_the_local_loss(registry: Registry, tmp_path: Path, kind: str) -> None:
    # Prepare
    if kind == "task_model":
        publish(registry, "smiling", "v000001")
    else:
        learner = VAELearner(LearnerSpec(widths=(8,), latent_dim=4, resolution=RESOLUTION))
        spec = {"kind": "learner", "edge_id": "edge-0", "task": "smiling", "learner": learner.spec.to_dict()}
        registry.put("task/smiling", "v000001", pack_module(learner, spec))
    fetched = Toolbox(tmp_path / "cache", registry=registry).fetch("smiling")
    torch.manual_seed(0)

    # Execute
    before, after = personalise(fetched.model, shard(1), epochs=5, lr=5e-3, eval_loader=shard(2))

    # Assert
    assert after < before


def test_personalise_rejects_bad_arguments(registry: Registry, tmp_path: Path) -> None:
    publish(registry, "smiling", "v000001")
    model = Toolbox(tmp_path / "cache", registry=registry).fetch("smiling").model
    with pytest.raises(ValueError, match="epochs"):
        personalise(model, shard(1), epochs=0, lr=1e-3)
    with pytest.raises(ValueError, match="lr"):
        personalise(model, shard(1), epochs=1, lr=0.0)
    with pytest.raises(TypeError, match="TaskModel or a VAELearner"):
        personalise(torch.nn.Linear(2, 2), shard(1), epochs=1, lr=1e-3)


# ---- the two download kinds ---------------------------------------------------------------------------


def test_a_served_version_generates_with_its_generation_artifact_and_offers_both_downloads(
    registry: Registry,
) -> None:
    # Prepare: a task model and its generation-only artifact, as the publish path stores them
    model = publish(registry, "smiling", "v000001").eval()
    generation = publish_generation_model(registry, model, "v000001", seed=3)

    # Execute
    served = load_version(registry, "smiling", "v000001")
    (images,) = generate_batch(served.model, [GenerationRequest(4, 9)])

    # Assert: it generates with the generation model, the same images as the task model's own generate
    assert isinstance(served.model.module, GenerationModel)
    assert generation.max_abs_diff == 0.0 and generation.images_checked > 0
    assert torch.allclose(images, model.generate(4, seed=9), atol=1e-5)
    full, gen = model_artifact(served, "full"), model_artifact(served, "generation")
    assert (full["kind"], full["artifact_kind"]) == ("full", "task_model")
    assert (gen["kind"], gen["artifact_kind"]) == ("generation", "generation_model")
    assert full["sha256"] == registry.ref("task/smiling", "v000001").sha256
    assert gen["sha256"] == generation.sha256 == registry.ref("generation/smiling", "v000001").sha256
    assert len(gen["body"]) == generation.nbytes + 1 < len(full["body"])  # spec, newline, weights
    info = served.info()
    assert (info["kind"], info["sha256"]) == ("task_model", full["sha256"])
    assert info["generates_with"]["kind"] == "generation_model"
    assert info["generates_with"]["parameter_count"] == generation.params < info["parameter_count"]
    with pytest.raises(ValueError, match="kind: expected one of"):
        model_artifact(served, "encoder")  # type: ignore[arg-type]


def test_a_version_without_a_generation_artifact_is_served_and_downloaded_whole(registry: Registry) -> None:
    publish(registry, "smiling", "v000001")

    served = load_version(registry, "smiling", "v000001")

    assert isinstance(served.model.module, TaskModel)
    assert model_artifact(served, "generation")["kind"] == "full"
    assert served.info()["generates_with"]["sha256"] == served.info()["sha256"]


def test_toolbox_fetches_each_kind_and_says_which_arrived(registry: Registry, tmp_path: Path) -> None:
    model = publish(registry, "smiling", "v000001").eval()
    publish_generation_model(registry, model, "v000001", seed=0)
    toolbox = Toolbox(tmp_path / "cache", registry=registry)

    generation = toolbox.fetch("smiling", kind="generation")
    full = toolbox.fetch("smiling", kind="full")
    again = toolbox.fetch("smiling", kind="generation")

    assert (generation.download, generation.kind) == ("generation", "generation_model")
    assert isinstance(generation.model, GenerationModel)
    assert generation.bytes_received == registry.ref("generation/smiling", "v000001").nbytes
    assert (full.download, full.kind, full.cache_hit) == ("full", "task_model", False)
    assert full.bytes_received == registry.ref("task/smiling", "v000001").nbytes > generation.bytes_received
    assert (again.download, again.cache_hit, again.bytes_received) == ("generation", True, 0)
    with pytest.raises(ValueError, match="kind: expected one of"):
        toolbox.fetch("smiling", kind="encoder")  # type: ignore[arg-type]


def test_toolbox_generation_fetch_of_a_version_without_one_gets_the_full_model(
    registry: Registry, tmp_path: Path
) -> None:
    publish(registry, "smiling", "v000001")
    toolbox = Toolbox(tmp_path / "cache", registry=registry)

    fetched = toolbox.fetch("smiling", kind="generation")

    assert (fetched.download, fetched.kind) == ("full", "task_model")
