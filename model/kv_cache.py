"""Per-slot ring KV cache with a pinned prefix.

Every layer holds keys and values of shape (slots, Hk, S, hd). The S cells of
a slot are laid out as

    [ prefix cells x prefix_len | ring cells x ring | trash cell ]

Prefix cells keep the session's instructions forever. Conversation tokens go
to ring cell `pos % ring`; the ring is `window + max_chunk` long, so tokens
written in one call never overwrite a cell that a query of the same call may
still see. Rows that do not execute this call (exec mask off) write to the
trash cell, whose position stays -1 (never visible). `cell_pos` records the
absolute position held by each cell (-1 = empty) and is the only thing the
attention mask is built from:

    visible(q, cell) = cell_pos >= 0 and cell_pos <= pos_q
                       and (cell is prefix or cell_pos > pos_q - window)

The same rule, applied to a full sequence (`sequence_mask`), gives the offline
reference that streaming must match. Positions: prefix tokens 0..L-1,
conversation tokens from `prefix_len` on (no cap; RoPE angles are float64).

Legend: B rows in the call, T positions in the call, S cells, Hk kv heads,
hd head dim. This module knows nothing about sessions, sampling or audio.
"""

from __future__ import annotations

import torch

from .config import ModelConfig


class KVCache:
    def __init__(
        self, cfg: ModelConfig, slots: int, max_chunk: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.window = cfg.window
        self.prefix_len = cfg.prefix_len
        self.ring = cfg.window + max_chunk
        self.cells = cfg.prefix_len + self.ring + 1
        self.trash = self.cells - 1
        shape = (slots, cfg.n_kv_heads, self.cells, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.cell_pos = torch.full((slots, self.cells), -1, dtype=torch.long, device=device)  # (slots, S)
        is_prefix = torch.zeros(self.cells, dtype=torch.bool, device=device)
        is_prefix[: cfg.prefix_len] = True
        self.is_prefix = is_prefix  # (S,)

    def reset(self, mask: torch.Tensor) -> None:
        """Forget every cell of the rows where mask (slots,) is True."""
        self.cell_pos.masked_fill_(mask[:, None], -1)

    def copy_row(self, src: int, dst: int) -> None:
        """Move a slot's whole state to another row (keeps active rows contiguous)."""
        for t in (*self.k, *self.v):
            t[dst] = t[src]
        self.cell_pos[dst] = self.cell_pos[src]

    def conversation_cells(self, pos: torch.Tensor, exec_mask: torch.Tensor) -> torch.Tensor:
        """pos (B, T) absolute conversation positions -> cells (B, T); non-exec rows -> trash."""
        cells = self.prefix_len + (pos - self.prefix_len) % self.ring
        return torch.where(exec_mask[:, None], cells, torch.full_like(cells, self.trash))

    def claim(self, rows: slice, cells: torch.Tensor, pos: torch.Tensor) -> None:
        """Record positions of the cells about to be written. cells, pos (B, T) for the B rows in `rows`."""
        keep = torch.where(cells == self.trash, torch.full_like(pos, -1), pos)
        self.cell_pos[rows].scatter_(1, cells, keep)

    def mask(self, rows: slice, pos: torch.Tensor) -> torch.Tensor:
        """Visibility of every cell for queries at pos (B, T) -> bool (B, 1, T, S)."""
        cp = self.cell_pos[rows, None, :]  # (B, 1, S)
        q = pos[:, :, None]  # (B, T, 1)
        visible = (cp >= 0) & (cp <= q) & (self.is_prefix | (cp > q - self.window))
        return visible[:, None]

    def write(self, layer: int, rows: slice, cells: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write new k, v (B, Hk, T, hd) into cells (B, T) of the B rows in `rows`.

        index_copy_ on flat (row, head, cell) indices: scatter_ would copy the whole cache in bf16 on CPU.
        """
        B, Hk, T, hd = k.shape
        first = rows.start or 0
        row = torch.arange(first, first + B, device=cells.device)[:, None, None]  # (B, 1, 1)
        head = torch.arange(Hk, device=cells.device)[None, :, None]  # (1, Hk, 1)
        flat = ((row * Hk + head) * self.cells + cells[:, None, :]).flatten()  # (B*Hk*T,)
        self.k[layer].view(-1, hd).index_copy_(0, flat, k.reshape(-1, hd))
        self.v[layer].view(-1, hd).index_copy_(0, flat, v.reshape(-1, hd))

    def read(self, layer: int, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the B rows in `rows`: (B, Hk, S, hd) each (views, no copy)."""
        return self.k[layer][rows], self.v[layer][rows]

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))


def sequence_mask(pos: torch.Tensor, is_prefix: torch.Tensor, window: int) -> torch.Tensor:
    """Offline reference mask for a full sequence. pos (B, T), is_prefix (B, T) -> bool (B, 1, T, T)."""
    q = pos[:, :, None]  # (B, T, 1)
    k = pos[:, None, :]  # (B, 1, T)
    visible = (k <= q) & (is_prefix[:, None, :] | (k > q - window))
    return visible[:, None]
