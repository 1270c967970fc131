"""Llama Guard-style safety classification: taxonomies, prompts, scoring, training data, middleware."""

from vlkit.guard.classify import Guard, GuardMiddleware, Verdict, parse_answer
from vlkit.guard.prompt import build_prompt, guard_prompt, target_text
from vlkit.guard.taxonomy import BUILTIN, Category, Taxonomy, load_taxonomy

__all__ = ["Guard", "GuardMiddleware", "Verdict", "parse_answer", "build_prompt", "guard_prompt", "target_text",
           "BUILTIN", "Category", "Taxonomy", "load_taxonomy"]
