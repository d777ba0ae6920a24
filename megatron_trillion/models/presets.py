"""Model presets: the one registry of Trillion-family architectures.

Each preset is a frozen :class:`ModelPreset`; variants are ``dataclasses.replace`` of a base.
``get_preset(name)`` looks one up, ``apply_overrides(preset, {"field": value})`` changes fields
flag by flag (unknown fields raise with the list of valid ones). The megatron-core
``TransformerConfig`` is built from a preset in exactly one place:
``megatron_trillion.models.config.build_transformer_config``.

Published facts and the derivations of what is not published
------------------------------------------------------------
Parameter counts below are those of the *exported* model (no MTP layer), counted by
``megatron_trillion.models.param_count``. "Active" counts every parameter a token touches,
including the input embedding row and the output layer.

* **trillion-7b** (Trillion-7B technical report, Table 2): 32 layers, hidden 4096, FFN 11,008,
  32 heads (MHA), vocab 128,256, RoPE theta 100,000, SwiGLU, RMSNorm, untied embeddings,
  seq 4096. These numbers give 7.527B = published 7.53B. **trillion-7b-32k**: theta 1,000,000,
  seq 32,768.
* **tri-7b** (model card: 32 layers, 32 heads, vocab 128,256, 32K context, 7.76B). Only the
  FFN size is free once layers/heads/vocab are fixed and hidden stays 4096 (head dim 128, as in
  trillion-7b): 7.76B - 7.527B = 0.233B over 32 layers x 3 matrices x 4096 rows gives
  dFFN = 592, i.e. FFN ~ 11,600. We round to the nearest multiple of 256 (tensor-parallel and
  GEMM friendly): FFN 11,520 -> 7.728B (-0.4%). Long-context RoPE theta 1,000,000 as in
  trillion-7b-32k.
* **tri-21b**: the published base shape. The Tri-21B model card (reference 001) gives 32 query /
  8 KV heads, vocab 124,416, context 8192 and 20.73B parameters; its "32 layers" cannot reach
  20.73B with any SwiGLU-range FFN. The Tri-21B-Think model card (whose base model is Tri-21B)
  gives the rest: 40 layers, hidden 5,120, head dim 160 (= 5120 / 32 heads), FFN 27,392.
  Untied embeddings (2 x 124,416 x 5,120 = 1.274B) + 40 x (attention 65.5M + SwiGLU 420.7M)
  = 20.726B (published 20.73B, -0.02%).
* **trinity-large** (AFMoE, transformers' ``AfmoeForCausalLM``; ~398B total / ~13B active).
  Public: 60 layers of which the first 6 are dense, hidden 3072, 48 query heads / 8 KV heads,
  256 routed experts top-4 + 1 shared expert, sigmoid router with expert bias, QK-norm, gated
  attention, sandwich norm, local (sliding window 4096) / global attention with a global layer
  every 4th layer and RoPE only on the local layers, 8192 pretraining context. Assumed: head dim
  128 (the AFMoE default), vocab 200,192 (the AFMoE tokenizer), RoPE theta 10,000 (AFMoE
  default). Derived: with attention 62.9M/layer and embeddings 1.23B, the 54 MoE layers carry
  ~393B in 257 experts of 3 x 3072 x F_e weights -> F_e = 3072.6 -> **moe FFN 3072** (total
  398.41B, +0.1%). Active = embeddings + attention + 6 dense FFNs + 54 x (router + 5 experts):
  13B requires dense FFN ~ 8,000 -> **dense FFN 8192** (2.67 x hidden, the Llama ratio;
  13.15B active, +1.1%). Trinity does not use MTP (mtp_num_layers 0).
  Training details from the Trinity Large technical report (arXiv 2602.17004; its text was not
  reachable here, the figures come from secondary write-ups of it): the router bias moves by
  **SMEBU** (rate 5e-4, momentum 0.5, clamp scale 2; ``models.router_balance``) instead of
  megatron-core's sign rule; the input embeddings are scaled by sqrt(hidden) (AFMoE's
  ``mup_enabled``); the sandwich post-norm weights start **depth-scaled**, at 1 / num_layers
  (the write-up's formula lost its typesetting, 1/sqrt(L) is the other reading;
  ``sandwich_post_norm_init`` selects either), the pre-norms at 1.

Tiny variants (``tiny-*``) keep every code path of their parent (MHA vs GQA, MoE with dense
first layer, shared expert, sigmoid router + expert bias, QK-norm, gated attention, sandwich
norm, local+global layers, MTP) at about two million parameters, with sizes divisible for
TP2 / PP2 (and VPP2 for the dense ones) / EP2 on 2 CPU cores.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional


@dataclass(frozen=True)
class ModelPreset:
    """A decoder-only architecture. Field names follow Megatron-LM's flags where one exists."""

    name: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    """SwiGLU inner size of the dense MLP layers."""
    num_attention_heads: int
    vocab_size: int
    seq_length: int
    """Pretraining sequence length (also the RoPE table length)."""
    rotary_base: float
    num_query_groups: Optional[int] = None
    """KV heads for GQA; None = MHA (as many KV heads as query heads)."""
    kv_channels: Optional[int] = None
    """Head dim; None = hidden_size // num_attention_heads."""
    untie_embeddings_and_output_weights: bool = True
    norm_epsilon: float = 1e-5
    init_method_std: float = 0.02

    # Multi-token prediction (Trillion: one extra layer predicting t+2, loss = NTP + alpha*MTP).
    mtp_num_layers: int = 0
    mtp_loss_scaling_factor: float = 0.2
    """alpha of loss = NTP + alpha * MTP (0.2 stable phase, 0.1 at anneal in the Trillion recipe)."""

    # Attention variants (AFMoE).
    qk_layernorm: bool = False
    attention_output_gate: bool = False
    """Sigmoid gate on the attention output, computed from the attention input (AFMoE)."""
    sliding_window: Optional[int] = None
    """Local-attention window in tokens (query sees itself and the window-1 previous tokens, as
    in transformers' ``sliding_window``); None = every layer global."""
    global_attn_every_n_layers: Optional[int] = None
    """With a sliding window: layer i (0-based) is global iff (i + 1) % n == 0 (AFMoE)."""
    rope_on_global_layers: bool = True
    """AFMoE applies RoPE only on local layers (global layers are NoPE)."""
    sandwich_norm: bool = False
    """RMSNorm after attention and after the MLP, before the residual add (AFMoE)."""
    sandwich_post_norm_init: str = "one"
    """Initial weight of those post-sublayer norms: "one", "inverse_depth" (1 / num_layers)
    or "inverse_sqrt_depth" (1 / sqrt(num_layers)) - depth-scaled sandwich norm."""
    mup_enabled: bool = False
    """Multiply the input embeddings by sqrt(hidden_size) (AFMoE's ``mup_enabled``)."""

    # Mixture of experts (None = dense).
    num_experts: Optional[int] = None
    moe_router_topk: int = 0
    moe_ffn_hidden_size: Optional[int] = None
    moe_shared_expert_intermediate_size: Optional[int] = None
    num_dense_layers: int = 0
    """The first ``num_dense_layers`` layers use the dense MLP; the rest are MoE."""
    moe_router_score_function: str = "sigmoid"
    moe_router_enable_expert_bias: bool = True
    moe_router_bias_update_rate: float = 1e-3
    moe_router_bias_update_style: str = "sign"
    """"sign" (megatron-core's rule) or "smebu" (see models.router_balance)."""
    moe_router_bias_update_momentum: float = 0.5
    """SMEBU's momentum beta."""
    moe_router_bias_update_clamp_scale: float = 2.0
    """SMEBU's kappa in tanh(kappa * normalised violation)."""
    moe_router_topk_scaling_factor: Optional[float] = None
    """AFMoE ``route_scale`` (applied after top-k normalisation)."""
    moe_aux_loss_coeff: float = 0.0

    # Published sizes, for the parameter-count test (None = not published).
    published_total_params: Optional[float] = None
    published_active_params: Optional[float] = None

    @property
    def post_norm_init_gain(self) -> float:
        """The initial weight of the sandwich post-sublayer norms."""
        return {"one": 1.0, "inverse_depth": 1.0 / self.num_layers,
                "inverse_sqrt_depth": self.num_layers ** -0.5}[self.sandwich_post_norm_init]

    def expert_bias_update(self):
        """The router bias rule (``models.router_balance.ExpertBiasUpdate``)."""
        from megatron_trillion.models.router_balance import ExpertBiasUpdate

        return ExpertBiasUpdate(self.moe_router_bias_update_style,
                                self.moe_router_bias_update_rate,
                                self.moe_router_bias_update_momentum,
                                self.moe_router_bias_update_clamp_scale)

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def is_moe(self) -> bool:
        return self.num_experts is not None

    def moe_layer_pattern(self) -> list[int]:
        """Per layer: 1 = MoE, 0 = dense (megatron-core's ``moe_layer_freq`` list form)."""
        if not self.is_moe:
            return [0] * self.num_layers
        return [0 if i < self.num_dense_layers else 1 for i in range(self.num_layers)]

    def local_layer_pattern(self) -> list[int]:
        """Per layer: 1 = sliding-window (local) attention, 0 = global.

        megatron-core's ``window_attn_skip_freq`` list form (1 = SWA)."""
        if self.sliding_window is None:
            return [0] * self.num_layers
        n = self.global_attn_every_n_layers
        if n is None:
            return [1] * self.num_layers
        return [1 if (i + 1) % n else 0 for i in range(self.num_layers)]

    def layout_dims(self) -> dict:
        """The model sizes a parallel layout must divide (keyword arguments of
        ``platform.distributed.initialize_distributed`` / ``validate_parallel_sizes``)."""
        return dict(num_layers=self.num_layers, num_attention_heads=self.num_attention_heads,
                    num_query_groups=self.query_groups, num_moe_experts=self.num_experts)

    def errors(self, name_of: Callable[[str], str] = str) -> list[str]:
        """Every inconsistency of the preset, one message each.

        ``name_of(field)`` is how a message names a field. The default keeps the field names
        (a preset from the registry, a checkpoint or an HF config has no flags); the training
        validation passes its table of the flags that set preset fields, so the same checks
        read as flag problems there. The preset does not know the flags itself: they belong
        to the command line, which lower layers do not import."""
        n = name_of
        errors = []
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            errors.append(f"{n('hidden_size')} {self.hidden_size} is not divisible by "
                          f"{n('num_attention_heads')} {self.num_attention_heads}; set "
                          f"{n('kv_channels')}")
        if self.num_attention_heads % self.query_groups:
            errors.append(f"{n('num_attention_heads')} {self.num_attention_heads} is not "
                          f"divisible by {n('num_query_groups')} {self.query_groups}")
        if self.is_moe:
            if not 0 < self.moe_router_topk <= self.num_experts:
                errors.append(f"{n('moe_router_topk')} {self.moe_router_topk} must be in "
                              f"1..{n('num_experts')} ({self.num_experts})")
            if self.moe_ffn_hidden_size is None:
                errors.append(f"MoE presets need {n('moe_ffn_hidden_size')}")
            if not 0 <= self.num_dense_layers < self.num_layers:
                errors.append(f"{n('num_dense_layers')} {self.num_dense_layers} must be in "
                              f"0..{n('num_layers')}-1 ({self.num_layers - 1})")
            if self.moe_router_enable_expert_bias and self.moe_router_score_function != "sigmoid":
                errors.append(f"{n('moe_router_enable_expert_bias')} needs "
                              f"{n('moe_router_score_function')}='sigmoid'")
            errors += self.expert_bias_update().errors(name_of)
            if (self.moe_router_bias_update_style != "sign"
                    and not self.moe_router_enable_expert_bias):
                errors.append(f"{n('moe_router_bias_update_style')}="
                              f"{self.moe_router_bias_update_style!r} needs "
                              f"{n('moe_router_enable_expert_bias')}")
        if not self.is_moe and self.moe_router_bias_update_style != "sign":
            errors.append(f"{n('moe_router_bias_update_style')}="
                          f"{self.moe_router_bias_update_style!r} needs an MoE preset")
        if self.sandwich_post_norm_init not in ("one", "inverse_depth", "inverse_sqrt_depth"):
            errors.append(f"{n('sandwich_post_norm_init')} must be 'one', 'inverse_depth' or "
                          f"'inverse_sqrt_depth', got {self.sandwich_post_norm_init!r}")
        elif self.sandwich_post_norm_init != "one" and not self.sandwich_norm:
            errors.append(f"{n('sandwich_post_norm_init')} needs {n('sandwich_norm')}")
        if self.global_attn_every_n_layers is not None and self.sliding_window is None:
            errors.append(f"{n('global_attn_every_n_layers')} needs {n('sliding_window')}")
        if not self.rope_on_global_layers and self.sliding_window is None:
            errors.append(f"{n('rope_on_global_layers')}=False needs {n('sliding_window')} "
                          "(which layers are global is defined by the local/global pattern)")
        if self.mtp_num_layers < 0:
            errors.append(f"{n('mtp_num_layers')} must be >= 0, got {self.mtp_num_layers}")
        return errors

    def validate(self) -> None:
        """Raise ValueError naming the fields of every inconsistency."""
        errors = self.errors()
        if errors:
            raise ValueError(f"invalid model preset {self.name!r}:\n  - " + "\n  - ".join(errors))


# --------------------------------------------------------------------------------------------
# Full-size presets

TRILLION_7B = ModelPreset(
    name="trillion-7b",
    num_layers=32,
    hidden_size=4096,
    ffn_hidden_size=11008,
    num_attention_heads=32,
    vocab_size=128256,
    seq_length=4096,
    rotary_base=100_000,
    mtp_num_layers=1,
    published_total_params=7.53e9,
)

TRILLION_7B_32K = dataclasses.replace(
    TRILLION_7B, name="trillion-7b-32k", seq_length=32768, rotary_base=1_000_000
)

TRI_7B = dataclasses.replace(
    TRILLION_7B,
    name="tri-7b",
    ffn_hidden_size=11520,
    seq_length=32768,
    rotary_base=1_000_000,
    published_total_params=7.76e9,
)

TRI_21B = ModelPreset(
    name="tri-21b",
    num_layers=40,
    hidden_size=5120,
    ffn_hidden_size=27392,
    num_attention_heads=32,
    num_query_groups=8,
    kv_channels=160,
    vocab_size=124416,
    seq_length=8192,
    rotary_base=1_000_000,
    mtp_num_layers=1,
    published_total_params=20.73e9,
)

TRINITY_LARGE = ModelPreset(
    name="trinity-large",
    num_layers=60,
    hidden_size=3072,
    ffn_hidden_size=8192,
    num_attention_heads=48,
    num_query_groups=8,
    kv_channels=128,
    vocab_size=200192,
    seq_length=8192,
    rotary_base=10_000,
    qk_layernorm=True,
    attention_output_gate=True,
    sliding_window=4096,
    global_attn_every_n_layers=4,
    rope_on_global_layers=False,
    sandwich_norm=True,
    num_experts=256,
    moe_router_topk=4,
    moe_ffn_hidden_size=3072,
    moe_shared_expert_intermediate_size=3072,
    num_dense_layers=6,
    moe_router_score_function="sigmoid",
    moe_router_enable_expert_bias=True,
    moe_router_topk_scaling_factor=None,
    moe_router_bias_update_style="smebu",
    moe_router_bias_update_rate=5e-4,
    moe_router_bias_update_momentum=0.5,
    moe_router_bias_update_clamp_scale=2.0,
    sandwich_post_norm_init="inverse_depth",
    mup_enabled=True,
    published_total_params=398e9,
    published_active_params=13e9,
)

# --------------------------------------------------------------------------------------------
# Tiny variants: same code paths, trainable on 2 CPU cores.

_TINY_DENSE = dict(
    num_layers=4,
    hidden_size=128,
    ffn_hidden_size=352,
    num_attention_heads=4,
    vocab_size=4096,
    seq_length=128,
    published_total_params=None,
    published_active_params=None,
)

TINY_TRILLION_7B = dataclasses.replace(TRILLION_7B, name="tiny-trillion-7b", **_TINY_DENSE)
TINY_TRI_7B = dataclasses.replace(TRI_7B, name="tiny-tri-7b", **_TINY_DENSE)
TINY_TRI_21B = dataclasses.replace(TRI_21B, name="tiny-tri-21b", num_query_groups=2,
                                   kv_channels=None, **_TINY_DENSE)
TINY_TRINITY = dataclasses.replace(
    TRINITY_LARGE,
    name="tiny-trinity",
    num_layers=4,
    hidden_size=128,
    ffn_hidden_size=256,
    num_attention_heads=4,
    num_query_groups=2,
    kv_channels=32,
    vocab_size=4096,
    seq_length=128,
    sliding_window=8,
    global_attn_every_n_layers=2,
    num_experts=8,
    moe_router_topk=2,
    moe_ffn_hidden_size=64,
    moe_shared_expert_intermediate_size=64,
    num_dense_layers=1,
    mtp_num_layers=1,
    published_total_params=None,
    published_active_params=None,
)

PRESETS: Mapping[str, ModelPreset] = {
    p.name: p
    for p in (
        TRILLION_7B, TRILLION_7B_32K, TRI_7B, TRI_21B, TRINITY_LARGE,
        TINY_TRILLION_7B, TINY_TRI_7B, TINY_TRI_21B, TINY_TRINITY,
    )
}


def model_signature(preset: ModelPreset) -> dict:
    """The architecture a checkpoint records, so a load into a different model fails clearly."""
    fields = dataclasses.asdict(preset)
    fields["num_query_groups"] = preset.query_groups
    fields["kv_channels"] = preset.head_dim
    return fields


def preset_names() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str) -> ModelPreset:
    """The preset registered under ``name`` (as given to ``--preset``)."""
    try:
        return PRESETS[name]
    except KeyError:
        from megatron_trillion.errors import UserError

        raise UserError(
            f"unknown model preset {name!r} (--preset); known presets: "
            + ", ".join(preset_names())
        ) from None


def apply_overrides(preset: ModelPreset, overrides: Optional[Mapping[str, Any]]) -> ModelPreset:
    """``preset`` with some fields replaced (e.g. from command-line flags), validated."""
    if not overrides:
        return preset
    fields = {f.name for f in dataclasses.fields(ModelPreset)} - {"name"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"unknown model field(s) {unknown} for preset {preset.name!r}; overridable fields: "
            + ", ".join(sorted(fields))
        )
    updated = dataclasses.replace(preset, **dict(overrides))
    updated.validate()
    return updated


def resolve_preset(preset: "ModelPreset | str",
                   overrides: Optional[Mapping[str, Any]] = None) -> ModelPreset:
    """Accept a preset or its name; apply overrides; validate."""
    base = get_preset(preset) if isinstance(preset, str) else preset
    resolved = apply_overrides(base, overrides)
    resolved.validate()
    return resolved
