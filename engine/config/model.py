"""The `model` section: which open_clip model, from which local weights, with which preprocessing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.config.choices import Interpolation, Precision, ResizeMode
from engine.config.fields import choice_errors, setting


@dataclass
class ModelConfig:
    """Which open_clip model, from which local weights, with which preprocessing."""

    name: str = setting("tiny-vit", "open_clip architecture, shipped config name, JSON path, or a local transformers "
                        "CLIPModel / SiglipModel folder (config.json + model.safetensors)", osr=True)
    weights: str | None = setting(None, "local .safetensors / .bin / .pt, or a transformers CLIPModel / SiglipModel folder "
                                  "(model.name: the folder, or the open_clip architecture it matches); "
                                  "null = random init",
                                  resume="may_change", osr=True)
    pretrained_tag: str | None = setting(
        None, "open_clip pretrained tag the weights were trained as (openai, webli, laion2b_s34b_b79k, dfn5b, ...): "
        "open_clip's pretrained config for it sets mean, std, interpolation, resize mode and the activation", osr=True)
    preset: str | None = setting(None, "former name of pretrained_tag (e.g. dfn5b, openai); same meaning", osr=True)
    mean: list[float] | None = setting(None, "image mean (3 numbers); overrides the tag's", osr=True)
    std: list[float] | None = setting(None, "image std (3 numbers); overrides the tag's", osr=True)
    resize_mode: ResizeMode | None = setting(None, "how images are resized; overrides the tag's", osr=True)
    interpolation: Interpolation | None = setting(None, "resize interpolation; overrides the tag's", osr=True)
    tokenizer: str | None = setting(None, "local folder (or hub id) of a Hugging Face tokenizer; null = the model's")
    precision: Precision = setting("fp32", "training precision (bf16: autocast where the device supports it)",
                                   osr=True)
    grad_checkpointing: bool = setting(False, "recompute activations in backward (less memory, more time)")
    lock_image: bool = setting(False, "freeze the image tower (open_clip's --lock-image) but its last "
                               "lock_image_unlocked_groups groups; frozen weights are exported unchanged", osr=True)
    lock_image_unlocked_groups: int = setting(
        0, "with lock_image: the image tower's last N lock groups stay trainable (open_clip's groups: embeddings, "
        "each block, the last block with the final norm, the projection; a timm trunk's: timm's)", osr=True)
    lock_text: bool = setting(False, "freeze the text tower (open_clip's --lock-text) but its last "
                              "lock_text_unlocked_layers groups", osr=True)
    lock_text_unlocked_layers: int = setting(
        0, "with lock_text: the text tower's last N lock groups stay trainable (open_clip's "
        "--lock-text-unlocked-layers: embeddings, each block, the last block with the final norm, the projection)",
        osr=True)

    @property
    def tag(self) -> str | None:
        """The pretrained tag (`pretrained_tag`, or the older `preset`)."""
        return self.pretrained_tag or self.preset

    def has_own_weights(self) -> bool:
        """Whether `name` brings its weights (an `hf-hub:` / `local-dir:` name, a transformers model folder)."""
        return self.name.startswith(("hf-hub:", "local-dir:")) or (Path(self.name) / "config.json").is_file()

    def locks(self) -> dict[str, int]:
        """Tower ("image" / "text") -> its number of unlocked last groups, for each tower to lock."""
        return {kind: unlocked for kind, locked, unlocked in (
            ("image", self.lock_image, self.lock_image_unlocked_groups),
            ("text", self.lock_text, self.lock_text_unlocked_layers)) if locked}

    def build_kwargs(self) -> dict:
        """Keyword arguments of `models.build_model` for this section (besides the name)."""
        preprocess = {key: getattr(self, key) for key in ("mean", "std", "resize_mode", "interpolation")}
        return {"weights": self.weights, "pretrained_tag": self.tag, "tokenizer": self.tokenizer,
                "preprocess": {key: value for key, value in preprocess.items() if value is not None}}

    def errors(self) -> list[str]:
        out = []
        if self.preset and self.pretrained_tag and self.preset != self.pretrained_tag:
            out.append(f"model.preset {self.preset!r} and model.pretrained_tag {self.pretrained_tag!r} disagree; "
                       "keep only model.pretrained_tag")
        out.extend(choice_errors(self, "model"))
        for key in ("mean", "std"):
            value = getattr(self, key)
            if value is not None and (len(value) != 3 or not all(isinstance(v, (int, float)) for v in value)):
                out.append(f"model.{key} must be 3 numbers (one per RGB channel), got {value!r}")
        if self.std is not None and len(self.std) == 3 and not all(v > 0 for v in self.std):
            out.append(f"model.std must be > 0, got {self.std!r}")
        if not self.name:
            out.append("model.name must name an open_clip architecture or a JSON config")
        for key, locked in (("lock_image_unlocked_groups", self.lock_image),
                            ("lock_text_unlocked_layers", self.lock_text)):
            value = getattr(self, key)
            if value < 0:
                out.append(f"model.{key} must be >= 0 (0 = the whole tower frozen), got {value}")
            elif value > 0 and not locked:
                tower = key.split("_")[1]
                out.append(f"model.{key}={value} needs model.lock_{tower}=true (it says which groups of the locked "
                           f"tower stay trainable); set model.lock_{tower}=true or remove model.{key}")
        if self.weights is not None and not Path(self.weights).exists():
            out.append(f"model.weights: file {self.weights} does not exist; give a local checkpoint path")
        return out
