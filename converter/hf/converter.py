"""Registry entry for Hugging Face ``save_pretrained`` folders (``retool[hf]``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from retool.converter.base import Converter, ConvertRequest, SourceModel
from retool.converter.hf.folder import (ENCODER_ONLY_TASKS, TASKS, check_loadable, encoder_decoder_message,
                                       infer_task, is_encoder_decoder, is_hf_folder, is_text2text, read_folder,
                                       task_of)
from retool.deps import require
from retool.errors import ConversionError, RetoolError, first_line


class HFConverter(Converter):
    name = "hf"
    extra = "hf"

    def sniff(self, source: Any) -> str | None:
        if isinstance(source, (str, Path)) and is_hf_folder(source):
            return f"{Path(source).name}/ holds config.json (a Hugging Face save_pretrained folder)"
        return None

    def load(self, request: ConvertRequest) -> SourceModel:
        path = Path(request.source)
        if not is_hf_folder(path):
            raise ConversionError(f"{path}: not a Hugging Face model folder (no config.json); "
                                  f"save the model with save_pretrained")
        folder = read_folder(path)
        check_loadable(folder, request.trust_remote_code)
        task = infer_task(folder, request.options.get("task"))
        if task in ENCODER_ONLY_TASKS and is_encoder_decoder(folder):
            raise ConversionError(encoder_decoder_message(folder, task))
        if task == "text2text-generation" and not is_text2text(folder):
            arch = folder.architectures[0] if folder.architectures else folder.model_type
            raise ConversionError(f"{path / 'config.json'}: --task text2text-generation is for the encoder-decoders "
                                  f"T5, BART, Marian and MBart (*ForConditionalGeneration); {arch} is not one: "
                                  f"leave --task out to infer the task")
        require("torch", "hf", "convert Hugging Face models")
        transformers = require("transformers", "hf", "convert Hugging Face models")
        model = load_model(transformers, folder, task, request.trust_remote_code)
        if task == "text2text-generation":
            from retool.converter.hf.seq2seq import Seq2SeqSource

            return Seq2SeqSource(model, folder, request)
        if task == "text-generation":
            from retool.converter.hf.decoder import DecoderSource

            return DecoderSource(model, folder, request)
        from retool.converter.hf.encoder import EncoderSource

        return EncoderSource(model, folder, task, request)


def load_model(transformers, folder, task: str, trust_remote_code: bool = False):
    """The folder's model in eval mode, weights from safetensors unless pickles are trusted."""
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # stderr carries our progress lines
    auto = getattr(transformers, TASKS[task])
    arch = folder.architectures[0] if folder.architectures else ""
    if task_of(arch) == task and isinstance(getattr(transformers, arch, None), type):
        # the folder's own class: the Auto class maps T5EncoderModel's model_type to T5Model
        auto = getattr(transformers, arch)
    kwargs: dict = dict(local_files_only=True, trust_remote_code=trust_remote_code)
    kwargs["use_safetensors"] = bool(folder.safetensors)
    kwargs["dtype"] = "float32"  # verification and export run in fp32; a bf16 folder is upcast
    try:
        model, info = auto.from_pretrained(str(folder.path), output_loading_info=True, **kwargs)
    except RetoolError:
        raise
    except Exception as exc:
        raise ConversionError(f"{folder.path}: transformers cannot load it as {task} "
                              f"({first_line(exc, 300, with_type=True)})") from None
    check_weights(folder, task, type(model).__name__, info)
    return model.eval()


def _keys(info, name) -> list[str]:
    return sorted(str(k[0] if isinstance(k, tuple) else k) for k in (info.get(name) or ()))


def check_weights(folder, task: str, arch: str, info: dict) -> None:
    """Refuse weights that do not fit the architecture: a missing weight would be exported as its random
    initialisation, and parity would pass (the reference is the same random model).

    Unexpected weights are refused too (another model's file, an encoder-decoder forced through a
    decoder), except a head dropped on purpose: ``--task feature-extraction`` on a folder whose
    architecture is a head class loads its base model and leaves the head's weights out."""
    missing, unexpected, mismatched = (_keys(info, n) for n in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    archs = folder.architectures
    head_dropped = task == "feature-extraction" and bool(archs) and not any(a.endswith("Model") for a in archs)
    if head_dropped:
        unexpected = []
    if not (missing or unexpected or mismatched):
        return
    parts = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", mismatched)):
        if keys:
            parts.append(f"{len(keys)} {what} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
    files = ", ".join(f.name for f in folder.safetensors or folder.pickles)
    raise ConversionError(f"{folder.path}: its weights ({files}) do not fit {arch} ({task}): {'; '.join(parts)}; "
                          f"these are another model's weights or the wrong --task: save the model with "
                          f"save_pretrained and convert that folder")
