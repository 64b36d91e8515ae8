"""naclip's Hydra plugins: ``hydra/launcher=fused`` (see :mod:`naclip.sweep`)."""
