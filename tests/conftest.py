import os

# Nothing in the tests may reach a hub; set before any HF import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import pytest  # noqa: E402

from tests.endpoints import ScriptedEndpoint  # noqa: E402


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """One real Prefect server (temp SQLite) for the whole session: it takes 10-25 s to start."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    storage = tmp_path_factory.mktemp("prefect-results")
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: str(storage)}):
        with prefect_test_harness(server_startup_timeout=120):
            yield


@pytest.fixture
def scripted():
    server = ScriptedEndpoint()
    yield server
    server.close()


@pytest.fixture(scope="session")
def tokenizer():
    from doctune.base_model import prepare_base_model
    from doctune.training.model import load_tokenizer

    return load_tokenizer(str(prepare_base_model()))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tokenizer) -> str:
    """A random Llama (hidden 64, 2 layers) with SmolLM2's tokenizer and chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
