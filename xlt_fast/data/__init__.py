"""Offline multilingual data (Bible corpus and genre task, FreeDict lexicons), file loaders,
online ``datasets`` loaders and tokenisation helpers."""
