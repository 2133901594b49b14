"""Typed configuration: the model shape, the training run, presets and validation.

A run is fully described by a `ModelConfig` and a `TrainConfig`; both are frozen dataclasses
that serialize to JSON. Presets fill every field; CLI flags override single fields; `validate`
turns nonsense into a `CrystalError` before anything is allocated.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from crystal.errors import CrystalError

MAX_SPHERES = 64
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "tf32", "bf16")
CUDA_GRAPHS = ("auto", "on", "off")
OPTIMIZERS = ("adamw", "muon")
LR_SCHEDULES = ("cosine", "linear-cooldown")
ARCHS = ("gpt2", "llama")  # crystal.model's two block definitions
ROPE_SCALINGS = ("llama3",)  # besides none: Llama-3.1/3.2's frequency-dependent scaling
# The LM head's rows in memory are the vocabulary rounded up to a multiple of this (llm.c's
# 50257 -> 50304): a layout choice of every backend, invisible outside the flat buffer.
VOCAB_MULTIPLE = 64


@dataclass(frozen=True)
class ModelConfig:
    """The model's shape. GPT-2 field names follow nanoGPT; `to_hf` gives Hugging Face names.

    arch "gpt2": LayerNorm, learned positions, GELU MLP 4 n_embd wide, Conv1D weights, tied head.
    arch "llama": RMSNorm (eps: layer_norm_epsilon, HF's rms_norm_eps), rotary positions
    (rope_theta, optional llama3 scaling), SwiGLU MLP intermediate_size wide, grouped-query
    attention (n_kv_head), nn.Linear weights, no biases but optional q/k/v biases (Qwen2's
    attention_bias), tied or untied head. The llama-only fields keep their defaults for gpt2."""

    vocab_size: int = 256
    block_size: int = 64  # max sequence length (n_positions / max_position_embeddings)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    layer_norm_epsilon: float = 1e-5  # the norm's eps (LayerNorm, or llama's RMSNorm)
    arch: str = "gpt2"
    # --- llama only ---
    n_kv_head: int | None = None  # KV heads of grouped-query attention (1: MQA); None: n_head
    head_dim: int | None = None  # None: n_embd // n_head
    intermediate_size: int | None = None  # SwiGLU width; None: 8/3 n_embd rounded up to a multiple of 64
    rope_theta: float = 10000.0
    rope_scaling: str | None = None  # None, or "llama3" with the four rope_* values below
    rope_factor: float | None = None
    rope_low_freq_factor: float | None = None
    rope_high_freq_factor: float | None = None
    rope_original_max_position: int | None = None
    tie_word_embeddings: bool = True  # llama: the LM head is the token embedding (gpt2: always)
    attention_bias: bool = False  # llama: biases on q, k and v (Qwen2), none on o

    @property
    def llama(self) -> bool:
        return self.arch == "llama"

    @property
    def head_size(self) -> int:
        return self.head_dim if self.head_dim is not None else self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def mlp_size(self) -> int:
        """The MLP's hidden width: 4 n_embd (gpt2); intermediate_size (llama)."""
        if not self.llama:
            return 4 * self.n_embd
        if self.intermediate_size is not None:
            return self.intermediate_size
        return -(-(8 * self.n_embd) // (3 * 64)) * 64

    @property
    def qkv_size(self) -> int:
        """Width of the fused q|k|v activation: (n_head + 2 n_kv_head) head_size."""
        return (self.n_head + 2 * self.kv_heads) * self.head_size

    @property
    def tied(self) -> bool:
        """The LM head is the token embedding (always for gpt2)."""
        return self.tie_word_embeddings or not self.llama

    def settings(self) -> dict:
        """The fields that apply to this arch (a gpt2 config leaves the llama ones out): what a
        config file and the printed config show."""
        d = dataclasses.asdict(self)
        if not self.llama:
            for k in LLAMA_FIELDS:
                d.pop(k)
        return {k: v for k, v in d.items() if v is not None}

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the token embedding / LM head in the flat buffer: vocab_size rounded up to a
        multiple of VOCAB_MULTIPLE. Rows vocab_size.. are zero, get zero gradient and stay
        zero; the softmax, the loss and sampling see the first vocab_size logits only, and
        checkpoints and exports hold the vocab_size real rows (crystal.model.ParamLayout)."""
        return -(-self.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE

    def to_hf(self) -> dict:
        """The fields of a Hugging Face config (config.json of a checkpoint): a `GPT2Config`, a
        `LlamaConfig`, or a `Qwen2Config` for a llama with q/k/v biases (llama_to_hf)."""
        if self.llama:
            return llama_to_hf(self)
        return {
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "vocab_size": self.vocab_size,
            "n_positions": self.block_size,
            "n_ctx": self.block_size,
            "n_embd": self.n_embd,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_inner": None,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "activation_function": "gelu_new",
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "initializer_range": 0.02,
            "scale_attn_weights": True,
            "tie_word_embeddings": True,
            "bos_token_id": 0,
            "eos_token_id": 0,
            "torch_dtype": "float32",
        }

    @classmethod
    def from_hf(cls, d: dict) -> "ModelConfig":
        """The shape of a Hugging Face GPT2Config (a config.json), after checking that crystal's
        GPT-2 computes exactly that model; anything else is a CrystalError naming the field.

        Read as transformers reads it: every GPT2Config field of the type GPT2Config declares
        (transformers refuses the rest), and an alias of GPT2Config.attribute_map
        (`num_hidden_layers` for n_layer, ...) is the field; an alias that disagrees with its
        field is refused, so one directory is never two models. model_type llama or qwen2: a
        LlamaConfig / Qwen2Config (llama_from_hf)."""
        model_type = d.get("model_type", "gpt2")
        if model_type in HF_LLAMA_TYPES:
            return llama_from_hf(d)
        if model_type != "gpt2":
            raise CrystalError(f"config.json: model_type {model_type!r} cannot be represented: crystal reads gpt2 "
                               "(GPT2LMHeadModel), llama (LlamaForCausalLM) and qwen2 (Qwen2ForCausalLM)")
        d = _resolve_aliases(d)
        for key, kinds in GPT2_FIELD_TYPES.items():
            if key in d and not _json_is(d[key], kinds):
                raise CrystalError(f"config.json: {key} must be {' or '.join(kinds)} (as GPT2Config declares it), "
                                   f"got {d[key]!r}")
        missing = [key for key in ("vocab_size", "n_positions", "n_layer", "n_head", "n_embd") if key not in d]
        if missing:
            raise CrystalError(f"config.json: missing field {missing[0]}")
        cfg = cls(vocab_size=d["vocab_size"], block_size=d["n_positions"], n_layer=d["n_layer"], n_head=d["n_head"],
                  n_embd=d["n_embd"], layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-5))
        validate_model(cfg)
        _check_representable(d, cfg)
        return cfg


# transformers' GPT2Config.attribute_map: each alias reads and writes the field it names.
LLAMA_FIELDS = ("n_kv_head", "head_dim", "intermediate_size", "rope_theta", "rope_scaling", "rope_factor",
                "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_position",
                "tie_word_embeddings", "attention_bias")
LLAMA3_ROPE_FIELDS = ("rope_factor", "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_position")

GPT2_ALIASES = {"hidden_size": "n_embd", "max_position_embeddings": "n_positions",
                "num_attention_heads": "n_head", "num_hidden_layers": "n_layer"}
# The JSON types of GPT2Config's fields as transformers declares them (its strict dataclass
# refuses any other: 2.0 or "2" or true for an int, 1 for a float); "int list" is a list of ints.
GPT2_FIELD_TYPES = {
    "vocab_size": ("int",), "n_positions": ("int",), "n_embd": ("int",), "n_layer": ("int",), "n_head": ("int",),
    "n_inner": ("int", "null"), "activation_function": ("str",), "resid_pdrop": ("float", "int"),
    "embd_pdrop": ("float", "int"), "attn_pdrop": ("float", "int"), "layer_norm_epsilon": ("float",),
    "initializer_range": ("float",), "summary_type": ("str",), "summary_use_proj": ("bool",),
    "summary_activation": ("str", "null"), "summary_proj_to_labels": ("bool",),
    "summary_first_dropout": ("float", "int"), "scale_attn_weights": ("bool",), "use_cache": ("bool",),
    "bos_token_id": ("int", "null"), "eos_token_id": ("int", "int list", "null"), "pad_token_id": ("int", "null"),
    "scale_attn_by_inverse_layer_idx": ("bool",), "reorder_and_upcast_attn": ("bool",),
    "add_cross_attention": ("bool",), "tie_word_embeddings": ("bool",),
}
_JSON_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "null": type(None), "dict": dict}


def _json_is(v, kinds: tuple[str, ...]) -> bool:
    """Whether JSON value v is one of kinds (exact types: true is not an int, 2 is not a float;
    "int list" / "str list": a list of those)."""
    if type(v) is list:
        return any(f"{k} list" in kinds and all(type(x) is _JSON_TYPES[k] for x in v) for k in ("int", "str"))
    return any(type(v) is _JSON_TYPES[k] for k in kinds if k in _JSON_TYPES)


def _resolve_aliases(d: dict) -> dict:
    """config.json with each attribute_map alias replaced by its field (transformers sets the
    field from the alias); an alias and its field that disagree are refused."""
    d = dict(d)
    for alias, key in GPT2_ALIASES.items():
        if alias not in d:
            continue
        v = d.pop(alias)
        if key in d and (type(d[key]), d[key]) != (type(v), v):
            raise CrystalError(f"config.json: {alias} {v!r} and {key} {d[key]!r} disagree (transformers reads "
                               f"{alias} as {key}); give one of them")
        d[key] = v
    return d


# GPT2Config fields that change the computation, with the one value crystal computes (GPT2Config's
# defaults: a field that is absent has it).
_GPT2_FIXED = {
    "tie_word_embeddings": (True, "an untied LM head; crystal's head is tied to wte"),
    "scale_attn_weights": (True, "attention scores not scaled by 1/sqrt(head size)"),
    "scale_attn_by_inverse_layer_idx": (False, "attention scores scaled by 1/(layer + 1)"),
    "reorder_and_upcast_attn": (False, "the reordered, upcast attention of GPT2Config"),
    "add_cross_attention": (False, "cross-attention layers"),
}
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")  # GPT-2's GELU, tanh approximation: crystal's


def _check_representable(d: dict, cfg: ModelConfig) -> None:
    """Refuse a GPT2Config whose model crystal's GPT-2 is not (one line naming the field)."""
    act = d.get("activation_function", "gelu_new")
    if act not in GELU_TANH:
        raise CrystalError(f"config.json: activation_function {act!r} cannot be represented: crystal's "
                           f"MLP uses GPT-2's tanh GELU ({' or '.join(GELU_TANH)})")
    n_inner = d.get("n_inner")
    if n_inner is not None and n_inner != 4 * cfg.n_embd:
        raise CrystalError(f"config.json: n_inner {n_inner!r} cannot be represented: crystal's MLP is "
                           f"4 x n_embd = {4 * cfg.n_embd} wide")
    for key, (value, what) in _GPT2_FIXED.items():
        if d.get(key, value) != value:
            raise CrystalError(f"config.json: {key} {d[key]!r} cannot be represented ({what})")


# --- Hugging Face LlamaConfig / Qwen2Config -------------------------------------------------------
# What config.json a llama reads and writes (transformers 5's LlamaConfig and Qwen2Config, with the
# rope_theta / rope_scaling keys transformers 4 wrote, which 5 still reads).
HF_LLAMA_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# The JSON types of the fields LlamaConfig / Qwen2Config declare (their strict dataclasses refuse
# any other). head_dim is no Qwen2Config field, but Qwen2's attention reads it when present.
_HF_COMMON_TYPES = {
    "vocab_size": ("int",), "hidden_size": ("int",), "intermediate_size": ("int",), "num_hidden_layers": ("int",),
    "num_attention_heads": ("int",), "num_key_value_heads": ("int", "null"), "hidden_act": ("str",),
    "max_position_embeddings": ("int",), "initializer_range": ("float",), "rms_norm_eps": ("float",),
    "use_cache": ("bool",), "pad_token_id": ("int", "null"), "bos_token_id": ("int", "null"),
    "eos_token_id": ("int", "int list", "null"), "tie_word_embeddings": ("bool",),
    "rope_parameters": ("dict", "null"),
}
LLAMA_FIELD_TYPES = {**_HF_COMMON_TYPES, "pretraining_tp": ("int", "null"), "attention_bias": ("bool",),
                     "attention_dropout": ("int", "float", "null"), "mlp_bias": ("bool",), "head_dim": ("int", "null")}
QWEN2_FIELD_TYPES = {**_HF_COMMON_TYPES, "use_sliding_window": ("bool",), "sliding_window": ("int", "null"),
                     "max_window_layers": ("int",), "layer_types": ("str list", "null"),
                     "attention_dropout": ("float", "int")}
# Each class's defaults for what a config.json may leave out (the shape itself must be given).
HF_LLAMA_DEFAULTS = {
    "llama": {"num_key_value_heads": None, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
              "tie_word_embeddings": False, "hidden_act": "silu"},
    "qwen2": {"num_key_value_heads": 32, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
              "tie_word_embeddings": False, "hidden_act": "silu"},
}
SILU = ("silu", "swish")  # transformers' ACT2FN: both SiLU, the gate of crystal's SwiGLU
ROPE_DEFAULT_THETA = 10000.0  # RotaryEmbeddingConfigMixin.default_theta
# Keys of other architectures' configs, refused in a llama / qwen2 config.json: with them the model
# is not the one crystal (or LlamaForCausalLM) computes. key -> (the value that changes nothing, what)
_FOREIGN_KEYS = {
    "num_experts": (None, "a mixture of experts"), "num_local_experts": (None, "a mixture of experts"),
    "num_experts_per_tok": (None, "a mixture of experts"), "n_routed_experts": (None, "a mixture of experts"),
    "moe_intermediate_size": (None, "a mixture of experts"), "qk_norm": (False, "RMSNorm on q and k (QK-norm)"),
    "use_qk_norm": (False, "RMSNorm on q and k (QK-norm)"), "qk_layernorm": (False, "norms on q and k (QK-norm)"),
    "sliding_window": (None, "sliding-window attention"), "use_sliding_window": (False, "sliding-window attention"),
    "no_rope_layers": (None, "layers without rotary embeddings"),
}


def _hf_refuse(key: str, value, why: str) -> CrystalError:
    import json

    return CrystalError(f"config.json: {key} {json.dumps(value)} cannot be represented ({why})")


# validate_model's flags, as a llama's config.json names them
_HF_LLAMA_NAMES = {"--n-kv-head": "num_key_value_heads", "--n-head": "num_attention_heads", "--n-embd": "hidden_size",
                   "--n-layer": "num_hidden_layers", "--block-size": "max_position_embeddings",
                   "--vocab-size": "vocab_size", "--head-dim": "head_dim", "--intermediate-size": "intermediate_size",
                   "--rope-theta": "rope_theta", "--rope-factor": "rope_scaling factor",
                   "--rope-low-freq-factor": "rope_scaling low_freq_factor",
                   "--rope-high-freq-factor": "rope_scaling high_freq_factor",
                   "--rope-original-max-position": "original_max_position_embeddings",
                   "layer_norm_epsilon": "rms_norm_eps"}


def _rope_from_hf(d: dict) -> dict:
    """rope_theta and the llama3 scaling as transformers 5 reads them: rope_scaling (when not
    empty) replaces rope_parameters; its rope_theta, else the top-level one, else 10000; its
    rope_type, else its type, else default; llama3's original_max_position_embeddings from the top
    level when there (the rotary embedding's standardize_rope_params gives it priority), else its
    own, else max_position_embeddings. Returns ModelConfig fields."""
    key = "rope_scaling" if d.get("rope_scaling") else "rope_parameters"
    params = d.get(key) or {}
    if not isinstance(params, dict):
        raise CrystalError(f"config.json: {key} must be an object or null, got {params!r}")
    if any(isinstance(v, dict) for v in params.values()):
        raise _hf_refuse(key, params, "rotary parameters per layer type; crystal's layers share one")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", *ROPE_SCALINGS):
        raise _hf_refuse(key, params, f"rope_type {rope_type!r}; crystal computes default or "
                                      f"{', '.join(ROPE_SCALINGS)} rotary embeddings")
    partial = params.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise _hf_refuse("partial_rotary_factor", partial, "rotary embeddings on part of each head")
    theta = params.get("rope_theta", d.get("rope_theta", ROPE_DEFAULT_THETA))
    out: dict = {"rope_theta": theta}
    if rope_type == "llama3":
        missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor") if k not in params]
        if missing:
            raise CrystalError(f"config.json: {key} of rope_type llama3 needs {missing[0]}")
        out.update(rope_scaling="llama3", rope_factor=params["factor"], rope_low_freq_factor=params["low_freq_factor"],
                   rope_high_freq_factor=params["high_freq_factor"],
                   rope_original_max_position=d.get("original_max_position_embeddings", params.get(
                       "original_max_position_embeddings", d.get("max_position_embeddings"))))
    for k, v in out.items():  # numbers as transformers computes with them (an int is a float's value)
        if k in ("rope_scaling", "rope_original_max_position"):
            if k == "rope_original_max_position" and type(v) is not int:
                raise CrystalError(f"config.json: original_max_position_embeddings must be an integer, got {v!r}")
            continue
        if type(v) not in (int, float) or not math.isfinite(v):
            name = "rope_theta" if k == "rope_theta" else f"{key} {k.removeprefix('rope_')}"
            raise CrystalError(f"config.json: {name} must be a number, got {v!r}")
        out[k] = float(v)
    return out


def llama_from_hf(d: dict) -> ModelConfig:
    """The shape of a Hugging Face LlamaConfig or Qwen2Config (model_type llama / qwen2), after
    checking that crystal's llama computes exactly the model transformers builds from it;
    anything else is a CrystalError naming the key. Fields of the type the class declares, its
    defaults for what is absent (Qwen2's num_key_value_heads is 32, not num_attention_heads), and
    the shape (vocab_size, hidden_size, intermediate_size, num_hidden_layers,
    num_attention_heads) given. Qwen2 has biases on q, k and v (attention_bias); Llama's
    attention_bias puts one on o_proj too, which crystal has not."""
    model_type = d["model_type"]
    qwen2 = model_type == "qwen2"
    for key, kinds in (QWEN2_FIELD_TYPES if qwen2 else LLAMA_FIELD_TYPES).items():
        if key in d and not _json_is(d[key], kinds):
            cls = "Qwen2Config" if qwen2 else "LlamaConfig"
            raise CrystalError(f"config.json: {key} must be {' or '.join(kinds)} (as {cls} declares it), got {d[key]!r}")
    if qwen2 and "head_dim" in d and type(d["head_dim"]) is not int:
        raise CrystalError(f"config.json: head_dim must be int, got {d['head_dim']!r}")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in d]
    if missing:
        raise CrystalError(f"config.json: missing field {missing[0]}")
    v = {**HF_LLAMA_DEFAULTS[model_type], **d}
    if v["hidden_act"] not in SILU:
        raise _hf_refuse("hidden_act", v["hidden_act"], "crystal's SwiGLU gate is silu")
    if not qwen2 and v.get("attention_bias", False):
        raise _hf_refuse("attention_bias", True, "LlamaConfig's attention_bias puts a bias on o_proj too; crystal's "
                                                 "llama has q/k/v biases only, as Qwen2")
    if v.get("mlp_bias", False):
        raise _hf_refuse("mlp_bias", True, "biases in the MLP; crystal's SwiGLU has none")
    if (v.get("pretraining_tp") or 1) != 1:
        raise _hf_refuse("pretraining_tp", v["pretraining_tp"], "products split into slices; crystal computes each "
                                                                "in one")
    for key, (harmless, what) in _FOREIGN_KEYS.items():
        if key in d and d[key] != harmless and not (key == "sliding_window" and qwen2):
            raise _hf_refuse(key, d[key], what)
    if qwen2 and any(t != "full_attention" for t in (v.get("layer_types") or [])):
        raise _hf_refuse("layer_types", v["layer_types"], "layers other than full_attention")
    n_embd, n_head = v["hidden_size"], v["num_attention_heads"]
    cfg = ModelConfig(
        arch="llama", vocab_size=v["vocab_size"], block_size=v["max_position_embeddings"],
        n_layer=v["num_hidden_layers"], n_head=n_head, n_embd=n_embd, layer_norm_epsilon=v["rms_norm_eps"],
        n_kv_head=v["num_key_value_heads"], head_dim=v.get("head_dim"), intermediate_size=v["intermediate_size"],
        tie_word_embeddings=v["tie_word_embeddings"], attention_bias=qwen2, **_rope_from_hf(v))
    try:
        validate_model(cfg)
    except CrystalError as e:
        message = str(e)
        for flag, key in sorted(_HF_LLAMA_NAMES.items(), key=lambda kv: -len(kv[0])):
            message = message.replace(flag, key)
        raise CrystalError(f"config.json: {message}") from None
    return cfg


def check_hf_exportable(cfg: ModelConfig) -> None:
    """CrystalError unless transformers builds the model of cfg.to_hf(): its LlamaConfig refuses
    a hidden_size that num_attention_heads does not divide, even with an explicit head_dim (which
    crystal trains, and its Qwen2Config accepts), so such a llama without q/k/v biases has no
    Hugging Face form."""
    if cfg.llama and not cfg.attention_bias and cfg.n_embd % cfg.n_head:
        raise CrystalError(f"export --format hf: transformers' LlamaConfig needs hidden_size ({cfg.n_embd}) divisible "
                           f"by num_attention_heads ({cfg.n_head}), even with head_dim {cfg.head_size}; this model "
                           "has no LlamaForCausalLM form")


def llama_to_hf(cfg: ModelConfig) -> dict:
    """config.json of a llama: a LlamaConfig, or a Qwen2Config when it has q/k/v biases (which a
    LlamaConfig cannot say). The rotary settings are written both as transformers 5 writes them
    (rope_parameters) and as transformers 4 reads them (rope_theta, rope_scaling)."""
    rope = {"rope_type": cfg.rope_scaling or "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling == "llama3":
        rope.update(factor=cfg.rope_factor, low_freq_factor=cfg.rope_low_freq_factor,
                    high_freq_factor=cfg.rope_high_freq_factor,
                    original_max_position_embeddings=cfg.rope_original_max_position)
    model_type = "qwen2" if cfg.attention_bias else "llama"
    d = {
        "model_type": model_type,
        "architectures": [HF_LLAMA_TYPES[model_type]],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.mlp_size,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": cfg.layer_norm_epsilon,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": dict(rope) if cfg.rope_scaling else None,
        "rope_parameters": rope,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "torch_dtype": "float32",
    }
    if model_type == "llama":
        d.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    else:
        d.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layer)
    return d


@dataclass(frozen=True)
class TrainConfig:
    """One training run. A step consumes micro_batches x batch_size sequences of seq_len."""

    preset: str = "small"
    device: str = "auto"
    precision: str = "fp32"  # cuda: fp32, tf32 (matmul inputs) or bf16 (mixed); cpu is always fp32
    cuda_graphs: str = "off"  # cuda: replay each step as CUDA graphs (crystal.graphs): on, off, auto (on where capture works)
    spheres: int = 12
    cores: int | None = None  # cpu: at most min(spheres, cores) spheres compute at once (the core gate); None: the usable cores; 0: no gate
    data: str | None = None  # text file, prepared directory, token shards (a file or a glob), or None: the embedded corpus
    val_data: str | None = None  # token shards (a file or a glob) to validate on; None: the data's own val split
    val_fraction: float = 0.1  # held-out tail of a text file / the embedded corpus
    batch_size: int = 1
    seq_len: int = 64
    micro_batches: int = 12
    steps: int = 2000
    epochs: float | None = None  # when set, steps = epochs * windows / (batch_size * micro_batches)
    lr: float = 1e-3
    min_lr: float | None = None  # None: lr / 10
    warmup: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    dropout: float = 0.0  # dropout probability at nanoGPT's four sites (crystal.dropout); training only
    seed: int = 1337
    log_every: int = 10
    eval_every: int = 0  # 0: no evaluation; else every N steps and at the last step
    eval_batches: int = 20
    # a multiple-choice task file (crystal.tasks: HellaSwag's JSON lines) scored during training: acc and
    # acc_norm every eval_task_every steps (None: at each eval_every evaluation) and at the last step
    eval_task: str | None = None
    eval_task_every: int | None = None
    checkpoint_every: int = 0  # 0: no resumable checkpoints; else every N steps and the last
    keep: int = 3  # resumable checkpoints kept (newest)
    stop_at: int | None = None  # stop after this step with a checkpoint, as if interrupted
    on_nonfinite: str = "stop"  # a step with a non-finite loss or gradient: stop (exit 3) or skip it
    optimizer: str = "adamw"  # adamw, or muon: Muon on the blocks' matrices, AdamW on the rest (crystal.muon)
    lr_schedule: str = "cosine"  # after the warmup: cosine to final_lr, or linear-cooldown (constant, then linear)
    cooldown_frac: float | None = None  # linear-cooldown: the last fraction of the steps that decays (None: 0.4)
    # Muon's settings (--optimizer muon only; None: modded-nanogpt's reference values, MUON_DEFAULTS)
    muon_lr: float | None = None  # the Muon matrices' peak lr, on the same schedule as lr (AdamW's)
    muon_momentum: float | None = None  # 0.95
    muon_momentum_start: float | None = None  # 0.85: momentum warms up linearly from this
    muon_momentum_warmup: int | None = None  # 300 steps of momentum warmup (0: none)
    muon_nesterov: bool | None = None  # True: Nesterov momentum
    muon_ns_steps: int | None = None  # 5 Newton-Schulz iterations
    muon_weight_decay: float | None = None  # 0.0: decoupled decay p *= 1 - lr wd on Muon's matrices
    # ranks: each rank keeps the AdamW state of its share of the buffer only (ZeRO-1); None: on with 2+ ranks
    shard_optimizer: bool | None = None
    out: str | None = None
    init_from: str | None = None  # start from this checkpoint's parameters (crystal.pretrained), not a seeded init
    # LoRA (crystal.lora): adapters of rank lora_r on the frozen model of init_from (0: full training);
    # None: litgpt's finetune_lora values (LORA_DEFAULTS), the arch's default targets
    lora_r: int = 0
    lora_alpha: float | None = None  # the adapters' scale is alpha / r (16)
    lora_dropout: float | None = None  # dropout on the adapters' input (0.05)
    lora_targets: str | None = None  # comma-separated projections (LORA_TARGETS), or all

    @property
    def final_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batches * self.batch_size * self.seq_len

    def lora(self, key: str):
        """A LoRA setting (alpha, dropout): the config's, else LORA_DEFAULTS' (litgpt's)."""
        v = getattr(self, "lora_" + key)
        return LORA_DEFAULTS[key] if v is None else v

    def muon(self, key: str):
        """A Muon setting (key without the muon_ prefix): the config's, else MUON_DEFAULTS'."""
        v = getattr(self, "muon_" + key)
        return MUON_DEFAULTS[key] if v is None else v

    @property
    def cooldown(self) -> float:
        return 0.4 if self.cooldown_frac is None else self.cooldown_frac


# litgpt's finetune_lora defaults for the adapters (crystal.lora; r = 8 is the finetune-lora preset's)
LORA_DEFAULTS = {"alpha": 16.0, "dropout": 0.05}

# modded-nanogpt's reference Muon (train_gpt.py of its 2025 records, KellerJordan/Muon): lr 0.05
# there at batch 0.5M tokens; 0.02 is Muon's own default and crystal's for every preset but small,
# whose tuned 0.04 is its derived muon_lr (see bench/RESULTS.md)
MUON_DEFAULTS = {"lr": 0.02, "momentum": 0.95, "momentum_start": 0.85, "momentum_warmup": 300,
                 "nesterov": True, "ns_steps": 5, "weight_decay": 0.0}


@dataclass(frozen=True)
class Preset:
    model: ModelConfig
    train: dict = field(default_factory=dict)  # TrainConfig field overrides
    about: str = ""
    # TrainConfig fields the preset derives from others, as functions of the resolved settings:
    # each follows the fields it derives from (a preset's or a flag's) unless it is given itself.
    # Rules apply in order: a rule sees the values of the rules before it.
    derived: dict = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        ModelConfig(block_size=32, n_layer=2, n_head=2, n_embd=32),
        dict(batch_size=2, seq_len=32, micro_batches=12, steps=50, lr=3e-3, warmup=5),
        "2 layers, 2 heads, 32 wide, T=32: seconds, for tests",
    ),
    # The default run trains with Muon (lr 0.04 on the blocks' matrices, AdamW lr 1e-3 on the rest)
    # for 1000 steps: on 3 seeds it ends at a lower val loss than 2000 AdamW steps, at lr 1e-3 or a
    # tuned 2e-3 (bench/RESULTS.md, bench/muon_runs). 0.04 is this preset's tuned Muon lr, not
    # MUON_DEFAULTS' 0.02. --optimizer adamw is the earlier run exactly (2000 steps, muon_lr unset);
    # --lora-r R without --optimizer takes AdamW, which LoRA needs.
    "small": Preset(
        ModelConfig(block_size=64, n_layer=4, n_head=4, n_embd=128),
        dict(batch_size=1, seq_len=64, micro_batches=12, lr=1e-3, warmup=100, eval_every=250),
        "4 layers, 4 heads, 128 wide, T=64 (nanoGPT's CPU example), Muon for 1000 steps: the default",
        derived=dict(optimizer=lambda t: "adamw" if t.get("lora_r") else "muon",
                     steps=lambda t: 1000 if t["optimizer"] == "muon" else 2000,
                     muon_lr=lambda t: 0.04 if t["optimizer"] == "muon" else None),
    ),
    "shakespeare-char": Preset(
        ModelConfig(block_size=256, n_layer=6, n_head=6, n_embd=384),
        dict(batch_size=4, seq_len=256, micro_batches=16, steps=5000, lr=1e-3, warmup=100,
             eval_every=250, dropout=0.2, beta2=0.99),
        "6 layers, 6 heads, 384 wide, T=256, 64 sequences a step (nanoGPT's shakespeare_char)",
    ),
    # GPT-2 124M (the vocabulary is the data's). 0.5M tokens a step as GPT-2 and nanoGPT; on one
    # 80-140 GB GPU: 4 spheres (streams) x micro-batches of 16 x 1024, 32 micro-batches a step.
    "gpt2": Preset(
        ModelConfig(block_size=1024, n_layer=12, n_head=12, n_embd=768),
        dict(batch_size=16, seq_len=1024, micro_batches=32, spheres=4, steps=5000, lr=6e-4, warmup=700,
             eval_every=250, eval_batches=10, beta2=0.95),
        "GPT-2 124M shapes (12 layers, 12 heads, 768 wide, T=1024), 0.5M tokens a step: for a GPU",
    ),
    # The larger released GPT-2 shapes, with GPT-3's learning rates for those sizes and 0.5M tokens a
    # step in more, smaller micro-batches as the model grows, so that one 140 GB GPU holds each in
    # bf16: at vocabulary 50257 the memory estimate (--dry-run) is 50, 72 and 101 GiB with cuDNN
    # flash attention, 75, 95 and 120 GiB without.
    "gpt2-medium": Preset(
        ModelConfig(block_size=1024, n_layer=24, n_head=16, n_embd=1024),
        dict(batch_size=8, seq_len=1024, micro_batches=64, spheres=4, steps=5000, lr=3e-4, warmup=700,
             eval_every=250, eval_batches=10),
        "GPT-2 medium 350M shapes (24 layers, 16 heads, 1024 wide, T=1024), 0.5M tokens a step: a GPU, bf16",
    ),
    "gpt2-large": Preset(
        ModelConfig(block_size=1024, n_layer=36, n_head=20, n_embd=1280),
        dict(batch_size=4, seq_len=1024, micro_batches=128, spheres=4, steps=5000, lr=2.5e-4, warmup=700,
             eval_every=250, eval_batches=10),
        "GPT-2 large 774M shapes (36 layers, 20 heads, 1280 wide, T=1024), 0.5M tokens a step: a GPU, bf16",
    ),
    "gpt2-xl": Preset(
        ModelConfig(block_size=1024, n_layer=48, n_head=25, n_embd=1600),
        dict(batch_size=4, seq_len=1024, micro_batches=128, spheres=2, steps=5000, lr=2e-4, warmup=700,
             eval_every=250, eval_batches=10),
        "GPT-2 XL 1.5B shapes (48 layers, 25 heads, 1600 wide, T=1024), 0.5M tokens a step: a GPU, bf16",
    ),
    # Llama: the same size as `small` (4 layers, 128 wide, T=64; 2 KV heads of 4, SwiGLU 384 wide,
    # so its matrices hold as many parameters as small's), trained the same way.
    "llama-small": Preset(
        ModelConfig(arch="llama", block_size=64, n_layer=4, n_head=4, n_embd=128, n_kv_head=2,
                    intermediate_size=384),
        dict(batch_size=1, seq_len=64, micro_batches=12, steps=2000, lr=1e-3, warmup=100, eval_every=250),
        "Llama: 4 layers, 4 heads (2 KV), 128 wide, SwiGLU 384, T=64: small's size, from scratch on the cpu",
    ),
    # Released Llama-family shapes, as their config.json give them (the vocabulary below is the
    # released one, used by --dry-run's figures; a run's is its data's or its --init-from model's).
    # Pretraining from scratch on a GPU: 0.5M tokens a step of 2048-token sequences, AdamW betas
    # (0.9, 0.95), weight decay 0.1, the warmup-stable-decay schedule of SmolLM2 (linear-cooldown,
    # the last 20%). Spheres and micro-batches are chosen so that each fits one 80 GB GPU in bf16
    # at its released vocabulary, even without cuDNN flash attention (--dry-run: 63, 65, 69, 72 and
    # 66 GiB in the order below; 28, 34, 57, 64 and 44 GiB with flash attention).
    "smollm2-135m": Preset(
        ModelConfig(arch="llama", vocab_size=49152, block_size=8192, n_layer=30, n_head=9, n_embd=576, n_kv_head=3,
                    intermediate_size=1536, layer_norm_epsilon=1e-5, rope_theta=100000.0),
        dict(batch_size=4, seq_len=2048, micro_batches=64, spheres=4, steps=5000, lr=3e-3, warmup=500,
             lr_schedule="linear-cooldown", cooldown_frac=0.2, eval_every=250, eval_batches=10),
        "SmolLM2-135M shapes (30 layers, 9 heads, 3 KV, 576 wide, SwiGLU 1536, tied): a GPU, bf16",
    ),
    "smollm2-360m": Preset(
        ModelConfig(arch="llama", vocab_size=49152, block_size=8192, n_layer=32, n_head=15, n_embd=960, n_kv_head=5,
                    intermediate_size=2560, layer_norm_epsilon=1e-5, rope_theta=100000.0),
        dict(batch_size=4, seq_len=2048, micro_batches=64, spheres=2, steps=5000, lr=3e-3, warmup=500,
             lr_schedule="linear-cooldown", cooldown_frac=0.2, eval_every=250, eval_batches=10),
        "SmolLM2-360M shapes (32 layers, 15 heads, 5 KV, 960 wide, SwiGLU 2560, tied): a GPU, bf16",
    ),
    "tinyllama-1.1b": Preset(
        ModelConfig(arch="llama", vocab_size=32000, block_size=2048, n_layer=22, n_head=32, n_embd=2048,
                    n_kv_head=4, intermediate_size=5632, layer_norm_epsilon=1e-5, tie_word_embeddings=False),
        dict(batch_size=2, seq_len=2048, micro_batches=128, spheres=1, steps=5000, lr=4e-4, warmup=500,
             lr_schedule="linear-cooldown", cooldown_frac=0.2, eval_every=250, eval_batches=10),
        "TinyLlama-1.1B shapes (22 layers, 32 heads, 4 KV, 2048 wide, SwiGLU 5632, untied): a GPU, bf16",
    ),
    "llama3.2-1b": Preset(
        ModelConfig(arch="llama", vocab_size=128256, block_size=131072, n_layer=16, n_head=32, n_embd=2048,
                    n_kv_head=8, head_dim=64, intermediate_size=8192, layer_norm_epsilon=1e-5, rope_theta=500000.0,
                    rope_scaling="llama3", rope_factor=32.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                    rope_original_max_position=8192),
        dict(batch_size=2, seq_len=2048, micro_batches=128, spheres=1, steps=5000, lr=3e-4, warmup=500,
             lr_schedule="linear-cooldown", cooldown_frac=0.2, eval_every=250, eval_batches=10),
        "Llama-3.2-1B shapes (16 layers, 32 heads, 8 KV, 2048 wide, SwiGLU 8192, llama3 rope, tied): a GPU, bf16",
    ),
    "qwen2.5-0.5b": Preset(
        ModelConfig(arch="llama", vocab_size=151936, block_size=32768, n_layer=24, n_head=14, n_embd=896,
                    n_kv_head=2, intermediate_size=4864, layer_norm_epsilon=1e-6, rope_theta=1000000.0,
                    attention_bias=True),
        dict(batch_size=4, seq_len=2048, micro_batches=64, spheres=2, steps=5000, lr=1e-3, warmup=500,
             lr_schedule="linear-cooldown", cooldown_frac=0.2, eval_every=250, eval_batches=10),
        "Qwen2.5-0.5B shapes (24 layers, 14 heads, 2 KV, 896 wide, SwiGLU 4864, q/k/v biases, tied): a GPU, bf16",
    ),
    # Fine-tuning a trained model (--init-from DIR gives the model's shape and tokenizer; the shape
    # below only stands in for it). As nanoGPT's finetune_shakespeare: 32 micro-batches of one
    # sequence a step, a small constant lr (min_lr = lr: no decay), here after a 20-step warmup,
    # dropout 0.1; weight decay on 2-D tensors only, as always. gpt2-xl: 89 GiB in bf16 with flash
    # attention, 116 GiB in fp32. 100 steps are 3.3M tokens, about 10 epochs of Tiny Shakespeare
    # in GPT-2 tokens: set --steps or --epochs for your data and watch the val loss (every 20 steps).
    "finetune": Preset(
        ModelConfig(block_size=1024, n_layer=12, n_head=12, n_embd=768),
        dict(batch_size=1, seq_len=1024, micro_batches=32, spheres=4, steps=100, lr=3e-5,
             warmup=20, dropout=0.1, eval_every=20, eval_batches=20),
        "fine-tune the model of --init-from DIR: lr 3e-5 constant after 20 warmup steps, dropout 0.1, "
        "32 x 1024 tokens a step, 100 steps",
        derived=dict(min_lr=lambda t: t["lr"]),  # a constant schedule at any --lr
    ),
    # LoRA fine-tuning as litgpt's finetune_lora: adapters of rank 8 (alpha 16, dropout 0.05) on the
    # query and value projections (GPT-2: the fused c_attn, as PEFT), micro-batches of 1 and 16 a
    # step, torch's AdamW defaults (lr 1e-3, betas 0.9/0.999, weight decay 0.01), 100 warmup steps
    # then cosine to 0, no clipping, 5 epochs (unless --steps), validation every 100 steps.
    "finetune-lora": Preset(
        ModelConfig(block_size=1024, n_layer=12, n_head=12, n_embd=768),
        dict(batch_size=1, seq_len=1024, micro_batches=16, spheres=4, lr=1e-3, beta2=0.999, weight_decay=0.01,
             warmup=100, min_lr=0.0, grad_clip=0.0, eval_every=100, eval_batches=100, lora_r=8),
        "LoRA on the model of --init-from DIR (litgpt's finetune_lora): r 8, alpha 16, dropout 0.05, "
        "lr 1e-3, 16 x 1 sequences a step, 5 epochs",
        derived=dict(epochs=lambda t: 5.0 if "steps" not in t else None),  # 5 epochs unless --steps
    ),
}


_KINDS = {"int": "an integer", "float": "a finite number", "str": "a string", "bool": "true or false"}


def _of_kind(v, kind: str) -> bool:
    if isinstance(v, bool):
        return kind == "bool"
    if kind == "int":
        return isinstance(v, int)
    if kind == "float":
        return isinstance(v, (int, float)) and math.isfinite(v)
    return isinstance(v, str) if kind == "str" else False


def check_types(cls, values: dict, where: str = "") -> None:
    """Every value of a ModelConfig / TrainConfig field has the field's type (None where the field
    is optional; an integer where a float goes; floats finite), before any value is compared or
    computed with: a TOML date, a list or a string where a number goes is a CrystalError, not a
    TypeError deep in validation. Unknown names are left to the caller."""
    fields = {f.name: f.type for f in dataclasses.fields(cls)}
    for k, v in values.items():
        if k not in fields:
            continue
        kind = fields[k].replace("| None", "").strip()
        if v is None and "None" in fields[k]:
            continue
        if not _of_kind(v, kind):
            raise CrystalError(f"{where}--{k.replace('_', '-')} must be {_KINDS[kind]}, got {v!r}")


def resolve(preset: str = "small", model_overrides: dict | None = None,
            train_overrides: dict | None = None, derive: bool = True) -> tuple[ModelConfig, TrainConfig]:
    """Preset values, then overrides (None values ignored), then the preset's derived fields, then
    types, then validation. derive=False: train_overrides is a run's resolved config (train.json),
    whose unset fields stay unset (a resumed run is the run it was)."""
    if not isinstance(preset, str) or preset not in PRESETS:
        raise CrystalError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    mo = {k: v for k, v in (model_overrides or {}).items() if v is not None}
    to = {k: v for k, v in (train_overrides or {}).items() if v is not None}
    for k in mo:
        if k not in {f.name for f in dataclasses.fields(ModelConfig)}:
            raise CrystalError(f"unknown model setting {k!r}")
    for k in to:
        if k not in {f.name for f in dataclasses.fields(TrainConfig)}:
            raise CrystalError(f"unknown training setting {k!r}")
    check_types(ModelConfig, mo)
    check_types(TrainConfig, to)
    model = dataclasses.replace(p.model, **mo)
    tdict = {**p.train, **to, "preset": preset}
    if derive:
        for k, rule in p.derived.items():
            if k not in to:
                tdict[k] = rule(tdict)
    # A smaller --block-size without --seq-len shrinks the preset's sequence length to fit.
    if "seq_len" not in to and "block_size" in mo:
        tdict["seq_len"] = min(tdict.get("seq_len", TrainConfig.seq_len), model.block_size)
    train = TrainConfig(**tdict)
    validate_model(model)
    validate_train(train, model)
    return model, train


def _positive_int(name: str, v) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise CrystalError(f"{name} must be a positive integer, got {v!r}")


MODEL_LIMITS = {"vocab_size": 1 << 24, "block_size": 1 << 20, "n_layer": 1024, "n_head": 1024,
                "n_embd": 1 << 16}  # far beyond any model crystal trains; guards against nonsense
# a step of a million micro-batches would run for hours before its first line: nonsense, not a run
TRAIN_LIMITS = {"batch_size": 1 << 16, "micro_batches": 1 << 16, "steps": 1 << 40, "eval_batches": 1 << 20}


def validate_model(m: ModelConfig) -> None:
    for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
        _positive_int(f"--{name.replace('_', '-')}", getattr(m, name))
        if getattr(m, name) > MODEL_LIMITS[name]:
            raise CrystalError(f"--{name.replace('_', '-')} {getattr(m, name)} is above the limit "
                               f"{MODEL_LIMITS[name]}")
    if not (0 < m.layer_norm_epsilon < 1):
        raise CrystalError(f"layer_norm_epsilon must be in (0, 1), got {m.layer_norm_epsilon}")
    if m.arch not in ARCHS:
        raise CrystalError(f"--arch must be one of {', '.join(ARCHS)}, got {m.arch!r}")
    if not m.llama:
        defaults = ModelConfig()
        for k in LLAMA_FIELDS:
            if getattr(m, k) != getattr(defaults, k):
                raise CrystalError(f"--{k.replace('_', '-')} is a llama setting (--arch llama); gpt2 has none")
        if m.n_embd % m.n_head:
            raise CrystalError(f"--n-embd ({m.n_embd}) must be divisible by --n-head ({m.n_head})")
        return
    _validate_llama(m)


def _validate_llama(m: ModelConfig) -> None:
    for name in ("n_kv_head", "head_dim", "intermediate_size"):
        v = getattr(m, name)
        if v is not None:
            _positive_int(f"--{name.replace('_', '-')}", v)
            if v > MODEL_LIMITS["n_embd"] * 16:
                raise CrystalError(f"--{name.replace('_', '-')} {v} is above the limit {MODEL_LIMITS['n_embd'] * 16}")
    if m.head_dim is None and m.n_embd % m.n_head:
        raise CrystalError(f"--n-embd ({m.n_embd}) must be divisible by --n-head ({m.n_head}) "
                           "unless --head-dim is given")
    if m.head_size % 2:
        raise CrystalError(f"the head size ({m.head_size}) must be even for rotary embeddings")
    if m.n_head % m.kv_heads:
        raise CrystalError(f"--n-head ({m.n_head}) must be a multiple of --n-kv-head ({m.kv_heads})")
    for k in ("tie_word_embeddings", "attention_bias"):
        if not isinstance(getattr(m, k), bool):
            raise CrystalError(f"--{k.replace('_', '-')} must be true or false, got {getattr(m, k)!r}")
    if not (isinstance(m.rope_theta, (int, float)) and math.isfinite(m.rope_theta) and m.rope_theta > 0):
        raise CrystalError(f"--rope-theta must be a positive number, got {m.rope_theta!r}")
    if m.rope_scaling is None:
        given = [k for k in LLAMA3_ROPE_FIELDS if getattr(m, k) is not None]
        if given:
            raise CrystalError(f"--{given[0].replace('_', '-')} needs --rope-scaling llama3")
        return
    if m.rope_scaling not in ROPE_SCALINGS:
        raise CrystalError(f"rope_scaling {m.rope_scaling!r} cannot be represented: crystal computes no scaling "
                           f"or {', '.join(ROPE_SCALINGS)}")
    missing = [k for k in LLAMA3_ROPE_FIELDS if getattr(m, k) is None]
    if missing:
        raise CrystalError(f"--rope-scaling llama3 needs --{missing[0].replace('_', '-')}")
    for k in ("rope_factor", "rope_low_freq_factor", "rope_high_freq_factor"):
        v = getattr(m, k)
        if not (math.isfinite(v) and v > 0):
            raise CrystalError(f"--{k.replace('_', '-')} must be a positive number, got {v!r}")
    if m.rope_high_freq_factor <= m.rope_low_freq_factor:
        raise CrystalError("--rope-high-freq-factor must be above --rope-low-freq-factor (llama3 scaling)")
    _positive_int("--rope-original-max-position", m.rope_original_max_position)


def validate_train(t: TrainConfig, m: ModelConfig) -> None:
    if t.device not in DEVICES:
        raise CrystalError(f"--device must be one of {', '.join(DEVICES)}, got {t.device!r}")
    if t.precision not in PRECISIONS:
        raise CrystalError(f"--precision must be one of {', '.join(PRECISIONS)}, got {t.precision!r}")
    if t.precision == "bf16" and t.device == "cpu":
        raise CrystalError("--precision bf16 needs --device cuda (the cpu backend computes in fp32)")
    if t.cuda_graphs not in CUDA_GRAPHS:
        raise CrystalError(f"--cuda-graphs must be one of {', '.join(CUDA_GRAPHS)}, got {t.cuda_graphs!r}")
    if t.cuda_graphs == "on" and t.device == "cpu":
        raise CrystalError("--cuda-graphs on needs --device cuda (the cpu backend has no graphs)")
    if not isinstance(t.seed, int) or t.seed < 0:
        raise CrystalError(f"--seed must be a non-negative integer, got {t.seed!r}")
    if not isinstance(t.spheres, int) or not (1 <= t.spheres <= MAX_SPHERES):
        raise CrystalError(f"--spheres must be between 1 and {MAX_SPHERES}, got {t.spheres}")
    for name in ("batch_size", "seq_len", "micro_batches", "steps", "log_every", "eval_batches"):
        _positive_int(f"--{name.replace('_', '-')}", getattr(t, name))
        if getattr(t, name) > TRAIN_LIMITS.get(name, getattr(t, name)):
            raise CrystalError(f"--{name.replace('_', '-')} {getattr(t, name)} is above the limit {TRAIN_LIMITS[name]}")
    for name in ("eval_every", "checkpoint_every", "keep"):
        v = getattr(t, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise CrystalError(f"--{name.replace('_', '-')} must be a non-negative integer, got {v!r}")
    if t.eval_task_every is not None:
        if t.eval_task is None:
            raise CrystalError("--eval-task-every needs --eval-task FILE")
        _positive_int("--eval-task-every", t.eval_task_every)
    if t.stop_at is not None and not (isinstance(t.stop_at, int) and 1 <= t.stop_at):
        raise CrystalError(f"--stop-at must be a positive step, got {t.stop_at!r}")
    if t.cores is not None and (not isinstance(t.cores, int) or isinstance(t.cores, bool)
                                or not 0 <= t.cores <= 4096):
        raise CrystalError(f"--cores must be between 0 (no gate) and 4096, got {t.cores!r}")
    if t.shard_optimizer is not None and not isinstance(t.shard_optimizer, bool):
        raise CrystalError(f"shard_optimizer must be true or false, got {t.shard_optimizer!r}")
    if t.on_nonfinite not in ("stop", "skip"):
        raise CrystalError(f"--on-nonfinite must be stop or skip, got {t.on_nonfinite!r}")
    if not (0 <= t.val_fraction < 1):
        raise CrystalError(f"--val-fraction must be in [0, 1), got {t.val_fraction}")
    if t.warmup < 0:
        raise CrystalError(f"--warmup must be >= 0, got {t.warmup}")
    if t.seq_len > m.block_size:
        raise CrystalError(f"--seq-len ({t.seq_len}) must not exceed --block-size ({m.block_size})")
    if t.epochs is not None and not (t.epochs > 0):
        raise CrystalError(f"--epochs must be positive, got {t.epochs}")
    if not (t.lr > 0) or t.lr == float("inf"):
        raise CrystalError(f"--lr must be a positive number, got {t.lr}")
    if t.min_lr is not None and not (0 <= t.min_lr <= t.lr):
        raise CrystalError(f"--min-lr must be in [0, lr], got {t.min_lr}")
    if not (0 <= t.weight_decay < 1):
        raise CrystalError(f"--weight-decay must be in [0, 1), got {t.weight_decay}")
    if not (0 <= t.beta1 < 1 and 0 <= t.beta2 < 1):
        raise CrystalError("AdamW betas must be in [0, 1)")
    if not (t.eps > 0):
        raise CrystalError(f"AdamW eps must be positive, got {t.eps}")
    if not (t.grad_clip >= 0) or t.grad_clip == float("inf"):
        raise CrystalError(f"--grad-clip must be >= 0 (0 disables), got {t.grad_clip}")
    if not (0 <= t.dropout < 1):
        raise CrystalError(f"--dropout must be in [0, 1), got {t.dropout}")
    if t.init_from is not None and not isinstance(t.init_from, str):
        raise CrystalError(f"--init-from must be a directory, got {t.init_from!r}")
    _validate_optimizer(t)
    _validate_lora(t, m)
    if t.preset in ("finetune", "finetune-lora") and t.init_from is None:
        raise CrystalError(f"the {t.preset} preset fine-tunes a trained model: give it with --init-from DIR "
                           "(a Hugging Face GPT-2, Llama or Qwen2 directory or a crystal run)")


def _validate_lora(t: TrainConfig, m: ModelConfig) -> None:
    if not isinstance(t.lora_r, int) or isinstance(t.lora_r, bool) or t.lora_r < 0:
        raise CrystalError(f"--lora-r must be a whole number >= 0 (0: no LoRA), got {t.lora_r!r}")
    given = [k for k in ("alpha", "dropout", "targets") if getattr(t, "lora_" + k) is not None]
    if not t.lora_r:
        if given:
            raise CrystalError(f"--lora-{given[0]} needs --lora-r R (R > 0: LoRA adapters of rank R)")
        return
    if t.init_from is None:
        raise CrystalError("LoRA adapts a trained model, which stays frozen: give it with --init-from DIR "
                           "(a Hugging Face directory or a crystal run)")
    alpha, p = t.lora("alpha"), t.lora("dropout")
    if not (alpha > 0) or alpha == float("inf"):
        raise CrystalError(f"--lora-alpha must be a positive number, got {alpha}")
    if not (0 <= p < 1):
        raise CrystalError(f"--lora-dropout must be in [0, 1), got {p}")
    if t.optimizer != "adamw":
        raise CrystalError("LoRA trains its adapters with AdamW; --optimizer muon is for full training")
    if t.cuda_graphs == "on":
        raise CrystalError("--cuda-graphs on: LoRA steps run eagerly (use --cuda-graphs off or auto)")
    lora_targets(t, m)


# --- LoRA targets (crystal.lora): the projections an adapter may sit on -------------------------

# The projections an adapter may sit on, in buffer order, per arch: crystal's target name -> the
# module's path inside a block (HF names). A target name is PEFT's target_modules entry as-is.
LORA_TARGETS = {
    "gpt2": {"c_attn": "attn.c_attn", "attn.c_proj": "attn.c_proj", "c_fc": "mlp.c_fc", "mlp.c_proj": "mlp.c_proj"},
    "llama": {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
              "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
              "down_proj": "mlp.down_proj"},
}
LORA_ALIASES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
           "down": "down_proj"}
# litgpt's finetune_lora: query and value. Llama: q_proj, v_proj (PEFT's default too); GPT-2's
# query and value live in the fused c_attn, which PEFT adapts whole (its default for gpt2).
LORA_DEFAULT_TARGETS = {"gpt2": ("c_attn",), "llama": ("q_proj", "v_proj")}


def lora_target_shape(cfg: ModelConfig, target: str) -> tuple[int, int]:
    """(in, out) features of a target projection of `cfg`."""
    C, I = cfg.n_embd, cfg.mlp_size
    if not cfg.llama:
        return {"c_attn": (C, 3 * C), "attn.c_proj": (C, C), "c_fc": (C, I), "mlp.c_proj": (I, C)}[target]
    Q, KV = cfg.n_head * cfg.head_size, cfg.kv_heads * cfg.head_size
    return {"q_proj": (C, Q), "k_proj": (C, KV), "v_proj": (C, KV), "o_proj": (Q, C), "gate_proj": (C, I),
            "up_proj": (C, I), "down_proj": (I, C)}[target]


def parse_lora_targets(text: str | None, cfg: ModelConfig) -> tuple[str, ...]:
    """--lora-targets (comma-separated; None: the arch's default; "all": every projection) as
    target names in buffer order; a name the architecture lacks is a CrystalError."""
    known = LORA_TARGETS[cfg.arch]
    if text is None:
        return LORA_DEFAULT_TARGETS[cfg.arch]
    names = [t.strip() for t in text.split(",") if t.strip()]
    if names == ["all"]:
        return tuple(known)
    if not names:
        raise CrystalError("--lora-targets names no projection")
    chosen = set()
    for t in names:
        t = LORA_ALIASES.get(t, t) if cfg.llama else t
        if t not in known:
            raise CrystalError(f"--lora-targets: {t!r} is not a projection of a {cfg.arch} block; "
                               f"choose from {', '.join(known)} (or all)")
        chosen.add(t)
    return tuple(t for t in known if t in chosen)


def lora_targets(t: TrainConfig, m: ModelConfig) -> tuple[str, ...]:
    """--lora-targets of a LoRA run, checked against the model: each a projection of its arch, r
    within each adapted matrix's rank."""
    targets = parse_lora_targets(t.lora_targets, m)
    for name in targets:
        n_in, n_out = lora_target_shape(m, name)
        if t.lora_r > min(n_in, n_out):
            raise CrystalError(f"--lora-r {t.lora_r} is above the rank of {name} ([{n_in}, {n_out}]: at most "
                               f"{min(n_in, n_out)})")
    return targets


def _validate_optimizer(t: TrainConfig) -> None:
    if t.optimizer not in OPTIMIZERS:
        raise CrystalError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {t.optimizer!r}")
    if t.lr_schedule not in LR_SCHEDULES:
        raise CrystalError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got {t.lr_schedule!r}")
    if t.cooldown_frac is not None:
        if t.lr_schedule != "linear-cooldown":
            raise CrystalError("--cooldown-frac needs --lr-schedule linear-cooldown")
        if not (0 < t.cooldown_frac <= 1):
            raise CrystalError(f"--cooldown-frac must be in (0, 1], got {t.cooldown_frac}")
    given = [k for k in MUON_DEFAULTS if getattr(t, "muon_" + k) is not None]
    if given and t.optimizer != "muon":
        raise CrystalError(f"--muon-{given[0].replace('_', '-')} needs --optimizer muon")
    if t.optimizer != "muon":
        return
    lr = t.muon("lr")
    if not (lr > 0) or lr == float("inf"):
        raise CrystalError(f"--muon-lr must be a positive number, got {lr}")
    for key in ("momentum", "momentum_start"):
        if not (0 < t.muon(key) < 1):
            raise CrystalError(f"--muon-{key.replace('_', '-')} must be in (0, 1), got {t.muon(key)}")
    if not isinstance(t.muon("momentum_warmup"), int) or t.muon("momentum_warmup") < 0:
        raise CrystalError(f"--muon-momentum-warmup must be a non-negative integer, got {t.muon('momentum_warmup')!r}")
    steps = t.muon("ns_steps")
    if not isinstance(steps, int) or isinstance(steps, bool) or not (1 <= steps <= 100):
        raise CrystalError(f"--muon-ns-steps must be between 1 and 100, got {steps!r}")
    if not (0 <= t.muon("weight_decay") < 1):
        raise CrystalError(f"--muon-weight-decay must be in [0, 1), got {t.muon('weight_decay')}")
    if t.cuda_graphs == "on":
        derived = t.preset in PRESETS and "optimizer" in PRESETS[t.preset].derived
        hint = f"; the {t.preset} preset trains with Muon unless given --optimizer adamw" if derived else ""
        raise CrystalError(f"--cuda-graphs on needs --optimizer adamw (Muon's steps run eagerly{hint})")


# --- TOML files ---------------------------------------------------------------------------------
# A config file has an optional top-level `preset` and two tables, [model] (ModelConfig fields)
# and [train] (TrainConfig fields). Resolution: preset -> file -> command-line flags.

def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if v != v:
            return "nan"
        return repr(v) if abs(v) != float("inf") else ("inf" if v > 0 else "-inf")
    if isinstance(v, str):
        import json

        return json.dumps(v)  # a TOML basic string
    raise TypeError(f"cannot write {v!r} to TOML")


def to_toml(model: ModelConfig, train: TrainConfig) -> str:
    """The resolved config as a TOML file that `--config` reads back to the same config
    (unset optional values are left out)."""
    lines = [f"preset = {_toml_value(train.preset)}", "", "[model]"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in model.settings().items()]
    lines += ["", "[train]"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in dataclasses.asdict(train).items()
              if v is not None and k != "preset"]
    return "\n".join(lines) + "\n"


def _coerce(cls, table: dict, where: str) -> dict:
    """Check names against the dataclass and turn TOML integers into floats where a float goes."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for k, v in table.items():
        if k not in fields:
            raise CrystalError(f"{where}: unknown setting {k!r}")
        default = fields[k].default
        if isinstance(v, int) and not isinstance(v, bool) and (
                isinstance(default, float) or "float" in str(fields[k].type)):
            v = float(v)
        out[k] = v
    check_types(cls, out, f"{where}: ")
    return out


def read_toml(path: str) -> tuple[str | None, dict, dict]:
    """(preset or None, model overrides, train overrides) from a config file."""
    from crystal.atomic import check_regular
    from crystal.jsonio import read_toml as read_toml_file

    check_regular(path)
    try:
        data = read_toml_file(path)
    except FileNotFoundError:
        raise CrystalError(f"config file not found: {path}") from None
    except OSError as e:
        raise CrystalError(f"cannot read config file {path}: {e.strerror or e}") from None
    unknown = set(data) - {"preset", "model", "train"}
    if unknown:
        raise CrystalError(f"{path}: unknown section or key {sorted(unknown)[0]!r} "
                           "(expected preset, [model], [train])")
    preset = data.get("preset")
    if preset is not None and not isinstance(preset, str):
        raise CrystalError(f"{path}: preset must be a string")
    model, train = data.get("model", {}), data.get("train", {})
    if not isinstance(model, dict) or not isinstance(train, dict):
        raise CrystalError(f"{path}: [model] and [train] must be tables")
    return preset, _coerce(ModelConfig, model, f"{path} [model]"), _coerce(TrainConfig, train, f"{path} [train]")
