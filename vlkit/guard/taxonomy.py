"""Safety taxonomies as data: categories with codes, names, descriptions and optional few-shot
examples.

Built in: Llama Guard v1 (O1-O6), Llama Guard 2 (S1-S11), Llama Guard 3 / MLCommons hazards (S1-S14)
and the OpenAI moderation categories (C1-C8, for evaluating on that set). Codes move between
versions (hate is O1 in v1, S9 in v2, S10 in v3), so code lookups always go through a taxonomy;
labels from data are mapped by category *name*. Custom taxonomies are YAML:

    name: my-policy
    version: 1
    prefix: C            # codes C1, C2, ... in file order (or give `code:` per category)
    categories:
      - name: Weapons
        description: Instructions to build or acquire weapons.
        examples:        # optional few-shot examples, shown in the prompt
          - {text: "...", unsafe: true}
"""

from __future__ import annotations

import random
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError, model_validator

from vlkit.config import read_yaml
from vlkit.errors import VlkitError


class Example(BaseModel):
    model_config = {"extra": "forbid"}
    text: str
    unsafe: bool = True


class Category(BaseModel):
    model_config = {"extra": "forbid"}
    code: str = ""
    name: str
    description: str = ""
    examples: list[Example] = Field(default_factory=list)


class Taxonomy(BaseModel):
    model_config = {"extra": "forbid"}
    name: str
    version: int | str = 1
    prefix: str = "S"
    categories: list[Category]

    @model_validator(mode="after")
    def _codes(self) -> "Taxonomy":
        if not self.categories:
            raise ValueError("a taxonomy needs at least one category")
        for i, c in enumerate(self.categories):
            if not c.code:
                c.code = f"{self.prefix}{i + 1}"
        codes = [c.code for c in self.categories]
        names = [c.name.lower() for c in self.categories]
        for what, values in (("code", codes), ("name", names)):
            dup = sorted({v for v in values if values.count(v) > 1})
            if dup:
                raise ValueError(f"duplicate category {what}(s) {dup}")
        return self

    # -- lookups ---------------------------------------------------------------------------------
    def by_code(self, code: str) -> Category:
        return self._find("code", code)

    def by_name(self, name: str) -> Category:
        return self._find("name", name)

    def _find(self, key: str, value: str) -> Category:
        for c in self.categories:
            if getattr(c, key).lower() == value.strip().lower():
                return c
        raise VlkitError(f"taxonomy {self.name}: unknown category {'code ' if key == 'code' else ''}{value!r}; it has "
                         f"{[getattr(c, key) for c in self.categories]}")

    def codes(self) -> list[str]:
        return [c.code for c in self.categories]

    def subset(self, names: list[str], shuffle_codes: bool = False, rng: random.Random | None = None) -> "Taxonomy":
        """The categories named (in this taxonomy's order), renumbered 1..k (optionally in shuffled order).
        Used for training augmentation; the prompt then lists only these, with these codes."""
        keep = [c for c in self.categories if c.name in set(names)]
        if shuffle_codes:
            keep = list(keep)
            (rng or random.Random()).shuffle(keep)
        cats = [Category(code=f"{self.prefix}{i + 1}", name=c.name, description=c.description,
                         examples=c.examples) for i, c in enumerate(keep)]
        return Taxonomy(name=self.name, version=self.version, prefix=self.prefix, categories=cats)

    def to_yaml_dict(self) -> dict:
        return self.model_dump(mode="json")


def _tax(name: str, version, prefix: str, rows: list[tuple[str, str]]) -> Taxonomy:
    return Taxonomy(name=name, version=version, prefix=prefix,
                    categories=[Category(name=n, description=d) for n, d in rows])


# Descriptions are short paraphrases written for vlkit; the codes and names follow the published lists.
LLAMA_GUARD_V1 = _tax("llama-guard-v1", 1, "O", [
    ("Violence and Hate", "Helping plan or encourage violence, or content that demeans or incites hatred against "
                          "people for protected characteristics."),
    ("Sexual Content", "Sexually explicit content or encouraging sexual acts."),
    ("Criminal Planning", "Helping plan or carry out crimes such as theft, kidnapping or fraud."),
    ("Guns and Illegal Weapons", "Helping obtain, build or illegally use firearms, explosives or other weapons."),
    ("Regulated or Controlled Substances", "Helping produce, traffic or illegally use drugs, tobacco, alcohol or "
                                           "other regulated substances."),
    ("Self-Harm", "Encouraging, instructing or romanticising suicide or self-injury."),
])

# Hazards shared by Llama Guard 2 and 3 (their codes differ between the two)
_HAZARD = {
    "violent": "Enabling or endorsing violence against people or animals, including terrorism.",
    "non-violent": "Enabling fraud, theft, hacking, drug or weapons crimes and other non-violent offences.",
    "sex crimes": "Enabling or endorsing sexual assault, harassment or trafficking.",
    "children": "Any sexual content involving minors, or enabling their abuse.",
    "advice": "Unqualified financial, medical or legal advice presented as authoritative.",
    "privacy": "Revealing sensitive personal information about private individuals.",
    "ip": "Violating copyrights, trademarks or other intellectual property.",
    "weapons": "Enabling chemical, biological, radiological, nuclear or high-yield explosive weapons.",
    "hate": "Demeaning or dehumanising people for protected characteristics.",
    "self-harm": "Enabling or encouraging suicide, self-injury or disordered eating.",
    "sexual": "Sexually explicit content.",
}

LLAMA_GUARD_2 = _tax("llama-guard-2", 2, "S", [
    ("Violent Crimes", _HAZARD["violent"]), ("Non-Violent Crimes", _HAZARD["non-violent"]),
    ("Sex Crimes", _HAZARD["sex crimes"]), ("Child Exploitation", _HAZARD["children"]),
    ("Specialized Advice", _HAZARD["advice"]), ("Privacy", _HAZARD["privacy"]),
    ("Intellectual Property", _HAZARD["ip"]), ("Indiscriminate Weapons", _HAZARD["weapons"]),
    ("Hate", _HAZARD["hate"]), ("Self-Harm", _HAZARD["self-harm"]), ("Sexual Content", _HAZARD["sexual"]),
])

LLAMA_GUARD_3 = _tax("llama-guard-3", 3, "S", [
    ("Violent Crimes", _HAZARD["violent"]), ("Non-Violent Crimes", _HAZARD["non-violent"]),
    ("Sex-Related Crimes", _HAZARD["sex crimes"]), ("Child Sexual Exploitation", _HAZARD["children"]),
    ("Defamation", "Verifiably false statements that damage a living person's reputation."),
    ("Specialized Advice", _HAZARD["advice"]), ("Privacy", _HAZARD["privacy"]),
    ("Intellectual Property", _HAZARD["ip"]), ("Indiscriminate Weapons", _HAZARD["weapons"]),
    ("Hate", _HAZARD["hate"]), ("Suicide & Self-Harm", _HAZARD["self-harm"]), ("Sexual Content", _HAZARD["sexual"]),
    ("Elections", "Factually wrong information about electoral systems and voting."),
    ("Code Interpreter Abuse", "Abusing code interpreters: denial of service, container escapes, privilege "
                               "escalation."),
])

# The OpenAI moderation categories as a guard taxonomy (descriptions paraphrased for vlkit).
OPENAI_MODERATION = Taxonomy(name="openai-moderation", version=1, prefix="C", categories=[
    Category(name="sexual", description="Content meant to arouse, describing sexual activity, or "
                                                  "promoting sexual services (sex education and wellness excluded)."),
    Category(name="hate", description="Content that expresses, incites or promotes hate based on race, "
                                                "gender, ethnicity, religion, nationality, sexual orientation, "
                                                "disability or caste."),
    Category(name="violence", description="Content that promotes or glorifies violence or celebrates the "
                                                    "suffering or humiliation of others."),
    Category(name="harassment", description="Content that may be used to torment or annoy individuals, "
                                                       "or make harassment more likely."),
    Category(name="self-harm", description="Content that promotes, encourages or depicts acts of "
                                                      "self-harm such as suicide, cutting or eating disorders."),
    Category(name="sexual/minors", description="Sexual content that includes anyone under 18."),
    Category(name="hate/threatening", description="Hateful content that also includes violence or "
                                                             "serious harm towards the targeted group."),
    Category(name="violence/graphic", description="Violent content that depicts death, violence or "
                                                             "serious physical injury in extreme graphic detail."),
])

BUILTIN = {t.name: t for t in (LLAMA_GUARD_V1, LLAMA_GUARD_2, LLAMA_GUARD_3, OPENAI_MODERATION)}
BUILTIN["mlcommons"] = LLAMA_GUARD_3


def load_taxonomy(spec: str | Path) -> Taxonomy:
    """A built-in name (llama-guard-v1, llama-guard-2, llama-guard-3 / mlcommons) or a YAML file."""
    if str(spec) in BUILTIN:
        return BUILTIN[str(spec)].model_copy(deep=True)
    path = Path(spec)
    if not path.is_file():
        raise VlkitError(f"{path}: taxonomy not found; give a YAML file or one of {sorted(BUILTIN)}")
    data = read_yaml(path)
    try:
        return Taxonomy.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise VlkitError(f"{path}: {('key ' + repr(where) + ': ') if where else ''}{err['msg']}") from None
