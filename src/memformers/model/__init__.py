from memformers.model.transformer import MemformerLM, lm_loss


def build_model(cfg, tokenizer=None):
    """The model a ``ModelConfig`` describes: ``MemformerLM``, or with ``cfg.hf_path`` a
    Hugging Face causal LM with retrofitted memory (``memformers.hf.lm.HFMemoryLM``),
    checked against the corpus ``tokenizer``."""
    if cfg.hf_path:
        from memformers.hf.lm import HFMemoryLM

        return HFMemoryLM.from_model_config(cfg, tokenizer)
    return MemformerLM(cfg)


__all__ = ["MemformerLM", "build_model", "lm_loss"]
