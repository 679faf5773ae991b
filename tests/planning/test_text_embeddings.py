"""The class-prompt embedding cache beside the preprocessed data: computed once, reused without loading the text
model, recomputed (and said) when the prompts change, one file per model."""
import pytest
import torch

from nnunet_diffusion.planning import text_embeddings
from nnunet_diffusion.planning.text_embeddings import cache_path, class_text_embeddings

DATASET = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "tumour": 2}}


class CountingEncoder:
    """Stands in for a text model: embeds a prompt as (its length, its word count) and counts the loads."""
    loads = 0

    def __init__(self, name):
        CountingEncoder.loads += 1

    def embed(self, prompts):
        return torch.tensor([[float(len(p)), float(len(p.split()))] for p in prompts])


@pytest.fixture(autouse=True)
def counting(monkeypatch):
    CountingEncoder.loads = 0
    monkeypatch.setattr(text_embeddings, "load_text_encoder", CountingEncoder)


def test_cache_is_reused_and_invalidated_when_a_prompt_changes(tmp_path):
    log = []
    first = class_text_embeddings(DATASET, tmp_path, "some/model", log=log.append)
    assert CountingEncoder.loads == 1 and cache_path(tmp_path, "some/model").is_file()
    assert first.prompts == ("A CT image of the background.", "A CT image of the liver.", "A CT image of the tumour.")
    torch.testing.assert_close(first.vectors[1], torch.tensor([24.0, 6.0]))
    again = class_text_embeddings(DATASET, tmp_path, "some/model", log=log.append)
    assert CountingEncoder.loads == 1 and "reusing" in log[-1]  # the text model was not loaded again
    torch.testing.assert_close(again.vectors, first.vectors)
    assert again.digest == first.digest and again.settings()["dim"] == 2
    described = {**DATASET, "label_descriptions": {"tumour": "A hypodense liver lesion."}}
    changed = class_text_embeddings(described, tmp_path, "some/model", log=log.append)
    assert CountingEncoder.loads == 2
    assert "prompts changed" in log[-2] and "'A CT image of the tumour.' -> 'A hypodense liver lesion.'" in log[-2]
    assert changed.digest != first.digest
    torch.testing.assert_close(changed.vectors[2], torch.tensor([25.0, 4.0]))


def test_one_cache_file_per_model(tmp_path):
    class_text_embeddings(DATASET, tmp_path, "model/a", log=lambda _: None)
    class_text_embeddings(DATASET, tmp_path, str(tmp_path / "local model"), log=lambda _: None)
    assert CountingEncoder.loads == 2
    assert len(list((tmp_path / "text_embeddings").glob("*.pt"))) == 2
    assert not list((tmp_path / "text_embeddings").glob(".*partial"))  # written whole, then renamed
