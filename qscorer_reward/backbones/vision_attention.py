"""Attention for the Qwen-VL vision towers with all segments of a packed batch in a few calls.

The vision towers of Qwen2-VL, Qwen2.5-VL and Qwen3-VL run attention over one packed sequence of
the patches of every image in the batch, cut into independent segments by ``cu_seqlens``: whole
images in full-attention blocks, windows of 8 x 8 patches in Qwen2.5-VL's window blocks. Under
transformers' ``"sdpa"`` implementation each segment is a separate
``scaled_dot_product_attention`` call in a Python loop, after a host-device sync in every layer:
a batch of 64 images of 448 x 448 makes 1024 calls on 64-token windows per window block, so a GPU
waits on the host most of the time and a CPU pays the per-call cost (and strided copies) 1024 times.

Transformers hands the whole packed sequence and its ``cu_seqlens`` to attention implementations
whose name contains "flash". `packed_sdpa_attention` is registered under such a name,
`PACKED_SDPA`: it groups the segments by length and runs one batched SDPA call per distinct
length (one call in all when every segment has the same length, as with square images whose side
is a multiple of the window). The segment layout is read back to the host once per ``cu_seqlens``
tensor, that is once per forward for window blocks and once for full blocks, not once per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary
from transformers import AttentionInterface

# Transformers passes the packed sequence (``cu_seq_lens_q``) to implementations whose name
# contains "flash"; no version digit, so version-specific flash-attention checks do not match it.
PACKED_SDPA = "qscorer_packed_sdpa_flash_layout"


@dataclass(frozen=True)
class SegmentLayout:
    """How the segments of one ``cu_seqlens`` are grouped.

    Attributes:
        groups: ``(segment_length, segment_count)`` per distinct length, in the grouped token order.
        order: token indices ``[tokens]`` that put the segments of each length next to each other,
            or ``None`` when they already are.
        inverse: the inverse permutation of ``order`` (``None`` with it).
    """

    groups: tuple[tuple[int, int], ...]
    order: torch.Tensor | None
    inverse: torch.Tensor | None


_layouts: WeakIdKeyDictionary = WeakIdKeyDictionary()


def segment_layout(cu_seqlens: torch.Tensor) -> SegmentLayout:
    """The grouping of the segments delimited by ``cu_seqlens`` (``[segments + 1]`` int, from 0).

    Cached per tensor object: every layer of a forward pass receives the same ``cu_seqlens``
    tensor, so its values are copied to the host once.
    """
    layout = _layouts.get(cu_seqlens)
    if layout is not None:
        return layout
    boundaries = cu_seqlens.tolist()
    lengths = [end - start for start, end in zip(boundaries[:-1], boundaries[1:]) if end > start]
    # Consecutive runs of equal length; when each length has a single run, no reordering is needed.
    runs: list[tuple[int, int]] = []
    for length in lengths:
        if runs and runs[-1][0] == length:
            runs[-1] = (length, runs[-1][1] + 1)
        else:
            runs.append((length, 1))
    if len({length for length, _ in runs}) == len(runs):
        layout = SegmentLayout(tuple(runs), None, None)
    else:
        starts_by_length: dict[int, list[int]] = {}
        for start, end in zip(boundaries[:-1], boundaries[1:]):
            if end > start:
                starts_by_length.setdefault(end - start, []).append(start)
        order = torch.cat(
            [
                (torch.tensor(starts)[:, None] + torch.arange(length)).reshape(-1)
                for length, starts in starts_by_length.items()
            ]
        ).to(cu_seqlens.device)
        groups = tuple((length, len(starts)) for length, starts in starts_by_length.items())
        layout = SegmentLayout(groups, order, torch.argsort(order))
    _layouts[cu_seqlens] = layout
    return layout


def packed_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: torch.Tensor | None = None,
    is_causal: bool = False,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention within each segment of a packed sequence, as transformers' attention interface.

    ``query``, ``key``, ``value``: ``[1, heads, tokens, head_dim]``; ``cu_seq_lens_q``: the segment
    boundaries ``[segments + 1]`` (the same for keys: the vision towers attend within segments).
    Returns ``([1, tokens, heads, head_dim], None)``, the layout of the flash-attention
    implementations. Without ``cu_seq_lens_q`` (a caller that splits the segments itself) it is
    plain SDPA over what it is given.
    """
    if cu_seq_lens_q is None:
        output = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=is_causal
        )
        return output.transpose(1, 2), None
    layout = segment_layout(cu_seq_lens_q)
    heads, head_dim = query.shape[1], query.shape[3]
    # [heads, tokens, head_dim], tokens grouped by segment length
    query, key, value = (
        tensor[0] if layout.order is None else tensor[0].index_select(1, layout.order) for tensor in (query, key, value)
    )
    outputs = []
    offset = 0
    for length, count in layout.groups:
        size = length * count
        # [heads, count * length, head_dim] -> [count, heads, length, head_dim]
        group_query, group_key, group_value = (
            tensor[:, offset : offset + size].unflatten(1, (count, length)).transpose(0, 1)
            for tensor in (query, key, value)
        )
        group_output = F.scaled_dot_product_attention(
            group_query, group_key, group_value, dropout_p=dropout, scale=scaling, is_causal=is_causal
        )
        outputs.append(group_output.transpose(1, 2).reshape(size, heads, head_dim))
        offset += size
    output = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
    if layout.inverse is not None:
        output = output.index_select(0, layout.inverse)
    return output.unsqueeze(0), None


AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
