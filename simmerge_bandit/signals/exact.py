"""The ``--exact`` path: the same features from full distributions, full token states and full tensors.

It defines the reference the sketches are measured against: every feature has the same definition (same probe
positions, same sampled layers and token positions, same floor on log-probabilities, same per-tensor top-20%
thresholds) but nothing is sketched, sampled or truncated: KL and Jensen-Shannon use every kept position and the
whole vocabulary, activation cosines use the unprojected states, CKA is computed in feature space, and the
task-vector features stream the two models and their base tensor by tensor.
"""

from __future__ import annotations

import math

import numpy as np

from .features import kl_summary
from .schema import FEATURE_INDEX, FEATURE_NAMES, SignatureConfig
from .structural import TensorReader, layer_group, top_threshold

_LN2 = math.log(2.0)


def functional_values(raw_a: dict, raw_b: dict, arr_a: dict, arr_b: dict) -> dict[str, float]:
    """Distribution and activation features from two models' raw outputs (see ``functional.extract``)."""
    la = raw_a["logp"].astype(np.float64)
    lb = raw_b["logp"].astype(np.float64)
    pa, pb = np.exp(la), np.exp(lb)
    kl_ab = np.maximum((pa * (la - lb)).sum(-1), 0.0)
    kl_ba = np.maximum((pb * (lb - la)).sum(-1), 0.0)
    m = 0.5 * (pa + pb)
    lm = np.log(np.where(m > 0, m, 1.0))
    js = np.clip(0.5 * (pa * (la - lm)).sum(-1) + 0.5 * (pb * (lb - lm)).sum(-1), 0.0, _LN2)
    out: dict[str, float] = {}
    for prefix, kl in (("kl_ab", kl_ab), ("kl_ba", kl_ba)):
        for name, v in zip(("mean", "median", "p10", "p90"), kl_summary(kl)):
            out[f"{prefix}_{name}"] = float(v)
    out["js_mean"] = float(js.mean())
    out["agree_top1"] = float((la.argmax(-1) == lb.argmax(-1)).mean())
    out["entropy_diff_mean"] = float(arr_a["entropy"].astype(np.float64).mean() -
                                     arr_b["entropy"].astype(np.float64).mean())
    xa, xb = raw_a["states"].astype(np.float64), raw_b["states"].astype(np.float64)
    if xa.shape[0] == xb.shape[0] and xa.shape[1] == xb.shape[1]:
        ckas = []
        for j in range(xa.shape[0]):
            x = xa[j] - xa[j].mean(0)
            y = xb[j] - xb[j].mean(0)
            num = np.linalg.norm(y.T @ x) ** 2
            den = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
            ckas.append(num / den if den > 0 else np.nan)
        ckas = np.clip(np.array(ckas), 0.0, 1.0)
        out.update(cka_mean=float(ckas.mean()), cka_min=float(ckas.min()), cka_last=float(ckas[-1]))
        if xa.shape[2] == xb.shape[2]:
            na = np.linalg.norm(xa, axis=2)
            nb = np.linalg.norm(xb, axis=2)
            with np.errstate(divide="ignore", invalid="ignore"):
                cos = np.clip(((xa * xb).sum(2) / (na * nb)).mean(1), -1.0, 1.0)
            out.update(cos_act_mean=float(cos.mean()), cos_act_min=float(cos.min()), cos_act_last=float(cos[-1]))
    return {k: v for k, v in out.items() if math.isfinite(v)}


def structural_values(ck_a, ck_b, ck_base, config: SignatureConfig, device: str = "cpu") -> dict[str, float]:
    """Task-vector features from full tensors, streamed one tensor at a time from all three checkpoints."""
    import torch

    names = sorted(n for n, t in ck_base.tensors.items() if t.dtype in ("F64", "F32", "F16", "BF16"))
    groups: dict[str, list[float]] = {}
    nz = agree = top_a = top_b = top_ab = 0
    base_sq = diff_sq = 0.0
    ra, rb, r0 = TensorReader(ck_a), TensorReader(ck_b), TensorReader(ck_base)
    try:
        with torch.no_grad():
            for name in names:
                t0 = r0.get(name).to(device=device, dtype=torch.float64).reshape(-1)
                ta = ra.get(name).to(device=device, dtype=torch.float64).reshape(-1) - t0
                tb = rb.get(name).to(device=device, dtype=torch.float64).reshape(-1) - t0
                base_sq += float(t0 @ t0)
                del t0
                g = groups.setdefault(layer_group(name), [0.0, 0.0, 0.0])
                g[0] += float(ta @ tb)
                g[1] += float(ta @ ta)
                g[2] += float(tb @ tb)
                diff_sq += float(((ta - tb) ** 2).sum())
                sa, sb = torch.sign(ta), torch.sign(tb)
                both = (sa != 0) & (sb != 0)
                nz += int(both.sum())
                agree += int(((sa == sb) & both).sum())
                # thresholds in float32, exactly as the structural pass computes them
                fa = ta.float().abs()
                fb = tb.float().abs()
                ha = fa >= top_threshold(fa, config.top_density)
                hb = fb >= top_threshold(fb, config.top_density)
                top_a += int(ha.sum())
                top_b += int(hb.sum())
                top_ab += int((ha & hb).sum())
    finally:
        ra.close()
        rb.close()
        r0.close()
    dot = sum(g[0] for g in groups.values())
    sq_a = sum(g[1] for g in groups.values())
    sq_b = sum(g[2] for g in groups.values())
    out: dict[str, float] = {}
    if sq_a > 0 and sq_b > 0:
        out["cos_tv_global"] = max(-1.0, min(1.0, dot / math.sqrt(sq_a * sq_b)))
        layer_cos = [g[0] / math.sqrt(g[1] * g[2]) for k, g in groups.items()
                     if k.startswith("layer.") and g[1] > 0 and g[2] > 0]
        if layer_cos:
            out["cos_tv_layer_mean"] = float(np.clip(np.mean(layer_cos), -1, 1))
            out["cos_tv_layer_min"] = float(np.clip(np.min(layer_cos), -1, 1))
        out["norm_ratio_tv"] = math.sqrt(sq_a / sq_b)
    if nz:
        out["agree_sign_tv"] = agree / nz
    if top_a and top_b:
        out["overlap_top20_tv"] = min(1.0, top_ab / math.sqrt(top_a * top_b))
    if base_sq > 0:
        out["dist_l2_rel"] = math.sqrt(diff_sq) / math.sqrt(base_sq)
    return out


def as_vector(values: dict[str, float]) -> np.ndarray:
    """Feature values by name as a vector in schema order, NaN where absent."""
    v = np.full(len(FEATURE_NAMES), np.nan)
    for k, x in values.items():
        v[FEATURE_INDEX[k]] = x
    return v
