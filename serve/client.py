"""The edge toolbox, the client of the HTTP API: task models downloaded on demand, cached by sha256, and
personalised on a local shard.

    toolbox = Toolbox(cache_dir, endpoint="http://127.0.0.1:8000")  # or registry="/path/to/registry"
    fetched = toolbox.fetch("smiling")  # FetchResult: model, version, sha256, bytes_received, cache_hit
    before, after = personalise(fetched.model, loader, epochs=2, lr=1e-3)
    generator = toolbox.fetch("smiling", kind="generation").model  # generation only: no encoders
    split = toolbox.generate_split("smiling", n=4, cut=1, seed=7)  # head here, tail on a Serve replica

Kinds. `kind="full"` (the default) is the task model, which reconstructs and can be personalised;
`kind="generation"` is the version's generation-only artifact (`generation/<task>`), smaller, bit-identical
images, or the full model when the version has none. `FetchResult.download` says which kind arrived.

Cache. `cache_dir/<sha256>.artifact` holds the download body (`spec_json + b"\\n" + weights`, see
serve.models), so its sha256 is its name; `cache_dir/index.json` maps each task to the version and sha256
last fetched. Every read re-hashes the file (a corrupt file is deleted and fetched again) and the model is
rebuilt through the verified `unpack_payload` path: nothing is ever unpickled.

Bytes. `bytes_received` is the length of what actually arrived: the HTTP response body (0 for a
304 Not Modified), or the payload read from the registry (0 when the cache already held that sha256).
Over HTTP the toolbox sends `If-None-Match: "<sha256>"` when it holds the task's last model, so an unchanged
model costs one small request and no body.

Split generation (`generate_split`, GaisNet's split inference): the toolbox runs the head of its cached model
(`baim.split.generate_head`: the gate and the decoder stages up to the cut), posts the state as safetensors
to `POST /tasks/{task}/generate/split?cut=K&model_version=V`, and the replica runs the tail. The images equal
`generate` for the same seed; a 409 (the served version moved on) refetches the model and runs the head once
more.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from baim.decompose import OneTaskModel, TaskModel
from baim.learners import VAELearner
from baim.split import generate_head, split_state_to_bytes
from baim.training import LossFn, evaluate, train_epoch, vae_batch_loss
from orchestrator.core.errors import ArtifactRejected, UnknownTask
from orchestrator.core.names import (
    DOWNLOAD_KINDS,
    TASK_OWNER_PREFIX,
    DownloadKind,
    generation_owner,
    task_owner,
)
from orchestrator.core.registry import ArtifactNotFound, Registry
from serve.models import (
    LoadedModel,
    artifact_body,
    body_sha256,
    decode_png_base64,
    load_model,
    payload_from_body,
)

logger = logging.getLogger(__name__)

INDEX_FILE = "index.json"
DEFAULT_KLD_WEIGHT = 0.00025  # the paper's KLD weight, used for a lone learner's loss


@dataclass(frozen=True)
class FetchResult:
    """A task model in the toolbox, and what fetching it cost."""

    task: str
    model_version: str
    sha256: str
    model: nn.Module  # a fresh copy, in eval mode, safe to fine-tune
    kind: str  # the artifact's spec kind: "task_model", "generation_model" or "learner"
    download: DownloadKind  # what arrived: "full" or "generation"
    parameter_count: int
    bytes_received: int  # body bytes that crossed the link for this fetch (0 on a cache hit)
    cache_hit: bool
    source: Literal["http", "registry"]


@dataclass(frozen=True)
class SplitResult:
    """Images generated with the head on this edge and the tail on a Serve replica, and what crossed."""

    task: str
    model_version: str
    cut: int
    images: np.ndarray  # (n, H, W, C) uint8, decoded from the response's PNGs
    uplink_bytes: int  # the head's state (request body)
    downlink_bytes: int  # the response body


class Toolbox:
    """An edge's local store of task models, filled from the Serve endpoint or straight from the registry."""

    def __init__(
        self,
        cache_dir: str | os.PathLike[str],
        *,
        endpoint: str | None = None,
        registry: Registry | str | None = None,
        api_token: str | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        if endpoint is None and registry is None:
            raise ValueError("Toolbox: expected an endpoint URL or a registry, received neither")
        if endpoint is not None and not endpoint.startswith(("http://", "https://")):
            raise ValueError(f"endpoint: expected an http(s):// URL, received {endpoint!r}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s: expected > 0, received {timeout_s}")
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.endpoint = endpoint.rstrip("/") if endpoint else None
        self.registry = Registry(registry) if isinstance(registry, str) else registry
        self.api_token = api_token
        self.timeout_s = timeout_s
        self.bytes_received = 0  # total over every fetch of this toolbox
        self.fetches = 0
        self.cache_hits = 0

    # ---- public -----------------------------------------------------------------------------------

    def fetch(self, task: str, kind: DownloadKind = "full") -> FetchResult:
        """The newest model of `task` of `kind` (module docstring), from the cache when it is current.
        Raises UnknownTask, ArtifactRejected (a body that fails verification) or ConnectionError (endpoint
        unreachable)."""
        if kind not in DOWNLOAD_KINDS:
            raise ValueError(f"kind: expected one of {list(DOWNLOAD_KINDS)}, received {kind!r}")
        if self.endpoint is not None:
            result = self._fetch_http(task, kind)
        else:
            result = self._fetch_registry(task, kind)
        self.fetches += 1
        self.cache_hits += int(result.cache_hit)
        self.bytes_received += result.bytes_received
        self._remember(_index_key(task, kind), result.model_version, result.sha256)
        logger.info(
            "toolbox: %s %s %s (%s) from %s, %d bytes received%s",
            task,
            result.download,
            result.model_version,
            result.sha256[:12],
            result.source,
            result.bytes_received,
            " (cache hit)" if result.cache_hit else "",
        )
        return result

    def generate_split(self, task: str, n: int, cut: int, seed: int) -> SplitResult:
        """n images of `task`: the head (decoder stages <= cut) here, the tail on the endpoint's replica.

        Raises ValueError for a cut the model does not have or a model that cannot be split, and
        ConnectionError when the endpoint refuses the request (its status and detail in the message).
        """
        if self.endpoint is None:
            raise ValueError("generate_split: needs an endpoint (the tail runs on a Serve replica)")
        for attempt in (1, 2):
            fetched = self.fetch(task)
            model = fetched.model
            if not isinstance(model, OneTaskModel):
                raise ValueError(f"task {task!r}: a {fetched.kind} has no decoder stages to split")
            body = split_state_to_bytes(generate_head(model, n, cut, seed=seed))
            query = urllib.parse.urlencode({"cut": cut, "model_version": fetched.model_version})
            url = f"{self.endpoint}/tasks/{urllib.parse.quote(task, safe='')}/generate/split?{query}"
            headers = self._headers({"Content-Type": "application/octet-stream"})
            request = urllib.request.Request(url, data=body, headers=headers, method="POST")  # noqa: S310
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:  # noqa: S310  # nosec B310
                    reply = response.read()
            except urllib.error.HTTPError as err:
                detail = err.read()[:500].decode(errors="replace")
                if (
                    err.code == 409 and attempt == 1
                ):  # a newer version is served: fetch it, run the head again
                    continue
                raise ConnectionError(f"POST {url}: HTTP {err.code}: {detail}") from None
            except urllib.error.URLError as err:
                raise ConnectionError(f"POST {url}: {err.reason}") from None
            answer = json.loads(reply)
            images = np.stack([decode_png_base64(image) for image in answer["images"]])
            return SplitResult(task, answer["model_version"], cut, images, len(body), len(reply))
        raise AssertionError("unreachable: the second attempt returns or raises")

    def cached_sha256s(self) -> list[str]:
        """sha256 of every artifact in the cache (not verified here; `fetch` verifies what it reads)."""
        return sorted(path.stem for path in self.cache_dir.glob("*.artifact"))

    # ---- sources ----------------------------------------------------------------------------------

    def _headers(self, headers: dict[str, str]) -> dict[str, str]:
        """`headers` with the bearer token when the toolbox has one."""
        if self.api_token:
            return {**headers, "Authorization": f"Bearer {self.api_token}"}
        return dict(headers)

    def _fetch_http(self, task: str, kind: DownloadKind) -> FetchResult:
        assert self.endpoint is not None
        url = f"{self.endpoint}/tasks/{urllib.parse.quote(task, safe='')}/model?kind={kind}"
        known = self._index().get(_index_key(task, kind))
        known_sha = known["sha256"] if known and self._read_cache(known["sha256"]) is not None else None
        headers = self._headers({"Accept": "application/octet-stream"})
        if known_sha:
            headers["If-None-Match"] = f'"{known_sha}"'
        request = urllib.request.Request(url, headers=headers, method="GET")  # noqa: S310 (http(s) checked)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:  # noqa: S310  # nosec B310
                body = response.read()
                sha256 = response.headers.get("X-Model-Sha256", "")
                version = response.headers.get("X-Model-Version", "")
                arrived = _download_kind(response.headers.get("X-Model-Kind", "full"))
        except urllib.error.HTTPError as err:
            if err.code == 304 and known_sha and known:
                arrived = _download_kind(err.headers.get("X-Model-Kind", "full"))
                return self._from_cache(task, kind, arrived, known["model_version"], known_sha, "http")
            detail = err.read()[:500].decode(errors="replace")
            if err.code == 404:
                raise UnknownTask(task) from None
            raise ConnectionError(
                f"GET {url}: expected 200 or 304, received HTTP {err.code}: {detail}"
            ) from None
        except urllib.error.URLError as err:
            raise ConnectionError(f"GET {url}: {err.reason}") from None
        artifact_id = f"{task_owner(task)}@{version or '?'}"
        actual = body_sha256(body)
        if actual != sha256:
            raise ArtifactRejected(artifact_id, f"download sha256 mismatch: header {sha256!r}, body {actual}")
        loaded = load_model(
            payload_from_body(body, sha256, artifact_id=artifact_id), task=task, model_version=version
        )
        self._write_cache(sha256, body)
        return _result(loaded, arrived, bytes_received=len(body), cache_hit=False, source="http")

    def _fetch_registry(self, task: str, kind: DownloadKind) -> FetchResult:
        assert self.registry is not None
        version = self.registry.latest(task_owner(task))  # the task model's version names both kinds
        if version is None:
            known_tasks = [o[len(TASK_OWNER_PREFIX) :] for o in self.registry.owners(TASK_OWNER_PREFIX)]
            raise UnknownTask(task, known_tasks)
        owner, arrived = task_owner(task), "full"
        if kind == "generation":
            try:
                self.registry.ref(generation_owner(task), version)
                owner, arrived = generation_owner(task), "generation"
            except ArtifactNotFound:
                pass  # a version without a generation artifact: the full model generates too
        sha256 = self.registry.ref(owner, version).sha256
        if self._read_cache(sha256) is not None:
            return self._from_cache(task, kind, _download_kind(arrived), version, sha256, "registry")
        payload = self.registry.get(owner, version)
        loaded = load_model(payload, task=task, model_version=version)
        self._write_cache(payload.sha256, artifact_body(payload))
        return _result(
            loaded, _download_kind(arrived), bytes_received=payload.nbytes, cache_hit=False, source="registry"
        )

    def _from_cache(
        self,
        task: str,
        kind: DownloadKind,
        arrived: DownloadKind,
        version: str,
        sha256: str,
        source: Literal["http", "registry"],
    ) -> FetchResult:
        body = self._read_cache(sha256)
        if body is None:  # deleted or corrupted since the check: fetch it again, without the cache
            self._forget(_index_key(task, kind))
            return self._fetch_http(task, kind) if source == "http" else self._fetch_registry(task, kind)
        artifact_id = f"{task_owner(task)}@{version}"
        loaded = load_model(
            payload_from_body(body, sha256, artifact_id=artifact_id), task=task, model_version=version
        )
        return _result(loaded, arrived, bytes_received=0, cache_hit=True, source=source)

    # ---- cache files ------------------------------------------------------------------------------

    def _cache_path(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"sha256: expected 64 lowercase hex characters, received {sha256!r:.80}")
        return self.cache_dir / f"{sha256}.artifact"

    def _read_cache(self, sha256: str) -> bytes | None:
        """The cached body when present and intact; a corrupt file is deleted (and None returned)."""
        path = self._cache_path(sha256)
        try:
            body = path.read_bytes()
        except FileNotFoundError:
            return None
        if hashlib.sha256(body).hexdigest() != sha256:
            logger.warning("toolbox: cached %s is corrupt; deleting it", path.name)
            path.unlink(missing_ok=True)
            return None
        return body

    def _write_cache(self, sha256: str, body: bytes) -> None:
        _write_atomic(self._cache_path(sha256), body)

    def _index(self) -> dict[str, dict[str, str]]:
        path = self.cache_dir / INDEX_FILE
        try:
            index = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError:
            logger.warning("toolbox: %s is not valid JSON; starting a new index", path)
            return {}
        return index if isinstance(index, dict) else {}

    def _remember(self, key: str, version: str, sha256: str) -> None:
        index = self._index()
        index[key] = {"model_version": version, "sha256": sha256}
        _write_atomic(self.cache_dir / INDEX_FILE, json.dumps(index, indent=1, sort_keys=True).encode())

    def _forget(self, key: str) -> None:
        index = self._index()
        if index.pop(key, None) is not None:
            _write_atomic(self.cache_dir / INDEX_FILE, json.dumps(index, indent=1, sort_keys=True).encode())


def _index_key(task: str, kind: DownloadKind) -> str:
    """The cache index's key: the task for a full model (as before kinds existed), `<task>#generation`."""
    return task if kind == "full" else f"{task}#{kind}"


def _download_kind(value: str) -> DownloadKind:
    if value not in DOWNLOAD_KINDS:
        raise ArtifactRejected(
            "download", f"X-Model-Kind: expected one of {list(DOWNLOAD_KINDS)}, got {value!r}"
        )
    return "full" if value == "full" else "generation"


def _result(
    loaded: LoadedModel,
    download: DownloadKind,
    *,
    bytes_received: int,
    cache_hit: bool,
    source: Literal["http", "registry"],
) -> FetchResult:
    return FetchResult(
        task=loaded.task,
        model_version=loaded.model_version,
        sha256=loaded.sha256,
        model=loaded.module,
        kind=loaded.kind,
        download=download,
        parameter_count=loaded.parameter_count,
        bytes_received=bytes_received,
        cache_hit=cache_hit,
        source=source,
    )


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---- personalisation ----------------------------------------------------------------------------------


def model_loss_fn(model: nn.Module, kld_weight: float = DEFAULT_KLD_WEIGHT) -> LossFn:
    """The training loss of a toolbox model: a task model's own loss (its config's kld_weight), or a lone
    learner's VAE loss with `kld_weight`."""
    if isinstance(model, TaskModel):

        def task_model_loss(module: nn.Module, batch: Any) -> torch.Tensor:
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            images = images.to(next(module.parameters()).device)
            return module(images).loss

        return task_model_loss
    if isinstance(model, VAELearner):
        return vae_batch_loss(kld_weight)
    raise TypeError(f"model: expected a TaskModel or a VAELearner, received {type(model).__name__}")


def personalise(
    task_model: nn.Module,
    loader: Iterable[Any],
    epochs: int,
    lr: float,
    *,
    eval_loader: Iterable[Any] | None = None,
    kld_weight: float = DEFAULT_KLD_WEIGHT,
    trainable: list[nn.Parameter] | None = None,
) -> tuple[float, float]:
    """Fine-tune a downloaded model in place on a local shard; returns (loss_before, loss_after).

    Both losses are `baim.training.evaluate` (seeded, eval mode) on `eval_loader` (the edge's test split),
    or on `loader` when none is given. Adam over `trainable` (every parameter when None; the adapters'
    parameters after `baim.adapters.apply_lora`, which froze the rest), `epochs` passes of `loader`.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs: expected a positive int, received {epochs!r}")
    if not lr > 0:
        raise ValueError(f"lr: expected > 0, received {lr!r}")
    loss_fn = model_loss_fn(task_model, kld_weight)
    measure_on = eval_loader if eval_loader is not None else loader
    if trainable is None:
        trainable = list(task_model.parameters())
        for p in trainable:
            p.requires_grad_(True)
    elif not trainable or not all(p.requires_grad for p in trainable):
        raise ValueError("trainable: expected a non-empty list of parameters that require grad")
    loss_before = evaluate(task_model, measure_on, loss_fn)
    optimizer = torch.optim.Adam(trainable, lr=lr)
    for epoch in range(epochs):
        train_loss = train_epoch(task_model, loader, optimizer, loss_fn)
        logger.debug("personalise epoch %d: train loss %.5f", epoch, train_loss)
    task_model.eval()
    loss_after = evaluate(task_model, measure_on, loss_fn)
    logger.info("personalised: loss %.5f -> %.5f over %d epochs", loss_before, loss_after, epochs)
    return loss_before, loss_after
