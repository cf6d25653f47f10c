"""`ScoreHead`: the regression MLP that reads the hidden state at the score position."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import SCORE_BOUNDS, QScorerConfig


def soft_clamp(x: torch.Tensor, low: float, high: float, sharpness: float) -> torch.Tensor:
    """Bound ``x`` to ``[low, high]`` without killing its gradient (open interval in exact
    arithmetic; float32 rounds values far outside to the ends).

    ``low + (softplus(b (x - low)) - softplus(b (x - high))) / b`` with ``b = sharpness``.
    Its derivative, ``sigmoid(b (x - low)) - sigmoid(b (x - high))``, is ~1 across the interior
    (so a regressed score keeps its meaning there, as with the paper's clamp) and decays smoothly
    beyond either end instead of being exactly zero as ``torch.clamp`` is: a reward user pushing an
    image whose raw score overshoots still gets a direction. The price is a compression within
    about ``ln(2) / b`` of each end (0.087 score points at the default ``b = 8``).
    """
    return low + (F.softplus(sharpness * (x - low)) - F.softplus(sharpness * (x - high))) / sharpness


class ScoreHead(nn.Module):
    """MLP ``h -> h/2 -> h/4 -> 1`` (ReLU, Kaiming-normal weights, zero biases), kept in float32.

    Output = ``soft_clamp(mid + mlp(hidden))`` with ``mid`` the middle of the score range (by
    default; see ``bound`` and ``centered``).

    Args:
        hidden_size: width ``h`` of the backbone's last hidden state.
        hidden_sizes: widths of the hidden layers; default ``[h // 2, h // 4]`` as in the release.
        score_range: ``(low, high)``; outputs lie inside it (see `soft_clamp`) unless ``bound`` is ``"none"``.
        sharpness: beta of `soft_clamp`.
        bound: ``"soft_clamp"``, ``"clamp"`` (``torch.clamp``, as the paper's training loss) or
            ``"none"`` (the raw output, as the paper's evaluation reports it).
        centered: add ``mid`` to the MLP's output (False for the released mPLUG-Owl2 head, which
            regresses the score itself).

    Input: ``[B, h]`` hidden states of any float dtype. Output: ``[B]`` scores in the head's dtype:
    float32, as the head never goes below it (``.double()`` is allowed, for numerical checks).
    """

    def __init__(
        self,
        hidden_size: int,
        hidden_sizes: list[int] | None = None,
        score_range: tuple[float, float] = (1.0, 5.0),
        sharpness: float = 8.0,
        bound: str = "soft_clamp",
        centered: bool = True,
    ) -> None:
        super().__init__()
        if bound not in SCORE_BOUNDS:
            raise ValueError(f"bound must be one of {SCORE_BOUNDS}, got {bound!r}")
        hidden_sizes = list(hidden_sizes) if hidden_sizes is not None else [hidden_size // 2, hidden_size // 4]
        widths = [hidden_size, *hidden_sizes, 1]
        layers: list[nn.Module] = []
        for i, (width_in, width_out) in enumerate(zip(widths[:-1], widths[1:])):
            linear = nn.Linear(width_in, width_out, dtype=torch.float32)
            nn.init.kaiming_normal_(linear.weight)
            nn.init.zeros_(linear.bias)
            layers.append(linear)
            if i < len(widths) - 2:
                layers.append(nn.ReLU())
        self.mlp = nn.Sequential(*layers)
        self.hidden_sizes = hidden_sizes
        self.score_range = (float(score_range[0]), float(score_range[1]))
        self.sharpness = float(sharpness)
        self.bound = bound
        self.centered = centered

    @classmethod
    def from_config(cls, hidden_size: int, config: QScorerConfig) -> ScoreHead:
        """The head a checkpoint's config describes, for a backbone of width ``hidden_size``."""
        return cls(
            hidden_size,
            config.head_hidden_sizes,
            config.score_range,
            config.score_bound_sharpness,
            config.score_bound,
            config.head_centered,
        )

    def raw_score(self, hidden: torch.Tensor) -> torch.Tensor:
        """Unbounded regression output ``[B]`` float32 (what a training loss may also read).

        The MLP regresses the offset from the middle of the score range (when ``centered``), so that
        a fresh head (zero biases, as released) starts in the linear part of the bound, not pinned
        at one end.
        """
        low, high = self.score_range
        raw = self.mlp(hidden.to(self.mlp[0].weight.dtype)).squeeze(-1)
        return raw + (low + high) / 2 if self.centered else raw

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.bounded(self.raw_score(hidden))

    def bounded(self, raw: torch.Tensor) -> torch.Tensor:
        """`raw_score` output ``[B]`` -> the scores ``forward`` returns, bounded as ``bound`` says."""
        low, high = self.score_range
        if self.bound == "soft_clamp":
            return soft_clamp(raw, low, high, self.sharpness)
        return raw.clamp(low, high) if self.bound == "clamp" else raw

    def _apply(self, fn, recurse=True):
        # Never below float32, whatever `.to(dtype)` / `.half()` the enclosing model receives: the
        # head is tiny and its output is the reward.
        super()._apply(fn, recurse)
        for param in self.parameters():
            if param.dtype in (torch.float16, torch.bfloat16):
                param.data = param.data.float()
        return self
