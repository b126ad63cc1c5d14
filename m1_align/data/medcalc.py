"""Medical calculations from MedCalc-Bench's calculators (the `medcalc` task family).

MedCalc-Bench (Khandekar et al., NeurIPS 2024 Datasets and Benchmarks; github.com/ncbi-nlp/MedCalc-Bench)
asks a model to compute a clinical score, equation or date from a patient note. Its calculators ship as
the PyPI package `medcalc-bench` (Apache-2.0): each `*_explanation(input_variables)` returns a step-by-step
explanation and the answer. Here we sample clinically plausible inputs for a calculator (in the units it
accepts, several where it accepts several), write our own plain-English vignette from them, and take the
package's explanation as the SFT reasoning and its answer as the gold.

Splits (see `medcalc_sets`): every patient is one input set, named by a hash of those inputs, so a patient
is on one side only; per calculator the held-out test and dev patients are drawn first from a seeded
stream, then the training ones (each training split its own), skipping any input set already drawn. A
few calculators are held out entirely: they only reach the `medcalc_unseen` evaluation task.

Scoring is the `medcalc` rule (m1_align.data.rules.medcalc_score), as the benchmark scores; the gold's
format says how it is scored.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import importlib.metadata
import itertools
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

from m1_align.data.sources import MissingSourceError
from m1_align.data.tasks import Example

PACKAGE = "medcalc-bench==1.7.0"
SOURCE = "medcalc"
RULE = "medcalc"
KINDS = ("score", "equation", "date")
UNSEEN_TASK = "medcalc_unseen"  # the held-out calculators: the generalisation column
TASKS = tuple(f"medcalc_{kind}" for kind in KINDS) + (UNSEEN_TASK,)
# One per kind family, each with a trained sibling (Centor, Bazett, Naegele's due date; sodium correction
# shares the unit conversions of the electrolyte equations), so transfer is possible but not copying.
DEFAULT_HELDOUT = ("feverpain", "qt_calculator_fredericia", "sch", "conception_date")
# MedCalc-Bench (README, "Lower Limit"/"Upper Limit"): for equation-based calculators whose output is a
# decimal, the limits are 95% and 105% of the ground truth; otherwise both equal the ground truth.


@dataclass(frozen=True)
class Calculator:
    name: str  # module of the medcalc package
    function: str  # its explanation function
    quantity: str  # what the question asks for
    kind: str  # score | equation | date: how results are reported
    output: str  # MedCalc-Bench's output type, which decides the scoring: integer | decimal | date | weeks_days
    sample: Callable[[random.Random], dict[str, Any]]  # the package's input_variables
    vignette: Callable[[dict[str, Any], random.Random], str]


# ---------------------------------------------------------------------------------------------
# Sampling helpers
# ---------------------------------------------------------------------------------------------

MICRO = "\u00b5"  # the package's unit tables spell micro with the micro sign, not Greek mu


def _uniform(rng: random.Random, low: float, high: float, digits: int) -> float:
    return round(rng.uniform(low, high), digits)


def _age(rng: random.Random, low: int = 18, high: int = 90) -> tuple[int, str]:
    return (rng.randint(low, high), "years")


def _sex(rng: random.Random) -> str:
    return rng.choice(["Male", "Female"])


def _weight(rng: random.Random, sex: str) -> tuple[float, str]:
    kg = rng.uniform(48, 120) if sex == "Male" else rng.uniform(40, 105)
    if rng.random() < 0.35:
        return (round(kg / 0.453592), "lbs")
    return (round(kg, 1), "kg")


def _height(rng: random.Random, sex: str) -> tuple:
    cm = rng.gauss(176, 7) if sex == "Male" else rng.gauss(163, 6.5)
    cm = min(max(cm, 152.5), 200)  # the ideal-body-weight formula starts at 60 in (152.4 cm)
    style = rng.random()
    if style < 0.5:
        return (round(cm), "cm")
    inches = round(cm / 2.54)
    if style < 0.75:
        return (inches, "in")
    return (inches // 12, "ft", inches % 12, "in")


def _si_is_faithful(value: float, unit: str, molar_mass: float) -> bool:
    """Whether the package converts this SI value to mg/dL within 0.5%. It rounds the moles to three
    decimals on the way (2.1 mmol/L calcium becomes 8.0 mg/dL, not 8.4), so for many values its gold
    would not be what a correct reading of the note gives; those patients get mg/dL instead."""
    from medcalc.utils.unit_converter_new import conversion_explanation

    per_litre = value / (1000 if unit.startswith(MICRO) else 1)  # mmol/L
    true_mg_dl = per_litre * molar_mass / 10
    converted = conversion_explanation(value, "x", molar_mass, None, unit, "mg/dL")[1]
    return abs(converted - true_mg_dl) <= 0.005 * true_mg_dl


def _labs_si_or_mg_dl(
    rng: random.Random, mg_dl: dict[str, float], molar_mass: dict[str, float], si_unit: str, si_digits: int,
    mg_dl_digits: int, p_si: float = 0.35,
) -> dict[str, tuple[float, str]]:
    """A panel in one unit: SI (mmol/L or µmol/L) with probability p_si where the package converts every
    value faithfully, else mg/dL. Molar masses are the ones the calculator passes to the package."""
    scale = 10 * (1000 if si_unit.startswith(MICRO) else 1)
    si = {k: round(v * scale / molar_mass[k], si_digits) for k, v in mg_dl.items()}
    if rng.random() < p_si and all(v > 0 and _si_is_faithful(v, si_unit, molar_mass[k]) for k, v in si.items()):
        return {k: (int(v) if si_digits == 0 else v, si_unit) for k, v in si.items()}
    return {k: (int(round(v)) if mg_dl_digits == 0 else round(v, mg_dl_digits), "mg/dL") for k, v in mg_dl.items()}


def _creatinine(rng: random.Random, low: float = 0.5, high: float = 4.0) -> tuple[float, str]:
    mg_dl = rng.uniform(low, high)
    return _labs_si_or_mg_dl(rng, {"x": mg_dl}, {"x": 113.12}, f"{MICRO}mol/L", 0, 2)["x"]


def _electrolyte_unit(rng: random.Random) -> str:
    return rng.choice(["mEq/L", "mmol/L"])


def _temperature(rng: random.Random, low_c: float, high_c: float) -> tuple[float, str]:
    celsius = rng.uniform(low_c, high_c)
    if rng.random() < 0.4:
        return (round(celsius * 9 / 5 + 32, 1), "degrees fahrenheit")
    return (round(celsius, 1), "degrees celsius")


def _flags(rng: random.Random, names: list[str], p_present: float, p_mentioned: float = 0.75) -> dict[str, bool]:
    """Yes/no findings; an absent one is sometimes left out of the note (the package then assumes absent)."""
    flags = {}
    for name in names:
        present = rng.random() < p_present
        if present or rng.random() < p_mentioned:
            flags[name] = present
    return flags


def _date(rng: random.Random, start: date = date(2015, 1, 1), days: int = 3650) -> date:
    return start + timedelta(days=rng.randrange(days))


def _us_date(d: date) -> str:
    return d.strftime("%m/%d/%Y")


# ---------------------------------------------------------------------------------------------
# Vignette helpers
# ---------------------------------------------------------------------------------------------

_SETTINGS = (
    "presents to the emergency department",
    "is seen in the outpatient clinic",
    "is admitted to the medical ward",
    "is reviewed on the morning ward round",
    "attends a follow-up appointment",
)


def _person(inputs: dict[str, Any], rng: random.Random) -> str:
    age = inputs.get("age")
    sex = inputs.get("sex")
    noun = {"Male": rng.choice(["man", "male patient"]), "Female": rng.choice(["woman", "female patient"])}.get(
        sex, "patient"
    )
    if age is not None:
        article = "An" if str(age[0]).startswith("8") or age[0] in (11, 18) else "A"
        return f"{article} {age[0]}-year-old {noun}"
    return f"A {noun}" if sex else "A patient"


def _opening(inputs: dict[str, Any], rng: random.Random) -> str:
    return f"{_person(inputs, rng)} {rng.choice(_SETTINGS)}."


def _qty(value: tuple) -> str:
    """A (value, unit) input as written in a note."""
    if len(value) == 4:
        return f"{value[0]} ft {value[2]} in"
    number, unit = value
    unit = {"degrees celsius": "°C", "degrees fahrenheit": "°F", "lbs": "lb", "mm hg": "mm Hg"}.get(unit, unit)
    return f"{number} {unit}"


def _findings(flags: dict[str, bool], phrases: dict[str, tuple[str, str]]) -> str:
    """Sentences for the mentioned yes/no findings: phrases[name] = (if present, if absent)."""
    present = [phrases[k][0] for k, v in flags.items() if v]
    absent = [phrases[k][1] for k, v in flags.items() if not v]
    sentences = []
    if present:
        sentences.append("History and examination are notable for " + _join(present) + ".")
    if absent:
        sentences.append("There is " + _join(["no " + a for a in absent]) + ".")
    return " ".join(sentences)


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _labs(parts: list[str]) -> str:
    return "Laboratory results: " + ", ".join(parts) + "."


# ---------------------------------------------------------------------------------------------
# The calculators
# ---------------------------------------------------------------------------------------------


def _body(rng: random.Random) -> dict[str, Any]:
    sex = _sex(rng)
    return {"sex": sex, "weight": _weight(rng, sex), "height": _height(rng, sex)}


def _body_vignette(inputs: dict[str, Any], rng: random.Random) -> str:
    return f"{_opening(inputs, rng)} Height {_qty(inputs['height'])}, weight {_qty(inputs['weight'])}."


def _bmi_sample(rng):
    body = _body(rng)
    return {"weight": body["weight"], "height": body["height"], "sex": body["sex"]}


def _map_sample(rng):
    systolic = rng.randint(85, 200)
    diastolic = rng.randint(max(40, systolic // 2 - 10), min(120, systolic - 20))
    return {"age": _age(rng), "sex": _sex(rng), "sys_bp": (systolic, "mm hg"), "dia_bp": (diastolic, "mm hg")}


def _map_vignette(inputs, rng):
    return (
        f"{_opening(inputs, rng)} Blood pressure is {inputs['sys_bp'][0]}/{inputs['dia_bp'][0]} mm Hg, "
        f"heart rate {rng.randint(55, 115)} beats per minute."
    )


def _anion_gap_sample(rng):
    unit = _electrolyte_unit(rng)
    while True:  # a gap of 4-30 from a chloride and bicarbonate each in its plausible range
        sodium, chloride = rng.randint(126, 152), rng.randint(86, 116)
        bicarbonate = sodium - chloride - rng.randint(4, 30)
        if 6 <= bicarbonate <= 34:
            break
    return {"sex": _sex(rng), "age": _age(rng), "sodium": (sodium, unit), "chloride": (chloride, unit),
            "bicarbonate": (bicarbonate, unit)}


def _anion_gap_vignette(inputs, rng):
    return f"{_opening(inputs, rng)} " + _labs(
        [f"sodium {_qty(inputs['sodium'])}", f"chloride {_qty(inputs['chloride'])}",
         f"bicarbonate {_qty(inputs['bicarbonate'])}", f"potassium {_uniform(rng, 3.1, 5.6, 1)} mmol/L"]
    )


def _calcium_sample(rng):
    albumin = rng.uniform(1.6, 4.8)
    calcium = rng.uniform(6.5, 11.5)
    return {
        "age": _age(rng), "sex": _sex(rng),
        "albumin": (round(albumin * 10), "g/L") if rng.random() < 0.35 else (round(albumin, 1), "g/dL"),
        "calcium": _labs_si_or_mg_dl(rng, {"x": calcium}, {"x": 40.08}, "mmol/L", 2, 1)["x"],
    }


def _calcium_vignette(inputs, rng):
    return f"{_opening(inputs, rng)} " + _labs(
        [f"total calcium {_qty(inputs['calcium'])}", f"albumin {_qty(inputs['albumin'])}",
         f"phosphate {_uniform(rng, 0.8, 1.6, 2)} mmol/L"]
    )


def _crcl_sample(rng):
    body = _body(rng)
    return {**body, "age": _age(rng, 25, 90), "creatinine": _creatinine(rng)}


def _crcl_vignette(inputs, rng):
    return (
        f"{_opening(inputs, rng)} Height {_qty(inputs['height'])}, weight {_qty(inputs['weight'])}. "
        f"Serum creatinine is {_qty(inputs['creatinine'])}."
    )


def _ckd_epi_sample(rng):
    return {"sex": _sex(rng), "age": _age(rng, 20, 90), "creatinine": _creatinine(rng, 0.5, 5.0)}


def _creatinine_vignette(inputs, rng):
    return f"{_opening(inputs, rng)} Serum creatinine is {_qty(inputs['creatinine'])}."


def _qt_sample(rng):
    return {"age": _age(rng), "sex": _sex(rng), "heart_rate": (rng.randint(45, 150), "beats per minute"),
            "qt_interval": (rng.randint(300, 520), "msec")}


def _qt_vignette(inputs, rng):
    return (
        f"{_opening(inputs, rng)} A 12-lead ECG shows sinus rhythm at {inputs['heart_rate'][0]} beats per minute "
        f"with a QT interval of {inputs['qt_interval'][0]} msec."
    )


def _ibw_sample(rng):
    sex = _sex(rng)
    return {"sex": sex, "age": _age(rng), "height": _height(rng, sex)}


def _ibw_vignette(inputs, rng):
    return f"{_opening(inputs, rng)} Height {_qty(inputs['height'])}."


def _ldl_sample(rng):
    hdl, triglycerides = rng.uniform(28, 95), rng.uniform(45, 390)
    total = hdl + triglycerides / 5 + rng.uniform(60, 210)
    panel = _labs_si_or_mg_dl(
        rng, {"total_cholestrol": total, "hdl_cholestrol": hdl, "triglycerides": triglycerides},
        {"total_cholestrol": 386.654, "hdl_cholestrol": 386.654, "triglycerides": 861.338}, "mmol/L", 2, 0,
    )
    return {"age": _age(rng), "sex": _sex(rng), **panel}


def _ldl_vignette(inputs, rng):
    return f"{_opening(inputs, rng)} " + _labs(
        [f"total cholesterol {_qty(inputs['total_cholestrol'])}", f"HDL cholesterol {_qty(inputs['hdl_cholestrol'])}",
         f"triglycerides {_qty(inputs['triglycerides'])} (fasting)"]
    )


def _glucose(rng, low: float, high: float) -> tuple[float, str]:
    return _labs_si_or_mg_dl(rng, {"x": rng.uniform(low, high)}, {"x": 180.16}, "mmol/L", 1, 0)["x"]


def _sch_sample(rng):
    return {"age": _age(rng), "sex": _sex(rng), "sodium": (rng.randint(118, 142), _electrolyte_unit(rng)),
            "glucose": _glucose(rng, 180, 1000)}


def _sch_vignette(inputs, rng):
    return f"{_opening(inputs, rng)} " + _labs(
        [f"sodium {_qty(inputs['sodium'])}", f"glucose {_qty(inputs['glucose'])}"]
    )


_CHA2DS2 = {
    "chf": ("congestive heart failure", "heart failure"),
    "hypertension": ("hypertension", "hypertension"),
    "stroke": ("a previous stroke", "previous stroke"),
    "tia": ("a transient ischaemic attack", "transient ischaemic attack"),
    "thromboembolism": ("a previous systemic thromboembolism", "thromboembolism"),
    "vascular_disease": ("peripheral artery disease", "vascular disease"),
    "diabetes": ("type 2 diabetes", "diabetes"),
}


def _cha2ds2_sample(rng):
    return {"age": _age(rng, 40, 95), "sex": _sex(rng), **_flags(rng, list(_CHA2DS2), 0.3)}


def _cha2ds2_vignette(inputs, rng):
    flags = {k: inputs[k] for k in _CHA2DS2 if k in inputs}
    return f"{_person(inputs, rng)} with atrial fibrillation is assessed for anticoagulation. " + _findings(flags, _CHA2DS2)


def _curb65_sample(rng):
    systolic = rng.randint(75, 170)
    bun = rng.uniform(6, 45)
    return {
        "age": _age(rng, 20, 95),
        "sys_bp": (systolic, "mm hg"),
        "dia_bp": (rng.randint(40, min(105, systolic - 20)), "mm hg"),
        "respiratory_rate": (rng.randint(12, 40), "breaths per minute"),
        "bun": _labs_si_or_mg_dl(rng, {"x": bun}, {"x": 28.02}, "mmol/L", 1, 0)["x"],
        **_flags(rng, ["confusion"], 0.3),
    }


def _curb65_vignette(inputs, rng):
    mental = {True: " The patient is newly confused and disoriented to time.", False: " The patient is alert and oriented."}
    text = (
        f"{_person(inputs, rng)} presents with fever and a productive cough; chest X-ray shows a lobar consolidation. "
        f"Blood pressure {inputs['sys_bp'][0]}/{inputs['dia_bp'][0]} mm Hg, respiratory rate "
        f"{inputs['respiratory_rate'][0]} breaths per minute."
    )
    if "confusion" in inputs:
        text += mental[inputs["confusion"]]
    return text + f" Blood urea nitrogen is {_qty(inputs['bun'])}."


_CENTOR = {
    "exudate_swelling_tonsils": ("tonsillar exudate and swelling", "tonsillar exudate"),
    "tender_lymph_nodes": ("tender, swollen anterior cervical lymph nodes", "cervical lymphadenopathy"),
    "cough_absent": ("no cough", "cough absent"),  # handled in the vignette: absence of cough is the finding
}


def _centor_sample(rng):
    return {"age": _age(rng, 3, 75), "temperature": _temperature(rng, 36.5, 39.8),
            **_flags(rng, list(_CENTOR), 0.45)}


def _centor_vignette(inputs, rng):
    text = f"{_person(inputs, rng)} presents with a sore throat. Temperature is {_qty(inputs['temperature'])}. "
    signs = {k: inputs[k] for k in ("exudate_swelling_tonsils", "tender_lymph_nodes") if k in inputs}
    text += _findings(signs, _CENTOR)
    if "cough_absent" in inputs:
        text += " The patient denies any cough." if inputs["cough_absent"] else " The patient also has a dry cough."
    return text.strip()


_HAS_BLED = {
    "hypertension": ("uncontrolled hypertension (systolic above 160 mm Hg)", "uncontrolled hypertension"),
    "liver_disease_has_bled": ("cirrhosis", "liver disease"),
    "renal_disease_has_bled": ("end-stage renal disease on dialysis", "renal disease"),
    "stroke": ("a previous stroke", "history of stroke"),
    "prior_bleeding": ("a previous major gastrointestinal bleed", "prior major bleeding"),
    "labile_inr": ("labile INRs with under 60% time in therapeutic range", "labile INR"),
    "medications_for_bleeding": ("daily aspirin use", "use of antiplatelets or NSAIDs"),
}


def _has_bled_sample(rng):
    return {"age": _age(rng, 40, 92), "sex": _sex(rng), "alcoholic_drinks": rng.choice([0, 0, 2, 4, 6, 8, 10, 14]),
            **_flags(rng, list(_HAS_BLED), 0.25)}


def _has_bled_vignette(inputs, rng):
    flags = {k: inputs[k] for k in _HAS_BLED if k in inputs}
    drinks = inputs["alcoholic_drinks"]
    alcohol = "does not drink alcohol" if drinks == 0 else f"drinks about {drinks} alcoholic drinks per week"
    return (
        f"{_person(inputs, rng)} on warfarin for atrial fibrillation is reviewed. The patient {alcohol}. "
        + _findings(flags, _HAS_BLED)
    ).strip()


_GCS = {
    "best_eye_response": ["eyes open spontaneously", "eye opening to verbal command", "eye opening to pain",
                          "no eye opening"],
    "best_verbal_response": ["oriented", "confused", "inappropriate words", "incomprehensible sounds",
                             "no verbal response"],
    "best_motor_response": ["obeys commands", "localizes pain", "withdrawal from pain", "flexion to pain",
                            "extension to pain", "no motor response"],
}
_GCS_TEXT = {
    "eyes open spontaneously": "the eyes are open spontaneously",
    "eye opening to verbal command": "the eyes open only when spoken to",
    "eye opening to pain": "the eyes open only to a painful stimulus",
    "no eye opening": "there is no eye opening even to pain",
    "oriented": "speech is oriented",
    "confused": "speech is confused",
    "inappropriate words": "the patient utters inappropriate words",
    "incomprehensible sounds": "the patient makes only incomprehensible sounds",
    "no verbal response": "there is no verbal response",
    "obeys commands": "the patient obeys motor commands",
    "localizes pain": "the patient localises to pain",
    "withdrawal from pain": "the limbs withdraw from pain",
    "flexion to pain": "there is abnormal flexion to pain",
    "extension to pain": "there is extension to pain",
    "no motor response": "there is no motor response",
}


def _gcs_sample(rng):
    return {"age": _age(rng, 16, 90), "sex": _sex(rng), **{k: rng.choice(v) for k, v in _GCS.items()}}


def _gcs_vignette(inputs, rng):
    cause = rng.choice(["after a fall from a ladder", "after a road traffic collision", "found collapsed at home",
                        "after a witnessed seizure"])
    parts = [_GCS_TEXT[inputs[k]] for k in _GCS]
    return f"{_person(inputs, rng)} is brought in {cause}. On assessment, {parts[0]}, {parts[1]} and {parts[2]}."


def _child_pugh_sample(rng):
    # bilirubin at exactly 2 mg/dL scores nothing in the package: never drawn. Always mg/dL: the package
    # converts µmol/L with a molar mass of 548.66 (bilirubin's is 584.66), 6% off.
    bilirubin = rng.choice([rng.uniform(0.4, 1.9), rng.uniform(2.1, 2.9), rng.uniform(3.1, 8.0)])
    albumin = rng.uniform(1.8, 4.6)
    inputs = {
        "age": _age(rng, 30, 85), "sex": _sex(rng),
        "inr": round(rng.choice([rng.uniform(0.9, 1.65), rng.uniform(1.75, 2.25), rng.uniform(2.4, 3.5)]), 1),
        "bilirubin": (round(bilirubin, 1), "mg/dL"),
        "albumin": (round(albumin * 10), "g/L") if rng.random() < 0.35 else (round(albumin, 1), "g/dL"),
    }
    if rng.random() < 0.85:
        inputs["ascites"] = rng.choice(["Absent", "Slight", "Moderate"])
    if rng.random() < 0.85:
        inputs["encephalopathy"] = rng.choice(["No Encephalopathy", "Grade 1-2", "Grade 3-4"])
    return inputs


def _child_pugh_vignette(inputs, rng):
    text = f"{_person(inputs, rng)} with alcohol-related cirrhosis {rng.choice(_SETTINGS)}."
    ascites = {"Absent": "There is no ascites.", "Slight": "There is slight ascites on ultrasound.",
               "Moderate": "There is moderate ascites with shifting dullness."}
    encephalopathy = {"No Encephalopathy": "There is no hepatic encephalopathy.",
                      "Grade 1-2": "The patient has grade 1-2 hepatic encephalopathy (mild confusion, asterixis).",
                      "Grade 3-4": "The patient has grade 3-4 hepatic encephalopathy (somnolent, barely rousable)."}
    if "ascites" in inputs:
        text += " " + ascites[inputs["ascites"]]
    if "encephalopathy" in inputs:
        text += " " + encephalopathy[inputs["encephalopathy"]]
    return text + " " + _labs(
        [f"total bilirubin {_qty(inputs['bilirubin'])}", f"albumin {_qty(inputs['albumin'])}", f"INR {inputs['inr']}"]
    )


_PERC = {
    "unilateral_leg_swelling": ("unilateral leg swelling", "leg swelling"),
    "hemoptysis": ("haemoptysis", "haemoptysis"),
    "recent_surgery_or_trauma": ("surgery four weeks ago", "recent surgery or trauma"),
    "previous_pe": ("a previous pulmonary embolism", "prior pulmonary embolism"),
    "previous_dvt": ("a previous deep vein thrombosis", "prior deep vein thrombosis"),
    "hormonal_use": ("use of the combined oral contraceptive pill", "hormone use"),
}


def _perc_sample(rng):
    return {"age": _age(rng, 18, 85), "sex": _sex(rng), "heart_rate": (rng.randint(55, 130), "beats per minute"),
            "oxygen_sat": (rng.randint(88, 100), "%"), **_flags(rng, list(_PERC), 0.15)}


def _perc_vignette(inputs, rng):
    flags = {k: inputs[k] for k in _PERC if k in inputs}
    return (
        f"{_person(inputs, rng)} presents with pleuritic chest pain. Heart rate {inputs['heart_rate'][0]} beats per "
        f"minute, oxygen saturation {inputs['oxygen_sat'][0]}% on room air. " + _findings(flags, _PERC)
    ).strip()


_WELLS_PE = {
    "clinical_dvt": ("clinical signs of deep vein thrombosis (a swollen, tender left calf)", "signs of deep vein thrombosis"),
    "pe_number_one": ("pulmonary embolism judged the most likely diagnosis", "more likely alternative than pulmonary embolism"),
    "immobilization_for_3days": ("immobilisation in bed for the past four days", "recent immobilisation"),
    "surgery_in_past4weeks": ("a hip replacement three weeks ago", "surgery in the past four weeks"),
    "previous_pe": ("a previous pulmonary embolism", "previous pulmonary embolism"),
    "previous_dvt": ("a previous deep vein thrombosis", "previous deep vein thrombosis"),
    "hemoptysis": ("haemoptysis", "haemoptysis"),
    "malignancy_with_treatment": ("lung cancer on chemotherapy", "active malignancy"),
}


def _wells_pe_sample(rng):
    return {"age": _age(rng), "sex": _sex(rng), "heart_rate": (rng.randint(60, 135), "beats per minute"),
            **_flags(rng, list(_WELLS_PE), 0.25)}


def _wells_pe_vignette(inputs, rng):
    flags = {k: inputs[k] for k in _WELLS_PE if k in inputs}
    return (
        f"{_person(inputs, rng)} presents with sudden breathlessness. Heart rate is {inputs['heart_rate'][0]} beats "
        "per minute. " + _findings(flags, _WELLS_PE)
    ).strip()


_FEVERPAIN = {
    "fever_24_hours": ("a fever in the past 24 hours", "fever in the past 24 hours"),
    "purulent_tonsils": ("purulent tonsils", "tonsillar pus"),
    "symptom_onset": ("symptoms that began two days ago", "rapid onset (the sore throat began a week ago)"),
    "severe_tonsil_inflammation": ("severely inflamed tonsils", "severe tonsillar inflammation"),
    "cough_coryza_absent": ("no cough or coryza", "cough or coryza absent"),
}


def _feverpain_sample(rng):
    return {"age": _age(rng, 5, 70), "sex": _sex(rng), **_flags(rng, list(_FEVERPAIN), 0.45)}


def _feverpain_vignette(inputs, rng):
    signs = {k: inputs[k] for k in ("fever_24_hours", "purulent_tonsils", "severe_tonsil_inflammation") if k in inputs}
    text = f"{_person(inputs, rng)} presents with a sore throat. " + _findings(signs, _FEVERPAIN)
    if "symptom_onset" in inputs:
        text += " The symptoms began two days ago." if inputs["symptom_onset"] else " The symptoms began a week ago."
    if "cough_coryza_absent" in inputs:
        text += " There is no cough or runny nose." if inputs["cough_coryza_absent"] else " There is a cough and a runny nose."
    return text.strip()


_RCRI = {
    "elevated_risk_surgery": ("is scheduled for an open abdominal aortic aneurysm repair", "is scheduled for a knee arthroscopy"),
    "ischemetic_heart_disease": ("a previous myocardial infarction", "ischaemic heart disease"),
    "congestive_heart_failure": ("heart failure with pulmonary oedema last year", "heart failure"),
    "cerebrovascular_disease": ("a previous transient ischaemic attack", "cerebrovascular disease"),
    "pre_operative_insulin_treatment": ("diabetes treated with insulin", "insulin-treated diabetes"),
}


def _rcri_sample(rng):
    return {"age": _age(rng, 40, 90), "sex": _sex(rng), **_flags(rng, list(_RCRI), 0.3),
            "pre_operative_creatinine": _creatinine(rng, 0.6, 3.5)}


def _rcri_vignette(inputs, rng):
    parts = [f"{_person(inputs, rng)} attends the pre-operative assessment clinic."]
    if "elevated_risk_surgery" in inputs:
        parts.append("The patient " + _RCRI["elevated_risk_surgery"][0 if inputs["elevated_risk_surgery"] else 1] + ".")
    parts.append(_findings({k: inputs[k] for k in list(_RCRI)[1:] if k in inputs}, _RCRI))
    parts.append(f"Pre-operative creatinine is {_qty(inputs['pre_operative_creatinine'])}.")
    return " ".join(p for p in parts if p)


def _due_date_sample(rng):
    return {"menstrual_date": _us_date(_date(rng)), "cycle_length": rng.randint(21, 35)}


def _due_date_vignette(inputs, rng):
    age = rng.randint(19, 42)
    return (
        f"A {age}-year-old woman with a positive pregnancy test attends her booking visit. The first day of her last "
        f"menstrual period was {inputs['menstrual_date']}, and her cycles are regular at {inputs['cycle_length']} days."
    )


def _gestational_age_sample(rng):
    last_period = _date(rng)
    return {"menstrual_date": _us_date(last_period),
            "current_date": _us_date(last_period + timedelta(days=rng.randint(28, 290)))}


def _gestational_age_vignette(inputs, rng):
    return (
        f"A {rng.randint(19, 42)}-year-old pregnant woman is seen on {inputs['current_date']}. The first day of her "
        f"last menstrual period was {inputs['menstrual_date']}."
    )


# 24 of the package's 55. Left out, among others: sirs_criteria (it compares the white cell count with
# 12,000 after converting it to count per m^3, so that criterion is always met) and sOsm (its explanation
# prints the BUN term where the glucose term belongs): their text or gold would teach a wrong calculation.
CALCULATORS: dict[str, Calculator] = {
    c.name: c
    for c in [
        # scores and counts
        Calculator("cha2ds2_vasc_score", "generate_cha2ds2_vasc_explanation", "the patient's CHA2DS2-VASc score", "score",
                   "integer", _cha2ds2_sample, _cha2ds2_vignette),
        Calculator("curb_65", "curb_65_explanation", "the patient's CURB-65 score", "score", "integer", _curb65_sample,
                   _curb65_vignette),
        Calculator("centor_score", "compute_centor_score_explanation", "the patient's Centor score (modified/McIsaac)", "score",
                   "integer", _centor_sample, _centor_vignette),
        Calculator("feverpain", "compute_fever_pain_explanation", "the patient's FeverPAIN score", "score", "integer",
                   _feverpain_sample, _feverpain_vignette),
        Calculator("has_bled_score", "compute_has_bled_score_explanation", "the patient's HAS-BLED score", "score", "integer",
                   _has_bled_sample, _has_bled_vignette),
        Calculator("glasgow_coma_score", "compute_glasgow_coma_score_explanation", "the patient's Glasgow Coma Scale score",
                   "score", "integer", _gcs_sample, _gcs_vignette),
        Calculator("child_pugh_score", "compute_child_pugh_score_explanation", "the patient's Child-Pugh score", "score",
                   "integer", _child_pugh_sample, _child_pugh_vignette),
        Calculator("perc_rule", "compute_perc_rule_explanation", "the number of PERC rule criteria the patient meets", "score",
                   "integer", _perc_sample, _perc_vignette),
        Calculator("cardiac_risk_index", "compute_cardiac_index_explanation", "the patient's Revised Cardiac Risk Index score",
                   "score", "integer", _rcri_sample, _rcri_vignette),
        # MedCalc-Bench scores Wells' PE as a decimal (1.5-point criteria): within its tolerance
        Calculator("wells_criteria_pe", "calculate_pe_wells_explanation", "the patient's Wells' score for pulmonary embolism",
                   "score", "decimal", _wells_pe_sample, _wells_pe_vignette),
        # equations
        Calculator("bmi_calculator", "bmi_calculator_explanation", "the patient's body mass index in kg/m²", "equation", "decimal",
                   _bmi_sample, _body_vignette),
        Calculator("mean_arterial_pressure", "mean_arterial_pressure_explanation", "the patient's mean arterial pressure in mm Hg",
                   "equation", "decimal", _map_sample, _map_vignette),
        Calculator("anion_gap", "compute_anion_gap_explanation", "the patient's anion gap in mEq/L", "equation", "decimal",
                   _anion_gap_sample, _anion_gap_vignette),
        Calculator("calcium_correction", "calculate_corrected_calcium_explanation",
                   "the patient's albumin-corrected calcium in mg/dL (normal albumin 4 g/dL)", "equation", "decimal",
                   _calcium_sample, _calcium_vignette),
        Calculator("creatinine_clearance", "generate_cockcroft_gault_explanation",
                   "the patient's creatinine clearance by the Cockcroft-Gault equation in mL/min", "equation", "decimal",
                   _crcl_sample, _crcl_vignette),
        Calculator("ckd_epi_2021_creatinine", "ckd_epi_2021_explanation",
                   "the patient's estimated GFR by the 2021 CKD-EPI creatinine equation in mL/min/1.73 m²", "equation", "decimal",
                   _ckd_epi_sample, _creatinine_vignette),
        Calculator("qt_calculator_bazett", "bazett_calculator_explanation", "the patient's corrected QT interval (Bazett) in msec",
                   "equation", "decimal", _qt_sample, _qt_vignette),
        Calculator("qt_calculator_fredericia", "fredericia_calculator_explanation",
                   "the patient's corrected QT interval (Fridericia) in msec", "equation", "decimal", _qt_sample, _qt_vignette),
        Calculator("ideal_body_weight", "ibw_explanation", "the patient's ideal body weight (Devine) in kg", "equation", "decimal",
                   _ibw_sample, _ibw_vignette),
        Calculator("ldl_calculated", "compute_ldl_explanation", "the patient's LDL cholesterol (Friedewald) in mg/dL", "equation",
                   "decimal", _ldl_sample, _ldl_vignette),
        Calculator("sch", "compute_sodium_correction_hyperglycemia_explanation",
                   "the patient's sodium corrected for hyperglycaemia in mEq/L", "equation", "decimal", _sch_sample, _sch_vignette),
        # dates
        Calculator("estimated_due_date", "add_40_weeks_explanation", "the patient's estimated due date by Naegele's rule", "date",
                   "date", _due_date_sample, _due_date_vignette),
        Calculator("conception_date", "add_2_weeks_explanation", "the patient's estimated date of conception", "date", "date",
                   _due_date_sample, _due_date_vignette),
        Calculator("gestational_age", "compute_gestational_age_explanation", "the patient's gestational age in weeks and days",
                   "date", "weeks_days", _gestational_age_sample, _gestational_age_vignette),
    ]
}

_ANSWER_FORMS = {
    "integer": "'Answer: <number>'",
    "decimal": "'Answer: <number>'",
    "date": "'Answer: MM/DD/YYYY'",
    "weeks_days": "'Answer: (<weeks>, <days>)'",
}


# ---------------------------------------------------------------------------------------------
# Running the package
# ---------------------------------------------------------------------------------------------


def package_version() -> str:
    try:
        return importlib.metadata.version("medcalc-bench")
    except importlib.metadata.PackageNotFoundError:
        raise MissingSourceError(
            f"the medcalc task family needs MedCalc-Bench's calculators; install them with: pip install {PACKAGE}"
        ) from None


def run_calculator(name: str, inputs: dict[str, Any]) -> tuple[str, str]:
    """(explanation, gold) from the package; the gold is written the way `medcalc_score` reads it."""
    package_version()
    calculator = CALCULATORS[name]
    function = getattr(importlib.import_module(f"medcalc.{calculator.name}"), calculator.function)
    result = function(copy.deepcopy(inputs))  # several calculators fill in absent findings in place
    return _clean(result["Explanation"]), format_gold(result["Answer"], calculator.output)


def _clean(explanation: str) -> str:
    """The package's text with its source indentation and runs of blank lines removed."""
    lines = [" ".join(line.split()) for line in explanation.strip().splitlines()]
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def format_gold(answer: Any, output: str) -> str:
    if output == "integer":
        return str(int(answer))
    if output == "decimal":
        return repr(float(answer))  # always with a decimal point: the format marks a tolerance-scored gold
    if output == "date":
        return str(answer)
    if output == "weeks_days":
        weeks, days = (int(str(part).split()[0]) for part in answer)
        return f"({weeks}, {days})"
    raise ValueError(f"unknown MedCalc-Bench output type {output!r}")


def patient_key(name: str, inputs: dict[str, Any]) -> str:
    """A patient is its input set: equal inputs are one patient, whatever the split."""
    digest = hashlib.sha1(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    return f"medcalc:{name}:{digest}"


def question(name: str, inputs: dict[str, Any], rng: random.Random) -> str:
    calculator = CALCULATORS[name]
    return (
        f"{calculator.vignette(inputs, rng)}\n\nWhat is {calculator.quantity}? "
        f"Give the final answer on the last line as {_ANSWER_FORMS[calculator.output]}."
    )


@dataclass
class Patient:
    calculator: str
    inputs: dict[str, Any]
    item: str


@dataclass
class MedcalcQuestion:
    task: str
    example: Example
    calculator: str
    kind: str
    output_type: str

    def fields(self) -> dict[str, str]:
        return {"calculator": self.calculator, "kind": self.kind, "output_type": self.output_type}


def make_question(patient: Patient, decoy: Patient, task: str, seed: int) -> MedcalcQuestion:
    """The patient's question and the package's worked answer; the hard negative is the worked answer of a
    decoy patient (same calculator, different answer): a reading of the wrong values."""
    calculator = CALCULATORS[patient.calculator]
    rng = random.Random(f"{seed}|medcalc|wording|{patient.item}")
    explanation, gold = run_calculator(patient.calculator, patient.inputs)
    wrong_explanation, wrong_gold = run_calculator(decoy.calculator, decoy.inputs)
    example = Example(patient.item, question(patient.calculator, patient.inputs, rng), explanation, gold,
                      wrong_explanation, wrong_gold, RULE)
    return MedcalcQuestion(task, example, calculator.name, calculator.kind, calculator.output)


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------


class _Stream:
    """A calculator's seeded stream of new patients: an input set is drawn once, never twice."""

    def __init__(self, name: str, seed: int, stream: str, taken: set[str]):
        self.name, self.taken = name, taken
        self.rng = random.Random(f"{seed}|medcalc|{stream}|{name}")

    def draw(self, avoid_answer: str | None = None) -> Patient:
        for _ in range(10_000):
            inputs = CALCULATORS[self.name].sample(self.rng)
            item = patient_key(self.name, inputs)
            if item in self.taken:
                continue
            if avoid_answer is not None and run_calculator(self.name, inputs)[1] == avoid_answer:
                continue
            self.taken.add(item)
            return Patient(self.name, inputs, item)
        raise RuntimeError(f"calculator {self.name}: no new patient in 10,000 draws (its input space is too small)")


def check_calculators(names: list[str] | tuple[str, ...], field: str) -> None:
    unknown = [n for n in names if n not in CALCULATORS]
    if unknown:
        raise ValueError(f"{field}: unknown calculator(s) {unknown}; choose from {sorted(CALCULATORS)}")


def medcalc_sets(
    seed: int,
    train_per_calculator: int,
    eval_per_calculator: int,
    heldout_calculators: list[str] | tuple[str, ...] = DEFAULT_HELDOUT,
    calculators: list[str] | tuple[str, ...] | None = None,
) -> dict[str, list[MedcalcQuestion]]:
    """Questions per side: "sft", "preference", "rl" (training), "test" and "dev" (held out).

    Per calculator the test patients are drawn first, then dev, then each training split's own: the held-out
    questions do not change with the training budget. Held-out calculators give test and dev questions only,
    under the task `medcalc_unseen`. Each side lists its questions round-robin over calculators, so any prefix
    of a task is balanced. Decoys (the preference negatives) come from a separate stream that also never
    repeats a patient of any side. `calculators` (None: all) keeps some of the family: every calculator draws
    from its own seeded stream, so the others' patients do not change."""
    check_calculators(heldout_calculators, "medcalc.heldout_calculators")
    if calculators is not None:
        check_calculators(calculators, "medcalc.calculators")
    sides: dict[str, dict[str, list[MedcalcQuestion]]] = {
        s: {} for s in ("test", "dev", "sft", "preference", "rl")
    }
    for name, calculator in CALCULATORS.items():
        if calculators is not None and name not in calculators:
            continue
        unseen = name in heldout_calculators
        task = UNSEEN_TASK if unseen else f"medcalc_{calculator.kind}"
        taken: set[str] = set()
        patients = _Stream(name, seed, "patients", taken)
        decoys = _Stream(name, seed, "decoys", taken)
        for side in ("test", "dev") if unseen else ("test", "dev", "sft", "preference", "rl"):
            n = eval_per_calculator if side in ("test", "dev") else train_per_calculator
            drawn = [patients.draw() for _ in range(n)]
            sides[side][name] = [
                make_question(p, decoys.draw(avoid_answer=run_calculator(name, p.inputs)[1]), task, seed)
                for p in drawn
            ]
    return {side: _round_robin(list(per.values())) for side, per in sides.items()}


def _round_robin(groups: list[list[MedcalcQuestion]]) -> list[MedcalcQuestion]:
    return [q for batch in itertools.zip_longest(*groups) for q in batch if q is not None]
