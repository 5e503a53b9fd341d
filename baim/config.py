"""Architecture specs for the BAIM's building blocks, as plain frozen dataclasses.

`LearnerSpec` describes one edge's VAE: what an edge trains, uploads (as JSON beside its weights) and what
the cloud rebuilds. It is the only thing `VAELearner.__init__` takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LearnerSpec:
    """One heterogeneous VAE learner.

    S = len(widths) encoder stages each halve the resolution; S decoder stages mirror them, so a learner has
    2*S stages (see `baim.learners` for the stage indexing).
    """

    widths: tuple[int, ...]  # output channels of each encoder stage, shallow to deep
    latent_dim: int  # size of the latent vector z
    resolution: int  # square images of resolution x resolution; divisible by 2**len(widths)
    in_channels: int = 3  # image channels (RGB)

    def __post_init__(self) -> None:
        # Accept a list (e.g. from JSON) but store a tuple so the spec stays hashable and frozen.
        if isinstance(self.widths, list):
            object.__setattr__(self, "widths", tuple(self.widths))
        if not isinstance(self.widths, tuple):
            raise ValueError(f"widths: expected a tuple of ints, received {type(self.widths).__name__}")
        if len(self.widths) < 1:
            raise ValueError("widths: expected at least 1 stage, received an empty tuple")
        for index, width in enumerate(self.widths):
            if not _is_int(width) or width <= 0:
                raise ValueError(f"widths[{index}]: expected a positive int, received {width!r}")
        if not _is_int(self.latent_dim) or self.latent_dim <= 0:
            raise ValueError(f"latent_dim: expected a positive int, received {self.latent_dim!r}")
        if not _is_int(self.in_channels) or self.in_channels <= 0:
            raise ValueError(f"in_channels: expected a positive int, received {self.in_channels!r}")
        if not _is_int(self.resolution) or self.resolution <= 0:
            raise ValueError(f"resolution: expected a positive int, received {self.resolution!r}")
        divisor = 2 ** len(self.widths)
        if self.resolution % divisor != 0:
            raise ValueError(
                f"resolution: expected a multiple of 2**len(widths) = {divisor} "
                f"(each of the {len(self.widths)} stages halves it), received {self.resolution}"
            )

    @property
    def num_stages(self) -> int:
        """Encoder plus decoder stages: 2 * len(widths)."""
        return 2 * len(self.widths)

    @property
    def bottleneck_resolution(self) -> int:
        """Spatial size of the deepest feature map, R / 2**S (>= 1 by validation)."""
        return self.resolution // 2 ** len(self.widths)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict; `from_dict(to_dict())` rebuilds an equal spec."""
        return {
            "widths": list(self.widths),
            "latent_dim": self.latent_dim,
            "resolution": self.resolution,
            "in_channels": self.in_channels,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LearnerSpec:
        """Rebuild from `to_dict()` output; unknown or missing keys raise ValueError naming them."""
        if not isinstance(d, dict):
            raise ValueError(f"LearnerSpec: expected a dict, received {type(d).__name__}")
        required = {"widths", "latent_dim", "resolution"}
        allowed = required | {"in_channels"}
        unknown = sorted(set(d) - allowed)
        if unknown:
            raise ValueError(f"LearnerSpec: unknown keys {unknown}; expected only {sorted(allowed)}")
        missing = sorted(required - set(d))
        if missing:
            raise ValueError(f"LearnerSpec: missing keys {missing}")
        widths = d["widths"]
        if not isinstance(widths, (list, tuple)):
            raise ValueError(f"widths: expected a list of ints, received {type(widths).__name__}")
        return cls(
            widths=tuple(widths),
            latent_dim=d["latent_dim"],
            resolution=d["resolution"],
            in_channels=d.get("in_channels", 3),
        )


def _is_int(value: object) -> bool:
    # bool is an int subclass; True as a width is a bug, not a 1.
    return isinstance(value, int) and not isinstance(value, bool)
