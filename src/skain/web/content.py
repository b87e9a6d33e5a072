"""Words shown to people: class descriptions and the disclaimer. Presentation only, no ML."""
from __future__ import annotations

from skain.data.schema import CLASS_NAMES, MALIGNANT

DESCRIPTIONS: dict[str, str] = {
    "akiec": "Sun-damage lesions that are pre-cancerous (actinic keratosis) or an early, in-situ squamous "
             "cell carcinoma (Bowen's disease); they can progress to invasive cancer.",
    "bcc": "The most common skin cancer. It grows slowly and rarely spreads, but can damage the surrounding "
           "tissue if left untreated.",
    "bkl": "Benign growths such as seborrhoeic keratoses, solar lentigines and lichen-planus-like keratoses; "
           "some can look like melanoma.",
    "df": "A common, harmless fibrous nodule of the skin, often on the legs.",
    "mel": "A malignant tumour of the pigment cells and the most dangerous diagnosis here; curable when "
           "found early.",
    "nv": "A common mole: a benign growth of pigment cells, and by far the most frequent class in HAM10000.",
    "vasc": "Benign lesions of the blood vessels, such as cherry angiomas, angiokeratomas and pyogenic "
            "granulomas.",
}

DISCLAIMER = ("Research and education only. Not a medical device: it does not diagnose, and it must not be used "
              "to make or delay decisions about anyone's health. See a doctor about any skin lesion that "
              "worries you.")


def describe(code: str) -> dict:
    """Code -> the full name, a short description and whether HAM10000 counts the class as malignant."""
    return {"code": code, "name": CLASS_NAMES.get(code, code), "description": DESCRIPTIONS.get(code, ""),
            "malignant": code in MALIGNANT}
