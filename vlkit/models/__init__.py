"""Model builders: LLMs, vision towers (and, later, VPGs and fusion)."""
