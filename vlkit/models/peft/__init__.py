"""Parameter-efficient layers that keep the base checkpoint's keys: their parameters live in their own module and
act on a frozen LLM through hooks, so the LLM's `state_dict()` is unchanged until they are merged into it."""

from vlkit.models.peft.bias_scale import BiasScale, plain_causal_lm, trainable_counts

__all__ = ["BiasScale", "plain_causal_lm", "trainable_counts"]
