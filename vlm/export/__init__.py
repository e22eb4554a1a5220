"""Export: a training checkpoint → a portable directory that stock peft/transformers (and this project)
load, and back. `write` makes it, `load` rebuilds the whole captioner from it (confined to the directory,
safetensors and JSON only), `merge` folds LoRA into a de-quantized base, `card` renders the model card.

    python -m vlm.export checkpoint=outputs/train/stage2_lora/checkpoints/last output=outputs/export [merge=true]
"""

from vlm.export.format import ExportError, read_export
from vlm.export.load import load_exported
from vlm.export.write import export

__all__ = ["ExportError", "export", "load_exported", "read_export"]
