"""How visual prompts enter the LLM."""
