"""Class prompts from dataset.json: descriptions where given, the documented template elsewhere, and clear errors
for descriptions text could not use."""
import pytest

from nnunet_diffusion.text.prompts import PROMPT_TEMPLATE, class_prompts

DATASET = {"channel_names": {"0": "T1", "1": "FLAIR"},
           "labels": {"background": 0, "left_hippocampus": 2, "tumour": 1},
           "label_descriptions": {"tumour": "An enhancing brain tumour."}}


def test_descriptions_and_template_in_class_order():
    assert PROMPT_TEMPLATE == "A {modality} image of the {label}."
    assert class_prompts(DATASET) == ["A T1 and FLAIR image of the background.", "An enhancing brain tumour.",
                                      "A T1 and FLAIR image of the left hippocampus."]


@pytest.mark.parametrize("descriptions, message", [
    ({"tumour": "  "}, "empty description for 'tumour'"),
    ({"tumor": "x"}, "describes ['tumor'], which are not in 'labels'"),
    ({"tumour": "A t1 and flair image of the left hippocampus."}, "Classes 'tumour' and 'left_hippocampus' have "
                                                                  "the same prompt"),
])
def test_descriptions_text_cannot_use_are_refused(descriptions, message):
    with pytest.raises(ValueError, match="label_descriptions"):
        class_prompts({**DATASET, "label_descriptions": descriptions})
    with pytest.raises(ValueError) as error:
        class_prompts({**DATASET, "label_descriptions": descriptions})
    assert message in str(error.value)
