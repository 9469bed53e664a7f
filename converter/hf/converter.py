"""Registry entry for Hugging Face ``save_pretrained`` folders (``retool[hf]``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from retool.converter.base import Converter, ConvertRequest, SourceModel
from retool.converter.hf.folder import TASKS, check_loadable, infer_task, is_hf_folder, read_folder
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
        require("torch", "hf", "convert Hugging Face models")
        transformers = require("transformers", "hf", "convert Hugging Face models")
        model = load_model(transformers, folder, task, request.trust_remote_code)
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
    kwargs: dict = dict(local_files_only=True, trust_remote_code=trust_remote_code)
    kwargs["use_safetensors"] = bool(folder.safetensors)
    kwargs["dtype"] = "float32"  # verification and export run in fp32; a bf16 folder is upcast
    try:
        model = auto.from_pretrained(str(folder.path), **kwargs)
    except RetoolError:
        raise
    except Exception as exc:
        raise ConversionError(f"{folder.path}: transformers cannot load it as {task} "
                              f"({first_line(exc, 300, with_type=True)})") from None
    return model.eval()
