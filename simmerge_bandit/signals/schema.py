"""The versioned feature schema and the signature configuration.

A policy's context vectors are only comparable if every vector lists the same features in the same order with
the same meaning. :data:`FEATURES` is that contract: adding, removing, reordering or redefining a feature bumps
:data:`FEATURE_SCHEMA_VERSION`. Likewise a change to what a signature holds, or to how it is computed, bumps
:data:`SIGNATURE_VERSION`; the :class:`SignatureConfig` digest is part of every stored key as well, so signatures
computed with other settings are never mixed up with the current ones.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields

FEATURE_SCHEMA_VERSION = 2
SIGNATURE_VERSION = 2
#: Version of the sketch estimators in :mod:`.features` (part of the key of stored pair features). 2: the
#: Jensen-Shannon mean with a control variate over all positions.
ESTIMATOR_VERSION = 2


@dataclass(frozen=True)
class FeatureSpec:
    """One feature of an ordered pair (a, b)."""

    name: str
    #: ``distribution`` (next-token distributions), ``activation`` (hidden states), ``task_vector`` (weights) or
    #: ``shift`` (how far each model's next-token distributions moved from its base's on the task's probes).
    kind: str
    description: str
    #: (low, high) when the feature is bounded, else None. Bounded features are compared to --exact within 0.05
    #: absolute, unbounded ones within 5% relative.
    bounds: tuple[float, float] | None
    #: How the feature of (b, a) relates to that of (a, b): ``symmetric`` (equal), ``negated``, ``reciprocal``, or
    #: ``swap:NAME`` (equals feature NAME of (a, b)).
    swap: str


_LN2 = 0.6931471805599453
_D = "distribution"
_A = "activation"
_T = "task_vector"
_S = "shift"

FEATURES: tuple[FeatureSpec, ...] = (
    FeatureSpec("kl_ab_mean", _D, "KL(a||b) of the next-token distributions, mean over probe positions (nats)",
                None, "swap:kl_ba_mean"),
    FeatureSpec("kl_ab_median", _D, "KL(a||b), median over probe positions", None, "swap:kl_ba_median"),
    FeatureSpec("kl_ab_p10", _D, "KL(a||b), 10th percentile over probe positions", None, "swap:kl_ba_p10"),
    FeatureSpec("kl_ab_p90", _D, "KL(a||b), 90th percentile over probe positions", None, "swap:kl_ba_p90"),
    FeatureSpec("kl_ba_mean", _D, "KL(b||a), mean over probe positions (nats)", None, "swap:kl_ab_mean"),
    FeatureSpec("kl_ba_median", _D, "KL(b||a), median over probe positions", None, "swap:kl_ab_median"),
    FeatureSpec("kl_ba_p10", _D, "KL(b||a), 10th percentile over probe positions", None, "swap:kl_ab_p10"),
    FeatureSpec("kl_ba_p90", _D, "KL(b||a), 90th percentile over probe positions", None, "swap:kl_ab_p90"),
    FeatureSpec("js_mean", _D, "Jensen-Shannon divergence of the next-token distributions (nats, at most ln 2), "
                "mean over probe positions", (0.0, _LN2), "symmetric"),
    FeatureSpec("agree_top1", _D, "fraction of probe positions where the most likely next tokens agree",
                (0.0, 1.0), "symmetric"),
    FeatureSpec("entropy_diff_mean", _D, "mean over probe positions of H(a) - H(b), next-token entropies (nats)",
                None, "negated"),
    FeatureSpec("cos_act_mean", _A, "cosine of a's and b's hidden states at the same token, averaged over tokens; "
                "mean over the sampled layers", (-1.0, 1.0), "symmetric"),
    FeatureSpec("cos_act_min", _A, "per-layer activation cosine, minimum over the sampled layers", (-1.0, 1.0),
                "symmetric"),
    FeatureSpec("cos_act_last", _A, "activation cosine at the last layer", (-1.0, 1.0), "symmetric"),
    FeatureSpec("cka_mean", _A, "linear CKA of the token states, mean over the sampled layers", (0.0, 1.0),
                "symmetric"),
    FeatureSpec("cka_min", _A, "linear CKA, minimum over the sampled layers", (0.0, 1.0), "symmetric"),
    FeatureSpec("cka_last", _A, "linear CKA at the last layer", (0.0, 1.0), "symmetric"),
    FeatureSpec("cos_tv_global", _T, "cosine of the task vectors (model - base) over all weights", (-1.0, 1.0),
                "symmetric"),
    FeatureSpec("cos_tv_layer_mean", _T, "task-vector cosine per transformer layer, mean over layers",
                (-1.0, 1.0), "symmetric"),
    FeatureSpec("cos_tv_layer_min", _T, "task-vector cosine per transformer layer, minimum over layers",
                (-1.0, 1.0), "symmetric"),
    FeatureSpec("agree_sign_tv", _T, "fraction of weights (where both task vectors are non-zero) whose task-vector "
                "signs agree", (0.0, 1.0), "symmetric"),
    FeatureSpec("overlap_top20_tv", _T, "overlap of the top-20% largest-magnitude task-vector entries (per tensor, "
                "as TIES trims): |A and B| / sqrt(|A| |B|)", (0.0, 1.0), "symmetric"),
    FeatureSpec("norm_ratio_tv", _T, "||a - base|| / ||b - base||", None, "reciprocal"),
    FeatureSpec("dist_l2_rel", _T, "||a - b|| / ||base||, the weight distance relative to the base's norm", None,
                "symmetric"),
    # Schema 2: each model against its base on the task's probes. Similarity of a and b alone cannot say which of
    # them specialised in this task; how far fine-tuning moved each one's predictions on the task's own (unlabeled)
    # prompts can, and that decides e.g. which side a SLERP or a weighted merge should favour.
    *(spec for side in "ab" for spec in (
        FeatureSpec(f"kl_base_{side}_mean", _S, f"KL(base||{side}) of the next-token distributions on the task's "
                    "probes, mean over positions (nats): how far fine-tuning moved " + side + " on this task",
                    None, f"swap:kl_base_{'ba'[side == 'b']}_mean"),
        FeatureSpec(f"kl_{side}_base_mean", _S, f"KL({side}||base), mean over probe positions (nats)", None,
                    f"swap:kl_{'ba'[side == 'b']}_base_mean"),
        FeatureSpec(f"js_base_{side}_mean", _S, f"Jensen-Shannon divergence of {side}'s and the base's next-token "
                    "distributions, mean over probe positions (nats, at most ln 2)", (0.0, _LN2),
                    f"swap:js_base_{'ba'[side == 'b']}_mean"),
        FeatureSpec(f"agree_top1_base_{side}", _S, f"fraction of probe positions where {side}'s and the base's most "
                    "likely next tokens agree", (0.0, 1.0), f"swap:agree_top1_base_{'ba'[side == 'b']}"),
        FeatureSpec(f"entropy_diff_{side}_base", _S, f"mean over probe positions of H({side}) - H(base), next-token "
                    "entropies (nats): negative when fine-tuning made it surer on this task", None,
                    f"swap:entropy_diff_{'ba'[side == 'b']}_base"),
    )),
)

FEATURE_NAMES: tuple[str, ...] = tuple(f.name for f in FEATURES)
FEATURE_INDEX = {n: i for i, n in enumerate(FEATURE_NAMES)}
#: Shift features of one side, in schema order, and the pair feature of (base, model) each one is read from
#: (with its sign): the shift of a model is the distribution family of the pair (its base, the model).
SHIFT_SOURCES: tuple[tuple[str, str, float], ...] = (
    ("kl_base_{}_mean", "kl_ab_mean", 1.0), ("kl_{}_base_mean", "kl_ba_mean", 1.0), ("js_base_{}_mean", "js_mean", 1.0),
    ("agree_top1_base_{}", "agree_top1", 1.0), ("entropy_diff_{}_base", "entropy_diff_mean", -1.0))
FEATURES_BY_KIND = {k: tuple(f.name for f in FEATURES if f.kind == k) for k in (_D, _A, _T, _S)}


@dataclass(frozen=True)
class SignatureConfig:
    """What a signature keeps. Every field is part of the stored key (through :meth:`version`)."""

    seed: int = 5133
    # ---- functional: one forward pass over the probes ----
    #: Prompts are cut to this many tokens.
    max_tokens: int = 64
    #: Probe positions kept; with more, a fixed seeded sample (the same for every model with the same tokenizer).
    max_positions: int = 256
    #: Vocabularies up to this size keep full next-token distributions; larger ones keep the top-k
    #: log-probabilities and the log-normalizer.
    full_vocab_max: int = 512
    top_k: int = 64
    #: Positions over which the sketch estimates the Jensen-Shannon mean (an evenly spaced subset).
    js_positions: int = 32
    #: Hidden-state layers kept, evenly spaced by depth, the last included.
    max_layers: int = 8
    #: Token positions (an evenly spaced subset of the probe positions) for hidden-state statistics.
    state_positions: int = 64
    #: Dimension of the seeded random projection of token states (identity when the hidden size is smaller).
    state_proj_dim: int = 64
    batch_size: int = 16
    # ---- structural: one streaming pass over the weights ----
    #: Count-sketch size over all layer groups together; each group gets a power of two in
    #: [sketch_group_min, sketch_group_max], or its exact values when it has no more entries than that.
    sketch_dims: int = 32768
    sketch_group_min: int = 1024
    sketch_group_max: int = 4096
    #: Weight coordinates sampled uniformly (the same ones in every model with the same tensor layout).
    coord_sample: int = 8192
    #: Fraction of largest-magnitude task-vector entries per tensor for ``overlap_top20_tv``.
    top_density: float = 0.2

    _FUNCTIONAL = ("seed", "max_tokens", "max_positions", "full_vocab_max", "top_k", "js_positions", "max_layers",
                   "state_positions", "state_proj_dim")
    _STRUCTURAL = ("seed", "sketch_dims", "sketch_group_min", "sketch_group_max", "coord_sample", "top_density")

    def version(self, part: str) -> str:
        """The stored version of a ``functional`` or ``structural`` signature: schema version + config digest."""
        keys = self._FUNCTIONAL if part == "functional" else self._STRUCTURAL
        d = asdict(self)
        digest = hashlib.blake2b(json.dumps({k: d[k] for k in keys}, sort_keys=True).encode(),
                                 digest_size=4).hexdigest()
        return f"{SIGNATURE_VERSION}-{digest}"

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "top_density":
                if not 0 < v < 1:
                    raise ValueError("top_density must be in (0, 1)")
            elif not isinstance(v, int) or v < (0 if f.name == "seed" else 1):
                raise ValueError(f"{f.name} must be a positive integer")


def features_version(config: SignatureConfig) -> str:
    """Key of stored pair features: the schema version plus both signature versions."""
    return (f"{FEATURE_SCHEMA_VERSION}/{config.version('functional')}/{config.version('structural')}"
            f"/e{ESTIMATOR_VERSION}")


def feature_schema() -> list[dict]:
    """The schema as plain dicts (name, kind, description, bounds, swap), in order."""
    return [{"index": i, **asdict(f)} for i, f in enumerate(FEATURES)]
