"""What a ``save_pretrained`` folder holds, read without importing torch or transformers.

The folder is trusted only as far as its files are data: ``config.json`` (JSON) and
``*.safetensors`` (tensors). Pickled weights (``pytorch_model.bin``) and custom modelling
code (``auto_map`` / ``trust_remote_code``) run code, so they need ``--trust-remote-code``.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from retool.errors import ConversionError, TrustRequired, UsageError

#: task -> the transformers Auto class that loads it
TASKS = {
    "feature-extraction": "AutoModel",
    "sequence-classification": "AutoModelForSequenceClassification",
    "image-classification": "AutoModelForImageClassification",
    "text-generation": "AutoModelForCausalLM",
    "text2text-generation": "AutoModelForSeq2SeqLM",
}
#: model_type values exported as text2text-generation (converter/hf/seq2seq.py); Whisper (speech) is not one
TEXT2TEXT_TYPES = ("t5", "mt5", "bart", "mbart", "marian")
_SUFFIX_TASKS = (
    ("ForCausalLM", "text-generation"), ("LMHeadModel", "text-generation"),
    ("ForSequenceClassification", "sequence-classification"),
    ("ForImageClassification", "image-classification"),
    ("Model", "feature-extraction"),
)
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def is_hf_folder(path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file()


@dataclass(frozen=True)
class HFFolder:
    path: Path
    config: dict
    safetensors: tuple[Path, ...]
    pickles: tuple[Path, ...]
    custom_code: bool

    @property
    def architectures(self) -> list[str]:
        return list(self.config.get("architectures") or [])

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", "?"))


def read_folder(path) -> HFFolder:
    p = Path(path)
    cfg_path = p / "config.json"
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"{cfg_path}: cannot read the model config ({exc}); re-save the model with "
                         f"save_pretrained") from None
    if not isinstance(config, dict):
        raise UsageError(f"{cfg_path}: is not a JSON object; re-save the model with save_pretrained")
    st = tuple(sorted(p.glob("*.safetensors")))
    pk = tuple(sorted(f for f in p.iterdir() if f.name in PICKLE_WEIGHTS or
                      (f.name.startswith("pytorch_model-") and f.suffix == ".bin")))
    custom = bool(config.get("auto_map")) or bool(config.get("trust_remote_code")) or any(p.glob("*.py"))
    return HFFolder(p, config, st, pk, custom)


def check_loadable(folder: HFFolder, trust_remote_code: bool) -> None:
    """Refuse what would run code, and folders without weights, with one line each."""
    p = folder.path
    if folder.custom_code and not trust_remote_code:
        if folder.config.get("auto_map") or folder.config.get("trust_remote_code"):
            what = f"the config asks for custom model code ({'auto_map' if folder.config.get('auto_map') else 'trust_remote_code'})"
        else:
            what = f"the folder holds Python code ({next(p.glob('*.py')).name})"
        raise TrustRequired(f"{p}: {what}; loading it runs Python from the folder. Re-run with "
                            f"--trust-remote-code if you trust its origin")
    if not folder.safetensors:
        if folder.pickles:
            if not trust_remote_code:
                raise TrustRequired(
                    f"{p}: holds weights only as {folder.pickles[0].name}, a pickle (loading it can run code). "
                    f"Re-save them with save_pretrained(safe_serialization=True), or re-run with "
                    f"--trust-remote-code if you trust its origin")
            return
        raise UsageError(f"{p}: has config.json but no weights (*.safetensors); save the model with "
                         f"model.save_pretrained(folder) and convert that folder")


def task_of(arch: str) -> str | None:
    return next((t for suffix, t in _SUFFIX_TASKS if arch.endswith(suffix)), None)


def infer_task(folder: HFFolder, task: str | None = None) -> str:
    """``task`` if given, else from the config's ``architectures``."""
    if task:
        if task not in TASKS:
            raise UsageError(f"--task {task!r}: use one of {', '.join(TASKS)}")
        return task
    archs = folder.architectures
    if is_text2text(folder):
        return "text2text-generation"
    for arch in archs:
        for suffix, t in _SUFFIX_TASKS:
            if arch.endswith(suffix):
                return t
    if is_encoder_decoder(folder):
        raise ConversionError(encoder_decoder_message(folder))
    named = f"architectures {archs}" if archs else "no 'architectures' entry"
    raise ConversionError(f"{folder.path / 'config.json'}: cannot infer the task ({named}); "
                          f"pass --task ({', '.join(TASKS)})")


def is_encoder_decoder(folder: HFFolder) -> bool:
    return bool(folder.config.get("is_encoder_decoder"))


def is_text2text(folder: HFFolder) -> bool:
    """An encoder-decoder retool exports (T5, BART, Marian, MBart ``*ForConditionalGeneration`` / ``*MTModel``)."""
    return (is_encoder_decoder(folder) and folder.model_type in TEXT2TEXT_TYPES and
            any(a.endswith(("ForConditionalGeneration", "MTModel")) for a in folder.architectures))


#: tasks whose export needs only the encoder's inputs; an encoder-decoder needs decoder inputs too
ENCODER_ONLY_TASKS = ("feature-extraction",)


def encoder_decoder_message(folder: HFFolder, task: str | None = None) -> str:
    """One line: why this encoder-decoder is not converted as asked, and what to do instead."""
    arch = folder.architectures[0] if folder.architectures else folder.model_type
    family = re.sub(r"(ForConditionalGeneration|Model)$", "", arch)
    if task:
        why = f"--task {task} would need decoder inputs too"
        if is_text2text(folder):
            why += "; convert it without --task (or with --task text2text-generation) to export encoder and decoder"
    else:
        why = (f"retool exports the encoder-decoders {', '.join(TEXT2TEXT_TYPES)} (text2text-generation), "
               f"not model_type {folder.model_type!r} yet")
    encoder = f"{family}EncoderModel"
    alone = (f"to export its encoder alone, save transformers.{encoder}.from_pretrained(folder) with save_pretrained "
             f"and convert that folder" if _has_encoder_class(encoder) else
             "to export its encoder alone, save the model's get_encoder() in a folder of its own")
    whole = "" if task else ", or export the whole model with Optimum (optimum-cli export onnx)"
    return f"{folder.path / 'config.json'}: {arch} is an encoder-decoder ({why}); {alone}{whole}"


def _has_encoder_class(name: str) -> bool:
    try:
        import transformers  # lazy: names resolve without importing torch
    except ImportError:
        return False
    return hasattr(transformers, name)
