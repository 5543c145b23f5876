"""The text tower exported to ONNX, for sub-second cold searches.

Importing torch + transformers costs ~4.5 s; onnxruntime + tokenizers cost ~0.1 s.  When a
library is bound to a model, its text tower (projection and L2 normalisation included) is
exported once to ``<library>/text/`` with the weights as external data (which onnxruntime
memory-maps: a 3x faster session start) together with ``tokenizer.json`` and the
tokenizer settings.  :class:`OnnxTextEncoder` runs it with no torch import at all.  If the
export is missing or fails, search falls back to the torch encoder: same vectors, slower.

The export of a large tower runs in a child process (:func:`start`) that reads only the
text tower's float32 weights, at a low CPU priority, beside the index run that encodes
images: the run's own memory never holds the text weights or the exporter's copies of them,
and the child's imports and tracing overlap the run's own start-up and encoding.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Sequence

from ..constants import TEXT_TOWER_DIR as DIRNAME
from ..gcpause import give_back_memory
from . import onnxexport
from .onnxexport import ExportProcess, ExportUnsupported, die_with, save_optimised, spawn

MODEL_FILE = "text.onnx"
DATA_FILE = "text.onnx.data"
TOKENIZER_FILE = "tokenizer.json"
SETTINGS_FILE = "settings.json"
#: SigLIP's token embedding table, float16, read with ``numpy.load(mmap_mode="r")``: a
#: search reads the rows of its own tokens, never the whole table (SigLIP 2's 256k-token
#: Gemma vocabulary is 790 MB in float32; 393 MB here, of which a query touches ~100 KB).
TABLE_FILE = "tokens.f16.npy"
#: The export's format, kept in the per-machine tower cache (see :mod:`towercache`): an
#: entry of another format is exported again (3: CLIP's lean tower, embed/cliptext.py).
CACHE_KIND = "text"
CACHE_FORMAT = 3


def export(encoder, library_dir: Path, *, release: bool = False) -> Path:
    """Export ``encoder``'s text tower and tokenizer to ``<library>/text`` atomically.

    ``release``: drop the encoder's text tower once its weights are written (the child
    process of :func:`start`, which has no other use for it), before onnxruntime loads
    its own copy of the weights.

    The tower is traced the quick way first (:class:`_whole_graph_inference`); if that
    fails, or its result does not give the torch tower's vectors, it is traced again the
    exporter's usual way.  Raises :class:`ExportUnsupported` when the tokenizer cannot be
    exported, else whatever torch/onnx raise; callers treat a failure as "no fast path".
    """
    from .encoder import LOADING

    # the whole export under the model lock: it reads weights, and traces torch modules that
    # another thread's load would give another default dtype (itr serve --watch)
    with LOADING:
        try:
            return _export(encoder, library_dir, release, quick=True)
        except (ExportUnsupported, KeyboardInterrupt):
            raise
        except Exception:
            if release:  # the first try may have dropped the loaded tower's weights: read again
                encoder.release_text()
            return _export(encoder, library_dir, release, quick=False)


def _export(encoder, library_dir: Path, release: bool, *, quick: bool) -> Path:
    import torch

    out = Path(library_dir) / DIRNAME
    remove_temp_files(library_dir)  # of an export that was killed
    tmp = Path(library_dir) / f".{DIRNAME}.tmp-{os.getpid()}"
    tmp.mkdir(parents=True)
    try:
        if hasattr(encoder, "export_tokenizer"):  # open_clip: its vocabulary as a BPE
            tok = _configurable(encoder.export_tokenizer())
        else:
            tok = _fast_tokenizer(encoder.tokenizer)
        tok.save(str(tmp / TOKENIZER_FILE))
        pad_id = _pad_id(encoder.tokenizer)
        # SigLIP attends to its padding, as trained; open_clip's towers take no mask
        use_mask = encoder.model_type not in ("siglip", "open_clip")
        settings = {
            "format": CACHE_FORMAT,
            "max_length": encoder.text_max_length,
            "padding": encoder.text_padding,
            "pad_id": pad_id,
            "use_attention_mask": use_mask,
            "dim": encoder.dim,
            "model": encoder.model_id,
            "lowercase": bool(getattr(encoder.tokenizer, "do_lower_case", False))
            and encoder.model_type == "siglip",
            # Gemma's tokenizer (SigLIP 2) pads on the left unless its config says otherwise;
            # SigLIP pools the last position, so the side changes the vector
            "padding_side": getattr(encoder.tokenizer, "padding_side", "right") or "right",
            "truncation_side": getattr(encoder.tokenizer, "truncation_side", "right") or "right",
        }

        # Only the text tower, in float32 from the checkpoint's own weights (a bf16 or fp16
        # model cast back to float32 would carry its rounding into every cold search).
        if hasattr(encoder, "text_export_tower"):  # open_clip: a module of its own
            text_model = proj = None
            whole = encoder.text_export_tower()
        else:
            text_model, proj = encoder.float32_text_tower()
            whole = _whole_tower(text_model, proj)
        # two batches of other sizes and lengths: the export must hold for any (dynamic axes)
        samples = [encoder.tokenize(["a photo of a dog", "two children on a lawn"]),
                   encoder.tokenize(["a", "a red bicycle leaning on a wall beside a blue door",
                                     "three words here"])]
        names = ["input_ids"] + (["attention_mask"] if use_mask else [])
        feeds = [tuple(s[n] for n in names) for s in samples]
        if hasattr(encoder, "export_tokenizer"):
            _same_ids(tok, settings, encoder)
        split = encoder.model_type == "siglip" and hasattr(text_model, "embeddings")
        with torch.inference_mode(False), torch.no_grad():
            if split:
                # the table leaves the graph: float16 rows gathered by the search, the rest in ONNX
                tower = _siglip_from_embeddings(text_model, proj)
                table = _write_table(text_model.embeddings.token_embedding.weight, tmp / TABLE_FILE)
                settings["token_table"] = TABLE_FILE
                exact = [whole(*f) for f in feeds]
                feeds = [(torch.from_numpy(table[f[0].numpy()].astype("float32")),) for f in feeds]
                names = ["token_embeds"]
                for f, want, ids in zip(feeds, exact, samples):
                    # the split tower is the whole one (on the table's exact rows) ...
                    rows = text_model.embeddings.token_embedding(ids["input_ids"])
                    if not torch.allclose(tower(rows), want, atol=1e-5):
                        raise RuntimeError("the tower from token embeddings differs from the whole one")
                    # ... and float16 rows move no vector by more than rounding
                    cos = (tower(*f) * want).sum(-1).min().item()
                    if cos < MIN_TABLE_COSINE:
                        raise RuntimeError(f"float16 token embeddings move a vector: cosine {cos:.6f}")
                del table, exact
                if release:  # the child has no other use for the table: gone before tracing
                    text_model.embeddings.token_embedding = torch.nn.Embedding(1, 1)
            elif text_model is None:  # open_clip: the batch's longest text, not 77 tokens,
                # where that gives the whole tower's vectors (embed/cliptext.py)
                short = _short(whole, feeds, pad_id)
                tower = whole
                if short is not None:
                    tower, feeds = short
                    settings["padding"] = "longest"
                    _same_ids(tok, settings, encoder)
                settings["lean"] = tower is not whole
            else:
                # CLIP's causal tower without the work that never reaches its vector, where
                # it gives the whole tower's (embed/cliptext.py); else transformers' forward
                tower = _lean(whole, text_model, proj, encoder.tokenizer, feeds) or whole
                settings["lean"] = tower is not whole
                if tower is not whole and use_mask:  # it reads no mask (padding is after
                    # the end token, which sees nothing after itself)
                    names, feeds = names[:1], [f[:1] for f in feeds]
                    settings["use_attention_mask"] = False
            # what the export must give
            checks = [({n: a.numpy() for n, a in zip(names, f)}, tower(*f).float().numpy())
                      for f in feeds]  # [batch, dim] each
        axes = {n: {0: "batch", 1: "seq"} for n in names}
        axes["embedding"] = {0: "batch"}
        raw = tmp / "raw"  # the plain export; onnxruntime's optimised copy replaces it
        raw.mkdir()
        onnx_path = raw / MODEL_FILE
        onnxexport.trace(tower, feeds[0], names, axes, onnx_path, quick=quick)
        # the torch weights are written and no longer needed: gone before onnxruntime
        # loads its copy (a second try reads them again)
        del tower, whole, text_model, proj
        if release:
            encoder.release_text()
            give_back_memory()
        save_optimised(onnx_path, tmp / MODEL_FILE, DATA_FILE)
        if release:
            give_back_memory()  # the optimising session's copies, before the checking one's
        shutil.rmtree(raw)
        _verify(tmp, checks)
        (tmp / SETTINGS_FILE).write_text(json.dumps(settings, indent=1))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


#: The least cosine between a vector from float16 token embeddings and the float32 one
#: that the export accepts (measured: 1 - 1e-7 on SigLIP 2 B/32's architecture).
MIN_TABLE_COSINE = 0.9999


def _normalised(f):
    return f / f.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # [batch, dim]


def _whole_tower(text_model, proj):
    """``get_text_features`` of CLIP/SigLIP, then L2 normalisation, as a torch module on
    (input_ids, attention_mask)."""
    import torch

    class WholeTower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.text_model = text_model
            self.proj = proj

        def forward(self, input_ids, attention_mask=None):
            out = self.text_model(input_ids=input_ids, attention_mask=attention_mask)
            f = out.pooler_output  # [batch, hidden]
            if self.proj is not None:
                f = self.proj(f)  # [batch, dim]
            return _normalised(f)

    return WholeTower()


def _siglip_from_embeddings(text_model, proj):
    """SigLIP's text tower from its token embeddings on (``[batch, seq, hidden]``): the
    position embeddings, encoder, final norm, last-position head and L2 normalisation of
    ``SiglipTextModel.forward`` (no attention mask: SigLIP attends to its padding).
    :func:`_export` checks it against the whole tower before it is kept."""
    import torch

    class FromEmbeddings(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.text_model = text_model
            self.proj = proj

        def forward(self, token_embeds):
            m = self.text_model
            h = m.embeddings(inputs_embeds=token_embeds)  # [batch, seq, hidden]
            h = m.encoder(inputs_embeds=h).last_hidden_state
            h = m.final_layer_norm(h)
            f = m.head(h[:, -1, :])  # [batch, dim]
            if self.proj is not None:
                f = self.proj(f)
            return _normalised(f)

    return FromEmbeddings()


#: How far the lean tower's vectors may be from the whole tower's in torch (measured:
#: 1.2e-7 to 1.7e-7 on ViT-B/32's tower, batches of 2 to 51 tokens, padded).
LEAN_TOLERANCE = 1e-5


def _lean(whole, text_model, proj, tokenizer, feeds):
    """CLIP's lean text tower (:func:`itrcli.embed.cliptext.fast_tower`) when it gives
    ``whole``'s vectors on each of ``feeds``, else None."""
    import torch

    from .cliptext import fast_tower

    try:
        lean = fast_tower(text_model, proj, tokenizer)
        if lean is None:
            return None
        with torch.no_grad():
            same = all(torch.allclose(lean(*f), whole(*f), atol=LEAN_TOLERANCE) for f in feeds)
    except Exception:
        return None
    return lean if same else None


def _short(whole, feeds, pad_id: int):
    """open_clip's tower on ids padded to the longest text
    (:func:`itrcli.embed.cliptext.short_openclip_tower`) and ``feeds`` cut to their longest
    text, when it gives ``whole``'s vectors on each of them; else None."""
    import torch

    from .cliptext import short_openclip_tower

    try:
        short = short_openclip_tower(whole)
        if short is None:
            return None
        cut = []
        with torch.no_grad():
            for (ids,) in feeds:  # [batch, context]
                n = int((ids != pad_id).nonzero()[:, 1].max()) + 1  # past the last end token
                cut.append((ids[:, :n].contiguous(),))
                if not torch.allclose(short(*cut[-1]), whole(ids), atol=LEAN_TOLERANCE):
                    return None
    except Exception:
        return None
    return short, cut


def _write_table(weight, path: Path):
    """``weight`` ([vocab, hidden] float32) to ``path`` as a float16 ``.npy``, a slice at a
    time (no float16 copy of it all in memory); returns the file memory-mapped."""
    import numpy as np

    rows, width = weight.shape
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(rows, width))
    step = 8192
    for i in range(0, rows, step):
        out[i:i + step] = weight[i:i + step].detach().float().numpy()
    out.flush()
    del out
    return np.load(path, mmap_mode="r")


def _verify(d: Path, checks) -> None:
    """The ONNX tower in ``d`` gives the torch tower's vectors on each ``(feeds, vectors)``
    of ``checks`` (else it is not kept: searches use torch)."""
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(d / MODEL_FILE), sess_options=so,
                                providers=["CPUExecutionProvider"])
    for feeds, reference in checks:
        (got,) = sess.run(["embedding"], feeds)
        if got.shape != reference.shape or not np.allclose(got, reference, atol=1e-4):
            diff = float(np.abs(got - reference).max()) if got.shape == reference.shape else "shape"
            raise RuntimeError(f"exported text tower differs from torch by {diff}")


def _fast_tokenizer(hf_tokenizer):
    """The ``tokenizers.Tokenizer`` behind a transformers tokenizer (converted if slow)."""
    backend = getattr(hf_tokenizer, "backend_tokenizer", None) or getattr(hf_tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "save"):
        tok = backend
    else:
        from transformers.convert_slow_tokenizer import convert_slow_tokenizer

        try:
            tok = convert_slow_tokenizer(hf_tokenizer)
        except Exception as e:
            raise ExportUnsupported(f"{type(hf_tokenizer).__name__} has no fast form: "
                                    f"{str(e)[:200]}") from None
    return _configurable(tok)


def _configurable(tok):
    """A copy of the ``tokenizers.Tokenizer`` with no padding or truncation set."""
    tok = type(tok).from_str(tok.to_str())  # a copy we may reconfigure
    tok.no_padding()
    tok.no_truncation()
    return tok


#: Texts whose ids the exported tokenizer must give exactly as the model's own tokenizer.
TOKEN_CHECKS = ("a photo of a dog", "Two children, on a LAWN!  42 kites...", "über café naïve",
                "赤い円 красный круг كلب", "don't stop   me now's", "🐶 " + "very long " * 60)


def _same_ids(tok, settings: dict, encoder) -> None:
    """The exported tokenizer, configured as a search will, gives the encoder's ids on
    :data:`TOKEN_CHECKS` (else the tower is not exported: searches use torch)."""
    import numpy as np

    probe = _configurable(tok)
    _configure(probe, settings)
    got = np.asarray([e.ids for e in probe.encode_batch(list(TOKEN_CHECKS))], dtype=np.int64)
    want = encoder.tokenize(list(TOKEN_CHECKS))["input_ids"].numpy()
    n = got.shape[1]
    if (settings["padding"] == "longest" and encoder.text_padding == "max_length"
            and n <= want.shape[1] and (want[:, n:] == settings["pad_id"]).all()):
        want = want[:, :n]  # padded to the longest, the model to its context: the same ids
    if got.shape != want.shape or not (got == want).all():
        raise ExportUnsupported("the exported tokenizer does not give the model's own token ids")


def _configure(tok, settings: dict) -> None:
    """Truncation and padding as the export's settings say (in place)."""
    ml = int(settings["max_length"])
    # exports written before the sides were recorded padded and truncated on the right
    tok.enable_truncation(max_length=ml, direction=settings.get("truncation_side", "right"))
    side = settings.get("padding_side", "right")
    if settings["padding"] == "max_length":
        tok.enable_padding(pad_id=int(settings["pad_id"]), length=ml, direction=side)
    else:
        tok.enable_padding(pad_id=int(settings["pad_id"]), direction=side)


def _pad_id(hf_tokenizer) -> int:
    pid = getattr(hf_tokenizer, "pad_token_id", None)
    if pid is None:
        pid = getattr(hf_tokenizer, "eos_token_id", 0) or 0
    return int(pid)


class OnnxTextEncoder:
    """Texts -> L2-normalised vectors with onnxruntime + tokenizers (no torch)."""

    def __init__(self, library_dir: Path, *, warm: bool = False, threads: int | None = None,
                 model: Path | None = None, precision: str = "fp32") -> None:
        """``warm``: for a process that encodes many texts (``itr serve``): the weights are
        pre-packed for the matrix kernels at the session's start (twice as fast per text
        here: 25 -> 13 ms for ViT-B/32's tower on 2 threads), which a one-shot search would
        pay for and not recover.  ``threads``: onnxruntime's threads for one run (default:
        two, or one on one CPU).  ``model``: another graph of the tower than the export's
        own, with the same tokenizer (the int8 copy: :func:`itrcli.embed.textquant.encoder`),
        of ``precision``; ``int8`` embeds one text at a time (see :meth:`encode_texts`)."""
        d = Path(library_dir) / DIRNAME
        self.precision = precision
        model = model or d / MODEL_FILE
        self.settings = json.loads((d / SETTINGS_FILE).read_text())
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(d / TOKENIZER_FILE))
        _configure(self.tok, self.settings)
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = threads or min(2, os.cpu_count() or 1)
        # optimised once at export (see save_optimised); pre-packing weights costs more at
        # session start than it saves on one short text
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.add_session_config_entry("session.disable_prepacking", "0" if warm else "1")
        self.session = ort.InferenceSession(str(model), sess_options=so,
                                            providers=["CPUExecutionProvider"])
        self.dim = int(self.settings["dim"])
        self.table = None  # [vocab, hidden] float16, memory-mapped: rows read as needed
        if self.settings.get("token_table"):
            import numpy as np

            self.table = np.load(d / self.settings["token_table"], mmap_mode="r")

    @staticmethod
    def available(library_dir: Path) -> bool:
        d = Path(library_dir) / DIRNAME
        return (d / MODEL_FILE).exists() and (d / SETTINGS_FILE).exists()

    def tokenize(self, texts: Sequence[str]):
        import numpy as np

        if self.settings.get("lowercase"):
            texts = [t.lower() for t in texts]
        encs = self.tok.encode_batch(list(texts))
        ids = np.asarray([e.ids for e in encs], dtype=np.int64)  # [batch, seq]
        mask = np.asarray([e.attention_mask for e in encs], dtype=np.int64)
        return ids, mask

    def encode_texts(self, texts: Sequence[str]):
        """``[n, dim]`` float32, L2-normalised."""
        import numpy as np

        if self.precision == "int8" and len(texts) > 1:
            # each text alone: the int8 tower's inputs are quantised with one scale for the
            # whole batch, so a batched text would get another vector than its own search
            # (embed/textquant.py)
            return np.concatenate([self.encode_texts([t]) for t in texts])  # [n, dim]
        ids, mask = self.tokenize(texts)
        if self.table is not None:  # the rows of these tokens alone, in float32
            feeds = {"token_embeds": self.table[ids].astype(np.float32)}  # [batch, seq, hidden]
        else:
            feeds = {"input_ids": ids}
        if self.settings["use_attention_mask"]:
            feeds["attention_mask"] = mask
        (out,) = self.session.run(["embedding"], feeds)
        return np.asarray(out, dtype=np.float32)


def remove_export(library_dir: Path) -> None:
    """Delete the exported text tower (``--reindex``: it belongs to the old model)."""
    shutil.rmtree(Path(library_dir) / DIRNAME, ignore_errors=True)
    remove_temp_files(library_dir)


def adopt_export(source: Path, library_dir: Path) -> None:
    """Move the export of the library at ``source`` into the library at ``library_dir``
    (``--reindex`` swaps in the library it built beside; the caller holds the lock)."""
    src = Path(source) / DIRNAME
    if src.is_dir():
        remove_export(library_dir)
        os.replace(src, Path(library_dir) / DIRNAME)


def _link_or_copy(src: Path, dst: Path) -> None:
    """``src``'s files into the folder ``dst``: hard links where the file system allows
    (the cache and the libraries share the bytes), else copies."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if not f.is_file() or f.name == "done.json":
            continue
        try:
            os.link(f, dst / f.name)
        except OSError:
            shutil.copy2(f, dst / f.name)


def cache_export(library_dir: Path, model: str, revision: str | None) -> bool:
    """Keep the library's export in the machine's tower cache, so that the next library
    of this model and revision takes it instead of exporting again.  Best effort: False
    when it could not be kept (a full or read-only cache folder)."""
    from . import towercache

    src = Path(library_dir) / DIRNAME
    if _cached(model, revision) is not None or not src.is_dir():
        return True
    try:
        towercache.remove(model, revision, CACHE_KIND)  # of another format
        tmp = towercache.staging(model, revision, CACHE_KIND)
        _link_or_copy(src, tmp)
        towercache.publish(tmp, model, revision, CACHE_KIND, {"format": CACHE_FORMAT})
        return True
    except OSError:
        return False


def from_cache(library_dir: Path, model: str, revision: str | None) -> bool:
    """Give the library the export of ``model`` at ``revision`` that an earlier library on
    this machine made (no torch, no child process, seconds saved); True when it did.  The
    library checks it as any export (:func:`export_matches`)."""
    entry = _cached(model, revision)
    if entry is None:
        return False
    remove_export(library_dir)  # (and the temporary folders of killed exports)
    tmp = Path(library_dir) / f".{DIRNAME}.tmp-{os.getpid()}"
    try:
        _link_or_copy(entry, tmp)
        os.replace(tmp, Path(library_dir) / DIRNAME)
        return True
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        return False


def _cached(model: str, revision: str | None) -> Path | None:
    """The tower cache's entry for ``model`` at ``revision`` in this exporter's format."""
    from . import towercache

    entry = towercache.lookup(model, revision, CACHE_KIND)
    return entry if entry is not None and _of_format(entry / towercache.DONE) else None


def _of_format(json_file: Path) -> bool:
    """Whether ``json_file`` (an export's settings, a tower cache entry's marker) says this
    exporter's format."""
    try:
        return json.loads(json_file.read_text()).get("format") == CACHE_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def export_identity(library_dir: Path) -> tuple | None:
    """What tells one export on disk from another (the files' inodes, sizes and times):
    a long-lived reader keeps its session while this stays the same."""
    d = Path(library_dir) / DIRNAME
    out = []
    for name in (MODEL_FILE, DATA_FILE, SETTINGS_FILE, TOKENIZER_FILE, TABLE_FILE):
        try:
            st = os.stat(d / name)
        except OSError:
            out.append(None)
            continue
        out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


def export_current(library_dir: Path) -> bool:
    """Whether the library's export is of this exporter's format (an older one still
    answers searches, with the same vectors; the next ``itr index`` makes it again)."""
    return _of_format(Path(library_dir) / DIRNAME / SETTINGS_FILE)


def export_matches(library_dir: Path, model: str | None, dim: int | None) -> bool:
    """Whether the library's exported tower is there and belongs to ``model`` at ``dim``:
    a tower left by another model (a re-index killed half-way, a copied folder) is never
    used; the next ``itr index`` exports the right one."""
    d = Path(library_dir) / DIRNAME
    if not model or not (d / MODEL_FILE).exists():
        return False
    try:
        settings = json.loads((d / SETTINGS_FILE).read_text())
        return settings.get("model") == model and int(settings.get("dim")) == int(dim or 0)
    except (OSError, ValueError, TypeError):
        return False


def remove_temp_files(library_dir: Path) -> None:
    """The half-written exports of killed runs (the caller holds the write lock)."""
    for p in Path(library_dir).glob(f".{DIRNAME}.tmp*"):
        shutil.rmtree(p, ignore_errors=True)


# -- the export in a child process -------------------------------------------------------

#: Exit status of the child when the export is not possible for this model (not retried).
UNSUPPORTED = 3
#: Exit status of the child when the model could not be loaded (not on disk, and the hub
#: unreachable or without it).
NOT_LOCAL = 4
def start(model: str, library_dir: Path, *, revision: str | None = None) -> ExportProcess:
    """Start exporting ``model``'s text tower to ``<library>/text`` in a child process that
    dies with its parent (a run calls it at its end, once it has let go of its own image
    tower: the two peaks of memory never add up).  ``wait()`` gives its exit status: 0
    exported, :data:`UNSUPPORTED`, anything else a failure worth another try.
    ``revision``: the hub commit to load (the library's recorded one), as for
    :class:`~itrcli.embed.encoder.Encoder`."""
    return spawn(__name__, [model, str(library_dir), str(os.getpid()), revision or ""])


def _child_main() -> None:
    """``python -c ... MODEL LIBRARY PARENT_PID REVISION``: the child of :func:`start`."""
    import sys

    try:
        code = _child_export()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    sys.stderr.flush()
    # the files are written and closed: skip the interpreter's teardown, 2 s of collector
    # walks over the objects torch and transformers made, which the run would wait for
    os._exit(code)


def _child_export() -> int:
    import sys

    model, library_dir, parent = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    revision = sys.argv[4] if len(sys.argv) > 4 and sys.argv[4] else None
    die_with(parent)
    from ..errors import ModelError
    from .encoder import Encoder

    try:
        enc = Encoder(model, device="cpu", precision="fp32", towers="text", revision=revision)
    except ModelError as e:
        print(f"text tower not loaded: {e}", file=sys.stderr)
        return NOT_LOCAL
    try:
        export(enc, library_dir, release=True)
    except ExportUnsupported as e:
        print(f"text tower not exported: {e}", file=sys.stderr)
        return UNSUPPORTED
    except Exception as e:
        print(f"text tower export failed: {type(e).__name__}: {str(e)[:300]}", file=sys.stderr)
        return 1
    return 0
