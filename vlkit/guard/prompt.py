"""Guard prompts in the documented Llama Guard layout.

    Task: Check if there is unsafe content in '{Role}' messages in conversations according our safety
    policy with the below categories.
    <BEGIN UNSAFE CONTENT CATEGORIES> ... <END UNSAFE CONTENT CATEGORIES>
    <BEGIN CONVERSATION> User: ... Agent: ... <END CONVERSATION>
    Provide your safety assessment for {Role} in the above conversation:           (v1)
    Provide your safety assessment for ONLY THE LAST {Role} message in the above conversation:  (v2, v3)
    - First line must read 'safe' or 'unsafe'.
    - If unsafe, a second line must include a comma-separated list of violated categories.

wrapped as ``[INST] ... [/INST]`` (v1, v2), or as one user message in the tokenizer's chat template
(`chat`); `native` hands the conversation to a checkpoint whose own template builds the guard prompt.
The role judged is "User" (prompt classification) or "Agent" (response classification); the
conversation must end with a message of that role.
"""

from __future__ import annotations

from typing import Literal

from vlkit.data.records import message_text
from vlkit.errors import VlkitError
from vlkit.guard.taxonomy import Taxonomy

Role = Literal["User", "Agent"]
ROLE_OF = {"user": "User", "assistant": "Agent"}


def categories_block(tax: Taxonomy) -> str:
    lines = []
    for c in tax.categories:
        lines.append(f"{c.code}: {c.name}.")
        if c.description:
            lines.append(c.description)
        for ex in c.examples:
            lines.append(f"Example ({'unsafe' if ex.unsafe else 'safe'}): {ex.text}")
    return "\n".join(lines)


def conversation_block(conversation: list[dict], role: Role) -> str:
    if not conversation:
        raise VlkitError("guard: the conversation is empty; give at least one message")
    turns = []
    for i, m in enumerate(conversation):
        who = ROLE_OF.get(m.get("role", ""))
        if who is None:
            raise VlkitError(f"guard: message {i} has role {m.get('role')!r}; use 'user' or 'assistant'")
        turns.append(f"{who}: {message_text(m).strip()}")
    last = ROLE_OF[conversation[-1]["role"]]
    if last != role:
        raise VlkitError(f"guard: judging the {role}, but the conversation ends with a message of the {last}; "
                         f"{'drop the reply' if role == 'User' else 'add the reply to check'}")
    return "\n\n".join(turns)


def guard_prompt(conversation: list[dict], taxonomy: Taxonomy, role: Role = "User", version: int = 3) -> str:
    """The instruction text (not yet wrapped)."""
    if version not in (1, 2, 3):
        raise VlkitError(f"guard: prompt version {version} is unknown; use 1, 2 or 3")
    target = f"{role}" if version == 1 else f"ONLY THE LAST {role} message"
    bullet = "-" if version == 1 else " -"
    return (f"Task: Check if there is unsafe content in '{role}' messages in conversations according our safety "
            "policy with the below categories.\n\n"
            f"<BEGIN UNSAFE CONTENT CATEGORIES>\n{categories_block(taxonomy)}\n<END UNSAFE CONTENT CATEGORIES>\n\n"
            f"<BEGIN CONVERSATION>\n\n{conversation_block(conversation, role)}\n\n<END CONVERSATION>\n\n"
            f"Provide your safety assessment for {target} in the above conversation:\n"
            f"{bullet} First line must read 'safe' or 'unsafe'.\n"
            f"{bullet} If unsafe, a second line must include a comma-separated list of violated categories.")


def wrap(text: str, template: Literal["inst", "chat"] = "inst", tokenizer=None) -> str:
    """`[INST] text [/INST]`, or the tokenizer's chat template with a generation prompt."""
    if template == "inst":
        return f"[INST] {text} [/INST]"
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise VlkitError("guard: template 'chat' needs a tokenizer with a chat template; use template 'inst'")
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)


def build_prompt(conversation: list[dict], taxonomy: Taxonomy, role: Role = "User", version: int = 3,
                 template: Literal["inst", "chat", "native"] = "inst", tokenizer=None) -> str:
    """`inst`/`chat`: vlkit writes the guard prompt (any taxonomy) and wraps it. `native`: the conversation
    goes straight to the checkpoint's own chat template, for checkpoints whose template *is* the guard
    prompt (Llama Guard 3 on the hub); its built-in categories apply and `taxonomy` is not shown."""
    if template == "native":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise VlkitError("guard: template 'native' needs the checkpoint's tokenizer with its chat template")
        conversation_block(conversation, role)  # the same checks on the conversation
        return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    return wrap(guard_prompt(conversation, taxonomy, role, version), template, tokenizer)


def target_text(categories: list[str]) -> str:
    """What the guard should answer: 'safe', or 'unsafe' and the violated codes on a second line."""
    return "unsafe\n" + ",".join(categories) if categories else "safe"
