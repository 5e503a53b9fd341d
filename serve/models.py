"""Task models as Serve and the edge toolbox use them: safe loading, following the registry, seeded batched
generation, PNG encoding, and the byte format of a model download. No Ray: Serve replicas, the edge toolbox
and a bare HTTP server (benchmarks/bench_serve.py) use the same code.

Three artifact kinds generate images and can be served: `"generation_model"` (a task model's generation-only
artifact, `generation/<task>`: no encoders), `"task_model"` (a decomposed BAIM task model, the full exact one,
`task/<task>`) and `"learner"` (a lone edge VAE, served as is, e.g. before the first decomposition). A replica
follows `task/<task>`; for each version it generates with that version's generation artifact when the
registry holds one (bit-identical images, fewer parameters), else with the task model itself. Downloads come
in two kinds: `full` (the task model: what an edge needs to reconstruct and to personalise) and `generation`
(the generation artifact when there is one, else the full one, which generates too).

Determinism. A request is (n, seed). Its noise is exactly what the model's own `generate(n, seed)` draws,
from its own generators (never from a shared RNG), and Serve's batching only concatenates the requests' noise
along the batch axis. So a request's images are a function of (model version, seed, n) alone. One float
caveat, measured in tests/integration/test_serve.py: CPU kernels (and a task model's gate, which runs each
learner on the rows routed to it) round the last bits differently for different batch shapes, so the same
request batched with different neighbours can differ by 1/255 on a rare pixel (about 1 in 10^4); served
alone (or in the same batch) it is bit-identical. Computing in float64 would hide this and costs 3-5x.

Rollout. `TaskModelFollower` polls the registry (`poll_seconds`) and, when a newer version of its task is
committed, loads it beside the current one and swaps a single reference: requests in flight finish on the
model they started with, later ones get the new one, nothing restarts, so no request fails. A version that
fails verification is logged and skipped; the follower keeps what it has (and at start it loads the newest
version that verifies).

Download format (`GET /tasks/{task}/model`): the body is `spec_json + b"\\n" + weights`, i.e. exactly the
bytes the artifact's sha256 covers, so `sha256(body)` must equal the `X-Model-Sha256` header.
`canonical_json` never emits a raw newline, so the first b"\\n" splits spec from weights.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from baim.decompose import OneTaskModel
from baim.gates import GATE_NOISE_KEY
from baim.learners import VAELearner, noise_for
from baim.split import check_cut, generate_tail, split_state_from_bytes
from orchestrator.core.artifacts import ArtifactPayload, load_module
from orchestrator.core.errors import ArtifactRejected, UnknownTask
from orchestrator.core.names import (
    DOWNLOAD_KINDS,
    MAX_MODEL_BYTES,
    DownloadKind,
    generation_owner,
    task_owner,
)
from orchestrator.core.registry import ArtifactNotFound, Registry

logger = logging.getLogger(__name__)

SERVABLE_KINDS = ("generation_model", "task_model", "learner")
DEFAULT_POLL_SECONDS = 5.0  # how often a follower looks for a newer version in the registry


@dataclass(frozen=True)
class GenerationRequest:
    """One request's share of a batch: n images from seed."""

    n: int
    seed: int


@dataclass(frozen=True)
class LoadedModel:
    """A verified, rebuilt model ready to generate, with the facts GET /tasks reports."""

    task: str
    model_version: str
    sha256: str
    kind: str
    spec: dict[str, Any]
    module: nn.Module
    parameter_count: int

    def info(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "model_version": self.model_version,
            "kind": self.kind,
            "parameter_count": self.parameter_count,
            "sha256": self.sha256,
        }


def load_model(payload: ArtifactPayload, *, task: str, model_version: str) -> LoadedModel:
    """Verify (sha256, safetensors, dtypes, finiteness, shapes) and rebuild. Raises ArtifactRejected."""
    artifact_id = f"{task_owner(task)}@{model_version}"
    module = load_module(
        payload, nn.Module, artifact_id=artifact_id, max_bytes=MAX_MODEL_BYTES, allowed_kinds=SERVABLE_KINDS
    ).eval()
    spec = json.loads(payload.spec_json)
    return LoadedModel(
        task=task,
        model_version=model_version,
        sha256=payload.sha256,
        kind=str(spec["kind"]),
        spec=spec,
        module=module,
        parameter_count=sum(p.numel() for p in module.parameters()),
    )


@dataclass(frozen=True)
class Download:
    """One downloadable artifact of a served version: the exact bytes its sha256 covers."""

    kind: DownloadKind
    artifact_kind: str  # the spec kind: "task_model", "generation_model" or "learner"
    model_version: str
    sha256: str
    body: bytes
    parameter_count: int


@dataclass(frozen=True)
class ServedVersion:
    """What a replica holds for one version: the model it generates with and the downloads it answers."""

    model: LoadedModel  # generates: the generation artifact when there is one, else the full model
    downloads: dict[DownloadKind, Download]

    def info(self) -> dict[str, Any]:
        """GET /tasks's entry: the full task model (kind, parameters, sha256), and what generates."""
        full = self.downloads["full"]
        return {
            "task": self.model.task,
            "model_version": self.model.model_version,
            "kind": full.artifact_kind,
            "parameter_count": full.parameter_count,
            "sha256": full.sha256,
            "generates_with": {
                "kind": self.model.kind,
                "parameter_count": self.model.parameter_count,
                "sha256": self.model.sha256,
                "nbytes": len(self.downloads["generation"].body),
            },
        }


def _download(kind: DownloadKind, loaded: LoadedModel, payload: ArtifactPayload) -> Download:
    return Download(
        kind=kind,
        artifact_kind=loaded.kind,
        model_version=loaded.model_version,
        sha256=payload.sha256,
        body=artifact_body(payload),
        parameter_count=loaded.parameter_count,
    )


def load_version(registry: Registry, task: str, version: str) -> ServedVersion:
    """Verify and load `task/<task>@version` and, when the registry holds it, `generation/<task>@version`
    (module docstring). Only the generating model stays built; the full model is verified, then dropped."""
    payload = registry.get(task_owner(task), version)
    full = load_model(payload, task=task, model_version=version)
    downloads: dict[DownloadKind, Download] = {"full": _download("full", full, payload)}
    try:
        generation_payload = registry.get(generation_owner(task), version)
    except ArtifactNotFound:
        downloads["generation"] = downloads["full"]  # the full model generates too
        return ServedVersion(model=full, downloads=downloads)
    generator = load_model(generation_payload, task=task, model_version=version)
    if generator.kind != "generation_model":
        raise ArtifactRejected(
            f"{generation_owner(task)}@{version}",
            f"expected kind generation_model, received {generator.kind}",
        )
    downloads["generation"] = _download("generation", generator, generation_payload)
    return ServedVersion(model=generator, downloads=downloads)


# ---- following the registry ---------------------------------------------------------------------------


class TaskModelFollower:
    """The newest good version of one task's model, followed in the registry (see the module docstring).

    `current` is a `ServedVersion` (the generating model and the downloads), replaced as one reference so
    that a caller always sees a matching set. `poll_seconds=0` or a `pinned_version` never follows. `stop()`
    ends the polling thread.
    """

    def __init__(
        self,
        registry_uri: str,
        task: str,
        *,
        poll_seconds: float = DEFAULT_POLL_SECONDS,
        pinned_version: str | None = None,
    ) -> None:
        if poll_seconds < 0:
            raise ValueError(f"poll_seconds: expected >= 0, received {poll_seconds}")
        self._registry = Registry(registry_uri)
        self.task = task
        self._rejected: set[str] = set()
        self.current: ServedVersion = (
            self._load(pinned_version) if pinned_version else self._load_newest_good()
        )
        self._stop = threading.Event()
        if pinned_version is None and poll_seconds > 0:
            threading.Thread(
                target=self._follow, args=(poll_seconds,), name=f"follow-{task}", daemon=True
            ).start()

    def stop(self) -> None:
        self._stop.set()

    def _load(self, version: str) -> ServedVersion:
        return load_version(self._registry, self.task, version)

    def _load_newest_good(self) -> ServedVersion:
        """The newest version that passes verification (a corrupt newest one must not stop a replica)."""
        versions = self._registry.versions(task_owner(self.task))
        for version in reversed(versions):
            try:
                return self._load(version)
            except (ArtifactRejected, ValueError, LookupError) as err:
                self._rejected.add(version)
                logger.error("task %s: version %s rejected, trying an older one: %s", self.task, version, err)
        if not versions:
            raise UnknownTask(self.task)
        raise ArtifactRejected(task_owner(self.task), f"none of the versions {versions} loads")

    def _follow(self, poll_seconds: float) -> None:
        while not self._stop.wait(poll_seconds):
            try:
                self.poll()
            except Exception:  # a registry hiccup must not end the follower; the next poll retries
                logger.exception("task %s: registry poll failed", self.task)

    def poll(self) -> bool:
        """Load the newest version if it is new and verifies; whether the model changed."""
        latest = self._registry.latest(task_owner(self.task))
        current = self.current.model.model_version
        if latest is None or latest == current or latest in self._rejected:
            return False
        try:
            self.current = self._load(latest)
        except (ArtifactRejected, ValueError, LookupError) as err:
            self._rejected.add(latest)
            logger.error(
                "task %s: version %s rejected, still serving %s: %s", self.task, latest, current, err
            )
            return False
        logger.info("task %s: rolled from %s to %s", self.task, current, latest)
        return True


# ---- generation ---------------------------------------------------------------------------------------


def request_noise(model: LoadedModel, request: GenerationRequest) -> dict[str, torch.Tensor]:
    """The noise the model's own generate draws for (n, seed), by noise key.

    A learner: `VAELearner.generate(n, torch.Generator().manual_seed(seed))` draws (n, latent_dim) under the
    key "z". A task model or generation model: `generate(n, seed)` draws `noise_for(key, seed, n, dim)` for
    the gate code ("@gate") and for every learner (by name).
    """
    module = model.module
    if isinstance(module, VAELearner):
        generator = torch.Generator().manual_seed(request.seed)
        return {"z": torch.randn(request.n, module.spec.latent_dim, generator=generator)}
    assert isinstance(module, OneTaskModel)
    dims = {GATE_NOISE_KEY: module.config.gate_code_dim}
    dims.update({entry.name: entry.spec.latent_dim for entry in module.config.learners})
    return {key: noise_for(key, request.seed, request.n, dim) for key, dim in dims.items()}


@torch.no_grad()
def generate_batch(model: LoadedModel, requests: Sequence[GenerationRequest]) -> list[torch.Tensor]:
    """One batched forward for several requests; returns one (n_i, C, H, W) tensor in [0, 1] per request.

    Each request's images are what the model's own generate gives for (n_i, seed_i) alone (up to the float
    caveat in the module docstring).
    """
    if not requests:
        return []
    counts = [r.n for r in requests]
    per_request = [request_noise(model, r) for r in requests]
    eps = {key: torch.cat([noise[key] for noise in per_request]) for key in per_request[0]}
    module = model.module
    if isinstance(module, VAELearner):
        images = module.generate(sum(counts), eps=eps["z"])
    else:
        assert isinstance(module, OneTaskModel)
        images = module.generate(sum(counts), eps=eps)
    return list(images.split(counts))


def generate_and_encode(model: LoadedModel, requests: Sequence[GenerationRequest]) -> list[dict[str, Any]]:
    """One batched forward, then PNGs: per request {"model_version", "images", "generation_seconds"}, where
    generation_seconds is the forward pass of the whole batch (what baim_generation_seconds observes)."""
    started = time.perf_counter()
    images = generate_batch(model, requests)
    seconds = time.perf_counter() - started
    return [
        {"model_version": model.model_version, "images": png_base64(batch), "generation_seconds": seconds}
        for batch in images
    ]


def unprocessable(where: str, message: str, *names: str) -> dict[str, Any]:
    """A 422 in FastAPI's own shape (a list of problems with their location), as validation errors are."""
    return {"status": 422, "detail": [{"loc": [where, *names], "msg": message, "type": "value_error"}]}


def generate_split_and_encode(
    model: LoadedModel, cut: int, body: bytes, *, expected_version: str | None, max_images: int
) -> dict[str, Any]:
    """The tail of split generation (baim.split) on a head's safetensors state, then PNGs.

    Returns {"model_version", "images", "generation_seconds"}, or {"status", "detail"} for a request that
    cannot be served: 409 when the head ran another model version than the one served, 422 for a model
    without decoder stages (a lone learner), an unknown cut or a state that is not what a head sends.
    """
    if expected_version is not None and expected_version != model.model_version:
        return {
            "status": 409,
            "detail": f"model_version: the head ran {expected_version!r}, this replica serves "
            f"{model.model_version!r}; download the current model and run the head again",
        }
    module = model.module
    if not isinstance(module, OneTaskModel):
        return unprocessable(
            "path", f"task {model.task!r} is served by a {model.kind}, which cannot be split"
        )
    try:
        check_cut(module, cut)
    except ValueError as error:
        return unprocessable("query", str(error), "cut")
    started = time.perf_counter()
    try:
        state = split_state_from_bytes(module, body, cut, max_batch=max_images)
        images = generate_tail(module, state, cut)
    except ValueError as error:
        return unprocessable("body", str(error))
    seconds = time.perf_counter() - started
    return {"model_version": model.model_version, "images": png_base64(images), "generation_seconds": seconds}


def model_artifact(current: ServedVersion, kind: DownloadKind = "full") -> dict[str, Any]:
    """The `kind` download of `current`: {"model_version", "sha256", "body", "kind", "artifact_kind"}."""
    if kind not in DOWNLOAD_KINDS:
        raise ValueError(f"kind: expected one of {list(DOWNLOAD_KINDS)}, received {kind!r}")
    download = current.downloads[kind]
    return {
        "model_version": download.model_version,
        "sha256": download.sha256,
        "body": download.body,
        "kind": download.kind,
        "artifact_kind": download.artifact_kind,
    }


# ---- encoding -----------------------------------------------------------------------------------------


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(n, C, H, W) floats in [0, 1] -> (n, H, W, C) uint8, rounding to nearest."""
    if images.dim() != 4:
        raise ValueError(f"images: expected shape (n, C, H, W), received {tuple(images.shape)}")
    scaled = (images.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    return scaled.permute(0, 2, 3, 1).contiguous().numpy()


def png_base64(images: torch.Tensor) -> list[str]:
    """Each image as a base64-encoded PNG (lossless: decoding gives back `to_uint8(images)`)."""
    encoded = []
    for array in to_uint8(images):
        mode = "RGB" if array.shape[2] == 3 else "L"
        picture = Image.fromarray(array if mode == "RGB" else array[:, :, 0], mode=mode)
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        encoded.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return encoded


def decode_png_base64(encoded: str) -> np.ndarray:
    """Inverse of `png_base64` for one image: (H, W, C) uint8."""
    with Image.open(io.BytesIO(base64.b64decode(encoded, validate=True))) as picture:
        array = np.asarray(picture)
    return array if array.ndim == 3 else array[:, :, None]


# ---- download body ------------------------------------------------------------------------------------


def artifact_body(payload: ArtifactPayload) -> bytes:
    """The download body: the exact bytes the sha256 covers."""
    return payload.spec_json.encode() + b"\n" + payload.weights


def payload_from_body(body: bytes, sha256: str, *, artifact_id: str) -> ArtifactPayload:
    """Split a download body back into a payload; `load_model` (or `unpack_payload`) then verifies it."""
    spec_bytes, separator, weights = body.partition(b"\n")
    if not separator:
        raise ArtifactRejected(artifact_id, "download body has no newline between spec and weights")
    try:
        spec_json = spec_bytes.decode("utf-8")
    except UnicodeDecodeError:
        raise ArtifactRejected(artifact_id, "download body: spec is not UTF-8") from None
    return ArtifactPayload(weights=weights, spec_json=spec_json, sha256=sha256)


def body_sha256(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()
