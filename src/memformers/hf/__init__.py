"""Give a pretrained Hugging Face causal LM a long memory (Memorizing Transformers sec. 3.3).

The paper's "minor change" as one call, for GPT-2 and the Llama family (Llama,
Mistral, Qwen2) in ``transformers`` 5.x::

    model = AutoModelForCausalLM.from_pretrained("gpt2")
    add_memory(model, kind="knn", layers=[8], capacity=65536)   # or kind="infini", or
                                                # kind="knnlm" (kNN-LM, no layers, no training)
    memorize(model, tok(book, return_tensors="pt").input_ids)   # fills the memory
    out = model.generate(**tok(question, return_tensors="pt"), max_new_tokens=40)
    save_memory(model, "book.mem"); model.save_pretrained("gpt2-knn")

Modules:
  retrofit.py   the memory-augmented attention wrappers, ``add_memory``, writing control
  persist.py    ``load_pretrained``; ``save_memory`` / ``load_memory`` (memory-mapped) are
                those of every memformers model (``memformers.memory.persist``)
  lm.py         the trainer's model contract around a retrofitted model (``finetune``)
  cli.py        ``memformers memorize`` / ``memformers ask``
"""

from memformers.hf.persist import load_pretrained
from memformers.hf.retrofit import (
    SUPPORTED_MODEL_TYPES,
    TRANSFORMERS_RANGE,
    add_memory,
    knnlm_of,
    memorize,
    memory_layers,
    reset_memory,
    writing,
)
from memformers.memory.persist import load_memory, save_memory

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "TRANSFORMERS_RANGE",
    "add_memory",
    "knnlm_of",
    "load_memory",
    "load_pretrained",
    "memorize",
    "memory_layers",
    "reset_memory",
    "save_memory",
    "writing",
]
