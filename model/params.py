"""Analytic parameter, KV-memory and FLOP arithmetic for a `ModelConfig`.

This is the single source of truth for the network's parameter shapes:
model/transformer.py builds exactly these tensors, and a test checks that
its parameter count equals `total_params`. Nothing is instantiated, so the
arithmetic works for the ~276B `interaction-small` preset on paper.

The network (d = d_model, hd = head_dim, k = frames_per_audio_token,
C = dmel_channels, B = dmel_bins, E = n_experts):

- text embedding Embedding(text_vocab, d); text head Linear(d, text_vocab, bias=False), untied
- audio embedding: one table Embedding(C*B, d_channel_embed) indexed by channel*B + bin, shared
  across the k frames; the k*C embeddings are concatenated -> Linear(k*C*d_channel_embed, d, bias=False)
- audio head Linear(d, k*C*B, bias=False): an independent softmax per (frame, channel)
- video: Linear(patch_dim, d) with bias; 2-D position embedding Parameter((image_size//patch_size)**2, d)
- slot-type embedding Parameter(positions_per_turn, d): which slot of the micro-turn a position is
- source embedding Embedding(2, d): user vs background text-in
- per layer: two RMSNorm weights (d); attention wqkv (d, (n_heads + 2*n_kv_heads)*hd) = q, k, v fused,
  wo (n_heads*hd, d), no biases; router Linear(d, E, bias=False); routed SwiGLU experts w13
  (E, d, 2*d_expert: gate and up fused) and w2 (E, d_expert, d); n_shared_experts shared SwiGLU
  experts d -> d_shared -> d (w13 fused, w2, no biases)
- final RMSNorm weight (d)
- ear (ear_channels = Ec > 0, model/ear.py): three Conv2d with biases over (k, C), 1 -> Ec -> Ec -> Ec,
  kernel KERNEL, then Linear(Ec*k*C', d, bias=False), C' the mel positions left by the strides

Active parameters per token are all of the above except the routed experts a
token is not sent to (E - top_k of them per layer). Embedding tables are
counted as active (one row is read per token), which slightly overstates the
FLOP estimate below; the heads are counted as if applied at every position.

This module knows nothing about tensors, devices or how the engine batches.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .config import ModelConfig
from .ear import KERNEL, MEL_STRIDES, ear_mel_out

BF16_BYTES = 2  # bytes per element of the KV cache by default


@dataclass(frozen=True)
class ParamReport:
    total_params: int  # every parameter of the network
    active_params: int  # parameters touched by one token (top_k of the routed experts)
    kv_bytes_per_token: int  # K and V for one position across all layers
    kv_bytes_per_session: int  # a full window of KV for one session slot
    positions_per_turn: int  # positions one session adds per 200 ms micro-turn
    flops_per_turn: int  # one session's forward FLOPs per micro-turn, full window attended

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def param_breakdown(config: ModelConfig) -> dict[str, int]:
    """Parameter count per component, summing to `total_params`."""
    d, hd = config.d_model, config.head_dim
    frames, channels = config.frames_per_audio_token, config.dmel_channels
    grid = config.image_size // config.patch_size
    layers = config.n_layers
    attention = d * config.n_heads * hd * 2 + d * config.n_kv_heads * hd * 2
    return {
        "text_embedding": config.text_vocab * d,
        "text_head": d * config.text_vocab,
        "audio_embedding": channels * config.dmel_bins * config.d_channel_embed
        + frames * channels * config.d_channel_embed * d,
        "audio_head": d * config.audio_logits,
        "video_embedding": config.patch_dim * d + d + grid * grid * d,
        "slot_and_source": config.positions_per_turn * d + 2 * d,
        "norms": layers * 2 * d + d,
        "attention": layers * attention,
        "routers": layers * d * config.n_experts,
        "routed_experts": layers * config.n_experts * 3 * d * config.d_expert,
        "shared_experts": layers * config.n_shared_experts * 3 * d * config.d_shared,
        "ear": ear_params(config),
    }


def ear_params(config: ModelConfig) -> int:
    E, taps = config.ear_channels, KERNEL[0] * KERNEL[1]
    if not E:
        return 0
    convs = (taps + 1) * E + (len(MEL_STRIDES) - 1) * (E * taps + 1) * E
    return convs + E * config.frames_per_audio_token * ear_mel_out(config.dmel_channels) * config.d_model


def total_params(config: ModelConfig) -> int:
    return sum(param_breakdown(config).values())


def active_params(config: ModelConfig) -> int:
    idle_experts = config.n_experts - config.top_k
    return total_params(config) - config.n_layers * idle_experts * 3 * config.d_model * config.d_expert


def kv_bytes_per_token(config: ModelConfig, bytes_per_element: int = BF16_BYTES) -> int:
    return 2 * config.n_layers * config.n_kv_heads * config.head_dim * bytes_per_element


def attention_flops_per_turn(config: ModelConfig) -> int:
    """QK^T and AV for every position of a micro-turn against a full window (steady state).

    The pinned prefix lives inside the window, so the attended length is `window`.
    """
    per_position = 2 * 2 * config.n_layers * config.n_heads * config.head_dim * config.window
    return per_position * config.positions_per_turn


def flops_per_turn(config: ModelConfig) -> int:
    """Forward FLOPs for one session's micro-turn: 2 x active x positions + attention."""
    return 2 * active_params(config) * config.positions_per_turn + attention_flops_per_turn(config)


def report(config: ModelConfig, bytes_per_element: int = BF16_BYTES) -> ParamReport:
    kv = kv_bytes_per_token(config, bytes_per_element)
    return ParamReport(
        total_params=total_params(config),
        active_params=active_params(config),
        kv_bytes_per_token=kv,
        kv_bytes_per_session=kv * config.window,
        positions_per_turn=config.positions_per_turn,
        flops_per_turn=flops_per_turn(config),
    )
