"""Text encoders: the bundled offline model, a second model chosen by path, and the error for a model that cannot
be loaded."""
import pytest
import torch
from conftest import save_tiny_text_model

from nnunet_diffusion.text.encoders import DEFAULT_TEXT_MODEL, TextModelError, load_text_encoder

PROMPTS = ["A T1 image of the background.", "The cerebellum below the occipital lobe.", "Frontal cortex."]


@pytest.fixture(scope="module")
def bundled():
    return load_text_encoder(None)


def test_bundled_model_gives_attention_masked_mean_of_its_last_hidden_state(bundled):
    vectors = bundled.embed(PROMPTS)
    assert bundled.name == DEFAULT_TEXT_MODEL and vectors.shape == (3, 384) and vectors.dtype == torch.float32
    # independent computation, prompt by prompt (no padding: the mean over its own tokens)
    for prompt, vector in zip(PROMPTS, vectors):
        tokens = bundled.tokenizer([prompt], return_tensors="pt")
        with torch.no_grad():
            hidden = bundled.model(**tokens).last_hidden_state[0]
        torch.testing.assert_close(vector, hidden.mean(0), rtol=1e-4, atol=1e-5)
    # a sentence encoder: related prompts are closer than unrelated ones
    similarity = torch.nn.functional.cosine_similarity
    cortex = bundled.embed(["Cortex of the frontal lobe."])[0]
    assert similarity(cortex, vectors[2], dim=0) > similarity(cortex, vectors[0], dim=0)


def test_second_encoder_chosen_by_path(tmp_path, bundled):
    folder = save_tiny_text_model(tmp_path / "tiny-bert")
    encoder = load_text_encoder(folder)
    vectors = encoder.embed(PROMPTS)
    assert vectors.shape == (3, 24) and torch.isfinite(vectors).all()
    assert not torch.allclose(vectors[0], vectors[1])


def test_unknown_model_offline_says_how_to_fix_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TextModelError) as error:
        load_text_encoder("no-such-org/no-such-model")
    message = str(error.value)
    assert "Cannot load the text model 'no-such-org/no-such-model'" in message
    assert "HF_HUB_OFFLINE is set" in message and "NNUNET_DIFFUSION_TEXT_MODEL" in message
