"""Checkpoints laid out the way each model family ships them, built offline for tests: a tiny SigLIP
tokenizer, a Hugging Face hub cache folder, an open_clip `local-dir:` / `hf-hub:` repository."""

from __future__ import annotations

import shutil
from pathlib import Path

SIGLIP_TOKENIZER_REPO = "tuneclip-engine/tiny-siglip-tokenizer"  # hf_tokenizer_name of models/configs/tiny-siglip.json
_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def save_tiny_tokenizer(folder: Path, *, vocab_size: int = 256) -> Path:
    """A word-level Hugging Face tokenizer (pad 0, eos appended, as SigLIP's) trained on the synthetic
    captions' words, saved with `save_pretrained` into `folder`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from engine.demo.synthetic import COLORS, FULL_CAPTIONS, PARTIAL_CAPTIONS, SHAPES

    corpus = [*COLORS, *SHAPES, *FULL_CAPTIONS, *PARTIAL_CAPTIONS]
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(corpus, trainers.WordLevelTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"]))
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=16)
    fast.save_pretrained(folder)
    return folder


def put_in_hub_cache(cache: Path, repo_id: str, folder: Path, *, absent: tuple[str, ...] = ("config.json",)) -> Path:
    """Lay the files of `folder` out as huggingface_hub's cache holds repo `repo_id` at `main`
    (`models--org--name/refs/main`, `snapshots/<commit>/...`); returns the snapshot folder.

    `absent` files get the `.no_exist/<commit>/` markers huggingface_hub writes when an online lookup
    found them missing (transformers' AutoTokenizer asks for config.json, which tokenizer-only repos lack).
    """
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / _COMMIT
    shutil.copytree(folder, snapshot, dirs_exist_ok=True)
    (repo / ".no_exist" / _COMMIT).mkdir(parents=True, exist_ok=True)
    for name in absent:
        (repo / ".no_exist" / _COMMIT / name).touch()
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(_COMMIT)
    return snapshot
