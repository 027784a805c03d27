"""GenEval-style yes/no questions from a prompt's GenEval metadata (Ghosh et al. 2023, "GenEval").

GenEval's metadata lines (``geneval/test_metadata.jsonl`` in flow_grpo) carry ``include`` — objects that must
be there: {"class", "count", "color"?, "position"?: [relation, index of the other object]} — and ``exclude``
— {"class", "count"}: there must be fewer than ``count``. Each requirement becomes one question with the
answer that passes it:

    include {class c, count n}      "Is there a c in the image?" (n = 1) / "Are there at least n c in the image?"  -> yes
      + color k                     "Is the c k?"                                                                  -> yes
      + position [r, j]             "Is the c r the <class of include[j]>?"                                        -> yes
    exclude {class c, count n}      "Are there at least n c in the image?"                                         -> no

The ``vlm`` reward with ``args.mode: geneval`` asks them and scores the mean probability of the passing
answers.
"""

from __future__ import annotations

from typing import List, Tuple


def _count_question(cls: str, count: int) -> str:
    return f"Is there a {cls} in the image?" if count <= 1 else f"Are there at least {count} {cls} in the image?"


def geneval_questions(metadata: dict) -> List[Tuple[str, bool]]:
    """[(question, the passing answer is "yes")] for one prompt's GenEval metadata; [] when it has none."""
    include, exclude = metadata.get("include") or [], metadata.get("exclude") or []
    out: List[Tuple[str, bool]] = []
    for item in include:
        cls = item["class"]
        out.append((_count_question(cls, int(item.get("count", 1))), True))
        if item.get("color"):
            out.append((f"Is the {cls} {item['color']}?", True))
        if item.get("position"):
            relation, other = item["position"]
            out.append((f"Is the {cls} {relation} the {include[int(other)]['class']}?", True))
    for item in exclude:
        out.append((_count_question(item["class"], int(item.get("count", 1))), False))
    return out
