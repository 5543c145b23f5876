"""Cross-attention re-ranking: an image-text matching (ITM) model re-scores the best few.

"Fast then slow": the dual encoder screens the whole library in milliseconds; a BLIP ITM
model, which reads the query's words and the image's patches together, then decides the
order of the top K.  The score is BLIP's match probability: ``softmax(itm_head(h_cls))[1]``
where ``h_cls`` is the text encoder's first output attending to the image (what
``BlipForImageTextRetrieval(use_itm_head=True)`` computes).

Loading follows the encoder's rules (:mod:`itrcli.embed.encoder`): the local directory or
the local Hugging Face cache first, the hub only when reachable, safetensors only, no
remote code, one line when it cannot be loaded.  Images are decoded again at the
re-ranker's own resolution (384 px for BLIP base) and preprocessed by
:class:`~itrcli.ingest.images.Preprocess`, which matches ``BlipImageProcessor``.  The
vision tower's output depends only on the image, so a feature cache passed in by the caller
(:mod:`itrcli.store.feature_cache`) keeps it per content hash: another query over the
same images runs only the text encoder (10x less CPU for BLIP base).  A video is scored
at one frame, decoded at full size (:func:`itrcli.ingest.video.frame_at`); its cached
features are keyed by :func:`frame_key` (the video's hash and the frame's time).

Example::

    from itrcli.embed.rerank import Reranker
    rr = Reranker("blip-itm-base-coco")
    scores, errors = rr.score_files("two dogs on a beach", ["a.jpg", "b.jpg"])
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Sequence

from ..errors import ModelError
from . import models

#: ``--rerank-k``: how many of the first results the re-ranker re-scores by default: three
#: screens of the default ``--top`` 10, so that images ranked 11-30 by the dual encoder can
#: reach the top.  BLIP base costs about 3.7 CPU-seconds per image in fp32 on AVX2 (README:
#: a minute for 30 on two cores, seconds on a GPU, where BLIP's own 128-256 are affordable).
DEFAULT_RERANK_K = 30

#: Images per forward pass: the vision tower at 384 px holds ``[b, 577, 768]`` activations.
BATCH_SIZE = 8

#: transformers ``model_type`` values whose ITM head we can run.
SUPPORTED_TYPES = ("blip",)

#: Called as ``progress(done, total)`` after each batch of images.
Progress = Callable[[int, int], None]


def reorder(scores: Sequence[float | None]) -> list[int]:
    """The new order of K candidates: those with a score by descending score (ties keep
    their first order), then those without one (undecodable) in their first order.

    Returns indices into ``scores``.
    """
    scored = [i for i, s in enumerate(scores) if s is not None]
    unscored = [i for i, s in enumerate(scores) if s is None]
    scored.sort(key=lambda i: -float(scores[i]))  # type: ignore[arg-type]  # stable: ties by first order
    return scored + unscored


def frame_key(video_hash: str, at: float) -> str:
    """The feature cache key of a video's frame: a hash of the video's content hash, the
    frame's time (to the millisecond) and the video decoder (PyAV and FFmpeg versions),
    so that no two frames of a clip share features."""
    from ..ingest.files import content_hash
    from ..ingest.video import decoder_id

    return content_hash(f"{video_hash}@{round(at * 1000)}ms; {decoder_id()}".encode())


class Reranker:
    """A loaded image-text matching model.

    Args:
        model: re-rank preset name, hub id or local directory; None: ``$ITR_RERANK_MODEL``,
            else :data:`itrcli.embed.models.DEFAULT_RERANK_PRESET`.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16`` (as for the encoder).
    Raises:
        ModelError: it cannot be found or loaded, or is not an ITM checkpoint.
    """

    def __init__(self, model: str | None = None, device: str = "auto",
                 precision: str = "auto") -> None:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as for the encoder
        import torch

        from .encoder import resolve_device, resolve_precision

        self.model_id, self.revision = models.resolve_reranker(model)
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
            self.precision
        ]
        from .encoder import LOADING

        with LOADING:  # (see there)
            self._load()

    def _load(self) -> None:
        import torch
        import transformers
        from transformers import AutoImageProcessor, AutoTokenizer, BlipForImageTextRetrieval

        from ..ingest.images import Preprocess
        from .hub import load_config

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        name, rev = self.model_id, self.revision
        option = "--rerank-model / ITR_RERANK_MODEL"
        config, local_only = load_config(name, rev, option=option)
        if config.model_type not in SUPPORTED_TYPES:
            hint = (" (a dual encoder: give it to --model, not --rerank-model)"
                    if config.model_type in ("clip", "siglip") else "")
            raise ModelError(
                f"re-rank model '{name}' is a '{config.model_type}' checkpoint; --rerank runs "
                f"BLIP image-text matching checkpoints (BlipForImageTextRetrieval), e.g. "
                f"{models.DEFAULT_RERANK_PRESET}{hint}")
        try:
            self.model, loading = BlipForImageTextRetrieval.from_pretrained(
                name, revision=rev, config=config, use_safetensors=True, trust_remote_code=False,
                dtype=self.dtype, local_files_only=local_only, output_loading_info=True)
            self.tokenizer = AutoTokenizer.from_pretrained(
                name, revision=rev, trust_remote_code=False, local_files_only=local_only)
            image_processor = AutoImageProcessor.from_pretrained(
                name, revision=rev, trust_remote_code=False, local_files_only=local_only)
            self.prep = Preprocess.from_config(image_processor.to_dict())
        except Exception as e:  # safetensors, torch and tokenizers raise their own types
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if "safetensors" in msg.lower():
                raise ModelError(
                    f"re-rank model '{name}' has no safetensors weights; itr never loads "
                    "pickled (.bin) weights. Convert it, or choose a checkpoint with "
                    "model.safetensors") from None
            raise ModelError(f"cannot load re-rank model '{name}': {msg[:300]}") from None
        missing = [k for k in loading.get("missing_keys", ())
                   if k.startswith(("itm_head", "text_encoder", "vision_model"))]
        if missing:
            raise ModelError(
                f"re-rank model '{name}' has no trained image-text matching weights "
                f"({len(missing)} missing, e.g. {sorted(missing)[0]}): not a "
                "BlipForImageTextRetrieval checkpoint")
        self.model.eval().to(self.device)
        self.text_max_length = int(getattr(config.text_config, "max_position_embeddings", 512))
        vision = config.vision_config
        side = int(vision.image_size) // int(vision.patch_size)
        self.feature_shape = (side * side + 1, int(vision.hidden_size))  # [patches + 1, width]
        self.cache_namespace = self._cache_namespace(config)
        if self.device == "cpu":
            torch.set_num_threads(max(1, os.cpu_count() or 1))

    # -- the feature cache ----------------------------------------------------------------
    def _cache_namespace(self, config) -> str | None:
        """What the vision tower's output depends on besides the image's bytes: the weights
        (a hub commit, or a local directory's fingerprint), the precision, the device type
        and the decoder (Pillow's resampling).  None when the weights' revision is unknown
        (nothing is cached then: a moving ``main`` would serve stale features)."""
        import torch

        from ..ingest.images import decoder_id

        if os.path.isdir(self.model_id):
            rev = models.model_revision(self.model_id)
        else:  # the commit transformers loaded (a pinned ref such as refs/pr/5 may move)
            rev = getattr(config, "_commit_hash", None)
        if not rev:
            return None
        return (f"{self.model_id}@{rev}; {self.precision}; {torch.device(self.device).type}; "
                f"{decoder_id()}")

    @property
    def feature_dtype(self):
        """The numpy dtype features are cached in: the compute dtype (bf16 as its raw
        16 bits), so that a cache hit gives exactly the scores of a miss."""
        import numpy as np

        return {"fp32": np.dtype("<f4"), "fp16": np.dtype("<f2"), "bf16": np.dtype("<i2")}[
            self.precision]

    def _features_to_numpy(self, emb):
        """One image's ``[L, width]`` features (torch, compute dtype) -> numpy to cache."""
        import torch

        emb = emb.detach().cpu().contiguous()
        if emb.dtype == torch.bfloat16:
            emb = emb.view(torch.int16)
        return emb.numpy().astype(self.feature_dtype, copy=False)

    def _features_from_numpy(self, arr):
        """Cached ``[L, width]`` numpy -> a torch tensor in the compute dtype on the device."""
        import torch

        t = torch.from_numpy(arr.astype(arr.dtype.newbyteorder("="), copy=False))
        if self.dtype == torch.bfloat16:
            t = t.view(torch.bfloat16)
        return t.to(self.device)

    # -- scoring ------------------------------------------------------------------------
    def _tokens(self, texts: Sequence[str]) -> dict[str, Any]:
        # as BlipProcessor tokenizes (no token type ids), padded to the longest text
        enc = self.tokenizer(list(texts), padding="longest", truncation=True,
                             max_length=self.text_max_length, return_tensors="pt",
                             return_token_type_ids=False)
        return {k: v.to(self.device) for k, v in enc.items()}

    def image_embeds(self, pixels):
        """``[n, 3, H, W]`` float32 numpy -> the vision tower's last hidden state
        ``[n, patches + 1, width]`` (a torch tensor on the device)."""
        import torch

        x = torch.from_numpy(pixels).to(self.device, self.dtype)
        with torch.inference_mode():
            return self.model.vision_model(pixel_values=x).last_hidden_state

    def match(self, image_embeds, input_ids, attention_mask):
        """ITM probabilities ``[b]`` of ``b`` (image, text) pairs: ``image_embeds``
        ``[b, L, width]``, ``input_ids`` / ``attention_mask`` ``[b, T]``."""
        import torch

        with torch.inference_mode():
            image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long,
                                    device=image_embeds.device)  # [b, L]
            h = self.model.text_encoder(
                input_ids=input_ids, attention_mask=attention_mask,
                encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask,
            ).last_hidden_state  # [b, T, hidden]
            logits = self.model.itm_head(h[:, 0, :]).float()  # [b, 2]: no match, match
            return torch.softmax(logits, dim=-1)[:, 1].cpu().numpy()

    def score_pixels(self, text: str, pixels):
        """Match probability of ``text`` with each image: ``pixels`` ``[n, 3, H, W]`` -> ``[n]``."""
        import numpy as np

        tok = self._tokens([text])
        out = []
        for s in range(0, len(pixels), BATCH_SIZE):
            emb = self.image_embeds(pixels[s : s + BATCH_SIZE])  # [b, L, width]
            b = emb.shape[0]
            out.append(self.match(emb, tok["input_ids"].expand(b, -1),
                                  tok["attention_mask"].expand(b, -1)))
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)

    def score_texts(self, pixels_one, texts: Sequence[str], batch: int = 32, *, embeds=None):
        """Match probability of one image ``[3, H, W]`` with each of ``texts`` -> ``[m]``
        (the vision tower runs once; not at all when its output ``embeds`` ``[1, L, width]``
        is given, from :meth:`features`)."""
        import numpy as np

        emb = self.image_embeds(pixels_one[None]) if embeds is None else embeds  # [1, L, width]
        out = []
        for s in range(0, len(texts), batch):
            tok = self._tokens(texts[s : s + batch])
            m = tok["input_ids"].shape[0]
            out.append(self.match(emb.expand(m, -1, -1), tok["input_ids"], tok["attention_mask"]))
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)

    def score_files(self, text: str, paths: Sequence[str], *, workers: int = 2,
                    progress: Progress | None = None, cache: Any = None,
                    times: Sequence[float | None] | None = None,
                    video_hashes: Sequence[str | None] | None = None,
                    ) -> tuple[list[float | None], dict[str, str]]:
        """Match probability of ``text`` with each image file, decoded at full size and
        preprocessed as the re-ranker's own processor does (no JPEG draft mode: the scores
        are those of the model on the file; decoding overlaps the model's work).

        ``times``: where one is not None, ``paths[i]`` is a video and what is scored is
        its frame shown at that many seconds (:func:`itrcli.ingest.video.frame_at`, full
        size); ``video_hashes[i]``: that video's content hash when it is known to match the
        file (the library's, while its size and mtime are unchanged), else None.

        ``cache``: a :class:`itrcli.store.feature_cache.FeatureCache` (or None): the vision
        tower's output is looked up by the content hash of the file's bytes as read now (a
        changed file has a new hash), and stored after a miss; a hit skips decoding and
        the vision tower and gives the same scores.  A video frame's key is
        :func:`frame_key` (its video's hash and its time); a frame whose video's hash is
        not known is not cached.  The cache is trimmed to its bound after writing.

        Returns (scores in ``paths`` order, None for files that cannot be read now;
        {path: one-line reason} for those).
        """
        from concurrent.futures import ThreadPoolExecutor

        use = cache if cache is not None and self.cache_namespace else None
        tok = self._tokens([text])
        scores: list[float | None] = [None] * len(paths)
        errors: dict[str, str] = {}
        done = written = 0

        def load(i: int):
            t = times[i] if times is not None else None
            if t is None:
                return self.load_file(paths[i], use)
            return self.load_frame(paths[i], t, video_hashes[i] if video_hashes else None, use)

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            batches = [list(range(s, min(s + BATCH_SIZE, len(paths))))
                       for s in range(0, len(paths), BATCH_SIZE)]
            pending = [pool.submit(load, i) for i in batches[0]] if batches else []
            for n, b in enumerate(batches):
                loaded = [f.result() for f in pending]
                if n + 1 < len(batches):  # decode the next batch while this one runs
                    pending = [pool.submit(load, i) for i in batches[n + 1]]
                ok = []
                for i, (key, pixels, feats, error) in zip(b, loaded):
                    if error is not None:
                        errors[paths[i]] = error
                    else:
                        ok.append((i, key, pixels, feats))
                if ok:
                    written += self._score_batch(tok, ok, scores, use)
                done += len(b)
                if progress is not None:
                    progress(done, len(paths))
        if written:
            cache.trim()
        return scores, errors

    def load_file(self, path: str, cache: Any = None):
        """Worker: a file -> (content hash, pixels ``[3, H, W]`` or None, cached features
        ``[L, width]`` (numpy) or None, one-line error or None).

        The hash is of the bytes read now (a file changed since indexing has a new one);
        on a cache hit the file is not decoded.
        """
        from ..ingest.files import Unreadable, content_hash, read_file
        from ..ingest.images import DecodeError, open_image

        try:
            _st, data = read_file(path)
        except Unreadable as e:
            return None, None, None, str(e)
        key = content_hash(data)
        if cache is not None and self.cache_namespace:
            feats = cache.get(self.cache_namespace, key, self.feature_shape, self.feature_dtype)
            if feats is not None:
                return key, None, feats, None
        try:
            img, meta = open_image(data, name=path)  # full size (no draft): the model's own scores
            return key, self.prep(img, (meta.width, meta.height)), None, None
        except DecodeError as e:
            return None, None, None, str(e)
        except OSError as e:
            return None, None, None, e.strerror or str(e)
        except MemoryError:
            return None, None, None, "not enough memory to decode"

    def load_frame(self, path: str, at: float, video_hash: str | None, cache: Any = None):
        """Worker: a video's frame at ``at`` seconds -> as :meth:`load_file` (the key is
        :func:`frame_key`, None when ``video_hash`` is: then nothing is cached)."""
        from ..ingest.video import VideoError, frame_at

        try:
            key = frame_key(video_hash, at) if video_hash else None
            if key is not None and cache is not None and self.cache_namespace:
                feats = cache.get(self.cache_namespace, key, self.feature_shape,
                                  self.feature_dtype)
                if feats is not None:
                    return key, None, feats, None
            img = frame_at(path, at)  # full size, rotation applied: the model's own scores
            return key, self.prep(img), None, None
        except ImportError:  # PyAV uninstalled since the video was indexed
            return None, None, None, "reading a video frame needs PyAV: pip install 'itr-search[video]'"
        except VideoError as e:
            return None, None, None, str(e)
        except OSError as e:
            return None, None, None, e.strerror or str(e)
        except MemoryError:
            return None, None, None, "not enough memory to decode"

    def features(self, key: str, pixels, feats, cache: Any = None):
        """One image's vision features ``[1, L, width]`` on the device: ``feats`` (from the
        cache) as they are, else the vision tower on ``pixels`` (then cached)."""
        import torch

        if feats is not None:
            with torch.inference_mode():
                return self._features_from_numpy(feats)[None]
        emb = self.image_embeds(pixels[None])  # [1, L, width]
        if cache is not None and self.cache_namespace and tuple(emb.shape[1:]) == self.feature_shape:
            cache.put(self.cache_namespace, key, self._features_to_numpy(emb[0]))
        return emb

    def _score_batch(self, tok, ok, scores, cache) -> int:
        """Score one batch ``ok`` of (index, content hash, pixels or None, cached features
        or None) into ``scores``: the vision tower runs on the misses only (and they are
        cached); returns how many were written to ``cache``."""
        import numpy as np
        import torch

        misses = [j for j, (_, _, pixels, _) in enumerate(ok) if pixels is not None]
        fresh, written = {}, 0
        if misses:
            emb = self.image_embeds(np.stack([ok[j][2] for j in misses]))  # [m, L, width]
            for r, j in enumerate(misses):
                fresh[j] = emb[r]
                if (cache is not None and ok[j][1] is not None
                        and tuple(emb.shape[1:]) == self.feature_shape):
                    cache.put(self.cache_namespace, ok[j][1], self._features_to_numpy(emb[r]))
                    written += 1
        with torch.inference_mode():
            embeds = torch.stack([fresh[j] if j in fresh else self._features_from_numpy(ok[j][3])
                                  for j in range(len(ok))])  # [b, L, width]
        b = embeds.shape[0]
        probs = self.match(embeds, tok["input_ids"].expand(b, -1),
                           tok["attention_mask"].expand(b, -1))  # [b]
        for (i, _, _, _), p in zip(ok, probs):
            scores[i] = float(p)
        return written


class SlowProgress:
    """``progress(done, total)`` that stays quiet for ``after`` seconds, then prints
    ``itr: re-ranked done/total images`` on stderr (one updating line on a terminal)."""

    def __init__(self, after: float = 1.5, stream=None) -> None:
        import sys

        self.t0 = time.monotonic()
        self.after = after
        self.stream = stream or sys.stderr
        self.shown = False

    def __call__(self, done: int, total: int) -> None:
        if time.monotonic() - self.t0 < self.after:
            return
        tty = getattr(self.stream, "isatty", lambda: False)()
        line = f"itr: re-ranked {done}/{total} images"
        if tty:
            self.stream.write("\r" + line + ("\n" if done >= total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self.shown = True
