"""The name job specs and docs give the demo's model, `pipeline.demo:build_lenet`; the demo lives in pipeline/dev/."""

from pipeline.dev.demo import build_lenet

__all__ = ["build_lenet"]
