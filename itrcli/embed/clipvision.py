"""CLIP's image tower in plain torch, read straight from the checkpoint's safetensors.

An index run that encodes with torch on the CPU, in float32 (a CPU without native bf16,
before the machine has an onnxruntime export of the model: its first library) or in bf16
(a CPU with native bf16; the weights rounded as transformers' load rounds them), loads
this module instead of transformers' ``CLIPVisionModelWithProjection``, whose import brings
``transformers.modeling_utils`` and with it ``torch.distributed.tensor``, ``torch._dynamo``
and scipy: 1.7-2.4 s of the run's start, while the image tower is what the run waits for.

The network is transformers' ``CLIPVisionTransformer`` op for op (patch convolution, class
token, positions, pre-norm, pre-norm encoder layers with scaled-dot-product attention, the
class token's post-norm, the projection), with the query, key and value projections done as
one matrix multiply, and the last layer worked out for the class token alone (the only
output read: every token's key and value, but one query, one attention output, one MLP;
6.4% of ViT-B/32's FLOPs saved). ``tests/test_image_runtime.py`` checks its vectors against
transformers' on the test models (cosine >= 0.99999). Anything it does not know (another
activation, sharded weights it cannot find, a missing or misshapen weight) raises, and the
encoder loads transformers' tower instead.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace
from typing import Any, Callable

from .hub import snapshot_commit


class Unsupported(Exception):
    """Not a checkpoint this module runs: transformers' tower is used."""


#: transformers' defaults (``CLIPVisionConfig``, ``CLIPTextConfig``, ``CLIPConfig``) for the
#: settings read here, which its ``save_pretrained`` leaves out of config.json when they
#: equal them: ``tests/test_image_runtime.py`` holds them to transformers' own
VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                   "num_attention_heads": 12, "num_channels": 3, "image_size": 224,
                   "patch_size": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
TEXT_DEFAULTS = {"hidden_size": 512, "max_position_embeddings": 77, "vocab_size": 49408,
                 "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 8,
                 "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "eos_token_id": 49407}
PROJECTION_DEFAULT = 512


def read_config(path: str) -> SimpleNamespace:
    """A CLIP checkpoint's ``config.json`` (at ``path``) as transformers' ``CLIPConfig``
    reads the settings this module and the encoder use (``model_type``, ``projection_dim``,
    ``vision_config``, ``text_config``), without importing transformers (0.9 s of an
    index run's start).  :class:`Unsupported` for anything else: another model type, the
    old ``*_config_dict`` keys, a value of the wrong type.  ``_commit_hash``: the hub commit
    of a file in the hub cache (``.../snapshots/<commit>/config.json``), else None."""
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise Unsupported(f"config.json: {e}") from None
    if not isinstance(cfg, dict) or cfg.get("model_type") != "clip":
        raise Unsupported("not a CLIP config.json")
    if cfg.get("vision_config_dict") or cfg.get("text_config_dict"):
        raise Unsupported("config.json with *_config_dict keys")

    def section(key: str, defaults: dict[str, Any]) -> SimpleNamespace:
        given = cfg.get(key) or {}
        if not isinstance(given, dict):
            raise Unsupported(f"config.json: {key} is not an object")
        out = {**defaults, **{k: given[k] for k in defaults if given.get(k) is not None}}
        for k, v in out.items():
            if not isinstance(v, type(defaults[k])) and not (isinstance(v, int) and isinstance(defaults[k], float)):
                raise Unsupported(f"config.json: {key}.{k} = {v!r}")
        return SimpleNamespace(**out)

    projection = cfg.get("projection_dim", PROJECTION_DEFAULT)
    if not isinstance(projection, int):
        raise Unsupported(f"config.json: projection_dim = {projection!r}")
    return SimpleNamespace(model_type="clip", projection_dim=projection,
                           _commit_hash=snapshot_commit(os.path.dirname(path)),
                           vision_config=section("vision_config", VISION_DEFAULTS),
                           text_config=section("text_config", TEXT_DEFAULTS))


def activation(name: str) -> Callable:
    """The CLIP vision config's activation; :class:`Unsupported` for any other."""
    import torch
    import torch.nn.functional as F

    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    if name == "gelu":
        return F.gelu
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    raise Unsupported(f"activation {name!r}")


def weight_files(find: Callable[[str], str | None]) -> list[str]:
    """The checkpoint's safetensors files, ``find(name)`` giving a file's local path."""
    single = find("model.safetensors")
    if single:
        return [single]
    index = find("model.safetensors.index.json")
    if not index:
        raise Unsupported("no safetensors weights at hand")
    with open(index, encoding="utf-8") as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    paths = [find(s) for s in shards]
    if not all(paths):
        raise Unsupported("a weight shard is not at hand")
    return paths  # type: ignore[return-value]


def read_weights(paths: list[str], dtype, prefixes: tuple[str, ...]) -> dict[str, Any]:
    """The checkpoint's tensors whose names start with one of ``prefixes``, in ``dtype``."""
    from safetensors import safe_open

    out = {}
    for path in paths:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                if key.startswith(prefixes):
                    out[key] = f.get_tensor(key).to(dtype)
    return out


class Given:
    """Modules made on the meta device (no random initialisation), every weight then given
    from the checkpoint's tensors ``w``; a missing or misshapen one is :class:`Unsupported`."""

    def __init__(self, w: dict[str, Any], eps: float) -> None:
        self.w, self.eps = w, eps

    def take(self, key: str, shape: tuple[int, ...]):
        from torch import nn

        t = self.w.get(key)
        if t is None or tuple(t.shape) != shape:
            raise Unsupported(f"weight {key}: {None if t is None else tuple(t.shape)}, expected {shape}")
        return nn.Parameter(t, requires_grad=False)

    def norm(self, prefix: str, width: int):
        from torch import nn

        m = nn.LayerNorm(width, eps=self.eps, device="meta")
        m.weight, m.bias = self.take(prefix + ".weight", (width,)), self.take(prefix + ".bias", (width,))
        return m

    def linear(self, prefix: str, n_in: int, n_out: int, bias: bool = True):
        from torch import nn

        m = nn.Linear(n_in, n_out, bias=bias, device="meta")
        m.weight = self.take(prefix + ".weight", (n_out, n_in))
        if bias:
            m.bias = self.take(prefix + ".bias", (n_out,))
        return m


def checked(tower):
    """``tower`` in eval mode, once every weight is the checkpoint's (none left on meta)."""
    tower = tower.eval()
    if any(p.is_meta for p in tower.parameters()):
        raise Unsupported("a weight of the tower not given by the checkpoint")
    return tower


def build(vision: Any, projection_dim: int, paths: list[str], dtype=None):
    """The tower as a module, ``pixel_values`` ``[n, 3, H, W]`` -> ``[n, projection_dim]``
    (unnormalised), from transformers' CLIP vision config and the safetensors files, its
    weights in ``dtype`` (float32 by default; bf16 rounded from the checkpoint's values as
    transformers' load rounds them, with no float32 copy on the way)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    dtype = dtype or torch.float32

    act = activation(getattr(vision, "hidden_act", "quick_gelu"))
    width, heads = int(vision.hidden_size), int(vision.num_attention_heads)
    layers, patch = int(vision.num_hidden_layers), int(vision.patch_size)
    eps = float(getattr(vision, "layer_norm_eps", 1e-5))
    if width % heads:
        raise Unsupported("hidden size not a multiple of the heads")
    head = width // heads
    g = Given(read_weights(paths, dtype, ("vision_model.", "visual_projection.")), eps)
    take, linear = g.take, g.linear

    def norm(prefix: str) -> nn.LayerNorm:
        return g.norm(prefix, width)

    class Layer(nn.Module):
        def __init__(self, p: str) -> None:
            super().__init__()
            self.norm1, self.norm2 = norm(p + ".layer_norm1"), norm(p + ".layer_norm2")
            qkv = [take(f"{p}.self_attn.{k}_proj.weight", (width, width)) for k in "qkv"]
            bias = [take(f"{p}.self_attn.{k}_proj.bias", (width,)) for k in "qkv"]
            self.qkv = nn.Linear(width, 3 * width, device="meta")
            self.qkv.weight = nn.Parameter(torch.cat(qkv), requires_grad=False)
            self.qkv.bias = nn.Parameter(torch.cat(bias), requires_grad=False)
            self.out = linear(p + ".self_attn.out_proj", width, width)
            self.fc1 = linear(p + ".mlp.fc1", width, int(vision.intermediate_size))
            self.fc2 = linear(p + ".mlp.fc2", int(vision.intermediate_size), width)

        def forward(self, x, first_only: bool = False):  # [n, t, width]
            n, t, _ = x.shape
            h = self.norm1(x)
            if first_only:
                # the last layer, of which only the class token's output is read: only its
                # query, attention output and MLP (every token's key and value still)
                wq, bq = self.qkv.weight[:width], self.qkv.bias[:width]
                q = F.linear(h[:, :1], wq, bq).view(n, 1, heads, head).transpose(1, 2)  # [n, h, 1, d]
                kv = F.linear(h, self.qkv.weight[width:], self.qkv.bias[width:])  # [n, t, 2 width]
                k, v = kv.view(n, t, 2, heads, head).permute(2, 0, 3, 1, 4)  # [n, h, t, d] each
                x, t = x[:, :1], 1
            else:
                q, k, v = self.qkv(h).view(n, t, 3, heads, head).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, scale=head ** -0.5)  # [n, h, t, d]
            x = x + self.out(a.transpose(1, 2).reshape(n, t, width))
            return x + self.fc2(act(self.fc1(self.norm2(x))))

    class Tower(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            e = "vision_model.embeddings"
            self.patch = nn.Conv2d(3, width, patch, stride=patch, bias=False, device="meta")
            self.patch.weight = take(e + ".patch_embedding.weight", (width, 3, patch, patch))
            self.cls = take(e + ".class_embedding", (width,))
            grid = int(vision.image_size) // patch
            self.pos = take(e + ".position_embedding.weight", (grid * grid + 1, width))
            self.pre = norm("vision_model.pre_layrnorm")
            self.layers = nn.ModuleList(Layer(f"vision_model.encoder.layers.{i}") for i in range(layers))
            self.post = norm("vision_model.post_layernorm")
            self.proj = linear("visual_projection", width, projection_dim, bias=False)

        def forward(self, pixel_values):
            x = self.patch(pixel_values).flatten(2).transpose(1, 2)  # [n, grid², width]
            x = torch.cat([self.cls.expand(x.shape[0], 1, width), x], dim=1) + self.pos
            x = self.pre(x)
            for layer in self.layers[:-1]:
                x = layer(x)
            x = self.layers[-1](x, first_only=True)  # [n, 1, width]: the class token's
            return self.proj(self.post(x[:, 0]))

    return checked(Tower())

