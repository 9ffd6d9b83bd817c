"""Taxonomy-driven RL prompt sets, the way Lens-RL-8K was built: prompts drawn from the
cross product of a taxonomy's categories x attributes x counts x relations (x settings),
each with its rubric items, and a coverage report.

A taxonomy file (YAML or JSON)::

    name: lens-world
    categories: [circle, square, triangle]        # nouns
    plurals: {}                                    # irregular plurals (default: noun + "s")
    attributes: {color: [red, green, blue]}        # axis -> adjectives
    counts: [2, 3, 4]
    relations: {"left of": "to the left of", above: above}   # relation -> its phrase
    settings: {background: [white, black]}         # optional: "..., on a black background"
    setting_fraction: 0.25                         # share of prompts that name a setting
    kinds: {object: 3, two_objects: 20, count: 20, attribute: 18, relation: 30, attribute_binding: 30}
    global_rule: "The image looks natural: ..."    # the judge's one global rule
    exclude:                                       # combinations never prompted (held out)
      attribute_pairs: [[red, triangle]]           # [value, category]
      relations: [[triangle, "left of", circle]]   # [category, relation, category]

Kinds (GenEval's tags in brackets, which ShapeEval scores): ``object`` "a cat"
[single_object], ``two_objects`` "a cat and a dog" [two_object], ``count`` "three
cats" [counting], ``attribute`` "a red cat" [colors for the color axis], ``relation``
"a cat to the left of a dog" [position], ``attribute_binding`` "a red cat and a blue
dog" [color_attr]. Every prompt carries GenEval-style ``metadata`` and ``rubric``
items in a small fixed grammar ("there is a red cat", "there are exactly three cats",
"the cat is to the left of the dog", "the background is black").

    lens-fast rl-prompts --taxonomy toy --out prompts.jsonl      # the toy world's taxonomy
    lens-fast rl-prompts --taxonomy tax.yaml --out set.jsonl --kinds object --scale 2
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from collections import Counter
from typing import List, Optional, Sequence

import numpy as np
import yaml

from ..cli_checks import OneLineParser
from ..errors import CorruptFile, InvalidValue, MissingFile, OutputExists, run_cli

KIND_TAGS = {"object": "single_object", "two_objects": "two_object", "count": "counting", "attribute": "colors",
             "relation": "position", "attribute_binding": "color_attr"}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine",
                10: "ten"}
TOY_TAXONOMY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "toy", "taxonomy.yaml")


class PromptSetError(CorruptFile):
    """A taxonomy or prompt set that cannot be used; the message names the file and what is wrong."""


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


# -- taxonomy -------------------------------------------------------------------------------
def _string_list(value, what: str, source: str, allow_empty: bool = False) -> List[str]:
    if not isinstance(value, list) or (not value and not allow_empty) or not all(
            isinstance(v, str) and v.strip() for v in value):
        raise PromptSetError(f"taxonomy {source}: {what} must be a {'' if allow_empty else 'non-empty '}list of "
                             f"non-empty strings, got {value!r}")
    if len(set(value)) != len(value):
        raise PromptSetError(f"taxonomy {source}: {what} lists a value twice: {sorted(value)}")
    return list(value)


def load_taxonomy(path: str) -> dict:
    """Read and check a taxonomy file (``toy``: the toy world's); one clear error otherwise."""
    path = TOY_TAXONOMY if path == "toy" else path
    if not os.path.isfile(path):
        raise MissingFile(f"taxonomy {path} does not exist (or pass --taxonomy toy)")
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise PromptSetError(f"taxonomy {path} is not valid YAML/JSON: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise PromptSetError(f"taxonomy {path}: expected a mapping with categories, kinds, ...; got "
                             f"{type(data).__name__}")
    known = {"name", "categories", "plurals", "attributes", "counts", "relations", "settings", "setting_fraction",
             "kinds", "global_rule", "exclude"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise PromptSetError(f"taxonomy {path}: unknown key(s) {unknown}; expected keys from {sorted(known)}")
    tax = {"name": str(data.get("name") or os.path.splitext(os.path.basename(path))[0]), "source": path}
    tax["categories"] = _string_list(data.get("categories"), "categories", path)
    tax["plurals"] = dict(data.get("plurals") or {})
    attrs = data.get("attributes") or {}
    if not isinstance(attrs, dict):
        raise PromptSetError(f"taxonomy {path}: attributes must map an axis to its values, got {attrs!r}")
    tax["attributes"] = {str(k): _string_list(v, f"attributes.{k}", path) for k, v in attrs.items()}
    counts = data.get("counts") or []
    if not isinstance(counts, list) or not all(isinstance(c, int) and not isinstance(c, bool) and 2 <= c <= 10
                                               for c in counts):
        raise PromptSetError(f"taxonomy {path}: counts must be a list of integers from 2 to 10, got {counts!r}")
    tax["counts"] = list(counts)
    rel = data.get("relations") or {}
    if not isinstance(rel, dict) or not all(isinstance(k, str) and isinstance(v, str) and v.strip()
                                            for k, v in rel.items()):
        raise PromptSetError(f"taxonomy {path}: relations must map a relation to its phrase, e.g. "
                             f"{{'left of': 'to the left of'}}; got {rel!r}")
    tax["relations"] = dict(rel)
    settings = data.get("settings") or {}
    if not isinstance(settings, dict) or len(settings) > 1:
        raise PromptSetError(f"taxonomy {path}: settings must be one axis mapped to its values, e.g. "
                             f"{{background: [white, black]}}; got {settings!r}")
    tax["settings"] = {str(k): _string_list(v, f"settings.{k}", path) for k, v in settings.items()}
    frac = data.get("setting_fraction", 0.0)
    if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 <= frac <= 1:
        raise PromptSetError(f"taxonomy {path}: setting_fraction={frac!r}; expected a number in [0, 1]")
    tax["setting_fraction"] = float(frac)
    kinds = data.get("kinds")
    if not isinstance(kinds, dict) or not kinds:
        raise PromptSetError(f"taxonomy {path}: kinds must map prompt kinds to prompt counts, e.g. "
                             f"{{object: 10}}; kinds are {list(KIND_TAGS)}")
    for k, n in kinds.items():
        if k not in KIND_TAGS:
            raise PromptSetError(f"taxonomy {path}: unknown kind {k!r}; expected one of {list(KIND_TAGS)}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise PromptSetError(f"taxonomy {path}: kinds.{k}={n!r}; expected a positive number of prompts")
    needs = {"two_objects": ("categories", 2), "relation": ("relations", 1), "count": ("counts", 1),
             "attribute": ("attributes", 1), "attribute_binding": ("attributes", 1)}
    for k in kinds:
        axis, least = needs.get(k, ("categories", 1))
        if len(tax[axis]) < least:
            raise PromptSetError(f"taxonomy {path}: kind {k} needs {axis} (at least {least}); the taxonomy has "
                                 f"{len(tax[axis])}")
    if ("relation" in kinds or "attribute_binding" in kinds) and len(tax["categories"]) < 2:
        raise PromptSetError(f"taxonomy {path}: relation and attribute_binding prompts need two categories")
    tax["kinds"] = dict(kinds)
    rule = data.get("global_rule")
    if not isinstance(rule, str) or not rule.strip():
        raise PromptSetError(f"taxonomy {path}: global_rule must be a sentence (the judge's naturalness rule)")
    tax["global_rule"] = rule.strip()
    exclude = data.get("exclude") or {}
    tax["exclude_pairs"] = {tuple(p) for p in exclude.get("attribute_pairs", [])}
    tax["exclude_relations"] = {tuple(r) for r in exclude.get("relations", [])}
    return tax


# -- drawing prompts ---------------------------------------------------------------------
def _plural(tax: dict, noun: str) -> str:
    return tax["plurals"].get(noun, noun + "s")


def _draw(kind: str, tax: dict, rng: np.random.Generator) -> dict:
    """One combination of axis values for ``kind``: {"objects": [(count, attr axis, attr, category)],
    "relation": None or relation}."""
    cats = tax["categories"]

    def pick(seq):
        return seq[int(rng.integers(len(seq)))]

    def attribute():
        axis = pick(sorted(tax["attributes"]))
        return axis, pick(tax["attributes"][axis])

    if kind in ("two_objects", "relation", "attribute_binding"):
        a, b = (cats[i] for i in rng.choice(len(cats), size=2, replace=False))
    else:
        a, b = pick(cats), None
    if kind == "object":
        objects = [(1, None, None, a)]
    elif kind == "two_objects":
        objects = [(1, None, None, a), (1, None, None, b)]
    elif kind == "count":
        objects = [(pick(tax["counts"]), None, None, a)]
    elif kind == "attribute":
        objects = [(1, *attribute(), a)]
    elif kind == "relation":
        objects = [(1, None, None, b), (1, None, None, a)]  # "a rel b": b is objects[0], as GenEval orders them
    else:
        axis, v1 = attribute()
        v2 = pick([v for v in tax["attributes"][axis] if v != v1] or [v1])
        objects = [(1, axis, v1, a), (1, axis, v2, b)]
    return {"objects": objects, "relation": pick(sorted(tax["relations"])) if kind == "relation" else None}


def _excluded(combo: dict, tax: dict) -> bool:
    objs = combo["objects"]
    if any((v, cat) in tax["exclude_pairs"] for _, _, v, cat in objs if v is not None):
        return True
    return combo["relation"] is not None and (objs[1][3], combo["relation"], objs[0][3]) in tax["exclude_relations"]


def _noun_phrase(tax: dict, count: int, value: Optional[str], cat: str) -> str:
    words = f"{value} {cat}" if value else cat
    return f"{_article(words)} {words}" if count == 1 else f"{NUMBER_WORDS[count]} {value + ' ' if value else ''}" \
                                                          f"{_plural(tax, cat)}"


def _record(kind: str, combo: dict, setting: Optional[tuple], tax: dict) -> dict:
    objs, relation = combo["objects"], combo["relation"]
    phrases = [_noun_phrase(tax, n, v, cat) for n, _, v, cat in objs]
    if relation is not None:
        text = f"{phrases[1]} {tax['relations'][relation]} {phrases[0]}"
    else:
        text = " and ".join(phrases)
    rubric, include = [], []
    for n, axis, value, cat in objs:
        entry = {"class": cat, "count": n}
        if axis is not None:
            entry[axis] = value
        include.append(entry)
        rubric.append(f"there are exactly {NUMBER_WORDS[n]} {_plural(tax, cat)}" if kind == "count"
                      else f"there is {_noun_phrase(tax, n, value, cat)}")
    if relation is not None:
        include[1]["position"] = [relation, 0]
        rubric.append(f"the {objs[1][3]} is {tax['relations'][relation]} the {objs[0][3]}")
    tag = KIND_TAGS[kind]
    if kind in ("attribute", "attribute_binding") and objs[0][1] != "color":
        tag = kind
    metadata = {"tag": tag, "include": include}
    if kind == "count":
        metadata["exclude"] = [{"class": objs[0][3], "count": objs[0][0] + 1}]
    if setting is not None:
        axis, value = setting
        text += f", on {_article(value)} {value} {axis}"
        metadata[axis] = value
        rubric.append(f"the {axis} is {value}")
    metadata["prompt"] = text
    axes = {"categories": [cat for *_, cat in objs]}
    for n, axis, value, _ in objs:
        if axis is not None:
            axes.setdefault(axis, []).append(value)
    if kind == "count":
        axes["counts"] = [objs[0][0]]
    if relation is not None:
        axes["relations"] = [relation]
    if setting is not None:
        axes[setting[0]] = [setting[1]]
    return {"prompt": text, "kind": kind, "tag": tag, "rubric": rubric, "global_rule": tax["global_rule"],
            "metadata": metadata, "axes": axes}


def build_prompt_set(tax: dict, seed: int = 0, kinds: Optional[Sequence[str]] = None, scale: float = 1.0
                     ) -> List[dict]:
    """Prompts for the taxonomy's kinds (``kinds``: only these; ``scale`` multiplies each
    kind's count), drawn from a generator fixed by ``seed``, distinct, never an excluded
    combination, each draw the least-used of 8 candidates (values spread evenly)."""
    if kinds is not None:
        bad = [k for k in kinds if k not in tax["kinds"]]
        if bad:
            raise PromptSetError(f"--kinds {bad}: the taxonomy {tax['source']} has kinds {list(tax['kinds'])}")
    rng = np.random.default_rng([seed, 0x12F])
    usage: Counter = Counter()
    out: List[dict] = []
    for kind, n in tax["kinds"].items():
        if kinds is not None and kind not in kinds:
            continue
        want, made, seen, attempts = max(1, int(round(n * scale))), 0, set(), 0
        while made < want and attempts < 50 * want + 200:
            attempts += 1
            cands = []
            for _ in range(8):
                combo = _draw(kind, tax, rng)
                setting = None
                if tax["settings"] and rng.random() < tax["setting_fraction"]:
                    axis = next(iter(tax["settings"]))
                    values = tax["settings"][axis]
                    setting = (axis, values[int(rng.integers(len(values)))])
                key = (json.dumps(combo["objects"]), combo["relation"], setting)
                if key not in seen and not _excluded(combo, tax):
                    cands.append((key, combo, setting))
            if not cands:
                continue
            key, combo, setting = min(cands, key=lambda c: sum(usage[v] for v in _values(c[1], c[2])))
            seen.add(key)
            usage.update(_values(combo, setting))
            record = _record(kind, combo, setting, tax)
            record["id"] = f"{kind}-{made:05d}"
            out.append(record)
            made += 1
    if not out:
        raise PromptSetError(f"taxonomy {tax['source']}: no prompt could be drawn (everything excluded?)")
    return out


def _values(combo: dict, setting) -> List[str]:
    vals = [f"cat:{cat}" for *_, cat in combo["objects"]] + [f"{a}:{v}" for _, a, v, _ in combo["objects"] if a]
    vals += [f"count:{n}" for n, *_ in combo["objects"] if n > 1]
    if combo["relation"]:
        vals.append(f"rel:{combo['relation']}")
    if setting:
        vals.append(f"{setting[0]}:{setting[1]}")
    return vals


# -- coverage ------------------------------------------------------------------------------
def coverage(records: Sequence[dict], tax: dict) -> dict:
    """How a prompt set covers its taxonomy: prompts per kind; per axis the uses of each
    value and the values never used; covered / possible (category, attribute) pairs,
    (category, count) pairs and (category, relation, category) triples."""
    axes = {"categories": tax["categories"], **tax["attributes"], "counts": tax["counts"],
            "relations": sorted(tax["relations"]), **tax["settings"]}
    used = {a: Counter() for a in axes}
    pairs = {"category x attribute": set(), "category x count": set(), "category x relation x category": set()}
    for r in records:
        for axis, values in r.get("axes", {}).items():
            used.setdefault(axis, Counter()).update(values)
        for entry in r["metadata"]["include"]:
            for axis in tax["attributes"]:
                if axis in entry:
                    pairs["category x attribute"].add((entry["class"], axis, entry[axis]))
            if r["kind"] == "count":
                pairs["category x count"].add((entry["class"], entry["count"]))
            if "position" in entry:
                other = r["metadata"]["include"][entry["position"][1]]["class"]
                pairs["category x relation x category"].add((entry["class"], entry["position"][0], other))
    n_cat = len(tax["categories"])
    possible = {"category x attribute": n_cat * sum(len(v) for v in tax["attributes"].values())
                - len(tax["exclude_pairs"]),
                "category x count": n_cat * len(tax["counts"]),
                "category x relation x category": n_cat * (n_cat - 1) * len(tax["relations"])
                - len(tax["exclude_relations"])}
    return {"taxonomy": tax["name"], "prompts": len(records),
            "kinds": dict(Counter(r["kind"] for r in records)),
            "axes": {a: {"used": {str(v): used[a][v] for v in vals}, "missing": [v for v in vals if not used[a][v]]}
                     for a, vals in axes.items()},
            "combinations": {k: {"covered": len(v), "possible": max(possible[k], 0)} for k, v in pairs.items()}}


def coverage_lines(report: dict) -> List[str]:
    lines = [f"{report['prompts']} prompts from taxonomy {report['taxonomy']}: "
             + ", ".join(f"{k} {n}" for k, n in report["kinds"].items())]
    for axis, info in report["axes"].items():
        n_used = sum(1 for v in info["used"].values() if v)
        lines.append(f"  {axis}: {n_used}/{len(info['used'])} values used"
                     + (f" (missing: {', '.join(map(str, info['missing']))})" if info["missing"] else ""))
    for name, c in report["combinations"].items():
        if c["possible"]:
            lines.append(f"  {name}: {c['covered']}/{c['possible']} covered")
    return lines


# -- files -----------------------------------------------------------------------------------
def write_prompt_set(path: str, records: Sequence[dict]) -> str:
    if os.path.exists(path):
        raise OutputExists(f"{path} already exists; choose a new file (a prompt set is never overwritten)")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)
    return path


def load_prompt_set(path: str) -> List[dict]:
    """The records of a prompt set (JSONL: one object per line with a non-empty "prompt",
    a list of "rubric" items and a "metadata" mapping); one clear error for a missing,
    empty or malformed file, naming the line."""
    if not os.path.isfile(path):
        raise MissingFile(f"prompt set {path} does not exist (build one with lens-fast rl-prompts)")
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptSetError(f"prompt set {path} line {n} is not JSON ({e.msg}); expected one JSON object "
                                     "per line") from None
            if not isinstance(r, dict) or not isinstance(r.get("prompt"), str) or not r["prompt"].strip():
                raise PromptSetError(f"prompt set {path} line {n}: expected an object with a non-empty \"prompt\" "
                                     f"string, got {line.strip()[:80]!r}")
            rubric = r.get("rubric")
            if not isinstance(rubric, list) or not rubric or not all(isinstance(i, str) and i.strip()
                                                                     for i in rubric):
                raise PromptSetError(f"prompt set {path} line {n} (prompt {r['prompt']!r}): \"rubric\" must be a "
                                     "non-empty list of item sentences")
            if not isinstance(r.get("metadata", {}), dict):
                raise PromptSetError(f"prompt set {path} line {n} (prompt {r['prompt']!r}): \"metadata\" must be "
                                     "a mapping")
            r.setdefault("metadata", {})
            r.setdefault("id", f"line-{n}")
            records.append(r)
    if not records:
        raise PromptSetError(f"prompt set {path} is empty; expected one JSON prompt record per line")
    return records


def prompt_set_digest(records: Sequence[dict]) -> str:
    """A digest of a prompt set's content (a resume must use the same set)."""
    h = hashlib.blake2b(digest_size=12)
    for r in records:
        h.update(json.dumps(r, sort_keys=True).encode())
    return h.hexdigest()


PROG = "lens-fast rl-prompts"


def main(argv: Optional[List[str]] = None) -> int:
    """Returns the exit status (2 with one line for bad input, before any work)."""
    return run_cli(PROG, _main, list(sys.argv[1:] if argv is None else argv))


def _main(argv: List[str]) -> int:
    p = OneLineParser(prog=PROG, description="Build a taxonomy-driven RL prompt set "
                                "(each prompt with its rubric items) and report its coverage.")
    p.add_argument("--taxonomy", required=True, help="a taxonomy YAML/JSON file, or 'toy' (the toy world's)")
    p.add_argument("--out", help="the prompt set to write (JSONL; never overwritten); without it: coverage only")
    p.add_argument("--kinds", nargs="+", help=f"only these kinds ({', '.join(KIND_TAGS)})")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every kind's prompt count")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--coverage", help="also write the coverage report (JSON) here")
    args = p.parse_args(argv)
    if not args.scale > 0:
        raise InvalidValue(f"--scale {args.scale}: expected a positive number")
    tax = load_taxonomy(args.taxonomy)
    records = build_prompt_set(tax, args.seed, args.kinds, args.scale)
    report = coverage(records, tax)
    if args.out:
        write_prompt_set(args.out, records)
    if args.coverage:
        with open(args.coverage, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
    print("\n".join(coverage_lines(report)))
    if args.out:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
