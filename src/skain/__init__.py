"""skAIn: multimodal skin-lesion classification on HAM10000 (image + age, sex, body site)."""

__version__ = "0.1.0"
