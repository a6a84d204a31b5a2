from memformers.model.transformer import MemformerLM, lm_loss

__all__ = ["MemformerLM", "lm_loss"]
