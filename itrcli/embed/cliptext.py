"""Text towers rewritten for their ONNX export: the same vector with less work
(transformers' CLIP: :func:`fast_tower`; open_clip's causal towers:
:func:`short_openclip_tower`).

CLIP's text transformer is causal and its vector is the end token's, so two parts of
``CLIPTextModel``'s work never reach that vector, or are the same for every text:

- **the start token.** Every text begins with it at position 0, and a causal token sees
  only itself and what comes before, so its keys and values in each layer are the same
  for every text: they are computed once here (from the tower's own weights) and held as
  constants, and the tower runs on the tokens after it;
- **the last layer past its attention.** Only the end token's output is pooled, so the
  last layer computes every token's keys and values (the end token attends to them) but
  its query, attention, output projection and MLP for the end token alone.

At 12 tokens that is 14% fewer multiply-adds per text, the part of a text search's time
that grows with its length (docs/performance.md, "itr serve").  :func:`fast_tower` gives
the module, or None where the tower is not the one this file knows (the export then
traces transformers' own forward); :mod:`itrcli.embed.textonnx` keeps it only when its
vectors are the whole tower's on padded batches of several lengths.
"""

from __future__ import annotations

import functools

#: The text tower classes whose structure :class:`FastTower` reads: transformers' and
#: :func:`plain_text`'s.
KNOWN = ("CLIPTextTransformer", "CLIPTextModel", "PlainCLIPText")


def fast_tower(text_model, proj, tokenizer):
    """``input_ids [batch, seq] (, attention_mask) -> [batch, dim]`` L2-normalised, as
    ``get_text_features`` then normalisation, or None when ``text_model`` is not CLIP's
    causal tower with a start token (SigLIP, open_clip, a tokenizer that adds none, padding
    on the left)."""
    import torch

    if type(text_model).__name__ not in KNOWN:
        return None
    m = getattr(text_model, "text_model", text_model)
    bos = getattr(tokenizer, "bos_token_id", None)
    layers = getattr(getattr(m, "encoder", None), "layers", None)
    if (bos is None or not layers or getattr(tokenizer, "padding_side", "right") != "right"
            or not hasattr(m, "eos_token_id")):
        return None
    try:
        ids = tokenizer(["a"], return_tensors="pt")["input_ids"]
    except Exception:
        return None
    if int(ids[0, 0]) != bos:
        return None
    with torch.no_grad():
        return _tower_class()(m, proj, bos)


def short_openclip_tower(whole):
    """open_clip's text tower (``whole``: :meth:`OpenClipEncoder.text_export_tower`, on ids
    padded to the context length) on ids padded to the batch's longest text instead, or
    None where that would change the vector.

    open_clip pads every text to its context length (77) and its forward takes no other
    length.  A causal tower that pools the end token (DFN, DataComp, OpenAI's: ``argmax`` or
    ``eos``) never lets the padding after that token reach the vector, so it runs here on
    the causal mask's first rows and columns alone: 12 tokens where 77 were (a text search
    about three times faster).  MobileCLIP's towers attend to their padding as trained (no
    causal mask), and CoCa's class token or a padding mask change the sequence: None."""
    import torch

    net = getattr(whole, "net", None)
    text = getattr(net, "text", None)
    if text is not None:  # CustomTextCLIP: the tower is a TextTransformer of its own
        if getattr(text, "cls_emb", None) is not None or getattr(text, "use_pad_mask", False):
            return None
        parts = (text.token_embedding, text.positional_embedding, text.transformer,
                 text.attn_mask, text.ln_final, text.text_projection,
                 getattr(text, "pool_type", None), getattr(text, "eos_id", None))
    elif net is not None and hasattr(net, "transformer") and hasattr(net, "token_embedding"):
        parts = (net.token_embedding, net.positional_embedding, net.transformer, net.attn_mask,
                 net.ln_final, net.text_projection, getattr(net, "text_pool_type", None),
                 getattr(net, "text_eos_id", None))
    else:
        return None
    tok, pos, transformer, mask, ln_final, proj, pool, eos = parts
    if mask is None or pool not in ("argmax", "eos") or (pool == "eos" and eos is None):
        return None
    blocks = list(getattr(transformer, "resblocks", ()))
    if not blocks or not all(isinstance(getattr(b, "attn", None), torch.nn.MultiheadAttention)
                             and not hasattr(b, "ln_1_kv") and b.attn.in_proj_weight is not None
                             for b in blocks):
        return None
    from open_clip.transformer import text_global_pool

    class ShortTower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok, self.ln_final, self.proj = tok, ln_final, proj
            self.blocks = torch.nn.ModuleList(blocks)
            self.register_buffer("pos", pos.detach(), persistent=False)  # [context, width]
            self.register_buffer("mask", mask.detach(), persistent=False)  # [context, context]

        @staticmethod
        def _attend(attn, x, mask):
            """``nn.MultiheadAttention(x, x, x, attn_mask=mask)`` on [batch, seq, width],
            written out: its traced form fixes the sequence length the trace saw."""
            b, s, w = x.shape
            heads = attn.num_heads
            q, k, v = torch.nn.functional.linear(x, attn.in_proj_weight,
                                                 attn.in_proj_bias).chunk(3, dim=-1)
            q, k, v = (t.reshape(b, s, heads, w // heads).transpose(1, 2) for t in (q, k, v))
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            return attn.out_proj(a.transpose(1, 2).reshape(b, s, w))  # [batch, seq, width]

        def forward(self, input_ids):  # [batch, seq], seq <= the context length
            seq = input_ids.shape[1]
            x = self.tok(input_ids) + self.pos[:seq]  # [batch, seq, width]
            m = self.mask[:seq, :seq].to(x.dtype)
            for blk in self.blocks:  # open_clip's ResidualAttentionBlock.forward
                x = x + blk.ls_1(self._attend(blk.attn, blk.ln_1(x), m))
                x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
            x = text_global_pool(self.ln_final(x), input_ids, pool, eos_token_id=eos)
            if self.proj is not None:
                x = self.proj(x) if isinstance(self.proj, torch.nn.Linear) else x @ self.proj
            return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # [batch, dim]

    return ShortTower().eval()


def plain_text(text, projection_dim: int, paths: list[str]):
    """CLIP's text tower in plain torch, read straight from the safetensors ``paths`` with
    transformers' CLIP text config ``text`` (as :func:`itrcli.embed.clipvision.read_config`
    reads it): ``(text model, projection)``, laid out as transformers' ``CLIPTextTransformer``
    and its ``text_projection`` (the names :class:`FastTower` reads), with the same forward
    (``input_ids``, ``attention_mask`` -> ``.pooler_output``).  The text tower's export (a
    child of the machine's first library of the model) builds it instead of importing
    transformers' modeling, 1.6 s of its CPU beside the run's encoding;
    ``tests/test_cliptext.py`` holds its vectors to transformers'.  Anything it does not
    know raises :class:`~itrcli.embed.clipvision.Unsupported`."""
    from types import SimpleNamespace

    import torch
    from torch import nn

    from .clipvision import Given, Unsupported, activation, checked, read_weights

    act = activation(text.hidden_act)
    width, heads = int(text.hidden_size), int(text.num_attention_heads)
    inner, vocab = int(text.intermediate_size), int(text.vocab_size)
    if width % heads:
        raise Unsupported("hidden size not a multiple of the heads")
    g = Given(read_weights(paths, torch.float32, ("text_model.", "text_projection.")),
              float(text.layer_norm_eps))

    def embedding(key: str, rows: int):  # given its weight: no random initialisation,
        # which on the meta device imports torch._dynamo (0.7 s)
        return nn.Embedding(rows, width, _weight=g.take(key, (rows, width)))

    class Attention(nn.Module):
        def __init__(self, p: str) -> None:
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
                g.linear(f"{p}.{k}_proj", width, width) for k in ("q", "k", "v", "out"))
            self.num_heads, self.head_dim = heads, width // heads
            self.scale = self.head_dim ** -0.5

    class Mlp(nn.Module):
        def __init__(self, p: str) -> None:
            super().__init__()
            self.fc1, self.fc2 = g.linear(p + ".fc1", width, inner), g.linear(p + ".fc2", inner, width)

        def forward(self, x):
            return self.fc2(act(self.fc1(x)))

    class Layer(nn.Module):
        def __init__(self, p: str) -> None:
            super().__init__()
            self.self_attn, self.mlp = Attention(p + ".self_attn"), Mlp(p + ".mlp")
            self.layer_norm1 = g.norm(p + ".layer_norm1", width)
            self.layer_norm2 = g.norm(p + ".layer_norm2", width)

        def forward(self, h, mask):  # [batch, seq, width]; mask added to the scores
            a, (b, s, _) = self.self_attn, h.shape
            x = self.layer_norm1(h)
            q, k, v = (f(x).view(b, s, heads, a.head_dim).transpose(1, 2)
                       for f in (a.q_proj, a.k_proj, a.v_proj))  # [batch, heads, seq, d]
            w = torch.softmax(torch.matmul(q, k.transpose(2, 3)) * a.scale + mask, dim=-1)
            h = h + a.out_proj(torch.matmul(w, v).transpose(1, 2).reshape(b, s, width))
            return h + self.mlp(self.layer_norm2(h))

    class Embeddings(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.token_embedding = embedding("text_model.embeddings.token_embedding.weight", vocab)
            self.position_embedding = embedding("text_model.embeddings.position_embedding.weight",
                                                int(text.max_position_embeddings))

        def forward(self, input_ids):  # [batch, seq] -> [batch, seq, width]
            return (self.token_embedding(input_ids)
                    + self.position_embedding.weight[:input_ids.shape[1]])

    class PlainCLIPText(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embeddings = Embeddings()
            self.encoder = nn.Module()
            self.encoder.layers = nn.ModuleList(
                Layer(f"text_model.encoder.layers.{i}") for i in range(int(text.num_hidden_layers)))
            self.final_layer_norm = g.norm("text_model.final_layer_norm", width)
            self.eos_token_id = int(text.eos_token_id)

        def forward(self, input_ids, attention_mask=None):
            """transformers' ``CLIPTextTransformer.forward``: causal attention (padding
            masked too), the final norm, the end token pooled as transformers picks it."""
            h = self.embeddings(input_ids)
            b, s, _ = h.shape
            low = torch.finfo(h.dtype).min
            mask = torch.full((s, s), low).triu(1)[None, None]  # [1, 1, seq, seq]
            if attention_mask is not None:
                mask = mask + (1.0 - attention_mask[:, None, None, :].to(h.dtype)) * low
                mask = mask.clamp_min(low)
            for layer in self.encoder.layers:
                h = layer(h, mask)
            h = self.final_layer_norm(h)
            ids = input_ids.to(torch.int32)
            at = ids.argmax(-1) if self.eos_token_id == 2 else (ids == self.eos_token_id).int().argmax(-1)
            return SimpleNamespace(pooler_output=h[torch.arange(b), at])  # [batch, width]

    return checked(PlainCLIPText()), checked(g.linear("text_projection", width, int(projection_dim),
                                                      bias=False))


@functools.lru_cache(maxsize=None)
def _tower_class():
    import torch

    class FastTower(torch.nn.Module):
        """See the module's text.  ``m``: transformers' ``CLIPTextTransformer``."""

        def __init__(self, m, proj, bos: int) -> None:
            super().__init__()
            self.m, self.proj = m, proj
            self.legacy_eos = m.eos_token_id == 2  # transformers' own test, as its forward
            self.eos_id = int(m.eos_token_id)
            attn = m.encoder.layers[0].self_attn
            self.heads, self.head_dim, self.scale = attn.num_heads, attn.head_dim, attn.scale
            # the start token's keys and values in each layer: [layers, 1, heads, 1, head_dim]
            start = torch.tensor([[bos]])
            h = m.embeddings(input_ids=start)  # [1, 1, hidden]
            keys, values = [], []
            for layer in m.encoder.layers:
                x = layer.layer_norm1(h)
                keys.append(self._split(layer.self_attn.k_proj(x)))
                values.append(self._split(layer.self_attn.v_proj(x)))
                h = self._layer(layer, h, x, keys[-1], values[-1], None)
            self.register_buffer("start_keys", torch.stack(keys), persistent=False)
            self.register_buffer("start_values", torch.stack(values), persistent=False)

        def _split(self, x):  # [batch, seq, hidden] -> [batch, heads, seq, head_dim]
            b, s, _ = x.shape
            return x.view(b, s, self.heads, self.head_dim).transpose(1, 2)

        def _attend(self, attn, q, k, v, mask):
            """softmax(q k^T * scale + mask) v, heads joined, then the output projection."""
            import torch

            w = torch.matmul(q, k.transpose(2, 3)) * self.scale  # [batch, heads, q, k]
            if mask is not None:
                w = w + mask
            w = torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
            o = torch.matmul(w, v).transpose(1, 2)  # [batch, q, heads, head_dim]
            return attn.out_proj(o.reshape(o.shape[0], o.shape[1], -1))

        def _layer(self, layer, h, x, k, v, mask):
            """One encoder layer over ``h`` [batch, seq, hidden] (``x``: its first layer
            norm), its queries attending to the keys ``k`` and values ``v`` (the start
            token's first)."""
            a = layer.self_attn
            h = h + self._attend(a, self._split(a.q_proj(x)), k, v, mask)
            return h + layer.mlp(layer.layer_norm2(h))

        def forward(self, input_ids, attention_mask=None):  # the mask: right padding, unused
            import torch

            m = self.m
            batch, seq = input_ids.shape
            ids = input_ids[:, 1:]  # the tokens after the start token: [batch, seq - 1]
            positions = torch.arange(1, seq, device=ids.device).unsqueeze(0)
            h = m.embeddings.token_embedding(ids) + m.embeddings.position_embedding(positions)
            # the pooled token's place among them, as transformers picks it
            ids32 = input_ids.to(torch.int32)
            at = (ids32.argmax(dim=-1) if self.legacy_eos
                  else (ids32 == self.eos_id).int().argmax(dim=-1)) - 1  # [batch]
            # token t (at position t + 1) sees the keys 0..t + 1, the start token's first
            n = seq - 1
            key_at = torch.arange(n + 1, device=ids.device)
            query_at = torch.arange(n, device=ids.device)
            blocked = key_at.unsqueeze(0) > (query_at.unsqueeze(1) + 1)  # [n, n + 1]
            low = torch.finfo(h.dtype).min
            mask = torch.zeros(blocked.shape, dtype=h.dtype).masked_fill(blocked, low)
            layers = m.encoder.layers
            last = len(layers) - 1
            rows = torch.arange(batch, device=ids.device)
            for i, layer in enumerate(layers):
                a = layer.self_attn
                x = layer.layer_norm1(h)
                k = torch.cat([self.start_keys[i].expand(batch, -1, -1, -1),
                               self._split(a.k_proj(x))], dim=2)  # [batch, heads, n + 1, d]
                v = torch.cat([self.start_values[i].expand(batch, -1, -1, -1),
                               self._split(a.v_proj(x))], dim=2)
                if i < last:
                    h = self._layer(layer, h, x, k, v, mask)
                    continue
                # the last layer: the pooled token's query alone ([batch, 1, hidden])
                seen = key_at.unsqueeze(0) > (at.unsqueeze(1) + 1)  # [batch, n + 1]
                last_mask = torch.zeros(seen.shape, dtype=h.dtype).masked_fill(seen, low)
                h = self._layer(layer, h[rows, at].unsqueeze(1), x[rows, at].unsqueeze(1),
                                k, v, last_mask[:, None, None, :])
            f = m.final_layer_norm(h[:, 0])  # [batch, hidden]
            if self.proj is not None:
                f = self.proj(f)  # [batch, dim]
            return f / f.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    return FastTower


__all__ = ["KNOWN", "fast_tower", "plain_text", "short_openclip_tower"]
