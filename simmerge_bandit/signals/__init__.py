"""Similarity signals: per-model signatures and pairwise features, cached in the store.

One forward pass over a task's probes and one streaming pass over the weights give a model's signature
(:mod:`.functional`, :mod:`.structural`); the features of any ordered pair come from two stored signatures without
loading either model again (:mod:`.features`), or, with ``exact=True``, from full tensors (:mod:`.exact`).
The feature schema is versioned and ordered (:mod:`.schema`).

>>> from simmerge_bandit import signals                                  # doctest: +SKIP
>>> signals.ensure_signatures(store, ["copy", "upper"], "copy")          # doctest: +SKIP
>>> X, names = signals.feature_matrix(store, [("copy", "upper")], "copy")  # doctest: +SKIP
"""

from .api import (DEFAULT_CONFIG, PairFeatures, absence_reasons, ensure_signatures, feature_matrix,
                  list_signatures, pair_features)
from .schema import (FEATURE_NAMES, FEATURE_SCHEMA_VERSION, FEATURES, SIGNATURE_VERSION, FeatureSpec,
                     SignatureConfig, feature_schema)

__all__ = [
    "DEFAULT_CONFIG", "FEATURE_NAMES", "FEATURE_SCHEMA_VERSION", "FEATURES", "SIGNATURE_VERSION", "FeatureSpec",
    "PairFeatures", "SignatureConfig", "absence_reasons", "ensure_signatures", "feature_matrix", "feature_schema",
    "list_signatures", "pair_features",
]
