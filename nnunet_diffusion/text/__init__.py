"""Text encoders and prompts shared by every text-conditioned method (TextDiffSeg, DSM)."""
from nnunet_diffusion.text.encoders import DEFAULT_TEXT_MODEL, TextEncoder, TextModelError, load_text_encoder
from nnunet_diffusion.text.prompts import PROMPT_TEMPLATE, class_prompts

__all__ = ["DEFAULT_TEXT_MODEL", "TextEncoder", "TextModelError", "load_text_encoder", "PROMPT_TEMPLATE",
           "class_prompts"]
