"""Model directories as transformers reads them: Hypothesis builds Hugging Face GPT-2 directories
(tiny random models) with config.json keys and safetensors headers varied, valid and not, and
crystal must agree with transformers on every one it accepts.

Every accepted directory gives transformers' logits (GPT2LMHeadModel.from_pretrained on the same
directory) within 1e-5; every refused one is a single `error:` line and exit 2. Beside the fuzz,
crystal's table of GPT2Config's fields and aliases is checked against transformers' own.
"""

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from crystal import load_checkpoint
from crystal.cli import main
from crystal.config import GPT2_ALIASES, GPT2_FIELD_TYPES, ModelConfig, _json_is
from crystal.model import ParamLayout
from compare import rel_err

transformers = pytest.importorskip("transformers", reason="needs transformers (the test extra)")
torch = pytest.importorskip("torch", reason="needs torch (the test extra)")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers.logging.set_verbosity_error()

VOCAB = 50
SHAPE_KEYS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
ALIAS_OF = {field: alias for alias, field in GPT2_ALIASES.items()}
# Values for GPT2Config fields: those crystal computes, those it cannot, and wrong types.
POOLS = {
    "n_inner": lambda e: [None, 4 * e, 4 * e + 4, float(4 * e), "x"],
    "activation_function": lambda e: ["gelu_new", "gelu_pytorch_tanh", "gelu", "relu", 1],
    "layer_norm_epsilon": lambda e: [1e-5, 1e-6, 1e-3, 1, "1e-5", None, float("nan")],
    "scale_attn_weights": lambda e: [True, False, 1],
    "tie_word_embeddings": lambda e: [True, False, 1],
    "scale_attn_by_inverse_layer_idx": lambda e: [False, True, 0],
    "reorder_and_upcast_attn": lambda e: [False, True],
    "add_cross_attention": lambda e: [False, 0],
    "bos_token_id": lambda e: [0, None, "a", 1.0],
    "eos_token_id": lambda e: [0, [0, 1], [0, "x"], None],
    "resid_pdrop": lambda e: [0.0, 0, 0.1, "0"],
    "use_cache": lambda e: [True, "yes"],
    "model_type": lambda e: ["gpt2", "bert"],
    "n_ctx": lambda e: [5, 1024],
}
BITS = {"F32": np.float32, "F16": np.float16}
HEADER_DAMAGE = ["none", "none", "none", "reorder", "pad", "meta_null", "duplicate", "alias", "overlap", "gap",
                 "trailing", "meta_int", "meta_list", "nan", "inf"]


@st.composite
def model_dirs(draw):
    """A plan of one directory: the true shape, config edits, tensor encodings, header damage."""
    n_embd = draw(st.sampled_from([8, 12, 16]))
    shape = dict(vocab_size=VOCAB, n_positions=draw(st.sampled_from([8, 16])), n_embd=n_embd,
                 n_layer=draw(st.sampled_from([1, 2])), n_head=draw(st.sampled_from([1, 2, 4])))
    edit = st.one_of(
        st.tuples(st.just("alias"), st.sampled_from(list(ALIAS_OF))),  # the alias instead of the field
        st.tuples(st.just("both"), st.sampled_from(list(ALIAS_OF))),  # the alias beside it, equal
        st.tuples(st.just("disagree"), st.sampled_from(list(ALIAS_OF)), st.sampled_from([-1, 1, 8])),
        st.tuples(st.just("retype"), st.sampled_from(SHAPE_KEYS), st.sampled_from(["str", "float", "bool", "null"])),
        st.tuples(st.just("drop"), st.sampled_from(SHAPE_KEYS)),
        st.tuples(st.just("set"), st.sampled_from(list(POOLS)), st.integers(0, 6)))
    return dict(shape=shape, seed=draw(st.integers(0, 2**16)), edits=draw(st.lists(edit, max_size=3)),
                dtypes=draw(st.sampled_from(["F32", "F16", "BF16", "mixed"])), prefix=draw(st.booleans()),
                buffers=draw(st.booleans()), head=draw(st.sampled_from(["none", "tied", "untied"])),
                shards=draw(st.sampled_from([1, 1, 2])), damage=draw(st.sampled_from(HEADER_DAMAGE)))


def edited_config(plan) -> dict:
    d = {"model_type": "gpt2", **plan["shape"]}
    for kind, key, *arg in plan["edits"]:
        if kind == "alias" and key in d:
            d[ALIAS_OF[key]] = d.pop(key)
        elif kind == "both" and key in d:
            d[ALIAS_OF[key]] = d[key]
        elif kind == "disagree":
            d[ALIAS_OF[key]] = plan["shape"][key] + arg[0]
        elif kind == "retype" and key in d:
            d[key] = {"str": str, "float": float, "bool": bool, "null": lambda v: None}[arg[0]](d[key])
        elif kind == "drop":
            d.pop(key, None)
        elif kind == "set":
            pool = POOLS[key](plan["shape"]["n_embd"])
            d[key] = pool[arg[0] % len(pool)]
    return d


def encode(values: np.ndarray, dtype: str) -> bytes:
    if dtype == "BF16":  # the top half of each float32 (the tensor is drawn as bfloat16 values)
        return (values.astype(np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
    return values.astype(BITS[dtype]).astype("<" + np.dtype(BITS[dtype]).str[1:]).tobytes()


def tensors_of(plan) -> list[tuple[str, str, tuple, bytes]]:
    """(stored name, dtype, shape, bytes) of every tensor the directory's files hold."""
    rng = np.random.default_rng(plan["seed"])
    layout = ParamLayout(ModelConfig(**{("block_size" if k == "n_positions" else k): v
                                        for k, v in plan["shape"].items()}))
    dtypes = ["F32", "F16", "BF16"]
    out = []
    for i, s in enumerate(layout.specs):
        dtype = dtypes[i % 3] if plan["dtypes"] == "mixed" else plan["dtypes"]
        values = rng.normal(0, 0.3, s.shape).astype(np.float32)
        if dtype == "BF16":
            values = (values.view(np.uint32) & 0xFFFF0000).view(np.float32)
        if s.name == "transformer.wte.weight":
            wte = (values, dtype)
        out.append([s.name if plan["prefix"] else s.name.removeprefix("transformer."), dtype, s.shape, values])
    if plan["damage"] in ("nan", "inf"):
        out[-1][3] = out[-1][3].copy()
        out[-1][3].reshape(-1)[0] = np.nan if plan["damage"] == "nan" else np.inf
    if plan["buffers"]:
        t = plan["shape"]["n_positions"]
        for layer in range(plan["shape"]["n_layer"]):
            prefix = "transformer." if plan["prefix"] else ""
            out.append([f"{prefix}h.{layer}.attn.bias", "F32", (1, 1, t, t), np.tril(np.ones((1, 1, t, t), np.float32))])
    if plan["head"] != "none":
        values, dtype = wte
        out.append(["lm_head.weight", dtype, values.shape, values if plan["head"] == "tied" else values + 1])
    return [(name, dtype, tuple(shape), encode(v, dtype)) for name, dtype, shape, v in out]


def write_safetensors(path: Path, tensors, damage: str) -> None:
    """The file as safetensors lays it out, then damaged in its header as `damage` says."""
    data, pairs = b"", [("__metadata__", {"format": "pt"})]
    for name, dtype, shape, raw in tensors:
        pairs.append((name, {"dtype": dtype, "shape": list(shape), "data_offsets": [len(data), len(data) + len(raw)]}))
        data += raw
    entries = pairs[1:]
    first, last = entries[0], entries[-1]
    if damage == "reorder":
        pairs = [pairs[0], *reversed(entries)]
    elif damage == "meta_null":
        pairs[0] = ("__metadata__", None)
    elif damage == "meta_int":
        pairs[0] = ("__metadata__", {"format": 1})
    elif damage == "meta_list":
        pairs[0] = ("__metadata__", ["pt"])
    elif damage == "duplicate":  # the first name again, on zeros after the data
        size = first[1]["data_offsets"][1]
        pairs.append((first[0], {**first[1], "data_offsets": [len(data), len(data) + size]}))
        data += bytes(size)
    elif damage == "alias" and len(entries) > 1:  # the last tensor's entry reads the first's bytes
        pairs[-1] = (last[0], {**last[1], "data_offsets": first[1]["data_offsets"],
                               "shape": first[1]["shape"], "dtype": first[1]["dtype"]})
    elif damage == "overlap" and last[1]["data_offsets"][0] >= 2:
        lo, hi = last[1]["data_offsets"]
        pairs[-1] = (last[0], {**last[1], "data_offsets": [lo - 2, hi - 2]})
    elif damage == "gap":
        lo, hi = last[1]["data_offsets"]
        pairs[-1] = (last[0], {**last[1], "data_offsets": [lo + 2, hi + 2]})
        data = data[:lo] + bytes(2) + data[lo:]
    elif damage == "trailing":
        data += bytes(4)
    text = "{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in pairs) + "}"
    if damage == "pad":  # safetensors pads its header with spaces to an 8-byte boundary
        text += " " * (8 - len(text) % 8)
    path.write_bytes(len(text.encode()).to_bytes(8, "little") + text.encode() + data)


def write_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path.write_text(tok.to_str(), encoding="utf-8")


def build(plan, d: Path) -> None:
    d.mkdir()
    (d / "config.json").write_text(json.dumps(edited_config(plan)))
    write_tokenizer(d / "tokenizer.json")
    tensors = tensors_of(plan)
    if plan["shards"] == 1:
        write_safetensors(d / "model.safetensors", tensors, plan["damage"])
        return
    half = len(tensors) // 2
    names = [f"model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    write_safetensors(d / names[0], tensors[:half], plan["damage"])
    write_safetensors(d / names[1], tensors[half:], "none")
    weight_map = {t[0]: names[i >= half] for i, t in enumerate(tensors)}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def transformers_logits(d: Path, x: np.ndarray) -> np.ndarray:
    model = transformers.GPT2LMHeadModel.from_pretrained(str(d), local_files_only=True, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(x)).logits.numpy()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(plan=model_dirs())
def test_an_accepted_model_directory_gives_transformers_logits_and_a_refused_one_one_line(plan, capsys):
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "model"
        build(plan, d)
        capsys.readouterr()
        code = main(["sample", str(d), "--prompt", "t1 t2", "--tokens", "1", "--temperature", "0"])
        out = capsys.readouterr()
        event("accepted" if code == 0 else "refused")
        if code != 0:
            lines = out.err.strip().splitlines()
            assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), out.err
            return
        x = np.random.default_rng(plan["seed"]).integers(0, VOCAB, (2, plan["shape"]["n_positions"]))
        assert rel_err(load_checkpoint(d).logits(x), transformers_logits(d, x)) <= 1e-5


def test_a_valid_directory_of_each_kind_is_accepted():
    """The fuzz's valid corner is reached: plain, aliased, float16/bfloat16, shards, buffers, tied head."""
    base = dict(shape=dict(vocab_size=VOCAB, n_positions=8, n_embd=12, n_layer=2, n_head=4), seed=1, edits=[],
                dtypes="F32", prefix=True, buffers=False, head="none", shards=1, damage="none")
    variants = [{}, {"edits": [("alias", "n_layer"), ("alias", "n_embd"), ("both", "n_head")]},
                {"dtypes": "mixed", "prefix": False}, {"shards": 2, "buffers": True, "head": "tied"},
                {"damage": "reorder"}, {"damage": "pad"}, {"damage": "meta_null"}]
    x = np.arange(16).reshape(2, 8) % VOCAB
    for v in variants:
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp) / "model"
            build({**base, **v}, d)
            assert rel_err(load_checkpoint(d).logits(x), transformers_logits(d, x)) <= 1e-5, v


# --- crystal's GPT2Config table is transformers' ---------------------------------------------------

def test_crystals_aliases_are_gpt2configs_attribute_map():
    assert GPT2_ALIASES == transformers.GPT2Config.attribute_map


def test_crystals_field_types_refuse_exactly_what_gpt2config_refuses():
    probes = [1, 0, 1.5, "s", "gelu_new", True, False, None, [1], [1, "x"], {}]
    assert set(GPT2_FIELD_TYPES) == set(transformers.GPT2Config.__annotations__)
    for field, kinds in GPT2_FIELD_TYPES.items():
        for v in probes:
            try:
                transformers.GPT2Config(**{field: v})
                theirs = True
            except Exception:  # noqa: BLE001 (huggingface_hub's StrictDataclassFieldValidationError and kin)
                theirs = False
            assert _json_is(v, kinds) == theirs, (field, v)
