"""A stand-in instruction-following LLM for the toy world, as a ``lens_fast.chat_server``
handler (``--handler lens_fast.toy.reasoner_llm:answer``): deterministic, instant, and
sensitive to the system prompt in the way the search needs to be tested.

As a rewriter it follows the rules of the system prompt it is given, recognised by
keywords: a rule about *where* objects are adds each object's grid place, one about
*size* its size, one about *colour* a colour for every object (drawn when the request
names none; a colour the request names is always kept), one about the *background* the
background; it writes the toy world's
layout caption with just those parts (``toy.rewrite`` draws what the request leaves
open, seeded by the request). With no such rule it returns the request unchanged.

As the search's operator (a system prompt starting with ``search.OPERATOR_MARKER``) it
edits the rule set to edit (the last one shown), or merges the two of a crossover, by
the instruction's first word: "Add" adds the first rule of ``TOY_RULES`` it lacks,
"Remove" drops the last rule, anything else rephrases the first rule.
"""
from __future__ import annotations

import hashlib
import re

from .captions import layout_caption
from .rewrite import rewrite_scene
from ..reasoner.search import OPERATOR_MARKER, parse_rules

TOY_RULES = (
    "Say where every object is on the three by three grid: top, middle or bottom, and left, centre or right.",
    "Give every object a size, small or large.",
    "Give every object a colour, choosing one when the request names none.",
    "End with the background, such as 'on plain white'.",
)
_FEATURES = {"place": re.compile(r"\bwhere\b|\bplace|\bposition", re.I), "size": re.compile(r"\bsize", re.I),
             "colour": re.compile(r"\bcolou?r", re.I), "background": re.compile(r"\bbackground", re.I)}


def _system_and_user(request: dict):
    system = " ".join(m.get("content", "") for m in request.get("messages", []) if m.get("role") == "system")
    user = [m.get("content", "") for m in request.get("messages", []) if m.get("role") == "user"]
    return system, (user[-1] if user else "")


def rewrite(system: str, user: str) -> str:
    wanted = {name for name, pattern in _FEATURES.items() if pattern.search(system)}
    if not wanted:
        return user
    try:
        scene = rewrite_scene(user, int(hashlib.sha256(user.encode()).hexdigest()[:8], 16))
    except ValueError:
        return user  # outside the toy grammar: nothing to add
    full = layout_caption(scene)  # "top left small red circle, ..., on plain white"
    *objects, background = [part.strip() for part in full.split(",")]
    words = []
    for obj, spec in zip(objects, scene.objects):
        place = obj[: obj.index(spec.size)].strip() if spec.size in obj else ""
        parts = [place if "place" in wanted else "", spec.size if "size" in wanted else "",
                 spec.color if "colour" in wanted or spec.color in user.lower().split() else "", spec.shape]
        words.append(" ".join(p for p in parts if p))
    text = ", ".join(words)
    return f"{text}, {background}" if "background" in wanted else text


def operate(user: str) -> str:
    blocks = re.split(r"\n\s*\n", user)
    rule_blocks = []
    for block in blocks:
        try:
            rule_blocks.append(parse_rules(block, max_rules=64))
        except ValueError:
            continue
    if not rule_blocks:
        return "I found no rule set to edit."
    if "Combine A and B" in user and len(rule_blocks) >= 2:
        merged = list(dict.fromkeys(rule_blocks[-2] + rule_blocks[-1]))
        return "\n".join(f"- {r}" for r in merged)
    rules = list(rule_blocks[-1])
    instruction = user.rsplit("Edit rule set", 1)[-1].split(".", 1)[-1].strip()
    if instruction.startswith("Add"):
        missing = [r for r in TOY_RULES if r not in rules]
        rules += missing[:1] or ["Be literal."]
    elif instruction.startswith("Remove") and len(rules) > 1:
        rules = rules[:-1]
    else:
        rules[0] = "Always: " + rules[0] if not rules[0].startswith("Always: ") else rules[0][len("Always: "):]
    return "\n".join(f"- {r}" for r in rules)


def answer(request: dict) -> str:
    system, user = _system_and_user(request)
    if system.startswith(OPERATOR_MARKER):
        return operate(user)
    return rewrite(system, user)
