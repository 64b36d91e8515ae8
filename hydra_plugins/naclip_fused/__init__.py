"""naclip's Hydra plugins: ``hydra/launcher=fused`` (:mod:`naclip.sweep`), ``fused_slurm``, ``fused_submitit_local``."""
