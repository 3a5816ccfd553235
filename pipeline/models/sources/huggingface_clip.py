"""Hugging Face CLIP and SigLIP for zero-shot tagging (`source: huggingface, task: zero_shot`, or auto for a
zero-shot architecture): the vocabulary encoded by the model's text tower and tokenizer, images by its image tower
with its image processor mapped onto our preprocessing (as for classifiers, huggingface.py)."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.io.storage import Storage
from pipeline.job.config import ModelConfig
from pipeline.job.errors import UserError
from pipeline.models.sources import digest
from pipeline.models.sources.zero_shot import ZeroShot, label_embeddings, vocabulary, zero_shot_spec
from pipeline.models.spec import ModelSpec


def resolve_zero_shot(hf, transformers, cfg: ModelConfig, config, storage: Storage) -> ModelSpec:
    """`hf`: the huggingface source module, whose loading, options and preprocessing this shares."""
    labels = vocabulary(cfg, storage)
    model = _towers(hf, transformers, cfg, config)
    encode = TextTower(model, hf._load(transformers.AutoTokenizer, cfg, "tokenizer"), config)
    bias = getattr(model, "logit_bias", None)
    override = cfg.preprocess.model_dump(exclude_none=True)
    return zero_shot_spec(cfg, labels, label_embeddings(encode, labels, cfg.zero_shot.templates),
                          scale=float(model.logit_scale.detach().exp()),
                          bias=float(bias.detach().reshape(-1)[0]) if bias is not None else None,
                          weights_id=digest(model.state_dict()),
                          preprocess=hf._classifier_preprocess(hf._processor(transformers, cfg), cfg.name, override),
                          options=hf._options(cfg, config), visual=lambda spec: ImageTower(model))


def build_zero_shot(hf, transformers, cfg: ModelConfig, spec: ModelSpec) -> nn.Module:
    return ZeroShot(ImageTower(hf._weights(transformers.AutoModel, cfg)), spec).eval()


def encode_texts(hf, transformers, cfg: ModelConfig, texts: list[str]):
    """Unit text embeddings for `pipeline search`."""
    config = hf._load(transformers.AutoConfig, cfg, "model config")
    model = _towers(hf, transformers, cfg, config)
    encode = TextTower(model, hf._load(transformers.AutoTokenizer, cfg, "tokenizer"), config)
    with torch.inference_mode():
        return nn.functional.normalize(encode(texts).float(), dim=-1).numpy()


def _towers(hf, transformers, cfg: ModelConfig, config) -> nn.Module:
    model = hf._weights(transformers.AutoModel, cfg)
    if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
        raise UserError(f"model.task: {cfg.name} ({config.model_type}) has no text and image towers; zero-shot "
                        "tagging needs a CLIP or SigLIP model")
    return model


def pooled(output) -> torch.Tensor:
    """transformers 5 returns the projected features as `pooler_output`; 4.x returned the tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ImageTower(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pooled(self.model.get_image_features(pixel_values=x))


class TextTower:
    """Prompts -> text features. SigLIP was trained on prompts padded to the full length, CLIP on unpadded ones."""

    def __init__(self, model: nn.Module, tokenizer, config):
        self.model, self.tokenizer = model, tokenizer
        self.padding = "max_length" if "siglip" in config.model_type else True

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts, padding=self.padding, truncation=True, return_tensors="pt")
        with torch.inference_mode():
            return pooled(self.model.get_text_features(**tokens))
