"""Policy specs: the one parser of the policy names people type.

- ``uniform``: uniform over the actions (replay, simulate);
- ``fixed:ACTION``: always that action (an operator, or a logged action);
- ``NAME`` or ``NAME:key=value,...``: a registered policy with parameters (values read as JSON where they parse);
- ``NAME@predictor`` (with optional parameters after a ``:``): NAME warm-started from the fitted SimMerge
  predictor, learning what the predictor gets wrong.

>>> parse_policy("linucb-hybrid@predictor:alpha=0.5").warm
True
>>> parse_policy("fixed:ties_d0.5").action
'ties_d0.5'
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from .errors import InvalidInput

#: Policies evaluated from their action probabilities alone (nothing to learn).
DIRECT_POLICIES = ("uniform", "fixed")
#: The suffix of a policy warm-started from the fitted predictor.
WARM = "@predictor"


@dataclass(frozen=True)
class PolicySpec:
    """A parsed policy spec. ``name`` keeps a warm start's suffix (``linucb@predictor``); ``base`` is the
    registered policy it builds (``linucb``)."""

    text: str
    name: str
    action: str | None = None
    params: dict = field(default_factory=dict)

    @property
    def direct(self) -> bool:
        """Whether the policy is evaluated from its action probabilities alone (``uniform``, ``fixed:ACTION``)."""
        return self.name in DIRECT_POLICIES

    @property
    def warm(self) -> bool:
        """Whether it is warm-started from the fitted predictor (``NAME@predictor``)."""
        return self.name.endswith(WARM)

    @property
    def base(self) -> str:
        """The registered policy it is built from (the name without ``@predictor``)."""
        return self.name[: -len(WARM)] if self.warm else self.name


def parse_policy(text: str) -> PolicySpec:
    """Parse a policy spec (see the module's doc); :class:`InvalidInput` for a malformed one."""
    text = str(text).strip()
    name, _, rest = text.partition(":")
    name = name.strip()
    if not name:
        raise InvalidInput(f"empty policy name in {text!r}")
    if name == "fixed":
        if not rest:
            raise InvalidInput("fixed needs an action, e.g. fixed:17")
        return PolicySpec(text, "fixed", action=rest)
    if name == "uniform":
        if rest:
            raise InvalidInput("uniform takes no parameters")
        return PolicySpec(text, "uniform")
    if name.endswith(WARM) and not name[: -len(WARM)]:
        raise InvalidInput(f"{text!r}: name the policy to warm-start, e.g. linucb-hybrid{WARM}")
    params = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, val = item.partition("=")
        if not eq or not key.strip():
            raise InvalidInput(f"policy parameter {item!r} in {text!r} is not key=value")
        try:
            params[key.strip()] = json.loads(val)
        except ValueError:
            params[key.strip()] = val
    return PolicySpec(text, name, params=params)
