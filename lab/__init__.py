"""ddpm-lab: ablation experiments for conditional DDPMs on i-CLEVR.

    from lab import load_pipeline     # a trained model as a diffusers pipeline (lab/pipeline.py)
"""
import importlib


def __getattr__(name):  # PEP 562: `import lab.config` stays free of torch; the pipeline loads when asked for
    if name in ("load_pipeline", "ConditionalDDPMPipeline"):
        return getattr(importlib.import_module("lab.pipeline"), name)
    raise AttributeError(f"module 'lab' has no attribute {name!r}")
